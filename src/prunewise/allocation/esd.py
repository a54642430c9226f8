"""Empirical spectral density (ESD) of a weight matrix and its power-law exponent.

Paper: Lu et al., "AlphaPruning: Using Heavy-Tailed Self Regularization Theory for Improved
Layer-wise Pruning of Large Language Models", NeurIPS 2024. Reference implementation:
haiquanlu/AlphaPruning ``lib/esd_utils.py`` (``net_esd_estimator``), itself after WeightWatcher.

The eigenvalues of ``W^T W`` are ``lambda = sigma^2`` (squared singular values, ascending, no
normalisation). For a candidate cut index ``i`` (0-based, ascending) with ``xmin = lambda_i`` and
tail size ``n = N - i``, the Hill / maximum-likelihood exponent is

    alpha(i) = 1 + n / (sum_{k >= i} ln lambda_k - n ln lambda_i)

and its Kolmogorov-Smirnov distance ``D(i) = max_k |1 - (lambda_{i+k}/lambda_i)^(1-alpha) - k/n|``
(only when ``alpha > 1``; otherwise ``D = 1``). The fitted exponent is ``alpha`` at the candidate
with the smallest ``D``. Candidates, by ``fit``:

- ``xmin_peak`` (the paper's PL_Alpha_Hill, default): histogram ``log10 lambda`` into 100 equal
  bins; ``peak`` = 10^(left edge of the fullest bin); candidates ``0.95 peak <= lambda_i <= 1.5 peak``.
- ``xmin_mid``: the single candidate ``i = N // 2``.
- ``full``: every ``i`` from 0 to ``N - 2`` (WeightWatcher's scan).

Deviations from reference:
- the reference compares ``lambda_i`` with ``log10(0.95 peak)`` (a unit mix-up that leaves the
  lower bound almost inactive); ``faithful_log10=True`` reproduces it, the default uses
  ``0.95 peak``. If no eigenvalue falls in the corrected window, the candidates are those up to
  ``1.5 peak`` (the reference's effective set);
- eigenvalues that are exactly zero are dropped before the fit (their logarithm is undefined;
  the reference keeps them and produces ``nan``/``inf`` terms that never win the KS minimum).
"""

from __future__ import annotations

import math

import torch

FITS = ("xmin_peak", "xmin_mid", "full")


def eigenvalues(weight: torch.Tensor) -> torch.Tensor:
    """Ascending eigenvalues of ``W^T W`` (squared singular values), computed in float64."""
    sv = torch.linalg.svdvals(weight.detach().to(torch.float64))
    return torch.sort(sv.square()).values


def hill_fit(lam: torch.Tensor, candidates: torch.Tensor) -> tuple[float, float, int]:
    """``(alpha, D, index)`` of the candidate cut with the smallest KS distance."""
    lam = lam.to(torch.float64)
    n_all = lam.numel()
    logs = lam.log()
    tail_sums = torch.flip(torch.cumsum(torch.flip(logs, [0]), 0), [0])  # sum_{k>=i} ln lambda_k
    best = (0.0, 1.0, int(candidates[0]) if candidates.numel() else 0)
    for i in candidates.tolist():
        n = n_all - i
        denom = tail_sums[i].item() - n * logs[i].item()
        if n < 2 or denom <= 0:
            continue
        alpha = 1.0 + n / denom
        if alpha <= 1.0:
            continue
        ratio = lam[i:] / lam[i]
        cdf = 1.0 - ratio.pow(1.0 - alpha)
        d = (cdf - torch.arange(n, dtype=torch.float64) / n).abs().max().item()
        if d < best[1]:
            best = (alpha, d, i)
    return best


def candidates_for(lam: torch.Tensor, fit: str, faithful_log10: bool = False) -> torch.Tensor:
    n = lam.numel()
    if fit == "xmin_mid":
        return torch.tensor([n // 2])
    if fit == "full":
        return torch.arange(0, max(n - 1, 1))
    if fit != "xmin_peak":
        raise ValueError(f"unknown fit '{fit}' (choices: {', '.join(FITS)})")
    logs = lam.log10()
    lo, hi = logs.min().item(), logs.max().item()
    if hi - lo < 1e-12:
        return torch.tensor([0])
    counts = torch.histc(logs, bins=100, min=lo, max=hi)
    edge = lo + (hi - lo) * int(torch.argmax(counts)) / 100
    peak = 10.0**edge
    upper = lam <= 1.5 * peak
    lower_bound = math.log10(0.95 * peak) if faithful_log10 else 0.95 * peak
    chosen = torch.nonzero(upper & (lam >= lower_bound)).flatten()
    if chosen.numel() == 0:
        chosen = torch.nonzero(upper).flatten()
    return chosen[chosen < n - 1] if (chosen < n - 1).any() else chosen


def alpha_hill(weight_or_eigs: torch.Tensor, fit: str = "xmin_peak", faithful_log10: bool = False) -> float:
    """The power-law exponent of a matrix (2-D input) or of its eigenvalues (1-D input)."""
    lam = eigenvalues(weight_or_eigs) if weight_or_eigs.dim() == 2 else weight_or_eigs.to(torch.float64)
    lam = torch.sort(lam[lam > 0]).values
    if lam.numel() < 3:
        raise ValueError("need at least 3 non-zero eigenvalues to fit a power law")
    return hill_fit(lam, candidates_for(lam, fit, faithful_log10))[0]
