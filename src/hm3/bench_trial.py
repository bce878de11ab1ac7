"""Search-trial benchmark: what one trial of ``hm3 search`` costs, in float32 and in bfloat16.

A trial is an in-memory merge (``TaskVectors.merge_into``) and forward passes over the cached
validation texts (``TokenCache.predict``), exactly what ``hm3.search`` runs. Both precisions run
the same densities, interleaved (fp32 trial, bf16 trial, fp32, ...), in this process, so their
times are measured side by side; bf16's labels are compared with fp32's of the same trial.

Guards: the zoo's (the first N, when it is built), else random MiniLM-config classifiers (the cost
depends on shapes and texts only, but agreement is only meaningful on real guards). Texts: the
zoo's validation suite, else generated word sequences. Issue 5's targets: ≤ 3 s per 2-guard trial
and ≤ 8 s per 5-guard trial on 1,000 validation texts.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path

from hm3.errors import HM3Error

log = logging.getLogger(__name__)

TARGETS = {2: 3.0, 5: 8.0}  # seconds per trial (issue 5)


def _texts(n: int, zoo: Path) -> tuple[list[str], str]:
    suite = zoo / "suites" / "validation.jsonl"
    if suite.is_file():
        from hm3.evaluate import load_suite

        texts = list(dict.fromkeys(r.text for r in load_suite(suite)))
        if len(texts) >= n:  # a seeded draw (the suite is ordered by source: its head is not typical)
            import random

            return random.Random(0).sample(texts, n), f"{suite} ({n} distinct texts, a seeded draw)"
        if texts:
            return (texts * -(-n // len(texts)))[:n], f"{suite} ({len(texts)} distinct texts, repeated to {n})"
    from hm3.bench import bench_texts

    return bench_texts(n, zoo)


def bench_trial(workdir: str | os.PathLike, *, counts: tuple[int, ...] = (2, 5), n_texts: int = 1000,
                trials: int = 5, precisions: tuple[str, ...] = ("float32", "bfloat16"), max_length: int = 128,
                batch_size: int = 64, threads: int | None = None, zoo: str | os.PathLike | None = None,
                seed: int = 0, size: str = "minilm") -> dict:
    """Median trial time (merge + forward) per guard count and precision, with bf16's label agreement."""
    import numpy as np
    import torch

    from hm3.bench import _machine, make_models, zoo_dir, zoo_guards
    from hm3.fastpaths import bf16_is_fast, check_precision
    from hm3.merging.engine import prepare
    from hm3.merging.fast import TaskVectors, TokenCache

    for p in precisions:
        check_precision(p)
    if not precisions or precisions[0] != "float32":
        raise HM3Error("bench trial compares with float32: list float32 first in --precisions")
    zoo = zoo_dir(zoo)
    guards, source = zoo_guards(zoo), "zoo guards"
    if len(guards) < max(counts):
        bm = make_models(Path(workdir) / "models", size, max(counts), expanded=False)
        guards, source, base = bm.models, f"random {size}-config classifiers (zoo not built)", bm.base
    else:
        from hm3.zoo.base import base_model_dir

        base = base_model_dir()
    texts, text_source = _texts(n_texts, zoo)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    densities = np.random.default_rng(seed).beta(1.5, 4.0, size=trials).clip(0.01, 1.0).tolist()
    res: dict = {"machine": _machine(), "guards": source, "texts": text_source, "n_texts": len(texts),
                 "max_length": max_length, "batch_size": batch_size, "threads": torch.get_num_threads(),
                 "bf16_fast": bf16_is_fast(), "densities": densities, "rows": []}
    try:
        for n in counts:
            cfg = {"merge_method": "dare_ties", "base_model": str(base), "dtype": "float32", "seed": seed,
                   "models": [{"model": str(m), "group": f"g{i}", "parameters": {"weight": 1.0, "density": 0.5}}
                              for i, m in enumerate(guards[:n])]}
            tv = TaskVectors.from_prepared(prepare(cfg))
            clf = tv.classifier(max_length=max_length)
            groups = list(tv.prep.space.names)
            caches = {p: TokenCache(clf, texts, batch_size=batch_size, truncate=True, precision=p) for p in precisions}
            tokens = caches[precisions[0]].n_tokens
            runs: dict[str, list[dict]] = {p: [] for p in precisions}
            for t, d in enumerate(densities):
                for p in precisions:
                    c0, t0 = time.process_time(), time.perf_counter()
                    tv.merge_into(clf.model, {"density": d})
                    t1 = time.perf_counter()
                    _, labels = list(caches[p].predict(clf.model, groups))[-1]
                    t2 = time.perf_counter()
                    runs[p].append({"density": d, "merge_s": t1 - t0, "forward_s": t2 - t1, "trial_s": t2 - t0,
                                    "cpu_s": time.process_time() - c0, "labels": labels})
                    log.info("trial bench N=%d %s #%d density %.3f: merge %.2fs forward %.2fs", n, p, t, d,
                             t1 - t0, t2 - t1)
            ref = runs[precisions[0]]
            for p in precisions:
                agree = [float(np.mean([np.mean(r["labels"][g] == f["labels"][g]) for g in groups]))
                         for r, f in zip(runs[p], ref)]
                res["rows"].append({
                    "n": n, "precision": p, "tokens": tokens,
                    "trial_s": statistics.median(r["trial_s"] for r in runs[p]),
                    "merge_s": statistics.median(r["merge_s"] for r in runs[p]),
                    "forward_s": statistics.median(r["forward_s"] for r in runs[p]),
                    "cpu_s": statistics.median(r["cpu_s"] for r in runs[p]),
                    "runs_s": [round(r["trial_s"], 3) for r in runs[p]],
                    "agreement_min": min(agree), "agreement_mean": float(np.mean(agree)),
                    "target_s": TARGETS.get(n),
                })
    finally:
        torch.set_num_threads(old_threads)
    return res


def trial_markdown(res: dict, command: str | None = None) -> str:
    """The section of docs/BENCHMARKS.md for a ``bench_trial`` result."""
    lines = ["## Search trials: float32 vs bfloat16", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"One `hm3 search` trial = in-memory DARE-TIES merge (`TaskVectors.merge_into`) + forward passes over "
        f"{res['n_texts']} validation texts (`TokenCache`, first {res['max_length']} tokens of each, batches of "
        f"{res['batch_size']}), {res['threads']} torch thread(s), in one process; both precisions run the same "
        f"{len(res['densities'])} Beta(1.5, 4) densities, interleaved. Guards: {res['guards']}. Texts: {res['texts']}. "
        f"CPU has bf16 matrix instructions (AMX / AVX512-BF16): {'yes' if res['bf16_fast'] else 'no'}. "
        "Agreement: share of (text, group) labels equal to the float32 trial's at the same density (lowest and mean "
        "over trials). Targets (issue 5): ≤ 3 s per 2-guard trial, ≤ 8 s per 5-guard trial.", "",
        "| N | precision | tokens | trial s (median) | merge s | forward s | CPU s | target | met | agreement min / mean | runs s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        met = "–" if r["target_s"] is None else ("yes" if r["trial_s"] <= r["target_s"] else "no")
        target = "–" if r["target_s"] is None else f"≤ {r['target_s']:.0f} s"
        lines.append(f"| {r['n']} | {r['precision']} | {r['tokens']:,} | {r['trial_s']:.2f} | {r['merge_s']:.2f} | "
                     f"{r['forward_s']:.2f} | {r['cpu_s']:.2f} | {target} | {met} | {r['agreement_min']:.2%} / "
                     f"{r['agreement_mean']:.2%} | {', '.join(f'{x:.2f}' for x in r['runs_s'])} |")
    lines.append("")
    return "\n".join(lines)
