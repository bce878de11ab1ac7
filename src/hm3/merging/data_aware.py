"""Data-aware merge methods: per-tensor functions that read statistics of unlabelled text.

They share the signature of every method, ``fn(base, deltas, p, generator)``; the statistics of
the tensor arrive in ``p.stats`` (computed once and cached by ``hm3.merging.stats``), so they run in
the same streaming per-tensor pipeline. Output rows are never mixed: each group keeps its own head
rows (engine), and a head re-fit (``refit:``) can follow any of them. Inference cost is unchanged:
the result is one ordinary checkpoint.

* ``regmean`` — RegMean (Jin et al. 2023, https://arxiv.org/abs/2212.09849). For a linear layer
  ``W (out, in)`` with models' weights ``W_i`` and input Gram matrices ``G_i = X_iᵀX_i / n_i``,
  the merge minimises ``Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²``::

      Wᵀ = (Σ_i w_i G̃_i)⁻¹ Σ_i w_i G̃_i W_iᵀ,   G̃_i = α G_i + (1 − α) diag(G_i)

  ``α`` = ``regmean_alpha`` shrinks the off-diagonal entries (α = 1: the exact least-squares
  merge; α = 0: a per-input-feature weighted average). A tiny ridge (1e-6 of the mean diagonal)
  pulls directions no model's inputs reach towards the plain average instead of leaving them
  undetermined. Every other tensor (embeddings, LayerNorm, biases) is the weighted average, as in
  the paper. Matches the bloomberg/dataless-model-merging reference on one layer (see the tests:
  ``numpy.linalg.lstsq`` on the stacked inputs).
* ``fisher`` — Fisher-weighted averaging (Matena & Raffel 2022, https://arxiv.org/abs/2111.09832):
  ``θ = Σ_i w_i (F_i + ε) θ_i / Σ_i w_i (F_i + ε)`` with the diagonal Fisher ``F_i`` of model i on
  its own texts, ``ε`` = ``fisher_floor``. With ``fisher_normalize`` (default) each model's Fisher is
  divided by its mean over all parameters first, so a very confident model (small gradients) is not
  drowned by a less confident one (FusionBench's ``normalize_fisher_weight``).
* ``adamerging`` — layer-wise merging coefficients learnt on unlabelled text (AdaMerging, Yang et
  al. 2024, https://arxiv.org/abs/2310.02575): ``θ_b = θ_base,b + Σ_i λ_{i,b} τ_{i,b}`` per block b
  (embeddings, each encoder layer, pooler, ...), λ learnt with Adam through the merged model.
  Objective ``entropy`` is the paper's (each group's prediction entropy on its own texts);
  ``distill`` (default, hm3) minimises the KL divergence from the original model's prediction
  instead — the same unlabelled texts, but a target that cannot collapse to one confident class.
  With ``density`` < 1 the task vectors are TIES-trimmed first (AdaMerging++).
"""

from __future__ import annotations

import logging
import random
import re
import time
from typing import TYPE_CHECKING, Any

from hm3._lazy import torch
from hm3.errors import HM3Error
from hm3.merging import steps
from hm3.merging.methods import REGISTRY, Method, TensorParams

if TYPE_CHECKING:  # pragma: no cover
    from hm3.merging.engine import Prepared

log = logging.getLogger(__name__)


def regmean(base: torch.Tensor, deltas: torch.Tensor, p: TensorParams, generator=None) -> torch.Tensor:
    """RegMean: the closed-form least-squares merge of a linear layer (see the module docstring)."""
    theta = base + deltas  # (N, out, in): the models' own weights
    grams = p.stats.get("gram")
    if grams is None or base.dim() != 2:
        return steps.weighted_mean(theta, p.weight, torch.float64).to(base.dtype)
    alpha = float(p.extra.get("regmean_alpha", 0.9))
    g = grams.double()  # (N, in, in)
    diag = torch.diag_embed(torch.diagonal(g, dim1=1, dim2=2))
    g = alpha * g + (1 - alpha) * diag
    w = torch.tensor(p.weight, dtype=torch.float64).view(-1, 1, 1)
    g = g * w
    lhs = g.sum(dim=0)  # (in, in)
    rhs = torch.einsum("nij,noj->io", g, theta.double())  # Σ_i G_i W_iᵀ: (in, out)
    avg = steps.weighted_mean(theta, p.weight, torch.float64)  # (out, in)
    scale = float(lhs.diagonal().mean())
    ridge = 1e-6 * scale if scale > 0 else 1.0
    lhs = lhs + ridge * torch.eye(lhs.shape[0], dtype=lhs.dtype)
    rhs = rhs + ridge * avg.T
    merged = torch.linalg.solve(lhs, rhs).T  # (out, in)
    return merged.to(base.dtype)


def fisher(base: torch.Tensor, deltas: torch.Tensor, p: TensorParams, generator=None) -> torch.Tensor:
    """Fisher-weighted averaging (see the module docstring)."""
    theta = base + deltas  # (N, *shape)
    f = p.stats.get("fisher")
    if f is None:
        return steps.weighted_mean(theta, p.weight, torch.float64).to(base.dtype)
    f = f.double()
    if bool(p.extra.get("fisher_normalize", True)):
        scale = p.stats["fisher_scale"].double().clamp(min=1e-30)
        f = f / steps.broadcast_weights(scale, f)
    w = steps.broadcast_weights(torch.tensor(p.weight, dtype=torch.float64), f)
    f = w * (f + float(p.extra.get("fisher_floor", 1e-6)))
    merged = (f * theta.double()).sum(dim=0) / f.sum(dim=0)
    return merged.to(base.dtype)


def _trim(deltas: torch.Tensor, density: tuple[float, ...]) -> torch.Tensor:
    """TIES trim of each task vector to its top-``density`` magnitudes (no rescale)."""
    return torch.stack([steps.magnitude(deltas[i], density[i]) for i in range(deltas.shape[0])])


def adamerging(base: torch.Tensor, deltas: torch.Tensor, p: TensorParams, generator=None) -> torch.Tensor:
    """``base + Σ_i λ_i τ_i`` with this tensor's block's learnt coefficients ``λ`` (N,)."""
    coef = p.stats.get("coef")
    if coef is None:
        raise HM3Error("adamerging: no learnt coefficient for this tensor; the statistics do not cover it")
    tau = _trim(deltas, p.density)
    lam = steps.broadcast_weights(coef.to(tau.dtype), tau)
    return (base + (lam * tau).sum(dim=0)).to(base.dtype)


# -- AdaMerging: learning the coefficients --------------------------------------------------------
_LAYER = re.compile(r"\.layer\.(\d+)\.")


def block_of(name: str) -> str:
    """The coefficient block of a tensor: ``layer.<i>``, ``embeddings``, or its module name."""
    m = _LAYER.search(name)
    if m:
        return f"layer.{m.group(1)}"
    if ".embeddings." in name or name.startswith("embeddings."):
        return "embeddings"
    return name.rsplit(".", 1)[0]


def learn_coefficients(
    prep: "Prepared", texts: dict[str, tuple[str, list[str]]], progress: bool = False
) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
    """Learn ``λ (N, blocks)`` (cached on disk). Returns (coef, blocks, report)."""
    from hm3.merging import stats as S

    cfg = prep.config
    data = cfg.data
    ada = data.adamerging
    picked = {g: S.sample(tx, ada.max_texts, cfg.seed, f"adamerging/{g}") for g, (_, tx) in texts.items()}
    recipe = cfg.model_dump(mode="json", include={"parameters", "models", "head"})
    key = S.cache_key(
        kind="adamerging",
        base=S.model_digest(prep.base.path) if prep.base else None,
        models=[S.model_digest(m.path) for m in prep.models],
        texts={g: S.texts_digest(tx) for g, tx in picked.items()},
        settings=ada.model_dump(mode="json"),
        seed=cfg.seed,
        recipe=recipe,
    )
    info: dict[str, Any] = {"objective": ada.objective, "steps": ada.steps, "lr": ada.lr, "max_length": ada.max_length,
                            "texts_per_group": {g: len(t) for g, t in picked.items()}}

    def compute():
        coef, blocks, losses = _learn(prep, picked, progress)
        return {"coef": coef}, {"blocks": "\n".join(blocks), "loss_first": losses[0], "loss_last": losses[-1]}

    tensors, meta, hit = S.cached("adamerging", key, compute, data.cache)
    info.update({"cached": hit, "loss_first": float(meta["loss_first"]), "loss_last": float(meta["loss_last"])})
    blocks = meta["blocks"].split("\n")
    info["coefficients"] = {g: {b: round(float(v), 4) for b, v in zip(blocks, row)}
                            for g, row in zip(prep.groups, tensors["coef"])}
    return tensors["coef"], blocks, info


def _learn(prep: "Prepared", picked: dict[str, list[str]], progress: bool) -> tuple[torch.Tensor, list[str], list[float]]:
    from torch.func import functional_call
    from transformers import AutoModelForSequenceClassification

    from hm3.merging import stats as S
    from hm3.merging.engine import merged_config, tensor_params, tokenizer_source
    from hm3.progress import progress_bar

    cfg = prep.config
    ada = cfg.data.adamerging
    t0 = time.perf_counter()
    # Task vectors (trimmed as the per-tensor function will trim them) and the fixed tensors.
    fixed: dict[str, torch.Tensor] = {}
    bases: dict[str, torch.Tensor] = {}
    taus: dict[str, torch.Tensor] = {}
    for name, kind, base, deltas in prep.inputs():
        if kind == "copy":
            fixed[name] = base
        elif kind == "out":
            out = base.clone()
            for i, g in enumerate(prep.space):
                out[g.rows] = base[g.rows] + deltas[i, g.rows]
            fixed[name] = out
        else:
            p = tensor_params(cfg, prep.method, name, kind)
            bases[name], taus[name] = base, _trim(deltas, p.density)
    blocks = sorted({block_of(n) for n in taus})
    block_idx = {n: blocks.index(block_of(n)) for n in taus}
    lam = torch.full((len(prep.models), len(blocks)), float(ada.init), requires_grad=True)

    model = AutoModelForSequenceClassification.from_config(merged_config(prep)).eval()
    tok_dir = tokenizer_source(prep)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    pad = tokenizer.pad_token_id or 0
    # Examples: (group index, token ids, teacher probabilities over the group's labels).
    examples: list[tuple[int, list[int], torch.Tensor | None]] = []
    for gi, (ckpt, g) in enumerate(zip(prep.models, prep.groups)):
        ids = S.encode(tokenizer, picked[g], ada.max_length)
        teacher = None
        if ada.objective == "distill":
            guard, _ = S.load_classifier(ckpt.path, tok_dir)
            teacher = torch.empty(len(ids), prep.space[g].size)
            with torch.inference_mode():
                for idx, x, mask in S.batches(ids, 32, pad):
                    z = guard(input_ids=x, attention_mask=mask).logits.float()
                    teacher[idx] = torch.sigmoid(z) if prep.space[g].multi_label else torch.softmax(z, dim=-1)
            del guard
        examples += [(gi, seq, None if teacher is None else teacher[j]) for j, seq in enumerate(ids)]
    rng = random.Random(f"hm3:{cfg.seed}:adamerging")
    order: list[int] = []
    opt = torch.optim.Adam([lam], lr=ada.lr)
    rows = [g.rows for g in prep.space]
    multi = [g.multi_label for g in prep.space]
    logsigmoid = torch.nn.functional.logsigmoid
    losses: list[float] = []
    with progress_bar(progress, "adamerging", ada.steps) as advance:
        for _ in range(ada.steps):
            if len(order) < ada.batch_size:
                perm = list(range(len(examples)))
                rng.shuffle(perm)
                order += perm
            batch, order = order[: ada.batch_size], order[ada.batch_size :]
            params = dict(fixed)
            for n, tau in taus.items():
                # Σ_i λ_i τ_i as one contraction: no (N, *shape) temporary per step
                params[n] = bases[n] + torch.tensordot(lam[:, block_idx[n]], tau, dims=1)
            seqs = [examples[i][1] for i in batch]
            width = max(len(s) for s in seqs)
            x = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, s in enumerate(seqs):
                x[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            logits = functional_call(model, params, (), {"input_ids": x, "attention_mask": mask}).logits
            loss = torch.zeros(())
            for r, i in enumerate(batch):
                gi, _, teacher = examples[i]
                z = logits[r, rows[gi]]
                if multi[gi]:  # a sigmoid per label: binary entropy / KL per label, summed
                    lp, lq = logsigmoid(z), logsigmoid(-z)  # log p(yes), log p(no)
                    if teacher is None:
                        loss = loss - (lp.exp() * lp + lq.exp() * lq).sum()
                    else:
                        t = teacher
                        loss = loss + (t * (t.clamp(min=1e-12).log() - lp)
                                       + (1 - t) * ((1 - t).clamp(min=1e-12).log() - lq)).sum()
                    continue
                logp = torch.log_softmax(z, dim=-1)
                if teacher is None:  # entropy of the group's own prediction
                    loss = loss - (logp.exp() * logp).sum()
                else:  # KL(teacher ‖ merged)
                    loss = loss + (teacher * (teacher.clamp(min=1e-12).log() - logp)).sum()
            loss = loss / len(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            advance()
    log.info("adamerging: %d steps, loss %.4f -> %.4f, %.1fs", ada.steps, losses[0], losses[-1], time.perf_counter() - t0)
    return lam.detach().clone(), blocks, losses


METHODS: tuple[Method, ...] = (
    Method(
        "regmean",
        regmean,
        "https://arxiv.org/abs/2212.09849",
        needs_base=False,
        defaults={"normalize": False, "rescale": False, "regmean_alpha": 0.9},
        needs_stats=("gram",),
        doc="RegMean: closed-form least-squares merge of each linear layer from input Gram matrices (data: texts).",
    ),
    Method(
        "fisher",
        fisher,
        "https://arxiv.org/abs/2111.09832",
        needs_base=False,
        defaults={"normalize": False, "rescale": False, "fisher_floor": 1e-6, "fisher_normalize": True},
        needs_stats=("fisher",),
        doc="Fisher merging: average weighted by each model's diagonal Fisher on its own texts (data: texts).",
    ),
    Method(
        "adamerging",
        adamerging,
        "https://arxiv.org/abs/2310.02575",
        uses_density=True,
        defaults={"normalize": False, "rescale": False},
        needs_stats=("coef",),
        doc="AdaMerging: layer-wise task-vector coefficients learnt on unlabelled text (distill or entropy).",
    ),
)

REGISTRY.update({m.name: m for m in METHODS})
