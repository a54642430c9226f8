"""The seams every new method, statistic, output format or placement plugs into: contract tests
parametrised over the registries (a newly registered metric or allocator is checked here without
editing a list), the block loop, the run record, exporters, plots."""

import importlib
import json
import subprocess
import sys

import pytest
import torch

import prunewise as pw
from helpers import LINEARS_PER_BLOCK, make_text, tiny_model
from prunewise.allocation.planner import build_profile
from prunewise.allocation.profile import check_allocation
from prunewise.allocation.statistics import STATISTICS, StatContext, provide
from prunewise.errors import ConfigError, PrunewiseError
from prunewise.model.blocks import BlockSource, replay_step
from prunewise.model.layers import weight_matrix
from prunewise.prune.stats import KNOWN, LayerStats
from prunewise.registry import ALLOCATORS, METRICS
from prunewise.run.export import EXPORTERS
from prunewise.run.record import SCHEMA, RunRecord

# Cheap settings for allocators whose defaults run long searches; any other allocator runs as named.
CHEAP = {
    "atp": "atp:step=0.1,heldout=2",
    "mrp": "mrp:stats=dynamic,rounds=2",
    "auto": "auto:candidates=uniform/owl/dlp/atp[step=0.1],heldout=2",
}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("metric", [e.name for e in METRICS])
def test_every_metric_honours_the_contract(metric, calib):
    """Declared statistics are known ones; documented paper and deviations; exact counts per
    layer unstructured and exactly N zeros per group with 2:4; nothing outside the blocks changes."""
    entry = METRICS.get(metric)
    assert set(entry.needs) <= set(KNOWN) | set(STATISTICS.names()), entry.needs
    assert entry.summary and entry.paper
    assert "Deviations from reference" in importlib.import_module(entry.fn.__module__).__doc__
    for pattern, sparsity in (("unstructured", 0.6), ("2:4", None)):
        model = tiny_model("llama")
        before = _state(model)
        cfg = pw.PruneConfig(metric=metric, sparsity=sparsity, pattern=pattern, nsamples=6, seqlen=24, batch_size=3)
        result = pw.prune(model, None, cfg, calib=calib, progress=False)
        assert len(result.layers) == 3 * LINEARS_PER_BLOCK["llama"]
        for r in result.layers:
            w = weight_matrix(model.get_submodule(r.name))
            if pattern == "2:4":
                assert ((w == 0).view(w.shape[0], -1, 4).sum(-1) == 2).all(), r.name
            else:
                assert r.zeros == int((w == 0).sum()) == int(0.6 * w.numel() + 0.5), r.name
        for name, t in model.state_dict().items():
            if ".layers." not in name:
                assert torch.equal(t, before[name]), name


@pytest.mark.parametrize("allocator", [e.name for e in ALLOCATORS])
def test_every_allocator_honours_the_contract(allocator, calib, tokenizer, text_file, tmp_path):
    """Every layer, values in [0, 1), mean equal to the target; the model is left dense (drivers
    restore it); allocators that support N:M give whole numbers of zeros per group; the allocator
    module documents its deviations."""
    entry = ALLOCATORS.get(allocator)
    assert (
        "Deviations from reference" in (importlib.import_module(entry.fn.__module__).__doc__ or "")
        or allocator == "uniform"
    )
    spec = CHEAP.get(allocator, allocator)
    patterns = [("unstructured", 0.6)] + ([("4:8", None)] if entry.nm else [])
    for pattern, sparsity in patterns:
        model = tiny_model("llama", layers=4)
        dense = _state(model)
        cfg = pw.PruneConfig(
            model="x",
            metric="wanda",
            allocator=spec,
            sparsity=sparsity,
            pattern=pattern,
            nsamples=4,
            seqlen=32,
            calib=f"file:{text_file}",
        )
        planned = pw.plan(model, cfg, tmp_path, tokenizer=tokenizer, progress=False)
        check_allocation(allocator, planned.profile, planned.allocation, cfg.target)
        for k, v in model.state_dict().items():
            assert torch.equal(v, dense[k]), k
        if pattern == "4:8":
            assert all(abs(v * 8 - round(v * 8)) < 1e-9 for v in planned.allocation.values())


def test_a_new_allocator_with_a_driver_needs_no_pipeline_code(calib, tmp_path):
    """An allocator registered with ``driver_for`` prunes trial models through the planner's
    Trials (prune, re-measure, restore) without any change to the pipeline."""
    seen = {}

    def driver(profile, sparsity, trials, *, progress=True, levels=2):
        for s in (sparsity / 2, sparsity):
            trials.prune({x.name: s for x in profile.layers})
            w = weight_matrix(model.get_submodule(profile.layers[0].name))
            seen[s] = int((w == 0).sum())
            trials.remeasure(profile)
            trials.restore()
        return {x.name: sparsity for x in profile.layers}, {"trials": levels}

    def allocate(profile, sparsity, *, levels: int = 2):
        raise ConfigError("test_driven: only through its driver")

    ALLOCATORS.register("test_driven", summary="test", needs=("weights",), driver_for=lambda p: driver)(allocate)
    try:
        model = tiny_model("llama")
        dense = _state(model)
        cfg = pw.PruneConfig(metric="magnitude", allocator="test_driven:levels=3", sparsity=0.5)
        planned = pw.plan(model, cfg, tmp_path, calib=calib, progress=False)
        assert planned.details == {"trials": 3}
        assert all(v == 0.5 for v in planned.allocation.values())
        n = weight_matrix(model.get_submodule(planned.profile.layers[0].name)).numel()
        assert seen == {0.25: round(0.25 * n), 0.5: round(0.5 * n)}
        assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())
        with pytest.raises(ValueError, match="prunes trial models"):
            from prunewise.allocation.planner import make_plan

            ctx = StatContext(BlockSource(model), build_profile(BlockSource(model)), tmp_path)
            make_plan(ctx, "test_driven", {"levels": 2}, 0.5)
    finally:
        ALLOCATORS._entries.pop("test_driven")


def test_statistic_providers_are_registered_by_need(tmp_path):
    model = tiny_model("llama")
    source = BlockSource(model)
    ctx = StatContext(source, build_profile(source), tmp_path, progress=False)
    out = provide(("weights", "eigenvalues"), ctx)
    name = ctx.profile.layers[0].name
    w = weight_matrix(model.get_submodule(name))
    assert out["weights"][name] is w or torch.equal(out["weights"][name], w)
    assert torch.allclose(out["eigenvalues"][name], torch.linalg.eigvalsh((w.T @ w).double()), rtol=1e-6, atol=1e-8)
    with pytest.raises(PrunewiseError, match="'nope' is not a statistic.*dense_input_norm"):
        provide(("nope",), ctx)
    with pytest.raises(ValueError, match="'dense_input_norm' needs calibration data"):
        provide(("dense_input_norm",), ctx)


def test_block_source_walks_forward_and_backward_one_block_at_a_time(calib):
    model = tiny_model("opt", layers=4)
    source = BlockSource(model)
    assert [i for i, _, _ in source.each()] == [0, 1, 2, 3]
    assert [i for i, _, _ in source.each(reverse=True)] == [3, 2, 1, 0]
    names = [n for _, n, _ in source.all_linears()]
    assert len(names) == 4 * LINEARS_PER_BLOCK["opt"] and names[0] == "model.decoder.layers.0.self_attn.k_proj"
    # The head: logits from the last block's outputs equal the full forward's logits.
    inputs = source.capture(calib, 3)
    with torch.no_grad():
        hidden = source.walk(replay_step, inputs, desc="test", progress=False)
        full = model(input_ids=calib[:3], use_cache=False).logits
        assert torch.allclose(source.logits(hidden[0], calib[:3], inputs.as_tuple), full, atol=1e-5)


def test_layer_stats_merge_shards():
    torch.manual_seed(0)
    x = torch.randn(6, 10, 8)
    for want_gram in (False, True):
        whole = LayerStats(8, want_gram)
        whole.add(x)
        a, b = LayerStats(8, want_gram), LayerStats(8, want_gram)
        a.add(x[:2])
        a.add(x[2:4])
        b.add(x[4:])
        merged = a.merge(b)
        assert (merged.nsamples, merged.ntokens) == (whole.nsamples, whole.ntokens) == (6, 60)
        assert torch.allclose(merged.input_norm(), whole.input_norm(), rtol=1e-6)
        if want_gram:
            assert torch.allclose(merged.hessian(), whole.hessian(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot merge"):
        LayerStats(8).merge(LayerStats(4))


def test_run_record_round_trip_and_schema_one():
    rec = RunRecord(
        {"metric": "wanda", "allocator": "uniform", "pattern": "unstructured", "sparsity": 0.5},
        pruning={"target": 0.5, "sparsity": 0.5, "mask_sha256": "ab", "layers": [{"name": "l"}]},
        pruned={"ppl": 3.0, "data": "wiki", "split": "test", "seqlen": 8, "tokens": 64},
    )
    data = rec.to_dict()
    assert data["schema"] == SCHEMA and "dense" not in data and "memory" not in data
    assert RunRecord.from_dict(json.loads(json.dumps(data))) == rec
    assert "layers" not in rec.summary()["pruning"] and "layers" in rec.to_dict()["pruning"]
    assert rec.reusable("pruned", {"data": "wiki", "split": "test", "seqlen": 8, "tokens": 64}) == rec.pruned
    assert rec.reusable("pruned", {"data": "wiki", "split": "test", "seqlen": 16, "tokens": 64}) is None
    # a sweep line written before schema 2
    old = {
        "key": "k",
        "kind": "run",
        "status": "ok",
        "config": rec.config,
        "target": 0.5,
        "sparsity": 0.49,
        "mask_sha256": "cd",
        "ppl": {"ppl": 7.0},
        "zero_shot": {"average": {"acc": 0.5}},
    }
    up = RunRecord.from_dict(old)
    assert (up.target, up.sparsity, up.mask_sha256, up.pruned["ppl"]) == (0.5, 0.49, "cd", 7.0)
    assert up.zero_shot == {"pruned": {"average": {"acc": 0.5}}}
    with pytest.raises(PrunewiseError, match="newer than this prunewise"):
        RunRecord.from_dict({**data, "schema": SCHEMA + 1})
    with pytest.raises(PrunewiseError, match="no 'config'"):
        RunRecord.from_dict({"pruning": {}})


@pytest.fixture
def saved_model(tmp_path, tokenizer):
    model = tiny_model("llama")
    folder = tmp_path / "dense"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_text(make_text(2000), encoding="utf-8")
    return folder, text


def test_exporters_are_registered_by_name_and_saving_is_all_or_nothing(saved_model, tmp_path):
    folder, text = saved_model
    cfg = pw.PruneConfig(model=str(folder), metric="magnitude", sparsity=0.5)
    with pytest.raises(ConfigError, match="unknown format 'safetensor'.*did you mean 'safetensors'"):
        pw.run(cfg, out=tmp_path / "x", format="safetensor", progress=False)
    written = []

    def marker(model, tokenizer, out):
        written.append(out.name)
        (out / "weights.txt").write_text(str(sum(int((p == 0).sum()) for p in model.parameters())))

    def failing(model, tokenizer, out):
        (out / "partial").write_text("half")
        raise OSError("disk full")

    EXPORTERS.register("test_marker", summary="test")(marker)
    EXPORTERS.register("test_failing", summary="test")(failing)
    try:
        out = tmp_path / "run"
        rec = pw.run(cfg, out=out, format="test_marker", progress=False).record
        assert int((out / "weights.txt").read_text()) == sum(d["zeros"] for d in rec.pruning["layers"]) > 0
        assert json.loads((out / "pruning.json").read_text())["output"]["format"] == "test_marker"
        # an exporter that fails leaves the previous output as it was, and no temporary folder
        with pytest.raises(OSError, match="disk full"):
            pw.run(cfg, out=out, overwrite=True, format="test_failing", progress=False)
        assert sorted(p.name for p in out.iterdir()) == ["pruning.json", "weights.txt"]
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    finally:
        EXPORTERS._entries.pop("test_marker")
        EXPORTERS._entries.pop("test_failing")


def test_plots_leave_matplotlib_global_state_alone(tmp_path):
    code = (
        "import sys, matplotlib; raw = lambda: dict.__getitem__(matplotlib.rcParams, 'backend'); before = raw();"
        "from prunewise.report.plots import plot_block_profile;"
        f"plot_block_profile([0.4, 0.6], 0.5, r'{tmp_path / 'p.png'}', 't', "
        "{'parameter': 'beta', 'chosen': 0.1, 'curve': [{'beta': 0.0, 'ppl': 2.0}, {'beta': 0.1, 'ppl': 1.5}]});"
        "print('matplotlib.pyplot' in sys.modules, raw() == before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
