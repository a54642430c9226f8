"""Shared fixtures over :mod:`helpers`: tiny models, a tiny tokenizer, text, a private cache."""

from __future__ import annotations

import pytest
import torch

from helpers import ARCHS, VOCAB, make_text, make_tokenizer, tiny_model


@pytest.fixture(autouse=True)
def _private_cache(request, tmp_path_factory, monkeypatch):
    """Fast tests never write to the user's cache; real-model tests share it (converted model)."""
    if request.node.get_closest_marker("real") is None:
        monkeypatch.setenv("PRUNEWISE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def calib():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (6, 24), generator=g)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny llama saved as a Hugging Face folder with the tokenizer (one per test module)."""
    d = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama").save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "t.txt"
    p.write_text(make_text(3000), encoding="utf-8")
    return p


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path
