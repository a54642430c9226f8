"""Command line: ``prunewise prune | eval | list``.

A thin skin over :mod:`prunewise.pipeline`: parse, build a :class:`PruneConfig`, call the
library, print tables. Bad input gets one line on stderr and exit code 2 (``-v`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from . import __version__
from .config import DTYPES, MODES, PROPAGATE, PruneConfig, default_cache_dir
from .errors import PrunewiseError
from .registry import ALLOCATORS, METRICS

log = logging.getLogger("prunewise")

# PruneConfig fields settable from the command line (dest name == field name).
CONFIG_FIELDS = [f.name for f in dataclasses.fields(PruneConfig)]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-layer table")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"converted models, token ids (default: $PRUNEWISE_CACHE or {default_cache_dir()})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunewise", description="Post-training pruning of causal language models.")
    parser.add_argument("--version", action="version", version=f"prunewise {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and save it", description="Prune a model block by block.")
    d = PruneConfig()
    p.add_argument("--config", type=Path, help="rerun from a run record (pruning.json or its folder); other flags override it")
    p.add_argument("--model", help=f"HF folder, .gguf file, hub id, or 'smollm2-135m' (default {d.model})")
    p.add_argument("--metric", help=f"name[:key=value,...] (default {d.metric}; see 'prunewise list')")
    p.add_argument("--allocator", help=f"name[:key=value,...] (default {d.allocator})")
    p.add_argument("--sparsity", type=float, help="global target in [0, 1) (default 0.5; N/M for N:M)")
    p.add_argument("--pattern", help="unstructured, unstructured:group=row|matrix, or N:M such as 2:4 (default unstructured)")
    p.add_argument("--calib", help="calibration text: wiki, file:PATH, c4, wikitext2 (default wiki)")
    p.add_argument("--nsamples", type=int, help=f"calibration windows (default {d.nsamples})")
    p.add_argument("--seqlen", type=int, help=f"tokens per calibration window (default {d.seqlen})")
    p.add_argument("--seed", type=int, help=f"calibration sampling seed (default {d.seed})")
    p.add_argument("--mode", choices=MODES, help="two-pass: papers' protocol (default); single-pass: one pass per block")
    p.add_argument("--propagate", choices=PROPAGATE, help="next block's inputs from the pruned (default) or dense block")
    p.add_argument("--batch-size", dest="batch_size", type=int, help=f"windows per forward pass (default {d.batch_size})")
    p.add_argument("--device", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, help="model dtype (default auto: as stored; fp32 for GGUF)")
    p.add_argument("--blocks-path", dest="blocks_path", help="dotted path of the decoder-block ModuleList, e.g. model.layers")
    p.add_argument("--eval-data", dest="eval_data", help="evaluate dense and pruned perplexity on: wiki, file:PATH, wikitext2, c4")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation (e.g. when rerunning a record that had --eval-data)")
    p.add_argument("--eval-seqlen", dest="eval_seqlen", type=int, help="evaluation window (default: --seqlen)")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, help="evaluate on the first N tokens only")
    p.add_argument("--out", type=Path, help="output folder for the pruned checkpoint and pruning.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--dry-run", action="store_true", help="print the per-layer targets and exit without pruning")
    _common(p)

    e = sub.add_parser("eval", help="perplexity of a model (dense vs pruned for a prunewise run folder)")
    e.add_argument("--model", required=True, help="HF folder (e.g. a prunewise run), .gguf file, hub id or smollm2-135m")
    e.add_argument("--data", default="wiki", help="wiki, file:PATH, wikitext2, c4 (default wiki)")
    e.add_argument("--seqlen", type=int, default=None, help="window length (default: the run's eval seqlen, else 2048)")
    e.add_argument("--max-tokens", dest="max_tokens", type=int, default=None, help="evaluate on the first N tokens only")
    e.add_argument("--batch-size", dest="batch_size", type=int, default=1)
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", choices=DTYPES, default="auto")
    e.add_argument("--no-dense", action="store_true", help="do not evaluate the dense source model of a run")
    _common(e)

    lst = sub.add_parser("list", help="registered metrics, allocators and patterns")
    _common(lst)
    return parser


def _config_from_args(args: argparse.Namespace) -> PruneConfig:
    base: dict = {}
    if args.config is not None:
        from .io import read_record

        base = dict(read_record(args.config)["config"])
    for name in CONFIG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            base[name] = value
    if getattr(args, "no_eval", False):
        base["eval_data"] = None
    return PruneConfig.from_dict(base).validate()


def _fmt_ppl(entry: dict | None) -> str:
    return f"{entry['ppl']:.3f}" if entry else "-"


def _ppl_table(rows: list[tuple[str, dict]]) -> str:
    lines = [f"{'model':<28} {'perplexity':>11}  {'data':<10} {'split':<12} {'seqlen':>6} {'tokens':>8}"]
    for label, e in rows:
        lines.append(f"{label:<28} {e['ppl']:>11.3f}  {e['data']:<10} {e['split']:<12} {e['seqlen']:>6} {e['tokens']:>8}")
    return "\n".join(lines)


def _block_table(layers: list[dict]) -> str:
    blocks: dict[int, list[dict]] = {}
    for layer in layers:
        blocks.setdefault(layer["block"], []).append(layer)
    lines = [f"{'block':>5} {'layers':>6} {'params':>10} {'target':>8} {'achieved':>9}"]
    for b, ls in sorted(blocks.items()):
        n = sum(x["shape"][0] * x["shape"][1] for x in ls)
        tgt = sum(x["target"] * x["shape"][0] * x["shape"][1] for x in ls) / n
        ach = sum(x["zeros"] for x in ls) / n if all("zeros" in x for x in ls) else float("nan")
        lines.append(f"{b:>5} {len(ls):>6} {n:>10} {tgt:>8.4f} {ach:>9.4f}")
    return "\n".join(lines)


def _layer_table(layers: list[dict]) -> str:
    lines = [f"{'layer':<40} {'shape':>12} {'target':>8} {'achieved':>9}"]
    for x in layers:
        lines.append(f"{x['name']:<40} {'x'.join(map(str, x['shape'])):>12} {x['target']:>8.4f} {x['achieved']:>9.4f}")
    return "\n".join(lines)


def cmd_prune(args: argparse.Namespace) -> int:
    from .pipeline import run

    config = _config_from_args(args)
    output = run(config, out=args.out, overwrite=args.overwrite, cache_dir=args.cache_dir,
                 progress=not args.quiet, dry_run=args.dry_run)
    rec = output.record
    search = rec["allocation"].get("search")
    if search:
        best = min(c["ppl"] for c in search["curve"])
        print(f"{config.allocator_spec[0]}: {search['parameter']}={search['chosen']:g} chosen from {len(search['curve'])} "
              f"trials by perplexity on {search['heldout']['windows']} held-out calibration windows "
              f"({best:.3f}; {search['wall_s']:.1f} s)")
    if args.dry_run:
        layers = rec["allocation"]["layers"]
        print(f"allocation '{config.allocator}' at target {config.target:g} ({len(layers)} layers):")
        print(_block_table(layers))
        return 0
    pr = rec["pruning"]
    if args.verbose:
        print(_layer_table(pr["layers"]))
    elif not args.quiet:
        print(_block_table(pr["layers"]))
    print(f"pruned {len(pr['layers'])} linear layers with {config.metric} / {config.allocator} / {config.pattern}: "
          f"sparsity {pr['sparsity']:.6f} (target {pr['target']:g}) in {pr['wall_s']:.1f} s, "
          f"peak RSS {rec['memory']['peak_rss_gb']:.2f} GB")
    if "dense" in rec:
        print(_ppl_table([("dense", rec["dense"]), (f"pruned ({config.metric})", rec["pruned"])]))
    print(f"saved to {args.out}" if args.out is not None else "not saved (no --out given)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .io import RECORD, read_record
    from .models import load_model
    from .pipeline import check_context

    record = None
    path = Path(args.model).expanduser()
    if path.is_dir() and (path / RECORD).is_file():
        record = read_record(path)
    seqlen = args.seqlen
    if seqlen is None and record is not None:
        cfg = record["config"]
        seqlen = cfg.get("eval_seqlen") or cfg.get("seqlen")
    seqlen = seqlen or 2048
    if seqlen < 2:
        raise PrunewiseError(f"seqlen: must be at least 2, got {seqlen}")
    kw = dict(max_tokens=args.max_tokens, batch_size=args.batch_size, device=args.device,
              cache_dir=args.cache_dir or default_cache_dir(), progress=not args.quiet)
    model, tok, _ = load_model(args.model, args.dtype, args.cache_dir)
    check_context(model, "seqlen", seqlen)
    if args.device != "cpu":
        model.to(args.device)
    result = evaluate(model, tok, args.data, seqlen, **kw)
    del model
    rows = []
    if record is not None and not args.no_dense:
        dense = record.get("dense")
        same = dense and all(dense.get(k) == result[k] for k in ("data", "split", "seqlen", "tokens"))
        if not same:
            source = record.get("source", {})
            src = source["path"] if source.get("kind") in ("folder", "gguf") else record["config"]["model"]
            dmodel, dtok, _ = load_model(src, args.dtype, args.cache_dir)
            if args.device != "cpu":
                dmodel.to(args.device)
            dense = evaluate(dmodel, dtok, args.data, seqlen, **kw)
        rows.append(("dense " + str(record["config"]["model"]), dense))
        cfg = record["config"]
        rows.append((f"pruned ({cfg['metric']}, {record['pruning']['sparsity']:.3f})", result))
    else:
        rows.append((str(args.model), result))
    print(_ppl_table(rows))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    def hyper(entry) -> str:
        h = entry.hyperparameters()
        return ", ".join(f"{k}={v}" for k, v in h.items()) or "-"

    print("metrics (--metric NAME[:key=value,...]):")
    for e in METRICS:
        print(f"  {e.name:<12} {e.extra.get('kind', 'score'):<7} needs={','.join(e.needs) or '-':<14} hyper: {hyper(e)}")
        print(f"  {'':<12} {e.summary}")
        print(f"  {'':<12} paper: {e.paper}")
    print("allocators (--allocator NAME[:key=value,...]):")
    for e in ALLOCATORS:
        nm = "uniform N:M" if e.name == "uniform" else "mixed N:M per block" if e.extra.get("nm") else "unstructured only"
        print(f"  {e.name:<12} needs={','.join(e.needs) or '-':<23} {nm:<19} hyper: {hyper(e)}")
        print(f"  {'':<12} {e.summary}")
        print(f"  {'':<12} paper: {e.paper}")
    print("patterns (--pattern):")
    print("  unstructured              each metric's comparison group (magnitude: matrix, wanda: row, sparsegpt: 128-column blocks)")
    print("  unstructured:group=row    compare weights within each output row")
    print("  unstructured:group=matrix compare weights across the whole matrix")
    print("  N:M (e.g. 2:4, 4:8)       exactly N zeros in every M consecutive inputs of a row; sparsity N/M")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s",
                        level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
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
    from .runtime import keep_freed_memory

    keep_freed_memory()
    commands = {"prune": cmd_prune, "eval": cmd_eval, "list": cmd_list}
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


if __name__ == "__main__":
    sys.exit(main())
