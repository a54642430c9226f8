"""Exporters: what a run writes as its checkpoint, registered by name (``--format``).

An exporter is ``export(model, tokenizer, folder)``: it writes into ``folder`` (a temporary folder
that becomes the output only when everything succeeded; the run record is added next to it by
:func:`prunewise.run.saving.save_run`). A new output format is one function here.

``sparse`` writes :mod:`prunewise.sparse.checkpoint`'s compressed format one tensor at a time (a
streamed model's from its checkpoint on disk); ``prunewise.load`` reads it back.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..model.streaming import export, save_beside, shard_bytes, state_tensors, stream_of
from ..registry import Registry
from ..sparse.checkpoint import write_sparse

EXPORTERS = Registry("format")


@EXPORTERS.register(
    "safetensors",
    summary="dense safetensors checkpoint + tokenizer, in the model's dtype; "
    "loads with AutoModelForCausalLM.from_pretrained",
)
def safetensors(model: nn.Module, tokenizer, folder: Path) -> None:
    if stream_of(model) is not None:  # its checkpoint is already on disk: moved (or copied) into place
        export(model, tokenizer, folder)
        return
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


@EXPORTERS.register(
    "sparse",
    summary="compressed sparse safetensors checkpoint (values + bitmask of every matrix it makes smaller) "
    "+ tokenizer; loads with prunewise.load, runs on the sparse CPU kernel",
)
def sparse(model: nn.Module, tokenizer, folder: Path) -> None:
    write_sparse(folder, state_tensors(model), max_shard_bytes=shard_bytes(model))
    save_beside(model, tokenizer, folder)
