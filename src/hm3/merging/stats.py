"""Data-aware statistics: computed once from unlabelled text, cached on disk, read per tensor.

* ``gram`` — per linear layer ``W (out, in)``, the mean input Gram matrix ``XᵀX / n`` over the
  non-padding tokens of a model's own texts, ``(in, in)``: RegMean (Jin et al. 2023).
* ``fisher`` — the diagonal Fisher information ``E_x E_{y~p(y|x)} (∂ log p(y|x) / ∂θ)²`` of every
  parameter, labels sampled from the model's own prediction with a seeded generator (no labels
  needed): Fisher merging (Matena & Raffel 2022).
* window features and logits — the input of the output layer (BERT: pooler output; DistilBERT:
  after ``pre_classifier`` + ReLU; RoBERTa: after ``classifier.dense`` + tanh) and the logits, per
  token window: the head re-fit (``hm3.refit``) and its teachers.

Each model's statistics are computed from that model on its own group's texts (``data.texts``) and
cached in ``$HM3_CACHE/stats/<kind>/<key>.safetensors`` (default ``~/.cache/hm3``); the key hashes
the model's weights, the texts and every setting that changes the numbers, so a cached value is
exactly what a fresh computation gives and merges stay byte-reproducible.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from hm3.errors import HM3Error
from hm3.io import read_text_rows as read_rows
from hm3.labels import MULTI_LABEL

if TYPE_CHECKING:  # pragma: no cover
    from hm3.merging.engine import Prepared

log = logging.getLogger(__name__)

FORMAT = 1  # bump when a statistic's definition changes: old cache entries are then never read


# -- cache -----------------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$HM3_CACHE/stats`` (default ``~/.cache/hm3/stats``)."""
    from hm3.sysinfo import cache_home

    return cache_home() / "stats"


_DIGESTS: dict[tuple, str] = {}


def model_digest(path: str | os.PathLike) -> str:
    """sha256 of a model directory's config and weight files (memoised on size and mtime)."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    if not files:
        raise HM3Error(f"{path}: no weights to hash (expected model.safetensors)")
    memo = (str(path.resolve()), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode() + b"\0")
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()


def state_digest(state: dict[str, torch.Tensor], skip: Sequence[str] = ()) -> str:
    """sha256 of tensors' names, dtypes, shapes and bytes (sorted by name), without ``skip``."""
    h = hashlib.sha256()
    for name in sorted(state):
        if name in skip:
            continue
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True).encode()).hexdigest()[:40]


def load_cached(kind: str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """Tensors and metadata of a cache entry, or None (also for an unreadable entry)."""
    path = cache_root() / kind / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except Exception as e:  # a truncated or foreign file: recompute (and overwrite) rather than fail
        log.warning("ignoring unreadable cache entry %s (%s)", path, e)
        return None


def save_cached(kind: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write a cache entry atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    folder = cache_root() / kind
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, folder / f"{key}.safetensors")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached(kind: str, key: str, compute, enabled: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str], bool]:
    """``compute()`` → (tensors, meta) through the cache. Returns (tensors, meta, was_cached)."""
    if enabled:
        hit = load_cached(kind, key)
        if hit is not None:
            return hit[0], hit[1], True
    tensors, meta = compute()
    meta = {k: str(v) for k, v in meta.items()}
    if enabled:
        save_cached(kind, key, tensors, meta)
        # What is used is what a later run reads back: one code path, identical bytes.
        tensors = {k: v.contiguous() for k, v in tensors.items()}
    return tensors, meta, False


# -- texts -----------------------------------------------------------------------------------------
def sample(rows: Sequence, k: int, seed: int, tag: str) -> list:
    """At most ``k`` rows: a seeded sample in file order (all rows when there are few enough)."""
    if len(rows) <= k:
        return list(rows)
    rng = random.Random(f"hm3:{seed}:{tag}")
    return [rows[i] for i in sorted(rng.sample(range(len(rows)), k))]


# -- models and batches ----------------------------------------------------------------------------
def load_classifier(path: str | os.PathLike, tokenizer_from: str | os.PathLike | None = None):
    """``(model, tokenizer)`` of a *ForSequenceClassification directory, float32, eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), use_safetensors=True, dtype=torch.float32)
    except Exception as e:
        raise HM3Error(f"{path}: cannot load a sequence classifier ({type(e).__name__}: {e})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from or path))
    except Exception as e:
        raise HM3Error(f"{tokenizer_from or path}: cannot load the tokenizer ({e})") from None
    return model.eval(), tokenizer


def out_module(model: torch.nn.Module) -> torch.nn.Linear:
    """The output projection (rows = labels) of a sequence classifier."""
    from hm3.heads import family_of

    family = family_of(model.config.model_type, "model config")
    return model.get_submodule(family.out[0].rsplit(".", 1)[0])


def pad_batch(ids: Sequence[Sequence[int]], idx: Sequence[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of the sequences ``ids[i] for i in idx``, right-padded to the longest."""
    width = max(len(ids[i]) for i in idx)
    x = torch.full((len(idx), width), pad, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for r, i in enumerate(idx):
        x[r, : len(ids[i])] = torch.tensor(ids[i])
        mask[r, : len(ids[i])] = 1
    return x, mask


def batches(ids: Sequence[Sequence[int]], batch_size: int, pad: int) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """``(indices, input_ids, attention_mask)`` batches sorted by length (dynamic padding)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        yield (idx, *pad_batch(ids, idx, pad))


class single_thread:
    """Run torch and BLAS on one thread inside the block (restored afterwards): for many small
    operations (per-example backward passes, small convex fits) thread hand-offs cost more than
    they save, and much more when the cores are shared."""

    def __enter__(self):
        from threadpoolctl import threadpool_limits

        self.torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.limits = threadpool_limits(1)
        return self

    def __exit__(self, *exc):
        self.limits.restore_original_limits()
        torch.set_num_threads(self.torch_threads)


def encode(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


# -- statistics ------------------------------------------------------------------------------------
@torch.inference_mode()
def gram_matrices(model, tokenizer, texts: Sequence[str], max_length: int = 128, batch_size: int = 16) -> tuple[dict[str, torch.Tensor], int]:
    """Per linear layer but the output projection: ``{weight name: XᵀX / n (in, in)}`` over the
    non-padding tokens (token-level inputs) or rows (pooled inputs), and the token count. Inputs of
    another shape count row by row: DeBERTa's query/key projections also map the relative position
    embeddings ``(1, 2k, hidden)``, whose outputs every token's attention reads."""
    out = out_module(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    state = {"mask": None}
    hooks = []

    def hook_for(name: str):
        def hook(_mod, inputs, _output):
            x = inputs[0]
            mask = state["mask"]
            if x.dim() == 3 and x.shape[:2] == mask.shape:  # (B, T, in): keep real tokens only
                x = x[mask]
            x = x.reshape(-1, x.shape[-1]).float()
            g = (x.T @ x).double()  # float32 product (fast), float64 running sum (exact enough)
            sums[name] = sums[name] + g if name in sums else g
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not out:
            hooks.append(mod.register_forward_hook(hook_for(f"{mname}.weight")))
    tokens = 0
    try:
        ids = encode(tokenizer, texts, max_length)
        for _, x, mask in batches(ids, batch_size, tokenizer.pad_token_id or 0):
            state["mask"] = mask.bool()
            tokens += int(mask.sum())
            model(input_ids=x, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return {k: (v / counts[k]).float() for k, v in sums.items()}, tokens


def fisher_diagonal(model, tokenizer, texts: Sequence[str], generator: torch.Generator, max_length: int = 128) -> dict[str, torch.Tensor]:
    """``{parameter name: mean over texts of (∂ log p(y|x) / ∂θ)²}``, y sampled from p(·|x) (a
    multi-label classifier, ``problem_type: multi_label_classification``: each label's yes/no drawn
    from its own sigmoid, ``log p(y|x)`` the sum over labels).

    One text per backward pass: the Fisher needs per-example gradients (a batch gradient would
    square sums, not sum squares); one thread, as many small operations are faster so. Dropout is
    off (eval mode), as at inference. The word-embedding matrix gets no dense gradient: a text
    touches only its own tokens' rows, summed from the gradient of the embedding output."""
    emb = model.get_input_embeddings()
    emb_name = next(n for n, p in model.named_parameters() if p is emb.weight)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and p is not emb.weight}
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    captured: dict[str, torch.Tensor] = {}

    def watch(_mod, _inputs, output):
        output = output.detach().requires_grad_(True)  # a leaf whose gradient is the rows' gradient
        output.register_hook(lambda g: captured.__setitem__("grad", g))
        return output

    ids = encode(tokenizer, texts, max_length)
    multi_label = getattr(model.config, "problem_type", None) == MULTI_LABEL
    emb.weight.requires_grad_(False)
    handle = emb.register_forward_hook(watch)
    try:
        with single_thread():
            for seq in ids:
                _fisher_step(model, params, acc, seq, generator, multi_label)
                rows, inverse = torch.unique(torch.tensor(seq), return_inverse=True)
                g = torch.zeros(len(rows), emb.weight.shape[1]).index_add_(0, inverse, captured.pop("grad")[0].float())
                acc[emb_name].index_add_(0, rows, g * g)
    finally:
        handle.remove()
        emb.weight.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    return {n: a / max(len(ids), 1) for n, a in acc.items()}


def _fisher_step(model, params, acc, seq, generator, multi_label: bool = False) -> None:
    """Add one text's squared gradient of ``log p(y|x)``, ``y ~ p(·|x)``, to ``acc`` (``multi_label``:
    ``y`` a yes/no per label from its sigmoid)."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=torch.tensor([seq])).logits[0]  # (K,)
    if multi_label:
        z = logits.float()
        y = torch.bernoulli(torch.sigmoid(z.detach()), generator=generator)
        (-(y * torch.nn.functional.logsigmoid(z) + (1 - y) * torch.nn.functional.logsigmoid(-z)).sum()).backward()
    else:
        logp = torch.log_softmax(logits.float(), dim=-1)
        y = torch.multinomial(logp.detach().exp(), 1, generator=generator)[0]
        (-logp[y]).backward()
    for n, p in params.items():
        if p.grad is not None:
            acc[n].addcmul_(p.grad, p.grad)  # float32 sums of a few hundred squares: ample precision


@torch.inference_mode()
def window_outputs(model, wins: Sequence[Sequence[int]], batch_size: int = 32, pad: int = 0,
                   progress: bool = False, precision: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """For token windows: the output layer's input ``(W, H)`` and the logits ``(W, T)``, both fp32
    (``precision`` ``bfloat16``: forward passes under ``hm3.fastpaths.forward_context``)."""
    from hm3.fastpaths import forward_context
    from hm3.progress import progress_bar

    out = out_module(model)
    feats = torch.empty(len(wins), out.in_features)
    logits = torch.empty(len(wins), out.out_features)
    got: dict[str, torch.Tensor] = {}
    handle = out.register_forward_hook(lambda _m, inputs, _o: got.__setitem__("x", inputs[0]))
    n_batches = (len(wins) + batch_size - 1) // batch_size
    try:
        with progress_bar(progress and n_batches > 1, "features", n_batches) as advance, forward_context(precision):
            for idx, x, mask in batches(wins, batch_size, pad):
                logits[idx] = model(input_ids=x, attention_mask=mask).logits.float()
                feats[idx] = got["x"].float()
                advance()
    finally:
        handle.remove()
    return feats, logits


# -- statistics of a merge -------------------------------------------------------------------------
@dataclass
class MergeStats:
    """Per model (recipe order): its statistics by tensor name; or learnt coefficients."""

    kind: str
    per_model: list[dict[str, torch.Tensor]] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)  # fisher: each model's mean Fisher
    coef: torch.Tensor | None = None  # adamerging: (N, blocks)
    blocks: list[str] = field(default_factory=list)


def group_texts(prep: "Prepared") -> dict[str, tuple[str, list[str]]]:
    """Per group: (file, sampled texts) from the recipe's ``data:`` section."""
    data = prep.config.data
    if data is None:
        raise HM3Error(f"merge_method {prep.method.name!r} needs a `data:` section naming unlabelled text per group")
    out = {}
    for g in prep.groups:
        if g not in data.texts:
            raise HM3Error(
                f"data.texts: no texts for group {g!r}; add `{g}: path/to/texts.jsonl` "
                f"(groups: {', '.join(prep.groups)})"
            )
        rows = read_rows(data.texts[g])
        texts = [t for t, _ in sample(rows, data.max_texts, prep.config.seed, f"data/{g}")]
        out[g] = (data.texts[g], texts)
    unknown = sorted(set(data.texts) - set(prep.groups))
    if unknown:
        raise HM3Error(f"data.texts: unknown groups {unknown}; the recipe's groups are {', '.join(prep.groups)}")
    return out


def ensure_stats(prep: "Prepared", progress: bool = False) -> MergeStats:
    """Compute (or read from the cache) what ``prep.method`` needs; record it in ``prep.metadata``."""
    if prep.stats is not None:
        return prep.stats
    from hm3.merging.engine import torch_generator
    from hm3.progress import progress_bar

    t0 = time.perf_counter()
    data = prep.config.data
    kind = prep.method.needs_stats[0]
    texts = group_texts(prep)
    report: dict[str, Any] = {"method": prep.method.name, "statistic": kind, "max_length": data.max_length,
                              "groups": {}}
    stats = MergeStats(kind)
    if kind == "coef":
        from hm3.merging.data_aware import learn_coefficients

        stats.coef, stats.blocks, info = learn_coefficients(prep, texts, progress=progress)
        report.update(info)
        for g, (file, _) in texts.items():
            report["groups"][g] = {"file": str(file), "texts": info["texts_per_group"][g]}
    else:
        with progress_bar(progress, f"{kind} statistics", len(prep.models)) as advance:
            for ckpt, g in zip(prep.models, prep.groups):
                file, tx = texts[g]
                key = cache_key(kind=kind, model=model_digest(ckpt.path), texts=texts_digest(tx),
                                max_length=data.max_length, batch_size=data.batch_size,
                                seed=prep.config.seed if kind == "fisher" else None)

                def compute(ckpt=ckpt, g=g, tx=tx):
                    model, tok = load_classifier(ckpt.path, _tokenizer_dir(prep, ckpt.path))
                    if kind == "gram":
                        grams, tokens = gram_matrices(model, tok, tx, data.max_length, data.batch_size)
                        return grams, {"texts": len(tx), "tokens": tokens}
                    fisher = fisher_diagonal(model, tok, tx, torch_generator(prep.config.seed, f"fisher/{g}"),
                                             data.max_length)
                    return fisher, {"texts": len(tx)}

                tensors, meta, hit = cached(kind, key, compute, data.cache)
                stats.per_model.append(tensors)
                if kind == "fisher":
                    total = sum(float(t.double().sum()) for t in tensors.values())
                    numel = sum(t.numel() for t in tensors.values())
                    stats.scale.append(total / max(numel, 1))
                report["groups"][g] = {"file": str(file), "texts": len(tx), "cached": hit,
                                       **({"tokens": int(meta["tokens"])} if "tokens" in meta else {})}
                advance()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("%s statistics for %d models in %.1fs", kind, len(prep.models), report["seconds"])
    prep.stats = stats
    prep.metadata["data"] = report
    return stats


def _tokenizer_dir(prep: "Prepared", model_dir: Path) -> Path:
    from hm3.io import tokenizer_vocab
    from hm3.merging.engine import tokenizer_source

    return model_dir if tokenizer_vocab(model_dir) is not None else tokenizer_source(prep)


def tensor_stats(prep: "Prepared", name: str) -> dict[str, torch.Tensor]:
    """This tensor's statistics for ``prep.method`` (an empty dict where there are none)."""
    stats = ensure_stats(prep)
    if stats.kind == "coef":
        from hm3.merging.data_aware import block_of

        block = block_of(name)
        if block not in stats.blocks:
            return {}
        return {"coef": stats.coef[:, stats.blocks.index(block)]}
    if not all(name in m for m in stats.per_model):
        return {}
    if len({tuple(m[name].shape) for m in stats.per_model}) > 1:
        return {}  # output rows: one block per group, kept as they are (engine)
    out = {stats.kind: torch.stack([m[name] for m in stats.per_model])}
    if stats.kind == "fisher":
        out["fisher_scale"] = torch.tensor(stats.scale)
    return out
