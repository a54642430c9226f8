"""OWL: Outlier Weighed Layerwise sparsity — blocks with more outlier scores are pruned less.

Paper: Yin, Wu, Liu, Jaiswal, Zhang, Pechenizkiy, Wang, Liu, "Outlier Weighed Layerwise Sparsity
(OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024 (arXiv 2310.05175).
Reference implementation: luuyin/OWL ``lib/prune_all.py`` (``prune_wanda_outlier``,
``check_outlier_mean``).

From a *dense* calibration pass (no pruning, dense propagation) every linear layer gets Wanda's
score ``A = |W| * a_j``. For block ``l`` the outlier ratio ``D_l`` is the percentage of the block's
scores (all its matrices together, so the larger MLP matrices dominate the mean) above ``m``
times their mean. Then

    n_l = (D_l - min D) / (max D - min D) * 2 lam          (in [0, 2 lam])
    s_l = s - (n_l - mean(n))

so more outliers mean lower sparsity and the spread between blocks is ``2 lam``. The scores are
Wanda's whatever the pruning metric, as in the reference (``magnitude_owl`` and
``sparsegpt_owl`` also read calibration data). ``lam = 0`` gives uniform sparsity.

Mixed N:M (``pattern=N:M``): the same per-block values are rounded to ``N_b`` zeros per group of
``M`` with the mean N preserved exactly (:func:`prunewise.allocation.mixed_nm`).

Deviations from reference:
- ``mean(n)`` is weighted by block parameters (identical to the reference's plain mean when the
  blocks have equal size, as in every decoder-only LLM), so the global target holds exactly;
- values outside ``[0, max_sparsity]`` are clamped and the cut mass redistributed over the other
  blocks (the reference sets ``s_l <= 0`` to 0.01, which breaks the budget, and has no upper clamp);
- the reference's N:M branch maps the outlier ratios to integer shifts of N with its own spread
  ``Lamda`` in units of N, then rounds each block independently (the mean N drifts); here the
  spread stays ``2 lam`` in sparsity units (``5:8`` with the README's ``Lamda=2`` is ``lam=0.125``)
  and the rounding keeps the mean N exact.
"""

from __future__ import annotations

import torch

from ..registry import ALLOCATORS, Range
from .profile import Profile, block_clamp, layer_scores, mixed_nm


def outlier_ratios(profile: Profile, m: float) -> list[float]:
    """``D_l``: percentage of each block's Wanda scores above ``m`` times the block's mean score."""
    ratios = []
    for b in range(profile.num_blocks):
        scores = torch.cat([layer_scores(profile, x.name, "wanda") for x in profile.layers if x.block == b])
        threshold = m * float(scores.sum(dtype=torch.float64)) / scores.numel()
        ratios.append(100.0 * int((scores > threshold).sum()) / scores.numel())
    return ratios


def map_ratios(
    ratios: list[float], profile: Profile, sparsity: float, lam: float, max_sparsity: float = 0.99
) -> list[float]:
    """OWL's map of outlier ratios to per-block sparsities (parameter-weighted mean = ``sparsity``)."""
    lo, hi = min(ratios), max(ratios)
    if hi - lo < 1e-12 or lam == 0.0:
        return [float(sparsity)] * len(ratios)
    n = [(d - lo) / (hi - lo) * 2 * lam for d in ratios]
    sizes = profile.block_sizes()
    mean_n = sum(v * p for v, p in zip(n, sizes)) / sum(sizes)
    values = [sparsity - (v - mean_n) for v in n]
    return block_clamp(values, profile, sparsity, 0.0, max_sparsity)


@ALLOCATORS.register(
    "owl",
    rank=1,
    summary="lower sparsity for blocks with more outlier Wanda scores (dense calibration pass)",
    paper="Yin et al., OWL, ICML 2024, arXiv 2310.05175",
    needs=("weights", "dense_input_norm"),
    nm=True,
    ranges={"m": Range(gt=0), "lam": Range(ge=0, le=0.5), "max_sparsity": Range(gt=0, le=1)},
)
def allocate(
    profile: Profile, sparsity: float, *, m: float = 5.0, lam: float = 0.08, max_sparsity: float = 0.99
) -> dict[str, float]:
    ALLOCATORS.get("owl").check({"m": m, "lam": lam, "max_sparsity": max_sparsity})
    values = map_ratios(outlier_ratios(profile, m), profile, sparsity, lam, max_sparsity)
    if profile.pattern.is_nm:
        values = mixed_nm(values, profile, "owl")
    return profile.per_block(values)
