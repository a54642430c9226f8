"""Planning: the per-layer sparsity targets of a run, from its allocator, in one place.

:func:`make_plan` builds the :class:`Profile` (every prunable layer of the block source), fills
the statistics the allocator declared (:mod:`prunewise.allocation.statistics`), and calls the
allocator — or, for settings that must prune trial models (ATP's ``beta=auto`` search, MRP's
``stats=dynamic`` rounds), the allocator's registered *driver*. An allocator declares a driver
with ``driver_for=fn(bound params) -> driver or None`` in the registry; a driver is
``driver(profile, sparsity, trials, progress=..., **params) -> (allocation, details)`` and may
only touch the model through :class:`Trials`. No allocator name appears outside its own module.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..model.layers import weight_matrix
from ..registry import ALLOCATORS
from .cost import Rates, Work
from .profile import LayerInfo, Profile, check_allocation
from .statistics import STATISTICS, StatContext, provide, shared_dense_pass


@dataclass
class Plan:
    """The per-layer targets of a run and how they were found."""

    profile: Profile
    allocation: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)  # what a driver adds: {"search": ...} or {"rounds": ...}
    wall_s: float = 0.0


@dataclass
class Trials:
    """What an allocator driver may do with the model. ``prune(allocation)`` prunes it exactly as
    the run will (metric, pattern, mode, calibration set) starting from the dense weights;
    ``perplexity(windows)`` scores the current model on that many held-out windows of the
    calibration text (never the evaluation text); ``heldout(windows)`` describes those windows for
    the record; ``remeasure(profile, needs=None)`` refills the profile's statistics (those the run's
    allocator needs, or ``needs``) from the current model;
    ``restore()`` gives the dense weights back; :meth:`score` scores many allocations at once, on
    an executor's workers when ``parallel`` is given (``prunewise prune --executor ray``)."""

    prune: Callable[[dict[str, float]], None]
    perplexity: Callable[[int], float]
    heldout: Callable[[int], dict[str, Any]]
    remeasure: Callable[..., None]
    restore: Callable[[], None]
    parallel: Callable[[list[dict[str, float]], int], list[float]] | None = None

    def score(self, allocations: list[dict[str, float]], windows: int, progress: bool = True) -> list[float]:
        """Held-out perplexity of the model pruned with each allocation; the model is dense after."""
        if self.parallel is not None:
            return self.parallel(allocations, windows)
        out = []
        for allocation in tqdm(allocations, desc="trials", unit="trial", disable=not progress):
            self.prune(allocation)
            out.append(self.perplexity(windows))
            self.restore()
        return out


def build_profile(source) -> Profile:
    """Every prunable linear layer of ``source`` (full name, block, size, shape), in model order."""
    layers = []
    for i, name, module in source.all_linears():
        shape = tuple(weight_matrix(module).shape)
        layers.append(LayerInfo(name, i, shape[0] * shape[1], shape))
    if not layers:
        raise ValueError(f"the blocks at '{source.path}' contain no linear layers")
    return Profile(layers)


def allocator_needs(name: str, params: dict[str, Any], metric: str) -> tuple[str, ...]:
    """The statistics an allocator needs (some depend on its parameters and the run's metric)."""
    entry = ALLOCATORS.get(name)
    needs_for = entry.needs_for
    return tuple(needs_for(params, metric)) if needs_for else entry.needs


def driver_of(name: str, params: dict[str, Any]):
    """The allocator's driver for these parameters (it prunes trial models), or None."""
    driver_for = ALLOCATORS.get(name).driver_for
    return driver_for(params) if driver_for else None


def allocate(name: str, params: dict[str, Any], profile: Profile, sparsity: float) -> dict[str, float]:
    """The allocator's targets, checked against the contract (all layers, [0, 1), mean = target)."""
    result = ALLOCATORS.get(name).fn(profile, sparsity, **params)
    check_allocation(name, profile, result, sparsity)
    return result


def make_plan(
    ctx: StatContext, name: str, params: dict[str, Any], sparsity: float, trials: Trials | None = None
) -> Plan:
    """Fill ``ctx.profile`` with the allocator's statistics and allocate (through its driver if it has one)."""
    start = time.perf_counter()
    profile = ctx.profile
    ctx.allocator_params = params
    profile.stats.update(provide(allocator_needs(name, params, profile.metric), ctx))
    driver = driver_of(name, params)
    if driver is None:
        return Plan(profile, allocate(name, params, profile, sparsity), {}, time.perf_counter() - start)
    if trials is None:
        raise ValueError(
            f"allocator '{name}' with these settings prunes trial models; run it through "
            "prunewise.plan / prunewise.run / `prunewise prune`"
        )
    try:
        allocation, details = driver(profile, sparsity, trials, progress=ctx.progress, **params)
    finally:
        trials.restore()
    check_allocation(name, profile, allocation, sparsity)
    return Plan(profile, allocation, details, time.perf_counter() - start)


def preview(ctx: StatContext, name: str, params: dict, sparsity: float, mode: str = "two-pass") -> list[Work]:
    """The heavy steps of planning allocator ``name`` on ``ctx`` (nothing is computed but two timings)."""
    rates = Rates(ctx)
    ctx.allocator_params = params
    needs = list(allocator_needs(name, params, ctx.metric.name))
    driver = driver_of(name, params) is not None
    if driver:  # trial prunings compute the metric's own statistics (gradients) too, once
        needs += [n for n in ctx.metric.needs if n in STATISTICS and n not in needs]
    shared = shared_dense_pass(tuple(needs), ctx)  # computed in one pass: announced as the costliest of them
    costs = {n: STATISTICS.get(n).cost for n in needs}
    each = {n: cost(ctx, rates) for n, cost in costs.items() if cost}
    works = [w for n, w in each.items() if w is not None and n not in shared]
    if shared:
        top = max((each[n] for n in shared), key=lambda w: w.seconds or 0.0)
        works.append(Work(f"{top.what} (one pass for {' and '.join(shared)})", top.seconds, top.cheaper))
    if driver:
        works.append(ALLOCATORS.get(name).driver_cost(ctx, rates, sparsity, params, mode))
    return works
