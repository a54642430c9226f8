"""Pruning metrics: which weights inside one linear layer go.

A *score* metric is ``score(weight, stats, **hyper) -> Tensor`` (float32, same shape as the
``[C_out, C_in]`` weight, higher = more important, pure); the engine turns scores into an exact
mask for the pattern. A *solver* metric is ``solve(weight, stats, sparsity, pattern, **hyper) ->
new weight`` and chooses its own mask while updating the remaining weights (SparseGPT).
Importing this package registers every metric in :data:`prunewise.registry.METRICS`.
"""

from . import gblm, magnitude, sparsegpt, wanda  # noqa: F401  (registration side effects)
