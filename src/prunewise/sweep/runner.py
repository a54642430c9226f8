"""Sweeps: a grid of pruning runs over one model, resumable, one JSON line per run.

A :class:`Sweep` holds the fixed settings of every run (a :class:`PruneConfig`) and lists for
the four grid axes: metrics, allocators, sparsities and patterns. :meth:`Sweep.expand` makes the
runs: every unstructured pattern is crossed with every sparsity; an N:M pattern fixes the
sparsity at N/M and runs once; combinations that cannot run (an allocator without N:M support
with an N:M pattern) are skipped with their reason.

:func:`run_sweep` loads the model once, keeps a copy of the dense prunable weights and restores
it before every run; the calibration windows are tokenized once and every statistic that does
not depend on the run (dense activation norms, spectra, gradients) comes from the content-keyed
cache (:mod:`prunewise.storage.cache`), so each run pays only for its allocator, its sequential
pruned pass and its evaluation. The dense baseline (perplexity, zero-shot) is measured once.

Each run is keyed by a SHA-256 of its full config (:func:`run_key`); results go to
``<out>/results.jsonl`` as one line per run, appended and flushed as soon as the run ends, so a
rerun of the same sweep skips finished runs and an interrupted sweep resumes where it stopped.
A run that raises is recorded with its error (``"status": "failed"``) and the sweep goes on;
``retry_failed`` runs those again. Pruned checkpoints are written only with ``save``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import PruneConfig
from ..errors import PrunewiseError
from ..run.record import RunRecord
from ..run.results import RESULTS, append_result, read_results
from ..run.saving import check_same_model
from ..run.trials import Executor
from ..storage.atomic import atomic_write_text
from ..storage.cache import resolve_cache_dir
from .executors import make_executor
from .grid import Sweep, dense_key, label, run_key

log = logging.getLogger(__name__)

SPEC = "sweep.json"


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


def _pending(sweep: Sweep, out: Path, retry_failed: bool) -> tuple[list[PruneConfig], list, set[str]]:
    """The grid, its skipped combinations and the keys already finished in ``out`` (sweep.json written,
    a torn last line of results.jsonl closed)."""
    runs, skipped = sweep.expand()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out / SPEC,
        json.dumps(
            {"sweep": sweep.to_dict(), "runs": len(runs), "skipped": [{**c, "reason": r} for c, r in skipped]}, indent=2
        )
        + "\n",
    )
    results_path = out / RESULTS
    if results_path.is_file() and not results_path.read_bytes().endswith(b"\n"):
        with open(results_path, "ab") as fh:  # a torn last line (killed mid-write) stays on its own line
            fh.write(b"\n")
    done = {
        row["key"]
        for row in read_results(results_path)
        if row.get("status") == "ok" or (row.get("status") == "failed" and not retry_failed)
    }
    return runs, skipped, done


def _progress_line(i: int, n: int, config: PruneConfig, row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"[{i}/{n}] {label(config)}: FAILED {row['error']}"
    record = RunRecord.from_dict(row)
    ppl = f"perplexity {record.pruned['ppl']:.3f}" if record.pruned else "no perplexity"
    acc = (record.zero_shot.get("pruned") or {}).get("average", {}).get("acc")
    acc_text = f", mean acc {acc:.4f}" if acc is not None else ""
    return f"[{i}/{n}] {label(config)}: {ppl}{acc_text} (sparsity {record.sparsity:.6f}, {record.wall_s:.1f} s)"


@dataclass
class SweepOptions:
    """How :func:`run_sweep` runs: ``cache_dir``, ``progress``, ``save`` (every pruned checkpoint
    under ``<out>/runs/``), ``retry_failed``, ``trust_remote_code`` and ``executor`` (``local``,
    or ``ray`` with ``workers``, ``address``, ``threads``: :mod:`prunewise.sweep.executors`)."""

    cache_dir: Path | None = None
    progress: bool = True
    save: bool = False
    retry_failed: bool = False
    trust_remote_code: bool = False
    executor: Executor = field(default_factory=Executor)


def run_sweep(sweep: Sweep, out: Path, options: SweepOptions | None = None, **settings: Any) -> SweepSummary:
    """Run every configuration of ``sweep`` not yet finished in ``<out>/results.jsonl``, as
    ``options`` (or the :class:`SweepOptions` fields given as ``settings``) say. One sweep at a
    time per folder (a lock); results of another model's weights in the folder are refused."""
    opts = options if options is not None else SweepOptions(**settings)
    with _locked(Path(out)):
        return _run_sweep(sweep, Path(out), opts)


LOCK = ".sweep.lock"


@contextlib.contextmanager
def _locked(out: Path):
    """An exclusive lock on ``out`` for the duration, so that two sweeps never run into one folder
    (the second would compute every run again); the lock goes with the process that holds it."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise PrunewiseError(
                f"sweep: {out} is in use by another sweep ({holder}); wait for it to finish or use another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_model(out: Path, source: dict[str, str]) -> None:
    """Refuse to add results for a model whose weights differ from those of any line already in ``out``."""
    for i, row in enumerate(read_results(out), 1):
        if (row.get("source") or {}).get("fingerprint"):
            check_same_model(row["source"], source, f"the results in {out / RESULTS} (result {i}, key {row['key']})")


def _run_sweep(sweep: Sweep, out: Path, opts: SweepOptions) -> SweepSummary:
    t_start = time.perf_counter()
    runs, skipped, done = _pending(sweep, out, opts.retry_failed)
    summary = SweepSummary(out, skipped_invalid=skipped)
    todo = [c for c in runs if run_key(c) not in done]
    summary.skipped_done = len(runs) - len(todo)
    base = runs[0]
    dkey = dense_key(base)
    need_dense = (base.eval_data or base.tasks) and dkey not in done
    if todo or need_dense:
        worker = make_executor(
            opts.executor, base, todo or [base], resolve_cache_dir(opts.cache_dir), opts.trust_remote_code
        )
        try:
            _check_model(out, worker.source)
            if need_dense:
                row = worker.dense_row(dkey, opts.progress)
                append_result(out / RESULTS, row)
                if row["ppl"]:
                    tqdm.write(f"dense: perplexity {row['ppl']['ppl']:.3f}")
            items = [(c, run_key(c), out / "runs" / _slug(c, run_key(c)) if opts.save else None) for c in todo]
            bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=not opts.progress)
            for i, (config, row) in enumerate(worker.runs(items), 1):  # in the order they finish
                append_result(out / RESULTS, row)
                bar.update()
                summary.ran += row["status"] == "ok"
                summary.failed += row["status"] != "ok"
                tqdm.write(_progress_line(i, len(todo), config, row))
            bar.close()
        finally:
            worker.close()
    summary.wall_s = time.perf_counter() - t_start
    return summary
