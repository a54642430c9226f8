"""Per-sample gradient statistics of every prunable weight, for GBLM-Pruner (cached on disk).

GBLM's reference (``gradient_computation.py``) runs one forward + backward per calibration window
(batch 1, labels = inputs, mean next-token cross-entropy), multiplies each gradient by ``scale``
(100) and accumulates over windows ``n``:

    l1:  G = sum_n |scale * g_n|            l2:  G = sqrt(sum_n (scale * g_n)^2)

It keeps every ``.grad`` of the model alive, then copies them into fp16/fp32 CPU accumulators of
6 bytes per parameter, and only runs on LLaMA. Here:

- only the prunable linear weights require gradients (embeddings, norms and ``lm_head`` do not),
  and a post-accumulate-grad hook folds each weight's gradient into its float32 accumulator the
  moment autograd produces it and frees it — no full set of ``.grad`` tensors is ever alive;
- only the chosen norm is accumulated (4 bytes per prunable parameter);
- ``checkpointing=True`` runs the backward through the block loop (:mod:`prunewise.model.blocks`,
  :func:`backward_through_blocks`): per window, a forward over the blocks keeps only each block's
  input; the loss is back-propagated through the model's head to the last block's output; then
  the blocks are taken last to first,
  each recomputed from its kept input and back-propagated on its own. Only one block's activations
  exist at a time and only that block is on the device — any architecture, and the model stays
  in eval mode (no dropout);
- the result is cached under ``<cache>/gradients/<sha256 of all parameters, calibration ids, norm,
  scale, blocks path>.safetensors``, so every later prune, allocator search or sweep reuses it.

Deviations from reference: gradients are computed in the model's dtype and accumulated in float32
(the reference computes in fp16 and stores the l1 sum in fp16); the model stays in eval mode
(the reference calls ``train()``, which only matters for models with dropout).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import PrunewiseError
from ..model.blocks import BlockSource, first, next_token_loss, run_block
from ..model.experts import ExpertLinear
from ..model.layers import is_conv1d, weight_matrix
from ..model.malloc import returning_freed_memory
from ..model.memory import ModelShape, device_available, gradient_pass, host_available
from ..model.sources import make_source
from ..model.streaming import model_fingerprint
from ..storage.cache import cached, cached_lazy, fingerprint

NORMS = ("l1", "l2")


def _check_backward(weights: dict[str, nn.Parameter]) -> None:
    for name, w in weights.items():
        if not w.dtype.is_floating_point:
            raise PrunewiseError(
                f"gblm: cannot run backward: {name} is stored as {w.dtype} (a quantized checkpoint?); "
                "load the model in float32/bfloat16/float16 to collect gradients"
            )


def _check_memory(source: BlockSource, seqlen: int, checkpointing: bool, available: int | None) -> dict:
    """Raise with what is needed when the estimate exceeds the memory available on the device."""
    model, dev = source.model, source.device
    need = gradient_pass(source, seqlen, "blocks" if checkpointing else "whole")
    have = available if available is not None else (device_available(dev) or host_available())
    on_device = dev.type == "cuda" and not checkpointing  # the block-wise backward holds one block there
    total = sum(need.values()) + (sum(p.numel() * p.element_size() for p in model.parameters()) if on_device else 0)
    if have is not None and total > have:
        parts = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in need.items())
        hint = "" if checkpointing else "; try gblm:checkpointing=true"
        raise PrunewiseError(
            f"gblm: gradient collection needs about {total / 1e9:.2f} GB ({parts}) but {have / 1e9:.2f} GB "
            f"is available on {dev}{hint}, fewer/shorter calibration windows, or a larger device"
        )
    return need


@contextlib.contextmanager
def _folding(model: nn.Module, modules: dict[str, nn.Module], acc: dict[str, torch.Tensor], norm: str, scale: float):
    """Only the prunable weights require grad; each one's gradient is folded into its accumulator
    the moment autograd produces it, then freed. Everything is put back afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    hooks = []

    def fold(targets: list[tuple[str, int | None, bool]]):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad.detach()
            for name, index, transposed in targets:  # one weight, or each expert's slice of a fused one
                g = (grad if index is None else grad[index]).float() * scale
                g = g.t() if transposed else g
                acc[name].add_(g.abs() if norm == "l1" else g.square())
            param.grad = None

        return hook

    by_param: dict[torch.Tensor, list[tuple[str, int | None, bool]]] = {}
    for name, m in modules.items():
        if isinstance(m, ExpertLinear):
            by_param.setdefault(m.fused, []).append((name, m.index, False))
        else:
            by_param.setdefault(m.weight, []).append((name, None, is_conv1d(m)))
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for param, targets in by_param.items():
            param.requires_grad_(True)
            hooks.append(param.register_post_accumulate_grad_hook(fold(targets)))
        yield
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)


def _backward_whole(model: nn.Module, ids: torch.Tensor) -> None:
    """One window's loss backward through the whole model in one autograd graph."""
    with torch.enable_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        loss = next_token_loss(logits[0, :-1], ids[0, 1:])
        del logits
        loss.backward()


def collect_gradients(
    model: nn.Module,
    calib: torch.Tensor,
    *,
    norm: str = "l1",
    scale: float = 100.0,
    checkpointing: bool = False,
    device: str = "cpu",
    blocks_path: str | None = None,
    progress: bool = True,
    available: int | None = None,
) -> dict[str, torch.Tensor]:
    """``{linear name: float32 G}`` over the windows of ``calib`` (``[n, seqlen]``), one backward each:
    through the whole model on ``device``, or with ``checkpointing`` block by block over the block loop.

    ``available`` overrides the free memory used for the up-front check (bytes).
    """
    if norm not in NORMS:
        raise PrunewiseError(f"gblm: norm must be l1 or l2, got '{norm}'")
    source = make_source(model, blocks_path, device)
    modules = {name: m for _, name, m in source.all_linears()}
    _check_backward({name: m.weight for name, m in modules.items()})
    need = _check_memory(source, calib.shape[1], checkpointing, available)
    acc = {
        name: torch.zeros(weight_matrix(m).shape, dtype=torch.float32, device=source.device)
        for name, m in modules.items()
    }
    home = next(model.parameters()).device
    try:
        if not checkpointing:
            model.to(source.device)
        with _folding(model, modules, acc, norm, scale), returning_freed_memory():
            for window in tqdm(calib, desc="gradients", unit="window", disable=not progress):
                ids = window.unsqueeze(0).to(source.device)
                if checkpointing:
                    backward_through_blocks(source, ids)
                else:
                    _backward_whole(model, ids)
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise PrunewiseError(f"gblm: out of memory during backward ({need}); try gblm:checkpointing=true") from None
        raise
    finally:
        model.to(home)
    if norm == "l2":
        for t in acc.values():
            t.sqrt_()
    return {name: t.cpu() for name, t in acc.items()}


class _Kept:
    """Each block's inputs for every window, kept from the forward pass for the backward one: in
    memory, or in files under a temporary folder when they would not fit (``spill``). In memory,
    windows of one shape go into one tensor for all ``blocks``, allocated at the first block: kept
    piece by piece between each block's short-lived weights and activations, they fragmented the
    heap (0.95 GB resident for 0.57 GB kept on the bundled model, 16 x 512 tokens)."""

    def __init__(self, spill: bool, blocks: int):
        self.folder = tempfile.TemporaryDirectory(prefix="prunewise-inputs-") if spill else None
        self.blocks = blocks
        self.store: torch.Tensor | None = None
        self.memory: dict[int, list[torch.Tensor]] = {}

    def put(self, i: int, hidden: list[torch.Tensor]) -> None:
        if self.folder is not None:
            torch.save([h.cpu() for h in hidden], Path(self.folder.name) / f"{i}.pt")
        elif self.store is not None or (i == 0 and len({h.shape for h in hidden}) == 1):
            if self.store is None:
                self.store = hidden[0].new_empty((self.blocks, len(hidden), *hidden[0].shape))
            for j, h in enumerate(hidden):
                self.store[i, j].copy_(h)
        else:
            self.memory[i] = hidden

    def take(self, i: int, device: torch.device) -> list[torch.Tensor]:
        if self.folder is None:
            return list(self.store[i]) if self.store is not None else self.memory.pop(i)
        path = Path(self.folder.name) / f"{i}.pt"
        hidden = [h.to(device) for h in torch.load(path, weights_only=True)]
        path.unlink()
        return hidden


BlockBackward = Callable[[int, nn.Module, list[tuple[str, nn.Module]]], contextlib.AbstractContextManager]


def backward_through_blocks(
    source: BlockSource,
    windows: torch.Tensor,
    *,
    spill: bool = False,
    around: BlockBackward | None = None,
    progress: bool = False,
) -> None:
    """Back-propagate the mean next-token loss of every window of ``windows`` (``[n, seqlen]``)
    over the block loop, one backward per window (per-sample gradients, as the reference): a
    forward walk keeps each block's inputs (in files when ``spill``); each window's loss is
    back-propagated through the model's head to the last block's output; then the blocks are taken
    last to first, each recomputed from its kept inputs and back-propagated for every window in
    turn. Gradients reach the weights' hooks as with one autograd graph; only one block's
    activations exist at a time. ``around(i, block, linears)`` is entered while block ``i``
    back-propagates (a streamed model folds and writes that block's gradients there)."""
    inputs = source.capture(windows, 1)
    kept = _Kept(spill, len(source))

    def forward(i, block, linears, hidden, calls):
        kept.put(i, hidden)
        return run_block(block, hidden, calls)

    with torch.no_grad():
        last = source.walk(forward, inputs, desc="gradients: forward", progress=progress)
    grads = []
    for out, ids in zip(last, windows.split(1)):
        out = out.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = source.logits(out, ids, bool(inputs.as_tuple))
            next_token_loss(logits[0, :-1], ids[0, 1:]).backward()
        grads.append(out.grad)
    del last
    for i, block, linears in source.each(reverse=True, desc="gradients: backward", progress=progress):
        hidden = kept.take(i, source.device)
        with around(i, block, linears) if around is not None else contextlib.nullcontext():
            for j, call in enumerate(inputs.calls[i]):
                x = hidden[j].detach().requires_grad_(True)
                with torch.enable_grad():
                    first(block(x, *call.args, **call.kwargs)).backward(grads[j])
                grads[j], hidden[j] = x.grad, None


def streamed_gradients(
    source: BlockSource, calib: torch.Tensor, put, *, norm: str, scale: float, progress: bool = True
) -> None:
    """GBLM's ``G`` of every prunable weight of a streamed model, each block's handed to
    ``put(name, G)`` as soon as it is complete: :func:`backward_through_blocks` over every window
    at once, so every block is read twice in all; the kept block inputs are spilled to disk when
    they would not fit in a quarter of the memory available."""
    per_block = calib.numel() * ModelShape.of(source.model).hidden * next(source.model.parameters()).element_size()
    room = host_available()

    @contextlib.contextmanager
    def folding_block(i, block, linears):
        _check_backward({name: m.weight for name, m in linears})
        acc = {
            name: torch.zeros(weight_matrix(m).shape, dtype=torch.float32, device=source.device) for name, m in linears
        }
        with _folding(block, dict(linears), acc, norm, scale):
            yield
        for name, t in acc.items():
            put(name, (t.sqrt_() if norm == "l2" else t).cpu())

    with returning_freed_memory():  # each window's logits between long-lived tensors: no kept heap
        backward_through_blocks(
            source,
            calib,
            spill=room is not None and per_block * len(source) > room / 4,
            around=folding_block,
            progress=progress,
        )


def gradient_key(model_key: str, calib: torch.Tensor, blocks_path: str | None, norm: str, scale: float) -> str:
    """The cache key of :func:`layer_gradients`: the weights (their fingerprint), the calibration
    ids and the options."""
    return fingerprint(calib, extra=f"{model_key}:{blocks_path}:{norm}:{float(scale)!r}")


def layer_gradients(
    model: nn.Module,
    calib: torch.Tensor,
    *,
    norm: str,
    scale: float,
    checkpointing: bool = False,
    device: str = "cpu",
    blocks_path: str | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    model_key: str | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`collect_gradients`, cached on disk by content (checkpointing does not enter the key);
    ``model_key`` is the model's fingerprint when the caller has it."""
    key = gradient_key(model_key or model_fingerprint(model), calib, blocks_path, norm, scale)
    source = make_source(model, blocks_path, device)
    if source.streamed:  # too large to hold: G written block by block, read back layer by layer
        specs = [(name, torch.float32, tuple(weight_matrix(m).shape)) for _, name, m in source.all_linears()]
        return cached_lazy(
            cache_dir,
            "gradients",
            key,
            specs,
            lambda put: streamed_gradients(source, calib, put, norm=norm, scale=scale, progress=progress),
        )
    return cached(
        cache_dir,
        "gradients",
        key,
        lambda: collect_gradients(
            model,
            calib,
            norm=norm,
            scale=scale,
            checkpointing=checkpointing,
            device=device,
            blocks_path=blocks_path,
            progress=progress,
        ),
    )
