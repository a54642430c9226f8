"""Saving a run: the checkpoint through an exporter and its record (``pruning.json``), plus what a
record measures about the process (versions, peak memory, the mask digest).

A checkpoint is written to a temporary sibling folder and renamed into place at the end
(:mod:`prunewise.atomic`), so an interrupted or failed run never leaves anything that looks like a
finished checkpoint. The default exporter writes safetensors weights and the tokenizer (loadable
with plain ``AutoModelForCausalLM.from_pretrained``); the record is :class:`~prunewise.record.RunRecord`.
"""

from __future__ import annotations

import hashlib
import platform
import resource
import sys
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_folder
from .blocks import BlockSource
from .errors import PrunewiseError
from .export import EXPORTERS
from .models import weight_matrix
from .record import RECORD, RunRecord


def versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {
        "prunewise": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch_threads": str(torch.get_num_threads()),
    }


def peak_memory() -> dict[str, float]:
    """Peak resident set size of this process (and peak CUDA allocation when used), in GB."""
    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def mask_digest(model: nn.Module, blocks_path: str | None = None) -> str:
    """SHA-256 of the zero pattern of every prunable weight, in module order."""
    h = hashlib.sha256()
    for _, name, module in BlockSource(model, blocks_path).all_linears():
        zeros = (weight_matrix(module) == 0).cpu().contiguous()
        h.update(f"{name}:{tuple(zeros.shape)}".encode())
        h.update(zeros.numpy().tobytes())
    return h.hexdigest()


def check_output_dir(out: Path, overwrite: bool = False) -> None:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise PrunewiseError(f"out: {out} already exists; choose another folder or pass --overwrite")


def save_run(model: nn.Module, tokenizer, out: Path, record: RunRecord, overwrite: bool = False,
             format: str = "safetensors") -> Path:
    """The checkpoint in ``format`` (:data:`prunewise.export.EXPORTERS`) and ``pruning.json``, all or
    nothing: written beside ``out`` and renamed into place (an old ``out`` is removed only after)."""
    out = Path(out)
    exporter = EXPORTERS.get(format)
    check_output_dir(out, overwrite)
    record.output = {"format": exporter.name, "path": str(out.resolve())}
    with atomic_folder(out, replace=overwrite) as tmp:
        exporter.fn(model, tokenizer, tmp)
        record.write(tmp / RECORD)
    return out
