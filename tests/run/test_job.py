"""The job's set-up: a bad calibration or evaluation text fails before the model is loaded
(issue 22 case 8)."""

from __future__ import annotations

import pytest

from prunewise.cli import main
from prunewise.run import job


@pytest.mark.parametrize("flag", ["--calib", "--eval-data"])
def test_a_missing_text_fails_before_the_model_is_loaded(flag, model_dir, text, tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the text was checked")

    monkeypatch.setattr(job, "load_placed", never)
    other = "--eval-data" if flag == "--calib" else "--calib"
    argv = [
        "prune",
        "--model",
        str(model_dir),
        flag,
        f"file:{tmp_path / 'nope.txt'}",
        other,
        f"file:{text}",
        "--nsamples",
        "2",
        "--seqlen",
        "16",
        "--metric",
        "wanda",
        "-q",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no such file or folder" in err and "nope.txt" in err and err.count("\n") == 1


def test_a_second_run_on_the_same_dense_weights_reads_its_baseline_back(model_dir, text, tmp_path):
    """The dense perplexity is cached by the weights' fingerprint: a second run (other metric and
    sparsity) reads it back, the pruned model is always measured; new weights measure anew."""
    import prunewise as pw
    from helpers import run_config

    def once(name: str, **kw):
        cfg = run_config(model_dir, text, **kw)
        return pw.run(cfg, out=tmp_path / name, cache_dir=tmp_path / "cache", progress=False).record

    first = once("a", metric="wanda", sparsity=0.5)
    second = once("b", metric="magnitude", sparsity=0.6)
    assert "cached" not in first.dense and second.dense == {**first.dense, "cached": True}
    assert "cached" not in first.pruned and "cached" not in second.pruned
    assert second.pruned["ppl"] != first.pruned["ppl"]
    third = pw.run(run_config(tmp_path / "a", text), out=tmp_path / "c", cache_dir=tmp_path / "cache", progress=False)
    assert "cached" not in third.record.dense  # the pruned folder is another model
    assert third.record.dense["ppl"] == pytest.approx(first.pruned["ppl"], rel=1e-6)
