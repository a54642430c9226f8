"""Half precision: bf16 and fp16 models prune to exact counts with float32 statistics and solves,
keep their dtype, give the masks of a float32 run of the same weights (up to the score
differences half-precision activations make), and save in their own dtype.

The device is ``$PRUNEWISE_DEVICE`` (default cpu), as for every config-driven test, so the same
tests run on a GPU unchanged.
"""

import json

import pytest
import torch

import prunewise as pw
from helpers import tiny_model
from prunewise.config import default_device
from prunewise.model.layers import block_linears, find_blocks
from prunewise.prune.engine import prune_model
from prunewise.prune.masks import parse_pattern

DEVICE = default_device()
HALF = [torch.bfloat16, torch.float16]
# Share of mask entries a half-precision run must give as its float32 twin: magnitude sees the same
# numbers; data-driven metrics see activations rounded to 8 (bf16) or 11 (fp16) significant bits.
AGREE = {"magnitude": 1.0, "wanda": 0.99, "gblm": 0.99, "gradient": 0.99, "sparsegpt": 0.99}


def linears(model):
    path, blocks = find_blocks(model)
    return {f"{path}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in block_linears(b)}


def twins(dtype):
    """A half-precision model and a float32 model holding exactly its (rounded) weights."""
    half = tiny_model("llama").to(dtype)
    ref = tiny_model("llama")
    ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    return half, ref


def run(model, metric, calib, pattern="unstructured", sparsity=0.5):
    grads = None
    if metric in ("gblm", "gradient"):
        from prunewise.prune.gradients import collect_gradients

        grads = collect_gradients(model, calib, norm="l1", scale=100.0, device=DEVICE, progress=False)
    allocation = {name: sparsity for name in linears(model)}
    return prune_model(
        model,
        calib,
        metric=metric,
        allocation=allocation,
        pattern=parse_pattern(pattern),
        device=DEVICE,
        progress=False,
        grads=grads,
    )


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("metric", sorted(AGREE))
def test_half_precision_prunes_exactly_like_float32(metric, dtype, calib):
    half, ref = twins(dtype)
    result = run(half, metric, calib)
    run(ref, metric, calib)
    agree = []
    for (name, h), (_, r) in zip(linears(half).items(), linears(ref).items()):
        w = h.weight
        assert w.dtype == dtype and w.device.type == "cpu" and torch.isfinite(w.float()).all(), name
        zeros = int((w == 0).sum())
        assert zeros == w.numel() // 2, f"{name}: {zeros} zeros of {w.numel()}"
        agree.append(float(((w == 0) == (r.weight == 0)).float().mean()))
    assert min(agree) >= AGREE[metric], (metric, dtype, min(agree))
    assert result.sparsity == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_nm_and_perplexity(dtype, calib):
    half, ref = twins(dtype)
    run(half, "sparsegpt", calib, "2:4")
    for name, m in linears(half).items():
        groups = (m.weight == 0).reshape(m.weight.shape[0], -1, 4).sum(-1)
        assert (groups == 2).all(), name
    ids = calib.reshape(-1)
    p_half = pw.perplexity(half, ids, 24, device=DEVICE, progress=False)["ppl"]
    run(ref, "sparsegpt", calib, "2:4")
    p_ref = pw.perplexity(ref, ids, 24, device=DEVICE, progress=False)["ppl"]
    assert p_half == pytest.approx(p_ref, rel=0.05)  # float32 log-softmax over half-precision logits


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_saved_checkpoint_keeps_the_source_dtype(dtype, tokenizer, text_file, tmp_path):
    src = tmp_path / "src"
    tiny_model("llama").to(getattr(torch, dtype)).save_pretrained(src)
    tokenizer.save_pretrained(src)
    cfg = pw.PruneConfig(
        model=str(src), metric="wanda", sparsity=0.5, calib=f"file:{text_file}", nsamples=4, seqlen=32, device=DEVICE
    )
    pw.run(cfg, out=tmp_path / "out", progress=False)
    head = (tmp_path / "out" / "model.safetensors").read_bytes()
    header = json.loads(head[8 : 8 + int.from_bytes(head[:8], "little")])
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert dtypes == {"BF16" if dtype == "bfloat16" else "F16"}
    pw.run(cfg.replace(dtype="float32"), out=tmp_path / "out32", progress=False)  # --dtype overrides
    head = (tmp_path / "out32" / "model.safetensors").read_bytes()
    header = json.loads(head[8 : 8 + int.from_bytes(head[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32"}
