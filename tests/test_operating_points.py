"""Operating points of single-label groups (``GROUP/LABEL=T``): a guard run at a threshold on one
label — that label where its probability reaches T, else the most probable other label — in
predict, eval (model and guards alike), agree, int8-checked and serve."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from sklearn.metrics import f1_score

import hm3
from hm3.errors import HM3Error
from hm3.labels import LabelSpace
from hm3.model import decide, label_thresholds, operating_point
from hm3.testing import TASK_A, TASK_B

T = 0.53
POINT = {"b/blue": T}  # group b: red, green, blue (the tiny merge's blue scores lie around 0.53)


def test_decide_at_an_operating_point():
    space = LabelSpace([("b", ["red", "green", "blue"], False), ("t", ["x", "y"], True)])
    g = space["b"]
    probs = np.array([[0.1, 0.3, 0.6],    # blue reaches 0.6: blue
                      [0.2, 0.3, 0.5],    # blue on top but under 0.6: the best other, green
                      [0.5, 0.1, 0.4],    # red on top, blue under: red
                      [0.35, 0.0, 0.65]])
    assert decide(g, probs).tolist() == [2, 2, 0, 2]  # no operating point: the top label
    assert decide(g, probs, 0.5).tolist() == [2, 2, 0, 2]  # a single threshold concerns multi-label groups only
    cut = label_thresholds(space, 0.5, {"b/blue": 0.6})["b"]
    assert np.isnan(cut[:2]).all() and cut[2] == 0.6 and operating_point(g, cut) == ("blue", 0.6)
    assert decide(g, probs, cut).tolist() == [2, 1, 0, 2]
    low = label_thresholds(space, 0.5, {"b/blue": 0.3})["b"]  # a low point: blue wins over a likelier red
    assert decide(g, probs, low).tolist() == [2, 2, 2, 2]
    assert operating_point(g, None) is None and operating_point(space["t"], np.array([0.5, 0.5])) is None
    for bad, pattern in (({"b": 0.6}, r"group 'b' is single-label: give its operating point on one label, "
                                      r"e\.g\. b/blue=0\.6"),
                         ({"b/blue": 0.6, "b/red": 0.3}, "a single-label group has one operating point"),
                         ({"b/purple": 0.6}, "group 'b' has no label 'purple'"),
                         ({"b/blue": 1.0}, "between 0 and 1")):
        with pytest.raises(HM3Error, match=pattern):
            label_thresholds(space, 0.5, bad)


@pytest.fixture(scope="module")
def zoo(pair):
    texts = [t for t, _ in TASK_B.sample(80, seed=4)] + [t for t, _ in TASK_A.sample(20, seed=5)]
    return {**pair, "texts": texts}


def _decided(model, texts, point=POINT):
    clf = hm3.load(model, thresholds=point)
    g = clf.groups[-1]
    return clf, decide(clf.space[g], clf.predict_proba(texts, [g])[g], clf.cuts(g))


def test_predict_answers_at_the_operating_point(zoo):
    clf, want = _decided(zoo["merged"], zoo["texts"])
    plain = hm3.load(zoo["merged"])
    p = plain.predict_proba(zoo["texts"], ["b"])["b"]
    assert want.tolist() != p.argmax(1).tolist()  # the point changes some answers here
    rows = clf.predict(zoo["texts"])
    assert [r["b"].label for r in rows] == [TASK_B.labels[i] for i in want]
    assert [r["b"].scores for r in rows] == [r["b"].scores for r in plain.predict(zoo["texts"])]  # scores as they were
    assert [r["a"].label for r in rows] == [r["a"].label for r in plain.predict(zoo["texts"])]  # other groups too
    np.testing.assert_array_equal(clf.decisions(clf.space["b"], p), want)

    from typer.testing import CliRunner

    from hm3.cli import app

    r = CliRunner().invoke(app, ["predict", str(zoo["merged"]), "--label-threshold", f"b/blue={T}",
                                 "-t", zoo["texts"][0], "-t", zoo["texts"][1]])
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["groups"]["b"]["label"] for line in r.stdout.strip().splitlines()] == \
        [TASK_B.labels[i] for i in want[:2]]
    r = CliRunner().invoke(app, ["predict", str(zoo["merged"]), "--label-threshold", "b=0.6", "-t", "w1"])
    assert r.exit_code == 2 and "give its operating point on one label" in r.output


def test_eval_scores_model_and_guards_at_the_operating_point(zoo, tmp_path):
    from typer.testing import CliRunner

    from hm3.cli import app

    rows = [{"text": t, "expected": {"b": TASK_B.labels[y]}} for t, y in TASK_B.sample(60, seed=9)]
    suite = tmp_path / "suite.jsonl"
    suite.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["eval", str(zoo["merged"]), "--suite", str(suite), "--label-threshold", f"b/blue={T}",
                                   "--against", str(zoo["b"]), "--bootstrap", "50", "--out", str(out)])
    assert res.exit_code == 0, res.output
    texts, truth = [r["text"] for r in rows], [r["expected"]["b"] for r in rows]
    saved = json.loads((out / "comparison.json").read_text())
    for who, model in (("model", zoo["merged"]), ("reference", zoo["b"])):  # the guard at the same point
        _, got = _decided(model, texts)
        want = f1_score(truth, [TASK_B.labels[i] for i in got], average="macro", labels=TASK_B.labels)
        assert saved["average"][who] == pytest.approx(want), who  # (group b is the suite's only group)


def test_agreement_at_the_operating_point(zoo):
    from hm3.agreement import agreement

    texts = zoo["texts"]
    rep = agreement(zoo["merged"], texts, {"b": zoo["b"]}, thresholds=POINT)
    _, m = _decided(zoo["merged"], texts)
    _, g = _decided(zoo["b"], texts)
    a = rep.groups["b"]
    assert a.agree == int((m == g).sum()) and a.confusion.sum() == len(texts)
    assert a.confusion[2].sum() == int((g == 2).sum())  # rows: the guard's answers at the point
    assert rep.operating_points == {"b": ("blue", T)} and rep.thresholds == {}
    assert rep.to_json()["operating_points"] == {"b": {"label": "blue", "threshold": T}}
    assert "Compared at operating points (a label where its probability reaches the threshold, else the most " \
           f"probable other one): b blue ≥ {T:g}." in rep.markdown()
    plain = agreement(zoo["merged"], texts, {"b": zoo["b"]})
    assert plain.operating_points == {} and "operating points" not in plain.markdown()


def test_int8_checked_reruns_windows_near_the_operating_point(zoo):
    import torch

    from hm3.fastpaths import CHECK_MARGIN, CheckedInt8, accelerate

    clf = hm3.load(zoo["merged"], thresholds=POINT)
    fast = accelerate(clf, "int8-checked")
    checked = fast.model
    assert isinstance(checked, CheckedInt8) and len(checked.points) == 1
    rows, j, boundary = checked.points[0]
    assert j == 2 and boundary == pytest.approx(np.log(T / (1 - T)))
    enc = clf.tokenizer(zoo["texts"], padding=True, return_tensors="pt")
    with torch.no_grad():
        z = checked.int8(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, rows]
    others = torch.cat([z[:, :j], z[:, j + 1:]], dim=1)
    near = ((z[:, j] - torch.logsumexp(others, 1) - boundary).abs() < CHECK_MARGIN)
    checked.rerun = checked.seen = 0
    checked(enc["input_ids"], enc["attention_mask"])
    assert near.any() and checked.rerun >= int(near.sum())  # every window near the point is recomputed in fp32
    np.testing.assert_array_equal(fast.decisions(fast.space["b"], fast.predict_proba(zoo["texts"], ["b"])["b"]),
                                  _decided(zoo["merged"], zoo["texts"])[1])


def test_served_labels_at_the_operating_point(zoo):
    from hm3.serve import Settings, background_server, create_app

    _, want = _decided(zoo["merged"], zoo["texts"][:10])
    settings = Settings(thresholds=POINT, threads=1, max_wait_ms=1)
    with background_server(create_app(zoo["merged"], settings)) as url, httpx.Client(base_url=url, timeout=30) as c:
        rows = c.post("/v1/classify", json={"texts": zoo["texts"][:10]}).json()
        groups = c.get("/v1/labels").json()["groups"]
    assert [r["groups"]["b"]["label"] for r in rows] == [TASK_B.labels[i] for i in want]
    assert groups == [{"name": "a", "labels": list(TASK_A.labels)},  # no operating point: nothing more
                      {"name": "b", "labels": list(TASK_B.labels), "operating_point": {"label": "blue", "threshold": T}}]


def test_search_scores_trials_and_guards_at_the_operating_point(zoo, tmp_path):
    """``hm3 search --label-threshold``: the trials and the original guards (the worst-ratio denominators,
    under the guard's own group name) are scored at the point, like ``hm3 eval`` scores them."""
    import csv

    from hm3.evaluate import evaluate
    from hm3.search import SearchSettings, run_search

    point = {"b/blue": 0.9}  # the guard's blue scores are 0.01-0.88: at 0.9 it never says blue
    rows = [{"text": t, "expected": {"b": TASK_B.labels[y]}} for t, y in TASK_B.sample(40, seed=12)]
    suite = tmp_path / "val.jsonl"
    suite.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"merge_method": "dare_ties", "base_model": str(zoo["base"]), "seed": 0,
              "models": [{"model": str(zoo["a"]), "group": "a", "parameters": {"density": 0.5}},
                         {"model": str(zoo["b"]), "group": "b", "parameters": {"density": 0.5}}]}
    out = tmp_path / "search"
    run_search(recipe, suite, None, 1, out, SearchSettings(objective="worst", thresholds=point), progress=False)
    guard_at_point = evaluate([hm3.load(zoo["b"], thresholds=point)], suite).groups["b"].macro_f1
    assert guard_at_point != evaluate([zoo["b"]], suite).groups["b"].macro_f1
    assert json.loads((out / "originals-validation.json").read_text())["b"] == pytest.approx(guard_at_point)
    trial = next(csv.DictReader((out / "trials.csv").open()))
    best = evaluate([hm3.load(out / "best", thresholds=point)], suite).groups["b"].macro_f1
    assert float(trial["val_b"]) == pytest.approx(best)
    assert "answers decided at b/blue=0.9 (score `best/` with the same `--threshold` / `--label-threshold`)" in \
        (out / "summary.md").read_text()
    with pytest.raises(HM3Error, match="was made with other settings"):  # a study remembers its thresholds
        run_search(recipe, suite, None, 2, out, SearchSettings(objective="worst"), progress=False)
