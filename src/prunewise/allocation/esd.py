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
  the reference keeps them and produces ``nan``/``inf`` terms that never win the KS minimum);
- the eigenvalues come from ``eigvalsh`` of the float64 Gram matrix of the smaller side
  (``W W^T`` or ``W^T W``), not from ``svdvals`` (the reference's, in float32): the same values
  (2.5x faster than a float64 SVD on SmolLM2's matrices; AlphaPruning's exponents agree with the
  float64 SVD's to 1e-13). The Gram's resolution is ``k eps lambda_max`` (``k`` its order), so
  eigenvalues below it are noise of a rank-deficient matrix: they are set to zero (then dropped).
  The reference's float32 SVD resolves no more than that.

The fit scores every candidate cut at once (a candidates x eigenvalues matrix, in chunks), with the
same float64 operations as the loop it replaced, so it picks the same cut.
"""

from __future__ import annotations

import math

import torch

FITS = ("xmin_peak", "xmin_mid", "full")


def eigenvalues(weight: torch.Tensor) -> torch.Tensor:
    """Ascending eigenvalues of ``W^T W`` (squared singular values, ``min(rows, cols)`` of them),
    computed in float64 from the Gram matrix of the smaller side."""
    w = weight.detach().to(torch.float64)
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    lam = torch.linalg.eigvalsh(gram)  # ascending
    floor = gram.shape[0] * torch.finfo(torch.float64).eps * lam[-1].clamp(min=0)
    return torch.where(lam > floor, lam, torch.zeros_like(lam))


CHUNK_ELEMENTS = 1 << 22  # candidates x eigenvalues per chunk of the KS matrix (32 MB in float64)


def hill_fit(lam: torch.Tensor, candidates: torch.Tensor) -> tuple[float, float, int]:
    """``(alpha, D, index)`` of the candidate cut with the smallest KS distance (the first of equal
    ones); ``(0.0, 1.0, first candidate)`` when no candidate has ``alpha > 1`` and ``D < 1``."""
    lam = lam.to(torch.float64)
    n_all = lam.numel()
    logs = lam.log()
    tail_sums = torch.flip(torch.cumsum(torch.flip(logs, [0]), 0), [0])  # sum_{k>=i} ln lambda_k
    best = (0.0, 1.0, int(candidates[0]) if candidates.numel() else 0)
    idx = candidates.to(torch.long).flatten()
    n = n_all - idx
    denom = tail_sums[idx] - n * logs[idx]
    alpha = 1.0 + n / denom
    ok = (n >= 2) & (denom > 0) & (alpha > 1.0)
    idx, n, alpha = idx[ok], n[ok], alpha[ok]
    cols = torch.arange(n_all)
    step = max(1, CHUNK_ELEMENTS // max(n_all, 1))
    for s in range(0, idx.numel(), step):
        i, m, a = idx[s : s + step, None], n[s : s + step, None], alpha[s : s + step, None]
        ratio = lam[None, :] / lam[i]
        cdf = 1.0 - ratio.pow(1.0 - a)
        dist = (cdf - (cols[None, :] - i).to(torch.float64) / m).abs()
        d = dist.masked_fill(cols[None, :] < i, 0.0).amax(dim=1)
        k = int(torch.argmin(d))
        if d[k].item() < best[1]:
            best = (alpha[s + k].item(), d[k].item(), int(idx[s + k]))
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
