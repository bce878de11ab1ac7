"""Spectral merge methods (hm3.merging.spectral): TSV-M and Iso-C on small matrices and a tiny merge."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import hm3
from hm3.config import load_config
from hm3.errors import HM3Error
from hm3.merging.methods import REGISTRY, TensorParams
from hm3.testing import synthetic_classifier, tiny_base


def params(n: int, *, weight=1.0, lambda_=1.0, **extra) -> TensorParams:
    return TensorParams(weight=(weight,) * n if not isinstance(weight, tuple) else weight, density=(1.0,) * n,
                        lambda_=lambda_, extra=extra)


def rand(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def run(name, base, deltas, p):
    return REGISTRY[name].fn(base, deltas, p, None)


def test_tsv_of_one_full_rank_model_is_the_model():
    base, delta = rand(6, 4), rand(1, 6, 4, seed=1)
    out = run("tsv", base, delta, params(1))  # k = r: every singular triplet kept
    assert torch.allclose(out, base + delta[0], atol=1e-5)


def test_tsv_of_tasks_in_orthogonal_subspaces_is_their_sum():
    # each task lives in its own rows and columns: nothing to decorrelate, TSV-M is task arithmetic
    base = rand(6, 6)
    a, b = torch.zeros(6, 6), torch.zeros(6, 6)
    a[:3, :3], b[3:, 3:] = rand(3, 3, seed=2), rand(3, 3, seed=3)
    out = run("tsv", base, torch.stack([a, b]), params(2))  # k = 3 of rank 6 each
    assert torch.allclose(out, base + a + b, atol=1e-5)


def test_tsv_keeps_each_tasks_top_singular_directions():
    # rank-1 tasks: with sv_fraction 1/r only the largest triplet of each is kept
    base = torch.zeros(5, 5)
    u, v = torch.linalg.qr(rand(5, 5, seed=4))[0], torch.linalg.qr(rand(5, 5, seed=5))[0]
    d0 = 3.0 * torch.outer(u[:, 0], v[:, 0]) + 0.5 * torch.outer(u[:, 1], v[:, 1])
    d1 = 2.0 * torch.outer(u[:, 2], v[:, 2]) + 0.1 * torch.outer(u[:, 3], v[:, 3])
    out = run("tsv", base, torch.stack([d0, d1]), params(2, sv_fraction=0.2))
    want = 3.0 * torch.outer(u[:, 0], v[:, 0]) + 2.0 * torch.outer(u[:, 2], v[:, 2])
    assert torch.allclose(out, want, atol=1e-5)


def test_tsv_decorrelates_overlapping_tasks():
    # two tasks pulling along the same direction: the sum would double it, TSV-M's orthogonalised
    # factors spread it over orthonormal directions, so the merge's spectrum is the tasks' values
    base = torch.zeros(4, 4)
    d = torch.outer(torch.tensor([1.0, 0, 0, 0]), torch.tensor([1.0, 0, 0, 0]))
    d2 = torch.outer(torch.tensor([1.0, 1e-3, 0, 0]), torch.tensor([1.0, 0, 1e-3, 0]))
    out = run("tsv", base, torch.stack([d, d2 / d2.norm()]), params(2))
    s = torch.linalg.svdvals(out)
    assert torch.allclose(s[:2], torch.ones(2), atol=1e-4) and float(s[2:].abs().max()) < 1e-4


def test_spectral_methods_average_tensors_that_are_not_linear_maps():
    base = rand(8)
    deltas = rand(3, 8, seed=6)
    for name in ("tsv", "iso_c"):
        assert torch.allclose(run(name, base, deltas, params(3, lambda_=0.5)), base + 0.5 * deltas.mean(0), atol=1e-6)
        emb = rand(10, 4)
        d = rand(2, 10, 4, seed=7)
        out = run(name, emb, d, params(2, weight=(1.0, 3.0), embedding=True))
        assert torch.allclose(out, emb + (d[0] + 3 * d[1]) / 4, atol=1e-6), name


def test_iso_c_flattens_the_spectrum_of_the_sum():
    base, deltas = rand(7, 5), rand(3, 7, 5, seed=8)
    total = deltas.sum(0)
    out = run("iso_c", base, deltas, params(3, lambda_=1.5))
    change = out - base
    s = torch.linalg.svdvals(change)
    assert torch.allclose(s, torch.full_like(s, 1.5 * float(torch.linalg.svdvals(total).mean())), rtol=1e-4)
    # same singular subspaces as the sum: the change is a polar factor of it, scaled
    u, _, vh = torch.linalg.svd(total, full_matrices=False)
    assert torch.allclose(change, 1.5 * torch.linalg.svdvals(total).mean() * (u @ vh), atol=1e-5)


@pytest.mark.parametrize("name", ["tsv", "iso_c"])
def test_spectral_methods_keep_shape_dtype_and_inputs(name):
    base, deltas = rand(6, 10), rand(3, 6, 10, seed=9)
    before = deltas.clone()
    out = run(name, base, deltas, params(3, weight=(0.5, 1.0, 1.5)))
    assert out.shape == base.shape and out.dtype == base.dtype and bool(torch.isfinite(out).all())
    assert torch.equal(deltas, before)


GROUPS = {"a": ("neg", "pos"), "b": ("red", "green", "blue")}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("spectral")
    base = tiny_base(root / "base")
    models = {g: synthetic_classifier(base, root / g, labels, seed=i + 1) for i, (g, labels) in enumerate(GROUPS.items())}
    return root, base, models


@pytest.mark.parametrize("name", ["tsv", "iso_c"])
def test_spectral_merge_keeps_every_heads_own_rows_and_embeddings_averaged(synth, name, tmp_path):
    root, base, models = synth
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: {name}\nbase_model: {base}\nmodels:\n"
                      + "".join(f"- model: {p}\n  group: {g}\n" for g, p in models.items())
                      + "parameters:\n  lambda: 1.0\n")
    out = hm3.merge(recipe, tmp_path / "out").path
    merged = load_file(out / "model.safetensors")
    b = {f"bert.{k}": v for k, v in load_file(base / "model.safetensors").items()}  # a headless base: no prefix
    m = {g: load_file(p / "model.safetensors") for g, p in models.items()}
    assert torch.allclose(merged["classifier.weight"][:2], m["a"]["classifier.weight"], atol=1e-6)
    assert torch.allclose(merged["classifier.weight"][2:], m["b"]["classifier.weight"], atol=1e-6)
    emb = "bert.embeddings.word_embeddings.weight"
    want = b[emb] + ((m["a"][emb] - b[emb]) + (m["b"][emb] - b[emb])) / 2
    assert torch.allclose(merged[emb], want, atol=1e-6)
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(merged[q], b[q] + ((m["a"][q] - b[q]) + (m["b"][q] - b[q])) / 2, atol=1e-4)


def test_sv_fraction_must_be_a_share_of_the_rank(synth, tmp_path):
    root, base, models = synth
    text = (f"merge_method: tsv\nbase_model: {base}\nmodels:\n"
            + "".join(f"- model: {p}\n  group: {g}\n" for g, p in models.items()))
    ok = tmp_path / "ok.yaml"
    ok.write_text(text + "parameters:\n  sv_fraction: 0.25\n")
    assert load_config(ok).parameters["sv_fraction"] == 0.25
    bad = tmp_path / "bad.yaml"
    bad.write_text(text + "parameters:\n  sv_fraction: 1.5\n")
    with pytest.raises(HM3Error, match="sv_fraction"):
        load_config(bad)
    other = tmp_path / "other.yaml"
    other.write_text(text.replace("tsv", "iso_c") + "parameters:\n  sv_fraction: 0.5\n")
    with pytest.raises(HM3Error, match="sv_fraction"):
        load_config(other)


def test_in_memory_engine_gives_the_same_tsv_merge(synth):
    """The search's engine (``TaskVectors.merge_into``, two tensors at once) and ``hm3.merge``: the same tensors."""
    from hm3.merging.engine import prepare
    from hm3.merging.fast import TaskVectors

    root, base, models = synth
    rec = {"merge_method": "tsv", "base_model": str(base), "seed": 0,
           "models": [{"model": str(p), "group": g, "parameters": {"weight": w}}
                      for (g, p), w in zip(models.items(), (1.0, 0.6))]}
    tv = TaskVectors.from_prepared(prepare(rec))
    got = tv.merge_into(tv.new_model()).state_dict()
    reference = hm3.merge(rec, progress=False).state
    for name, t in reference.items():
        assert torch.equal(got[name], t), name
