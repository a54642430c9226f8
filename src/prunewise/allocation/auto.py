"""``auto``: the allocator chosen for this model, metric, pattern and target on held-out text.

Not a paper's method: the question a practitioner asks first (*which allocator should I use on my
model?*), answered by measurement. Every candidate allocator (``candidates``: names separated by
``/``, each with its own options in brackets, ``atp[step=0.004]``, ``;`` between two; default
``all``, every registered allocator that supports the run's pattern, with its defaults) plans its
allocation; each allocation is pruned exactly as the run will prune it
(metric, pattern, mode, calibration set) and scored by perplexity on ``heldout`` windows of the
*calibration* text that the calibration set does not overlap (never the evaluation text: the
mechanism of ATP's search). The lowest score wins, ties to the earlier candidate.

Trials are shared: allocations are scored through one memo keyed by their values, so a
candidate's own search (ATP's ``beta``, scored on the same held-out windows, since ``heldout`` is
passed to every candidate that takes one) is reused rather than repeated, and candidates that give
identical allocations (uniform and ATP's ``beta=0``) are pruned once. The candidates that need no
search are scored in one batch, in parallel on Ray workers with ``--executor ray``. Every
candidate's per-block allocation and held-out score go into the run record (``allocation.auto``),
so an ``auto`` run is also a comparison table.

Deviations from reference: none (no reference implementation; the candidates' own deviations are
in their modules).
"""

from __future__ import annotations

import logging
import re
import time

from ..errors import ConfigError
from ..registry import ALLOCATORS, Range, parse_spec, suggest
from . import planner
from .cost import Work, prune_cost
from .profile import Profile, block_profile

log = logging.getLogger(__name__)
NAME = "auto"


def candidate_specs(candidates: str, nm: bool) -> list[tuple[str, dict]]:
    """The candidates as ``(name, options)``, checked: ``all`` is every registered allocator but this
    one that supports the pattern (``nm``: an N:M pattern); otherwise names separated by ``/``, each
    with options in brackets if wanted, ``;`` between them: ``uniform/owl[lam=0.1]/atp[step=0.01]``."""
    known = [e.name for e in ALLOCATORS if e.name != NAME]
    if candidates.strip().lower() == "all":
        return [(n, {}) for n in known if ALLOCATORS.get(n).nm or not nm]
    out = []
    for item in (c.strip() for c in candidates.split("/")):
        if not item:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_]+)(?:\[(.*)\])?", item)
        if match is None:
            raise ConfigError(f"auto: cannot parse candidate '{item}'; expected name or name[key=value;key=value]")
        name, options = match.group(1).lower(), match.group(2)
        if name not in known:
            raise ConfigError(
                f"auto: unknown candidate '{name}'{suggest(name, known)} (candidates are allocator names "
                f"separated by '/': {'/'.join(known)})"
            )
        if nm and not ALLOCATORS.get(name).nm:
            raise ConfigError(f"auto: candidate '{name}' does not support N:M patterns")
        out.append((name, parse_spec(f"{name}:{options.replace(';', ',')}")[1] if options else {}))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"auto: a candidate is named twice in '{candidates}'")
    if not out:
        raise ConfigError("auto: no candidate allocator")
    return out


def candidate_params(name: str, options: dict, heldout: int) -> dict:
    """A candidate's bound hyper-parameters; one that scores held-out text scores the same windows."""
    entry = ALLOCATORS.get(name)
    if "heldout" in entry.hyperparameters():
        options = {**options, "heldout": heldout}
    return entry.bind(options)


def _needs(params: dict, metric: str) -> tuple[str, ...]:
    """Every candidate's statistics, computed once before the candidates plan (with ``all``, those
    of the unstructured-only allocators too: the pattern is not known here)."""
    out: list[str] = []
    for name, options in candidate_specs(params["candidates"], False):
        needs = planner.allocator_needs(name, candidate_params(name, options, params["heldout"]), metric)
        out += [n for n in needs if n not in out]
    return tuple(out)


def _key(allocation: dict[str, float], windows: int) -> tuple:
    return (windows, *sorted(allocation.items()))


class SharedTrials:
    """``trials`` whose :meth:`score` remembers every allocation it scored (by value and window
    count) and scores only the new ones; everything else is the wrapped trials'."""

    def __init__(self, trials):
        self.trials = trials
        self.memo: dict[tuple, float] = {}
        self.pruned = 0
        self.needs: tuple[str, ...] | None = None  # the statistics of the candidate whose driver runs

    def remeasure(self, profile: Profile, needs: tuple[str, ...] | None = None) -> None:
        """Re-measure the running candidate's own statistics (not every candidate's)."""
        self.trials.remeasure(profile, self.needs if needs is None else needs)

    def __getattr__(self, name):
        return getattr(self.trials, name)

    def score(self, allocations: list[dict[str, float]], windows: int, progress: bool = True) -> list[float]:
        new: dict[tuple, dict[str, float]] = {}
        for a in allocations:
            k = _key(a, windows)
            if k not in self.memo:
                new.setdefault(k, a)
        if new:
            self.pruned += len(new)
            for k, ppl in zip(new, self.trials.score(list(new.values()), windows, progress)):
                self.memo[k] = ppl
        return [self.memo[_key(a, windows)] for a in allocations]


def choose(
    profile: Profile, sparsity: float, trials, *, progress: bool = True, candidates: str = "all", heldout: int = 16
) -> tuple[dict[str, float], dict]:
    """The driver: plan every candidate, score each allocation on the held-out windows (reusing
    trials), keep the best; ``{"auto": record}`` holds every candidate."""
    start = time.perf_counter()
    shared = SharedTrials(trials)
    specs = {
        name: candidate_params(name, options, heldout)
        for name, options in candidate_specs(candidates, profile.pattern.is_nm)
    }
    names = list(specs)
    planned = {}
    # Candidates with a driver first: their trials fill the memo the others may hit.
    for name in sorted(names, key=lambda n: planner.driver_of(n, specs[n]) is None):
        params = specs[name]
        driver = planner.driver_of(name, params)
        t0 = time.perf_counter()
        if driver is None:
            allocation, details = planner.allocate(name, params, profile, sparsity), {}
        else:
            saved = dict(profile.stats)
            shared.needs = planner.allocator_needs(name, params, profile.metric)
            try:
                allocation, details = driver(profile, sparsity, shared, progress=progress, **params)
            finally:
                trials.restore()
                profile.stats.clear()
                profile.stats.update(saved)
        planned[name] = (params, allocation, details, time.perf_counter() - t0)
    scores = shared.score([planned[n][1] for n in names], heldout, progress)
    rows = []
    for name, ppl in zip(names, scores):
        params, allocation, details, wall = planned[name]
        blocks = block_profile(profile, allocation)
        rows.append(
            {
                "allocator": name,
                "params": params,
                "heldout_ppl": ppl,
                "blocks": blocks,
                "min": min(blocks),
                "max": max(blocks),
                "plan_s": wall,
                **details,
            }
        )
    best = min(range(len(names)), key=lambda i: (scores[i], i))
    log.info(
        "auto: %s chosen (held-out ppl %.3f; %d candidates, %d trial prunings)",
        names[best],
        scores[best],
        len(names),
        shared.pruned,
    )
    record = {
        "chosen": names[best],
        "criterion": "perplexity on held-out calibration windows",
        "heldout": trials.heldout(heldout),
        "trials": shared.pruned,
        "candidates": rows,
        "wall_s": time.perf_counter() - start,
    }
    return planned[names[best]][1], {"auto": record}


def _cost(ctx, rates, sparsity: float, params: dict, mode: str) -> Work:
    """What :func:`choose` will do, for a dry run's preview: each candidate's own search and one
    trial prune with a held-out evaluation per other candidate (fewer when allocations coincide)."""
    specs = candidate_specs(params["candidates"], ctx.profile.pattern.is_nm)
    names = [n for n, _ in specs]
    each = prune_cost(ctx, rates, mode) + rates.passes(params["heldout"])
    seconds, searches, plain = 0.0, [], 0
    for name, options in specs:
        p = candidate_params(name, options, params["heldout"])
        if planner.driver_of(name, p) is None:
            plain += 1
        else:
            work = ALLOCATORS.get(name).driver_cost(ctx, rates, sparsity, p, mode)
            searches.append(work.what)
            seconds += work.seconds or 0.0
    seconds += plain * each
    what = (
        f"auto: {len(names)} candidates ({'/'.join(names)}); at most {plain} trial prunings with "
        f"{ctx.metric.name}, each scored on {params['heldout']} held-out windows"
    )
    if searches:
        what += "; plus " + "; ".join(searches)
    return Work(what, seconds, "auto:candidates=NAME/NAME/... scores fewer candidates")


def _check(params: dict, pattern) -> None:
    """The candidates and their options, checked with the config (before any work)."""
    for name, options in candidate_specs(params["candidates"], pattern.is_nm):
        candidate_params(name, options, params["heldout"])


@ALLOCATORS.register(
    NAME,
    rank=99,
    summary="the candidate allocator with the lowest perplexity on held-out calibration text",
    paper="prunewise (model selection over the registered allocators)",
    needs=(),
    needs_for=_needs,
    nm=True,
    driver_for=lambda params: choose,
    driver_cost=_cost,
    check_pattern=_check,
    ranges={"heldout": Range(ge=1)},
)
def allocate(profile: Profile, sparsity: float, *, candidates: str = "all", heldout: int = 16) -> dict[str, float]:
    raise ConfigError(
        "auto: the choice prunes and evaluates the model once per candidate (its driver, auto.choose); "
        "run it through prunewise.plan / prunewise.run / `prunewise prune`"
    )
