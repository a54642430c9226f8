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
