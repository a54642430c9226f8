"""MRP: Maximum Redundancy Pruning — prune the most redundant block until redundancy is uniform.

Paper: Gao et al., "Maximum Redundancy Pruning: A Principle-Driven Layerwise Sparsity Allocation
for LLMs", arXiv 2503.18377. **No public code exists: this is a reconstruction** from the paper's
abstract (methods.md §3.5), with every unverified choice a hyper-parameter.

The abstract fixes: non-uniform, metric-dependent sparsity; the pruned model should have uniform
layerwise redundancy; the algorithm is iterative and at each step prunes the most redundant layer,
the one with the highest *non-outlier ratio* under the chosen pruning metric.

Reconstruction (``granularity=block``; ``matrix`` makes every linear layer its own unit):

- the score of a weight is the metric's: ``|W|`` for magnitude, Wanda's ``|W| * a_j`` (from a dense
  calibration pass) for Wanda, and — as a proxy, since SparseGPT's ``w^2 / [H^-1]_jj`` would need
  every Hessian at once — also for SparseGPT and GBLM (``score=magnitude|wanda`` overrides);
- an outlier scores more than ``m`` times the mean score of its unit (OWL's definition), and a
  unit's redundancy at sparsity ``s_u`` is its non-outlier ratio among the weights that remain
  (the ``(1 - s_u)`` fraction with the highest scores): ``R_u = 1 - outliers / remaining``;
- ``threshold=dense`` (default) fixes ``m * mean`` on the dense unit. Pruning removes the lowest
  scores, never outliers, so ``R_u`` falls as the unit is pruned and the loop balances itself; at
  the end every unit has the same redundancy, i.e. keeps weights in proportion to its outliers.
  ``threshold=remaining`` recomputes the mean over the remaining weights, the literal reading of
  "non-outlier ratio of the current sparse model"; on SmolLM2 that ratio *rises* with sparsity up
  to about 60% for both magnitude and Wanda scores, so the loop runs away (it prunes one unit
  until it saturates) — offered for study, not as a default;
- every unit starts at ``start`` (``auto``: 0.1 below the target, the "start from a low uniform
  sparsity" of the method's summaries; ``0`` lets the loop place the whole budget); then the unit
  with the largest ``R_u`` (ties: the least pruned, then the earliest) is raised by ``step`` of
  its parameters, never above ``max_sparsity``, the last step truncated so the
  parameter-weighted mean lands exactly on the target.

``stats=static`` (default) computes the scores once on the dense model. ``stats=dynamic`` places
the budget in ``rounds`` equal parts (from ``start`` to the target); between parts the model is
pruned with the allocation so far (the run's metric) and the scores are re-measured on that sparse
model — its weights and the input norms of a dense-propagated pass through it; pruned weights score
0 and the outlier threshold is relative to the mean of the unpruned ones. It is this allocator's
driver (:func:`dynamic`), which prunes through the planner's
:class:`~prunewise.allocation.planner.Trials`, and costs ``rounds - 1`` extra prunes and
calibration passes. Each unit's sorted scores are summarised by
``4096`` quantile knots with exact prefix sums, so memory does not grow with model size; the
redundancy is interpolated between knots (relative error below 1/4096 of a unit's weights).

Deviations from reference: no reference exists; the knobs' defaults (``m=5`` from OWL,
``step=0.01``, ``start=auto``, ``threshold=dense``) are this reconstruction's choices, not the
paper's values; the dynamic variant re-measures between ``rounds``, not after every step.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..registry import ALLOCATORS, Range
from .cost import Work, prune_cost
from .profile import Profile, block_profile, layer_scores

KNOTS = 4096
SCORES = ("auto", "magnitude", "wanda")
GRANULARITIES = ("block", "matrix")
THRESHOLDS = ("dense", "remaining")
STATS = ("static", "dynamic")


def score_kind(score: str, metric: str) -> str:
    if score != "auto":
        return score
    return "magnitude" if metric == "magnitude" else "wanda"


class _Summary:
    """Sorted scores of one unit as quantile knots: ``rank(t)`` and ``sum of the j lowest``."""

    def __init__(self, scores: torch.Tensor, m: float, threshold: str):
        # numpy's sort (SIMD on x86) is 10x torch's on CPU; a sorted array is the same whatever sorts it
        s = torch.from_numpy(np.sort(scores.detach().cpu().double().numpy()))
        self.n = s.numel()
        self.m = m
        self.threshold = threshold
        self.total = float(s.sum())
        ranks = np.unique(np.linspace(0, self.n, KNOTS + 1).round().astype(np.int64))
        csum = torch.cat([torch.zeros(1, dtype=torch.float64), s.cumsum(0)]).numpy()
        self.ranks = ranks.astype(np.float64)
        self.prefix = csum[ranks]
        self.values = s.numpy()[np.minimum(ranks, self.n - 1)]  # the value at each knot's rank
        alive = int((s > 0).sum())  # pruned weights score 0: the mean is over the unpruned ones
        self.dense_cut = self._at_or_below(m * self.total / max(alive, 1))

    def _at_or_below(self, t: float) -> float:
        return float(np.interp(t, self.values, self.ranks, left=0.0, right=self.n))

    def redundancy(self, sparsity: float) -> float:
        j = sparsity * self.n
        remaining = self.n - j
        if remaining <= 0:
            return 0.0
        if self.threshold == "dense":
            cut = self.dense_cut
        else:
            mean = (self.total - float(np.interp(j, self.ranks, self.prefix))) / remaining
            cut = self._at_or_below(self.m * mean)
        return 1.0 - (self.n - max(j, cut)) / remaining


def redundancies(
    profile: Profile,
    allocation: dict[str, float],
    *,
    m: float = 5.0,
    kind: str = "wanda",
    granularity: str = "block",
    threshold: str = "dense",
) -> list[float]:
    """Per-unit redundancy of ``allocation`` under the static scores (what MRP equalises)."""
    return [
        _summary(profile, names, kind, m, threshold).redundancy(allocation[names[0]])
        for names, _ in _units(profile, granularity)
    ]


def _summary(profile: Profile, names: list[str], kind: str, m: float, threshold: str) -> _Summary:
    return _Summary(torch.cat([layer_scores(profile, x, kind) for x in names]), m, threshold)


def _units(profile: Profile, granularity: str) -> list[tuple[list[str], int]]:
    if granularity == "matrix":
        return [([x.name], x.numel) for x in profile.layers]
    units: list[tuple[list[str], int]] = [([], 0) for _ in range(profile.num_blocks)]
    for x in profile.layers:
        names, size = units[x.block]
        names.append(x.name)
        units[x.block] = (names, size + x.numel)
    return units


def _needs(params: dict, metric: str) -> tuple[str, ...]:
    kind = score_kind(params.get("score", "auto"), metric)
    return ("weights", "dense_input_norm") if kind == "wanda" else ("weights",)


@dataclass(frozen=True)
class Params:
    """MRP's hyper-parameters, as :func:`allocate` takes them (the registry reads their defaults
    there)."""

    m: float = 5.0
    step: float = 0.01
    start: float | str = "auto"
    threshold: str = "dense"
    score: str = "auto"
    granularity: str = "block"
    max_sparsity: float = 0.99
    stats: str = "static"
    rounds: int = 4

    def first_level(self, sparsity: float) -> float:
        """Check the hyper-parameters (those that depend on the target here, the rest by the
        registry's rules); return the starting sparsity."""
        ALLOCATORS.get("mrp").check({k: v for k, v in dataclasses.asdict(self).items() if k != "start"})
        start = max(sparsity - 0.1, 0.0) if self.start == "auto" else self.start
        if isinstance(start, str) or not 0 <= start <= sparsity:
            raise ConfigError(f"mrp: start must be 'auto' or in [0, target sparsity {sparsity:g}], got {start}")
        if not sparsity <= self.max_sparsity < 1:
            raise ConfigError(f"mrp: max_sparsity must be in [target, 1), got {self.max_sparsity}")
        return float(start)


def fill(profile: Profile, sparsity: float, levels: dict[str, float] | None, params: Params) -> dict[str, float]:
    """The greedy loop from ``levels`` (per layer; ``None``: every unit at ``start``) up to ``sparsity``,
    with the scores in ``profile`` (dense, or those of the current sparse model)."""
    first = params.first_level(sparsity)
    kind = score_kind(params.score, profile.metric)
    units = _units(profile, params.granularity)
    summaries = [_summary(profile, names, kind, params.m, params.threshold) for names, _ in units]
    sizes = [size for _, size in units]
    level = [float(levels[names[0]]) if levels else first for names, _ in units]
    budget = sparsity * sum(sizes) - sum(lv * n for lv, n in zip(level, sizes))
    if budget < -1e-9 * sum(sizes):
        raise ConfigError(f"mrp: the starting levels already exceed the target {sparsity:g}")
    red = [s.redundancy(lv) for s, lv in zip(summaries, level)]
    tol = 1e-12 * sum(sizes)
    top = params.max_sparsity
    while budget > tol:
        open_units = [u for u in range(len(units)) if level[u] < top - 1e-12]
        u = max(open_units, key=lambda k: (red[k], -level[k], -k))
        inc = min(params.step, top - level[u], budget / sizes[u])
        level[u] += inc
        budget -= inc * sizes[u]
        red[u] = summaries[u].redundancy(level[u])
    return {x: level[u] for u, (names, _) in enumerate(units) for x in names}


def dynamic(
    profile: Profile, sparsity: float, trials, *, progress: bool = True, **params
) -> tuple[dict[str, float], dict]:
    """``stats=dynamic``: the budget is placed in ``rounds`` equal parts; after each part but the
    last, the model is pruned with the allocation so far (the run's metric) and the scores are
    re-measured on that sparse model."""
    bound = Params(**params)
    first = bound.first_level(sparsity)
    rounds = bound.rounds
    levels: dict[str, float] | None = None
    history = []
    start = time.perf_counter()
    for r in tqdm(range(1, rounds + 1), desc="mrp rounds", unit="round", disable=not progress):
        goal = first + (sparsity - first) * r / rounds
        levels = fill(profile, goal, levels, bound)
        history.append({"round": r, "target": goal, "blocks": block_profile(profile, levels)})
        if r == rounds:
            break
        trials.prune(levels)
        trials.remeasure(profile)
    return levels, {"rounds": history, "rounds_wall_s": time.perf_counter() - start}


def _driver_for(params: dict):
    return dynamic if params["stats"] == "dynamic" else None


def _dynamic_cost(ctx, rates, sparsity: float, params: dict, mode: str):
    """What :func:`dynamic` will do, for a dry run's preview (:mod:`prunewise.allocation.cost`)."""
    n = params["rounds"] - 1
    remeasure = rates.passes(ctx.calib.shape[0]) if "dense_input_norm" in _needs(params, ctx.metric.name) else 0.0
    return Work(
        f"mrp rounds: {n} trial prunings with {ctx.metric.name}, statistics re-measured after each",
        n * (prune_cost(ctx, rates, mode) + remeasure),
        "mrp:stats=static measures once, on the dense model",
    )


@ALLOCATORS.register(
    "mrp",
    rank=4,
    summary="iteratively prune the most redundant block (highest non-outlier ratio) until redundancy is uniform",
    paper="Gao et al., MRP, arXiv 2503.18377 (reconstruction: no public code)",
    needs=("weights", "dense_input_norm"),
    needs_for=_needs,
    ranges={"m": Range(gt=0), "step": Range(gt=0, le=0.5), "rounds": Range(ge=1), "max_sparsity": Range(gt=0, lt=1)},
    choices={"threshold": THRESHOLDS, "stats": STATS, "score": SCORES, "granularity": GRANULARITIES},
    driver_for=_driver_for,
    driver_cost=_dynamic_cost,
)
def allocate(
    profile: Profile,
    sparsity: float,
    *,
    m: float = 5.0,
    step: float = 0.01,
    start: float | str = "auto",
    threshold: str = "dense",
    score: str = "auto",
    granularity: str = "block",
    max_sparsity: float = 0.99,
    stats: str = "static",
    rounds: int = 4,
) -> dict[str, float]:
    if stats == "dynamic":
        raise ConfigError(
            "mrp: stats=dynamic prunes and re-measures the model between rounds (its driver, "
            "mrp.dynamic); run it through prunewise.plan / prunewise.run / `prunewise prune`"
        )
    return fill(
        profile, sparsity, None, Params(m, step, start, threshold, score, granularity, max_sparsity, stats, rounds)
    )
