"""The steps merge methods are built from: sparsify, rescale, sign consensus, weighted mean.

Each is a pure function of tensors. Semantics follow mergekit 0.1.5 (``mergekit/sparsify.py`` and
``generalized_task_arithmetic.py``), which the parity tests check; where hm3 differs it says so:

* Randomness comes only from the generator passed in (mergekit uses the global RNG), so a seeded
  merge is byte-identical whatever else ran before it. DARE's bits come from a numpy ``SFC64``
  stream (``numpy_rng``): the merge's own generators (``engine.tensor_generator``) are numpy
  ``Generator``s, and a ``torch.Generator`` passed instead seeds one. numpy, not torch's mt19937,
  so that an implementation without torch draws the same bits (and SFC64 draws them ~2x faster).
* Magnitude pruning finds the k-th largest magnitude by selection, not by sorting (mergekit sorts
  the whole tensor): a random sample brackets the threshold, one pass gathers the few elements inside
  the bracket, and numpy's introselect partitions only those (``kth_largest``). The kept set is the
  same k elements except for elements tied at the threshold, where hm3 keeps the first ones in memory
  order (mergekit: whichever its sort puts first).
* DARE's keep mask compares 16 random bits per element with the density (mergekit:
  ``torch.bernoulli`` of a tensor filled with it): the same distribution up to the density's rounding
  to 2^-16, another random stream.
* Norms (the rescale) are sums in a fixed order computed by numpy (``fixed_sum``): the same bits
  with any thread count, and from a numpy-only implementation.

Speed (issue 6): the large tensors are word embeddings of tens of millions of elements, where every
fresh tensor costs page faults and every bool→float promotion a slow unvectorised loop. So the hot
steps write into buffers they own (``|x|`` becomes the trimmed tensor; the random bits' comparison
becomes the mask), and masks are float 1.0/0.0 multiplied in, which gives exactly the numbers of
``x * bool_mask`` (including the sign of zero). Elementwise steps run block by block (``blocks``),
and inside ``workspace()`` (the merge loop) scratch buffers are reused from tensor to tensor.
Only reductions (norms) see whole tensors, by ``fixed_sum``: a sum in a fixed order, so a rescaled
DARE merge gives the same bytes with any number of threads (``torch.sum`` of a whole tensor splits
its range across threads, and its last bit changed with the thread count).
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from enum import Enum
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np
import torch


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


#: ``fixed_sum``'s chunk: below torch's grain size (32,768), so a sum of at most this many
#: elements never splits across threads
SUM_CHUNK = 4096


def fixed_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of all of ``x``'s elements (a 0-d tensor of ``x``'s dtype), rounded the same with any
    thread count and by any implementation that follows this order.

    ``torch.sum`` of a whole tensor splits the range across threads, each thread adding its part in
    its own order, so the result's last bit depends on ``torch.get_num_threads()``. Here the
    elements are summed in rows of ``SUM_CHUNK`` by numpy (one thread, numpy's pairwise order within
    a row), then the row sums the same way, until one short row is left, which numpy sums too.
    """
    a = _numpy(x.reshape(-1))
    while a.size > SUM_CHUNK:
        a = _np_row_sums(a, np.empty(_rows(a.size), dtype=a.dtype))
    return torch.from_numpy(np.asarray(a.sum(), dtype=a.dtype).reshape(())).to(x.dtype)


def _numpy(x: torch.Tensor) -> np.ndarray:
    """``x`` as a numpy array sharing its memory (bfloat16, which numpy lacks: a float32 copy)."""
    if x.dtype == torch.bfloat16:
        x = x.float()
    return x.detach().numpy()


def _np_row_sums(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``fixed_sum``'s first level of flat ``a`` into ``out``: each row of ``SUM_CHUNK`` elements
    summed by numpy, then the short rest."""
    n = a.size
    r = n % SUM_CHUNK
    np.sum(a[: n - r].reshape(-1, SUM_CHUNK), axis=1, out=out[: n // SUM_CHUNK])
    if r:
        out[n // SUM_CHUNK] = a[n - r:].sum()
    return out


def _rows(n: int) -> int:
    """How many sums ``fixed_sum``'s first level makes of ``n`` elements."""
    return (n + SUM_CHUNK - 1) // SUM_CHUNK


def _row_sums(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``fixed_sum``'s first level of flat ``x`` into ``out`` (``_rows(n)``,): the sum of each row of
    ``SUM_CHUNK`` elements, then of the short rest. Rows start at multiples of ``SUM_CHUNK``, so the
    sums of a flat tensor cut in such pieces, piece by piece, are its sums."""
    if out.dtype == torch.bfloat16:  # numpy has no bfloat16: sum into a float32 array, then round
        return out.copy_(torch.from_numpy(_np_row_sums(_numpy(x), np.empty(out.numel(), np.float32))))
    _np_row_sums(_numpy(x), _numpy(out))
    return out


def _norm(x: torch.Tensor, kind: Rescale) -> torch.Tensor:
    if kind is Rescale.l1:
        return fixed_sum(x.abs())
    if kind is Rescale.l2:
        return fixed_sum(x * x).sqrt()
    return x.abs().max()


def rescale_masked(
    x: torch.Tensor, mask: torch.Tensor, rescale: Rescale | None, density: float = 1.0, eps: float = 1e-7
) -> torch.Tensor:
    """``x * mask``, optionally rescaled so that its norm matches ``x``'s (mergekit's rule)."""
    return rescale_(x * mask, x, rescale, density, eps)


def rescale_(
    masked: torch.Tensor, x: torch.Tensor, rescale: Rescale | None, density: float = 1.0, eps: float = 1e-7
) -> torch.Tensor:
    """Rescale ``masked`` (= ``x * mask``, a tensor the caller owns) in place, as ``rescale_masked``."""
    if rescale is None:
        return masked
    if rescale is Rescale.inverse:
        return masked.div_(density) if density > 0 else masked
    factor = norm_ratio(_norm(x, rescale), _norm(masked, rescale), eps)
    return masked if factor is None else masked.mul_(factor)


def norm_ratio(before: torch.Tensor, after: torch.Tensor, eps: float = 1e-7) -> torch.Tensor | None:
    """mergekit's rescale factor ``before / after`` (a 0-d tensor), or None where it leaves the
    tensor as it is: either norm below ``eps``."""
    if before < eps or after < eps:
        return None
    return before / after


# Elementwise work runs block by block (``blocks``): a block's steps chain in the L2/L3 cache instead
# of streaming whole word-embedding matrices through memory once per step. Elementwise results do not
# depend on the blocking; reductions (norms) always run over whole tensors. A multiple of 4 elements,
# so each block of DARE's random bits is a whole number of 64-bit draws.
BLOCK = 1 << 17
assert BLOCK % SUM_CHUNK == 0, "bernoulli_parts sums whole fixed_sum rows per block"


def blocks(n: int, size: int = BLOCK) -> "Iterator[slice]":
    """Consecutive slices covering ``range(n)``, ``size`` elements each (the last may be shorter)."""
    return (slice(s, min(n, s + size)) for s in range(0, n, size))


# Scratch buffers. A merge goes through ~200 tensors of a few shapes, and a fresh buffer costs a
# page fault per page on first touch — for a bert-base DARE-TIES merge as much time as the steps
# themselves. Inside ``workspace()`` the steps' scratch buffers are kept and reused from one tensor
# to the next (grown to the largest), and freed on exit; outside it they are fresh tensors. A
# scratch buffer never outlives the call that took it: results are always new tensors.
_local = threading.local()


@contextmanager
def workspace() -> "Iterator[None]":
    """Reuse the steps' scratch buffers (``scratch``) until the block ends (per thread)."""
    outer = getattr(_local, "buffers", None)
    _local.buffers = {} if outer is None else outer
    try:
        yield
    finally:
        _local.buffers = outer


def scratch(key: object, n: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised ``(n,)`` buffer for ``key``: kept for reuse inside ``workspace()``, else new.
    Two live buffers need two keys."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        return torch.empty(n, dtype=dtype)
    buf = buffers.get((key, dtype))
    if buf is None or buf.numel() < n:
        buffers.pop((key, dtype), None)  # free the smaller one before allocating
        buf = buffers[(key, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n]


def keep_count(density: float, n: int) -> int:
    """Elements kept by magnitude pruning: ``max(1, int(density * n))`` (mergekit)."""
    return max(1, int(density * n))


# numpy partitions these in place (introselect); others (bfloat16) fall back to torch.kthvalue.
_NUMPY_SELECT = (torch.float32, torch.float64, torch.float16)
SAMPLE = 1 << 16  # sample that brackets the threshold; smaller tensors are partitioned whole


@lru_cache(maxsize=16)  # a model has a few distinct tensor sizes
def _sample_positions(n: int) -> np.ndarray:
    """``SAMPLE`` positions in ``range(n)``, drawn with a fixed seed: the same work every time."""
    return np.random.default_rng(0).integers(0, n, SAMPLE)


def _bracket(arr: np.ndarray, r: int) -> tuple[np.ndarray, int] | None:
    """The elements of ``arr`` between two sample quantiles around ascending rank ``r``, and how many
    lie below them; None when the bracket misses rank ``r`` (the caller then partitions everything).

    The sample's rank of the threshold is binomial; the bracket spans 4 standard deviations (+8) each
    side, ~1.6% of the elements at rank n/2, so it misses with probability ~1e-4 and the partition
    afterwards works on ~1/60 of the tensor. One pass, block by block, two comparisons an element.
    """
    n, m = arr.size, SAMPLE
    p = r / n
    pos, margin = p * m, 4.0 * float(np.sqrt(m * p * (1 - p))) + 8
    i_lo, i_hi = math.floor(pos - margin), math.ceil(pos + margin)  # sample ranks; off the ends: unbounded
    sample = arr[_sample_positions(n)]
    ranks = [i for i in (i_lo, i_hi) if 0 <= i < m]
    if ranks:
        sample.partition(ranks)  # only the two sample quantiles are needed: no sort
    lo = sample[i_lo] if i_lo >= 0 else -np.inf
    hi = sample[i_hi] if i_hi < m else np.inf
    below, parts = 0, []
    inside, under = np.empty(min(n, BLOCK), bool), np.empty(min(n, BLOCK), bool)
    for b in blocks(n):
        blk = arr[b]
        u, i = under[: blk.size], inside[: blk.size]
        below += np.count_nonzero(np.less(blk, lo, out=u))  # NaN: neither below nor inside (numpy: largest)
        np.logical_and(np.greater_equal(blk, lo, out=i), np.less_equal(blk, hi, out=u), out=i)
        parts.append(blk[i])
    bracket = np.concatenate(parts)
    if not 0 <= r - below < bracket.size:
        return None
    return bracket, below


def kth_largest(a: torch.Tensor, k: int) -> tuple[float, int]:
    """The ``k``-th largest value ``t`` of a flat tensor, exactly, by selection (no sort), and how
    many elements are ``>= t`` (``k`` plus the ties at ``t`` ranked below ``k``). ``a`` is not changed.

    Large float tensors: a sample brackets ``t`` (``_bracket``) and only the bracket is partitioned;
    5-8x faster than partitioning a whole word-embedding matrix (session 9). Exact either way: the
    sample only decides how much is partitioned.
    """
    n = a.numel()
    r = n - k  # 0-based ascending rank of the threshold
    if a.dtype in _NUMPY_SELECT:
        arr = a.reshape(-1).numpy()
        found = _bracket(arr, r) if n > 4 * SAMPLE else None
        if found is None:
            part, j = arr.copy(), r
        else:
            part, j = found[0], r - found[1]
        part.partition(j)  # part[:j] <= part[j] <= part[j:]
        t = part[j]
        # Everything from j on is >= t (and so is all above the bracket); below j, only the ties at t are.
        return float(t), k + int(np.count_nonzero(part[:j] == t))
    t = torch.kthvalue(a.reshape(-1), r + 1).values
    return float(t), int(torch.count_nonzero(a >= t))


def magnitude(x: torch.Tensor, density: float, rescale: Rescale | None = None) -> torch.Tensor:
    """TIES trim: keep the ``k = max(1, int(density·n))`` largest-magnitude elements.

    Returns a new tensor (``x`` itself at density 1), ``x * keep`` exactly.
    """
    if density >= 1:
        return x
    if density <= 0 or x.numel() == 0:
        return torch.zeros_like(x)
    k = keep_count(density, x.numel())
    out = torch.empty(x.shape, dtype=x.dtype)  # |x| for the selection, then the mask, then the result
    flat = out.view(-1)  # (n,)
    t, n_ge = kth_largest(torch.abs(x, out=out).view(-1), k)
    drop = None
    if n_ge > k:  # elements tied at the threshold: keep the first ones, exactly k in all
        tied = (flat == t).nonzero().squeeze(1)
        drop = tied[tied.numel() - (n_ge - k) :]
    torch.ge(out, t, out=out)  # 1.0 where kept
    if drop is not None:
        flat[drop] = 0
    return rescale_(out.mul_(x), x, rescale, density)


def magnitude_outliers(
    x: torch.Tensor, density: float, gamma: float = 0.01, rescale: Rescale | None = None
) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` largest outliers, then the smallest, keeping ``density``."""
    if density >= 1:
        return x
    n = x.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)  # fewer outliers dropped when needed to keep `target`
    order = torch.sort(x.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n, dtype=x.dtype)
    mask[order[n_bottom : n_bottom + target]] = 1
    return rescale_masked(x, mask.view_as(x), rescale, density)


def numpy_rng(generator: "np.random.Generator | torch.Generator | None") -> np.random.Generator:
    """The numpy generator DARE draws from: ``generator`` itself, or, for a ``torch.Generator``, an
    ``SFC64`` stream seeded by one draw from it (None: a fresh, unseeded stream)."""
    if isinstance(generator, np.random.Generator):
        return generator
    if generator is None:
        return np.random.Generator(np.random.SFC64())
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return np.random.Generator(np.random.SFC64(seed))


def torch_rng(generator: "np.random.Generator | torch.Generator | None") -> torch.Generator | None:
    """The torch generator a torch sampler (DELLA's ``torch.bernoulli``) draws from: ``generator``
    itself, or, for a numpy generator, one seeded by one draw from it."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator.integers(0, 2**62)))


def _draws(rng: np.random.Generator, count: int) -> torch.Tensor:
    """``count`` 64-bit draws of ``rng``'s bit generator as an int64 tensor (each gives 4 elements'
    16 bits: little-endian, element ``4j + i`` takes bits ``16i..16i+15`` of draw ``j``)."""
    return torch.from_numpy(rng.bit_generator.random_raw(count).view(np.int64))


def bernoulli(
    x: torch.Tensor, density: float, generator: "np.random.Generator | torch.Generator | None",
    rescale: Rescale | None = None
) -> torch.Tensor:
    """DARE drop: keep each element independently with probability ``density``.

    Each element gets 16 random bits (a quarter of one 64-bit draw from ``numpy_rng(generator)``) and is kept
    where they, as an unsigned number, are below ``round(density·2^16)``: the keep probability is
    the density rounded to a multiple of 2^-16 (off by at most 7.6e-6, far below the sampling noise
    of any tensor). Several times faster than ``torch.bernoulli(torch.full_like(x, density))``
    (earlier hm3, and mergekit), whose random stream differs. See ``bernoulli_parts``.
    """
    masked, factor = bernoulli_parts(x, density, generator, rescale)
    return masked if factor is None else masked.mul_(factor)


def bernoulli_parts(
    x: torch.Tensor,
    density: float,
    generator: "np.random.Generator | torch.Generator | None",
    rescale: Rescale | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``bernoulli`` without its last pass: ``(x * keep, factor)``, where ``x * keep`` times
    ``factor`` (None: 1) is ``bernoulli``'s result bit for bit, so a caller that goes over the
    tensor anyway (the TIES election) multiplies it in there. ``x * keep`` goes into ``out``
    (contiguous, ``x``'s size and dtype; default a new tensor), or is ``x`` itself at density 1,
    with factor None.

    Block by block (``blocks``): draw the block's bits, compare them into a float keep mask and
    multiply; the l1 rescale takes ``|x|`` and ``|x * keep|`` of the block while it is in cache
    and keeps only their ``fixed_sum`` row sums (a block is a whole number of rows), so the norms
    are exactly ``_norm``'s. Blocks of the one stream, in order, give the same bits as one draw of
    ``(n + 3) // 4``.
    """
    if density >= 1:
        return x, None
    q = round(density * (1 << 16))
    out = torch.empty(x.shape, dtype=x.dtype) if out is None else out.view(x.shape)
    if q >= 1 << 16 or not x.is_contiguous():
        # density within 2^-17 of 1: keep all, no draw (2^16 does not fit the int16 compare);
        # or a strided x (no caller passes one): the whole-tensor steps.
        if q >= 1 << 16:
            out.fill_(1)
        else:
            n = x.numel()
            bits = _draws(numpy_rng(generator), (n + 3) // 4).view(torch.int16)[:n]
            torch.lt(bits.view(x.shape), q - (1 << 15), out=out)
        return _owed_rescale(out.mul_(x), x, rescale, density)
    n, flat, dst = x.numel(), x.view(-1), out.view(-1)
    l1 = rescale is Rescale.l1 and n > SUM_CHUNK  # (one row: the whole-tensor norms cost nothing)
    if l1:
        sums = scratch("dare l1 rows", 2 * _rows(n), x.dtype).view(2, -1)  # rows of |x|, of |x * keep|
        absb = scratch("dare abs", min(n, BLOCK), x.dtype)
    keep = scratch("dare keep", min(n, BLOCK), x.dtype)
    rng = numpy_rng(generator)  # (not before: a density that keeps everything draws nothing)
    below = q - (1 << 15)  # int16 = unsigned 16 bits - 2^15, so `u < q` is `int16 < q - 2^15`
    for b in blocks(n):
        m = b.stop - b.start
        k = torch.lt(_draws(rng, (m + 3) // 4).view(torch.int16)[:m], below, out=keep[:m])  # 1.0 where kept
        torch.mul(k, flat[b], out=dst[b])
        if l1:
            rows = slice(b.start // SUM_CHUNK, b.start // SUM_CHUNK + _rows(m))
            _row_sums(torch.abs(flat[b], out=absb[:m]), sums[0, rows])
            _row_sums(torch.abs(dst[b], out=absb[:m]), sums[1, rows])
    if l1:
        return out, norm_ratio(fixed_sum(sums[0]), fixed_sum(sums[1]))
    return _owed_rescale(out, x, rescale, density)


def _owed_rescale(masked: torch.Tensor, x: torch.Tensor, rescale: Rescale | None, density: float):
    """``bernoulli_parts``' result for ``masked`` = ``x * keep``: none / inverse rescale applied in
    place (``rescale_``), a norm rescale returned as its factor."""
    if rescale is Rescale.inverse or rescale is None:
        return rescale_(masked, x, rescale, density), None
    return masked, norm_ratio(_norm(x, rescale), _norm(masked, rescale))


def della_magprune(
    x: torch.Tensor,
    density: float,
    epsilon: float,
    generator: "np.random.Generator | torch.Generator | None",
    rescale: Rescale | None = None,
) -> torch.Tensor:
    """DELLA MagPrune: per row, keep probability rises linearly with magnitude rank,
    from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest)."""
    if density >= 1:
        return x
    if density <= 0:
        return torch.zeros_like(x)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della: epsilon={epsilon} must keep density±epsilon inside (0, 1) for density={density}")
    shape = x.shape
    rows = x.unsqueeze(0) if x.dim() < 2 else x
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(x.dtype) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    # A one-element row has no rank spread (0/0): give it the middle probability, `density`.
    rank_norm = torch.nan_to_num((ranks - lo) / (hi - lo), nan=0.5).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(probs, generator=torch_rng(generator))
    return rescale_masked(rows, mask, rescale, density).reshape(shape)


def _sign_total(deltas: "Sequence[torch.Tensor]", method: str) -> torch.Tensor:
    """What the election reads, in a new tensor: the deltas' sum (``sum``) or their signs' (``count``),
    summed in model order as ``torch.sum(dim=0)`` does."""
    if method not in ("sum", "count"):
        raise ValueError(f"unknown consensus {method!r}; use 'sum' or 'count'")
    terms = deltas if method == "sum" else [d.sign() for d in deltas]
    total = torch.add(terms[0], terms[1]) if len(terms) > 1 else terms[0].clone()
    for t in terms[2:]:
        total.add_(t)
    return total


def elect_sign(deltas: "Sequence[torch.Tensor]", method: str = "sum") -> torch.Tensor:
    """TIES elect: ``True`` where ``+`` is elected, from the N (already weighted) task vectors.

    ``sum`` elects the sign of the summed deltas (TIES paper, mergekit); ``count`` the sign held by
    more models. Ties at 0 elect ``+``. Summed in model order, as ``torch.sum(dim=0)`` does.
    """
    return _sign_total(deltas, method) >= 0


def agrees(delta: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Where ``delta``'s sign is the elected one. Zero entries never agree (their sign is 0)."""
    return torch.where(positive, delta > 0, delta < 0)


def sign_consensus(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES elect as one mask: ``(N, *shape)`` booleans, entry ``[i]`` true where model ``i``'s
    (weighted) delta has the elected sign (``elect_sign``, ``agrees``)."""
    positive = elect_sign(list(deltas), method)
    return torch.stack([agrees(d, positive) for d in deltas])


def disjoint_merge(
    trimmed: "Sequence[torch.Tensor]", method: str = "sum", weights: "Sequence[float] | None" = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TIES elect + disjoint merge: ``Σ_i t_i ⊙ agree_i`` and, with ``weights`` (``normalize``),
    the divisor ``Σ_i w_i·agree_i`` with its zeros replaced by 1. ``agree_i`` is ``agrees(t_i,
    elect_sign(trimmed, method))``; the numbers are exactly those of masking with it.

    Consumes ``trimmed`` (the caller's own tensors, weighted already): each is masked in place and
    the first becomes the sum. Float 1.0/0.0 masks in two reused buffers, no bool tensors: on a
    word-embedding matrix this is several times faster than ``torch.where`` and bool products.
    """
    positive = _sign_total(trimmed, method)
    torch.ge(positive, 0, out=positive)  # 1.0 where + is elected
    scratch = torch.empty_like(positive)
    mixed = divisor = None
    for i, t in enumerate(trimmed):
        # (t > 0) == elected is `agrees` wherever t != 0; a zero entry stays ±0 whatever the mask,
        # just as `t * agrees` leaves it.
        torch.gt(t, 0, out=scratch).eq_(positive)
        t.mul_(scratch)
        mixed = t if mixed is None else mixed.add_(t)
        if weights is not None:
            torch.ne(t, 0, out=scratch)  # = agrees: the entries that survived the mask
            divisor = torch.mul(scratch, weights[i]) if divisor is None else divisor.add_(scratch, alpha=weights[i])
    if divisor is not None:
        divisor.add_(torch.eq(divisor, 0, out=scratch))  # nobody agrees: divide by 1 (0 + 1, others + 0)
    return mixed, divisor


def broadcast_weights(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(N,)`` weights viewed as ``(N, 1, ..., 1)`` to scale stacked ``(N, *shape)`` tensors."""
    return weights.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
