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

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PrunewiseError
from .masks import parse_pattern

REPORT = "report.md"


@dataclass
class Row:
    """One finished or failed run, flattened for tables."""

    metric: str
    allocator: str
    pattern: str
    target: float
    status: str = "ok"
    sparsity: float | None = None
    ppl: float | None = None
    zero_shot: dict | None = None
    blocks: list[float] = field(default_factory=list)
    search: dict | None = None
    error: str | None = None
    wall_s: float | None = None
    timings: dict = field(default_factory=dict)

    @property
    def nm(self) -> bool:
        return parse_pattern(self.pattern).is_nm


def _from_sweep_line(line: dict[str, Any]) -> Row:
    cfg = line["config"]
    alloc = line.get("allocation") or {}
    return Row(metric=cfg["metric"], allocator=cfg["allocator"], pattern=cfg["pattern"], target=line["target"],
               status=line.get("status", "ok"), sparsity=line.get("sparsity"),
               ppl=(line.get("ppl") or {}).get("ppl"), zero_shot=line.get("zero_shot"),
               blocks=alloc.get("blocks", []), search=alloc.get("search"), error=line.get("error"),
               wall_s=line.get("wall_s"), timings=line.get("timings") or {})


def _from_record(rec: dict[str, Any]) -> Row:
    cfg = rec["config"]
    alloc = rec.get("allocation") or {}
    return Row(metric=cfg["metric"], allocator=cfg["allocator"], pattern=cfg["pattern"],
               target=rec["pruning"]["target"], sparsity=rec["pruning"]["sparsity"],
               ppl=(rec.get("pruned") or {}).get("ppl"), zero_shot=(rec.get("zero_shot") or {}).get("pruned"),
               blocks=alloc.get("blocks", []), search=alloc.get("search"), wall_s=rec.get("wall_s"))


def load_rows(folder: Path) -> tuple[list[Row], dict[str, Any], dict[str, Any]]:
    """Rows, the dense baseline (``ppl`` entry, ``zero_shot``) and the common settings of ``folder``."""
    from .io import RECORD, read_record
    from .sweep import RESULTS, latest, read_results

    folder = Path(folder)
    if not folder.is_dir():
        raise PrunewiseError(f"report: {folder} is not a folder")
    dense: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    rows: list[Row] = []
    if (folder / RESULTS).is_file():
        for line in latest(read_results(folder / RESULTS)):
            if line.get("kind") == "dense":
                dense = {"ppl": line.get("ppl"), "zero_shot": line.get("zero_shot")}
            else:
                rows.append(_from_sweep_line(line))
                settings = settings or line["config"]
    else:
        for path in sorted(folder.rglob(RECORD)):
            rec = read_record(path)
            if "pruning" not in rec:
                continue
            rows.append(_from_record(rec))
            settings = settings or rec["config"]
            if not dense and rec.get("dense"):
                dense = {"ppl": rec["dense"], "zero_shot": (rec.get("zero_shot") or {}).get("dense")}
    if not rows:
        raise PrunewiseError(f"report: no results in {folder} (expected {RESULTS} from 'prunewise sweep' or "
                             f"run folders with {RECORD})")
    return rows, dense, settings


def _base(spec: str) -> str:
    return spec.split(":", 1)[0]


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x >= 1e4:
        return f"{x:.3g}"
    return f"{x:.2f}" if x >= 100 else f"{x:.3f}"


def _ordered(values, preferred: tuple[str, ...]) -> list:
    rank = {v: i for i, v in enumerate(preferred)}
    return sorted(set(values), key=lambda v: (rank.get(_base(v), len(rank)), v))


METRIC_ORDER = ("magnitude", "wanda", "sparsegpt", "gblm", "gradient")
ALLOCATOR_ORDER = ("uniform", "owl", "alphapruning", "atp", "mrp")


def _columns(rows: list[Row]) -> list[tuple[str, float]]:
    """Table columns: unstructured targets ascending, then N:M patterns."""
    unst = sorted({("unstructured", r.target) for r in rows if not r.nm}, key=lambda c: c[1])
    nm = sorted({(r.pattern, r.target) for r in rows if r.nm}, key=lambda c: parse_pattern(c[0]).m)
    return unst + nm


def _col_name(col: tuple[str, float]) -> str:
    return col[0] if parse_pattern(col[0]).is_nm else f"{col[1]:.0%}"


def results_table(rows: list[Row], dense_ppl: float | None) -> str:
    """Perplexity: one line per metric x allocator, one column per sparsity / N:M pattern; the best
    allocator of each metric and column in bold."""
    ok = [r for r in rows if r.status == "ok" and r.ppl is not None]
    cols = _columns(ok)
    cell = {(r.metric, r.allocator, r.pattern, r.target): r.ppl for r in ok}
    lines = ["| metric | allocator | " + " | ".join(_col_name(c) for c in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    if dense_ppl is not None:
        lines.append("| dense | - | " + " | ".join(_fmt(dense_ppl) for _ in cols) + " |")
    for metric in _ordered([r.metric for r in ok], METRIC_ORDER):
        allocators = _ordered([r.allocator for r in ok if r.metric == metric], ALLOCATOR_ORDER)
        best = {}
        for c in cols:
            vals = [cell[(metric, a, *c)] for a in allocators if (metric, a, *c) in cell]
            best[c] = min(vals) if vals else None
        for a in allocators:
            cells = []
            for c in cols:
                v = cell.get((metric, a, *c))
                text = _fmt(v)
                cells.append(f"**{text}**" if v is not None and v == best[c] and len(allocators) > 1 else text)
            lines.append(f"| {metric} | {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons(rows: list[Row]) -> list[str]:
    """The papers' claims, checked cell by cell on these results (lower perplexity wins)."""
    ok = [r for r in rows if r.status == "ok" and r.ppl is not None]
    cell = {(r.metric, r.allocator, r.pattern, r.target): r.ppl for r in ok}
    cols = _columns(ok)
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
    allocators = _ordered([r.allocator for r in ok if _base(r.allocator) != "uniform"], ALLOCATOR_ORDER)
    for a in allocators:
        wins, losses, ties = [], [], []
        for metric in _ordered([r.metric for r in ok], METRIC_ORDER):
            for c in high:
                u, v = cell.get((metric, "uniform", *c)), cell.get((metric, a, *c))
                if u is not None and v is not None:
                    judge(v, u, f"{metric} {_col_name(c)} ({_fmt(v)} vs {_fmt(u)})", wins, losses, ties)
        if wins or losses or ties:
            out.append(f"- **{a} beats uniform** at 70% and above and with N:M: {verdict(wins, losses, ties)}.")
    # 2. Wanda and SparseGPT vs magnitude; 3. GBLM vs Wanda (uniform allocation).
    for better, worse in (("wanda", "magnitude"), ("sparsegpt", "magnitude"), ("sparsegpt", "wanda"),
                          ("gblm", "wanda")):
        wins, losses, ties = [], [], []
        for c in cols:
            b, w = cell.get((better, "uniform", *c)), cell.get((worse, "uniform", *c))
            if b is not None and w is not None:
                judge(b, w, f"{_col_name(c)} ({_fmt(b)} vs {_fmt(w)})", wins, losses, ties)
        if wins or losses or ties:
            out.append(f"- **{better} beats {worse}** (uniform allocation): {verdict(wins, losses, ties)}.")
    return out


def zero_shot_table(rows: list[Row], dense_zs: dict | None) -> str | None:
    zs = [r for r in rows if r.status == "ok" and r.zero_shot]
    if not zs:
        return None
    tasks = list((dense_zs or zs[0].zero_shot)["tasks"])
    lines = ["| metric | allocator | pattern | sparsity | " + " | ".join(tasks) + " | mean acc | mean acc_norm |",
             "|---|---|---|---:|" + "---:|" * (len(tasks) + 2)]

    def line(name: str, alloc: str, pattern: str, sparsity: str, z: dict) -> str:
        accs = [_pct(z["tasks"].get(t, {}).get("acc")) for t in tasks]
        avg = z.get("average", {})
        return (f"| {name} | {alloc} | {pattern} | {sparsity} | " + " | ".join(accs)
                + f" | {_pct(avg.get('acc'))} | {_pct(avg.get('acc_norm'))} |")

    if dense_zs:
        lines.append(line("dense", "-", "-", "0", dense_zs))
    def rank(name: str, order: tuple[str, ...]) -> int:
        return order.index(_base(name)) if _base(name) in order else len(order)

    for r in sorted(zs, key=lambda r: (r.nm, r.target, rank(r.metric, METRIC_ORDER), r.metric,
                                       rank(r.allocator, ALLOCATOR_ORDER), r.allocator)):
        lines.append(line(r.metric, r.allocator, r.pattern, f"{r.target:g}", r.zero_shot))
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_vs_sparsity(rows: list[Row], metric: str, dense_ppl: float | None, path: Path) -> Path | None:
    """Perplexity (log scale) against unstructured sparsity, one line per allocator."""
    ok = [r for r in rows if r.status == "ok" and r.ppl is not None and r.metric == metric and not r.nm]
    if len({r.target for r in ok}) < 1:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for a in _ordered([r.allocator for r in ok], ALLOCATOR_ORDER):
        pts = sorted((r.target, r.ppl) for r in ok if r.allocator == a)
        ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=a,
                linestyle="--" if _base(a) == "uniform" else "-")
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="grey", linewidth=0.8, linestyle=":", label=f"dense {dense_ppl:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{metric}: perplexity vs sparsity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_allocator_profiles(rows: list[Row], allocator: str, path: Path) -> Path | None:
    """Per-block sparsity of ``allocator``: one panel per target (unstructured) or N:M pattern,
    one line per metric, the uniform target dashed."""
    ok = [r for r in rows if r.status == "ok" and r.allocator == allocator and r.blocks]
    cols = _columns(ok)
    if not cols:
        return None
    plt = _plt()
    n = len(cols)
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False, sharey=True)
    for i, c in enumerate(cols):
        ax = axes[i // ncol][i % ncol]
        for k, r in enumerate(sorted((r for r in ok if (r.pattern, r.target) == c), key=lambda r: r.metric)):
            # later lines thinner and dashed, so allocations that coincide (OWL's does not depend
            # on the metric) stay visible
            ax.plot(range(len(r.blocks)), r.blocks, label=r.metric, linewidth=max(3.0 - 0.7 * k, 0.8),
                    linestyle=("-", "--", "-.", ":")[k % 4])
        ax.axhline(c[1], color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{_col_name(c)}", fontsize=9)
        ax.set_xlabel("block")
        ax.set_ylim(0, 1)
        if i % ncol == 0:
            ax.set_ylabel("sparsity")
        if i == 0:
            ax.legend(fontsize=7)
    for j in range(n, nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    fig.suptitle(f"{allocator}: per-block sparsity", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9.=-]+", "_", name)


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
                  f"= {p['tokens']} tokens; dense **{_fmt(p['ppl'])}**.")
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
    figures = []
    for metric in _ordered([r.metric for r in ok], METRIC_ORDER):
        png = plot_ppl_vs_sparsity(rows, metric, dense_ppl, out / f"ppl_{_safe(metric)}.png")
        if png:
            figures.append(f"![{metric}: perplexity vs sparsity]({png.name})")
    if figures:
        md += ["## Perplexity vs sparsity", "", *figures, ""]
    profiles = []
    for a in _ordered([r.allocator for r in ok], ALLOCATOR_ORDER):
        if _base(a) == "uniform":
            continue
        png = plot_allocator_profiles(rows, a, out / f"profile_{_safe(a)}.png")
        if png:
            profiles.append(f"![{a}: per-block sparsity]({png.name})")
        searched = [r for r in ok if r.allocator == a and r.search]
        if searched:
            profiles.append("")
            profiles.append(f"{a}: searched `{searched[0].search['parameter']}` per run: " + ", ".join(
                f"{r.metric} {_col_name((r.pattern, r.target))} -> {r.search['chosen']:g}"
                for r in sorted(searched, key=lambda r: (r.metric, r.nm, r.target))) + ".")
            profiles.append("")
    if profiles:
        md += ["## Per-block sparsity of each allocator", "", *profiles, ""]
    zs = zero_shot_table(rows, (dense or {}).get("zero_shot"))
    if zs:
        md += ["## Zero-shot accuracy (%)", "", zs, ""]
    if failed:
        md += ["## Failed runs", ""]
        md += [f"- {r.metric} / {r.allocator} / {r.pattern} {r.target:g}: `{r.error}`" for r in failed]
        md.append("")
    times = defaultdict(lambda: defaultdict(list))
    for r in ok:
        if r.wall_s is not None:
            times[_base(r.metric)]["run"].append(r.wall_s)
            for k in ("plan_s", "prune_s", "eval_s", "zero_shot_s"):
                if k in r.timings:
                    times[_base(r.metric)][k].append(r.timings[k])
    if times:
        md += ["## Time per run (median seconds)", "",
               "| metric | runs | allocator | prune | perplexity | zero-shot | whole run |",
               "|---|---:|---:|---:|---:|---:|---:|"]
        for m, t in times.items():
            cells = [f"{statistics.median(t[k]):.1f}" if t.get(k) else "-"
                     for k in ("plan_s", "prune_s", "eval_s", "zero_shot_s", "run")]
            md.append(f"| {m} | {len(t['run'])} | " + " | ".join(cells) + " |")
        md.append("")
    path = out / REPORT
    path.write_text("\n".join(md), encoding="utf-8")
    return path
