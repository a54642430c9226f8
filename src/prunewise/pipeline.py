"""The high-level API: prune a model in memory, or run a whole job (load, prune, evaluate, save)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .allocation import Profile
from .config import PruneConfig, default_cache_dir
from .data import calibration_ids
from .engine import PruneResult, allocate, build_profile, prune_model
from .errors import ConfigError
from .evaluate import evaluate
from .io import check_output_dir, mask_digest, peak_memory, save_run, versions
from .models import find_blocks, load_model, max_context
from .registry import ALLOCATORS, METRICS
from .spectra import layer_eigenvalues

log = logging.getLogger(__name__)


def plan(model: nn.Module, config: PruneConfig, cache_dir: Path | None = None) -> dict[str, float]:
    """The per-layer sparsity targets ``{linear name: sparsity}`` for ``model`` (no pruning)."""
    return _plan(model, config, cache_dir)[1]


def _plan(model: nn.Module, config: PruneConfig, cache_dir: Path | None = None) -> tuple[Profile, dict[str, float]]:
    config.validate()
    path, blocks = find_blocks(model, config.blocks_path)
    profile = build_profile(path, blocks)
    name, params = config.allocator_spec
    for need in ALLOCATORS.get(name).needs:
        if need == "eigenvalues":
            profile.stats[need] = layer_eigenvalues(model, profile, cache_dir or default_cache_dir())
        else:
            raise ValueError(f"allocator '{name}' needs '{need}', which prunewise cannot compute yet")
    return profile, allocate(name, params, profile, config.target)


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
    if allocation is None:
        allocation = plan(model, config, cache_dir)
    metric, params = config.metric_spec
    needs_data = bool(METRICS.get(metric).needs)
    if needs_data:
        check_context(model, "seqlen", config.seqlen if calib is None else calib.shape[1])
    if calib is None and needs_data:
        calib = calibration_ids(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed,
                                cache_dir or default_cache_dir())
    return prune_model(
        model, calib, metric=metric, metric_params=params, allocation=allocation, pattern=config.pattern_obj,
        mode=config.mode, propagate=config.propagate, batch_size=config.batch_size, device=config.device,
        blocks_path=config.blocks_path, progress=progress,
    )


def _evaluate_on(model: nn.Module, tokenizer, config: PruneConfig, kwargs: dict[str, Any]) -> dict:
    """Evaluate with the whole model on ``config.device``; pruning keeps it on the CPU between blocks."""
    model.to(config.device)
    try:
        return evaluate(model, tokenizer, config.eval_data, **kwargs)
    finally:
        model.to("cpu")


@dataclass
class RunOutput:
    record: dict[str, Any]
    model: nn.Module
    tokenizer: Any
    result: PruneResult | None


def run(
    config: PruneConfig,
    *,
    out: Path | None = None,
    overwrite: bool = False,
    cache_dir: Path | None = None,
    progress: bool = True,
    dry_run: bool = False,
) -> RunOutput:
    """Load the model, prune it, evaluate dense and pruned (if ``eval_data``) and save to ``out``."""
    config.validate()
    if out is not None and not dry_run:
        check_output_dir(Path(out), overwrite)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    t_start = time.perf_counter()
    model, tokenizer, source = load_model(config.model, config.dtype, cache_dir)
    needs_data = bool(METRICS.get(config.metric_spec[0]).needs)
    if needs_data:
        check_context(model, "seqlen", config.seqlen)
    if config.eval_data:
        check_context(model, "eval_seqlen", config.eval_seqlen or config.seqlen)
    record: dict[str, Any] = {
        "config": config.to_dict(),
        "source": {"kind": source.kind, "path": source.path},
        "versions": versions(),
    }
    profile, allocation = _plan(model, config, cache_dir)
    if dry_run:
        record["allocation"] = [
            {"name": x.name, "block": x.block, "shape": list(x.shape), "target": allocation[x.name]}
            for x in profile.layers
        ]
        return RunOutput(record, model, tokenizer, None)

    # Calibration data before the dense evaluation: a bad source fails before any long work.
    calib = None
    if needs_data:
        calib = calibration_ids(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed, cache_dir)
    eval_kwargs = dict(seqlen=config.eval_seqlen or config.seqlen, max_tokens=config.max_tokens,
                       device=config.device, cache_dir=cache_dir, progress=progress)
    if config.eval_data:
        record["dense"] = _evaluate_on(model, tokenizer, config, eval_kwargs)
        log.info("dense perplexity %.3f", record["dense"]["ppl"])
    t_prune = time.perf_counter()
    result = prune(model, tokenizer, config, calib=calib, allocation=allocation, progress=progress)
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
    if config.eval_data:
        record["pruned"] = _evaluate_on(model, tokenizer, config, eval_kwargs)
        log.info("pruned perplexity %.3f", record["pruned"]["ppl"])
    record["wall_s"] = time.perf_counter() - t_start
    record["memory"] = peak_memory()
    if out is not None:
        save_run(model, tokenizer, Path(out), record, overwrite)
    return RunOutput(record, model, tokenizer, result)
