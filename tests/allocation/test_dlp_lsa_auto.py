"""DLP, LSA and ``auto``: hand-computed allocations, the shipped DLP ratios as a fixture, LSA's greedy
reconstruction error against a brute-force computation, exact budgets under every pattern, and
``auto`` choosing the candidate with the lowest held-out perplexity (checked by pruning each
candidate independently), with its record's round trip."""

import pytest
import torch

import prunewise as pw
from helpers import tiny_model
from prunewise.allocation import auto, dlp, lsa
from prunewise.allocation.profile import LayerInfo, Profile, block_profile, check_allocation
from prunewise.data import heldout_ids
from prunewise.errors import ConfigError
from prunewise.prune.masks import Pattern
from prunewise.run.record import RunRecord

# ironartisan/DLP ratios/llama-7b-hf_sparsity_0.7_alpha_0.15.json: keep ratios of LLaMA-7B's 32 blocks
# at 70% with alpha 0.15, as the reference computed them (float32, printed to 6 decimals here).
LLAMA7B_KEEP = [
    0.467563, 0.451682, 0.434732, 0.417414, 0.405397, 0.390746, 0.382477, 0.375342, 0.367952, 0.362087,
    0.353252, 0.346554, 0.333635, 0.326033, 0.318249, 0.308828, 0.295283, 0.280141, 0.269763, 0.260455,
    0.244664, 0.236583, 0.231492, 0.221033, 0.214069, 0.203435, 0.196124, 0.191890, 0.184345, 0.175051,
    0.167563, 0.186167,
]  # fmt: skip


def profile_of(blocks: int, sizes=(8, 16), rows: int = 2) -> Profile:
    layers = [LayerInfo(f"b.{b}.l{j}", b, n, (rows, n // rows)) for b in range(blocks) for j, n in enumerate(sizes)]
    return Profile(layers)


def with_block_means(profile: Profile, means: list[float]) -> Profile:
    """Weights whose every Wanda score in block b equals means[b] (unit input norms)."""
    profile.stats["weights"] = {x.name: torch.full(x.shape, means[x.block]) for x in profile.layers}
    profile.stats["dense_input_norm"] = {x.name: torch.ones(x.shape[1]) for x in profile.layers}
    return profile


# -- DLP --------------------------------------------------------------------------------------


def test_dlp_hand_computed():
    # r = [1, 2, 3]: I = 1 - r/6 = [5/6, 4/6, 3/6] -> min-max [1, 0.5, 0] * 2 alpha = [0.2, 0.1, 0]
    # (alpha 0.1) -> centred on 0.5: sparsities [0.4, 0.5, 0.6]
    prof = with_block_means(profile_of(3), [1.0, 2.0, 3.0])
    alloc = dlp.allocate(prof, 0.5, alpha=0.1)
    assert block_profile(prof, alloc) == pytest.approx([0.4, 0.5, 0.6], abs=1e-12)
    check_allocation("dlp", prof, alloc, 0.5)
    assert dlp.allocate(prof, 0.5, alpha=0.0) == {x.name: 0.5 for x in prof.layers}


def test_dlp_mean_and_median_differ_by_the_paper_and_the_code():
    prof = profile_of(2, sizes=(4,), rows=1)
    prof.stats["weights"] = {"b.0.l0": torch.tensor([[1.0, 1, 1, 9]]), "b.1.l0": torch.tensor([[2.0, 2, 2, 2]])}
    prof.stats["dense_input_norm"] = {x.name: torch.ones(4) for x in prof.layers}
    assert dlp.block_reductions(prof, "mean") == [3.0, 2.0]
    assert dlp.block_reductions(prof, "median") == [1.0, 2.0]
    # mean: block 0 scores larger -> pruned more; median: the opposite
    mean = block_profile(prof, dlp.allocate(prof, 0.6, alpha=0.1))
    median = block_profile(prof, dlp.allocate(prof, 0.6, alpha=0.1, reduce="median"))
    assert mean == pytest.approx([0.7, 0.5]) and median == pytest.approx([0.5, 0.7])


def test_dlp_reproduces_the_shipped_llama7b_ratios():
    """The shipped keep ratios have mean 1 - S and spread 2 alpha; the map is invariant to any
    decreasing affine change of the reductions, so reductions 1 - keep give them back."""
    keep = LLAMA7B_KEEP
    assert sum(keep) / len(keep) == pytest.approx(0.3, abs=1e-6)
    assert max(keep) - min(keep) == pytest.approx(0.3, abs=1e-6)
    prof = profile_of(len(keep))
    values = dlp.importance_map([1.0 - k for k in keep], prof, 0.7, 2 * 0.15, 0.99, "dlp")
    assert [1 - v for v in values] == pytest.approx(keep, abs=2e-6)
    assert dlp.default_alpha(0.7) == 0.15 and dlp.default_alpha(0.6) == 0.1 and dlp.default_alpha(0.5) == 0.04
    assert dlp.default_alpha(0.65) == pytest.approx(0.125) and dlp.default_alpha(0.9) == 0.15


def test_dlp_clamps_and_keeps_the_budget():
    prof = with_block_means(profile_of(4), [1.0, 1.0, 1.0, 50.0])
    alloc = dlp.allocate(prof, 0.9, alpha=0.5)  # the last block would go past 0.99
    check_allocation("dlp", prof, alloc, 0.9)
    assert max(alloc.values()) <= 0.99
    with pytest.raises(ConfigError, match="dlp: alpha must be a number or 'auto', got 'big'"):
        dlp.allocate(prof, 0.5, alpha="big")


# -- LSA: the greedy reconstruction error ------------------------------------------------------


def brute_force_greedy(w: torch.Tensor, h: torch.Tensor, sparsity: float, block: int):
    """Each row on its own: in each column slice, remove one weight at a time, the one whose removal
    gives the smallest full quadratic e H e^T (recomputed from scratch for every candidate)."""
    w, h = w.double(), h.double()
    rows, cols = w.shape
    total, mask = 0.0, torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        e = torch.zeros(cols, dtype=torch.float64)
        for c0 in range(0, cols, block):
            c1 = min(c0 + block, cols)
            for _ in range(int((c1 - c0) * sparsity)):
                best = None
                for j in range(c0, c1):
                    if mask[r, j]:
                        continue
                    trial = e.clone()
                    trial[j] = w[r, j]
                    q = float(trial @ h @ trial)
                    if best is None or q < best[0]:
                        best = (q, j)
                e[best[1]] = w[r, best[1]]
                mask[r, best[1]] = True
        total += float(e @ h @ e)
    return total, mask


@pytest.mark.parametrize("shape,block,sparsity", [((3, 8), 4, 0.5), ((4, 10), 4, 0.6), ((2, 7), 0, 0.3)])
def test_lsa_greedy_error_equals_brute_force(shape, block, sparsity):
    gen = torch.Generator().manual_seed(sum(shape) + block)
    w = torch.randn(shape, generator=gen)
    x = torch.randn(50, shape[1], generator=gen) + torch.randn(1, shape[1], generator=gen)  # correlated inputs
    h = 2 * x.T @ x / 5
    error, mask = lsa.greedy_error(w, h, sparsity, block, return_mask=True)
    want, want_mask = brute_force_greedy(w, h, sparsity, block if block else shape[1])
    assert torch.equal(mask, want_mask)
    assert error == pytest.approx(want, rel=1e-5)
    e = (w * mask).double()
    assert error == pytest.approx(float(torch.einsum("ri,ij,rj->", e, h.double(), e)), rel=1e-5)


def test_lsa_greedy_error_hand_computed():
    # one row [1, 2, 1, 3], H with one cross term; slices of 2, one removal each:
    # slice 0: 1^2*1 = 1 vs 2^2*2 = 8 -> remove w0 (error 1);
    # slice 1: w2: 1^2*1 + 2*w0*w2*H02 = 1 + 2*0.5 = 2; w3: 3^2*1 = 9 -> remove w2 (error 1 + 2 = 3)
    w = torch.tensor([[1.0, 2.0, 1.0, 3.0]])
    h = torch.diag(torch.tensor([1.0, 2.0, 1.0, 1.0]))
    h[0, 2] = h[2, 0] = 0.5
    error, mask = lsa.greedy_error(w, h, 0.5, 2, return_mask=True)
    assert error == pytest.approx(3.0) and mask.tolist() == [[True, False, True, False]]


# -- LSA: the allocation -------------------------------------------------------------------------


def with_errors(profile: Profile, errors: dict[str, float]) -> Profile:
    profile.stats["reconstruction_error"] = errors
    return profile


def test_lsa_block_allocation_hand_computed():
    # block means of the layer errors: (1+3)/2 = 2, (2+6)/2 = 4, (3+9)/2 = 6 -> total 12;
    # I = [10/12, 8/12, 6/12] -> [1, 0.5, 0] * 2 lam (0.05) -> sparsities 0.6 + [-0.05, 0, 0.05]
    prof = profile_of(3)
    errors = {f"b.{b}.l{j}": float(v) for b, pair in enumerate([(1, 3), (2, 6), (3, 9)]) for j, v in enumerate(pair)}
    alloc = lsa.allocate(with_errors(prof, errors), 0.6, lam=0.05)
    assert block_profile(prof, alloc) == pytest.approx([0.55, 0.6, 0.65], abs=1e-12)
    assert lsa.default_lambda(0.7, "block") == 0.15 and lsa.default_lambda(0.5, "block") == 0.04
    assert lsa.default_lambda(0.3, "block") == 0.04 and lsa.default_lambda(0.7, "layer") == 0.08


def test_lsa_layer_granularity_moves_small_matrices_further():
    # four matrices, errors 1, 2, 3, 4 (total 10): I = [0.9, 0.8, 0.7, 0.6] -> k = [1, 2/3, 1/3, 0] * 0.2;
    # mean k = 0.1; shift (mean k - k) * mean size / size
    prof = profile_of(2, sizes=(8, 24))
    names = [x.name for x in prof.layers]
    alloc = lsa.allocate(with_errors(prof, dict(zip(names, [1.0, 2.0, 3.0, 4.0]))), 0.5, lam=0.1, granularity="layer")
    k = [0.2, 0.2 * 2 / 3, 0.2 / 3, 0.0]
    want = [0.5 + (0.1 - kx) * 16 / x.numel for kx, x in zip(k, prof.layers)]
    assert [alloc[n] for n in names] == pytest.approx(want, abs=1e-12)
    check_allocation("lsa", prof, alloc, 0.5)
    prof.pattern = Pattern(2, 4)
    with pytest.raises(ConfigError, match="granularity=block"):
        lsa.allocate(prof, 0.5, granularity="layer")
    with pytest.raises(ConfigError, match="lsa: lam must be a number or 'auto', got 'big'"):
        lsa.allocate(prof, 0.5, lam="big")


@pytest.mark.parametrize("allocator", ["dlp", "lsa"])
@pytest.mark.parametrize("pattern", ["unstructured", "4:8", "2:4"])
def test_dlp_and_lsa_exact_budgets_on_a_model(allocator, pattern, calib, tmp_path):
    """Planned on a tiny model (dense pass), pruned: exactly the planned zeros per layer, the
    target overall, whole numbers of zeros per N:M group with the mean N exact."""
    model = tiny_model("llama", layers=4)
    sparsity = 0.6 if pattern == "unstructured" else None
    spread = "alpha" if allocator == "dlp" else "lam"  # wide enough to move whole multiples of 1/M
    spec = f"{allocator}:max_sparsity=0.95,{spread}=0.25"
    cfg = pw.PruneConfig(metric="wanda", allocator=spec, sparsity=sparsity, pattern=pattern)
    planned = pw.plan(model, cfg, tmp_path, calib=calib, progress=False)
    blocks = block_profile(planned.profile, planned.allocation)
    assert len({round(b, 9) for b in blocks}) > 1  # a non-uniform allocation
    result = pw.prune(model, None, cfg, calib=calib, allocation=planned.allocation, cache_dir=tmp_path, progress=False)
    total = sum(x.numel for x in planned.profile.layers)
    assert sum(r.zeros for r in result.layers) / total == pytest.approx(cfg.target, abs=1e-3)
    for r, x in zip(result.layers, planned.profile.layers):
        w = model.get_submodule(r.name).weight
        if pattern == "unstructured":
            assert int((w == 0).sum()) == r.zeros
            assert abs(r.zeros - planned.allocation[r.name] * x.numel) <= x.shape[0]  # row rounding
        else:
            m = cfg.pattern_obj.m
            n = round(planned.allocation[r.name] * m)
            assert ((w == 0).view(w.shape[0], -1, m).sum(-1) == n).all(), r.name


def test_lsa_statistic_is_cached_by_content_and_options(calib, tmp_path):
    from prunewise.allocation import statistics

    model = tiny_model("llama", layers=3)
    calls = []
    real = statistics.greedy_error

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    statistics.greedy_error = counting
    try:
        cfg = pw.PruneConfig(metric="wanda", allocator="lsa", sparsity=0.6)
        a = pw.plan(model, cfg, tmp_path, calib=calib, progress=False)
        n = len(calls)
        assert n == len(a.profile.layers) and set(calls) == {0.5}
        b = pw.plan(model, cfg, tmp_path, calib=calib, progress=False)
        assert len(calls) == n and a.allocation == b.allocation  # from the cache
        pw.plan(model, cfg.replace(allocator="lsa:resp=0.7"), tmp_path, calib=calib, progress=False)
        assert len(calls) == 2 * n and calls[-1] == 0.7  # other options: computed again
    finally:
        statistics.greedy_error = real


def test_norms_and_errors_needed_together_come_from_one_dense_pass(calib, tmp_path, monkeypatch):
    """OWL's input norms and LSA's errors (auto with both among its candidates): one dense pass,
    values bit for bit those of each statistic's own pass, one line in the dry run."""
    from prunewise.allocation import statistics
    from prunewise.run import job, pipeline

    model = tiny_model("llama", layers=3)
    passes = []
    real = statistics.dense_pass
    monkeypatch.setattr(statistics, "dense_pass", lambda *a, **k: passes.append(len(a[2])) or real(*a, **k))
    cfg = pw.PruneConfig(metric="wanda", allocator="auto:candidates=owl/lsa", sparsity=0.6)
    both = ("dense_input_norm", "reconstruction_error")
    works = pipeline.preview(model, cfg, tmp_path / "joint", calib=calib)
    assert [w.what for w in works if "dense" in w.what] == [
        "dense calibration pass with input Gram matrices, greedy errors at 0.5 in 128-column slices: "
        "6 x 24 tokens through 3 blocks (one pass for dense_input_norm and reconstruction_error)"
    ]
    joint = statistics.provide(both, job.stat_context(model, cfg, tmp_path / "joint", calib, False))
    assert passes == [2]  # one pass, two sets of statistics collected apart
    alone = {}
    for need in both:
        alone.update(statistics.provide((need,), job.stat_context(model, cfg, tmp_path / need, calib, False)))
    assert passes == [2, 1, 1]
    assert joint["dense_input_norm"].keys() == alone["dense_input_norm"].keys()
    for name, norm in alone["dense_input_norm"].items():
        assert torch.equal(joint["dense_input_norm"][name], norm), name
    assert joint["reconstruction_error"] == alone["reconstruction_error"]
    statistics.provide(both, job.stat_context(model, cfg, tmp_path / "joint", calib, False))
    assert passes == [2, 1, 1]  # both cached: no pass at all
    assert not statistics.shared_dense_pass(both, job.stat_context(model, cfg, tmp_path / "joint", calib, False))


# -- auto --------------------------------------------------------------------------------------


def names(candidates: str, nm: bool = False) -> list[str]:
    return [n for n, _ in auto.candidate_specs(candidates, nm)]


def test_auto_candidates_are_checked():
    assert "alphapruning" in names("all") and "lsa" in names("all") and "auto" not in names("all")
    assert "alphapruning" not in names("all", nm=True) and "dlp" in names("all", nm=True)
    assert auto.candidate_specs("uniform/DLP[alpha=0.1]/atp[step=0.01;beta=auto]", False) == [
        ("uniform", {}),
        ("dlp", {"alpha": 0.1}),
        ("atp", {"step": 0.01, "beta": "auto"}),
    ]
    with pytest.raises(ConfigError, match="did you mean 'owl'"):
        names("uniform/owll")
    with pytest.raises(ConfigError, match="does not support N:M"):
        names("mrp", nm=True)
    with pytest.raises(ConfigError, match="named twice"):
        names("owl/owl[lam=0.1]")
    with pytest.raises(ConfigError, match="has no hyper-parameter 'lamb'"):
        auto.candidate_params("owl", {"lamb": 0.1}, 4)
    assert auto.candidate_params("atp", {"heldout": 9}, 5)["heldout"] == 5  # the held-out windows are auto's
    # checked with the config, before any work
    with pytest.raises(ConfigError, match="'alphapruning' does not support N:M"):
        pw.PruneConfig(allocator="auto:candidates=uniform/alphapruning", pattern="2:4").validate()
    with pytest.raises(ConfigError, match="'owl' has no hyper-parameter 'lamb'"):
        pw.PruneConfig(allocator="auto:candidates=owl[lamb=0.1]", sparsity=0.5).validate()
    with pytest.raises(ConfigError, match="granularity=block"):
        pw.PruneConfig(allocator="lsa:granularity=layer", pattern="4:8").validate()


def test_auto_picks_the_lowest_heldout_perplexity(tokenizer, text_file, tmp_path):
    """Each candidate's recorded score equals the held-out perplexity of the model pruned with that
    candidate alone; the choice is the lowest; ATP's own trials (and its beta=0, uniform) are reused."""
    model = tiny_model("llama", layers=4)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    base = dict(model="x", metric="wanda", sparsity=0.6, nsamples=4, seqlen=32, calib=f"file:{text_file}")
    cfg = pw.PruneConfig(allocator="auto:candidates=uniform/owl/dlp/lsa/atp[step=0.1],heldout=3", **base)
    planned = pw.plan(model, cfg, tmp_path, tokenizer=tokenizer, progress=False)
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())
    rec = planned.details["auto"]
    rows = {r["allocator"]: r for r in rec["candidates"]}
    assert list(rows) == ["uniform", "owl", "dlp", "lsa", "atp"]
    grid = len(rows["atp"]["search"]["curve"])
    assert rec["trials"] == grid + 3  # ATP's grid (beta 0 = uniform) + owl, dlp, lsa
    held = heldout_ids(tokenizer, cfg.calib, 4, 32, 0, 3, tmp_path).reshape(-1)
    for name, row in rows.items():
        spec = "atp:beta=" + repr(row["search"]["chosen"]) if name == "atp" else name
        one = pw.PruneConfig(allocator=spec, **base)
        alone = pw.plan(model, one, tmp_path, tokenizer=tokenizer, progress=False).allocation
        assert block_profile(planned.profile, alone) == pytest.approx(row["blocks"], abs=1e-12), name
        pw.prune(model, tokenizer, one, allocation=alone, cache_dir=tmp_path, progress=False)
        assert pw.perplexity(model, held, 32, progress=False)["ppl"] == pytest.approx(row["heldout_ppl"], rel=1e-6)
        model.load_state_dict(dense)
    best = min(rows.values(), key=lambda r: r["heldout_ppl"])
    assert rec["chosen"] == best["allocator"]
    assert block_profile(planned.profile, planned.allocation) == pytest.approx(best["blocks"], abs=1e-12)


def test_auto_record_round_trip_and_cli_table(tokenizer, text_file, tmp_path, capsys):
    from prunewise.cli import main

    d = tmp_path / "m"
    tiny_model("llama").save_pretrained(d)
    tokenizer.save_pretrained(d)
    args = ["prune", "--model", str(d), "--metric", "wanda", "--sparsity", "0.5", "--nsamples", "4", "--seqlen",
            "32", "--calib", f"file:{text_file}", "--no-eval", "--cache-dir", str(tmp_path / "c"), "-q"]  # fmt: skip
    assert main([*args, "--allocator", "auto:candidates=uniform/dlp,heldout=2", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    rec = RunRecord.read(tmp_path / "r" / "pruning.json")
    auto_rec = rec.allocation["auto"]
    assert out.count("held-out ppl") == 2 and f"auto: {auto_rec['chosen']} chosen from 2 candidates" in out
    assert RunRecord.from_dict(rec.to_dict()).allocation["auto"] == auto_rec
    assert [r["allocator"] for r in auto_rec["candidates"]] == ["uniform", "dlp"]
    assert rec.blocks == pytest.approx(
        next(r["blocks"] for r in auto_rec["candidates"] if r["allocator"] == auto_rec["chosen"])
    )
    # the dry run announces the trials before any is made
    assert main([*args, "--allocator", "auto:candidates=uniform/dlp/atp[step=0.1],heldout=2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    announced = "auto: 3 candidates (uniform/dlp/atp); at most 2 trial prunings with wanda, each scored on 2"
    assert announced in out and "atp search: 5 trial prunings" in out and "(6 trial prunings)" in out
    assert out.index(announced) < out.index("chosen from 3 candidates")


def test_auto_refuses_to_run_without_its_driver():
    prof = profile_of(2)
    with pytest.raises(ConfigError, match="prunes and evaluates"):
        auto.allocate(prof, 0.5)
    assert names("all")[0] == "uniform"


def test_auto_candidate_driver_remeasures_only_its_own_statistics(calib, tokenizer, text_file, tmp_path, monkeypatch):
    """MRP's dynamic rounds inside auto re-measure MRP's statistics on the sparse model, not
    AlphaPruning's spectra (computed once, before the candidates plan)."""
    from prunewise.allocation import statistics

    calls = []
    entry = statistics.STATISTICS.get("eigenvalues")
    real = entry.fn
    monkeypatch.setitem(
        statistics.STATISTICS._entries,
        "eigenvalues",
        type(entry)(**{**entry.__dict__, "fn": lambda ctx: calls.append(1) or real(ctx)}),
    )
    model = tiny_model("llama", layers=4)
    cfg = pw.PruneConfig(
        model="x",
        metric="wanda",
        allocator="auto:candidates=alphapruning/mrp[stats=dynamic;rounds=3],heldout=2",
        sparsity=0.6,
        nsamples=4,
        seqlen=32,
        calib=f"file:{text_file}",
    )
    planned = pw.plan(model, cfg, tmp_path, tokenizer=tokenizer, progress=False)
    rows = {r["allocator"]: r for r in planned.details["auto"]["candidates"]}
    assert len(rows["mrp"]["rounds"]) == 3 and len(calls) == 1
