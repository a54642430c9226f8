"""On-disk cache for statistics that are expensive to compute: keyed by content, never by a path.

A key is a SHA-256 of what the statistic depends on (weight bytes, calibration token ids, the
options that change the numbers), so any later run, allocator search or sweep over the same
weights and data pays once, and changed weights never reuse a stale entry.

Entries are safetensors files (tensors only: nothing in them can run code) whose metadata holds
the kind, the key and a SHA-256 of the tensors. A file that cannot be read, or whose kind, key or
checksum does not match (truncated, corrupt, swapped for another entry), is reported once by name
and recomputed. Files are written to a temporary sibling and renamed (:mod:`prunewise.storage.atomic`), so
a killed run never leaves a truncated entry and two runs writing one entry at once both succeed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import ConfigError
from .atomic import atomic_write
from .shards import SINGLE, ShardWriter, TensorFile, read_file_header

log = logging.getLogger(__name__)

FORMAT = "prunewise-cache/1"
_SINGLE = "__value__"  # the one tensor of an entry that is a tensor, not a {name: tensor} dict


def hash_tensor(h: Any, tensor: torch.Tensor) -> None:
    """Fold ``tensor``'s dtype, shape and bytes into the hash ``h`` (in place, not copied)."""
    t = tensor.detach().cpu().contiguous()
    h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
    flat = t.reshape(-1)  # 0-dim tensors (scalar buffers) cannot be viewed as bytes directly
    h.update((flat.view(torch.uint8) if t.dtype != torch.bool else flat).numpy())  # hashed in place, not copied


def fingerprint(*tensors: torch.Tensor, extra: str = "") -> str:
    """SHA-256 over the dtype, shape and bytes of ``tensors``, plus ``extra``."""
    h = hashlib.sha256(extra.encode())
    for t in tensors:
        hash_tensor(h, t)
    return h.hexdigest()


def entry(cache_dir: Path | None, kind: str, key: str) -> Path:
    """Where :func:`cached` keeps ``kind``/``key``."""
    return resolve_cache_dir(cache_dir) / kind / f"{key}.safetensors"


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        hash_tensor(h, tensors[name])
    return h.hexdigest()


def _read(path: Path, kind: str, key: str) -> Any:
    """The value stored at ``path``, or None (with one warning naming the file) when it is unusable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:
        log.warning("cache entry %s cannot be read (%s); computing it again", path, str(exc).splitlines()[0][:120])
        return None
    expected = {"format": FORMAT, "kind": kind, "key": key, "sha256": _checksum(tensors)}
    wrong = [k for k, v in expected.items() if meta.get(k) != v]
    if wrong:
        log.warning("cache entry %s does not match its %s; computing it again", path, " and ".join(wrong))
        return None
    return tensors[_SINGLE] if meta.get("layout") == "tensor" else tensors


def _write(path: Path, kind: str, key: str, value: Any) -> None:
    single = isinstance(value, torch.Tensor)
    if not single and not (isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())):
        raise TypeError(f"cache '{kind}' stores a tensor or a dict of tensors, not {type(value).__name__}")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in ({_SINGLE: value} if single else value).items()}
    meta = {
        "format": FORMAT,
        "kind": kind,
        "key": key,
        "layout": "tensor" if single else "dict",
        "sha256": _checksum(tensors),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def cached_lazy(
    cache_dir: Path | None,
    kind: str,
    key: str,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    fill: Callable[[Callable[[str, torch.Tensor], None]], None],
) -> Mapping[str, torch.Tensor]:
    """:func:`cached` for a dict of tensors too large to hold at once (a streamed model's gradient
    statistics): ``fill(put)`` calls ``put(name, tensor)`` for every tensor of ``specs`` as it is
    computed, in any order, into a file laid out up front; the entry is then read one tensor at a
    time when used. Its checksum is computed from the file once written (one tensor at a time);
    reading it back checks kind, key and size, not the checksum, which would read it whole."""
    path = entry(cache_dir, kind, key)
    if path.is_file():
        try:
            _, meta = read_file_header(path)
            if all(meta.get(k) == v for k, v in (("format", FORMAT), ("kind", kind), ("key", key))):
                return TensorFile(path)
            log.warning("cache entry %s does not match its kind or key; computing it again", path)
        except Exception as exc:
            log.warning("cache entry %s cannot be read (%s); computing it again", path, str(exc).splitlines()[0][:120])
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-"))
    try:
        placeholder = "0" * 64
        writer = ShardWriter(
            folder,
            specs,
            max_shard_bytes=1 << 62,
            metadata={"format": FORMAT, "kind": kind, "key": key, "layout": "dict", "sha256": placeholder},
        )
        try:
            fill(writer.put)
        finally:
            writer.abort()
        writer.close()
        written = folder / SINGLE
        lazy = TensorFile(written)
        h = hashlib.sha256()
        for name in sorted(lazy):
            h.update(name.encode())
            hash_tensor(h, lazy[name])
        with open(written, "r+b") as fh:  # the checksum goes where its placeholder is, same length
            head = fh.read(1 << 20)
            at = head.index(f'"sha256":"{placeholder}"'.encode()) + len('"sha256":"')
            fh.seek(at)
            fh.write(h.hexdigest().encode())
        os.replace(written, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return TensorFile(path)


def cached(cache_dir: Path | None, kind: str, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` (a tensor or a ``{name: tensor}`` dict), stored as
    ``<cache_dir>/<kind>/<key>.safetensors``; read from there when present and intact.
    ``cache_dir=None`` is the default cache (:func:`resolve_cache_dir`), as everywhere."""
    path = entry(cache_dir, kind, key)
    if path.is_file():
        value = _read(path, kind, key)
        if value is not None:
            return value
    value = compute()
    _write(path, kind, key, value)
    return value


def default_cache_dir() -> Path:
    env = os.environ.get("PRUNEWISE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prunewise"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """The cache folder to use: ``cache_dir`` if given, else :func:`default_cache_dir`."""
    path = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"cache_dir: {path} is a file, not a folder")
    return path
