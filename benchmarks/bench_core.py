"""Speed, memory and perplexity of the core metrics, with peers (default: the bundled SmolLM2-135M).

Protocol (shared/reference/peers.md): calibration 32 windows x 512 tokens from the wiki
calibration pool (``random.Random(0)``, ``randint(0, len - 513)`` per window); evaluation on the
first 64 non-overlapping 512-token windows of the wiki test split (32,768 tokens). Wall time is
the pruning call only (model loaded, data tokenized); peak RSS is read right after pruning. Every
run is a fresh subprocess so peak RSS is per run.

    python benchmarks/bench_core.py --out benchmarks/results/core.jsonl [--llmc /opt/llmc/bin/python]
    python benchmarks/bench_core.py --only wanda:0.5:unstructured:two-pass
    # a larger model, fewer windows, a chosen list of runs (ours and the peer's, in one run):
    python benchmarks/bench_core.py --model qwen2.5-coder-1.5b --nsamples 16 --eval-tokens 8192 \
        --llmc /opt/llmc/bin/python --jobs dense,wanda:0.5:unstructured:two-pass,peer:wanda:0.5:0:0 \
        --out benchmarks/results/llm-compressor-1.5b.jsonl
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

SEQLEN = 512

OURS = [
    ("magnitude", 0.5, "unstructured", "two-pass"),
    ("magnitude", 0.5, "unstructured:group=row", "two-pass"),
    ("magnitude", 0.7, "unstructured", "two-pass"),
    ("magnitude", None, "2:4", "two-pass"),
    ("wanda", 0.5, "unstructured", "two-pass"),
    ("wanda", 0.7, "unstructured", "two-pass"),
    ("wanda", None, "2:4", "two-pass"),
    ("sparsegpt", 0.5, "unstructured", "two-pass"),
    ("sparsegpt", 0.7, "unstructured", "two-pass"),
    ("sparsegpt", None, "2:4", "two-pass"),
    ("wanda", 0.5, "unstructured", "single-pass"),
    ("wanda", 0.7, "unstructured", "single-pass"),
    ("sparsegpt", 0.5, "unstructured", "single-pass"),
    ("sparsegpt", 0.7, "unstructured", "single-pass"),
]
PEERS = [
    ("wanda", 0.5, "0:0"),
    ("sparsegpt", 0.5, "0:0"),
    ("wanda", 0.7, "0:0"),
    ("sparsegpt", 0.7, "0:0"),
    ("wanda", 0.5, "2:4"),
    ("sparsegpt", 0.5, "2:4"),
]


def _setup(args, load: bool = True):
    """The model (``None`` unless ``load``), its local folder, calibration and test ids."""
    import prunewise as pw
    from prunewise.model.malloc import keep_freed_memory

    keep_freed_memory()  # as the CLI does
    from transformers import AutoTokenizer

    from prunewise.data import calibration_ids, load_text, tokenize
    from prunewise.model.loading import model_folder
    from prunewise.storage.cache import default_cache_dir

    if load:
        model, tok, src = pw.load_model(args.model)
        src = src.path
    else:  # the peer loads the model itself, from the same folder
        src = str(model_folder(args.model, default_cache_dir()))
        model, tok = None, AutoTokenizer.from_pretrained(src)
    calib = calibration_ids(tok, "wiki", args.nsamples, SEQLEN, 0, default_cache_dir())
    test_ids = tokenize(tok, load_text("wiki", "evaluation").text, default_cache_dir())
    return pw, model, src, calib, test_ids


def _protocol(args) -> dict:
    """The fields every row carries: which model, how many calibration windows, evaluation tokens."""
    return {"model": args.model, "nsamples": args.nsamples, "eval_tokens": args.eval_tokens}


def _ppl(pw, model, test_ids, args) -> float:
    return pw.perplexity(model, test_ids, SEQLEN, max_tokens=args.eval_tokens, batch_size=4, progress=False)["ppl"]


def run_ours(args, metric: str, sparsity: float | None, pattern: str, mode: str) -> dict:
    import torch

    pw, model, _, calib, test_ids = _setup(args)
    cfg = pw.PruneConfig(
        metric=metric,
        sparsity=sparsity,
        pattern=pattern,
        mode=mode,
        nsamples=args.nsamples,
        seqlen=SEQLEN,
        batch_size=args.batch_size,
    )
    t0 = time.perf_counter()
    res = pw.prune(model, None, cfg, calib=calib, progress=False)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    ppl = _ppl(pw, model, test_ids, args)
    return {
        "tool": "prunewise",
        **_protocol(args),
        "metric": metric,
        "pattern": pattern,
        "sparsity": cfg.target,
        "mode": mode,
        "batch_size": args.batch_size,
        "wall_s": round(wall, 2),
        "peak_rss_gb": round(rss, 3),
        "ppl": round(ppl, 3),
        "achieved": round(res.sparsity, 6),
        "torch_threads": torch.get_num_threads(),
    }


def run_dense_pass(args) -> dict:
    """One dense pass of the calibration set through the blocks (half the floor of a two-pass pruner)."""
    import torch

    from prunewise.model.sources import replay

    pw, model, _, calib, test_ids = _setup(args)
    t0 = time.perf_counter()
    replay(model, calib, batch_size=1)
    wall = time.perf_counter() - t0
    ppl = _ppl(pw, model, test_ids, args)
    return {
        "tool": "prunewise",
        **_protocol(args),
        "metric": "dense-pass",
        "wall_s": round(wall, 2),
        "ppl": round(ppl, 3),
        "torch_threads": torch.get_num_threads(),
    }


def run_peer(args, method: str, sparsity: float, structure: str) -> dict:
    pw, _, src, calib, test_ids = _setup(args, load=False)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        calib_path = Path(tmp) / "calib.pt"
        torch.save(calib, calib_path)
        out = Path(tmp) / "out"
        proc = subprocess.run(
            [
                args.llmc,
                str(Path(__file__).with_name("llmc_run.py")),
                src,
                str(calib_path),
                method,
                str(sparsity),
                structure,
                str(out),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            return {"tool": "llm-compressor", "metric": method, "error": proc.stderr.strip().splitlines()[-1:]}
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
        pruned, _, _ = pw.load_model(str(out))
        ppl = _ppl(pw, pruned, test_ids, args)

        zeros = total = 0
        from prunewise.model.layers import block_linears, find_blocks, weight_matrix

        for block in find_blocks(pruned)[1]:
            for _, m in block_linears(block):
                w = weight_matrix(m)
                zeros += int((w == 0).sum())
                total += w.numel()
    pattern = "2:4" if structure == "2:4" else "unstructured"
    return {
        "tool": "llm-compressor 0.14.0.1",
        **_protocol(args),
        "metric": method,
        "pattern": pattern,
        "sparsity": sparsity,
        "mode": "sequential pipeline",
        "batch_size": 1,
        "wall_s": round(stats["wall_s"], 2),
        "save_s": round(stats["save_s"], 2) if "save_s" in stats else None,
        "peak_rss_gb": round(stats["peak_rss_gb"], 3),
        "ppl": round(ppl, 3),
        "achieved": round(zeros / total, 6),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/core.jsonl"))
    ap.add_argument("--llmc", help="python of a venv with llmcompressor installed")
    ap.add_argument("--only", help="one run: metric:sparsity:pattern:mode, dense, or peer:method:sparsity:structure")
    ap.add_argument("--jobs", help="comma-separated runs in --only's syntax, in this order (default: all)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows of 512 tokens")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--skip-ours", action="store_true")
    args = ap.parse_args()
    if args.only:
        parts = args.only.split(":")
        if parts[0] == "dense":
            row = run_dense_pass(args)
        elif parts[0] == "peer":
            row = run_peer(args, parts[1], float(parts[2]), ":".join(parts[3:]))
        else:
            metric, sp, *pat, mode = parts
            row = run_ours(args, metric, None if sp == "None" else float(sp), ":".join(pat), mode)
        print(json.dumps(row), flush=True)
        return
    if args.jobs:
        jobs = args.jobs.split(",")
    else:
        jobs = [] if args.skip_ours else ["dense"] + [f"{m}:{s}:{p}:{mode}" for m, s, p, mode in OURS]
        if args.llmc:
            jobs += [f"peer:{m}:{s}:{st}" for m, s, st in PEERS]
    if any(j.startswith("peer:") for j in jobs) and not args.llmc:
        ap.error("peer runs need --llmc PYTHON (a venv with llmcompressor installed)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    common = ["--batch-size", str(args.batch_size), "--model", args.model, "--nsamples", str(args.nsamples)]
    common += ["--eval-tokens", str(args.eval_tokens)] + (["--llmc", args.llmc] if args.llmc else [])
    for job in jobs:
        cmd = [sys.executable, __file__, "--only", job, *common]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = (
            proc.stdout.strip().splitlines()[-1]
            if proc.returncode == 0 and proc.stdout.strip()
            else json.dumps({"job": job, "error": proc.stderr.strip().splitlines()[-3:]})
        )
        print(line, flush=True)
        with open(args.out, "a") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
