"""AlphaPruning: layerwise sparsity from the heavy-tailed shape of each weight matrix's spectrum.

Paper: Lu, Zhou, Liu, Chen, Yang, Mahoney, Yang, "AlphaPruning: Using Heavy-Tailed Self
Regularization Theory for Improved Layer-wise Pruning of Large Language Models", NeurIPS 2024
(arXiv 2410.10912). Reference implementation: haiquanlu/AlphaPruning ``lib/prune.py``
(``ww_sparsity``) and ``lib/esd_utils.py``.

Each matrix's power-law exponent ``alpha`` (PL_Alpha_Hill, :mod:`prunewise.allocation.esd`) is
averaged over the matrices of its block (``granularity=block``, the default) or kept per matrix
(``granularity=matrix``). With ``alpha_min``/``alpha_max`` over layers and parameter counts ``P_k``:

    r_k = (alpha_k - alpha_min) / (alpha_max - alpha_min) * 2 epsilon + (1 - epsilon)
    s_k = eta * r_k,   eta = s * sum P_k / sum P_k r_k

so a larger exponent (less heavy-tailed, less trained) gets a larger sparsity and the
parameter-weighted mean is exactly ``s``. ``epsilon = 0`` gives uniform sparsity. Data-free: only
the weights are read.

Deviations from reference:
- values are clamped to ``[0, max_sparsity]`` (default 0.99) and the cut mass is redistributed
  over the other layers (the reference does not clamp: at s = 0.8, epsilon = 0.3 it assigns
  sparsities above 1);
- the spectral fit's lower-bound unit quirk is off by default (``faithful_log10=true`` restores
  it), and exact-zero eigenvalues are dropped before the fit (see ``esd.py``).
"""

from __future__ import annotations

from ..registry import ALLOCATORS, Range
from .esd import FITS, alpha_hill
from .profile import Profile, clamp_to_budget

GRANULARITIES = ("block", "matrix")


def layer_alphas(profile: Profile, fit: str, faithful_log10: bool) -> dict[str, float]:
    eigs = profile.stats["eigenvalues"]
    return {layer.name: alpha_hill(eigs[layer.name], fit, faithful_log10) for layer in profile.layers}


@ALLOCATORS.register(
    "alphapruning",
    rank=2,
    summary="higher sparsity for layers whose eigenvalue spectrum is less heavy-tailed (larger alpha)",
    paper="Lu et al., AlphaPruning, NeurIPS 2024, arXiv 2410.10912",
    needs=("eigenvalues",),
    ranges={"epsilon": Range(ge=0, le=1), "max_sparsity": Range(gt=0, le=1)},
    choices={"fit": FITS, "granularity": GRANULARITIES},
)
def allocate(
    profile: Profile,
    sparsity: float,
    *,
    epsilon: float = 0.3,
    fit: str = "xmin_peak",
    granularity: str = "block",
    faithful_log10: bool = False,
    max_sparsity: float = 0.99,
) -> dict[str, float]:
    ALLOCATORS.get("alphapruning").check(
        {"epsilon": epsilon, "fit": fit, "granularity": granularity, "max_sparsity": max_sparsity}
    )
    alphas = layer_alphas(profile, fit, faithful_log10)
    if granularity == "block":
        per_block: dict[int, list[float]] = {}
        for layer in profile.layers:
            per_block.setdefault(layer.block, []).append(alphas[layer.name])
        means = {b: sum(v) / len(v) for b, v in per_block.items()}
        alphas = {layer.name: means[layer.block] for layer in profile.layers}
    return map_alphas(alphas, profile, sparsity, epsilon, max_sparsity)


def map_alphas(
    alphas: dict[str, float], profile: Profile, sparsity: float, epsilon: float, max_sparsity: float = 0.99
) -> dict[str, float]:
    """The reference's linear map of exponents to ratios, rescaled to the parameter budget."""
    lo, hi = min(alphas.values()), max(alphas.values())
    if hi - lo < 1e-12 or epsilon == 0.0:
        return {layer.name: float(sparsity) for layer in profile.layers}
    ratio = {k: (a - lo) / (hi - lo) * 2 * epsilon + (1 - epsilon) for k, a in alphas.items()}
    total = sum(layer.numel for layer in profile.layers)
    weighted = sum(ratio[layer.name] * layer.numel for layer in profile.layers)
    eta = sparsity * total / weighted
    return clamp_to_budget({k: eta * r for k, r in ratio.items()}, profile, sparsity, 0.0, max_sparsity)
