"""Statistic providers: how each statistic an allocator (or a metric) declares in ``needs`` is computed.

A provider is registered by need name in :data:`STATISTICS` and is
``provide(ctx: StatContext) -> {linear name: value}``. Expensive ones are cached on disk by content
(:mod:`prunewise.storage.cache`), never by a path:

- ``eigenvalues``: ascending eigenvalues of ``W^T W`` per matrix (float64 Gram, `eigvalsh`; AlphaPruning),
  cached under ``spectra/<sha256 of the weight>``;
- ``weights``: the model's own weight tensors ``[C_out, C_in]`` (read only; OWL, MRP), not cached;
- ``dense_input_norm``: Wanda's ``a_j`` per layer from a *dense* pass, dense propagation (OWL, MRP),
  cached under ``dense_input_norm/<sha256 of all parameters, calibration ids, blocks path>``;
- ``grad``: GBLM's accumulated gradient norm per weight, with the metric's options, cached under
  ``gradients/<sha256 ...>`` (see :mod:`prunewise.prune.gradients`);
- ``reconstruction_error``: LSA's greedy reconstruction error per layer from a *dense* pass (the
  input Gram matrix ``H`` of each layer, one block at a time, never kept), at the allocator's
  ``resp`` and ``block``, cached under ``reconstruction_error/<sha256 of the dense key, resp, block>``.

A new statistic is one function here (``calibration=True`` when it reads calibration data;
``cost=fn(ctx, rates) -> Work | None``, what a dry run announces before computing it, see
:mod:`prunewise.allocation.cost`); allocators and metrics name it in ``needs``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import PrunewiseError
from ..model.blocks import BlockSource
from ..model.experts import ExpertLinear
from ..model.layers import weight_matrix
from ..model.streaming import model_fingerprint
from ..prune.engine import StatsCollector
from ..prune.gradients import gradient_key, layer_gradients
from ..prune.stats import make_stats
from ..registry import Entry, Registry
from ..storage.cache import cached, entry, fingerprint
from .cost import Rates, Work, calibration_pass
from .esd import eigenvalues as _eigenvalues
from .lsa import greedy_error
from .profile import Profile

STATISTICS = Registry("statistic")
log = logging.getLogger(__name__)


@dataclass
class StatContext:
    """What a provider may read: the model (as a block source), the layers, the calibration ids and
    the run's settings."""

    source: BlockSource
    profile: Profile
    cache_dir: Path
    calib: torch.Tensor | None = None
    batch_size: int = 1
    metric: Entry | None = None
    metric_params: dict[str, Any] | None = None
    progress: bool = True
    model_key: str | None = None  # the model's fingerprint, when the caller already has it for these weights
    allocator_params: dict[str, Any] | None = None  # the bound hyper-parameters of the allocator being planned

    def fingerprint(self) -> str:
        """:func:`~prunewise.model.streaming.model_fingerprint` of the model, computed once per context
        (a context lives while the weights do not change: planning, or one re-measurement)."""
        if self.model_key is None:
            self.model_key = model_fingerprint(self.model)
        return self.model_key

    @property
    def model(self) -> nn.Module:
        return self.source.model

    def need_calib(self, need: str) -> torch.Tensor:
        if self.calib is None:
            raise ValueError(f"statistic '{need}' needs calibration data (pass a tokenizer or calib)")
        return self.calib


def reads_calibration(needs: tuple[str, ...]) -> bool:
    """Whether any of these statistics is computed from calibration data (``calibration=True`` in the registry)."""
    return any(n in STATISTICS and STATISTICS.get(n).calibration for n in needs)


def provide(needs: tuple[str, ...], ctx: StatContext) -> dict[str, Any]:
    """``{need: {linear name: value}}`` for every need, each from its registered provider (those
    of one dense calibration pass from a single pass, :func:`shared_dense_pass`)."""
    for need in needs:
        if need not in STATISTICS:
            raise PrunewiseError(
                f"'{need}' is not a statistic prunewise can compute (known: {', '.join(STATISTICS.names())})"
            )
    _share_dense_pass(needs, ctx)
    return {need: STATISTICS.get(need).fn(ctx) for need in needs}


class Weights(Mapping):
    """``{linear name: weight [C_out, C_in]}`` of a block source, each read when asked for: the
    model's own tensor in memory, read from the checkpoint when streamed (one at a time)."""

    def __init__(self, source: BlockSource, names: list[str]):
        self.source, self.names = source, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.source.weight(name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _spectra_cost(ctx: StatContext, rates: Rates) -> Work:
    todo = []
    for x in ctx.profile.layers:
        if not entry(ctx.cache_dir, "spectra", fingerprint(ctx.source.weight(x.name))).is_file():
            todo.append(x.shape)
    flops = sum(s[0] * s[1] * min(s) for s in todo)
    return Work(
        f"eigenvalues of {len(ctx.profile.layers)} weight matrices (float64 eigvalsh, {len(todo)} not cached)",
        flops * rates.spectrum_flop_s if todo else None,
    )


@STATISTICS.register(
    "eigenvalues",
    summary="ascending eigenvalues of W^T W per matrix (float64 eigvalsh of the Gram), cached by weight",
    cost=_spectra_cost,
)
def eigenvalues(ctx: StatContext) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for layer in tqdm(ctx.profile.layers, desc="spectra", unit="matrix", disable=not ctx.progress):
        w = ctx.source.weight(layer.name)
        out[layer.name] = cached(ctx.cache_dir, "spectra", fingerprint(w), lambda w=w: _eigenvalues(w))
    return out


@STATISTICS.register("weights", summary="the model's own weight matrices (read only; read when used if streamed)")
def weights(ctx: StatContext) -> Weights:
    return Weights(ctx.source, [x.name for x in ctx.profile.layers])


def _dense_key(ctx: StatContext, need: str = "dense_input_norm", extra: str = "") -> str:
    return fingerprint(ctx.need_calib(need), extra=f"{ctx.fingerprint()}:{ctx.source.path}{extra}")


def _dense_cost(ctx: StatContext, rates: Rates) -> Work:
    what = "dense calibration pass (input norms)"
    if entry(ctx.cache_dir, "dense_input_norm", _dense_key(ctx)).is_file():
        return Work(what, None)
    return calibration_pass(ctx, rates, what)


def _error_options(ctx: StatContext) -> tuple[float, int, str]:
    params = ctx.allocator_params or {}
    resp, block = float(params.get("resp", 0.5)), int(params.get("block", 128))
    return resp, block, _dense_key(ctx, "reconstruction_error", f":resp={resp!r}:block={block}")


def _error_cost(ctx: StatContext, rates: Rates) -> Work:
    resp, block, key = _error_options(ctx)
    what = f"dense calibration pass with input Gram matrices, greedy errors at {resp:g} in {block}-column slices"
    if entry(ctx.cache_dir, "reconstruction_error", key).is_file():
        return Work(what, None)
    return calibration_pass(ctx, rates, what, factor=2.0)


@STATISTICS.register(
    "dense_input_norm",
    summary="Wanda's a_j per layer from a dense calibration pass, cached by content",
    calibration=True,
    cost=_dense_cost,
)
def dense_norms(ctx: StatContext) -> dict[str, torch.Tensor]:
    return cached(
        ctx.cache_dir,
        "dense_input_norm",
        _dense_key(ctx),
        lambda: dense_input_norms(ctx.source, ctx.calib, batch_size=ctx.batch_size, progress=ctx.progress),
    )


def _grad_cost(ctx: StatContext, rates: Rates) -> Work:
    options = ctx.metric.grad_options(ctx.metric_params)
    what = "gradient pass (forward and backward)"
    key = gradient_key(ctx.fingerprint(), ctx.need_calib("grad"), ctx.source.path, options["norm"], options["scale"])
    if entry(ctx.cache_dir, "gradients", key).is_file():
        return Work(what, None)
    return calibration_pass(ctx, rates, what, factor=3.0)


@STATISTICS.register(
    "grad",
    summary="GBLM's accumulated per-sample gradient norm per weight, cached by content",
    calibration=True,
    cost=_grad_cost,
)
def grad(ctx: StatContext) -> dict[str, torch.Tensor]:
    options = ctx.metric.grad_options(ctx.metric_params)
    return layer_gradients(
        ctx.model,
        ctx.need_calib("grad"),
        model_key=ctx.fingerprint(),
        device=str(ctx.source.device),
        blocks_path=ctx.source.path,
        cache_dir=ctx.cache_dir,
        progress=ctx.progress,
        **options,
    )


@STATISTICS.register(
    "reconstruction_error",
    summary="LSA's greedy reconstruction error per layer from a dense pass (input Gram matrices), cached by content",
    calibration=True,
    cost=_error_cost,
)
def reconstruction_errors(ctx: StatContext) -> dict[str, float]:
    collect, key, reduce = _dense_parts(ctx)["reconstruction_error"]

    def compute() -> dict[str, torch.Tensor]:
        return dense_pass(
            ctx.source,
            ctx.calib,
            (collect,),
            reduce,
            batch_size=ctx.batch_size,
            progress=ctx.progress,
            desc="dense statistics (reconstruction errors)",
        )

    return {k: float(v) for k, v in cached(ctx.cache_dir, "reconstruction_error", key, compute).items()}


def _norm(name: str, module: nn.Module, st) -> torch.Tensor:
    if st.ntokens == 0:
        log.warning(
            "%s: no calibration token was routed to this expert; its input norms are taken as ones (magnitude scores)",
            name,
        )
        return torch.ones(st.in_features)
    return st.input_norm().cpu()


def _error(resp: float, block: int):
    def error(name: str, module: nn.Module, st) -> torch.Tensor:
        value = greedy_error(weight_matrix(module), st.hessian(), resp, block) if st.ntokens else 0.0
        return torch.tensor(value, dtype=torch.float64)

    return error


DENSE_PASS = ("dense_input_norm", "reconstruction_error")  # the statistics of _dense_parts


def _dense_parts(ctx: StatContext) -> dict[str, tuple[tuple[str, ...], str, Any]]:
    """The statistics a dense calibration pass gives: per need, what its layers collect, its cache
    key, and the reduction of one layer's collected statistics to the value cached."""
    resp, block, key = _error_options(ctx)
    return {
        "dense_input_norm": (("input_norm",), _dense_key(ctx), _norm),
        "reconstruction_error": (("hessian",), key, _error(resp, block)),
    }


def shared_dense_pass(needs: tuple[str, ...], ctx: StatContext) -> list[str]:
    """The needs among ``needs`` that come from a dense calibration pass and are not cached yet,
    when there are two or more of them (one pass then computes them all); else ``[]``."""
    return list(_uncached_parts(needs, ctx))


def _uncached_parts(needs: tuple[str, ...], ctx: StatContext) -> dict[str, tuple[tuple[str, ...], str, Any]]:
    wanted = [n for n in needs if n in DENSE_PASS]
    if len(wanted) < 2 or ctx.calib is None:
        return {}
    parts = _dense_parts(ctx)
    missing = {n: parts[n] for n in wanted if not entry(ctx.cache_dir, n, parts[n][1]).is_file()}
    return missing if len(missing) >= 2 else {}


def _share_dense_pass(needs: tuple[str, ...], ctx: StatContext) -> None:
    """Compute and cache in one dense pass the statistics :func:`shared_dense_pass` names (each
    collected apart, so its values are bit for bit those of its own pass); their providers then
    read them from the cache."""
    parts = _uncached_parts(needs, ctx)
    if not parts:
        return
    values = dense_pass(
        ctx.source,
        ctx.calib,
        tuple(collect for collect, _, _ in parts.values()),
        lambda name, module, *sts: [reduce(name, module, st) for (_, _, reduce), st in zip(parts.values(), sts)],
        batch_size=ctx.batch_size,
        progress=ctx.progress,
        desc=f"dense statistics ({', '.join(parts)})",
    )
    for i, (need, (_, key, _)) in enumerate(parts.items()):
        cached(ctx.cache_dir, need, key, lambda i=i: {name: v[i] for name, v in values.items()})


@torch.no_grad()
def dense_pass(
    source: BlockSource,
    calib: torch.Tensor,
    collect: tuple[tuple[str, ...], ...],
    reduce,
    *,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "dense statistics",
) -> dict[str, Any]:
    """One calibration pass through the *dense* model, propagated densely (no pruning): for every
    linear layer one :class:`~prunewise.prune.stats.LayerStats` per tuple of ``collect`` (each as
    its own pass would collect it), reduced when its block has run by
    ``reduce(name, module, *stats) -> value`` and released (``{linear name: value}``).
    A linear layer outside an expert that receives no input is an error."""
    out: dict[str, Any] = {}

    def step(i, block, linears, hidden, calls):
        stats = {name: tuple(make_stats(c, weight_matrix(m).shape[1]) for c in collect) for name, m in linears}
        hidden = StatsCollector(stats, None).run(block, linears, hidden, calls)
        for name, module in linears:
            sts = stats[name]
            if sts[0].ntokens == 0 and not isinstance(module, ExpertLinear):
                raise RuntimeError(f"{name} received no calibration input")
            out[name] = reduce(name, module, *sts)
            for st in sts:
                st.release()
        return hidden

    source.walk(step, source.capture(calib, batch_size), desc=desc, progress=progress)
    return out


def dense_input_norms(
    source: BlockSource, calib: torch.Tensor, *, batch_size: int = 1, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Wanda's ``a_j`` of every linear layer of the *dense* model, propagated densely: one
    calibration pass and no pruning (``{linear name: float32 [C_in]}``)."""
    return dense_pass(source, calib, (("input_norm",),), _norm, batch_size=batch_size, progress=progress)
