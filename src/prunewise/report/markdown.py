"""Reports: ``report.md`` with tables and PNG plots from a sweep or a folder of runs.

Input: a sweep folder (``results.jsonl``, see :mod:`prunewise.sweep`) or any folder holding
prunewise run folders (``pruning.json``), searched recursively. Runs are grouped by protocol
(model, calibration, mode, evaluation: :data:`COMPARABLE`); with more than one, each gets its own
section, since numbers are comparable only within one. Output, next to it or in
``out``: ``report.md`` with the dense baseline, perplexity tables (one per pattern kind), the
comparisons the papers make (allocators vs uniform, Wanda/SparseGPT vs magnitude, GBLM vs
Wanda) computed from the table, zero-shot tables when present, failed runs with their errors,
and the figures: perplexity vs sparsity per metric (one line per allocator) and the per-block
sparsity profile of each allocator.
"""

from __future__ import annotations

import logging
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PrunewiseError
from ..prune.masks import parse_pattern
from ..registry import ALLOCATORS, METRICS
from ..run.record import RECORD, RunRecord
from ..run.results import RESULTS, latest, read_results
from .plots import plot_allocator_profiles, plot_ppl_vs_sparsity
from .tables import (
    ResultRow,
    base,
    col_name,
    columns,
    fmt,
    is_baseline,
    ordered,
    results_table,
    zero_shot_table,
)

log = logging.getLogger(__name__)

REPORT = "report.md"


# What makes two runs' numbers comparable: the same model, calibration, pruning mode and evaluation.
COMPARABLE = (
    "model",
    "dtype",
    "calib",
    "nsamples",
    "seqlen",
    "seed",
    "mode",
    "propagate",
    "eval_data",
    "eval_seqlen",
    "max_tokens",
    "tasks",
    "limit",
)


@dataclass
class Group:
    """Runs done under one protocol (:data:`COMPARABLE`): their rows, settings and dense baseline."""

    settings: dict[str, Any]
    rows: list[ResultRow] = field(default_factory=list)
    dense: dict[str, Any] = field(default_factory=dict)  # {"ppl": entry, "zero_shot": ...}

    @property
    def repeated(self) -> int:
        """Runs beyond the first of a table cell (the table shows the last of them)."""
        return len(self.rows) - len({(r.metric, r.allocator, r.pattern, r.target) for r in self.rows})


def protocol(config: dict[str, Any]) -> tuple:
    return tuple(config.get(k) for k in COMPARABLE)


def load_groups(folder: Path, unreadable: list[str] | None = None) -> list[Group]:
    """The runs of ``folder`` grouped by protocol, in first-seen order, each with its dense baseline.
    A run folder whose record cannot be read is left out with a warning, and named in
    ``unreadable`` (``"path: why"``) when a list is given; the others are reported."""

    folder = Path(folder)
    if not folder.is_dir():
        raise PrunewiseError(f"report: {folder} is not a folder")
    groups: dict[tuple, Group] = {}
    dense_lines: list[dict[str, Any]] = []

    def add(rec: RunRecord, row: ResultRow) -> Group:
        group = groups.setdefault(protocol(rec.config), Group(rec.config))
        group.rows.append(row)
        return group

    if (folder / RESULTS).is_file():
        for line in latest(read_results(folder / RESULTS)):
            if line.get("kind") == "dense":
                dense_lines.append(line)
            else:
                add(
                    RunRecord.from_dict(line),
                    ResultRow.from_record(RunRecord.from_dict(line), line.get("status", "ok"), line.get("error")),
                )
        for line in dense_lines:  # a sweep measures its dense baseline once, for its evaluation settings
            for group in groups.values():
                if (
                    all(group.settings.get(k) == v for k, v in (line.get("config") or {}).items() if k in COMPARABLE)
                    and not group.dense
                ):
                    group.dense = {"ppl": line.get("ppl"), "zero_shot": line.get("zero_shot")}
    else:
        for path in sorted(folder.rglob(RECORD)):
            try:
                rec = RunRecord.read(path)
            except PrunewiseError as exc:
                log.warning("%s; left out of the report", exc)
                if unreadable is not None:
                    unreadable.append(str(exc).removeprefix("config: "))
                continue
            if rec.pruning is None:
                continue
            group = add(rec, ResultRow.from_record(rec))
            if not group.dense and rec.dense:
                group.dense = {"ppl": rec.dense, "zero_shot": rec.zero_shot.get("dense")}
    if not groups:
        raise PrunewiseError(
            f"report: no results in {folder} (expected {RESULTS} from 'prunewise sweep' or run folders with {RECORD})"
        )
    return list(groups.values())


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

    # 1. Layerwise allocators vs the baseline (uniform) at high sparsity (>= 70% and N:M).
    high = [c for c in cols if parse_pattern(c[0]).is_nm or c[1] >= 0.7 - 1e-9]
    uniform = ALLOCATORS.first(lambda e: e.baseline).name
    allocators = ordered([r.allocator for r in ok if not is_baseline(r.allocator)], ALLOCATORS)
    for a in allocators:
        wins, losses, ties = [], [], []
        for metric in ordered([r.metric for r in ok], METRICS):
            for c in high:
                u, v = cell.get((metric, uniform, *c)), cell.get((metric, a, *c))
                if u is not None and v is not None:
                    judge(v, u, f"{metric} {col_name(c)} ({fmt(v)} vs {fmt(u)})", wins, losses, ties)
        if wins or losses or ties:
            out.append(f"- **{a} beats {uniform}** at 70% and above and with N:M: {verdict(wins, losses, ties)}.")
    # 2. Each metric against those its paper reports beating (``beats`` in the registry), baseline allocation.
    pairs = [(e.name, worse) for e in METRICS for worse in e.beats]
    for better, worse in pairs:
        wins, losses, ties = [], [], []
        for c in cols:
            b, w = cell.get((better, uniform, *c)), cell.get((worse, uniform, *c))
            if b is not None and w is not None:
                judge(b, w, f"{col_name(c)} ({fmt(b)} vs {fmt(w)})", wins, losses, ties)
        if wins or losses or ties:
            out.append(f"- **{better} beats {worse}** ({uniform} allocation): {verdict(wins, losses, ties)}.")
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", name)


def _figures(
    rows: list[ResultRow], ok: list[ResultRow], dense_ppl: float | None, out: Path, h: str, suffix: str
) -> list[str]:
    """The perplexity-vs-sparsity and per-block profile sections, with their PNGs written to ``out``."""
    md: list[str] = []
    figures = []
    for metric in ordered([r.metric for r in ok], METRICS):
        png = plot_ppl_vs_sparsity(rows, metric, dense_ppl, out / f"ppl_{_safe(metric)}{suffix}.png")
        if png:
            figures.append(f"![{metric}: perplexity vs sparsity]({png.name})")
    if figures:
        md += [f"{h} Perplexity vs sparsity", "", *figures, ""]
    profiles = []
    for a in ordered([r.allocator for r in ok], ALLOCATORS):
        if is_baseline(a):
            continue
        png = plot_allocator_profiles(rows, a, out / f"profile_{_safe(a)}{suffix}.png")
        if png:
            profiles.append(f"![{a}: per-block sparsity]({png.name})")
        searched = [r for r in ok if r.allocator == a and r.search]
        if searched:
            profiles.append("")
            profiles.append(
                f"{a}: searched `{searched[0].search['parameter']}` per run: "
                + ", ".join(
                    f"{r.metric} {col_name((r.pattern, r.target))} -> {r.search['chosen']:g}"
                    for r in sorted(searched, key=lambda r: (r.metric, r.nm, r.target))
                )
                + "."
            )
            profiles.append("")
    if profiles:
        md += [f"{h} Per-block sparsity of each allocator", "", *profiles, ""]
    return md


def _time_table(ok: list[ResultRow], h: str) -> list[str]:
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
        md += [
            f"{h} Time per run (median seconds)",
            "",
            "| metric | runs | allocator | prune | perplexity | zero-shot | whole run |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for m, t in times.items():
            cells = [
                f"{statistics.median(t[k]):.1f}" if t.get(k) else "-"
                for k in ("plan_s", "prune_s", "eval_s", "zero_shot_s", "run")
            ]
            md.append(f"| {m} | {len(t['run'])} | " + " | ".join(cells) + " |")
        md.append("")
    return md


def _runs(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


def _protocol_lines(group: Group) -> list[str]:
    """The settings shared by a group's runs, its dense baseline and its counts."""
    s = group.settings
    md = [
        f"Model `{s.get('model')}`; calibration {s.get('nsamples')} x {s.get('seqlen')} tokens of "
        f"`{s.get('calib')}` (seed {s.get('seed')}), mode {s.get('mode')}."
    ]
    p = group.dense.get("ppl")
    if p:
        md.append(
            f"Perplexity on `{p['data']}` ({p['split']} split), {p['windows']} windows x {p['seqlen']} tokens "
            f"= {p['tokens']} tokens; dense **{fmt(p['ppl'])}**."
        )
    elif s.get("eval_data"):
        md.append(
            f"Perplexity on `{s['eval_data']}`, windows of {s.get('eval_seqlen') or s.get('seqlen')} tokens"
            + (f", first {s['max_tokens']} tokens" if s.get("max_tokens") else "")
            + " (no dense baseline recorded)."
        )
    ok = sum(r.status == "ok" for r in group.rows)
    text = f"{_runs(ok)} finished, {len(group.rows) - ok} failed"
    if group.repeated:
        text += f"; {_runs(group.repeated)} repeat a cell of the table, which shows the last of them"
    md.append(text + ".")
    return md


def _section(group: Group, out: Path, h: str, suffix: str) -> list[str]:
    """Tables, comparisons and figures of one protocol's runs."""
    rows = group.rows
    dense_ppl = (group.dense.get("ppl") or {}).get("ppl")
    ok = [r for r in rows if r.status == "ok"]
    failed = [r for r in rows if r.status != "ok"]
    md = [f"{h} Perplexity", "", results_table(rows, dense_ppl), ""]
    claims = comparisons(rows)
    if claims:
        md += [
            f"{h} The papers' comparisons on these results",
            "",
            "Each line counts the cells of the table above where the claim holds (lower perplexity).",
            "",
            *claims,
            "",
        ]
    md += _figures(rows, ok, dense_ppl, out, h, suffix)
    zs = zero_shot_table(rows, group.dense.get("zero_shot"))
    if zs:
        md += [f"{h} Zero-shot accuracy (%)", "", zs, ""]
    if failed:
        md += [f"{h} Failed runs", ""]
        md += [f"- {r.metric} / {r.allocator} / {r.pattern} {r.target:g}: `{r.error}`" for r in failed]
        md.append("")
    return md + _time_table(ok, h)


def write_report(folder: Path, out: Path | None = None, notes: Path | None = None) -> Path:
    """Write ``report.md`` and its PNGs into ``out`` (default ``folder``); returns the report path.
    Runs under different protocols (:data:`COMPARABLE`) get a section each: their numbers are not
    comparable across sections."""
    unreadable: list[str] = []
    groups = load_groups(folder, unreadable)
    out = Path(out) if out is not None else Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# prunewise report", ""]
    legend = "Lower perplexity is better; **bold** = best allocator for that metric and column."
    if len(groups) == 1:
        md += [*_protocol_lines(groups[0]), legend, ""]
    else:
        runs = sum(len(g.rows) for g in groups)
        md += [
            f"{_runs(runs)} under {len(groups)} protocols (model, calibration, mode or evaluation differ): "
            "rows are comparable only within one protocol's section. " + legend,
            "",
        ]
    if notes is not None:
        md += [Path(notes).read_text(encoding="utf-8").rstrip(), ""]
    if len(groups) == 1:
        md += _section(groups[0], out, "##", "")
    for k, group in enumerate(groups if len(groups) > 1 else [], 1):
        md += [f"## Protocol {k}", "", *_protocol_lines(group), ""]
        md += _section(group, out, "###", f"_p{k}")
    if unreadable:
        md += [
            "## Unreadable runs",
            "",
            "Left out of the tables above: their records cannot be read.",
            "",
            *(f"- `{line}`" for line in unreadable),
            "",
        ]
    path = out / REPORT
    path.write_text("\n".join(md), encoding="utf-8")
    return path
