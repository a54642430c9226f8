"""The compressed sparse checkpoint (``--format sparse``): safetensors shards where every matrix that
is smaller packed is stored as its values and bitmask (:mod:`prunewise.sparse.bitmask`).

A folder holds what a dense checkpoint holds (``model.safetensors`` or an index and shards, the
config, generation config and tokenizer) plus ``sparse.json``, which marks it and lists each packed
tensor with its shape, dtype and number of stored values. In the shards a packed tensor ``K`` is two
tensors, ``K::values`` (1-D, its dtype) and ``K::bitmask`` (``uint8 [rows, ceil(cols / 8)]``); every
other tensor is stored as it is under its own name. Names are the model's ``state_dict`` keys
(tied copies once). A matrix is packed when its packed form is smaller, so the embeddings and
``lm_head`` (no zeros) stay dense and nothing needs to know which layers were pruned.

Shards are written in order by :class:`ShardSequence` (a tensor's packed size is known only once
it is packed, so headers cannot be laid out up front): each shard's data goes to a temporary file,
its header is written when it is full and the data copied behind it. Memory holds one tensor at a
time, so a streamed run compresses its checkpoint one tensor at a time too.

:func:`read_sparse` gives the tensors back (dense ones as tensors, packed ones as
:class:`Packed`); loading into a model is :func:`prunewise.model.loading.load_sparse`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PrunewiseError
from ..storage.shards import INDEX, SHARD_BYTES, SINGLE, ST_DTYPES, ST_NAMES, TensorFile
from . import bitmask, kernel

SPARSE_FILE = "sparse.json"

FORMAT = "prunewise-bitmask"

VERSION = 1

VALUES, MASK = "::values", "::bitmask"


@dataclass
class Packed:
    """A packed tensor as stored: ``values`` (unpadded), ``mask``, the dense ``shape`` and dtype."""

    values: torch.Tensor
    mask: torch.Tensor
    shape: tuple[int, ...]

    def unpack(self) -> torch.Tensor:
        return kernel.unpack(kernel.padded(self.values), self.mask, bitmask.row_offsets(self.mask), self.shape)


class ShardSequence:
    """Safetensors shards written in order, cut before a tensor that would take a shard over
    ``max_shard_bytes``; named like ``save_pretrained``'s (one ``model.safetensors``, or
    ``model-0000k-of-0000n.safetensors`` and the index) when :meth:`close` knows how many."""

    def __init__(self, folder: Path, max_shard_bytes: int = SHARD_BYTES, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.max = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards: list[tuple[dict, Path]] = []
        self.total = 0
        self._fh = None

    def _new(self) -> None:
        if self._fh is not None:
            self._fh.close()
        path = self.folder / f".shard-{len(self.shards)}.data"
        self.shards.append(({}, path))
        self._fh = open(path, "wb")
        self._size = 0

    def put(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if self._fh is None or (self._size and self._size + data.nbytes > self.max):
            self._new()
        header = self.shards[-1][0]
        header[name] = {
            "dtype": ST_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._size, self._size + data.nbytes],
        }
        self._fh.write(memoryview(data))
        self._size += data.nbytes
        self.total += data.nbytes

    def close(self) -> list[str]:
        """Write the shards (and the index when several); returns their file names."""
        if self._fh is None:
            self._new()
        self._fh.close()
        n = len(self.shards)
        names = [SINGLE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        weight_map = {}
        for (header, data), name in zip(self.shards, names):
            raw = json.dumps({**header, "__metadata__": self.metadata}, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            with open(self.folder / name, "wb") as out, open(data, "rb") as src:
                out.write(struct.pack("<Q", len(raw)) + raw)
                shutil.copyfileobj(src, out, 1 << 24)
            os.unlink(data)
            weight_map.update({tensor: name for tensor in header})
        if n > 1:
            (self.folder / INDEX).write_text(
                json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2)
            )
        return names

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
        for _, data in self.shards:
            data.unlink(missing_ok=True)


def write_sparse(
    folder: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    pack: Callable[[str, torch.Tensor], bool] = lambda _, t: bitmask.worth_packing(t),
    max_shard_bytes: int = SHARD_BYTES,
) -> dict:
    """Write ``tensors`` (``(state key, tensor)``, one at a time) into ``folder``, packing those
    ``pack`` accepts; writes ``sparse.json`` and returns its content."""
    folder = Path(folder)
    shards = ShardSequence(folder, max_shard_bytes, {"prunewise": FORMAT})
    packed: dict[str, dict] = {}
    dense_bytes = 0
    try:
        for key, t in tensors:
            dense_bytes += t.numel() * t.element_size()
            if pack(key, t):
                values, mask = bitmask.pack(t)
                shards.put(key + VALUES, values)
                shards.put(key + MASK, mask)
                packed[key] = {"shape": list(t.shape), "dtype": ST_NAMES[t.dtype], "nnz": values.numel()}
            else:
                shards.put(key, t)
        shards.close()
    except BaseException:
        shards.abort()
        raise
    spec = {
        "format": FORMAT,
        "version": VERSION,
        "encoding": "values row-major + bitmask uint8 [rows, ceil(cols/8)], least significant bit first",
        "dense_bytes": dense_bytes,
        "stored_bytes": shards.total,
        "tensors": packed,
    }
    (folder / SPARSE_FILE).write_text(json.dumps(spec, indent=1), encoding="utf-8")
    return spec


def is_sparse(folder: Path | str) -> bool:
    return (Path(folder) / SPARSE_FILE).is_file()


def read_spec(folder: Path | str) -> dict:
    path = Path(folder) / SPARSE_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PrunewiseError(f"cannot read {path}: {exc}") from None
    if spec.get("format") != FORMAT or spec.get("version") != VERSION:
        raise PrunewiseError(
            f"{path}: format {spec.get('format')} version {spec.get('version')}; this prunewise reads "
            f"{FORMAT} version {VERSION}"
        )
    return spec


def shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / SINGLE]


def read_sparse(folder: Path | str) -> Iterator[tuple[str, torch.Tensor | Packed]]:
    """Every tensor of a sparse checkpoint, one at a time: dense ones as tensors, packed as :class:`Packed`."""
    folder = Path(folder)
    spec = read_spec(folder)
    files = {}
    for path in shard_files(folder):
        f = TensorFile(path)
        files.update({name: f for name in f})
    for name, f in files.items():
        if name.endswith(MASK):
            continue
        if not name.endswith(VALUES):
            yield name, f[name]
            continue
        key = name.removesuffix(VALUES)
        info = spec["tensors"].get(key)
        if info is None or key + MASK not in files:
            raise PrunewiseError(f"{folder}: {key} has values but no bitmask or no entry in {SPARSE_FILE}: damaged")
        values, mask = f[name], files[key + MASK][key + MASK]
        shape = tuple(info["shape"])
        rows = 1
        for d in shape[:-1]:
            rows *= d
        stored = int(bitmask.row_offsets(mask)[-1]) if mask.dim() == 2 else -1
        wrong_mask = tuple(mask.shape) != (rows, (shape[-1] + 7) // 8) or stored != values.numel()
        if wrong_mask or values.dtype != ST_DTYPES[info["dtype"]] or values.numel() != info["nnz"]:
            raise PrunewiseError(f"{folder}: the values of {key} do not match its bitmask: the checkpoint is damaged")
        yield key, Packed(values, mask, shape)
