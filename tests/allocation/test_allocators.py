"""OWL, ATP, MRP and mixed N:M: hand-computed cases, properties (hypothesis), and the pipeline pieces
they need (dense input norms, the on-disk statistics cache, ATP's held-out beta search)."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prunewise as pw
from helpers import tiny_model
from prunewise.allocation import atp, mrp, owl
from prunewise.allocation.profile import (
    LayerInfo,
    Profile,
    block_profile,
    check_allocation,
    mixed_nm,
    weighted_mean,
)
from prunewise.allocation.statistics import dense_input_norms
from prunewise.data import heldout_windows, sample_windows
from prunewise.errors import ConfigError, PrunewiseError
from prunewise.model.blocks import BlockSource
from prunewise.prune.masks import Pattern
from prunewise.run.pipeline import plan as _plan


def blocks_profile(n_blocks: int, sizes=(6, 10), rows: int = 2) -> Profile:
    """Equal-size blocks of two layers each, shapes (rows, size // rows)."""
    layers = []
    for b in range(n_blocks):
        for j, n in enumerate(sizes):
            layers.append(LayerInfo(f"blocks.{b}.l{j}", b, n, (rows, n // rows)))
    return Profile(layers)


def with_scores(profile: Profile, gen: torch.Generator, heavy: list[float]) -> Profile:
    """Attach weights and unit input norms; block b's scores are |N(0,1)| ** heavy[b] (heavier tail
    for larger exponents)."""
    weights = {}
    for x in profile.layers:
        weights[x.name] = torch.randn(x.shape, generator=gen).abs() ** heavy[x.block]
    profile.stats["weights"] = weights
    profile.stats["dense_input_norm"] = {x.name: torch.ones(x.shape[1]) for x in profile.layers}
    return profile


# -- OWL --------------------------------------------------------------------------------------


def test_owl_worked_example():
    # methods.md §3.2: D = [1, 2, 3, 4] %, lam = 0.08, s = 0.7 -> [0.780, 0.727, 0.673, 0.620]
    prof = blocks_profile(4)
    got = owl.map_ratios([1.0, 2.0, 3.0, 4.0], prof, 0.7, 0.08)
    assert got == pytest.approx([0.78, 0.7266667, 0.6733333, 0.62], abs=1e-6)


def test_owl_outlier_ratio_hand_computed():
    prof = blocks_profile(1, sizes=(4, 4), rows=1)
    w0 = torch.tensor([[1.0, 1.0, 1.0, 20.0]])
    w1 = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    prof.stats["weights"] = {"blocks.0.l0": w0, "blocks.0.l1": -w1}  # sign does not matter
    prof.stats["dense_input_norm"] = {"blocks.0.l0": torch.ones(4), "blocks.0.l1": torch.tensor([1.0, 1, 1, 2])}
    # scores: 1 1 1 20 | 1 1 1 2 -> mean 28/8 = 3.5; above 2 * 3.5 = 7: one of 8
    assert owl.outlier_ratios(prof, 2.0) == [pytest.approx(12.5)]
    # above 1 * 3.5: still only the 20
    assert owl.outlier_ratios(prof, 1.0) == [pytest.approx(12.5)]
    # above 0.5 * 3.5 = 1.75: 20 and 2
    assert owl.outlier_ratios(prof, 0.5) == [pytest.approx(25.0)]


@settings(max_examples=60, deadline=None)
@given(
    ratios=st.lists(st.floats(0, 20), min_size=2, max_size=12),
    sparsity=st.floats(0.05, 0.9),
    lam=st.floats(0, 0.3),
)
def test_owl_map_properties(ratios, sparsity, lam):
    prof = blocks_profile(len(ratios))
    values = owl.map_ratios(ratios, prof, sparsity, lam)
    alloc = prof.per_block(values)
    check_allocation("owl", prof, alloc, sparsity)
    assert all(0 <= v <= 0.99 for v in values)
    # more outliers -> lower (or equal) sparsity
    for i in range(len(ratios)):
        for j in range(len(ratios)):
            if ratios[i] > ratios[j]:
                assert values[i] <= values[j] + 1e-9
    if lam == 0 or max(ratios) - min(ratios) < 1e-12:
        assert values == pytest.approx([sparsity] * len(ratios))
    elif all(0 < v < 0.99 for v in values):  # unclamped: the spread is exactly 2 lam
        assert max(values) - min(values) == pytest.approx(2 * lam)


def test_owl_allocate_gives_lower_sparsity_to_heavier_tails():
    gen = torch.Generator().manual_seed(0)
    prof = with_scores(blocks_profile(4, sizes=(4000, 6000), rows=10), gen, [1.0, 1.5, 1.0, 2.5])
    alloc = owl.allocate(prof, 0.6, m=3.0)
    check_allocation("owl", prof, alloc, 0.6)
    blocks = block_profile(prof, alloc)
    ratios = owl.outlier_ratios(prof, 3.0)
    assert ratios[3] > ratios[1] > max(ratios[0], ratios[2])
    assert blocks[3] < blocks[1] < min(blocks[0], blocks[2])


# -- ATP --------------------------------------------------------------------------------------


def test_atp_reference_values_and_range():
    # methods.md §8: L = 32, S = 0.7, beta = 0.01 -> s_1 = 0.545, s_32 = 0.855; beta_max = 0.019355
    prof = blocks_profile(32)
    values = atp.progression(prof, 0.7, 0.01)
    assert values[0] == pytest.approx(0.545) and values[-1] == pytest.approx(0.855)
    bound, inclusive = atp.beta_range(prof, 0.7)
    assert bound == pytest.approx(0.6 / 31) and not inclusive
    assert len(atp.beta_grid(prof, 0.7, 0.002)) == 9  # methods.md: 9 trials
    assert len(atp.beta_grid(prof, 0.5, 0.002)) == 16
    assert len(atp.beta_grid(prof, 0.8, 0.002)) == 6
    assert len(atp.beta_grid(blocks_profile(80), 0.7, 0.002)) == 3  # 70B: "0.0075, 3 attempts"
    with pytest.raises(ConfigError, match=r"outside the valid range \[0, 0.0193548\) for sparsity 0.7 over 32 blocks"):
        atp.allocate(prof, 0.7, beta=0.02)
    with pytest.raises(ConfigError, match="valid range"):
        atp.allocate(prof, 0.7, beta=-0.001)
    # below 50% the first block is the binding one and its bound is allowed (first block at 0)
    bound, inclusive = atp.beta_range(prof, 0.3)
    assert bound == pytest.approx(0.6 / 31) and inclusive
    assert atp.progression(prof, 0.3, bound)[0] == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="a number or 'auto'"):
        atp.allocate(prof, 0.7, beta="often")
    with pytest.raises(ConfigError, match="search"):
        atp.allocate(prof, 0.7, beta="auto")


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 40), sparsity=st.floats(0.05, 0.95), frac=st.floats(0, 0.999))
def test_atp_properties(n, sparsity, frac):
    prof = blocks_profile(n)
    bound, _ = atp.beta_range(prof, sparsity)
    beta = frac * bound
    alloc = atp.allocate(prof, sparsity, beta=beta)
    check_allocation("atp", prof, alloc, sparsity)
    values = block_profile(prof, alloc)
    if beta > 1e-9:
        assert all(b > a for a, b in zip(values, values[1:]))  # strictly increasing with depth
        assert values[1] - values[0] == pytest.approx(beta)
    else:
        assert values == pytest.approx([sparsity] * n)


def test_atp_parameter_weighted_when_blocks_differ():
    prof = Profile(
        [LayerInfo("b.0", 0, 100, (10, 10)), LayerInfo("b.1", 1, 300, (10, 30)), LayerInfo("b.2", 2, 100, (10, 10))]
    )
    alloc = atp.allocate(prof, 0.5, beta=0.1)
    assert weighted_mean(prof, alloc) == pytest.approx(0.5, abs=1e-12)
    assert alloc["b.1"] - alloc["b.0"] == pytest.approx(0.1)


# -- mixed N:M ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(0, 0.99), min_size=1, max_size=16), n=st.integers(1, 7))
def test_mixed_nm_keeps_mean_n_exactly(values, n):
    prof = blocks_profile(len(values))
    prof.pattern = Pattern(n=n, m=8)
    mean = sum(values) / len(values)
    shifted = [v - mean + n / 8 for v in values]  # any profile with mean N/M
    out = mixed_nm(shifted, prof, "test")
    counts = [round(v * 8) for v in out]
    assert all(abs(c - v * 8) < 1e-12 and 0 <= c <= 7 for c, v in zip(counts, out))
    assert sum(counts) == n * len(values)
    check_allocation("test", prof, prof.per_block(out), n / 8)


def test_mixed_nm_needs_equal_blocks():
    prof = Profile([LayerInfo("b.0", 0, 80, (10, 8)), LayerInfo("b.1", 1, 160, (10, 16))])
    prof.pattern = Pattern(n=2, m=4)
    with pytest.raises(PrunewiseError, match="equal size"):
        mixed_nm([0.5, 0.5], prof, "owl")


# -- MRP --------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    heavy=st.lists(st.floats(0.5, 4.0), min_size=2, max_size=6),
    sparsity=st.floats(0.2, 0.85),
    seed=st.integers(0, 10_000),
)
def test_mrp_properties(heavy, sparsity, seed):
    prof = with_scores(
        blocks_profile(len(heavy), sizes=(300, 500), rows=10), torch.Generator().manual_seed(seed), heavy
    )
    step = 0.01
    alloc = mrp.allocate(prof, sparsity, m=2.0, start=0.0, step=step)
    check_allocation("mrp", prof, alloc, sparsity)
    # the final per-block redundancy is at least as uniform as uniform pruning's, up to what one
    # greedy step can change a block's redundancy by
    red = mrp.redundancies(prof, alloc, m=2.0)
    flat = mrp.redundancies(prof, {x.name: sparsity for x in prof.layers}, m=2.0)
    back = mrp.redundancies(prof, {k: max(v - step, 0.0) for k, v in alloc.items()}, m=2.0)
    one_step = max(abs(a - b) for a, b in zip(red, back))
    assert max(red) - min(red) <= max(flat) - min(flat) + one_step + 1e-9


def test_mrp_equalises_redundancy_and_follows_outliers():
    gen = torch.Generator().manual_seed(1)
    prof = with_scores(blocks_profile(4, sizes=(2000, 3000), rows=50), gen, [1.0, 1.5, 1.0, 2.5])
    alloc = mrp.allocate(prof, 0.6, m=3.0, start=0.0, step=0.002)
    red = mrp.redundancies(prof, alloc, m=3.0)
    flat = mrp.redundancies(prof, {x.name: 0.6 for x in prof.layers}, m=3.0)
    assert max(red) - min(red) < 0.01 < max(flat) - min(flat)
    blocks = block_profile(prof, alloc)
    # blocks with more outliers keep more weights (lower sparsity)
    assert blocks[3] < blocks[1] < min(blocks[0], blocks[2])
    # the equal-redundancy fixed point: kept weights proportional to outliers (up to the step)
    outliers = [o / 100 for o in owl.outlier_ratios(prof, 3.0)]
    kept = [1 - b for b in blocks]
    ratio = [k / o for k, o in zip(kept, outliers)]
    assert max(ratio) / min(ratio) < 1.1


def test_mrp_score_follows_metric_and_no_signal_is_uniform():
    prof = blocks_profile(3, sizes=(40, 60), rows=2)
    prof.stats["weights"] = {x.name: torch.ones(x.shape) for x in prof.layers}  # no outliers anywhere
    prof.stats["dense_input_norm"] = {x.name: torch.ones(x.shape[1]) for x in prof.layers}
    prof.metric = "magnitude"
    alloc = mrp.allocate(prof, 0.5, start=0.0)
    assert block_profile(prof, alloc) == pytest.approx([0.5, 0.5, 0.5])
    assert mrp.score_kind("auto", "magnitude") == "magnitude"
    assert mrp.score_kind("auto", "sparsegpt") == "wanda"
    with pytest.raises(ConfigError, match="start must be"):
        mrp.allocate(prof, 0.5, start=0.7)
    with pytest.raises(ConfigError, match="threshold must be one of dense, remaining"):
        mrp.allocate(prof, 0.5, threshold="mean")


# -- pipeline: dense statistics, cache, N:M validation, search ---------------------------------


def test_dense_input_norms_match_a_full_forward(calib):
    model = tiny_model("qwen2")
    norms = dense_input_norms(BlockSource(model), calib, batch_size=2, progress=False)
    sq: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):

            def hook(mod, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sq[name] = sq.get(name, 0) + x.square().sum(0)

            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=calib)
    for h in handles:
        h.remove()
    assert set(norms) == set(sq)
    for name, value in sq.items():
        torch.testing.assert_close(norms[name].double(), (value / calib.shape[0]).sqrt(), rtol=1e-5, atol=1e-6)


def test_owl_plan_caches_statistics_by_content(calib, tmp_path):
    model = tiny_model("llama")
    cfg = pw.PruneConfig(model="x", metric="wanda", allocator="owl:m=2", sparsity=0.6, nsamples=4, seqlen=16)
    first = _plan(model, cfg, tmp_path, calib=calib, progress=False)
    files = list((tmp_path / "dense_input_norm").glob("*.safetensors"))
    assert len(files) == 1
    again = _plan(model, cfg, tmp_path, calib=calib, progress=False)
    assert again.allocation == first.allocation
    assert len(list((tmp_path / "dense_input_norm").glob("*.safetensors"))) == 1
    with torch.no_grad():  # other weights: a new key
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
    _plan(model, cfg, tmp_path, calib=calib, progress=False)
    assert len(list((tmp_path / "dense_input_norm").glob("*.safetensors"))) == 2
    with pytest.raises(ValueError, match="needs calibration data"):
        _plan(model, cfg, tmp_path, progress=False)


@pytest.mark.parametrize("allocator", ["owl:lam=0.2", "atp:beta=0.2"])
@pytest.mark.parametrize("metric", ["wanda", "sparsegpt"])
def test_mixed_nm_masks_exact_per_group(allocator, metric, calib, tmp_path):
    model = tiny_model("llama")
    cfg = pw.PruneConfig(model="x", metric=metric, allocator=allocator, pattern="4:8", nsamples=4, seqlen=16)
    alloc = pw.plan(model, cfg, tmp_path, calib=calib, progress=False).allocation
    res = pw.prune(model, None, cfg, calib=calib, allocation=alloc, progress=False)
    per_block = {r.block: round(r.target * 8) for r in res.layers}
    assert len(set(per_block.values())) > 1 and sum(per_block.values()) == 4 * len(per_block)
    for r in res.layers:
        w = model.get_submodule(r.name).weight
        zeros = (w == 0).view(w.shape[0], -1, 8).sum(-1)
        assert bool((zeros == per_block[r.block]).all()), r.name
    assert res.sparsity == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("allocator", ["alphapruning", "mrp"])
def test_allocators_without_mixed_nm_refuse_nm(allocator):
    with pytest.raises(
        ConfigError, match=f"'{allocator}' needs an unstructured pattern; with N:M use one of uniform, owl, atp"
    ):
        pw.PruneConfig(model="x", allocator=allocator, pattern="2:4").validate()


def test_heldout_windows_never_overlap_calibration():
    ids = torch.arange(5000)
    calib = sample_windows(ids, 20, 64, seed=3)
    held = heldout_windows(ids, 20, 64, 3, 10)
    starts = sorted(int(w[0]) for w in held)
    for s in starts:
        assert all(abs(s - int(c[0])) >= 64 for c in calib)
    assert all(b - a >= 64 for a, b in zip(starts, starts[1:]))
    assert torch.equal(held, heldout_windows(ids, 20, 64, 3, 10))  # deterministic
    with pytest.raises(PrunewiseError, match="no room for 100 held-out windows"):
        heldout_windows(torch.arange(2000), 20, 64, 3, 100)


def test_atp_auto_search_on_heldout_text(tokenizer, text_file, tmp_path):
    model = tiny_model("llama", layers=4)
    cfg = pw.PruneConfig(
        model="x",
        metric="wanda",
        allocator="atp:step=0.05,heldout=3",
        sparsity=0.5,
        nsamples=4,
        seqlen=32,
        calib=f"file:{text_file}",
    )
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    planned = _plan(model, cfg, tmp_path, tokenizer=tokenizer, progress=False)
    for k, v in model.state_dict().items():  # the trials leave the model dense
        assert torch.equal(v, dense[k]), k
    search = planned.details["search"]
    betas = [c["beta"] for c in search["curve"]]
    assert betas == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3])  # bound 2 * 0.5 / 3, inclusive below 50%
    best = min(search["curve"], key=lambda c: c["ppl"])
    assert search["chosen"] == best["beta"] and search["heldout"]["windows"] == 3
    assert block_profile(planned.profile, planned.allocation) == pytest.approx(
        atp.progression(planned.profile, 0.5, search["chosen"])
    )
    # each trial's perplexity is the held-out perplexity of the model pruned with that beta
    trial = cfg.replace(allocator=f"atp:beta={betas[2]}")
    pw.prune(model, tokenizer, trial, cache_dir=tmp_path, progress=False)
    from prunewise.data import heldout_ids

    held = heldout_ids(tokenizer, cfg.calib, 4, 32, 0, 3, tmp_path)
    assert pw.perplexity(model, held.reshape(-1), 32, progress=False)["ppl"] == pytest.approx(
        search["curve"][2]["ppl"], rel=1e-6
    )


def test_cli_owl_dry_run_and_record_with_plot(tokenizer, text_file, tmp_path, capsys):
    from prunewise.cli import main

    d = tmp_path / "m"
    tiny_model("llama").save_pretrained(d)
    tokenizer.save_pretrained(d)
    base = [
        "prune",
        "--model",
        str(d),
        "--calib",
        f"file:{text_file}",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--metric",
        "wanda",
        "--allocator",
        "owl:m=2,lam=0.1",
        "--sparsity",
        "0.6",
        "-q",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(base + ["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "allocation 'owl:m=2,lam=0.1' at target 0.6 (21 layers)" in printed
    assert printed.index(
        "- dense calibration pass (input norms): 4 x 32 tokens through 3 blocks: about"
    ) < printed.index("allocation 'owl")
    rows = [line.split() for line in printed.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 3 and len({r[3] for r in rows}) > 1  # three blocks, not all equal
    out = tmp_path / "run"
    assert main(base + ["--out", str(out)]) == 0
    rec = json.loads((out / "pruning.json").read_text())
    assert rec["allocation"]["blocks"] == pytest.approx([float(r[3]) for r in rows], abs=1e-4)
    targets = {x["name"]: x["target"] for x in rec["pruning"]["layers"]}
    assert len(set(targets.values())) == 3
    png = (out / "allocation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_dry_run_announces_heavy_work_before_it_starts(tokenizer, text_file, tmp_path, monkeypatch):
    """A dry run says what it is about to compute (and whether it is cached) before any calibration
    pass; the ATP search's trial count is the one the search then runs."""
    from prunewise.allocation import statistics as providers

    d = tmp_path / "m"
    tiny_model("llama").save_pretrained(d)
    tokenizer.save_pretrained(d)
    events: list = []
    real = providers.dense_input_norms
    monkeypatch.setattr(providers, "dense_input_norms", lambda *a, **k: events.append("pass") or real(*a, **k))

    def dry(allocator: str, metric: str = "wanda"):
        events.clear()
        cfg = pw.PruneConfig(
            model=str(d),
            calib=f"file:{text_file}",
            nsamples=20,
            seqlen=32,
            metric=metric,
            allocator=allocator,
            sparsity=0.6,
            eval_data=None,
        )
        out = pw.run(cfg, dry_run=True, cache_dir=tmp_path / "cache", progress=False, on_preview=events.append)
        return events[0], out.record

    works, _ = dry("owl")
    assert events[1:] == ["pass"]  # the preview came first, then the one dense pass
    assert [w.what for w in works] == ["dense calibration pass (input norms): 20 x 32 tokens through 3 blocks"]
    assert works[0].seconds > 0 and "--nsamples 16" in works[0].cheaper
    works, _ = dry("owl")
    assert works[0].seconds is None and events[1:] == []  # cached: announced as such, not recomputed
    assert "cached" in works[0].line()

    works, rec = dry("atp:step=0.05,heldout=2", metric="magnitude")
    n = len(rec.search["curve"])
    assert [w.what for w in works] == [
        f"atp search: {n} trial prunings with magnitude, each scored on 2 held-out windows"
    ]
    assert (
        n == 1 + len(atp.beta_grid(pw.allocation.planner.build_profile(BlockSource(tiny_model("llama"))), 0.6, 0.05))
        and "atp:beta=NUMBER" in works[0].cheaper
    )
    works, _ = dry("uniform")
    assert works == []


def test_mrp_dynamic_remeasures_the_sparse_model(calib, tmp_path):
    model = tiny_model("llama", layers=4)
    cfg = pw.PruneConfig(
        model="x",
        metric="wanda",
        allocator="mrp:stats=dynamic,rounds=2,m=2,start=0.2",
        sparsity=0.6,
        nsamples=6,
        seqlen=24,
    )
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    planned = _plan(model, cfg, tmp_path, calib=calib, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, dense[k]), k
    rounds = planned.details["rounds"]
    assert [r["target"] for r in rounds] == pytest.approx([0.4, 0.6])
    check_allocation("mrp", planned.profile, planned.allocation, 0.6)
    # by hand: round 1 on the dense statistics, then prune with it, re-measure, round 2 from there
    static = cfg.replace(allocator="mrp:m=2,start=0.2")
    prof = _plan(model, static, tmp_path, calib=calib, progress=False).profile
    params = mrp.Params(m=2.0, start=0.2)
    first = mrp.fill(prof, 0.4, None, params)
    assert block_profile(prof, first) == pytest.approx(rounds[0]["blocks"])
    pw.prune(model, None, cfg, calib=calib, allocation=first, progress=False)
    prof.stats["dense_input_norm"] = dense_input_norms(BlockSource(model), calib, progress=False)
    final = mrp.fill(prof, 0.6, first, params)
    assert final == pytest.approx(planned.allocation)
    assert final != pytest.approx(
        mrp.fill(
            _plan(tiny_model("llama", layers=4), static, tmp_path, calib=calib, progress=False).profile,
            0.6,
            first,
            params,
        )
    )
    with pytest.raises(ConfigError, match="stats=dynamic prunes"):
        mrp.allocate(prof, 0.6, stats="dynamic")


def test_cli_atp_search_printed_and_recorded(tokenizer, text_file, tmp_path, capsys):
    from prunewise.cli import main

    d = tmp_path / "m"
    tiny_model("llama").save_pretrained(d)
    tokenizer.save_pretrained(d)
    out = tmp_path / "run"
    assert (
        main(
            [
                "prune",
                "--model",
                str(d),
                "--calib",
                f"file:{text_file}",
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--metric",
                "magnitude",
                "--allocator",
                "atp:step=0.1,heldout=2",
                "--sparsity",
                "0.6",
                "-q",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    rec = json.loads((out / "pruning.json").read_text())
    search = rec["allocation"]["search"]
    # 3 blocks at 60%: beta < 2 * 0.4 / 2 = 0.4 -> grid 0.1, 0.2, 0.3 plus 0
    assert [c["beta"] for c in search["curve"]] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert (
        f"atp: beta={search['chosen']:g} chosen from 4 trials by perplexity on 2 held-out calibration windows"
        in printed
    )
    assert rec["config"]["allocator"] == "atp:step=0.1,heldout=2"
    assert rec["allocation"]["blocks"] == pytest.approx([0.6 - search["chosen"], 0.6, 0.6 + search["chosen"]])
    assert (out / "allocation.png").stat().st_size > 5000
