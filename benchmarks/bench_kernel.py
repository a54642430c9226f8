"""The bitmask kernel alone, on cold matrices: time per call and GB/s of the packed bytes (issue 25).

    python benchmarks/bench_kernel.py [--sparsity 0.7] [--rows 1 8] [--source other.cpp] [--isa native avx2] [--json F]

For each weight shape of Qwen2.5-Coder 1.5B (by default), random weights pruned by magnitude to
``--sparsity`` are packed, and enough copies made to cycle through ``--pool`` MB, so that every
call reads its matrix from memory as a decode step does (a matrix that stayed in the 105 MiB L3
would measure the cache). One call per matrix, ``--calls`` calls, medians; the kernels and the
dense ``F.linear`` on the same cycled weights are called in turns; the machine's streaming read
(``read_all``) for scale. ``--source`` builds another version of ``csrc/bitmask.cpp`` under its own name, to
compare a change against the shipped kernel in one process; ``--isa native avx2 scalar`` builds each
source for the narrower code paths too (``PRUNEWISE_SPARSE_ISA``), to compare them on one machine.
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from prunewise.sparse import bitmask, kernel

SHAPES = ["1536x1536", "256x1536", "8960x1536", "1536x8960"]


def build(source: Path, isa: str = "native"):
    """The extension compiled from ``source`` for one of this CPU's code paths (``kernel.ISA_FLAGS``;
    the shipped source's native build through :func:`kernel.ext`)."""
    if source.resolve() == kernel.SOURCE.resolve() and isa == "native":
        return kernel.ext()
    name = f"bench_bitmask_{hashlib.sha256(source.read_bytes()).hexdigest()[:10]}_{isa}"
    return kernel.compile_source(source, name, kernel.ISA_FLAGS[isa])


def packed_pool(rows: int, cols: int, sparsity: float, pool_mb: int, dtype: torch.dtype, seed: int = 0):
    """Copies of one random matrix pruned by magnitude and packed, about ``pool_mb`` MB in all, and
    the dense matrices for the same pool size."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    k = int(round(sparsity * cols))
    if k:
        idx = w.abs().argsort(dim=1)[:, :k]
        w.scatter_(1, idx, 0.0)
    w = w.to(dtype)
    values, mask = bitmask.pack(w)
    values = kernel.padded(values)
    offsets = bitmask.row_offsets(mask)
    nbytes = (values.numel() - kernel.PAD) * values.element_size() + mask.numel()
    copies = max(2, pool_mb * 2**20 // nbytes)
    dense_copies = max(2, pool_mb * 2**20 // (w.numel() * w.element_size()))
    pool = [(values.clone(), mask.clone(), offsets) for _ in range(copies)]
    dense = [w.clone() for _ in range(dense_copies)]
    return pool, dense, nbytes, w


def medians_in_turns(fns, calls: int) -> list[float]:
    """Median seconds per call of each ``(fn, items)``, the functions called in turns (call i
    of every function, in an order that rotates, then call i + 1): a drift of the machine's
    bandwidth hits all alike."""
    for fn, items in fns:
        for item in items[: min(len(items), 4)]:
            fn(item)
    times: list[list[float]] = [[] for _ in fns]
    for i in range(calls):
        for j in (list(range(len(fns))) * 2)[i % len(fns) :][: len(fns)]:  # the order rotates each round
            fn, items = fns[j]
            item = items[i % len(items)]
            t0 = time.perf_counter()
            fn(item)
            times[j].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="ROWSxCOLS of each weight")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.7])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="token rows per call")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--source", type=Path, nargs="+", default=[kernel.SOURCE], help="kernel sources to compare")
    ap.add_argument(
        "--isa", nargs="+", default=["native"], choices=list(kernel.ISA_FLAGS), help="code paths to compare"
    )
    ap.add_argument("--pool", type=int, default=400, help="MB of matrices cycled through")
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    modules = [(f"{s}:{isa}", build(s, isa)) for s in args.source for isa in args.isa]
    for name, mod in modules:
        print(f"{name}: {mod.isa()}")
    bandwidth = kernel.read_bandwidth()
    print(f"threads {torch.get_num_threads()}, streaming read {bandwidth:.1f} GB/s")
    rows_out = []
    for shape in args.shapes:
        r, c = (int(v) for v in shape.split("x"))
        for s in args.sparsity:
            pool, dense, nbytes, w = packed_pool(r, c, s, args.pool, dtype)
            for t in args.rows:
                x = torch.randn(t, c)
                xd = x.to(dtype)
                acts = []  # activations in the weights' dtype, as in a model; float32 for a kernel without that
                for _, mod in modules:
                    try:
                        y, a = mod.linear(xd, *pool[0], c), xd
                    except RuntimeError:
                        y, a = mod.linear(x, *pool[0], c), x
                    torch.testing.assert_close(y, F.linear(a.float(), w.float()), rtol=1e-4, atol=1e-3)
                    acts.append(a)
                fns = [(lambda m, xd=xd: F.linear(xd, m), dense)]
                # a pool of its own per kernel: one's call would leave the next one's matrix in cache
                pools = [pool] + [[(v.clone(), m.clone(), o) for v, m, o in pool] for _ in modules[1:]]
                for (_, mod), own, a in zip(modules, pools, acts):
                    fns.append((lambda p, mod=mod, a=a, c=c: mod.linear(a, *p, c), own))
                dense_s, *kernel_s = medians_in_turns(fns, args.calls)
                line = {"shape": shape, "sparsity": s, "rows": t, "dtype": args.dtype, "dense_ms": dense_s * 1e3}
                for (name, _), k in zip(modules, kernel_s):
                    line[name] = {"ms": k * 1e3, "speedup": dense_s / k, "gbs": nbytes / k / 1e9}
                rows_out.append(line)
                cells = "  ".join(
                    f"{Path(n).name}: {v['ms']:.3f} ms {v['speedup']:.2f}x {v['gbs']:.1f} GB/s"
                    for n, v in line.items()
                    if isinstance(v, dict)
                )
                print(f"{shape:>10} S={s:.2f} T={t:<3} dense {dense_s * 1e3:.3f} ms  {cells}", flush=True)
    if args.json:
        with args.json.open("a") as fh:
            fh.write(json.dumps({"bandwidth_gbs": bandwidth, "rows": rows_out}) + "\n")


if __name__ == "__main__":
    main()
