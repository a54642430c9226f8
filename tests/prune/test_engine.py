import pytest
import torch

import prunewise as pw
from helpers import ARCHS, LINEARS_PER_BLOCK, last_block_output, tiny_model
from prunewise.errors import PrunewiseError
from prunewise.model.layers import block_linears, find_blocks, weight_matrix
from prunewise.model.sources import replay


def zeros_and_numel(model):
    _, blocks = find_blocks(model)
    z = n = 0
    for block in blocks:
        for _, m in block_linears(block):
            w = weight_matrix(m)
            z += int((w == 0).sum())
            n += w.numel()
    return z, n


@pytest.mark.parametrize("arch", ARCHS)
def test_replay_matches_full_forward(arch, calib):
    model = tiny_model(arch)
    want = last_block_output(model, calib)
    got = replay(model, calib, batch_size=4)  # batches of 4 and 2: kwargs captured per batch
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_find_blocks_generic(arch):
    model = tiny_model(arch)
    path, blocks = find_blocks(model)
    assert (
        path
        == {"llama": "model.layers", "qwen2": "model.layers", "opt": "model.decoder.layers", "gpt2": "transformer.h"}[
            arch
        ]
    )
    assert len(blocks) == 3
    assert len(block_linears(blocks[0])) == LINEARS_PER_BLOCK[arch]


def test_find_blocks_errors():
    model = tiny_model("llama")
    with pytest.raises(PrunewiseError, match="blocks_path"):
        find_blocks(model, "model.nope")
    with pytest.raises(PrunewiseError, match="not a non-empty nn.ModuleList"):
        find_blocks(model, "model.norm")
    assert find_blocks(model, "model.layers")[0] == "model.layers"
    bare = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(PrunewiseError, match="--blocks-path"):
        find_blocks(bare)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("metric", ["magnitude", "wanda", "sparsegpt", "gblm", "gradient"])
@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.6), ("2:4", None)])
def test_exact_sparsity_every_arch_metric_pattern(arch, metric, pattern, sparsity, calib):
    model = tiny_model(arch)
    cfg = pw.PruneConfig(metric=metric, sparsity=sparsity, pattern=pattern, nsamples=6, seqlen=24, batch_size=4)
    before = zeros_and_numel(model)[0]
    assert before == 0
    result = pw.prune(model, None, cfg, calib=calib, progress=False)
    z, n = zeros_and_numel(model)
    _, blocks = find_blocks(model)
    assert len(result.layers) == 3 * LINEARS_PER_BLOCK[arch]
    for r, (_, m) in zip(result.layers, [lm for b in blocks for lm in block_linears(b)]):
        w = weight_matrix(m)
        if pattern == "2:4":
            assert ((w == 0).view(w.shape[0], -1, 4).sum(-1) == 2).all(), r.name
        else:
            assert r.zeros == int(0.6 * w.numel() + 0.5), r.name
        assert r.zeros == int((w == 0).sum())
    assert result.sparsity == pytest.approx(z / n)
    # embeddings, norms, biases and lm_head untouched
    ref = tiny_model(arch)
    assert torch.equal(model.get_input_embeddings().weight, ref.get_input_embeddings().weight)
    assert torch.equal(model.get_output_embeddings().weight, ref.get_output_embeddings().weight)
    pruned = {f"{result.blocks_path}.{r.name.split(result.blocks_path + '.')[1]}.weight" for r in result.layers}
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if name not in pruned:
            assert torch.equal(p, q), name


@pytest.mark.parametrize("metric", ["wanda", "sparsegpt"])
def test_single_pass_exact_and_differs_from_two_pass(metric, calib):
    a, b = tiny_model("llama"), tiny_model("llama")
    base = dict(metric=metric, sparsity=0.5, nsamples=6, seqlen=24, batch_size=6)
    ra = pw.prune(a, None, pw.PruneConfig(**base), calib=calib, progress=False)
    rb = pw.prune(b, None, pw.PruneConfig(**base, mode="single-pass"), calib=calib, progress=False)
    assert ra.sparsity == rb.sparsity == pytest.approx(0.5)
    # the first layer (q_proj of block 0) sees identical inputs in both modes
    wa = a.model.layers[0].self_attn.q_proj.weight
    wb = b.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(wa == 0, wb == 0)
    # down_proj of block 0 sees pruned attention/MLP inputs in single-pass mode
    assert not torch.equal(a.model.layers[0].mlp.down_proj.weight, b.model.layers[0].mlp.down_proj.weight)


def test_wanda_uses_the_inputs_each_layer_receives(calib):
    """Block 0 down_proj's Wanda mask must equal one computed by hand from its captured dense input."""
    model = tiny_model("llama")
    ref = tiny_model("llama")
    seen = []
    h = ref.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        ref(input_ids=calib, use_cache=False)
    h.remove()
    x = torch.cat(seen).reshape(-1, 64)
    norm = (x.square().sum(0) / calib.shape[0]).sqrt()
    w = ref.model.layers[0].mlp.down_proj.weight
    score = w.abs() * norm
    expect = torch.zeros_like(w, dtype=torch.bool).scatter_(1, score.argsort(dim=1, stable=True)[:, :32], True)
    pw.prune(
        model,
        None,
        pw.PruneConfig(metric="wanda", sparsity=0.5, nsamples=6, seqlen=24, batch_size=4),
        calib=calib,
        progress=False,
    )
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight == 0, expect)


def test_dense_propagation_changes_later_blocks_only(calib):
    a, b = tiny_model("llama"), tiny_model("llama")
    base = dict(metric="wanda", sparsity=0.5, nsamples=6, seqlen=24)
    pw.prune(a, None, pw.PruneConfig(**base), calib=calib, progress=False)
    pw.prune(b, None, pw.PruneConfig(**base, propagate="dense"), calib=calib, progress=False)
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        assert torch.equal(a.model.layers[0].get_submodule(name).weight, b.model.layers[0].get_submodule(name).weight)
    assert not torch.equal(a.model.layers[2].self_attn.q_proj.weight, b.model.layers[2].self_attn.q_proj.weight)


def test_magnitude_needs_no_data_and_is_deterministic():
    a, b = tiny_model("opt"), tiny_model("opt")
    cfg = pw.PruneConfig(metric="magnitude", sparsity=0.7)
    result = pw.prune(a, None, cfg, progress=False)  # no tokenizer, no calibration ids: data-free
    pw.prune(b, None, cfg, progress=False)
    _, blocks = find_blocks(a)
    layers = [m for block in blocks for _, m in block_linears(block)]
    assert len(result.layers) == len(layers) > 0
    for m in layers:  # it pruned: every layer holds exactly round(0.7 n) zeros
        w = weight_matrix(m)
        assert int((w == 0).sum()) == int(0.7 * w.numel() + 0.5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_sparsity_zero_changes_nothing(calib):
    model, ref = tiny_model("qwen2"), tiny_model("qwen2")
    pw.prune(
        model, None, pw.PruneConfig(metric="wanda", sparsity=0.0, nsamples=6, seqlen=24), calib=calib, progress=False
    )
    for pa, pb in zip(model.parameters(), ref.parameters()):
        assert torch.equal(pa, pb)


def test_bfloat16_model_keeps_dtype(calib):
    model = tiny_model("llama").to(torch.bfloat16)
    res = pw.prune(
        model,
        None,
        pw.PruneConfig(metric="sparsegpt", sparsity=0.5, nsamples=6, seqlen=24),
        calib=calib,
        progress=False,
    )
    assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    assert res.sparsity == pytest.approx(0.5)


def test_seqlen_beyond_context_is_rejected():
    model = tiny_model("llama")  # max_position_embeddings = 128
    with pytest.raises(pw.ConfigError, match="seqlen: 256 exceeds the model's context of 128"):
        pw.prune(model, None, pw.PruneConfig(metric="wanda", seqlen=256))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_two_pass_matches_full_forward_reference(arch, calib):
    """The papers' protocol written the slow, obvious way: for block i, run the whole model (blocks
    before i already pruned, i still dense) and take Wanda statistics of block i's layers."""
    model, ref = tiny_model(arch), tiny_model(arch)
    pw.prune(
        model,
        None,
        pw.PruneConfig(metric="wanda", sparsity=0.5, nsamples=6, seqlen=24, batch_size=4),
        calib=calib,
        progress=False,
    )
    _, blocks = find_blocks(ref)
    for block in blocks:
        sums, handles = {}, []
        for name, m in block_linears(block):

            def hook(mod, args, name=name, sums=sums):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[name] = sums.get(name, 0) + x.square().sum(0)

            handles.append(m.register_forward_pre_hook(hook))
        with torch.no_grad():
            ref(input_ids=calib, use_cache=False)
        for h in handles:
            h.remove()
        for name, m in block_linears(block):
            w = weight_matrix(m)
            score = w.abs() * (sums[name] / calib.shape[0]).sqrt()
            k = w.shape[1] // 2
            mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, score.argsort(dim=1, stable=True)[:, :k], True)
            w.masked_fill_(mask, 0)
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(a == 0, b == 0), n


def test_nan_weights_keep_exact_counts_and_are_named(calib, caplog):
    """Issue 22 case 3: 8 NaNs in one weight make the dense block's later activations NaN; every
    layer still loses exactly its count (NaN scores first, so the NaN weights go), and a warning
    names the layers with non-finite weights and those with non-finite input statistics."""
    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    with torch.no_grad():
        blocks[1].self_attn.q_proj.weight[0, :8] = float("nan")
    cfg = pw.PruneConfig(metric="wanda", sparsity=0.5, nsamples=6, seqlen=24)
    with caplog.at_level("WARNING", logger="prunewise"):
        result = pw.prune(model, None, cfg, calib=calib, progress=False)
    assert all(r.zeros == int(0.5 * r.numel + 0.5) for r in result.layers)
    assert result.sparsity == 0.5
    text = caplog.text
    assert "non-finite weights" in text and "model.layers.1.self_attn.q_proj" in text
    assert "non-finite input statistics" in text and "model.layers.1.self_attn.o_proj" in text
    assert torch.isfinite(blocks[1].self_attn.q_proj.weight).all()  # the NaN weights were pruned first


def test_a_layer_pruned_below_its_target_is_an_error(calib, monkeypatch):
    """A run whose masks miss the target never ends quietly (issue 22 case 3)."""
    from prunewise.prune import engine

    monkeypatch.setattr(engine, "make_mask", lambda scores, *a: torch.zeros_like(scores, dtype=torch.bool))
    with pytest.raises(PrunewiseError, match="pruned below their target"):
        pw.prune(tiny_model("llama"), None, pw.PruneConfig(metric="wanda", sparsity=0.5), calib=calib, progress=False)


def test_all_finite_finds_what_the_sum_hides():
    from prunewise.prune.stats import all_finite

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = torch.randn(64, 300).to(dtype)
        assert all_finite(w) and all_finite(w[:0])
        for bad in (float("nan"), float("inf"), -float("inf")):
            v = w.clone()
            v[5, 7] = bad
            assert not all_finite(v)
    assert all_finite(torch.full((8,), 3e38))  # the sum overflows; every entry is finite
    both = torch.tensor([float("inf"), -float("inf")])  # a NaN sum without a NaN
    assert not all_finite(both)
