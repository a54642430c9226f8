"""The high-level API: prune a model in memory, or run a whole job (load, prune, evaluate, save)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import Profile, block_profile, check_allocation
from .config import PruneConfig, default_cache_dir
from .data import calibration_ids, heldout_ids
from .engine import PruneResult, allocate, build_profile, dense_input_norms, prune_model
from .errors import ConfigError
from .evaluate import check_tasks, evaluate, needs_bos, perplexity, zero_shot
from .gradients import layer_gradients
from .io import check_output_dir, mask_digest, peak_memory, save_run, versions
from .models import find_blocks, load_model, max_context, weight_matrix
from .registry import ALLOCATORS, METRICS
from .spectra import layer_eigenvalues
from .statcache import cached, fingerprint, model_fingerprint

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """The per-layer targets of a run and how they were found."""

    profile: Profile
    allocation: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)  # {"search": ...} (ATP) or {"rounds": ...} (MRP dynamic)
    wall_s: float = 0.0


def allocator_needs(config: PruneConfig) -> tuple[str, ...]:
    """The statistics the configured allocator needs (some depend on its parameters and the metric)."""
    name, params = config.allocator_spec
    entry = ALLOCATORS.get(name)
    needs_for = entry.extra.get("needs_for")
    return tuple(needs_for(params, config.metric_spec[0])) if needs_for else entry.needs


def needs_calibration(config: PruneConfig) -> bool:
    """Whether the run reads calibration data (for its metric or its allocator)."""
    return bool(METRICS.get(config.metric_spec[0]).needs) or "input_norms" in allocator_needs(config)


def plan(model: nn.Module, config: PruneConfig, cache_dir: Path | None = None, *, tokenizer=None,
         calib: torch.Tensor | None = None, progress: bool = True) -> dict[str, float]:
    """The per-layer sparsity targets ``{linear name: sparsity}`` for ``model`` (the model is left as it was).

    Allocators that read calibration data (OWL, MRP with Wanda scores, ATP's beta search) need
    ``tokenizer`` or ``calib``.
    """
    return _plan(model, config, cache_dir, tokenizer=tokenizer, calib=calib, progress=progress).allocation


def _profile_stats(model: nn.Module, config: PruneConfig, profile: Profile, cache_dir: Path,
                   calib: torch.Tensor | None, progress: bool) -> None:
    name = config.allocator_spec[0]
    for need in allocator_needs(config):
        if need == "eigenvalues":
            profile.stats[need] = layer_eigenvalues(model, profile, cache_dir, progress)
        elif need == "weights":
            profile.stats[need] = {x.name: weight_matrix(model.get_submodule(x.name)) for x in profile.layers}
        elif need == "input_norms":
            if calib is None:
                raise ValueError(f"allocator '{name}' needs calibration data (pass a tokenizer or calib)")
            key = fingerprint(calib, extra=f"{model_fingerprint(model)}:{config.blocks_path}")
            profile.stats[need] = cached(cache_dir, "input_norms", key, lambda: dense_input_norms(
                model, calib, batch_size=config.batch_size, device=config.device,
                blocks_path=config.blocks_path, progress=progress))
        else:
            raise ValueError(f"allocator '{name}' needs '{need}', which prunewise cannot compute yet")


def _plan(model: nn.Module, config: PruneConfig, cache_dir: Path | None = None, *, tokenizer=None,
          calib: torch.Tensor | None = None, progress: bool = True,
          dense_weights: dict[str, torch.Tensor] | None = None) -> Plan:
    config.validate()
    start = time.perf_counter()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    path, blocks = find_blocks(model, config.blocks_path)
    profile = build_profile(path, blocks)
    profile.metric = config.metric_spec[0]
    profile.pattern = config.pattern_obj
    name, params = config.allocator_spec
    driver = _driver(config)
    if calib is None and ("input_norms" in allocator_needs(config) or driver is not None):
        if tokenizer is None:
            raise ValueError(f"allocator '{name}' with metric '{config.metric_spec[0]}' needs calibration data (pass a tokenizer or calib)")
        calib = calibration_ids(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed, cache_dir)
    _profile_stats(model, config, profile, cache_dir, calib, progress)
    if driver is None:
        return Plan(profile, allocate(name, params, profile, config.target), {}, time.perf_counter() - start)
    # Drivers prune trial models and give the dense weights back: from the caller's copy when it
    # has one (a sweep keeps one for all its runs), else from their own.
    backup = dense_weights if dense_weights is not None else backup_weights(model, profile)
    allocation, details = driver(model, tokenizer, config, profile, calib, cache_dir, progress, backup)
    check_allocation(name, profile, allocation, config.target)
    return Plan(profile, allocation, details, time.perf_counter() - start)


def _driver(config: PruneConfig):
    """The pipeline-level loop an allocator setting needs (it prunes the model), or None."""
    name, bound = config.allocator_spec  # bound: every hyper-parameter, defaults filled in
    if name == "atp" and bound["beta"] == "auto":
        return _search
    if name == "mrp" and bound["stats"] == "dynamic":
        return _mrp_dynamic
    return None


def _mrp_dynamic(model: nn.Module, tokenizer, config: PruneConfig, profile: Profile, calib: torch.Tensor | None,
                 cache_dir: Path, progress: bool, backup: dict[str, torch.Tensor],
                 ) -> tuple[dict[str, float], dict[str, Any]]:
    """MRP with dynamic statistics: the budget is placed in ``rounds`` equal parts; after each part
    but the last, the model is pruned with the allocation so far (the run's metric) and the scores
    are re-measured on that sparse model (its weights, and activations of a dense-propagated pass)."""
    from .allocation import mrp

    name, bound = config.allocator_spec
    first = mrp.validate(profile, config.target, **bound)
    levels: dict[str, float] | None = None
    history = []
    start = time.perf_counter()
    try:
        for r in tqdm(range(1, bound["rounds"] + 1), desc="mrp rounds", unit="round", disable=not progress):
            goal = first + (config.target - first) * r / bound["rounds"]
            levels = mrp.fill(profile, goal, levels, **bound)
            history.append({"round": r, "target": goal, "blocks": block_profile(profile, levels)})
            if r == bound["rounds"]:
                break
            restore_weights(model, backup)
            prune(model, tokenizer, config, calib=calib, allocation=levels, cache_dir=cache_dir, progress=False)
            _profile_stats(model, config, profile, cache_dir, calib, progress=False)
    finally:
        restore_weights(model, backup)
    return levels, {"rounds": history, "rounds_wall_s": time.perf_counter() - start}


def _search(model: nn.Module, tokenizer, config: PruneConfig, profile: Profile, calib: torch.Tensor | None,
            cache_dir: Path, progress: bool, backup: dict[str, torch.Tensor],
            ) -> tuple[dict[str, float], dict[str, Any]]:
    """Grid-search an allocator's ``auto`` hyper-parameter by perplexity on held-out calibration text.

    Every candidate prunes the model exactly as the run will (same metric, pattern, mode and
    calibration set); the weights of the prunable layers are restored after each trial. The
    candidate ``0`` (uniform) is always scored, so the search never does worse than uniform on
    the held-out text.
    """
    from .allocation.atp import beta_grid

    name, bound = config.allocator_spec
    if tokenizer is None:
        raise ValueError(f"allocator '{name}': the search needs the tokenizer to read held-out text")
    heldout = heldout_ids(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed,
                          bound["heldout"], cache_dir)
    grid = [0.0] + beta_grid(profile, config.target, bound["step"])
    curve = []
    start = time.perf_counter()
    bar = tqdm(grid, desc=f"{name} search", unit="trial", disable=not progress)
    try:
        for beta in bar:
            trial = {**bound, "beta": beta}
            allocation = allocate(name, trial, profile, config.target)
            prune(model, tokenizer, config, calib=calib, allocation=allocation, cache_dir=cache_dir, progress=False)
            was_training = model.training
            model.eval()
            ppl = perplexity(model, heldout.reshape(-1), config.seqlen, device=config.device,
                             bos_id=needs_bos(model, tokenizer), progress=False)["ppl"]
            model.train(was_training)
            curve.append({"beta": beta, "ppl": ppl})
            bar.set_postfix(beta=f"{beta:.4f}", ppl=f"{ppl:.3f}")
            restore_weights(model, backup)
    finally:
        restore_weights(model, backup)
    best = min(curve, key=lambda c: (c["ppl"], c["beta"]))
    log.info("%s: beta=%g chosen (held-out ppl %.3f over %d trials)", name, best["beta"], best["ppl"], len(curve))
    record = {
        "parameter": "beta", "chosen": best["beta"], "criterion": "perplexity on held-out calibration windows",
        "heldout": {"data": config.calib, "windows": int(heldout.shape[0]), "seqlen": config.seqlen},
        "curve": curve, "wall_s": time.perf_counter() - start,
    }
    return allocate(name, {**bound, "beta": best["beta"]}, profile, config.target), {"search": record}


def backup_weights(model: nn.Module, profile: Profile) -> dict[str, torch.Tensor]:
    """A copy of the prunable weights, for drivers that prune trial models and must give the dense one back."""
    return {x.name: weight_matrix(model.get_submodule(x.name)).detach().clone() for x in profile.layers}


@torch.no_grad()
def restore_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
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
                                cache_dir or default_cache_dir())
    if allocation is None:
        allocation = plan(model, config, cache_dir, tokenizer=tokenizer, calib=calib, progress=progress)
    grads, grad_s = None, 0.0
    if "grad" in METRICS.get(metric).needs:
        t0 = time.perf_counter()
        grads = layer_gradients(model, calib, norm=params["norm"], scale=params["scale"],
                                checkpointing=params["checkpointing"], device=config.device,
                                blocks_path=config.blocks_path, cache_dir=cache_dir or default_cache_dir(),
                                progress=progress)
        grad_s = time.perf_counter() - t0
    result = prune_model(
        model, calib, metric=metric, metric_params=params, allocation=allocation, pattern=config.pattern_obj,
        mode=config.mode, propagate=config.propagate, batch_size=config.batch_size, device=config.device,
        blocks_path=config.blocks_path, progress=progress, grads=grads,
    )
    if grads is not None:
        result.timings["gradients_s"] = grad_s
    return result


def _evaluate_on(model: nn.Module, tokenizer, config: PruneConfig, kwargs: dict[str, Any]) -> dict:
    """Evaluate with the whole model on ``config.device``; pruning keeps it on the CPU between blocks."""
    model.to(config.device)
    try:
        return evaluate(model, tokenizer, config.eval_data, **kwargs)
    finally:
        model.to("cpu")


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
    record: dict[str, Any]
    model: nn.Module
    tokenizer: Any
    result: PruneResult | None


def evaluate_dense(model: nn.Module, tokenizer, config: PruneConfig, cache_dir: Path, progress: bool = True) -> dict:
    """``{"dense": perplexity, "zero_shot": {"dense": ...}}`` as configured (either may be absent)."""
    out: dict[str, Any] = {}
    if config.eval_data:
        out["dense"] = _evaluate_on(model, tokenizer, config, _eval_kwargs(config, cache_dir, progress))
        log.info("dense perplexity %.3f", out["dense"]["ppl"])
    if config.tasks:
        out["zero_shot"] = {"dense": _zero_shot_on(model, tokenizer, config, progress)}
    return out


def _eval_kwargs(config: PruneConfig, cache_dir: Path, progress: bool) -> dict[str, Any]:
    return dict(seqlen=config.eval_seqlen or config.seqlen, max_tokens=config.max_tokens,
                device=config.device, cache_dir=cache_dir, progress=progress)


def prune_and_evaluate(model: nn.Module, tokenizer, config: PruneConfig, *, calib: torch.Tensor | None,
                       cache_dir: Path, progress: bool = True, dense: bool = True, dry_run: bool = False,
                       dense_weights: dict[str, torch.Tensor] | None = None,
                       ) -> tuple[dict[str, Any], PruneResult | None]:
    """Plan, (evaluate dense,) prune in place and evaluate the pruned model; returns the record
    sections (``allocation``, ``dense``, ``pruning``, ``pruned``, ``zero_shot``, ``timings``) and the
    engine's result. ``dense=False`` skips the dense evaluation (a sweep measures it once);
    ``dense_weights`` is a copy of the dense prunable weights that allocator searches restore from."""
    record: dict[str, Any] = {}
    planned = _plan(model, config, cache_dir, tokenizer=tokenizer, calib=calib, progress=progress,
                    dense_weights=dense_weights)
    allocation = planned.allocation
    record["allocation"] = {
        "allocator": config.allocator, "wall_s": planned.wall_s,
        "blocks": block_profile(planned.profile, allocation),
    }
    record["allocation"].update(planned.details)
    if dry_run:
        record["allocation"]["layers"] = [
            {"name": x.name, "block": x.block, "shape": list(x.shape), "target": allocation[x.name]}
            for x in planned.profile.layers
        ]
        return record, None
    if dense:
        record.update(evaluate_dense(model, tokenizer, config, cache_dir, progress))
    t_prune = time.perf_counter()
    result = prune(model, tokenizer, config, calib=calib, allocation=allocation, cache_dir=cache_dir,
                   progress=progress)
    prune_s = time.perf_counter() - t_prune
    record["pruning"] = {
        "blocks_path": result.blocks_path,
        "calib_tokens": result.calib_tokens,
        "sparsity": result.sparsity,
        "target": config.target,
        "mask_sha256": mask_digest(model, result.blocks_path),
        "wall_s": prune_s,
        "timings": result.timings,
        "layers": [
            {"name": r.name, "block": r.block, "shape": list(r.shape), "target": r.target,
             "achieved": r.achieved, "zeros": r.zeros}
            for r in result.layers
        ],
    }
    timings = record["timings"] = {}
    if config.eval_data:
        t0 = time.perf_counter()
        record["pruned"] = _evaluate_on(model, tokenizer, config, _eval_kwargs(config, cache_dir, progress))
        timings["eval_s"] = time.perf_counter() - t0
        log.info("pruned perplexity %.3f", record["pruned"]["ppl"])
    if config.tasks:
        t0 = time.perf_counter()
        record.setdefault("zero_shot", {})["pruned"] = _zero_shot_on(model, tokenizer, config, progress)
        timings["zero_shot_s"] = time.perf_counter() - t0
    return record, result


def check_inputs(model: nn.Module, config: PruneConfig) -> None:
    """Context lengths and task names, checked before any long work."""
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
) -> RunOutput:
    """Load the model, prune it, evaluate dense and pruned (if ``eval_data`` / ``tasks``) and save to ``out``."""
    config.validate()
    if out is not None and not dry_run:
        check_output_dir(Path(out), overwrite)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    t_start = time.perf_counter()
    model, tokenizer, source = load_model(config.model, config.dtype, cache_dir)
    check_inputs(model, config)
    record: dict[str, Any] = {
        "config": config.to_dict(),
        "source": {"kind": source.kind, "path": source.path},
        "versions": versions(),
    }
    # Calibration data before anything long: a bad source fails first.
    calib = None
    if needs_calibration(config):
        calib = calibration_ids(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed, cache_dir)
    sections, result = prune_and_evaluate(model, tokenizer, config, calib=calib, cache_dir=cache_dir,
                                          progress=progress, dry_run=dry_run)
    record.update(sections)
    if dry_run:
        return RunOutput(record, model, tokenizer, None)
    record["wall_s"] = time.perf_counter() - t_start
    record["memory"] = peak_memory()
    if out is not None:
        save_run(model, tokenizer, Path(out), record, overwrite)
    return RunOutput(record, model, tokenizer, result)
