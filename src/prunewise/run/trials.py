"""Allocator trials: what a driver (ATP's beta search, MRP's dynamic rounds) may do with the model
(:class:`~prunewise.allocation.planner.Trials`: prune exactly as the run will, score on held-out
calibration windows, re-measure statistics, restore the dense weights), in this process
(:func:`local_trials`) or scored in parallel on Ray actors that hold one model each
(:class:`RayTrials`, ``--executor ray``). Ray is optional: imported when asked for.

``PRUNEWISE_FAULT_ONCE`` and the sweep's actors are in :mod:`prunewise.sweep.executors`, which
shares this module's actor pool (:class:`Pool`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..allocation.planner import Trials
from ..allocation.profile import Profile
from ..allocation.statistics import provide
from ..config import PruneConfig
from ..errors import PrunewiseError
from ..evaluation.perplexity import needs_bos, perplexity
from .job import Job, allocator_needs, heldout_ids, prune_allocated, restore_weights, stat_context

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Executor:
    """Where the work of a search or a sweep executes: ``local`` (this process) or ``ray`` with its
    options (``workers``, ``address``, ``threads``; ``trust_remote_code`` for the models the
    workers load)."""

    name: str = "local"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in EXECUTORS:
            raise PrunewiseError(f"executor: unknown '{self.name}' (choices: {', '.join(EXECUTORS)})")

    def with_options(self, **options: Any) -> Executor:
        return Executor(self.name, {**self.options, **options})

    def trials(self, config: PruneConfig, cache_dir: Path, fingerprint: str | None) -> RayTrials | None:
        """The parallel trial scorer (None: trials run in the planner, in this process)."""
        if self.name == "local":
            return None
        return RayTrials(config, cache_dir, fingerprint=fingerprint, **self.options)


def local_trials(
    model: nn.Module,
    tokenizer,
    config: PruneConfig,
    calib: torch.Tensor | None,
    cache_dir: Path,
    backup: dict[str, torch.Tensor],
    parallel=None,
) -> Trials:
    """The model operations an allocator driver may use: prune as the run will, score on held-out
    calibration windows, re-measure statistics, restore the dense weights."""
    name = config.allocator_spec[0]
    heldout: dict[int, torch.Tensor] = {}

    def heldout_ids_for(windows: int) -> torch.Tensor:
        if tokenizer is None:
            raise ValueError(f"allocator '{name}': the search needs the tokenizer to read held-out text")
        if windows not in heldout:
            heldout[windows] = heldout_ids(tokenizer, config, windows, cache_dir)
        return heldout[windows]

    def trial_prune(allocation: dict[str, float]) -> None:
        restore_weights(model, backup)
        prune_allocated(model, config, allocation, calib, cache_dir, progress=False)

    def trial_perplexity(windows: int) -> float:
        ids = heldout_ids_for(windows).reshape(-1)
        was_training = model.training
        model.eval()
        try:
            return perplexity(
                model,
                ids,
                config.seqlen,
                device=config.device,
                bos_id=needs_bos(model, tokenizer),
                blocks_path=config.blocks_path,
                progress=False,
            )["ppl"]
        finally:
            model.train(was_training)

    def describe(windows: int) -> dict[str, Any]:
        return {"data": config.calib, "windows": int(heldout_ids_for(windows).shape[0]), "seqlen": config.seqlen}

    def remeasure(profile: Profile, needs: tuple[str, ...] | None = None) -> None:
        ctx = stat_context(model, config, cache_dir, calib, False, profile)
        profile.stats.update(provide(allocator_needs(config) if needs is None else needs, ctx))

    return Trials(trial_prune, trial_perplexity, describe, remeasure, lambda: restore_weights(model, backup), parallel)


def require_ray():
    try:
        import ray
    except ImportError:
        raise PrunewiseError("executor ray: Ray is not installed; run: pip install 'prunewise[ray]'") from None
    return ray


class Pool:
    """Ray actors of one class (the sweep's workers, or the search's), each reserving ``threads`` CPUs
    or one GPU (``device`` cuda)."""

    def __init__(
        self, body: type, args: tuple, device: str, workers: int | None, address: str | None, threads: int | None
    ):
        ray = require_ray()
        self.ray = ray
        if not ray.is_initialized():
            env = {k: v for k, v in os.environ.items() if k.startswith("PRUNEWISE_")}
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": env} if env else None,
            )
        gpus = 1 if device.startswith("cuda") else 0
        if workers is None:
            available = ray.cluster_resources()
            workers = int(available.get("GPU", 0)) if gpus else max(1, int(available.get("CPU", 1)) // (threads or 1))
        if workers < 1:
            raise PrunewiseError("executor ray: no worker fits the cluster (no GPU for --device cuda?)")
        self.options = {"num_cpus": threads or 1, "num_gpus": gpus}
        self.args = args
        self.actor_class = ray.remote(body)
        self.actors = [self._new() for _ in range(workers)]

    def _new(self):
        return self.actor_class.options(**self.options).remote(*self.args)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


class _RayTrialWorker:
    """The body of one Ray actor of ATP's search: the model, its calibration set, its trials."""

    def __init__(
        self, config: dict, cache_dir: str, trust_remote_code: bool, threads: int | None, fingerprint: str | None
    ):
        if threads:
            torch.set_num_threads(threads)
        cfg = PruneConfig.from_dict(config)
        job = Job.load(
            cfg,
            Path(cache_dir),
            trust_remote_code=trust_remote_code,
            expected_by="the search",
            expect={"fingerprint": fingerprint, "path": cfg.model},
            backup=True,
        )
        self.trials = local_trials(job.model, job.tokenizer, cfg, job.calib, Path(cache_dir), job.dense_weights)

    def score(self, allocation: dict[str, float], windows: int) -> float:
        self.trials.prune(allocation)
        try:
            return self.trials.perplexity(windows)
        finally:
            self.trials.restore()


class RayTrials(Pool):
    """Trial scoring for allocator searches (ATP's β) on Ray actors, one model each."""

    def __init__(
        self,
        config: PruneConfig,
        cache_dir: Path,
        *,
        fingerprint: str | None,
        trust_remote_code: bool = False,
        workers: int | None = None,
        address: str | None = None,
        threads: int | None = None,
    ):
        super().__init__(
            _RayTrialWorker,
            (config.to_dict(), str(cache_dir), trust_remote_code, threads, fingerprint),
            config.device,
            workers,
            address,
            threads,
        )

    def __call__(self, allocations: list[dict[str, float]], windows: int) -> list[float]:
        refs = [self.actors[i % len(self.actors)].score.remote(a, windows) for i, a in enumerate(allocations)]
        return self.ray.get(refs)


def ray_cause(exc: BaseException) -> str:
    """The last line of a Ray error that names the worker's own exception (``PrunewiseError: ...``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "Error:" in line and not line.startswith(("ray.", "File "))]
    return (named[-1] if named else first_line(exc))[:300]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
