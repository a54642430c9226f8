import logging

import pytest
import torch

from prunewise.metrics import magnitude, sparsegpt, wanda
from prunewise.prune.masks import Pattern, make_mask, spread_counts, target_count
from prunewise.prune.stats import LayerStats, make_stats


def stats_from(x: torch.Tensor, gram: bool) -> LayerStats:
    st = make_stats(("hessian",) if gram else ("input_norm",), x.shape[-1])
    for sample in x:  # one calibration sequence at a time
        st.add(sample.unsqueeze(0))
    return st


def test_stats_hand_values():
    x = torch.tensor([[[1.0, 2.0], [3.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]])  # 2 sequences x 2 tokens
    st = stats_from(x, gram=False)
    assert st.nsamples == 2 and st.ntokens == 4
    # a_j = sqrt(sum of squares / N_seq): col0 (1+9+0+1)/2, col1 (4+0+1+1)/2
    assert torch.allclose(st.input_norm(), torch.tensor([5.5, 3.0]).sqrt())
    sg = stats_from(x, gram=True)
    xs = x.reshape(-1, 2)
    assert torch.allclose(sg.hessian(), 2.0 / 2 * xs.t() @ xs)
    assert torch.allclose(sg.input_norm(), st.input_norm())  # the Hessian's diagonal gives the same norm


@pytest.mark.parametrize("width", [5, 8, 21])  # within one band, exactly one, three with a partial last
def test_gram_in_bands_is_the_full_product(monkeypatch, width):
    from prunewise.prune import stats as stats_mod

    monkeypatch.setattr(stats_mod, "GRAM_BAND", 8)
    x = torch.randn(3, 7, width)  # statistics are float32
    st = stats_from(x, gram=True)
    xs = x.reshape(-1, width)
    full = xs.t() @ xs
    band = torch.arange(width) // 8
    lower_blocks = band.unsqueeze(1) > band.unsqueeze(0)
    assert torch.equal(st.gram[lower_blocks], torch.zeros(int(lower_blocks.sum())))
    assert torch.allclose(st.gram[~lower_blocks], full[~lower_blocks], rtol=1e-5, atol=1e-5)
    gram = st.gram.clone()
    h = st.hessian()
    assert torch.equal(h, h.t())  # mirrored exactly
    assert torch.allclose(h, 2.0 / 3 * full, rtol=1e-5, atol=1e-5)
    assert torch.equal(st.gram, gram)  # hessian() returns a fresh tensor


@pytest.mark.parametrize("n", [1, 6, 13, 40])
def test_inverse_cholesky_is_the_reference_factor(n):
    # The reference: cholesky, cholesky_inverse, then the upper Cholesky factor of H^-1.
    x = torch.randn(3 * n, n, dtype=torch.float64) * torch.rand(n, dtype=torch.float64)
    h = x.t() @ x
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    before = h.clone()
    u = sparsegpt.inverse_cholesky(h, 0.01)
    assert torch.equal(h, before)  # the caller's Hessian is left as it was
    assert torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    assert torch.allclose(u, expected, rtol=1e-9, atol=1e-12)
    assert torch.allclose(u.t() @ u @ damped, torch.eye(n, dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("width", [5, 21])
def test_factor_from_the_reversed_gram_is_the_mirrored_hessians(monkeypatch, width):
    """SparseGPT factors ``J H J`` built straight from the banded Gram matrix (lower blocks zero, so
    half of the reversed matrix's upper triangle is unfilled): the Cholesky factorisation reads only
    the lower triangle, so the factor is the one of the mirrored Hessian bit for bit."""
    from prunewise.prune import stats as stats_mod

    monkeypatch.setattr(stats_mod, "GRAM_BAND", 8)
    st = stats_from(torch.randn(3, 7, width) * torch.rand(width), gram=True)
    h = st.hessian()
    rev = st.reversed_hessian()
    lower = torch.ones(width, width, dtype=torch.bool).tril()
    assert torch.equal(rev[lower], h.flip(0, 1)[lower])
    if width > 8:
        assert not torch.equal(rev, h.flip(0, 1))  # unmirrored: the upper triangle is not filled
    holder = [rev]
    u = sparsegpt.reversed_factor(holder, 0.01)
    assert holder == []  # taken, so that it can be freed once factored
    # the path it replaced: damping from H's (strided) diagonal, J H J mirrored in full
    f = h.flip(0, 1)
    f.diagonal().add_(0.01 * torch.diagonal(h).mean().item())
    assert torch.equal(u, sparsegpt.upper_triangular_inverse(torch.linalg.cholesky(f).flip(0, 1)))


@pytest.mark.parametrize("n", [5, 577, 2049])
def test_damping_mean_is_summed_as_hs_diagonal(n):
    h = torch.rand(n, n, generator=torch.Generator().manual_seed(n)) * 100
    assert sparsegpt._diagonal_mean(h.flip(0, 1)) == torch.diagonal(h).mean().item()


def test_upper_triangular_inverse_by_halves():
    r = torch.randn(13, 13, dtype=torch.float64).triu()
    r.diagonal().copy_(torch.rand(13, dtype=torch.float64) + 0.5)
    inv = sparsegpt.upper_triangular_inverse(r, leaf=2)  # four levels of halves
    assert torch.equal(inv, inv.triu())
    assert torch.allclose(inv @ r, torch.eye(13, dtype=torch.float64), atol=1e-10)


def test_wanda_disagrees_with_magnitude_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, -1.5]])
    x = torch.tensor([[[10.0, 1.0]]])  # first input is 10x larger
    st = stats_from(x, gram=False)
    s_w = wanda.score(w, st)
    assert torch.allclose(s_w, torch.tensor([[10.0, 2.0], [30.0, 1.5]]))
    mag = make_mask(magnitude.score(w, None), 0.5, Pattern(), "row")
    wan = make_mask(s_w, 0.5, Pattern(), "row")
    assert mag.tolist() == [[True, False], [False, True]]
    assert wan.tolist() == [[False, True], [False, True]]  # row 0 flips: |1|*10 > |2|*1


def test_sparsegpt_disagrees_with_magnitude_by_hand():
    # Diagonal Hessian h = [4, 1] (x0 has twice the scale): score w^2 * h = [4, 1.21].
    w = torch.tensor([[1.0, 1.1]])
    x = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    st = stats_from(x, gram=True)
    out = sparsegpt.solve(w, st, 0.5, Pattern(), percdamp=0.0)
    assert out.tolist() == [[1.0, 0.0]]  # magnitude would prune the 1.0
    assert make_mask(magnitude.score(w, None), 0.5, Pattern(), "row").tolist() == [[True, False]]


def test_sparsegpt_obs_update_compensates_correlated_inputs():
    # x0 = x1 on half the tokens: removing w0 moves its contribution onto w1 (later columns only).
    torch.manual_seed(0)
    x0 = torch.randn(64)
    x1 = torch.cat([x0[:32], torch.randn(32)])
    x = torch.stack([x0, x1], 1).unsqueeze(0)
    w = torch.tensor([[0.3, 2.0]])
    st = stats_from(x, gram=True)
    out = sparsegpt.solve(w, st, 0.5, Pattern(), percdamp=0.0)
    assert out[0, 0] == 0
    xs = x[0]
    # closed form: least-squares refit of w1 once w0 is removed
    expect = 2.0 + 0.3 * (xs[:, 0] @ xs[:, 1]) / (xs[:, 1] @ xs[:, 1])
    assert out[0, 1].item() == pytest.approx(expect.item(), rel=1e-4)


def brute_force_sparsegpt(w, h, sparsity, blocksize, pattern, percdamp=0.01):
    """Sequential OBS with explicit inverses of the remaining-column Hessian, in float64."""
    w = w.double().clone()
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    rows, cols = w.shape
    d = torch.stack([torch.linalg.inv(h[k:, k:])[0, 0].sqrt() for k in range(cols)])
    starts = list(range(0, cols, blocksize))
    counts = spread_counts(target_count(sparsity, rows * cols), [rows * min(blocksize, cols - s) for s in starts])
    mask = torch.zeros_like(w, dtype=torch.bool)
    for s, c in zip(starts, counts):
        e = min(s + blocksize, cols)
        if not pattern.is_nm:
            sc = (w[:, s:e] ** 2 / d[s:e] ** 2).reshape(-1)
            blk = torch.zeros(sc.numel(), dtype=torch.bool)
            blk[torch.sort(sc, stable=True).indices[:c]] = True
            mask[:, s:e] = blk.view(rows, e - s)
        for i in range(s, e):
            if pattern.is_nm and i % pattern.m == 0:
                sc = w[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m] ** 2
                idx = torch.sort(sc, dim=1, stable=True).indices[:, : pattern.n]
                mask[:, i : i + pattern.m].scatter_(1, idx, True)
            hinv = torch.linalg.inv(h[i:, i:])
            q = torch.where(mask[:, i], torch.zeros_like(w[:, i]), w[:, i])
            err = (w[:, i] - q) / hinv[0, 0]
            w[:, i:] -= err.unsqueeze(1) * hinv[0].unsqueeze(0)
            w[:, i] = q
    return w


@pytest.mark.parametrize(
    "blocksize,pattern", [(16, Pattern()), (5, Pattern()), (16, Pattern(2, 4)), (8, Pattern(1, 4))]
)
def test_sparsegpt_matches_brute_force_obs(blocksize, pattern):
    torch.manual_seed(1)
    rows, cols = 6, 16
    mix = torch.randn(cols, cols)
    x = torch.randn(4, 40, cols) @ mix
    x[..., 3] = 0  # a dead input
    w = torch.randn(rows, cols)
    st = stats_from(x, gram=True)
    got = sparsegpt.solve(w, st, 0.5, pattern, blocksize=blocksize)
    want = brute_force_sparsegpt(w, st.hessian(), 0.5, blocksize, pattern)
    assert torch.equal(got == 0, want == 0)
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4)
    expected = rows * cols * pattern.n // pattern.m if pattern.is_nm else rows * cols // 2
    assert int((got == 0).sum()) == expected
    assert (got[:, 3] == 0).all()
    if pattern.is_nm:
        assert ((got == 0).view(rows, -1, pattern.m).sum(-1) >= pattern.n).all()


def test_sparsegpt_beats_mask_only_reconstruction():
    torch.manual_seed(2)
    cols = 48
    x = torch.randn(8, 64, cols) @ (torch.eye(cols) + 0.5 * torch.randn(cols, cols))
    w = torch.randn(24, cols)
    st_h = stats_from(x, gram=True)
    xs = x.reshape(-1, cols)

    def err(wp):
        return ((w - wp) @ xs.t()).square().sum().item()

    sgpt = sparsegpt.solve(w, st_h, 0.5, Pattern(), blocksize=16)
    same_mask_no_update = w.masked_fill(sgpt == 0, 0)
    mag_w = w.masked_fill(make_mask(magnitude.score(w, None), 0.5, Pattern(), "matrix"), 0)
    assert err(sgpt) < 0.8 * err(same_mask_no_update)
    assert err(sgpt) < err(mag_w)


def test_sparsegpt_cholesky_retry_warns(caplog):
    # Rank-one inputs and no damping: H is singular, so the first factorisation fails.
    x = torch.ones(2, 10, 8)
    st = stats_from(x, gram=True)
    w = torch.randn(4, 8)
    with caplog.at_level(logging.WARNING):
        out = sparsegpt.solve(w, st, 0.5, Pattern(), percdamp=0.0)
    assert "not positive definite" in caplog.text
    assert torch.isfinite(out).all()
    assert int((out == 0).sum()) == 16


def test_sparsegpt_keeps_dtype():
    x = torch.randn(2, 10, 8)
    st = stats_from(x, gram=True)
    out = sparsegpt.solve(torch.randn(4, 8).to(torch.bfloat16), st, 0.25, Pattern())
    assert out.dtype == torch.bfloat16
    assert int((out == 0).sum()) == 8
