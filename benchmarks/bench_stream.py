"""Streaming vs in memory: wall time and peak host memory of `prunewise prune` runs.

Every run is a fresh ``python -m prunewise prune`` child under a parent of its own, so its peak
RSS (``getrusage(RUSAGE_CHILDREN)``) is that run's alone; the figures of the run record (wall
time, prune time, estimated peak, mode, mask digest) are read from its ``pruning.json``.

- ``bundled``: the README's main job on SmolLM2-135M (Wanda 50%, 32 x 512 calibration tokens,
  perplexity on 16384 tokens), ``--stream off`` and ``--stream on`` alternating, ``--repeat`` times;
- ``curve``: random-init LLaMA shapes from 0.16B to 3.5B parameters in bf16
  (:func:`prunewise.model.streaming.random_checkpoint`, the bundled tokenizer), Wanda and SparseGPT,
  4 x 128 calibration tokens, no evaluation, streamed and in memory;
- ``--limit GB`` runs every child under a cgroup v1 memory limit (root; the machine's own otherwise).

    python benchmarks/bench_stream.py bundled --repeat 2 --json benchmarks/results/stream_bundled.json
    python benchmarks/bench_stream.py curve --json benchmarks/results/stream_curve.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SHAPES = {  # name: (hidden, layers, intermediate, heads, kv heads)
    "0.16B": (768, 12, 2048, 12, 12),
    "0.41B": (1024, 24, 2816, 16, 16),
    "0.92B": (2048, 16, 5632, 32, 8),
    "3.5B": (3200, 26, 8640, 32, 32),
}


def measure(cmd: list[str], limit_gb: float | None = None) -> tuple[int, int]:
    """``(peak RSS bytes, exit code)`` of ``cmd`` run by a parent of its own (in a cgroup when asked)."""
    group = None
    if limit_gb:
        group = Path("/sys/fs/cgroup/memory") / f"prunewise-bench-{os.getpid()}"
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(int(limit_gb * 1e9)))
    probe = textwrap.dedent(f"""
        import os, resource, subprocess
        group = {str(group) if group else None!r}
        pre = (lambda: open(os.path.join(group, "cgroup.procs"), "w").write(str(os.getpid()))) if group else None
        rc = subprocess.run({cmd!r}, preexec_fn=pre, stdout=subprocess.DEVNULL).returncode
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, rc)
    """)
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    finally:
        if group is not None:
            group.rmdir()
    peak, rc = map(int, out.stdout.split()[-2:])
    return peak, rc


def prune_once(args: list[str], stream: str, out: Path, limit_gb: float | None, timings: bool = False) -> dict:
    """One ``prunewise prune`` child: its peak RSS and the figures of its record (``timings``: also
    the record's own timings and the engine's, GBLM's gradient pass among them)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "prunewise", "prune", *args, "--stream", stream, "--out", str(out), "-q"]
    peak, rc = measure(cmd, limit_gb)
    if rc != 0:
        return {"stream": stream, "rc": rc, "peak_rss_gb": peak / 1e9}
    rec = json.loads((out / "pruning.json").read_text())
    row = {
        "stream": stream,
        "mode": rec["memory"]["mode"],
        "peak_rss_gb": round(peak / 1e9, 3),
        "estimated_host_gb": rec["memory"]["estimated_host_gb"],
        "wall_s": round(rec["wall_s"], 2),
        "prune_s": round(rec["timings"]["prune_s"], 2),
        "mask_sha256": rec["pruning"]["mask_sha256"][:16],
        "weights_gb": rec["memory"]["weights_gb"],
    }
    if rec.get("pruned"):
        row["ppl"] = rec["pruned"]["ppl"]
    if timings:
        row["timings"] = {k: round(v, 2) for k, v in {**rec["pruning"]["timings"], **rec["timings"]}.items()}
    shutil.rmtree(out, ignore_errors=True)
    return row


def bundled(repeat: int, limit_gb: float | None, work: Path) -> list[dict]:
    args = [
        "--model",
        "smollm2-135m",
        "--metric",
        "wanda",
        "--sparsity",
        "0.5",
        "--nsamples",
        "32",
        "--seqlen",
        "512",
        "--eval-data",
        "wiki",
        "--max-tokens",
        "16384",
    ]
    rows = []
    for r in range(repeat):
        for stream in ("off", "on"):
            row = {"repeat": r, **prune_once(args, stream, work / "out", limit_gb)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def curve(sizes: list[str], metrics: list[str], limit_gb: float | None, work: Path) -> list[dict]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from prunewise.model.loading import bundled_model_dir
    from prunewise.model.streaming import random_checkpoint
    from prunewise.storage.cache import default_cache_dir

    tok = AutoTokenizer.from_pretrained(bundled_model_dir("smollm2-135m", default_cache_dir()))
    rows = []
    for size in sizes:
        d, layers, inter, heads, kv = SHAPES[size]
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=d,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            max_position_embeddings=2048,
        )
        src = work / f"llama-{size}"
        random_checkpoint(src, config, dtype=torch.bfloat16, tokenizer=tok, max_shard_bytes=2 * 10**9)
        for metric in metrics:
            for stream in ("off", "on"):
                args = [
                    "--model",
                    str(src),
                    "--metric",
                    metric,
                    "--sparsity",
                    "0.5",
                    "--nsamples",
                    "4",
                    "--seqlen",
                    "128",
                ]
                row = {"size": size, "metric": metric, **prune_once(args, stream, work / "out", limit_gb)}
                print(json.dumps(row), flush=True)
                rows.append(row)
        shutil.rmtree(src, ignore_errors=True)
    return rows


SCALE = {  # name: (hidden, layers, intermediate, heads, kv heads, vocab) — Llama 2 7B, 70B, Llama 3.1 405B
    "7B": (4096, 32, 11008, 32, 32, 32000),
    "70B": (8192, 80, 28672, 64, 8, 32000),
    "405B": (16384, 126, 53248, 128, 8, 128256),
}


def formula(shapes: dict, windows: int, eval_windows: int, seqlen: int) -> list[dict]:
    """:func:`prunewise.model.memory.estimate` on meta skeletons of these shapes (bf16): nothing is allocated."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from prunewise.model.memory import Workload, estimate

    rows = []
    for name, (d, layers, inter, heads, kv, vocab) in shapes.items():
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            max_position_embeddings=4096,
        )
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        for metric, hessians in (("wanda", False), ("sparsegpt", True)):
            work = Workload(
                windows=windows, seqlen=seqlen, hessians=hessians, eval_windows=eval_windows, eval_seqlen=seqlen
            )
            cpu, gpu = estimate(model, work, available=1 << 60), estimate(model, work, available=1 << 60, device="cuda")
            row = {
                "model": name,
                "metric": metric,
                "weights_gb": cpu.parts["weights"] / 1e9,
                "cpu_in_memory_gb": cpu.host_memory / 1e9,
                "cpu_streamed_gb": cpu.host_stream / 1e9,
                "cuda_host_streamed_gb": gpu.host_stream / 1e9,
                "cuda_device_gb": gpu.device / 1e9,
                **{f"{k}_gb": v / 1e9 for k, v in cpu.parts.items() if k != "weights"},
            }
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("bundled", "curve", "formula"))
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--sizes", default=",".join(SHAPES))
    p.add_argument("--metrics", default="wanda,sparsegpt")
    p.add_argument("--limit", type=float, help="cgroup v1 memory limit of every run, GB")
    p.add_argument("--work", type=Path, default=None, help="where checkpoints and outputs go (default: a temp folder)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="prunewise-bench-"))
    if a.what != "formula":
        work.mkdir(parents=True, exist_ok=True)
    if a.what == "formula":  # the papers' protocol: 128 x 2048 calibration, WikiText-2 test (166 x 2048)
        rows = formula({**SCALE, **{k: (*v, 49152) for k, v in SHAPES.items()}}, 128, 166, 2048)
    elif a.what == "bundled":
        rows = bundled(a.repeat, a.limit, work)
    else:
        rows = curve(a.sizes.split(","), a.metrics.split(","), a.limit, work)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
