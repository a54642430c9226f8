"""Command line: ``prunewise prune | eval | sweep | report | speed | convert | list``.

A thin skin over :mod:`prunewise.run.pipeline`: parse, build a :class:`PruneConfig`, call the
library, print tables. Bad input gets one line on stderr and exit code 2 (``-v`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
from pathlib import Path

from .allocation.statistics import STATISTICS
from .config import DTYPE_CHOICES, PruneConfig, default_device
from .errors import PrunewiseError
from .evaluation.speed import measure, tables
from .model.assets import BUNDLED
from .model.conversion import convert_gguf
from .model.loading import TORCH_DTYPES, load_model, load_sparse
from .model.malloc import keep_freed_memory
from .model.memory import STREAM_CHOICES
from .prune.engine import MODES, PROPAGATE
from .registry import ALLOCATORS, METRICS, suggest
from .report import write_report
from .report.plots import save_profile_plot
from .report.tables import block_table, layer_table, ppl_table, zero_shot_columns
from .run.evaluate import EvalOptions, evaluate_run, load_dense_source
from .run.export import EXPORTERS
from .run.pipeline import RunOptions, run
from .run.record import RECORD, RunRecord
from .run.results import read_results
from .run.trials import Executor
from .sparse.checkpoint import is_sparse
from .sparse.kernel import ext, with_kernel
from .storage.cache import default_cache_dir, resolve_cache_dir
from .sweep import Sweep, SweepOptions, label, run_key, run_sweep
from .version import __version__

log = logging.getLogger("prunewise")

# PruneConfig fields settable from the command line (dest name == field name).
CONFIG_FIELDS = [f.name for f in dataclasses.fields(PruneConfig)]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-layer table")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"converted models, token ids (default: $PRUNEWISE_CACHE or {default_cache_dir()})",
    )
    p.add_argument(
        "--trust-remote-code",
        dest="trust_remote_code",
        action="store_true",
        help="run Python code shipped with the model (auto_map); off by default, never prompted",
    )


def _executor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="where runs execute: this process (default) or Ray workers (pip install 'prunewise[ray]')",
    )
    p.add_argument(
        "--workers", type=int, help="Ray workers (default: one per GPU with --device cuda, else per --threads CPUs)"
    )
    p.add_argument("--address", help="a running Ray cluster ('auto' finds the local one; default: start one)")
    p.add_argument("--threads", type=int, help="CPUs (and torch threads) per Ray worker (default 1)")


def _executor(args: argparse.Namespace) -> Executor:
    return Executor(
        args.executor, {k: getattr(args, k) for k in ("workers", "address", "threads") if getattr(args, k) is not None}
    )


def _task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tasks",
        help="zero-shot lm-eval tasks, comma-separated, or a preset: paper (Wanda's 7), atp "
        "(PIQA for RTE); e.g. boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa",
    )
    p.add_argument(
        "--include-path", dest="include_path", help="folder of local lm-eval task YAML files (offline tasks)"
    )
    p.add_argument("--limit", type=float, help="at most this many examples per task (or a fraction < 1)")


def _run_args(p: argparse.ArgumentParser, grid: bool) -> None:
    """The run settings of ``prune``; with ``grid`` the four axes take lists (``sweep``)."""
    d = PruneConfig()
    many = {"nargs": "+"} if grid else {}
    p.add_argument(
        "--model", help=f"HF folder, .gguf file, hub id, or a bundled model: {', '.join(BUNDLED)} (default {d.model})"
    )
    p.add_argument("--metric", **many, help=f"name[:key=value,...] (default {d.metric}; see 'prunewise list')")
    p.add_argument("--allocator", **many, help=f"name[:key=value,...] (default {d.allocator})")
    p.add_argument("--sparsity", type=float, **many, help="global target in [0, 1) (default 0.5; N/M for N:M)")
    p.add_argument(
        "--pattern",
        **many,
        help="unstructured, unstructured:group=row|matrix, or N:M such as 2:4 (default unstructured)",
    )
    p.add_argument("--calib", help="calibration text: wiki, file:PATH, c4, wikitext2 (default wiki)")
    p.add_argument("--nsamples", type=int, help=f"calibration windows (default {d.nsamples})")
    p.add_argument("--seqlen", type=int, help=f"tokens per calibration window (default {d.seqlen})")
    p.add_argument("--seed", type=int, help=f"calibration sampling seed (default {d.seed})")
    p.add_argument(
        "--mode", choices=MODES, help="two-pass: papers' protocol (default); single-pass: one pass per block"
    )
    p.add_argument(
        "--propagate", choices=PROPAGATE, help="next block's inputs from the pruned (default) or dense block"
    )
    p.add_argument(
        "--batch-size", dest="batch_size", type=int, help=f"windows per forward pass (default {d.batch_size})"
    )
    p.add_argument("--device", help="cpu or cuda[:N] (default $PRUNEWISE_DEVICE, else cpu)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="model dtype (default auto: as stored; fp32 for GGUF)")
    p.add_argument(
        "--stream",
        choices=STREAM_CHOICES,
        help="read each decoder block from the checkpoint when its "
        "turn comes (on), load the model whole (off), or stream when it would not fit in memory "
        "(auto, default)",
    )
    p.add_argument(
        "--blocks-path", dest="blocks_path", help="dotted path of the decoder-block ModuleList, e.g. model.layers"
    )
    p.add_argument(
        "--eval-data", dest="eval_data", help="evaluate dense and pruned perplexity on: wiki, file:PATH, wikitext2, c4"
    )
    p.add_argument(
        "--no-eval", action="store_true", help="skip perplexity (e.g. when rerunning a record that had --eval-data)"
    )
    p.add_argument("--eval-seqlen", dest="eval_seqlen", type=int, help="evaluation window (default: --seqlen)")
    p.add_argument(
        "--max-tokens", "--eval-tokens", dest="max_tokens", type=int, help="evaluate on the first N tokens only"
    )
    _task_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunewise", description="Post-training pruning of causal language models.")
    parser.add_argument("--version", action="version", version=f"prunewise {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and save it", description="Prune a model block by block.")
    p.add_argument(
        "--config", type=Path, help="rerun from a run record (pruning.json or its folder); other flags override it"
    )
    _run_args(p, grid=False)
    p.add_argument("--out", type=Path, help="output folder for the pruned checkpoint and pruning.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument(
        "--format",
        default="safetensors",
        help=f"checkpoint format ({', '.join(EXPORTERS.names())}; default safetensors)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the per-layer targets and exit without pruning")
    _executor_args(p)
    _common(p)

    w = sub.add_parser(
        "sweep",
        help="a grid of runs (lists where prune takes one value), resumable",
        description="Run every combination of the listed metrics, allocators, sparsities and "
        "patterns on one model; one JSON line per run in OUT/results.jsonl. Finished runs are "
        "skipped when the sweep is run again.",
    )
    w.add_argument(
        "--config",
        type=Path,
        help="TOML file with the same keys (lists for metric, allocator, sparsity, pattern); flags override it",
    )
    _run_args(w, grid=True)
    w.add_argument("--out", type=Path, required=True, help="sweep folder: results.jsonl, sweep.json, runs/ with --save")
    w.add_argument("--save", action="store_true", help="also save every pruned checkpoint under OUT/runs/")
    w.add_argument("--retry-failed", action="store_true", help="run failed runs again (default: keep their error)")
    w.add_argument("--dry-run", action="store_true", help="list the runs and which are finished; run nothing")
    _executor_args(w)
    _common(w)

    r = sub.add_parser("report", help="report.md with tables and plots from a sweep or a folder of runs")
    r.add_argument("dir", type=Path, help="a sweep folder (results.jsonl) or a folder of prunewise runs")
    r.add_argument("--out", type=Path, help="where report.md and the PNGs go (default: DIR)")
    r.add_argument("--notes", type=Path, help="markdown inserted under the report's header (your conclusions)")
    _common(r)

    e = sub.add_parser("eval", help="perplexity of a model (dense vs pruned for a prunewise run folder)")
    e.add_argument(
        "--model", required=True, help="HF folder (e.g. a prunewise run), .gguf file, hub id or smollm2-135m"
    )
    e.add_argument(
        "--data", default="wiki", help="perplexity on: wiki, file:PATH, wikitext2, c4, or none (default wiki)"
    )
    e.add_argument("--seqlen", type=int, default=None, help="window length (default: the run's eval seqlen, else 2048)")
    e.add_argument(
        "--max-tokens", dest="max_tokens", type=int, default=None, help="evaluate on the first N tokens only"
    )
    e.add_argument("--batch-size", dest="batch_size", type=int, default=1)
    e.add_argument("--device", default=None, help="cpu or cuda[:N] (default $PRUNEWISE_DEVICE, else cpu)")
    e.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    e.add_argument(
        "--stream",
        choices=STREAM_CHOICES,
        default="auto",
        help="read each block from the checkpoint (on), load whole (off), or stream when it would not fit (auto)",
    )
    e.add_argument("--no-dense", action="store_true", help="do not evaluate the dense source model of a run")
    _task_args(e)
    _common(e)

    sp = sub.add_parser(
        "speed",
        help="inference speed of a pruned run against its dense source",
        description="Prefill and decode tokens/s of a prunewise run's dense source, its pruned model run "
        "densely and (CPU) on the sparse kernel, timed in turns; per-layer matmul times with the bytes the "
        "kernel reads against the memory bandwidth; checkpoint sizes; 2:4 layers through sparse kernels on "
        "GPUs that have them.",
    )
    sp.add_argument("--model", required=True, help="a prunewise run folder (or any model: then measured alone)")
    sp.add_argument("--device", default=None, help="cpu or cuda[:N] (default $PRUNEWISE_DEVICE, else cpu)")
    sp.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="load both models in this dtype (default: as stored)"
    )
    sp.add_argument("--shapes", default="1x128,1x512,4x512", help="prefill shapes, BATCHxLENGTH, comma-separated")
    sp.add_argument("--decode", default="1,16", help="decode batch sizes, comma-separated")
    sp.add_argument("--steps", type=int, default=32, help="tokens generated per decode measurement")
    sp.add_argument(
        "--tokens", default="1,8,2048", help="rows of the per-layer matmuls, comma-separated (default 1,8,2048)"
    )
    sp.add_argument(
        "--models",
        default=",".join(SPEED_MODELS),
        help="which to time, comma-separated: source (the dense model the run pruned), pruned (its weights run "
        "densely), kernel (on the sparse CPU kernel); each left out is never loaded, which saves its memory "
        "(a 1.5B model in fp32 holds 7 GB per dense copy). Default: all three",
    )
    sp.add_argument("--no-kernel", action="store_true", help="do not measure the pruned model on the sparse CPU kernel")
    sp.add_argument("--repeat", type=int, default=3, help="timed runs per figure (median)")
    sp.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    _common(sp)

    cv = sub.add_parser(
        "convert",
        help="a .gguf file to a safetensors folder, one tensor at a time",
        description="Dequantize a GGUF file tensor by tensor into safetensors shards (peak memory "
        "about the largest tensor), with its config and tokenizer: the folder loads with "
        "from_pretrained and streams with --stream on.",
    )
    cv.add_argument("source", type=Path, help="the .gguf file")
    cv.add_argument("out", type=Path, help="the folder to write")
    cv.add_argument(
        "--dtype",
        choices=tuple(TORCH_DTYPES),
        default="float32",
        help="weights' dtype (default float32: exactly transformers' dequantization; bfloat16 halves the disk)",
    )
    cv.add_argument("--overwrite", action="store_true", help="replace an existing OUT folder")
    _common(cv)

    lst = sub.add_parser("list", help="registered metrics, allocators and patterns")
    _common(lst)
    return parser


def _config_from_args(args: argparse.Namespace) -> tuple[PruneConfig, dict | None]:
    """The run's config, and the ``source`` section of the record it reruns (``--config``) when the
    model is to be checked against it (no ``--model`` or ``--dtype`` given)."""
    base: dict = {}
    expect = None
    if args.config is not None:
        rec = RunRecord.read(args.config, strict=True)
        base = dict(rec.config)
        if args.model is None and args.dtype is None:
            expect = rec.source
            if rec.source.get("kind") in ("folder", "gguf"):  # where it was, not the path as typed then
                base["model"] = rec.source["path"]
    for name in CONFIG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            base[name] = value
    if getattr(args, "no_eval", False):
        base["eval_data"] = None
    return PruneConfig.from_dict(base).validate(), expect


# The parts of a run's wall time, in the order they happen.
TIMED = (
    ("loading and calibration data", "load_s"),
    ("allocation", "plan_s"),
    ("dense evaluation", "dense_eval_s"),
    ("pruning", "prune_s"),
    ("perplexity", "eval_s"),
    ("zero-shot", "zero_shot_s"),
)


def cmd_prune(args: argparse.Namespace) -> int:
    config, expect = _config_from_args(args)
    if args.out is None and not args.dry_run:
        print("no --out given: the pruned model will not be saved", flush=True)
    output = run(
        config,
        RunOptions(
            out=args.out,
            overwrite=args.overwrite,
            cache_dir=args.cache_dir,
            progress=not args.quiet,
            dry_run=args.dry_run,
            format=args.format,
            on_preview=_print_preview,
            trust_remote_code=args.trust_remote_code,
            expect=expect,
            executor=_executor(args),
        ),
    )
    rec = output.record
    if args.out is not None and not args.dry_run:
        save_profile_plot(rec, args.out)
    search = rec.search
    if search:
        best = min(c["ppl"] for c in search["curve"])
        print(
            f"{config.allocator_spec[0]}: {search['parameter']}={search['chosen']:g} chosen from "
            f"{len(search['curve'])} "
            f"trials by perplexity on {search['heldout']['windows']} held-out calibration windows "
            f"({best:.3f}; {search['wall_s']:.1f} s)"
        )
    auto = (rec.allocation or {}).get("auto")
    if auto:
        print(
            f"auto: {auto['chosen']} chosen from {len(auto['candidates'])} candidates ({auto['trials']} trial "
            f"prunings) by perplexity on {auto['heldout']['windows']} held-out calibration windows "
            f"({auto['wall_s']:.1f} s):"
        )
        for row in auto["candidates"]:
            mark = "*" if row["allocator"] == auto["chosen"] else " "
            print(
                f"  {mark} {row['allocator']:<13} held-out ppl {row['heldout_ppl']:10.3f}   "
                f"block sparsity {row['min']:.3f} to {row['max']:.3f}"
            )
    if args.dry_run:
        layers = rec.allocation["layers"]
        print(_memory_line(rec.memory))
        print(f"allocation '{config.allocator}' at target {config.target:g} ({len(layers)} layers):")
        print(block_table(layers))
        return 0
    pr = rec.pruning
    if args.verbose:
        print(layer_table(pr["layers"]))
    elif not args.quiet and len({round(b, 9) for b in rec.blocks}) > 1:  # a uniform table adds nothing
        print(block_table(pr["layers"]))
    t = rec.timings
    parts = [f"{label} {t[key]:.1f} s" for label, key in TIMED if key in t]
    print(
        f"pruned {len(pr['layers'])} linear layers with {config.metric} / {config.allocator} / {config.pattern}: "
        f"sparsity {pr['sparsity']:.6f} (target {pr['target']:g}); {rec.wall_s:.1f} s in all "
        f"({', '.join(parts)}), peak RSS {rec.memory['peak_rss_gb']:.2f} GB "
        f"({'streamed' if rec.memory.get('mode') == 'stream' else 'in memory'}, "
        f"estimated {rec.memory.get('estimated_host_gb', 0):.2f} GB)"
    )
    if rec.dense:
        print(ppl_table([("dense", rec.dense), (f"pruned ({config.metric})", rec.pruned)]))
    if rec.zero_shot:
        print(zero_shot_columns([("dense", rec.zero_shot["dense"]), ("pruned", rec.zero_shot["pruned"])]))
    print(f"saved to {args.out}" if args.out is not None else "not saved (no --out given)")
    return 0


def _memory_line(memory: dict) -> str:
    """A dry run's memory estimate: the mode and the peaks (:mod:`prunewise.memory`)."""
    mode = "streamed from the checkpoint" if memory["mode"] == "stream" else "held in memory"
    avail = memory.get("available_host_gb")
    line = (
        f"memory: the model will be {mode}; estimated peak host memory {memory['estimated_host_gb']:.2f} GB "
        f"(whole model in memory {memory['weights_gb']:.2f} GB of weights; available "
        f"{'unknown' if avail is None else f'{avail:.2f} GB'})"
    )
    if memory.get("estimated_device_gb") is not None:
        line += f", device {memory['estimated_device_gb']:.2f} GB"
    return line


def _print_preview(works) -> None:
    """What a dry run is about to compute, before it computes it."""
    if not works:
        print("dry run: the allocation needs no calibration pass (seconds)", flush=True)
        return
    print("dry run: the allocation first computes", flush=True)
    for work in works:
        print(work.line(), flush=True)
    if any(w.seconds for w in works):
        print(
            "(rough estimates from one sample timed through block 0; computed statistics are cached, "
            "so the real run and later dry runs reuse them; Ctrl-C to stop)",
            flush=True,
        )


def cmd_eval(args: argparse.Namespace) -> int:
    out = evaluate_run(
        args.model,
        EvalOptions(
            data=args.data,
            seqlen=args.seqlen,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            tasks=args.tasks,
            include_path=args.include_path,
            limit=args.limit,
            dense=not args.no_dense,
            cache_dir=args.cache_dir,
            progress=not args.quiet,
            trust_remote_code=args.trust_remote_code,
            stream=args.stream,
        ),
    )
    if out.perplexity:
        print(ppl_table(out.perplexity))
    if out.zero_shot:
        print(zero_shot_columns(out.zero_shot))
    return 0


def _ints(text: str, what: str) -> list:
    """Comma-separated positive integers, or ``AxB`` pairs of them."""
    try:
        values = [
            tuple(int(v) for v in item.split("x")) if "x" in item else int(item)
            for item in text.split(",")
            if item.strip()
        ]
    except ValueError:
        raise PrunewiseError(f"{what}: cannot read '{text}'") from None
    if not values or any(v < 1 for item in values for v in (item if isinstance(item, tuple) else (item,))):
        raise PrunewiseError(f"{what}: expected positive integers, got '{text}'")
    return values


SPEED_MODELS = ("source", "pruned", "kernel")


def speed_models(text: str) -> set[str]:
    """``--models`` of ``prunewise speed``: names from :data:`SPEED_MODELS`, at least one of them pruned."""
    names = {n.strip().lower() for n in text.split(",") if n.strip()}
    for name in sorted(names - set(SPEED_MODELS)):
        raise PrunewiseError(
            f"models: unknown '{name}'{suggest(name, list(SPEED_MODELS))} (choices: {', '.join(SPEED_MODELS)})"
        )
    if not names & {"pruned", "kernel"}:
        raise PrunewiseError(f"models: '{text}' times nothing pruned; add pruned or kernel")
    return names


def cmd_speed(args: argparse.Namespace) -> int:
    shapes = _ints(args.shapes, "shapes")
    if any(not isinstance(s, tuple) or len(s) != 2 for s in shapes):
        raise PrunewiseError(f"shapes: expected BATCHxLENGTH items, got '{args.shapes}'")
    batches = _ints(args.decode, "decode")
    _ints(args.tokens, "tokens")
    for name in ("steps", "repeat"):
        if getattr(args, name) < 1:
            raise PrunewiseError(f"{name}: must be at least 1, got {getattr(args, name)}")
    want = speed_models(args.models) - ({"kernel"} if args.no_kernel else set())
    device = args.device or default_device()
    PruneConfig(device=device).validate()  # cuda available?
    on_cpu = device.split(":")[0] == "cpu"
    cache_dir = resolve_cache_dir(args.cache_dir)
    path = Path(args.model).expanduser()
    packed_folder = path.is_dir() and is_sparse(path)
    dense = None
    if "source" in want and (path / RECORD).is_file():
        dense, _ = load_dense_source(RunRecord.read(path), args.dtype, cache_dir, args.trust_remote_code)
    use_kernel = on_cpu and "kernel" in want
    # The pruned model run densely: timed when asked for, on a GPU (its 2:4 layers), or when it is the only
    # dense model; loaded also to be packed (a dense-format run), then dropped.
    timed_pruned = "pruned" in want or not on_cpu or dense is None
    pruned = None
    if timed_pruned or (use_kernel and not packed_folder):
        pruned, _, _ = load_model(args.model, args.dtype, cache_dir, trust_remote_code=args.trust_remote_code)
    sparse = None
    if use_kernel:
        if packed_folder:  # as pw.load gives it
            dtype = TORCH_DTYPES.get(args.dtype, "auto")
            sparse = load_sparse(path, dtype=dtype, trust_remote_code=args.trust_remote_code)
        else:
            sparse = with_kernel(pruned) if ext() is not None else None
    if not timed_pruned:
        pruned = None  # the packed copy shares its other tensors; its dense linear weights go
    report = measure(
        pruned,
        dense,
        sparse=sparse,
        device=device,
        shapes=shapes,
        decode_batches=batches,
        steps=args.steps,
        tokens=_ints(args.tokens, "tokens"),
        repeat=args.repeat,
    )
    print(tables(report))
    if args.json is not None:
        args.json.write_text(json.dumps(dataclasses.asdict(report), indent=1), encoding="utf-8")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    values = {name: getattr(args, name, None) for name in CONFIG_FIELDS}
    if args.no_eval:
        values["eval_data"] = None
    if args.config is not None:
        sweep = Sweep.from_toml(args.config, values)
    else:
        sweep = Sweep.from_dict({k: v for k, v in values.items() if v is not None})
    runs, skipped = sweep.expand()
    for combo, reason in skipped:
        print(f"skipped {combo['metric']} / {combo['allocator']} / {combo['pattern']}: {reason}")
    if args.dry_run:
        status = {row["key"]: row.get("status") for row in read_results(args.out)}
        for config in runs:
            print(f"{run_key(config)}  {status.get(run_key(config), 'to do'):<6}  {label(config)}")
        print(f"{len(runs)} runs, {sum(run_key(c) in status for c in runs)} already in {args.out}")
        return 0
    summary = run_sweep(
        sweep,
        args.out,
        SweepOptions(
            cache_dir=args.cache_dir,
            progress=not args.quiet,
            save=args.save,
            retry_failed=args.retry_failed,
            trust_remote_code=args.trust_remote_code,
            executor=_executor(args),
        ),
    )
    print(
        f"{summary.ran} runs finished, {summary.failed} failed, {summary.skipped_done} already done "
        f"({len(runs)} in the grid) in {summary.wall_s:.1f} s; results in {summary.out / 'results.jsonl'}"
    )
    print(f"report: prunewise report {summary.out}")
    return 1 if summary.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    path = write_report(args.dir, args.out, args.notes)
    print(f"wrote {path}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    out = convert_gguf(
        args.source, args.out, dtype=TORCH_DTYPES[args.dtype], overwrite=args.overwrite, progress=not args.quiet
    )
    print(f"converted {args.source} to {out} ({args.dtype})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    def hyper(entry) -> str:
        h = entry.hyperparameters()
        return ", ".join(f"{k}={v}" for k, v in h.items()) or "-"

    print("metrics (--metric NAME[:key=value,...]):")
    width = max(len(",".join(e.needs) or "-") for e in METRICS)
    for e in METRICS:
        print(f"  {e.name:<12} {e.kind:<7} needs={','.join(e.needs) or '-':<{width}} hyper: {hyper(e)}")
        print(f"  {'':<12} {e.summary}")
        print(f"  {'':<12} paper: {e.paper}")
    print("allocators (--allocator NAME[:key=value,...]):")
    width = max(len(",".join(e.needs) or "-") for e in ALLOCATORS)
    for e in ALLOCATORS:
        nm = "uniform N:M" if e.baseline else "mixed N:M per block" if e.nm else "unstructured only"
        print(f"  {e.name:<12} needs={','.join(e.needs) or '-':<{width}} {nm:<19} hyper: {hyper(e)}")
        print(f"  {'':<12} {e.summary}")
        print(f"  {'':<12} paper: {e.paper}")
    print("patterns (--pattern):")
    print(
        "  unstructured              each metric's comparison group "
        "(magnitude: matrix, wanda: row, sparsegpt: 128-column blocks)"
    )
    print("  unstructured:group=row    compare weights within each output row")
    print("  unstructured:group=matrix compare weights across the whole matrix")
    print("  N:M (e.g. 2:4, 4:8)       exactly N zeros in every M consecutive inputs of a row; sparsity N/M")
    print("statistics (what metrics and allocators name in needs):")
    print("  input_norm, hessian       collected by hooks in the block loop while a block is pruned")
    for e in STATISTICS:
        print(f"  {e.name:<25} {e.summary}")
    print("formats (--format):")
    for e in EXPORTERS:
        print(f"  {e.name:<25} {e.summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        format="%(levelname)s %(name)s: %(message)s",
        level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
    )
    if not args.verbose:
        logging.getLogger("prunewise").setLevel(logging.WARNING if args.quiet else logging.INFO)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            if args.quiet:
                hf_logging.disable_progress_bar()
        except ImportError:
            pass
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    keep_freed_memory()
    commands = {
        "prune": cmd_prune,
        "eval": cmd_eval,
        "sweep": cmd_sweep,
        "report": cmd_report,
        "speed": cmd_speed,
        "list": cmd_list,
        "convert": cmd_convert,
    }
    previous = signal.signal(signal.SIGTERM, _terminated)  # a job scheduler's stop: clean up as for Ctrl-C
    try:
        return commands[args.command](args)
    except (PrunewiseError, ValueError) as exc:
        if args.verbose:
            raise
        print(f"prunewise: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunewise: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
