"""The steps merge methods are built from: sparsify, rescale, sign consensus, weighted mean.

Each is a pure function of tensors. Semantics follow mergekit 0.1.5 (``mergekit/sparsify.py`` and
``generalized_task_arithmetic.py``), which the parity tests check; where hm3 differs it says so:

* Randomness comes only from the ``torch.Generator`` passed in (mergekit uses the global RNG), so a
  seeded merge is byte-identical whatever else ran before it.
* Magnitude pruning finds the k-th largest magnitude by selection, not by sorting (mergekit sorts
  the whole tensor): a sample brackets it, an exact ``kthvalue`` inside the bracket finds it. The
  kept set is the same k elements except for elements tied at the threshold, where hm3 keeps the
  first ones in memory order (mergekit: whichever its sort puts first).
"""

from __future__ import annotations

from enum import Enum
from typing import Sequence

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


def _norm(x: torch.Tensor, kind: Rescale) -> torch.Tensor:
    if kind is Rescale.l1:
        return x.abs().sum()
    if kind is Rescale.l2:
        return x.norm()
    return x.abs().max()


def rescale_masked(
    x: torch.Tensor, mask: torch.Tensor, rescale: Rescale | None, density: float = 1.0, eps: float = 1e-7
) -> torch.Tensor:
    """``x * mask``, optionally rescaled so that its norm matches ``x``'s (mergekit's rule)."""
    masked = x * mask
    if rescale is None:
        return masked
    if rescale is Rescale.inverse:
        return masked.div_(density) if density > 0 else masked
    before, after = _norm(x, rescale), _norm(masked, rescale)
    if before < eps or after < eps:
        return masked
    return masked.mul_(before / after)  # in place: masked is ours


def keep_count(density: float, n: int) -> int:
    """Elements kept by magnitude pruning: ``max(1, int(density * n))`` (mergekit)."""
    return max(1, int(density * n))


def kth_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest value of a flat tensor, exactly, in O(n) passes (no sort).

    A fixed sample of 2^15 values brackets the value between two sample quantiles; one pass counts
    what lies below the bracket and gathers what lies inside, where ``kthvalue`` selects it. If the
    sample misjudged the bracket (rare), ``kthvalue`` over the whole tensor.
    """
    n = a.numel()
    r = n - k + 1  # 1-based ascending rank of the threshold
    if n <= 1 << 17:
        return torch.kthvalue(a, r).values
    m = 1 << 15
    # A fixed local generator: the sample is an implementation detail, not part of the merge's
    # randomness, and the result does not depend on it.
    idx = torch.randint(n, (m,), generator=torch.Generator().manual_seed(0))
    sample = a[idx].sort().values
    q, margin = r / n, 0.01 + 4 / m**0.5
    lo = sample[max(0, int((q - margin) * m))]
    hi = sample[min(m - 1, int((q + margin) * m) + 1)]
    inside = a >= lo
    below = n - int(torch.count_nonzero(inside))
    band = a[inside.logical_and_(a <= hi)]
    j = r - below
    if 1 <= j <= band.numel():
        return torch.kthvalue(band, j).values
    return torch.kthvalue(a, r).values


def magnitude(x: torch.Tensor, density: float, rescale: Rescale | None = None) -> torch.Tensor:
    """TIES trim: keep the ``k = max(1, int(density·n))`` largest-magnitude elements."""
    if density >= 1:
        return x
    if density <= 0 or x.numel() == 0:
        return torch.zeros_like(x)
    k = keep_count(density, x.numel())
    flat = x.abs().reshape(-1)
    t = kth_largest(flat, k)
    keep = flat >= t
    extra = int(torch.count_nonzero(keep)) - k
    if extra > 0:  # elements tied at the threshold: keep the first ones, exactly k in all
        tied = (flat == t).nonzero().squeeze(1)
        keep[tied[tied.numel() - extra :]] = False
    return rescale_masked(x, keep.view_as(x), rescale, density)


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


def bernoulli(
    x: torch.Tensor, density: float, generator: torch.Generator | None, rescale: Rescale | None = None
) -> torch.Tensor:
    """DARE drop: keep each element independently with probability ``density``."""
    if density >= 1:
        return x
    mask = torch.bernoulli(torch.full_like(x, density), generator=generator)
    return rescale_masked(x, mask, rescale, density)


def della_magprune(
    x: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator | None,
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
    mask = torch.bernoulli(probs, generator=generator)
    return rescale_masked(rows, mask, rescale, density).reshape(shape)


def elect_sign(deltas: "Sequence[torch.Tensor]", method: str = "sum") -> torch.Tensor:
    """TIES elect: ``True`` where ``+`` is elected, from the N (already weighted) task vectors.

    ``sum`` elects the sign of the summed deltas (TIES paper, mergekit); ``count`` the sign held by
    more models. Ties at 0 elect ``+``. Summed in model order, as ``torch.sum(dim=0)`` does.
    """
    if method not in ("sum", "count"):
        raise ValueError(f"unknown consensus {method!r}; use 'sum' or 'count'")
    terms = deltas if method == "sum" else [d.sign() for d in deltas]
    total = terms[0].clone()
    for t in terms[1:]:
        total.add_(t)
    return total >= 0


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
