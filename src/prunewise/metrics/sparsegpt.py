"""SparseGPT: one-shot pruning with an OBS weight update.

Paper: Frantar, Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", arXiv 2301.00774 (ICML 2023). Reference implementation: IST-DASLab/sparsegpt
``sparsegpt.py`` (``SparseGPT.fasterprune``), copied into the Wanda, OWL, AlphaPruning and ATP
repos.

Algorithm, for a weight ``W [C_out, C_in]`` and ``H = (2/N) sum_n X_n X_n^T``:
1. dead inputs (``H_dd = 0``): set ``H_dd = 1`` and zero column ``d`` of ``W``;
2. damping ``H += percdamp * mean(diag H) * I`` (``percdamp = 0.01``);
3. ``U`` = upper Cholesky factor of ``H^-1`` (computed as the inverse of a reversed-order
   Cholesky factor of ``H``, :func:`inverse_cholesky`);
4. sweep the columns in blocks of ``blocksize`` (128). Unstructured: on the current,
   already-updated block choose the pruned weights jointly over the ``rows x blocksize`` block by
   ``w^2 / U_ii^2``. N:M: at every ``M``-th column choose the ``N`` lowest ``w^2 / U_ii^2`` of the
   next ``M`` columns in each row. Then for each column ``i``: ``err = (w - q) / U_ii``,
   ``W[:, i:] -= err U[i, i:]``; after the block, ``W[:, end:] -= Err U[block, end:]``.
All arithmetic in float32; the result is cast back to the weight's dtype.

Deviations from reference:
- exact counts: the reference masks scores ``<=`` the ``floor(s * rows * 128)``-th smallest in
  each block (ties over-prune); here each column block loses exactly its proportional share of
  ``round(s * numel)`` weights, chosen by index, so the matrix total is exact;
- if the Cholesky factorisation fails the damping is multiplied by 10 and retried (up to 6
  times) with a warning; the reference crashes;
- ``U`` comes from one Cholesky factorisation of ``H`` in reversed order and one triangular
  inverse instead of the reference's ``cholesky`` → ``cholesky_inverse`` → ``cholesky``: the same
  factor mathematically, equal within float32 rounding, half the arithmetic; the reversed
  ``H`` is built straight from the Gram matrix's upper triangle and freed once factored, so the
  factor's working set is 3.3 ``C_in x C_in`` matrices beyond the Gram, not 5.5 (measured,
  ``benchmarks/bench_factor.py``);
- for N:M with an ``M`` that does not divide ``blocksize``, the block size is rounded down to a
  multiple of ``M`` so no group straddles two blocks.
"""

from __future__ import annotations

import logging

import torch

from ..model.malloc import returning_freed_memory
from ..prune.masks import Pattern, lowest_in_matrix, spread_counts, target_count
from ..prune.stats import LayerStats
from ..registry import METRICS, Range

log = logging.getLogger(__name__)


def inverse_cholesky(h: torch.Tensor, percdamp: float, retries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` (``U^T U``); raise the damping tenfold
    on failure.

    Computed as the inverse of ``R = J L J``, where ``J`` reverses the order of the rows and
    ``L L^T = J H J`` is a (lower) Cholesky factorisation: then ``H = R R^T`` with ``R`` upper, so
    ``H^-1 = R^-T R^-1`` and, the factor being unique, ``U = R^-1``. One factorisation and one
    triangular inverse, where the reference's ``cholesky``, ``cholesky_inverse`` and a second
    ``cholesky`` cost twice the arithmetic (0.71× the time on a 8,960-wide Hessian here); the
    factor equals the reference's within float32 rounding (1.8e-6 of its largest entry there).
    ``h`` is left as it was."""
    return reversed_factor([h.flip(0, 1)], percdamp, retries)


def reversed_factor(holder: list[torch.Tensor], percdamp: float, retries: int = 6) -> torch.Tensor:
    """:func:`inverse_cholesky` from ``J H J``, of which only the lower triangle is read
    (:meth:`LayerStats.reversed_hessian`). The matrix is taken out of the one-element list
    ``holder`` and damped in place, so that it is freed as soon as it is factored: beyond the Gram
    matrix the statistics keep, about two and a half matrices of ``H``'s size are alive at once
    (3.3 measured in :func:`solve`), where keeping ``H`` while a copy was factored and inverted held
    5.5 (on a 28,672-wide ``down_proj`` each is 3.3 GB in float32)."""
    flipped = holder.pop()
    mean_diag = _diagonal_mean(flipped)
    damp = percdamp * mean_diag
    added = 0.0
    for attempt in range(retries + 1):
        flipped.diagonal().add_(damp - added)
        added = damp
        low, info = torch.linalg.cholesky_ex(flipped)
        if int(info) == 0:
            del flipped
            r = low.flip(0, 1)
            del low
            return upper_triangular_inverse(r)
        del low
        if attempt < retries:
            new = damp * 10 if damp > 0 else 1e-6 * max(mean_diag, 1.0)
            log.warning("SparseGPT: Hessian not positive definite with damping %.3g; retrying with %.3g", damp, new)
            damp = new
    raise RuntimeError(f"SparseGPT: Cholesky factorisation failed even with damping {damp:.3g}")


def _diagonal_mean(flipped: torch.Tensor) -> float:
    """The mean of ``H``'s diagonal from ``J H J``, summed bit for bit as ``torch.diagonal(H).mean()``:
    over a strided view in ``H``'s order (a contiguous copy is summed in another order, and the
    damping's last bit would move every mask after it)."""
    d = torch.diagonal(flipped).flip(0)
    spaced = torch.empty(2 * d.numel(), dtype=d.dtype, device=d.device)
    spaced[::2] = d
    return spaced[::2].mean().item()


def upper_triangular_inverse(r: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """``R^-1`` of an upper-triangular ``R`` with a non-zero diagonal, by halves:
    ``[[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]]`` (a triangular solve at the leaves)."""
    n = r.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=r.dtype, device=r.device)
        return torch.linalg.solve_triangular(r, eye, upper=True)
    k = n // 2
    out = torch.zeros_like(r)
    a_inv = upper_triangular_inverse(r[:k, :k], leaf)
    c_inv = upper_triangular_inverse(r[k:, k:], leaf)
    out[:k, :k] = a_inv
    out[k:, k:] = c_inv
    out[:k, k:] = torch.mm(a_inv, r[:k, k:]).neg_() @ c_inv  # contiguous halves: the strided views round differently
    return out


@METRICS.register(
    "sparsegpt",
    rank=2,
    summary="OBS solver: prunes by w^2/[H^-1]_ii and updates the remaining weights",
    paper="Frantar & Alistarh, SparseGPT, arXiv 2301.00774",
    needs=("hessian",),
    kind="solver",
    group="block",
    beats=("magnitude", "wanda"),
    ranges={"blocksize": Range(ge=1), "percdamp": Range(ge=0)},
)
def solve(
    weight: torch.Tensor,
    stats: LayerStats,
    sparsity: float,
    pattern: Pattern,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    METRICS.get("sparsegpt").check({"blocksize": blocksize, "percdamp": percdamp})
    w = weight.detach().float().clone()
    rows, cols = w.shape
    h = stats.reversed_hessian().to(w.device)  # J H J: inputs in reversed order
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead.flip(0)] = 0.0
    holder = [h]
    del h  # the factor frees it as soon as it is factored
    with returning_freed_memory():  # its C_in x C_in matrices would fragment a kept heap (streamed runs)
        u = reversed_factor(holder, percdamp)

    if pattern.is_nm:
        n, m = pattern.n, pattern.m
        if cols % m:
            raise ValueError(f"N:M pattern {n}:{m} needs the input width to be a multiple of {m}, got {cols}")
        blocksize = max(m, blocksize // m * m)
        starts = list(range(0, cols, blocksize))
        block_counts = [0] * len(starts)
    else:
        n = m = 0
        starts = list(range(0, cols, blocksize))
        sizes = [min(blocksize, cols - s) for s in starts]
        block_counts = spread_counts(target_count(sparsity, rows * cols), [rows * s for s in sizes])

    for i1, count in zip(starts, block_counts):
        i2 = min(i1 + blocksize, cols)
        u1 = u[i1:i2, i1:i2]
        d = torch.diagonal(u1)
        # Column-major copies: column i of the block is the contiguous row wt[i].
        wt = w[:, i1:i2].t().contiguous()
        if pattern.is_nm:
            maskt = torch.zeros_like(wt, dtype=torch.bool)
        else:
            maskt = lowest_in_matrix(wt.square() / d.square().unsqueeze(1), count)
        scale = maskt / d.unsqueeze(1)  # err_i = w_i * mask_i / U_ii
        errt = torch.empty_like(wt)
        for i in range(i2 - i1):
            if n and i % m == 0:
                tmp = wt[i : i + m].square() / d[i : i + m].square().unsqueeze(1)
                idx = torch.sort(tmp, dim=0, stable=True).indices[:n]
                maskt[i : i + m].scatter_(0, idx, True)
                scale[i : i + m] = maskt[i : i + m] / d[i : i + m].unsqueeze(1)
            e = torch.mul(wt[i], scale[i], out=errt[i])
            wt[i:].addr_(u1[i, i:], e, alpha=-1.0)  # OBS update of this and later columns
        w[:, i1:i2] = wt.masked_fill_(maskt, 0.0).t()  # pruned entries exactly zero
        if i2 < cols:
            w[:, i2:] -= errt.t() @ u[i1:i2, i2:]
    return w.to(weight.dtype)
