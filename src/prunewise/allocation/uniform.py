"""Uniform allocation: every prunable linear layer gets the target sparsity.

Paper: the default of Wanda, SparseGPT and every layerwise paper's baseline.
Deviations from reference: none.
"""

from __future__ import annotations

from ..registry import ALLOCATORS
from .profile import Profile


@ALLOCATORS.register(
    "uniform", rank=0, summary="the same sparsity for every layer", paper="baseline", needs=(), nm=True, baseline=True
)
def allocate(profile: Profile, sparsity: float) -> dict[str, float]:
    return {layer.name: float(sparsity) for layer in profile.layers}
