"""Layerwise sparsity allocators: how many weights each linear layer loses.

An allocator is ``allocate(profile, sparsity, **hyper) -> {linear name: sparsity}``: a pure
function of a :class:`Profile` (the prunable layers, in model order, with their block index and
parameter count, plus any statistics the allocator declared it needs) and the global target.
After every allocator :func:`check_allocation` verifies that every layer is present, every value
lies in [0, 1), and the parameter-weighted mean equals the target within 1e-6.
Importing this package registers every allocator in :data:`prunewise.registry.ALLOCATORS`;
:mod:`.profile` holds the profile and the contract, :mod:`.planner` the planning of a run,
:mod:`.statistics` how each statistic is computed, :mod:`.cost` what a dry run announces.
"""

from . import alphapruning, atp, auto, dlp, lsa, mrp, owl, uniform  # noqa: F401  (registration side effects)
from .profile import (  # noqa: F401  (the allocation API)
    LayerInfo,
    Profile,
    block_clamp,
    block_profile,
    check_allocation,
    clamp_to_budget,
    layer_scores,
    mixed_nm,
    weighted_mean,
)
