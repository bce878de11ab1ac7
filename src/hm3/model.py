"""The group-wise classifier: one forward pass, one softmax per group (a sigmoid per label for a
multi-label group).

``hm3.load(path)`` opens a merged model (groups from config.json ``hm3``) or an ordinary
single classifier (one group, named after its directory).

Long texts are never truncated silently. A text longer than ``max_length`` tokens is split into
windows of ``max_length`` tokens (special tokens included) that overlap by ``stride`` tokens; each
window is classified and, per group, the window probabilities are aggregated:

* ``mean`` (default): the average of the windows' softmax distributions;
* ``max``: for guards — each label's largest probability over the windows, renormalised, so one
  window that is clearly a jailbreak flags the whole text.

A multi-label group (``Group.multi_label``: its classifier had ``problem_type:
multi_label_classification``) reads each of its rows through its own sigmoid: its scores do not sum
to 1, windows aggregate per label (mean or max, nothing renormalised), and a prediction lists every
label whose score reaches its threshold besides the top one: ``threshold`` (0.5), or per group or
label ``thresholds`` (``{"toxicity": 0.6, "toxicity/threat": 0.3}``: a label's own entry, else its
group's, else ``threshold``).

A single-label group answers its top label, unless ``thresholds`` gives it an *operating point* on
one of its labels (``{"jailbreak/jailbreak": 0.9}``, as guards are often run): that label where its
probability reaches the threshold, else the most probable other label (``decide``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from hm3.errors import HM3Error
from hm3.labels import Group, LabelSpace, clean_labels, group_name_from, head_kind, labels_from_config
from hm3.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupPrediction:
    """One group's answer for one text: its ``label`` (the top-scoring one, or at the group's operating
    point: ``decide``) and every label's score; for a multi-label group also ``labels``, all labels
    whose score reaches the threshold (may be empty)."""

    label: str
    scores: dict[str, float]
    labels: tuple[str, ...] | None = None  # multi-label groups only

    def to_json(self) -> dict:
        out: dict = {"label": self.label, "scores": self.scores}
        if self.labels is not None:
            out["labels"] = list(self.labels)
        return out


def group_probs(logits: torch.Tensor, owner: torch.Tensor, n_texts: int, group: Group, aggregate: str) -> torch.Tensor:
    """``group``'s ``(n_texts, n_labels)`` probabilities from all windows' logits ``(W, T)`` (``owner``:
    each window's text): its softmax (a multi-label group: a sigmoid per label), then per text the
    mean, or (``max``) each label's largest value over the windows, renormalised for a softmax."""
    z = logits[:, group.rows]
    probs = torch.sigmoid(z) if group.multi_label else torch.softmax(z, dim=-1)  # (W, n_g)
    if len(owner) == n_texts:
        agg = torch.empty_like(probs)
        agg[owner] = probs
    elif aggregate == "mean":
        agg = torch.zeros(n_texts, group.size).index_add_(0, owner, probs)
        agg /= torch.bincount(owner, minlength=n_texts).unsqueeze(1)
    else:
        agg = torch.zeros(n_texts, group.size).scatter_reduce_(
            0, owner.unsqueeze(1).expand_as(probs), probs, "amax", include_self=False
        )
        if not group.multi_label:  # sigmoids are each their own distribution
            agg /= agg.sum(dim=1, keepdim=True)
    return agg


def label_thresholds(space: LabelSpace, default: float = 0.5,
                     overrides: "Mapping[str, float] | None" = None) -> dict[str, np.ndarray]:
    """Per multi-label group, each label's threshold: ``overrides["group/label"]``, else
    ``overrides["group"]``, else ``default``. Per single-label group with an operating point
    (``overrides["group/label"]``, one label per group): that label's threshold, NaN for the others.
    An override naming no label or group, a single-label group without a label or with two, or a
    value (or ``default``) outside (0, 1) is an error."""
    from hm3.labels import SEP

    if not 0 < default < 1:
        raise HM3Error(f"threshold (of a multi-label group's scores) must be between 0 and 1, got {default}")
    points: dict[str, str] = {}  # single-label group -> the label of its operating point
    for key, value in (overrides or {}).items():
        group, _, label = str(key).partition(SEP)
        g = space[group]  # unknown group: an error naming the known ones
        if label and label not in g.labels:
            raise HM3Error(f"threshold {key!r}: group {group!r} has no label {label!r}; its labels are "
                           f"{', '.join(g.labels)}")
        if not g.multi_label:
            if not label:
                raise HM3Error(f"threshold {key!r}: group {group!r} is single-label: give its operating point on "
                               f"one label, e.g. {group}{SEP}{g.labels[-1]}={value} (that label where its "
                               "probability reaches the threshold, else the most probable other one)")
            if group in points:
                raise HM3Error(f"thresholds {group}{SEP}{points[group]} and {key}: a single-label group has one "
                               "operating point, on one label")
            points[group] = label
        if not isinstance(value, (int, float)) or not 0 < value < 1:
            raise HM3Error(f"threshold {key!r} must be between 0 and 1, got {value!r}")
    over = dict(overrides or {})
    cuts = {g.name: np.array([over.get(f"{g.name}{SEP}{lab}", over.get(g.name, default)) for lab in g.labels],
                             dtype=float)
            for g in space if g.multi_label}
    for group, label in points.items():
        cut = np.full(space[group].size, np.nan)
        cut[space[group].labels.index(label)] = over[f"{group}{SEP}{label}"]
        cuts[group] = cut
    return cuts


def operating_point(group: Group, cut: "np.ndarray | None") -> tuple[str, float] | None:
    """A single-label group's operating point ``(label, threshold)`` from its ``cut``, or None (no cut,
    or a single threshold: that one concerns multi-label groups only)."""
    if group.multi_label or cut is None or np.ndim(cut) == 0 or np.isnan(cut).all():
        return None
    j = int(np.flatnonzero(~np.isnan(cut))[0])
    return group.labels[j], float(cut[j])


def decide(group: Group, probs: np.ndarray, cut: "np.ndarray | float | None" = None) -> np.ndarray:
    """What ``group`` answers from its probabilities ``(n, n_labels)``: a multi-label group, its 0/1 rows
    of the labels at or above ``cut`` (one threshold, or one per label); a single-label group, each
    text's label index — the top one, or with an operating point (``cut``: NaN but for one label's
    threshold, ``label_thresholds``) that label where its probability reaches the threshold, else
    the most probable other label."""
    if group.multi_label:
        return (probs >= cut).astype(int)
    point = operating_point(group, cut)
    if point is None:
        return probs.argmax(axis=1)
    j, t = group.labels.index(point[0]), point[1]
    others = probs.astype(float, copy=True)
    others[:, j] = -np.inf
    return np.where(probs[:, j] >= t, j, others.argmax(axis=1))


def unanswered(group: Group, n_texts: int) -> np.ndarray:
    """``decide``'s answers for ``n_texts`` texts before any is given: ``-1`` label indices, or for a
    multi-label group ``(n_texts, n_labels)`` rows of ``-1``."""
    return np.full((n_texts, group.size) if group.multi_label else n_texts, -1, dtype=int)


def thresholds_option(values: "Sequence[str] | None", option: str = "--label-threshold") -> dict[str, float]:
    """Command-line ``GROUP=T`` / ``GROUP/LABEL=T`` items as ``{key: T}`` (checked against a model by
    ``label_thresholds``)."""
    from hm3.io import group_pairs

    out = {}
    for key, raw in group_pairs(values, option, "T", "toxicity/threat=0.3").items():
        try:
            out[key] = float(raw)
        except ValueError:
            raise HM3Error(f"{option} {key}={raw}: the threshold must be a number between 0 and 1") from None
    return out


def group_prediction(group: Group, row: np.ndarray, threshold: "float | np.ndarray | None" = 0.5) -> GroupPrediction:
    """``group``'s prediction from its scores ``row`` (its probabilities, in label order);
    ``threshold``: one for all labels, or one per label (a single-label group: its operating point,
    or None)."""
    labels = group.labels
    scores = {lab: float(v) for lab, v in zip(labels, row)}
    answer = decide(group, np.asarray(row)[None, :], threshold)[0]
    if not group.multi_label:
        return GroupPrediction(labels[int(answer)], scores)
    return GroupPrediction(labels[int(np.argmax(row))], scores, tuple(lab for lab, on in zip(labels, answer) if on))


class GroupwiseClassifier:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        space: LabelSpace,
        *,
        max_length: int | None = None,
        stride: int = 64,
        aggregate: str = "mean",
        threshold: float = 0.5,
        thresholds: "Mapping[str, float] | None" = None,
        name: str = "",
    ):
        if aggregate not in ("mean", "max"):
            raise HM3Error(f"aggregate must be 'mean' or 'max', got {aggregate!r}")
        self.space = space
        self.set_thresholds(threshold, thresholds)  # (reads self.space)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        limit = getattr(model.config, "max_position_embeddings", 512)
        tok_limit = getattr(tokenizer, "model_max_length", limit) or limit
        hm3_limit = (getattr(model.config, "hm3", None) or {}).get("max_length")
        self.max_length = int(max_length or hm3_limit or min(limit, tok_limit if tok_limit < 100_000 else limit))
        if self.max_length < 16:
            raise HM3Error(f"max_length {self.max_length} leaves no room for text; use at least 16")
        # Overlap between windows; at most half a window so that every window adds new text.
        self.stride = max(0, min(stride, self.max_length // 2 - 2))
        self.aggregate = aggregate

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kw) -> "GroupwiseClassifier":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from hm3.io import read_config, resolve

        path = resolve(path)
        config = read_config(path)  # JSON: checked before transformers reads it (and fails less clearly)
        multi_label = False
        if "groups" not in (getattr(config, "hm3", None) or {}):  # a single classifier: one group
            outputs = len(getattr(config, "id2label", None) or {}) or int(getattr(config, "num_labels", 2))
            multi_label = head_kind(getattr(config, "problem_type", None), outputs, str(config.file))
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise HM3Error(f"{path}: cannot load the tokenizer ({e})") from None
        try:
            model = AutoModelForSequenceClassification.from_pretrained(str(path), use_safetensors=True)
        except Exception as e:
            raise HM3Error(f"{path}: cannot load a sequence classifier ({type(e).__name__}: {e})") from None
        meta = getattr(model.config, "hm3", None)
        if meta and "groups" in meta:
            space = LabelSpace.from_json(meta["groups"])
        else:
            group = group_name_from(path.name)
            n = model.config.num_labels
            space = LabelSpace([(group, clean_labels(group, labels_from_config(model.config.id2label, n)), multi_label)])
        if space.total != model.config.num_labels:
            raise HM3Error(f"{path}: hm3 metadata lists {space.total} labels but the head has {model.config.num_labels}")
        return cls(model, tokenizer, space, name=str(path), **kw)

    @property
    def groups(self) -> list[str]:
        return self.space.names

    # -- tokenisation and windows ------------------------------------------------------------------
    def windows(self, texts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """Token id windows (special tokens included) and, per window, the index of its text.

        The fast tokenizer's overflow mechanism cuts each text into windows of ``max_length``
        tokens overlapping by ``stride`` tokens; a short text is one window.
        """
        enc = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_length,
            stride=self.stride,
            return_overflowing_tokens=True,
            verbose=False,
        )
        return enc["input_ids"], list(enc["overflow_to_sample_mapping"])

    @torch.inference_mode()
    def window_logits(self, wins: list[list[int]], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Logits ``(W, T)`` for token windows, batched by length (dynamic padding)."""
        if batch_size < 1:
            raise HM3Error(f"batch_size must be at least 1, got {batch_size}")
        order = sorted(range(len(wins)), key=lambda i: len(wins[i]))
        out = torch.empty(len(wins), self.space.total)
        pad = self.tokenizer.pad_token_id or 0
        batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        with progress_bar(progress and len(batches) > 1, "classifying", len(batches)) as advance:
            for idx in batches:
                width = max(len(wins[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, : len(wins[i])] = torch.tensor(wins[i])
                    mask[r, : len(wins[i])] = 1
                out[idx] = self.model(input_ids=ids, attention_mask=mask).logits.float()
                advance()
        return out

    def predict_proba(
        self,
        texts: Sequence[str],
        groups: Iterable[str] | None = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> dict[str, np.ndarray]:
        """Per group, an ``(n_texts, n_labels)`` array of probabilities: softmax (rows sum to 1), or for
        a multi-label group a sigmoid per label."""
        selected = self.space.select(groups)
        texts = _check_texts(texts)
        if not texts:
            return {g.name: np.zeros((0, g.size)) for g in selected}
        wins, owner = self.windows(texts)
        logits = self.window_logits(wins, batch_size, progress)
        owner_t = torch.tensor(owner)
        return {g.name: group_probs(logits, owner_t, len(texts), g, self.aggregate).numpy() for g in selected}

    def decisions(self, group: Group, probs: np.ndarray) -> np.ndarray:
        """What the model answers from ``group``'s probabilities ``(n, n_labels)``: each text's label
        index (at the group's operating point, if it has one), or for a multi-label group its
        ``(n, n_labels)`` 0/1 row of labels at their thresholds (``decide``)."""
        return decide(group, probs, self.cuts(group.name))

    def set_thresholds(self, threshold: float = 0.5, thresholds: "Mapping[str, float] | None" = None) -> None:
        """Where a multi-label group's labels count as given: ``threshold`` for every label, unless
        ``thresholds`` (``{"group": t, "group/label": t}``) names the label or its group; and a
        single-label group's operating point (``{"group/label": t}``)."""
        cuts = label_thresholds(self.space, float(threshold), thresholds)  # checks before anything changes
        self.threshold, self.thresholds, self._cuts = float(threshold), dict(thresholds or {}), cuts

    def prediction(self, group: Group, row: np.ndarray) -> GroupPrediction:
        """``group``'s answer for one text from its probabilities (``group_prediction`` at this model's
        thresholds)."""
        return group_prediction(group, row, self.cuts(group.name))

    def cuts(self, group: str) -> np.ndarray | None:
        """A multi-label group's per-label thresholds, a single-label group's operating point (NaN but
        for its label), or None for a single-label group without one (``label_thresholds``)."""
        return self._cuts.get(group)

    def all_cuts(self) -> dict[str, np.ndarray]:
        """``cuts`` of every group that has them."""
        return dict(self._cuts)

    def predict(
        self,
        texts: Sequence[str],
        groups: Iterable[str] | None = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> list[dict[str, GroupPrediction]]:
        """Per text, per group: the label with the highest probability and all the group's scores (and
        for a multi-label group every label scoring at least ``threshold``: ``group_prediction``)."""
        probs = self.predict_proba(texts, groups, batch_size, progress)
        n = len(next(iter(probs.values()))) if probs else 0
        out: list[dict[str, GroupPrediction]] = [{} for _ in range(n)]
        for name, p in probs.items():
            group = self.space[name]
            for i in range(n):
                out[i][name] = self.prediction(group, p[i])
        return out


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise HM3Error("predict expects a list of texts, not a single string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise HM3Error(f"text {i} is {type(t).__name__}, expected str")
    return texts


def load(path: str | os.PathLike, **kw) -> GroupwiseClassifier:
    """Open a merged hm3 model or a single classifier for group-wise prediction."""
    return GroupwiseClassifier.from_pretrained(path, **kw)
