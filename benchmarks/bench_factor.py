"""Memory and time of SparseGPT on one layer of Qwen2.5-Coder 1.5B's widest shape (issue #23).

A ``down_proj``-sized layer (1536 x 8960) with a 8,960-wide Gram matrix (321 MB in float32), built
without temporaries, so that the process's high-water mark before the call is the Gram and the
weight; then :func:`prunewise.metrics.sparsegpt.solve` at 70%. Prints the peak resident size
above that mark in Gram-sized matrices, the wall time and a checksum of the result. Run with
``keep_freed_memory`` as the CLI does; to measure an older tree, ``PYTHONPATH=<tree>/src``.

    python benchmarks/bench_factor.py
"""

from __future__ import annotations

import time

import torch

from prunewise.metrics import sparsegpt
from prunewise.model.malloc import keep_freed_memory
from prunewise.prune.masks import Pattern
from prunewise.prune.stats import make_stats

ROWS, COLS, TOKENS = 1536, 8960, 1024


def high_water() -> int:
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmHWM:")[1].split()[0]) * 1024


def main() -> int:
    keep_freed_memory()
    torch.manual_seed(0)
    stats = make_stats(("hessian",), COLS)
    x = torch.randn(TOKENS, COLS)
    gram = torch.empty(COLS, COLS)
    torch.mm(x.t(), x, out=gram)
    stats.gram, stats.nsamples, stats.ntokens = gram, 2, TOKENS
    del x
    w = torch.randn(ROWS, COLS)
    base = high_water()
    t0 = time.perf_counter()
    out = sparsegpt.solve(w, stats, 0.7, Pattern())
    wall = time.perf_counter() - t0
    extra = high_water() - base
    print(
        f"peak above the Gram and weight: {extra / 1e9:.3f} GB = {extra / (4 * COLS**2):.2f} Gram-sized matrices; "
        f"{wall:.1f} s; checksum {out.abs().sum().item():.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
