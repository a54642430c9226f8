"""The one block loop: where decoder block ``i`` comes from, where it runs, and what it receives.

Every pass over a model — pruning, dense statistics for allocators, replay, perplexity — is the
same walk: capture the inputs of block 0 (and every argument each block receives), then for each
block in order put it on the device, run a *step* on it, take it back. A :class:`BlockSource`
owns that walk; the passes are small step functions over it.

Capture. The decoder blocks are temporarily replaced by recorders and the token ids are run
through the model's base (no ``lm_head``). Each recorder stores the positional and keyword
arguments its block receives (attention masks, position embeddings, ...) by a forward pre-hook with
kwargs, never by argument names, so per-block arguments (sliding-window masks) and new
transformers releases need no code here. The first pass stops at block 0 and keeps its inputs.

Head. The logits of the last block's outputs come from the model's own forward with every block
replaced by a pass-through and the last one returning the given hidden states, so the final norm,
``lm_head`` and any soft-capping are the model's own, for every architecture.

:class:`BlockSource` is the in-memory model, one block at a time on ``device``; a source that
reads blocks from a checkpoint (models larger than memory) or spreads them over several devices
implements the same methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .experts import routed
from .layers import block_linears, find_blocks, weight_matrix


class Stop(Exception):
    """Raised by a hook to end a forward pass early."""


@dataclass
class Call:
    """The arguments a block receives besides its hidden states, for one batch."""

    args: tuple
    kwargs: dict[str, Any]


@dataclass
class Inputs:
    """What the walk feeds the blocks: the hidden states of the current block, per batch, and every
    block's other arguments (``calls[block][batch]``)."""

    hidden: list[torch.Tensor]
    calls: list[list[Call]]
    as_tuple: bool | None = None  # whether blocks return a tuple (transformers < 5) or a tensor


# A step: (block index, block on the device, its linear layers by full name, hidden per batch,
# its calls) -> the hidden states for the next block (or None when nothing follows).
Step = Callable[
    [int, nn.Module, list[tuple[str, nn.Module]], list[torch.Tensor] | None, list[Call] | None],
    list[torch.Tensor] | None,
]


def split_hidden(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple, dict[str, Any]]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def run_block(block: nn.Module, hidden: list[torch.Tensor], calls: list[Call]) -> list[torch.Tensor]:
    """Run one block on every batch with the arguments recorded for it."""
    return [first(block(h, *c.args, **c.kwargs)) for h, c in zip(hidden, calls)]


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


class _Stand(nn.Module):
    """Stands in for a decoder block during capture and the head: records or replaces its output."""

    def __init__(self, inner: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.inner = inner
        self.fn = fn

    def __getattr__(self, name: str):  # attention_type, layer_idx, ... read by the model's loop
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class BlockSource:
    """The decoder blocks of a model held in memory, each moved to ``device`` for its turn."""

    streamed = False  # whether each block's turn reads it from disk (walks should be few)

    def __init__(self, model: nn.Module, blocks_path: str | None = None, device: str | torch.device = "cpu"):
        self.model = model
        self.path, self.blocks = find_blocks(model, blocks_path)
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.blocks)

    def linears(self, i: int, block: nn.Module | None = None) -> list[tuple[str, nn.Module]]:
        """The prunable linear layers of block ``i`` by full module name, in module order."""
        return [(f"{self.path}.{i}.{sub}", m) for sub, m in block_linears(self.blocks[i] if block is None else block)]

    def all_linears(self) -> Iterator[tuple[int, str, nn.Module]]:
        """``(block index, full name, module)`` of every prunable layer, where the layers are stored."""
        for i in range(len(self)):
            for name, module in self.linears(i):
                yield i, name, module

    def weight(self, name: str) -> torch.Tensor:
        """The weight ``[C_out, C_in]`` of linear layer ``name`` (a view of the model's own tensor)."""
        return weight_matrix(self.model.get_submodule(name))

    @contextlib.contextmanager
    def rewriting(self) -> Iterator[None]:
        """Where the blocks a walk changes are kept: in memory, the model itself (nothing to do)."""
        yield

    @contextlib.contextmanager
    def block(self, i: int, upcoming: int | None = None) -> Iterator[nn.Module]:
        """Block ``i`` on the device for the duration (``upcoming``: the block the walk takes next,
        which a source reading from disk fetches meanwhile)."""
        block = self.blocks[i]
        home = next(block.parameters()).device
        block.to(self.device)
        try:
            with routed(block):  # fused experts through per-expert modules, so hooks see routed tokens
                yield block
        finally:
            block.to(home)

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        """Every parameter and buffer outside the blocks on the device for the duration."""
        self._move_outside(self.device)
        try:
            yield
        finally:
            if self.device.type != "cpu":
                self._move_outside(torch.device("cpu"))

    def _move_outside(self, device: torch.device) -> None:
        inside = {id(m) for m in self.blocks.modules()}
        for module in self.model.modules():
            if id(module) in inside:
                continue
            for tensors in (module._parameters, module._buffers):
                for t in tensors.values():
                    if t is not None and t.device != device:
                        t.data = t.data.to(device)

    @contextlib.contextmanager
    def _standing_in(self, make: Callable[[int], Callable[..., Any]]) -> Iterator[None]:
        originals = list(self.blocks)
        for i, block in enumerate(originals):
            self.blocks[i] = _Stand(block, make(i))
        try:
            yield
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block

    @torch.no_grad()
    def capture(self, ids: torch.Tensor, batch_size: int) -> Inputs:
        """Block-0 inputs and every block's other arguments for ``ids`` in batches of ``batch_size``."""
        batches = list(ids.split(batch_size))
        inputs = Inputs([], [[] for _ in self.blocks])
        base = _base_model(self.model)
        with self.outside():
            # Pass 1: the inputs of block 0, stopping before it runs.
            def grab_first(module, args, kwargs):
                h, rest, kw = split_hidden(args, kwargs)
                inputs.hidden.append(h.detach())
                inputs.calls[0].append(Call(rest, kw))
                raise Stop

            handle = self.blocks[0].register_forward_pre_hook(grab_first, with_kwargs=True)
            try:
                for batch in batches:
                    self._forward_until_stop(base, batch)
            finally:
                handle.remove()
            inputs.as_tuple = self._output_is_tuple(base, ids[:1, :2])
            if len(self.blocks) == 1:
                return inputs

            # Pass 2: every other block's arguments, with the blocks replaced by identity recorders.
            def recorder(i: int):
                def record(*args, **kwargs):
                    h, rest, kw = split_hidden(args, kwargs)
                    if i > 0:  # block 0's arguments were recorded in pass 1
                        inputs.calls[i].append(Call(rest, kw))
                    return (h,) if inputs.as_tuple else h

                return record

            with self._standing_in(recorder):
                for batch in batches:
                    base(input_ids=batch.to(self.device), use_cache=False)
        return inputs

    def _forward_until_stop(self, base: nn.Module, ids: torch.Tensor) -> None:
        try:
            base(input_ids=ids.to(self.device), use_cache=False)
        except Stop:
            pass

    def _output_is_tuple(self, base: nn.Module, probe: torch.Tensor) -> bool:
        """Whether a block returns a tuple (transformers < 5) or a tensor, from a 2-token probe."""
        seen: list[bool] = []

        def grab_output(module, args, output):
            seen.append(isinstance(output, (tuple, list)))
            raise Stop

        with self.block(0) as block:
            handle = block.register_forward_hook(grab_output)
            try:
                self._forward_until_stop(base, probe)
            finally:
                handle.remove()
        return bool(seen and seen[0])

    def each(
        self, *, reverse: bool = False, desc: str = "blocks", progress: bool = False
    ) -> Iterator[tuple[int, nn.Module, list[tuple[str, nn.Module]]]]:
        """``(index, block on the device, its linear layers)`` for every block, first to last (or
        last to first: a backward pass), each taken back when the next is asked for."""
        order = list(range(len(self) - 1, -1, -1) if reverse else range(len(self)))
        for k, i in enumerate(tqdm(order, desc=desc, unit="block", disable=not progress)):
            with self.block(i, order[k + 1] if k + 1 < len(order) else None) as block:
                yield i, block, self.linears(i, block)

    def walk(self, step: Step, inputs: Inputs | None, *, desc: str, progress: bool = True) -> list[torch.Tensor] | None:
        """Run ``step`` on every block in order, each on the device for its turn; the hidden states
        a step returns feed the next block. ``inputs=None`` walks without data (data-free passes).
        The walk takes ``inputs.hidden`` over (left empty): block 0's inputs are freed once it ran."""
        hidden = inputs.hidden if inputs is not None else None
        if inputs is not None:
            inputs.hidden = []
        for i, block, linears in self.each(desc=desc, progress=progress):
            hidden = step(i, block, linears, hidden, inputs.calls[i] if inputs else None)
        return hidden

    def logits(self, hidden: torch.Tensor, ids: torch.Tensor, as_tuple: bool) -> torch.Tensor:
        """The model's logits for ``ids`` given the last block's outputs ``hidden`` for them
        (differentiable with respect to ``hidden`` when grad mode is on)."""
        last = len(self) - 1

        def through(i: int):
            def fn(*args, **kwargs):
                h = hidden if i == last else split_hidden(args, kwargs)[0]
                return (h,) if as_tuple else h

            return fn

        with self.outside(), self._standing_in(through):
            return self.model(input_ids=ids.to(self.device), use_cache=False).logits


def replay_step(i, block, linears, hidden, calls):
    """A step that only runs the block (dense propagation)."""
    return run_block(block, hidden, calls)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits`` ``[..., vocab]`` against the token ids that follow
    (``targets``, the same leading shape), in float32: the loss of every pass that scores or
    back-propagates a language model (perplexity, GBLM's gradients, allocator trials)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).to(logits.device), reduction=reduction
    )
