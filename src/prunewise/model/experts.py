"""Mixture-of-experts blocks: what is pruned, and how each expert sees its own tokens.

**What is pruned.** Every expert's projections, never the router. Experts stored as separate
``nn.Linear`` modules (transformers 4.x Mixtral) are linear layers like any other and their
hooks see exactly the tokens routed to them. Experts stored as fused 3-D tensors (transformers
5.x: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 — ``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``) get one :class:`ExpertLinear` per expert and projection, registered
under the experts module as ``gate_up.<e>`` and ``down.<e>``: a parameter-free view of the
expert's slice, so records, allocators, caches and the checkpoint all see one 2-D matrix per
expert projection while the weights stay where transformers keeps them. ``gate_up`` is one
matrix (gate and up rows stacked, as stored): per-row metrics (Wanda, GBLM, SparseGPT's rows)
are unaffected; whole-matrix magnitude compares the two halves together. Routers and gates
(``gate``, ``shared_expert_gate``: linear layers that are direct children of a block holding
``experts``) are never pruned; shared experts are ordinary MLPs and are.

**Statistics per expert.** While a block is walked (:meth:`prunewise.blocks.BlockSource.block`)
its fused experts run :func:`routed_forward`: the same computation as transformers' eager path,
expert by expert in the same order, but through the :class:`ExpertLinear` modules, so each
expert's hooks receive only its routed tokens. The first call on each module compares the result
with the module's own forward and refuses a layout it does not reproduce. Gradients (GBLM) reach
the fused parameter and are split per expert.

**An expert that receives no calibration token** is pruned by magnitude (|W| over the whole
matrix, the magnitude baseline's rule) with a warning naming it; its dense statistics (OWL, MRP)
are taken as all ones, i.e. magnitude scores.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import PrunewiseError

log = logging.getLogger(__name__)

FUSED = (("gate_up_proj", "gate_up"), ("down_proj", "down"))  # fused parameter -> per-expert module list


class ExpertLinear(nn.Module):
    """One expert's projection inside a fused ``[experts, out, in]`` parameter, as a linear layer.
    It holds no parameter: ``weight`` is a view of the slice, so writes prune the fused tensor."""

    def __init__(self, owner: nn.Module, attr: str, index: int):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # a plain reference, not a child module
        self.attr, self.index = attr, index

    @property
    def fused(self) -> nn.Parameter:
        return getattr(self._owner, self.attr)

    @property
    def weight(self) -> torch.Tensor:
        return self.fused[self.index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.attr}[{self.index}], {tuple(self.weight.shape[::-1])}"


def is_fused(module: nn.Module) -> bool:
    """Experts stored as 3-D ``gate_up_proj`` / ``down_proj`` parameters with an ``act_fn``."""
    params = dict(module.named_parameters(recurse=False))
    return (
        all(name in params and params[name].dim() == 3 for name, _ in FUSED)
        and hasattr(module, "act_fn")
        and params["gate_up_proj"].shape[0] == params["down_proj"].shape[0]
    )


def prepare(block: nn.Module) -> None:
    """Give every fused experts module of ``block`` its per-expert :class:`ExpertLinear` lists (once)."""
    for module in block.modules():
        if is_fused(module) and not hasattr(module, "gate_up"):
            if getattr(module, "has_bias", False) or any(p.dim() != 3 for p in module.parameters(recurse=False)):
                raise PrunewiseError(f"{type(module).__name__}: fused experts with biases are not supported yet")
            if any(hasattr(module, name) for _, name in FUSED):
                raise PrunewiseError(
                    f"{type(module).__name__}: cannot add per-expert views (a 'gate_up' or 'down' attribute exists)"
                )
            n = module.gate_up_proj.shape[0]
            for attr, name in FUSED:
                setattr(module, name, nn.ModuleList(ExpertLinear(module, attr, e) for e in range(n)))


def routers(block: nn.Module) -> set[int]:
    """ids of the linear layers that route tokens (direct linear children of a module holding experts)."""
    out = set()
    for module in block.modules():
        if hasattr(module, "experts"):
            out.update(id(child) for child in module.children() if isinstance(child, nn.Linear))
    return out


def routed_forward(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' eager expert loop, through the per-expert modules (so their hooks fire)."""
    out = torch.zeros_like(hidden_states)
    slots = top_k_index.t()  # [top_k, tokens]: positions first, as the eager path orders them
    for e in torch.unique(top_k_index).tolist():
        if e >= len(module.gate_up):
            continue
        top_k_pos, token_idx = torch.where(slots == e)
        gate, up = module.gate_up[e](hidden_states[token_idx]).chunk(2, dim=-1)
        h = module.down[e](module.act_fn(gate) * up) * top_k_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, h.to(out.dtype))
    return out


@contextlib.contextmanager
def routed(block: nn.Module) -> Iterator[None]:
    """Run the fused experts of ``block`` through :func:`routed_forward` for the duration."""
    prepare(block)
    fused = [m for m in block.modules() if hasattr(m, "gate_up") and is_fused(m)]
    before = [m.__dict__.get("forward") for m in fused]  # a forward set on the instance (hooks) stays
    for m in fused:
        m.forward = _checked(m)
    try:
        yield
    finally:
        for m, forward in zip(fused, before):
            if forward is None:
                del m.forward  # back to the class's own forward
            else:
                m.forward = forward


def _checked(module: nn.Module):
    """:func:`routed_forward`, compared once with the module's own forward on its first inputs."""

    def forward(hidden_states, top_k_index, top_k_weights):
        out = routed_forward(module, hidden_states, top_k_index, top_k_weights)
        if not getattr(module, "_prunewise_checked", False):
            with torch.no_grad():
                own = type(module).forward(module, hidden_states, top_k_index, top_k_weights)
            if not torch.allclose(own.float(), out.float(), rtol=1e-3, atol=1e-5):
                raise PrunewiseError(
                    f"{type(module).__name__}: its experts do not compute gate/up -> act * up -> "
                    "down as prunewise expects; this mixture-of-experts layout is not supported"
                )
            object.__setattr__(module, "_prunewise_checked", True)
        return out

    return forward
