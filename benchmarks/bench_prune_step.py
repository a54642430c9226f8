"""The prune step alone (scores, exact-count mask, the in-place write, the checks around it) over
every decoder-block layer of a real model, on two source trees in alternating fresh processes.

What a metric costs beyond the calibration passes is this step (issue #23's "Wanda <= 1.1x its
floor"); an end-to-end prune is too long and drifts too much on a shared 2-core machine to show a
change of a few percent, this isolates it. Each child loads ``--model`` in memory as a prune does
(a memory-mapped safetensors folder, so the first write to each weight page is a copy-on-write
fault, as in a real run), gives every layer the statistics the metric needs (Wanda: input norms
drawn from a fixed seed; magnitude: none), prunes every layer through the engine's own step
(``_Pruner.prune``) and prints the seconds of that loop.

    git worktree add /tmp/old <commit>
    python benchmarks/bench_prune_step.py --trees /tmp/old/src src --model qwen2.5-coder-1.5b \\
        --metric wanda --sparsity 0.7 --rounds 3

Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, sys, time
import torch
import prunewise as pw
from prunewise.model.blocks import BlockSource
from prunewise.model.layers import weight_matrix
from prunewise.prune.engine import PruneOptions, _Pruner
from prunewise.prune.masks import Pattern
from prunewise.prune.stats import make_stats

model_name, metric, sparsity = sys.argv[1], sys.argv[2], float(sys.argv[3])
torch.set_grad_enabled(False)
model, _, _ = pw.load_model(model_name)
layers = [(name, m) for _, name, m in BlockSource(model).all_linears()]
opts = PruneOptions.make(metric, allocation={n: sparsity for n, _ in layers}, pattern=Pattern())
pruner = _Pruner(opts)
g = torch.Generator().manual_seed(0)
stats = {}
for name, m in layers:
    st = make_stats(opts.metric.needs, weight_matrix(m).shape[1])
    st.sq_sum, st.nsamples, st.ntokens = torch.rand(st.in_features, generator=g) * 100, 16, 8192
    stats[name] = st
t0 = time.perf_counter()
zeros = sum(pruner.prune(name, m, stats[name]) for name, m in layers)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "layers": len(layers), "zeros": zeros, "prunewise": pw.__file__}))
"""


def child(tree: str, model: str, metric: str, sparsity: float) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, metric, str(sparsity)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", nargs="+", required=True, help="source trees (folders holding prunewise/)")
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--metric", default="wanda", choices=("wanda", "magnitude"))
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", help="append the summary row to this JSONL file")
    a = p.parse_args()
    times: dict[str, list[float]] = {t: [] for t in a.trees}
    zeros: dict[str, int] = {}
    for r in range(a.rounds):
        order = a.trees if r % 2 == 0 else a.trees[::-1]  # alternate who goes first
        for tree in order:
            row = child(tree, a.model, a.metric, a.sparsity)
            times[tree].append(round(row["seconds"], 2))
            zeros[tree] = row["zeros"]
            print(f"round {r + 1} {tree}: {row['seconds']:.2f} s, {row['layers']} layers", flush=True)
    summary = {
        "model": a.model,
        "metric": a.metric,
        "sparsity": a.sparsity,
        "seconds": times,
        "median_s": {t: statistics.median(v) for t, v in times.items()},
        "zeros": zeros,
    }
    print(json.dumps(summary))
    if a.out:
        with open(a.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
