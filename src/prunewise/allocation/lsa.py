"""LSA: layerwise sparsity from a minimum linear-reconstruction error.

Paper: Yang, Deng, Chen, Zhou, Cheng, "LSA: Layer-wise Sparsity Allocation for Large Language
Model Pruning Based on Minimal Linear Reconstruction Error", ICLR 2026 (OpenReview xq3lza5IjN).
Reference implementation: BeiYazi0/LSA ``layersp/blk.py`` (``BlockWanda.blk_s``, ``blk_score``,
``blk_score_global``) and ``main.py``.

From a *dense* calibration pass (dense propagation) every linear layer gets SparseGPT's input
statistic ``H = (2/N) sum_n X_n X_n^T``. Its score is the reconstruction error of pruning it to a
reference sparsity ``resp`` greedily, with no weight update: in each ``block``-column slice every
row loses, one at a time, ``floor(width * resp)`` weights, each the one whose removal raises the
row's error ``e H e^T`` (``e`` the row's removed weights, earlier slices included) the least. The
layer's error ``E`` is the sum of those increments, that is ``sum_rows e H e^T`` of the chosen
mask (:func:`greedy_error`; the statistic ``reconstruction_error``).

``granularity=block`` (the code's ``lsa``): per decoder block the plain mean of its layers' errors
``r_l``, then the same map as DLP (:func:`prunewise.allocation.dlp.importance_map`):

    I_l = 1 - r_l / sum_k r_k,   k_l = minmax(I) * 2 lam,   s_l = S - (k_l - mean(k))

so blocks with larger errors are pruned *more* (their importance is lower). ``lam`` defaults to
the code's table by sparsity (``BLK.alpha``: 0.06, 0.02, 0.04, 0.02, 0.04, 0.10, 0.15, 0.12 for
10%...80%; indexed by ``floor(10 S)``).

``granularity=layer`` (the code's ``lsab`` / ``lsac``, "block-wise" / "projection-wise" in its
README): every matrix its own importance over all matrices of the model, min-max scaled by
``2 lam`` and turned into a number of pruned weights shifted by the *mean* matrix size, so that
smaller matrices move further: ``s_x = S + (mean(k) - k_x) * mean(P) / P_x``.

Mixed N:M (``pattern=N:M``, block granularity): the per-block values are rounded to ``N_b``
zeros per group of ``M`` with the mean N exact (:func:`prunewise.allocation.mixed_nm`).

Deviations from reference:
- the greedy error accumulates in float64 (the code adds float32 partial sums);
- a last column slice narrower than ``block`` prunes ``floor(width * resp)`` weights per row (the
  code prunes ``floor(block * resp)``, more than the slice holds, and adds ``inf``); no model the
  papers use has such a slice;
- ``granularity=layer`` uses ``resp`` and ``lam`` as given (the code calls the error with its
  default 0.5 whatever ``--resp`` says, and its ``lsab``/``lsac`` branches are identical because the
  attention/MLP averaging it guards checks for a name no option produces); ``lam`` there defaults
  to the code's ``--Lamda`` default, 0.08 (its README uses 0.07 for Qwen);
- the block mean is weighted by block parameters, values outside ``[0, max_sparsity]`` are
  clamped and the cut mass redistributed (the code has no clamp), both as in OWL here;
- an expert that received no calibration token has error 0 (its ``H`` is 0).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import ALLOCATORS, Range, number_or_auto
from .dlp import importance_map, scaled_importance
from .profile import Profile, clamp_to_budget, mixed_nm

# ``BLK.alpha`` of the reference by floor(10 * sparsity); index 0 is its --Lamda default.
LAMBDAS = (0.08, 0.06, 0.02, 0.04, 0.02, 0.04, 0.10, 0.15, 0.12)
GRANULARITIES = ("block", "layer")


def default_lambda(sparsity: float, granularity: str) -> float:
    if granularity == "layer":
        return LAMBDAS[0]
    return LAMBDAS[min(int(10 * sparsity + 1e-9), len(LAMBDAS) - 1)]


@torch.no_grad()
def greedy_error(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, block: int = 128, return_mask: bool = False
):
    """The reconstruction error ``sum_rows e H e^T`` of LSA's greedy mask at ``sparsity`` (see the
    module docstring), in float64; with ``return_mask`` also the mask (True = removed)."""
    w = weight.detach().float()
    h = hessian.detach().to(w.device, torch.float32)
    rows, cols = w.shape
    width = cols if block <= 0 else block
    score = w.square() * torch.diagonal(h)  # the first removal's increment, w_ij^2 H_jj
    ar = torch.arange(rows, device=w.device)
    mask = torch.zeros_like(w, dtype=torch.bool) if return_mask else None
    total = 0.0
    for c0 in range(0, cols, width):
        c1 = min(c0 + width, cols)
        part, wp = score[:, c0:c1], w[:, c0:c1]  # views: updates land in ``score``
        removed = torch.zeros_like(wp)
        for _ in range(int((c1 - c0) * sparsity)):
            j = part.argmin(dim=1)
            total += float(part[ar, j].sum(dtype=torch.float64))
            wj = wp[ar, j]
            part.add_(wp * wj[:, None] * h[c0 + j, c0:c1], alpha=2.0)
            part[ar, j] = torch.inf
            removed[ar, j] = wj
            if mask is not None:
                mask[ar, c0 + j] = True
        if c1 < cols:  # cross terms with the later columns
            score[:, c1:].add_(w[:, c1:] * (removed @ h[c0:c1, c1:]), alpha=2.0)
    return (total, mask) if return_mask else total


def _layer_values(profile: Profile, errors: dict[str, float], sparsity: float, lam: float, top: float):
    """``granularity=layer``: one importance per matrix over the whole model (``blk_score_global``)."""
    names = [x.name for x in profile.layers]
    k = scaled_importance([errors[n] for n in names], 2 * lam, "lsa")
    if k is None:
        return {n: float(sparsity) for n in names}
    mean_k = sum(k) / len(k)
    mean_p = sum(x.numel for x in profile.layers) / len(names)
    values = {x.name: sparsity + (mean_k - kx) * mean_p / x.numel for x, kx in zip(profile.layers, k)}
    return clamp_to_budget(values, profile, sparsity, 0.0, top)


def _check_pattern(params: dict, pattern) -> None:
    if params["granularity"] == "layer" and pattern.is_nm:
        raise ConfigError("lsa: granularity=layer gives every matrix its own sparsity; N:M needs granularity=block")


@ALLOCATORS.register(
    "lsa",
    rank=6,
    summary="higher sparsity for blocks whose greedy linear-reconstruction error is larger (dense pass, H)",
    paper="Yang et al., LSA, ICLR 2026 (OpenReview xq3lza5IjN)",
    needs=("reconstruction_error",),
    nm=True,
    ranges={
        "lam": Range(ge=0, le=0.5),
        "resp": Range(gt=0, lt=1),
        "block": Range(ge=0),
        "max_sparsity": Range(gt=0, lt=1),
    },
    choices={"granularity": GRANULARITIES},
    check_pattern=_check_pattern,
)
def allocate(
    profile: Profile,
    sparsity: float,
    *,
    lam: float | str = "auto",
    resp: float = 0.5,
    block: int = 128,
    granularity: str = "block",
    max_sparsity: float = 0.99,
) -> dict[str, float]:
    lam = number_or_auto("lsa", "lam", lam, lambda: default_lambda(sparsity, granularity))
    ALLOCATORS.get("lsa").check(
        {"lam": lam, "resp": resp, "block": block, "granularity": granularity, "max_sparsity": max_sparsity}
    )
    errors = profile.stats["reconstruction_error"]
    if granularity == "layer":
        _check_pattern({"granularity": granularity}, profile.pattern)
        return _layer_values(profile, errors, sparsity, lam, max_sparsity)
    per_block: list[list[float]] = [[] for _ in range(profile.num_blocks)]
    for x in profile.layers:
        per_block[x.block].append(errors[x.name])
    means = [sum(v) / len(v) for v in per_block]
    values = importance_map(means, profile, sparsity, 2 * lam, max_sparsity, "lsa")
    if profile.pattern.is_nm:
        values = mixed_nm(values, profile, "lsa")
    return profile.per_block(values)
