"""Streamed GGUF conversion: a ``.gguf`` file to a safetensors folder, one tensor at a time.

transformers' own GGUF loader dequantizes every tensor into one fp32 model in memory (9 GB peak for
a 1.5B model; a 7B GGUF, about 30 GB in fp32, cannot be converted on a 24 GB machine). Here the
tensors are read one by one from the memory-mapped file, dequantized by the ``gguf`` package, put
through transformers' own per-architecture tensor processing (the reverse q/k permutation of
LLaMA-style files, split experts, ...) and name map, cast to the output dtype and written at their
place in safetensors shards laid out up front (:class:`~prunewise.storage.shards.ShardWriter`), so
the peak is about the largest tensor (rows are dequantized a few at a time into it). The config and the tokenizer are
transformers' readings of the same file, written beside the weights: the folder loads with plain
``from_pretrained`` and streams with ``--stream on``. In float32 the tensors are bit for bit those
of transformers' own load (the same dequantization and processing, tensor by tensor).

Deviations from transformers' loader: none in the values. A tied output layer is written once,
under the embedding's name, as ``save_pretrained`` does.

transformers, accelerate and gguf are imported inside :func:`convert_gguf`: importing them costs
seconds that commands converting nothing do not pay.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import PrunewiseError
from ..storage.atomic import atomic_folder
from ..storage.shards import SHARD_BYTES, ShardWriter

log = logging.getLogger(__name__)


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


CHUNK_BYTES = 1 << 25  # dequantized at once: 32 MB of float32 rows (gguf's dequantization keeps several copies)


def _dequantized(data: np.ndarray, qtype) -> np.ndarray:
    """``gguf.dequantize`` of a tensor's data, a few rows at a time into one float32 array: the
    same values (each block is dequantized on its own), without the full-size temporaries that
    dequantizing a large tensor at once allocates (several times its float32 size)."""
    from gguf import dequantize

    if data.ndim < 2 or data.shape[0] < 2:
        return dequantize(data, qtype)
    head = dequantize(data[:1], qtype)
    out = np.empty((data.shape[0], *head.shape[1:]), dtype=head.dtype)
    step = max(1, CHUNK_BYTES // max(head.nbytes, 1))
    for r in range(0, data.shape[0], step):
        out[r : r + step] = dequantize(data[r : r + step], qtype)
    return out


def _forget(reader, tensor) -> None:
    """Drop the file's pages of ``tensor`` from this process (the memory map would otherwise keep
    every page it read resident, the whole file by the end); they are read again if touched."""
    mm = getattr(reader.data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise"):
        return
    start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    with contextlib.suppress(OSError, ValueError):
        mm.madvise(mmap.MADV_DONTNEED, start, tensor.data_offset + tensor.n_bytes - start)


def convert_gguf(
    source: Path,
    out: Path,
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    max_shard_bytes: int = SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Convert the GGUF file ``source`` into the safetensors folder ``out`` (all or nothing: written
    beside it and renamed into place), tensor by tensor, in ``dtype``; returns ``out``."""
    from accelerate import init_empty_weights
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    source, out = Path(source), Path(out)
    if not source.is_file():
        raise PrunewiseError(f"convert: no such .gguf file: {source}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PrunewiseError(f"convert: {out} already exists; choose another folder or pass --overwrite")
    try:
        reader = GGUFReader(str(source))
        parsed = load_gguf_checkpoint(str(source), return_tensors=False)
        config = AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name)
    except Exception as exc:  # not GGUF, cut short, an architecture transformers does not read
        raise PrunewiseError(f"convert: cannot read {source}: {_why(exc)}") from None
    config.architectures = [config.architectures[0] if config.architectures else "ForCausalLM"]
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    skeleton.tie_weights()
    config.architectures = [type(skeleton).__name__]
    processor = TENSOR_PROCESSORS.get(read_field(reader, "general.architecture")[0], TensorProcessor)(
        config=parsed["config"]
    )
    names = get_gguf_hf_weights_map(skeleton, processor)
    first: dict[int, tuple[str, torch.Tensor]] = {}  # one entry per tensor: tied ones under their first name
    for key, t in skeleton.state_dict(keep_vars=True).items():
        first.setdefault(id(t), (key, t))
    specs = [(key, dtype if t.dtype.is_floating_point else t.dtype, tuple(t.shape)) for key, t in first.values()]
    wanted = {key for key, _, _ in specs}
    with atomic_folder(out, replace=overwrite) as tmp:
        writer = ShardWriter(tmp, specs, max_shard_bytes)
        try:
            parsed = {"config": parsed["config"], "tensors": {}}  # the tokenizer's fields are not needed here
            for tensor in tqdm(reader.tensors, desc="converting", unit="tensor", disable=not progress):
                result = processor.process(
                    weights=_dequantized(tensor.data, tensor.tensor_type),
                    name=tensor.name,
                    tensor_key_mapping=names,
                    parsed_parameters=parsed,
                )
                done = dict(parsed["tensors"])  # what a processor assembled itself (split or merged experts)
                parsed["tensors"].clear()
                if result.name in names:
                    weights = np.ascontiguousarray(result.weights)  # F32 data is a read-only view of the map
                    done[names[result.name]] = torch.from_numpy(weights if weights.flags.writeable else weights.copy())
                for key, value in done.items():
                    if key in wanted:
                        writer.put(key, value.to(dtype) if value.dtype.is_floating_point else value)
                        wanted.discard(key)
                del result, done
                _forget(reader, tensor)
            if wanted:
                raise PrunewiseError(
                    f"convert: {source} holds no tensor for {sorted(wanted)[0]} ({len(wanted)} "
                    "missing): transformers does not map this file's tensors to the model"
                )
            writer.close()
        except BaseException:
            writer.abort()
            raise
        config.dtype = dtype  # what from_pretrained loads it in by default
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name).save_pretrained(tmp)
        except Exception as exc:
            raise PrunewiseError(f"convert: {source} has no usable tokenizer: {_why(exc)}") from None
    log.info("converted %s to %s (%s)", source.name, out, str(dtype).removeprefix("torch."))
    return out
