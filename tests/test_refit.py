"""Post-merge head re-fit: the fits themselves, the recipe step and the `hm3 refit` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import hm3
from hm3.errors import HM3Error
from hm3.refit import GroupRefit, _softmax, fit_labelled, fit_soft, refit_dir
from hm3.testing import TASK_A, TASK_B, accuracy


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HM3_CACHE", str(tmp_path / "cache"))


# -- the fits --------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3])
def test_labelled_fit_on_separable_features_is_exact(k):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(k, 16)) * 4
    y = np.arange(300) % k
    x = centres[y] + rng.normal(size=(300, 16)) * 0.3  # well separated: linearly separable
    w, b = fit_labelled(x, y, k, c=10.0)
    assert w.shape == (k, 16) and b.shape == (k,)
    assert float(((x @ w.T + b).argmax(1) == y).mean()) == 1.0


def test_labelled_fit_with_two_labels_gives_scikit_learns_probabilities():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5))
    y = (x[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(int)
    w, b = fit_labelled(x, y, 2, c=1.0)
    mu, sd = x.mean(0), x.std(0)
    ref = LogisticRegression(C=1.0, max_iter=1000, tol=1e-8).fit((x - mu) / sd, y)
    np.testing.assert_allclose(_softmax(x @ w.T + b), ref.predict_proba((x - mu) / sd), atol=1e-3)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distilling_a_head_from_itself_reproduces_its_predictions(temperature):
    rng = np.random.default_rng(2)
    x = np.tanh(rng.normal(size=(400, 12)))
    w0, b0 = rng.normal(size=(4, 12)), rng.normal(size=4)
    logits = x @ w0.T + b0
    teacher = _softmax(logits / temperature)
    w, b = fit_soft(x, teacher, c=1e4, temperature=temperature)
    student = x @ w.T + b
    assert float((student.argmax(1) == logits.argmax(1)).mean()) == 1.0
    np.testing.assert_allclose(_softmax(student), _softmax(logits), atol=0.02)


def test_soft_fit_with_one_hot_targets_matches_the_labelled_fit():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 6))
    y = (x @ rng.normal(size=(6, 3))).argmax(1)
    hard = fit_labelled(x, y, 3, c=0.5)
    soft = fit_soft(x, np.eye(3)[y], c=0.5)
    # Same objective (scikit-learn's multinomial loss + ½‖W‖²), different solvers.
    np.testing.assert_allclose(_softmax(x @ soft[0].T + soft[1]), _softmax(x @ hard[0].T + hard[1]), atol=2e-3)


# -- recipes ---------------------------------------------------------------------------------------
def _jsonl(path: Path, task, n: int, seed: int, labelled: bool = True) -> str:
    rows = [{"text": t, **({"label": task.labels[y]} if labelled else {})} for t, y in task.sample(n, seed=seed)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def data(tmp_path):
    return {
        "a": _jsonl(tmp_path / "a.jsonl", TASK_A, 80, 21),
        "b": _jsonl(tmp_path / "b.jsonl", TASK_B, 90, 22),
        "a_val": _jsonl(tmp_path / "a_val.jsonl", TASK_A, 30, 23),
        "a_text": _jsonl(tmp_path / "a.txt.jsonl", TASK_A, 80, 24, labelled=False),
        "b_text": _jsonl(tmp_path / "b.txt.jsonl", TASK_B, 80, 25, labelled=False),
    }


def _ties(recipe, **refit):
    r = recipe("ties", density=0.3)
    if refit:
        r["refit"] = refit
    return r


def test_labelled_refit_restores_the_groups_and_touches_only_their_rows(tiny, tmp_path, recipe, data):
    from hm3.io import load_checkpoint

    plain = hm3.merge(_ties(recipe), tmp_path / "plain", progress=False)
    fitted = hm3.merge(_ties(recipe, data={"a": data["a"], "b": data["b"]}), tmp_path / "fitted", progress=False)
    p, f = load_checkpoint(plain.path), load_checkpoint(fitted.path)
    for name in p.names:  # the body is the merge's, byte for byte
        if not name.startswith("classifier."):
            assert torch.equal(p.tensor(name), f.tensor(name)), name
    assert not torch.equal(p.tensor("classifier.weight"), f.tensor("classifier.weight"))
    clf_p, clf_f = hm3.load(plain.path), hm3.load(fitted.path)
    for group, task in (("a", TASK_A), ("b", TASK_B)):
        orig = hm3.load(tiny[group])
        assert accuracy(clf_f, group, task) >= max(accuracy(clf_p, group, task), 0.9 * accuracy(orig, orig.groups[0], task))


def test_refit_of_one_group_leaves_the_others_rows(tiny, tmp_path, recipe, data):
    from hm3.io import load_checkpoint

    plain = hm3.merge(_ties(recipe), tmp_path / "plain", progress=False)
    only_b = hm3.merge(_ties(recipe, data={"b": data["b"]}), tmp_path / "b", progress=False)
    p, f = load_checkpoint(plain.path), load_checkpoint(only_b.path)
    assert torch.equal(p.tensor("classifier.weight")[0:2], f.tensor("classifier.weight")[0:2])  # group a
    assert torch.equal(p.tensor("classifier.bias")[0:2], f.tensor("classifier.bias")[0:2])
    assert not torch.equal(p.tensor("classifier.weight")[2:5], f.tensor("classifier.weight")[2:5])  # group b
    meta = json.loads((only_b.path / "config.json").read_text())["hm3"]["refit"]
    assert list(meta["groups"]) == ["b"]


def test_refit_is_byte_reproducible_with_and_without_the_cache(tiny, tmp_path, recipe, data, monkeypatch):
    r = _ties(recipe, data={"a": data["a"], "b": data["b"]}, validation={"a": data["a_val"]})
    hm3.merge(r, tmp_path / "m1", progress=False)
    hm3.merge(r, tmp_path / "m2", progress=False)  # features from the cache
    monkeypatch.setenv("HM3_CACHE", str(tmp_path / "other-cache"))
    hm3.merge(r, tmp_path / "m3", progress=False)  # computed afresh
    weights = [(tmp_path / m / "model.safetensors").read_bytes() for m in ("m1", "m2", "m3")]
    assert weights[0] == weights[1] == weights[2]
    metas = [json.loads((tmp_path / m / "config.json").read_text())["hm3"]["refit"] for m in ("m1", "m2")]
    assert metas[0]["features"]["cached"] is False and metas[1]["features"]["cached"] is True


def test_refit_metadata_and_model_card(tiny, tmp_path, recipe, data):
    res = hm3.merge(_ties(recipe, data={"a": data["a"], "b": data["b"]}, validation={"a": data["a_val"]}),
                    tmp_path / "m", progress=False)
    meta = json.loads((res.path / "config.json").read_text())["hm3"]["refit"]
    a, b = meta["groups"]["a"], meta["groups"]["b"]
    assert (a["data"], a["texts"], a["mode"]) == (data["a"], 80, "labelled")
    assert (a["validation"], a["validation_texts"]) == (data["a_val"], 30)
    assert b["validation"] == "20% hold-out of the data" and b["validation_texts"] == 18  # 6 of each of 3 labels
    assert a["c"] in (0.01, 0.1, 1.0, 10.0, 100.0) and set(a["grid"]) == {"0.01", "0.1", "1", "10", "100"}
    assert meta["seconds"] >= 0 and meta["features"]["windows"] == 80 + 30 + 90
    card = (res.path / "README.md").read_text()
    assert "## Head re-fit" in card and data["a_val"] in card


def test_distilled_refit_follows_the_original_guards(tiny, tmp_path, recipe, data):
    r = _ties(recipe, mode="distill")
    r["data"] = {"texts": {"a": data["a_text"], "b": data["b_text"]}}  # refit.data defaults to these
    res = hm3.merge(r, tmp_path / "m", progress=False)
    meta = json.loads((res.path / "config.json").read_text())["hm3"]["refit"]
    assert meta["groups"]["a"]["teacher"] == str(tiny["a"]) and meta["groups"]["b"]["mode"] == "distill"
    merged = hm3.load(res.path)
    for group, task in (("a", TASK_A), ("b", TASK_B)):
        texts = [t for t, _ in task.sample(200, seed=99)]
        teacher = hm3.load(tiny[group]).predict_proba(texts)
        student = merged.predict_proba(texts, groups=[group])[group]
        agree = float((next(iter(teacher.values())).argmax(1) == student.argmax(1)).mean())
        assert agree >= 0.9, (group, agree)


def test_bf16_refit_records_its_precision_caches_apart_and_answers_like_fp32(tiny, tmp_path, recipe, data):
    runs = {}
    for precision in ("float32", "bfloat16"):
        r = _ties(recipe, mode="distill", precision=precision)
        r["data"] = {"texts": {"a": data["a_text"], "b": data["b_text"]}}
        runs[precision] = hm3.merge(r, tmp_path / precision, progress=False).path
    metas = {p: json.loads((d / "config.json").read_text())["hm3"]["refit"] for p, d in runs.items()}
    assert metas["float32"]["precision"] == "float32" and metas["bfloat16"]["precision"] == "bfloat16"
    assert metas["bfloat16"]["features"]["cached"] is False, "bf16 features are not fp32's cache entry"
    assert "forward passes in bfloat16" in (runs["bfloat16"] / "README.md").read_text()
    w = [(d / "model.safetensors").read_bytes() for d in runs.values()]
    assert w[0] != w[1]
    fp32, bf16 = hm3.load(runs["float32"]), hm3.load(runs["bfloat16"])
    for group, task in (("a", TASK_A), ("b", TASK_B)):
        texts = [t for t, _ in task.sample(200, seed=98)]
        agree = float((fp32.predict_proba(texts, [group])[group].argmax(1)
                       == bf16.predict_proba(texts, [group])[group].argmax(1)).mean())
        assert agree >= 0.9, (group, agree)
    with pytest.raises(Exception, match="precision"):
        hm3.merge(_ties(recipe, data={"a": data["a"]}, precision="half"), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_auto_precision_resolves_per_cpu_and_records_what_ran(tiny, tmp_path, recipe, data, monkeypatch):
    import hm3.fastpaths as fp

    r = _ties(recipe, mode="distill", precision="auto")
    r["data"] = {"texts": {"a": data["a_text"], "b": data["b_text"]}}
    monkeypatch.setattr(fp, "bf16_is_fast", lambda: False)  # an AVX2-only CPU: float32, the plain recipe's bytes
    auto = hm3.merge(r, tmp_path / "auto", progress=False).path
    plain = dict(r, refit={k: v for k, v in r["refit"].items() if k != "precision"})
    ref = hm3.merge(plain, tmp_path / "plain", progress=False).path
    assert json.loads((auto / "config.json").read_text())["hm3"]["refit"]["precision"] == "float32"
    assert (auto / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    monkeypatch.setattr(fp, "bf16_is_fast", lambda: True)
    fast = hm3.merge(r, tmp_path / "fast", progress=False).path
    assert json.loads((fast / "config.json").read_text())["hm3"]["refit"]["precision"] == "bfloat16"


def test_without_bf16_replaces_the_refit_settings_only_where_auto_runs_float32(tiny, tmp_path, recipe, data, monkeypatch):
    import hm3.fastpaths as fp

    r = _ties(recipe, mode="distill", precision="auto")
    r["data"] = {"texts": {"a": data["a_text"], "b": data["b_text"]}}
    r["refit"]["without_bf16"] = {"max_texts": 30}
    monkeypatch.setattr(fp, "bf16_is_fast", lambda: False)  # an AVX2-only CPU: the cheaper re-fit
    slow = hm3.merge(r, tmp_path / "slow", progress=False).path
    meta = json.loads((slow / "config.json").read_text())["hm3"]["refit"]
    assert meta["without_bf16"] == {"max_texts": 30} and meta["precision"] == "float32"
    assert {meta["groups"][g]["texts"] for g in ("a", "b")} == {30}
    assert "`refit.without_bf16` settings replaced" in (slow / "README.md").read_text()
    # the same bytes as a recipe that says those settings itself
    plain = dict(r, refit={**{k: v for k, v in r["refit"].items() if k not in ("precision", "without_bf16")},
                           "max_texts": 30})
    ref = hm3.merge(plain, tmp_path / "plain", progress=False).path
    assert (slow / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    monkeypatch.setattr(fp, "bf16_is_fast", lambda: True)  # bf16 here: the recipe's own settings
    fast = hm3.merge(r, tmp_path / "fast", progress=False).path
    meta = json.loads((fast / "config.json").read_text())["hm3"]["refit"]
    assert "without_bf16" not in meta and meta["precision"] == "bfloat16"
    assert {meta["groups"][g]["texts"] for g in ("a", "b")} == {80}
    from hm3.config import load_config

    empty = load_config({**r, "refit": {**r["refit"], "without_bf16": {}}}).refit
    assert empty.for_precision("float32") is empty  # nothing to replace: the recipe's own re-fit, not a copy


def test_without_amx_replaces_the_refit_settings_only_where_auto_runs_bf16_without_amx(
        tiny, tmp_path, recipe, data, monkeypatch):
    import hm3.fastpaths as fp

    r = _ties(recipe, mode="distill", precision="auto")
    r["data"] = {"texts": {"a": data["a_text"], "b": data["b_text"]}}
    r["refit"]["without_amx"] = {"max_texts": {"a": 30}}  # b: the default (500: all its 80 texts)
    monkeypatch.setattr(fp, "bf16_is_fast", lambda: True)
    monkeypatch.setattr(fp, "has_amx", lambda: False)  # AVX512-BF16 only: the cheaper re-fit
    cheap = hm3.merge(r, tmp_path / "cheap", progress=False).path
    meta = json.loads((cheap / "config.json").read_text())["hm3"]["refit"]
    assert meta["without_amx"] == {"max_texts": {"a": 30}} and meta["precision"] == "bfloat16"
    assert (meta["groups"]["a"]["texts"], meta["groups"]["b"]["texts"]) == (30, 80)
    assert "bfloat16 without AMX tiles" in (cheap / "README.md").read_text()
    assert "`refit.without_amx` settings replaced" in (cheap / "README.md").read_text()
    # the same bytes as a recipe that says those settings itself
    plain = dict(r, refit={**{k: v for k, v in r["refit"].items() if k != "without_amx"},
                           "precision": "bfloat16", "max_texts": {"a": 30}})
    ref = hm3.merge(plain, tmp_path / "plain", progress=False).path
    assert (cheap / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    for amx, fast, precision in ((True, True, "bfloat16"), (False, False, "float32")):  # AMX; no bf16 at all
        monkeypatch.setattr(fp, "has_amx", lambda: amx)
        monkeypatch.setattr(fp, "bf16_is_fast", lambda: fast)
        own = hm3.merge(r, tmp_path / f"own-{precision}", progress=False).path
        meta = json.loads((own / "config.json").read_text())["hm3"]["refit"]
        assert "without_amx" not in meta and meta["precision"] == precision
        assert {meta["groups"][g]["texts"] for g in ("a", "b")} == {80}


def test_a_recipe_with_both_tiers_takes_the_one_of_its_cpu(recipe, data):
    from hm3.config import load_config

    r = _ties(recipe, mode="distill", data={"a": data["a_text"]}, precision="auto")
    r["refit"].update(max_texts=80, without_bf16={"max_texts": 10, "body": None}, without_amx={"max_texts": 40},
                      body={"epochs": 2})
    rc = load_config(r).refit
    cpus = (("bfloat16", True), ("bfloat16", False), ("float32", True), ("float32", False))
    assert [rc.tier(p, amx) for p, amx in cpus] == [None, "without_amx", "without_bf16", "without_bf16"]
    assert rc.for_precision("bfloat16") is rc
    no_amx, no_bf16 = rc.for_precision("bfloat16", amx=False), rc.for_precision("float32")
    assert (no_amx.max_texts, no_amx.body.epochs, no_amx.without_amx, no_amx.without_bf16) == (40, 2, None, None)
    assert (no_bf16.max_texts, no_bf16.body) == (10, None)


@pytest.mark.parametrize("refit, match", [
    ({"precision": "float32", "without_bf16": {"max_texts": 30}}, "without_bf16 needs precision: auto"),
    ({"precision": "bfloat16", "without_amx": {"max_texts": 30}}, "without_amx needs precision: auto"),
    ({"precision": "auto", "without_amx": {"groups": ["a"]}}, "without_amx cannot set groups"),
    ({"precision": "auto", "without_amx": {"max_texts": {"a": 0}}},
     "without_amx makes an invalid re-fit: max_texts"),
    ({"precision": "auto", "without_bf16": {"data": {"a": "x.jsonl"}}}, "without_bf16 cannot set data"),
    ({"precision": "auto", "without_bf16": {"max_texts": 0}}, "without_bf16 makes an invalid re-fit: max_texts"),
    ({"precision": "auto", "without_bf16": {"body": {"epochs": 1, "speed": 2}}}, "without_bf16 makes an invalid re-fit: body.speed: unknown key"),
])
def test_without_bf16_is_checked_when_the_recipe_loads(recipe, data, refit, match):
    from hm3.config import load_config

    r = _ties(recipe, mode="distill", data={"a": data["a_text"]})
    r["refit"].update(refit)
    with pytest.raises(HM3Error, match=match):
        load_config(r)


def test_cross_texts_distil_each_group_on_the_other_groups_texts_too(tiny, tmp_path, recipe, data):
    r = _ties(recipe, mode="distill", data={"a": data["a_text"], "b": data["b_text"]}, cross_texts=40)
    res = hm3.merge(r, tmp_path / "m", progress=False)
    meta = json.loads((res.path / "config.json").read_text())["hm3"]["refit"]
    for group in ("a", "b"):
        assert meta["groups"][group]["texts"] == 80 + 40 and meta["groups"][group]["other_groups_texts"] == 40
    distinct = {json.loads(line)["text"] for f in (data["a_text"], data["b_text"]) for line in open(f)}
    assert meta["features"]["texts"] == len(distinct)  # each text's features computed once
    merged = hm3.load(res.path)
    # group a's head now follows its teacher on group b's domain too (and the other way round)
    for group, other in (("a", TASK_B), ("b", TASK_A)):
        texts = [t for t, _ in other.sample(200, seed=98)]
        teacher = next(iter(hm3.load(tiny[group]).predict_proba(texts).values())).argmax(1)
        student = merged.predict_proba(texts, groups=[group])[group].argmax(1)
        assert float((teacher == student).mean()) >= 0.9, group
    with pytest.raises(HM3Error, match="cross_texts needs mode: distill"):
        hm3.merge(_ties(recipe, data={"a": data["a"]}, cross_texts=10), progress=False)


def test_max_texts_per_group(tiny, tmp_path, recipe, data):
    """``max_texts: {group: n}``: each group's own sample (and so the first of them, the cross texts of
    the others) has its own size; groups not named take the default."""
    from hm3.refit import MAX_TEXTS

    r = _ties(recipe, mode="distill", data={"a": data["a_text"], "b": data["b_text"]}, cross_texts=10,
              max_texts={"a": 25})
    meta = json.loads((hm3.merge(r, tmp_path / "m", progress=False).path / "config.json").read_text())["hm3"]["refit"]
    assert 80 < MAX_TEXTS
    assert meta["groups"]["a"]["texts"] == 25 + 10 and meta["groups"]["b"]["texts"] == 80 + 10
    assert meta["features"]["texts"] == 25 + 80
    for bad, pattern in (({"c": 5}, r"max_texts names groups \['c'\] that are not re-fitted \(re-fitted: a, b\)"),
                         ({"a": 0}, "max_texts must be a positive integer or a mapping of groups to them")):
        with pytest.raises(HM3Error, match=pattern):
            hm3.merge(_ties(recipe, mode="distill", data={"a": data["a_text"], "b": data["b_text"]}, max_texts=bad),
                      tmp_path / "bad", progress=False)


def test_extra_texts_distil_a_head_on_a_domain_no_group_of_the_refit_has(tiny, tmp_path, recipe, data):
    """Only group a is re-fitted, on its own texts plus 40 of an unlabelled file of group b's domain:
    its head then follows its teacher there as well."""
    plain = hm3.load(hm3.merge(_ties(recipe, mode="distill", data={"a": data["a_text"]}), tmp_path / "own",
                               progress=False).path)
    r = _ties(recipe, mode="distill", data={"a": data["a_text"]}, cross_texts=40, extra_texts=[data["b_text"]])
    res = hm3.merge(r, tmp_path / "m", progress=False)
    meta = json.loads((res.path / "config.json").read_text())["hm3"]["refit"]["groups"]["a"]
    assert meta["texts"] == 80 + 40 and meta["other_groups_texts"] == 40
    assert meta["extra_texts"] == {data["b_text"]: 40}
    texts = [t for t, _ in TASK_B.sample(200, seed=97)]
    teacher = next(iter(hm3.load(tiny["a"]).predict_proba(texts).values()))
    student = {name: m.predict_proba(texts, groups=["a"])["a"] for name, m in (("own", plain), ("extra", hm3.load(res.path)))}
    agree = {name: float((teacher.argmax(1) == p.argmax(1)).mean()) for name, p in student.items()}
    gap = {name: float(np.abs(teacher - p).mean()) for name, p in student.items()}  # probabilities, not just decisions
    assert agree["extra"] >= 0.9 and gap["extra"] < gap["own"], (agree, gap)
    with pytest.raises(HM3Error, match="extra_texts needs cross_texts > 0"):
        hm3.merge(_ties(recipe, mode="distill", data={"a": data["a_text"]}, extra_texts=[data["b_text"]]),
                  progress=False)
    with pytest.raises(HM3Error, match="nowhere.jsonl"):
        hm3.merge(_ties(recipe, mode="distill", data={"a": data["a_text"]}, cross_texts=5,
                        extra_texts=[str(tmp_path / "nowhere.jsonl")]), tmp_path / "x", progress=False)


def test_extra_texts_with_a_count_per_file(tiny, tmp_path, recipe, data):
    """{file: n}: n texts of that file whatever cross_texts is (0 here: no other group's texts), the same
    texts a list with cross_texts n draws; bad counts and a labelled re-fit are refused."""
    a_only = {"a": data["a_text"]}
    meta = {}
    for name, extra in (("mapped", dict(extra_texts={data["b_text"]: 15})),
                        ("listed", dict(extra_texts=[data["b_text"]], cross_texts=15))):
        res = hm3.merge(_ties(recipe, mode="distill", data=a_only, **extra), tmp_path / name, progress=False)
        meta[name] = json.loads((res.path / "config.json").read_text())["hm3"]["refit"]["groups"]["a"]
        assert meta[name]["texts"] == 80 + 15 and meta[name]["other_groups_texts"] == 15, meta[name]
        assert meta[name]["extra_texts"] == {data["b_text"]: 15}
    ma, li = (hm3.load(tmp_path / n).predict_proba([t for t, _ in TASK_B.sample(20, seed=5)])["a"]
              for n in ("mapped", "listed"))
    np.testing.assert_allclose(ma, li, atol=1e-6)  # the same 15 texts
    import yaml

    from hm3.config import load_config

    rel = _ties(recipe, mode="distill", data=a_only, extra_texts={Path(data["b_text"]).name: 15})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rel))  # paths relative to the recipe, as every path
    assert load_config(tmp_path / "r.yaml").refit.extra_texts == {str(Path(data["b_text"]).resolve()): 15}
    for bad, pattern in (({"mode": "distill", "extra_texts": {data["b_text"]: 0}}, "count must be a positive integer"),
                         ({"mode": "labelled", "extra_texts": {data["b_text"]: 5}}, "extra_texts needs mode: distill")):
        with pytest.raises(HM3Error, match=pattern):
            hm3.merge(_ties(recipe, data=a_only, **bad), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_label_weight_one_is_the_labelled_refit_and_mixes_in_between(tiny, tmp_path, recipe, data):
    """label_weight 1: the targets are the one-hot labels, so the distilled fit is the labelled one
    (same objective, same C; three labels: with two, scikit-learn's binary fit penalises its one vector
    differently); 0.5 lands between the teacher's and the labels' fits."""
    texts = [t for t, _ in TASK_B.sample(150, seed=96)]
    probs = {}
    for name, refit in [("labelled", dict(data={"b": data["b"]}, c=1.0)),
                        ("distill", dict(mode="distill", data={"b": data["b"]}, c=1.0)),
                        ("w1", dict(mode="distill", data={"b": data["b"]}, c=1.0, label_weight=1.0)),
                        ("w05", dict(mode="distill", data={"b": data["b"]}, c=1.0, label_weight=0.5))]:
        res = hm3.merge(_ties(recipe, **refit), tmp_path / name, progress=False)
        probs[name] = hm3.load(res.path).predict_proba(texts, groups=["b"])["b"]
        meta = json.loads((res.path / "config.json").read_text())["hm3"]["refit"]["groups"]["b"]
        assert meta.get("label_weight", 0.0) == refit.get("label_weight", 0.0)
    np.testing.assert_allclose(probs["w1"], probs["labelled"], atol=5e-3)
    assert np.abs(probs["distill"] - probs["labelled"]).mean() > 0.01  # the teacher is not the labels here
    mid = np.abs(probs["w05"] - probs["labelled"]).mean()
    assert 0 < mid < np.abs(probs["distill"] - probs["labelled"]).mean()
    with pytest.raises(HM3Error, match="label_weight needs mode: distill"):
        hm3.merge(_ties(recipe, data={"a": data["a"]}, label_weight=0.5), progress=False)
    with pytest.raises(HM3Error, match=r'a\.txt\.jsonl:1: label_weight 0\.5 \(it mixes .* or set it to 0\) needs a field "label"'):
        hm3.merge(_ties(recipe, mode="distill", data={"a": data["a_text"]}, label_weight=0.5), tmp_path / "x",
                  progress=False)


def test_refit_errors_name_the_file_and_the_fix(tiny, tmp_path, recipe, data):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "w1 w2", "label": "purple"}) + "\n")
    with pytest.raises(HM3Error, match=r"bad\.jsonl: group 'a' has no label 'purple'; its labels are neg, pos"):
        hm3.merge(_ties(recipe, data={"a": str(bad)}), progress=False)
    one_label = tmp_path / "one.jsonl"
    one_label.write_text("".join(json.dumps({"text": f"w{i} w3", "label": "pos"}) + "\n" for i in range(10)))
    with pytest.raises(HM3Error, match=r"no training texts for labels \['neg'\]"):
        hm3.merge(_ties(recipe, data={"a": str(one_label)}), progress=False)
    with pytest.raises(HM3Error, match=r"refit.data: unknown groups \['zzz'\]"):
        hm3.merge(_ties(recipe, data={"zzz": data["a"]}), progress=False)
    unlabelled = _ties(recipe, data={"a": data["a_text"]})
    with pytest.raises(HM3Error, match='needs a field "label"'):
        hm3.merge(unlabelled, progress=False)
    with pytest.raises(HM3Error, match="c must be a positive number"):
        hm3.merge(_ties(recipe, data={"a": data["a"]}, c=-1), progress=False)


# -- command ---------------------------------------------------------------------------------------
def test_truncate_fits_each_text_on_its_first_window_only(tiny, tmp_path, recipe):
    # texts of 3 samples each (26 tokens with [CLS]/[SEP]): 3 windows of 16 tokens (stride 6), or the first only
    rows = [{"text": " ".join(t for t, _ in TASK_A.sample(3, seed=100 + i)), "label": TASK_A.labels[y]}
            for i, (_, y) in enumerate(TASK_A.sample(60, seed=31))]
    for i, r in enumerate(rows):  # the label of the first 14 words: what the truncated text shows
        r["label"] = TASK_A.labels[TASK_A.sample(3, seed=100 + i)[0][1]]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metas, weights = {}, {}
    for truncate in (False, True):
        res = hm3.merge(_ties(recipe, data={"a": str(path)}, max_length=16, truncate=truncate, c=1.0),
                        tmp_path / f"t{truncate}", progress=False)
        metas[truncate] = json.loads((res.path / "config.json").read_text())["hm3"]["refit"]
        weights[truncate] = hm3.load(res.path).model.classifier.weight[:2].detach().clone()
        card = (res.path / "README.md").read_text()
        assert ("the first 16 tokens of each of 60 texts" in card) == truncate
    assert metas[True]["truncate"] is True and metas[False]["truncate"] is False
    assert metas[True]["features"]["windows"] == metas[True]["features"]["texts"] == 60
    assert metas[False]["features"]["windows"] > 2 * 60
    assert not torch.equal(weights[True], weights[False])


def test_refit_command(tiny, tmp_path, recipe, data):
    from typer.testing import CliRunner

    from hm3.cli import app

    merged = hm3.merge(_ties(recipe), tmp_path / "merged", progress=False).path
    out = tmp_path / "refitted"
    runner = CliRunner()
    res = runner.invoke(app, ["refit", str(merged), "--data", f"a={data['a']}", "--data", f"b={data['b_text']}",
                              "--distill-from", f"b={tiny['b']}", "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "re-fitted a (labelled" in res.output and "b (distill" in res.output
    meta = json.loads((out / "config.json").read_text())["hm3"]
    assert meta["groups"] == json.loads((merged / "config.json").read_text())["hm3"]["groups"]
    assert set(meta["refit"]["groups"]) == {"a", "b"}
    assert hm3.load(out).groups == ["a", "b"]

    again = runner.invoke(app, ["refit", str(merged), "--data", f"a={data['a']}", "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    orphan = runner.invoke(app, ["refit", str(merged), "--data", f"a={data['a']}", "--distill-from",
                                 f"b={tiny['b']}", "-o", str(tmp_path / "x")])
    assert orphan.exit_code == 2 and "--distill-from: groups ['b'] have no --data" in orphan.output
    assert not (tmp_path / "x").exists()
    half = runner.invoke(app, ["refit", str(merged), "--data", f"a={data['a']}", "--precision", "half",
                               "-o", str(tmp_path / "h")])
    assert half.exit_code == 2 and "unknown precision 'half'; valid: float32, bfloat16, auto" in half.output
    assert not (tmp_path / "h").exists()
    first = runner.invoke(app, ["refit", str(merged), "--data", f"a={data['a']}", "--max-length", "16", "--truncate",
                                "-o", str(tmp_path / "f"), "--no-progress"])
    assert first.exit_code == 0, first.output
    assert json.loads((tmp_path / "f" / "config.json").read_text())["hm3"]["refit"]["truncate"] is True
    base = ["refit", str(merged), "--data", f"a={data['a_text']}", "--distill-from", f"a={tiny['a']}", "--no-progress"]
    counted = runner.invoke(app, base + ["--extra-texts", f"{data['b_text']}=12", "-o", str(tmp_path / "e")])
    assert counted.exit_code == 0, counted.output
    group = json.loads((tmp_path / "e" / "config.json").read_text())["hm3"]["refit"]["groups"]["a"]
    assert group["extra_texts"] == {data["b_text"]: 12} and group["texts"] == 80 + 12
    for opts, message in (([data["b_text"]], "how many of its texts? Give FILE=N or --cross-texts N"),
                          ([f"{data['b_text']}=0"], "N must be a positive number of texts")):
        bad = runner.invoke(app, base + ["--extra-texts", *opts, "-o", str(tmp_path / "eb")])
        assert bad.exit_code == 2 and message in bad.output, bad.output
    assert not (tmp_path / "eb").exists()


def test_refit_dir_on_a_single_classifier(tiny, tmp_path, data):
    report = refit_dir(tiny["a"], [GroupRefit("a", Path(data["a"]))], tmp_path / "single", c=1.0)
    assert report.groups["a"]["c"] == 1.0 and report.groups["a"]["validation"] == "none (fixed C)"
    clf = hm3.load(tmp_path / "single")
    assert clf.groups == ["a"] and accuracy(clf, "a", TASK_A) >= 0.9


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_features_are_what_feeds_the_output_layer(family):
    """BERT: the pooler output; DistilBERT: after pre_classifier and ReLU (eval: no dropout)."""
    from transformers import AutoModelForSequenceClassification

    from hm3.merging.stats import window_outputs
    from hm3.testing import tiny_config, tiny_tokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family, num_labels=3)).eval()
    tok = tiny_tokenizer()
    texts = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9"]
    ids = tok(texts)["input_ids"]
    feats, logits = window_outputs(model, ids, batch_size=2, pad=tok.pad_token_id)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        if family == "bert":
            expected = model.bert(**enc).pooler_output
        else:
            cls = model.distilbert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[0][:, 0]
            expected = torch.relu(model.pre_classifier(cls))
        expected_logits = model(**({k: v for k, v in enc.items() if k != "token_type_ids"})).logits
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(feats @ model.classifier.weight.T + model.classifier.bias, logits, atol=1e-5, rtol=1e-4)
