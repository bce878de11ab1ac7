"""Spectral merge methods: each linear layer's task matrices merged through their singular vectors.

Training-free, per tensor, the same signature as every method (``fn(base, deltas, p, generator)``).
A *matrix* here is a 2-D tensor of the body that is not an embedding table (``p.extra["embedding"]``,
set by the engine from the tensor's name); every other tensor (embeddings, biases, LayerNorm) is
``base + λ · Σ w_i δ_i / Σ w_i``, the weighted mean of the task vectors, as both papers do. Output
rows (the groups' heads) are never mixed: each group keeps its own rows (engine).

* ``tsv`` — Task Singular Vectors merging, TSV-M (Gargiulo et al., CVPR 2025,
  https://arxiv.org/abs/2412.00081). Each weighted task matrix ``w_i δ_i = U_i S_i V_iᵀ`` keeps its top
  ``k = ⌊r · sv_fraction⌋`` singular triplets (``r = min(out, in)``; ``sv_fraction`` defaults to
  ``1 / N``, the paper's choice, so the N tasks share the rank). The kept left vectors of all tasks,
  side by side, are replaced by their closest matrix with orthonormal columns (the polar factor
  ``P Qᵀ`` of ``[U_1 … U_N] = P Σ Qᵀ``), the right ones likewise, which removes the tasks' overlap
  (their interference) before they are added back: ``base + λ · Û diag(S_1 … S_N) V̂ᵀ``.
* ``iso_c`` — Iso-C (Marczak et al., ICML 2025, https://arxiv.org/abs/2502.04959). The sum of the
  weighted task matrices ``Σ w_i δ_i = U S Vᵀ`` with its spectrum flattened to the mean singular value:
  ``base + λ · mean(S) · U Vᵀ``, so that no task's few dominant directions crowd out the others'.
  The paper tunes ``λ`` on validation data (``lambda``, default 1).
"""

from __future__ import annotations

from contextlib import contextmanager

from hm3._lazy import torch
from hm3.merging import steps
from hm3.merging.methods import REGISTRY, Method, TensorParams


def _is_matrix(base: torch.Tensor, p: TensorParams) -> bool:
    return base.dim() == 2 and min(base.shape) > 1 and not p.extra.get("embedding", False)


def _weighted(deltas: torch.Tensor, weight: tuple[float, ...]) -> torch.Tensor:
    return deltas.float() * steps.broadcast_weights(torch.tensor(weight, dtype=torch.float32), deltas)


@contextmanager
def _one_thread():
    """LAPACK on one thread (torch's setting is per thread; restored after): its rounding depends on
    the thread count, so this keeps a merge's bytes the same on any machine and with any number of
    merge workers. The engine runs two tensors at once instead (``Method.one_thread``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(a, full_matrices=False)``, of ``aᵀ`` for a wide ``a`` (LAPACK is about 1.5x
    faster on a tall matrix than on its transpose: 384x1536 57 ms, 1536x384 39 ms)."""
    if a.shape[0] >= a.shape[1]:
        return torch.linalg.svd(a, full_matrices=False)
    u, s, vh = torch.linalg.svd(a.T, full_matrices=False)
    return vh.T, s, u.T


def _polar(a: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns (or rows, if wide) closest to ``a``: ``P Qᵀ`` of ``a = P Σ Qᵀ``."""
    u, _, vh = _svd(a)
    return u @ vh


def tsv(base: torch.Tensor, deltas: torch.Tensor, p: TensorParams, generator=None) -> torch.Tensor:
    """TSV-M: the tasks' top singular vectors, decorrelated, then summed (see the module docstring)."""
    lam = p.lambda_
    if not _is_matrix(base, p):
        return (base + lam * steps.weighted_mean(deltas, p.weight)).to(base.dtype)
    n = deltas.shape[0]
    frac = p.extra.get("sv_fraction")
    r = min(base.shape)
    k = max(1, int(r * (1.0 / n if frac is None else float(frac))))
    us, ss, vhs = [], [], []
    with _one_thread():
        for d in _weighted(deltas, p.weight):
            u, s, vh = _svd(d)
            us.append(u[:, :k])
            ss.append(s[:k])
            vhs.append(vh[:k])
        u_hat = _polar(torch.cat(us, dim=1))  # (out, N·k)
        vh_hat = _polar(torch.cat(vhs, dim=0))  # (N·k, in)
        merged = (u_hat * torch.cat(ss)) @ vh_hat
    return (base + lam * merged).to(base.dtype)


def iso_c(base: torch.Tensor, deltas: torch.Tensor, p: TensorParams, generator=None) -> torch.Tensor:
    """Iso-C: the summed task matrix with an isotropic (flat) spectrum (see the module docstring)."""
    lam = p.lambda_
    if not _is_matrix(base, p):
        return (base + lam * steps.weighted_mean(deltas, p.weight)).to(base.dtype)
    total = _weighted(deltas, p.weight).sum(dim=0)
    with _one_thread():
        u, s, vh = _svd(total)
        return (base + lam * s.mean() * (u @ vh)).to(base.dtype)


METHODS: tuple[Method, ...] = (
    Method(
        "tsv",
        tsv,
        "https://arxiv.org/abs/2412.00081",
        defaults={"sv_fraction": None},  # None: 1 / N
        own_head_rows=True,
        one_thread=True,  # LAPACK on one thread (_one_thread), two tensors at once: 10 s -> 6 s for 5 MiniLMs
        doc="TSV-M: each task matrix's top singular vectors (1/N of the rank), decorrelated, then summed.",
    ),
    Method(
        "iso_c",
        iso_c,
        "https://arxiv.org/abs/2502.04959",
        own_head_rows=True,
        one_thread=True,
        doc="Iso-C: the summed task matrices with a flat spectrum (every singular value their mean).",
    ),
)

REGISTRY.update({m.name: m for m in METHODS})
