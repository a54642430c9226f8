"""The grid of a sweep: a :class:`Sweep` holds the fixed settings of every run (a
:class:`~prunewise.config.PruneConfig`) and lists for the four grid axes (metrics, allocators,
sparsities, patterns); :meth:`Sweep.expand` makes the runs, each keyed by a SHA-256 of its full
config (:func:`run_key`)."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PruneConfig
from ..errors import ConfigError, PrunewiseError
from ..prune.masks import parse_pattern
from ..registry import ALLOCATORS, parse_spec

AXES = ("metric", "allocator", "sparsity", "pattern")


# Fields of the dense baseline's key: what changes the dense numbers.
DENSE_FIELDS = (
    "model",
    "dtype",
    "device",
    "batch_size",
    "eval_data",
    "eval_seqlen",
    "seqlen",
    "max_tokens",
    "tasks",
    "include_path",
    "limit",
)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


@dataclass
class Sweep:
    """Fixed settings (``base``) plus lists for the grid axes."""

    base: PruneConfig = field(default_factory=PruneConfig)
    metrics: list[str] = field(default_factory=lambda: ["wanda"])
    allocators: list[str] = field(default_factory=lambda: ["uniform"])
    sparsities: list[float] = field(default_factory=lambda: [0.5])
    patterns: list[str] = field(default_factory=lambda: ["unstructured"])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sweep:
        """Keys of :class:`PruneConfig`; ``metric``, ``allocator``, ``sparsity`` and ``pattern`` take
        a list or one value; ``tasks`` a list or a comma-separated string."""
        data = dict(data)
        axes = {k: _as_list(data.pop(k, None)) for k in AXES}
        if isinstance(data.get("tasks"), (list, tuple)):
            data["tasks"] = ",".join(data["tasks"])
        if "eval_tokens" in data:
            data["max_tokens"] = data.pop("eval_tokens")
        base = PruneConfig.from_dict(data)
        defaults = cls()
        return cls(
            base=base,
            metrics=[str(x) for x in axes["metric"]] or defaults.metrics,
            allocators=[str(x) for x in axes["allocator"]] or defaults.allocators,
            sparsities=[float(x) for x in axes["sparsity"]] or defaults.sparsities,
            patterns=[str(x) for x in axes["pattern"]] or defaults.patterns,
        )

    @classmethod
    def from_toml(cls, path: Path, overrides: dict[str, Any] | None = None) -> Sweep:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PrunewiseError(f"config: no sweep file at {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise PrunewiseError(f"config: {path} is not valid TOML: {exc}") from None
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metrics,
            "allocator": self.allocators,
            "sparsity": self.sparsities,
            "pattern": self.patterns,
            **{k: v for k, v in self.base.to_dict().items() if k not in AXES},
        }

    def expand(self) -> tuple[list[PruneConfig], list[tuple[dict[str, Any], str]]]:
        """The runs in grid order (pattern, sparsity, metric, allocator), and the skipped combinations."""
        runs: list[PruneConfig] = []
        skipped: list[tuple[dict[str, Any], str]] = []
        seen: set[str] = set()
        for pattern in self.patterns:
            is_nm = parse_pattern(pattern).is_nm
            for sparsity, metric, allocator in itertools.product(
                [None] if is_nm else self.sparsities, self.metrics, self.allocators
            ):
                alloc_name, _ = parse_spec(allocator, "allocator")
                if is_nm and not ALLOCATORS.get(alloc_name).nm:
                    skipped.append(
                        (
                            {"metric": metric, "allocator": allocator, "pattern": pattern},
                            f"'{alloc_name}' needs an unstructured pattern",
                        )
                    )
                    continue
                config = self.base.replace(
                    metric=metric, allocator=allocator, sparsity=sparsity, pattern=pattern
                ).validate()
                key = run_key(config)
                if key not in seen:
                    seen.add(key)
                    runs.append(config)
        if not runs:
            raise ConfigError("sweep: the grid has no run that can execute")
        return runs, skipped


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run_key(config: PruneConfig) -> str:
    """16 hex digits of the SHA-256 of the full config: equal configs, equal keys."""
    return _digest(config.to_dict())


def dense_key(config: PruneConfig) -> str:
    return _digest({"dense": {k: getattr(config, k) for k in DENSE_FIELDS}})


def label(config: PruneConfig | dict[str, Any]) -> str:
    c = config if isinstance(config, dict) else config.to_dict()
    target = "" if parse_pattern(c["pattern"]).is_nm else f" {c['sparsity'] if c['sparsity'] is not None else 0.5:g}"
    return f"{c['metric']} / {c['allocator']} / {c['pattern']}{target}"
