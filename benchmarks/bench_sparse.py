"""Sparse checkpoints on the CPU: sizes, per-layer kernel times and decode speed (issue 25).

    python benchmarks/bench_sparse.py [--model smollm2-135m] [--sparsity 0.5 0.7 0.8] [--dtype float32 bfloat16]

For each dtype and sparsity: the model pruned by magnitude in memory (the kernel's speed depends
on the sparsity, not on which weights are kept), then :func:`prunewise.evaluation.speed.measure`
on the dense source, the pruned model run densely and the pruned model on the kernel, timed in
turns: sizes, prefill and decode tokens/s, one pass over each layer shape's layers at each row
count. One JSON line per report appended to ``benchmarks/results/sparse.jsonl`` (the same fields
as ``prunewise speed --json``). Run it alone on the machine: figures are medians of ``--repeat``
rounds, and decode at batch 1 on this shared 2-core machine spreads by about ±20% between runs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

import prunewise as pw
from prunewise.evaluation.speed import measure, tables
from prunewise.model.blocks import BlockSource
from prunewise.sparse import kernel

OUT = Path(__file__).parent / "results" / "sparse.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.8])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--decode", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prefill", type=int, nargs="+", default=[512], help="prefill lengths at batch 1")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 512], help="rows of the per-layer matmuls")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    for dtype in args.dtype:
        dense, _, _ = pw.load_model(args.model, dtype)
        for s in args.sparsity:
            pruned = copy.deepcopy(dense)
            names = [name for _, name, _ in BlockSource(pruned).all_linears()]
            pw.prune_model(
                pruned,
                None,
                metric="magnitude",
                allocation=dict.fromkeys(names, s),
                pattern=pw.parse_pattern("unstructured"),
                progress=False,
            )
            report = measure(
                pruned,
                dense,
                sparse=kernel.with_kernel(pruned),
                shapes=[(1, n) for n in args.prefill],
                decode_batches=args.decode,
                steps=args.steps,
                tokens=args.tokens,
                repeat=args.repeat,
            )
            print(f"\n{args.model}, magnitude {s:.0%}\n{tables(report)}", flush=True)
            row = dict(model=args.model, sparsity=s, threads=torch.get_num_threads(), date=time.strftime("%F"))
            row.update(dataclasses.asdict(report))
            with OUT.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            del pruned, report


if __name__ == "__main__":
    main()
