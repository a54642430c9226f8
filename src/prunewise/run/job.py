"""The set-up every job shares, in one place: load the model where it fits (streamed or whole),
fingerprint it, check it against what it must be, check the inputs, read the calibration windows,
keep a copy of the dense prunable weights. ``prunewise prune`` (:func:`prunewise.run.pipeline.run`),
the sweep worker and the Ray workers all start with :meth:`Job.load`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..allocation import planner
from ..allocation.planner import build_profile
from ..allocation.profile import Profile
from ..allocation.statistics import STATISTICS, StatContext, provide, reads_calibration
from ..config import PruneConfig
from ..data import calibration_ids as _calibration_ids
from ..data import check_source, load_text, tokenize
from ..data import heldout_ids as _heldout_ids
from ..errors import ConfigError, PrunewiseError
from ..evaluation.zeroshot import check_tasks
from ..model.layers import max_context, weight_matrix
from ..model.loading import load_model, model_folder
from ..model.malloc import release_free_heap, returning_freed_memory
from ..model.memory import Estimate, Workload, estimate
from ..model.sources import make_source
from ..model.streaming import stream_of
from ..prune.engine import PruneOptions, PruneResult, prune_blocks
from ..prune.stats import wants_gram
from ..registry import METRICS
from .saving import check_same_model, source_info

log = logging.getLogger(__name__)


def allocator_needs(config: PruneConfig) -> tuple[str, ...]:
    """The statistics the configured allocator needs (some depend on its parameters and the metric)."""
    name, params = config.allocator_spec
    return planner.allocator_needs(name, params, config.metric_spec[0])


def needs_calibration(config: PruneConfig) -> bool:
    """Whether the run reads calibration data (for its metric, its allocator's statistics or its driver)."""
    name, params = config.allocator_spec
    return (
        bool(METRICS.get(config.metric_spec[0]).needs)
        or reads_calibration(allocator_needs(config))
        or planner.driver_of(name, params) is not None
    )


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


def _model_gb(model: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9


def text_tokens(tokenizer, source: str, role: str, cache_dir: Path) -> torch.Tensor:
    """The token ids of ``source``'s text for ``role`` (cached). A fast tokenizer holds about 600
    bytes per token for a moment (0.6 GB for the wiki pool's 0.96M tokens), which a kept heap would
    keep resident for the whole run: it runs with freed memory given back, then the free heap is
    released, so that only the ids stay."""
    with returning_freed_memory():
        ids = tokenize(tokenizer, load_text(source, role).text, cache_dir)
    release_free_heap()
    return ids


def eval_tokens(tokenizer, config: PruneConfig, cache_dir: Path) -> int:
    """Tokens the run's perplexity evaluation reads (0 without ``eval_data``)."""
    if not config.eval_data:
        return 0
    n = text_tokens(tokenizer, config.eval_data, "evaluation", cache_dir).numel()
    return min(n, config.max_tokens) if config.max_tokens else n


def placement_of(model: nn.Module, tokenizer, config: PruneConfig, cache_dir: Path, stream: str) -> Estimate:
    """The run's estimated peak memory over ``model`` and the mode ``stream`` resolves to. Its texts
    are tokenized here (then read from the cache): :func:`load_placed` calls it while only a
    streamed skeleton is loaded where it can, so the tokenizer's moment of memory does not add
    to the weights'."""
    if needs_calibration(config) and config.calib != "c4":  # c4 is sampled per document
        text_tokens(tokenizer, config.calib, "calibration", cache_dir)
    eval_seqlen = config.eval_seqlen or config.seqlen
    metric, params = config.metric_spec
    needs = METRICS.get(metric).needs
    work = Workload(
        windows=config.nsamples if needs_calibration(config) else 0,
        seqlen=config.seqlen,
        batch_size=config.batch_size,
        hessians=wants_gram(needs) or "reconstruction_error" in allocator_needs(config),
        eval_windows=eval_tokens(tokenizer, config, cache_dir) // eval_seqlen,
        eval_seqlen=eval_seqlen,
        gradients=("blocks" if params.get("checkpointing") else "whole") if "grad" in needs else None,
    )
    return estimate(model, work, device=config.device, blocks_path=config.blocks_path, stream=stream)


def load_placed(
    config: PruneConfig, cache_dir: Path, trust_remote_code: bool = False, scratch: Path | None = None
) -> tuple[nn.Module, Any, Any, Estimate]:
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
            model, tok, source = load_model(
                config.model,
                config.dtype,
                cache_dir,
                stream=True,
                trust_remote_code=trust_remote_code,
                blocks_path=config.blocks_path,
                scratch_root=scratch,
            )
        except PrunewiseError as exc:
            if config.stream == "on":
                raise
            why, model = str(exc), None
        placement = None if model is None else placement_of(model, tok, config, cache_dir, config.stream)
        if placement is not None and placement.mode == "stream":
            log.info(
                "streaming %s: estimated peak %.2f GB on the host (%.2f GB loaded whole)",
                config.model,
                placement.host_stream / 1e9,
                placement.host_memory / 1e9,
            )
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
            "`prunewise eval --tasks ...` on a machine that holds it"
        )
    if needs_calibration(config):
        check_context(model, "seqlen", config.seqlen)
    if config.eval_data:
        check_context(model, "eval_seqlen", config.eval_seqlen or config.seqlen)
    if config.tasks:
        check_tasks(config.tasks, config.include_path)


def check_texts(calibration: PruneConfig | None, runs: list[PruneConfig]) -> None:
    """The calibration text (of ``calibration``, when its runs read one) and every run's evaluation
    text can be read: checked before the model is loaded, so a bad path fails in seconds."""
    if calibration is not None:
        check_source(calibration.calib)
    for source in dict.fromkeys(r.eval_data for r in runs if r.eval_data):
        check_source(source)


def calibration_ids(tokenizer, config: PruneConfig, cache_dir: Path) -> torch.Tensor:
    """The run's calibration windows ``[nsamples, seqlen]`` (source, count, length and seed from ``config``)."""
    return _calibration_ids(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed, cache_dir)


def heldout_ids(tokenizer, config: PruneConfig, count: int, cache_dir: Path) -> torch.Tensor:
    """``count`` windows of the run's calibration text that its calibration windows do not touch."""
    return _heldout_ids(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed, count, cache_dir)


@dataclass
class Job:
    """A model loaded for one or more runs of ``config``'s model: the model (streamed or whole, as
    :func:`load_placed` decides) and tokenizer, where it came from with its fingerprint
    (``identity``), the memory ``placement``, the calibration windows (when a run reads them) and a
    copy of the dense prunable weights (``dense_weights``, when asked for: runs restore from it)."""

    config: PruneConfig
    model: nn.Module
    tokenizer: Any
    identity: dict[str, str]
    placement: Estimate
    calib: torch.Tensor | None
    dense_weights: dict[str, torch.Tensor] | None
    cache_dir: Path

    @classmethod
    def load(
        cls,
        config: PruneConfig,
        cache_dir: Path,
        *,
        runs: list[PruneConfig] | None = None,
        trust_remote_code: bool = False,
        scratch: Path | None = None,
        expect: dict[str, Any] | None = None,
        expected_by: str = "the record",
        backup: bool = False,
    ) -> Job:
        """Load ``config.model`` and prepare it for ``runs`` (default: ``config`` alone): ``expect``
        (a record's ``source`` section) refuses other weights, every run's inputs are checked, the
        calibration windows read when any run needs them; ``backup`` keeps the dense weights."""
        runs = runs or [config]
        check_texts(config if any(needs_calibration(r) for r in runs) else None, runs)  # before minutes of loading
        model, tokenizer, source, placement = load_placed(config, cache_dir, trust_remote_code, scratch)
        identity = source_info(model, source)
        check_same_model(expect, identity, expected_by)
        for run in runs:
            check_inputs(model, run)
        # Calibration data before anything long: a bad source fails first.
        calib = calibration_ids(tokenizer, config, cache_dir) if any(needs_calibration(r) for r in runs) else None
        dense = backup_weights(model, build_profile(make_source(model, config.blocks_path))) if backup else None
        return cls(config, model, tokenizer, identity, placement, calib, dense, cache_dir)

    @property
    def fingerprint(self) -> str:
        return self.identity["fingerprint"]


def stat_context(
    model: nn.Module,
    config: PruneConfig,
    cache_dir: Path,
    calib: torch.Tensor | None,
    progress: bool,
    profile: Profile | None = None,
    model_key: str | None = None,
) -> StatContext:
    """What statistic providers read for this run (the model as a block source, calibration ids, cache)."""
    source = make_source(model, config.blocks_path, config.device)
    metric, params = config.metric_spec
    if profile is None:
        profile = build_profile(source)
        profile.metric = metric
        profile.pattern = config.pattern_obj
    return StatContext(
        source, profile, cache_dir, calib, config.batch_size, METRICS.get(metric), params, progress, model_key
    )


def prune_allocated(
    model: nn.Module,
    config: PruneConfig,
    allocation: dict[str, float],
    calib: torch.Tensor | None,
    cache_dir: Path,
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` in place with ``config``'s metric, pattern and pass at the per-layer targets
    ``allocation``; statistics the metric needs that the block loop does not collect (GBLM's
    gradients) come from their providers first (cached by content)."""
    metric, params = config.metric_spec
    entry = METRICS.get(metric)
    precomputed = tuple(n for n in entry.needs if n in STATISTICS)
    t0 = time.perf_counter()
    provided = provide(precomputed, stat_context(model, config, cache_dir, calib, progress)) if precomputed else {}
    provide_s = time.perf_counter() - t0
    opts = PruneOptions(
        entry, params, allocation, config.pattern_obj, config.mode, config.propagate, config.batch_size, provided
    )
    result = prune_blocks(make_source(model, config.blocks_path, config.device), calib, opts, progress)
    if precomputed:
        result.timings["gradients_s"] = provide_s
    return result
