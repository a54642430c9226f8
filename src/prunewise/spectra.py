"""Eigenvalue spectra of every prunable weight matrix, cached on disk by a fingerprint of the weights.

AlphaPruning reads ``lambda = sigma^2`` of each matrix. The SVDs are the expensive part, so each
spectrum is stored under ``<cache>/spectra/<sha256 of the weight bytes, dtype and shape>.pt``:
a path, a model name or a run never enters the key, so any later run, allocator search or sweep
over the same weights pays once, and changed weights never reuse a stale spectrum.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import Profile
from .allocation.esd import eigenvalues
from .models import weight_matrix


def fingerprint(weight: torch.Tensor) -> str:
    w = weight.detach().cpu().contiguous()
    h = hashlib.sha256(f"{w.dtype}:{tuple(w.shape)}".encode())
    h.update(w.view(torch.uint8).numpy().tobytes() if w.dtype != torch.bool else w.numpy().tobytes())
    return h.hexdigest()


def layer_eigenvalues(model: nn.Module, profile: Profile, cache_dir: Path | None, progress: bool = True) -> dict[str, torch.Tensor]:
    """``{linear name: ascending eigenvalues of W^T W}`` for every layer of ``profile``."""
    out: dict[str, torch.Tensor] = {}
    folder = Path(cache_dir) / "spectra" if cache_dir is not None else None
    for layer in tqdm(profile.layers, desc="spectra", unit="matrix", disable=not progress):
        w = weight_matrix(model.get_submodule(layer.name))
        path = folder / f"{fingerprint(w)}.pt" if folder is not None else None
        if path is not None and path.is_file():
            out[layer.name] = torch.load(path)
            continue
        eig = eigenvalues(w)
        out[layer.name] = eig
        if path is not None:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            os.close(fd)
            torch.save(eig, tmp)
            os.replace(tmp, path)
    return out
