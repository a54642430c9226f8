"""Streaming models larger than memory: the same masks, records and perplexities as in memory.

Every metric with every allocator runs twice on a tiny checkpoint, held in memory and streamed
from its safetensors file, each with its own cache (nothing computed in one is reused by the
other): masks, saved tensors, fingerprints and perplexities must be identical. The bundled model
repeats that for each metric and each allocator once; a 3 GB random checkpoint is pruned and
evaluated in a child process under a 1 GB memory limit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from helpers import make_tokenizer, run_config, sharded_checkpoint, tiny_config
from prunewise.cli import main
from prunewise.config import PruneConfig
from prunewise.errors import PrunewiseError
from prunewise.model.loading import bundled_model_dir, load_model, load_skeleton
from prunewise.model.memory import PROCESS, Workload, estimate, gradient_pass
from prunewise.model.sources import make_source
from prunewise.model.streaming import model_fingerprint, random_checkpoint, stream_of
from prunewise.prune import gradients
from prunewise.run.evaluate import evaluate_run
from prunewise.run.pipeline import run
from prunewise.storage.cache import default_cache_dir
from prunewise.storage.shards import Checkpoint, ShardWriter


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_shard_writer_round_trip_in_any_order(tmp_path):
    g = torch.Generator().manual_seed(0)
    values = {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.tensor(11),
        "d": torch.randn(4, 4, generator=g).half(),
        "e": torch.zeros(0, 3),
    }
    writer = ShardWriter(tmp_path, [(k, v.dtype, tuple(v.shape)) for k, v in values.items()], max_shard_bytes=64)
    for name in ("d", "e", "b", "a", "c"):
        writer.put(name, values[name])
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(values) and len(set(index["weight_map"].values())) == 2  # a; b..e
    loaded, ckpt = _tensors(tmp_path), Checkpoint(tmp_path)
    for name, v in values.items():
        assert loaded[name].dtype == v.dtype and torch.equal(loaded[name], v)
        assert torch.equal(ckpt.read(name), v)


def test_shard_writer_refuses_a_wrong_or_missing_tensor(tmp_path):
    writer = ShardWriter(tmp_path, [("a", torch.float32, (2,)), ("b", torch.float32, (2,))])
    with pytest.raises(PrunewiseError, match="arrived as"):
        writer.put("a", torch.zeros(3))
    writer.put("a", torch.zeros(2))
    with pytest.raises(PrunewiseError, match="never written"):
        writer.close()


def test_skeleton_reads_the_same_model(model_dir, tokenizer):
    whole, _, _ = load_model(str(model_dir))
    streamed, _, _ = load_model(str(model_dir), stream=True)
    assert stream_of(whole) is None and stream_of(streamed) is not None
    inside = [n for n, p in streamed.named_parameters() if p.is_meta]
    assert inside and all(n.startswith("model.layers.") for n in inside)  # only the blocks stay on disk
    assert model_fingerprint(streamed) == model_fingerprint(whole)


def test_each_streamed_block_gives_its_freed_heap_back(model_dir, monkeypatch):
    """After every block's step the free heap is released (fragments of freed block weights and
    temporaries stayed resident otherwise: +0.4-0.7 GB over Qwen2.5-Coder 0.5B's 24 blocks), and
    only after the block's weights are set back to meta."""
    from prunewise.model import streaming
    from prunewise.model.sources import replay

    streamed, _, _ = load_model(str(model_dir), stream=True)
    blocks = make_source(streamed).blocks
    seen: list[bool] = []
    monkeypatch.setattr(
        streaming, "release_free_heap", lambda: seen.append(all(p.is_meta for p in blocks.parameters())) or True
    )
    ids = torch.randint(0, streamed.config.vocab_size, (2, 16))
    replay(streamed, ids)
    assert seen == [True] * (len(blocks) + 1)  # capture reads block 0 once to probe its output type


def _cfg(model_dir: Path, text: Path, metric: str, allocator: str, stream: str, **kw) -> PruneConfig:
    return run_config(model_dir, text, metric=metric, allocator=allocator, sparsity=0.5, stream=stream, **kw)


def _both(tmp_path: Path, make) -> tuple:
    """The run in memory and streamed, each with its own cache."""
    outs = [
        run(make(mode), out=tmp_path / mode, cache_dir=tmp_path / f"cache-{mode}", progress=False)
        for mode in ("off", "on")
    ]
    return outs[0].record, outs[1].record


def _assert_same(tmp_path: Path, a, b) -> None:
    assert (a.memory["mode"], b.memory["mode"]) == ("memory", "stream")
    assert a.source["fingerprint"] == b.source["fingerprint"]
    assert a.pruning["mask_sha256"] == b.pruning["mask_sha256"]
    assert [x["zeros"] for x in a.pruning["layers"]] == [x["zeros"] for x in b.pruning["layers"]]
    assert a.allocation["blocks"] == b.allocation["blocks"]
    assert a.dense == b.dense and a.pruned == b.pruned
    ta, tb = _tensors(tmp_path / "off"), _tensors(tmp_path / "on")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


ALLOCATORS = (
    "uniform",
    "owl",
    "alphapruning",
    "atp:beta=0.1",
    "atp:beta=auto,step=0.1",
    "mrp",
    "mrp:stats=dynamic,rounds=2",
)


@pytest.mark.parametrize("allocator", ALLOCATORS)
@pytest.mark.parametrize("metric", ("magnitude", "wanda", "sparsegpt", "gblm"))
def test_streamed_run_equals_in_memory(model_dir, text, tmp_path, metric, allocator):
    a, b = _both(tmp_path, lambda mode: _cfg(model_dir, text, metric, allocator, mode))
    _assert_same(tmp_path, a, b)


@pytest.mark.parametrize(
    "metric,allocator",
    [
        ("wanda", "dlp"),
        ("sparsegpt", "lsa"),
        ("magnitude", "lsa:granularity=layer"),
        ("wanda", "auto:candidates=uniform/dlp/lsa,heldout=2"),
    ],
)
def test_streamed_newer_allocators_equal_in_memory(model_dir, text, tmp_path, metric, allocator):
    a, b = _both(tmp_path, lambda mode: _cfg(model_dir, text, metric, allocator, mode))
    _assert_same(tmp_path, a, b)
    if allocator.startswith("auto"):
        same = ("allocator", "heldout_ppl", "blocks")
        rows = [[{k: r[k] for k in same} for r in x.allocation["auto"]["candidates"]] for x in (a, b)]
        assert rows[0] == rows[1]


@pytest.mark.parametrize("pattern", ("2:4", "unstructured:group=matrix"))
def test_streamed_patterns_and_single_pass(model_dir, text, tmp_path, pattern):
    a, b = _both(
        tmp_path,
        lambda mode: _cfg(model_dir, text, "wanda", "uniform", mode, pattern=pattern, mode="single-pass").replace(
            sparsity=None
        ),
    )
    _assert_same(tmp_path, a, b)


def test_gblm_spills_block_inputs_to_disk(model_dir, text, tmp_path, monkeypatch):
    """With almost no memory available the kept block inputs go to disk: same gradients, same masks."""
    spills: list[bool] = []
    saved: list[str] = []
    stores: list[tuple | None] = []

    class Recording(gradients._Kept):
        def __init__(self, spill: bool, blocks: int):
            spills.append(spill)
            super().__init__(spill, blocks)

        def take(self, i, device):
            if i == self.blocks - 1:  # the first taken: every block's inputs are in
                stores.append(None if self.store is None else (tuple(self.store.shape), len(self.memory)))
            return super().take(i, device)

    real_save = torch.save
    monkeypatch.setattr(gradients, "_Kept", Recording)

    def save(obj, path, *args, **kwargs):
        if "prunewise-inputs-" in str(path):
            saved.append(str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    kept = run(
        _cfg(model_dir, text, "gblm", "uniform", "on"), out=tmp_path / "kept", cache_dir=tmp_path / "c1", progress=False
    ).record
    assert spills == [False] and saved == []
    # in memory every block's inputs of every window are one tensor (one allocation: no fragmented heap)
    assert stores == [((len(kept.allocation["blocks"]), 4, 1, 16, 32), 0)]  # blocks, windows, batch, tokens, hidden
    monkeypatch.setattr(gradients, "host_available", lambda: 1)
    spilled = run(
        _cfg(model_dir, text, "gblm", "uniform", "on"),
        out=tmp_path / "spilled",
        cache_dir=tmp_path / "c2",
        progress=False,
    ).record
    assert spills == [False, True] and stores[1] is None
    blocks = len(kept.allocation["blocks"])
    assert len(saved) == blocks  # one file of kept inputs a block, on disk
    assert kept.pruning["mask_sha256"] == spilled.pruning["mask_sha256"]


def test_bf16_sharded_checkpoint_stays_bf16_and_sharded(tmp_path):
    src = random_checkpoint(
        tmp_path / "src",
        tiny_config("llama", vocab=64, layers=4),
        dtype=torch.bfloat16,
        tokenizer=make_tokenizer(),
        max_shard_bytes=20_000,
    )
    assert len(list(src.glob("*.safetensors"))) >= 3
    out = tmp_path / "out"
    rec = run(
        PruneConfig(model=str(src), metric="magnitude", sparsity=0.5, stream="on"), out=out, progress=False
    ).record
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    saved = _tensors(out)
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    for layer in rec.pruning["layers"]:  # exact sparsity, counted from the saved shards
        w = saved[layer["name"] + ".weight"]
        assert int((w == 0).sum()) == layer["zeros"] == w.numel() // 2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".prunewise-stream")]  # scratch moved, none left


def test_eval_of_a_streamed_run_reuses_nothing_and_agrees(model_dir, text, tmp_path):
    rec = run(_cfg(model_dir, text, "wanda", "uniform", "on"), out=tmp_path / "run", progress=False).record
    kw = dict(data=f"file:{text}", seqlen=16, max_tokens=320, dense=False, progress=False)
    streamed = evaluate_run(str(tmp_path / "run"), stream="on", **kw).perplexity[0][1]
    whole = evaluate_run(str(tmp_path / "run"), stream="off", **kw).perplexity[0][1]
    assert streamed == whole and streamed["ppl"] == rec.pruned["ppl"]


def test_streaming_refusals(model_dir, text, tmp_path):
    with pytest.raises(PrunewiseError, match="local safetensors folder"):
        run(PruneConfig(model="org/not-here", metric="magnitude", stream="on"), progress=False)
    with pytest.raises(PrunewiseError, match="zero-shot"):
        run(_cfg(model_dir, text, "magnitude", "uniform", "on", tasks="wiki_cloze"), progress=False)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for f in model_dir.iterdir():
        if f.suffix != ".safetensors":
            (renamed / f.name).write_bytes(f.read_bytes())
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.0.mlp.up.weight"] = tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, renamed / "model.safetensors")
    with pytest.raises(PrunewiseError, match="no tensor for model.layers.0.mlp.up_proj.weight"):
        load_skeleton(renamed)
    (renamed / "model.safetensors").unlink()
    with pytest.raises(PrunewiseError, match="holds no safetensors weights"):
        load_skeleton(renamed)


def test_auto_mode_streams_only_what_does_not_fit(model_dir):
    model, _, _ = load_model(str(model_dir), stream=True)
    work = Workload(windows=4, seqlen=16)
    need = estimate(model, work, stream="off").host_memory
    assert estimate(model, work, available=int(need / 0.9) + 1).mode == "memory"
    assert estimate(model, work, available=int(need / 0.9) - 1).mode == "stream"
    assert estimate(model, work, available=1, stream="off").mode == "memory"
    assert estimate(model, work, available=1 << 50, stream="on").mode == "stream"
    est = estimate(model, work, stream="on")  # streamed: the blocks' weights become three blocks'
    assert est.host_memory - est.host_stream == est.parts["weights"] - est.parts["outside"] - 3 * est.parts["block"]


def test_gblm_gradient_pass_enters_the_estimate(model_dir, text, tmp_path):
    """GBLM's gradient pass runs before the walk: its terms, hand-computed for the tiny LLaMA
    (3 blocks, hidden 32, MLP 64, 4 heads, vocabulary 192, float32, 16-token windows), bound the
    estimate in both modes, and a run's record carries them."""
    model, _, _ = load_model(str(model_dir), stream=True)
    source = make_source(model)
    prunable, largest = 3 * (4 * 32 * 32 + 3 * 64 * 32), 64 * 32
    per_block = 16 * (10 * 32 + 3 * 64 + 4 * 16) * 4  # one window through one block
    logits = 4 * 16 * 192 * 4
    assert gradient_pass(source, 16, "whole") == {
        "accumulators": 4 * prunable,
        "gradient": 4 * largest,
        "activations": 3 * per_block + logits,
    }
    assert gradient_pass(source, 16, "blocks")["activations"] == 3 * 16 * 32 * 4 + per_block + logits
    kept, grads = 3 * 4 * 16 * 32 * 4, 4 * 16 * 32 * 4  # every block's inputs of 4 windows; their head gradients
    streamed = gradient_pass(source, 16, "stream", windows=4, available=1 << 40)
    assert streamed == {
        "accumulators": 4 * prunable // 3,
        "gradient": 4 * largest,
        "activations": kept + per_block + grads + logits,
    }
    spilled = gradient_pass(source, 16, "stream", windows=4, available=4 * kept - 4)
    assert streamed["activations"] - spilled["activations"] == kept - kept // 3
    work = Workload(windows=4, seqlen=16)
    plain, gblm = (estimate(model, w, available=1 << 40) for w in (work, Workload(4, 16, gradients="whole")))
    whole = sum(gradient_pass(source, 16, "whole").values())
    assert (gblm.parts["gradient_pass"], gblm.parts["gradient_pass_streamed"]) == (whole, sum(streamed.values()))
    assert gblm.host_memory == max(plain.host_memory + 4 * prunable, PROCESS + plain.parts["weights"] + whole)
    outside, block = plain.parts["outside"], plain.parts["block"]
    assert gblm.host_stream == max(plain.host_stream, PROCESS + outside + 3 * block + sum(streamed.values()))
    rec = run(_cfg(model_dir, text, "gblm", "uniform", "off"), out=tmp_path / "r", progress=False).record
    assert rec.memory["gradient_pass_gb"] == round(whole / 1e9, 3) and rec.memory["mode"] == "memory"


def test_gblm_gradient_pass_on_cuda_is_counted_on_the_device(model_dir):
    """On CUDA the pass runs on the device (only shapes are read: no GPU needed here): a whole
    backward holds the whole model and every term there, a block-wise one the parts outside the
    blocks and one block, a streamed one one block and the streamed terms; the host gets the
    accumulators back on top of the weights it holds."""
    model, _, _ = load_model(str(model_dir), stream=True)
    source = make_source(model)
    acc = gradient_pass(source, 16, "whole")["accumulators"]
    plain = estimate(model, Workload(4, 16), device="cuda", stream="off", available=1 << 40)
    total, outside, block = plain.parts["weights"], plain.parts["outside"], plain.parts["block"]
    for how, resident in (("whole", total), ("blocks", outside + block)):
        held = sum(gradient_pass(source, 16, how).values())
        got = estimate(model, Workload(4, 16, gradients=how), device="cuda", stream="off", available=1 << 40)
        assert got.device == max(plain.device, resident + held), how
        assert got.host_memory == plain.host_memory + acc and got.host_stream == plain.host_stream
    streamed = sum(gradient_pass(source, 16, "stream", windows=4, available=1 << 40).values())
    on = estimate(model, Workload(4, 16, gradients="whole"), device="cuda", stream="on", available=1 << 40)
    assert on.mode == "stream" and on.device == max(plain.device, outside + block + streamed)


def _cgroup_v1(limit: int) -> Path | None:
    """A fresh cgroup v1 memory group with ``limit`` bytes, when this process may make one."""
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "memory.limit_in_bytes").is_file() or not os.access(root, os.W_OK):
        return None
    group = root / f"prunewise-test-{os.getpid()}"
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit))
    except OSError:
        return None
    return group


@pytest.mark.real
def test_prunes_and_evaluates_a_checkpoint_three_times_larger_than_its_memory(tmp_path, text):
    """A 3 GB random-init LLaMA pruned (Wanda) and evaluated by a child process under 1 GB: under a
    real cgroup limit with --stream auto where the machine allows (the run must choose to stream),
    else with --stream on; its peak RSS from getrusage, exact sparsity from the saved shards."""
    limit = 10**9
    config = LlamaConfig(
        vocab_size=len(make_tokenizer()),
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=72,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    src = random_checkpoint(tmp_path / "big", config, tokenizer=make_tokenizer(), max_shard_bytes=5 * 10**8)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert size > 3 * limit
    group = _cgroup_v1(limit)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "prunewise",
        "prune",
        "--model",
        str(src),
        "--metric",
        "wanda",
        "--sparsity",
        "0.5",
        "--calib",
        f"file:{text}",
        "--nsamples",
        "2",
        "--seqlen",
        "64",
        "--eval-data",
        f"file:{text}",
        "--eval-seqlen",
        "64",
        "--max-tokens",
        "512",
        "--stream",
        "auto" if group else "on",
        "--out",
        str(out),
        "-q",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    # A parent of its own, so RUSAGE_CHILDREN is this run's alone; it joins the cgroup before exec.
    probe = textwrap.dedent(f"""
        import os, resource, subprocess, sys
        group = {str(group) if group else None!r}
        pre = (lambda: open(os.path.join(group, "cgroup.procs"), "w").write(str(os.getpid()))) if group else None
        rc = subprocess.run({cmd!r}, preexec_fn=pre).returncode
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, rc)
    """)
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=1500)
    finally:
        if group is not None:
            group.rmdir()
    peak, rc = map(int, done.stdout.split()[-2:])
    assert rc == 0, done.stderr[-3000:]
    assert peak < limit, f"peak RSS {peak / 1e9:.2f} GB"
    rec = json.loads((out / "pruning.json").read_text())
    assert rec["memory"]["mode"] == "stream"
    saved = _tensors(out)
    for layer in rec["pruning"]["layers"]:
        w = saved[layer["name"] + ".weight"]
        assert int((w == 0).sum()) == layer["zeros"] == w.numel() // 2
    assert rec["dense"]["ppl"] > 1 and rec["pruned"]["ppl"] > 1


@pytest.mark.real
@pytest.mark.parametrize(
    "metric,allocator",
    [
        ("wanda", "owl"),
        ("sparsegpt", "alphapruning"),
        ("gblm", "atp:beta=auto,step=0.01"),
        ("magnitude", "mrp:stats=dynamic,rounds=2"),
    ],
)
def test_bundled_model_streamed_equals_in_memory(tmp_path, metric, allocator):
    """Each metric and each allocator once on SmolLM2-135M: streamed and in memory, own caches."""

    def config(mode: str) -> PruneConfig:
        return PruneConfig(
            metric=metric,
            allocator=allocator,
            sparsity=0.6,
            nsamples=2,
            seqlen=64,
            eval_data="wiki",
            eval_seqlen=256,
            max_tokens=1024,
            stream=mode,
        )

    records = []
    for mode in ("off", "on"):
        cache = tmp_path / f"cache-{mode}"
        shutil.copytree(bundled_model_dir("smollm2-135m", default_cache_dir()).parent, cache / "models")
        records.append(run(config(mode), out=tmp_path / mode, cache_dir=cache, progress=False).record)
    _assert_same(tmp_path, *records)


def test_a_tied_random_checkpoint_writes_the_embedding_and_streams(tmp_path):
    """Issue 22 case 9: tied embeddings are written under the embedding's name, as save_pretrained does."""
    folder = sharded_checkpoint(tmp_path / "tied", tied=True)
    names = set(Checkpoint(folder).tensors)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    model = load_skeleton(folder)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    whole = AutoModelForCausalLM.from_pretrained(folder)
    assert model_fingerprint(model) == model_fingerprint(whole)


def test_a_checkpoint_replaced_during_a_run_is_refused_naming_the_shard(tmp_path, text, monkeypatch, capsys):
    """Issue 22 case 2: a shard replaced while an OWL run streams is refused, naming the file."""
    from prunewise.allocation import statistics

    src = sharded_checkpoint(tmp_path / "sh4")
    other = sharded_checkpoint(tmp_path / "other", seed=1)  # same shapes, other weights
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) >= 3
    real = statistics.dense_input_norms

    def then_replace(*args, **kwargs):
        out = real(*args, **kwargs)
        os.replace(other / shards[2].name, shards[2])  # after the dense pass, before the prune walk
        return out

    monkeypatch.setattr(statistics, "dense_input_norms", then_replace)
    argv = [
        "prune",
        "--model",
        str(src),
        "--metric",
        "wanda",
        "--allocator",
        "owl",
        "--sparsity",
        "0.5",
        "--calib",
        f"file:{text}",
        "--nsamples",
        "2",
        "--seqlen",
        "16",
        "--no-eval",
        "--stream",
        "on",
        "--out",
        str(tmp_path / "out"),
        "-q",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{shards[2]} changed on disk" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".prunewise-stream*"))


def _tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.parametrize("when", ["up front", "while writing"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, text, monkeypatch, capsys, when):
    """Issue 22 case 4: no room for the pruned checkpoint is one line naming the folder and the
    space needed, checked before the first block (and met while writing: the scratch is removed)."""
    src = sharded_checkpoint(tmp_path / "sh4", layers=4)
    small = tmp_path / "small"
    if not _tmpfs(small, "300k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        if when == "while writing":  # the up-front check passes, the disk fills while blocks are written
            from prunewise.model import streaming

            monkeypatch.setattr(streaming.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
        argv = [
            "prune",
            "--model",
            str(src),
            "--metric",
            "magnitude",
            "--sparsity",
            "0.5",
            "--no-eval",
            "--stream",
            "on",
            "--out",
            str(small / "run"),
            "-q",
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "disk: the pruned checkpoint needs" in err and str(small) in err and err.count("\n") == 1
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)
