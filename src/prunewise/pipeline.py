"""The high-level API: prune a model in memory, or run a whole job (load, prune, evaluate, save)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .allocation import Profile, block_profile, planner
from .allocation.planner import Plan, build_profile
from .allocation.preview import Work
from .allocation.preview import preview as plan_preview
from .allocation.providers import StatContext, provide, reads_calibration
from .blocks import make_source
from .config import PruneConfig, default_device, resolve_cache_dir
from .data import calibration_ids, heldout_ids, load_text, tokenize
from .engine import PruneOptions, PruneResult, prune_blocks
from .errors import ConfigError, PrunewiseError
from .evaluate import check_tasks, evaluate, needs_bos, perplexity, zero_shot
from .export import EXPORTERS
from .io import (
    check_output_dir,
    check_same_model,
    mask_digest,
    peak_memory,
    save_run,
    source_info,
    versions,
)
from .memory import Estimate, estimate
from .models import load_model, max_context, model_folder, weight_matrix
from .record import RECORD, RunRecord
from .registry import METRICS
from .streaming import stream_of

log = logging.getLogger(__name__)


def allocator_needs(config: PruneConfig) -> tuple[str, ...]:
    """The statistics the configured allocator needs (some depend on its parameters and the metric)."""
    name, params = config.allocator_spec
    return planner.allocator_needs(name, params, config.metric_spec[0])


def needs_calibration(config: PruneConfig) -> bool:
    """Whether the run reads calibration data (for its metric, its allocator's statistics or its driver)."""
    name, params = config.allocator_spec
    return (bool(METRICS.get(config.metric_spec[0]).needs) or reads_calibration(allocator_needs(config))
            or planner.driver_of(name, params) is not None)


def stat_context(model: nn.Module, config: PruneConfig, cache_dir: Path, calib: torch.Tensor | None,
                 progress: bool, profile: Profile | None = None, model_key: str | None = None) -> StatContext:
    """What statistic providers read for this run (the model as a block source, calibration ids, cache)."""
    source = make_source(model, config.blocks_path, config.device)
    metric, params = config.metric_spec
    if profile is None:
        profile = build_profile(source)
        profile.metric = metric
        profile.pattern = config.pattern_obj
    return StatContext(source, profile, cache_dir, calib, config.batch_size, METRICS.get(metric), params, progress,
                       model_key)


def plan(model: nn.Module, config: PruneConfig, cache_dir: Path | None = None, *, tokenizer=None,
         calib: torch.Tensor | None = None, progress: bool = True,
         dense_weights: dict[str, torch.Tensor] | None = None, model_key: str | None = None,
         executor: str = "local", executor_options: dict[str, Any] | None = None) -> Plan:
    """The per-layer sparsity targets of ``config`` for ``model`` and how they were found; the model
    is left as it was. Allocators that read calibration data (OWL, MRP with Wanda scores) need
    ``tokenizer`` or ``calib``; drivers that prune trial models (ATP's search) need ``tokenizer``
    for held-out text. ``dense_weights`` (a copy of the dense prunable weights, as a sweep keeps)
    is what trials restore from; without it the planner takes its own copy. ``model_key`` is the
    model's fingerprint when the caller has it (:func:`prunewise.io.source_info`). With
    ``executor="ray"`` a driver's trials are scored in parallel on Ray workers that load
    ``config.model`` themselves (:class:`prunewise.executors.RayTrials`, ``executor_options``:
    workers, address, threads, trust_remote_code)."""
    config.validate()
    cache_dir = resolve_cache_dir(cache_dir)
    name, params = config.allocator_spec
    driver = planner.driver_of(name, params)
    if calib is None and (reads_calibration(allocator_needs(config)) or driver is not None):
        if tokenizer is None:
            raise ValueError(f"allocator '{name}' with metric '{config.metric_spec[0]}' needs calibration data "
                             "(pass a tokenizer or calib)")
        calib = calibration_ids(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed, cache_dir)
    ctx = stat_context(model, config, cache_dir, calib, progress, model_key=model_key)
    trials = parallel = None
    if driver is not None:
        backup = dense_weights if dense_weights is not None else backup_weights(model, ctx.profile)
        if executor != "local":
            from .executors import make_trials

            parallel = make_trials(executor, config, cache_dir, model_key or ctx.fingerprint(), **(executor_options or {}))
        trials = _trials(model, tokenizer, config, calib, cache_dir, backup, parallel)
    try:
        return planner.make_plan(ctx, name, params, config.target, trials)
    finally:
        if parallel is not None:
            parallel.close()


def preview(model: nn.Module, config: PruneConfig, cache_dir: Path | None = None, *,
            calib: torch.Tensor | None = None, model_key: str | None = None) -> list[Work]:
    """The heavy steps :func:`plan` would take for ``config`` (calibration passes, SVDs, trial
    prunings), each with a rough duration or marked cached; computes nothing but two timings."""
    ctx = stat_context(model, config, resolve_cache_dir(cache_dir), calib, False, model_key=model_key)
    name, params = config.allocator_spec
    return plan_preview(ctx, name, params, config.target, config.mode)


def _trials(model: nn.Module, tokenizer, config: PruneConfig, calib: torch.Tensor | None, cache_dir: Path,
            backup: dict[str, torch.Tensor], parallel=None) -> planner.Trials:
    """The model operations an allocator driver may use: prune as the run will, score on held-out
    calibration windows, re-measure statistics, restore the dense weights."""
    name = config.allocator_spec[0]
    heldout: dict[int, torch.Tensor] = {}

    def heldout_ids_for(windows: int) -> torch.Tensor:
        if tokenizer is None:
            raise ValueError(f"allocator '{name}': the search needs the tokenizer to read held-out text")
        if windows not in heldout:
            heldout[windows] = heldout_ids(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed,
                                           windows, cache_dir)
        return heldout[windows]

    def trial_prune(allocation: dict[str, float]) -> None:
        restore_weights(model, backup)
        prune(model, tokenizer, config, calib=calib, allocation=allocation, cache_dir=cache_dir, progress=False)

    def trial_perplexity(windows: int) -> float:
        ids = heldout_ids_for(windows).reshape(-1)
        was_training = model.training
        model.eval()
        try:
            return perplexity(model, ids, config.seqlen, device=config.device, bos_id=needs_bos(model, tokenizer),
                              blocks_path=config.blocks_path, progress=False)["ppl"]
        finally:
            model.train(was_training)

    def describe(windows: int) -> dict[str, Any]:
        return {"data": config.calib, "windows": int(heldout_ids_for(windows).shape[0]), "seqlen": config.seqlen}

    def remeasure(profile: Profile) -> None:
        ctx = stat_context(model, config, cache_dir, calib, False, profile)
        profile.stats.update(provide(allocator_needs(config), ctx))

    return planner.Trials(trial_prune, trial_perplexity, describe, remeasure, lambda: restore_weights(model, backup),
                          parallel)


def backup_weights(model: nn.Module, profile: Profile) -> dict[str, torch.Tensor]:
    """A copy of the prunable weights, for drivers that prune trial models and must give the dense
    one back; a streamed model needs none (its dense checkpoint is the copy): ``{}``."""
    if stream_of(model) is not None:
        return {}
    return {x.name: weight_matrix(model.get_submodule(x.name)).detach().clone() for x in profile.layers}


@torch.no_grad()
def restore_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """The dense weights back: copied from ``weights``, or for a streamed model by streaming from
    its dense checkpoint again."""
    stream = stream_of(model)
    if stream is not None:
        stream.restore()
        return
    for name, w in weights.items():
        weight_matrix(model.get_submodule(name)).copy_(w)


def check_context(model: nn.Module, field: str, value: int | None) -> None:
    ctx = max_context(model)
    if ctx is not None and value is not None and value > ctx:
        raise ConfigError(f"{field}: {value} exceeds the model's context of {ctx} tokens")


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
    metric, params = config.metric_spec
    needs_data = bool(METRICS.get(metric).needs)
    if needs_data or needs_calibration(config):
        check_context(model, "seqlen", config.seqlen if calib is None else calib.shape[1])
    if calib is None and (needs_data or (allocation is None and needs_calibration(config))):
        calib = calibration_ids(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed,
                                resolve_cache_dir(cache_dir))
    if allocation is None:
        allocation = plan(model, config, cache_dir, tokenizer=tokenizer, calib=calib, progress=progress).allocation
    entry = METRICS.get(metric)
    grads, grad_s = None, 0.0
    if "grad" in entry.needs:
        t0 = time.perf_counter()
        grads = provide(("grad",), stat_context(model, config, resolve_cache_dir(cache_dir), calib, progress))["grad"]
        grad_s = time.perf_counter() - t0
    opts = PruneOptions(entry, params, allocation, config.pattern_obj, config.mode, config.propagate,
                        config.batch_size, grads)
    result = prune_blocks(make_source(model, config.blocks_path, config.device), calib, opts, progress)
    if grads is not None:
        result.timings["gradients_s"] = grad_s
    return result


def _model_gb(model: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9


def _zero_shot_on(model: nn.Module, tokenizer, config: PruneConfig, progress: bool) -> dict:
    """Zero-shot accuracy on ``config.tasks`` with the whole model on ``config.device``."""
    model.to(config.device)
    try:
        return zero_shot(model, tokenizer, config.tasks, include_path=config.include_path, limit=config.limit,
                         batch_size=config.batch_size, device=config.device, progress=progress)
    finally:
        model.to("cpu")


@dataclass
class RunOutput:
    record: RunRecord
    model: nn.Module
    tokenizer: Any
    result: PruneResult | None


def evaluate_dense(model: nn.Module, tokenizer, config: PruneConfig, cache_dir: Path, progress: bool = True,
                   record: RunRecord | None = None) -> RunRecord:
    """Fill ``record.dense`` (perplexity) and ``record.zero_shot["dense"]`` as configured."""
    record = record if record is not None else RunRecord(config.to_dict())
    t0 = time.perf_counter()
    if config.eval_data:
        record.dense = evaluate(model, tokenizer, config.eval_data, **_eval_kwargs(config, cache_dir, progress))
        log.info("dense perplexity %.3f", record.dense["ppl"])
    if config.tasks:
        record.zero_shot["dense"] = _zero_shot_on(model, tokenizer, config, progress)
    if config.eval_data or config.tasks:
        record.timings["dense_eval_s"] = time.perf_counter() - t0
    return record


def _eval_kwargs(config: PruneConfig, cache_dir: Path, progress: bool) -> dict[str, Any]:
    return dict(seqlen=config.eval_seqlen or config.seqlen, max_tokens=config.max_tokens, device=config.device,
                blocks_path=config.blocks_path, cache_dir=cache_dir, progress=progress)


def prune_and_evaluate(model: nn.Module, tokenizer, config: PruneConfig, *, calib: torch.Tensor | None,
                       cache_dir: Path, progress: bool = True, dense: bool = True, dry_run: bool = False,
                       dense_weights: dict[str, torch.Tensor] | None = None, model_key: str | None = None,
                       executor: str = "local", executor_options: dict[str, Any] | None = None,
                       ) -> tuple[RunRecord, PruneResult | None]:
    """Plan, (evaluate dense,) prune in place and evaluate the pruned model; returns the run's
    record (without source, versions and totals, which the caller knows) and the engine's result.
    ``dense=False`` skips the dense evaluation (a sweep measures it once); ``dense_weights`` is a
    copy of the dense prunable weights that allocator drivers restore from; ``model_key`` the dense
    model's fingerprint, when known."""
    record = RunRecord(config.to_dict())
    planned = plan(model, config, cache_dir, tokenizer=tokenizer, calib=calib, progress=progress,
                   dense_weights=dense_weights, model_key=model_key, executor=executor,
                   executor_options=executor_options)
    allocation = planned.allocation
    record.allocation = {"allocator": config.allocator, "wall_s": planned.wall_s,
                         "blocks": block_profile(planned.profile, allocation), **planned.details}
    record.timings["plan_s"] = planned.wall_s
    if dry_run:
        record.allocation["layers"] = [
            {"name": x.name, "block": x.block, "shape": list(x.shape), "target": allocation[x.name]}
            for x in planned.profile.layers
        ]
        return record, None
    if dense:
        evaluate_dense(model, tokenizer, config, cache_dir, progress, record)
    t_prune = time.perf_counter()
    result = prune(model, tokenizer, config, calib=calib, allocation=allocation, cache_dir=cache_dir,
                   progress=progress)
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
            {"name": r.name, "block": r.block, "shape": list(r.shape), "target": r.target,
             "achieved": r.achieved, "zeros": r.zeros}
            for r in result.layers
        ],
    }


def eval_tokens(tokenizer, config: PruneConfig, cache_dir: Path) -> int:
    """Tokens the run's perplexity evaluation reads (0 without ``eval_data``)."""
    if not config.eval_data:
        return 0
    n = tokenize(tokenizer, load_text(config.eval_data, "evaluation").text, cache_dir).numel()
    return min(n, config.max_tokens) if config.max_tokens else n


def placement_of(model: nn.Module, tokenizer, config: PruneConfig, cache_dir: Path, stream: str) -> Estimate:
    """The run's estimated peak memory over ``model`` and the mode ``stream`` resolves to."""
    eval_seqlen = config.eval_seqlen or config.seqlen
    return estimate(model, windows=config.nsamples if needs_calibration(config) else 0, seqlen=config.seqlen,
                    batch_size=config.batch_size, hessians="hessian" in METRICS.get(config.metric_spec[0]).needs,
                    eval_windows=eval_tokens(tokenizer, config, cache_dir) // eval_seqlen, eval_seqlen=eval_seqlen,
                    device=config.device, blocks_path=config.blocks_path, stream=stream)


def load_placed(config: PruneConfig, cache_dir: Path, trust_remote_code: bool = False,
                scratch: Path | None = None) -> tuple[nn.Module, Any, Any, Estimate]:
    """``(model, tokenizer, source, placement)``: the model streamed from its checkpoint or loaded
    whole, as ``config.stream`` says (``auto``: streamed when the in-memory estimate does not fit
    in the memory this process may use, cgroup limits included). Only local safetensors folders
    stream; anything else loads whole, and so does, with ``auto``, a folder that cannot stream
    (no safetensors weights, tensor names transformers converts, a damaged file: the whole load
    then says what is wrong)."""
    folder, why = model_folder(config.model, cache_dir), None
    if config.stream == "on" and folder is None:
        raise PrunewiseError(f"stream: --stream on reads a local safetensors folder; '{config.model}' is not one")
    if config.stream != "off" and folder is not None:
        try:
            model, tok, source = load_model(config.model, config.dtype, cache_dir, stream=True,
                                            trust_remote_code=trust_remote_code, blocks_path=config.blocks_path,
                                            scratch_root=scratch)
        except PrunewiseError as exc:
            if config.stream == "on":
                raise
            why, model = str(exc), None
        placement = None if model is None else placement_of(model, tok, config, cache_dir, config.stream)
        if placement is not None and placement.mode == "stream":
            log.info("streaming %s: estimated peak %.2f GB on the host (%.2f GB loaded whole)", config.model,
                     placement.host_stream / 1e9, placement.host_memory / 1e9)
            return model, tok, source, placement
        del model
    model, tok, source = load_model(config.model, config.dtype, cache_dir, trust_remote_code=trust_remote_code)
    if why:  # the whole load worked where streaming could not: say why it is not streamed
        log.info("not streamed: %s", why)
    return model, tok, source, placement_of(model, tok, config, cache_dir, "off")


def check_inputs(model: nn.Module, config: PruneConfig) -> None:
    """Context lengths and task names, checked before any long work; zero-shot, which lm-eval runs
    on the whole model, is refused for a streamed one."""
    if config.tasks and stream_of(model) is not None:
        raise PrunewiseError(
            "tasks: zero-shot evaluation runs through lm-eval on the whole model in memory "
            f"({_model_gb(model):.1f} GB), which this run streams; drop --tasks and evaluate the saved run with "
            "`prunewise eval --tasks ...` on a machine that holds it")
    if needs_calibration(config):
        check_context(model, "seqlen", config.seqlen)
    if config.eval_data:
        check_context(model, "eval_seqlen", config.eval_seqlen or config.seqlen)
    if config.tasks:
        check_tasks(config.tasks, config.include_path)


def run(
    config: PruneConfig,
    *,
    out: Path | None = None,
    overwrite: bool = False,
    cache_dir: Path | None = None,
    progress: bool = True,
    dry_run: bool = False,
    format: str = "safetensors",
    on_preview: Callable[[list[Work]], None] | None = None,
    trust_remote_code: bool = False,
    expect: dict[str, Any] | None = None,
    executor: str = "local",
    executor_options: dict[str, Any] | None = None,
) -> RunOutput:
    """Load the model, prune it, evaluate dense and pruned (if ``eval_data`` / ``tasks``) and save
    to ``out`` with the exporter ``format``. A dry run stops after planning; ``on_preview`` is
    given its :func:`preview` before the planning starts. ``expect`` is the ``source`` section of a
    record being rerun: a model whose weights differ from it is refused before any work."""
    config.validate()
    cache_dir = resolve_cache_dir(cache_dir)
    if out is not None and not dry_run:
        EXPORTERS.get(format)
        local = Path(config.model).expanduser()
        check_output_dir(Path(out), overwrite, (local if local.exists() else None, cache_dir))
    t_start = time.perf_counter()
    scratch = Path(out).resolve().parent if out is not None else cache_dir / "stream"
    model, tokenizer, source, placement = load_placed(config, cache_dir, trust_remote_code, scratch)
    identity = source_info(model, source)
    check_same_model(expect, identity, "the record")
    check_inputs(model, config)
    # Calibration data before anything long: a bad source fails first.
    calib = None
    if needs_calibration(config):
        calib = calibration_ids(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed, cache_dir)
    t_loaded = time.perf_counter()
    if dry_run and on_preview is not None:
        on_preview(preview(model, config, cache_dir, calib=calib, model_key=identity["fingerprint"]))
    record, result = prune_and_evaluate(model, tokenizer, config, calib=calib, cache_dir=cache_dir,
                                        progress=progress, dry_run=dry_run, model_key=identity["fingerprint"],
                                        executor=executor,
                                        executor_options={**(executor_options or {}),
                                                          "trust_remote_code": trust_remote_code})
    record.source = identity
    record.versions = versions()
    record.timings["load_s"] = t_loaded - t_start
    record.memory = placement.to_dict()
    if dry_run:
        return RunOutput(record, model, tokenizer, None)
    record.wall_s = time.perf_counter() - t_start
    record.memory.update(peak_memory())
    if out is not None:
        save_run(model, tokenizer, Path(out), record, overwrite, format)
    return RunOutput(record, model, tokenizer, result)


@dataclass
class EvalOutput:
    """Labelled perplexity entries and zero-shot results, in display order."""

    perplexity: list[tuple[str, dict]] = field(default_factory=list)
    zero_shot: list[tuple[str, dict]] = field(default_factory=list)


def evaluate_run(model: str, *, data: str = "wiki", seqlen: int | None = None, max_tokens: int | None = None,
                 batch_size: int = 1, device: str | None = None, dtype: str = "auto", tasks: str | None = None,
                 include_path: str | None = None, limit: float | None = None, dense: bool = True,
                 cache_dir: Path | None = None, progress: bool = True, trust_remote_code: bool = False,
                 stream: str = "auto") -> EvalOutput:
    """Evaluate a model; for a prunewise run folder, also its dense source, reusing the record's dense
    numbers when they were measured with the same protocol (else the source is loaded, checked
    against the record's fingerprint, and measured).
    ``data="none"`` skips perplexity; ``seqlen`` defaults to the run's evaluation window, else 2048.
    ``stream`` places each model as :func:`load_placed` does (zero-shot needs it whole)."""
    device = device or default_device()
    want_ppl = data.lower() != "none"
    if not want_ppl and not tasks:
        raise PrunewiseError("nothing to evaluate: --data none and no --tasks")
    if tasks:
        check_tasks(tasks, include_path)
    cache_dir = resolve_cache_dir(cache_dir)
    path = Path(model).expanduser()
    record = RunRecord.read(path) if path.is_dir() and (path / RECORD).is_file() else None
    if seqlen is None and record is not None:
        seqlen = record.config.get("eval_seqlen") or record.config.get("seqlen")
    seqlen = seqlen or 2048
    if seqlen < 2:
        raise PrunewiseError(f"seqlen: must be at least 2, got {seqlen}")

    def measure(load: Callable[[], tuple], ppl: bool, zs: bool) -> tuple[dict | None, dict | None]:
        return _measure(load, cache_dir, data if ppl else None, seqlen,
                        dict(max_tokens=max_tokens, batch_size=batch_size, device=device, progress=progress),
                        dict(tasks=tasks, include_path=include_path, limit=limit) if zs else None)

    def placed(spec: str) -> PruneConfig:  # what load_placed estimates: perplexity windows only
        return PruneConfig(model=spec, metric="magnitude", dtype=dtype, stream="off" if tasks else stream,
                           device=device, batch_size=batch_size, eval_data=data if want_ppl else None,
                           eval_seqlen=seqlen, max_tokens=max_tokens)

    result, acc = measure(lambda: load_placed(placed(model), cache_dir, trust_remote_code)[:2], want_ppl, bool(tasks))
    out = EvalOutput()
    if record is None or not dense:
        if want_ppl:
            out.perplexity.append((str(model), result))
        if tasks:
            out.zero_shot.append((path.name or str(model), acc))
        if record is not None:
            _append_evaluation(record, path, None, result, None, acc, tasks, limit)
        return out
    dense_ppl = record.reusable("dense", result) if want_ppl else None
    dense_acc = record.reusable_zero_shot("dense", tasks, limit, include_path) if tasks else None
    if (want_ppl and dense_ppl is None) or (tasks and dense_acc is None):
        d_ppl, d_acc = measure(lambda: load_dense_source(record, dtype, cache_dir, trust_remote_code,
                                                         placed(dense_spec(record))),
                               want_ppl and dense_ppl is None, bool(tasks) and dense_acc is None)
        dense_ppl, dense_acc = dense_ppl or d_ppl, dense_acc or d_acc
    cfg = record.config
    if want_ppl:
        out.perplexity += [(f"dense {cfg['model']}", dense_ppl), (f"pruned ({cfg['metric']}, {record.sparsity:.3f})", result)]
    if tasks:
        out.zero_shot += [("dense", dense_acc), ("pruned", acc)]
    _append_evaluation(record, path, dense_ppl, result, dense_acc, acc, tasks, limit)
    return out


def dense_spec(record: RunRecord) -> str:
    """What to load for a run's dense source: where it was loaded from, else the model as named."""
    kind, src = record.source.get("kind"), record.source.get("path")
    return src if kind in ("folder", "gguf") and src else record.config["model"]


def load_dense_source(record: RunRecord, dtype: str, cache_dir: Path, trust_remote_code: bool = False,
                      placed: PruneConfig | None = None):
    """``(model, tokenizer)`` of a run's dense source, refused when its weights are not the record's
    (checked when loaded in the run's dtype: a fingerprint is of the weights as loaded); ``placed``
    streams it as :func:`load_placed` decides."""
    if placed is not None:
        model, tok, source, _ = load_placed(placed, cache_dir, trust_remote_code)
    else:
        model, tok, source = load_model(dense_spec(record), dtype, cache_dir, trust_remote_code=trust_remote_code)
    if dtype == record.config.get("dtype", "auto"):
        check_same_model(record.source, source_info(model, source), "the run")
    return model, tok


def _append_evaluation(record: RunRecord, folder: Path, dense_ppl: dict | None, ppl: dict | None,
                       dense_acc: dict | None, acc: dict | None, tasks: str | None, limit: float | None) -> None:
    """Add one evaluation to the run folder's record (append-only), so reports see it."""
    import datetime as dt

    entry: dict[str, Any] = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if ppl is not None:
        entry["perplexity"] = {"dense": dense_ppl, "pruned": ppl}
    if acc is not None:
        entry["zero_shot"] = {"tasks": tasks, "limit": limit, "dense": dense_acc, "pruned": acc}
    record.evaluations.append(entry)
    record.write(folder / RECORD)


def _measure(load: Callable[[], tuple], cache_dir: Path, data: str | None, seqlen: int, kw: dict[str, Any],
             zs: dict[str, Any] | None) -> tuple[dict | None, dict | None]:
    """``load()`` a model and its tokenizer and measure its perplexity on ``data`` and/or zero-shot
    accuracy (``zs``)."""
    model, tok = load()
    ppl = None
    if data is not None:
        check_context(model, "seqlen", seqlen)
        ppl = evaluate(model, tok, data, seqlen, cache_dir=cache_dir, **kw)
    acc = None
    if zs is not None:
        model.to(kw["device"])
        acc = zero_shot(model, tok, zs["tasks"], include_path=zs["include_path"], limit=zs["limit"],
                        batch_size=kw["batch_size"], device=kw["device"], progress=kw["progress"])
    return ppl, acc
