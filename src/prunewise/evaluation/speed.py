"""What the sparsity buys at inference: a pruned model against its dense source, on one device.

``prunewise speed --model RUN`` loads the run's pruned checkpoint and its dense source (checked
against the record's fingerprint) and measures, on ``--device``, up to three models side by side:

- ``dense source``: the model the run pruned;
- ``pruned, dense``: the pruned weights as dense tensors (what a dense-format run loads);
- ``pruned, sparse kernel`` (CPU): every pruned ``nn.Linear`` as a
  :class:`~prunewise.sparse.kernel.SparseLinear`, which reads only the values and bitmask at decode
  and small batches (a ``--format sparse`` run loads this way; a dense-format run is packed in
  memory first).

For each it gives **prefill** tokens/s of one forward pass at each ``batch x length`` shape
(random token ids; timing does not depend on them) and **decode** tokens/s of greedy generation
with the KV cache after a short prompt. **Layers**: for every distinct linear shape, one pass of
``x W^T`` over all the model's layers of that shape (so a small weight is not timed hot in the
cache) at each row count, the pruned weight dense and on the kernel, with the bytes the kernel
reads and the rate it reads them at against a streaming read of memory measured in the same
process (:func:`prunewise.sparse.kernel.read_bandwidth`). **Sizes**: the checkpoint's tensors
dense and packed, and the bytes one decode step reads, which bound the decode speed-up.

Models are timed in turns (one run of each per round, after a warm-up of each), so drift on a
shared machine falls on all of them alike; each figure is the median of ``repeat`` rounds. A pruned
model run densely does the dense model's arithmetic on the same shapes: its figures differ from
the source's only by noise (subnormal floats, once suspected, do not occur: flushing them leaves
the bundled model's logits bit-identical, ``benchmarks/RESULTS.md``).

GPU: 2:4 weights through :func:`torch.sparse.to_sparse_semi_structured` on CUDA GPUs of compute
capability 8.0 or newer in fp16/bf16 (measured as ``pruned (2:4 kernels)``); the sparse kernel is
a CPU kernel and is not measured there.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..model.blocks import BlockSource
from ..model.layers import weight_matrix
from ..prune.masks import count_true
from ..sparse import kernel

SOURCE, PRUNED, SPARSE, SEMI = "dense source", "pruned, dense", "pruned, sparse kernel", "pruned (2:4 kernels)"


@dataclass
class SpeedReport:
    device: str
    dtype: str
    prefill: list[dict[str, Any]] = field(default_factory=list)  # {"model", "batch", "length", "tokens_per_s"}
    decode: list[dict[str, Any]] = field(default_factory=list)  # {"model", "batch", "steps", "tokens_per_s"}
    layers: list[dict[str, Any]] = field(default_factory=list)  # per shape and row count, see layer_times
    sizes: dict[str, int] = field(default_factory=dict)  # see sizes()
    bandwidth_gb_s: float | None = None  # streaming read of memory, every thread
    kernel_isa: str = "none"
    notes: list[str] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs, after one warm-up run."""
    return in_turns({"": fn}, device, repeat)[""]


def in_turns(fns: dict[str, Callable[[], Any]], device: torch.device, repeat: int) -> dict[str, float]:
    """Median seconds of each function, timed in turns: a warm-up of each, then ``repeat`` rounds
    of one run of each."""
    for fn in fns.values():
        fn()
        _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def semi_structured(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why 2:4 sparse kernels cannot run here, or None when they can."""
    if device.type != "cuda":
        return f"{device.type}: no 2:4 sparse matmul kernel on this device"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"compute capability {major}.{minor}: 2:4 kernels need 8.0 or newer"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{dtype}: 2:4 kernels need float16 or bfloat16 (pass --dtype float16)"
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    return None


def is_2_4(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.shape[1] % 4 == 0 and bool(((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2).all())


def to_semi_structured(model: nn.Module) -> tuple[int, int]:
    """Every linear layer whose weight is 2:4 sparse, converted in place to the semi-structured
    sparse format; returns ``(converted, refused by the kernel's shape rules)``."""
    from torch.sparse import to_sparse_semi_structured

    done = refused = 0
    for _, _, module in BlockSource(model).all_linears():
        w = weight_matrix(module)
        if isinstance(module, nn.Linear) and is_2_4(w):
            try:
                module.weight = nn.Parameter(to_sparse_semi_structured(w.detach()), requires_grad=False)
                done += 1
            except (RuntimeError, ValueError):
                refused += 1
    return done, refused


def _ids(model: nn.Module, batch: int, length: int, device: torch.device) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)


@torch.no_grad()
def prefill(
    models: dict[str, nn.Module], shapes: list[tuple[int, int]], device: torch.device, repeat: int
) -> list[dict[str, Any]]:
    out = []
    for batch, length in shapes:
        ids = _ids(next(iter(models.values())), batch, length, device)
        fns = {label: (lambda m=m, ids=ids: m(input_ids=ids, use_cache=False)) for label, m in models.items()}
        for label, s in in_turns(fns, device, repeat).items():
            out.append({"model": label, "batch": batch, "length": length, "tokens_per_s": batch * length / s})
    return out


def _step(model: nn.Module, ids: torch.Tensor, past: Any) -> tuple[Any, torch.Tensor]:
    """One forward with the KV cache: ``(the cache, the greedy next tokens)``. transformers names
    the cache ``cache`` from 5.x on, ``past_key_values`` before."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True, **({name: past} if past is not None else {}))
    cache = out.get("cache")
    return (cache if cache is not None else out.get("past_key_values")), out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode(
    models: dict[str, nn.Module], batches: list[int], steps: int, prompt: int, device: torch.device, repeat: int
) -> list[dict[str, Any]]:
    """Greedy decode tokens/s: ``steps`` tokens after a ``prompt``-token prefill, whose time is
    measured apart and taken off."""
    out = []
    for batch in batches:
        ids = _ids(next(iter(models.values())), batch, prompt, device)

        def generate(model: nn.Module, ids: torch.Tensor = ids) -> None:
            past, nxt = _step(model, ids, None)
            for _ in range(steps):
                past, nxt = _step(model, nxt, past)

        fns = {}
        for label, m in models.items():
            fns[label] = lambda m=m: generate(m)
            fns[label, "prompt"] = lambda m=m, ids=ids: m(input_ids=ids, use_cache=True)
        s = in_turns(fns, device, repeat)
        for label in models:
            seconds = max(s[label] - s[label, "prompt"], 1e-9)
            out.append({"model": label, "batch": batch, "steps": steps, "tokens_per_s": batch * steps / seconds})
    return out


@torch.no_grad()
def layer_times(
    pruned: nn.Module,
    sparse: nn.Module | None,
    tokens: list[int],
    device: torch.device,
    repeat: int,
    semi: bool,
    bandwidth: float | None,
) -> list[dict[str, Any]]:
    """Per distinct (shape, 2:4 or not) linear layer of ``pruned`` and row count: one pass of
    ``x W^T`` over every layer of that shape, per layer: dense (``dense_ms``), on the sparse
    kernel's layers of ``sparse`` (``kernel_ms``, ``kernel_bytes`` read per layer, ``kernel_gb_s``
    and ``of_bandwidth``), through 2:4 kernels where ``semi``. ``pruned`` may be the dense source
    (:func:`measure`): the sparsity is then the packed layers'."""
    groups: dict[tuple, list[str]] = {}
    for _, name, module in BlockSource(pruned).all_linears():
        w = weight_matrix(module)
        groups.setdefault((tuple(w.shape), is_2_4(w)), []).append(name)
    out = []
    for (shape, nm), names in groups.items():
        ws = [weight_matrix(pruned.get_submodule(n)).detach().to(device) for n in names]
        packed = (
            [m for m in (sparse.get_submodule(n) for n in names) if isinstance(m, kernel.SparseLinear)]
            if (sparse is not None)
            else []
        )
        semis, error = [], None
        if semi and nm:
            from torch.sparse import to_sparse_semi_structured

            try:
                semis = [to_sparse_semi_structured(w) for w in ws]
            except (RuntimeError, ValueError) as exc:
                error = str(exc).splitlines()[0][:120]
        numel = sum(w.numel() for w in ws)
        if len(packed) == len(ws):  # the pruned weights' zeros, whichever dense model times the matmuls
            sparsity = 1 - sum(m.values.numel() - kernel.PAD for m in packed) / numel
        else:
            sparsity = sum(count_true(w == 0) for w in ws) / numel
        for n in tokens:
            x = torch.randn(n, shape[1], generator=torch.Generator().manual_seed(0)).to(device, ws[0].dtype)
            fns = {"dense": lambda x=x, ws=ws: [F.linear(x, w) for w in ws]}
            if len(packed) == len(ws):
                fns["kernel"] = lambda x=x, packed=packed: [m(x) for m in packed]
            if semis:
                fns["semi"] = lambda x=x, semis=semis: [F.linear(x, s) for s in semis]
            s = {k: 1e3 * v / len(ws) for k, v in in_turns(fns, device, repeat).items()}
            row = {
                "shape": list(shape),
                "count": len(ws),
                "sparsity": sparsity,
                "nm": nm,
                "tokens": n,
                "dense_ms": s["dense"],
                "kernel_ms": s.get("kernel"),
                "sparse_ms": s.get("semi"),
            }
            if "kernel" in s:
                nbytes = sum(m.nbytes for m in packed) / len(packed)
                row.update(
                    kernel_bytes=int(nbytes),
                    kernel_gb_s=nbytes / s["kernel"] / 1e6,
                    on_kernel=n <= kernel.KERNEL_TOKENS.get(packed[0].dtype, 0),
                )
                if bandwidth:
                    row["of_bandwidth"] = row["kernel_gb_s"] / bandwidth
            if error:
                row["error"] = error
            out.append(row)
    return out


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.device.type != "meta" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def sizes(pruned: nn.Module, sparse: nn.Module | None) -> dict[str, int]:
    """Bytes: every tensor dense (``dense``) and as the sparse model holds them (``sparse``), the
    packed layers' weights dense and packed (``packed_layers_dense``, ``packed_layers``), and what
    one decode step reads (every linear weight, the embedding row aside) dense and sparse."""
    linear = [m for m in pruned.modules() if isinstance(m, nn.Linear)]
    out = {
        "dense": _bytes(list(pruned.parameters()) + list(pruned.buffers())),
        "decode_read_dense": _bytes(m.weight for m in linear),
    }
    if sparse is not None:
        layers = [m for m in sparse.modules() if isinstance(m, kernel.SparseLinear)]
        packed = sum(m.nbytes for m in layers)
        dense_of_packed = sum(m.out_features * m.in_features * m.values.element_size() for m in layers)
        others = [m.weight for m in sparse.modules() if isinstance(m, nn.Linear)]
        out.update(
            sparse=out["dense"] - dense_of_packed + packed,
            packed_layers_dense=dense_of_packed,
            packed_layers=packed,
            decode_read_sparse=packed + _bytes(others),
        )
    return out


def measure(
    pruned: nn.Module | None,
    dense: nn.Module | None,
    *,
    sparse: nn.Module | None = None,
    device: str = "cpu",
    shapes: list[tuple[int, int]] = ((1, 128), (1, 512), (4, 512)),
    decode_batches: list[int] = (1, 16),
    steps: int = 32,
    prompt: int = 32,
    tokens: list[int] = (1, 8, 2048),
    repeat: int = 3,
) -> SpeedReport:
    """Time ``dense``, ``pruned`` and ``sparse`` (each when given; ``sparse``: the pruned model with
    its packed layers on the kernel, e.g. :func:`prunewise.sparse.kernel.with_kernel`) on ``device``;
    models are moved there and back, and timed in turns. Sizes and the per-layer dense matmuls use
    ``pruned``, or without it ``dense`` (the same shapes: a dense matmul's time does not depend on the
    values), so one of the two is needed."""
    reference = pruned if pruned is not None else dense
    if reference is None:
        raise ValueError("measure needs a dense model: the pruned one or its source")
    dev = torch.device(device)
    dtype = next(reference.parameters()).dtype
    report = SpeedReport(str(dev), str(dtype).replace("torch.", ""))
    why_not = semi_structured(dev, dtype)
    if sparse is not None and dev.type != "cpu":
        report.notes.append(f"{dev.type}: the sparse kernel is a CPU kernel; {SPARSE} not measured")
        sparse = None
    if sparse is not None:
        report.kernel_isa = kernel.isa()
        report.bandwidth_gb_s = kernel.read_bandwidth()
    models = {k: m for k, m in ((SOURCE, dense), (PRUNED, pruned), (SPARSE, sparse)) if m is not None}
    report.sizes = sizes(reference, sparse)
    for m in models.values():
        m.to(dev)
    try:
        report.prefill += prefill(models, list(shapes), dev, repeat)
        report.decode += decode(models, list(decode_batches), steps, prompt, dev, repeat)
        report.layers = layer_times(
            reference, sparse, list(tokens), dev, repeat, why_not is None, report.bandwidth_gb_s
        )
    finally:
        for m in models.values():
            m.to("cpu")
    if pruned is not None and why_not is None and any(row["nm"] for row in report.layers):
        pruned.to(dev)
        try:
            done, refused = to_semi_structured(pruned)
            report.notes.append(
                f"{SEMI}: {done} layers in the semi-structured sparse format"
                + (f", {refused} refused by the kernel's shape rules" if refused else "")
            )
            report.prefill += prefill({SEMI: pruned}, list(shapes), dev, repeat)
            report.decode += decode({SEMI: pruned}, list(decode_batches), steps, prompt, dev, repeat)
        finally:
            pruned.to("cpu")
    elif sparse is None:
        report.notes.append(
            f"{why_not or 'no 2:4 layers'}, and no sparse kernel measured: the pruned model runs the same dense "
            "matmuls as the dense one, so its zeros buy no speed here; any difference is noise"
        )
    return report


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def tables(report: SpeedReport) -> str:
    """The report as text: sizes, prefill and decode tokens/s per model, then the per-layer matmuls."""
    head = f"device {report.device}, {report.dtype}"
    if report.kernel_isa != "none":
        head += f"; sparse kernel: {report.kernel_isa}"
    if report.bandwidth_gb_s:
        head += f"; streaming memory read {report.bandwidth_gb_s:.1f} GB/s"
    lines = [head]
    z = report.sizes
    if "sparse" in z:
        lines.append(
            f"weights: dense {_mb(z['dense'])}, sparse {_mb(z['sparse'])} ({z['sparse'] / z['dense']:.3f}x); "
            f"packed layers {_mb(z['packed_layers_dense'])} -> {_mb(z['packed_layers'])} "
            f"({z['packed_layers'] / z['packed_layers_dense']:.3f}x)"
        )
        lines.append(
            f"read per decode step: dense {_mb(z['decode_read_dense'])}, sparse {_mb(z['decode_read_sparse'])}: "
            f"decode can be at most {z['decode_read_dense'] / z['decode_read_sparse']:.2f}x faster where it is "
            "bound by memory"
        )
    for kind, rows, key in (("prefill", report.prefill, "length"), ("decode", report.decode, "steps")):
        models = list(dict.fromkeys(r["model"] for r in rows))
        shapes = list(dict.fromkeys((r["batch"], r[key]) for r in rows))
        cell = {(r["model"], r["batch"], r[key]): r["tokens_per_s"] for r in rows}
        ratio = SOURCE in models and len(models) > 1
        what = "batch x length" if kind == "prefill" else "batch x steps"
        lines.append(
            f"{kind + ' tokens/s':<16}{what:<16}"
            + "".join(f"{m:>23}" for m in models)
            + (f"{'vs source':>11}" if ratio else "")
        )
        for b, n in shapes:
            vals = "".join(f"{cell.get((m, b, n), float('nan')):>23.1f}" for m in models)
            if ratio:
                vals += f"{cell.get((models[-1], b, n), float('nan')) / cell[(SOURCE, b, n)]:>10.2f}x"
            lines.append(f"{'':<16}{f'{b} x {n}':<16}{vals}")
    lines.append(
        f"{'layer shape':<14}{'layers':>7}{'sparsity':>9}{'2:4':>5}{'rows':>6}{'dense ms':>10}{'kernel ms':>10}"
        f"{'speed-up':>9}{'KB read':>9}{'GB/s':>7}{'of bw':>7}{'2:4 ms':>8}"
    )
    for r in report.layers:
        k = r["kernel_ms"]
        if not k:
            cells = [f"{'-':>10}", f"{'-':>9}", f"{'-':>9}", f"{'-':>7}", f"{'-':>7}"]
        elif r.get("on_kernel"):
            bw = f"{r['of_bandwidth']:>7.0%}" if "of_bandwidth" in r else f"{'-':>7}"
            cells = [
                f"{k:>10.3f}",
                f"{r['dense_ms'] / k:>8.2f}x",
                f"{r['kernel_bytes'] / 1e3:>9.0f}",
                f"{r['kernel_gb_s']:>7.1f}",
                bw,
            ]
        else:  # more rows than the kernel takes: the layer unpacks its weight and runs the dense matmul
            cells = [f"{k:>10.3f}", f"{r['dense_ms'] / k:>8.2f}x", f"{'unpacks':>9}", f"{'-':>7}", f"{'-':>7}"]
        cells.append(f"{r['sparse_ms']:>8.3f}" if r["sparse_ms"] is not None else f"{'-':>8}")
        lines.append(
            f"{'x'.join(map(str, r['shape'])):<14}{r['count']:>7}{r['sparsity']:>9.3f}{'yes' if r['nm'] else 'no':>5}"
            f"{r['tokens']:>6}{r['dense_ms']:>10.3f}" + "".join(cells)
        )
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)
