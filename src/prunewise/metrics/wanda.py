"""Wanda: pruning by weights and activations.

Paper: Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language
Models", arXiv 2306.11695 (ICLR 2024). Reference implementation: locuslab/wanda ``lib/prune.py``
(``prune_wanda``) and ``lib/layerwrapper.py`` (``WrappedGPT``).

Score: ``S_ij = |W_ij| * a_j`` with ``a_j = sqrt(sum_n sum_t x_ntj^2 / N_seq)``, the input
column norm over the calibration set (the reference's running mean of per-sequence sums of
squares, computed in float32). The input is what enters the linear layer. Comparison group: each
output row; N:M applies the same score per group of M inputs.

Deviations from reference:
- exact counts: the reference prunes ``floor(s * C_in)`` weights per row; here the matrix loses
  ``round(s * numel)`` weights spread over rows (identical whenever ``s * C_in`` is an integer);
- the ``--use_variant`` cumulative-sum rule is not implemented.
"""

from __future__ import annotations

import torch

from ..prune.stats import LayerStats
from ..registry import METRICS


@METRICS.register(
    "wanda",
    rank=1,
    summary="|W| * ||X_j||: weight times input activation norm, per output row",
    paper="Sun et al., A Simple and Effective Pruning Approach for LLMs, arXiv 2306.11695",
    needs=("input_norm",),
    kind="score",
    group="row",
    beats=("magnitude",),
)
def score(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    return scores(weight, stats.input_norm())


def scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * a_j`` from the input norms ``a`` ``[C_in]`` (also OWL's and MRP's scores)."""
    return weight.detach().float().abs() * input_norm.to(weight.device).float().unsqueeze(0)
