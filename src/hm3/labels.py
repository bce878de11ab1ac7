"""Label spaces: every label belongs to a named group (the classifier it came from).

The merged head has one block of rows per group, in config order::

    rows [offset_0, offset_0 + n_0)  -> group 0's labels
    rows [offset_1, offset_1 + n_1)  -> group 1's labels  ...

Labels are addressed by qualified names ``group/label`` so that two groups may both own a
``benign`` label. A group is single-label (its rows are read through one softmax: one label per text)
or, when its classifier was a multi-label one (``problem_type: multi_label_classification``),
multi-label (an independent sigmoid per row: any number of labels per text). Uninformative names
(``LABEL_0``, ``label1``, ``LABEL-2``) are replaced, either by names the user gives or by
``<group>_<i>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from hm3.errors import HM3Error

# LABEL_0, label_1, LABEL2, Label-3, "label 4": what transformers and most trainers write by default.
UNINFORMATIVE = re.compile(r"^label[_\-\s]?\d+$", re.IGNORECASE)
GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
SEP = "/"


def is_uninformative(label: str) -> bool:
    return bool(UNINFORMATIVE.match(label.strip()))


@dataclass(frozen=True)
class Group:
    """One original classifier's labels and where its rows sit in the merged head."""

    name: str
    labels: tuple[str, ...]
    offset: int
    multi_label: bool = False  # an independent sigmoid per label instead of one softmax over them

    @property
    def activation(self) -> str:
        return "sigmoid" if self.multi_label else "softmax"

    @property
    def size(self) -> int:
        return len(self.labels)

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.size)

    def qualified(self) -> list[str]:
        return [f"{self.name}{SEP}{label}" for label in self.labels]


class LabelSpace:
    """The union of all groups' labels, in a fixed order."""

    def __init__(self, groups: "Sequence[tuple[str, Sequence[str]] | tuple[str, Sequence[str], bool]]"):
        """``groups``: ``(name, labels)`` or ``(name, labels, multi_label)`` in row order."""
        if not groups:
            raise HM3Error("a label space needs at least one group")
        seen: set[str] = set()
        built: list[Group] = []
        offset = 0
        for name, labels, *kind in groups:
            multi_label = bool(kind[0]) if kind else False
            validate_group_name(name)
            if name in seen:
                raise HM3Error(
                    f"duplicate group {name!r}: every model needs its own group name "
                    "(set `group:` for each model in the config)"
                )
            seen.add(name)
            labels = tuple(labels)
            if not labels:
                raise HM3Error(f"group {name!r} has no labels")
            if len(set(labels)) != len(labels):
                dup = sorted({x for x in labels if labels.count(x) > 1})
                raise HM3Error(f"group {name!r} has duplicate labels {dup}; give unique names with `labels:`")
            for label in labels:
                if not label or SEP in label:
                    raise HM3Error(f"group {name!r}: label {label!r} must be non-empty and contain no {SEP!r}")
            built.append(Group(name, labels, offset, multi_label))
            offset += len(labels)
        self.groups: tuple[Group, ...] = tuple(built)
        self._by_name = {g.name: g for g in self.groups}

    # -- queries ---------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(g.size for g in self.groups)

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def __getitem__(self, name: str) -> Group:
        try:
            return self._by_name[name]
        except KeyError:
            raise HM3Error(f"unknown group {name!r}; known groups: {', '.join(self.names)}") from None

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSpace) and self.groups == other.groups

    def select(self, names: Iterable[str] | None) -> list[Group]:
        """The groups named (in the order given), or all groups when ``names`` is None."""
        if names is None:
            return list(self.groups)
        return [self[n] for n in names]

    def multi_label(self, names: Iterable[str] | None = None) -> list[str]:
        """The multi-label groups among ``names`` (default: all groups)."""
        return [g.name for g in self.select(names) if g.multi_label]

    def id2label(self) -> dict[int, str]:
        return {i: q for i, q in enumerate(q for g in self.groups for q in g.qualified())}

    def label2id(self) -> dict[str, int]:
        return {q: i for i, q in self.id2label().items()}

    # -- (de)serialisation: the `hm3` key of config.json -------------------------------------------
    def to_json(self) -> list[dict]:
        """``[{"name", "labels"}, ...]``, plus ``"multi_label": true`` for a multi-label group (absent
        otherwise: the metadata of single-label merges is as it always was)."""
        return [{"name": g.name, "labels": list(g.labels), **({"multi_label": True} if g.multi_label else {})}
                for g in self.groups]

    @classmethod
    def from_json(cls, data: Sequence[Mapping]) -> "LabelSpace":
        try:
            return cls([(d["name"], d["labels"], bool(d.get("multi_label", False))) for d in data])
        except (KeyError, TypeError) as e:
            raise HM3Error(f"malformed hm3 group metadata in config.json: {e}") from None


MULTI_LABEL = "multi_label_classification"


#: the help of every command's ``--label-threshold`` (``hm3.model.thresholds_option``, ``label_thresholds``)
LABEL_THRESHOLD_HELP = ("GROUP=T or GROUP/LABEL=T: a multi-label group's or label's own threshold instead of "
                        "--threshold; GROUP/LABEL=T on a single-label group is its operating point: LABEL where its "
                        "probability reaches T, else the most probable other label (repeat).")


def label_index(group: str, names: Sequence[str], raw: object, where: str) -> int:
    """The index in ``names`` (group ``group``'s labels) of a label given by name, ``group/name`` or
    index — an int, or a string of digits that is no label's name (labels read from a CSV file);
    otherwise an error naming ``where`` and the valid labels."""
    if isinstance(raw, str) and raw not in names:
        prefix = f"{group}/"
        if raw.startswith(prefix) and raw[len(prefix):] in names:
            raw = raw[len(prefix):]
        elif raw.isascii() and raw.isdigit():
            raw = int(raw)
    if isinstance(raw, int) and not isinstance(raw, bool):
        if 0 <= raw < len(names):
            return raw
        raise HM3Error(f"{where}: label index {raw} is out of range for group {group!r} ({len(names)} labels)")
    if isinstance(raw, str) and raw in names:
        return list(names).index(raw)
    raise HM3Error(f"{where}: group {group!r} has no label {raw!r}; its labels are {', '.join(names)}")


def kind_name(multi_label: bool) -> str:
    """How a group reads its outputs, for messages and ``hm3 inspect``."""
    return "multi-label (a sigmoid per label)" if multi_label else "single-label (softmax)"


def head_kind(problem_type: str | None, outputs: int, where: str) -> bool:
    """Whether a classifier head is multi-label (True: an independent sigmoid per output, transformers'
    ``problem_type: multi_label_classification``) or single-label (False: one softmax over its
    outputs); an error for a head neither reads correctly: regression, or a single-label head with one
    output (a softmax over one label answers it at 1.0 whatever the text). ``where``: the config.json,
    for the message."""
    if problem_type == MULTI_LABEL:
        if outputs < 1:
            raise HM3Error(f"{where}: a multi-label classifier without outputs")
        return True
    if problem_type == "regression" or outputs < 2:
        raise HM3Error(
            f"{where}: a head with {outputs} output{'s' if outputs != 1 else ''}"
            + (" (problem_type regression)" if problem_type == "regression" else "")
            + "; hm3 reads a single-label group through a softmax over at least two labels, which would answer a "
            "one-output head with its only label at 1.0. A binary classifier with one sigmoid logit: set "
            f'"problem_type": "{MULTI_LABEL}" in its config.json (hm3 then reads the logit through a sigmoid), '
            "or save it as the two-label head [0, z] with num_labels 2"
        )
    return False


def validate_group_name(name: str) -> None:
    if not isinstance(name, str) or not GROUP_NAME.match(name):
        raise HM3Error(
            f"invalid group name {name!r}: use letters, digits, '_', '.', '-' (and start with a letter or digit)"
        )


def group_name_from(name: str) -> str:
    """A valid group name from a directory or hub name (``org/my guard`` → ``my_guard``)."""
    name = name.rstrip("/").rsplit("/", 1)[-1]
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in name).lstrip("_.-") or "model"


def clean_labels(group: str, labels: Sequence[str], override: Sequence[str] | None = None) -> list[str]:
    """A model's labels with uninformative names replaced.

    ``override`` (the config's ``labels:``) replaces all names and must match the head size.
    Otherwise each uninformative name becomes ``<group>_<i>``; informative names are kept.
    """
    if override is not None:
        if len(override) != len(labels):
            raise HM3Error(
                f"group {group!r}: `labels` lists {len(override)} names but the model's head has "
                f"{len(labels)} outputs; list exactly {len(labels)} names"
            )
        return [str(x) for x in override]
    return [f"{group}_{i}" if is_uninformative(str(lab)) else str(lab) for i, lab in enumerate(labels)]


def labels_from_config(id2label: Mapping, num_labels: int) -> list[str]:
    """Label names in id order from a transformers config's ``id2label`` (keys may be str or int)."""
    table = {int(k): str(v) for k, v in (id2label or {}).items()}
    return [table.get(i, f"LABEL_{i}") for i in range(num_labels)]
