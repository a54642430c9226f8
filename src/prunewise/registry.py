"""Named registries of metrics and allocators, with "did you mean" errors.

A method is a plain function. Its hyper-parameters are its keyword-only arguments with defaults,
so ``registry.get("sparsegpt").hyperparameters()`` lists them and a spec such as
``"sparsegpt:blocksize=64"`` is checked against them before any work starts.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


def parse_value(text: str) -> Any:
    """Parse one ``key=value`` value: bool, int, float, or the string itself."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_spec(spec: str, what: str = "method") -> tuple[str, dict[str, Any]]:
    """Split ``"name:key=value,key=value"`` into ``("name", {key: value})``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{what}: empty specification")
    name, _, rest = spec.strip().partition(":")
    params: dict[str, Any] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"{what}: cannot parse '{item}' in '{spec}'; expected name:key=value,key=value")
            params[key.strip()] = parse_value(value)
    return name.strip().lower(), params


def suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def number_or_auto(owner: str, key: str, value: Any, auto: Callable[[], float]) -> float:
    """A hyper-parameter given as a number or ``'auto'`` (then ``auto()``, a default that depends on
    the target); any other string is an error naming ``owner`` and ``key``."""
    if isinstance(value, str):
        if value != "auto":
            raise ConfigError(f"{owner}: {key} must be a number or 'auto', got '{value}'")
        return auto()
    return value


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric hyper-parameter: bounds (open or closed), checked when a spec
    is bound, before any work. ``Range(gt=0)``, ``Range(ge=0, le=0.5)``."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def holds(self, v: float) -> bool:
        return not (
            (self.gt is not None and not v > self.gt)
            or (self.ge is not None and not v >= self.ge)
            or (self.lt is not None and not v < self.lt)
            or (self.le is not None and not v <= self.le)
        )

    def __str__(self) -> str:
        lo = f"({self.gt:g}" if self.gt is not None else f"[{self.ge:g}" if self.ge is not None else "(-inf"
        hi = f"{self.lt:g})" if self.lt is not None else f"{self.le:g}]" if self.le is not None else "inf)"
        return f"{lo}, {hi}"


@dataclass(frozen=True)
class Entry:
    """One registered method, with typed registration fields (a misspelt field is a ``TypeError``
        at registration, never a silent default). Fields that do not apply to a registry keep their
        defaults.

        Every registry: ``rank`` (the papers' order in tables; baselines first), ``ranges`` and
        ``choices`` (the rules of the hyper-parameters' values, checked by :meth:`check`).
        Metrics: ``kind`` (``score`` or ``solver``), ``group`` (the comparison group of unstructured
        masks: ``row``, ``matrix``, ``block``), ``grad_options`` (the options of the ``grad``
        statistic its hyper-parameters ask for), ``beats`` (the metrics its paper reports beating, which
    reports check). Allocators: ``nm`` (works with N:M patterns),
        ``baseline`` (the allocation others are compared against: uniform), ``needs_for`` (needs that
        depend on the bound hyper-parameters and the metric), ``driver_for`` (the driver that prunes
        trial models, for these hyper-parameters, or None), ``driver_cost`` (its dry-run preview) and
        ``check_pattern`` (``fn(bound params, pattern)``: raises when the settings do not fit the
        run's pattern, checked with the config, before any work).
        Statistics: ``calibration`` (computed from calibration data) and ``cost`` (its dry-run preview).
    """

    name: str
    fn: Callable[..., Any]
    category: str  # the registry: "metric", "allocator", "statistic", "format"
    summary: str
    paper: str = ""
    needs: tuple[str, ...] = ()
    rank: int | None = None
    ranges: Mapping[str, Range] = field(default_factory=dict)
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    kind: str = "score"
    group: str = "row"
    grad_options: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    beats: tuple[str, ...] = ()
    nm: bool = False
    baseline: bool = False
    needs_for: Callable[[dict[str, Any], str], tuple[str, ...]] | None = None
    driver_for: Callable[[dict[str, Any]], Callable[..., Any] | None] | None = None
    driver_cost: Callable[..., Any] | None = None
    check_pattern: Callable[[dict[str, Any], Any], None] | None = None
    calibration: bool = False
    cost: Callable[..., Any] | None = None

    @property
    def solver(self) -> bool:
        """A metric that chooses its own mask while updating the weights (SparseGPT)."""
        return self.kind == "solver"

    def hyperparameters(self) -> dict[str, Any]:
        sig = inspect.signature(self.fn)
        return {
            p.name: p.default
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
        }

    def bind(self, params: dict[str, Any]) -> dict[str, Any]:
        """Check ``params`` against the hyper-parameters; return the full, typed set."""
        hyper = self.hyperparameters()
        out = dict(hyper)
        for key, value in params.items():
            if key not in hyper:
                known = ", ".join(sorted(hyper)) or "none"
                raise ConfigError(
                    f"{self.category}: '{self.name}' has no hyper-parameter '{key}'"
                    f"{suggest(key, list(hyper))} (it takes: {known})"
                )
            default = hyper[key]
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"{self.category}: {self.name}.{key} must be true or false, got {value!r}")
            elif isinstance(default, int) and not isinstance(value, bool):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                if not isinstance(value, int):
                    raise ConfigError(f"{self.category}: {self.name}.{key} must be an integer, got {value!r}")
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{self.category}: {self.name}.{key} must be a number, got {value!r}")
                value = float(value)
            out[key] = value
        self.check(out)
        return out

    def check(self, params: dict[str, Any]) -> None:
        """The values' own rules, declared at registration: ``ranges={key: Range}`` for numbers
        (which must also be finite), ``choices={key: (...)}`` for words."""
        ranges, choices = self.ranges, self.choices
        for key, value in params.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{self.category}: {self.name}.{key} must be a finite number, got {value!r}")
            if (
                key in ranges
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
                and not ranges[key].holds(value)
            ):
                raise ConfigError(f"{self.category}: {self.name}.{key} must be in {ranges[key]}, got {value!r}")
            if key in choices and isinstance(value, str) and value not in choices[key]:
                raise ConfigError(
                    f"{self.category}: {self.name}.{key} must be one of {', '.join(choices[key])}, "
                    f"got '{value}'{suggest(value, list(choices[key]))}"
                )


class Registry:
    """A name -> :class:`Entry` table for one kind of method."""

    def __init__(self, category: str):
        self.category = category
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, summary: str, paper: str = "", needs: tuple[str, ...] = (), **fields: Any):
        """Register a function under ``name``; ``fields`` are :class:`Entry`'s typed fields."""

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.category} '{name}' is registered twice")
            self._entries[name] = Entry(name, fn, self.category, summary, paper, tuple(needs), **fields)
            return fn

        return decorator

    def get(self, name: str) -> Entry:
        key = name.strip().lower()
        if key not in self._entries:
            raise ConfigError(
                f"{self.category}: unknown {self.category} '{name}'{suggest(key, self.names())}"
                f" (choices: {', '.join(self.names())})"
            )
        return self._entries[key]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self):
        """Entries in the registry's order: by ``rank`` (the papers' order: baselines first), then name."""
        return iter(
            sorted(self._entries.values(), key=lambda e: (len(self._entries) if e.rank is None else e.rank, e.name))
        )

    def __contains__(self, name: str) -> bool:
        return name.strip().lower() in self._entries

    def first(self, predicate: Callable[[Entry], bool]) -> Entry:
        """The first entry in the registry's order for which ``predicate`` holds."""
        for entry in self:
            if predicate(entry):
                return entry
        raise ConfigError(f"{self.category}: none registered fits")


METRICS = Registry("metric")
ALLOCATORS = Registry("allocator")
