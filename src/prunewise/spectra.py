"""Eigenvalue spectra of every prunable weight matrix, cached on disk by a fingerprint of the weights.

AlphaPruning reads ``lambda = sigma^2`` of each matrix. The SVDs are the expensive part, so each
spectrum is stored under ``<cache>/spectra/<sha256 of the weight bytes, dtype and shape>.pt``
(:mod:`prunewise.statcache`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import Profile
from .allocation.esd import eigenvalues
from .models import weight_matrix
from .statcache import cached, fingerprint


def layer_eigenvalues(model: nn.Module, profile: Profile, cache_dir: Path | None, progress: bool = True) -> dict[str, torch.Tensor]:
    """``{linear name: ascending eigenvalues of W^T W}`` for every layer of ``profile``."""
    out: dict[str, torch.Tensor] = {}
    for layer in tqdm(profile.layers, desc="spectra", unit="matrix", disable=not progress):
        w = weight_matrix(model.get_submodule(layer.name))
        out[layer.name] = cached(cache_dir, "spectra", fingerprint(w), lambda w=w: eigenvalues(w))
    return out
