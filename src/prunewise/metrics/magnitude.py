"""Magnitude pruning: score = |W|.

Paper: the classic baseline used by every paper here (e.g. Han et al. 2015, "Learning both
Weights and Connections for Efficient Neural Networks"); reference implementation
``lib/prune.py::prune_magnitude`` in locuslab/wanda and ``--gmp`` in IST-DASLab/sparsegpt.

Comparison group: the whole matrix (reference default); ``--pattern unstructured:group=row``
compares per output row instead. N:M zeroes the N smallest |W| in every M inputs of a row.

Deviations from reference:
- the reference zeroes every weight with ``|W| <= t`` where ``t`` is the sorted value at
  ``floor(s * numel)``; with tied (dequantized) weights that over-prunes. Here exactly
  ``round(s * numel)`` weights are removed, chosen by index after a stable sort.
"""

from __future__ import annotations

import torch

from ..prune.stats import LayerStats
from ..registry import METRICS


@METRICS.register(
    "magnitude",
    rank=0,
    summary="|W|; no calibration data",
    paper="baseline (Han et al., 2015); reference: locuslab/wanda prune_magnitude",
    needs=(),
    kind="score",
    group="matrix",
)
def score(weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    return scores(weight)


def scores(weight: torch.Tensor) -> torch.Tensor:
    """``|W|`` in float32 (also MRP's scores with ``score=magnitude``)."""
    return weight.detach().float().abs()
