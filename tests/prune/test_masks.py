import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunewise.errors import ConfigError
from prunewise.prune.masks import (
    Pattern,
    count_true,
    lowest_in_matrix,
    lowest_per_row,
    make_mask,
    nm_mask,
    parse_pattern,
    spread_counts,
    target_count,
    unstructured_mask,
)


def test_parse_pattern():
    assert parse_pattern("unstructured") == Pattern()
    assert parse_pattern("unstructured:group=row") == Pattern(group="row")
    assert parse_pattern("2:4") == Pattern(2, 4)
    assert parse_pattern("2:4").sparsity == 0.5
    assert str(parse_pattern("4:8")) == "4:8"
    for bad in ("4:2", "0:4", "2:2", "dense", "unstructured:group=col", "2:4:8"):
        with pytest.raises(ConfigError):
            parse_pattern(bad)


def test_target_count_rounds_half_up():
    assert target_count(0.5, 10) == 5
    assert target_count(0.7, 10) == 7  # 0.7*10 = 7.000000000000001 in floating point
    assert target_count(0.25, 6) == 2  # 1.5 -> 2
    assert target_count(0.0, 99) == 0


def test_spread_counts_exact_and_balanced():
    assert spread_counts(7, [3, 3, 3]) == [2, 2, 3]
    assert spread_counts(10, [4, 4, 2]) == [4, 4, 2]
    assert sum(spread_counts(1234, [128] * 9 + [64])) == 1234


def test_ties_never_over_prune():
    # Dequantized weights take few distinct values: a threshold rule would prune all 8 tied zeros.
    scores = torch.tensor([[0.0] * 8 + [1.0] * 8])
    mask = unstructured_mask(scores, 0.25, "row")
    assert int(mask.sum()) == 4
    assert mask[0, :4].all() and not mask[0, 4:].any()  # stable: earliest index first


def test_row_group_is_per_row_and_matrix_group_is_global():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    row = unstructured_mask(scores, 0.5, "row")
    assert row.tolist() == [[True, True, False, False], [True, True, False, False]]
    mat = unstructured_mask(scores, 0.5, "matrix")
    assert mat.tolist() == [[True, True, True, True], [False, False, False, False]]


def test_uneven_counts_spread_over_rows():
    scores = torch.arange(30, dtype=torch.float32).view(3, 10)
    mask = unstructured_mask(scores, 0.35, "row")  # 10.5 -> 11 weights over 3 rows
    assert int(mask.sum()) == 11
    assert sorted(mask.sum(1).tolist()) == [3, 4, 4]


def test_lowest_per_row_variable_counts():
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    mask = lowest_per_row(scores, torch.tensor([1, 2]))
    assert mask.tolist() == [[False, True, False], [True, True, False]]


def test_nm_hand_case():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.6, 0.7, 0.8]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, True, False, True, True, True, False, False]]
    with pytest.raises(ValueError):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_make_mask_nm_ignores_sparsity():
    m = make_mask(torch.rand(4, 8), 0.9, Pattern(1, 4), "row")
    assert int(m.sum()) == 8


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 17),
    sparsity=st.floats(0.0, 0.999),
    group=st.sampled_from(["row", "matrix"]),
    levels=st.integers(1, 4),
    seed=st.integers(0, 10_000),
)
def test_unstructured_exact_count(rows, cols, sparsity, group, levels, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (rows, cols), generator=g).float()  # heavy ties
    mask = unstructured_mask(scores, sparsity, group)
    assert int(mask.sum()) == target_count(sparsity, rows * cols)
    # every pruned score is <= every kept score within the comparison group
    groups = [(scores, mask)] if group == "matrix" else [(scores[r], mask[r]) for r in range(rows)]
    for s, m in groups:
        if m.any() and (~m).any():
            assert s[m].max() <= s[~m].min()
    if group == "row":
        per_row = mask.sum(1)
        assert int(per_row.max() - per_row.min()) <= 1


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 7),
    extra=st.integers(1, 4),
    rows=st.integers(1, 6),
    groups=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_nm_exactly_n_per_group(n, extra, rows, groups, seed):
    m = n + extra
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (rows, groups * m), generator=g).float()
    mask = nm_mask(scores, n, m)
    per_group = mask.view(rows, groups, m).sum(-1)
    assert (per_group == n).all()
    s = scores.view(rows, groups, m)
    mk = mask.view(rows, groups, m)
    for r in range(rows):
        for k in range(groups):
            assert s[r, k][mk[r, k]].max() <= s[r, k][~mk[r, k]].min()


def test_sparsity_out_of_range():
    with pytest.raises(ValueError):
        unstructured_mask(torch.rand(2, 2), 1.0, "row")


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 7),
    cols=st.integers(1, 40),
    levels=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_selection_equals_stable_sort(rows, cols, levels, seed, data):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (rows, cols), generator=g).float()
    counts = torch.tensor(data.draw(st.lists(st.integers(0, cols), min_size=rows, max_size=rows)))
    order = torch.sort(scores, dim=1, stable=True).indices
    expect = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(rows):
        expect[r, order[r, : counts[r]]] = True
    assert torch.equal(lowest_per_row(scores, counts), expect)
    k = data.draw(st.integers(0, rows * cols))
    flat = torch.zeros(rows * cols, dtype=torch.bool)
    flat[torch.sort(scores.reshape(-1), stable=True).indices[:k]] = True
    assert torch.equal(lowest_in_matrix(scores, k), flat.view(rows, cols))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 7),
    cols=st.integers(2, 40),
    levels=st.integers(1, 6),
    nan=st.booleans(),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_rows_that_prune_k_or_k_plus_one_share_one_selection(rows, cols, levels, nan, seed, data):
    """Spread counts (every row ``k`` or ``k + 1``: what a sparsity that is not a whole number of
    weights per row gives) take one selection for both counts; the set is still the stable sort's,
    ties and NaN (lowest) included."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (rows, cols), generator=g).float()
    if nan:
        scores[torch.rand(rows, cols, generator=g) < 0.2] = float("nan")
    k = data.draw(st.integers(0, cols - 1))
    counts = k + torch.tensor(data.draw(st.lists(st.integers(0, 1), min_size=rows, max_size=rows)))
    order = torch.sort(torch.nan_to_num(scores, nan=-float("inf")), dim=1, stable=True).indices
    expect = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(rows):
        expect[r, order[r, : counts[r]]] = True
    assert torch.equal(lowest_per_row(scores, counts), expect)


@pytest.mark.parametrize("numel", [0, 1, 16383, 16384, 16385, 70_001])
def test_count_true_counts_every_entry(numel):
    g = torch.Generator().manual_seed(numel)
    mask = torch.rand(numel, generator=g) < 0.7
    assert count_true(mask) == int(mask.sum()) == sum(mask.tolist())
    assert count_true(torch.ones(numel, dtype=torch.bool)) == numel  # int16 chunk sums do not wrap
    if numel > 40_000:  # rows wider than an int16 count
        wide = torch.ones(2, numel // 2, dtype=torch.bool)
        assert count_true(wide) == 2 * (numel // 2)
        scores = torch.rand(2, 35_000, generator=g)
        assert unstructured_mask(scores, 0.6, "row").sum(1).tolist() == [21_000, 21_000]


def test_a_whole_matrix_wider_than_an_int16_count_keeps_the_stable_sort_set():
    """A whole-matrix selection is one row of every score (here 60,000, with massive ties): its
    count runs in int16 chunks, and the set is still the stable sort's."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 7, (200, 300), generator=g).float()
    for k in (1, 25_713, 59_999):
        expect = torch.zeros(60_000, dtype=torch.bool)
        expect[torch.sort(scores.reshape(-1), stable=True).indices[:k]] = True
        assert torch.equal(lowest_in_matrix(scores, k), expect.view(200, 300))


@pytest.mark.parametrize("ties", [False, True])
def test_selection_with_and_without_ties_at_the_cut(ties):
    """Distinct scores take the short path (every tie at the cut is the k-th value itself); a row
    with more equal scores at the cut than it needs takes the tie-break by position. Both give the
    stable sort's set."""
    g = torch.Generator().manual_seed(7)
    scores = torch.randperm(64 * 50, generator=g).float().view(64, 50)
    if ties:
        scores[3, 10:40] = -1.0  # 30 equal lowest values in row 3: more than k = 1 or 17 needs
    for k in (1, 17, 49):  # k = 49 in row 3: all 30 ties and 19 more
        order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        expect = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
        assert torch.equal(lowest_per_row(scores, torch.full((64,), k)), expect)


def test_nan_scores_keep_exact_counts_and_go_first():
    """Issue 22 case 3: a NaN score compares with nothing; selection still removes exactly the
    target count, NaN positions first."""
    scores = torch.arange(1.0, 17.0).reshape(2, 8)
    scores[0, 5] = float("nan")
    scores[1, :] = float("nan")  # a row of NaN activations: ties broken by position
    mask = make_mask(scores, 0.25, Pattern(), "row")
    assert mask.sum(1).tolist() == [2, 2]
    assert mask[0].nonzero().flatten().tolist() == [0, 5] and mask[1].nonzero().flatten().tolist() == [0, 1]
    assert make_mask(scores, 0.25, Pattern(), "matrix").sum() == 4
    nm = make_mask(scores, 0.5, Pattern(n=2, m=4), "row")
    assert nm.reshape(2, 2, 4).sum(2).tolist() == [[2, 2], [2, 2]] and nm[0, 5]
