"""The in-memory merge engine gives exactly hm3.merge's tensors; the token cache gives predict_proba's labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hm3
from hm3.errors import HM3Error
from hm3.merging.engine import prepare
from hm3.merging.fast import TaskVectors, TokenCache, recipe_with
from hm3.testing import TASK_A, TASK_B, tiny_base, tiny_finetune


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast")
    base = tiny_base(d / "base")
    a = tiny_finetune(base, d / "a", TASK_A, steps=30)
    b = tiny_finetune(base, d / "b", TASK_B, steps=30)
    return {"dir": d, "base": base, "a": a, "b": b}


def recipe(models, method="dare_ties", **params):
    return {"merge_method": method, "base_model": str(models["base"]), "seed": 3,
            "models": [{"model": str(models["a"]), "group": "a", "parameters": {"density": 0.5, "weight": 1.0}},
                       {"model": str(models["b"]), "group": "b", "parameters": {"density": 0.5, "weight": 1.0}}],
            "parameters": params}


@pytest.mark.parametrize(
    "method, overrides, seed",
    [
        ("dare_ties", {"density": [0.3, 0.7], "weight": [0.8, 1.2]}, None),
        ("dare_ties", {"density": 0.2}, 11),
        ("ties", {"density": [0.25, 0.6], "weight": [1.0, 0.5]}, None),
        ("dare_linear", {"density": [0.4, 0.9]}, 5),
        ("della", {"density": [0.5, 0.6]}, None),
        ("task_arithmetic", {"weight": [0.7, 0.9], "lambda": 0.8}, None),
    ],
)
def test_merge_into_equals_hm3_merge_of_the_written_recipe(models, method, overrides, seed):
    tv = TaskVectors.from_prepared(prepare(recipe(models, method)))
    model = tv.merge_into(tv.new_model(), overrides, seed)
    reference = hm3.merge(recipe_with(tv.prep.config, overrides, seed), progress=False).state
    got = model.state_dict()
    assert set(reference) <= set(got)
    for name, t in reference.items():
        assert torch.equal(got[name], t), name
    # a second merge into the same (already filled) model overwrites every value
    other = tv.merge_into(model, {"density": 0.8, "weight": 1.0} if method != "task_arithmetic" else {"weight": 1.0})
    assert any(not torch.equal(other.state_dict()[n], reference[n]) for n in reference)
    tv.merge_into(model, overrides, seed)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in reference.items())


@pytest.mark.parametrize("workers", ["1", "2"])
def test_merge_into_copies_in_the_merging_threads(models, monkeypatch, workers):
    """With one or two merge threads (each copying its tensors into the model), the same tensors;
    a model whose tensor has another shape is refused by name."""
    monkeypatch.setenv("HM3_MERGE_WORKERS", workers)
    tv = TaskVectors.from_prepared(prepare(recipe(models, "ties")))
    reference = hm3.merge(tv.recipe(), progress=False).state
    model = tv.merge_into(tv.new_model())
    assert all(torch.equal(model.state_dict()[n], t) for n, t in reference.items())
    wrong = tv.new_model()
    wrong.classifier.weight = torch.nn.Parameter(torch.zeros(3, wrong.classifier.weight.shape[1]))
    with pytest.raises(HM3Error, match=r"tensor 'classifier.weight': model has shape \(3, "):
        tv.merge_into(wrong)


def test_with_method_and_recipe(models):
    tv = TaskVectors.from_prepared(prepare(recipe(models, "dare_ties")))
    ties = tv.with_method("ties")
    assert ties.prep.method.name == "ties" and ties.entries is tv.entries
    cfg = ties.recipe({"density": [0.3, 0.6], "weight": [1.0, 0.9], "lambda": 1.1}, seed=9)
    assert cfg.merge_method == "ties" and cfg.seed == 9
    assert [m.parameters["density"] for m in cfg.models] == [0.3, 0.6]
    assert cfg.parameters["lambda"] == 1.1
    direct = hm3.merge(cfg, progress=False).state
    model = ties.merge_into(ties.new_model(), {"density": [0.3, 0.6], "weight": [1.0, 0.9], "lambda": 1.1}, 9)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in direct.items())
    with pytest.raises(HM3Error, match="unknown merge method 'nope'"):
        tv.with_method("nope")


def test_refit_recipes_are_refused(models):
    r = recipe(models)
    r["refit"] = {"mode": "labelled", "data": {}}
    with pytest.raises(HM3Error, match="refit"):
        TaskVectors.from_prepared(prepare(r))


@pytest.mark.parametrize("aggregate, max_length, chunks", [("mean", None, 1), ("mean", 16, 3), ("max", 16, 4)])
def test_token_cache_predicts_like_predict_proba(models, aggregate, max_length, chunks):
    tv = TaskVectors.from_prepared(prepare(recipe(models, "ties")))
    clf = tv.classifier(max_length=max_length, stride=4, aggregate=aggregate)
    tv.merge_into(clf.model, {"density": 0.6})
    texts = [t for t, _ in TASK_A.sample(20, seed=1)] + [t for t, _ in TASK_B.sample(20, seed=2, length=30)]
    cache = TokenCache(clf, texts, batch_size=7, chunks=chunks, seed=4)
    if max_length:
        assert cache.n_windows > len(texts)  # long texts were split into windows
    steps = list(cache.predict(clf.model, ["a", "b"]))
    assert len(steps) == chunks
    done, labels = steps[-1]
    assert done.all()
    ref = clf.predict_proba(texts, ["a", "b"])
    for g in ("a", "b"):
        np.testing.assert_array_equal(labels[g], ref[g].argmax(axis=1))
    if chunks > 1:  # partial results cover exactly the texts done so far
        first_done, first = list(cache.predict(clf.model, ["a"]))[0]
        assert 0 < first_done.sum() < len(texts)
        assert (first["a"][~first_done] == -1).all()
        np.testing.assert_array_equal(first["a"][first_done], ref["a"].argmax(axis=1)[first_done])


def test_token_cache_truncate_reads_first_window_only(models):
    tv = TaskVectors.from_prepared(prepare(recipe(models, "ties")))
    clf = tv.classifier(max_length=16, stride=4)
    tv.merge_into(clf.model, {"density": 0.6})
    texts = [t for t, _ in TASK_B.sample(12, seed=3, length=30)]
    cache = TokenCache(clf, texts, batch_size=5, truncate=True)
    assert cache.n_windows == len(texts) and cache.n_tokens == 16 * len(texts)
    _, labels = list(cache.predict(clf.model, ["b"]))[-1]
    heads = [" ".join(t.split()[:14]) for t in texts]  # 16 tokens = [CLS] + 14 words + [SEP]
    np.testing.assert_array_equal(labels["b"], clf.predict_proba(heads, ["b"])["b"].argmax(axis=1))


def test_token_cache_bf16_runs_under_autocast_and_stays_close(models):
    tv = TaskVectors.from_prepared(prepare(recipe(models, "ties")))
    clf = tv.classifier()
    tv.merge_into(clf.model, {"density": 0.6})
    texts = [t for t, _ in TASK_A.sample(20, seed=1)] + [t for t, _ in TASK_B.sample(20, seed=2)]
    fp32 = TokenCache(clf, texts, batch_size=8)
    bf16 = TokenCache(clf, texts, batch_size=8, precision="bfloat16")
    ref, got = fp32.chunk_logits(clf.model, fp32.chunks[0]), bf16.chunk_logits(clf.model, bf16.chunks[0])
    assert got.dtype == torch.float32 and not torch.equal(got, ref)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max() + 0.05
    assert all(p.dtype == torch.float32 for p in clf.model.parameters())
    with pytest.raises(HM3Error, match="unknown precision 'half'"):
        TokenCache(clf, texts, precision="half")
