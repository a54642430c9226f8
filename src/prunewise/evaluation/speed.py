"""What the sparsity buys at inference: a pruned model against its dense source, on one device.

``prunewise speed --model RUN`` loads the run's pruned checkpoint and its dense source (checked
against the record's fingerprint) and measures, on ``--device``:

- **prefill**: tokens/s of one forward pass at each ``batch x length`` shape (random token ids;
  timing does not depend on them);
- **decode**: tokens/s of greedy generation with the KV cache at each batch size, after a short
  prompt;
- **layers**: the time of one matmul ``x W^T`` (``tokens`` rows) for every distinct linear shape,
  with the pruned weight as a dense tensor and, where this device has a kernel for it, as a sparse
  one.

Sparse kernels: 2:4 weights through :func:`torch.sparse.to_sparse_semi_structured` on CUDA GPUs of
compute capability 8.0 or newer in fp16/bf16 (the pruned model is measured a second time with
those layers converted). Nothing else skips zeros: unstructured sparsity, and any sparsity on a
CPU, runs the same dense matmuls as the dense model, and the report says so instead of showing
a difference as a speed-up (on the bundled model's CPU decode, the pruned model is measured
slower, partly from subnormal activations: ``benchmarks/RESULTS.md``). Each figure is the median
of ``repeat`` timed runs after one warm-up.
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


@dataclass
class SpeedReport:
    device: str
    dtype: str
    prefill: list[dict[str, Any]] = field(default_factory=list)  # {"model", "batch", "length", "tokens_per_s"}
    decode: list[dict[str, Any]] = field(default_factory=list)  # {"model", "batch", "steps", "tokens_per_s"}
    layers: list[dict[str, Any]] = field(
        default_factory=list
    )  # {"shape", "count", "sparsity", "nm", "dense_ms", "sparse_ms"}
    notes: list[str] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs, after one warm-up run."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def semi_structured(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why 2:4 sparse kernels cannot run here, or None when they can."""
    if device.type != "cuda":
        return f"{device.type}: no sparse matmul kernel on this device"
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


@torch.no_grad()
def prefill(
    model: nn.Module, shapes: list[tuple[int, int]], device: torch.device, repeat: int, label: str
) -> list[dict[str, Any]]:
    vocab = model.get_input_embeddings().weight.shape[0]
    out = []
    for batch, length in shapes:
        ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
        s = timed(lambda ids=ids: model(input_ids=ids, use_cache=False), device, repeat)
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
    model: nn.Module, batches: list[int], steps: int, prompt: int, device: torch.device, repeat: int, label: str
) -> list[dict[str, Any]]:
    vocab = model.get_input_embeddings().weight.shape[0]
    out = []
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)

        def generate(ids=ids) -> None:
            past, nxt = _step(model, ids, None)
            for _ in range(steps):
                past, nxt = _step(model, nxt, past)

        first = timed(lambda ids=ids: model(input_ids=ids, use_cache=True), device, repeat)
        s = timed(generate, device, repeat) - first  # the prompt's prefill is not decoding
        out.append({"model": label, "batch": batch, "steps": steps, "tokens_per_s": batch * steps / max(s, 1e-9)})
    return out


@torch.no_grad()
def layer_times(
    model: nn.Module, tokens: int, device: torch.device, repeat: int, kernels: bool
) -> list[dict[str, Any]]:
    """One matmul per distinct (shape, 2:4 or not) linear layer: dense, and sparse where a kernel exists."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for _, _, module in BlockSource(model).all_linears():
        w = weight_matrix(module).detach()
        groups.setdefault((tuple(w.shape), is_2_4(w)), []).append(w)
    out = []
    for (shape, nm), ws in groups.items():
        w = ws[0].to(device)
        x = torch.randn(tokens, shape[1], dtype=w.dtype, generator=torch.Generator().manual_seed(0)).to(device)
        row = {
            "shape": list(shape),
            "count": len(ws),
            "nm": nm,
            "sparsity": sum(int((v == 0).sum()) for v in ws) / sum(v.numel() for v in ws),
            "dense_ms": 1e3 * timed(lambda x=x, w=w: F.linear(x, w), device, repeat),
            "sparse_ms": None,
        }
        if kernels and nm:
            from torch.sparse import to_sparse_semi_structured

            try:
                sparse = to_sparse_semi_structured(w)
                row["sparse_ms"] = 1e3 * timed(lambda x=x, s=sparse: F.linear(x, s), device, repeat)
            except (RuntimeError, ValueError) as exc:
                row["error"] = str(exc).splitlines()[0][:120]
        out.append(row)
    return out


def measure(
    pruned: nn.Module,
    dense: nn.Module | None,
    *,
    device: str = "cpu",
    shapes: list[tuple[int, int]] = ((1, 128), (1, 512), (4, 512)),
    decode_batches: list[int] = (1, 16),
    steps: int = 32,
    prompt: int = 32,
    tokens: int = 2048,
    repeat: int = 3,
) -> SpeedReport:
    """Time ``dense`` (when given) and ``pruned`` on ``device``; models are moved there and back."""
    dev = torch.device(device)
    dtype = next(pruned.parameters()).dtype
    report = SpeedReport(str(dev), str(dtype).replace("torch.", ""))
    why_not = semi_structured(dev, dtype)
    models = ([("dense", dense)] if dense is not None else []) + [("pruned", pruned)]
    for label, model in models:
        model.to(dev)
        try:
            report.prefill += prefill(model, list(shapes), dev, repeat, label)
            report.decode += decode(model, list(decode_batches), steps, prompt, dev, repeat, label)
            if label == "pruned":
                report.layers = layer_times(model, tokens, dev, repeat, why_not is None)
        finally:
            model.to("cpu")
    if why_not is None and any(row["nm"] for row in report.layers):
        pruned.to(dev)
        try:
            done, refused = to_semi_structured(pruned)
            report.notes.append(
                f"pruned (2:4 kernels): {done} layers in the semi-structured sparse format"
                + (f", {refused} refused by the kernel's shape rules" if refused else "")
            )
            report.prefill += prefill(pruned, list(shapes), dev, repeat, "pruned (2:4 kernels)")
            report.decode += decode(pruned, list(decode_batches), steps, prompt, dev, repeat, "pruned (2:4 kernels)")
        finally:
            pruned.to("cpu")
    else:
        report.notes.append(
            f"{why_not or 'no 2:4 layers'}: the pruned model runs the same dense matmuls as the "
            "dense one, so its zeros buy no speed here; any difference comes from elsewhere "
            "(noise, or slower arithmetic on the values zeros leave, e.g. subnormal floats)"
        )
    return report


def tables(report: SpeedReport) -> str:
    """The report as text: prefill and decode tokens/s per model, then the per-layer matmuls."""
    lines = [f"device {report.device}, {report.dtype}"]
    for kind, rows, key in (("prefill", report.prefill, "length"), ("decode", report.decode, "steps")):
        models = list(dict.fromkeys(r["model"] for r in rows))
        shapes = list(dict.fromkeys((r["batch"], r[key]) for r in rows))
        cell = {(r["model"], r["batch"], r[key]): r["tokens_per_s"] for r in rows}
        what = "batch x length" if kind == "prefill" else "batch x steps"
        lines.append(f"{kind} tokens/s   {what:<16}" + "".join(f"{m:>22}" for m in models))
        for b, n in shapes:
            vals = "".join(f"{cell.get((m, b, n), float('nan')):>22.1f}" for m in models)
            lines.append(f"{'':<15}{f'{b} x {n}':<16}{vals}")
    lines.append(
        f"{'layer shape':<16}{'layers':>7}{'sparsity':>10}{'2:4':>5}{'dense ms':>10}{'sparse ms':>11}{'speed-up':>10}"
    )
    for r in report.layers:
        sparse = f"{r['sparse_ms']:>11.3f}" if r["sparse_ms"] is not None else f"{'-':>11}"
        gain = f"{r['dense_ms'] / r['sparse_ms']:>9.2f}x" if r["sparse_ms"] else f"{'-':>10}"
        lines.append(
            f"{'x'.join(map(str, r['shape'])):<16}{r['count']:>7}{r['sparsity']:>10.3f}"
            f"{'yes' if r['nm'] else 'no':>5}{r['dense_ms']:>10.3f}{sparse}{gain}"
        )
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)
