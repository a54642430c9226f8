"""Memory: what a run needs, what the process may use, and whether the model is streamed.

What the process may use (:func:`host_available`) is the smallest of the kernel's ``MemAvailable``
and the room left under the memory limit of the process's cgroup (v2 ``memory.max``, v1
``memory.limit_in_bytes``; page cache, which the kernel reclaims, is not counted as used) — the
limit a container, a Slurm job or a Kubernetes pod runs under.

What a run needs (:func:`estimate`, bytes; ``docs/large-models.md`` gives the formula and checks it
against measured peaks):

- ``W`` the weights in the model's dtype, ``O`` those outside the decoder blocks (embeddings,
  final norm, ``lm_head``), ``B`` the largest block;
- ``A`` the activations the walk keeps: block inputs and outputs of every calibration window
  (``2 * n * seqlen * hidden * elt``), or of every evaluation window when that is larger;
- ``S`` one block's statistics: SparseGPT's Hessians (``4 * C_in^2`` per layer), Wanda's norms;
- ``T`` one batch's temporaries inside a block (attention, the MLP's intermediate), three chunks
  of logits, and 48 bytes per weight of the largest layer while its mask is chosen (measured) or,
  when Hessians are collected and it is larger, SparseGPT's factor of the widest one
  (:data:`FACTOR_MATRICES` ``x 4 C_in^2``);
- ``R`` the process itself (Python, torch, transformers' model code, a tokenizer: about 0.5 GB).

In memory the host holds ``R + W + A + S + T``; streamed, ``R + O + 3B + A + S + T`` (the block
that runs, the next one being read, and the one being written). With ``--device cuda`` the
activations, statistics and temporaries are on the device with the block (and ``O`` while the
head runs): the device holds ``O + B + A + S + T`` in both modes, the host ``R + W`` or ``R + O + 3B``.

GBLM's gradient pass (:func:`gradient_pass`, ``G``) runs before the walk: the host peak is then
``max(walk + 4P, R + W + G)`` in memory (``P`` prunable weights, their float32 statistics held for
the walk) and ``max(walk, R + O + 3B + G)`` streamed.

``--stream auto`` (the default) streams when the in-memory estimate does not fit in 90% of what
the process may use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .layers import weight_matrix
from .sources import make_source

STREAM_CHOICES = ("auto", "on", "off")
PROCESS = int(0.5e9)  # R: the interpreter with torch, transformers' model code and a tokenizer loaded
# per weight of the largest layer while its mask is chosen: float32 scores and their copies, the
# k-th value search, int64 tie counts (48: measured, benchmarks/RESULTS.md "Streaming")
MASK_BYTES = 48
# float32 C_in x C_in matrices alive while SparseGPT factors a layer's Hessian, beyond the Gram matrix
# the statistics hold: the reversed Hessian and its Cholesky factor, then the factor's reversed copy,
# the inverse and the halves' products (2.5 by count; 3.27 measured in `solve`, mmap-ed pages included:
# benchmarks/bench_factor.py, benchmarks/RESULTS.md "SparseGPT's factor in less memory")
FACTOR_MATRICES = 3.25
HEADROOM = 0.9  # stream when the in-memory estimate exceeds this share of what the process may use
LOGIT_BYTES = 1 << 25  # float32 logits alive at once (32 MB): never a whole window of a large vocabulary


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path, *names: str) -> int:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in names:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (cache not counted), or None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if controllers == "":  # cgroup v2
            base = Path("/sys/fs/cgroup") / rel
            limit = _read_int(base / "memory.max")
            used = _read_int(base / "memory.current")
            cache = _stat(base / "memory.stat", "file")
        elif "memory" in controllers.split(","):  # cgroup v1
            base = Path("/sys/fs/cgroup/memory") / rel
            limit = _read_int(base / "memory.limit_in_bytes")
            used = _read_int(base / "memory.usage_in_bytes")
            cache = _stat(base / "memory.stat", "total_cache", "cache")
        else:
            continue
        if limit is not None and used is not None and limit < 1 << 60:
            rooms.append(limit - max(used - cache, 0))
    return min(rooms) if rooms else None


def host_available() -> int | None:
    """Bytes this process may still use: ``MemAvailable`` or the room under its cgroup limit, the smaller."""
    out = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                out.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    room = cgroup_room()
    if room is not None:
        out.append(room)
    return min(out) if out else None


def device_available(device: torch.device) -> int | None:
    """Free bytes on a CUDA device; None for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return None


@dataclass
class Estimate:
    """Estimated peak bytes of a run, in memory and streamed, and the mode it will use."""

    mode: str  # "memory" | "stream"
    host_memory: int  # host peak if the model is held in memory
    host_stream: int  # host peak if it is streamed
    device: int | None  # device peak (CUDA) in the chosen mode
    available: int | None  # what the process may use on the host
    parts: dict[str, int]

    @property
    def host(self) -> int:
        return self.host_stream if self.mode == "stream" else self.host_memory

    def to_dict(self) -> dict:
        gb = lambda v: None if v is None else round(v / 1e9, 3)  # noqa: E731
        return {
            "mode": self.mode,
            "estimated_host_gb": gb(self.host),
            "estimated_device_gb": gb(self.device),
            "available_host_gb": gb(self.available),
            **{f"{k}_gb": gb(v) for k, v in self.parts.items()},
        }


def _config_int(cfg, *names: str) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


@dataclass(frozen=True)
class ModelShape:
    """What memory estimates read of a model's config (the one reader of it, for every estimate):
    hidden width, MLP width, attention heads, vocabulary."""

    hidden: int
    intermediate: int
    heads: int
    vocab: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        cfg = model.config
        hidden = _config_int(cfg, "hidden_size", "n_embd", "d_model")
        return cls(
            hidden=hidden,
            intermediate=_config_int(cfg, "intermediate_size", "ffn_dim", "n_inner") or 4 * hidden,
            heads=_config_int(cfg, "num_attention_heads", "n_head") or 1,
            vocab=_config_int(cfg, "vocab_size"),
        )


@dataclass(frozen=True)
class Workload:
    """What a run walks through the blocks: ``windows`` calibration windows of ``seqlen`` tokens
    in batches of ``batch_size`` (with SparseGPT's ``hessians``), and ``eval_windows`` of
    ``eval_seqlen`` tokens for perplexity."""

    windows: int = 0
    seqlen: int = 0
    batch_size: int = 1
    hessians: bool = False
    eval_windows: int = 0
    eval_seqlen: int = 0
    gradients: str | None = None  # GBLM's gradient pass first: "whole" or "blocks" (checkpointing) backward


def gradient_pass(source, seqlen: int, how: str, windows: int = 1, available: int | None = None) -> dict[str, int]:
    """Bytes GBLM's gradient pass needs beyond the weights its mode holds, per term: the float32
    accumulators, the largest gradient alive at once, the activations kept for the backward and
    the head's logits. ``how``: ``whole`` (one autograd graph through the model per window: every
    block's activations), ``blocks`` (checkpointing: one window's block inputs, one block's
    activations), ``stream`` (a streamed model: the inputs of every block for every window are
    kept, in files when more than a quarter of ``available``; one block's accumulators)."""
    model = source.model
    prunable = [weight_matrix(m).numel() for _, _, m in source.all_linears()]
    elt = next(model.parameters()).element_size()
    shape = ModelShape.of(model)
    layers = len(source)
    # one window through one block: its output, the attention scores, the MLP's intermediate
    per_block = seqlen * (10 * shape.hidden + 3 * shape.intermediate + shape.heads * seqlen) * elt
    logits = 4 * seqlen * shape.vocab * 4  # float32 logits, their log-softmax and both gradients (measured)
    if how == "stream":
        kept = layers * windows * seqlen * shape.hidden * elt
        if available is not None and kept > available / 4:  # spilled: one block's at a time
            kept = windows * seqlen * shape.hidden * elt
        per_grad = windows * seqlen * shape.hidden * 4  # each window's gradient at the last block
        acc, acts = 4 * sum(prunable) // layers, kept + per_block + per_grad
    else:
        acc = 4 * sum(prunable)
        acts = layers * seqlen * shape.hidden * elt + per_block if how == "blocks" else layers * per_block
    return {"accumulators": acc, "gradient": max(prunable) * elt, "activations": acts + logits}


def estimate(
    model: nn.Module,
    work: Workload,
    *,
    device: str = "cpu",
    blocks_path: str | None = None,
    stream: str = "auto",
    available: int | None = None,
) -> Estimate:
    """The peak memory of ``work`` over ``model`` (held in memory or a streamed skeleton: only shapes
    are read), and the mode ``stream`` resolves to (``available``: what the process may use, bytes;
    default :func:`host_available`)."""
    source = make_source(model, blocks_path)
    inside = {id(p) for p in source.blocks.parameters()}
    params = list({id(p): p for p in model.parameters()}.values())
    elt = max(p.element_size() for p in params)
    total = sum(p.numel() * p.element_size() for p in params)
    outside = sum(p.numel() * p.element_size() for p in params if id(p) not in inside)
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in source.blocks)
    shape = ModelShape.of(model)
    acts = 2 * elt * shape.hidden * max(work.windows * work.seqlen, work.eval_windows * work.eval_seqlen)
    shapes = [tuple(weight_matrix(m).shape) for _, m in source.linears(0)]  # every block alike: the first one's
    # every linear layer of a block holds its statistics until the block is done: SparseGPT's (and
    # LSA's) input Gram matrix is C_in x C_in float32 per layer, Wanda's a C_in vector
    stats = sum(4 * s[1] ** 2 if work.hessians else 8 * s[1] for s in shapes)
    longest = max(work.seqlen, work.eval_seqlen)
    largest = max(s[0] * s[1] for s in shapes)
    choose = MASK_BYTES * largest
    if work.hessians:  # SparseGPT's factor of the widest input's Hessian, at another moment than a mask
        choose = max(choose, FACTOR_MATRICES * 4 * max(s[1] for s in shapes) ** 2)
    temps = (
        work.batch_size * longest * (4 * shape.heads * longest + 3 * shape.intermediate * elt + 4 * shape.hidden * elt)
        + 3 * LOGIT_BYTES
        + choose
    )
    working = acts + stats + temps
    dev = torch.device(device)
    parts = {
        "weights": total,
        "outside": outside,
        "block": block,
        "activations": acts,
        "statistics": stats,
        "temporaries": temps,
    }
    if dev.type == "cuda":
        host_memory, host_stream, on_device = PROCESS + total, PROCESS + outside + 3 * block, outside + block + working
    else:
        host_memory, host_stream, on_device = PROCESS + total + working, PROCESS + outside + 3 * block + working, None
    if available is None:
        available = host_available()
    held = streamed = 0
    if work.gradients:  # the gradient pass runs first; its statistics stay for the walk
        terms = gradient_pass(source, work.seqlen, work.gradients)
        held, acc = sum(terms.values()), terms["accumulators"]  # every prunable weight's float32 statistic
        streamed = sum(gradient_pass(source, work.seqlen, "stream", work.windows, available).values())
        parts["gradient_pass"], parts["gradient_pass_streamed"] = held, streamed
        if dev.type == "cpu":
            host_memory = max(host_memory + acc, PROCESS + total + held)
            host_stream = max(host_stream, PROCESS + outside + 3 * block + streamed)
        else:  # on the device; the accumulators come back to the host, where the model is held
            host_memory += acc
    if stream == "on":
        mode = "stream"
    elif stream == "off":
        mode = "memory"
    else:
        mode = "stream" if available is not None and host_memory > HEADROOM * available else "memory"
    if on_device is not None and work.gradients:
        # in memory a whole backward moves the whole model there, a block-wise one a block at a
        # time; a streamed pass holds one block's accumulators and the kept inputs there
        resident = total if work.gradients == "whole" else outside + block
        pass_peak = resident + held if mode == "memory" else outside + block + streamed
        on_device = max(on_device, pass_peak)
    return Estimate(mode, host_memory, host_stream, on_device, available, parts)
