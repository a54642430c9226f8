"""The block source of a model: its blocks in memory (:class:`~prunewise.model.blocks.BlockSource`)
or read from its checkpoint when the model is streamed
(:class:`~prunewise.model.streaming.StreamedSource`); and the replay pass, the check that the
block loop loses nothing."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import BlockSource, replay_step
from .streaming import StreamedSource, stream_of


def make_source(model: nn.Module, blocks_path: str | None = None, device: str | torch.device = "cpu") -> BlockSource:
    """The block source of ``model``: its blocks in memory, or read from its checkpoint when the
    model is streamed."""
    if stream_of(model) is not None:
        return StreamedSource(model, blocks_path, device)
    return BlockSource(model, blocks_path, device)


@torch.no_grad()
def replay(
    model: nn.Module, ids: torch.Tensor, *, batch_size: int = 1, device: str = "cpu", blocks_path: str | None = None
) -> torch.Tensor:
    """The last block's outputs for ``ids``, computed block by block as every pass does.

    Equal to the full forward pass's last-block output: the check that capture and per-block
    propagation lose nothing (masks, position embeddings, per-block arguments).
    """
    source = make_source(model, blocks_path, device)
    return torch.cat(source.walk(replay_step, source.capture(ids, batch_size), desc="replay", progress=False))
