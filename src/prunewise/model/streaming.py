"""Models larger than memory: a weightless skeleton, and decoder blocks read from the checkpoint.

A streamed model is the model's skeleton built on the meta device (no weight allocated), with the
parts outside the decoder blocks (embeddings, final norm, rotary buffers, ``lm_head``) loaded, and
a :class:`Stream` attached that says which safetensors checkpoint holds its block weights. The
model stays the handle every API takes (``prune``, ``plan``, ``perplexity``, ``save_run``); the
block loop asks :func:`prunewise.model.sources.make_source` for its source, and for a streamed model that
is a :class:`StreamedSource`:

- block ``i``'s tensors are read from the shards that hold them (the index maps tensor -> shard;
  only the block's own tensors are read, with plain reads at their offsets, so nothing is mapped
  into the process), moved to the device, and set back to meta when the step is done; the next
  block of the walk is read on a background thread while the current one computes;
- when a block's step is done, the free pages of the heap are given back
  (:func:`~prunewise.model.malloc.release_free_heap`): freed block weights and temporaries
  otherwise stay resident as fragments between long-lived tensors, and a streamed run's resident
  size grew by 0.4-0.7 GB over the 24 blocks of Qwen2.5-Coder 0.5B above what it holds
  (``benchmarks/RESULTS.md``, "The cost curve at 135M and 0.5B");
- pruning "in place" writes each pruned block to a scratch checkpoint as it finishes
  (:meth:`StreamedSource.rewriting`); at the end the model streams from that checkpoint, which
  saving moves into the output folder (a rename on the same filesystem). Trials and sweeps go
  back to the dense checkpoint with :meth:`Stream.restore`: no dense copy is kept in memory;
- a single weight (AlphaPruning's spectra, OWL's and MRP's scores) is read on its own when asked
  for (:meth:`StreamedSource.weight`), and the model's fingerprint hashes every tensor as it is
  read, equal to the fingerprint of the same checkpoint loaded whole.

Output shards are written by :class:`~prunewise.storage.shards.ShardWriter`: every tensor's name,
dtype and shape are known
before the first block is pruned, so each shard's header is written up front and each tensor is
written at its offset when it arrives. The result is an ordinary safetensors checkpoint (index,
shards, config, tokenizer) that loads with ``AutoModelForCausalLM.from_pretrained``, in the
dtype the model was loaded in (a bf16 checkpoint stays bf16).

The skeleton itself is built by :func:`prunewise.model.loading.load_skeleton`, which refuses a
checkpoint whose tensor names are not the model's (transformers renames or fuses some when it
loads them whole), naming a missing tensor.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from ..errors import PrunewiseError
from ..storage.atomic import Scratch, clean_stale, scratch_folder
from ..storage.cache import hash_tensor
from ..storage.shards import INDEX, SHARD_BYTES, Checkpoint, ShardWriter
from .blocks import BlockSource
from .experts import ExpertLinear, routed
from .layers import is_conv1d
from .malloc import release_free_heap

log = logging.getLogger(__name__)


def assign(root: nn.Module, key: str, value: torch.Tensor) -> None:
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
        self._owned: Scratch | None = None  # the scratch folder ``current`` lives in, deleted when left
        self._new: dict[Path, Scratch] = {}  # scratch folders made and not yet streamed from
        self._finalizer = weakref.finalize(self, _discard, None)

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key`` (a model state key) of the current checkpoint, in the model's dtype."""
        t = self.current.read(self.keys[key])
        return t if t.dtype == self.dtypes[key] else t.to(self.dtypes[key])

    def new_scratch(self) -> Path:
        """A new scratch folder (``.prunewise-stream.tmp-PID-*``), locked by this process for as long
        as it is used (:mod:`prunewise.storage.atomic`); those whose writer is gone are removed."""
        self.scratch_root.mkdir(parents=True, exist_ok=True)
        clean_stale(self.scratch_root / "prunewise-stream")
        scratch = scratch_folder(self.scratch_root, "prunewise-stream")
        self._new[scratch.path] = scratch
        return scratch.path

    def drop(self, folder: Path) -> None:
        """Delete a scratch folder made by :meth:`new_scratch` that will not be streamed from."""
        _discard(self._new.pop(Path(folder), None))

    def point(self, folder: Path, owned: bool) -> None:
        """Stream from the checkpoint in ``folder`` from now on (``owned``: a scratch folder of ours)."""
        previous = self._owned
        self.current = self.dense if Path(folder) == self.dense.folder else Checkpoint(folder)
        self._owned = self._new.pop(Path(folder), None) if owned else None
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _discard, self._owned)
        if previous is not None and previous is not self._owned:
            _discard(previous)

    def restore(self) -> None:
        """Back to the dense checkpoint (a trial's or a finished run's scratch is deleted)."""
        self.point(self.dense.folder, owned=False)


def _discard(scratch: Scratch | None) -> None:
    """Delete a scratch folder, then drop its lock."""
    if scratch is not None:
        shutil.rmtree(scratch.path, ignore_errors=True)
        scratch.release()


def stream_of(model: nn.Module) -> Stream | None:
    """The :class:`Stream` of a streamed model, or None for a model held in memory."""
    return getattr(model, "_prunewise_stream", None)


def attach_stream(model: nn.Module, stream: Stream) -> None:
    """Make ``model`` (a skeleton) a streamed model whose weights are where ``stream`` says."""
    model._prunewise_stream = stream


def key_map(model: nn.Module, ckpt: Checkpoint) -> dict[str, str]:
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
            self._tensors.append(
                [
                    (k, t)
                    for k, t in block.state_dict(keep_vars=True).items()
                    if prefix + k in self.stream.keys and t.is_meta
                ]
            )

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
            assign(block, k, t.to(self.device))
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
                assign(block, k, meta)
            release_free_heap()

    def weight(self, name: str) -> torch.Tensor:
        module = self.model.get_submodule(name)
        if isinstance(module, ExpertLinear):
            owner = name.rsplit(".", 2)[0]
            return self.stream.read(f"{owner}.{module.attr}")[module.index]
        w = self.stream.read(f"{name}.weight")
        return w.t() if is_conv1d(module) else w

    @contextlib.contextmanager
    def rewriting(self) -> Iterator[None]:
        """Blocks walked meanwhile are written, as their steps leave them, to a new checkpoint that
        the model streams from afterwards (pruning in place, for a model on disk)."""
        stream = self.stream
        folder = stream.new_scratch()
        state = self.model.state_dict(keep_vars=True)
        specs = [(ck, stream.dtypes[key], tuple(state[key].shape)) for key, ck in stream.keys.items()]
        writer = None
        try:
            writer = ShardWriter(folder, specs, stream.max_shard_bytes)
            free = shutil.disk_usage(folder).free
            if free < writer.total:
                raise _no_room(folder, writer.total, free)
            for key, ck in stream.keys.items():  # what is in memory now: outside the blocks, block buffers
                if not state[key].is_meta:
                    writer.put(ck, state[key])
            self.sink = writer
            yield
            writer.close()
        except BaseException as exc:
            if writer is not None:
                writer.abort()
            stream.drop(folder)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_room(folder, writer.total if writer else 0, None) from None
            raise
        finally:
            self.sink = None
        stream.point(folder, owned=True)


def _no_room(folder: Path, need: int, free: int | None) -> PrunewiseError:
    have = "" if free is None else f", {free / 1e9:.2f} GB free"
    return PrunewiseError(
        f"disk: the pruned checkpoint needs {need / 1e9:.2f} GB in {folder.parent}{have}; the disk "
        "is full (the scratch folder is removed): free space there, or pass --out on a larger disk"
    )


def export(model: nn.Module, tokenizer, folder: Path) -> None:
    """Write a streamed model's current checkpoint into ``folder`` (moved when it is a scratch
    checkpoint, copied when it is the dense source) with its config and tokenizer."""
    stream = stream_of(model)
    src = stream.current.folder
    files = [f for f in os.listdir(src) if f == INDEX or f.endswith(".safetensors")]
    move = stream._owned is not None
    for f in files:
        (shutil.move if move else shutil.copyfile)(src / f, Path(folder) / f)  # a rename on one filesystem
    save_beside(model, tokenizer, folder)
    if move:
        stream.point(folder, owned=False)


def save_beside(model: nn.Module, tokenizer, folder: Path) -> None:
    """What a checkpoint folder holds besides its weights: config, generation config, tokenizer."""
    model.config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def shard_bytes(model: nn.Module) -> int:
    """Where output shards are cut: like the streamed source's shards, else the default."""
    stream = stream_of(model)
    return stream.max_shard_bytes if stream is not None else SHARD_BYTES


def state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the model's state, one at a time, keyed as ``state_dict`` keys them: read
    from the checkpoint a streamed model streams from, tied copies once."""
    stream = stream_of(model)
    if stream is not None:
        for key, ck in stream.keys.items():
            yield key, stream.current.read(ck)
        return
    seen = set()
    for key, t in model.state_dict().items():
        if (t.data_ptr(), tuple(t.shape)) in seen:
            continue
        seen.add((t.data_ptr(), tuple(t.shape)))
        yield key, t


def random_checkpoint(
    folder: Path,
    config,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tokenizer=None,
    max_shard_bytes: int = SHARD_BYTES,
) -> Path:
    """A random-init checkpoint of ``config`` (a transformers config) written to ``folder`` one
    tensor at a time, never the whole model in memory: matrices ``N(0, 0.02)``, other weights ones,
    biases zeros. For trying a memory budget with the shape of a model too large to download
    (benchmarks, tests); ``tokenizer`` is saved with it."""
    from accelerate import init_empty_weights  # here, not above: importing it costs seconds
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    tensors: dict[int, tuple[str, torch.Tensor]] = {}
    for k, t in model.state_dict(keep_vars=True).items():  # tied: the first name, as save_pretrained keeps
        tensors.setdefault(id(t), (k, t))
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
                value = (
                    torch.zeros(t.shape, dtype=t.dtype) if k.endswith("bias") else torch.ones(t.shape, dtype=t.dtype)
                )
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


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, shapes, bytes) of ``model``; the
    tensors of a streamed model  are hashed as they are read, one at a
    time, to the same digest as the model loaded whole."""
    h = hashlib.sha256()
    stream = stream_of(model)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        hash_tensor(h, stream.read(name) if t.is_meta else t)
    return h.hexdigest()
