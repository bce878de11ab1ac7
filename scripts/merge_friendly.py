"""Issue 9.3: do merge-friendly fine-tuning styles change the merge ratio?

    python scripts/merge_friendly.py ZOO [ZOO ...] --case cs2 --suites .cache/hm3/zoo/suites \
        --out docs/merge-friendly-cs2.json

Each ZOO holds the case study's guards built by `hm3 zoo build --style ...` (same data splits: same
seed). For every zoo, on the same suites (the standard zoo's, restricted to the case study's groups):
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
from hm3.results import restrict
from hm3.zoo.recipes import CASE_STUDIES, Recommendation, recipe

DENSITIES = (0.2, 0.4, 0.7)


def f1(report, groups) -> dict[str, float]:
    return {g: report.groups[g].macro_f1 for g in groups}


def study(zoo: Path, key: str, val, test, work: Path) -> dict:
    groups = CASE_STUDIES[key].groups

    def merged(name: str, density: float, refit: str | None) -> Path:
        m = work / name
        hm3.merge(recipe(key, root=zoo, rec=Recommendation("ties", density=density, refit=refit)), m,
                  force=True, progress=False)
        return m

    markers = {g: json.loads((zoo / g / "hm3-zoo.json").read_text()) for g in groups}
    orig = {s: f1(evaluate([zoo / g for g in groups], rows, 8), groups) for s, rows in (("validation", val), ("test", test))}
    out = {"style": markers[groups[0]].get("style", "standard"),
           "own_test_f1": {g: markers[g]["metrics"]["test_macro_f1"] for g in groups},
           "originals": orig, "ties_validation": {}}
    for d in DENSITIES:
        out["ties_validation"][str(d)] = f1(evaluate([merged(f"ties-{d}", d, None)], val, 8), groups)
    best = max(DENSITIES, key=lambda d: sum(out["ties_validation"][str(d)].values()))
    out["density"] = best
    for name, refit in (("ties", None), ("ties_refit", "labelled")):
        t0 = time.perf_counter()
        test_f1 = f1(evaluate([merged(name, best, refit)], test, 8), groups)
        ratio = {g: test_f1[g] / orig["test"][g] for g in groups}
        out[name] = {"test": test_f1, "avg_ratio": sum(test_f1.values()) / sum(orig["test"].values()),
                     "worst_ratio": min(ratio.values()), "seconds": round(time.perf_counter() - t0, 1)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("zoos", nargs="+", type=Path)
    p.add_argument("--suites", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--case", default="cs2", choices=list(CASE_STUDIES), help="Case study (its groups).")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    groups = CASE_STUDIES[args.case].groups
    val, test = (restrict(load_suite(args.suites / f"{split}.jsonl"), groups) for split in ("validation", "test"))
    results = []
    for zoo in args.zoos:
        with tempfile.TemporaryDirectory() as tmp:
            r = study(zoo, args.case, val, test, Path(tmp))
        r["zoo"] = str(zoo)
        results.append(r)
        print(json.dumps(r), flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
