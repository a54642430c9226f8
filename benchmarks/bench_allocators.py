"""Layerwise allocators x metrics x sparsities on the bundled SmolLM2-135M (issue #3's table).

Protocol: calibration 16 windows x 512 tokens from the wiki calibration pool (seed 0), perplexity
on the first 32 non-overlapping 512-token windows of the wiki test split (16,384 tokens), two-pass
pruning with pruned propagation. One process: the model is loaded once and the dense weights of
the pruned layers are restored after every run, so every run starts from the same dense model.

GBLM (``--metrics gblm --sparsities 0.7``) runs on the same protocol; its gradients are collected
once and read from the statistics cache afterwards.

Allocators: uniform, owl (m=5, lam=0.08), alphapruning (epsilon=0.3, xmin_peak), atp, mrp (defaults).
ATP's beta: ``beta=auto`` (grid step 0.004 on 8 held-out calibration windows) for magnitude and
Wanda at every sparsity; to keep the grid affordable on 2 CPU cores, SparseGPT and GBLM reuse the
beta Wanda's search chose at the same sparsity (the row's ``spec`` holds the value used).

``plan_s`` is the allocation's wall time. Allocator statistics live in a fresh cache folder, so the
first run of each allocator pays for them (``cold``) and the later ones read them back.
``redundancy`` is measured on the pruned weights: per block, the fraction of the remaining weights
whose dense score is at most 5x the dense block mean (MRP's quantity), with the score MRP uses for
the metric (``|W|`` for magnitude, Wanda's ``|W| * a_j`` otherwise).

    python benchmarks/bench_allocators.py --out benchmarks/results/allocators.jsonl
    python benchmarks/bench_allocators.py --out benchmarks/results/owl-sensitivity.jsonl --metrics wanda \
        --sparsities 0.7 --allocators owl:lam=0.02 owl:lam=0.05 owl:lam=0.15 owl:m=3 owl:m=8
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

NSAMPLES, SEQLEN, EVAL_TOKENS = 16, 512, 16384
SPARSITIES = (0.7, 0.5, 0.6, 0.8)
METRICS = ("magnitude", "wanda", "sparsegpt")
ALLOCATORS = ("uniform", "owl", "alphapruning", "atp:beta=auto,step=0.004,heldout=8", "mrp")


def block_redundancy(profile, dense: dict, norms: dict, model, metric: str, m: float = 5.0) -> list[float]:
    from prunewise.allocation.mrp import score_kind
    from prunewise.model.layers import weight_matrix

    wanda = score_kind("auto", metric) == "wanda"
    out = []
    for b in range(profile.num_blocks):
        names = [x.name for x in profile.layers if x.block == b]
        scores = [dense[n].abs() * (norms[n].unsqueeze(0) if wanda else 1) for n in names]
        cut = m * sum(float(s.sum(dtype=torch.float64)) for s in scores) / sum(s.numel() for s in scores)
        kept = outliers = 0
        for n, s in zip(names, scores):
            alive = weight_matrix(model.get_submodule(n)) != 0
            kept += int(alive.sum())
            outliers += int((alive & (s > cut)).sum())
        out.append(1 - outliers / kept)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sparsities", type=float, nargs="*", default=SPARSITIES)
    ap.add_argument("--metrics", nargs="*", default=METRICS)
    ap.add_argument("--allocators", nargs="*", default=ALLOCATORS)
    args = ap.parse_args()

    import prunewise as pw
    from prunewise.allocation.statistics import dense_input_norms
    from prunewise.data import calibration_ids, load_text, tokenize
    from prunewise.model.blocks import BlockSource
    from prunewise.model.malloc import keep_freed_memory
    from prunewise.run.job import backup_weights, restore_weights
    from prunewise.run.pipeline import plan as _plan
    from prunewise.storage.cache import default_cache_dir

    keep_freed_memory()
    done = set()
    if args.out.is_file():
        done = {(r["metric"], r["allocator"], r["sparsity"]) for r in map(json.loads, args.out.open())}
    stat_cache = Path(tempfile.mkdtemp(prefix="alloc-stats-"))
    model, tok, _ = pw.load_model("smollm2-135m")
    calib = calibration_ids(tok, "wiki", NSAMPLES, SEQLEN, 0, default_cache_dir())
    test_ids = tokenize(tok, load_text("wiki", "evaluation").text, default_cache_dir())
    profile_cfg = pw.PruneConfig(model="smollm2-135m", nsamples=NSAMPLES, seqlen=SEQLEN, calib="wiki")
    profile = _plan(model, profile_cfg, stat_cache, tokenizer=tok, calib=calib, progress=False).profile
    dense = backup_weights(model, profile)
    norms = dense_input_norms(BlockSource(model), calib, progress=False)

    def ppl() -> float:
        return pw.perplexity(model, test_ids, SEQLEN, max_tokens=EVAL_TOKENS, progress=False)["ppl"]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    if ("dense", "-", 0.0) not in done:
        with args.out.open("a") as f:
            f.write(json.dumps({"metric": "dense", "allocator": "-", "sparsity": 0.0, "ppl": ppl()}) + "\n")
    seen_alloc: set[str] = set()
    wanda_beta: dict[float, float] = {}  # searched beta per sparsity
    for row in map(json.loads, args.out.open()):
        if row.get("search"):
            seen_alloc.add(row["allocator"].split(":")[0])
            if row["metric"] == "wanda":
                wanda_beta[row["sparsity"]] = row["search"]["chosen"]
    for sparsity in args.sparsities:
        for metric in args.metrics:
            for alloc in args.allocators:
                if (metric, alloc, sparsity) in done:
                    continue
                spec = alloc
                if alloc.startswith("atp") and metric not in ("magnitude", "wanda") and sparsity in wanda_beta:
                    spec = f"atp:beta={wanda_beta[sparsity]}"
                cfg = pw.PruneConfig(
                    model="smollm2-135m",
                    metric=metric,
                    allocator=spec,
                    sparsity=sparsity,
                    nsamples=NSAMPLES,
                    seqlen=SEQLEN,
                    calib="wiki",
                )
                name = alloc.split(":")[0]
                cold = name not in seen_alloc
                seen_alloc.add(name)
                row = {"metric": metric, "allocator": alloc, "spec": spec, "sparsity": sparsity, "cold": cold}
                try:
                    t0 = time.perf_counter()
                    planned = _plan(
                        model, cfg, stat_cache, tokenizer=tok, calib=calib, progress=False, dense_weights=dense
                    )
                    row["plan_s"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    res = pw.prune(model, tok, cfg, calib=calib, allocation=planned.allocation, progress=False)
                    row["prune_s"] = time.perf_counter() - t0
                    row["achieved"] = res.sparsity
                    row["ppl"] = ppl()
                    red = block_redundancy(planned.profile, dense, norms, model, metric)
                    row["redundancy"] = {"min": min(red), "max": max(red), "std": statistics.pstdev(red)}
                    row["blocks"] = pw.allocation.block_profile(planned.profile, planned.allocation)
                    if "search" in planned.details:
                        row["search"] = planned.details["search"]
                        if metric == "wanda":
                            wanda_beta[sparsity] = row["search"]["chosen"]
                except Exception as exc:  # record and go on
                    row["error"] = f"{type(exc).__name__}: {exc}"
                finally:
                    restore_weights(model, dense)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k: v for k, v in row.items() if k not in ("blocks", "search")}), flush=True)


if __name__ == "__main__":
    main()
