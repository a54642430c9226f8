"""``--format sparse`` end to end on tiny models: what is saved, what ``prunewise.load`` gives back."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunewise as pw
from helpers import ARCHS, make_tokenizer, sharded_checkpoint, tiny_model
from prunewise.cli import main
from prunewise.errors import PrunewiseError
from prunewise.model.blocks import BlockSource
from prunewise.sparse.checkpoint import read_spec
from prunewise.sparse.kernel import SparseLinear


def prune(model, out, *extra):
    args = ["prune", "--model", str(model), "--metric", "magnitude", "--sparsity", "0.7", "--no-eval"]
    assert main([*args, "--out", str(out), "-q", *extra]) == 0


def bits(t):
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_run_loads_back_bit_for_bit_and_runs_on_the_kernel(arch, tmp_path):
    src = tmp_path / "src"
    tiny_model(arch).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    prune(src, tmp_path / "dense")
    prune(src, tmp_path / "sparse", "--format", "sparse")
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    unpacked, _ = pw.load(tmp_path / "sparse", kernel=False)
    got = unpacked.state_dict()
    assert sorted(got) == sorted(want.state_dict())
    for key, t in want.state_dict().items():
        assert torch.equal(bits(got[key]), bits(t)), key
    spec = read_spec(tmp_path / "sparse")
    linears = [name for _, name, _ in BlockSource(want).all_linears()]
    assert len(spec["tensors"]) == len(linears)  # every pruned matrix, and nothing else
    assert spec["stored_bytes"] < spec["dense_bytes"]
    model, tok = pw.load(tmp_path / "sparse")
    kernels = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(kernels) == (0 if arch == "gpt2" else len(linears))  # GPT-2's Conv1D layers are unpacked
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = want(input_ids=ids).logits
        assert torch.allclose(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)
        assert torch.allclose(model(input_ids=ids[:1, :1]).logits, ref[:1, :1], rtol=1e-4, atol=1e-4)


def test_a_streamed_run_writes_the_same_sparse_checkpoint(tmp_path):
    src = sharded_checkpoint(tmp_path / "sh4", tied=True)
    prune(src, tmp_path / "mem", "--format", "sparse", "--stream", "off")
    prune(src, tmp_path / "streamed", "--format", "sparse", "--stream", "on")
    a, _ = pw.load(tmp_path / "mem", kernel=False)
    b, _ = pw.load(tmp_path / "streamed", kernel=False)
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied embeddings stay tied
    for key, t in a.state_dict().items():
        assert torch.equal(bits(b.state_dict()[key]), bits(t)), key
    assert read_spec(tmp_path / "mem")["tensors"] == read_spec(tmp_path / "streamed")["tensors"]


def test_a_sparse_folder_prunes_and_evaluates_unpacked_and_refuses_to_stream(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    prune(src, tmp_path / "sparse", "--format", "sparse")
    model, _, _ = pw.load_model(str(tmp_path / "sparse"))
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    with pytest.raises(PrunewiseError, match="does not stream"):
        pw.load_model(str(tmp_path / "sparse"), stream=True)
