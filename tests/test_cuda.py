"""The same runs on a CUDA GPU and on the CPU, compared (skipped where torch sees no CUDA device;
CI has none). The config-driven tests of the rest of the suite also run on a GPU with
``PRUNEWISE_DEVICE=cuda``; these compare the two devices directly.

What must hold: exact zero counts on both; masks the same, up to the summation order of float32
statistics on the GPU (magnitude reads no statistic, so its masks are equal; SparseGPT's updates
compound the order through a block, so it agrees less); allocations and perplexities equal within
float tolerance; the pruned weights back where the model lives (the host).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import prunewise as pw
from helpers import run_config, tiny_config, tiny_model
from prunewise.model.layers import block_linears, find_blocks, weight_matrix
from prunewise.prune.engine import prune_model, target_count
from prunewise.prune.masks import parse_pattern

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# Share of mask entries the GPU run must give as the CPU run of the same weights and data.
AGREE = {"magnitude": 1.0, "wanda": 0.999, "gblm": 0.999, "sparsegpt": 0.98}


def _linears(model):
    path, blocks = find_blocks(model)
    return {f"{path}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in block_linears(b)}


def _prune(model, metric, calib, pattern, device):
    grads = None
    if metric == "gblm":
        from prunewise.prune.gradients import collect_gradients

        grads = collect_gradients(model, calib, norm="l1", scale=100.0, device=device, progress=False)
    pat = parse_pattern(pattern)
    allocation = {name: pat.sparsity or 0.6 for name in _linears(model)}
    return prune_model(
        model, calib, metric=metric, allocation=allocation, pattern=pat, device=device, grads=grads, progress=False
    )


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("metric", sorted(AGREE))
def test_every_metric_prunes_on_cuda_as_on_cpu(metric, pattern, calib):
    source, host, gpu = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    res_cpu = _prune(host, metric, calib, pattern, "cpu")
    res_gpu = _prune(gpu, metric, calib, pattern, "cuda")
    assert [r.zeros for r in res_gpu.layers] == [r.zeros for r in res_cpu.layers]
    assert all(r.zeros == target_count(r.target, r.numel) for r in res_gpu.layers)
    assert all(p.device.type == "cpu" for p in gpu.parameters())  # each block went back home
    a, b = _linears(host), _linears(gpu)
    same = sum(int(((weight_matrix(a[n]) == 0) == (weight_matrix(b[n]) == 0)).sum()) for n in a)
    total = sum(weight_matrix(m).numel() for m in a.values())
    assert same / total >= AGREE[metric]
    if metric != "sparsegpt":  # these only zero weights: every kept one is the source's, bit for bit
        for n, m in _linears(source).items():
            kept = weight_matrix(b[n]) != 0
            assert torch.equal(weight_matrix(b[n])[kept], weight_matrix(m)[kept])


def _cfg(model_dir, text, device, **kw):
    return run_config(model_dir, text, **{"metric": "wanda", "sparsity": 0.6, "device": device, **kw})


def _on_both(model_dir, text, tmp_path, **kw):
    """The run's record on the CPU and on the GPU, each with its own output folder and cache."""
    records = []
    for i, device in enumerate(("cpu", "cuda")):
        cfg = _cfg(model_dir, text, device, **kw)
        records.append(pw.run(cfg, out=tmp_path / f"run{i}", cache_dir=tmp_path / f"c{i}", progress=False).record)
    return tuple(records)


@pytest.mark.parametrize(
    "allocator", ["owl", "alphapruning", "atp:beta=0.1", "mrp", "dlp", "lsa", "auto:candidates=uniform/owl/lsa"]
)
def test_every_allocator_on_cuda_as_on_cpu(allocator, model_dir, text, tmp_path):
    cpu, gpu = _on_both(model_dir, text, tmp_path, allocator=allocator)
    assert [x["zeros"] for x in gpu.pruning["layers"]] == [x["zeros"] for x in cpu.pruning["layers"]]
    for x, y in zip(cpu.allocation["blocks"], gpu.allocation["blocks"]):
        assert x == pytest.approx(y, abs=1e-3)
    assert gpu.dense["ppl"] == pytest.approx(cpu.dense["ppl"], rel=1e-4)
    assert gpu.pruned["ppl"] == pytest.approx(cpu.pruned["ppl"], rel=1e-2)


def test_magnitude_run_on_cuda_is_the_cpu_run_bit_for_bit(model_dir, text, tmp_path):
    """Magnitude reads no statistic: the saved checkpoints are identical, and so is the digest."""
    cpu, gpu = _on_both(model_dir, text, tmp_path, metric="magnitude")
    assert gpu.pruning["mask_sha256"] == cpu.pruning["mask_sha256"]
    a = load_file(str(tmp_path / "run0" / "model.safetensors"))
    b = load_file(str(tmp_path / "run1" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_perplexity_on_cuda_equals_cpu(model_dir, text):
    model, tok, _ = pw.load_model(str(model_dir))
    kw = dict(seqlen=16, max_tokens=320, progress=False)
    cpu = pw.evaluate(model, tok, f"file:{text}", device="cpu", **kw)["ppl"]
    gpu = pw.evaluate(model, tok, f"file:{text}", device="cuda", **kw)["ppl"]
    assert gpu == pytest.approx(cpu, rel=1e-5)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_sparse_checkpoint_runs_on_cuda(model_dir, text, tmp_path):
    """A ``--format sparse`` folder moved to the GPU gives the dense-format model's logits."""
    cfg = _cfg(model_dir, text, "cpu", eval_data=None)
    pw.run(cfg, out=tmp_path / "dense", cache_dir=tmp_path / "c", progress=False)
    pw.run(cfg, out=tmp_path / "sparse", cache_dir=tmp_path / "c", progress=False, format="sparse")
    dense, _ = pw.load(tmp_path / "dense")
    sparse, _ = pw.load(tmp_path / "sparse")
    ids = torch.randint(0, dense.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        want = dense.cuda()(ids).logits
        got = sparse.cuda()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_two_four_runs_on_the_semi_structured_kernel(calib):
    """A 2:4 model's layers convert to torch's semi-structured format and give the logits of the
    same model run densely (fp16; the kernel's shape rules want sizes in multiples of 64)."""
    from prunewise.evaluation.speed import semi_structured, to_semi_structured

    why = semi_structured(torch.device("cuda"), torch.float16)
    if why:
        pytest.skip(why)
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.intermediate_size = 128, 256
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).half().eval()
    pat = parse_pattern("2:4")
    prune_model(model, None, metric="magnitude", allocation={n: 0.5 for n in _linears(model)}, pattern=pat)
    model.cuda()
    ids = calib[:2].cuda()
    with torch.no_grad():
        want = model(ids).logits
        done, refused = to_semi_structured(model)
        got = model(ids).logits
    assert (done, refused) == (len(_linears(model)), 0)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
