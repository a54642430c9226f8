"""Zero-shot accuracy through lm-eval on the tiny local task shipped in tests/data/tasks."""

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import DATA, make_text, make_tokenizer, tiny_model
from prunewise.cli import main
from prunewise.errors import PrunewiseError
from prunewise.evaluation.zeroshot import parse_tasks, zero_shot

TASKS = DATA / "tasks"
DOCS = [json.loads(x) for x in (TASKS / "tiny_mc.jsonl").read_text().splitlines() if x.strip()]


@torch.no_grad()
def hand_accuracy(model, tok, docs):
    """acc and acc_norm computed directly: sum of log-probabilities of each choice's tokens after
    the query (a space between them), argmax; acc_norm divides by the choice's length in characters."""
    acc = acc_norm = 0
    for doc in docs:
        ctx = tok(doc["query"], add_special_tokens=False)["input_ids"]
        lls, lens = [], []
        for choice in doc["choices"]:
            whole = tok(doc["query"] + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx) :]
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            lls.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
            lens.append(len(choice))
        acc += max(range(len(lls)), key=lambda i: lls[i]) == doc["label"]
        acc_norm += max(range(len(lls)), key=lambda i: lls[i] / lens[i]) == doc["label"]
    return acc / len(docs), acc_norm / len(docs)


@pytest.mark.parametrize("arch,seed", [("llama", 0), ("gpt2", 3), ("qwen2", 5)])
def test_accuracy_equals_hand_computed_loglikelihoods(arch, seed, tokenizer):
    model = tiny_model(arch, seed=seed)
    out = zero_shot(model, tokenizer, "tiny_mc", include_path=TASKS, progress=False)
    acc, acc_norm = hand_accuracy(model, tokenizer, DOCS)
    entry = out["tasks"]["tiny_mc"]
    assert (entry["acc"], entry["acc_norm"]) == (acc, acc_norm)
    assert entry["samples"] == len(DOCS) == 8
    assert out["average"] == {"acc": acc, "acc_norm": acc_norm}
    assert out["num_fewshot"] == 0 and out["lm_eval"]


def test_limit_caps_examples(tokenizer):
    model = tiny_model("llama")
    out = zero_shot(model, tokenizer, "tiny_mc", include_path=TASKS, limit=3, progress=False)
    assert out["tasks"]["tiny_mc"]["samples"] == 3
    assert out["tasks"]["tiny_mc"]["acc"] == hand_accuracy(model, tokenizer, DOCS[:3])[0]


def test_presets_and_names():
    assert parse_tasks("paper") == [
        "boolq",
        "rte",
        "hellaswag",
        "winogrande",
        "arc_easy",
        "arc_challenge",
        "openbookqa",
    ]
    assert "piqa" in parse_tasks("atp") and "rte" not in parse_tasks("atp")
    assert parse_tasks("boolq, rte,boolq") == ["boolq", "rte"]
    with pytest.raises(PrunewiseError, match="no task"):
        parse_tasks(" , ")


def test_errors_unknown_task_missing_folder_missing_lm_eval(tokenizer, tmp_path, monkeypatch):
    model = tiny_model("llama")
    with pytest.raises(PrunewiseError, match=r"unknown lm-eval task 'tiny_mcc' \(did you mean tiny_mc"):
        zero_shot(model, tokenizer, "tiny_mcc", include_path=TASKS, progress=False)
    with pytest.raises(PrunewiseError, match="is not a folder"):
        zero_shot(model, tokenizer, "tiny_mc", include_path=tmp_path / "nope", progress=False)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(PrunewiseError, match=r"pip install 'prunewise\[eval\]'"):
        zero_shot(model, tokenizer, "tiny_mc", include_path=TASKS, progress=False)


def test_prune_with_tasks_evaluates_dense_and_pruned(tmp_path, capsys):
    tok = make_tokenizer()
    model_dir = tmp_path / "model"
    dense = tiny_model("llama", seed=2)
    dense.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    text = tmp_path / "t.txt"
    text.write_text(make_text(3000), encoding="utf-8")
    out = tmp_path / "run"
    argv = [
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
        "0.7",
        "--tasks",
        "tiny_mc",
        "--include-path",
        str(TASKS),
        "--out",
        str(out),
        "-q",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and "average" in printed
    record = json.loads((out / "pruning.json").read_text())
    zs = record["zero_shot"]
    assert record["config"]["tasks"] == "tiny_mc"
    dense_acc = hand_accuracy(dense, tok, DOCS)
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    pruned_acc = hand_accuracy(pruned, tok, DOCS)
    assert (zs["dense"]["tasks"]["tiny_mc"]["acc"], zs["dense"]["tasks"]["tiny_mc"]["acc_norm"]) == dense_acc
    assert (zs["pruned"]["tasks"]["tiny_mc"]["acc"], zs["pruned"]["tasks"]["tiny_mc"]["acc_norm"]) == pruned_acc
    # eval on the run folder: pruned measured again, dense taken from the record (same tasks)
    assert (
        main(["eval", "--model", str(out), "--data", "none", "--tasks", "tiny_mc", "--include-path", str(TASKS), "-q"])
        == 0
    )
    table = capsys.readouterr().out
    assert "dense" in table and "pruned" in table
    row = next(x for x in table.splitlines() if x.startswith("tiny_mc"))
    assert row.split()[1:] == [f"{v:.4f}" for v in (*dense_acc, *pruned_acc)]


def test_eval_needs_something_to_do(tmp_path, capsys):
    assert main(["eval", "--model", "smollm2-135m", "--data", "none"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
