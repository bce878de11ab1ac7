"""Does the merged model answer like the original guards on *your* text? Label agreement, no labels needed.

A suite (hm3.evaluate) says how often a model is right; users replacing N guards by one model also want
to know how often it answers *differently from the guards* on their own traffic, which has no labels.
``agreement(model, guards, texts)`` runs each guard on the texts and the merged model once, and reports
per group the share of texts where both give the same label, the confusion matrix (guard's label ×
merged model's), and the disagreements, the ones where the guard was surest first.

Guards are matched to groups by name: ``{group: guard directory}``; by default the recipe recorded in the
merged model's ``config.json`` (``hm3.recipe.models``), so a model merged on this machine needs none.
A guard is a single classifier (its one group answers ``group``) or a model that has ``group`` itself.
Labels are compared by position within the group (the merge keeps each guard's label order); the
counts of labels must match. A multi-label group (a sigmoid per label) agrees on a text when both give
the same *set* of labels at the merged model's thresholds; its confusion is one 2×2 table per label.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, List, Mapping, Optional, Sequence

import numpy as np

from hm3.errors import HM3Error

if TYPE_CHECKING:  # pragma: no cover
    from hm3.model import GroupwiseClassifier

log = logging.getLogger(__name__)


@dataclass
class Disagreement:
    index: int  # the text's position in the input
    guard: str  # the guard's label (a multi-label group: its labels, comma-separated, or "(none)")
    merged: str  # the merged model's label
    guard_p: float  # the guard's probability of its label (multi-label: of its least sure yes/no)
    merged_p: float  # the merged model's probability of its label

    def to_json(self) -> dict:
        return {"index": self.index, "guard": self.guard, "merged": self.merged,
                "guard_p": round(self.guard_p, 4), "merged_p": round(self.merged_p, 4)}


@dataclass
class GroupAgreement:
    group: str
    guard: str  # where the guard came from
    labels: list[str]
    confusion: np.ndarray  # (k, k): rows the guard's label, columns the merged model's (multi-label: below)
    disagreements: list[Disagreement] = field(default_factory=list)  # surest guard first
    sure: int = 0  # texts where the guard's top probability is at least the report's threshold
    sure_agree: int = 0  # ... and the merged model gives the same label
    by: dict[str, tuple[int, int]] = field(default_factory=dict)  # per key of ``agreement(by=)``: (same label, texts)
    # A multi-label group: ``confusion`` is (k, 2, 2), per label [guard no/yes][merged no/yes], and
    # ``same`` the texts given the same set of labels (which the per-label tables cannot tell).
    multi_label: bool = False
    same: int = 0

    @property
    def n(self) -> int:
        if self.multi_label:
            return int(self.confusion[0].sum()) if len(self.confusion) else 0
        return int(self.confusion.sum())

    @property
    def agree(self) -> int:
        return self.same if self.multi_label else int(np.trace(self.confusion))

    @property
    def share(self) -> float:
        return self.agree / self.n if self.n else float("nan")

    @property
    def sure_share(self) -> float:
        return self.sure_agree / self.sure if self.sure else float("nan")

    def to_json(self, show: int | None = None) -> dict:
        return {"group": self.group, "guard": self.guard, "labels": self.labels, "texts": self.n,
                "agree": self.agree, "share": self.share, "sure": self.sure, "sure_agree": self.sure_agree,
                "sure_share": self.sure_share, "confusion": self.confusion.tolist(),
                **({"multi_label": True} if self.multi_label else {}),
                "disagreements": [d.to_json() for d in self.disagreements[:show]],
                **({"by": {k: {"agree": a, "texts": n, "share": a / n} for k, (a, n) in self.by.items()}}
                   if self.by else {})}

    def confusion_text(self) -> str:
        from hm3.evaluate import confusion_text, label_tables_text

        if not self.multi_label:
            return confusion_text(self.labels, self.confusion, "guard \\ merged")
        # per label: the texts given it by both, by the guard only, by the merged model only, by neither
        return label_tables_text(self.labels, self.confusion, ("both", "guard only", "merged only", "neither"))


@dataclass
class Agreement:
    model: str
    texts: list[str]
    groups: dict[str, GroupAgreement]
    seconds: float
    sure: float = 0.9  # the guard counts as sure of a text when its top probability is at least this
    by_field: str | None = None  # what ``agreement(by=)``'s keys are, for the report (e.g. "source")
    thresholds: dict[str, list[float]] = field(default_factory=dict)  # multi-label groups: each label's threshold
    # single-label groups compared at an operating point: (label, threshold), hm3.model.decide
    operating_points: dict[str, tuple[str, float]] = field(default_factory=dict)

    def to_json(self, show: int | None = None) -> dict:
        return {"model": self.model, "texts": len(self.texts), "seconds": round(self.seconds, 2), "sure": self.sure,
                **({"thresholds": self.thresholds} if self.thresholds else {}),
                **({"operating_points": {g: {"label": lab, "threshold": t} for g, (lab, t) in
                                         self.operating_points.items()}} if self.operating_points else {}),
                **({"by_field": self.by_field} if self.by_field else {}),
                "groups": {g: a.to_json(show) for g, a in self.groups.items()}}

    def markdown(self, show: int = 5, width: int = 100) -> str:
        lines = [f"Agreement of {self.model} with the original guards on {len(self.texts)} texts "
                 f"({self.seconds:.1f} s): the share of texts where both give the same label; *guard sure*: "
                 f"the texts where the guard's top probability is at least {self.sure:g} (elsewhere the guard "
                 "itself hesitates, e.g. on text outside its task)."
                 + (" A multi-label group agrees on a text when both give the same set of labels (a label "
                    "is given at a score of at least its threshold: "
                    + "; ".join(f"{g} " + " / ".join(f"{t:g}" for t in ts) for g, ts in self.thresholds.items())
                    + "); its guard is sure when every label's probability is "
                    f"at least {self.sure:g} or at most {1 - self.sure:g}, and its tables count per label the "
                    "texts given that label by both, by one of them, or by neither."
                    if any(a.multi_label for a in self.groups.values()) else "")
                 + ("" if not self.operating_points else " Compared at operating points (a label where its "
                    "probability reaches the threshold, else the most probable other one): "
                    + "; ".join(f"{g} {lab} ≥ {t:g}" for g, (lab, t) in self.operating_points.items()) + "."), "",
                 "| group | guard | texts | same label | share | guard sure | same label | share |",
                 "|---|---|---:|---:|---:|---:|---:|---:|"]
        for a in self.groups.values():
            sure = f"{a.sure_share:.2%}" if a.sure else "–"
            lines.append(f"| {a.group} | {a.guard} | {a.n} | {a.agree} | {a.share:.2%} | {a.sure} | {a.sure_agree} | {sure} |")
        first = next(iter(self.groups.values()), None)
        if first is not None and first.by:
            names = list(self.groups)
            lines += ["", f"By {self.by_field or 'key'}: for each value, the share of its texts where both give the same label.", "",
                      f"| {self.by_field or 'key'} | texts | " + " | ".join(names) + " |",
                      "|---|---:|" + "---:|" * len(names)]
            for k, (_, n) in first.by.items():
                lines.append(f"| {k} | {n} | " + " | ".join(f"{a.by[k][0] / n:.2%}" for a in self.groups.values()) + " |")
        for a in self.groups.values():
            lines += ["", f"### {a.group}", "", "```", a.confusion_text(), "```"]
            if a.disagreements and show:
                lines += ["", f"Disagreements, the guard's surest first ({min(show, len(a.disagreements))} of "
                              f"{len(a.disagreements)}):", "", "| text | guard | merged |", "|---|---|---|"]
                for d in a.disagreements[:show]:
                    t = " ".join(self.texts[d.index].split())
                    t = (t[: width - 1] + "…" if len(t) > width else t).replace("|", "\\|")
                    lines.append(f"| {d.index}: {t} | {d.guard} ({d.guard_p:.2f}) | {d.merged} ({d.merged_p:.2f}) |")
        return "\n".join(lines)


def recorded_guards(model_dir: str | os.PathLike) -> dict[str, Path]:
    """``{group: guard directory}`` from the recipe in a merged model's ``config.json`` (``hm3.recipe``);
    only guards whose directory still exists (a hub id or a moved folder is left out)."""
    from hm3.io import recipe_models

    out = {}
    for m in recipe_models(model_dir) or []:
        group, path = m.get("group"), m["model"]
        if group and Path(path).is_dir():
            out[group] = Path(path)
    return out


def _guard_group(guard: "GroupwiseClassifier", group: str, where: str) -> str:
    if group in guard.groups:
        return group
    if len(guard.groups) == 1:
        return guard.groups[0]
    raise HM3Error(f"{where}: has groups {', '.join(guard.groups)} but none is {group!r}; give a guard that "
                   f"answers only {group!r} or has a group of that name")


def agreement(
    model: "str | os.PathLike | GroupwiseClassifier",
    texts: Sequence[str],
    guards: "Mapping[str, str | os.PathLike | GroupwiseClassifier] | None" = None,
    *,
    batch_size: int = 32,
    progress: bool = False,
    sure: float = 0.9,
    by: Sequence[str] | None = None,
    by_field: str | None = None,
    guard_probs: "Mapping[str, np.ndarray] | None" = None,
    threshold: float | None = None,
    thresholds: "Mapping[str, float] | None" = None,
) -> Agreement:
    """Label agreement per group between ``model`` and each group's original guard on ``texts``.

    ``guards``: ``{group: guard}`` (directories or loaded classifiers); default the recipe's models
    recorded in ``model``'s config (``recorded_guards``). Groups without a guard are left out; none
    at all is an error. ``sure``: also count agreement on the texts where the guard's top probability
    is at least this. ``by``: a key per text (e.g. its source); agreement is also counted per key, in
    order of first appearance (``GroupAgreement.by``); ``by_field`` names the keys in the report.
    ``guard_probs``: ``{group: (texts, labels) array}``, a guard's probabilities on ``texts`` already
    computed (e.g. once for many merged models); that guard is not run again. ``threshold`` and
    ``thresholds`` (per group or label): where a multi-label group's label counts as given, and a
    single-label group's operating point (``{"group/label": t}``), for the guard and the merged model
    alike (default: the merged model's own; 0.5 and none when loaded here)."""
    from hm3.model import GroupwiseClassifier, decide, load, operating_point

    if not 0 < sure <= 1:
        raise HM3Error(f"sure must be in (0, 1], got {sure}")
    t0 = time.perf_counter()
    name = str(model) if not isinstance(model, GroupwiseClassifier) else (model.name or "model")
    if guards is None:
        if isinstance(model, GroupwiseClassifier):
            raise HM3Error("agreement: pass the guards ({group: directory}) with a loaded model")
        guards = recorded_guards(model)
        if not guards:
            raise HM3Error(f"{model}: its config.json records no guard directory that exists here; "
                           "name them with --guard GROUP=DIR")
    clf = model if isinstance(model, GroupwiseClassifier) else load(model)
    if threshold is not None or thresholds is not None:
        from hm3.model import label_thresholds

        cuts = label_thresholds(clf.space, clf.threshold if threshold is None else threshold, thresholds)
    else:
        cuts = clf.all_cuts()
    unknown = [g for g in guards if g not in clf.groups]
    if unknown:
        raise HM3Error(f"{name}: has no group {', '.join(map(repr, unknown))}; its groups are {', '.join(clf.groups)}")
    texts = list(texts)
    if not texts:
        raise HM3Error("agreement needs at least one text")
    keys = None if by is None else [str(k) for k in by]
    if keys is not None and len(keys) != len(texts):
        raise HM3Error(f"agreement: {len(keys)} keys (by=) for {len(texts)} texts; give one key per text")
    groups = [g for g in clf.groups if g in guards]
    merged = clf.predict_proba(texts, groups, batch_size=batch_size, progress=progress)
    out: dict[str, GroupAgreement] = {}
    for g in groups:
        src = guards[g]
        where = str(src) if not isinstance(src, GroupwiseClassifier) else (src.name or f"guard of {g}")
        labels = list(clf.space[g].labels)
        if guard_probs is not None and g in guard_probs:
            gp = np.asarray(guard_probs[g])
            if gp.shape != (len(texts), len(labels)):
                raise HM3Error(f"agreement: guard_probs[{g!r}] has shape {gp.shape}, expected {len(texts)} texts × "
                               f"{len(labels)} labels of group {g!r} of {name}")
        else:
            guard = src if isinstance(src, GroupwiseClassifier) else load(src)
            gg = _guard_group(guard, g, where)
            if guard.space[gg].multi_label != clf.space[g].multi_label:
                from hm3.labels import kind_name

                raise HM3Error(f"{where}: is {kind_name(guard.space[gg].multi_label)} but group {g!r} of {name} is "
                               f"{kind_name(clf.space[g].multi_label)}; give the guard that group was merged from")
            if guard.space[gg].size != len(labels):
                raise HM3Error(f"{where}: has {guard.space[gg].size} labels but group {g!r} of {name} has "
                               f"{len(labels)}; give the guard that group was merged from")
            gp = guard.predict_proba(texts, [gg], batch_size=batch_size, progress=progress)[gg]
        mp = merged[g]
        multi = clf.space[g].multi_label
        ya, yb = (decide(clf.space[g], p, cuts.get(g)) for p in (gp, mp))  # the guard's answers, the merge's
        if multi:  # label sets at the merged model's thresholds; sureness of a set: its least sure yes/no
            same = (ya == yb).all(1)
            conf = np.zeros((len(labels), 2, 2), dtype=np.int64)
            for j in range(len(labels)):
                np.add.at(conf[j], (ya[:, j], yb[:, j]), 1)
            pa, pb = np.where(ya == 1, gp, 1 - gp).min(1), np.where(yb == 1, mp, 1 - mp).min(1)

            def label_set(row):  # (not `name`: that is the model's, for the report)
                return ", ".join(lab for lab, on in zip(labels, row) if on) or "(none)"

            idx = np.flatnonzero(~same)
            idx = idx[np.argsort(-pa[idx], kind="stable")]
            dis = [Disagreement(int(i), label_set(ya[i]), label_set(yb[i]), float(pa[i]), float(pb[i])) for i in idx]
            confident = pa >= sure
        else:
            same = ya == yb
            conf = np.zeros((len(labels), len(labels)), dtype=np.int64)
            np.add.at(conf, (ya, yb), 1)
            idx = np.flatnonzero(~same)
            idx = idx[np.argsort(-gp[idx, ya[idx]], kind="stable")]
            dis = [Disagreement(int(i), labels[ya[i]], labels[yb[i]], float(gp[i, ya[i]]), float(mp[i, yb[i]]))
                   for i in idx]
            confident = gp.max(1) >= sure
        per_key: dict[str, tuple[int, int]] = {}
        for k, s in zip(keys or (), same.tolist()):
            agree_k, n_k = per_key.get(k, (0, 0))
            per_key[k] = (agree_k + int(s), n_k + 1)
        out[g] = GroupAgreement(g, where, labels, conf, dis, int(confident.sum()), int((confident & same).sum()),
                                per_key, multi_label=multi, same=int(same.sum()))
        log.info("%s: %d of %d texts agree with %s", g, out[g].agree, out[g].n, where)
    points = {g: p for g in groups if (p := operating_point(clf.space[g], cuts.get(g))) is not None}
    return Agreement(name, texts, out, time.perf_counter() - t0, sure, by_field if keys is not None else None,
                     {g: cuts[g].tolist() for g in groups if clf.space[g].multi_label}, points)


def register(app, user_errors) -> None:
    import typer

    from hm3.labels import LABEL_THRESHOLD_HELP

    @app.command("agree")
    @user_errors
    def agree_command(
        model: Path = typer.Argument(..., help="The merged model."),
        guard: Optional[List[str]] = typer.Option(None, "--guard", "-g",
                                                 help="GROUP=DIR: the original guard of a group (repeat; default: "
                                                      "the guards recorded in the model's recipe)."),
        input: Optional[Path] = typer.Option(None, "--input", "-i", help=".txt (one text a line), .jsonl (field "
                                             "`text`), or - for stdin. Unlabelled: e.g. a sample of your traffic."),
        text: Optional[List[str]] = typer.Option(None, "--text", "-t", help="A text (repeat for more)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write agreement.json and agreement.md here."),
        show: int = typer.Option(5, "--show", min=0, help="Disagreements to list per group (the guard's surest first)."),
        sure: float = typer.Option(0.9, "--sure", min=0.0, max=1.0,
                                   help="Also report agreement where the guard's top probability is at least this."),
        batch_size: int = typer.Option(32, "--batch-size", min=1),
        by: Optional[str] = typer.Option(None, "--by", help="A field of the --input .jsonl rows (e.g. source): "
                                         "also report agreement per value of it."),
        threshold: float = typer.Option(0.5, "--threshold", help="Multi-label groups: a label counts as given at a "
                                        "score of at least this (guard and merged model alike)."),
        label_threshold: Optional[List[str]] = typer.Option(
            None, "--label-threshold", help=LABEL_THRESHOLD_HELP),
    ) -> None:
        """How often the merged model gives each original guard's label on unlabelled texts, and where not."""
        from hm3.io import group_pairs, read_text_rows, texts_from, write_text_atomic

        keys = None
        if by:  # one read of the rows: each text with its field
            if input is None or str(input) == "-" or text:
                raise HM3Error(f"--by {by} reads a field of .jsonl rows; give the texts with --input FILE.jsonl")
            rows = read_text_rows(input, labelled=True, field=by, why=f"--by {by}")
            texts, keys = [t for t, _ in rows], [str(k) for _, k in rows]
        else:
            texts = texts_from(input, text)
        guards = ({g: Path(p) for g, p in group_pairs(guard, "--guard", "DIR", "jailbreak=./jailbreak-guard").items()}
                  if guard else None)
        from hm3.model import thresholds_option

        report = agreement(model, texts, guards, batch_size=batch_size, progress=True, sure=sure, by=keys, by_field=by,
                           threshold=threshold, thresholds=thresholds_option(label_threshold))
        md = report.markdown(show)
        typer.echo(md)
        if out is not None:
            write_text_atomic(out / "agreement.json", json.dumps(report.to_json(), indent=2) + "\n")
            write_text_atomic(out / "agreement.md", md + "\n")
            typer.echo(f"\nwrote {out / 'agreement.md'} and {out / 'agreement.json'}", err=True)
