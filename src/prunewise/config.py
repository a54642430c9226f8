"""The configuration of one pruning run: a frozen, validated, serialisable dataclass.

Every field has the papers' default except where noted. :meth:`PruneConfig.validate` raises a
:class:`~prunewise.errors.ConfigError` whose message starts with the field name.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .model.loading import TORCH_DTYPES
from .model.memory import STREAM_CHOICES
from .prune.engine import MODES, PROPAGATE
from .prune.masks import Pattern, parse_pattern
from .registry import ALLOCATORS, METRICS, Entry, parse_spec
from .storage.cache import default_cache_dir, resolve_cache_dir  # noqa: F401  (where runs cache)

DTYPE_CHOICES = ("auto", *TORCH_DTYPES)


def default_device() -> str:
    """``$PRUNEWISE_DEVICE`` (e.g. ``cuda``) or ``cpu``: the device of every run that names none."""
    return os.environ.get("PRUNEWISE_DEVICE", "").strip() or "cpu"


@dataclass(frozen=True)
class PruneConfig:
    """One pruning run.

    ``metric`` and ``allocator`` are specs ``name[:key=value,...]``; ``pattern`` is
    ``unstructured`` (optionally ``:group=row|matrix``) or ``N:M``. ``sparsity`` defaults to 0.5
    for unstructured and to ``N/M`` for N:M. ``mode="two-pass"`` is the papers' protocol
    (statistics from the dense block, calibration set propagated through the pruned block);
    ``"single-pass"`` prunes each linear layer from inputs that already went through the pruned
    layers before it and runs every block once, on the whole calibration set as one batch.
    ``tasks`` (comma-separated lm-eval task names or a preset, ``paper`` / ``atp``) adds zero-shot
    accuracy of the dense and pruned model; ``include_path`` is a folder of local lm-eval task
    YAML files and ``limit`` caps the examples per task (an integer, or a fraction below 1).
    ``stream`` places the model: ``on`` reads each decoder block from the checkpoint when its
    turn comes (:mod:`prunewise.model.streaming`), ``off`` loads it whole, ``auto`` streams when the
    run's estimated memory does not fit (:mod:`prunewise.model.memory`); results are the same.
    """

    model: str = "smollm2-135m"
    metric: str = "wanda"
    allocator: str = "uniform"
    sparsity: float | None = None
    pattern: str = "unstructured"
    calib: str = "wiki"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    mode: str = "two-pass"
    propagate: str = "pruned"
    batch_size: int = 1
    device: str = dataclasses.field(default_factory=lambda: default_device())
    dtype: str = "auto"
    stream: str = "auto"
    blocks_path: str | None = None
    eval_data: str | None = None
    eval_seqlen: int | None = None
    max_tokens: int | None = None
    tasks: str | None = None
    include_path: str | None = None
    limit: float | None = None

    # -- derived views -------------------------------------------------------------------------
    @property
    def pattern_obj(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def target(self) -> float:
        """The global sparsity actually aimed at."""
        pat = self.pattern_obj
        if self.sparsity is None:
            return pat.sparsity if pat.is_nm else 0.5
        return float(self.sparsity)

    @functools.cached_property
    def metric_spec(self) -> tuple[str, dict[str, Any]]:
        """``(name, every hyper-parameter bound and typed)``, parsed once per config."""
        name, params = parse_spec(self.metric, "metric")
        return name, METRICS.get(name).bind(params)

    @property
    def metric_entry(self) -> Entry:
        """The metric's registry entry."""
        return METRICS.get(self.metric_spec[0])

    @functools.cached_property
    def allocator_spec(self) -> tuple[str, dict[str, Any]]:
        """``(name, every hyper-parameter bound and typed)``, parsed once per config."""
        name, params = parse_spec(self.allocator, "allocator")
        return name, ALLOCATORS.get(name).bind(params)

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> PruneConfig:
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{field}: {msg}")

        for field in (
            "model",
            "metric",
            "allocator",
            "pattern",
            "calib",
            "mode",
            "propagate",
            "device",
            "dtype",
            "stream",
        ):
            value = getattr(self, field)
            need(isinstance(value, str), field, f"must be a string, got {value!r}")
        for field in ("blocks_path", "eval_data", "include_path", "tasks"):
            value = getattr(self, field)
            need(value is None or isinstance(value, str), field, f"must be a string or null, got {value!r}")
        need(self.model.strip() != "", "model", "must be a path, hub id or 'smollm2-135m'")
        metric_name, _ = self.metric_spec
        alloc_name, alloc_params = self.allocator_spec
        pat = self.pattern_obj
        if self.sparsity is not None:
            s = self.sparsity
            need(isinstance(s, (int, float)) and not isinstance(s, bool), "sparsity", f"must be a number, got {s!r}")
            need(0.0 <= s < 1.0, "sparsity", f"must be in [0, 1), got {s}")
            if pat.is_nm:
                need(
                    abs(s - pat.sparsity) < 1e-9,
                    "sparsity",
                    f"pattern {pat} fixes the sparsity at {pat.sparsity:g}, got {s}; "
                    "drop --sparsity or change the pattern",
                )
        if pat.group and METRICS.get(metric_name).solver:
            raise ConfigError(f"pattern: '{metric_name}' chooses its own comparison groups; use plain 'unstructured'")
        if pat.is_nm and not ALLOCATORS.get(alloc_name).nm:
            nm = [e.name for e in ALLOCATORS if e.nm]
            raise ConfigError(
                f"allocator: '{alloc_name}' needs an unstructured pattern; with N:M use one of {', '.join(nm)} "
                "(uniform, or mixed N:M per block)"
            )
        check_pattern = ALLOCATORS.get(alloc_name).check_pattern
        if check_pattern is not None:
            check_pattern(alloc_params, pat)
        for field in ("nsamples", "seqlen", "batch_size"):
            value = getattr(self, field)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                field,
                f"must be an integer >= 1, got {value!r}",
            )
        need(self.seqlen >= 2, "seqlen", f"must be at least 2, got {self.seqlen}")
        need(
            isinstance(self.seed, int) and not isinstance(self.seed, bool),
            "seed",
            f"must be an integer, got {self.seed!r}",
        )
        need(self.mode in MODES, "mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        need(self.propagate in PROPAGATE, "propagate", f"must be one of {', '.join(PROPAGATE)}, got {self.propagate!r}")
        need(self.dtype in DTYPE_CHOICES, "dtype", f"must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        need(
            self.stream in STREAM_CHOICES, "stream", f"must be one of {', '.join(STREAM_CHOICES)}, got {self.stream!r}"
        )
        need(
            self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            f"must be 'cpu' or 'cuda[:N]', got {self.device!r}",
        )
        if self.device.startswith("cuda"):
            need(
                torch.cuda.is_available(),
                "device",
                f"'{self.device}' requested but CUDA is not available; use --device cpu",
            )
        if self.mode == "single-pass":
            need(self.propagate == "pruned", "propagate", "single-pass mode always propagates through the pruned block")
        if self.eval_seqlen is not None:
            need(
                isinstance(self.eval_seqlen, int) and self.eval_seqlen >= 2,
                "eval_seqlen",
                f"must be an integer >= 2, got {self.eval_seqlen!r}",
            )
        if self.max_tokens is not None:
            need(
                isinstance(self.max_tokens, int) and self.max_tokens >= 2,
                "max_tokens",
                f"must be an integer >= 2, got {self.max_tokens!r}",
            )
        if self.tasks is not None:
            need(
                isinstance(self.tasks, str) and any(t.strip() for t in self.tasks.split(",")),
                "tasks",
                f"must be comma-separated lm-eval task names, got {self.tasks!r}",
            )
        if self.limit is not None:
            lim = self.limit
            need(
                isinstance(lim, (int, float))
                and not isinstance(lim, bool)
                and lim > 0
                and (lim < 1 or float(lim).is_integer()),
                "limit",
                f"must be a whole number of examples or a fraction in (0, 1), got {lim!r}",
            )
        if self.include_path is not None:
            need(
                Path(self.include_path).expanduser().is_dir(),
                "include_path",
                f"{self.include_path} is not a folder of lm-eval task YAML files",
            )
        return self

    @classmethod
    def check_types(cls, data: dict[str, Any]) -> None:
        """Check that every known field of ``data`` has its declared type (``str``, ``int``,
        ``float``, or null where allowed); raise :class:`ConfigError` naming the first that does not.
        Unknown fields are left to :meth:`from_dict`; values are left to :meth:`validate`."""
        kinds = {"str": (str,), "int": (int,), "float": (int, float), "None": (type(None),)}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            allowed = tuple(t for part in str(f.type).split("|") for t in kinds.get(part.strip(), ()))
            value = data[f.name]
            if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
                words = {"str": "a string", "int": "an integer", "float": "a number", "None": "null"}
                names = " or ".join(words.get(part.strip(), part.strip()) for part in str(f.type).split("|"))
                raise ConfigError(f"{f.name}: must be {names}, got {value!r}")

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"config: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> PruneConfig:
        return dataclasses.replace(self, **changes)
