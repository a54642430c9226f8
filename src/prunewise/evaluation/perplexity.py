"""Perplexity with the literature protocol, over the block loop.

Join the evaluation text with blank lines, tokenize it once (no special tokens), cut it into
``numel // seqlen`` non-overlapping windows and drop the remainder; each window's loss is the mean
next-token cross-entropy over its ``seqlen - 1`` shifted positions; perplexity is
``exp(mean of window losses)`` (equal to the references' ``exp(sum(loss*seqlen)/(n*seqlen))``).
``max_tokens`` evaluates on a prefix. Models trained with a BOS at the start of every sequence
(Gemma) get one per window: ``[BOS] + seqlen - 1`` text tokens.

:func:`evaluate` given the fingerprint of the model's weights (``model_key``: a run's dense
source, whose fingerprint the run computes anyway) keeps the per-window losses in the cache, keyed
by the fingerprint, the token ids evaluated and every option that changes the numbers (seqlen,
batch, device type, BOS, torch version): a second run on the same dense model reads its baseline
back instead of walking the model again (``cached: true`` in the result says so).

Deviations from reference: none in the numbers; the references run the whole model per window,
here only one decoder block at a time is on the device and logits are computed in chunks.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import load_text, tokenize
from ..errors import PrunewiseError
from ..model.blocks import Inputs, next_token_loss, replay_step
from ..model.memory import LOGIT_BYTES, device_available, host_available
from ..model.sources import make_source
from ..storage.cache import cached, fingerprint

BOS_PER_WINDOW = ("gemma", "gemma2", "gemma3", "gemma3_text")


def needs_bos(model: nn.Module, tokenizer) -> int | None:
    """The BOS id to prepend to every window, or None."""
    if getattr(model.config, "model_type", "") in BOS_PER_WINDOW and tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    return None


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int,
    *,
    max_tokens: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    bos_id: int | None = None,
    progress: bool = True,
    blocks_path: str | None = None,
    chunk: int | None = None,
) -> dict:
    """Perplexity of ``model`` on the 1-D token stream ``ids``; returns the number and its protocol.

    The windows go through the block loop (:mod:`prunewise.model.blocks`), so only one decoder block at a
    time is on ``device``."""
    windows = eval_windows(ids, seqlen, max_tokens, bos_id)
    return summary(window_nll(model, windows, batch_size, device, progress, blocks_path, chunk), seqlen)


def eval_windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None, bos_id: int | None) -> torch.Tensor:
    """The ``[n, seqlen]`` windows of the token stream ``ids`` (its first ``max_tokens``) the
    protocol evaluates, a BOS first in each when ``bos_id`` is set."""
    step = seqlen - 1 if bos_id is not None else seqlen
    if max_tokens is not None:
        ids = ids[:max_tokens]
    nwin = ids.numel() // step
    if nwin < 1:
        raise PrunewiseError(f"data: the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: nwin * step].view(nwin, step)
    if bos_id is not None:
        windows = torch.cat([torch.full((nwin, 1), bos_id, dtype=windows.dtype), windows], dim=1)
    return windows


def summary(losses: torch.Tensor, seqlen: int) -> dict:
    """Perplexity and its protocol from the per-window mean losses."""
    n = losses.numel()
    return {"ppl": math.exp(losses.mean().item()), "seqlen": seqlen, "windows": n, "tokens": n * seqlen}


@torch.no_grad()
def window_nll(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: str = "cpu",
    progress: bool = True,
    blocks_path: str | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """The mean next-token loss of each of ``windows`` ([n, seqlen] token ids), float64."""
    nwin = windows.shape[0]
    # Through the block loop: one block at a time on the device, logits from the model's own head.
    # Every window is captured once; ``chunk`` windows walk the blocks together (default one batch:
    # the lowest peak memory on CPU). A source that reads blocks from disk walks as many windows
    # together as a quarter of the free memory holds (inputs and outputs of a block): usually all,
    # so every block is read once.
    source = make_source(model, blocks_path, device)
    bar = tqdm(total=nwin, desc="perplexity", unit="window", disable=not progress)
    inputs = source.capture(windows, batch_size)
    batches = list(windows.split(batch_size))
    per = max((chunk or batch_size) // batch_size, 1)  # batches that walk the blocks together
    if chunk is None and source.streamed:
        room = device_available(source.device) or host_available()
        per_batch = 2 * inputs.hidden[0].numel() * inputs.hidden[0].element_size()
        per = len(batches) if room is None else int(min(len(batches), max(1, room // 4 // per_batch)))
    losses = []
    for k in range(0, len(batches), per):
        part = Inputs(inputs.hidden[k : k + per], [calls[k : k + per] for calls in inputs.calls], inputs.as_tuple)
        inputs.hidden[k : k + per] = [None] * len(part.hidden)  # the walk frees them after block 0
        hidden = source.walk(replay_step, part, desc="perplexity", progress=False)
        for j, batch in enumerate(batches[k : k + per]):
            losses.append(window_losses(source, hidden[j], batch.to(source.device), bool(inputs.as_tuple)))
            hidden[j] = None
            bar.update(batch.shape[0])
    bar.close()
    return torch.cat(losses)


def window_losses(source, hidden: torch.Tensor, ids: torch.Tensor, as_tuple: bool) -> torch.Tensor:
    """Mean next-token cross-entropy of each window of ``ids`` ([b, t]) from the last block's outputs
    ``hidden``, through the model's head a few positions at a time (at most :data:`LOGIT_BYTES` of
    logits), float64 on the CPU."""
    b, t = ids.shape
    head = source.model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else source.model.config.vocab_size
    step = max(1, LOGIT_BYTES // (4 * b * vocab))
    total = torch.zeros(b, dtype=torch.float64)
    for s in range(0, t - 1, step):
        n = min(s + step, t - 1) - s
        logits = source.logits(hidden[:, s : s + n], ids[:, s : s + n], as_tuple)
        loss = next_token_loss(logits, ids[:, s + 1 : s + 1 + n], reduction="none")
        total += loss.view(b, n).double().sum(1).cpu()
        del logits
    return total / (t - 1)


def evaluate(
    model: nn.Module,
    tokenizer,
    data: str = "wiki",
    seqlen: int = 2048,
    *,
    max_tokens: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    cache_dir: Path | None = None,
    progress: bool = True,
    blocks_path: str | None = None,
    model_key: str | None = None,
) -> dict:
    """Perplexity on a named evaluation source (``wiki``, ``file:PATH``, ``wikitext2``, ``c4``);
    ``model_key``, the fingerprint of the model's weights, caches the result (module docstring)."""
    text = load_text(data, "evaluation")
    windows = eval_windows(tokenize(tokenizer, text.text, cache_dir), seqlen, max_tokens, needs_bos(model, tokenizer))

    ran = []

    def compute() -> torch.Tensor:
        ran.append(True)
        was_training = model.training
        model.eval()
        try:
            return window_nll(model, windows, batch_size, device, progress, blocks_path)
        finally:
            model.train(was_training)

    out = {"data": text.name, "split": text.split}
    if model_key is None:
        return {**out, **summary(compute(), seqlen)}
    options = f"{model_key}|batch {batch_size}|{torch.device(device).type}|torch {torch.__version__}"
    key = fingerprint(windows, extra=options)
    losses = cached(cache_dir, "perplexity", key, compute)
    return {**out, **summary(losses, seqlen), **({} if ran else {"cached": True})}
