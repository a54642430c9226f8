import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunewise.cli import main


def args_for(model_dir, text, out, *extra):
    return [
        "prune",
        "--model",
        str(model_dir),
        "--calib",
        f"file:{text}",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--out",
        str(out),
        "-q",
        *extra,
    ]


def test_prune_save_reload_and_rerun(model_dir, text, tmp_path, capsys):
    out = tmp_path / "w50"
    rc = main(
        args_for(
            model_dir,
            text,
            out,
            "--metric",
            "wanda",
            "--sparsity",
            "0.5",
            "--eval-data",
            f"file:{text}",
            "--max-tokens",
            "256",
        )
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "pruned (wanda)" in printed and "sparsity 0.500000" in printed
    rec = json.loads((out / "pruning.json").read_text())
    t = rec["timings"]
    # the summary gives the whole run and its parts, each as recorded
    assert (
        f"{rec['wall_s']:.1f} s in all (loading and calibration data {t['load_s']:.1f} s, allocation "
        f"{t['plan_s']:.1f} s, dense evaluation {t['dense_eval_s']:.1f} s, pruning {t['prune_s']:.1f} s, "
        f"perplexity {t['eval_s']:.1f} s)" in printed
    )
    parts = t["load_s"] + t["plan_s"] + t["dense_eval_s"] + t["prune_s"] + t["eval_s"]
    assert parts <= rec["wall_s"] < parts + 1.0  # the parts are the whole run, less bookkeeping
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    rec = json.loads((out / "pruning.json").read_text())
    assert rec["config"]["metric"] == "wanda" and rec["config"]["nsamples"] == 4
    assert rec["dense"]["tokens"] == 256 and rec["pruned"]["ppl"] > 0
    assert {"prunewise", "torch", "transformers"} <= set(rec["versions"])
    assert rec["memory"]["peak_rss_gb"] > 0 and rec["wall_s"] > 0
    assert len(rec["pruning"]["layers"]) == 3 * 7

    # plain transformers loads it, and the counted zeros match the record layer by layer
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for layer in rec["pruning"]["layers"]:
        w = reloaded.get_submodule(layer["name"]).weight
        assert int((w == 0).sum()) == layer["zeros"]
        assert layer["achieved"] == pytest.approx(0.5)
    assert not list(tmp_path.glob(".w50.tmp-*"))

    # rerun from the record: bit-identical masks and weights
    out2 = tmp_path / "again"
    assert main(["prune", "--config", str(out / "pruning.json"), "--out", str(out2), "-q"]) == 0
    rec2 = json.loads((out2 / "pruning.json").read_text())
    assert rec2["pruning"]["mask_sha256"] == rec["pruning"]["mask_sha256"]
    again = AutoModelForCausalLM.from_pretrained(out2)
    for (n, a), (_, b) in zip(reloaded.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n

    # eval of a run folder: dense (reused from the record, same protocol) vs pruned
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", f"file:{text}", "--max-tokens", "256", "-q"]) == 0
    table = capsys.readouterr().out
    assert "dense" in table and "pruned (wanda, 0.500)" in table
    assert f"{rec['dense']['ppl']:.3f}" in table and f"{rec['pruned']['ppl']:.3f}" in table
    # every evaluation is kept in the record, appended
    assert main(["eval", "--model", str(out), "--data", f"file:{text}", "--max-tokens", "128", "--no-dense", "-q"]) == 0
    evals = json.loads((out / "pruning.json").read_text())["evaluations"]
    assert len(evals) == 2 and evals[0]["perplexity"]["dense"] == rec["dense"]
    assert evals[0]["perplexity"]["pruned"]["ppl"] == pytest.approx(rec["pruned"]["ppl"], rel=1e-9)
    assert evals[1]["perplexity"]["dense"] is None and evals[1]["perplexity"]["pruned"]["tokens"] == 128
    assert json.loads((out / "pruning.json").read_text())["pruning"] == rec["pruning"]


def test_config_flags_override_record(model_dir, text, tmp_path):
    out = tmp_path / "m"
    assert main(args_for(model_dir, text, out, "--metric", "magnitude", "--sparsity", "0.3")) == 0
    out2 = tmp_path / "m2"
    assert main(["prune", "--config", str(out), "--sparsity", "0.6", "--out", str(out2), "-q"]) == 0
    rec = json.loads((out2 / "pruning.json").read_text())
    assert rec["config"]["metric"] == "magnitude" and rec["config"]["sparsity"] == 0.6
    for layer in rec["pruning"]["layers"]:
        numel = layer["shape"][0] * layer["shape"][1]
        assert layer["zeros"] == int(0.6 * numel + 0.5)


def test_two_four_pattern_saved(model_dir, text, tmp_path):
    out = tmp_path / "nm"
    assert main(args_for(model_dir, text, out, "--metric", "sparsegpt", "--pattern", "2:4")) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[1].mlp.down_proj.weight
    assert ((w == 0).view(w.shape[0], -1, 4).sum(-1) == 2).all()


def test_dry_run_prints_allocation_and_writes_nothing(model_dir, text, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(args_for(model_dir, text, out, "--dry-run", "--sparsity", "0.7")) == 0
    printed = capsys.readouterr().out
    assert "allocation 'uniform' at target 0.7 (21 layers)" in printed
    assert printed.count("0.7000") == 4 and "nan" not in printed and "achieved" not in printed  # 3 blocks + mean
    assert [line.split()[:2] for line in printed.splitlines()][-1] == ["all", "21"]
    assert not out.exists()


def test_verbose_prints_every_layer(model_dir, text, tmp_path, capsys):
    argv = args_for(model_dir, text, tmp_path / "v", "--metric", "magnitude", "--sparsity", "0.25")
    argv[argv.index("-q")] = "-v"
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "model.layers.2.mlp.down_proj" in out and out.count("0.2500") >= 2 * 21


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in (
        "magnitude",
        "wanda",
        "sparsegpt",
        "uniform",
        "blocksize=128",
        "percdamp=0.01",
        "2:4",
        "arXiv 2301.00774",
    ):
        assert word in out


BAD = [
    (["--metric", "wandda"], "did you mean 'wanda'"),
    (["--allocator", "unifrom"], "did you mean 'uniform'"),
    (["--metric", "sparsegpt:blocksz=64"], "did you mean 'blocksize'"),
    (["--sparsity", "1.0"], "sparsity: must be in [0, 1)"),
    (["--sparsity", "-0.1"], "sparsity: must be in [0, 1)"),
    (["--pattern", "4:2"], "N:M needs 0 < N < M"),
    (["--pattern", "2:4", "--sparsity", "0.7"], "pattern 2:4 fixes the sparsity at 0.5"),
    (["--nsamples", "0"], "nsamples: must be an integer >= 1"),
    (["--seqlen", "256"], "seqlen: 256 exceeds the model's context of 128"),
    (["--seqlen", "3000", "--nsamples", "1"], "exceeds the model's context"),
    (["--blocks-path", "model.nope"], "blocks_path"),
    (["--mode", "single-pass", "--propagate", "dense"], "single-pass mode always propagates"),
    (["--device", "tpu"], "device: must be 'cpu' or 'cuda[:N]'"),
    (["--calib", "c4"], "c4"),
    (["--calib", "nowhere"], "data: unknown source 'nowhere'"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_one_line_exit_2_no_output(model_dir, text, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    rc = main(args_for(model_dir, text, out, *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("prunewise: error:") and message in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


def test_bad_data_and_model(model_dir, text, tmp_path, capsys):
    out = tmp_path / "o"
    short = tmp_path / "short.txt"
    short.write_text("the of and to in", encoding="utf-8")
    cases = [
        (args_for(model_dir, short, out), "the calibration text has 5 tokens"),
        (args_for(model_dir, tmp_path / "none.txt", out), "no such file or folder"),
        (args_for(tmp_path / "missing_model", text, out), "no such folder or file"),
        (args_for(tmp_path, text, out), "not a Hugging Face model folder"),
        (args_for(tmp_path / "m.gguf", text, out), "no such .gguf file"),
        (args_for(model_dir, text, out, "--eval-data", f"file:{short}"), "fewer than one window"),
    ]
    for argv, message in cases:
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (argv, err)
        assert not out.exists()


def test_existing_output_needs_overwrite(model_dir, text, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(args_for(model_dir, text, out, "--metric", "magnitude")) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args_for(model_dir, text, out, "--metric", "magnitude", "--overwrite")) == 0
    assert (out / "pruning.json").is_file() and not (out / "keep.txt").exists()


def test_console_script_exit_code_no_traceback(model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "prunewise.cli", "prune", "--model", str(model_dir), "--sparsity", "2"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "prunewise: error: sparsity: must be in [0, 1), got 2.0"


def test_hub_id_offline_is_one_clear_line(tmp_path):
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PRUNEWISE_CACHE": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "prunewise.cli", "eval", "--model", "some-org/some-model"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunewise: error: model: cannot load 'some-org/some-model'")


def test_unsaved_run_says_so_first_and_uniform_runs_print_no_block_table(model_dir, text, capsys):
    base = [
        "prune",
        "--model",
        str(model_dir),
        "--calib",
        f"file:{text}",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--metric",
        "wanda",
        "--sparsity",
        "0.5",
    ]
    assert main(base) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "no --out given: the pruned model will not be saved"
    assert not any(line.split()[:1] == ["block"] for line in lines)  # uniform: nothing per block to show
    assert main(base + ["--allocator", "atp:beta=0.1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert any(line.split()[:1] == ["block"] for line in lines) and len(rows) == 3
    assert [float(r[3]) for r in rows] == pytest.approx([0.4, 0.5, 0.6], abs=1e-4)
