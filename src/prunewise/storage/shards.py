"""Safetensors files read and written a tensor at a time: headers, plain reads at offsets (no
mapping of the file), and :class:`ShardWriter`, which lays every shard out up front and takes the
tensors in any order. The streamed model (:mod:`prunewise.model.streaming`) and the statistic
cache (:mod:`prunewise.storage.cache`) both read and write through here.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PrunewiseError

ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


INDEX = "model.safetensors.index.json"


SINGLE = "model.safetensors"


SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in ``file``
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file: dtype, shape and where its bytes are."""
    return read_file_header(path)[0]


def read_file_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """:func:`read_header` and the file's metadata."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 1 << 28:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise PrunewiseError(f"cannot read the safetensors file {path}: {exc}") from None
    meta = header.pop("__metadata__", None) or {}
    size = os.stat(path).st_size
    out = {}
    for name, h in header.items():
        if not isinstance(h, dict) or h.get("dtype") not in ST_DTYPES:
            dtype = h.get("dtype") if isinstance(h, dict) else h
            raise PrunewiseError(f"{path}: tensor {name} has dtype {dtype}, which prunewise cannot stream")
        try:
            begin, end = (int(v) for v in h["data_offsets"])
            shape = tuple(int(d) for d in h["shape"])
        except (KeyError, TypeError, ValueError):
            raise PrunewiseError(f"{path}: the header of tensor {name} has no valid shape and offsets") from None
        dtype = ST_DTYPES[h["dtype"]]
        want = _numel(shape) * _itemsize(dtype)
        if end - begin != want or begin < 0 or any(d < 0 for d in shape) or 8 + n + end > size:
            raise PrunewiseError(
                f"{path}: the header of tensor {name} does not match its data ({h['dtype']} {list(shape)} is {want} "
                f"bytes; the header gives bytes {begin} to {end} of a {size - 8 - n}-byte data section): the file is "
                "damaged"
            )
        out[name] = TensorInfo(path, dtype, shape, 8 + n + begin, end - begin)
    return out, meta


class Checkpoint:
    """A safetensors checkpoint folder (one ``model.safetensors`` or an index and its shards)."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.folder / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise PrunewiseError(
                f"cannot stream {self.folder}: it holds no safetensors weights ({SINGLE} or {INDEX}); "
                "convert it with save_pretrained, or load it whole with --stream off"
            )
        self.tensors: dict[str, TensorInfo] = {}
        self.identity: dict[Path, tuple[int, int, int]] = {}  # each shard as opened: inode, size, mtime
        for f in files:
            self.identity[self.folder / f] = _identity(os.stat(self.folder / f))
            self.tensors.update(read_header(self.folder / f))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def shard_bytes(self) -> int:
        """The size of its largest shard when it has several (what output shards are cut at), else the default."""
        sizes: dict[Path, int] = {}
        for t in self.tensors.values():
            sizes[t.file] = sizes.get(t.file, 0) + t.nbytes
        return max(sizes.values()) if len(sizes) > 1 else SHARD_BYTES

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read into fresh memory (no mapping of the file); a shard that is no longer
        the file this checkpoint opened (replaced, rewritten, truncated) is refused, naming it."""
        info = self.tensors[name]
        return read_tensor(name, info, self.identity[info.file])


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


def read_tensor(name: str, info: TensorInfo, identity: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Tensor ``name`` from its file; with ``identity`` (inode, size, mtime when the file was first
    opened) a file that changed since is refused: what would be read mixes two checkpoints."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with open(info.file, "rb", buffering=0) as fh:
        if identity is not None and _identity(os.fstat(fh.fileno())) != identity:
            raise PrunewiseError(
                f"{info.file} changed on disk during the run (replaced or rewritten since it was opened): what "
                "is read now would mix two versions of the model; rerun when the checkpoint stays put"
            )
        fh.seek(info.start)
        got = 0
        while got < info.nbytes:
            n = fh.readinto(view[got:])
            if not n:
                raise PrunewiseError(f"{info.file} is truncated (tensor {name})")
            got += n
    return buf.view(info.dtype).reshape(info.shape)


class TensorFile(Mapping):
    """``{name: tensor}`` of one safetensors file, each tensor read when asked for."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.infos = read_header(self.path)
        end = max((i.start + i.nbytes for i in self.infos.values()), default=0)
        if self.path.stat().st_size < end:
            raise PrunewiseError(f"{self.path} is truncated")

    def __getitem__(self, name: str) -> torch.Tensor:
        return read_tensor(name, self.infos[name])

    def __iter__(self):
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)


class ShardWriter:
    """A safetensors checkpoint written as its tensors arrive, in any order.

    ``specs`` lists every tensor (name, dtype, shape) in checkpoint order; shards are cut at
    ``max_shard_bytes``. Each shard's header is written when the writer opens, each tensor at its
    offset by :meth:`put`; :meth:`close` checks that every tensor arrived and writes the index."""

    def __init__(
        self,
        folder: Path,
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int = SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, dtype, shape in specs:
            nbytes = _numel(shape) * _itemsize(dtype)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, shape, nbytes))
            size += nbytes
        self.files = (
            [SINGLE]
            if len(shards) == 1
            else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        )
        self.where: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        self.handles = []
        self.total = 0
        for k, shard in enumerate(shards):
            header, offset = {}, 0
            for name, dtype, shape, nbytes in shard:
                header[name] = {
                    "dtype": ST_NAMES[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
            header["__metadata__"] = {"format": "pt", **(metadata or {})}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            fh = open(self.folder / self.files[k], "wb")
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + offset)
            self.handles.append(fh)
            base = 8 + len(raw)
            for name, dtype, shape, _ in shard:
                begin = header[name]["data_offsets"][0]
                self.where[name] = (k, base + begin, dtype, tuple(shape))
            self.total += offset
        self.pending = set(self.where)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        k, offset, dtype, shape = self.where[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise PrunewiseError(
                f"internal: {name} arrived as {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        fh = self.handles[k]
        fh.seek(offset)
        fh.write(memoryview(data))
        self.pending.discard(name)

    def close(self) -> None:
        for fh in self.handles:
            fh.close()
        if self.pending:
            raise PrunewiseError(
                f"internal: {len(self.pending)} tensors were never written (first: {sorted(self.pending)[0]})"
            )
        if len(self.files) > 1:
            weight_map = {name: self.files[k] for name, (k, *_) in self.where.items()}
            (self.folder / INDEX).write_text(
                json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2)
            )

    def abort(self) -> None:
        """Close every shard file, whatever closing raises (a full disk fails again on close); the
        caller removes the folder."""
        for fh in self.handles:
            with contextlib.suppress(OSError):
                fh.close()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
