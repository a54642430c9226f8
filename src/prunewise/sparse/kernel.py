"""The CPU kernel for bitmask-compressed weights, and the linear layer that runs on it.

The kernel (``csrc/bitmask.cpp``) is a C++ extension compiled on first use with
``torch.utils.cpp_extension`` (g++ and the ``ninja`` package; about a minute, once per machine and
source version: the build lives in the prunewise cache under ``kernels/``). It is compiled for the
machine it runs on (``-march=native``): with AVX-512F each 16 columns cost one expand and one fused
multiply-add per token; with AVX2, FMA and F16C (no AVX-512: AMD Zen 1-3, most desktop CPUs) each 8
columns cost a table-driven permute and one FMA per token; elsewhere (ARM, x86 without AVX2) only a
scalar loop over the set bits runs, correct but about 5x slower than a dense matmul (measured:
0.18-0.25x), which :func:`ext` says once and :func:`fast` reports, so that ``prunewise.load``
unpacks such a checkpoint to dense. Where it cannot be built or loaded (no compiler, no ninja, an
unsupported platform) :func:`ext` says why once in the log and returns None, and
:class:`SparseLinear` runs dense matmuls on the unpacked weight instead: results are the same,
only slower.

:class:`SparseLinear` replaces an ``nn.Linear`` whose weight is stored compressed: up to
:data:`KERNEL_TOKENS` token rows per call (decode, small batches) go through the kernel, which
reads only the compressed bytes; more rows (prefill) unpack the weight into a scratch matrix (one
per thread and dtype, reused by every layer, as large as the largest weight) and run the dense
matmul, where the compute, not the bytes read, is the cost (``benchmarks/RESULTS.md``, "Sparse
checkpoints", gives the measured crossover). The kernel's arithmetic is float32 whatever the
weight's dtype (bf16 and fp16 values are widened exactly), so results equal ``x @ W.T`` within
float32 rounding of a different summation order. Where the CPU has AVX512-BF16, bf16 weights
against bf16 activations multiply as bf16 pairs (exact products) summed in float32, as the dense
bf16 matmul does; other activations are widened to float32 first.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import platform
import threading
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..storage.cache import default_cache_dir
from . import bitmask

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "bitmask.cpp"

# At most this many token rows per call run on the kernel; more unpack the weight and matmul densely.
# Measured crossovers (benchmarks/RESULTS.md, "Sparse checkpoints"): in float32 the kernel beats the
# dense matmul up to 12 rows; with bf16 weights and activations (the dot-product path) at 8 rows it
# is 1.16x the dense matmul over a Qwen2.5-Coder 1.5B block's layers on cold matrices and even with
# it in the model (batch-8 decode 1.01x), where unpacking for the dense matmul gave 0.54x. fp16 has
# no such path: 2, as measured before.
KERNEL_TOKENS = {torch.float32: 12, torch.bfloat16: 8, torch.float16: 2}

PAD = 16  # elements of padding after the values: the kernel reads 16 at a time

_EXT: list = []  # [module or None], once per process

_SCRATCH = threading.local()  # per thread and dtype: the matrix prefill unpacks weights into, grown as needed


def cpu_flags() -> list[str]:
    """The CPU's instruction-set flags as ``/proc/cpuinfo`` lists them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return []


def _cpu_tag() -> str:
    """What the build depends on besides its source: the CPU's instruction sets and torch."""
    flags = " ".join(cpu_flags())
    return hashlib.sha256(f"{platform.machine()} {flags} {torch.__version__}".encode()).hexdigest()[:10]


def compile_source(source: Path, name: str, narrow: tuple[str, ...] | list[str] = ()):
    """``source`` compiled for this CPU (``-march=native``, less ``narrow``: :data:`ISA_FLAGS`) as the
    extension ``name``, built once under the cache's ``kernels/``."""
    from torch.utils import cpp_extension

    build = default_cache_dir() / "kernels" / name
    build.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(source)],
        extra_cflags=["-O3", "-march=native", *narrow, "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        verbose=False,
    )


# PRUNEWISE_SPARSE_ISA: which of this CPU's code paths to compile. "native" (the default) takes the
# widest; "avx2" and "scalar" compile the narrower ones on a wider x86 CPU, so that they can be tested
# and measured on one machine (tests/sparse, benchmarks/bench_kernel.py).
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"], "scalar": ["-mno-avx2"]}


def _isa_flags() -> tuple[str, list[str]]:
    choice = os.environ.get("PRUNEWISE_SPARSE_ISA", "native").strip().lower() or "native"
    if choice not in ISA_FLAGS:
        raise ValueError(f"PRUNEWISE_SPARSE_ISA={choice!r}: expected one of {', '.join(ISA_FLAGS)}")
    if choice != "native" and platform.machine().lower() not in ("x86_64", "amd64"):
        raise ValueError(f"PRUNEWISE_SPARSE_ISA={choice!r} only narrows x86-64 builds; this is {platform.machine()}")
    return choice, ISA_FLAGS[choice]


def ext():
    """The compiled kernel module, or None where it cannot be built here (said once, in the log)."""
    if _EXT:
        return _EXT[0]
    module, why, choice = None, None, "native"
    if os.environ.get("PRUNEWISE_SPARSE_KERNEL", "1") == "0":
        why = "PRUNEWISE_SPARSE_KERNEL=0"
    else:
        choice, narrow = _isa_flags()  # a bad value is the user's to fix, not a reason to run dense
        try:
            digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:10]
            name = f"prunewise_bitmask_{digest}_{_cpu_tag()}" + ("" if choice == "native" else f"_{choice}")
            module = compile_source(SOURCE, name, narrow)
        except Exception as exc:  # no compiler, no ninja, a failed build: dense matmuls instead
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
    if module is None:
        log.warning("sparse kernel unavailable (%s): compressed layers run dense matmuls on unpacked weights", why)
    elif module.isa() == "scalar":
        cause = (
            "PRUNEWISE_SPARSE_ISA=scalar"
            if choice == "scalar"
            else "this CPU has neither AVX-512F nor AVX2 with FMA and F16C"
        )
        log.warning(
            "sparse kernel: %s, so only its scalar loop runs, about 5x slower than a dense matmul; "
            "prunewise.load unpacks compressed checkpoints to dense here",
            cause,
        )
    _EXT.append(module)
    return module


def isa() -> str:
    """The kernel's code path here: ``avx512+bf16`` (AVX-512 with bf16 dot products), ``avx512``,
    ``avx2``, ``scalar``, or ``none`` (no kernel: dense matmuls)."""
    module = ext()
    return module.isa() if module is not None else "none"


def fast() -> bool:
    """Whether the kernel has a vector path here (AVX-512 or AVX2), the only ones faster than a dense
    matmul at decode; with the scalar loop or no kernel, packed layers are slower than unpacked ones."""
    return isa() not in ("scalar", "none")


def read_bandwidth(megabytes: int = 512, repeat: int = 5) -> float | None:
    """GB/s of the fastest of ``repeat`` streaming reads of ``megabytes`` of memory by every thread:
    the bound on a kernel that reads its weights once per call (the fastest, as other tenants of a
    shared machine only ever lower it); None without the kernel."""
    module = ext()
    if module is None:
        return None
    a = torch.ones(megabytes * 2**20 // 4)
    module.read_all(a)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        module.read_all(a)
        times.append(time.perf_counter() - t0)
    return a.numel() * 4 / min(times) / 1e9


def padded(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values.reshape(-1), values.new_zeros(PAD)])


def unpack(
    values: torch.Tensor,
    mask: torch.Tensor,
    offsets: torch.Tensor,
    shape: tuple[int, ...],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense tensor, bit for bit, from padded ``values`` (kernel when there is one), into ``out`` if given."""
    module = ext() if values.device.type == "cpu" else None
    if module is None:
        dense = bitmask.unpack(values, mask, shape)
        return dense if out is None else out.view(shape).copy_(dense)
    if out is None:
        out = torch.empty(shape, dtype=values.dtype)
    module.unpack(values, mask, offsets, shape[-1], out)
    return out.view(shape)


def scratch(dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    """This thread's reusable matrix of ``shape``: the memory of the largest weight unpacked so far."""
    numel = shape[0] * shape[1]
    held = getattr(_SCRATCH, "buffers", None)
    if held is None:
        held = _SCRATCH.buffers = {}
    buf = held.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = held[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


class SparseLinear(nn.Module):
    """``nn.Linear`` with its weight held as values + bitmask (:mod:`prunewise.sparse.bitmask`)."""

    def __init__(self, values: torch.Tensor, mask: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = shape
        self.register_buffer("values", padded(values))
        self.register_buffer("mask", mask.contiguous())
        self.register_buffer("offsets", bitmask.row_offsets(mask))
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        values, mask = bitmask.pack(linear.weight.detach())
        return cls(values, mask, tuple(linear.weight.shape), None if linear.bias is None else linear.bias.detach())

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def dense_weight(self) -> torch.Tensor:
        return unpack(self.values, self.mask, self.offsets, (self.out_features, self.in_features))

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed weight (values without padding, mask)."""
        return (self.values.numel() - PAD) * self.values.element_size() + self.mask.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode calls are short: each attribute of a module and each tensor op costs about a
        # microsecond, as much as a small layer's kernel, so nothing is looked up or converted twice.
        values, cols = self.values, self.in_features
        rows = x.numel() // cols
        module = (_EXT[0] if _EXT else ext()) if rows <= KERNEL_TOKENS.get(values.dtype, 0) else None
        if module is None or x.device.type != "cpu":  # prefill, or no kernel: unpack to a scratch matrix, matmul
            shape = (self.out_features, cols)
            weight = unpack(values, self.mask, self.offsets, shape, scratch(values.dtype, shape))
            return F.linear(x, weight.to(x.dtype), self.bias)
        y = module.linear(x.reshape(rows, cols), values, self.mask, self.offsets, cols)
        bias = self.bias
        if bias is not None:
            y += bias
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        density = (self.values.numel() - PAD) / max(self.out_features * self.in_features, 1)
        return f"in_features={self.in_features}, out_features={self.out_features}, density={density:.3f}"


def packable(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of ``model`` whose weight is smaller packed (:func:`bitmask.worth_packing`)."""
    return {
        name: m
        for name, m in model.named_modules()
        if type(m) is nn.Linear and bitmask.worth_packing(m.weight.detach())
    }


def with_kernel(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` whose packable ``nn.Linear`` layers are :class:`SparseLinear`, sharing
    every other tensor with ``model`` (so it costs only the packed weights); None when nothing is
    worth packing."""
    layers = packable(model)
    if not layers:
        return None
    memo: dict[int, object] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    memo.update({id(m): SparseLinear.from_linear(m) for m in layers.values()})
    return copy.deepcopy(model, memo)
