"""Post-merge head re-fit: each group's output rows re-fitted on the merged body's features.

Why: merging moves the shared body, so the features a guard's head was trained on are gone; on a
small base the merged heads then fall apart (a group collapses to one class) even when the task
vectors hardly conflict. Re-fitting only the output rows of a group on the *merged* body's
features — a convex problem over a few thousand numbers — restores them in seconds.

For each group, on token windows of its texts (the same windows inference uses; a text's windows
share its weight, so a long text counts once):

* ``labelled`` — multinomial logistic regression (scikit-learn, lbfgs) on rows
  ``{"text", "label"}``;
* ``distill`` — label-free: the same model fitted to the original guard's softmax probabilities
  (soft targets, temperature ``T``) on unlabelled text of the group's domain, by torch L-BFGS in
  float64. The objective is scikit-learn's, ``C·Σ_n CE(p_n, softmax(W x_n + b)) + ½‖W‖²``, so ``C``
  means the same in both modes.

One merged model answers every group on every text, so a distilled head can also be fitted to its
teacher on other domains: ``cross_texts`` texts of each other re-fitted group's data, and as many of
each ``extra_texts`` file (unlabelled traffic no group of the merge owns — the texts where the heads
would otherwise disagree with their guards unseen).

A multi-label group (a sigmoid per label, ``hm3.labels``; its data rows' ``label`` is a list) has each
row fitted as a two-class problem (a softmax over ``[0, z]`` is ``σ(z)``: the same objectives and
solvers — scikit-learn's binary logistic regression on the label's yes/no, or the soft-target fit to
the guard's sigmoid for it), all with the group's one ``C``; the scores compare decisions at 0.5
label by label (macro F1 over labels; distilled: also the share of texts given the guard's whole
label set and the binary KL summed over labels; labelled: the binary log loss).

``C`` is picked from a grid on validation data — the group's ``validation`` file, or a seeded
(stratified) 20 % hold-out of its training texts — by macro F1 (labelled: against the labels;
distill: against the teacher's decisions), ties broken by log loss / KL divergence from the teacher;
then the rows are fitted on all training texts.
Test data is never read. Features are standardised for the fit and the scaling is folded back into
the written rows. Only the group's rows of the output weight and bias change; the body and every
other group's rows stay byte-identical, and the result is still one ordinary checkpoint.

The features (the output layer's input: BERT pooler output, DistilBERT after ``pre_classifier`` +
ReLU, RoBERTa after ``classifier.dense`` + tanh) are computed once per merged body and text set and
cached on disk (``hm3.merging.stats``), as are the teachers' logits.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Sequence

from hm3.errors import FORCE_HELP, HM3Error
from hm3.labels import label_index

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from hm3.labels import LabelSpace
    from hm3.merging.engine import Prepared

log = logging.getLogger(__name__)

#: inverse L2 strengths tried when ``c`` is ``auto`` (on standardised features)
C_GRID: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
HOLDOUT = 0.2  # share of the training texts used to pick C when there is no validation file
MAX_TEXTS = 500  # texts per group (a seeded sample) where the caller names no number for it


@dataclass(frozen=True)
class GroupRefit:
    """What to re-fit one group's rows on. ``teacher`` set: distill from it; else labelled."""

    group: str
    data: Path
    validation: Path | None = None
    teacher: Path | None = None

    @property
    def mode(self) -> str:
        return "labelled" if self.teacher is None else "distill"


@dataclass
class RefitReport:
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_length: int = 0
    truncate: bool = False  # each text's first window only
    features: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    texts: list[str] = field(default_factory=list, repr=False)  # distinct training texts of every group (not saved)
    labels: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)  # group -> {training text: label} (not saved)
    group_texts: dict[str, list[str]] = field(default_factory=dict, repr=False)  # group -> its fit's texts (not saved)
    precision: str = "float32"  # of the forward passes (features, teachers)

    def to_json(self) -> dict[str, Any]:
        return {"groups": self.groups, "max_length": self.max_length, "truncate": self.truncate, "features": self.features,
                "seconds": round(self.seconds, 1), "precision": self.precision}

    def markdown(self) -> str:
        lines = [
            "## Head re-fit",
            "",
            f"Each group's output rows were re-fitted on the merged body's features "
            + (f"(the first {self.max_length} tokens of each of {self.features.get('texts', 0)} texts"
               if self.truncate else f"({self.features.get('windows', 0)} windows of at most {self.max_length} tokens")
            + (f", forward passes in {self.precision}" if self.precision != "float32" else "")
            + f") in {self.seconds:.1f} s (hm3.refit). Validation data picked C; test data was not used.",
            "",
            "| group | mode | data | texts | validation | C | validation score | seconds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for g, r in self.groups.items():
            score = ", ".join(f"{k} {v:.4f}" for k, v in r["validation_score"].items())
            mode = r["mode"] + (f" from `{r['teacher']}` (T={r['temperature']:g})" if r["mode"] == "distill" else "")
            lines.append(f"| {g} | {mode} | `{r['data']}` | {r['texts']} | {r['validation']} ({r['validation_texts']}) "
                         f"| {r['c']:g} | {score} | {r['seconds']:.1f} |")
        return "\n".join(lines)


# -- fitting ---------------------------------------------------------------------------------------
def _standardise(x: "np.ndarray") -> tuple["np.ndarray", "np.ndarray"]:
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    sd[sd < 1e-8] = 1.0  # a constant feature: leave it unscaled (its weight is then ~0 anyway)
    return mu, sd


def _fold(coef: "np.ndarray", intercept: "np.ndarray", mu: "np.ndarray", sd: "np.ndarray"):
    """Rows for raw features from rows fitted on ``(x − mu) / sd``."""
    w = coef / sd
    return w, intercept - w @ mu


def _lr_hard(xs: "np.ndarray", y: "np.ndarray", n_labels: int, c: float, weight, init=None):
    """scikit-learn multinomial logistic regression on standardised features → (K, H), (K,) rows.

    Two labels: scikit-learn fits one vector ``w`` for ``P(1) = σ(w·x + b)``; the rows
    ``[−w/2, w/2]`` give exactly that probability under a softmax. ``init``: rows to warm-start from."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=c, max_iter=1000, tol=1e-5, warm_start=init is not None)
    if init is not None:
        coef, intercept = init
        if n_labels == 2:
            coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
        lr.coef_, lr.intercept_ = coef.copy(), intercept.copy()
    lr.fit(xs, y, sample_weight=weight)
    if list(lr.classes_) != list(range(n_labels)):
        raise HM3Error(f"labels {sorted(set(range(n_labels)) - set(lr.classes_))} have no training texts")
    coef, intercept = lr.coef_, lr.intercept_
    if n_labels == 2:
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    return coef, intercept


def _lr_soft(xs: "np.ndarray", p: "np.ndarray", c: float, weight, init=None):
    """Soft-target logistic regression on standardised features by L-BFGS in float64.

    Minimises ``C·Σ_n w_n CE(p_n, softmax(W x_n + b)) + ½‖W‖²`` (weights ``w_n`` summing to n):
    scikit-learn's objective with soft labels. ``init``: rows to warm-start from."""
    import numpy as np
    import torch

    x = torch.from_numpy(xs).double()
    target = torch.from_numpy(np.asarray(p, dtype=np.float64))
    n, k = target.shape
    sw = torch.ones(n, dtype=torch.float64) if weight is None else torch.from_numpy(np.asarray(weight, dtype=np.float64))
    sw = sw * (n / sw.sum())
    if init is None:
        w = torch.zeros(k, x.shape[1], dtype=torch.float64)
        b = torch.zeros(k, dtype=torch.float64)
    else:
        w, b = (torch.from_numpy(np.array(t, dtype=np.float64)) for t in init)
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-7, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(x @ w.T + b, dim=1)
        loss = (c * (sw * -(target * logp).sum(dim=1)).sum() + 0.5 * (w * w).sum()) / n  # same minimiser
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def fit_labelled(x: "np.ndarray", y: "np.ndarray", n_labels: int, c: float,
                 weight: "np.ndarray | None" = None) -> tuple["np.ndarray", "np.ndarray"]:
    """Multinomial logistic regression → rows ``(W (K, H), b (K,))`` for raw features ``x (n, H)``."""
    mu, sd = _standardise(x)
    return _fold(*_lr_hard((x - mu) / sd, y, n_labels, c, weight), mu, sd)


def fit_soft(x: "np.ndarray", p: "np.ndarray", c: float, weight: "np.ndarray | None" = None,
             temperature: float = 1.0) -> tuple["np.ndarray", "np.ndarray"]:
    """Rows ``(W, b)`` with ``softmax((W x + b) / T)`` fitted to ``p (n, K)``, the teacher's
    probabilities at temperature ``T`` (so at temperature 1 the rows reproduce the teacher's logits)."""
    mu, sd = _standardise(x)
    coef, intercept = _lr_soft((x - mu) / sd, p, c, weight)
    return _fold(temperature * coef, temperature * intercept, mu, sd)


def _sigmoid(z: "np.ndarray") -> "np.ndarray":
    import numpy as np

    return 0.5 * (1 + np.tanh(0.5 * z))  # no overflow for large |z|


def _per_label(solve, xs: "np.ndarray", targets: "np.ndarray", c: float, weight, init=None):
    """A multi-label group's rows ``(W (k, H), b (k,))``, each the sigmoid logit of label ``j`` fitted by
    ``solve`` as the two-class problem over ``[0, z_j]`` (a softmax over it is ``σ(z_j)``):
    ``solve(xs, targets_j, c, weight, init_j)`` → two rows, whose difference is label ``j``'s row.
    ``targets``: ``(n, k)`` 0/1 labels (``_lr_hard``'s classes) or sigmoid probabilities (``_lr_soft``'s
    two-class distributions are built from them)."""
    import numpy as np

    rows, biases = [], []
    for j in range(targets.shape[1]):
        start = None if init is None else (np.stack([np.zeros_like(init[0][j]), init[0][j]]),
                                           np.array([0.0, init[1][j]]))
        w, b = solve(xs, targets[:, j], c, weight, start)
        rows.append(w[1] - w[0])
        biases.append(b[1] - b[0])
    return np.stack(rows), np.array(biases)


def _lr_hard_sigmoid(xs: "np.ndarray", y: "np.ndarray", c: float, weight, init=None):
    """``_lr_hard`` for a multi-label group: each label's row a binary logistic regression on its 0/1
    column of ``y (n, k)``."""
    return _per_label(lambda x, yj, cc, w, i: _lr_hard(x, yj, 2, cc, w, i), xs, y, c, weight, init)


def _lr_soft_sigmoid(xs: "np.ndarray", p: "np.ndarray", c: float, weight, init=None):
    """``_lr_soft`` for a multi-label group: each label's row fitted to its sigmoid targets ``p[:, j]``."""
    import numpy as np

    def solve(x, pj, cc, w, i):
        return _lr_soft(x, np.stack([1 - pj, pj], axis=1), cc, w, i)

    return _per_label(solve, xs, p, c, weight, init)


def _softmax(z: "np.ndarray") -> "np.ndarray":
    import numpy as np

    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _per_text(probs: "np.ndarray", owner: "np.ndarray", n: int) -> "np.ndarray":
    """Mean of the windows' probabilities per text (inference's ``mean`` aggregation)."""
    import numpy as np

    out = np.zeros((n, probs.shape[1]))
    np.add.at(out, owner, probs)
    return out / np.bincount(owner, minlength=n)[:, None]


# -- data ------------------------------------------------------------------------------------------
@dataclass
class _Split:
    texts: list[str]
    labels: list[int] | None  # labelled mode
    source: str


def _label_index(group, raw, where: str):
    """A data row's label as its index in ``group`` (a name, ``group/name`` or an index); for a
    multi-label group, a list of them as a 0/1 tuple over the group's labels."""
    if group is not None and group.multi_label:
        if not isinstance(raw, list):
            raise HM3Error(f"{where}: group {group.name!r} is multi-label: a row's label is a list of its labels "
                           f"([] for none), got {raw!r}")
        on = {label_index(group.name, group.labels, x, where) for x in raw}
        return tuple(int(i in on) for i in range(group.size))
    if isinstance(raw, list):
        raise HM3Error(f"{where}: group {group.name!r} is single-label: a row's label is one label, got {raw!r}")
    return label_index(group.name, group.labels, raw, where)


def _extra_counts(options: Sequence[str], cross_texts: int) -> dict[Path, int]:
    """``--extra-texts FILE[=N]`` values as ``{file: texts}``: N, or ``--cross-texts`` where none is given."""
    counts = {}
    for opt in options:
        name, sep, n = opt.rpartition("=")
        if not (sep and n.isdigit()):
            name, n = opt, ""
        if n and int(n) < 1:
            raise HM3Error(f"--extra-texts {opt}: N must be a positive number of texts")
        if not n and not cross_texts:
            raise HM3Error(f"--extra-texts {opt}: how many of its texts? Give FILE=N or --cross-texts N")
        counts[Path(name)] = int(n) if n else cross_texts
    return counts


def _read(path: Path, group, labelled: bool, max_texts: int, seed: int, tag: str,
          why: str = "a labelled re-fit") -> _Split:
    from hm3.io import read_text_rows as read_rows
    from hm3.merging.stats import sample

    rows = sample(read_rows(path, labelled=labelled, why=why), max_texts, seed, tag)
    labels = [_label_index(group, lab, str(path)) for _, lab in rows] if labelled else None
    return _Split([t for t, _ in rows], labels, str(path))


def _holdout(split: _Split, seed: int, tag: str) -> "np.ndarray":
    """A seeded hold-out (stratified by label when labelled) of ``HOLDOUT`` of the texts: a mask."""
    import numpy as np

    rng = random.Random(f"hm3:{seed}:{tag}")
    n = len(split.texts)
    strata: dict[int, list[int]] = {}
    for i in range(n):
        strata.setdefault(split.labels[i] if split.labels else 0, []).append(i)
    held = np.zeros(n, dtype=bool)
    for idx in strata.values():
        k = int(round(HOLDOUT * len(idx))) if len(idx) > 1 else 0
        held[rng.sample(idx, k)] = True
    if not held.any() or held.all():
        raise HM3Error(f"{split.source}: too few texts ({n}) to hold some out for choosing C; "
                       "give a validation file or a fixed c")
    return held


# -- the re-fit ------------------------------------------------------------------------------------
def refit_heads(
    model: "torch.nn.Module",
    tokenizer,
    space: "LabelSpace",
    specs: Sequence[GroupRefit],
    *,
    c: "float | str" = "auto",
    max_texts: "int | Mapping[str, int]" = MAX_TEXTS,
    temperature: float = 1.0,
    max_length: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    cache: bool = True,
    progress: bool = False,
    cross_texts: int = 0,
    extra_texts: "Sequence[str | Path] | Mapping[str | Path, int]" = (),
    label_weight: float = 0.0,
    precision: str = "float32",
    teacher_memo: "TeacherLogits | None" = None,
    truncate: bool = False,
    body_labels: bool = False,
) -> RefitReport:
    """Re-fit the output rows of each spec's group in ``model`` (in place) and report what was done.

    ``cross_texts``: a distilled group also fits its teacher's probabilities on this many texts of every
    other group's data (the first of their seeded samples), since the merged model answers every group
    on every text: a jailbreak head must call an SMS or a review benign as the jailbreak guard does.
    ``extra_texts``: unlabelled files of other domains (no group of the merge has them: general traffic),
    of which every distilled group fits its teacher on ``cross_texts`` texts each, too; a mapping
    ``{file: n}`` names a number per file instead (more of the traffic a head errs on).
    ``label_weight``: a distilled group whose data has labels fits ``(1 − a)·teacher + a·one-hot(label)``
    on its own texts (Hinton et al.'s soft + hard targets); texts without labels keep the teacher's.
    ``max_texts``: texts per group, a seeded sample of its data (and of its validation file); a mapping
    names a number per group (``MAX_TEXTS`` for groups it does not name).
    ``body_labels``: also record, per group, the labels its data file gives its training texts
    (``report.labels``, for body distillation's ``label_weight``); the fits do not use them.
    ``precision`` ``bfloat16``: the merged body's features and the teachers' logits come from forward
    passes under ``torch.autocast`` (several times faster on CPUs with AMX / AVX512-BF16); the fits
    are fp64 as always and the saved weights fp32. ``auto``: bfloat16 where the CPU has bf16 matrix
    instructions, else float32 (the report says which ran).
    ``teacher_memo``: the guards' logits already computed in this merge (``TeacherLogits``; filled in).
    ``truncate``: fit on each text's first ``max_length`` tokens (one window per text: the inputs body
    distillation trains on) instead of on all its windows as inference reads it.
    """
    import numpy as np
    import torch

    from hm3.merging import stats as S
    from hm3.model import GroupwiseClassifier

    t0 = time.perf_counter()
    teacher_memo = TeacherLogits() if teacher_memo is None else teacher_memo
    if c != "auto" and not (isinstance(c, (int, float)) and c > 0):
        raise HM3Error(f"c must be a positive number or 'auto', got {c!r}")
    from hm3.fastpaths import resolve_precision

    precision = resolve_precision(precision, model.config.model_type)
    seen = set()
    for s in specs:
        space[s.group]  # unknown group: an error naming the known ones
        if s.group in seen:
            raise HM3Error(f"group {s.group!r} is listed twice for the re-fit")
        seen.add(s.group)
        if s.teacher is not None:
            check_teacher_kind(Path(s.teacher), space[s.group])
    model = model.float().eval()
    clf = GroupwiseClassifier(model, tokenizer, space, max_length=max_length)
    report = RefitReport(max_length=clf.max_length, precision=precision, truncate=truncate)
    out = S.out_module(model)

    unknown = sorted(set(max_texts) - {s.group for s in specs}) if isinstance(max_texts, Mapping) else []
    if unknown:
        raise HM3Error(f"max_texts names groups {unknown} that are not re-fitted (re-fitted: "
                       f"{', '.join(s.group for s in specs)})")
    # Texts per group: training texts, and validation texts (a file) or a hold-out mask over them.
    reads = []
    for s in specs:
        g = space[s.group]
        labelled = s.teacher is None
        why = ("a labelled re-fit" if labelled else
               f"label_weight {label_weight:g} (it mixes each text's label into the targets; or set it to 0)")
        n = max_texts.get(g.name, MAX_TEXTS) if isinstance(max_texts, Mapping) else max_texts
        train = _read(s.data, g, labelled or label_weight > 0, n, seed, f"refit/{g.name}", why)
        val = _read(s.validation, g, labelled, n, seed, f"refit-val/{g.name}") if s.validation else None
        held = _holdout(train, seed, f"refit-holdout/{g.name}") if val is None and c == "auto" else None
        if labelled:
            fit_labels = [y for i, y in enumerate(train.labels) if held is None or not held[i]]
            if g.multi_label:  # each label is a yes/no fit: it needs texts with it and without it
                counts = np.array(fit_labels).reshape(len(fit_labels), g.size).sum(0)
                one_sided = [g.labels[i] for i in range(g.size) if counts[i] in (0, len(fit_labels))]
                if one_sided:
                    raise HM3Error(f"{s.data}: multi-label group {g.name!r}: labels {one_sided} are on every training "
                                   "text or on none; each label needs texts with it and texts without it")
            else:
                missing = sorted(set(range(g.size)) - set(fit_labels))
                if missing:
                    raise HM3Error(f"{s.data}: group {g.name!r} has no training texts for labels "
                                   f"{[g.labels[i] for i in missing]}; every label needs some")
        reads.append((s, g, train, val, held))
    if cross_texts < 0:
        raise HM3Error(f"cross_texts must be >= 0, got {cross_texts}")
    distilled = any(s.teacher is not None for s, *_ in reads)
    if cross_texts and not distilled:
        raise HM3Error("cross_texts needs distill mode: other groups' texts have no labels for a group, "
                       "only its teacher's probabilities")
    if not 0 <= label_weight <= 1:
        raise HM3Error(f"label_weight must be in [0, 1], got {label_weight}")
    if label_weight and not distilled:
        raise HM3Error("label_weight needs distill mode: it mixes labels into the teacher's probabilities")
    if isinstance(extra_texts, Mapping):
        extra_counts = {Path(f): n for f, n in extra_texts.items()}
        bad = {str(f): n for f, n in extra_counts.items() if not isinstance(n, int) or isinstance(n, bool) or n < 1}
        if bad:
            raise HM3Error(f"extra_texts: each file's count must be a positive integer, got {bad}")
    elif extra_texts and not cross_texts:
        raise HM3Error("extra_texts needs cross_texts > 0: how many texts of each file every distilled head fits "
                       "(or give a count per file: {file: n})")
    else:
        extra_counts = {Path(f): cross_texts for f in extra_texts}
    if extra_counts and not distilled:
        raise HM3Error("extra_texts needs distill mode: unlabelled files have no labels, only the teachers' "
                       "probabilities")
    # (texts, how many of them a distilled group fits): other groups' training texts, then the extra files
    extras = [(_read(f, None, False, n, seed, f"refit-extra/{f.name}").texts, n) for f, n in extra_counts.items()]
    # (spec, group, train, val, held, texts of other groups in train): a distilled group's train is its
    # own texts, then up to cross_texts of each other group's (its hold-out drawn over all of them).
    plan = []
    for s, g, train, val, held in reads:
        extra = 0
        if (cross_texts or extras) and s.teacher is not None:
            own = set(train.texts)
            others = [(otrain.texts, cross_texts) for _, og, otrain, *_ in reads if og.name != g.name] + extras
            more = list(dict.fromkeys(t for texts, n in others for t in [t for t in texts if t not in own][:n]))
            labels = None if train.labels is None else train.labels + [None] * len(more)
            train, extra = _Split(train.texts + more, labels, train.source), len(more)
            if held is not None:
                held = _holdout(train, seed, f"refit-holdout/{g.name}")
        plan.append((s, g, train, val, held, extra))
    report.group_texts = {g.name: list(train.texts) for _, g, train, *_ in plan}
    report.texts = list(dict.fromkeys(t for texts in report.group_texts.values() for t in texts))
    if body_labels:  # each group's own training texts that its data file labels (for the body step)
        from hm3.io import read_text_rows

        for s, g, train, *_ in plan:
            given = {t: lab for t, lab in read_text_rows(s.data) if lab is not None}
            report.labels[g.name] = {t: _label_index(g, given[t], str(s.data)) for t in train.texts if t in given}

    # Features of every distinct text, in one pass over the merged body (cached per body and window set).
    index: dict[str, int] = {}
    parts: dict[tuple[str, str], "np.ndarray"] = {}  # (group, part) -> distinct-text ids in part order
    for s, g, train, val, held, _ in plan:
        for name, part in (("train", train), ("val", val)):
            if part is not None:
                parts[(g.name, name)] = np.array([index.setdefault(t, len(index)) for t in part.texts], dtype=np.int64)
    all_texts = list(index)
    if truncate:  # each text's first window only, as the body step sees it
        wins = S.encode(tokenizer, all_texts, clf.max_length)
        owner = list(range(len(all_texts)))
    else:
        wins, owner = clf.windows(all_texts)
    owner = np.asarray(owner, dtype=np.int64)
    by_text = np.split(np.argsort(owner, kind="stable"), np.cumsum(np.bincount(owner, minlength=len(all_texts)))[:-1])
    tf = time.perf_counter()
    skip = [n for n in model.state_dict() if n.startswith(_out_name(model))]
    key = S.cache_key(kind="features", body=S.state_digest(model.state_dict(), skip=skip),
                      windows=S.texts_digest([" ".join(map(str, w)) for w in wins]), batch_size=batch_size,
                      **_precision_key(precision))

    def compute():
        feats, _ = S.window_outputs(model, wins, batch_size, tokenizer.pad_token_id or 0, progress, precision)
        return {"features": feats}, {"windows": len(wins)}

    tensors, _, hit = S.cached("features", key, compute, cache)
    feats_all = tensors["features"].double().numpy()
    report.features = {"windows": len(wins), "texts": len(all_texts), "cached": hit,
                       "seconds": round(time.perf_counter() - tf, 1)}

    def windows_of(group: str, part: str) -> tuple["np.ndarray", "np.ndarray"]:
        """Window indices of a part's texts and, per window, the text's index within the part."""
        ids = parts[(group, part)]
        sel = np.concatenate([by_text[i] for i in ids])
        return sel, np.repeat(np.arange(len(ids)), [len(by_text[i]) for i in ids])

    # Teachers' probabilities on the same windows of their own group's texts (cached per teacher
    # and window set); rows of other groups' windows stay NaN and are never read.
    teachers, teacher_seconds = {}, {}
    for s, g, train, val, held, _ in plan:
        if s.teacher is not None:
            tt = time.perf_counter()
            own = np.unique(np.concatenate([windows_of(g.name, part)[0] for part in ("train", "val") if (g.name, part) in parts]))
            probs = np.full((len(wins), g.size), np.nan)
            probs[own] = _teacher_probs(teacher_memo, s.teacher, tokenizer, [wins[i] for i in own], g, temperature,
                                        batch_size, cache, precision)
            teachers[g.name] = probs
            teacher_seconds[g.name] = time.perf_counter() - tt

    with S.single_thread():  # small fits: thread-pool hand-offs cost more than they save
        for s, g, train, val, held, extra in plan:
            tg = time.perf_counter() - teacher_seconds.get(g.name, 0.0)
            teacher_probs = teachers.get(g.name)

            tr_sel, tr_txt = windows_of(g.name, "train")
            mu, sd = _standardise(feats_all[tr_sel])  # one scaling for every fit of the group: warm starts apply
            targets = teacher_probs
            if teacher_probs is not None and label_weight and train.labels is not None:
                # each labelled text's one-hot (multi-label: its 0/1 row), per training window
                onehot = np.full((len(train.labels), g.size), np.nan)
                for i, y in enumerate(train.labels):
                    if y is not None:
                        onehot[i] = y if g.multi_label else np.eye(g.size)[y]
                per_window = onehot[tr_txt]
                known = ~np.isnan(per_window[:, 0])
                at = tr_sel[known]
                targets = teacher_probs.copy()
                targets[at] = (1 - label_weight) * targets[at] + label_weight * per_window[known]

            def fit(sel, txt, labels, cc, init=None):
                """Standardised rows fitted on windows ``sel`` whose texts are ``txt`` (0..n-1, labels[txt])."""
                wts = 1.0 / np.bincount(txt)[txt]  # each text weighs 1, however many windows it has
                xs = (feats_all[sel] - mu) / sd
                if teacher_probs is None:
                    if g.multi_label:
                        return _lr_hard_sigmoid(xs, np.asarray(labels).reshape(len(labels), g.size)[txt], cc, wts, init)
                    return _lr_hard(xs, np.asarray(labels)[txt], g.size, cc, wts, init)
                if g.multi_label:
                    return _lr_soft_sigmoid(xs, targets[sel], cc, wts, init)
                return _lr_soft(xs, targets[sel], cc, wts, init)

            def raw(rows):
                """Rows for raw features at temperature 1."""
                t = 1.0 if teacher_probs is None else temperature
                return _fold(t * rows[0], t * rows[1], mu, sd)

            def score(wb, sel, txt, labels) -> dict[str, float]:
                w, b = wb
                n = int(txt.max()) + 1
                if g.multi_label:
                    probs = _per_text(_sigmoid(feats_all[sel] @ w.T + b), txt, n)
                    if teacher_probs is None:
                        return _score_sigmoid_labels(probs, np.asarray(labels).reshape(n, g.size))
                    return _score_sigmoid(probs, _per_text(_teacher_at_1(teacher_probs[sel], temperature, True), txt, n))
                probs = _per_text(_softmax(feats_all[sel] @ w.T + b), txt, n)
                if teacher_probs is None:
                    from sklearn.metrics import f1_score, log_loss

                    y = np.asarray(labels)
                    return {"macro_f1": float(f1_score(y, probs.argmax(1), average="macro")),
                            "log_loss": float(log_loss(y, probs, labels=list(range(g.size))))}
                from sklearn.metrics import f1_score

                t = _per_text(_teacher_at_1(teacher_probs[sel], temperature), txt, n)
                kl = (t * (np.log(np.clip(t, 1e-12, None)) - np.log(np.clip(probs, 1e-12, None)))).sum(1).mean()
                # The teacher's decisions are the pseudo-labels: what a guard is used for is its argmax.
                return {"macro_f1_vs_teacher": float(f1_score(t.argmax(1), probs.argmax(1), average="macro")),
                        "agreement": float((t.argmax(1) == probs.argmax(1)).mean()), "kl": float(kl)}

            def rank(sc: dict[str, float]):
                """Best decisions first (macro F1 on labels, or on the teacher's decisions), then
                the closest probabilities."""
                if "macro_f1" in sc:
                    return (sc["macro_f1"], -sc["log_loss"])
                return (sc["macro_f1_vs_teacher"], -sc["kl"])

            grid: dict[float, dict[str, float]] = {}
            fitted: dict[float, tuple] = {}
            if val is not None or held is not None:
                if val is not None:
                    f_sel, f_txt, f_lab = tr_sel, tr_txt, train.labels
                    v_sel, v_txt = windows_of(g.name, "val")
                    v_lab = val.labels
                else:  # hold-out: split the training windows by their text's side of the mask
                    on = held[tr_txt]
                    f_sel, f_txt, f_lab = tr_sel[~on], *_renumber(tr_txt[~on], train.labels)
                    v_sel, v_txt, v_lab = tr_sel[on], *_renumber(tr_txt[on], train.labels)
                init = None
                for cc in C_GRID if c == "auto" else (float(c),):  # ascending C, each warm-started
                    fitted[cc] = init = fit(f_sel, f_txt, f_lab, cc, init)
                    grid[cc] = score(raw(init), v_sel, v_txt, v_lab)
            best = max(grid, key=lambda cc: rank(grid[cc])) if c == "auto" else float(c)
            w, b = raw(fit(tr_sel, tr_txt, train.labels, best, fitted.get(best)))
            with torch.no_grad():
                out.weight[g.rows] = torch.from_numpy(w).to(out.weight.dtype)
                out.bias[g.rows] = torch.from_numpy(b).to(out.bias.dtype)
            validation = (str(s.validation) if val is not None else
                          f"{HOLDOUT:.0%} hold-out of the data" if held is not None else "none (fixed C)")
            report.groups[g.name] = {
                "mode": s.mode,
                "data": str(s.data),
                "texts": len(train.texts),
                **({"other_groups_texts": extra} if (cross_texts or extra_counts) and s.teacher is not None else {}),
                **({"extra_texts": {str(f): n for f, n in extra_counts.items()}}
                   if extra_counts and s.teacher is not None else {}),
                "windows": int(len(tr_sel)),
                "validation": validation,
                "validation_texts": len(val.texts) if val is not None else int(held.sum()) if held is not None else 0,
                "c": best,
                "validation_score": grid.get(best, {}),
                "grid": {f"{k:g}": v for k, v in grid.items()},
                **({"teacher": str(s.teacher), "temperature": temperature} if s.teacher is not None else {}),
                **({"label_weight": label_weight} if label_weight and s.teacher is not None else {}),
                "seconds": round(time.perf_counter() - tg, 1),
            }
            log.info("re-fit %s (%s): %d texts, C=%g, validation %s, %.1fs", g.name, s.mode, len(train.texts), best,
                     report.groups[g.name]["validation_score"], report.groups[g.name]["seconds"])
    report.seconds = time.perf_counter() - t0
    return report


def _score_sigmoid(probs: "np.ndarray", t: "np.ndarray") -> dict[str, float]:
    """A multi-label group's fit against its teacher, per text: macro F1 over labels of the decisions
    at 0.5 (the labels either side decides), the share of texts given the teacher's whole label set,
    and the binary KL divergence summed over labels."""
    import numpy as np

    from hm3.evaluate import multi_label_macro_f1

    yt, yp = (t >= 0.5).astype(int), (probs >= 0.5).astype(int)
    f1 = multi_label_macro_f1(yt, yp, empty=1.0)
    t, q = np.clip(t, 1e-12, 1 - 1e-12), np.clip(probs, 1e-12, 1 - 1e-12)
    kl = (t * np.log(t / q) + (1 - t) * np.log((1 - t) / (1 - q))).sum(1).mean()
    return {"macro_f1_vs_teacher": f1, "agreement": float((yt == yp).all(1).mean()), "kl": float(kl)}


def _score_sigmoid_labels(probs: "np.ndarray", y: "np.ndarray") -> dict[str, float]:
    """A multi-label group's labelled fit, per text: macro F1 over labels of the decisions at 0.5 (the
    labels expected or predicted), and the binary log loss averaged over labels."""
    import numpy as np

    from hm3.evaluate import multi_label_macro_f1

    yp = (probs >= 0.5).astype(int)
    f1 = multi_label_macro_f1(y, yp, empty=1.0)
    q = np.clip(probs, 1e-12, 1 - 1e-12)
    return {"macro_f1": f1, "log_loss": float(-(y * np.log(q) + (1 - y) * np.log(1 - q)).mean())}


def _renumber(txt: "np.ndarray", labels: list[int] | None) -> tuple["np.ndarray", list[int] | None]:
    """Text indices of a subset made contiguous (0..k-1, sorted), and those texts' labels."""
    import numpy as np

    kept, inv = np.unique(txt, return_inverse=True)
    return inv.astype(np.int64), None if labels is None else [labels[i] for i in kept]


def _out_name(model) -> str:
    from hm3.heads import family_of

    return family_of(model.config.model_type, "model config").out[0].rsplit(".", 1)[0] + "."


def _teacher_at_1(p_t: "np.ndarray", temperature: float, sigmoid: bool = False) -> "np.ndarray":
    """Teacher probabilities at temperature 1 from those at ``temperature`` (``sigmoid``: a
    multi-label group's, each label on its own)."""
    import numpy as np

    if temperature == 1:
        return p_t
    if sigmoid:
        p = np.clip(p_t, 1e-300, 1 - 1e-16)
        return _sigmoid(np.log(p / (1 - p)) * temperature)
    return _softmax(np.log(np.clip(p_t, 1e-300, None)) * temperature)


def _precision_key(precision: str) -> dict[str, str]:
    """The cache-key part of a forward pass's precision: none for float32, so the keys of caches
    written before precisions existed still match."""
    return {} if precision == "float32" else {"precision": precision}


class TeacherLogits:
    """The original guards' logits by token window, kept for one merge.

    The head re-fit, the body step and the re-fit after it ask the same guards about overlapping
    windows: a text of at most 128 tokens is the same window for the body step (first 128 tokens)
    as for the re-fit (512-token windows). Each (guard, precision, window) runs once; the rest is
    looked up. Rows are fp32 logits; windows computed in another batch may differ from a fresh
    pass in the last bits of bf16 rounding, never more."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], dict[tuple[int, ...], "torch.Tensor"]] = {}
        self.computed = 0  # distinct windows run through a guard
        self.reused = 0  # distinct windows asked for again and looked up

    def __call__(self, teacher: Path, tokenizer, wins, batch_size: int, cache: bool,
                 precision: str = "float32") -> "torch.Tensor":
        """``teacher_logits`` of ``wins``, running only the windows this object has not seen."""
        import torch

        known = self._rows.setdefault((str(Path(teacher).resolve()), precision), {})
        keys = [tuple(w) for w in wins]
        distinct = dict.fromkeys(keys)
        todo = [k for k in distinct if k not in known]
        self.reused += len(distinct) - len(todo)
        if todo:
            known.update(zip(todo, teacher_logits(teacher, tokenizer, [list(k) for k in todo], batch_size, cache,
                                                  precision)))
            self.computed += len(todo)
        if not keys:
            return torch.empty(0, 0)
        return torch.stack([known[k] for k in keys])


def teacher_logits(teacher: Path, tokenizer, wins, batch_size: int, cache: bool,
                   precision: str = "float32") -> "torch.Tensor":
    """The original guard's logits ``(W, T)`` on token windows ``wins`` (cached per guard, windows
    and precision)."""
    from hm3.merging import stats as S

    key = S.cache_key(kind="teacher", model=S.model_digest(teacher),
                      windows=S.texts_digest([" ".join(map(str, w)) for w in wins]), batch_size=batch_size,
                      **_precision_key(precision))

    def compute():
        model, tok = S.load_classifier(teacher)
        if tok.get_vocab() != tokenizer.get_vocab():
            raise HM3Error(f"{teacher}: its tokenizer differs from the merged model's; distill from the original guard")
        _, logits = S.window_outputs(model, wins, batch_size, tokenizer.pad_token_id or 0, precision=precision)
        return {"logits": logits}, {}

    return S.cached("teacher", key, compute, cache)[0]["logits"]


def check_teacher_kind(teacher: Path, group) -> None:
    """An error if a single classifier ``teacher`` reads its outputs otherwise than ``group`` (one
    softmax, or a sigmoid per label): distilling one into the other would teach wrong targets."""
    import json

    try:
        cfg = json.loads((Path(teacher) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # loading the teacher reports what is wrong with it
    if not isinstance(cfg, dict) or (cfg.get("hm3") or {}).get("groups"):
        return  # a merged model as teacher: its group kinds are its own
    from hm3.labels import MULTI_LABEL, kind_name

    multi = cfg.get("problem_type") == MULTI_LABEL
    if multi != group.multi_label:
        raise HM3Error(f"{teacher}: is {kind_name(multi)} but group {group.name!r} is {kind_name(group.multi_label)}; "
                       "distill each group from the guard it was merged from")


def _teacher_probs(teachers: TeacherLogits, teacher: Path, tokenizer, wins, group, temperature: float,
                   batch_size: int, cache: bool, precision: str = "float32") -> "np.ndarray":
    """The original guard's softmax at ``temperature`` on the merged model's windows (a multi-label
    group: a sigmoid per label)."""
    logits = teachers(teacher, tokenizer, wins, batch_size, cache, precision).double().numpy()
    if logits.shape[1] != group.size:
        raise HM3Error(f"{teacher}: has {logits.shape[1]} labels but group {group.name!r} has {group.size}; "
                       "distill each group from its own original guard")
    return _sigmoid(logits / temperature) if group.multi_label else _softmax(logits / temperature)


# -- entry points ----------------------------------------------------------------------------------
def build_model(config, state: dict[str, "torch.Tensor"]) -> "torch.nn.Module":
    """A float32 sequence classifier with the given config and state dict (names as on disk)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(config).float().eval()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise HM3Error(f"the merged state lacks {missing[:3]}; cannot build the model for the re-fit")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k].to(v.dtype))
    return model


def specs_from_recipe(prep: "Prepared") -> list[GroupRefit]:
    """The recipe's ``refit:`` section as per-group specs (teachers default to the recipe's models)."""
    rc = prep.config.refit
    texts = prep.config.data.texts if prep.config.data is not None else {}
    for key, table in (("data", rc.data), ("validation", rc.validation), ("teachers", rc.teachers)):
        unknown = sorted(set(table) - set(prep.groups))
        if unknown:
            raise HM3Error(f"refit.{key}: unknown groups {unknown}; the recipe's groups are {', '.join(prep.groups)}")
    available = {g: rc.data.get(g) or (texts.get(g) if rc.mode == "distill" else None) for g in prep.groups}
    groups = rc.groups if rc.groups is not None else [g for g in prep.groups if available[g]]
    if not groups:
        raise HM3Error("refit: no group has data; set refit.data (group: file) "
                       + ("or data.texts" if rc.mode == "distill" else "with labelled .jsonl rows"))
    specs = []
    for g in groups:
        if g not in prep.groups:
            raise HM3Error(f"refit.groups: unknown group {g!r}; the recipe's groups are {', '.join(prep.groups)}")
        if not available[g]:
            raise HM3Error(f"refit: group {g!r} has no data; add `{g}: path/to/file.jsonl` under refit.data")
        teacher = None
        if rc.mode == "distill":
            teacher = Path(rc.teachers.get(g) or prep.models[prep.groups.index(g)].path)
        val = rc.validation.get(g)
        specs.append(GroupRefit(g, Path(available[g]), Path(val) if val else None, teacher))
    return specs


def refit_state(prep: "Prepared", state: dict[str, "torch.Tensor"], progress: bool = False):
    """The merge engine's hook: re-fit ``state``'s head rows as the recipe's ``refit:`` says.

    Returns ``(state, model-card markdown)``; records the report in ``prep.metadata["refit"]``."""
    from transformers import AutoTokenizer

    from hm3.fastpaths import has_amx, resolve_precision
    from hm3.merging.engine import merged_config, tokenizer_source

    specs = specs_from_recipe(prep)
    model = build_model(merged_config(prep), state)
    recipe = prep.config.refit
    precision = resolve_precision(recipe.precision, model.config.model_type)
    amx = has_amx()
    tier = recipe.tier(precision, amx)
    rc = recipe.for_precision(precision, amx)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source(prep)))
    cache = prep.config.data.cache if prep.config.data else True
    memo = TeacherLogits()  # the guards' logits, shared by the re-fits and the body step

    def heads():
        return refit_heads(model, tokenizer, prep.space, specs, c=rc.c, max_texts=rc.max_texts,
                           temperature=rc.temperature, max_length=rc.max_length, batch_size=rc.batch_size,
                           seed=prep.config.seed, cache=cache, progress=progress, cross_texts=rc.cross_texts,
                           extra_texts=rc.extra_texts, label_weight=rc.label_weight,
                           precision=precision, teacher_memo=memo, truncate=rc.truncate,
                           body_labels=rc.body is not None and rc.body.label_weight > 0)

    report = heads()
    card = report.markdown()
    meta = report.to_json()
    if tier is not None:  # refit.without_bf16 / without_amx applied: say so where the numbers are
        meta[tier] = getattr(recipe, tier)
        why = ("float32 (no bf16 matrix instructions here)" if tier == "without_bf16"
               else "bfloat16 without AMX tiles (AVX512-BF16 only: ~2x float32, not several times)")
        card += (f"\n\nThe passes ran in {why}, so the recipe's `refit.{tier}` settings replaced its own: "
                 f"`{json.dumps(getattr(recipe, tier))}`.")
    names = list(prep.models[0].family.out)  # only the head rows changed
    if rc.body is not None:
        from hm3.body_distill import distill_body

        teachers = {g: Path(rc.teachers.get(g) or m.path) for g, m in zip(prep.groups, prep.models)}
        options = rc.body.model_dump(exclude={"heads_after"})
        body = distill_body(model, tokenizer, prep.space, teachers, report.texts, **options, labels=report.labels,
                            group_texts=report.group_texts,
                            seed=prep.config.seed, cache=cache, progress=progress, precision=report.precision,
                            teacher_memo=memo)
        meta["body"] = body.to_json()
        card += "\n\n" + body.markdown()
        names = list(state)
        if rc.body.heads_after:  # the heads once more, on the trained body (teachers' logits from the cache)
            again = heads()
            meta["heads_after"] = again.to_json()
            card += "\n\n" + again.markdown().replace("## Head re-fit", "## Head re-fit after the body", 1)
    trained = model.state_dict()
    out = dict(state)
    for name in names:
        if name in trained:
            out[name] = trained[name].detach().to(state[name].dtype).clone()
    prep.metadata["refit"] = meta
    return out, card


def _body_options(body: "dict[str, Any]") -> "dict[str, Any]":
    """``refit_dir``'s body options checked as a recipe's ``refit.body`` is (``BodyConfig``), as
    keyword arguments of ``distill_body``. ``heads_after`` belongs to recipes (``hm3 merge``)."""
    from pydantic import ValidationError

    from hm3.config import BodyConfig, _format_validation

    try:
        cfg = BodyConfig.model_validate(body)
    except ValidationError as e:
        raise HM3Error(_format_validation(e, "body distillation")) from None
    if cfg.heads_after:
        raise HM3Error("body distillation: heads_after re-fits the heads after the body inside a recipe "
                       "(refit.body.heads_after in `hm3 merge`); here, run `hm3 refit` again on the output")
    return cfg.model_dump(exclude={"heads_after"})


def refit_dir(
    model_dir: "str | Path",
    specs: Sequence[GroupRefit],
    out: "str | Path",
    *,
    force: bool = False,
    body: "dict[str, Any] | None" = None,
    **kw,
) -> RefitReport:
    """Re-fit heads of a saved model (merged, or a single classifier) into a new directory ``out``;
    with ``body`` (hm3.body_distill.distill_body's options), then train the body towards the specs'
    teachers on the same texts (every group needs a teacher)."""
    import json

    from hm3.io import AtomicDir, prepare_output
    from hm3.merging.engine import write_model
    from hm3.model import load

    out = Path(out)
    if body is not None:  # the recipe's checks, before the output folder exists or any model loads
        body = _body_options(body)
    prepare_output(out, force)
    clf = load(model_dir, max_length=kw.pop("max_length", None))
    if body is not None:  # before any work: the body step needs every group's guard
        missing = [g for g in clf.space.names if g not in {s.group for s in specs if s.teacher is not None}]
        if missing:
            raise HM3Error(f"body distillation needs an original guard for every group; missing {missing}: "
                           "add --distill-from GROUP=GUARD_DIR (and its --data) for each")
    memo = TeacherLogits()
    report = refit_heads(clf.model, clf.tokenizer, clf.space, specs, max_length=clf.max_length, teacher_memo=memo,
                         body_labels=bool(body and body.get("label_weight")), **kw)
    done = report.to_json()
    text = report.markdown()
    if body is not None:
        from hm3.body_distill import distill_body

        teachers = {s.group: s.teacher for s in specs if s.teacher is not None}
        b = distill_body(clf.model, clf.tokenizer, clf.space, teachers, report.texts, **body, labels=report.labels,
                         group_texts=report.group_texts,
                         seed=kw.get("seed", 0), cache=kw.get("cache", True), progress=kw.get("progress", False),
                         precision=report.precision, teacher_memo=memo)
        done["body"] = b.to_json()
        text += "\n\n" + b.markdown()
        report.seconds += b.seconds
    config = clf.model.config
    meta = dict(getattr(config, "hm3", None) or {"format": 1, "groups": clf.space.to_json()})
    meta["refit"] = done
    config.hm3 = meta
    readme = Path(model_dir) / "README.md"
    card = (readme.read_text(encoding="utf-8").rstrip() + "\n\n" if readme.is_file() else "") + text + "\n"
    state = {k: v.detach().contiguous() for k, v in clf.model.state_dict().items()}
    with AtomicDir(out, force) as tmp:
        write_model(tmp, state, config, Path(model_dir), card)
    log.info("re-fitted %s into %s in %.1fs: %s", model_dir, out, report.seconds, json.dumps(
        {g: r["c"] for g, r in report.groups.items()}))
    return report


def register(app, user_errors) -> None:
    import typer

    @app.command()
    @user_errors
    def refit(
        model: Path = typer.Argument(..., help="Merged model (or single classifier) directory."),
        data: list[str] = typer.Option(..., "--data", help="GROUP=FILE: .jsonl rows {text, label} (labelled), "
                                       "or texts to distill on (.jsonl text / .txt) with --distill-from. Repeat per group."),
        distill_from: Optional[List[str]] = typer.Option(None, "--distill-from",
                                                   help="GROUP=GUARD_DIR: fit GROUP's rows to this original guard's "
                                                        "probabilities on its --data texts (no labels needed)."),
        validation: Optional[List[str]] = typer.Option(None, "--validation",
                                                 help="GROUP=FILE for choosing C (default: a 20% hold-out of --data)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output model directory."),
        c: str = typer.Option("auto", "--c", help="Inverse L2 strength, or 'auto' (picked on validation)."),
        max_texts: int = typer.Option(MAX_TEXTS, "--max-texts", min=1, help="Texts per group (a seeded sample)."),
        temperature: float = typer.Option(1.0, "--temperature", min=1e-3, help="Distillation temperature."),
        max_length: Optional[int] = typer.Option(None, "--max-length", min=16, help="Tokens per window (default: the model's)."),
        truncate: bool = typer.Option(False, "--truncate", help="Fit on each text's first --max-length tokens only, "
                                      "not on all its windows (with --max-length equal to --body-max-length: the "
                                      "inputs the body step trains on)."),
        seed: int = typer.Option(0, "--seed"),
        cross_texts: int = typer.Option(0, "--cross-texts", min=0,
                                        help="Distilled groups also fit their teacher on this many texts of each "
                                             "other group's --data (one model answers every group on every text)."),
        extra_texts: Optional[List[str]] = typer.Option(None, "--extra-texts", metavar="FILE[=N]",
                                                    help="Unlabelled file of another domain (.jsonl text / .txt): "
                                                         "distilled groups also fit their teacher on --cross-texts "
                                                         "of its texts, or on N of them. Repeat per file."),
        label_weight: float = typer.Option(0.0, "--label-weight", min=0.0, max=1.0,
                                           help="Distilled groups whose --data has labels fit (1 - a) x teacher "
                                                "+ a x label on those texts."),
        body_epochs: float = typer.Option(0.0, "--body-epochs", min=0.0,
                                          help="After the head re-fit, train the whole model this many epochs so "
                                               "every group follows its --distill-from guard on the same texts "
                                               "(0: off; every group needs --distill-from)."),
        body_lr: float = typer.Option(2e-5, "--body-lr", min=1e-8, help="Learning rate of the body distillation."),
        body_layers: Optional[int] = typer.Option(None, "--body-layers", min=1,
                                                  help="Train only the top N encoder layers (+ pooler, head); the "
                                                       "frozen layers run once per text, not once per step."),
        body_targets: str = typer.Option("all", "--body-targets",
                                         help="all: every group learns on every re-fit text (the guards run on "
                                              "the texts the re-fit did not ask them about) | refit: each group "
                                              "only on its own re-fit texts (no further guard passes)."),
        body_max_length: int = typer.Option(128, "--body-max-length", min=16, help="Tokens per text for the body."),
        body_label_weight: float = typer.Option(0.0, "--body-label-weight", min=0.0, max=1.0,
                                                help="The body also learns each text's label in its group: targets "
                                                     "(1 - a) x guard + a x label where --data has labels."),
        precision: str = typer.Option("float32", "--precision", help="Forward passes for features and teachers: "
                                      "float32 | bfloat16 (autocast: several times faster on CPUs with AMX or "
                                      "AVX512-BF16; the fits and saved weights stay fp32) | auto (bfloat16 where "
                                      "the CPU has those instructions)."),
        force: bool = typer.Option(False, "--force", help=FORCE_HELP),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Re-fit group heads on the model's own features: labelled, or distilled from the original guards;
        with --body-epochs, then distil the whole model from the guards."""
        from hm3.io import group_pairs

        if body_label_weight and not body_epochs:
            raise HM3Error("--body-label-weight weighs labels in the body distillation: it needs --body-epochs")
        files = group_pairs(data, "--data")
        teachers = group_pairs(distill_from, "--distill-from")
        vals = group_pairs(validation, "--validation")
        for option, table in (("--distill-from", teachers), ("--validation", vals)):
            extra = sorted(set(table) - set(files))
            if extra:
                raise HM3Error(f"{option}: groups {extra} have no --data")
        try:
            cc: float | str = c if c == "auto" else float(c)
        except ValueError:
            raise HM3Error(f"--c {c!r}: expected a positive number or 'auto'") from None
        specs = [GroupRefit(g, Path(f), Path(vals[g]) if g in vals else None,
                            Path(teachers[g]) if g in teachers else None) for g, f in files.items()]
        report = refit_dir(model, specs, out, force=force, c=cc, max_texts=max_texts, temperature=temperature,
                           max_length=max_length, seed=seed, progress=progress, cross_texts=cross_texts,
                           extra_texts=_extra_counts(extra_texts or [], cross_texts), label_weight=label_weight,
                           precision=precision,
                           truncate=truncate, body=dict(epochs=body_epochs, lr=body_lr, layers=body_layers,
                                                        max_length=body_max_length, label_weight=body_label_weight,
                                                        targets=body_targets)
                           if body_epochs > 0 else None)
        summary = ", ".join(f"{g} ({r['mode']}, C={r['c']:g})" for g, r in report.groups.items())
        typer.echo(f"wrote {out}: re-fitted {summary} in {report.seconds:.1f}s")

