"""GBLM-Pruner on the bundled SmolLM2-135M: gradient collection cost, and perplexity (issue #4).

Same protocol as ``bench_core.py``: calibration 32 windows x 512 tokens from the wiki calibration
pool (seed 0), perplexity on the first 64 x 512 tokens of the wiki test split. Every job runs in a
fresh subprocess so its peak RSS is its own.

Jobs:
- ``grad:<norm>:<checkpointing>``: prunewise's gradient collection (no cache) — wall time, peak RSS;
- ``fwdbwd``: the floor it is compared with — one plain forward + backward per window of the same
  samples, every parameter requiring grad and every ``.grad`` kept (what the reference does before
  copying into its accumulators);
- ``prune:<metric>:<pattern>:<allocator>:<sparsity>``: prune (gradients from a shared cache,
  collected once) and evaluate. GBLM with the allocators at 70% is in ``bench_allocators.py``.

The reference design's memory (weights + full gradients + 6 B per prunable parameter of CPU
accumulators) is computed from the parameter counts and written as ``reference_design``.

    python benchmarks/bench_gblm.py --out benchmarks/results/gblm.jsonl
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NSAMPLES, SEQLEN, EVAL_TOKENS = 32, 512, 32768
PRUNE = [  # metric, pattern, allocator, sparsity (Wanda / SparseGPT at 50% and 2:4: core.jsonl, same protocol)
    *[(m, "unstructured", "uniform", "0.5") for m in ("gblm", "gblm:norm=l2", "gradient")],
    ("gblm", "2:4", "uniform", "None"),
    *[(m, "4:8", "uniform", "None") for m in ("gblm", "wanda", "sparsegpt")],
]


def _rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _setup():
    import prunewise as pw
    from prunewise.data import calibration_ids
    from prunewise.model.malloc import keep_freed_memory
    from prunewise.storage.cache import default_cache_dir

    keep_freed_memory()
    model, tok, _ = pw.load_model("smollm2-135m")
    calib = calibration_ids(tok, "wiki", NSAMPLES, SEQLEN, 0, default_cache_dir())
    return pw, model, tok, calib


def job_grad(norm: str, checkpointing: bool) -> dict:
    pw, model, _, calib = _setup()
    from prunewise.prune.gradients import collect_gradients

    base = _rss()
    t0 = time.perf_counter()
    collect_gradients(model, calib, norm=norm, checkpointing=checkpointing, progress=False)
    return {
        "job": f"grad:{norm}:{checkpointing}",
        "wall_s": round(time.perf_counter() - t0, 2),
        "peak_rss_gb": round(_rss(), 3),
        "rss_before_gb": round(base, 3),
    }


def job_fwdbwd() -> dict:
    import torch
    import torch.nn.functional as F

    pw, model, _, calib = _setup()
    base = _rss()
    t0 = time.perf_counter()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    for window in calib:
        ids = window.unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).backward()
        del logits
    grads = sum(p.grad.numel() for p in model.parameters() if p.grad is not None)
    assert grads > 0
    torch.set_grad_enabled(False)
    return {
        "job": "fwdbwd",
        "wall_s": round(time.perf_counter() - t0, 2),
        "peak_rss_gb": round(_rss(), 3),
        "rss_before_gb": round(base, 3),
    }


def job_prune(metric: str, pat: str, allocator: str, sparsity: float | None, cache: str) -> dict:
    pw, model, tok, calib = _setup()
    from prunewise.data import load_text, tokenize
    from prunewise.run.pipeline import plan as _plan
    from prunewise.storage.cache import default_cache_dir

    cfg = pw.PruneConfig(
        model="smollm2-135m",
        metric=metric,
        allocator=allocator,
        sparsity=sparsity,
        pattern=pat,
        nsamples=NSAMPLES,
        seqlen=SEQLEN,
        calib="wiki",
    )
    t0 = time.perf_counter()
    planned = _plan(model, cfg, Path(cache), tokenizer=tok, calib=calib, progress=False)
    plan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = pw.prune(model, tok, cfg, calib=calib, allocation=planned.allocation, cache_dir=Path(cache), progress=False)
    wall = time.perf_counter() - t0
    test_ids = tokenize(tok, load_text("wiki", "evaluation").text, default_cache_dir())
    ppl = pw.perplexity(model, test_ids, SEQLEN, max_tokens=EVAL_TOKENS, batch_size=4, progress=False)["ppl"]
    row = {
        "job": "prune",
        "metric": metric,
        "pattern": pat,
        "sparsity": cfg.target,
        "allocator": allocator,
        "plan_s": round(plan_s, 2),
        "prune_s": round(wall, 2),
        "timings": res.timings,
        "ppl": round(ppl, 3),
        "achieved": round(res.sparsity, 6),
        "peak_rss_gb": round(_rss(), 3),
    }
    search = planned.details.get("search")
    if search:
        row["search"] = {"chosen": search["chosen"], "trials": len(search["curve"])}
    return row


def reference_design() -> dict:
    pw, model, _, _ = _setup()
    from prunewise.model.layers import block_linears, find_blocks, weight_matrix

    params = sum(p.numel() for p in model.parameters())
    prunable = sum(weight_matrix(m).numel() for b in find_blocks(model)[1] for _, m in block_linears(b))
    return {
        "job": "reference_design",
        "params": params,
        "prunable": prunable,
        "weights_gb": params * 4 / 1e9,
        "full_grads_gb": params * 4 / 1e9,
        "accumulators_gb": prunable * 6 / 1e9,
        "total_gb": (params * 8 + prunable * 6) / 1e9,
        "ours_accumulators_gb": prunable * 4 / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gblm.jsonl"))
    ap.add_argument("--only")
    ap.add_argument("--cache")
    ap.add_argument(
        "--kinds",
        nargs="*",
        default=["reference", "fwdbwd", "grad", "prune"],
        help="job kinds to run (timing jobs want a quiet machine; prune jobs report perplexity)",
    )
    args = ap.parse_args()
    if args.only:
        kind, *rest = args.only.split("|")
        if kind == "grad":
            row = job_grad(rest[0], rest[1] == "True")
        elif kind == "fwdbwd":
            row = job_fwdbwd()
        elif kind == "reference":
            row = reference_design()
        else:
            row = job_prune(rest[0], rest[1], rest[2], None if rest[3] == "None" else float(rest[3]), args.cache)
        print(json.dumps(row), flush=True)
        return
    cache = args.cache or tempfile.mkdtemp(prefix="gblm-cache-")
    jobs = ["reference", "fwdbwd", "grad|l1|False", "grad|l1|True", "grad|l2|False"]
    jobs += ["prune|" + "|".join(job) for job in PRUNE]
    done = set()
    if args.out.is_file():
        done = {r.get("key") for r in map(json.loads, args.out.open()) if "error" not in r}
    for job in jobs:
        if job in done or job.split("|")[0] not in args.kinds:
            continue
        proc = subprocess.run(
            [sys.executable, __file__, "--only", job, "--cache", cache], capture_output=True, text=True
        )
        if proc.returncode != 0:
            row = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["key"] = job
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
