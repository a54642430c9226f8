"""PNG plots (matplotlib, headless): the per-block sparsity profile of a run next to uniform."""

from __future__ import annotations

from pathlib import Path

PROFILE_PNG = "allocation.png"


def plot_block_profile(blocks: list[float], target: float, path: Path, title: str = "",
                       search: dict | None = None) -> Path:
    """Per-block sparsity (parameter-weighted) as bars against the uniform target; with an
    allocator search, a second panel shows its criterion over the searched values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if search else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 + 4 * (panels - 1), 3.6), squeeze=False)
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
    plt.close(fig)
    return path
