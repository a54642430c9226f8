"""Sweeps: a grid of pruning runs over one model, resumable, one JSON line per run.

A :class:`Sweep` holds the fixed settings of every run (a :class:`PruneConfig`) and lists for
the four grid axes: metrics, allocators, sparsities and patterns. :meth:`Sweep.expand` makes the
runs: every unstructured pattern is crossed with every sparsity; an N:M pattern fixes the
sparsity at N/M and runs once; combinations that cannot run (an allocator without N:M support
with an N:M pattern) are skipped with their reason.

:func:`run_sweep` loads the model once, keeps a copy of the dense prunable weights and restores
it before every run; the calibration windows are tokenized once and every statistic that does
not depend on the run (dense activation norms, spectra, gradients) comes from the content-keyed
cache (:mod:`prunewise.statcache`), so each run pays only for its allocator, its sequential
pruned pass and its evaluation. The dense baseline (perplexity, zero-shot) is measured once.

Each run is keyed by a SHA-256 of its full config (:func:`run_key`); results go to
``<out>/results.jsonl`` as one line per run, appended and flushed as soon as the run ends, so a
rerun of the same sweep skips finished runs and an interrupted sweep resumes where it stopped.
A run that raises is recorded with its error (``"status": "failed"``) and the sweep goes on;
``retry_failed`` runs those again. Pruned checkpoints are written only with ``save``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import itertools
import json
import logging
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .atomic import atomic_write_text
from .config import PruneConfig, resolve_cache_dir
from .errors import ConfigError, PrunewiseError
from .masks import parse_pattern
from .record import RunRecord
from .registry import ALLOCATORS, parse_spec

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
SPEC = "sweep.json"
AXES = ("metric", "allocator", "sparsity", "pattern")
# Fields of the dense baseline's key: what changes the dense numbers.
DENSE_FIELDS = ("model", "dtype", "device", "batch_size", "eval_data", "eval_seqlen", "seqlen", "max_tokens",
                "tasks", "include_path", "limit")


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


@dataclass
class Sweep:
    """Fixed settings (``base``) plus lists for the grid axes."""

    base: PruneConfig = field(default_factory=PruneConfig)
    metrics: list[str] = field(default_factory=lambda: ["wanda"])
    allocators: list[str] = field(default_factory=lambda: ["uniform"])
    sparsities: list[float] = field(default_factory=lambda: [0.5])
    patterns: list[str] = field(default_factory=lambda: ["unstructured"])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sweep:
        """Keys of :class:`PruneConfig`; ``metric``, ``allocator``, ``sparsity`` and ``pattern`` take
        a list or one value; ``tasks`` a list or a comma-separated string."""
        data = dict(data)
        axes = {k: _as_list(data.pop(k, None)) for k in AXES}
        if isinstance(data.get("tasks"), (list, tuple)):
            data["tasks"] = ",".join(data["tasks"])
        if "eval_tokens" in data:
            data["max_tokens"] = data.pop("eval_tokens")
        base = PruneConfig.from_dict(data)
        defaults = cls()
        return cls(
            base=base,
            metrics=[str(x) for x in axes["metric"]] or defaults.metrics,
            allocators=[str(x) for x in axes["allocator"]] or defaults.allocators,
            sparsities=[float(x) for x in axes["sparsity"]] or defaults.sparsities,
            patterns=[str(x) for x in axes["pattern"]] or defaults.patterns,
        )

    @classmethod
    def from_toml(cls, path: Path, overrides: dict[str, Any] | None = None) -> Sweep:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PrunewiseError(f"config: no sweep file at {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise PrunewiseError(f"config: {path} is not valid TOML: {exc}") from None
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metrics, "allocator": self.allocators, "sparsity": self.sparsities,
                "pattern": self.patterns, **{k: v for k, v in self.base.to_dict().items() if k not in AXES}}

    def expand(self) -> tuple[list[PruneConfig], list[tuple[dict[str, Any], str]]]:
        """The runs in grid order (pattern, sparsity, metric, allocator), and the skipped combinations."""
        runs: list[PruneConfig] = []
        skipped: list[tuple[dict[str, Any], str]] = []
        seen: set[str] = set()
        for pattern in self.patterns:
            is_nm = parse_pattern(pattern).is_nm
            for sparsity, metric, allocator in itertools.product(
                [None] if is_nm else self.sparsities, self.metrics, self.allocators
            ):
                alloc_name, _ = parse_spec(allocator, "allocator")
                if is_nm and not ALLOCATORS.get(alloc_name).extra.get("nm"):
                    skipped.append(({"metric": metric, "allocator": allocator, "pattern": pattern},
                                    f"'{alloc_name}' needs an unstructured pattern"))
                    continue
                config = self.base.replace(metric=metric, allocator=allocator, sparsity=sparsity,
                                           pattern=pattern).validate()
                key = run_key(config)
                if key not in seen:
                    seen.add(key)
                    runs.append(config)
        if not runs:
            raise ConfigError("sweep: the grid has no run that can execute")
        return runs, skipped


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run_key(config: PruneConfig) -> str:
    """16 hex digits of the SHA-256 of the full config: equal configs, equal keys."""
    return _digest(config.to_dict())


def dense_key(config: PruneConfig) -> str:
    return _digest({"dense": {k: getattr(config, k) for k in DENSE_FIELDS}})


def read_results(path: Path) -> list[dict[str, Any]]:
    """Every result line of ``path`` (a results.jsonl or its folder); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: unreadable line skipped (an interrupted write?)", path, i)
            continue
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            log.warning("%s:%d: not a prunewise result line (no 'key'); skipped", path, i)
            continue
        rows.append(row)
    return rows


def _append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def label(config: PruneConfig | dict[str, Any]) -> str:
    c = config if isinstance(config, dict) else config.to_dict()
    target = "" if parse_pattern(c["pattern"]).is_nm else f" {c['sparsity'] if c['sparsity'] is not None else 0.5:g}"
    return f"{c['metric']} / {c['allocator']} / {c['pattern']}{target}"


@dataclass
class SweepSummary:
    out: Path
    ran: int = 0
    skipped_done: int = 0
    failed: int = 0
    skipped_invalid: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    wall_s: float = 0.0


def _slug(config: PruneConfig, key: str) -> str:
    text = f"{config.metric}-{config.allocator}-{config.pattern}-{config.target:g}"
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text)[:80] + f"-{key[:8]}"


class SweepWorker:
    """One loaded model that runs many configurations of a sweep: dense prunable weights copied
    once and restored before every run, calibration ids tokenized once. Each run is
    :func:`prunewise.pipeline.prune_and_evaluate`, the function ``prunewise prune`` uses; the
    result is the run's result line (its key, status and :meth:`RunRecord.summary`)."""

    def __init__(self, base: PruneConfig, configs: list[PruneConfig], cache_dir: Path, trust_remote_code: bool = False):
        from .allocation.planner import build_profile
        from .blocks import make_source
        from .data import calibration_ids
        from .io import source_info, versions
        from .pipeline import backup_weights, check_inputs, load_placed, needs_calibration

        self.base, self.cache_dir = base, cache_dir
        # streamed when the model would not fit: every run re-reads the dense checkpoint (no dense copy)
        self.model, self.tokenizer, source, placement = load_placed(base, cache_dir, trust_remote_code)
        self.mode = placement.mode
        self.source = source_info(self.model, source)
        for config in configs:
            check_inputs(self.model, config)
        self.calib = None
        if any(needs_calibration(c) for c in configs):
            self.calib = calibration_ids(self.tokenizer, base.calib, base.nsamples, base.seqlen, base.seed, cache_dir)
        self.dense_weights = backup_weights(self.model, build_profile(make_source(self.model, base.blocks_path)))
        self.common = {"source": self.source, "versions": versions()}

    def dense_row(self, key: str, progress: bool) -> dict[str, Any]:
        """The dense baseline (perplexity, zero-shot) of the base settings, measured once."""
        from .pipeline import evaluate_dense

        t0 = time.perf_counter()
        dense = evaluate_dense(self.model, self.tokenizer, self.base, self.cache_dir, progress)
        return {"key": key, "kind": "dense", "status": "ok", "finished": _now(),
                "config": {k: getattr(self.base, k) for k in DENSE_FIELDS},
                "ppl": dense.dense, "zero_shot": dense.zero_shot.get("dense"),
                "wall_s": time.perf_counter() - t0, **self.common}

    def run(self, config: PruneConfig, key: str, save_to: Path | None = None) -> tuple[dict[str, Any], RunRecord]:
        """One run from the dense weights; a failure is recorded in the line, never raised."""
        from .io import save_run
        from .pipeline import prune_and_evaluate, restore_weights
        from .plots import save_profile_plot

        restore_weights(self.model, self.dense_weights)
        t0 = time.perf_counter()
        row: dict[str, Any] = {"key": key, "kind": "run"}
        record = RunRecord(config.to_dict())
        try:
            record, _ = prune_and_evaluate(self.model, self.tokenizer, config, calib=self.calib,
                                           cache_dir=self.cache_dir, progress=False, dense=False,
                                           dense_weights=self.dense_weights, model_key=self.source["fingerprint"])
            if save_to is not None:
                self._stamp(record, t0)
                row["saved"] = str(save_run(self.model, self.tokenizer, save_to, record, overwrite=True))
                save_profile_plot(record, save_to)
            row["status"] = "ok"
        except Exception as exc:  # recorded, and the sweep goes on
            row.update({"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(limit=-3)})
            log.debug("run %s failed", key, exc_info=True)
        self._stamp(record, t0)
        row.update(finished=_now(), **record.summary())
        return row, record

    def _stamp(self, record: RunRecord, t0: float) -> None:
        from .io import peak_memory

        record.source, record.versions = self.common["source"], self.common["versions"]
        record.wall_s, record.memory = time.perf_counter() - t0, {"mode": self.mode, **peak_memory()}

    def close(self) -> None:
        from .pipeline import restore_weights

        restore_weights(self.model, self.dense_weights)


def _pending(sweep: Sweep, out: Path, retry_failed: bool) -> tuple[list[PruneConfig], list, set[str]]:
    """The grid, its skipped combinations and the keys already finished in ``out`` (sweep.json written,
    a torn last line of results.jsonl closed)."""
    runs, skipped = sweep.expand()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SPEC, json.dumps({"sweep": sweep.to_dict(), "runs": len(runs),
                                              "skipped": [{**c, "reason": r} for c, r in skipped]}, indent=2) + "\n")
    results_path = out / RESULTS
    if results_path.is_file() and not results_path.read_bytes().endswith(b"\n"):
        with open(results_path, "ab") as fh:  # a torn last line (killed mid-write) stays on its own line
            fh.write(b"\n")
    done = {row["key"] for row in read_results(results_path)
            if row.get("status") == "ok" or (row.get("status") == "failed" and not retry_failed)}
    return runs, skipped, done


def _progress_line(i: int, n: int, config: PruneConfig, row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"[{i}/{n}] {label(config)}: FAILED {row['error']}"
    record = RunRecord.from_dict(row)
    ppl = f"perplexity {record.pruned['ppl']:.3f}" if record.pruned else "no perplexity"
    acc = (record.zero_shot.get("pruned") or {}).get("average", {}).get("acc")
    acc_text = f", mean acc {acc:.4f}" if acc is not None else ""
    return f"[{i}/{n}] {label(config)}: {ppl}{acc_text} (sparsity {record.sparsity:.6f}, {record.wall_s:.1f} s)"


def run_sweep(sweep: Sweep, out: Path, *, cache_dir: Path | None = None, progress: bool = True,
              save: bool = False, retry_failed: bool = False, trust_remote_code: bool = False,
              executor: str = "local", executor_options: dict[str, Any] | None = None) -> SweepSummary:
    """Run every configuration of ``sweep`` not yet finished in ``<out>/results.jsonl``, on
    ``executor`` (:mod:`prunewise.executors`: ``local`` or ``ray`` with ``workers``, ``address``,
    ``threads``). One sweep at a time per folder (a lock); results of another model's weights in
    the folder are refused."""
    with _locked(Path(out)):
        return _run_sweep(sweep, Path(out), cache_dir, progress, save, retry_failed, trust_remote_code,
                          executor, executor_options)


LOCK = ".sweep.lock"


@contextlib.contextmanager
def _locked(out: Path):
    """An exclusive lock on ``out`` for the duration, so that two sweeps never run into one folder
    (the second would compute every run again); the lock goes with the process that holds it."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise PrunewiseError(f"sweep: {out} is in use by another sweep ({holder}); wait for it to finish "
                                 "or use another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_model(out: Path, source: dict[str, str]) -> None:
    """Refuse to add results for a model whose weights differ from those already in ``out``."""
    from .io import check_same_model

    for row in read_results(out):
        if (row.get("source") or {}).get("fingerprint"):
            check_same_model(row["source"], source, f"the results in {out / RESULTS}")
            return


def _run_sweep(sweep: Sweep, out: Path, cache_dir: Path | None, progress: bool, save: bool, retry_failed: bool,
               trust_remote_code: bool, executor: str, executor_options: dict[str, Any] | None) -> SweepSummary:
    t_start = time.perf_counter()
    runs, skipped, done = _pending(sweep, out, retry_failed)
    summary = SweepSummary(out, skipped_invalid=skipped)
    todo = [c for c in runs if run_key(c) not in done]
    summary.skipped_done = len(runs) - len(todo)
    base = runs[0]
    dkey = dense_key(base)
    need_dense = (base.eval_data or base.tasks) and dkey not in done
    if todo or need_dense:
        from .executors import make_executor

        worker = make_executor(executor, base, todo or [base], resolve_cache_dir(cache_dir), trust_remote_code,
                               **(executor_options or {}))
        try:
            _check_model(out, worker.source)
            if need_dense:
                row = worker.dense_row(dkey, progress)
                _append(out / RESULTS, row)
                if row["ppl"]:
                    tqdm.write(f"dense: perplexity {row['ppl']['ppl']:.3f}")
            items = [(c, run_key(c), out / "runs" / _slug(c, run_key(c)) if save else None) for c in todo]
            bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=not progress)
            for i, (config, row) in enumerate(worker.runs(items), 1):  # in the order they finish
                _append(out / RESULTS, row)
                bar.update()
                summary.ran += row["status"] == "ok"
                summary.failed += row["status"] != "ok"
                tqdm.write(_progress_line(i, len(todo), config, row))
            bar.close()
        finally:
            worker.close()
    summary.wall_s = time.perf_counter() - t_start
    return summary


def latest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last line of every key (a retried run supersedes its failure), in first-seen order."""
    by_key: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_key[row["key"]] = row
    return list(by_key.values())


