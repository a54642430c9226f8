"""ATP: layer sparsities that rise with depth as an arithmetic progression.

Paper: Huang et al., "Determining Layer-wise Sparsity for Large Language Models Through a
Theoretical Perspective", ICML 2025 (arXiv 2502.14770). Reference implementation:
wzhuang-xmu/ATP ``lib/prune.py`` and ``search.sh``.

Pruning early blocks raises the reconstruction error of every later block, so sparsity should
grow with depth. With ``L`` blocks and target ``S`` (0-based block ``i``):

    s_i = S - beta (L - 1) / 2 + beta i

one ratio per block, applied to all its matrices. ``beta = 0`` is uniform. The valid range keeps
every block in ``[0, 1)``: ``0 <= beta <= 2S/(L-1)`` and ``beta < 2(1-S)/(L-1)``; outside it the
allocator fails and prints the range.

``beta=auto`` (the default, the paper's protocol) is a grid search — ``step``, ``2 step``, ... up to
the largest valid ``beta`` — that prunes the model with each candidate and keeps the one with the
lowest perplexity on ``heldout`` windows of the *calibration* text that the calibration set does
not overlap. It is this allocator's driver (:func:`search`), which prunes trial models through
the planner's :class:`~prunewise.allocation.planner.Trials`; the whole curve goes into the run
record.

Mixed N:M (``pattern=N:M``, the paper's mixed N:8 extension, not in the released code): the
per-block values are rounded to ``N_i`` zeros per group of ``M`` with the mean N exact.

Deviations from reference:
- the offset is parameter-weighted (``S - beta * sum_i i P_i / sum_i P_i``), identical to the
  reference for equal-size blocks and exact on the global target otherwise;
- the reference accepts ``beta`` equal to ``2(1-S)/(L-1)``, which prunes the last block to 100%;
  here sparsities must stay below 1, so that bound is excluded;
- the reference selects ``beta`` by perplexity on the WikiText-2 *test* split, the number it then
  reports; ``beta=auto`` here selects on held-out calibration text and never sees the evaluation
  text.
"""

from __future__ import annotations

import logging
import time

from ..errors import ConfigError
from ..registry import ALLOCATORS, Range
from .cost import Work, prune_cost
from .profile import Profile, check_allocation, mixed_nm

log = logging.getLogger(__name__)


def _depth_mean(profile: Profile) -> float:
    sizes = profile.block_sizes()
    return sum(i * p for i, p in enumerate(sizes)) / sum(sizes)


def beta_range(profile: Profile, sparsity: float) -> tuple[float, float]:
    """``(largest valid beta, whether that bound itself is valid)``."""
    last = profile.num_blocks - 1
    if last == 0:
        return 0.0, True
    centre = _depth_mean(profile)
    low_bound = sparsity / centre  # first block reaches 0
    high_bound = (1.0 - sparsity) / (last - centre)  # last block reaches 1 (excluded)
    return (low_bound, True) if low_bound < high_bound else (high_bound, False)


def beta_grid(profile: Profile, sparsity: float, step: float) -> list[float]:
    """The search grid: ``step, 2 step, ...`` while valid (``search.sh``)."""
    if step <= 0:
        raise ConfigError(f"atp: step must be > 0, got {step}")
    bound, inclusive = beta_range(profile, sparsity)
    out, k = [], 1
    while k * step < bound + (1e-12 if inclusive else -1e-12):
        out.append(round(k * step, 12))
        k += 1
    return out


def progression(profile: Profile, sparsity: float, beta: float) -> list[float]:
    """The per-block sparsities ``s_i = first + beta i`` with parameter-weighted mean ``sparsity``."""
    bound, inclusive = beta_range(profile, sparsity)
    if beta < 0 or beta > bound or (beta == bound and not inclusive and beta > 0):
        close = "]" if inclusive else ")"
        raise ConfigError(
            f"atp: beta={beta:g} is outside the valid range [0, {bound:.6g}{close} for sparsity {sparsity:g} "
            f"over {profile.num_blocks} blocks"
        )
    first = sparsity - beta * _depth_mean(profile)
    return [min(max(first + beta * i, 0.0), 1.0) for i in range(profile.num_blocks)]


def search(
    profile: Profile,
    sparsity: float,
    trials,
    *,
    progress: bool = True,
    beta: float | str = "auto",
    step: float = 0.002,
    heldout: int = 16,
) -> tuple[dict[str, float], dict]:
    """Grid-search ``beta`` by perplexity on held-out calibration windows (``beta=auto``).

    Every candidate prunes the model exactly as the run will; the candidate ``0`` (uniform) is
    always scored, so the search never does worse than uniform on the held-out text.
    """
    grid = [0.0] + beta_grid(profile, sparsity, step)
    start = time.perf_counter()
    allocations = [allocate(profile, sparsity, beta=b, step=step, heldout=heldout) for b in grid]
    for allocation in allocations:
        check_allocation("atp", profile, allocation, sparsity)
    ppls = trials.score(allocations, heldout, progress)  # one trial per beta, in parallel on an executor
    curve = [{"beta": b, "ppl": ppl} for b, ppl in zip(grid, ppls)]
    best = min(curve, key=lambda c: (c["ppl"], c["beta"]))
    log.info("atp: beta=%g chosen (held-out ppl %.3f over %d trials)", best["beta"], best["ppl"], len(curve))
    record = {
        "parameter": "beta",
        "chosen": best["beta"],
        "criterion": "perplexity on held-out calibration windows",
        "heldout": trials.heldout(heldout),
        "curve": curve,
        "wall_s": time.perf_counter() - start,
    }
    return allocate(profile, sparsity, beta=best["beta"], step=step, heldout=heldout), {"search": record}


def _driver_for(params: dict):
    return search if params["beta"] == "auto" else None


def _search_cost(ctx, rates, sparsity: float, params: dict, mode: str):
    """What :func:`search` will do, for a dry run's preview (:mod:`prunewise.allocation.cost`)."""
    n = 1 + len(beta_grid(ctx.profile, sparsity, params["step"]))
    each = prune_cost(ctx, rates, mode) + rates.passes(params["heldout"])
    top, _ = beta_range(ctx.profile, sparsity)
    return Work(
        f"atp search: {n} trial prunings with {ctx.metric.name}, each scored on {params['heldout']} held-out windows",
        n * each,
        f"atp:beta=NUMBER skips the search (valid here: 0 to {top:.4f})",
    )


@ALLOCATORS.register(
    "atp",
    rank=3,
    summary="sparsity rising with depth as an arithmetic progression (beta searched on held-out calibration text)",
    paper="Huang et al., ATP, ICML 2025, arXiv 2502.14770",
    needs=(),
    nm=True,
    driver_for=_driver_for,
    driver_cost=_search_cost,
    ranges={"beta": Range(ge=0), "step": Range(gt=0), "heldout": Range(ge=1)},
)
def allocate(
    profile: Profile, sparsity: float, *, beta: float | str = "auto", step: float = 0.002, heldout: int = 16
) -> dict[str, float]:
    if heldout < 1:
        raise ConfigError(f"atp: heldout must be >= 1 window, got {heldout}")
    if isinstance(beta, str) and beta != "auto":
        raise ConfigError(f"atp: beta must be a number or 'auto', got '{beta}'")
    if isinstance(beta, str):
        raise ConfigError(
            f"atp: beta={beta} is chosen by a search that prunes and evaluates the model (its driver, "
            "atp.search); run it through prunewise.plan / prunewise.run / `prunewise prune`, or pass a number"
        )
    values = progression(profile, sparsity, float(beta))
    if profile.pattern.is_nm:
        values = mixed_nm(values, profile, "atp")
    return profile.per_block(values)
