"""Saving a run: the checkpoint through an exporter and its record (``pruning.json``), plus what a
record measures about the process (versions, peak memory, the mask digest).

A checkpoint is written to a temporary sibling folder and renamed into place at the end
(:mod:`prunewise.storage.atomic`), so an interrupted or failed run never leaves anything that looks like a
finished checkpoint. The default exporter writes safetensors weights and the tokenizer (loadable
with plain ``AutoModelForCausalLM.from_pretrained``); the record is :class:`~prunewise.run.record.RunRecord`.
"""

from __future__ import annotations

import hashlib
import platform
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PrunewiseError
from ..model.malloc import release_free_heap
from ..model.sources import make_source
from ..model.streaming import model_fingerprint, stream_of
from ..storage.atomic import atomic_folder
from ..version import __version__
from .export import EXPORTERS
from .record import RECORD, RunRecord


def versions() -> dict[str, str]:
    import transformers  # here: importing it costs seconds, which reading a record does not need

    return {
        "prunewise": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch_threads": str(torch.get_num_threads()),
    }


def source_info(model: nn.Module, source) -> dict[str, str]:
    """Where the model came from (kind, resolved path) and what it is: a SHA-256 of every parameter
    and buffer as loaded, so a record or a sweep names a model, not only a path."""
    return {"kind": source.kind, "path": source.path, "fingerprint": model_fingerprint(model)}


def check_same_model(expected: dict[str, Any] | None, now: dict[str, str], what: str) -> None:
    """Refuse to go on when ``now`` (from :func:`source_info`) is not the model ``expected`` names."""
    want = (expected or {}).get("fingerprint")
    if want and want != now["fingerprint"]:
        raise PrunewiseError(
            f"model: {now['path']} is not the model {what} was made from (weights sha256 {now['fingerprint'][:12]}… "
            f"now, {want[:12]}… then, from {expected.get('path')})"
        )


def _high_water() -> int | None:
    """The process's peak resident size since it started or since :func:`reset_peak_memory`
    (Linux ``VmHWM``), in bytes; None where there is no ``/proc``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory() -> None:
    """Start measuring the peak anew (one run of several in one process, e.g. a sweep's): the free
    pages the heap kept are given back first (:func:`release_free_heap`), then Linux sets
    ``VmHWM`` to the present resident size; CUDA's peak allocation is reset too."""
    release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float]:
    """Peak resident set size of this process since it started or since :func:`reset_peak_memory`
    (and peak CUDA allocation when used), in GB."""
    hwm = _high_water()
    rss = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"peak_rss_gb": rss / 1e9}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def mask_digest(model: nn.Module, blocks_path: str | None = None) -> str:
    """SHA-256 of the zero pattern of every prunable weight, in module order."""
    h = hashlib.sha256()
    source = make_source(model, blocks_path)
    for _, name, _ in source.all_linears():
        zeros = (source.weight(name) == 0).cpu().contiguous()
        h.update(f"{name}:{tuple(zeros.shape)}".encode())
        h.update(zeros.numpy().tobytes())
    return h.hexdigest()


def check_output_dir(out: Path, overwrite: bool = False, protect: tuple[Path | str | None, ...] = ()) -> None:
    """Refuse, before any work, an ``out`` the run could not write or must not replace: an existing
    file or non-empty folder without ``overwrite``; with it, a file, the current folder or one of
    its ancestors, or a folder holding any ``protect`` path (the source model, the cache); a
    location under a file or where nothing can be created."""
    out = Path(out)
    where = out.resolve()
    if out.exists() and not out.is_dir():
        raise PrunewiseError(f"out: {out} is a file; a run is saved as a folder: choose another path")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise PrunewiseError(f"out: {out} already exists; choose another folder or pass --overwrite")
        cwd = Path.cwd().resolve()
        if where == cwd or where in cwd.parents:
            raise PrunewiseError(
                f"out: {out} is the current folder or holds it; --overwrite would replace it: "
                "choose a folder of its own"
            )
        for kept in protect:
            if kept is None:
                continue
            kept = Path(kept).resolve()
            if where == kept or where in kept.parents:
                raise PrunewiseError(
                    f"out: {out} holds {kept}, which this run reads; --overwrite would replace "
                    "it: choose another folder"
                )
    _check_creatable(out)


def _check_creatable(out: Path) -> None:
    """That a folder can be made where ``out`` goes: its nearest existing ancestor is a writable folder."""
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PrunewiseError(f"out: cannot create {out}: {parent} is a file")
    try:
        tempfile.TemporaryDirectory(dir=parent, prefix=".prunewise-check-").cleanup()
    except OSError as exc:
        raise PrunewiseError(f"out: cannot create {out} in {parent}: {exc.strerror or exc}") from None


def save_run(
    model: nn.Module, tokenizer, out: Path, record: RunRecord, overwrite: bool = False, format: str = "safetensors"
) -> Path:
    """The checkpoint in ``format`` (:data:`prunewise.run.export.EXPORTERS`) and ``pruning.json``, all or
    nothing: written beside ``out`` and renamed into place (an old ``out`` is removed only after)."""
    out = Path(out)
    exporter = EXPORTERS.get(format)
    check_output_dir(out, overwrite, ((record.source or {}).get("path"),))
    record.output = {"format": exporter.name, "path": str(out.resolve())}
    with atomic_folder(out, replace=overwrite) as tmp:
        exporter.fn(model, tokenizer, tmp)
        record.write(tmp / RECORD)
    stream = stream_of(model)
    if stream is not None and stream.current.folder == tmp:  # a streamed model's checkpoint now lives in out
        stream.point(out, owned=False)
    return out
