"""The in-memory merge engine for search: hundreds of merges of the same models, no disk I/O.

``TaskVectors.from_prepared(prep)`` reads every tensor once and keeps the base and the stacked
task vectors ``(N, *shape)`` in memory. ``merge_into(model, overrides, seed)`` merges every tensor
with ``hm3.merging.engine.merge_tensor`` — the very function ``hm3.merge`` uses — and copies the
result into a preallocated ``*ForSequenceClassification`` model in place, so a trial never
allocates or loads a model. For the same recipe the model's tensors equal ``hm3.merge``'s exactly
(``recipe()`` writes the overrides into an ordinary ``MergeConfig``; the tests check both agree).

``TokenCache`` tokenises validation texts once (windows from the classifier's ``windows()``),
pads them into length-sorted batches once, and then each trial only runs forward passes. Texts
are split into chunks so that a search can score a trial on part of the texts and prune it early.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import numpy as np
import torch

from hm3.config import MergeConfig
from hm3.errors import HM3Error
from hm3.merging import steps
from hm3.merging.engine import (Prepared, checked, in_order, merge_tensor, merge_workers, merged_config, tokenizer_source,
                                torch_dtype)
from hm3.merging.methods import REGISTRY

if TYPE_CHECKING:  # pragma: no cover
    from hm3.model import GroupwiseClassifier

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    name: str
    kind: str
    base: torch.Tensor  # (*shape)
    deltas: torch.Tensor  # (N, *shape) float32; (1, *shape) for copy tensors


class TaskVectors:
    """Base and task vectors of every tensor, read once."""

    def __init__(self, prep: Prepared, entries: list[_Entry], seconds: float = 0.0):
        self.prep = prep
        self.entries = entries
        self.seconds_loading = seconds

    @classmethod
    def from_prepared(cls, prep: Prepared, progress: bool = False) -> "TaskVectors":
        if prep.config.refit is not None:
            raise HM3Error("the recipe has `refit:`; the in-memory engine merges only (remove `refit:` for search, "
                           "re-fit the best model afterwards)")
        t0 = time.perf_counter()
        prep.ensure_stats(progress)
        entries = [_Entry(n, k, b, d) for n, k, b, d in prep.inputs()]
        prep.close()  # everything is in memory now: release the input files
        seconds = time.perf_counter() - t0
        n = sum(e.deltas.numel() for e in entries)
        log.info("task vectors in memory: %d tensors, %.1f M values (%.1fs)", len(entries), n / 1e6, seconds)
        return cls(prep, entries, seconds)

    # -- variants ----------------------------------------------------------------------------------
    def with_method(self, method: str) -> "TaskVectors":
        """The same tensors merged by another method (search over the method)."""
        if method == self.prep.method.name:
            return self
        if method not in REGISTRY:
            raise HM3Error(f"unknown merge method {method!r}; valid: {', '.join(REGISTRY)}")
        cfg = self.prep.config.model_copy(update={"merge_method": method})
        return TaskVectors(replace(self.prep, config=cfg, method=REGISTRY[method]), self.entries, self.seconds_loading)

    def recipe(self, overrides: Mapping | None = None, seed: int | None = None) -> MergeConfig:
        """An ordinary recipe that ``hm3.merge`` turns into the same tensors as ``merge_into``
        with these overrides: per-model ``density``/``weight`` go into ``models[i].parameters``,
        shared values (``lambda``) into ``parameters``."""
        return recipe_with(self.prep.config, overrides or {}, seed)

    # -- merging -----------------------------------------------------------------------------------
    def tensors(self, overrides: Mapping | None = None, seed: int | None = None, *,
                into: Mapping[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, merged tensor)`` in the recipe's output dtype, as ``merge_state`` makes them.
        ``into``: tensors (by name) that each merged tensor is copied into by the thread that made it,
        which then yields that tensor (the copies run beside the merges, not after them in the caller)."""
        dtype = torch_dtype(self.prep.config.dtype)
        overrides = dict(overrides or {})

        def one(i: int) -> torch.Tensor:
            e = self.entries[i]
            merged = checked(e.name, merge_tensor(self.prep, e.name, e.kind, e.base, e.deltas, overrides, seed), dtype)
            t = None if into is None else into.get(e.name)
            if t is None:
                return merged
            if t.shape != merged.shape:
                raise HM3Error(f"tensor {e.name!r}: model has shape {tuple(t.shape)}, merge gives {tuple(merged.shape)}")
            return t.copy_(merged)

        # Two tensors at once where a tensor's merge runs on one thread (numpy's kernels), as hm3.merge does.
        names, sizes = [e.name for e in self.entries], [e.base.numel() for e in self.entries]
        workers = merge_workers(None, self.prep.method)
        yield from in_order(names, one, workers, steps.workspace, sizes, progress=False)

    def state(self, overrides: Mapping | None = None, seed: int | None = None) -> dict[str, torch.Tensor]:
        return {n: t.contiguous() for n, t in self.tensors(overrides, seed)}

    def new_model(self) -> torch.nn.Module:
        """A model of the merged architecture (all labels), to be filled by ``merge_into``."""
        from transformers import AutoModelForSequenceClassification

        cfg = merged_config(self.prep)
        # the recipe dtype, as `hm3.load` of the merged checkpoint would give
        model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch_dtype(self.prep.config.dtype))
        return model.eval()

    @torch.no_grad()
    def merge_into(self, model: torch.nn.Module, overrides: Mapping | None = None, seed: int | None = None) -> torch.nn.Module:
        """Write the merged values into ``model``'s parameters and buffers, in place."""
        targets = model.state_dict()  # tensors sharing the parameters' storage
        if not any(e.name in targets for e in self.entries):
            raise HM3Error("the model shares no tensor name with the checkpoints; build it with TaskVectors.new_model()")
        # tensors the model does not store (e.g. a buffer the architecture dropped) are merged and
        # left, as loading ignores them too
        for _ in self.tensors(overrides, seed, into=targets):
            pass
        return model

    def classifier(self, **kw) -> "GroupwiseClassifier":
        """A group-wise classifier over a new preallocated model (fill it with ``merge_into``)."""
        from transformers import AutoTokenizer

        from hm3.model import GroupwiseClassifier

        tok = AutoTokenizer.from_pretrained(str(tokenizer_source(self.prep)))
        return GroupwiseClassifier(self.new_model(), tok, self.prep.space, name="trial", **kw)


def recipe_with(config: MergeConfig, overrides: Mapping, seed: int | None = None) -> MergeConfig:
    """``config`` with the overrides written in: the recipe of one search trial."""
    data = config.model_dump(mode="json", exclude_none=True, by_alias=True)
    n = len(data["models"])
    for key, value in overrides.items():
        if key == "method":
            data["merge_method"] = value
        elif key in ("density", "weight", "gamma", "epsilon"):
            values = value if isinstance(value, (list, tuple)) else [value] * n
            for m, v in zip(data["models"], values):
                m.setdefault("parameters", {})[key] = float(v)
        elif key == "head_density":
            data.setdefault("head", {})["density"] = value
        else:
            data.setdefault("parameters", {})[key] = value
    if seed is not None:
        data["seed"] = int(seed)
    return MergeConfig.model_validate(data)


# -- validation texts, tokenised once ----------------------------------------------------------------
@dataclass
class _Batch:
    ids: torch.Tensor  # (B, L) long
    mask: torch.Tensor  # (B, L) long
    windows: torch.Tensor  # (B,) window index into the chunk's windows


@dataclass
class _Chunk:
    texts: np.ndarray  # text indices (into the cache's texts) whose windows are all in this chunk
    owner: torch.Tensor  # (W,) local text position (into ``texts``) of each window
    batches: list[_Batch]
    n_windows: int


class TokenCache:
    """Texts tokenised and padded once for repeated forward passes through merged models.

    ``chunks`` > 1 splits the texts (in a seeded random order) into parts of about equal size;
    ``predict`` yields after each part, so a trial can be judged, and pruned, on partial data.
    ``truncate`` keeps only each text's first window (its first ``max_length`` tokens): fewer
    tokens per trial, at the price of not reading the rest of long texts.
    ``precision`` ``"bfloat16"`` runs the forward passes under ``torch.autocast`` (bf16 matrix
    products: several times faster on CPUs with AMX or AVX512-BF16; labels can differ from fp32
    near a decision boundary). The merged weights stay fp32.
    """

    def __init__(self, clf: "GroupwiseClassifier", texts: Sequence[str], *, batch_size: int = 32, chunks: int = 1,
                 seed: int = 0, truncate: bool = False, precision: str = "float32"):
        from hm3.fastpaths import check_precision

        if batch_size < 1:
            raise HM3Error(f"batch_size must be at least 1, got {batch_size}")
        check_precision(precision, model_type=clf.model.config.model_type)
        self.precision = precision
        t0 = time.perf_counter()
        self.texts = list(texts)
        self.clf = clf  # its groups, aggregation and decisions (threshold) are the cache's
        self.space = clf.space
        self.aggregate = clf.aggregate
        self.pad = clf.tokenizer.pad_token_id or 0
        wins, owner = clf.windows(self.texts) if self.texts else ([], [])
        if truncate:
            first = [w for w, t in enumerate(owner) if w == 0 or owner[w - 1] != t]
            wins, owner = [wins[w] for w in first], [owner[w] for w in first]
        by_text: list[list[int]] = [[] for _ in self.texts]
        for w, t in enumerate(owner):
            by_text[t].append(w)
        order = np.random.default_rng(seed).permutation(len(self.texts)) if chunks > 1 else np.arange(len(self.texts))
        self.chunks: list[_Chunk] = []
        for part in np.array_split(order, max(1, min(chunks, len(self.texts) or 1))):
            part = np.sort(part)
            local_wins = [w for t in part for w in by_text[t]]
            local_owner = torch.tensor([i for i, t in enumerate(part) for _ in by_text[t]], dtype=torch.long)
            self.chunks.append(_Chunk(part, local_owner, self._batches([wins[w] for w in local_wins], batch_size),
                                      len(local_wins)))
        self.n_windows = len(wins)
        self.n_tokens = sum(len(w) for w in wins)
        self.seconds = time.perf_counter() - t0

    def _batches(self, wins: list[list[int]], batch_size: int) -> list[_Batch]:
        order = sorted(range(len(wins)), key=lambda i: len(wins[i]))  # dynamic padding: similar lengths together
        out = []
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            width = max(len(wins[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(wins[i])] = torch.tensor(wins[i])
                mask[r, : len(wins[i])] = 1
            out.append(_Batch(ids, mask, torch.tensor(idx, dtype=torch.long)))
        return out

    @torch.inference_mode()
    def chunk_logits(self, model: torch.nn.Module, chunk: _Chunk) -> torch.Tensor:
        """``(W, T)`` logits of one chunk's windows."""
        from hm3.fastpaths import forward_context

        out = torch.empty(chunk.n_windows, self.space.total)
        with forward_context(self.precision):
            for b in chunk.batches:
                out[b.windows] = model(input_ids=b.ids, attention_mask=b.mask).logits.float()
        return out

    def aggregate_probs(self, logits: torch.Tensor, owner: torch.Tensor, n_texts: int, groups: Sequence[str]) -> dict[str, np.ndarray]:
        """Per group, ``(n_texts, n_labels)`` probabilities, as ``GroupwiseClassifier.predict_proba``
        (``hm3.model.group_probs``)."""
        from hm3.model import group_probs

        return {name: group_probs(logits, owner, n_texts, self.space[name], self.aggregate).numpy() for name in groups}

    def predict(self, model: torch.nn.Module, groups: Sequence[str]) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """After each chunk: ``(done, labels)`` — ``done`` a bool mask over texts, ``labels`` per
        group the predicted label index of every text (a multi-label group: its 0/1 row of labels at
        the threshold; ``-1`` where not done yet)."""
        from hm3.model import unanswered

        done = np.zeros(len(self.texts), dtype=bool)
        labels = {g: unanswered(self.space[g], len(self.texts)) for g in groups}
        for chunk in self.chunks:
            logits = self.chunk_logits(model, chunk)
            probs = self.aggregate_probs(logits, chunk.owner, len(chunk.texts), groups)
            for g in groups:
                labels[g][chunk.texts] = self.clf.decisions(self.space[g], probs[g])
            done[chunk.texts] = True
            yield done.copy(), {g: v.copy() for g, v in labels.items()}
