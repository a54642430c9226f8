"""Nothing runs, nothing is lost, nothing is silently wrong: output folders that must not be
replaced, code shipped with a model, damaged or foreign cache entries, records and sweeps that name
a model rather than a path, one-line errors for bad input, stale temporary folders, SIGTERM, and
two sweeps into one folder."""

import dataclasses
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import make_text, tiny_model
from prunewise.cli import main
from prunewise.config import PruneConfig
from prunewise.errors import PrunewiseError
from prunewise.model import loading as models
from prunewise.model.streaming import model_fingerprint
from prunewise.run.export import EXPORTERS
from prunewise.run.results import read_results
from prunewise.storage.atomic import atomic_folder, clean_stale, hold
from prunewise.storage.cache import cached, entry
from prunewise.sweep.grid import Sweep
from prunewise.sweep.runner import _locked, run_sweep


def argv(model, text, *extra):
    return [
        "prune",
        "--model",
        str(model),
        "--calib",
        f"file:{text}",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--metric",
        "magnitude",
        "--sparsity",
        "0.5",
        "-q",
        *map(str, extra),
    ]


def snapshot(folder):
    return sorted((p.relative_to(folder).as_posix(), p.read_bytes()) for p in folder.rglob("*") if p.is_file())


# 1. --overwrite never destroys what it must not replace


def test_overwrite_refuses_the_current_folder_and_its_ancestors(model_dir, text, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (work / "sub" / "x").write_text("also mine")
    before = snapshot(work)
    monkeypatch.chdir(work / "sub")
    for out in (".", ".."):
        assert main(argv(model_dir, text, "--out", out, "--overwrite")) == 2
        assert "is the current folder or holds it" in capsys.readouterr().err
    assert snapshot(work) == before


def test_overwrite_refuses_the_source_model(model_dir, text, tmp_path, capsys):
    before = snapshot(model_dir)
    for out in (model_dir, model_dir.parent):
        assert main(argv(model_dir, text, "--out", out, "--overwrite")) == 2
        assert "which this run reads" in capsys.readouterr().err
    assert snapshot(model_dir) == before


def test_out_that_cannot_be_written_fails_before_any_work(model_dir, text, tmp_path, capsys):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    cases = {a_file: "is a file", a_file / "run": "is a file", "/proc/prunewise-run": "cannot create"}
    for out, message in cases.items():
        assert main(argv(model_dir, text, "--out", out, "--overwrite")) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert a_file.read_text() == "x"


# 2. code shipped with a model never runs unless asked


def test_auto_map_code_never_runs_and_nothing_prompts(tmp_path, text, capsys, monkeypatch):
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "ran"
    (evil / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evilmodel",
                "architectures": ["EvilModel"],
                "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
            }
        )
    )
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\n"))  # what would answer transformers' prompt
    assert main(argv(evil, text)) == 2
    assert not marker.exists()
    assert "--trust-remote-code" in capsys.readouterr().err


# 3. caches: tensors only, verified, recomputed when damaged or foreign


def test_cache_entries_are_verified_and_recomputed(tmp_path, caplog):
    calls = []

    def compute(value):
        def fn():
            calls.append(value)
            return {"a": torch.full((3,), float(value)), "b": torch.tensor(2.0)}  # a 0-dim tensor too

        return fn

    first = cached(tmp_path, "norms", "k1", compute(1))
    path = entry(tmp_path, "norms", "k1")
    assert path.suffix == ".safetensors" and set(load_file(str(path))) == {"a", "b"}
    assert torch.equal(cached(tmp_path, "norms", "k1", compute(9))["a"], first["a"]) and calls == [1]

    path.write_bytes(path.read_bytes()[:-5])  # truncated
    assert cached(tmp_path, "norms", "k1", compute(2))["a"][0] == 2 and calls == [1, 2]
    assert str(path) in caplog.text and "cannot be read" in caplog.text

    cached(tmp_path, "norms", "k2", compute(3))
    entry(tmp_path, "norms", "k1").write_bytes(entry(tmp_path, "norms", "k2").read_bytes())  # swapped
    assert cached(tmp_path, "norms", "k1", compute(4))["a"][0] == 4 and calls == [1, 2, 3, 4]
    assert "does not match its key" in caplog.text

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["a"][0] = 7.0  # same key and metadata, bytes changed under them
    save_file(tensors, str(path), metadata=meta)
    assert cached(tmp_path, "norms", "k1", compute(5))["a"][0] == 5 and "sha256" in caplog.text


def test_a_planted_pickle_in_the_cache_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = entry(tmp_path, "tokens", "k")
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps(Planted()))
    assert torch.equal(cached(tmp_path, "tokens", "k", lambda: torch.arange(3)), torch.arange(3))
    torch.save(Planted(), tmp_path / "tokens" / "k.pt")  # the old format's name is never read either
    cached(tmp_path, "tokens", "k", lambda: torch.arange(3))
    assert not marker.exists()


def test_fingerprint_handles_scalar_buffers():
    model = tiny_model("llama")
    base = model_fingerprint(model)
    model.register_buffer("scale", torch.tensor(0.5))  # as Gemma 3 holds
    assert model_fingerprint(model) != base
    model.scale.fill_(0.25)
    assert len({base, model_fingerprint(model)}) == 2


def test_two_first_conversions_of_the_bundled_model_do_not_crash(tmp_path, tokenizer, monkeypatch):
    """The other process finishes the conversion first: this one uses its folder."""

    def racing(source, out, **kw):
        with atomic_folder(out) as tmp:  # the other process's rename lands first
            tiny_model("llama").save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        raise OSError(39, "Directory not empty")  # then this one's rename fails

    monkeypatch.setattr(models, "convert_gguf", racing)
    folder = models.bundled_model_dir("smollm2-135m", tmp_path)
    assert (folder / "config.json").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


# 4. records and sweeps name a model, not a path


def test_record_fingerprint_and_rerun_from_another_folder(model_dir, text, tmp_path, monkeypatch, capsys):
    work = tmp_path / "a"
    work.mkdir()
    monkeypatch.chdir(work)
    rel = os.path.relpath(model_dir, work)
    assert main(argv(rel, text, "--out", "run")) == 0
    rec = json.loads((work / "run" / "pruning.json").read_text())
    loaded, _, _ = models.load_model(str(model_dir))
    assert rec["source"]["fingerprint"] == model_fingerprint(loaded)
    assert rec["source"]["path"] == str(model_dir.resolve())
    elsewhere = tmp_path / "b"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the typed relative path means nothing here; the record's location does
    assert main(["prune", "--config", str(work / "run" / "pruning.json"), "-q", "--out", "again"]) == 0
    again = json.loads((elsewhere / "again" / "pruning.json").read_text())
    assert again["pruning"]["mask_sha256"] == rec["pruning"]["mask_sha256"]


def test_rerun_refuses_a_model_whose_weights_changed(tokenizer, text, tmp_path, capsys):
    src = tmp_path / "m"
    tiny_model("llama", seed=0).save_pretrained(src)
    tokenizer.save_pretrained(src)
    assert main(argv(src, text, "--out", tmp_path / "run")) == 0
    tiny_model("llama", seed=1).save_pretrained(src)  # same path, other weights
    capsys.readouterr()
    assert main(["prune", "--config", str(tmp_path / "run" / "pruning.json"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "is not the model the record was made from" in err and err.count("\n") == 1
    # naming the model explicitly is the way to prune it anyway
    assert main(["prune", "--config", str(tmp_path / "run" / "pruning.json"), "--model", str(src), "-q"]) == 0


def test_sweep_resume_refuses_another_models_results(tokenizer, text, tmp_path):
    src = tmp_path / "m"
    tiny_model("llama", seed=0).save_pretrained(src)
    tokenizer.save_pretrained(src)
    base = PruneConfig(model=str(src), calib=f"file:{text}", nsamples=4, seqlen=32)
    run_sweep(
        Sweep(base=base, metrics=["magnitude"], allocators=["uniform"], sparsities=[0.5], patterns=["unstructured"]),
        tmp_path / "s",
        progress=False,
    )
    assert read_results(tmp_path / "s")[0]["source"]["fingerprint"]
    tiny_model("llama", seed=1).save_pretrained(src)
    more = Sweep(
        base=base, metrics=["magnitude"], allocators=["uniform"], sparsities=[0.5, 0.6], patterns=["unstructured"]
    )
    with pytest.raises(PrunewiseError, match="is not the model the results in .* was made from"):
        run_sweep(more, tmp_path / "s", progress=False)
    assert len(read_results(tmp_path / "s")) == 1


# 5. one line for bad input, early


BAD_SPECS = {
    ("--allocator", "atp:heldout=0"): "atp.heldout must be in [1, inf)",
    ("--allocator", "owl:max_sparsity=2"): "owl.max_sparsity must be in (0, 1]",
    ("--allocator", "alphapruning:max_sparsity=5"): "alphapruning.max_sparsity must be in (0, 1]",
    ("--allocator", "owl:m=inf"): "owl.m must be a finite number",
    ("--allocator", "owl:m=-1"): "owl.m must be in (0, inf)",
    ("--metric", "sparsegpt:percdamp=nan"): "sparsegpt.percdamp must be a finite number",
    ("--allocator", "alphapruning:fit=xmin_pek"): "did you mean 'xmin_peak'",
}


@pytest.mark.parametrize("flag,message", [(k, v) for k, v in BAD_SPECS.items()], ids=lambda x: str(x))
def test_bad_hyperparameter_values_fail_before_loading_anything(flag, message, tmp_path, text, capsys):
    assert main(argv(tmp_path / "no-such-model", text, *flag)) == 2  # the value is checked before the model
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


CONFIGS = {
    "device": (None, "device: must be a string"),
    "blocks_path": (7, "blocks_path: must be a string or null"),
    "eval_data": (123, "eval_data: must be a string or null"),
    "seed": (True, "seed: must be an integer"),
}


@pytest.mark.parametrize("field", sorted(CONFIGS))
def test_bad_config_fields_are_one_line(field, tmp_path, capsys):
    value, message = CONFIGS[field]
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"config": {**PruneConfig().to_dict(), field: value}}))
    assert main(["prune", "--config", str(cfg), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_unknown_top_level_config_field_and_cache_dir_file(tmp_path, model_dir, text, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"config": PruneConfig().to_dict(), "sparsityy": 0.5}))
    assert main(["prune", "--config", str(cfg), "-q"]) == 2
    assert "unknown top-level field(s) sparsityy" in capsys.readouterr().err
    a_file = tmp_path / "cachefile"
    a_file.write_text("x")
    assert main(argv(model_dir, text, "--cache-dir", a_file)) == 2
    assert "cache_dir: " in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_damaged_checkpoints_are_one_line(damage, model_dir, text, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "random": os.urandom(4096), "empty": b""}[damage])
    assert main(argv(bad, text)) == 2
    err = capsys.readouterr().err
    assert f"model: cannot load {bad}" in err and err.count("\n") == 1


def test_bad_text_and_repeating_windows(model_dir, tmp_path, capsys, caplog):
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"\x00" * 5000)
    assert main(argv(model_dir, nul, "--metric", "wanda")) == 2
    assert "does not look like text" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text(make_text(400), encoding="utf-8")
    assert main(argv(model_dir, short, "--metric", "wanda", "--nsamples", "100")) == 0
    assert "windows repeat parts of the text" in caplog.text


def test_result_lines_that_are_not_results_are_skipped(tmp_path, capsys):
    good = {
        "key": "k",
        "kind": "run",
        "status": "ok",
        "config": {**PruneConfig().to_dict(), "sparsity": 0.5},
        "pruned": {"ppl": 10.0},
        "pruning": {"target": 0.5, "sparsity": 0.5},
        "schema": 2,
    }
    lines = [json.dumps(good), json.dumps({"kind": "run"}), json.dumps([1, 2]), "{torn"]
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    assert [r["key"] for r in read_results(tmp_path)] == ["k"]
    assert main(["report", str(tmp_path)]) == 0


# stale temporary folders, SIGTERM


def test_stale_temporary_folders_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    target = tmp_path / "run"
    (tmp_path / f".run.tmp-{dead}-abc").mkdir()
    (tmp_path / f".run.tmp-{dead}-abc" / "model.safetensors").write_bytes(b"0" * 1000)
    (tmp_path / f".run.tmp-{dead}-abc" / ".lock").touch()  # its writer's lock, released when it died
    live = tmp_path / f".run.tmp-{os.getpid()}-live"
    live.mkdir()
    held = hold(live / ".lock")  # a live writer's: left alone
    (tmp_path / f".run.old-{dead}-xyz" / "run").mkdir(parents=True)  # killed mid-swap: the only copy
    (tmp_path / f".run.old-{dead}-xyz" / "run" / "pruning.json").write_text("{}")
    (tmp_path / f".run.old-{dead}-xyz" / ".lock").touch()
    legacy = tmp_path / f".run.tmp-{dead}-legacy"  # written before locks: a dead pid and old enough
    legacy.mkdir()
    os.utime(legacy, (time.time() - 3600, time.time() - 3600))
    young = tmp_path / f".run.tmp-{dead}-young"  # no lock yet, just created: left alone
    young.mkdir()
    clean_stale(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, young.name, "run"])
    assert (target / "pruning.json").read_text() == "{}"
    held.close()
    with atomic_folder(tmp_path / "other") as tmp:
        assert tmp.name.startswith(f".other.tmp-{os.getpid()}-")


def test_sigterm_while_saving_leaves_nothing_behind(model_dir, text, tmp_path, monkeypatch, capsys):
    def killed(model, tokenizer, folder):
        (folder / "model.safetensors").write_bytes(b"0" * 1000)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setitem(EXPORTERS._entries, "safetensors", dataclasses.replace(EXPORTERS.get("safetensors"), fn=killed))
    previous = signal.getsignal(signal.SIGTERM)
    assert main(argv(model_dir, text, "--out", tmp_path / "run")) == 130
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is previous


# 6. one sweep per folder


def test_a_second_sweep_into_a_busy_folder_is_refused(tmp_path, model_dir, text):
    base = PruneConfig(model=str(model_dir), calib=f"file:{text}", nsamples=4, seqlen=32)
    sweep = Sweep(base=base, metrics=["magnitude"], allocators=["uniform"], sparsities=[0.5], patterns=["unstructured"])
    with _locked(tmp_path / "s"):
        with pytest.raises(PrunewiseError, match=f"in use by another sweep \\(pid {os.getpid()}\\)"):
            run_sweep(sweep, tmp_path / "s", progress=False)
    assert read_results(tmp_path / "s") == []
    run_sweep(sweep, tmp_path / "s", progress=False)  # free again once the first one is done
    assert len(read_results(tmp_path / "s")) == 1


def test_a_pickled_checkpoint_and_a_short_gguf_are_one_line(model_dir, text, tmp_path, capsys):
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    with open(pickled / "pytorch_model.bin", "wb") as fh:
        pickle.dump(Planted(), fh)
    assert main(argv(pickled, text)) == 2
    err = capsys.readouterr().err
    assert f"model: cannot load {pickled}" in err and err.count("\n") == 1 and not marker.exists()
    short = tmp_path / "m.gguf"
    short.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    assert main(argv(short, text)) == 2
    err = capsys.readouterr().err
    assert f"model: cannot read {short.resolve()}" in err and err.count("\n") == 1


def test_a_damaged_conversion_of_the_bundled_model_is_redone(tmp_path, tokenizer, monkeypatch, caplog):
    def convert(source, out, **kw):
        with atomic_folder(out) as tmp:
            tiny_model("llama").save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

    monkeypatch.setattr(models, "convert_gguf", convert)
    folder = models.bundled_model_dir("smollm2-135m", tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    model, _, source = models.load_model("smollm2-135m", cache_dir=tmp_path)
    assert source.path == str(folder) and model_fingerprint(model) == model_fingerprint(tiny_model("llama"))
    assert "converting smollm2-135m again" in caplog.text
