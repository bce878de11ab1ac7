"""Every architecture hm3 claims (``hm3.heads.FAMILIES``) through merge, predict, the data-aware
statistics, the re-fit features and body distillation, on tiny random models of that family.

Before these tests only BERT and DistilBERT were exercised; DeBERTa's RegMean then failed (its
query/key projections also map the relative position embeddings, which the Gram hook masked like
tokens) and DeBERTa v1 crashed under bf16 autocast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import hm3
from hm3.errors import HM3Error
from hm3.heads import FAMILIES
from hm3.testing import tiny_config, tiny_tokenizer

TEXTS = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10 w11 w12", "w13 w14"]


def test_every_family_has_a_tiny_config():
    for model_type in FAMILIES:
        assert tiny_config(model_type).model_type == model_type


def _save(model, out: Path) -> Path:
    model.save_pretrained(str(out))
    tiny_tokenizer().save_pretrained(str(out))
    return out


def _classifier(base_model, family: str, labels: list[str], seed: int, noise: float):
    """A classifier of ``family`` whose body is ``base_model``'s plus N(0, noise²), with a random head."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = tiny_config(family, num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={v: i for i, v in enumerate(labels)})
    model = AutoModelForSequenceClassification.from_config(cfg)
    model.base_model.load_state_dict(base_model.state_dict(), strict=False)  # a classifier's body may add a pooler
    with torch.no_grad():
        for p in model.base_model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """``(family, dir)``: a headless base; ``a``, fine-tuned (body noise); ``b``, the base's body with
    ``a``'s task-specific hidden head layer (if the family has one) and its own output layer;
    ``texts.txt`` for the data-aware steps."""
    from transformers import AutoModel

    fam = request.param
    d = tmp_path_factory.mktemp(fam)
    torch.manual_seed(0)
    base = AutoModel.from_config(tiny_config(fam))
    _save(base, d / "base")
    a = _classifier(base, fam, ["x", "y", "z"], seed=1, noise=0.02)
    b = _classifier(base, fam, ["p", "q"], seed=2, noise=0.0)
    with torch.no_grad():
        for name in FAMILIES[fam].hidden:
            b.get_parameter(name).copy_(a.get_parameter(name))
    _save(a, d / "a")
    _save(b, d / "b")
    (d / "texts.txt").write_text("\n".join(["w1 w2 w3", "w4 w5", "w6", "w7 w8 w9 w10", "w11 w12"] * 8) + "\n")
    return fam, d


def _recipe(d: Path, method: str, **extra) -> dict:
    return {"merge_method": method, "base_model": str(d / "base"), "seed": 0,
            "models": [{"model": str(d / "a"), "group": "a", "parameters": {"weight": 1.0}},
                       {"model": str(d / "b"), "group": "b", "parameters": {"weight": 1.0}}], **extra}


def _guard_probs(path: Path, texts=TEXTS) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    enc = tiny_tokenizer()(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    return torch.softmax(logits, -1).numpy()


def test_merged_group_answers_like_its_guard(family, tmp_path):
    """Task arithmetic with ``b``'s body equal to the base: the merged body is ``a``'s, so group ``a``
    answers exactly like ``a`` — in every family, whatever its head layout."""
    fam, d = family
    out = hm3.merge(_recipe(d, "task_arithmetic"), tmp_path / "m", progress=False).path
    clf = hm3.load(out)
    assert clf.model.config.model_type == fam
    assert type(clf.model).__name__ == FAMILIES[fam].cls
    got = np.asarray(clf.predict_proba(TEXTS, groups=["a"])["a"])
    np.testing.assert_allclose(got, _guard_probs(d / "a"), atol=1e-5)
    assert [p["b"].label in ("p", "q") for p in clf.predict(TEXTS)] == [True] * len(TEXTS)


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_data_aware_merge_of_identical_models_is_the_model(family, method, tmp_path):
    """The statistics of every layer of the family — RegMean's Gram matrices (DeBERTa: also of the
    relative position rows its attention projects), Fisher's squared gradients: merging ``a`` with
    itself gives ``a``'s body back."""
    fam, d = family
    recipe = _recipe(d, method, data={"texts": {"a": str(d / "texts.txt"), "b": str(d / "texts.txt")}})
    recipe["models"][1]["model"] = str(d / "a")
    recipe["models"][1]["labels"] = ["p", "q", "r"]
    out = hm3.merge(recipe, tmp_path / "m", progress=False).path
    merged = hm3.load(out).model.state_dict()
    a = hm3.load(d / "a").model.state_dict()
    prefix = hm3.load(d / "a").model.base_model_prefix + "."
    body = [k for k in a if k.startswith(prefix)]
    assert body
    for k in body:
        torch.testing.assert_close(merged[k], a[k], atol=2e-5, rtol=1e-4, msg=k)


def test_refit_features_feed_the_output_layer(family):
    """The re-fit's features are the output layer's input: features @ Wᵀ + b = the model's logits."""
    from hm3.merging.stats import out_module, window_outputs

    fam, d = family
    clf = hm3.load(d / "a")
    ids = clf.tokenizer(TEXTS)["input_ids"]
    feats, logits = window_outputs(clf.model, ids, batch_size=3, pad=clf.tokenizer.pad_token_id)
    out = out_module(clf.model)
    np.testing.assert_allclose(np.log(_guard_probs(d / "a")), torch.log_softmax(logits, -1).numpy(), atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(feats @ out.weight.T + out.bias, logits, atol=1e-5, rtol=1e-4)


def test_body_distillation_of_the_top_layer(family, tmp_path):
    """A distilled re-fit with ``body.layers: 1``: the family's encoder layer stack is found, the top
    layer trains and the ones below keep the merge's weights."""
    fam, d = family
    data = {"a": str(d / "texts.txt"), "b": str(d / "texts.txt")}
    plain = hm3.merge(_recipe(d, "task_arithmetic"), tmp_path / "plain", progress=False).path
    recipe = _recipe(d, "task_arithmetic", refit={"mode": "distill", "data": data, "max_texts": 40,
                                                  "body": {"epochs": 1, "layers": 1, "lr": 1e-3}})
    out = hm3.merge(recipe, tmp_path / "body", progress=False).path
    before, after = hm3.load(plain).model.state_dict(), hm3.load(out).model.state_dict()
    moved = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert any(".1." in k for k in moved), sorted(moved)  # the top of the two layers trained
    assert not any(".0." in k for k in moved), sorted(moved)  # the layer below did not


def test_bf16_forward_passes(family):
    """bf16 autocast runs every family that can; DeBERTa v1 is refused by name, and precision auto
    falls back to float32 for it."""
    from hm3.fastpaths import NO_BF16, accelerate, resolve_precision

    fam, d = family
    clf = hm3.load(d / "a")
    if fam in NO_BF16:
        with pytest.raises(HM3Error, match=f"{fam} models cannot run under bfloat16"):
            accelerate(clf, "bf16")
        assert resolve_precision("auto", fam) == "float32"
        with pytest.raises(HM3Error, match="cannot run under bfloat16"):
            resolve_precision("bfloat16", fam)
        return
    got = np.asarray(accelerate(clf, "bf16").predict_proba(TEXTS)["a"])
    np.testing.assert_allclose(got, _guard_probs(d / "a"), atol=0.05)


def test_deberta_v1_really_fails_under_bf16_autocast():
    """Why ``NO_BF16`` lists DeBERTa v1: if transformers fixes it, this fails and the entry can go."""
    from transformers import AutoModelForSequenceClassification

    from hm3.fastpaths import NO_BF16

    assert NO_BF16 == {"deberta"}
    model = AutoModelForSequenceClassification.from_config(tiny_config("deberta", num_labels=2)).eval()
    enc = tiny_tokenizer()(TEXTS, padding=True, return_tensors="pt")
    with pytest.raises(RuntimeError, match="overflow"), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])


def test_onnx_export_answers_like_torch(family, tmp_path):
    """The opt-in ONNX Runtime path exports every family and gives its fp32 answers, at every batch
    size and sequence length (one text per batch: each its own length)."""
    from hm3.fastpaths import accelerate

    fam, d = family
    clf = hm3.load(d / "a")
    attention = clf.model.config._attn_implementation
    fast = accelerate(clf, "onnx", cache_dir=tmp_path)
    assert clf.model.config._attn_implementation == attention  # exported as eager, then switched back
    for batch_size in (len(TEXTS), 1):
        got = np.asarray(fast.predict_proba(TEXTS, batch_size=batch_size)["a"])
        np.testing.assert_allclose(got, _guard_probs(d / "a"), atol=1e-5)


def test_search_engine_merges_like_hm3_merge(family):
    """The search's in-memory engine (TaskVectors, a preallocated model of the family) gives exactly
    ``hm3.merge``'s tensors — the hidden head layer and the DARE draws included."""
    from hm3.merging.engine import prepare
    from hm3.merging.fast import TaskVectors, recipe_with

    fam, d = family
    tv = TaskVectors.from_prepared(prepare(_recipe(d, "dare_ties")))
    overrides = {"density": [0.3, 0.6], "weight": [1.0, 0.8]}
    got = tv.merge_into(tv.new_model(), overrides, seed=7).state_dict()
    reference = hm3.merge(recipe_with(tv.prep.config, overrides, 7), progress=False).state
    assert set(reference) <= set(got)
    for name, t in reference.items():
        assert torch.equal(got[name], t), name
