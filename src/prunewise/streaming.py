"""Models larger than memory: a weightless skeleton, and decoder blocks read from the checkpoint.

A streamed model is the model's skeleton built on the meta device (no weight allocated), with the
parts outside the decoder blocks (embeddings, final norm, rotary buffers, ``lm_head``) loaded, and
a :class:`Stream` attached that says which safetensors checkpoint holds its block weights. The
model stays the handle every API takes (``prune``, ``plan``, ``perplexity``, ``save_run``); the
block loop asks :func:`prunewise.blocks.make_source` for its source, and for a streamed model that
is a :class:`StreamedSource`:

- block ``i``'s tensors are read from the shards that hold them (the index maps tensor -> shard;
  only the block's own tensors are read, with plain reads at their offsets, so nothing is mapped
  into the process), moved to the device, and set back to meta when the step is done; the next
  block of the walk is read on a background thread while the current one computes;
- pruning "in place" writes each pruned block to a scratch checkpoint as it finishes
  (:meth:`StreamedSource.rewriting`); at the end the model streams from that checkpoint, which
  saving moves into the output folder (a rename on the same filesystem). Trials and sweeps go
  back to the dense checkpoint with :meth:`Stream.restore`: no dense copy is kept in memory;
- a single weight (AlphaPruning's spectra, OWL's and MRP's scores) is read on its own when asked
  for (:meth:`StreamedSource.weight`), and the model's fingerprint hashes every tensor as it is
  read, equal to the fingerprint of the same checkpoint loaded whole.

Output shards are written by :class:`ShardWriter`: every tensor's name, dtype and shape are known
before the first block is pruned, so each shard's header is written up front and each tensor is
written at its offset when it arrives. The result is an ordinary safetensors checkpoint (index,
shards, config, tokenizer) that loads with ``AutoModelForCausalLM.from_pretrained``, in the
dtype the model was loaded in (a bf16 checkpoint stays bf16).

A checkpoint whose tensor names are not the model's (transformers renames or fuses some when it
loads them whole) is refused up front, naming a missing tensor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .blocks import BlockSource
from .errors import PrunewiseError
from .experts import ExpertLinear, routed
from .models import _is_conv1d, find_blocks

log = logging.getLogger(__name__)

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
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
    out = {}
    for name, h in header.items():
        if h["dtype"] not in ST_DTYPES:
            raise PrunewiseError(f"{path}: tensor {name} has dtype {h['dtype']}, which prunewise cannot stream")
        begin, end = h["data_offsets"]
        out[name] = TensorInfo(path, ST_DTYPES[h["dtype"]], tuple(h["shape"]), 8 + n + begin, end - begin)
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
            raise PrunewiseError(f"cannot stream {self.folder}: it holds no safetensors weights ({SINGLE} or {INDEX}); "
                                 "convert it with save_pretrained, or load it whole with --stream off")
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
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
        """One tensor, read into fresh memory (no mapping of the file)."""
        return read_tensor(name, self.tensors[name])


def read_tensor(name: str, info: TensorInfo) -> torch.Tensor:
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with open(info.file, "rb", buffering=0) as fh:
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

    def __init__(self, folder: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = SHARD_BYTES, metadata: dict[str, str] | None = None):
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
        self.files = [SINGLE] if len(shards) == 1 else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                                                         for k in range(len(shards))]
        self.where: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        self.handles = []
        self.total = 0
        for k, shard in enumerate(shards):
            header, offset = {}, 0
            for name, dtype, shape, nbytes in shard:
                header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
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
            raise PrunewiseError(f"internal: {name} arrived as {tensor.dtype} {tuple(tensor.shape)}, "
                                 f"planned {dtype} {shape}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        fh = self.handles[k]
        fh.seek(offset)
        fh.write(memoryview(data))
        self.pending.discard(name)

    def close(self) -> None:
        for fh in self.handles:
            fh.close()
        if self.pending:
            raise PrunewiseError(f"internal: {len(self.pending)} tensors were never written "
                                 f"(first: {sorted(self.pending)[0]})")
        if len(self.files) > 1:
            weight_map = {name: self.files[k] for name, (k, *_) in self.where.items()}
            (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                         "weight_map": weight_map}, indent=2))

    def abort(self) -> None:
        for fh in self.handles:
            fh.close()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _assign(root: nn.Module, key: str, value: torch.Tensor) -> None:
    """Set parameter or buffer ``key`` (dotted, under ``root``) to ``value``, keeping the kind."""
    owner, _, name = key.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


class Stream:
    """Where a streamed model's weights are: the dense checkpoint it was loaded from, and the
    checkpoint it streams from now (the dense one, or a scratch checkpoint a prune wrote)."""

    def __init__(self, dense: Checkpoint, keys: dict[str, str], dtypes: dict[str, torch.dtype], scratch_root: Path):
        self.dense = dense
        self.current = dense
        self.keys = keys  # model state key -> checkpoint tensor name (every checkpoint this stream writes too)
        self.dtypes = dtypes  # model state key -> the dtype the model holds it in
        self.scratch_root = Path(scratch_root)
        self.max_shard_bytes = dense.shard_bytes  # output shards like the source's
        self._owned: Path | None = None  # the scratch folder ``current`` lives in, deleted when left
        self._finalizer = weakref.finalize(self, _remove, None)

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key`` (a model state key) of the current checkpoint, in the model's dtype."""
        t = self.current.read(self.keys[key])
        return t if t.dtype == self.dtypes[key] else t.to(self.dtypes[key])

    def new_scratch(self) -> Path:
        """A new scratch folder (``.prunewise-stream.tmp-PID-*``; those of dead processes are removed)."""
        from .atomic import clean_stale

        self.scratch_root.mkdir(parents=True, exist_ok=True)
        clean_stale(self.scratch_root / "prunewise-stream")
        return Path(tempfile.mkdtemp(prefix=f".prunewise-stream.tmp-{os.getpid()}-", dir=self.scratch_root))

    def point(self, folder: Path, owned: bool) -> None:
        """Stream from the checkpoint in ``folder`` from now on (``owned``: a scratch folder of ours)."""
        previous = self._owned
        self.current = self.dense if Path(folder) == self.dense.folder else Checkpoint(folder)
        self._owned = Path(folder) if owned else None
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _remove, self._owned)
        if previous is not None and previous != self._owned:
            _remove(previous)

    def restore(self) -> None:
        """Back to the dense checkpoint (a trial's or a finished run's scratch is deleted)."""
        self.point(self.dense.folder, owned=False)


def _remove(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def stream_of(model: nn.Module) -> Stream | None:
    """The :class:`Stream` of a streamed model, or None for a model held in memory."""
    return getattr(model, "_prunewise_stream", None)


def _key_map(model: nn.Module, ckpt: Checkpoint) -> dict[str, str]:
    """Model state key -> checkpoint tensor name, for every key the checkpoint has (tied copies and
    non-persistent buffers need none)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for key in model.state_dict(keep_vars=True):
        for cand in (key, key.removeprefix(prefix + ".") if prefix else key, f"{prefix}.{key}"):
            if cand in ckpt.tensors:
                out[key] = cand
                break
    return out


def load_skeleton(folder: Path, dtype: torch.dtype | str = "auto", *, blocks_path: str | None = None,
                  trust_remote_code: bool = False, scratch_root: Path | None = None) -> nn.Module:
    """The model of the checkpoint in ``folder`` with its decoder blocks on the meta device and
    everything else loaded; its blocks stream from ``folder`` (:class:`StreamedSource`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    ckpt = Checkpoint(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:
        from .models import _why

        raise PrunewiseError(f"model: cannot read the config of {folder}: {_why(exc)}") from None
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    keys = _key_map(model, ckpt)
    path, _ = find_blocks(model, blocks_path)
    state = model.state_dict(keep_vars=True)
    for key, ck in keys.items():
        if not key.startswith(path + "."):
            t = ckpt.read(ck)
            _assign(model, key, t if t.dtype == state[key].dtype else t.to(state[key].dtype))
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(path + ".")]
    missing += [n for n, p in model.named_parameters() if n.startswith(path + ".") and n not in keys]
    if missing:
        raise PrunewiseError(
            f"cannot stream {folder}: the checkpoint has no tensor for {missing[0]} ({len(missing)} missing; its "
            "tensor names are not the model's, which transformers converts only when loading whole): "
            "load it with --stream off")
    model.eval()
    model.config.use_cache = False
    dtypes = {k: t.dtype for k, t in state.items()}
    model._prunewise_stream = Stream(ckpt, keys, dtypes, scratch_root or Path(tempfile.gettempdir()))
    return model


_READER: list[ThreadPoolExecutor] = []


def _reader() -> ThreadPoolExecutor:
    """The one thread that reads blocks ahead, for every source: memory its reads free is reused
    by its next reads (glibc keeps freed memory in the allocating thread's arena; a reader thread
    per source would leave a block or two of freed memory behind in each)."""
    if not _READER:
        _READER.append(ThreadPoolExecutor(1, thread_name_prefix="prunewise-read"))
    return _READER[0]


class StreamedSource(BlockSource):
    """The decoder blocks of a streamed model, each read from its checkpoint for its turn."""

    streamed = True

    def __init__(self, model: nn.Module, blocks_path: str | None = None, device: str | torch.device = "cpu"):
        super().__init__(model, blocks_path, device)
        self.stream = stream_of(model)
        self.sink: ShardWriter | None = None
        self._ahead: dict[tuple[int, int], Future] = {}
        # every tensor of each block the checkpoint holds: (key within the block, meta placeholder)
        self._tensors: list[list[tuple[str, torch.Tensor]]] = []
        for i, block in enumerate(self.blocks):
            prefix = f"{self.path}.{i}."
            self._tensors.append([(k, t) for k, t in block.state_dict(keep_vars=True).items()
                                  if prefix + k in self.stream.keys and t.is_meta])

    def _read_block(self, i: int) -> dict[str, torch.Tensor]:
        return {k: self.stream.read(f"{self.path}.{i}.{k}") for k, _ in self._tensors[i]}

    @contextlib.contextmanager
    def block(self, i: int, upcoming: int | None = None) -> Iterator[nn.Module]:
        """Block ``i`` read from the checkpoint onto the device for the duration (``upcoming`` is
        read meanwhile); with a :attr:`sink`, its tensors are written there when the step is done."""
        here = id(self.stream.current)
        future = self._ahead.pop((here, i), None)
        tensors = future.result() if future is not None else self._read_block(i)
        self._ahead.clear()
        if upcoming is not None:
            self._ahead[(here, upcoming)] = _reader().submit(self._read_block, upcoming)
        block = self.blocks[i]
        for k, t in tensors.items():
            _assign(block, k, t.to(self.device))
        del tensors
        try:
            with routed(block):
                yield block
            if self.sink is not None:
                state = block.state_dict()
                for k, _ in self._tensors[i]:
                    key = f"{self.path}.{i}.{k}"
                    self.sink.put(self.stream.keys[key], state[k])
        finally:
            for k, meta in self._tensors[i]:
                _assign(block, k, meta)

    def weight(self, name: str) -> torch.Tensor:
        module = self.model.get_submodule(name)
        if isinstance(module, ExpertLinear):
            owner = name.rsplit(".", 2)[0]
            return self.stream.read(f"{owner}.{module.attr}")[module.index]
        w = self.stream.read(f"{name}.weight")
        return w.t() if _is_conv1d(module) else w

    @contextlib.contextmanager
    def rewriting(self) -> Iterator[None]:
        """Blocks walked meanwhile are written, as their steps leave them, to a new checkpoint that
        the model streams from afterwards (pruning in place, for a model on disk)."""
        stream = self.stream
        folder = stream.new_scratch()
        state = self.model.state_dict(keep_vars=True)
        specs = [(ck, stream.dtypes[key], tuple(state[key].shape)) for key, ck in stream.keys.items()]
        writer = ShardWriter(folder, specs, stream.max_shard_bytes)
        try:
            for key, ck in stream.keys.items():  # what is in memory now: outside the blocks, block buffers
                if not state[key].is_meta:
                    writer.put(ck, state[key])
            self.sink = writer
            yield
            writer.close()
        except BaseException:
            writer.abort()
            _remove(folder)
            raise
        finally:
            self.sink = None
        stream.point(folder, owned=True)


def export(model: nn.Module, tokenizer, folder: Path) -> None:
    """Write a streamed model's current checkpoint into ``folder`` (moved when it is a scratch
    checkpoint, copied when it is the dense source) with its config and tokenizer."""
    stream = stream_of(model)
    src = stream.current.folder
    files = [f for f in os.listdir(src) if f == INDEX or f.endswith(".safetensors")]
    move = stream._owned is not None
    for f in files:
        (shutil.move if move else shutil.copyfile)(src / f, Path(folder) / f)  # a rename on one filesystem
    model.config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if move:
        stream.point(folder, owned=False)


def random_checkpoint(folder: Path, config, *, dtype: torch.dtype = torch.float32, seed: int = 0, tokenizer=None,
                      max_shard_bytes: int = SHARD_BYTES) -> Path:
    """A random-init checkpoint of ``config`` (a transformers config) written to ``folder`` one
    tensor at a time, never the whole model in memory: matrices ``N(0, 0.02)``, other weights ones,
    biases zeros. For trying a memory budget with the shape of a model too large to download
    (benchmarks, tests); ``tokenizer`` is saved with it."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    tensors = {id(t): (k, t) for k, t in model.state_dict(keep_vars=True).items()}  # tied: one entry
    specs = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.values()]
    writer = ShardWriter(folder, specs, max_shard_bytes)
    g = torch.Generator().manual_seed(seed)
    try:
        for k, t in tensors.values():
            if not t.is_meta:
                value = t.detach()
            elif t.dim() >= 2:
                value = (torch.randn(t.shape, generator=g) * 0.02).to(t.dtype)
            else:
                value = torch.zeros(t.shape, dtype=t.dtype) if k.endswith("bias") else torch.ones(t.shape, dtype=t.dtype)
            writer.put(k, value)
            del value
        writer.close()
    except BaseException:
        writer.abort()
        raise
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
