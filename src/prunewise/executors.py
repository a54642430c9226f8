"""Where a sweep's runs (and ATP's β trials) execute: in this process, or on a Ray cluster.

An executor holds loaded models and runs configurations on them; the sweep's driver alone writes
``results.jsonl``, so resuming, skipping finished keys, recording failures and ``--retry-failed``
are the same whichever executor runs the work.

- ``local`` (default): one :class:`~prunewise.sweep.SweepWorker` in this process.
- ``ray``: ``workers`` Ray actors, each a :class:`~prunewise.sweep.SweepWorker` that loads the
  model once and runs many configurations on it (dense weights restored between runs). On a CPU
  each actor reserves ``threads`` CPUs and sets torch to that many threads; with ``device=cuda``
  each reserves one GPU (``num_gpus=1``) and ``workers`` defaults to the GPUs Ray sees. Runs are
  handed out as actors free up; each result line reaches the driver as it lands. A worker that
  dies mid-run (out of memory, preemption, a killed process) is replaced and the run is retried
  once, then recorded as failed with the reason. ``address`` joins a running cluster
  (``ray start --head`` on one node, ``ray start --address=HEAD:6379`` on the others; ``auto``
  finds the local one), otherwise a local Ray instance is started for the sweep.

``PRUNEWISE_FAULT_ONCE=PATH`` (for tests of the retry path): a Ray worker about to run a
configuration exits abruptly if ``PATH`` does not exist yet, after creating it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import PruneConfig
from .errors import PrunewiseError

EXECUTORS = ("local", "ray")


def require_ray():
    try:
        import ray
    except ImportError:
        raise PrunewiseError("executor ray: Ray is not installed; run: pip install 'prunewise[ray]'") from None
    return ray


class LocalExecutor:
    """Today's behaviour: one worker in this process, runs one after another."""

    def __init__(self, base: PruneConfig, todo: list[PruneConfig], cache_dir: Path, trust_remote_code: bool):
        from .sweep import SweepWorker

        self.worker = SweepWorker(base, todo, cache_dir, trust_remote_code)
        self.source = self.worker.source

    def dense_row(self, key: str, progress: bool) -> dict[str, Any]:
        return self.worker.dense_row(key, progress)

    def runs(self, items: list[tuple[PruneConfig, str, Path | None]]) -> Iterator[tuple[PruneConfig, dict]]:
        for config, key, save_to in items:
            yield config, self.worker.run(config, key, save_to)[0]

    def close(self) -> None:
        self.worker.close()


class _RayWorker:
    """The body of one Ray actor: a sweep worker with its own model."""

    def __init__(self, base: dict, todo: list[dict], cache_dir: str, trust_remote_code: bool, threads: int | None):
        import torch

        from .sweep import SweepWorker

        if threads:
            torch.set_num_threads(threads)
        self.worker = SweepWorker(PruneConfig.from_dict(base), [PruneConfig.from_dict(c) for c in todo],
                                  Path(cache_dir), trust_remote_code)

    def source(self) -> dict[str, str]:
        return self.worker.source

    def dense_row(self, key: str) -> dict[str, Any]:
        return self.worker.dense_row(key, False)

    def run(self, config: dict, key: str, save_to: str | None) -> dict[str, Any]:
        fault = os.environ.get("PRUNEWISE_FAULT_ONCE")
        if fault and not Path(fault).exists():
            Path(fault).write_text(key)
            os._exit(1)
        return self.worker.run(PruneConfig.from_dict(config), key, Path(save_to) if save_to else None)[0]


class _Pool:
    """Ray actors of one class, each reserving ``threads`` CPUs or one GPU (``device`` cuda)."""

    def __init__(self, body: type, args: tuple, device: str, workers: int | None, address: str | None,
                 threads: int | None):
        ray = require_ray()
        self.ray = ray
        if not ray.is_initialized():
            env = {k: v for k, v in os.environ.items() if k.startswith("PRUNEWISE_")}
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env} if env else None)
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


class RayExecutor(_Pool):
    """``workers`` Ray actors; runs handed out as actors free up, a dead worker's run retried once."""

    def __init__(self, base: PruneConfig, todo: list[PruneConfig], cache_dir: Path, trust_remote_code: bool, *,
                 workers: int | None = None, address: str | None = None, threads: int | None = None):
        super().__init__(_RayWorker, (base.to_dict(), [c.to_dict() for c in todo], str(cache_dir), trust_remote_code,
                                      threads), base.device, workers, address, threads)
        try:
            self.source = self.ray.get(self.actors[0].source.remote())
        except self.ray.exceptions.RayError as exc:  # the model did not load there: one line, as locally
            self.close()
            raise PrunewiseError(f"executor ray: a worker could not start: {_cause(exc)}") from None

    def dense_row(self, key: str, progress: bool) -> dict[str, Any]:
        return self.ray.get(self.actors[0].dense_row.remote(key))

    def runs(self, items: list[tuple[PruneConfig, str, Path | None]]) -> Iterator[tuple[PruneConfig, dict]]:
        ray = self.ray
        queue = [(config, key, save_to, 0) for config, key, save_to in items]
        idle = list(range(len(self.actors)))
        running: dict[Any, tuple[int, tuple]] = {}
        while queue or running:
            while queue and idle:
                a = idle.pop()
                item = queue.pop(0)
                config, key, save_to, _ = item
                ref = self.actors[a].run.remote(config.to_dict(), key, str(save_to) if save_to else None)
                running[ref] = (a, item)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            a, (config, key, save_to, attempt) = running.pop(ref)
            try:
                row = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # the worker died: replace it, retry once
                self.actors[a] = self._new()
                if attempt == 0:
                    queue.insert(0, (config, key, save_to, 1))
                    idle.append(a)
                    continue
                row = _failed(config, key, f"WorkerDied: the worker running it died twice ({_first_line(exc)})")
            idle.append(a)
            yield config, row


class _RayTrialWorker:
    """The body of one Ray actor of ATP's search: the model, its calibration set, its trials."""

    def __init__(self, config: dict, cache_dir: str, trust_remote_code: bool, threads: int | None,
                 fingerprint: str | None):
        import torch

        from .allocation.planner import build_profile
        from .blocks import make_source
        from .data import calibration_ids
        from .io import check_same_model, source_info
        from .pipeline import _trials, backup_weights, load_placed, needs_calibration

        if threads:
            torch.set_num_threads(threads)
        cfg = PruneConfig.from_dict(config)
        model, tok, source, _ = load_placed(cfg, Path(cache_dir), trust_remote_code)
        check_same_model({"fingerprint": fingerprint, "path": cfg.model}, source_info(model, source), "the search")
        calib = (calibration_ids(tok, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed, Path(cache_dir))
                 if needs_calibration(cfg) else None)
        backup = backup_weights(model, build_profile(make_source(model, cfg.blocks_path)))
        self.trials = _trials(model, tok, cfg, calib, Path(cache_dir), backup)

    def score(self, allocation: dict[str, float], windows: int) -> float:
        self.trials.prune(allocation)
        try:
            return self.trials.perplexity(windows)
        finally:
            self.trials.restore()


class RayTrials(_Pool):
    """Trial scoring for allocator searches (ATP's β) on Ray actors, one model each."""

    def __init__(self, config: PruneConfig, cache_dir: Path, trust_remote_code: bool, fingerprint: str | None, *,
                 workers: int | None = None, address: str | None = None, threads: int | None = None):
        super().__init__(_RayTrialWorker, (config.to_dict(), str(cache_dir), trust_remote_code, threads, fingerprint),
                         config.device, workers, address, threads)

    def __call__(self, allocations: list[dict[str, float]], windows: int) -> list[float]:
        refs = [self.actors[i % len(self.actors)].score.remote(a, windows) for i, a in enumerate(allocations)]
        return self.ray.get(refs)


def _cause(exc: BaseException) -> str:
    """The last line of a Ray error that names the worker's own exception (``PrunewiseError: ...``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "Error:" in line and not line.startswith(("ray.", "File "))]
    return (named[-1] if named else _first_line(exc))[:300]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _failed(config: PruneConfig, key: str, error: str) -> dict[str, Any]:
    from .record import RunRecord
    from .sweep import _now

    return {"key": key, "kind": "run", "status": "failed", "error": error, "finished": _now(),
            **RunRecord(config.to_dict()).summary()}


def make_trials(name: str, config: PruneConfig, cache_dir: Path, fingerprint: str | None, *,
                trust_remote_code: bool = False, **options: Any) -> RayTrials:
    """The parallel trial scorer of executor ``name`` (``ray``; ``local`` scores in the planner)."""
    if name != "ray":
        raise PrunewiseError(f"executor: unknown '{name}' (choices: {', '.join(EXECUTORS)})")
    return RayTrials(config, cache_dir, trust_remote_code, fingerprint, **options)


def make_executor(name: str, base: PruneConfig, todo: list[PruneConfig], cache_dir: Path, trust_remote_code: bool,
                  **options: Any):
    if name == "local":
        return LocalExecutor(base, todo, cache_dir, trust_remote_code)
    if name == "ray":
        return RayExecutor(base, todo, cache_dir, trust_remote_code, **options)
    raise PrunewiseError(f"executor: unknown '{name}' (choices: {', '.join(EXECUTORS)})")
