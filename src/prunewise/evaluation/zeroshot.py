"""Zero-shot accuracy through EleutherAI lm-evaluation-harness >= 0.4 (``pip install
'prunewise[eval]'``), on the model *in memory*, through its ``HFLM`` wrapper (no fork, no reload
from disk), 0-shot, ``acc`` and ``acc_norm`` per task and their unweighted mean over tasks. The
papers' tasks are :data:`PAPER_TASKS` (Wanda, OWL, AlphaPruning) and :data:`ATP_TASKS` (PIQA
instead of RTE); the papers report ``acc``. ``include_path`` adds local task folders in lm-eval's
YAML format, so tasks can run offline on local data. prunewise ships one offline task of its own,
``wiki_cloze`` (:data:`BUILTIN_TASKS`): choose the true end of a sentence of the bundled Wikipedia
test split among four (chance 25%). lm-eval is optional: it is imported when a task is asked for.

Deviations from reference: the papers ran forks of lm-eval pinned to 2023 commits (task
versions 0, BoolQ 1); lm-eval >= 0.4 ships newer task versions, so absolute accuracies can differ
slightly from the published tables. Each result records the lm-eval version and task versions.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import logging
from pathlib import Path

from torch import nn

from ..errors import PrunewiseError

PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


ATP_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


TASK_PRESETS = {"paper": PAPER_TASKS, "atp": ATP_TASKS}


# prunewise's own offline tasks (lm-eval YAML): wiki_cloze, on the bundled Wikipedia test split.
BUILTIN_TASKS = Path(__file__).parent / "tasks"


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
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, manager.all_tasks, n=3)
            hints.append(f"'{t}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise PrunewiseError(
            f"tasks: unknown lm-eval task {', '.join(hints)}; local tasks go in a folder passed with --include-path"
        )
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
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                task_manager=manager,
                num_fewshot=0,
                limit=limit,
                log_samples=False,
                bootstrap_iters=1000,
            )
    except Exception as exc:  # lm-eval raises bare exceptions for missing datasets, offline hubs, ...
        raise PrunewiseError(
            f"tasks: lm-eval could not run {', '.join(names)}: {type(exc).__name__}: {exc}. "
            "Tasks whose data lives on the Hugging Face hub need network access or a local "
            "copy (see docs/evaluation.md)"
        ) from exc
    finally:
        model.train(was_training)
        for logger, level in levels.items():
            logger.setLevel(level)
    results: dict[str, dict] = {}
    for name in names:
        raw = out["results"].get(name, {})
        entry = {m: raw[f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in raw}
        entry.update(
            {
                f"{m}_stderr": raw[f"{m}_stderr,none"]
                for m in ("acc", "acc_norm")
                if isinstance(raw.get(f"{m}_stderr,none"), float)
            }
        )
        entry["samples"] = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
        entry["version"] = out.get("versions", {}).get(name)
        results[name] = entry
    average = {}
    for m in ("acc", "acc_norm"):
        values = [r[m] for r in results.values() if m in r]
        if values:
            average[m] = sum(values) / len(values)
    return {
        "tasks": results,
        "average": average,
        "num_fewshot": 0,
        "limit": limit,
        "lm_eval": getattr(lm_eval, "__version__", "unknown"),
    }
