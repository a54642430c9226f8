"""The run record: what one pruning run did, as ``pruning.json`` and as a sweep's result line.

One typed, versioned shape, written by :func:`prunewise.run.pipeline.run` (``pruning.json`` next to
the checkpoint) and by :func:`prunewise.sweep.runner.run_sweep` (one line of ``results.jsonl`` per run:
the record without its per-layer lists, plus the line's key and status), and read by the CLI, the
report and ``prunewise eval``. Sections:

| field | what |
|---|---|
| ``config`` | the full :class:`~prunewise.config.PruneConfig` |
| ``source`` | where the model came from (``kind``, ``path``) |
| ``versions`` | prunewise, torch, transformers, python, platform, threads |
| ``allocation`` | allocator, per-block targets, wall time; a driver's ``search`` / ``rounds`` |
| ``pruning`` | calibration tokens, target, achieved sparsity, mask SHA-256, timings, per-layer counts |
| ``dense``, ``pruned`` | perplexity with its protocol (data, split, seqlen, windows, tokens) |
| ``zero_shot`` | ``{"dense": ..., "pruned": ...}`` lm-eval results |
| ``timings``, ``wall_s``, ``memory`` | seconds of each part (load, plan, dense evaluation, ...), the run, peak memory |
| ``output`` | the exporter (``--format``) and folder, when the run was saved |
| ``evaluations`` | every later ``prunewise eval`` of the run folder, appended: when, perplexity, zero-shot |

``schema`` is :data:`SCHEMA`. Records without one are schema 1 (prunewise 0.1 before this
module); their sweep lines held the pruned perplexity under ``ppl`` and the mask digest, target
and sparsity at the top level, and are read into the same shape.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PruneConfig
from ..errors import ConfigError, PrunewiseError
from ..storage.atomic import atomic_write_text

SCHEMA = 2
RECORD = "pruning.json"
PPL_PROTOCOL = ("data", "split", "seqlen", "tokens")  # what makes two perplexities comparable


@dataclass
class RunRecord:
    config: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    allocation: dict[str, Any] | None = None
    pruning: dict[str, Any] | None = None
    dense: dict[str, Any] | None = None
    pruned: dict[str, Any] | None = None
    zero_shot: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    wall_s: float | None = None
    memory: dict[str, float] | None = None
    output: dict[str, Any] | None = None  # exporter and folder, when saved
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # later `prunewise eval`s, appended
    schema: int = SCHEMA

    # -- views ---------------------------------------------------------------------------------
    @property
    def target(self) -> float | None:
        return (self.pruning or {}).get("target")

    @property
    def sparsity(self) -> float | None:
        return (self.pruning or {}).get("sparsity")

    @property
    def mask_sha256(self) -> str | None:
        return (self.pruning or {}).get("mask_sha256")

    @property
    def blocks(self) -> list[float]:
        return (self.allocation or {}).get("blocks", [])

    @property
    def search(self) -> dict | None:
        return (self.allocation or {}).get("search")

    def reusable(self, which: str, protocol: dict[str, Any]) -> dict[str, Any] | None:
        """The recorded ``dense`` or ``pruned`` perplexity if it was measured with ``protocol``
        (data, split, seqlen, tokens), else None."""
        entry = getattr(self, which)
        if entry and all(entry.get(k) == protocol.get(k) for k in PPL_PROTOCOL):
            return entry
        return None

    def reusable_zero_shot(
        self, which: str, tasks: str | None, limit: float | None, include_path: str | None
    ) -> dict[str, Any] | None:
        """The recorded zero-shot results of ``which`` if they were measured on the same tasks."""
        entry = self.zero_shot.get(which)
        cfg = self.config
        if (
            entry
            and cfg.get("tasks") == tasks
            and cfg.get("limit") == limit
            and cfg.get("include_path") == include_path
        ):
            return entry
        return None

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every section that holds something, ``schema`` first."""
        out: dict[str, Any] = {"schema": self.schema}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "schema" and value not in (None, {}, []):
                out[f.name] = value
        return out

    def summary(self) -> dict[str, Any]:
        """:meth:`to_dict` without the per-layer lists (what a sweep line holds)."""
        out = self.to_dict()
        for section in ("allocation", "pruning"):
            if section in out:
                out[section] = {k: v for k, v in out[section].items() if k != "layers"}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """A record from :meth:`to_dict`, a sweep line, or a schema-1 record or line."""
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise PrunewiseError("record: not a prunewise run record (no 'config' section)")
        data = dict(data)
        schema = data.get("schema", 1)
        if not isinstance(schema, int) or schema > SCHEMA:
            raise PrunewiseError(
                f"record: schema {schema!r} is newer than this prunewise reads ({SCHEMA}); upgrade prunewise"
            )
        if schema == 1 and "key" in data:  # a schema-1 sweep line
            data["pruned"] = data.pop("ppl", None)
            data["zero_shot"] = {"pruned": data["zero_shot"]} if data.get("zero_shot") else {}
            data["pruning"] = {k: data.pop(k) for k in ("target", "sparsity", "mask_sha256") if k in data}
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        known["schema"] = SCHEMA
        known["zero_shot"] = known.get("zero_shot") or {}
        known["timings"] = known.get("timings") or {}
        _check_types(known)
        return cls(**known)

    def write(self, path: Path) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, path: Path, strict: bool = False) -> RunRecord:
        """The record at ``path`` (a ``pruning.json`` or the run folder holding it); ``strict``
        refuses top-level fields a record does not have (a hand-written ``--config``)."""
        path = Path(path)
        if path.is_dir():
            path = path / RECORD
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise PrunewiseError(f"config: no run record at {path}") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PrunewiseError(f"config: cannot read {path}: {exc}") from None
        if strict and isinstance(data, dict):
            names = {f.name for f in dataclasses.fields(cls)} | {"schema"}
            unknown = sorted(set(data) - names)
            if unknown:
                raise PrunewiseError(
                    f"config: {path}: unknown top-level field(s) {', '.join(unknown)} "
                    f"(a run record has: {', '.join(sorted(names))})"
                )
        try:
            return cls.from_dict(data)
        except PrunewiseError as exc:
            raise PrunewiseError(f"config: {path}: {exc}") from None


_NUMBER = (int, float)
# section -> the type it must have (None: may be null); then fields within sections that readers use
_SECTIONS = {
    "config": dict,
    "source": dict,
    "versions": dict,
    "allocation": (dict, None),
    "pruning": (dict, None),
    "dense": (dict, None),
    "pruned": (dict, None),
    "zero_shot": dict,
    "timings": dict,
    "wall_s": (*_NUMBER, None),
    "memory": (dict, None),
    "output": (dict, None),
    "evaluations": list,
}
_FIELDS = {
    ("pruning", "sparsity"): _NUMBER,
    ("pruning", "target"): _NUMBER,
    ("pruning", "mask_sha256"): str,
    ("pruning", "layers"): list,
    ("pruning", "calib_tokens"): int,
    ("allocation", "blocks"): list,
    ("allocation", "search"): (dict, None),
    ("dense", "ppl"): _NUMBER,
    ("pruned", "ppl"): _NUMBER,
    ("dense", "seqlen"): int,
    ("pruned", "seqlen"): int,
    ("dense", "tokens"): int,
    ("pruned", "tokens"): int,
    ("memory", "peak_rss_gb"): _NUMBER,
}
_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number", None: "null"}


def _is(value: Any, kinds: Any) -> bool:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return any(
        value is None if k is None else isinstance(value, k) and not (k in (int, float) and isinstance(value, bool))
        for k in kinds
    )


def _wrong(field: str, kinds: Any, value: Any) -> PrunewiseError:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    want = " or ".join(dict.fromkeys(_NAMES[k] for k in kinds))
    return PrunewiseError(f"record: field {field}: must be {want}, got {json.dumps(value)[:60]}")


def _check_types(data: dict[str, Any]) -> None:
    """Refuse a record whose sections or the fields readers use have the wrong type (one line naming
    the field), rather than failing later where it is read."""
    for section, kinds in _SECTIONS.items():
        if section in data and not _is(data[section], kinds):
            raise _wrong(section, kinds, data[section])
    for (section, key), kinds in _FIELDS.items():
        part = data.get(section)
        if isinstance(part, dict) and key in part and not _is(part[key], kinds):
            raise _wrong(f"{section}.{key}", kinds, part[key])
    for key, value in data["timings"].items():
        if not _is(value, _NUMBER):
            raise _wrong(f"timings.{key}", _NUMBER, value)
    try:
        PruneConfig.check_types(data["config"])
    except ConfigError as exc:
        raise PrunewiseError(f"record: field config.{exc}") from None
