"""Merge methods: small pure per-tensor functions, registered by name with defaults and references.

Every method has the signature ``fn(base, deltas, p, generator) -> merged`` where

* ``base``: the base model's tensor, ``(*shape)``;
* ``deltas``: task vectors ``model_i - base`` stacked as ``(N, *shape)`` (float32);
* ``p``: ``TensorParams`` resolved for this tensor (per-model weight and density, shared flags);
* ``generator``: the only source of randomness, seeded from ``(seed, tensor name)``: a numpy
  ``Generator`` (``engine.tensor_generator``; a ``torch.Generator`` also works, ``steps.numpy_rng``).

The task-arithmetic family (task arithmetic, TIES, DARE, DARE-TIES, Breadcrumbs, DELLA) is one
pipeline — sparsify → weight → sign consensus → (normalise) → λ — exactly as mergekit 0.1.5's
``GeneralizedTaskArithmeticMerge``; a method is a choice of sparsify and consensus step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from hm3._lazy import torch

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

from hm3.merging import kernels, native, steps, streamed
from hm3.merging.steps import Rescale, Sparsify


@dataclass(frozen=True)
class TensorParams:
    """Parameters of one tensor's merge, after per-tensor resolution."""

    weight: tuple[float, ...]
    density: tuple[float, ...]
    normalize: bool = False
    rescale: Rescale | None = None
    lambda_: float = 1.0
    gamma: tuple[float, ...] = ()  # breadcrumbs
    epsilon: tuple[float, ...] = ()  # della
    consensus: str = "sum"
    extra: dict = field(default_factory=dict)
    # Data-aware methods: this tensor's statistics, e.g. {"gram": (N, in, in)}, {"fisher": (N, *shape)}.
    stats: dict = field(default_factory=dict)


MethodFn = Callable[["torch.Tensor", "torch.Tensor", TensorParams, "np.random.Generator | torch.Generator | None"],
                    "torch.Tensor"]


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    reference: str
    needs_base: bool = True
    uses_density: bool = False
    random: bool = False
    defaults: dict = field(default_factory=dict)  # normalize, rescale, ...
    min_models: int = 1
    doc: str = ""
    needs_stats: tuple[str, ...] = ()  # data-aware: statistics it reads ("gram", "fisher", "coef")
    one_thread: bool = False  # its per-tensor work runs on one thread (``kernels``): merge tensors in parallel
    own_head_rows: bool = False  # each group keeps its own head rows, whatever the method does elsewhere


def _torch_sparsifier(kind: Sparsify, p: TensorParams, generator):
    """The sparsifiers only torch implements (they sort), as ``kernels``' hook: numpy in, numpy out."""

    def sparsify(x, i: int):
        d = p.density[i]
        t = torch.from_numpy(x)
        if kind is Sparsify.magnitude_outliers:
            out = steps.magnitude_outliers(t, d, p.gamma[i] if p.gamma else 0.01, p.rescale)
        else:
            out = steps.della_magprune(t, d, p.epsilon[i] if p.epsilon else 0.15, generator, p.rescale)
        return out.numpy(), None

    return sparsify


#: kernels' task-arithmetic family by (sparsify, consensus): the methods the compiled loops may take
_GTA_NAMES = {v: k for k, v in kernels.GTA_METHODS.items()}


def _compiled(method: str, base: torch.Tensor, deltas: torch.Tensor, p: TensorParams) -> bool:
    """Whether this merge runs in the compiled loops (``hm3.merging.native``, via ``streamed.merge``
    on the task vectors): the same bits as kernels', in one pass."""
    return (native.available() and base.dtype == torch.float32 and deltas.dtype == torch.float32
            and deltas.shape[0] <= native.MAX_MODELS and streamed.unsupported(method, p, True) is None)


def generalized_task_arithmetic(
    base: torch.Tensor,
    deltas: torch.Tensor,
    p: TensorParams,
    generator: "np.random.Generator | torch.Generator | None",
    *,
    sparsify: Sparsify | None,
    consensus: bool,
) -> torch.Tensor:
    """base + λ · Σ_i m_i ⊙ w_i · S(δ_i) / (normalize ? Σ_i w_i m_i : 1)

    S is the sparsify step, m_i the sign-consensus mask (all ones without consensus). Sparsify per
    model, without stacking (the caller's deltas stay intact: search reuses them); what is left is
    elementwise (scale, weight, elect, mask, sum, normalise, λ, add the base), so it runs block by
    block, each block through every step while it is in cache. The arithmetic is
    ``kernels.generalized_task_arithmetic``'s, on views of the tensors' memory (one implementation
    for this engine and the torch-free one).
    """
    if deltas.shape[0] == 0:
        return base
    rng = hook = None
    if sparsify is Sparsify.random:
        rng = steps.numpy_rng(generator)
    elif sparsify in (Sparsify.magnitude_outliers, Sparsify.della_magprune):
        hook = _torch_sparsifier(sparsify, p, generator)
    name = _GTA_NAMES.get((sparsify, consensus))
    if hook is None and name is not None and _compiled(name, base, deltas, p):
        out = streamed.merge(name, steps._numpy(base), list(steps._numpy(deltas)), p, rng, deltas=True)
        return torch.from_numpy(out)
    out = kernels.generalized_task_arithmetic(steps._numpy(base), steps._numpy(deltas), p, rng, sparsify=sparsify,
                                              consensus=consensus, sparsify_fn=hook)
    return torch.from_numpy(out).to(base.dtype)


def linear(base: torch.Tensor, deltas: torch.Tensor, p: TensorParams, generator=None) -> torch.Tensor:
    """Model soup (Wortsman et al. 2022): Σ w_i θ_i / Σ w_i (with ``normalize``, the default).

    Written over task vectors θ_i = base + δ_i, so it needs no base checkpoint: with hm3's zero
    base head the head rows of group i become w_i/Σw · W_i (the paper's soup). ``kernels.linear``:
    block by block, the products summed in model order, then the base.
    """
    if deltas.shape[0] == 0:
        return base
    if _compiled("linear", base, deltas, p):
        return torch.from_numpy(streamed.merge("linear", steps._numpy(base), list(steps._numpy(deltas)), p, None,
                                               deltas=True))
    return torch.from_numpy(kernels.linear(steps._numpy(base), steps._numpy(deltas), p)).to(base.dtype)


def model_stock(base: torch.Tensor, deltas: torch.Tensor, p: TensorParams, generator=None) -> torch.Tensor:
    """Model Stock (Jang et al. 2024): move the base towards the average by
    t = N·cosθ / (1 + (N−1)·cosθ), cosθ the mean pairwise cosine of the task vectors
    (per tensor, or per row with ``filter_wise``)."""
    n = deltas.shape[0]
    rows = base.shape[0] if p.extra.get("filter_wise") and base.dim() > 1 else 1
    flat = deltas.reshape(n, rows, -1)  # (N, R, D)
    cos = []
    for a in range(n):
        for b in range(a + 1, n):
            num = (flat[a] * flat[b]).sum(dim=-1)
            den = (flat[a].norm(dim=-1) * flat[b].norm(dim=-1)).clamp(min=1e-6)
            cos.append((num / den).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0)  # (R,)
    denom = 1 + (n - 1) * c
    singular = denom.abs() < 1e-6  # opposing updates: keep the base rather than amplify them
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(denom), denom))
    t = t.view(rows, *([1] * (base.dim() - 1))) if rows > 1 else t.reshape(())
    return (base + t * deltas.mean(dim=0)).to(base.dtype)


def _gta(name: str, sparsify: Sparsify | None, consensus: bool, normalize: bool, rescale: bool, ref: str, doc: str):
    def fn(base, deltas, p, generator=None, _s=sparsify, _c=consensus):
        return generalized_task_arithmetic(base, deltas, p, generator, sparsify=_s, consensus=_c)

    fn.__name__ = name
    fn.__doc__ = doc
    return Method(
        name=name,
        fn=fn,
        reference=ref,
        uses_density=sparsify is not None,
        random=sparsify in (Sparsify.random, Sparsify.della_magprune),
        one_thread=True,
        defaults={"normalize": normalize, "rescale": rescale},
        doc=doc,
    )


REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "linear",
            linear,
            "https://arxiv.org/abs/2203.05482",
            needs_base=False,
            defaults={"normalize": True, "rescale": False},
            doc="Model soup: weighted average of the models.",
            one_thread=True,
        ),
        _gta("task_arithmetic", None, False, False, False, "https://arxiv.org/abs/2212.04089",
             "Task arithmetic: base + λ Σ w_i δ_i."),
        _gta("ties", Sparsify.magnitude, True, True, False, "https://arxiv.org/abs/2306.01708",
             "TIES: trim to top-k magnitude, elect sign by weighted sum, disjoint mean."),
        _gta("dare_linear", Sparsify.random, False, False, True, "https://arxiv.org/abs/2311.03099",
             "DARE: random drop with rescale, then task arithmetic."),
        _gta("dare_ties", Sparsify.random, True, False, True, "https://arxiv.org/abs/2311.03099",
             "DARE-TIES: random drop with rescale, then TIES sign election."),
        _gta("breadcrumbs", Sparsify.magnitude_outliers, False, False, False, "https://arxiv.org/abs/2312.06795",
             "Model Breadcrumbs: drop the largest outliers and the smallest entries."),
        _gta("breadcrumbs_ties", Sparsify.magnitude_outliers, True, False, False, "https://arxiv.org/abs/2312.06795",
             "Breadcrumbs with TIES sign election."),
        _gta("della", Sparsify.della_magprune, True, True, True, "https://arxiv.org/abs/2406.11617",
             "DELLA: magnitude-ranked random drop, TIES sign election."),
        _gta("della_linear", Sparsify.della_magprune, False, False, True, "https://arxiv.org/abs/2406.11617",
             "DELLA without sign election."),
        Method(
            "model_stock",
            model_stock,
            "https://arxiv.org/abs/2403.19522",
            min_models=2,
            defaults={"normalize": False, "rescale": False},
            own_head_rows=True,
            doc="Model Stock: average pulled towards the base by the task vectors' mean cosine.",
        ),
    )
}


# Data-aware methods (regmean, fisher, adamerging) and spectral ones (tsv, iso_c) live in their own
# modules and add themselves to REGISTRY; imported last because they need the types above.
from hm3.merging import data_aware as _data_aware  # noqa: E402,F401
from hm3.merging import spectral as _spectral  # noqa: E402,F401


def get(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; valid: {', '.join(REGISTRY)}") from None
