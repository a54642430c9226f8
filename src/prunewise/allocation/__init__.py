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


def clamp_to_budget(values: dict[str, float], profile: Profile, target: float,
                    low: float = 0.0, high: float = 0.99) -> dict[str, float]:
    """Clamp ``values`` to ``[low, high]`` and rescale the unclamped ones so that the
    parameter-weighted mean stays ``target`` (the mass cut by clamping is redistributed).

    Raises ``ValueError`` if the target cannot be met inside the bounds.
    """
    numel = {layer.name: layer.numel for layer in profile.layers}
    total = sum(numel.values())
    if not low * total <= target * total <= high * total + 1e-12:
        raise ValueError(f"target {target} is outside the clamp range [{low}, {high}]")
    out = dict(values)
    fixed: dict[str, float] = {}
    for _ in range(len(out) + 1):
        free = {k: v for k, v in out.items() if k not in fixed}
        budget = target * total - sum(fixed[k] * numel[k] for k in fixed)
        mass = sum(v * numel[k] for k, v in free.items())
        if not free:
            break
        scale = budget / mass if mass > 0 else 0.0
        if mass <= 0:  # nothing to scale: spread the budget evenly over the free layers
            even = budget / sum(numel[k] for k in free)
            out.update({k: even for k in free})
        else:
            out.update({k: v * scale for k, v in free.items()})
        over = {k: high for k in free if out[k] > high}
        under = {k: low for k in free if out[k] < low}
        if not over and not under:
            break
        fixed.update(over)
        fixed.update(under)
        out.update(over)
        out.update(under)
    return out


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


from . import alphapruning, uniform  # noqa: E402,F401  (registration side effects)
