"""The task-arithmetic family's arithmetic in numpy: the one implementation both engines run.

A plain ``hm3 merge`` (linear, task arithmetic, TIES, DARE, DARE-TIES on safetensors checkpoints)
runs it without torch (``hm3.merging.numpy_engine``: the process never imports torch, ~0.8 s of a
2.4 s merge of two bert-base models, issue 6); the torch methods (``hm3.merging.methods``,
``steps``) run it on views of their tensors' memory. ``tests/test_numpy_engine.py`` checks that the
two engines give the same bytes on every method, dtype and option this module supports;
``tests/test_methods.py`` checks the arithmetic against plain whole-tensor references.

Here too: the blocking (``blocks``), the reused scratch buffers (``workspace``), the order of sums
(``fixed_sum``), DARE's random bits (``draws``) and the exact k-th largest magnitude by selection
(``kth_largest``). Why each step is written the way it is (in-place ops into owned buffers,
block-wise elementwise work, float masks multiplied in) and where hm3 differs from mergekit:
``hm3.merging.steps``.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from enum import Enum
from functools import lru_cache
from typing import Any, Iterator, Sequence

import numpy as np


class Sparsify(str, Enum):
    magnitude = "magnitude"  # TIES: keep the top-k |x|
    random = "random"  # DARE: keep each element with probability density
    magnitude_outliers = "magnitude_outliers"  # Breadcrumbs: drop the largest gamma and the smallest
    della_magprune = "della_magprune"  # DELLA: keep probability grows with magnitude rank


class Rescale(str, Enum):
    """Which norm a sparsified tensor is rescaled to match (mergekit: l1 when ``rescale``)."""

    l1 = "l1"
    l2 = "l2"
    linf = "linf"
    inverse = "inverse"  # hm3 opt-in: divide by density, as in the DARE paper


# -- sums in a fixed order ----------------------------------------------------------------------------
#: ``fixed_sum``'s row length: numpy sums each row in its pairwise order, on one thread
SUM_CHUNK = 4096


def _rows(n: int) -> int:
    """How many sums ``fixed_sum``'s first level makes of ``n`` elements."""
    return (n + SUM_CHUNK - 1) // SUM_CHUNK


def row_sums(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``fixed_sum``'s first level of flat ``a`` into ``out`` (``_rows(n)``,): each row of
    ``SUM_CHUNK`` elements summed by numpy, then the short rest. Rows start at multiples of
    ``SUM_CHUNK``, so the sums of a flat array cut in such pieces, piece by piece, are its sums."""
    n = a.size
    r = n % SUM_CHUNK
    np.sum(a[: n - r].reshape(-1, SUM_CHUNK), axis=1, out=out[: n // SUM_CHUNK])
    if r:
        out[n // SUM_CHUNK] = a[n - r:].sum()
    return out


def fixed_sum(a: np.ndarray) -> np.generic:
    """The sum of all of ``a``'s elements (a scalar of its dtype) in a fixed order: rows of
    ``SUM_CHUNK`` (``row_sums``), then the row sums the same way, until one short row is left.
    The same bits with any thread count, here and in the torch methods (``steps.fixed_sum``)."""
    a = a.reshape(-1)
    while a.size > SUM_CHUNK:
        a = row_sums(a, np.empty(_rows(a.size), dtype=a.dtype))
    return a.dtype.type(a.sum())


def weight_total(weights: Sequence[float], dtype) -> np.generic:
    """``Σ w_i`` in ``dtype``, summed by numpy (what normalising divides by)."""
    return np.asarray(weights, dtype=dtype).sum()


# -- blocks and scratch buffers -----------------------------------------------------------------------
# Elementwise work runs block by block: a block's steps chain in the L2/L3 cache instead of streaming
# whole word-embedding matrices through memory once per step. Elementwise results do not depend on the
# blocking; reductions (norms) always run over whole tensors. A multiple of 4 elements, so each block
# of DARE's random bits is a whole number of 64-bit draws, and of SUM_CHUNK, so a block's row sums are
# whole rows of fixed_sum's.
BLOCK = 1 << 17
assert BLOCK % SUM_CHUNK == 0 and BLOCK % 4 == 0


def blocks(n: int, size: int = BLOCK) -> "Iterator[slice]":
    """Consecutive slices covering ``range(n)``, ``size`` elements each (the last may be shorter)."""
    return (slice(s, min(n, s + size)) for s in range(0, n, size))


# A merge goes through ~200 tensors of a few shapes, and a fresh buffer costs a page fault per page on
# first touch. Inside ``workspace()`` scratch buffers are kept and reused from one tensor to the next
# (grown to the largest), and freed on exit; outside it they are fresh. A scratch buffer never outlives
# the call that took it: results are always new arrays. Per thread; torch's buffers live here too
# (``steps.scratch``), keyed by their dtype.
_local = threading.local()


@contextmanager
def workspace() -> "Iterator[None]":
    """Reuse scratch buffers (``scratch``, ``steps.scratch``) until the block ends (per thread)."""
    outer = getattr(_local, "buffers", None)
    _local.buffers = {} if outer is None else outer
    try:
        yield
    finally:
        _local.buffers = outer


def kept_buffers() -> dict | None:
    """This thread's workspace buffers, or None outside ``workspace()``."""
    return getattr(_local, "buffers", None)


def scratch(key: object, n: int, dtype) -> np.ndarray:
    """An uninitialised ``(n,)`` array for ``key``: kept for reuse inside ``workspace()``, else new.
    Two live buffers need two keys."""
    dtype = np.dtype(dtype)
    buffers = kept_buffers()
    if buffers is None:
        return np.empty(n, dtype=dtype)
    buf = buffers.get((key, dtype))
    if buf is None or buf.size < n:
        buffers.pop((key, dtype), None)  # free the smaller one before allocating
        buf = buffers[(key, dtype)] = np.empty(n, dtype=dtype)
    return buf[:n]


# -- selection: TIES's threshold ----------------------------------------------------------------------
def keep_count(density: float, n: int) -> int:
    """Elements kept by magnitude pruning: ``max(1, int(density * n))`` (mergekit)."""
    return max(1, int(density * n))


SAMPLE = 1 << 16  # the largest sample that brackets the threshold
MIN_SAMPLE = 1 << 12


def sample_size(n: int) -> int:
    """How many of ``n`` values the sample takes: 1/64 of them, between ``MIN_SAMPLE`` and ``SAMPLE``.
    A fixed 2^16 cost a 768x768 matrix (2^19.2 elements) as much as its whole selection (gathering
    and partitioning the sample), ~1.5 ms of 8 per tensor; a smaller sample only widens the bracket."""
    return min(SAMPLE, max(MIN_SAMPLE, n // 64))


def bracketed(n: int) -> bool:
    """Whether a selection over ``n`` values brackets the threshold with a sample (else it partitions
    everything)."""
    return n > 4 * sample_size(n)


@lru_cache(maxsize=16)  # a model has a few distinct tensor sizes
def _sample_positions(n: int) -> np.ndarray:
    """``sample_size(n)`` positions in ``range(n)``, drawn with a fixed seed: the same work every time."""
    # ascending: the gather reads memory in order (the sample is the same set in any order)
    return np.sort(np.random.default_rng(0).integers(0, n, sample_size(n)))


def _bracket(n: int, r: int, sample: np.ndarray, values, scan=None) -> tuple[np.ndarray, int, np.ndarray] | None:
    """The values between two sample quantiles around ascending rank ``r`` (in memory order), how
    many lie below them, and how many of them each block holds; None when the bracket misses rank
    ``r`` (the caller then partitions everything). ``sample``: the values at ``_sample_positions(n)``
    (changed: partitioned); ``values(b)``: the values of block slice ``b``; ``scan(lo, hi)``: the
    same pass done elsewhere (``native.bracket``: the values in ``[lo, hi]``, how many lie below,
    how many of them each block holds).

    The sample's rank of the threshold is binomial; the bracket spans 4 standard deviations (+8) each
    side, ~1.6% of the elements at rank n/2 with a sample of 2^16 (~6.5% with 2^12), so it misses
    with probability ~1e-4 and the partition afterwards works on a small part of the tensor. One
    pass, block by block, two comparisons an element.
    """
    m = sample.size
    p = r / n
    pos, margin = p * m, 4.0 * float(np.sqrt(m * p * (1 - p))) + 8
    i_lo, i_hi = math.floor(pos - margin), math.ceil(pos + margin)  # sample ranks; off the ends: unbounded
    ranks = [i for i in (i_lo, i_hi) if 0 <= i < m]
    if ranks:
        sample.partition(ranks)  # only the two sample quantiles are needed: no sort
    lo = sample[i_lo] if i_lo >= 0 else -np.inf
    hi = sample[i_hi] if i_hi < m else np.inf
    if scan is not None:
        bracket, below, counts = scan(lo, hi)
    else:
        below, parts = 0, []
        inside, under = np.empty(min(n, BLOCK), bool), np.empty(min(n, BLOCK), bool)
        for b in blocks(n):
            blk = values(b)
            u, i = under[: blk.size], inside[: blk.size]
            below += np.count_nonzero(np.less(blk, lo, out=u))  # NaN: neither below nor inside (numpy: largest)
            np.logical_and(np.greater_equal(blk, lo, out=i), np.less_equal(blk, hi, out=u), out=i)
            parts.append(blk[i])
        bracket = np.concatenate(parts)
        counts = np.fromiter((x.size for x in parts), dtype=np.int64, count=len(parts))
    if not 0 <= r - below < bracket.size:
        return None
    return bracket, below, counts


def select(n: int, k: int, values, *, ties: bool = False, gather=None, scan=None
           ) -> tuple[float, int, np.ndarray | None]:
    """``(t, n_ge, drop)``: the ``k``-th largest ``t`` of ``n`` values, exactly, by selection (no
    sort); how many are ``>= t`` (``k`` plus the ties at ``t`` ranked below ``k``); with ``ties``, the
    positions of the ``n_ge - k`` last elements equal to ``t`` in memory order (keeping the first
    ones keeps exactly ``k``), else None. The values come block by block from ``values(b)`` (a view
    or a reused buffer), so they need not exist as one array; ``gather(positions)``: a new array of
    the values at ``positions`` (default ``values``: an array's ``__getitem__`` is both);
    ``scan``: ``_bracket``'s pass done by compiled code (``native.bracket``).

    Large arrays: the sample brackets ``t`` (``_bracket``) and only the bracket is partitioned; 5-8x
    faster than partitioning a whole word-embedding matrix (session 9). Exact either way: the sample
    only decides how much is partitioned. Every element equal to ``t`` lies in the bracket, in
    memory order, so the blocks that hold the dropped ties are known from it, and only those are
    read again to find where they are.
    """
    r = n - k  # 0-based ascending rank of the threshold
    found = _bracket(n, r, (gather or values)(_sample_positions(n)), values, scan) if bracketed(n) else None
    if found is None:
        whole = None
        for b in blocks(n):
            v = values(b)
            if whole is None:
                whole = np.empty(n, dtype=v.dtype)
            whole[b] = v
        vals, j, counts = whole, r, None
    else:
        vals, below, counts = found
        j = r - below
    part = vals.copy()
    part.partition(j)  # part[:j] <= part[j] <= part[j:]
    t = part[j]
    # Everything from j on is >= t (and so is all above the bracket); below j, only the ties at t are.
    n_ge = k + int(np.count_nonzero(part[:j] == t))
    drop = None
    if ties and n_ge > k:
        tied = np.flatnonzero(vals == t)[-(n_ge - k):]  # the dropped ones: indices into vals
        if counts is not None:  # bracket indices -> their blocks -> where the ties of those blocks are
            held = np.unique(np.searchsorted(np.cumsum(counts), tied, side="right"))
            at = [np.flatnonzero(values(b) == t) + b.start for b in
                  (slice(int(i) * BLOCK, min(n, (int(i) + 1) * BLOCK)) for i in held)]
            tied = np.concatenate(at)[-(n_ge - k):]
        drop = tied
    return float(t), n_ge, drop


def kth_largest(arr: np.ndarray, k: int) -> tuple[float, int]:
    """The ``k``-th largest value ``t`` of a flat float array, exactly, by selection (no sort), and
    how many elements are ``>= t`` (``select``). ``arr`` is not changed."""
    t, n_ge, _ = select(arr.size, k, arr.__getitem__)
    return t, n_ge


# -- rescale ------------------------------------------------------------------------------------------
def norm(x: np.ndarray, kind: Rescale) -> np.generic:
    if kind is Rescale.l1:
        return fixed_sum(np.abs(x))
    if kind is Rescale.l2:
        return np.sqrt(fixed_sum(x * x))
    return np.abs(x).max()


def norm_ratio(before, after, eps: float = 1e-7):
    """mergekit's rescale factor ``before / after``, or None where it leaves the tensor as it is:
    either norm below ``eps``."""
    if before < eps or after < eps:
        return None
    return before / after


def rescale_(masked: np.ndarray, x: np.ndarray, rescale: Rescale | None, density: float = 1.0,
             eps: float = 1e-7) -> np.ndarray:
    """Rescale ``masked`` (= ``x * mask``, an array the caller owns) in place so that its norm
    matches ``x``'s (mergekit's rule), or divide it by the density (``inverse``)."""
    if rescale is None:
        return masked
    if rescale is Rescale.inverse:
        return np.divide(masked, density, out=masked) if density > 0 else masked
    factor = norm_ratio(norm(x, rescale), norm(masked, rescale), eps)
    return masked if factor is None else np.multiply(masked, factor, out=masked)


# -- sparsify -----------------------------------------------------------------------------------------
def magnitude(x: np.ndarray, density: float, rescale: Rescale | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
    """TIES trim: keep the ``k = max(1, int(density·n))`` largest-magnitude elements (ties at the
    threshold: the first ones in memory order). Into ``out`` (``x``'s size, not ``x``; default a new
    array), or ``x`` itself at density 1."""
    if density >= 1:
        return x
    if density <= 0 or x.size == 0:
        return np.zeros_like(x)
    k = keep_count(density, x.size)
    # |x| for the selection, then the mask, then the result
    out = np.empty(x.shape, dtype=x.dtype) if out is None else out.reshape(x.shape)
    absx = np.abs(x, out=out).reshape(-1)  # becomes the mask
    # elements tied at the threshold: the first ones are kept, exactly k in all
    t, _, drop = select(absx.size, k, absx.__getitem__, ties=True)
    np.greater_equal(out, t, out=out)  # 1.0 where kept
    if drop is not None:
        absx[drop] = 0
    return rescale_(np.multiply(out, x, out=out), x, rescale, density)


def draws(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` 64-bit draws of ``rng``'s bit generator (int64). Each gives 4 elements' 16 bits:
    little-endian, element ``4j + i`` takes bits ``16i..16i+15`` of draw ``j``."""
    return rng.bit_generator.random_raw(count).view(np.int64)


def bernoulli_parts(x: np.ndarray, density: float, rng: np.random.Generator, rescale: Rescale | None = None,
                    out: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
    """DARE's drop without its last pass: ``(x * keep, factor)`` (factor None: 1). Each element is
    kept where its 16 random bits, read as a signed int16 plus 2^15 (the unsigned value with its top
    bit flipped), are below ``round(density·2^16)`` (``steps.bernoulli``);
    ``out`` takes ``x * keep`` (default a new array; ``x`` itself to drop in place), or it is ``x``
    itself at density 1. Block by block, the l1 rescale's sums taken as ``fixed_sum`` rows while a
    block is in cache."""
    if density >= 1:
        return x, None
    q = round(density * (1 << 16))
    in_place = out is x
    if in_place and not x.flags.c_contiguous:
        raise ValueError("bernoulli_parts drops in place only in a contiguous array")
    out = np.empty(x.shape, dtype=x.dtype) if out is None else out.reshape(x.shape)
    if q >= 1 << 16 and in_place:  # within 2^-17 of 1: keep all (x * 1 is x)
        return _owed_rescale(x, x, rescale, density)
    if q >= 1 << 16 or not x.flags.c_contiguous:
        if q >= 1 << 16:  # within 2^-17 of 1: keep all, no draw
            out.fill(1)
        else:
            n = x.size
            np.less(draws(rng, (n + 3) // 4).view(np.int16)[:n].reshape(x.shape), q - (1 << 15), out=out)
        return _owed_rescale(np.multiply(out, x, out=out), x, rescale, density)
    n, flat, dst = x.size, x.reshape(-1), out.reshape(-1)
    l1 = rescale is Rescale.l1 and n > SUM_CHUNK
    if l1:
        sums = scratch("dare l1 rows", 2 * _rows(n), x.dtype).reshape(2, -1)  # rows of |x|, of |x * keep|
        absb = scratch("dare abs", min(n, BLOCK), x.dtype)
    keep = scratch("dare keep", min(n, BLOCK), x.dtype)
    # dropping in place: a norm the blocks do not sum is taken of x before it is gone
    before = norm(x, rescale) if in_place and not l1 and rescale not in (None, Rescale.inverse) else None
    below = q - (1 << 15)  # keep where int16 + 2^15 < q, i.e. int16 < q - 2^15 (int16 + 2^15 = u ^ 0x8000)
    for b in blocks(n):
        m = b.stop - b.start
        if l1:  # |x| first: dst may be x itself
            rows = slice(b.start // SUM_CHUNK, b.start // SUM_CHUNK + _rows(m))
            row_sums(np.abs(flat[b], out=absb[:m]), sums[0, rows])
        k = np.less(draws(rng, (m + 3) // 4).view(np.int16)[:m], below, out=keep[:m])  # 1.0 where kept
        np.multiply(k, flat[b], out=dst[b])
        if l1:
            row_sums(np.abs(dst[b], out=absb[:m]), sums[1, rows])
    if l1:
        return out, norm_ratio(fixed_sum(sums[0]), fixed_sum(sums[1]))
    if before is not None:
        return out, norm_ratio(before, norm(out, rescale))
    return _owed_rescale(out, x, rescale, density)


def _owed_rescale(masked: np.ndarray, x: np.ndarray, rescale: Rescale | None, density: float):
    """``bernoulli_parts``' result for ``masked`` = ``x * keep``: none / inverse rescale applied in
    place, a norm rescale returned as its factor."""
    if rescale is Rescale.inverse or rescale is None:
        return rescale_(masked, x, rescale, density), None
    return masked, norm_ratio(norm(x, rescale), norm(masked, rescale))


# -- TIES election ------------------------------------------------------------------------------------
def sign_total(deltas: "Sequence[np.ndarray]", method: str) -> np.ndarray:
    """What the election reads, in a new array: the deltas' sum (``sum``) or their signs' (``count``),
    summed in model order."""
    if method not in ("sum", "count"):
        raise ValueError(f"unknown consensus {method!r}; use 'sum' or 'count'")
    terms = deltas if method == "sum" else [np.sign(d) for d in deltas]
    total = np.add(terms[0], terms[1]) if len(terms) > 1 else terms[0].copy()
    for t in terms[2:]:
        np.add(total, t, out=total)
    return total


def disjoint_merge(trimmed: "Sequence[np.ndarray]", method: str = "sum",
                   weights: "Sequence[float] | None" = None) -> tuple[np.ndarray, np.ndarray | None]:
    """TIES elect + disjoint merge: ``Σ_i t_i ⊙ agree_i`` and, with ``weights``, the divisor
    ``Σ_i w_i·agree_i`` with its zeros replaced by 1. Consumes ``trimmed`` (the caller's own arrays,
    weighted already): each is masked in place and the first becomes the sum."""
    positive = sign_total(trimmed, method)
    np.greater_equal(positive, 0, out=positive)  # 1.0 where + is elected
    mask = np.empty_like(positive)
    mixed = divisor = None
    for i, t in enumerate(trimmed):
        # (t > 0) == elected agrees wherever t != 0; a zero entry stays ±0 whatever the mask.
        np.equal(np.greater(t, 0, out=mask), positive, out=mask)
        np.multiply(t, mask, out=t)
        mixed = t if mixed is None else np.add(mixed, t, out=mixed)
        if weights is not None:
            np.not_equal(t, 0, out=mask)  # = agrees: the entries that survived the mask
            if divisor is None:
                divisor = np.multiply(mask, weights[i])
            else:
                divisor += mask * weights[i]
    if divisor is not None:
        divisor += np.equal(divisor, 0, out=mask)  # nobody agrees: divide by 1
    return mixed, divisor


# -- the methods --------------------------------------------------------------------------------------
def _sparsify_one(kind: Sparsify | None, x: np.ndarray, i: int, p, rng, hook=None, consume: bool = False):
    """``(S(x), factor)``: the sparsified array (a scratch buffer the merge consumes, ``x`` itself
    where nothing is dropped, or with ``consume`` DARE's drop done in ``x``) and a multiplier still
    to apply to it (None: 1). ``hook(x, i)``: a sparsifier given by the caller (the torch methods'
    Breadcrumbs and DELLA)."""
    if kind is None:
        return x, None
    if hook is not None:
        return hook(x, i)
    d = p.density[i]
    if kind is Sparsify.magnitude:
        return magnitude(x, d, p.rescale, out=scratch(("sparsified", i), x.size, x.dtype)), None
    if kind is Sparsify.random:
        out = x if consume and x.flags.c_contiguous else scratch(("sparsified", i), x.size, x.dtype)
        return bernoulli_parts(x, d, rng, p.rescale, out=out)
    raise NotImplementedError(f"sparsify {kind.value!r} has no numpy implementation; use the torch methods")


# Overflow (a huge lambda) is not warned about here: callers check results for NaN/inf and say which tensor.
@np.errstate(over="ignore", invalid="ignore")
def generalized_task_arithmetic(base: np.ndarray, deltas: np.ndarray, p, rng: np.random.Generator | None, *,
                                sparsify: Sparsify | None, consensus: bool, sparsify_fn=None,
                                consume: bool = False) -> np.ndarray:
    """``base + λ · Σ_i m_i ⊙ w_i · S(δ_i) / (normalize ? Σ_i w_i m_i : 1)`` (``methods``'
    function of the same name, whose docstring explains it); ``deltas`` is ``(N, *shape)``; ``p`` a
    ``methods.TensorParams``; ``sparsify_fn(x, i)`` a sparsifier this module does not have.
    ``deltas`` is not changed unless ``consume`` (a buffer of the caller's that the merge may work
    in: one pass and one buffer less per model)."""
    n = deltas.shape[0]
    if n == 0:
        return base
    trimmed, owned, scales = [], [], []
    for i in range(n):
        d = deltas[i]
        t, factor = _sparsify_one(sparsify, d, i, p, rng, sparsify_fn, consume)
        mine = consume or t is not d
        if not t.flags.c_contiguous:
            t, mine = np.ascontiguousarray(t), True
        trimmed.append(t.reshape(-1))
        owned.append(mine)
        scales.append(factor)
    return combine(base, trimmed, owned, scales, p, consensus).astype(base.dtype, copy=False)


@np.errstate(over="ignore", invalid="ignore")
def combine(base: np.ndarray, trimmed: Sequence, owned: Sequence[bool], factors: Sequence, p, consensus: bool
            ) -> np.ndarray:
    """The rest of ``generalized_task_arithmetic`` once each model's ``S(δ_i)`` is known, block by
    block: each times its ``factors[i]`` (None: 1) and its weight, then the sign election and
    disjoint sum (``consensus``) or the plain sum, the division, lambda, the base. ``trimmed[i][b]``
    gives model ``i``'s values of block slice ``b``: a view of an array (``owned[i]``: one the merge
    may change; else it is copied first) or a block computed on demand (``hm3.merging.streamed``).
    A new array of ``trimmed``'s dtype, ``base``'s shape."""
    n = len(trimmed)
    dtype = np.dtype(trimmed[0].dtype)
    out = np.empty(base.shape, dtype=dtype)
    scales = [tuple(f for f in (factors[i], w if w != 1 else None) if f is not None)  # weights before the
              for i, w in enumerate(p.weight)]                                         # election (mergekit)
    flat_base, dst = base.reshape(-1), out.reshape(-1)
    total = None
    if not consensus:
        total = weight_total(p.weight, dtype)
        if abs(total) < 1e-8:
            total = dtype.type(1)
    copies: list[np.ndarray | None] = [None] * n  # block buffers for the caller's deltas
    for b in blocks(flat_base.size):
        ts = []
        for i in range(n):
            if owned[i]:
                t = trimmed[i][b]
            else:
                if copies[i] is None:
                    copies[i] = scratch(("block copy", i), min(BLOCK, flat_base.size), dtype)
                t = copies[i][: b.stop - b.start]
                np.copyto(t, trimmed[i][b])
            for f in scales[i]:
                np.multiply(t, f, out=t)
            ts.append(t)
        if consensus:
            mixed, divisor = disjoint_merge(ts, p.consensus, p.weight if p.normalize else None)
        else:
            mixed, divisor = ts[0], total  # summed in model order
            for t in ts[1:]:
                np.add(mixed, t, out=mixed)
        if p.normalize:
            np.divide(mixed, divisor, out=mixed)
        if p.lambda_ != 1:
            np.multiply(mixed, p.lambda_, out=mixed)
        np.add(mixed, flat_base[b], out=dst[b])
    return out


@np.errstate(over="ignore", invalid="ignore")
def linear(base: np.ndarray, deltas, p) -> np.ndarray:
    """Model soup: ``Σ w_i θ_i / Σ w_i`` (with ``normalize``) over ``θ_i = base + δ_i``, block by
    block: the products summed in model order, then the base (``methods.linear``). ``deltas``: an
    ``(N, *shape)`` array, or N sources of flat blocks as ``combine`` takes them."""
    flat = deltas.reshape(deltas.shape[0], -1) if isinstance(deltas, np.ndarray) else deltas
    if len(flat) == 0:
        return base
    dtype = np.dtype(flat[0].dtype)
    w = np.asarray(p.weight, dtype=dtype)
    total = weight_total(p.weight, dtype)
    out = np.empty(base.shape, dtype=dtype)
    flat_base, dst = base.reshape(-1), out.reshape(-1)
    term = scratch("linear term", min(BLOCK, dst.size), dtype)
    for b in blocks(dst.size):
        acc, t = dst[b], term[: b.stop - b.start]
        np.multiply(flat[0][b], w[0], out=acc)
        for i in range(1, len(flat)):
            np.add(acc, np.multiply(flat[i][b], w[i], out=t), out=acc)
        if p.normalize:
            np.add(np.divide(acc, total, out=acc), flat_base[b], out=acc)
        else:
            np.add(acc, total * flat_base[b], out=acc)
    return out.astype(base.dtype, copy=False)


#: methods this module implements: name -> (sparsify, consensus); linear is its own
GTA_METHODS: dict[str, tuple[Sparsify | None, bool]] = {
    "task_arithmetic": (None, False),
    "ties": (Sparsify.magnitude, True),
    "dare_linear": (Sparsify.random, False),
    "dare_ties": (Sparsify.random, True),
}
METHODS = ("linear", *GTA_METHODS)


def merge(method: str, base: np.ndarray, deltas: np.ndarray, p, rng: np.random.Generator | None, *,
          consume: bool = False) -> np.ndarray:
    """One tensor merged by ``method`` (one of ``METHODS``); ``consume``: the merge may work in
    ``deltas`` (``generalized_task_arithmetic``)."""
    if method == "linear":
        return linear(base, deltas, p)
    sparsify, consensus = GTA_METHODS[method]
    return generalized_task_arithmetic(base, deltas, p, rng, sparsify=sparsify, consensus=consensus, consume=consume)
