"""Perplexity with the literature protocol.

Join the evaluation text with blank lines, tokenize it once (no special tokens), cut it into
``numel // seqlen`` non-overlapping windows and drop the remainder; each window's loss is the mean
next-token cross-entropy over its ``seqlen - 1`` shifted positions; perplexity is
``exp(mean of window losses)`` (equal to the references' ``exp(sum(loss*seqlen)/(n*seqlen))``).
``max_tokens`` evaluates on a prefix. Models trained with a BOS at the start of every sequence
(Gemma) get one per window: ``[BOS] + seqlen - 1`` text tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import load_text, tokenize
from .errors import PrunewiseError

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
) -> dict:
    """Perplexity of ``model`` on the 1-D token stream ``ids``; returns the number and its protocol."""
    step = seqlen - 1 if bos_id is not None else seqlen
    if max_tokens is not None:
        ids = ids[:max_tokens]
    nwin = ids.numel() // step
    if nwin < 1:
        raise PrunewiseError(f"data: the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: nwin * step].view(nwin, step)
    if bos_id is not None:
        windows = torch.cat([torch.full((nwin, 1), bos_id, dtype=windows.dtype), windows], dim=1)
    dev = torch.device(device)
    losses = []
    for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = batch.to(dev)
        logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="none"
        )
        losses.append(loss.view(batch.shape[0], -1).mean(1).double().cpu())
        del logits
    mean = torch.cat(losses).mean().item()
    return {"ppl": math.exp(mean), "seqlen": seqlen, "windows": nwin, "tokens": nwin * seqlen}


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
) -> dict:
    """Perplexity on a named evaluation source (``wiki``, ``file:PATH``, ``wikitext2``, ``c4``)."""
    text = load_text(data, "evaluation")
    ids = tokenize(tokenizer, text.text, cache_dir)
    was_training = model.training
    model.eval()
    try:
        out = perplexity(model, ids, seqlen, max_tokens=max_tokens, batch_size=batch_size, device=device,
                         bos_id=needs_bos(model, tokenizer), progress=progress)
    finally:
        model.train(was_training)
    return {"data": text.name, "split": text.split, **out}
