"""The sequential pruning engine: one block at a time, every metric, every allocator, every pattern.

1. **Capture.** The decoder blocks are temporarily replaced by recorders and the calibration
   set is run through the model's base (no ``lm_head``). Each recorder stores the positional and
   keyword arguments its block receives (attention masks, position embeddings, ...) by a forward
   pre-hook with kwargs, never by argument names, so per-block arguments (sliding-window masks)
   and new transformers releases need no code here. The first recorder also stores the hidden
   states: the inputs of block 0.
2. **Per block** (``mode="two-pass"``, the papers' protocol): hooks on every linear layer collect
   the statistics the metric declared while the *dense* block runs on the calibration set; every
   linear layer is pruned at the sparsity its allocator gave it; the *pruned* block then runs on
   the same inputs and its outputs become the next block's inputs (``propagate="dense"`` uses the
   dense outputs instead and saves that second pass).
   ``mode="single-pass"`` runs each block once on the whole calibration set as one batch; a
   pre-hook prunes each linear layer from its input just before it runs, so later layers see
   inputs that already went through the pruned layers before them (SparseGPT's "true
   sequential" order) at half the forward cost.
3. Statistics are float32 whatever the model dtype; one block at a time is moved to ``device``.

Deviations from reference: the references run batch 1 and hard-code argument names
(``attention_mask``, ``position_ids``); here batches are ``batch_size`` windows and all arguments
are captured generically. Numbers are the same up to floating-point summation order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import LayerInfo, Profile, check_allocation
from .masks import Pattern, make_mask
from .models import block_linears, find_blocks, weight_matrix
from .registry import ALLOCATORS, METRICS, Entry
from .stats import BLOCK, LayerStats, make_stats

log = logging.getLogger(__name__)


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


class _Stop(Exception):
    pass


@dataclass
class _Call:
    args: tuple
    kwargs: dict[str, Any]


def _split_hidden(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple, dict[str, Any]]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a decoder block to ``device``."""
    inside = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is not None and t.device != device:
                    t.data = t.data.to(device)


@torch.no_grad()
def capture(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, batch_size: int, device: torch.device):
    """Return ``(hidden per batch, calls[block][batch])``: block-0 inputs and every block's other arguments."""
    batches = list(ids.split(batch_size))
    hidden: list[torch.Tensor] = []
    calls: list[list[_Call]] = [[] for _ in blocks]
    base = _base_model(model)

    # Pass 1: the inputs of block 0, stopping before it runs.
    def grab_first(module, args, kwargs):
        h, rest, kw = _split_hidden(args, kwargs)
        hidden.append(h.detach())
        calls[0].append(_Call(rest, kw))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(grab_first, with_kwargs=True)
    try:
        for batch in batches:
            _forward_until_stop(base, batch, device)
    finally:
        handle.remove()
    if len(blocks) == 1:
        return hidden, calls

    as_tuple = _output_is_tuple(base, blocks[0], ids[:1, :2], device)

    # Pass 2: every other block's arguments, with the blocks replaced by identity recorders.
    class Recorder(nn.Module):
        def __init__(self, inner: nn.Module, index: int):
            super().__init__()
            self.inner = inner
            self.index = index

        def __getattr__(self, name: str):  # attention_type, layer_idx, ... read by the model loop
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self._modules["inner"], name)

        def forward(self, *args, **kwargs):
            h, rest, kw = _split_hidden(args, kwargs)
            if self.index > 0:  # block 0's arguments were recorded in pass 1
                calls[self.index].append(_Call(rest, kw))
            return (h,) if as_tuple else h

    originals = list(blocks)
    for i in range(len(blocks)):
        blocks[i] = Recorder(originals[i], i)
    try:
        for batch in batches:
            base(input_ids=batch.to(device), use_cache=False)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return hidden, calls


def _capture_on(model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor, batch_size: int, dev: torch.device):
    """:func:`capture` with the layers outside the blocks on ``dev`` for the duration."""
    _move_outside_blocks(model, blocks, dev)
    try:
        return capture(model, blocks, calib, batch_size, dev)
    finally:
        if dev.type != "cpu":
            _move_outside_blocks(model, blocks, torch.device("cpu"))


def _forward_until_stop(base: nn.Module, ids: torch.Tensor, device: torch.device) -> None:
    """Run the base model on ``ids`` until a hook raises :class:`_Stop` (or to the end)."""
    try:
        base(input_ids=ids.to(device), use_cache=False)
    except _Stop:
        pass


def _output_is_tuple(base: nn.Module, block: nn.Module, probe: torch.Tensor, device: torch.device) -> bool:
    """Whether a block returns a tuple (transformers < 5) or a tensor, from a 2-token probe."""
    seen: list[bool] = []

    def grab_output(module, args, output):
        seen.append(isinstance(output, (tuple, list)))
        raise _Stop

    home = next(block.parameters()).device
    block.to(device)
    handle = block.register_forward_hook(grab_output)
    try:
        _forward_until_stop(base, probe, device)
    finally:
        handle.remove()
        block.to(home)
    return bool(seen and seen[0])


@torch.no_grad()
def replay(model: nn.Module, ids: torch.Tensor, *, batch_size: int = 1, device: str = "cpu",
           blocks_path: str | None = None) -> torch.Tensor:
    """The last block's outputs for ``ids``, computed block by block as the engine does.

    Equal to the full forward pass's last-block output: the check that capture and per-block
    propagation lose nothing (masks, position embeddings, per-block arguments).
    """
    _, blocks = find_blocks(model, blocks_path)
    dev = torch.device(device)
    hidden, calls = capture(model, blocks, ids, batch_size, dev)
    for block, block_calls in zip(blocks, calls):
        hidden = _run_block(block, hidden, block_calls)
    return torch.cat(hidden)


def _run_block(block: nn.Module, hidden: list[torch.Tensor], calls: list[_Call]) -> list[torch.Tensor]:
    """Run one block on every calibration batch with the arguments recorded for it."""
    return [_first(block(h, *c.args, **c.kwargs)) for h, c in zip(hidden, calls)]


def _prune_linear(module: nn.Module, metric: Entry, params: dict[str, Any], stats: LayerStats | None,
                  sparsity: float, pattern: Pattern) -> int:
    """Prune one linear layer in place; return its number of zero weights.

    With an N:M pattern the layer's own N is ``sparsity * M`` (mixed N:M allocations give blocks
    different N); it must be a whole number.
    """
    w = weight_matrix(module)
    if pattern.is_nm:
        n = round(sparsity * pattern.m)
        if abs(n - sparsity * pattern.m) > 1e-6:
            raise ValueError(f"sparsity {sparsity} is not a whole number of zeros per group of {pattern.m}")
        if n == 0:
            return int((w == 0).sum())
        pattern = Pattern(n=n, m=pattern.m)
    if metric.extra.get("kind") == "solver":
        w.copy_(metric.fn(w, stats, sparsity, pattern, **params))
    else:
        scores = metric.fn(w, stats, **params)
        mask = make_mask(scores, sparsity, pattern, metric.extra.get("group", "row"))
        w.masked_fill_(mask.to(w.device), 0)
    return int((w == 0).sum())


def build_profile(blocks_path: str, blocks: nn.ModuleList) -> Profile:
    layers = []
    for i, block in enumerate(blocks):
        for sub, module in block_linears(block):
            shape = tuple(weight_matrix(module).shape)
            layers.append(LayerInfo(f"{blocks_path}.{i}.{sub}", i, shape[0] * shape[1], shape))
    if not layers:
        raise ValueError(f"the blocks at '{blocks_path}' contain no linear layers")
    return Profile(layers)


def allocate(allocator: str, params: dict[str, Any], profile: Profile, sparsity: float) -> dict[str, float]:
    entry = ALLOCATORS.get(allocator)
    result = entry.fn(profile, sparsity, **params)
    check_allocation(allocator, profile, result, sparsity)
    return result


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calib: torch.Tensor | None,
    *,
    metric: str,
    metric_params: dict[str, Any] | None = None,
    allocation: dict[str, float],
    pattern: Pattern,
    mode: str = "two-pass",
    propagate: str = "pruned",
    batch_size: int = 1,
    device: str = "cpu",
    blocks_path: str | None = None,
    progress: bool = True,
    grads: dict[str, torch.Tensor] | None = None,
) -> PruneResult:
    """Prune ``model`` in place. ``allocation`` maps every linear layer's full name to its sparsity.

    ``grads`` holds the precomputed gradient statistic of every layer for metrics that need
    ``grad`` (GBLM; see :mod:`prunewise.gradients`).
    """
    start = time.perf_counter()
    entry = METRICS.get(metric)
    params = entry.bind(metric_params or {})
    path, blocks = find_blocks(model, blocks_path)
    dev = torch.device(device)
    needs_data = any(n in BLOCK for n in entry.needs)
    if needs_data and calib is None:
        raise ValueError(f"metric '{metric}' needs calibration data")
    if "grad" in entry.needs and grads is None:
        raise ValueError(f"metric '{metric}' needs gradient statistics (grads)")
    if mode not in ("two-pass", "single-pass") or propagate not in ("pruned", "dense"):
        raise ValueError(f"unknown mode/propagate '{mode}'/'{propagate}'")
    timings: dict[str, float] = {}
    results: list[LayerResult] = []

    hidden: list[torch.Tensor] = []
    calls: list[list[_Call]] = []
    if needs_data:
        t0 = time.perf_counter()
        hidden, calls = _capture_on(model, blocks, calib, calib.shape[0] if mode == "single-pass" else batch_size, dev)
        timings["capture_s"] = time.perf_counter() - t0

    last_sub: str | None = None  # name (inside a block) of the last linear layer to run
    bar = tqdm(range(len(blocks)), desc=f"{metric} {mode}", unit="block", disable=not progress)
    for i in bar:
        block = blocks[i]
        home = next(block.parameters()).device
        block.to(dev)
        linears = [(f"{path}.{i}.{sub}", m) for sub, m in block_linears(block)]
        stats = {name: make_stats(entry.needs, weight_matrix(m).shape[1]) for name, m in linears}
        if grads is not None:
            for name, st in stats.items():
                st.grad = grads[name]
        zeros: dict[str, int] = {}

        if not needs_data:
            for name, module in linears:
                zeros[name] = _prune_linear(module, entry, params, stats[name], allocation[name], pattern)
        elif mode == "single-pass":
            handles = [m.register_forward_pre_hook(_prune_on_first_input(name, stats, zeros, entry, params, allocation, pattern))
                       for name, m in linears]
            try:
                hidden = _run_block(block, hidden, calls[i])
            finally:
                for h in handles:
                    h.remove()
            missing = [n for n, _ in linears if n not in zeros]
            if missing:
                raise RuntimeError(f"{missing[0]} received no calibration input; cannot compute '{metric}' statistics")
        else:
            # Outputs of the dense block are needed only for dense propagation; otherwise each
            # forward stops right after the last linear layer has seen its input.
            need_outputs = propagate == "dense" or last_sub is None
            collector = _StatsCollector(stats, None if need_outputs else f"{path}.{i}.{last_sub}")
            outs = collector.run(block, linears, hidden, calls[i])
            if last_sub is None:
                last_sub = collector.last_layer(len(linears), f"{path}.{i}.")
            for name, module in linears:
                st = stats[name]
                if st.ntokens == 0:
                    raise RuntimeError(f"{name} received no calibration input; cannot compute '{metric}' statistics")
                zeros[name] = _prune_linear(module, entry, params, st, allocation[name], pattern)
                st.release()
            if propagate == "pruned":
                outs = _run_block(block, hidden, calls[i])
            hidden = outs
        block.to(home)
        block_results = [
            LayerResult(name, i, tuple(weight_matrix(m).shape), allocation[name], zeros[name]) for name, m in linears
        ]
        results.extend(block_results)
    timings["total_s"] = time.perf_counter() - start
    ntok = int(calib.numel()) if calib is not None and needs_data else 0
    return PruneResult(results, timings["total_s"], ntok, path, timings)


@torch.no_grad()
def dense_input_norms(
    model: nn.Module,
    calib: torch.Tensor,
    *,
    batch_size: int = 1,
    device: str = "cpu",
    blocks_path: str | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Wanda's ``a_j`` of every linear layer of the *dense* model, propagated densely.

    One calibration pass and no pruning: the statistics OWL's outlier ratios and MRP's static
    redundancy are computed from (``{linear name: float32 [C_in]}``).
    """
    path, blocks = find_blocks(model, blocks_path)
    dev = torch.device(device)
    hidden, calls = _capture_on(model, blocks, calib, batch_size, dev)
    norms: dict[str, torch.Tensor] = {}
    for i in tqdm(range(len(blocks)), desc="dense statistics", unit="block", disable=not progress):
        block = blocks[i]
        home = next(block.parameters()).device
        block.to(dev)
        linears = [(f"{path}.{i}.{sub}", m) for sub, m in block_linears(block)]
        stats = {name: make_stats(("input_sq_norm",), weight_matrix(m).shape[1]) for name, m in linears}
        hidden = _StatsCollector(stats, None).run(block, linears, hidden, calls[i])
        block.to(home)
        for name, st in stats.items():
            if st.ntokens == 0:
                raise RuntimeError(f"{name} received no calibration input")
            norms[name] = st.input_norm().cpu()
    return norms


class _StatsCollector:
    """Forward pre-hooks that feed each linear layer's :class:`LayerStats`.

    Layers that receive the same input tensor (q/k/v, gate/up) share one increment. With
    ``stop_after`` set, every forward stops as soon as that layer has recorded its input: the
    block's remaining work (its largest matmul among it) is skipped when its outputs are unused.
    """

    def __init__(self, stats: dict[str, LayerStats], stop_after: str | None):
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
            st = self.stats[name]
            key = "gram" if st.want_gram else "sq"
            if key not in self._increments:
                self._increments[key] = st.increment(x)
            st.add_increment(x, self._increments[key])
            self.order.append(name)
            if name == self.stop_after:
                raise _Stop

        return pre_hook

    def run(self, block: nn.Module, linears: list[tuple[str, nn.Module]], hidden: list[torch.Tensor],
            calls: list[_Call]) -> list[torch.Tensor] | None:
        """Run ``block`` on every batch with the hooks on ``linears``; its outputs unless stopped early."""
        handles = [m.register_forward_pre_hook(self.hook(name)) for name, m in linears]
        try:
            if self.stop_after is None:
                return _run_block(block, hidden, calls)
            for h, c in zip(hidden, calls):
                try:
                    block(h, *c.args, **c.kwargs)
                except _Stop:
                    pass
            return None
        finally:
            for hd in handles:
                hd.remove()
            self._x, self._increments = None, {}

    def last_layer(self, n_layers: int, prefix: str) -> str | None:
        """The last linear layer to run in one forward, if every layer ran exactly once."""
        first = self.order[:n_layers]
        if len(first) < n_layers or len(set(first)) != n_layers or len(self.order) % n_layers:
            return None
        return first[-1][len(prefix):]


def _prune_on_first_input(name, stats, zeros, entry, params, allocation, pattern):
    def hook(module, args):
        if name in zeros:
            return
        st = stats[name]
        st.add(args[0])
        zeros[name] = _prune_linear(module, entry, params, st, allocation[name], pattern)
        st.release()

    return hook
