"""What an allocator sees and the rules every allocation obeys: :class:`Profile` (the prunable
layers, in model order, with their block index and parameter count, plus the statistics the
allocator declared it needs), the budget helpers allocators share (clamping with redistribution,
mixed N:M rounding) and :func:`check_allocation`, the contract checked after every allocator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import PrunewiseError
from ..metrics import magnitude, wanda
from ..prune.masks import Pattern


@dataclass(frozen=True)
class LayerInfo:
    name: str  # full module name, e.g. "model.layers.3.mlp.down_proj"
    block: int  # index of the decoder block that holds it
    numel: int  # parameters in the weight matrix
    shape: tuple[int, int]  # (C_out, C_in)


@dataclass
class Profile:
    """What an allocator may look at: the layers, the run's metric and pattern, and the
    statistics it declared in ``needs``:

    - ``eigenvalues``: ``{name: ascending eigenvalues of W^T W}`` (float64);
    - ``weights``: ``{name: weight matrix [C_out, C_in]}`` (the model's own tensors: read only);
    - ``dense_input_norm``: ``{name: Wanda's a_j, float32 [C_in]}`` from a dense calibration pass.
    """

    layers: list[LayerInfo]
    stats: dict[str, Any] = field(default_factory=dict)
    metric: str = "wanda"
    pattern: Pattern = field(default_factory=Pattern)

    @property
    def num_blocks(self) -> int:
        return max(layer.block for layer in self.layers) + 1 if self.layers else 0

    def block_sizes(self) -> list[int]:
        """Parameters per block, in block order."""
        sizes = [0] * self.num_blocks
        for layer in self.layers:
            sizes[layer.block] += layer.numel
        return sizes

    def per_block(self, values: list[float]) -> dict[str, float]:
        """Give every layer the value of its block."""
        return {layer.name: float(values[layer.block]) for layer in self.layers}


def layer_scores(profile: Profile, name: str, kind: str) -> torch.Tensor:
    """Flat float32 scores of one layer from the dense statistics, by the metrics' own score
    functions: ``|W|`` (``kind="magnitude"``) or Wanda's ``|W| * a_j`` (``kind="wanda"``)."""
    w = profile.stats["weights"][name].cpu()
    if kind == "wanda":
        return wanda.scores(w, profile.stats["dense_input_norm"][name].cpu()).reshape(-1)
    return magnitude.scores(w).reshape(-1)


def block_clamp(
    values: list[float], profile: Profile, target: float, low: float = 0.0, high: float = 0.99
) -> list[float]:
    """:func:`clamp_to_budget` at block granularity: one value per block, parameter-weighted."""
    blocks = Profile([LayerInfo(str(b), b, n, (1, n)) for b, n in enumerate(profile.block_sizes())])
    out = clamp_to_budget({str(b): v for b, v in enumerate(values)}, blocks, target, low, high)
    return [out[str(b)] for b in range(len(values))]


def mixed_nm(values: list[float], profile: Profile, name: str) -> list[float]:
    """Round per-block sparsities to multiples of ``1/M`` for a mixed N:M pattern.

    Block ``b`` gets ``N_b`` zeros in every group of ``M`` (``0 <= N_b < M``), the ``N_b`` add up to
    ``L * N`` (largest-remainder rounding of ``values[b] * M``) so the mean N, and with equal-size
    blocks the global sparsity, are exactly the pattern's.
    """
    n, m = profile.pattern.n, profile.pattern.m
    sizes = profile.block_sizes()
    if len(set(sizes)) != 1:
        raise PrunewiseError(f"allocator '{name}': mixed {n}:{m} needs blocks of equal size to keep the mean N exact")
    scaled = [min(max(v * m, 0.0), m - 1.0) for v in values]
    counts = [int(x) for x in scaled]
    short = n * len(values) - sum(counts)
    order = sorted(range(len(values)), key=lambda b: (-(scaled[b] - counts[b]), b))
    step = 1 if short > 0 else -1
    while short:
        moved = False
        for b in order if step > 0 else reversed(order):
            if short and 0 <= counts[b] + step <= m - 1:
                counts[b] += step
                short -= step
                moved = True
        if not moved:
            raise PrunewiseError(f"allocator '{name}': cannot place mean N={n} of {m} in every block")
    return [c / m for c in counts]


def weighted_mean(profile: Profile, allocation: dict[str, float]) -> float:
    total = sum(layer.numel for layer in profile.layers)
    return sum(allocation[layer.name] * layer.numel for layer in profile.layers) / total


def clamp_to_budget(
    values: dict[str, float], profile: Profile, target: float, low: float = 0.0, high: float = 0.99
) -> dict[str, float]:
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


def block_profile(profile: Profile, allocation: dict[str, float]) -> list[float]:
    """Parameter-weighted sparsity of every block, in block order."""
    zeros = [0.0] * profile.num_blocks
    for layer in profile.layers:
        zeros[layer.block] += allocation[layer.name] * layer.numel
    return [z / n for z, n in zip(zeros, profile.block_sizes())]


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
