"""Layerwise sparsity allocators: how many weights each linear layer loses.

An allocator is ``allocate(profile, sparsity, **hyper) -> {linear name: sparsity}``: a pure
function of a :class:`Profile` (the prunable layers, in model order, with their block index and
parameter count, plus any statistics the allocator declared it needs) and the global target.
After every allocator :func:`check_allocation` verifies that every layer is present, every value
lies in [0, 1), and the parameter-weighted mean equals the target within 1e-6.
Importing this package registers every allocator in :data:`prunewise.registry.ALLOCATORS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import PrunewiseError


@dataclass(frozen=True)
class LayerInfo:
    name: str  # full module name, e.g. "model.layers.3.mlp.down_proj"
    block: int  # index of the decoder block that holds it
    numel: int  # parameters in the weight matrix
    shape: tuple[int, int]  # (C_out, C_in)


@dataclass
class Profile:
    """What an allocator may look at: the layers and any statistics it asked for."""

    layers: list[LayerInfo]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return max(layer.block for layer in self.layers) + 1 if self.layers else 0


def weighted_mean(profile: Profile, allocation: dict[str, float]) -> float:
    total = sum(layer.numel for layer in profile.layers)
    return sum(allocation[layer.name] * layer.numel for layer in profile.layers) / total


def check_allocation(name: str, profile: Profile, allocation: dict[str, float], target: float) -> None:
    """Raise :class:`PrunewiseError` naming the allocator if ``allocation`` breaks the contract."""
    expected = {layer.name for layer in profile.layers}
    missing = sorted(expected - set(allocation))
    extra = sorted(set(allocation) - expected)
    if missing or extra:
        raise PrunewiseError(
            f"allocator '{name}' returned a wrong set of layers (missing: {missing[:3]}, unexpected: {extra[:3]})"
        )
    bad = {k: v for k, v in allocation.items() if not 0.0 <= v < 1.0}
    if bad:
        key = next(iter(bad))
        raise PrunewiseError(f"allocator '{name}' gave {key} sparsity {bad[key]}, outside [0, 1)")
    mean = weighted_mean(profile, allocation)
    if abs(mean - target) > 1e-6:
        raise PrunewiseError(
            f"allocator '{name}' gave a parameter-weighted mean sparsity of {mean:.8f}, target {target:.8f}"
        )


from . import uniform  # noqa: E402,F401  (registration side effects)
