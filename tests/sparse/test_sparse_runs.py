"""``--format sparse`` end to end on tiny models: what is saved, what ``prunewise.load`` gives back."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunewise as pw
from helpers import ARCHS, make_tokenizer, sharded_checkpoint, tiny_mixtral_config, tiny_model
from prunewise.cli import main
from prunewise.errors import PrunewiseError
from prunewise.model.blocks import BlockSource
from prunewise.sparse import kernel
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


def test_load_unpacks_where_the_kernel_has_no_vector_path(tmp_path, monkeypatch):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    prune(src, tmp_path / "sparse", "--format", "sparse")

    def count(model):
        return sum(isinstance(m, SparseLinear) for m in model.modules())

    n = len(list(BlockSource(pw.load(tmp_path / "sparse", kernel=False)[0]).all_linears()))
    assert count(pw.load(tmp_path / "sparse")[0]) == (n if kernel.fast() else 0)
    monkeypatch.setattr(kernel, "fast", lambda: False)  # a scalar-only build, or none: packed layers would be slower
    assert count(pw.load(tmp_path / "sparse")[0]) == 0
    assert count(pw.load(tmp_path / "sparse", kernel=True)[0]) == n  # asked for: packed regardless


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


def mixtral():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_mixtral_config(len(make_tokenizer()))).eval()


@pytest.mark.parametrize(
    "case, flags",
    [("2:4", ["--pattern", "2:4", "--sparsity", "0.5"]), ("bfloat16", []), ("float16", []), ("experts", [])],
)
def test_every_kind_of_run_round_trips_bit_for_bit(case, flags, tmp_path):
    src = tmp_path / "src"
    model = mixtral() if case == "experts" else tiny_model("llama")
    model.to(getattr(torch, case) if case.endswith("16") else torch.float32).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    args = ["prune", "--model", str(src), "--metric", "magnitude", "--no-eval", "-q", *flags]
    args += [] if flags else ["--sparsity", "0.7"]
    assert main([*args, "--out", str(tmp_path / "dense")]) == 0
    assert main([*args, "--out", str(tmp_path / "sparse"), "--format", "sparse"]) == 0
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    got, _ = pw.load(tmp_path / "sparse", kernel=False)
    for key, t in want.state_dict().items():
        assert t.dtype == got.state_dict()[key].dtype and torch.equal(bits(got.state_dict()[key]), bits(t)), key
    if case == "2:4":
        w = want.model.layers[0].mlp.up_proj.weight
        assert bool(((w == 0).view(w.shape[0], -1, 4).sum(-1) == 2).all())
    pruned = {k for k, t in want.state_dict().items() if t.dim() >= 2 and (t == 0).double().mean() >= 0.5}
    assert set(read_spec(tmp_path / "sparse")["tensors"]) == pruned  # fused 3-D expert tensors included
    if case == "experts":
        assert any(want.state_dict()[k].dim() == 3 for k in pruned)


def test_kernel_models_in_another_dtype_and_from_a_dense_run(tmp_path):
    src = tmp_path / "src"
    tiny_model("qwen2").save_pretrained(src)  # biases on q/k/v
    make_tokenizer().save_pretrained(src)
    prune(src, tmp_path / "dense")
    prune(src, tmp_path / "sparse", "--format", "sparse")
    ids = torch.randint(0, 200, (1, 6), generator=torch.Generator().manual_seed(1))
    dense16, _ = pw.load(tmp_path / "dense", dtype="bfloat16")
    sparse16, _ = pw.load(tmp_path / "sparse", dtype="bfloat16")
    layers = [m for m in sparse16.modules() if isinstance(m, SparseLinear)]
    assert layers and all(m.dtype == torch.bfloat16 for m in layers)  # converted, still on the kernel
    for name, m in sparse16.named_modules():
        if isinstance(m, SparseLinear):  # the packed values converted equal the dense weight converted
            assert torch.equal(m.dense_weight(), dense16.get_submodule(name).weight)
    pruned, _ = pw.load(tmp_path / "dense")
    on_kernel = kernel.with_kernel(pruned)
    assert on_kernel.model.embed_tokens.weight is pruned.model.embed_tokens.weight  # shared, not copied
    assert sum(isinstance(m, SparseLinear) for m in on_kernel.modules()) == len(layers)
    assert not any(isinstance(m, SparseLinear) for m in pruned.modules())  # the source is left as it was
    with torch.no_grad():
        ref = pruned(input_ids=ids).logits
        assert torch.allclose(on_kernel(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)
        for n in range(1, 5):  # decode-sized calls on the kernel
            assert torch.allclose(on_kernel(input_ids=ids[:, :n]).logits, ref[:, :n], rtol=1e-4, atol=1e-4)


@pytest.mark.real
def test_bundled_model_perplexity_on_the_kernel_equals_the_dense_format(tmp_path, monkeypatch):
    prune("smollm2-135m", tmp_path / "s50", "--format", "sparse", "--sparsity", "0.5")
    dense, tok = pw.load(tmp_path / "s50", kernel=False)
    sparse, _ = pw.load(tmp_path / "s50")
    assert sum(isinstance(m, SparseLinear) for m in sparse.modules()) == 210
    budget = dict(seqlen=128, max_tokens=2048, progress=False)
    want = pw.evaluate(dense, tok, "wiki", **budget)["ppl"]
    prefill = pw.evaluate(sparse, tok, "wiki", **budget)["ppl"]  # 128-row windows: unpacked, dense matmuls
    monkeypatch.setitem(kernel.KERNEL_TOKENS, torch.float32, 10**6)  # every window on the kernel itself
    on_kernel = pw.evaluate(sparse, tok, "wiki", **budget)["ppl"]
    assert 20 < want < 2000  # magnitude 50%: a damaged model, not a broken one (README: 357 on 32k tokens)
    assert abs(prefill - want) / want < 1e-4 and abs(on_kernel - want) / want < 1e-4
