"""Issue 5.2: how many trials does each sampler need to reach the best of 500 paper-style trials?

    python scripts/sampler_study.py --zoo .cache/hm3/zoo --case cs1 --work runs/samplers-cs1 \
        --per-label 12 --max-length 64 --beta-trials 500 --smart-trials 100

For a case study of the zoo: a DARE-TIES recipe over its guards; a *proxy* validation suite (a
seeded, label-stratified sample of the zoo's validation suite: at least ``--per-label`` rows for
every label of the case study's groups, each text scored on its first ``--max-length`` tokens) and
a test sample built the same way from the test suite. Then, each with ``hm3 search`` in its own
``--out`` and the same proxy suites:

* ``beta``  — the paper's search: one shared density from Beta(1.5, 4), ``--beta-trials`` trials;
* ``tpe``   — Optuna TPE over per-model density and weight, ``--smart-trials`` trials;
* ``cmaes`` — CMA-ES over the same space, ``--smart-trials`` trials;
* ``tpe-shared`` — TPE over the beta search's own space (one density, weights 1), so that the
  sampler, not the larger space, is what is compared;

and ``hm3 search-compare`` over them (trials each needed to reach the beta run's best validation
score). The proxy keeps a trial at a few CPU seconds, so 500 trials fit in well under an hour on
one core; its scores are coarser than the full suites', which is fine for comparing samplers on the
same objective, not for picking a model to ship. Runs resume: start the same command again.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

from hm3.evaluate import load_suite
from hm3.results import restrict
from hm3.zoo.recipes import CASE_STUDIES, Recommendation, recipe


def stratified(rows, groups, per_label: int, seed: int):
    """A seeded sample with >= ``per_label`` rows for every (group, label) of ``groups`` that the
    suite has (fewer where the suite has fewer). Rows are taken in a seeded random order and kept
    while any of their expectations is still short, so cross-check rows count for every group."""
    rows = restrict(rows, groups)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    have: Counter = Counter()
    keep = []
    for i in order:
        keys = list(rows[i].expected.items())
        if any(have[k] < per_label for k in keys):
            keep.append(rows[i])
            have.update(keys)
    return keep


def write_suite(rows, path: Path) -> None:
    path.write_text("".join(json.dumps({"text": r.text, "expected": r.expected, "sources": list(r.sources)}) + "\n"
                            for r in rows))


RUNS = {
    # name: (sampler, extra hm3 search options)
    "beta": ("beta", []),
    "tpe": ("tpe", ["--space", "per-model"]),
    "cmaes": ("cmaes", ["--space", "per-model"]),
    "tpe-shared": ("tpe", ["--space", "shared", "--no-prune"]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", type=Path, required=True)
    p.add_argument("--case", default="cs1", choices=list(CASE_STUDIES))
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--per-label", type=int, default=12)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--beta-trials", type=int, default=500)
    p.add_argument("--smart-trials", type=int, default=100)
    p.add_argument("--runs", default="beta,tpe,cmaes,tpe-shared")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    groups = CASE_STUDIES[args.case].groups
    args.work.mkdir(parents=True, exist_ok=True)
    zoo = args.zoo.resolve()
    rec = recipe(args.case, root=zoo, rec=Recommendation("dare_ties", density=0.3))
    (args.work / "recipe.json").write_text(json.dumps(rec, indent=1))
    suites = {}
    for split in ("validation", "test"):
        rows = stratified(load_suite(zoo / "suites" / f"{split}.jsonl"), groups, args.per_label, args.seed)
        suites[split] = args.work / f"{split}.jsonl"
        write_suite(rows, suites[split])
        print(f"{split}: {len(rows)} rows", file=sys.stderr)
    hm3 = [sys.executable, "-m", "hm3.cli"]
    done = []
    for name in args.runs.split(","):
        sampler, extra = RUNS[name]
        trials = args.beta_trials if name == "beta" else args.smart_trials
        cmd = hm3 + ["search", str(args.work / "recipe.json"), "--validation", str(suites["validation"]),
                     "--test", str(suites["test"]), "--trials", str(trials), "--out", str(args.work / name),
                     "--sampler", sampler, "--max-length", str(args.max_length), "--truncate",
                     "--batch-size", "64", "--seed", str(args.seed), "--no-progress", *extra]
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
        done.append(str(args.work / name))
    subprocess.run(hm3 + ["search-compare", *done], check=True)


if __name__ == "__main__":
    main()
