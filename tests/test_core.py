"""The HM3 merge end to end on tiny BERTs: label spaces, output format, inference, reproducibility."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import hm3
from hm3.errors import HM3Error
from hm3.labels import LabelSpace, clean_labels, is_uninformative
from hm3.testing import TASK_A, TASK_B, accuracy


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- labels --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["LABEL_0", "label_1", "LABEL2", "Label-3", "label 4"])
def test_uninformative_names_are_detected(name):
    assert is_uninformative(name)


@pytest.mark.parametrize("name", ["benign", "label", "labels_0", "jailbreak", "LABEL_X"])
def test_informative_names_are_kept(name):
    assert not is_uninformative(name)


def test_clean_labels_replaces_uninformative_and_honours_override():
    assert clean_labels("jb", ["LABEL_0", "jailbreak"]) == ["jb_0", "jailbreak"]
    assert clean_labels("jb", ["LABEL_0", "LABEL_1"], ["benign", "jailbreak"]) == ["benign", "jailbreak"]
    with pytest.raises(HM3Error, match="lists 1 names but the model's head has 2"):
        clean_labels("jb", ["LABEL_0", "LABEL_1"], ["benign"])


def test_label_space_rows_and_qualified_names():
    space = LabelSpace([("jailbreak", ["benign", "jailbreak"]), ("toxicity", ["hate", "normal", "offensive"])])
    assert space.total == 5
    assert space["toxicity"].rows == slice(2, 5)
    # Two groups may share a label name; qualified names keep them apart.
    space2 = LabelSpace([("a", ["normal", "x"]), ("b", ["normal", "y"])])
    assert list(space2.id2label().values()) == ["a/normal", "a/x", "b/normal", "b/y"]
    assert LabelSpace.from_json(space.to_json()) == space
    with pytest.raises(HM3Error, match="duplicate group"):
        LabelSpace([("a", ["x"]), ("a", ["y"])])


# -- output format -----------------------------------------------------------------------------------
def test_merged_directory_is_an_ordinary_transformers_classifier(tiny, recipe, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "merged"
    result = hm3.merge(recipe("ties", density=0.5), out, progress=False)
    assert result.path == out
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 5
    assert list(model.config.id2label.values()) == ["a/neg", "a/pos", "b/red", "b/green", "b/blue"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hm3"]["groups"] == [{"name": "a", "labels": ["neg", "pos"]}, {"name": "b", "labels": ["red", "green", "blue"]}]
    assert cfg["hm3"]["method"] == "ties"
    assert cfg["hm3"]["recipe"]["models"][0]["parameters"]["density"] == 0.5
    card = (out / "README.md").read_text()
    assert "ties" in card and "| a | neg, pos |" in card and "seed 0" in card
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(tiny["a"]).get_vocab()
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob(".merged.tmp-*"))


def test_existing_output_is_refused_unless_forced(recipe, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(HM3Error, match="already exists"):
        hm3.merge(recipe(), out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    # force replaces the directory as a whole: never one that holds other files than a model
    with pytest.raises(HM3Error, match="holds 'keep.txt', which is not a model"):
        hm3.merge(recipe(), out, force=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    hm3.merge(recipe(), out, force=True, progress=False)  # empty: written
    (out / "stale.txt").write_text("left by an older merge")
    hm3.merge(recipe(), out, force=True, progress=False)  # a model directory: replaced whole
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


def test_uninformative_labels_are_renamed_in_the_merge(tiny, tmp_path):
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny["base"]),
        "models": [{"model": str(tiny["a"]), "group": "a"}, {"model": str(tiny["c"])}],
    }
    hm3.merge(cfg, tmp_path / "m", progress=False)
    clf = hm3.load(tmp_path / "m")
    assert clf.space["c"].labels == ("c_0", "c_1")  # group name defaults to the directory name
    cfg["models"][1]["labels"] = ["cold", "hot"]
    hm3.merge(cfg, tmp_path / "m2", progress=False)
    assert hm3.load(tmp_path / "m2").space["c"].labels == ("cold", "hot")


# -- inference -------------------------------------------------------------------------------------
def test_group_scores_sum_to_one_and_predict_shape(recipe, tmp_path):
    hm3.merge(recipe("dare_ties", density=0.7), tmp_path / "m", progress=False)
    clf = hm3.load(tmp_path / "m")
    texts = [s for s, _ in TASK_A.sample(10)] + [""]
    probs = clf.predict_proba(texts)
    assert set(probs) == {"a", "b"}
    for g, p in probs.items():
        assert p.shape == (len(texts), clf.space[g].size)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    preds = clf.predict(texts, groups=["b"])
    assert len(preds) == len(texts) and set(preds[0]) == {"b"}
    assert preds[0]["b"].label in ("red", "green", "blue")
    with pytest.raises(HM3Error, match="unknown group 'zzz'"):
        clf.predict(texts, groups=["zzz"])


def test_single_classifier_loads_as_one_group(tiny):
    clf = hm3.load(tiny["a"])
    assert clf.groups == ["a"] and clf.space["a"].labels == ("neg", "pos")
    assert accuracy(clf, "a", TASK_A) >= 0.95


def test_long_texts_are_windowed_not_truncated(tiny):
    clf = hm3.load(tiny["a"], stride=8)
    assert clf.max_length == 64
    # The only marker word sits at the very end of a 300-word text: truncation would lose it.
    filler = " ".join(["w50"] * 300)
    wins, owner = clf.windows([filler + " w3", "w0 w50"])
    assert owner.count(0) > 4 and owner.count(1) == 1
    assert all(len(w) <= 64 for w in wins)
    assert wins[owner.index(0) + owner.count(0) - 1][-2] == clf.tokenizer.convert_tokens_to_ids("w3")
    # mean: average of the window distributions; max: renormalised per-label maximum.
    mean = clf.predict_proba([filler + " w3"])["a"][0]
    logits = clf.window_logits([wins[i] for i, o in enumerate(owner) if o == 0])
    p = torch.softmax(logits, dim=-1)
    np.testing.assert_allclose(mean, p.mean(0).numpy(), atol=1e-5)
    mx = hm3.load(tiny["a"], stride=8, aggregate="max").predict_proba([filler + " w3"])["a"][0]
    np.testing.assert_allclose(mx, (p.max(0).values / p.max(0).values.sum()).numpy(), atol=1e-5)


# -- merge semantics on whole models -----------------------------------------------------------------
def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("method,params", [("task_arithmetic", {"weight": 1.0}), ("ties", {"weight": 1.0, "density": 1.0})])
def test_a_model_merged_alone_reproduces_itself(tiny, tmp_path, method, params):
    cfg = {"merge_method": method, "base_model": str(tiny["base"]), "models": [{"model": str(tiny["a"]), "parameters": params}]}
    hm3.merge(cfg, tmp_path / "m", progress=False)
    merged, orig = _tensors(tmp_path / "m"), _tensors(tiny["a"])
    assert set(merged) == set(orig)
    for name in orig:
        torch.testing.assert_close(merged[name], orig[name], atol=1e-6, rtol=0)
    texts = [s for s, _ in TASK_A.sample(20)]
    np.testing.assert_allclose(hm3.load(tmp_path / "m").predict_proba(texts)["a"], hm3.load(tiny["a"]).predict_proba(texts)["a"], atol=1e-5)


def test_seeded_merge_is_byte_identical_whatever_the_global_rng(recipe, tmp_path):
    torch.manual_seed(1)
    hm3.merge(recipe("dare_ties", density=0.3), tmp_path / "m1", progress=False)
    torch.manual_seed(999)
    torch.rand(1000)
    hm3.merge(recipe("dare_ties", density=0.3), tmp_path / "m2", progress=False)
    assert sha(tmp_path / "m1" / "model.safetensors") == sha(tmp_path / "m2" / "model.safetensors")
    other = recipe("dare_ties", density=0.3)
    other["seed"] = 1
    hm3.merge(other, tmp_path / "m3", progress=False)
    assert sha(tmp_path / "m1" / "model.safetensors") != sha(tmp_path / "m3" / "model.safetensors")


def test_heads_keep_their_rows_by_default(tiny, recipe, tmp_path):
    """Head density defaults to 1.0: TIES at density 0.2 still keeps every head value."""
    hm3.merge(recipe("ties", density=0.2), tmp_path / "m", progress=False)
    merged, a, b = _tensors(tmp_path / "m"), _tensors(tiny["a"]), _tensors(tiny["b"])
    torch.testing.assert_close(merged["classifier.weight"][:2], a["classifier.weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(merged["classifier.weight"][2:], b["classifier.weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(merged["classifier.bias"][2:], b["classifier.bias"], atol=1e-6, rtol=0)


def test_distilbert_pre_classifier_is_merged_and_loadable(tmp_path):
    """DistilBERT's task-specific pre_classifier is shared by all groups: merged like the body
    (density 1), averaged when the base has none; the output stays an ordinary checkpoint."""
    from transformers import AutoModelForSequenceClassification

    from hm3.testing import tiny_base, tiny_finetune

    base = tiny_base(tmp_path / "base", family="distilbert")
    a = tiny_finetune(base, tmp_path / "a", TASK_A, steps=20)
    b = tiny_finetune(base, tmp_path / "b", TASK_B, steps=20, seed=1)
    cfg = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(a), "parameters": {"density": 0.5}}, {"model": str(b), "parameters": {"density": 0.5}}]}
    hm3.merge(cfg, tmp_path / "m", progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert type(model).__name__ == "DistilBertForSequenceClassification" and model.config.num_labels == 5
    merged, ta, tb = _tensors(tmp_path / "m"), _tensors(a), _tensors(b)
    torch.testing.assert_close(merged["pre_classifier.weight"], (ta["pre_classifier.weight"] + tb["pre_classifier.weight"]) / 2)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "pre_classifier" in card and "re-fit" in card


def test_a_model_not_fine_tuned_from_the_base_is_flagged(tmp_path, caplog):
    """Same shapes and vocabulary, but another initialisation: the merge goes ahead (the user may mean
    it) with a warning, in the log and the model card, that names the model and its distance."""
    from hm3.merging.engine import FAR_FROM_BASE, prepare
    from hm3.testing import synthetic_classifier, tiny_base

    base = tiny_base(tmp_path / "base")
    small = lambda t, g: t + torch.randn(t.shape, generator=g) * 1e-3  # noqa: E731  a fine-tune's few percent
    near = synthetic_classifier(base, tmp_path / "near", ["x", "y"], seed=1, delta=small)
    other = synthetic_classifier(tiny_base(tmp_path / "other-base", seed=1), tmp_path / "other", ["p", "q"], seed=2,
                                 delta=small)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": str(near), "group": "near"}, {"model": str(other), "group": "other"}]}
    assert prepare({**recipe, "models": recipe["models"][:1]}).notes == []
    with caplog.at_level("WARNING", logger="hm3.merging.engine"):
        hm3.merge(recipe, tmp_path / "m", progress=False)
    flagged = [r.getMessage() for r in caplog.records if "fine-tuned from this base" in r.getMessage()]
    assert len(flagged) == 1 and flagged[0].startswith(f"{other}: its weights are ")
    share = float(flagged[0].split("its weights are ")[1].split("%")[0]) / 100
    assert share > 1.0 > FAR_FROM_BASE  # two independent initialisations: ~√2 apart
    assert flagged[0] in (tmp_path / "m" / "README.md").read_text()
