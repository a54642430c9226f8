"""Saving pruned checkpoints and their run records (``pruning.json``).

A checkpoint is written to a temporary sibling folder and renamed into place at the end, so an
interrupted or failed run never leaves anything that looks like a finished checkpoint. The folder
holds safetensors weights and the tokenizer (loadable with plain
``AutoModelForCausalLM.from_pretrained``) and ``pruning.json``: the full config, per-layer target
and counted sparsity, a digest of the masks, versions, wall time, peak memory and perplexities.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PrunewiseError
from .models import block_linears, find_blocks, weight_matrix
from .plots import PROFILE_PNG, plot_block_profile

RECORD = "pruning.json"


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
    path, blocks = find_blocks(model, blocks_path)
    h = hashlib.sha256()
    for i, block in enumerate(blocks):
        for sub, module in block_linears(block):
            zeros = (weight_matrix(module) == 0).cpu().contiguous()
            h.update(f"{path}.{i}.{sub}:{tuple(zeros.shape)}".encode())
            h.update(zeros.numpy().tobytes())
    return h.hexdigest()


def check_output_dir(out: Path, overwrite: bool = False) -> None:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise PrunewiseError(f"out: {out} already exists; choose another folder or pass --overwrite")


def save_run(model: nn.Module, tokenizer, out: Path, record: dict[str, Any], overwrite: bool = False) -> Path:
    """Weights, tokenizer, ``pruning.json`` and the per-block profile plot, all or nothing."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_record(tmp / RECORD, record)
        alloc = record.get("allocation")
        if alloc:
            cfg = record["config"]
            plot_block_profile(alloc["blocks"], record["pruning"]["target"], tmp / PROFILE_PNG,
                               f"{cfg['allocator']} / {cfg['metric']} / {cfg['pattern']}", alloc.get("search"))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_record(path: Path, record: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=2)
        fh.write("\n")


def read_record(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / RECORD
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except FileNotFoundError:
        raise PrunewiseError(f"config: no run record at {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PrunewiseError(f"config: cannot read {path}: {exc}") from None
    if not isinstance(record, dict) or "config" not in record:
        raise PrunewiseError(f"config: {path} is not a prunewise run record (no 'config')")
    return record
