"""Pruning over the block loop: every metric, every allocation, every pattern, one block at a time.

The walk itself (capture, one block on the device at a time) is
:class:`prunewise.model.blocks.BlockSource`;
here are the three ways of pruning a block, each a step of that walk:

- ``two-pass`` (the papers' protocol): hooks on every linear layer collect the statistics the
  metric declared while the *dense* block runs on the calibration set; every linear layer is
  pruned at the sparsity its allocation gives it; the *pruned* block then runs on the same inputs
  and its outputs become the next block's inputs (``propagate="dense"`` uses the dense outputs
  instead and saves that second pass);
- ``single-pass``: each block runs once on the whole calibration set as one batch; a pre-hook
  prunes each linear layer from its input just before it runs, so later layers see inputs that
  already went through the pruned layers before them (SparseGPT's "true sequential" order) at
  half the forward cost;
- data-free (metrics that need no statistics, e.g. magnitude): each layer is pruned from its
  weights alone and no calibration data is read.

Statistics are float32 whatever the model dtype.

Deviations from reference: the references run batch 1 and hard-code argument names
(``attention_mask``, ``position_ids``); here batches are ``batch_size`` windows and all arguments
are captured generically. Numbers are the same up to floating-point summation order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import PrunewiseError
from ..model.blocks import BlockSource, Call, Stop, run_block
from ..model.experts import ExpertLinear
from ..model.layers import weight_matrix
from ..model.sources import make_source
from ..registry import METRICS, Entry
from .masks import Pattern, count_true, make_mask, target_count
from .stats import BLOCK, LayerStats, all_finite, make_stats

log = logging.getLogger(__name__)

MODES = ("two-pass", "single-pass")
PROPAGATE = ("pruned", "dense")


@dataclass
class LayerResult:
    name: str
    block: int
    shape: tuple[int, int]
    target: float
    zeros: int

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def achieved(self) -> float:
        return self.zeros / self.numel


@dataclass
class PruneResult:
    layers: list[LayerResult]
    wall_s: float
    calib_tokens: int
    blocks_path: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return sum(r.zeros for r in self.layers) / sum(r.numel for r in self.layers)

    @property
    def allocation(self) -> dict[str, float]:
        return {r.name: r.target for r in self.layers}


@dataclass
class PruneOptions:
    """How to prune: the metric (bound hyper-parameters), the per-layer targets, the pattern and
    the pass. ``provided`` holds, for each statistic the metric needs that is not collected by
    hooks in the block loop (GBLM's ``grad``), its value for every layer: ``{need: {name: tensor}}``."""

    metric: Entry
    params: dict[str, Any]
    allocation: dict[str, float]
    pattern: Pattern
    mode: str = "two-pass"
    propagate: str = "pruned"
    batch_size: int = 1
    provided: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def make(
        cls,
        metric: str,
        *,
        allocation: dict[str, float],
        pattern: Pattern,
        metric_params: dict[str, Any] | None = None,
        mode: str = "two-pass",
        propagate: str = "pruned",
        batch_size: int = 1,
        grads: Mapping[str, torch.Tensor] | None = None,
    ) -> PruneOptions:
        """Options from a metric's name and its hyper-parameters (checked and completed)."""
        entry = METRICS.get(metric)
        return cls(
            entry,
            entry.bind(metric_params or {}),
            allocation,
            pattern,
            mode,
            propagate,
            batch_size,
            {} if grads is None else {"grad": grads},
        )

    @property
    def needs_data(self) -> bool:
        return any(n in BLOCK for n in self.metric.needs)

    def check(self, calib: torch.Tensor | None) -> None:
        name = self.metric.name
        if self.needs_data and calib is None:
            raise ValueError(f"metric '{name}' needs calibration data")
        missing = [n for n in self.metric.needs if n not in BLOCK and n not in self.provided]
        if missing:
            raise ValueError(f"metric '{name}' needs the statistic(s) {', '.join(missing)} computed beforehand")
        if self.mode not in MODES or self.propagate not in PROPAGATE:
            raise ValueError(f"unknown mode/propagate '{self.mode}'/'{self.propagate}'")

    def stats_for(self, linears: list[tuple[str, nn.Module]]) -> dict[str, LayerStats]:
        stats = {name: make_stats(self.metric.needs, weight_matrix(m).shape[1]) for name, m in linears}
        for need, values in self.provided.items():
            for name, st in stats.items():
                setattr(st, need, values[name])
        return stats

    def prune_layer(self, name: str, module: nn.Module, stats: LayerStats | None) -> int:
        metric, params = self.metric, self.params
        if self.needs_data and (stats is None or stats.ntokens == 0):
            if not isinstance(module, ExpertLinear):
                raise _no_input(name, metric.name)
            metric, params, stats = METRICS.first(lambda e: not e.needs), {}, None  # the first data-free one
            log.warning("%s: no calibration token was routed to this expert; pruned by %s", name, metric.name)
        zeros = prune_linear(module, metric, params, stats, self.allocation[name], self.pattern)
        if stats is not None:
            stats.release()
        return zeros


def prune_linear(
    module: nn.Module,
    metric: Entry,
    params: dict[str, Any],
    stats: LayerStats | None,
    sparsity: float,
    pattern: Pattern,
) -> int:
    """Prune one linear layer in place; return its number of zero weights.

    With an N:M pattern the layer's own N is ``sparsity * M`` (mixed N:M allocations give blocks
    different N); it must be a whole number.

    The weight is written in place. Where the checkpoint is memory-mapped (a safetensors model
    loaded in memory) that costs a copy-on-write fault per page: a ``masked_fill_`` of a 8,960 x
    1,536 fp32 weight takes 95-106 ms against 34-38 ms into fresh memory. Binding the parameter to
    a fresh tensor instead was tried and undone: the mapped pages, read by the first pass, stayed
    resident beside the new ones (Qwen2.5-Coder 1.5B, Wanda: peak RSS 13.4 GB against 8.8).
    """
    w = weight_matrix(module)
    if pattern.is_nm:
        n = round(sparsity * pattern.m)
        if abs(n - sparsity * pattern.m) > 1e-6:
            raise ValueError(f"sparsity {sparsity} is not a whole number of zeros per group of {pattern.m}")
        if n == 0:
            return count_true(w == 0)
        pattern = Pattern(n=n, m=pattern.m)
    if metric.solver:
        w.copy_(metric.fn(w, stats, sparsity, pattern, **params))
    else:
        scores = metric.fn(w, stats, **params)
        mask = make_mask(scores, sparsity, pattern, metric.group)
        w.masked_fill_(mask.to(w.device), 0)
    return count_true(w == 0)


def _no_input(name: str, metric: str) -> RuntimeError:
    return RuntimeError(f"{name} received no calibration input; cannot compute '{metric}' statistics")


class _Pruner:
    """The prune steps of the block loop; ``zeros`` collects every layer's count of zeros."""

    def __init__(self, opts: PruneOptions):
        self.opts = opts
        self.zeros: dict[str, int] = {}
        # per block layout (its layers' names within the block): position of the last linear layer
        # to run in one forward, or None when that is not fixed (experts run as tokens are routed)
        self.last: dict[tuple[str, ...], int | None] = {}
        self.nonfinite: dict[str, list[str]] = {"weights": [], "input statistics": []}

    def prune(self, name: str, module: nn.Module, stats: LayerStats | None) -> int:
        """Prune one layer, noting non-finite weights or statistics (their NaN scores go first)."""
        if not all_finite(weight_matrix(module)):
            self.nonfinite["weights"].append(name)
        elif stats is not None and not stats.finite():
            self.nonfinite["input statistics"].append(name)
        return self.opts.prune_layer(name, module, stats)

    def warn_nonfinite(self, total: int) -> None:
        for what, names in self.nonfinite.items():
            if names:
                log.warning(
                    "%d of %d layers have non-finite %s (NaN or Inf), first %s: NaN weights in the checkpoint, or "
                    "activations that overflowed (fp16) or met them upstream. Their NaN scores were pruned first, "
                    "so the counts are exact, but the pruned model's outputs are likely NaN too",
                    len(names),
                    total,
                    what,
                    ", ".join(names[:3]),
                )

    def data_free(self, i, block, linears, hidden, calls):
        stats = self.opts.stats_for(linears)
        for name, module in linears:
            self.zeros[name] = self.prune(name, module, stats[name])
        return hidden

    def single_pass(self, i, block, linears, hidden, calls):
        stats = self.opts.stats_for(linears)

        def pre_hook(name: str):
            def hook(module, args):
                if name not in self.zeros:
                    stats[name].add(args[0])
                    self.zeros[name] = self.prune(name, module, stats[name])

            return hook

        handles = [m.register_forward_pre_hook(pre_hook(name)) for name, m in linears]
        try:
            hidden = run_block(block, hidden, calls)
        finally:
            for h in handles:
                h.remove()
        for name, module in linears:  # layers that saw no input: an expert no token was routed to
            if name not in self.zeros:
                self.zeros[name] = self.prune(name, module, stats[name])
        return hidden

    def two_pass(self, i, block, linears, hidden, calls):
        stats = self.opts.stats_for(linears)
        # The dense block's outputs are needed only for dense propagation; otherwise each forward
        # stops right after the last linear layer has seen its input (once a block of this layout
        # has shown which one that is).
        within = {id(m): n for n, m in block.named_modules()}
        layout = tuple(within[id(m)] for _, m in linears)
        last = self.last.get(layout)
        collector = StatsCollector(stats, None if self.opts.propagate == "dense" or last is None else linears[last][0])
        outs = collector.run(block, linears, hidden, calls)
        if layout not in self.last:
            experts = any(isinstance(m, ExpertLinear) for _, m in linears)
            self.last[layout] = None if experts else collector.last_layer([name for name, _ in linears])
        for name, module in linears:
            self.zeros[name] = self.prune(name, module, stats[name])
        return run_block(block, hidden, calls) if self.opts.propagate == "pruned" else outs


@torch.no_grad()
def prune_blocks(
    source: BlockSource, calib: torch.Tensor | None, opts: PruneOptions, progress: bool = True
) -> PruneResult:
    """Prune every block of ``source`` in place, walking it once with the step of ``opts.mode``."""
    start = time.perf_counter()
    opts.check(calib)
    timings: dict[str, float] = {}
    pruner = _Pruner(opts)
    inputs = None
    step = pruner.data_free
    if opts.needs_data:
        t0 = time.perf_counter()
        single = opts.mode == "single-pass"
        inputs = source.capture(calib, calib.shape[0] if single else opts.batch_size)
        timings["capture_s"] = time.perf_counter() - t0
        step = pruner.single_pass if single else pruner.two_pass
    with source.rewriting():  # a model streamed from disk gets its pruned blocks written as they finish
        source.walk(step, inputs, desc=f"{opts.metric.name} {opts.mode}", progress=progress)
    results = [
        LayerResult(name, i, tuple(weight_matrix(m).shape), opts.allocation[name], pruner.zeros[name])
        for i, name, m in source.all_linears()
    ]
    pruner.warn_nonfinite(len(results))
    short = [r for r in results if r.zeros < target_count(r.target, r.numel)]
    if short:
        r = short[0]
        raise PrunewiseError(
            f"{len(short)} layers were pruned below their target, first {r.name}: {r.zeros} zeros of {r.numel}, "
            f"target {r.target:g} ({target_count(r.target, r.numel)} zeros); the masks are not what was asked for"
        )
    timings["total_s"] = time.perf_counter() - start
    ntok = int(calib.numel()) if calib is not None and opts.needs_data else 0
    return PruneResult(results, timings["total_s"], ntok, source.path, timings)


def prune_model(
    model: nn.Module,
    calib: torch.Tensor | None,
    options: PruneOptions | None = None,
    *,
    device: str = "cpu",
    blocks_path: str | None = None,
    progress: bool = True,
    **spec: Any,
) -> PruneResult:
    """Prune ``model`` in place with ``options``, or with the options :meth:`PruneOptions.make`
    builds from ``spec`` (``metric``, ``allocation`` mapping every linear layer's full name to its
    sparsity, ``pattern``, ``metric_params``, ``mode``, ``propagate``, ``batch_size``, and ``grads``
    for metrics that need ``grad``, GBLM)."""
    opts = options if options is not None else PruneOptions.make(**spec)
    return prune_blocks(make_source(model, blocks_path, device), calib, opts, progress)


class StatsCollector:
    """Forward pre-hooks that feed each linear layer's :class:`LayerStats`.

    Layers that receive the same input tensor (q/k/v, gate/up) share one increment. A layer may
    hold several :class:`LayerStats` (a Gram matrix and the plain squared sums, as two separate
    passes would collect them), each fed the same inputs. With
    ``stop_after`` set, every forward stops as soon as that layer has recorded its input: the
    block's remaining work (its largest matmul among it) is skipped when its outputs are unused.
    """

    def __init__(self, stats: dict[str, LayerStats | tuple[LayerStats, ...]], stop_after: str | None):
        self.stats = stats
        self.stop_after = stop_after
        self.order: list[str] = []
        self._x: torch.Tensor | None = None
        self._increments: dict[str, torch.Tensor] = {}

    def hook(self, name: str):
        def pre_hook(module, args):
            x = args[0]
            if self._x is not x:  # a new input tensor: drop the increments of the previous one
                self._x, self._increments = x, {}
            held = self.stats[name]
            for st in held if isinstance(held, tuple) else (held,):  # several: collected apart, one input
                key = "gram" if st.want_gram else "sq"
                if key not in self._increments:
                    self._increments[key] = st.increment(x)
                st.add_increment(x, self._increments[key])
            self.order.append(name)
            if name == self.stop_after:
                raise Stop

        return pre_hook

    def run(
        self, block: nn.Module, linears: list[tuple[str, nn.Module]], hidden: list[torch.Tensor], calls: list[Call]
    ) -> list[torch.Tensor] | None:
        """Run ``block`` on every batch with the hooks on ``linears``; its outputs unless stopped early."""
        handles = [m.register_forward_pre_hook(self.hook(name)) for name, m in linears]
        try:
            if self.stop_after is None:
                return run_block(block, hidden, calls)
            for h, c in zip(hidden, calls):
                try:
                    block(h, *c.args, **c.kwargs)
                except Stop:
                    pass
            return None
        finally:
            for hd in handles:
                hd.remove()
            self._x, self._increments = None, {}

    def last_layer(self, names: list[str]) -> int | None:
        """Position in ``names`` of the last linear layer to run in one forward, if every layer ran
        exactly once per forward."""
        n = len(names)
        first = self.order[:n]
        if len(first) < n or len(set(first)) != n or len(self.order) % n:
            return None
        return names.index(first[-1])
