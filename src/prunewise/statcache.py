"""On-disk cache for statistics that are expensive to compute: keyed by content, never by a path.

A key is a SHA-256 of what the statistic depends on (weight bytes, calibration token ids, the
options that change the numbers), so any later run, allocator search or sweep over the same
weights and data pays once, and changed weights never reuse a stale entry. Files are written to
a temporary sibling and renamed (:mod:`prunewise.atomic`), so a killed run never leaves a truncated entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_write
from .config import resolve_cache_dir


def _update(h: Any, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())


def fingerprint(*tensors: torch.Tensor, extra: str = "") -> str:
    """SHA-256 over the dtype, shape and bytes of ``tensors``, plus ``extra``."""
    h = hashlib.sha256(extra.encode())
    for t in tensors:
        _update(h, t)
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, shapes, bytes) of ``model``."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        _update(h, t)
    return h.hexdigest()


def entry(cache_dir: Path | None, kind: str, key: str) -> Path:
    """Where :func:`cached` keeps ``kind``/``key``."""
    return resolve_cache_dir(cache_dir) / kind / f"{key}.pt"


def cached(cache_dir: Path | None, kind: str, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, stored as ``<cache_dir>/<kind>/<key>.pt``; loaded from there when present.
    ``cache_dir=None`` is the default cache (:func:`prunewise.config.resolve_cache_dir`), as everywhere."""
    path = entry(cache_dir, kind, key)
    if path.is_file():
        return torch.load(path)
    value = compute()
    atomic_write(path, lambda tmp: torch.save(value, tmp))
    return value
