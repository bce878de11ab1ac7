"""`make demo`: the main job end to end on the offline MiniLM base.

1. Build two small real guards (``spam``: ham/spam SMS; ``sentiment``: negative/positive
   snippets) from the same MiniLM base — cached, so a second run skips straight to merging.
2. Merge them with TIES (training-free, the paper's path) and, where the merged heads lose the
   merged body's features, with a head re-fit on the guards' own training texts.
3. Print originals vs merged side by side on held-out test texts: macro F1 per group, and what
   each model answers for a few example texts — with one forward pass for both groups.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

GROUPS = ("spam", "sentiment")
DEMO_TRAIN = 600  # examples per guard: ~1 minute of fine-tuning each on 2 CPU cores
DEMO_EPOCHS = 2
TEST_PER_GROUP = 300


def _f1(clf, group: str, rows: list[dict]) -> tuple[float, np.ndarray]:
    from sklearn.metrics import f1_score

    labels = list(clf.space[group].labels)
    probs = clf.predict_proba([r["text"] for r in rows], groups=[group], batch_size=64)[group]
    pred = probs.argmax(1)
    gold = np.array([labels.index(r["label"]) for r in rows])
    return float(f1_score(gold, pred, average="macro", labels=list(range(len(labels))))), pred


def recipe(zoo: Path, base: Path, refit: bool) -> dict:
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(zoo / g), "group": g, "parameters": {"weight": 1.0, "density": 0.5}} for g in GROUPS],
        "parameters": {"normalize": True},
        "seed": 0,
    }
    if refit:
        cfg["refit"] = {"mode": "labelled", "data": {g: str(zoo / g / "train.jsonl") for g in GROUPS}}
    return cfg


def run_demo(workdir: Path) -> dict:
    """Build (or reuse) the two guards, merge, compare; returns the measured numbers."""
    from rich.console import Console
    from rich.table import Table

    import hm3
    from hm3.zoo.base import base_model_dir
    from hm3.zoo.build import DEFAULT_STYLE, build_guard, read_marker, style_of
    from hm3.zoo.data import read_jsonl

    console = Console()
    workdir = Path(workdir)
    zoo = workdir / "zoo"
    base = base_model_dir()
    t0 = time.perf_counter()
    console.rule("[bold]1. two guards fine-tuned from the same MiniLM base (cached)")
    for g in GROUPS:
        cached = read_marker(zoo / g)  # a cache from an hm3 with another default style is rebuilt
        stale = cached is not None and style_of(cached) != DEFAULT_STYLE
        marker = build_guard(g, zoo, max_train=DEMO_TRAIN, epochs=DEMO_EPOCHS, progress=True, force=stale)
        console.print(f"{g}: labels {marker.get('labels')}, test macro F1 {marker['metrics']['test_macro_f1']:.3f}")
    t_build = time.perf_counter() - t0

    console.rule("[bold]2. merge (one model, one forward pass, per-group softmax)")
    merged = {}
    variants = [("TIES", False)]
    try:
        import hm3.refit  # noqa: F401

        variants.append(("TIES + head re-fit", True))
    except ImportError:
        log.info("hm3.refit is not available: showing the training-free merge only")
    for name, refit in variants:
        out = workdir / ("merged-refit" if refit else "merged")
        r = hm3.merge(recipe(zoo, base, refit), out, force=True, progress=True)
        merged[name] = hm3.load(out)
        console.print(f"{name}: {out} ({r.seconds:.1f}s)")

    console.rule("[bold]3. originals vs merged on held-out test texts")
    tests = {g: read_jsonl(zoo / g / "test.jsonl")[:TEST_PER_GROUP] for g in GROUPS}
    originals = {g: hm3.load(zoo / g) for g in GROUPS}
    table = Table(title="macro F1 on each guard's test split")
    table.add_column("group")
    table.add_column("texts", justify="right")
    table.add_column("original", justify="right")
    for name in merged:
        table.add_column(name, justify="right")
    results: dict = {"groups": {}, "seconds_build": round(t_build, 1)}
    preds = {}
    for g in GROUPS:
        f_orig, p_orig = _f1(originals[g], g, tests[g])
        row = [g, str(len(tests[g])), f"{f_orig:.3f}"]
        results["groups"][g] = {"original": f_orig}
        preds[(g, "original")] = p_orig
        for name, clf in merged.items():
            f, p = _f1(clf, g, tests[g])
            results["groups"][g][name] = f
            preds[(g, name)] = p
            row.append(f"{f:.3f} ({f / f_orig:.0%})")
        table.add_row(*row)
    console.print(table)

    best = list(merged)[-1]
    examples = Table(title=f"the same texts: each original guard vs the merged model ({best})")
    examples.add_column("text", max_width=60)
    examples.add_column("expected")
    examples.add_column("original guard")
    examples.add_column("merged: spam / sentiment")
    for g in GROUPS:
        rows = tests[g][:3]
        both = merged[best].predict([r["text"] for r in rows])
        for r, p_orig, p_all in zip(rows, originals[g].predict([r["text"] for r in rows]), both):
            examples.add_row(
                r["text"][:120],
                f"{g}: {r['label']}",
                f"{p_orig[g].label} ({p_orig[g].scores[p_orig[g].label]:.2f})",
                " / ".join(f"{p_all[x].label} ({p_all[x].scores[p_all[x].label]:.2f})" for x in GROUPS),
            )
    console.print(examples)
    results["seconds_total"] = round(time.perf_counter() - t0, 1)
    console.print(
        f"two guards = two model loads and two forward passes per text; the merged model answers both groups in one. "
        f"Total {results['seconds_total']}s."
    )
    return results
