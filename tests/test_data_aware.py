"""Data-aware merge methods (RegMean, Fisher, AdaMerging) and their cached statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import hm3
from hm3.errors import HM3Error
from hm3.merging.data_aware import adamerging, block_of, fisher, regmean
from hm3.merging.methods import REGISTRY, TensorParams
from hm3.testing import TASK_A, TASK_B


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HM3_CACHE", str(tmp_path / "cache"))


def _params(n: int, stats: dict, weight=None, **extra) -> TensorParams:
    return TensorParams(weight=tuple(weight or [1.0] * n), density=(1.0,) * n, extra=extra, stats=stats)


def _gram(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x


# -- RegMean ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_regmean_of_identical_models_is_the_model(alpha):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g)
    base = torch.randn(5, 7, generator=g)
    grams = torch.stack([_gram(torch.randn(30, 7, generator=g)) for _ in range(3)])
    deltas = torch.stack([w - base] * 3)
    out = regmean(base, deltas, _params(3, {"gram": grams}, regmean_alpha=alpha))
    torch.testing.assert_close(out, w, atol=1e-5, rtol=1e-5)


def test_regmean_of_one_layer_is_least_squares_on_the_stacked_inputs():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 6, generator=g) for n in (40, 25, 60)]
    ws = [torch.randn(4, 6, generator=g) for _ in xs]
    base = torch.zeros(4, 6)
    out = regmean(base, torch.stack(ws), _params(3, {"gram": torch.stack([_gram(x) for x in xs])}, regmean_alpha=1.0))
    x = torch.cat(xs).double().numpy()
    y = torch.cat([xi @ wi.T for xi, wi in zip(xs, ws)]).double().numpy()
    expected = np.linalg.lstsq(x, y, rcond=None)[0].T  # argmin_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        out.double(), torch.linalg.lstsq(torch.from_numpy(x), torch.from_numpy(y)).solution.T, atol=1e-4, rtol=1e-4
    )


def test_regmean_alpha_zero_is_a_per_input_feature_weighted_average():
    g = torch.Generator().manual_seed(2)
    grams = torch.stack([_gram(torch.randn(20, 5, generator=g)) for _ in range(2)])
    ws = torch.randn(2, 3, 5, generator=g)
    out = regmean(torch.zeros(3, 5), ws, _params(2, {"gram": grams}, regmean_alpha=0.0))
    d = torch.diagonal(grams, dim1=1, dim2=2)  # (2, in)
    expected = (ws * d[:, None, :]).sum(0) / d.sum(0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_regmean_model_weights_scale_the_grams():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(30, 4, generator=g) for _ in range(2)]
    ws = torch.randn(2, 3, 4, generator=g)
    grams = torch.stack([_gram(x) for x in xs])
    weighted = regmean(torch.zeros(3, 4), ws, _params(2, {"gram": grams}, weight=[2.0, 1.0], regmean_alpha=1.0))
    scaled = regmean(torch.zeros(3, 4), ws, _params(2, {"gram": grams * torch.tensor([2.0, 1.0]).view(2, 1, 1)},
                                                    regmean_alpha=1.0))
    torch.testing.assert_close(weighted, scaled, atol=1e-5, rtol=1e-5)


def test_regmean_without_gram_is_the_weighted_average():
    base = torch.randn(6)
    deltas = torch.randn(2, 6)
    out = regmean(base, deltas, _params(2, {}, weight=[3.0, 1.0]))
    torch.testing.assert_close(out, base + (3 * deltas[0] + deltas[1]) / 4)


# -- Fisher ----------------------------------------------------------------------------------------
def test_fisher_with_equal_fishers_is_the_plain_average():
    g = torch.Generator().manual_seed(4)
    base, deltas = torch.randn(4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    f = torch.rand(4, 5, generator=g)
    stats = {"fisher": torch.stack([f, f, f]), "fisher_scale": torch.tensor([1.0, 1.0, 1.0])}
    for normalize in (True, False):
        out = fisher(base, deltas, _params(3, stats, fisher_normalize=normalize, fisher_floor=1e-6))
        torch.testing.assert_close(out, (base + deltas).mean(0), atol=1e-5, rtol=1e-5)


def test_fisher_follows_the_model_that_cares():
    theta = torch.tensor([[1.0, 1.0], [3.0, 3.0]])  # two models, two parameters
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # model 0 cares about parameter 0, model 1 about 1
    stats = {"fisher": f, "fisher_scale": torch.tensor([0.5, 0.5])}
    out = fisher(torch.zeros(2), theta, _params(2, stats, fisher_normalize=False, fisher_floor=1e-9))
    torch.testing.assert_close(out, torch.tensor([1.0, 3.0]), atol=1e-6, rtol=0)


def test_fisher_normalisation_removes_a_models_overall_scale():
    g = torch.Generator().manual_seed(5)
    theta = torch.randn(2, 8, generator=g)
    f = torch.rand(2, 8, generator=g)
    scale = f.mean(dim=1)
    a = fisher(torch.zeros(8), theta, _params(2, {"fisher": f, "fisher_scale": scale}, fisher_floor=0.0))
    f2 = f * torch.tensor([[100.0], [1.0]])
    b = fisher(torch.zeros(8), theta, _params(2, {"fisher": f2, "fisher_scale": f2.mean(dim=1)}, fisher_floor=0.0))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# -- AdaMerging ------------------------------------------------------------------------------------
def test_adamerging_applies_the_blocks_coefficients():
    base, deltas = torch.randn(3, 4), torch.randn(2, 3, 4)
    out = adamerging(base, deltas, _params(2, {"coef": torch.tensor([0.25, 2.0])}))
    torch.testing.assert_close(out, base + 0.25 * deltas[0] + 2.0 * deltas[1])


def test_block_names():
    assert block_of("bert.encoder.layer.3.attention.self.query.weight") == "layer.3"
    assert block_of("distilbert.transformer.layer.0.ffn.lin1.bias") == "layer.0"
    assert block_of("bert.embeddings.word_embeddings.weight") == "embeddings"
    assert block_of("bert.pooler.dense.weight") == "bert.pooler.dense"


# -- statistics ------------------------------------------------------------------------------------
def test_gram_matrices_match_the_layers_inputs(tiny):
    from hm3.merging.stats import gram_matrices, load_classifier

    model, tok = load_classifier(tiny["a"])
    texts = [t for t, _ in TASK_A.sample(12, seed=7)] + ["w1 w2", "w3"]  # padding in every batch
    grams, tokens = gram_matrices(model, tok, texts, max_length=32, batch_size=5)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    mask = enc["attention_mask"].bool()
    x = hidden[0][mask]  # embeddings output: the input of layer 0's query/key/value
    assert tokens == int(mask.sum())
    torch.testing.assert_close(grams["bert.encoder.layer.0.attention.self.query.weight"], x.T @ x / x.shape[0],
                               atol=1e-4, rtol=1e-4)
    cls = hidden[-1][:, 0]  # the pooler's input: the first token of the last layer
    torch.testing.assert_close(grams["bert.pooler.dense.weight"], cls.T @ cls / len(texts), atol=1e-4, rtol=1e-4)
    assert "classifier.weight" not in grams  # output rows are kept per group, never regressed


def test_fisher_diagonal_is_a_nonnegative_per_parameter_statistic(tiny):
    from hm3.merging.stats import fisher_diagonal, load_classifier

    model, tok = load_classifier(tiny["a"])
    texts = [t for t, _ in TASK_A.sample(6, seed=8)]
    f1 = fisher_diagonal(model, tok, texts, torch.Generator().manual_seed(0))
    f2 = fisher_diagonal(model, tok, texts, torch.Generator().manual_seed(0))
    assert set(f1) == {n for n, _ in model.named_parameters()}
    assert all(bool((v >= 0).all()) for v in f1.values())
    assert float(f1["classifier.weight"].sum()) > 0
    assert all(torch.equal(f1[k], f2[k]) for k in f1)  # seeded label sampling: reproducible


# -- end to end ------------------------------------------------------------------------------------
def _texts(root: Path, name: str, task, n: int = 40) -> str:
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in task.sample(n, seed=11)))
    return str(path)


def _recipe(tiny, tmp_path, method, models=("a", "b"), **params):
    tasks = {"a": TASK_A, "b": TASK_B}
    return {
        "merge_method": method,
        "base_model": str(tiny["base"]),
        "models": [{"model": str(tiny[m]), "group": g} for g, m in zip(("a", "b"), models)],
        "parameters": params,
        "data": {"texts": {g: _texts(tmp_path, g, tasks[g]) for g in ("a", "b")}, "max_texts": 40,
                 "adamerging": {"steps": 3, "max_texts": 8, "batch_size": 4}},
        "seed": 0,
    }


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_merging_a_model_with_itself_returns_it(tiny, tmp_path, method):
    from hm3.io import load_checkpoint

    res = hm3.merge(_recipe(tiny, tmp_path, method, models=("a", "a")), progress=False)
    ref = load_checkpoint(tiny["a"])
    for name in ref.names:
        if name.startswith("classifier."):
            continue
        torch.testing.assert_close(res.state[name].float(), ref.tensor(name), atol=2e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(res.state["classifier.weight"][0:2], ref.tensor("classifier.weight"))
    torch.testing.assert_close(res.state["classifier.weight"][2:4], ref.tensor("classifier.weight"))


@pytest.mark.parametrize("method", ["regmean", "fisher", "adamerging"])
def test_data_aware_merge_is_cached_reproducible_and_recorded(tiny, tmp_path, method):
    out1, out2 = tmp_path / "m1", tmp_path / "m2"
    recipe = _recipe(tiny, tmp_path, method)
    hm3.merge(recipe, out1, progress=False)
    hm3.merge(recipe, out2, progress=False)  # statistics now come from the disk cache
    assert (out1 / "model.safetensors").read_bytes() == (out2 / "model.safetensors").read_bytes()
    meta1 = json.loads((out1 / "config.json").read_text())["hm3"]["data"]
    meta2 = json.loads((out2 / "config.json").read_text())["hm3"]["data"]
    assert meta1["method"] == method and set(meta1["groups"]) == {"a", "b"}
    assert all(g["texts"] == (8 if method == "adamerging" else 40) for g in meta1["groups"].values())
    if method == "adamerging":
        assert meta2["cached"] is True and set(meta1["coefficients"]) == {"a", "b"}
    else:
        assert all(g["cached"] is False for g in meta1["groups"].values())
        assert all(g["cached"] is True for g in meta2["groups"].values())
    clf = hm3.load(out1)
    assert clf.groups == ["a", "b"]


def test_adamerging_tensor_is_base_plus_learnt_coefficients(tiny, tmp_path):
    from hm3.io import load_checkpoint

    res = hm3.merge(_recipe(tiny, tmp_path, "adamerging"), tmp_path / "m", progress=False)
    coef = json.loads((tmp_path / "m" / "config.json").read_text())["hm3"]["data"]["coefficients"]
    name = "bert.encoder.layer.1.output.dense.weight"
    base = load_checkpoint(tiny["base"]).tensor(name)
    a, b = load_checkpoint(tiny["a"]).tensor(name), load_checkpoint(tiny["b"]).tensor(name)
    merged = load_checkpoint(res.path).tensor(name)
    expected = base + coef["a"]["layer.1"] * (a - base) + coef["b"]["layer.1"] * (b - base)
    torch.testing.assert_close(merged, expected, atol=1e-3, rtol=1e-3)  # coefficients are rounded in the report


def test_data_aware_recipe_errors(tiny, tmp_path):
    recipe = _recipe(tiny, tmp_path, "regmean")
    no_data = {k: v for k, v in recipe.items() if k != "data"}
    with pytest.raises(HM3Error, match="data-aware: add a `data:` section"):
        hm3.merge(no_data, progress=False)
    bad_alpha = dict(recipe, parameters={"regmean_alpha": 1.5})
    with pytest.raises(HM3Error, match="regmean_alpha"):
        hm3.merge(bad_alpha, progress=False)
    missing = json.loads(json.dumps(recipe))
    del missing["data"]["texts"]["b"]
    with pytest.raises(HM3Error, match="no texts for group 'b'"):
        hm3.merge(missing, progress=False)
    wrong = dict(recipe, parameters={"density": 0.5})
    with pytest.raises(HM3Error, match="not a parameter of regmean"):
        hm3.merge(wrong, progress=False)


def test_registry_marks_data_aware_methods():
    assert {m for m, spec in REGISTRY.items() if spec.needs_stats} == {"regmean", "fisher", "adamerging"}
    assert not REGISTRY["ties"].needs_stats


def test_text_files_keep_line_separators_inside_json_strings(tmp_path):
    from hm3.io import read_text_rows as read_rows

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "one\u2028two\x85three", "label": "x"}, ensure_ascii=False) + "\n"
                    + json.dumps({"text": "four"}) + "\n", encoding="utf-8")
    assert read_rows(path) == [("one\u2028two\x85three", "x"), ("four", None)]
    txt = tmp_path / "t.txt"
    txt.write_text("a\r\nb\n\n", encoding="utf-8")
    assert read_rows(txt) == [("a", None), ("b", None)]
