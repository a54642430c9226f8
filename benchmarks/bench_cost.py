"""The cost curve on real models (issue #23): prune wall time and peak RSS of magnitude, Wanda,
SparseGPT and GBLM on SmolLM2-135M, Qwen2.5-Coder 0.5B and 1.5B, in memory and streamed, each
against that model's floor measured in the same benchmark run, and the memory formula against
every measured peak.

Same calibration everywhere: 16 x 512 wiki windows (seed 0), 70% unstructured, uniform, no
evaluation. Every job is a fresh child process, so its peak RSS is its own:

- ``floor:off`` / ``floor:on``: two dense passes of the calibration set through the blocks
  (:func:`prunewise.model.sources.replay` twice: what a two-pass prune cannot avoid), the model
  in memory or streamed from its checkpoint;
- ``fwdbwd``: one plain forward + backward per window, every parameter's ``.grad`` kept (the
  floor of GBLM's gradient pass);
- ``prune:METRIC:STREAM``: ``prunewise prune`` (through ``bench_stream.prune_once``), with the
  run record's own timings (GBLM's gradient pass apart) and memory estimate.

Rows are appended to ``--out`` as they finish; jobs already there are skipped (the 1.5B jobs took
54 minutes on 2 cores on 2026-12-07: resume across sessions). Time it alone on the machine.

    python benchmarks/bench_cost.py --out benchmarks/results/cost.jsonl
    python benchmarks/bench_cost.py --models smollm2-135m --jobs floor:off,prune:wanda:off
    python benchmarks/bench_cost.py --summary benchmarks/results/cost.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_stream import measure, prune_once  # noqa: E402

MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
METRICS = ("magnitude", "wanda", "sparsegpt", "gblm")
NSAMPLES, SEQLEN, SPARSITY = 16, 512, 0.7
JOBS = (
    "floor:off",
    "floor:on",
    "fwdbwd",
    *[f"prune:{m}:{s}" for s in ("off", "on") for m in METRICS],
)

CHILD = """
import json, resource, sys, time
import torch
import prunewise as pw
from prunewise.data import calibration_ids
from prunewise.model.malloc import keep_freed_memory
from prunewise.storage.cache import default_cache_dir

name, job = sys.argv[1], sys.argv[2]
keep_freed_memory()
torch.set_grad_enabled(job == "fwdbwd")
model, tok, _ = pw.load_model(name, stream=job == "floor:on")
calib = calibration_ids(tok, "wiki", {nsamples}, {seqlen}, 0, default_cache_dir())
row = {{}}
if job.startswith("floor"):
    from prunewise.model.sources import replay
    passes = []
    for _ in range(2):
        t0 = time.perf_counter()
        replay(model, calib)
        passes.append(time.perf_counter() - t0)
    row = {{"wall_s": round(sum(passes), 2), "passes_s": [round(p, 2) for p in passes]}}
else:
    import torch.nn.functional as F
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    for window in calib:
        ids = window.unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).backward()
        del logits
    row = {{"wall_s": round(time.perf_counter() - t0, 2)}}
print(json.dumps(row))
"""


def child(model: str, job: str) -> dict:
    code = CHILD.format(nsamples=NSAMPLES, seqlen=SEQLEN)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(code)
    out = Path(fh.name).with_suffix(".json")
    cmd = ["sh", "-c", f'"{sys.executable}" "{fh.name}" "{model}" "{job}" > "{out}"']
    peak, rc = measure(cmd)
    row = {"rc": rc, "peak_rss_gb": round(peak / 1e9, 3)}
    if rc == 0:
        row.update(json.loads(out.read_text().strip().splitlines()[-1]))
    out.unlink(missing_ok=True)
    Path(fh.name).unlink(missing_ok=True)
    return row


def run_job(model: str, job: str, work: Path) -> dict:
    if job.startswith("prune:"):
        _, metric, stream = job.split(":")
        args = ["--model", model, "--metric", metric, "--sparsity", str(SPARSITY)]
        args += ["--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN)]
        return prune_once(args, stream, work / "out", None, timings=True)
    return child(model, job)


def summary(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by = {(r["model"], r["job"]): r for r in rows}
    print("| model | job | wall s | x floor | peak RSS GB | estimated GB | peak / estimate |")
    print("|---|---|---|---|---|---|---|")
    for (model, job), r in by.items():
        stream = job.rsplit(":", 1)[-1] if job.startswith(("prune", "floor")) else "off"
        floor = by.get((model, f"floor:{stream}"), {}).get("wall_s")
        wall = r.get("prune_s", r.get("wall_s"))
        if job.startswith("prune:gblm"):  # the gradient pass against a plain forward + backward
            grad = r["timings"].get("gradients_s")
            fb = by.get((model, "fwdbwd"), {}).get("wall_s")
            if grad and fb:
                print(f"| {model} | {job} gradient pass | {grad:.1f} | {grad / fb:.2f} x fwd+bwd | | | |")
            wall = round(wall - (grad or 0), 2)
        xf = f"{wall / floor:.2f}" if floor and wall and job.startswith("prune") else ""
        est = r.get("estimated_host_gb")
        ratio = f"{r['peak_rss_gb'] / est:.2f}" if est else ""
        print(f"| {model} | {job} | {wall} | {xf} | {r.get('peak_rss_gb')} | {est or ''} | {ratio} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--jobs", default=",".join(JOBS))
    p.add_argument("--out", type=Path)
    p.add_argument("--work", type=Path)
    p.add_argument("--summary", type=Path, help="print the table of a results file and stop")
    a = p.parse_args()
    if a.summary:
        summary(a.summary)
        return 0
    work = a.work or Path(tempfile.mkdtemp(prefix="prunewise-cost-"))
    done = set()
    if a.out and a.out.exists():
        done = {(r["model"], r["job"]) for r in map(json.loads, a.out.read_text().splitlines()) if r.get("rc", 0) == 0}
    for model in a.models.split(","):
        for job in a.jobs.split(","):
            if (model, job) in done:
                continue
            t0 = time.perf_counter()
            row = {"model": model, "job": job, **run_job(model, job, work)}
            row["job_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(row), flush=True)
            if a.out:
                with a.out.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
