"""A sweep worker: one loaded model that runs many configurations of a sweep (in this process, or
as the body of a Ray actor, :mod:`prunewise.sweep.executors`)."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

from ..config import PruneConfig
from ..report.plots import save_profile_plot
from ..run.job import Job, restore_weights
from ..run.pipeline import evaluate_dense, prune_and_evaluate
from ..run.record import RunRecord
from ..run.results import now
from ..run.saving import peak_memory, reset_peak_memory, save_run, versions
from .grid import DENSE_FIELDS

log = logging.getLogger(__name__)


class SweepWorker:
    """One loaded model that runs many configurations of a sweep: dense prunable weights copied
    once and restored before every run, calibration ids tokenized once. Each run is
    :func:`prunewise.run.pipeline.prune_and_evaluate`, the function ``prunewise prune`` uses; the
    result is the run's result line (its key, status and :meth:`RunRecord.summary`)."""

    def __init__(self, base: PruneConfig, configs: list[PruneConfig], cache_dir: Path, trust_remote_code: bool = False):
        self.base, self.cache_dir = base, cache_dir
        # streamed when the model would not fit: every run re-reads the dense checkpoint (no dense copy)
        self.job = Job.load(base, cache_dir, runs=configs, trust_remote_code=trust_remote_code, backup=True)
        self.model, self.tokenizer = self.job.model, self.job.tokenizer
        self.source = self.job.identity
        self.common = {"source": self.source, "versions": versions()}

    def dense_row(self, key: str, progress: bool) -> dict[str, Any]:
        """The dense baseline (perplexity, zero-shot) of the base settings, measured once."""
        t0 = time.perf_counter()
        dense = evaluate_dense(
            self.model, self.tokenizer, self.base, self.cache_dir, progress, model_key=self.job.fingerprint
        )
        return {
            "key": key,
            "kind": "dense",
            "status": "ok",
            "finished": now(),
            "config": {k: getattr(self.base, k) for k in DENSE_FIELDS},
            "ppl": dense.dense,
            "zero_shot": dense.zero_shot.get("dense"),
            "wall_s": time.perf_counter() - t0,
            **self.common,
        }

    def run(self, config: PruneConfig, key: str, save_to: Path | None = None) -> tuple[dict[str, Any], RunRecord]:
        """One run from the dense weights; a failure is recorded in the line, never raised."""
        restore_weights(self.model, self.job.dense_weights)
        reset_peak_memory()  # the row's own peak, not the sweep's so far
        t0 = time.perf_counter()
        row: dict[str, Any] = {"key": key, "kind": "run"}
        record = RunRecord(config.to_dict())
        try:
            record, _ = prune_and_evaluate(self.job, config, progress=False, dense=False)
            if save_to is not None:
                self._stamp(record, t0)
                row["saved"] = str(save_run(self.model, self.tokenizer, save_to, record, overwrite=True))
                save_profile_plot(record, save_to)
            row["status"] = "ok"
        except Exception as exc:  # recorded, and the sweep goes on
            row.update(
                {
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(limit=-3),
                }
            )
            log.debug("run %s failed", key, exc_info=True)
        self._stamp(record, t0)
        row.update(finished=now(), **record.summary())
        return row, record

    def _stamp(self, record: RunRecord, t0: float) -> None:
        record.source, record.versions = self.common["source"], self.common["versions"]
        record.wall_s, record.memory = time.perf_counter() - t0, {"mode": self.job.placement.mode, **peak_memory()}

    def close(self) -> None:
        restore_weights(self.model, self.job.dense_weights)
