"""Every table prunewise prints or writes, in one place, with methods in their registries' order.

Text tables for the CLI (perplexity, per-block and per-layer sparsity, zero-shot side by side) and
markdown tables for ``report.md`` (perplexity grid, zero-shot). Rows of the report are
:class:`ResultRow`: one finished or failed run, flattened from its :class:`~prunewise.record.RunRecord`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import PruneConfig
from ..prune.masks import parse_pattern
from ..registry import ALLOCATORS, METRICS, Registry
from ..run.record import RunRecord


@dataclass
class ResultRow:
    """One finished or failed run, flattened for tables and plots."""

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

    @classmethod
    def from_record(cls, rec: RunRecord, status: str = "ok", error: str | None = None) -> ResultRow:
        cfg = rec.config
        target = rec.target
        if target is None:  # a failed run: the target its config asks for
            target = PruneConfig.from_dict(cfg).target
        return cls(
            metric=cfg["metric"],
            allocator=cfg["allocator"],
            pattern=cfg["pattern"],
            target=target,
            status=status,
            sparsity=rec.sparsity,
            ppl=(rec.pruned or {}).get("ppl"),
            zero_shot=rec.zero_shot.get("pruned"),
            blocks=rec.blocks,
            search=rec.search,
            error=error,
            wall_s=rec.wall_s,
            timings=rec.timings,
        )


def base(spec: str) -> str:
    return spec.split(":", 1)[0]


def is_baseline(spec: str) -> bool:
    """Whether an allocator spec names the baseline allocation the others are compared against."""
    name = base(spec)
    return name in ALLOCATORS and ALLOCATORS.get(name).baseline


def fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x >= 1e4:
        return f"{x:.3g}"
    return f"{x:.2f}" if x >= 100 else f"{x:.3f}"


def rank(spec: str, registry: Registry) -> int:
    """Position of a method spec's name in its registry's order (unknown names last)."""
    names = [e.name for e in registry]
    name = base(spec)
    return names.index(name) if name in names else len(names)


def ordered(values, registry: Registry) -> list:
    """Distinct method specs in the registry's order, then by spec."""
    return sorted(set(values), key=lambda v: (rank(v, registry), v))


def columns(rows: list[ResultRow]) -> list[tuple[str, float]]:
    """Table columns: unstructured targets ascending, then N:M patterns."""
    unst = sorted({("unstructured", r.target) for r in rows if not r.nm}, key=lambda c: c[1])
    nm = sorted({(r.pattern, r.target) for r in rows if r.nm}, key=lambda c: parse_pattern(c[0]).m)
    return unst + nm


def col_name(col: tuple[str, float]) -> str:
    return col[0] if parse_pattern(col[0]).is_nm else f"{col[1]:.0%}"


def results_table(rows: list[ResultRow], dense_ppl: float | None) -> str:
    """Perplexity: one line per metric x allocator, one column per sparsity / N:M pattern; the best
    allocator of each metric and column in bold."""
    ok = [r for r in rows if r.status == "ok" and r.ppl is not None]
    cols = columns(ok)
    cell = {(r.metric, r.allocator, r.pattern, r.target): r.ppl for r in ok}
    lines = [
        "| metric | allocator | " + " | ".join(col_name(c) for c in cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    if dense_ppl is not None:
        lines.append("| dense | - | " + " | ".join(fmt(dense_ppl) for _ in cols) + " |")
    for metric in ordered([r.metric for r in ok], METRICS):
        allocators = ordered([r.allocator for r in ok if r.metric == metric], ALLOCATORS)
        best = {}
        for c in cols:
            vals = [cell[(metric, a, *c)] for a in allocators if (metric, a, *c) in cell]
            best[c] = min(vals) if vals else None
        for a in allocators:
            cells = []
            for c in cols:
                v = cell.get((metric, a, *c))
                text = fmt(v)
                cells.append(f"**{text}**" if v is not None and v == best[c] and len(allocators) > 1 else text)
            lines.append(f"| {metric} | {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def zero_shot_table(rows: list[ResultRow], dense_zs: dict | None) -> str | None:
    zs = [r for r in rows if r.status == "ok" and r.zero_shot]
    if not zs:
        return None
    tasks = list((dense_zs or zs[0].zero_shot)["tasks"])
    lines = [
        "| metric | allocator | pattern | sparsity | " + " | ".join(tasks) + " | mean acc | mean acc_norm |",
        "|---|---|---|---:|" + "---:|" * (len(tasks) + 2),
    ]

    def line(name: str, alloc: str, pattern: str, sparsity: str, z: dict) -> str:
        accs = [pct(z["tasks"].get(t, {}).get("acc")) for t in tasks]
        avg = z.get("average", {})
        return (
            f"| {name} | {alloc} | {pattern} | {sparsity} | "
            + " | ".join(accs)
            + f" | {pct(avg.get('acc'))} | {pct(avg.get('acc_norm'))} |"
        )

    if dense_zs:
        lines.append(line("dense", "-", "-", "0", dense_zs))
    for r in sorted(
        zs,
        key=lambda r: (r.nm, r.target, rank(r.metric, METRICS), r.metric, rank(r.allocator, ALLOCATORS), r.allocator),
    ):
        lines.append(line(r.metric, r.allocator, r.pattern, f"{r.target:g}", r.zero_shot))
    return "\n".join(lines)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def ppl_table(rows: list[tuple[str, dict]]) -> str:
    lines = [f"{'model':<28} {'perplexity':>11}  {'data':<10} {'split':<12} {'seqlen':>6} {'tokens':>8}"]
    for label, e in rows:
        lines.append(
            f"{label:<28} {e['ppl']:>11.3f}  {e['data']:<10} {e['split']:<12} {e['seqlen']:>6} {e['tokens']:>8}"
        )
    return "\n".join(lines)


def block_table(layers: list[dict]) -> str:
    """Per-block layers, parameters and parameter-weighted target (and achieved sparsity once pruned),
    with the whole model's parameter-weighted mean last."""
    pruned = all("zeros" in x for x in layers)
    blocks: dict[int, list[dict]] = {}
    for layer in layers:
        blocks.setdefault(layer["block"], []).append(layer)

    def line(name, ls: list[dict]) -> str:
        n = sum(x["shape"][0] * x["shape"][1] for x in ls)
        tgt = sum(x["target"] * x["shape"][0] * x["shape"][1] for x in ls) / n
        ach = f" {sum(x['zeros'] for x in ls) / n:>9.4f}" if pruned else ""
        return f"{name:>5} {len(ls):>6} {n:>10} {tgt:>8.4f}{ach}"

    head = f"{'block':>5} {'layers':>6} {'params':>10} {'target':>8}" + (f" {'achieved':>9}" if pruned else "")
    return "\n".join([head, *(line(b, ls) for b, ls in sorted(blocks.items())), line("all", layers)])


def layer_table(layers: list[dict]) -> str:
    lines = [f"{'layer':<40} {'shape':>12} {'target':>8} {'achieved':>9}"]
    for x in layers:
        lines.append(f"{x['name']:<40} {'x'.join(map(str, x['shape'])):>12} {x['target']:>8.4f} {x['achieved']:>9.4f}")
    return "\n".join(lines)


def zero_shot_columns(columns: list[tuple[str, dict]]) -> str:
    """Per-task acc / acc_norm, one pair of columns per model, and the mean over tasks."""
    tasks = list(columns[0][1]["tasks"])
    width = max([len("average")] + [len(t) for t in tasks])
    head = f"{'task':<{width}}" + "".join(f" {label[:19]:>19} {'':>8}" for label, _ in columns)
    sub = f"{'':<{width}}" + "".join(f" {'acc':>19} {'acc_norm':>8}" for _ in columns)

    def cell(entry: dict, key: str, w: int) -> str:
        return f"{entry[key]:>{w}.4f}" if key in entry else f"{'-':>{w}}"

    lines = [head, sub]
    for t in tasks:
        lines.append(
            f"{t:<{width}}"
            + "".join(f" {cell(z['tasks'][t], 'acc', 19)} {cell(z['tasks'][t], 'acc_norm', 8)}" for _, z in columns)
        )
    lines.append(
        f"{'average':<{width}}"
        + "".join(f" {cell(z['average'], 'acc', 19)} {cell(z['average'], 'acc_norm', 8)}" for _, z in columns)
    )
    n = columns[0][1]["tasks"][tasks[0]].get("samples")
    lines.append(
        f"(0-shot, lm-eval {columns[0][1]['lm_eval']}; limit {columns[0][1]['limit']}; {n} examples in {tasks[0]})"
    )
    return "\n".join(lines)
