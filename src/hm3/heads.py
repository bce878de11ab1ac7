"""Classification heads: which tensors they are, and how HM3 expands them.

Each architecture family has an *output* projection whose rows are labels (expanded per group)
and, for some families, a task-specific *hidden* layer between the encoder and the output
(DistilBERT ``pre_classifier``, RoBERTa/ELECTRA ``classifier.dense``, DeBERTa ``pooler.dense``).

Expansion (paper, Sec. 3): classifier i with ``n_i`` labels owns rows ``[o_i, o_i + n_i)`` of a
``(T, H)`` output matrix (``T`` = all labels); every other row is zero. The base model's head
becomes an all-zero ``(T, H)`` tensor, so a head's task vector is exactly its own block.

Hidden head layers cannot be expanded without changing the architecture (the merged model must
stay an ordinary ``*ForSequenceClassification`` checkpoint), so they are merged like body tensors
— see ``HeadHiddenPolicy``. The paper's three-way DistilBERT merge collapsed onto one label because
the merged ``pre_classifier`` no longer fed any group's output rows what they were trained on;
hm3 keeps those rows' density at 1.0 and recommends a head re-fit (``refit:``) for such families.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from hm3._lazy import torch
from hm3.errors import HM3Error
from hm3.labels import LabelSpace


@dataclass(frozen=True)
class Family:
    """Naming facts about one transformers model type."""

    model_type: str
    prefix: str  # base_model_prefix: body tensors live under "<prefix>."
    out: tuple[str, str]  # output projection (weight, bias): rows are labels
    hidden: tuple[str, ...] = ()  # task-specific layers between encoder and output
    cls: str = ""  # *ForSequenceClassification class name

    def is_head(self, name: str) -> bool:
        return name in self.out or name in self.hidden


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("bert", "bert", ("classifier.weight", "classifier.bias"), cls="BertForSequenceClassification"),
        Family(
            "distilbert",
            "distilbert",
            ("classifier.weight", "classifier.bias"),
            ("pre_classifier.weight", "pre_classifier.bias"),
            cls="DistilBertForSequenceClassification",
        ),
        Family(
            "roberta",
            "roberta",
            ("classifier.out_proj.weight", "classifier.out_proj.bias"),
            ("classifier.dense.weight", "classifier.dense.bias"),
            cls="RobertaForSequenceClassification",
        ),
        Family(
            "xlm-roberta",
            "roberta",
            ("classifier.out_proj.weight", "classifier.out_proj.bias"),
            ("classifier.dense.weight", "classifier.dense.bias"),
            cls="XLMRobertaForSequenceClassification",
        ),
        Family(
            "electra",
            "electra",
            ("classifier.out_proj.weight", "classifier.out_proj.bias"),
            ("classifier.dense.weight", "classifier.dense.bias"),
            cls="ElectraForSequenceClassification",
        ),
        Family(
            "deberta-v2",
            "deberta",
            ("classifier.weight", "classifier.bias"),
            ("pooler.dense.weight", "pooler.dense.bias"),
            cls="DebertaV2ForSequenceClassification",
        ),
        Family(
            "deberta",
            "deberta",
            ("classifier.weight", "classifier.bias"),
            ("pooler.dense.weight", "pooler.dense.bias"),
            cls="DebertaForSequenceClassification",
        ),
    )
}


def family_of(model_type: str, where: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise HM3Error(
            f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        ) from None


class HeadHiddenPolicy(str, Enum):
    """How a task-specific hidden head layer (pre_classifier, classifier.dense) is merged.

    ``merge``: like a body tensor, with the method and the head density (default 1.0).
    ``base``: keep the base's tensor when it has one (e.g. a classifier used as base).
    """

    merge = "merge"
    base = "base"


def expand_out(tensor: "torch.Tensor | np.ndarray", space: LabelSpace, group: str) -> "torch.Tensor | np.ndarray":
    """Place one group's output rows into a zero tensor (or numpy array) with a row per label of the space.

    ``tensor``: ``(n_g, H)`` weight or ``(n_g,)`` bias → ``(T, H)`` or ``(T,)``.
    """
    g = space[group]
    if tensor.shape[0] != g.size:
        raise HM3Error(
            f"group {group!r}: head has {tensor.shape[0]} outputs but the group has {g.size} labels"
        )
    out = zero_out(tensor, space)
    out[g.rows] = tensor
    return out


def zero_out(like: "torch.Tensor | np.ndarray", space: LabelSpace) -> "torch.Tensor | np.ndarray":
    """The base model's expanded head: zeros with one row per label of the space (a tensor, or a
    numpy array for a numpy ``like``)."""
    shape = (space.total, *like.shape[1:])
    if isinstance(like, np.ndarray):
        return np.zeros(shape, dtype=like.dtype)
    return like.new_zeros(shape)
