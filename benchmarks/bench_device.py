"""The bundled SmolLM2-135M pruned on one device, run by run: the same runs on a GPU and on the CPU
give the figures that show ``--device cuda`` prunes what the CPU prunes, and how fast.

    python benchmarks/bench_device.py --device cuda --out gpu.jsonl            # on the GPU machine
    python benchmarks/bench_device.py --device cpu --out cpu.jsonl --only cpu  # the runs to compare, here
    python benchmarks/bench_device.py --compare cpu.jsonl gpu.jsonl            # the table

Each row (appended as soon as the run ends, so a cut run keeps what it finished): the run's label,
its config, dense and pruned perplexity, the mask digest, wall seconds, the prune's own seconds,
peak host RSS and peak GPU memory. The runs marked ``cpu`` are the ones small enough to repeat on 2
CPU cores (32 x 512 calibration, 16,384 wiki test tokens, as the README's main command); the
others are the papers' protocol (128 x 2048 calibration, the whole wiki test split), for the GPU
alone. On a GPU, each 2:4 run is followed by ``prunewise speed`` of it (fp16, semi-structured kernels).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL = dict(nsamples=32, seqlen=512, eval_data="wiki", max_tokens=16384)
PAPERS = dict(nsamples=128, seqlen=2048, eval_data="wiki")
SPEED = ("sparsegpt 2:4", "papers: sparsegpt 2:4")  # on a GPU, `prunewise speed` of these runs follows them
# (label, config fields, on the CPU too)
RUNS = [
    ("readme wanda 50%", dict(metric="wanda", sparsity=0.5, **SMALL), True),
    ("sparsegpt 2:4", dict(metric="sparsegpt", pattern="2:4", **SMALL), True),
    ("magnitude 70%", dict(metric="magnitude", sparsity=0.7, **SMALL), True),
    ("wanda 70%", dict(metric="wanda", sparsity=0.7, **SMALL), True),
    ("sparsegpt 70%", dict(metric="sparsegpt", sparsity=0.7, **SMALL), True),
    ("gblm 70%", dict(metric="gblm", sparsity=0.7, **SMALL), True),
    ("wanda 70% owl", dict(metric="wanda", allocator="owl", sparsity=0.7, **SMALL), True),
    ("wanda 70% owl streamed", dict(metric="wanda", allocator="owl", sparsity=0.7, stream="on", **SMALL), True),
    ("wanda 70% alphapruning", dict(metric="wanda", allocator="alphapruning", sparsity=0.7, **SMALL), True),
    ("wanda 70% dlp", dict(metric="wanda", allocator="dlp", sparsity=0.7, **SMALL), True),
    ("wanda 70% lsa", dict(metric="wanda", allocator="lsa", sparsity=0.7, **SMALL), True),
    ("wanda 70% mrp", dict(metric="wanda", allocator="mrp", sparsity=0.7, **SMALL), True),
    ("wanda 70% atp", dict(metric="wanda", allocator="atp:beta=0.01", sparsity=0.7, **SMALL), True),
    ("wanda 70% bf16", dict(metric="wanda", sparsity=0.7, dtype="bfloat16", **SMALL), True),
    ("papers: wanda 70%", dict(metric="wanda", sparsity=0.7, **PAPERS), False),
    ("papers: sparsegpt 70%", dict(metric="sparsegpt", sparsity=0.7, **PAPERS), False),
    ("papers: gblm 70%", dict(metric="gblm", sparsity=0.7, **PAPERS), False),
    ("papers: wanda 70% owl", dict(metric="wanda", allocator="owl", sparsity=0.7, **PAPERS), False),
    ("papers: sparsegpt 2:4", dict(metric="sparsegpt", pattern="2:4", **PAPERS), False),
]


def _folder(work: Path, label: str) -> Path:
    return work / label.replace(" ", "-").replace(":", "").replace("%", "")


def one(label: str, fields: dict, device: str, work: Path) -> dict:
    import torch

    import prunewise as pw

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out = _folder(work, label)
    t0 = time.perf_counter()
    rec = pw.run(pw.PruneConfig(model="smollm2-135m", device=device, **fields), out=out, progress=False).record
    return {
        "label": label,
        "device": device,
        "config": rec.config,
        "dense_ppl": (rec.dense or {}).get("ppl"),
        "pruned_ppl": (rec.pruned or {}).get("ppl"),
        "mask_sha256": rec.pruning["mask_sha256"],
        "sparsity": rec.pruning.get("sparsity"),
        "wall_s": round(time.perf_counter() - t0, 2),
        "prune_s": round(rec.timings.get("prune_s", float("nan")), 2),
        "timings": {k: round(v, 2) for k, v in rec.timings.items()},
        "memory": rec.memory,
        "folder": str(out),
    }


def speed(folder: str, device: str, json_out: Path) -> dict:
    cmd = [sys.executable, "-m", "prunewise", "speed", "--model", folder, "--device", device, "--dtype", "float16"]
    cmd += ["--shapes", "1x512,8x2048", "--decode", "1,16", "--tokens", "1,16,4096", "--json", str(json_out), "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    row = {"label": f"speed {Path(folder).name} fp16", "device": device, "rc": done.returncode}
    if json_out.exists():
        row["speed"] = json.loads(json_out.read_text())
    row["stdout_tail"] = done.stdout[-3000:] + done.stderr[-1500:]
    return row


def compare(a: Path, b: Path) -> None:
    rows = {}
    for path in (a, b):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if "pruned_ppl" in r:
                rows.setdefault(r["label"], {})[r["device"]] = r
    print("| run | CPU ppl | GPU ppl | rel. diff | same masks | GPU prune s | GPU run s | GPU peak GB |")
    print("|---|---|---|---|---|---|---|---|")
    for label, by in rows.items():
        c, g = by.get("cpu"), by.get("cuda")
        if not g:
            continue
        cp = c["pruned_ppl"] if c else None
        diff = f"{(g['pruned_ppl'] - cp) / cp:+.2%}" if cp else ""
        same = ("yes" if c["mask_sha256"] == g["mask_sha256"] else "no") if c else ""
        peak = (g.get("memory") or {}).get("peak_cuda_gb")
        cps = f"{cp:.3f}" if cp else ""
        print(
            f"| {label} | {cps} | {g['pruned_ppl']:.3f} | {diff} | {same} | {g['prune_s']} | {g['wall_s']} | "
            f"{peak:.2f} |"
            if peak
            else f"| {label} | {cps} | {g['pruned_ppl']:.3f} | {diff} | {same} | {g['prune_s']} | {g['wall_s']} | |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", choices=("cpu", "all"), default="all", help="cpu: only the runs marked for the CPU")
    parser.add_argument("--work", type=Path, help="folder for the saved runs (default: a temporary one)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("CPU", "GPU"))
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-device-"))
    done = set()
    if args.out and args.out.exists():  # resumable: runs already in the file are skipped
        done = {json.loads(line)["label"] for line in args.out.read_text().splitlines()}
    todo = [(label, f) for label, f, on_cpu in RUNS if (on_cpu or args.only == "all") and label not in done]

    def emit(row: dict) -> None:
        print(json.dumps(row)[:4000], flush=True)
        if args.out:
            with args.out.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    for label, fields in todo:
        try:
            emit(one(label, fields, args.device, work))
        except Exception as exc:  # one failed run is a row too: the others go on
            emit({"label": label, "device": args.device, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            continue
        if label in SPEED and args.device.startswith("cuda"):
            folder = _folder(work, label)
            emit(speed(str(folder), args.device, work / f"speed-{folder.name}.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
