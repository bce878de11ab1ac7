"""The steps merge methods are built from: sparsify, rescale, sign consensus, weighted mean.

Each is a pure function of tensors. Semantics follow mergekit 0.1.5 (``mergekit/sparsify.py`` and
``generalized_task_arithmetic.py``), which the parity tests check; where hm3 differs it says so:

* Randomness comes only from the ``torch.Generator`` passed in (mergekit uses the global RNG), so a
  seeded merge is byte-identical whatever else ran before it.
* Magnitude pruning selects the top-k with ``torch.topk`` (mergekit sorts the whole tensor); the
  kept set is the same except for elements tied at the threshold, where either may be kept.
"""

from __future__ import annotations

from enum import Enum

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
        return masked / density if density > 0 else masked
    before, after = _norm(x, rescale), _norm(masked, rescale)
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def keep_count(density: float, n: int) -> int:
    """Elements kept by magnitude pruning: ``max(1, int(density * n))`` (mergekit)."""
    return max(1, int(density * n))


def magnitude(x: torch.Tensor, density: float, rescale: Rescale | None = None) -> torch.Tensor:
    """TIES trim: keep the ``k = max(1, int(density·n))`` largest-magnitude elements."""
    if density >= 1:
        return x
    if density <= 0 or x.numel() == 0:
        return torch.zeros_like(x)
    k = keep_count(density, x.numel())
    flat = x.abs().reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat, k, sorted=False).indices] = 1
    return rescale_masked(x, mask.view_as(x), rescale, density)


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


def sign_consensus(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES elect: a boolean mask of the entries whose sign agrees with the elected sign.

    ``deltas``: ``(N, *shape)``, already weighted. ``sum`` elects the sign of the summed deltas
    (TIES paper, mergekit); ``count`` the sign held by more models. Ties at 0 elect ``+``.
    Zero entries never agree (their sign is 0), so they do not count in the disjoint mean.
    """
    sign = deltas.sign()
    if method == "sum":
        elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    elif method == "count":
        elected = (sign.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    else:
        raise ValueError(f"unknown consensus {method!r}; use 'sum' or 'count'")
    return sign == elected


def broadcast_weights(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(N,)`` weights viewed as ``(N, 1, ..., 1)`` to scale stacked ``(N, *shape)`` tensors."""
    return weights.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
