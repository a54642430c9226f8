"""Evaluation: perplexity with the literature protocol, and zero-shot accuracy through lm-eval.

Perplexity:

Join the evaluation text with blank lines, tokenize it once (no special tokens), cut it into
``numel // seqlen`` non-overlapping windows and drop the remainder; each window's loss is the mean
next-token cross-entropy over its ``seqlen - 1`` shifted positions; perplexity is
``exp(mean of window losses)`` (equal to the references' ``exp(sum(loss*seqlen)/(n*seqlen))``).
``max_tokens`` evaluates on a prefix. Models trained with a BOS at the start of every sequence
(Gemma) get one per window: ``[BOS] + seqlen - 1`` text tokens.

Zero-shot (:func:`zero_shot`): EleutherAI lm-evaluation-harness >= 0.4 (``pip install
'prunewise[eval]'``) on the model *in memory*, through its ``HFLM`` wrapper (no fork, no reload
from disk), 0-shot, ``acc`` and ``acc_norm`` per task and their unweighted mean over tasks. The
papers' tasks are :data:`PAPER_TASKS` (Wanda, OWL, AlphaPruning) and :data:`ATP_TASKS` (PIQA
instead of RTE); the papers report ``acc``. ``include_path`` adds local task folders in lm-eval's
YAML format, so tasks can run offline on local data. prunewise ships one offline task of its own,
``wiki_cloze`` (:data:`BUILTIN_TASKS`): choose the true end of a sentence of the bundled Wikipedia
test split among four (chance 25%).

Deviations from reference: the papers ran forks of lm-eval pinned to 2023 commits (task
versions 0, BoolQ 1); lm-eval >= 0.4 ships newer task versions, so absolute accuracies can differ
slightly from the published tables. Each result records the lm-eval version and task versions.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .blocks import Inputs, make_source, replay_step
from .data import load_text, tokenize
from .errors import PrunewiseError

BOS_PER_WINDOW = ("gemma", "gemma2", "gemma3", "gemma3_text")
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
ATP_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TASK_PRESETS = {"paper": PAPER_TASKS, "atp": ATP_TASKS}
# prunewise's own offline tasks (lm-eval YAML): wiki_cloze, on the bundled Wikipedia test split.
BUILTIN_TASKS = Path(__file__).parent / "tasks"


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

    The windows go through the block loop (:mod:`prunewise.blocks`), so only one decoder block at a
    time is on ``device``."""
    step = seqlen - 1 if bos_id is not None else seqlen
    if max_tokens is not None:
        ids = ids[:max_tokens]
    nwin = ids.numel() // step
    if nwin < 1:
        raise PrunewiseError(f"data: the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: nwin * step].view(nwin, step)
    if bos_id is not None:
        windows = torch.cat([torch.full((nwin, 1), bos_id, dtype=windows.dtype), windows], dim=1)
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
        from .memory import device_available, host_available

        room = device_available(source.device) or host_available()
        per_batch = 2 * inputs.hidden[0].numel() * inputs.hidden[0].element_size()
        per = len(batches) if room is None else int(min(len(batches), max(1, room // 4 // per_batch)))
    losses = []
    for k in range(0, len(batches), per):
        part = Inputs(inputs.hidden[k:k + per], [calls[k:k + per] for calls in inputs.calls], inputs.as_tuple)
        inputs.hidden[k:k + per] = [None] * len(part.hidden)  # the walk frees them after block 0
        hidden = source.walk(replay_step, part, desc="perplexity", progress=False)
        for j, batch in enumerate(batches[k:k + per]):
            losses.append(window_losses(source, hidden[j], batch.to(source.device), bool(inputs.as_tuple)))
            hidden[j] = None
            bar.update(batch.shape[0])
    bar.close()
    mean = torch.cat(losses).mean().item()
    return {"ppl": math.exp(mean), "seqlen": seqlen, "windows": nwin, "tokens": nwin * seqlen}


LOGIT_BYTES = 1 << 25  # float32 logits alive at once (32 MB): never a whole window of a large vocabulary


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
        logits = source.logits(hidden[:, s:s + n], ids[:, s:s + n], as_tuple)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, s + 1:s + 1 + n].reshape(-1),
                               reduction="none")
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
) -> dict:
    """Perplexity on a named evaluation source (``wiki``, ``file:PATH``, ``wikitext2``, ``c4``)."""
    text = load_text(data, "evaluation")
    ids = tokenize(tokenizer, text.text, cache_dir)
    was_training = model.training
    model.eval()
    try:
        out = perplexity(model, ids, seqlen, max_tokens=max_tokens, batch_size=batch_size, device=device,
                         bos_id=needs_bos(model, tokenizer), progress=progress, blocks_path=blocks_path)
    finally:
        model.train(was_training)
    return {"data": text.name, "split": text.split, **out}


def parse_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"boolq,rte"``, a list, or a preset (``paper``: Wanda's seven tasks, ``atp``: PIQA for RTE)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for item in (t.strip() for t in items):
        for name in TASK_PRESETS.get(item, (item,)):
            if name and name not in out:
                out.append(name)
    if not out:
        raise PrunewiseError("tasks: no task given")
    return out


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise PrunewiseError("zero-shot evaluation needs lm-eval >= 0.4: pip install 'prunewise[eval]'") from exc
    return lm_eval, HFLM


def check_tasks(tasks: str | list[str], include_path: str | Path | None = None) -> list[str]:
    """The task names, after checking that lm-eval is installed and knows every one of them."""
    names = parse_tasks(tasks)
    _task_manager(tuple(names), None if include_path is None else str(include_path))
    return names


@functools.lru_cache(maxsize=4)
def _task_manager(tasks: tuple[str, ...], include_path: str | None):
    """lm-eval's task index over prunewise's own tasks (:data:`BUILTIN_TASKS`) and ``include_path``;
    lm-eval's built-in tasks are indexed too (about 10 s) only when a requested task needs them."""
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(BUILTIN_TASKS)]
    if include_path is not None:
        path = Path(include_path).expanduser()
        if not path.is_dir():
            raise PrunewiseError(f"include_path: {path} is not a folder of lm-eval task YAML files")
        paths.append(str(path))
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        import difflib

        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, manager.all_tasks, n=3)
            hints.append(f"'{t}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise PrunewiseError(f"tasks: unknown lm-eval task {', '.join(hints)}; local tasks go in a folder "
                             "passed with --include-path")
    return manager


def zero_shot(
    model: nn.Module,
    tokenizer,
    tasks: str | list[str],
    *,
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """0-shot accuracy of ``model`` (in memory) on lm-eval ``tasks``: per-task ``acc``/``acc_norm``
    (with standard errors and sample counts) and the mean over tasks."""
    lm_eval, HFLM = _import_lm_eval()
    names = check_tasks(tasks, include_path)
    if limit is not None and limit >= 1:
        limit = int(limit)
    manager = _task_manager(tuple(names), None if include_path is None else str(include_path))
    was_training = model.training
    model.eval()
    # lm-eval warns that an in-memory model ignores its model arguments (expected here); without
    # progress its own bars go too.
    quiet = logging.getLogger("lm_eval.models.huggingface")
    levels = {quiet: quiet.level, logging.getLogger("lm_eval"): logging.getLogger("lm_eval").level}
    quiet.setLevel(logging.ERROR)
    if not progress:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        with contextlib.redirect_stderr(io.StringIO()) if not progress else contextlib.nullcontext():
            out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=0,
                                          limit=limit, log_samples=False, bootstrap_iters=1000)
    except Exception as exc:  # lm-eval raises bare exceptions for missing datasets, offline hubs, ...
        raise PrunewiseError(f"tasks: lm-eval could not run {', '.join(names)}: {type(exc).__name__}: {exc}. "
                             "Tasks whose data lives on the Hugging Face hub need network access or a local "
                             "copy (see docs/evaluation.md)") from exc
    finally:
        model.train(was_training)
        for logger, level in levels.items():
            logger.setLevel(level)
    results: dict[str, dict] = {}
    for name in names:
        raw = out["results"].get(name, {})
        entry = {m: raw[f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in raw}
        entry.update({f"{m}_stderr": raw[f"{m}_stderr,none"] for m in ("acc", "acc_norm")
                      if isinstance(raw.get(f"{m}_stderr,none"), float)})
        entry["samples"] = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
        entry["version"] = out.get("versions", {}).get(name)
        results[name] = entry
    average = {}
    for m in ("acc", "acc_norm"):
        values = [r[m] for r in results.values() if m in r]
        if values:
            average[m] = sum(values) / len(values)
    return {"tasks": results, "average": average, "num_fewshot": 0, "limit": limit,
            "lm_eval": getattr(lm_eval, "__version__", "unknown")}
