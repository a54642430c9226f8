"""Reports: ``report.md`` with tables and PNG plots from a sweep or a folder of runs.

Input: a sweep folder (``results.jsonl``, see :mod:`prunewise.sweep`) or any folder holding
prunewise run folders (``pruning.json``), searched recursively. Output, next to it or in
``out``: ``report.md`` with the dense baseline, perplexity tables (one per pattern kind), the
comparisons the papers make (allocators vs uniform, Wanda/SparseGPT vs magnitude, GBLM vs
Wanda) computed from the table, zero-shot tables when present, failed runs with their errors,
and the figures: perplexity vs sparsity per metric (one line per allocator) and the per-block
sparsity profile of each allocator.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .errors import PrunewiseError
from .masks import parse_pattern
from .plots import plot_allocator_profiles, plot_ppl_vs_sparsity
from .record import RECORD, RunRecord
from .registry import ALLOCATORS, METRICS
from .tables import ResultRow, base, col_name, columns, fmt, ordered, results_table, zero_shot_table

REPORT = "report.md"


def load_rows(folder: Path) -> tuple[list[ResultRow], dict[str, Any], dict[str, Any]]:
    """Rows, the dense baseline (``ppl`` entry, ``zero_shot``) and the common settings of ``folder``."""
    from .sweep import RESULTS, latest, read_results

    folder = Path(folder)
    if not folder.is_dir():
        raise PrunewiseError(f"report: {folder} is not a folder")
    dense: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    rows: list[ResultRow] = []
    if (folder / RESULTS).is_file():
        for line in latest(read_results(folder / RESULTS)):
            if line.get("kind") == "dense":
                dense = {"ppl": line.get("ppl"), "zero_shot": line.get("zero_shot")}
            else:
                rows.append(ResultRow.from_record(RunRecord.from_dict(line), line.get("status", "ok"), line.get("error")))
                settings = settings or line["config"]
    else:
        for path in sorted(folder.rglob(RECORD)):
            rec = RunRecord.read(path)
            if rec.pruning is None:
                continue
            rows.append(ResultRow.from_record(rec))
            settings = settings or rec.config
            if not dense and rec.dense:
                dense = {"ppl": rec.dense, "zero_shot": rec.zero_shot.get("dense")}
    if not rows:
        raise PrunewiseError(f"report: no results in {folder} (expected {RESULTS} from 'prunewise sweep' or "
                             f"run folders with {RECORD})")
    return rows, dense, settings


def comparisons(rows: list[ResultRow]) -> list[str]:
    """The papers' claims, checked cell by cell on these results (lower perplexity wins)."""
    ok = [r for r in rows if r.status == "ok" and r.ppl is not None]
    cell = {(r.metric, r.allocator, r.pattern, r.target): r.ppl for r in ok}
    cols = columns(ok)
    out: list[str] = []

    def verdict(wins: list[str], losses: list[str], ties: list[str]) -> str:
        text = f"{len(wins)} of {len(wins) + len(losses) + len(ties)}"
        if ties:
            text += "; equal in: " + ", ".join(ties)
        if losses:
            text += "; not in: " + ", ".join(losses)
        return text

    def judge(new: float, old: float, text: str, wins: list, losses: list, ties: list) -> None:
        (wins if new < old else ties if new == old else losses).append(text)

    # 1. Layerwise allocators vs uniform at high sparsity (>= 70% and N:M).
    high = [c for c in cols if parse_pattern(c[0]).is_nm or c[1] >= 0.7 - 1e-9]
    allocators = ordered([r.allocator for r in ok if base(r.allocator) != "uniform"], ALLOCATORS)
    for a in allocators:
        wins, losses, ties = [], [], []
        for metric in ordered([r.metric for r in ok], METRICS):
            for c in high:
                u, v = cell.get((metric, "uniform", *c)), cell.get((metric, a, *c))
                if u is not None and v is not None:
                    judge(v, u, f"{metric} {col_name(c)} ({fmt(v)} vs {fmt(u)})", wins, losses, ties)
        if wins or losses or ties:
            out.append(f"- **{a} beats uniform** at 70% and above and with N:M: {verdict(wins, losses, ties)}.")
    # 2. Wanda and SparseGPT vs magnitude; 3. GBLM vs Wanda (uniform allocation).
    for better, worse in (("wanda", "magnitude"), ("sparsegpt", "magnitude"), ("sparsegpt", "wanda"),
                          ("gblm", "wanda")):
        wins, losses, ties = [], [], []
        for c in cols:
            b, w = cell.get((better, "uniform", *c)), cell.get((worse, "uniform", *c))
            if b is not None and w is not None:
                judge(b, w, f"{col_name(c)} ({fmt(b)} vs {fmt(w)})", wins, losses, ties)
        if wins or losses or ties:
            out.append(f"- **{better} beats {worse}** (uniform allocation): {verdict(wins, losses, ties)}.")
    return out


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9.=-]+", "_", name)


def _figures(rows: list[ResultRow], ok: list[ResultRow], dense_ppl: float | None, out: Path) -> list[str]:
    """The perplexity-vs-sparsity and per-block profile sections, with their PNGs written to ``out``."""
    md: list[str] = []
    figures = []
    for metric in ordered([r.metric for r in ok], METRICS):
        png = plot_ppl_vs_sparsity(rows, metric, dense_ppl, out / f"ppl_{_safe(metric)}.png")
        if png:
            figures.append(f"![{metric}: perplexity vs sparsity]({png.name})")
    if figures:
        md += ["## Perplexity vs sparsity", "", *figures, ""]
    profiles = []
    for a in ordered([r.allocator for r in ok], ALLOCATORS):
        if base(a) == "uniform":
            continue
        png = plot_allocator_profiles(rows, a, out / f"profile_{_safe(a)}.png")
        if png:
            profiles.append(f"![{a}: per-block sparsity]({png.name})")
        searched = [r for r in ok if r.allocator == a and r.search]
        if searched:
            profiles.append("")
            profiles.append(f"{a}: searched `{searched[0].search['parameter']}` per run: " + ", ".join(
                f"{r.metric} {col_name((r.pattern, r.target))} -> {r.search['chosen']:g}"
                for r in sorted(searched, key=lambda r: (r.metric, r.nm, r.target))) + ".")
            profiles.append("")
    if profiles:
        md += ["## Per-block sparsity of each allocator", "", *profiles, ""]
    return md


def _time_table(ok: list[ResultRow]) -> list[str]:
    """Median seconds per run by metric: allocator, prune, perplexity, zero-shot, whole run."""
    md: list[str] = []
    times = defaultdict(lambda: defaultdict(list))
    for r in ok:
        if r.wall_s is not None:
            times[base(r.metric)]["run"].append(r.wall_s)
            for k in ("plan_s", "prune_s", "eval_s", "zero_shot_s"):
                if k in r.timings:
                    times[base(r.metric)][k].append(r.timings[k])
    if times:
        md += ["## Time per run (median seconds)", "",
               "| metric | runs | allocator | prune | perplexity | zero-shot | whole run |",
               "|---|---:|---:|---:|---:|---:|---:|"]
        for m, t in times.items():
            cells = [f"{statistics.median(t[k]):.1f}" if t.get(k) else "-"
                     for k in ("plan_s", "prune_s", "eval_s", "zero_shot_s", "run")]
            md.append(f"| {m} | {len(t['run'])} | " + " | ".join(cells) + " |")
        md.append("")
    return md


def write_report(folder: Path, out: Path | None = None, notes: Path | None = None) -> Path:
    """Write ``report.md`` and its PNGs into ``out`` (default ``folder``); returns the report path."""
    rows, dense, settings = load_rows(folder)
    out = Path(out) if out is not None else Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    dense_ppl = (dense.get("ppl") or {}).get("ppl") if dense else None
    ok = [r for r in rows if r.status == "ok"]
    failed = [r for r in rows if r.status != "ok"]
    md = ["# prunewise report", ""]
    s = settings
    md.append(f"Model `{s.get('model')}`; calibration {s.get('nsamples')} x {s.get('seqlen')} tokens of "
              f"`{s.get('calib')}` (seed {s.get('seed')}), mode {s.get('mode')}.")
    if dense and dense.get("ppl"):
        p = dense["ppl"]
        md.append(f"Perplexity on `{p['data']}` ({p['split']} split), {p['windows']} windows x {p['seqlen']} tokens "
                  f"= {p['tokens']} tokens; dense **{fmt(p['ppl'])}**.")
    md.append(f"{len(ok)} runs finished, {len(failed)} failed. Lower perplexity is better; **bold** = best "
              "allocator for that metric and column.")
    md.append("")
    if notes is not None:
        md += [Path(notes).read_text(encoding="utf-8").rstrip(), ""]
    md += ["## Perplexity", "", results_table(rows, dense_ppl), ""]
    claims = comparisons(rows)
    if claims:
        md += ["## The papers' comparisons on these results", "",
               "Each line counts the cells of the table above where the claim holds (lower perplexity).", "",
               *claims, ""]
    md += _figures(rows, ok, dense_ppl, out)
    zs = zero_shot_table(rows, (dense or {}).get("zero_shot"))
    if zs:
        md += ["## Zero-shot accuracy (%)", "", zs, ""]
    if failed:
        md += ["## Failed runs", ""]
        md += [f"- {r.metric} / {r.allocator} / {r.pattern} {r.target:g}: `{r.error}`" for r in failed]
        md.append("")
    md += _time_table(ok)
    path = out / REPORT
    path.write_text("\n".join(md), encoding="utf-8")
    return path
