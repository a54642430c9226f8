"""``prunewise eval``: evaluate a model, and for a prunewise run folder its dense source too
(reusing the record's dense numbers when they were measured with the same protocol); every
evaluation of a run folder is appended to its record."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PruneConfig, default_device
from ..data import check_source
from ..errors import PrunewiseError
from ..evaluation.perplexity import evaluate
from ..evaluation.zeroshot import check_tasks, zero_shot
from ..model.loading import load_model
from ..registry import METRICS
from ..storage.cache import resolve_cache_dir
from .job import check_context, load_placed
from .record import RECORD, RunRecord
from .saving import check_same_model, source_info


@dataclass
class EvalOutput:
    """Labelled perplexity entries and zero-shot results, in display order."""

    perplexity: list[tuple[str, dict]] = field(default_factory=list)
    zero_shot: list[tuple[str, dict]] = field(default_factory=list)


@dataclass
class EvalOptions:
    """What ``prunewise eval`` measures and how: perplexity on ``data`` (``none`` skips it) in
    windows of ``seqlen`` tokens (default: the run's evaluation window, else 2048) over the first
    ``max_tokens``; zero-shot ``tasks`` (``include_path``, ``limit``); ``dense=False`` leaves a
    run's dense source alone; ``stream`` places each model as :func:`~prunewise.run.job.load_placed`
    does (zero-shot needs it whole)."""

    data: str = "wiki"
    seqlen: int | None = None
    max_tokens: int | None = None
    batch_size: int = 1
    device: str | None = None
    dtype: str = "auto"
    tasks: str | None = None
    include_path: str | None = None
    limit: float | None = None
    dense: bool = True
    cache_dir: Path | None = None
    progress: bool = True
    trust_remote_code: bool = False
    stream: str = "auto"


def evaluate_run(model: str, options: EvalOptions | None = None, **settings: Any) -> EvalOutput:
    """Evaluate a model; for a prunewise run folder, also its dense source, reusing the record's dense
    numbers when they were measured with the same protocol (else the source is loaded, checked
    against the record's fingerprint, and measured). ``options``, or the :class:`EvalOptions`
    fields given as ``settings``, say what."""
    o = options if options is not None else EvalOptions(**settings)
    data, seqlen, max_tokens, batch_size, dtype = o.data, o.seqlen, o.max_tokens, o.batch_size, o.dtype
    tasks, include_path, limit, progress, stream = o.tasks, o.include_path, o.limit, o.progress, o.stream
    trust_remote_code, cache_dir, device = o.trust_remote_code, o.cache_dir, o.device
    device = device or default_device()
    want_ppl = data.lower() != "none"
    if not want_ppl and not tasks:
        raise PrunewiseError("nothing to evaluate: --data none and no --tasks")
    if tasks:
        check_tasks(tasks, include_path)
    if want_ppl:
        check_source(data)  # before any model is loaded
    cache_dir = resolve_cache_dir(cache_dir)
    path = Path(model).expanduser()
    record = RunRecord.read(path) if path.is_dir() and (path / RECORD).is_file() else None
    if seqlen is None and record is not None:
        seqlen = record.config.get("eval_seqlen") or record.config.get("seqlen")
    seqlen = seqlen or 2048
    if seqlen < 2:
        raise PrunewiseError(f"seqlen: must be at least 2, got {seqlen}")

    def measure(load: Callable[[], tuple], ppl: bool, zs: bool) -> tuple[dict | None, dict | None]:
        return _measure(
            load,
            cache_dir,
            data if ppl else None,
            seqlen,
            dict(max_tokens=max_tokens, batch_size=batch_size, device=device, progress=progress),
            dict(tasks=tasks, include_path=include_path, limit=limit) if zs else None,
        )

    def placed(spec: str) -> PruneConfig:  # what load_placed estimates: perplexity windows only
        data_free = METRICS.first(lambda e: not e.needs).name  # an estimate of evaluation alone: no calibration
        return PruneConfig(
            model=spec,
            metric=data_free,
            dtype=dtype,
            stream="off" if tasks else stream,
            device=device,
            batch_size=batch_size,
            eval_data=data if want_ppl else None,
            eval_seqlen=seqlen,
            max_tokens=max_tokens,
        )

    result, acc = measure(lambda: load_placed(placed(model), cache_dir, trust_remote_code)[:2], want_ppl, bool(tasks))
    out = EvalOutput()
    if record is None or not o.dense:
        if want_ppl:
            out.perplexity.append((str(model), result))
        if tasks:
            out.zero_shot.append((path.name or str(model), acc))
        if record is not None:
            _append_evaluation(record, path, None, result, None, acc, tasks, limit)
        return out
    dense_ppl = record.reusable("dense", result) if want_ppl else None
    dense_acc = record.reusable_zero_shot("dense", tasks, limit, include_path) if tasks else None
    if (want_ppl and dense_ppl is None) or (tasks and dense_acc is None):
        d_ppl, d_acc = measure(
            lambda: load_dense_source(record, dtype, cache_dir, trust_remote_code, placed(dense_spec(record))),
            want_ppl and dense_ppl is None,
            bool(tasks) and dense_acc is None,
        )
        dense_ppl, dense_acc = dense_ppl or d_ppl, dense_acc or d_acc
    cfg = record.config
    if want_ppl:
        out.perplexity += [
            (f"dense {cfg['model']}", dense_ppl),
            (f"pruned ({cfg['metric']}, {record.sparsity:.3f})", result),
        ]
    if tasks:
        out.zero_shot += [("dense", dense_acc), ("pruned", acc)]
    _append_evaluation(record, path, dense_ppl, result, dense_acc, acc, tasks, limit)
    return out


def dense_spec(record: RunRecord) -> str:
    """What to load for a run's dense source: where it was loaded from, else the model as named."""
    kind, src = record.source.get("kind"), record.source.get("path")
    return src if kind in ("folder", "gguf") and src else record.config["model"]


def load_dense_source(
    record: RunRecord, dtype: str, cache_dir: Path, trust_remote_code: bool = False, placed: PruneConfig | None = None
):
    """``(model, tokenizer)`` of a run's dense source, refused when its weights are not the record's
    (checked when loaded in the run's dtype: a fingerprint is of the weights as loaded); ``placed``
    streams it as :func:`load_placed` decides."""
    if placed is not None:
        model, tok, source, _ = load_placed(placed, cache_dir, trust_remote_code)
    else:
        model, tok, source = load_model(dense_spec(record), dtype, cache_dir, trust_remote_code=trust_remote_code)
    if dtype == record.config.get("dtype", "auto"):
        check_same_model(record.source, source_info(model, source), "the run")
    return model, tok


def _append_evaluation(
    record: RunRecord,
    folder: Path,
    dense_ppl: dict | None,
    ppl: dict | None,
    dense_acc: dict | None,
    acc: dict | None,
    tasks: str | None,
    limit: float | None,
) -> None:
    """Add one evaluation to the run folder's record (append-only), so reports see it."""
    entry: dict[str, Any] = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if ppl is not None:
        entry["perplexity"] = {"dense": dense_ppl, "pruned": ppl}
    if acc is not None:
        entry["zero_shot"] = {"tasks": tasks, "limit": limit, "dense": dense_acc, "pruned": acc}
    record.evaluations.append(entry)
    record.write(folder / RECORD)


def _measure(
    load: Callable[[], tuple],
    cache_dir: Path,
    data: str | None,
    seqlen: int,
    kw: dict[str, Any],
    zs: dict[str, Any] | None,
) -> tuple[dict | None, dict | None]:
    """``load()`` a model and its tokenizer and measure its perplexity on ``data`` and/or zero-shot
    accuracy (``zs``)."""
    model, tok = load()
    ppl = None
    if data is not None:
        check_context(model, "seqlen", seqlen)
        ppl = evaluate(model, tok, data, seqlen, cache_dir=cache_dir, **kw)
    acc = None
    if zs is not None:
        model.to(kw["device"])
        acc = zero_shot(
            model,
            tok,
            zs["tasks"],
            include_path=zs["include_path"],
            limit=zs["limit"],
            batch_size=kw["batch_size"],
            device=kw["device"],
            progress=kw["progress"],
        )
    return ppl, acc
