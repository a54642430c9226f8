"""`prunewise speed`: a run against its dense source, every figure present, and an honest note
where no sparse kernel runs (the CPU). Timings themselves are not asserted (benchmarks/)."""

import json

import torch

from helpers import tiny_model
from prunewise.cli import main
from prunewise.evaluation.speed import _step, is_2_4


def test_speed_of_a_2_4_run_against_its_dense_source(tokenizer, text_file, tmp_path, capsys):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    run = tmp_path / "run"
    assert (
        main(["prune", "--model", str(src), "--metric", "magnitude", "--pattern", "2:4", "--out", str(run), "-q"]) == 0
    )
    out = tmp_path / "speed.json"
    assert (
        main(
            [
                "speed",
                "--model",
                str(run),
                "--shapes",
                "1x16,2x16",
                "--decode",
                "1,2",
                "--steps",
                "3",
                "--tokens",
                "8",
                "--repeat",
                "1",
                "--json",
                str(out),
                "-q",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [(r["model"], r["batch"], r["length"]) for r in report["prefill"]] == [
        ("dense", 1, 16),
        ("dense", 2, 16),
        ("pruned", 1, 16),
        ("pruned", 2, 16),
    ]
    assert [(r["model"], r["batch"], r["steps"]) for r in report["decode"]] == [
        ("dense", 1, 3),
        ("dense", 2, 3),
        ("pruned", 1, 3),
        ("pruned", 2, 3),
    ]
    assert all(r["tokens_per_s"] > 0 for r in report["prefill"] + report["decode"])
    # tiny llama, 3 blocks: q/k/v/o 32x32, gate/up 64x32, down 32x64
    assert sorted((tuple(r["shape"]), r["count"]) for r in report["layers"]) == [
        ((32, 32), 12),
        ((32, 64), 3),
        ((64, 32), 6),
    ]
    assert all(r["nm"] and r["sparsity"] == 0.5 and r["sparse_ms"] is None for r in report["layers"])
    assert len(report["notes"]) == 1 and report["notes"][0].startswith(
        "cpu: no sparse matmul kernel on this device: the pruned model runs the same dense matmuls as the dense "
        "one, so its zeros buy no speed here"
    )
    assert "prefill tokens/s" in printed and "note: cpu: no sparse matmul kernel" in printed


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
    ):
        assert main(["speed", "--model", str(tmp_path / "none"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
