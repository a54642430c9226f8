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

import torch

from ..config import PruneConfig
from ..errors import PrunewiseError
from ..run.record import RunRecord
from ..run.results import now
from ..run.trials import Executor, Pool, first_line, ray_cause
from .worker import SweepWorker


class LocalExecutor:
    """Today's behaviour: one worker in this process, runs one after another."""

    def __init__(self, base: PruneConfig, todo: list[PruneConfig], cache_dir: Path, trust_remote_code: bool):
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
        if threads:
            torch.set_num_threads(threads)
        self.worker = SweepWorker(
            PruneConfig.from_dict(base), [PruneConfig.from_dict(c) for c in todo], Path(cache_dir), trust_remote_code
        )

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


class RayExecutor(Pool):
    """``workers`` Ray actors; runs handed out as actors free up, a dead worker's run retried once."""

    def __init__(
        self,
        base: PruneConfig,
        todo: list[PruneConfig],
        cache_dir: Path,
        trust_remote_code: bool,
        *,
        workers: int | None = None,
        address: str | None = None,
        threads: int | None = None,
    ):
        super().__init__(
            _RayWorker,
            (base.to_dict(), [c.to_dict() for c in todo], str(cache_dir), trust_remote_code, threads),
            base.device,
            workers,
            address,
            threads,
        )
        try:
            self.source = self.ray.get(self.actors[0].source.remote())
        except self.ray.exceptions.RayError as exc:  # the model did not load there: one line, as locally
            self.close()
            raise PrunewiseError(f"executor ray: a worker could not start: {ray_cause(exc)}") from None

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
                row = _failed(config, key, f"WorkerDied: the worker running it died twice ({first_line(exc)})")
            idle.append(a)
            yield config, row


def _failed(config: PruneConfig, key: str, error: str) -> dict[str, Any]:
    return {
        "key": key,
        "kind": "run",
        "status": "failed",
        "error": error,
        "finished": now(),
        **RunRecord(config.to_dict()).summary(),
    }


def make_executor(
    executor: Executor, base: PruneConfig, todo: list[PruneConfig], cache_dir: Path, trust_remote_code: bool
):
    """The sweep executor ``executor`` names, holding the models that run ``todo``."""
    if executor.name == "ray":
        return RayExecutor(base, todo, cache_dir, trust_remote_code, **executor.options)
    return LocalExecutor(base, todo, cache_dir, trust_remote_code)
