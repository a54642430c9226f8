"""Prepared for a GPU machine (issue #13): the core passes on a random-init model with LLaMA-2-7B's
shapes, fp16, each against the floor of one dense pass of the calibration set, and the 2:4
speed-up. Nothing is downloaded: timing does not depend on the weights.

    python benchmarks/bench_gpu.py --device cuda --out benchmarks/results/gpu.jsonl            # 7B shapes
    python benchmarks/bench_gpu.py --device cuda --layers 8 --nsamples 32                     # a quicker cut
    python benchmarks/bench_gpu.py --device cpu --tiny                                        # a smoke run here

Each row: the pass, wall seconds, ratio to the floor measured in the same process, peak GPU memory
(``torch.cuda.max_memory_allocated``, reset per pass) and peak host RSS so far. Passes: the floor
(``replay``), magnitude, Wanda two-pass and single-pass, SparseGPT, AlphaPruning's spectra, OWL's
dense statistics, GBLM's gradients, then ``prunewise speed``'s figures for a 2:4 model against the
dense one (semi-structured kernels where the GPU has them). The model lives in host memory and each
block visits the device for its turn, as in every prunewise run. Every pass starts from the same
dense weights (restored between passes). The device, driver, torch version and GPU name go into
the first row.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from prunewise.allocation.esd import eigenvalues
from prunewise.allocation.planner import build_profile
from prunewise.allocation.statistics import dense_input_norms
from prunewise.model.blocks import BlockSource
from prunewise.model.layers import weight_matrix
from prunewise.model.sources import replay
from prunewise.prune.engine import prune_model
from prunewise.prune.gradients import collect_gradients
from prunewise.prune.masks import parse_pattern
from prunewise.run.job import backup_weights, restore_weights

LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=256,
    max_position_embeddings=512,
)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env.update(
            gpu=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
        )
        try:
            import subprocess

            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return env


def timed(label: str, fn, device: torch.device, floor: float | None) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    row = {"pass": label, "wall_s": round(wall, 2), "peak_rss_gb": round(rss_gb(), 2)}
    if floor:
        row["x_floor"] = round(wall / floor, 2)
    if device.type == "cuda":
        row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run of the script")
    parser.add_argument("--layers", type=int, default=None, help="blocks (default 32; 2 with --tiny)")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--skip", default="", help="passes to skip, comma-separated (e.g. gblm,speed)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    shapes = TINY if args.tiny else LLAMA2_7B
    layers = args.layers or (2 if args.tiny else 32)
    seqlen = min(args.seqlen, shapes["max_position_embeddings"])
    torch.manual_seed(0)
    config = LlamaConfig(**shapes, num_hidden_layers=layers)
    with torch.device(device):  # random init where it is fast, then the model lives on the host
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float16 if device.type == "cuda" else torch.float32
        )
    model.to("cpu").eval()
    model.config.use_cache = False
    calib = torch.randint(0, shapes["vocab_size"], (args.nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    source = BlockSource(model, device=device)
    dense = backup_weights(model, build_profile(source))
    names = [n for _, n, _ in source.all_linears()]
    rows = [
        {
            "pass": "environment",
            **environment(device),
            "layers": layers,
            "nsamples": args.nsamples,
            "seqlen": seqlen,
            "dtype": str(next(model.parameters()).dtype),
        }
    ]

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(json.dumps(rows[0]), flush=True)
    floor_row = timed("floor: one dense pass (replay)", lambda: replay(model, calib, device=str(device)), device, None)
    floor = floor_row["wall_s"]
    emit(floor_row)

    def prune(metric: str, mode: str = "two-pass", pattern: str = "unstructured", grads=None):
        def fn():
            prune_model(
                model,
                calib,
                metric=metric,
                allocation={n: 0.5 for n in names},
                pattern=parse_pattern(pattern),
                mode=mode,
                device=str(device),
                progress=False,
                grads=grads,
            )

        return fn

    passes = [
        ("magnitude 50%", prune("magnitude")),
        ("wanda 50% two-pass", prune("wanda")),
        ("wanda 50% single-pass", prune("wanda", "single-pass")),
        ("sparsegpt 50% two-pass", prune("sparsegpt")),
        (
            "alphapruning spectra",
            lambda: [eigenvalues(weight_matrix(m).to(device)) for _, _, m in source.all_linears()],
        ),
        ("owl dense statistics", lambda: dense_input_norms(source, calib, progress=False)),
    ]
    for label, fn in passes:
        if label.split()[0] in skip:
            continue
        emit(timed(label, fn, device, floor))
        restore_weights(model, dense)
    if "gblm" not in skip:
        for checkpointing in (True, False):
            label = f"gblm gradients (checkpointing={str(checkpointing).lower()})"
            try:
                emit(
                    timed(
                        label,
                        lambda c=checkpointing: collect_gradients(
                            model, calib, checkpointing=c, device=str(device), progress=False
                        ),
                        device,
                        floor,
                    )
                )
            except Exception as exc:  # e.g. the whole-model backward not fitting: say so, go on
                emit({"pass": label, "error": str(exc).splitlines()[0][:200]})
    if "speed" not in skip:
        from prunewise.evaluation.speed import measure

        pruned = copy.deepcopy(model)
        prune_model(
            pruned,
            None,
            metric="magnitude",
            allocation={n: 0.5 for n in names},
            pattern=parse_pattern("2:4"),
            device=str(device),
            progress=False,
        )
        report = measure(
            pruned,
            model,
            device=str(device),
            shapes=[(1, 128), (1, 2048), (8, 2048)][: 2 if args.tiny else 3],
            decode_batches=[1, 16],
            steps=8 if args.tiny else 64,
            tokens=[1, 16, 2048],
            repeat=3,
        )
        emit(
            {
                "pass": "speed 2:4 vs dense",
                "prefill": report.prefill,
                "decode": report.decode,
                "layers": report.layers,
                "notes": report.notes,
            }
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
