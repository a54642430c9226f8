"""Where a model's decoder blocks and prunable linear layers are, found generically.

Decoder blocks are the ``nn.ModuleList`` whose children are instances of the model's
``_no_split_modules`` classes; ``blocks_path`` overrides that for unusual models. A block's
prunable layers are its ``nn.Linear`` modules, GPT-2 ``Conv1D`` modules and each expert's
projections of fused mixture-of-experts tensors (:mod:`prunewise.model.experts`), never a router.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PrunewiseError
from ..sparse.kernel import SparseLinear
from .experts import ExpertLinear, prepare, routers


def max_context(model: nn.Module) -> int | None:
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _resolve_path(model: nn.Module, path: str) -> nn.Module:
    obj = model
    for part in path.split("."):
        if part.isdigit() and isinstance(obj, (nn.ModuleList, nn.Sequential)):
            obj = obj[int(part)]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            raise PrunewiseError(f"blocks_path: '{path}' does not exist in {type(model).__name__} (no '{part}')")
    return obj


def find_blocks(model: nn.Module, blocks_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return ``(dotted path, ModuleList)`` of the decoder blocks."""
    if blocks_path:
        blocks = _resolve_path(model, blocks_path)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise PrunewiseError(
                f"blocks_path: '{blocks_path}' is a {type(blocks).__name__}, not a non-empty nn.ModuleList"
            )
        return blocks_path, blocks
    classes = set(getattr(model, "_no_split_modules", None) or [])
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child).__name__ for child in module}
            if len(kinds) == 1 and (kinds & classes or not classes):
                if any(isinstance(m, (nn.Linear, SparseLinear)) or is_conv1d(m) for m in module[0].modules()):
                    candidates.append((len(module), name, module))
    if not candidates:
        raise PrunewiseError(
            f"cannot find the decoder blocks of {type(model).__name__} (no nn.ModuleList of "
            f"{sorted(classes) or 'repeated layers'}); pass --blocks-path, e.g. --blocks-path model.layers"
        )
    candidates.sort(key=lambda c: -c[0])
    _, name, module = candidates[0]
    return name, module


def is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: a linear layer whose weight is stored [C_in, C_out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def block_linears(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The prunable linear layers of a block, in module order: ``nn.Linear``, GPT-2 ``Conv1D``
    and each expert's projections of fused mixture-of-experts tensors; never a router
    (:mod:`prunewise.model.experts`)."""
    prepare(block)
    skip = routers(block)
    return [
        (n, m)
        for n, m in block.named_modules()
        if (isinstance(m, (nn.Linear, ExpertLinear)) or is_conv1d(m)) and id(m) not in skip
    ]


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as a ``[C_out, C_in]`` view (writes go to the module's parameter)."""
    w = module.weight.data
    return w.t() if is_conv1d(module) else w
