"""GBLM-Pruner: gradient statistics against brute-force autograd, the score, errors, caching."""

import pytest
import torch
import torch.nn.functional as F

import prunewise as pw
from helpers import tiny_model
from prunewise.errors import PrunewiseError
from prunewise.model.layers import block_linears, find_blocks, is_conv1d
from prunewise.prune.gradients import collect_gradients, layer_gradients
from prunewise.prune.masks import Pattern, make_mask
from prunewise.prune.stats import LayerStats
from prunewise.registry import METRICS


def brute_force(model, calib, scale=100.0):
    """Per-sample gradients by plain autograd, accumulated in float64: (l1, l2)."""
    path, blocks = find_blocks(model)
    modules = {f"{path}.{i}.{sub}": m for i, b in enumerate(blocks) for sub, m in block_linears(b)}
    l1 = {n: 0 for n in modules}
    sq = {n: 0 for n in modules}
    for window in calib:
        model.zero_grad()
        ids = window.unsqueeze(0)
        logits = model(input_ids=ids).logits
        F.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
        for n, m in modules.items():
            g = m.weight.grad.double() * scale
            g = g.t() if is_conv1d(m) else g
            l1[n] = l1[n] + g.abs()
            sq[n] = sq[n] + g.square()
    model.zero_grad()
    return l1, {n: v.sqrt() for n, v in sq.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_accumulators_equal_brute_force_autograd(arch, calib):
    model = tiny_model(arch)
    ref_l1, ref_l2 = brute_force(tiny_model(arch), calib[:4])
    for norm, ref in (("l1", ref_l1), ("l2", ref_l2)):
        for checkpointing in (False, True):
            got = collect_gradients(model, calib[:4], norm=norm, checkpointing=checkpointing, progress=False)
            assert set(got) == set(ref)
            for name, value in ref.items():
                assert got[name].dtype == torch.float32 and got[name].shape == value.shape
                torch.testing.assert_close(got[name].double(), value, rtol=1e-4, atol=1e-6)
    # the model is left as it was: no gradients, requires_grad restored, eval/train mode kept
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_never_more_than_one_gradient_alive(calib):
    model = tiny_model("llama")
    params = list(model.parameters())
    alive: list[int] = []
    path, blocks = find_blocks(model)
    for b in blocks:
        for _, m in block_linears(b):
            # registered first, so it runs before the collector's own hook frees the gradient
            m.weight.register_post_accumulate_grad_hook(lambda p: alive.append(sum(q.grad is not None for q in params)))
    collect_gradients(model, calib[:2], progress=False)
    assert len(alive) == 2 * 3 * 7 and max(alive) == 1


def test_gradient_term_changes_the_pruned_weight():
    # one row, two inputs, equal activations: Wanda prunes the smaller weight (w1 = 1);
    # with a large gradient on w1, GBLM keeps it: 2 + 2*0 = 2 < 1 + 1*5 = 6, so w0 goes.
    w = torch.tensor([[2.0, 1.0]])
    stats = LayerStats(2, nsamples=1, ntokens=1, sq_sum=torch.tensor([1.0, 1.0]), grad=torch.tensor([[0.0, 5.0]]))
    wanda = METRICS.get("wanda").fn(w, stats)
    gblm = METRICS.get("gblm").fn(w, stats)
    grad_only = METRICS.get("gradient").fn(w, stats)
    assert gblm.tolist() == [[2.0, 6.0]] and grad_only.tolist() == [[0.0, 5.0]]
    pattern = Pattern()
    assert make_mask(wanda, 0.5, pattern, "row").tolist() == [[False, True]]
    assert make_mask(gblm, 0.5, pattern, "row").tolist() == [[True, False]]


def test_quantized_weights_cannot_run_backward(calib):
    model = tiny_model("llama")
    lin = model.model.layers[1].mlp.up_proj
    lin.weight = torch.nn.Parameter(lin.weight.data.to(torch.int8), requires_grad=False)
    with pytest.raises(
        PrunewiseError, match=r"cannot run backward: model.layers.1.mlp.up_proj is stored as torch.int8"
    ):
        collect_gradients(model, calib[:2], progress=False)


def test_insufficient_memory_says_what_it_needs(calib):
    model = tiny_model("llama")
    with pytest.raises(
        PrunewiseError, match=r"needs about .* GB \(accumulators .*\) but 0.00 GB is available.*checkpointing=true"
    ):
        collect_gradients(model, calib[:2], progress=False, available=1000)


def test_gradients_cached_by_content(calib, tmp_path):
    model = tiny_model("llama")
    first = layer_gradients(model, calib[:3], norm="l2", scale=100.0, cache_dir=tmp_path, progress=False)
    files = list((tmp_path / "gradients").glob("*.safetensors"))
    again = layer_gradients(model, calib[:3], norm="l2", scale=100.0, cache_dir=tmp_path, progress=False)
    assert len(files) == 1 and all(torch.equal(first[k], again[k]) for k in first)
    layer_gradients(model, calib[:3], norm="l1", scale=100.0, cache_dir=tmp_path, progress=False)
    layer_gradients(model, calib[1:4], norm="l2", scale=100.0, cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "gradients").glob("*.safetensors"))) == 3


def test_gblm_composes_with_allocator_and_scale_matters(calib, tmp_path):
    def masks(metric):
        model = tiny_model("llama")
        cfg = pw.PruneConfig(model="x", metric=metric, allocator="atp:beta=0.1", sparsity=0.5, nsamples=6, seqlen=24)
        res = pw.prune(model, None, cfg, calib=calib, cache_dir=tmp_path, progress=False)
        assert res.sparsity == pytest.approx(0.5, abs=1e-3)
        assert ("gradients_s" in res.timings) == metric.startswith("gblm")
        return torch.cat([(model.get_submodule(r.name).weight == 0).flatten() for r in res.layers])

    base = masks("gblm")
    assert torch.equal(base, masks("gblm"))  # deterministic, second run from the cache
    assert not torch.equal(base, masks("gblm:scale=10000"))
    assert not torch.equal(base, masks("wanda"))
    with pytest.raises(pw.ConfigError, match="did you mean 'norm'"):
        pw.PruneConfig(model="x", metric="gblm:nrom=l2").validate()
