"""The steps merge methods are built from: sparsify, rescale, sign consensus, weighted mean.

Each is a pure function of tensors: the torch face of ``hm3.merging.kernels``, which holds the
arithmetic in numpy (one implementation for the torch engine and the torch-free one; tensors are
handed over as views of their memory). Only the sparsifiers that sort (Breadcrumbs, DELLA) and the
plain sign-election references are torch here. Semantics follow mergekit 0.1.5 (``mergekit/sparsify.py`` and
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
``x * bool_mask`` (including the sign of zero). Elementwise steps run block by block (``kernels.blocks``),
and inside ``workspace()`` (the merge loop) scratch buffers are reused from tensor to tensor.
Only reductions (norms) see whole tensors, by ``fixed_sum``: a sum in a fixed order, so a rescaled
DARE merge gives the same bytes with any number of threads (``torch.sum`` of a whole tensor splits
its range across threads, and its last bit changed with the thread count).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from hm3._lazy import torch
from hm3.merging import kernels
from hm3.merging.kernels import (BLOCK, SAMPLE, Rescale, Sparsify, _sample_positions,  # noqa: F401
                                 keep_count, workspace)


def _numpy(x: torch.Tensor) -> np.ndarray:
    """``x`` as a numpy array sharing its memory (bfloat16, which numpy lacks: a float32 copy)."""
    if x.dtype == torch.bfloat16:
        x = x.float()
    return x.detach().numpy()


def _tensor(a, dtype: torch.dtype) -> torch.Tensor:
    """A numpy array or scalar as a tensor of ``dtype`` (sharing an array's memory when it can)."""
    return torch.from_numpy(np.asarray(a)).to(dtype)


def fixed_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of all of ``x``'s elements (a 0-d tensor of ``x``'s dtype), rounded the same with any
    thread count: ``kernels.fixed_sum``'s order (rows of ``kernels.SUM_CHUNK`` summed by numpy, then the row
    sums the same way), on ``x``'s memory. ``torch.sum`` of a whole tensor splits the range across
    threads, each adding its part in its own order, so its last bit depends on the thread count."""
    return _tensor(kernels.fixed_sum(_numpy(x)), x.dtype)


def _norm(x: torch.Tensor, kind: Rescale) -> torch.Tensor:
    """``kernels.norm`` (l1, l2 or max |x|) as a 0-d tensor of ``x``'s dtype. numpy's, also for the
    square root: torch's float32 sqrt is not correctly rounded (it differed from numpy's on 0.7% of
    random values), and a torch-free merge must give the same factors."""
    return _tensor(kernels.norm(_numpy(x), kind), x.dtype)


def norm_ratio(before: torch.Tensor, after: torch.Tensor, eps: float = 1e-7) -> torch.Tensor | None:
    """mergekit's rescale factor ``before / after`` (a 0-d tensor), or None where it leaves the
    tensor as it is: either norm below ``eps`` (``kernels.norm_ratio``)."""
    ratio = kernels.norm_ratio(_numpy(before)[()], _numpy(after)[()], eps)
    return None if ratio is None else _tensor(ratio, before.dtype)


def rescale_masked(
    x: torch.Tensor, mask: torch.Tensor, rescale: Rescale | None, density: float = 1.0, eps: float = 1e-7
) -> torch.Tensor:
    """``x * mask``, optionally rescaled so that its norm matches ``x``'s (mergekit's rule)."""
    masked = x * mask
    if masked.dtype == torch.bfloat16:
        return _tensor(kernels.rescale_(_numpy(masked), _numpy(x), rescale, density, eps), masked.dtype)
    kernels.rescale_(_numpy(masked), _numpy(x), rescale, density, eps)
    return masked


def scratch(key: object, n: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised ``(n,)`` tensor for ``key``: kept for reuse inside ``workspace()`` (among
    ``kernels``' buffers), else new. Two live buffers need two keys."""
    buffers = kernels.kept_buffers()
    if buffers is None:
        return torch.empty(n, dtype=dtype)
    buf = buffers.get((key, dtype))
    if buf is None or buf.numel() < n:
        buffers.pop((key, dtype), None)  # free the smaller one before allocating
        buf = buffers[(key, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n]


# numpy partitions these in place (introselect, ``kernels.kth_largest``); others (bfloat16) fall back
# to torch.kthvalue.
_NUMPY_SELECT = ("torch.float32", "torch.float64", "torch.float16")


def kth_largest(a: torch.Tensor, k: int) -> tuple[float, int]:
    """The ``k``-th largest value ``t`` of a flat tensor, exactly, by selection (no sort), and how
    many elements are ``>= t`` (``k`` plus the ties at ``t`` ranked below ``k``). ``a`` is not changed
    (``kernels.kth_largest``)."""
    if str(a.dtype) in _NUMPY_SELECT:
        return kernels.kth_largest(a.reshape(-1).numpy(), k)
    r = a.numel() - k  # 0-based ascending rank of the threshold
    t = torch.kthvalue(a.reshape(-1), r + 1).values
    return float(t), int(torch.count_nonzero(a >= t))


def magnitude(x: torch.Tensor, density: float, rescale: Rescale | None = None) -> torch.Tensor:
    """TIES trim: keep the ``k = max(1, int(density·n))`` largest-magnitude elements (ties at the
    threshold: the first in memory order; ``kernels.magnitude``). A new tensor, ``x * keep``
    exactly (``x`` itself at density 1)."""
    if density >= 1:
        return x
    return _tensor(kernels.magnitude(_numpy(x), density, rescale), x.dtype)


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


def bernoulli(
    x: torch.Tensor, density: float, generator: "np.random.Generator | torch.Generator | None",
    rescale: Rescale | None = None
) -> torch.Tensor:
    """DARE drop: keep each element independently with probability ``density``.

    Each element gets 16 random bits (a quarter of one 64-bit draw from ``numpy_rng(generator)``) and
    is kept where they, as a signed int16 plus 2^15 (the unsigned value with its top bit flipped), are
    below ``round(density·2^16)``: the keep probability
    is the density rounded to a multiple of 2^-16 (off by at most 7.6e-6, far below the sampling noise
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
    tensor anyway (the TIES election) multiplies it in there (``kernels.bernoulli_parts``: block by
    block, the l1 norms' sums taken as ``fixed_sum`` rows while a block is in cache). ``x * keep``
    goes into ``out`` (contiguous, ``x``'s size and dtype; default a new tensor), or is ``x`` itself
    at density 1, with factor None. A ``torch.Generator`` is drawn from only when bits are drawn."""
    if density >= 1:
        return x, None
    keeps_all = round(density * (1 << 16)) >= 1 << 16
    rng = None if keeps_all else numpy_rng(generator)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype)
    if x.dtype == torch.bfloat16:
        masked, factor = kernels.bernoulli_parts(_numpy(x), density, rng, rescale)
        out.view(x.shape).copy_(torch.from_numpy(masked))
    else:
        masked, factor = kernels.bernoulli_parts(_numpy(x), density, rng, rescale, out=_numpy(out))
    return out.view(x.shape), None if factor is None else _tensor(factor, x.dtype)


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


def elect_sign(deltas: "Sequence[torch.Tensor]", method: str = "sum") -> torch.Tensor:
    """TIES elect: ``True`` where ``+`` is elected, from the N (already weighted) task vectors.

    ``sum`` elects the sign of the summed deltas (TIES paper, mergekit); ``count`` the sign held by
    more models. Ties at 0 elect ``+``. Summed in model order (``kernels.sign_total``).
    """
    return torch.from_numpy(kernels.sign_total([_numpy(d) for d in deltas], method) >= 0)


def agrees(delta: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Where ``delta``'s sign is the elected one. Zero entries never agree (their sign is 0)."""
    return torch.where(positive, delta > 0, delta < 0)


def sign_consensus(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES elect as one mask: ``(N, *shape)`` booleans, entry ``[i]`` true where model ``i``'s
    (weighted) delta has the elected sign (``elect_sign``, ``agrees``)."""
    positive = elect_sign(list(deltas), method)
    return torch.stack([agrees(d, positive) for d in deltas])


def broadcast_weights(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(N,)`` weights viewed as ``(N, 1, ..., 1)`` to scale stacked ``(N, *shape)`` tensors."""
    return weights.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def weighted_mean(x: torch.Tensor, weight: Sequence[float], dtype: torch.dtype | None = None) -> torch.Tensor:
    """``Σ w_i x_i / Σ w_i`` over the first axis of stacked ``x (N, *shape)``, computed in ``dtype``
    (default ``x``'s): the weighted average the methods fall back to where they have nothing better.
    The products take the weights in ``x``'s own precision, the divisor sums them in ``dtype``."""
    w = torch.tensor(weight, dtype=dtype or x.dtype)
    wide = x if dtype is None else x.to(dtype)
    return (wide * broadcast_weights(w, x)).sum(dim=0) / w.sum()
