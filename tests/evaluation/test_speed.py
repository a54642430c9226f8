"""`prunewise speed`: a run's dense source, its pruned model run densely and on the sparse kernel,
every figure present, sizes and bytes exact, and an honest note where nothing skips zeros. Timings
themselves are not asserted (benchmarks/)."""

import json

import torch

from helpers import tiny_model
from prunewise.cli import main
from prunewise.evaluation.speed import _step, is_2_4


def _speed(run, out, *flags):
    args = ["speed", "--model", str(run), "--shapes", "1x16,2x16", "--decode", "1,2", "--steps", "3"]
    args += ["--tokens", "1,8", "--repeat", "1", "--json", str(out), "-q", "--device", "cpu", *flags]
    assert main(args) == 0
    return json.loads(out.read_text())


def test_speed_of_a_2_4_run_three_ways(tokenizer, text_file, tmp_path, capsys):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    run = tmp_path / "run"
    assert (
        main(["prune", "--model", str(src), "--metric", "magnitude", "--pattern", "2:4", "--out", str(run), "-q"]) == 0
    )
    report = _speed(run, tmp_path / "speed.json")
    printed = capsys.readouterr().out
    three = ["dense source", "pruned, dense", "pruned, sparse kernel"]
    assert [(r["model"], r["batch"], r["length"]) for r in report["prefill"]] == [
        (m, b, 16) for b in (1, 2) for m in three
    ]
    assert [(r["model"], r["batch"], r["steps"]) for r in report["decode"]] == [
        (m, b, 3) for b in (1, 2) for m in three
    ]
    assert all(r["tokens_per_s"] > 0 for r in report["prefill"] + report["decode"])
    # tiny llama, 3 blocks: q/k/v/o 32x32, gate/up 64x32, down 32x64; each at 1 and 8 rows
    assert sorted((tuple(r["shape"]), r["count"], r["tokens"]) for r in report["layers"]) == [
        (s, c, n) for s, c in (((32, 32), 12), ((32, 64), 3), ((64, 32), 6)) for n in (1, 8)
    ]
    for r in report["layers"]:
        assert r["nm"] and r["sparsity"] == 0.5 and r["sparse_ms"] is None and r["kernel_ms"] > 0
        rows, cols = r["shape"]
        assert r["kernel_bytes"] == rows * cols // 2 * 4 + rows * cols // 8  # fp32 values + one bit per weight
        assert r["on_kernel"] == (r["tokens"] <= 12)
    z = report["sizes"]
    packed = 12 * (32 * 32 // 2 * 4 + 32 * 4) + 6 * (64 * 16 * 4 + 64 * 4) + 3 * (32 * 32 * 4 + 32 * 8)
    dense_layers = (12 * 32 * 32 + 9 * 64 * 32) * 4
    assert (z["packed_layers"], z["packed_layers_dense"]) == (packed, dense_layers)
    assert z["sparse"] == z["dense"] - dense_layers + packed
    assert z["decode_read_dense"] - z["decode_read_sparse"] == dense_layers - packed
    assert report["notes"] == [] and report["kernel_isa"] in ("avx512+bf16", "avx512", "avx2", "scalar")
    assert "vs source" in printed and "decode can be at most" in printed
    plain = _speed(run, tmp_path / "plain.json", "--no-kernel")
    assert {r["model"] for r in plain["decode"]} == {"dense source", "pruned, dense"}
    assert all(r["kernel_ms"] is None for r in plain["layers"])
    assert len(plain["notes"]) == 1 and plain["notes"][0].startswith(
        "cpu: no 2:4 sparse matmul kernel on this device, and no sparse kernel measured"
    )


def test_models_left_out_are_neither_timed_nor_loaded(tokenizer, text_file, tmp_path, monkeypatch):
    """``--models source,kernel`` on a ``--format sparse`` run: the pruned model run densely is never
    loaded (the memory of one dense copy), the per-layer dense matmuls run on the source's weights,
    and the sparsity and sizes are still the pruned model's."""
    import prunewise.cli as cli

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    run = tmp_path / "run"
    prune = ["prune", "--model", str(src), "--metric", "magnitude", "--sparsity", "0.75", "--format", "sparse"]
    assert main([*prune, "--out", str(run), "-q"]) == 0
    loads = []
    real = cli.load_model
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    two = _speed(run, tmp_path / "two.json", "--models", "source,kernel")
    assert loads == []
    assert {r["model"] for r in two["prefill"] + two["decode"]} == {"dense source", "pruned, sparse kernel"}
    for r in two["layers"]:
        assert r["sparsity"] == 0.75 and r["dense_ms"] > 0 and r["kernel_ms"] > 0
    full = _speed(run, tmp_path / "full.json")
    assert loads == [str(run)] and two["sizes"] == full["sizes"]
    assert {r["model"] for r in full["decode"]} == {"dense source", "pruned, dense", "pruned, sparse kernel"}
    alone = _speed(run, tmp_path / "alone.json", "--models", "kernel")  # no source: the pruned model is the reference
    assert {r["model"] for r in alone["decode"]} == {"pruned, dense", "pruned, sparse kernel"}


def test_decode_step_uses_the_cache_and_matches_a_full_forward():
    model = tiny_model("llama")
    ids = torch.tensor([[5, 9, 17, 3]])
    with torch.no_grad():
        past, nxt = _step(model, ids[:, :3], None)
        _, after = _step(model, ids[:, 3:], past)
        full = model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)
    assert past is not None and torch.equal(after, full)
    assert nxt.shape == (1, 1)


def test_2_4_detection():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    assert is_2_4(w) and not is_2_4(torch.ones(1, 8)) and not is_2_4(torch.zeros(1, 6))


def test_speed_arguments_are_checked_in_one_line(tmp_path, capsys):
    for flags, message in (
        (["--shapes", "1x128,512"], "expected BATCHxLENGTH"),
        (["--shapes", "ax1"], "cannot read"),
        (["--decode", "0"], "positive integers"),
        (["--repeat", "0"], "repeat: must be at least 1"),
        (["--models", "source,kernl"], "unknown 'kernl'; did you mean 'kernel'?"),
        (["--models", "source"], "times nothing pruned"),
    ):
        assert main(["speed", "--model", str(tmp_path / "none"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
