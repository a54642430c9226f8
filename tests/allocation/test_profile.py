import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunewise.allocation import alphapruning, esd, uniform
from prunewise.allocation.esd import alpha_hill, candidates_for, eigenvalues, hill_fit
from prunewise.allocation.profile import (
    LayerInfo,
    Profile,
    check_allocation,
    clamp_to_budget,
    weighted_mean,
)
from prunewise.errors import PrunewiseError


def profile_of(sizes_per_block):
    layers = []
    for b, sizes in enumerate(sizes_per_block):
        for j, n in enumerate(sizes):
            layers.append(LayerInfo(f"blocks.{b}.l{j}", b, n, (1, n)))
    return Profile(layers)


def test_uniform_and_check():
    prof = profile_of([[4, 8], [4, 8]])
    alloc = uniform.allocate(prof, 0.3)
    check_allocation("uniform", prof, alloc, 0.3)
    with pytest.raises(PrunewiseError, match="allocator 'x' returned a wrong set of layers"):
        check_allocation("x", prof, {"blocks.0.l0": 0.3}, 0.3)
    with pytest.raises(PrunewiseError, match="outside \\[0, 1\\)"):
        check_allocation("x", prof, {**alloc, "blocks.0.l0": 1.0}, 0.3)
    with pytest.raises(PrunewiseError, match="parameter-weighted mean"):
        check_allocation("x", prof, {**alloc, "blocks.0.l0": 0.5}, 0.3)


def test_clamp_redistributes_cut_mass():
    prof = profile_of([[10], [10], [20]])
    vals = {"blocks.0.l0": 1.2, "blocks.1.l0": 0.6, "blocks.2.l0": 0.5}  # mean 0.7
    out = clamp_to_budget(vals, prof, 0.7, 0.0, 0.99)
    assert out["blocks.0.l0"] == 0.99
    assert weighted_mean(prof, out) == pytest.approx(0.7, abs=1e-12)
    # the others keep their ratio 0.6 : 0.5
    assert out["blocks.1.l0"] / out["blocks.2.l0"] == pytest.approx(1.2)


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
@pytest.mark.parametrize("fit", ["full", "xmin_mid", "xmin_peak"])
def test_hill_fit_recovers_known_exponent(alpha, fit):
    # Pareto eigenvalues with density ~ x^-alpha (x >= 1): the MLE is consistent.
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lam = (1 - u) ** (-1 / (alpha - 1))
    assert alpha_hill(lam, fit) == pytest.approx(alpha, abs=0.1)


def test_hill_fit_scale_invariant_when_corrected():
    u = torch.rand(2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lam = (1 - u) ** (-1 / 2.0)
    assert alpha_hill(lam * 1e-4) == pytest.approx(alpha_hill(lam), abs=1e-9)


def test_peak_candidates_window_and_quirk():
    lam = torch.sort(
        torch.rand(500, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 10 + 0.01
    ).values
    fixed = candidates_for(lam, "xmin_peak")
    quirk = candidates_for(lam, "xmin_peak", faithful_log10=True)
    assert set(fixed.tolist()) <= set(quirk.tolist())  # the quirk's lower bound is (almost) inactive
    assert len(quirk) >= len(fixed)


def test_eigenvalues_are_squared_singular_values():
    w = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    assert torch.allclose(eigenvalues(w), torch.tensor([4.0, 9.0], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(40, 96), (96, 40), (64, 64)])
def test_gram_eigenvalues_equal_float64_svd(shape):
    """From the Gram of the smaller side: min(rows, cols) values, ascending, equal to a float64 SVD's
    squares (heavy-tailed spectrum: singular values spread over three decades)."""
    g = torch.Generator().manual_seed(4)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g, dtype=torch.float64))
    sigma = torch.logspace(-3, 0, k, dtype=torch.float64)
    w = (u * sigma) @ v.T
    lam = eigenvalues(w)
    assert lam.shape == (k,)
    assert torch.all(lam[1:] >= lam[:-1])
    ref = torch.sort(torch.linalg.svdvals(w).square()).values
    assert torch.allclose(lam, ref, rtol=1e-9, atol=0)
    assert alpha_hill(lam, "full") == pytest.approx(alpha_hill(ref, "full"), rel=1e-9)


def test_eigenvalues_of_rank_deficient_matrix_are_zero_below_resolution():
    """A rank-2 matrix: the Gram's other eigenvalues are rounding noise and come back as exact zeros,
    which the fit then drops."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(12, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 30, generator=g, dtype=torch.float64)
    lam = eigenvalues(w)
    assert lam.shape == (12,)
    assert torch.count_nonzero(lam) == 2
    assert torch.allclose(lam[-2:], torch.sort(torch.linalg.svdvals(w)[:2].square()).values, rtol=1e-12)


def loop_hill_fit(lam, candidates):
    """The fit one candidate at a time, written out from the formulas in the module docstring."""
    best = (0.0, 1.0, int(candidates[0]))
    logs = lam.log()
    for i in candidates.tolist():
        n = lam.numel() - i
        denom = logs[i:].sum().item() - n * logs[i].item()
        if n < 2 or denom <= 0 or 1.0 + n / denom <= 1.0:
            continue
        alpha = 1.0 + n / denom
        d = max(abs(1.0 - (lam[i + k].item() / lam[i].item()) ** (1.0 - alpha) - k / n) for k in range(n))
        if d < best[1]:
            best = (alpha, d, i)
    return best


@pytest.mark.parametrize("chunk", [esd.CHUNK_ELEMENTS, 300, 1])
def test_vectorised_hill_fit_picks_the_loops_cut(monkeypatch, chunk):
    """Every candidate at once, in chunks of any size (1: one candidate per chunk): the cut, exponent
    and distance of the one-candidate-at-a-time fit."""
    monkeypatch.setattr(esd, "CHUNK_ELEMENTS", chunk)
    u = torch.rand(150, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    lam = torch.sort((1 - u) ** (-1 / 2.5)).values
    for cands in (torch.arange(0, 149), candidates_for(lam, "xmin_peak"), torch.tensor([75])):
        alpha, d, i = hill_fit(lam, cands)
        ref = loop_hill_fit(lam, cands)
        assert i == ref[2]
        assert alpha == pytest.approx(ref[0], rel=1e-12)
        assert d == pytest.approx(ref[1], rel=1e-9)
    # no admissible candidate (a tail of one eigenvalue): the documented fallback
    assert hill_fit(lam, torch.tensor([149])) == (0.0, 1.0, 149)


def alpha_profile(alphas_per_block, sizes=(6, 12)):
    """Profile whose matrices carry Pareto-like spectra with the given exponents."""
    prof = profile_of([list(sizes) for _ in alphas_per_block])
    u = torch.rand(600, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    eigs = {}
    for layer in prof.layers:
        a = alphas_per_block[layer.block]
        eigs[layer.name] = torch.sort((1 - u) ** (-1 / (a - 1))).values
    prof.stats["eigenvalues"] = eigs
    return prof


def test_alphapruning_larger_alpha_gets_higher_sparsity():
    prof = alpha_profile([2.0, 3.5, 2.5, 5.0])
    out = alphapruning.allocate(prof, 0.6, epsilon=0.2, fit="full")
    check_allocation("alphapruning", prof, out, 0.6)
    per_block = [out[f"blocks.{b}.l0"] for b in range(4)]
    assert per_block[0] < per_block[2] < per_block[1] < per_block[3]
    assert all(out[f"blocks.{b}.l0"] == out[f"blocks.{b}.l1"] for b in range(4))  # one value per block
    # multiplicative interval: the extremes are eta (1 - epsilon) and eta (1 + epsilon)
    assert per_block[3] / per_block[0] == pytest.approx(1.2 / 0.8, rel=1e-9)


def test_alphapruning_epsilon_zero_is_uniform():
    prof = alpha_profile([2.0, 3.5, 2.5])
    assert set(alphapruning.allocate(prof, 0.5, epsilon=0.0, fit="xmin_mid").values()) == {0.5}


def test_alphapruning_clamps_at_high_sparsity():
    prof = alpha_profile([2.0, 2.1, 2.2, 6.0])
    out = alphapruning.allocate(prof, 0.9, epsilon=0.5, fit="full")
    check_allocation("alphapruning", prof, out, 0.9)
    assert max(out.values()) == pytest.approx(0.99)


@settings(max_examples=50, deadline=None)
@given(
    alphas=st.lists(st.floats(1.5, 8.0), min_size=2, max_size=6),
    sparsity=st.floats(0.05, 0.9),
    epsilon=st.floats(0.0, 0.5),
)
def test_alphapruning_map_properties(alphas, sparsity, epsilon):
    prof = profile_of([[5, 9] for _ in alphas])
    per_layer = {x.name: alphas[x.block] for x in prof.layers}
    out = alphapruning.map_alphas(per_layer, prof, sparsity, epsilon)
    check_allocation("alphapruning", prof, out, sparsity)
    for a in prof.layers:
        for b in prof.layers:
            if per_layer[a.name] < per_layer[b.name]:
                assert out[a.name] <= out[b.name] + 1e-12
