"""PNG plots, drawn on :class:`matplotlib.figure.Figure` objects (matplotlib's global backend and
pyplot state are never touched, so importing prunewise into a notebook changes nothing there):
the per-block sparsity profile of a run next to uniform, and the report's figures.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from ..registry import ALLOCATORS
from ..run.record import RunRecord
from .tables import ResultRow, col_name, columns, is_baseline, ordered

PROFILE_PNG = "allocation.png"


def plot_block_profile(
    blocks: list[float], target: float, path: Path, title: str = "", search: dict | None = None
) -> Path:
    """Per-block sparsity (parameter-weighted) as bars against the uniform target; with an
    allocator search, a second panel shows its criterion over the searched values."""
    panels = 2 if search else 1
    fig = Figure(figsize=(7 + 4 * (panels - 1), 3.6))
    axes = fig.subplots(1, panels, squeeze=False)
    ax = axes[0][0]
    ax.bar(range(len(blocks)), blocks, color="#4c72b0", label="allocated")
    ax.axhline(target, color="#dd8452", linestyle="--", label=f"uniform {target:g}")
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_title(title or "per-block sparsity")
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    if search:
        ax2 = axes[0][1]
        xs = [c[search["parameter"]] for c in search["curve"]]
        ax2.plot(xs, [c["ppl"] for c in search["curve"]], marker="o")
        ax2.axvline(search["chosen"], color="#55a868", linestyle=":", label=f"chosen {search['chosen']:g}")
        ax2.set_xlabel(search["parameter"])
        ax2.set_ylabel("held-out perplexity")
        ax2.set_title("search")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def save_profile_plot(record: RunRecord, folder: Path) -> Path | None:
    """:func:`plot_block_profile` of a run into ``folder/allocation.png`` (None without an allocation)."""
    if not record.allocation or record.target is None:
        return None
    cfg = record.config
    return plot_block_profile(
        record.blocks,
        record.target,
        Path(folder) / PROFILE_PNG,
        f"{cfg['allocator']} / {cfg['metric']} / {cfg['pattern']}",
        record.search,
    )


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")


def merge_identical(
    series: list[tuple[str, list[float], list[float]]], rel: float = 1e-6
) -> list[tuple[str, list[float], list[float]]]:
    """``(label, xs, ys)`` series with the same points (within ``rel``) drawn once, labelled with
    every name joined by `` = `` (first-seen order), so that no line hides another unnamed."""
    merged: list[tuple[str, list[float], list[float]]] = []
    for label, xs, ys in series:
        for k, (other, oxs, oys) in enumerate(merged):
            if (
                oxs == xs
                and len(oys) == len(ys)
                and all(abs(a - b) <= rel * max(abs(a), abs(b), 1e-12) for a, b in zip(ys, oys))
            ):
                merged[k] = (f"{other} = {label}", oxs, oys)
                break
        else:
            merged.append((label, xs, ys))
    return merged


def plot_ppl_vs_sparsity(rows: list[ResultRow], metric: str, dense_ppl: float | None, path: Path) -> Path | None:
    """Perplexity (log scale) against unstructured sparsity, one line per allocator."""
    ok = [r for r in rows if r.status == "ok" and r.ppl is not None and r.metric == metric and not r.nm]
    if len({r.target for r in ok}) < 1:
        return None
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    series = []
    for a in ordered([r.allocator for r in ok], ALLOCATORS):
        pts = sorted((r.target, r.ppl) for r in ok if r.allocator == a)
        series.append((a, [100 * x for x, _ in pts], [y for _, y in pts]))
    for k, (label, xs, ys) in enumerate(merge_identical(series)):  # distinct markers: close lines stay apart
        ax.plot(
            xs,
            ys,
            marker=MARKERS[k % len(MARKERS)],
            label=label,
            markersize=6 - (k % 3),
            linestyle="--" if all(is_baseline(part) for part in label.split(" = ")) else "-",
        )
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
    return path


def plot_allocator_profiles(rows: list[ResultRow], allocator: str, path: Path) -> Path | None:
    """Per-block sparsity of ``allocator``: one panel per target (unstructured) or N:M pattern,
    one line per metric, the uniform target dashed."""
    ok = [r for r in rows if r.status == "ok" and r.allocator == allocator and r.blocks]
    cols = columns(ok)
    if not cols:
        return None
    n = len(cols)
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol)
    fig = Figure(figsize=(4.2 * ncol, 3.0 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False, sharey=True)
    for i, c in enumerate(cols):
        ax = axes[i // ncol][i % ncol]
        runs = sorted((r for r in ok if (r.pattern, r.target) == c), key=lambda r: r.metric)
        # allocations that coincide (OWL's does not depend on the metric) are one line named for all
        series = merge_identical([(r.metric, list(range(len(r.blocks))), r.blocks) for r in runs])
        for k, (label, xs, ys) in enumerate(series):
            ax.plot(
                xs,
                ys,
                label=label,
                marker=MARKERS[k % len(MARKERS)],
                markersize=3,
                linestyle=("-", "--", "-.", ":")[k % 4],
            )
        ax.axhline(c[1], color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{col_name(c)}", fontsize=9)
        ax.set_xlabel("block")
        ax.set_ylim(0, 1)
        if i % ncol == 0:
            ax.set_ylabel("sparsity")
        ax.legend(fontsize=7)
    for j in range(n, nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    fig.suptitle(f"{allocator}: per-block sparsity", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
