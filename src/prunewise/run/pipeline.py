"""The high-level API: plan and prune a model in memory, or run a whole job (load, prune,
evaluate, save). The job's set-up is :class:`~prunewise.run.job.Job`; allocator trials are
:mod:`prunewise.run.trials`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..allocation import planner
from ..allocation.cost import Work
from ..allocation.planner import Plan
from ..allocation.profile import block_profile
from ..allocation.statistics import reads_calibration
from ..config import PruneConfig
from ..evaluation.perplexity import evaluate
from ..evaluation.zeroshot import zero_shot
from ..prune.engine import PruneResult
from ..storage.cache import resolve_cache_dir
from .export import EXPORTERS
from .job import (
    Job,
    allocator_needs,
    backup_weights,
    calibration_ids,
    check_context,
    needs_calibration,
    prune_allocated,
    stat_context,
)
from .record import RunRecord
from .saving import check_output_dir, mask_digest, peak_memory, reset_peak_memory, save_run, versions
from .trials import Executor, local_trials

log = logging.getLogger(__name__)


def plan(
    model: nn.Module,
    config: PruneConfig,
    cache_dir: Path | None = None,
    *,
    tokenizer=None,
    calib: torch.Tensor | None = None,
    progress: bool = True,
    job: Job | None = None,
    executor: Executor | None = None,
) -> Plan:
    """The per-layer sparsity targets of ``config`` for ``model`` and how they were found; the model
    is left as it was. Allocators that read calibration data (OWL, MRP with Wanda scores) need
    ``tokenizer`` or ``calib``; drivers that prune trial models (ATP's search) need ``tokenizer``
    for held-out text. ``job`` (the :class:`~prunewise.run.job.Job` that loaded the model) gives
    the model's fingerprint and the copy of the dense weights that trials restore from (without
    one the planner takes its own copy). With ``executor`` ``ray`` a driver's trials are scored in
    parallel on Ray workers that load ``config.model`` themselves
    (:class:`~prunewise.run.trials.RayTrials`)."""
    config.validate()
    cache_dir = resolve_cache_dir(cache_dir)
    name, params = config.allocator_spec
    driver = planner.driver_of(name, params)
    if calib is None and (reads_calibration(allocator_needs(config)) or driver is not None):
        if tokenizer is None:
            raise ValueError(
                f"allocator '{name}' with metric '{config.metric_spec[0]}' needs calibration data "
                "(pass a tokenizer or calib)"
            )
        calib = calibration_ids(tokenizer, config, cache_dir)
    ctx = stat_context(model, config, cache_dir, calib, progress, model_key=job.fingerprint if job else None)
    trials = parallel = None
    if driver is not None:
        backup = (
            job.dense_weights
            if job is not None and job.dense_weights is not None
            else backup_weights(model, ctx.profile)
        )
        if executor is not None and executor.name != "local":  # (the fingerprint only when workers need it)
            parallel = executor.trials(config, cache_dir, ctx.fingerprint())
        trials = local_trials(model, tokenizer, config, calib, cache_dir, backup, parallel)
    try:
        return planner.make_plan(ctx, name, params, config.target, trials)
    finally:
        if parallel is not None:
            parallel.close()


def preview(
    model: nn.Module,
    config: PruneConfig,
    cache_dir: Path | None = None,
    *,
    calib: torch.Tensor | None = None,
    model_key: str | None = None,
) -> list[Work]:
    """The heavy steps :func:`plan` would take for ``config`` (calibration passes, spectra, trial
    prunings), each with a rough duration or marked cached; computes nothing but two timings."""
    ctx = stat_context(model, config, resolve_cache_dir(cache_dir), calib, False, model_key=model_key)
    name, params = config.allocator_spec
    return planner.preview(ctx, name, params, config.target, config.mode)


def prune(
    model: nn.Module,
    tokenizer,
    config: PruneConfig,
    *,
    calib: torch.Tensor | None = None,
    allocation: dict[str, float] | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` in place following ``config``.

    ``calib`` ([n, seqlen] token ids) replaces the calibration set of ``config``; ``allocation``
    (from :func:`plan`) replaces the allocator's per-layer targets.
    """
    config.validate()
    cache_dir = resolve_cache_dir(cache_dir)
    needs_data = bool(config.metric_entry.needs)
    if needs_data or needs_calibration(config):
        check_context(model, "seqlen", config.seqlen if calib is None else calib.shape[1])
    if calib is None and (needs_data or (allocation is None and needs_calibration(config))):
        calib = calibration_ids(tokenizer, config, cache_dir)
    if allocation is None:
        allocation = plan(model, config, cache_dir, tokenizer=tokenizer, calib=calib, progress=progress).allocation
    return prune_allocated(model, config, allocation, calib, cache_dir, progress)


def _zero_shot_on(model: nn.Module, tokenizer, config: PruneConfig, progress: bool) -> dict:
    """Zero-shot accuracy on ``config.tasks`` with the whole model on ``config.device``."""
    model.to(config.device)
    try:
        return zero_shot(
            model,
            tokenizer,
            config.tasks,
            include_path=config.include_path,
            limit=config.limit,
            batch_size=config.batch_size,
            device=config.device,
            progress=progress,
        )
    finally:
        model.to("cpu")


@dataclass
class RunOutput:
    record: RunRecord
    model: nn.Module
    tokenizer: Any
    result: PruneResult | None


def evaluate_dense(
    model: nn.Module,
    tokenizer,
    config: PruneConfig,
    cache_dir: Path,
    progress: bool = True,
    record: RunRecord | None = None,
    model_key: str | None = None,
) -> RunRecord:
    """Fill ``record.dense`` (perplexity) and ``record.zero_shot["dense"]`` as configured;
    ``model_key`` (the dense weights' fingerprint) lets the perplexity come from the cache."""
    record = record if record is not None else RunRecord(config.to_dict())
    t0 = time.perf_counter()
    if config.eval_data:
        kwargs = _eval_kwargs(config, cache_dir, progress)
        record.dense = evaluate(model, tokenizer, config.eval_data, **kwargs, model_key=model_key)
        log.info("dense perplexity %.3f", record.dense["ppl"])
    if config.tasks:
        record.zero_shot["dense"] = _zero_shot_on(model, tokenizer, config, progress)
    if config.eval_data or config.tasks:
        record.timings["dense_eval_s"] = time.perf_counter() - t0
    return record


def _eval_kwargs(config: PruneConfig, cache_dir: Path, progress: bool) -> dict[str, Any]:
    return dict(
        seqlen=config.eval_seqlen or config.seqlen,
        max_tokens=config.max_tokens,
        device=config.device,
        blocks_path=config.blocks_path,
        cache_dir=cache_dir,
        progress=progress,
    )


def prune_and_evaluate(
    job: Job,
    config: PruneConfig,
    *,
    dense: bool = True,
    dry_run: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
) -> tuple[RunRecord, PruneResult | None]:
    """Plan, (evaluate dense,) prune ``job``'s model in place with ``config`` and evaluate the
    pruned model; returns the run's record (without source, versions and totals, which the caller
    knows) and the engine's result. ``dense=False`` skips the dense evaluation (a sweep measures
    it once)."""
    model, tokenizer, cache_dir = job.model, job.tokenizer, job.cache_dir
    record = RunRecord(config.to_dict())
    planned = plan(
        model, config, cache_dir, tokenizer=tokenizer, calib=job.calib, progress=progress, job=job, executor=executor
    )
    allocation = planned.allocation
    record.allocation = {
        "allocator": config.allocator,
        "wall_s": planned.wall_s,
        "blocks": block_profile(planned.profile, allocation),
        **planned.details,
    }
    record.timings["plan_s"] = planned.wall_s
    if dry_run:
        record.allocation["layers"] = [
            {"name": x.name, "block": x.block, "shape": list(x.shape), "target": allocation[x.name]}
            for x in planned.profile.layers
        ]
        return record, None
    if dense:
        evaluate_dense(model, tokenizer, config, cache_dir, progress, record, model_key=job.fingerprint)
    t_prune = time.perf_counter()
    result = prune(
        model, tokenizer, config, calib=job.calib, allocation=allocation, cache_dir=cache_dir, progress=progress
    )
    record.timings["prune_s"] = time.perf_counter() - t_prune
    record.pruning = _pruning_section(model, config, result, record.timings["prune_s"])
    if config.eval_data:
        t0 = time.perf_counter()
        record.pruned = evaluate(model, tokenizer, config.eval_data, **_eval_kwargs(config, cache_dir, progress))
        record.timings["eval_s"] = time.perf_counter() - t0
        log.info("pruned perplexity %.3f", record.pruned["ppl"])
    if config.tasks:
        t0 = time.perf_counter()
        record.zero_shot["pruned"] = _zero_shot_on(model, tokenizer, config, progress)
        record.timings["zero_shot_s"] = time.perf_counter() - t0
    return record, result


def _pruning_section(model: nn.Module, config: PruneConfig, result: PruneResult, wall_s: float) -> dict[str, Any]:
    return {
        "blocks_path": result.blocks_path,
        "calib_tokens": result.calib_tokens,
        "sparsity": result.sparsity,
        "target": config.target,
        "mask_sha256": mask_digest(model, result.blocks_path),
        "wall_s": wall_s,
        "timings": result.timings,
        "layers": [
            {
                "name": r.name,
                "block": r.block,
                "shape": list(r.shape),
                "target": r.target,
                "achieved": r.achieved,
                "zeros": r.zeros,
            }
            for r in result.layers
        ],
    }


@dataclass
class RunOptions:
    """How :func:`run` runs a job (what it computes is the :class:`PruneConfig`): ``out`` (with the
    exporter ``format``; ``overwrite`` replaces a folder), ``cache_dir``, ``progress``, ``dry_run``
    (stop after planning; ``on_preview`` is given the :func:`preview` first), ``trust_remote_code``,
    ``expect`` (the ``source`` section of a record being rerun: other weights are refused before
    any work) and ``executor`` (where allocator trials run)."""

    out: Path | None = None
    overwrite: bool = False
    cache_dir: Path | None = None
    progress: bool = True
    dry_run: bool = False
    format: str = "safetensors"
    on_preview: Callable[[list[Work]], None] | None = None
    trust_remote_code: bool = False
    expect: dict[str, Any] | None = None
    executor: Executor = field(default_factory=Executor)


def run(config: PruneConfig, options: RunOptions | None = None, **settings: Any) -> RunOutput:
    """Load the model, prune it, evaluate dense and pruned (if ``eval_data`` / ``tasks``) and save
    it, as ``options`` (or the :class:`RunOptions` fields given as ``settings``) say."""
    opts = options if options is not None else RunOptions(**settings)
    config.validate()
    cache_dir = resolve_cache_dir(opts.cache_dir)
    if opts.out is not None and not opts.dry_run:
        EXPORTERS.get(opts.format)
        local = Path(config.model).expanduser()
        check_output_dir(Path(opts.out), opts.overwrite, (local if local.exists() else None, cache_dir))
    reset_peak_memory()
    t_start = time.perf_counter()
    scratch = Path(opts.out).resolve().parent if opts.out is not None else cache_dir / "stream"
    job = Job.load(config, cache_dir, trust_remote_code=opts.trust_remote_code, scratch=scratch, expect=opts.expect)
    t_loaded = time.perf_counter()
    if opts.dry_run and opts.on_preview is not None:
        opts.on_preview(preview(job.model, config, cache_dir, calib=job.calib, model_key=job.fingerprint))
    executor = opts.executor.with_options(trust_remote_code=opts.trust_remote_code)
    record, result = prune_and_evaluate(job, config, progress=opts.progress, dry_run=opts.dry_run, executor=executor)
    record.source = job.identity
    record.versions = versions()
    record.timings["load_s"] = t_loaded - t_start
    record.memory = job.placement.to_dict()
    if opts.dry_run:
        return RunOutput(record, job.model, job.tokenizer, None)
    record.wall_s = time.perf_counter() - t_start
    record.memory.update(peak_memory())
    if opts.out is not None:
        save_run(job.model, job.tokenizer, Path(opts.out), record, opts.overwrite, opts.format)
    return RunOutput(record, job.model, job.tokenizer, result)
