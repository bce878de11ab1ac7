"""Property tests of the merge steps (hm3.merging.steps): each step on its own, small tensors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hm3.merging import kernels, steps
from hm3.merging.engine import tensor_generator
from hm3.merging.steps import Rescale

FAST = settings(max_examples=60, deadline=None)

shapes = st.one_of(
    st.tuples(st.integers(1, 40)),
    st.tuples(st.integers(1, 8), st.integers(1, 12)),
    st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5)),
)
densities = st.floats(0.01, 0.99, allow_nan=False)


def distinct(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Nonzero entries with pairwise distinct magnitudes and random signs: top-k is unique."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(shape).prod())
    mags = (torch.randperm(n, generator=g).float() + 1) / n
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return (mags * signs).reshape(shape)



# -- kth_largest (the selection behind TIES' trim) -------------------------------------------------
def _reference(a: torch.Tensor, k: int) -> tuple[float, int]:
    t = float(torch.sort(a.reshape(-1), descending=True).values[k - 1])
    return t, int((a >= t).sum())


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "skewed"])
@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.97, 1.0])
def test_kth_largest_matches_a_full_sort_on_large_tensors(kind, density):
    """Tensors above 4 samples take the bracketed path; its result must be the sort's, ties included."""
    g = torch.Generator().manual_seed(3)
    n = 5 * steps.SAMPLE + 17
    a = {"normal": lambda: torch.randn(n, generator=g).abs(),
         "ties": lambda: torch.randint(0, 50, (n,), generator=g).float(),  # every value tied ~5,000 times
         "zeros": lambda: torch.cat([torch.zeros(n - 1000), torch.rand(1000, generator=g)]),  # unchanged rows
         "skewed": lambda: torch.randn(n, generator=g).exp() ** 4}[kind]()
    before = a.clone()
    k = steps.keep_count(density, n)
    assert steps.kth_largest(a, k) == _reference(a, k)
    assert torch.equal(a, before), "the input is left as it was"


def test_kth_largest_falls_back_when_the_bracket_misses(monkeypatch):
    a = torch.randn(5 * steps.SAMPLE, generator=torch.Generator().manual_seed(4)).abs()
    monkeypatch.setattr(kernels, "_bracket", lambda *a, **k: None)  # the module kth_largest runs in
    assert steps.kth_largest(a, 1234) == _reference(a, 1234)


def _bracket(arr, r):
    """``kernels._bracket`` of a whole array: (values, count below)."""
    found = kernels._bracket(arr.size, r, arr[kernels._sample_positions(arr.size)], arr.__getitem__)
    return None if found is None else found[:2]


def test_bracket_reports_a_miss_and_leaves_nan_above():
    arr = torch.rand(5 * steps.SAMPLE, generator=torch.Generator().manual_seed(5)).numpy()
    r = arr.size // 2
    part, below = _bracket(arr, r)
    assert below <= r < below + part.size and (part >= arr[arr < 2].min()).all()
    assert int((arr < part.min()).sum()) == below
    arr[:10] = float("nan")  # numpy ranks NaN above everything: the bracket must not count it below
    part, below = _bracket(arr, r)
    assert int((arr < part.min()).sum()) == below
    # A sample that lies: every sampled position holds a small value, the rest are large, so the
    # bracket sits far below the median and must say it missed.
    import numpy as np

    seen = steps._sample_positions(arr.size)  # _bracket's sample positions
    arr[:] = 2.0
    arr[seen] = np.linspace(0, 1, seen.size, dtype=arr.dtype)
    assert _bracket(arr, r) is None
    assert steps.kth_largest(torch.from_numpy(arr), arr.size - r) == (2.0, arr.size - int((arr < 2).sum()))


# -- magnitude (TIES trim) -------------------------------------------------------------------------
@FAST
@given(shape=shapes, density=densities, seed=st.integers(0, 2**16))
def test_magnitude_keeps_exactly_k_largest(shape, density, seed):
    x = distinct(shape, seed)
    out = steps.magnitude(x, density)
    kept = out != 0
    k = max(1, int(density * x.numel()))
    assert int(kept.sum()) == k == steps.keep_count(density, x.numel())
    assert torch.equal(out[kept], x[kept]), "kept values are unchanged without rescale"
    if k < x.numel():
        assert x[kept].abs().min() > x[~kept].abs().max(), "the kept entries are the largest"


@FAST
@given(shape=shapes, density=densities, seed=st.integers(0, 2**16))
def test_magnitude_rescale_l1(shape, density, seed):
    x = distinct(shape, seed)
    out = steps.magnitude(x, density, Rescale.l1)
    assert torch.isclose(out.abs().sum(), x.abs().sum(), rtol=1e-5)
    assert int((out != 0).sum()) == max(1, int(density * x.numel()))


def test_magnitude_edges():
    x = distinct((5, 4), 0)
    assert steps.magnitude(x, 1.0) is x  # density 1: untouched
    assert not steps.magnitude(x, 0.0).any()
    assert steps.magnitude(torch.zeros(0), 0.5).numel() == 0
    assert int((steps.magnitude(x, 1e-6) != 0).sum()) == 1  # at least one element survives


# -- rescale ---------------------------------------------------------------------------------------
@FAST
@given(shape=shapes, seed=st.integers(0, 2**16), norm=st.sampled_from([Rescale.l1, Rescale.l2, Rescale.linf]))
def test_rescale_preserves_norm(shape, seed, norm):
    x = distinct(shape, seed)
    mask = (torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1)) < 0.5).float()
    mask.view(-1)[0] = 1  # something survives
    out = steps.rescale_masked(x, mask, norm)
    ref = {Rescale.l1: lambda t: t.abs().sum(), Rescale.l2: lambda t: t.norm(),
           Rescale.linf: lambda t: t.abs().max()}[norm]
    assert torch.isclose(ref(out), ref(x), rtol=1e-5)
    assert torch.equal(out == 0, mask == 0), "rescaling never revives a dropped entry"
    ratio = out[mask.bool()] / x[mask.bool()]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5), "one factor for the whole tensor"


def test_rescale_degenerate_and_inverse():
    x = torch.tensor([1.0, -2.0, 3.0, -4.0])
    empty = torch.zeros(4)
    assert torch.equal(steps.rescale_masked(x, empty, Rescale.l1), empty), "nothing kept: zeros, no 0/0"
    assert torch.equal(steps.rescale_masked(torch.zeros(4), torch.ones(4), Rescale.l2), torch.zeros(4))
    mask = torch.tensor([1.0, 0, 1, 0])
    assert torch.equal(steps.rescale_masked(x, mask, None), x * mask)
    assert torch.allclose(steps.rescale_masked(x, mask, Rescale.inverse, density=0.25), x * mask * 4)


# -- bernoulli (DARE drop) -------------------------------------------------------------------------
@FAST
@given(seed=st.integers(0, 2**31), density=densities, noise=st.integers(0, 2**31))
def test_bernoulli_reproducible_and_independent_of_global_rng(seed, density, noise):
    x = distinct((16, 8), seed % 1000)
    first = steps.bernoulli(x, density, torch.Generator().manual_seed(seed), Rescale.l1)
    torch.manual_seed(noise)  # whatever else ran in between ...
    torch.rand(37)
    again = steps.bernoulli(x, density, torch.Generator().manual_seed(seed), Rescale.l1)
    assert torch.equal(first, again)  # ... changes nothing


def test_bernoulli_fraction_and_rescale():
    x = distinct((200, 100), 1)
    out = steps.bernoulli(x, 0.3, torch.Generator().manual_seed(0), Rescale.l1)
    frac = float((out != 0).float().mean())
    assert abs(frac - 0.3) < 0.015  # 20k draws: std ≈ 0.0032
    assert torch.isclose(out.abs().sum(), x.abs().sum(), rtol=1e-5)
    assert steps.bernoulli(x, 1.0, None) is x


@pytest.mark.parametrize("density", [1e-6, 0.1, 0.5, 0.9, 1 - 1e-6])
def test_bernoulli_keep_probability_at_the_edges(density):
    """16-bit draws: the keep probability is the density rounded to 2^-16, so densities within
    2^-17 of 0 or 1 keep nothing or everything; every other tensor element is kept at ~density."""
    x = distinct((400, 250), 2)  # 100k elements: the kept fraction's std is below 0.0016
    out = steps.bernoulli(x, density, torch.Generator().manual_seed(3))
    kept = out != 0
    assert torch.equal(out[kept], x[kept]), "kept entries are unchanged without rescale"
    frac = float(kept.float().mean())
    assert abs(frac - round(density * 2**16) / 2**16) < 0.008, frac


def test_tensor_generator_depends_on_seed_and_name_only():
    import numpy as np

    draw = lambda s, n: tensor_generator(s, n).bit_generator.random_raw(8)  # noqa: E731
    a = draw(0, "bert.encoder.layer.0.attention.self.query.weight")
    torch.manual_seed(99)
    np.random.seed(99)
    assert np.array_equal(a, draw(0, "bert.encoder.layer.0.attention.self.query.weight"))
    assert not np.array_equal(a, draw(1, "bert.encoder.layer.0.attention.self.query.weight"))
    assert not np.array_equal(a, draw(0, "bert.encoder.layer.0.attention.self.key.weight"))


def test_dare_draws_from_a_numpy_stream_and_a_torch_generator_seeds_one():
    """The bits are the numpy SFC64 stream's (what a torch-free implementation draws too); a
    torch.Generator passed instead gives a reproducible stream seeded by it."""
    import numpy as np

    x = distinct((37, 11), 4)  # 407 elements: not a multiple of 4
    rng = lambda: np.random.Generator(np.random.SFC64(7))  # noqa: E731
    raw = rng().bit_generator.random_raw((x.numel() + 3) // 4).view(np.int16)[: x.numel()]
    keep = torch.from_numpy((raw.astype(np.int32) + 2**15 < round(0.4 * 2**16)).reshape(x.shape))
    assert torch.equal(steps.bernoulli(x, 0.4, rng()), x * keep)
    a = steps.bernoulli(x, 0.4, torch.Generator().manual_seed(3))
    assert torch.equal(a, steps.bernoulli(x, 0.4, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, steps.bernoulli(x, 0.4, torch.Generator().manual_seed(4)))


# -- sign consensus (TIES elect) -------------------------------------------------------------------
def test_sign_consensus_tie_elects_plus():
    deltas = torch.tensor([[1.0, -3.0], [-1.0, 1.0]])  # column 0 sums to 0 → "+" elected
    mask = steps.sign_consensus(deltas, "sum")
    assert mask[:, 0].tolist() == [True, False]
    assert mask[:, 1].tolist() == [True, False]  # sum −2 → "−"
    count = steps.sign_consensus(deltas, "count")  # one + and one − in both columns → "+"
    assert count.tolist() == [[True, False], [False, True]]


def test_sign_consensus_zero_never_agrees():
    deltas = torch.tensor([[0.0, 0.0, 2.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])
    mask = steps.sign_consensus(deltas)
    assert not mask[:, 0].any(), "all-zero column: nobody agrees (the disjoint mean divides by 1)"
    assert mask[:, 1].tolist() == [False, True, False]
    assert mask[:, 2].tolist() == [True, False, False]


@FAST
@given(data=st.lists(st.lists(st.integers(-3, 3), min_size=5, max_size=5), min_size=1, max_size=5),
       method=st.sampled_from(["sum", "count"]))
def test_sign_consensus_definition(data, method):
    deltas = torch.tensor(data, dtype=torch.float32)
    mask = steps.sign_consensus(deltas, method)
    score = deltas.sum(0) if method == "sum" else deltas.sign().sum(0)
    elected = torch.where(score >= 0, 1.0, -1.0)
    assert torch.equal(mask, (deltas.sign() == elected) & (deltas != 0))


def test_sign_consensus_rejects_unknown_method():
    with pytest.raises(ValueError, match="sum"):
        steps.sign_consensus(torch.ones(2, 3), "majority")


# -- DELLA MagPrune --------------------------------------------------------------------------------
@pytest.mark.parametrize("density,epsilon", [(0.5, 0.2), (0.3, 0.1), (0.7, 0.25)])
def test_della_keep_probability_by_rank(density, epsilon):
    """Keep probability rises linearly with magnitude rank from d−ε to d+ε: measured over 4000
    independent rows holding the same 11 magnitudes in shuffled order."""
    n, rows = 11, 4000
    g = torch.Generator().manual_seed(0)
    mags = torch.arange(1, n + 1, dtype=torch.float32)
    x = torch.stack([mags[torch.randperm(n, generator=g)] for _ in range(rows)])
    out = steps.della_magprune(x, density, epsilon, torch.Generator().manual_seed(1))
    kept = out != 0
    assert torch.equal(out[kept], x[kept]), "no rescale asked: kept values unchanged"
    freq = torch.stack([kept[x == m].float().mean() for m in mags])  # by rank, smallest first
    expected = density - epsilon + 2 * epsilon * torch.arange(n) / (n - 1)
    assert (freq >= density - epsilon - 0.035).all() and (freq <= density + epsilon + 0.035).all(), freq
    assert (freq - expected).abs().max() < 0.035, (freq, expected)  # std ≈ 0.008 per rank


def test_della_one_dim_and_errors():
    x = distinct((50,), 3)
    out = steps.della_magprune(x, 0.5, 0.1, torch.Generator().manual_seed(0), Rescale.l1)
    assert out.shape == x.shape
    assert torch.isclose(out.abs().sum(), x.abs().sum(), rtol=1e-5)
    assert steps.della_magprune(x, 1.0, 0.1, None) is x
    with pytest.raises(ValueError, match="epsilon"):
        steps.della_magprune(x, 0.9, 0.2, None)


# -- Breadcrumbs -----------------------------------------------------------------------------------
@FAST
@given(n=st.integers(20, 300), density=st.floats(0.05, 0.95), gamma=st.floats(0.0, 0.2),
       seed=st.integers(0, 2**16))
def test_breadcrumbs_drops_top_gamma(n, density, gamma, seed):
    x = distinct((n,), seed)
    out = steps.magnitude_outliers(x, density, gamma)
    kept = out != 0
    target, n_top = int(density * n), int(gamma * n)
    assert int(kept.sum()) == target
    order = x.abs().argsort(descending=True)  # largest first
    dropped_top = min(n_top, n - target)  # fewer outliers dropped when the density needs them
    assert not kept[order[:dropped_top]].any(), "the top gamma are dropped"
    assert kept[order[dropped_top : dropped_top + target]].all(), "then the next largest are kept"


def test_breadcrumbs_rescale_and_density_one():
    x = distinct((10, 10), 5)
    out = steps.magnitude_outliers(x, 0.5, 0.05, Rescale.l1)
    assert torch.isclose(out.abs().sum(), x.abs().sum(), rtol=1e-5)
    assert steps.magnitude_outliers(x, 1.0, 0.05) is x


def test_broadcast_weights_shape():
    like = torch.zeros(3, 4, 5)
    w = steps.broadcast_weights(torch.tensor([1.0, 2.0, 3.0]), like)
    assert w.shape == (3, 1, 1)
    assert torch.equal((like + 1).mul(w)[:, 0, 0], torch.tensor([1.0, 2.0, 3.0]))


def test_della_one_element_rows_keep_with_probability_density():
    """mergekit 0.1.5 crashes here (0/0 rank spread → NaN probability); hm3 uses `density`."""
    from hm3.merging.steps import della_magprune

    g = torch.Generator().manual_seed(0)
    x = torch.ones(4000, 1)
    kept = (della_magprune(x, 0.3, 0.1, g) != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.03


# -- reductions: the same bits with any thread count -----------------------------------------------
@pytest.fixture
def threads():
    """Set torch's thread count inside a test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_fixed_sum_is_the_same_with_any_thread_count(threads):
    """torch.sum of a whole tensor rounds differently with 1, 2 and 3 threads on some of these sizes
    (it splits the range per thread); fixed_sum must not, and must still be the sum."""
    g = torch.Generator().manual_seed(0)
    torch_sums_differ = False
    for n in (1, 4096, 4097, 40_000, 393_221, 3_000_001):
        x = torch.randn(n, generator=g).abs()
        got, plain = set(), set()
        for t in (1, 2, 3):
            threads(t)
            got.add(steps.fixed_sum(x).item())
            plain.add(x.sum().item())
        assert len(got) == 1, (n, got)
        torch_sums_differ |= len(plain) > 1
        assert got.pop() == pytest.approx(x.double().sum().item(), rel=1e-5)
    assert torch_sums_differ  # the sizes do exercise the thread-dependent case


@pytest.mark.parametrize("n", [5, 4096, 4097, steps.BLOCK, steps.BLOCK + 4096, 3 * steps.BLOCK + 4097 + 3])
def test_dare_l1_factor_from_block_row_sums_is_the_whole_tensor_norms_ratio(n, threads):
    """bernoulli_parts sums |x| and |x * keep| block by block into fixed_sum's rows: the factor must
    be the one of the whole-tensor norms, bit for bit, with any thread count."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1e-3
    for t in (1, 2):
        threads(t)
        with steps.workspace():
            masked, factor = steps.bernoulli_parts(x, 0.3, torch.Generator().manual_seed(1), Rescale.l1)
        expect = steps.norm_ratio(steps._norm(x, Rescale.l1), steps._norm(masked, Rescale.l1))
        assert factor is not None and factor.item() == expect.item(), (n, t)
        assert factor.item() == pytest.approx(float(x.double().abs().sum() / masked.double().abs().sum()), rel=1e-5)


def test_rescaled_dare_merge_is_the_same_with_any_thread_count(threads):
    """A DARE-TIES merge with the l1 rescale (and DARE with l2) of multi-block tensors: byte-identical
    results with 1, 2 and 3 threads (the rescale factor is a ratio of whole-tensor sums)."""
    from hm3.merging.methods import REGISTRY, TensorParams

    g = torch.Generator().manual_seed(1)
    base = torch.randn(3 * steps.BLOCK + 7, generator=g)
    deltas = torch.randn(2, base.numel(), generator=g)
    for name, rescale in (("dare_ties", Rescale.l1), ("dare_linear", Rescale.l2)):
        p = TensorParams(weight=(1.0, 0.7), density=(0.3, 0.55), rescale=rescale)
        outs = []
        for t in (1, 2, 3):
            threads(t)
            outs.append(REGISTRY[name].fn(base, deltas, p, torch.Generator().manual_seed(4)).view(torch.uint8))
        assert all(torch.equal(outs[0], o) for o in outs[1:]), name
