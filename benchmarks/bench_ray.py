"""A small sweep on the bundled model with the local executor and with 1 and 2 Ray workers.

    python benchmarks/bench_ray.py [--out benchmarks/results/ray.jsonl]

Grid: magnitude and Wanda x uniform x 50% and 60% (4 runs), 8 x 512 calibration tokens,
perplexity on the first 4,096 wiki test tokens. Each setting starts from an empty sweep folder;
statistic caches are shared (the converted model and tokens are in the cache before the first).
Prints wall time, the model-loading share (per worker: load, calibration tokens, dense copy) and
the per-run time reported in the result lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import prunewise as pw
from prunewise.run.results import read_results
from prunewise.run.trials import Executor
from prunewise.sweep.grid import Sweep
from prunewise.sweep.runner import run_sweep

SETTINGS = [("local", {}), ("ray", {"workers": 1, "threads": 2}), ("ray", {"workers": 2, "threads": 1})]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    base = pw.PruneConfig(model="smollm2-135m", nsamples=8, seqlen=512, eval_data="wiki", max_tokens=4096)
    grid = Sweep(
        base=base,
        metrics=["magnitude", "wanda"],
        allocators=["uniform"],
        sparsities=[0.5, 0.6],
        patterns=["unstructured"],
    )
    rows = []
    for executor, options in SETTINGS:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            run_sweep(grid, Path(tmp) / "s", progress=False, executor=Executor(executor, options))
            wall = time.perf_counter() - t0
            lines = [r for r in read_results(Path(tmp) / "s") if r["kind"] == "run"]
            per_run = statistics.median(r["wall_s"] for r in lines)
            row = {
                "executor": executor,
                **options,
                "wall_s": round(wall, 1),
                "median_run_s": round(per_run, 1),
                "sum_runs_s": round(sum(r["wall_s"] for r in lines), 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        if executor == "ray":
            import ray

            ray.shutdown()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
