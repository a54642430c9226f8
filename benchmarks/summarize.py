"""Markdown tables from the JSON-lines results of ``bench_allocators.py`` and ``bench_gblm.py``.

python benchmarks/summarize.py allocators benchmarks/results/allocators.jsonl
python benchmarks/summarize.py gblm benchmarks/results/gblm.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ["uniform", "owl", "alphapruning", "atp", "mrp"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open() if line.strip()]


def _fmt(ppl: float | None) -> str:
    if ppl is None:
        return "—"
    return f"{ppl:.0f}" if ppl >= 1000 else f"{ppl:.1f}" if ppl >= 100 else f"{ppl:.2f}"


def allocators(path: Path) -> str:
    rows = _rows(path)
    dense = next(r["ppl"] for r in rows if r["metric"] == "dense")
    runs = [r for r in rows if r["metric"] != "dense"]
    sparsities = sorted({r["sparsity"] for r in runs})
    metrics = [m for m in ("magnitude", "wanda", "sparsegpt", "gblm") if any(r["metric"] == m for r in runs)]
    out = [
        f"Dense perplexity {dense:.3f}. Best allocator per column in **bold**; "
        "\\* marks an allocator that beats uniform.",
        "",
    ]
    for metric in metrics:
        mine = [r for r in runs if r["metric"] == metric]
        cols = [s for s in sparsities if any(r["sparsity"] == s for r in mine)]
        out.append(f"**{metric}**")
        out.append("")
        out.append("| allocator | " + " | ".join(f"{s:.0%}" for s in cols) + " |")
        out.append("|---|" + "---|" * len(cols))
        table = {(r["allocator"].split(":")[0], r["sparsity"]): r for r in mine}
        for alloc in ORDER:
            cells = []
            for s in cols:
                r = table.get((alloc, s))
                if r is None or "ppl" not in r:
                    cells.append("—" if r is None else "error")
                    continue
                col = [x["ppl"] for (a, sp), x in table.items() if sp == s and "ppl" in x]
                uni = table.get(("uniform", s), {}).get("ppl")
                text = _fmt(r["ppl"])
                if alloc != "uniform" and uni is not None and r["ppl"] < uni:
                    text += "\\*"
                if r["ppl"] == min(col):
                    text = f"**{text}**"
                if alloc == "atp" and r.get("search"):
                    text += f" (β={r['search']['chosen']:g})"
                elif alloc == "atp" and "beta=" in r.get("spec", ""):
                    text += f" (β={float(r['spec'].split('beta=')[1]):.4g})"
                cells.append(text)
            out.append(f"| {alloc} | " + " | ".join(cells) + " |")
        out.append("")
    # time each allocator adds (cold: statistics computed; warm: read from the cache)
    out.append("| allocator | statistics | cold plan (s) | warm plan (s), median |")
    out.append("|---|---|---|---|")
    for alloc in ORDER:
        mine = [r for r in runs if r["allocator"].split(":")[0] == alloc and "plan_s" in r]
        if not mine:
            continue
        cold = [r["plan_s"] for r in mine if r.get("cold")]
        warm = sorted(r["plan_s"] for r in mine if not r.get("cold") and not r.get("search"))
        stats = {
            "uniform": "none",
            "owl": "dense calibration pass",
            "alphapruning": "SVD of every matrix",
            "atp": "β search: one prune + held-out eval per trial",
            "mrp": "dense calibration pass + sort",
        }[alloc]
        warm_txt = f"{warm[len(warm) // 2]:.1f}" if warm else "—"
        out.append(
            f"| {alloc} | {stats} | {cold[0]:.1f} | {warm_txt} |" if cold else f"| {alloc} | {stats} | — | {warm_txt} |"
        )
    searches = [r for r in runs if r.get("search")]
    if searches:
        out.append("")
        out.append("ATP β searches (held-out calibration perplexity per trial):")
        out.append("")
        for r in searches:
            curve = ", ".join(f"{c['beta']:g}: {_fmt(c['ppl'])}" for c in r["search"]["curve"])
            out.append(
                f"- {r['metric']} {r['sparsity']:.0%}: {curve} → β={r['search']['chosen']:g} "
                f"({r['search']['wall_s']:.0f} s)"
            )
    red = [r for r in runs if r["allocator"].split(":")[0] in ("uniform", "mrp") and "redundancy" in r]
    if red:
        out.append("")
        out.append("Per-block redundancy of the pruned model under Wanda scores (std over blocks; min–max):")
        out.append("")
        out.append("| metric | sparsity | uniform | mrp |")
        out.append("|---|---|---|---|")
        keyed = {(r["metric"], r["sparsity"], r["allocator"].split(":")[0]): r["redundancy"] for r in red}
        for metric in metrics:
            if metric == "magnitude":  # early magnitude rows were measured with Wanda scores: not comparable
                continue
            for s in sparsities:
                u, m = keyed.get((metric, s, "uniform")), keyed.get((metric, s, "mrp"))
                if u and m:
                    out.append(
                        f"| {metric} | {s:.0%} | {u['std']:.4f} ({u['min']:.3f}–{u['max']:.3f}) | "
                        f"{m['std']:.4f} ({m['min']:.3f}–{m['max']:.3f}) |"
                    )
    return "\n".join(out)


def gblm(path: Path) -> str:
    rows = {r["key"]: r for r in _rows(path)}
    out = []
    ref = rows.get("reference")
    if ref:
        out.append(
            f"Parameters {ref['params']:,} ({ref['prunable']:,} prunable). Reference design: weights "
            f"{ref['weights_gb']:.2f} GB + full gradients {ref['full_grads_gb']:.2f} GB + accumulators "
            f"{ref['accumulators_gb']:.2f} GB = {ref['total_gb']:.2f} GB; ours: weights + "
            f"{ref['ours_accumulators_gb']:.2f} GB of accumulators + one gradient at a time."
        )
        out.append("")
    out.append("| job | wall (s) | peak RSS (GB) | RSS before (GB) |")
    out.append("|---|---|---|---|")
    for key in ("fwdbwd", "grad|l1|False", "grad|l1|True", "grad|l2|False"):
        r = rows.get(key)
        if r and "wall_s" in r:
            out.append(
                f"| {key.replace('|', ' ')} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['rss_before_gb']:.2f} |"
            )
    out.append("")
    out.append("| metric | pattern | sparsity | achieved | ppl |")
    out.append("|---|---|---|---|---|")
    for key, r in rows.items():
        if key.startswith("prune") and "ppl" in r:
            out.append(f"| {r['metric']} | {r['pattern']} | {r['sparsity']:g} | {r['achieved']:.6f} | {r['ppl']:.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    kind, path = sys.argv[1], Path(sys.argv[2])
    print(allocators(path) if kind == "allocators" else gblm(path))
