"""Issue 9.3: do merge-friendly fine-tuning styles change the merge ratio?

    python scripts/merge_friendly.py ZOO [ZOO ...] --groups spam,sentiment --suites .cache/hm3/zoo/suites \
        --out docs/merge-friendly-cs2.json

Each ZOO holds the groups' guards built by `hm3 zoo build --style ...` (same data splits: same seed). For every zoo, on the same suites (the standard zoo's, restricted to the two groups):
the originals' macro F1; TIES at each density merged and scored on validation; the best density's
test scores; the ratio merged/originals (average and worst group); and the same merge with a
labelled head re-fit. Validation chooses, test reports.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import hm3
from hm3.evaluate import evaluate, load_suite
from hm3.zoo.base import base_model_dir

GROUPS: tuple[str, ...] = ("spam", "sentiment")  # --groups
DENSITIES = (0.2, 0.4, 0.7)


def rows_for(path: Path):
    return [r.__class__(r.text, {g: v for g, v in r.expected.items() if g in GROUPS}, r.sources, r.where)
            for r in load_suite(path) if any(g in r.expected for g in GROUPS)]


def f1(report) -> dict[str, float]:
    return {g: report.groups[g].macro_f1 for g in GROUPS}


def recipe(zoo: Path, density: float, refit: bool) -> dict:
    cfg = {"merge_method": "ties", "base_model": str(base_model_dir()), "seed": 0,
           "models": [{"model": str(zoo / g), "group": g, "parameters": {"density": density}} for g in GROUPS]}
    if refit:
        cfg["refit"] = {"mode": "labelled", "data": {g: str(zoo / g / "train.jsonl") for g in GROUPS},
                        "validation": {g: str(zoo / g / "validation.jsonl") for g in GROUPS}}
    return cfg


def study(zoo: Path, val, test, work: Path) -> dict:
    markers = {g: json.loads((zoo / g / "hm3-zoo.json").read_text()) for g in GROUPS}
    orig = {s: f1(evaluate([zoo / g for g in GROUPS], rows, 8)) for s, rows in (("validation", val), ("test", test))}
    out = {"style": markers[GROUPS[0]].get("style", "standard"),
           "own_test_f1": {g: markers[g]["metrics"]["test_macro_f1"] for g in GROUPS},
           "originals": orig, "ties_validation": {}}
    for d in DENSITIES:
        m = work / f"ties-{d}"
        hm3.merge(recipe(zoo, d, False), m, force=True, progress=False)
        out["ties_validation"][str(d)] = f1(evaluate([m], val, 8))
    best = max(DENSITIES, key=lambda d: sum(out["ties_validation"][str(d)].values()))
    out["density"] = best
    for name, refit in (("ties", False), ("ties_refit", True)):
        m = work / name
        t0 = time.perf_counter()
        hm3.merge(recipe(zoo, best, refit), m, force=True, progress=False)
        test_f1 = f1(evaluate([m], test, 8))
        ratio = {g: test_f1[g] / orig["test"][g] for g in GROUPS}
        out[name] = {"test": test_f1, "avg_ratio": sum(test_f1.values()) / sum(orig["test"].values()),
                     "worst_ratio": min(ratio.values()), "seconds": round(time.perf_counter() - t0, 1)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("zoos", nargs="+", type=Path)
    p.add_argument("--suites", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--groups", default="spam,sentiment", help="Comma-separated groups (a case study).")
    args = p.parse_args()
    global GROUPS
    GROUPS = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    import torch

    torch.set_num_threads(1)
    val, test = rows_for(args.suites / "validation.jsonl"), rows_for(args.suites / "test.jsonl")
    results = []
    for zoo in args.zoos:
        with tempfile.TemporaryDirectory() as tmp:
            r = study(zoo, val, test, Path(tmp))
        r["zoo"] = str(zoo)
        results.append(r)
        print(json.dumps(r), flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
