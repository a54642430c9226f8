"""DLP: Dynamic Layerwise Pruning — block sparsities from a reduction of the blocks' Wanda scores.

Paper: "DLP: Dynamic Layerwise Pruning in Large Language Models", ICML 2025 (arXiv 2505.23807).
Reference implementation: ironartisan/DLP ``lib/prune.py`` (``get_dlp_ratios``) and ``scripts/*.sh``.

From a *dense* calibration pass (dense propagation, as OWL) every linear layer gets Wanda's score
``A = |W| * a_j``. For block ``l`` the reduction ``r_l`` of all its scores together (the mean in the
code, the median in the paper) becomes an importance and then a keep ratio:

    I_l = 1 - r_l / sum_k r_k
    k_l = (I_l - min I) / (max I - min I) * 2 alpha            (in [0, 2 alpha])
    s_l = S - (k_l - mean(k))                                   (block sparsity)

so blocks whose scores are *smaller* on the whole are kept denser, the spread between blocks is
``2 alpha`` and the mean is the target. ``alpha`` defaults to the scripts' values by sparsity:
0.04 at 50%, 0.10 at 60%, 0.15 at 70%, linear between those points and held constant outside
them (the scripts give no other value). ``alpha = 0`` gives uniform sparsity. The scores are
Wanda's whatever the pruning metric, as in the reference (``prune_sparsegpt_dlp`` and
``prune_mag_dlp`` also read calibration data).

The repository ships the ratios it computed for LLaMA-7B/13B and LLaMA-2-7B/13B at 70%
(``ratios/*.json``, keep ratios per block): their mean is ``1 - S`` and their spread ``2 alpha``,
the invariants this mapping keeps (checked in the tests).

Mixed N:M (``pattern=N:M``): the per-block values are rounded to ``N_b`` zeros per group of ``M``
with the mean N exact (:func:`prunewise.allocation.mixed_nm`).

Deviations from reference:
- ``reduce=mean`` (the default, the code's) or ``reduce=median`` (the paper's; the lower middle
  value for an even count, as ``torch.median``); both in float64 (the reference's mean is float32);
- the mean keep ratio is weighted by block parameters (identical to the reference's plain mean for
  equal-size blocks);
- values outside ``[0, max_sparsity]`` are clamped and the cut mass redistributed over the other
  blocks (the reference has no clamp);
- ``alpha`` between the scripts' sparsities is interpolated (the reference takes it from the
  command line);
- the reference's N:M branch (``get_dlp_structure_ratios``) rounds integer shifts of N per block
  independently (the mean N drifts); here the rounding keeps the mean N exact.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import ALLOCATORS, Range, number_or_auto
from .profile import Profile, block_clamp, layer_scores, mixed_nm

# (sparsity, alpha) from the reference's scripts; alpha is interpolated between these points.
ALPHAS = ((0.5, 0.04), (0.6, 0.10), (0.7, 0.15))
REDUCTIONS = ("mean", "median")


def default_alpha(sparsity: float, table: tuple[tuple[float, float], ...] = ALPHAS) -> float:
    """``alpha`` for ``sparsity``: the table's value, linear between its points, constant outside."""
    if sparsity <= table[0][0]:
        return table[0][1]
    for (s0, a0), (s1, a1) in zip(table, table[1:]):
        if sparsity <= s1:
            return a0 + (a1 - a0) * (sparsity - s0) / (s1 - s0)
    return table[-1][1]


def block_reductions(profile: Profile, reduce: str) -> list[float]:
    """``r_l``: the mean (or median) of all Wanda scores of each block, in float64."""
    out = []
    for b in range(profile.num_blocks):
        scores = torch.cat([layer_scores(profile, x.name, "wanda") for x in profile.layers if x.block == b])
        scores = scores.double()
        out.append(float(scores.mean() if reduce == "mean" else scores.median()))
    return out


def scaled_importance(values: list[float], spread: float, what: str) -> list[float] | None:
    """Importance ``1 - v / sum(v)`` min-max scaled to ``[0, spread]`` (DLP's and LSA's), or None when
    it cannot tell the values apart (or ``spread`` is 0): the allocation is then uniform."""
    total = sum(values)
    if total <= 0:
        raise ConfigError(f"{what}: every value it allocates by is 0")
    imp = [1.0 - v / total for v in values]
    lo, hi = min(imp), max(imp)
    if hi - lo < 1e-15 or spread == 0.0:
        return None
    return [(i - lo) / (hi - lo) * spread for i in imp]


def importance_map(
    values: list[float], profile: Profile, sparsity: float, spread: float, max_sparsity: float, what: str
) -> list[float]:
    """Per-block sparsities from :func:`scaled_importance`, centred (parameter-weighted) on the
    target; the more important a block, the lower its sparsity. Clamped to ``[0, max_sparsity]``
    with the cut mass redistributed."""
    k = scaled_importance(values, spread, what)
    if k is None:
        return [float(sparsity)] * len(values)
    sizes = profile.block_sizes()
    mean_k = sum(v * p for v, p in zip(k, sizes)) / sum(sizes)
    return block_clamp([sparsity - (v - mean_k) for v in k], profile, sparsity, 0.0, max_sparsity)


@ALLOCATORS.register(
    "dlp",
    rank=5,
    summary="lower sparsity for blocks whose Wanda scores are smaller on the whole (dense calibration pass)",
    paper="DLP: Dynamic Layerwise Pruning in LLMs, ICML 2025, arXiv 2505.23807",
    needs=("weights", "dense_input_norm"),
    nm=True,
    ranges={"alpha": Range(ge=0, le=0.5), "max_sparsity": Range(gt=0, lt=1)},
    choices={"reduce": REDUCTIONS},
)
def allocate(
    profile: Profile,
    sparsity: float,
    *,
    alpha: float | str = "auto",
    reduce: str = "mean",
    max_sparsity: float = 0.99,
) -> dict[str, float]:
    alpha = number_or_auto("dlp", "alpha", alpha, lambda: default_alpha(sparsity))
    ALLOCATORS.get("dlp").check({"alpha": alpha, "reduce": reduce, "max_sparsity": max_sparsity})
    values = importance_map(block_reductions(profile, reduce), profile, sparsity, 2 * alpha, max_sparsity, "dlp")
    if profile.pattern.is_nm:
        values = mixed_nm(values, profile, "dlp")
    return profile.per_block(values)
