"""Sparse checkpoints on the CPU: sizes, per-layer kernel times and decode speed (issue 25).

    python benchmarks/bench_sparse.py [--model smollm2-135m] [--sparsity 0.5 0.7 0.8] [--dtype float32 bfloat16]

For each dtype and sparsity: the bundled model pruned by magnitude (the kernel's speed depends on
the sparsity, not on which weights are kept), the block weights' packed bytes against dense, one
matmul per distinct layer shape at 1 and 8 tokens (dense ``F.linear`` on the pruned weight vs the
kernel), and greedy decode tokens/s at batch 1 and 8 for the dense source, the pruned model run
densely, and the pruned model on the kernel, each with and without flushing subnormals. Medians;
one row per figure appended to ``benchmarks/results/sparse.jsonl``. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import prunewise as pw
from prunewise.evaluation.speed import decode, timed
from prunewise.model.blocks import BlockSource
from prunewise.sparse import kernel

OUT = Path(__file__).parent / "results" / "sparse.jsonl"


def to_sparse(model: nn.Module) -> nn.Module:
    for _, name, module in BlockSource(model).all_linears():
        if type(module) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, kernel.SparseLinear.from_linear(module))
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.8])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    kernel.ext()
    rows = []

    def emit(**row):
        row.update(model=args.model, threads=torch.get_num_threads(), isa=kernel.isa(), date=time.strftime("%F"))
        print(json.dumps(row))
        rows.append(row)

    cpu = torch.device("cpu")
    for dtype in args.dtype:
        dense, _, _ = pw.load_model(args.model, dtype)
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            for r in decode(dense, [1, 8], args.steps, 32, cpu, args.repeat, "dense"):
                emit(kind="decode", dtype=dtype, sparsity=0.0, flush=flush, variant="dense source", **r)
        for s in args.sparsity:
            pruned = copy.deepcopy(dense)
            names = [name for _, name, _ in BlockSource(pruned).all_linears()]
            pw.prune_model(pruned, None, metric="magnitude", allocation=dict.fromkeys(names, s),
                           pattern=pw.parse_pattern("unstructured"), progress=False)
            blocks = [m.weight for _, _, m in BlockSource(pruned).all_linears()]
            dense_bytes = sum(w.numel() * w.element_size() for w in blocks)
            sparse = to_sparse(copy.deepcopy(pruned))
            packed = sum(m.nbytes for m in sparse.modules() if isinstance(m, kernel.SparseLinear))
            emit(kind="size", dtype=dtype, sparsity=s, block_dense_bytes=dense_bytes, block_packed_bytes=packed,
                 ratio=packed / dense_bytes)
            seen = set()
            for m in sparse.modules():
                if not isinstance(m, kernel.SparseLinear):
                    continue
                shape = (m.out_features, m.in_features)
                if shape in seen:
                    continue
                seen.add(shape)
                w = m.dense_weight()
                for n in (1, 8):
                    x = torch.randn(n, shape[1]).to(w.dtype)
                    d = timed(lambda x=x, w=w: F.linear(x, w), cpu, 20)
                    k = timed(lambda x=x, m=m: m(x), cpu, 20)
                    emit(kind="layer", dtype=dtype, sparsity=s, shape=list(shape), tokens=n, dense_ms=1e3 * d,
                         kernel_ms=1e3 * k, speedup=d / k, packed_bytes=m.nbytes, kernel_gb_s=m.nbytes / k / 1e9)
            for flush in (False, True):
                torch.set_flush_denormal(flush)
                for label, model in (("pruned, dense", pruned), ("pruned, kernel", sparse)):
                    for r in decode(model, [1, 8], args.steps, 32, cpu, args.repeat, label):
                        emit(kind="decode", dtype=dtype, sparsity=s, flush=flush, variant=label, **r)
        torch.set_flush_denormal(False)
    with OUT.open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
