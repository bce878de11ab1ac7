"""The numpy engine (``hm3.merging.numpy_engine``): a plain merge without torch gives the torch
engine's bytes, exactly, for every method and option it takes; everything else falls back to torch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from hm3.errors import HM3Error
from hm3.io import load_checkpoint
from hm3.merging import kernels
from hm3.merging.engine import merge, prepare
from hm3.merging.numpy_engine import ENGINE_ENV, unsupported
from hm3.testing import synthetic_classifier, tiny_base

GROUPS = {"a": ("neg", "pos"), "b": ("red", "green", "blue"), "c": ("x", "y", "z", "w")}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("numpy-engine")
    base = tiny_base(root / "base")
    models = {g: synthetic_classifier(base, root / g, labels, i + 7) for i, (g, labels) in enumerate(GROUPS.items())}
    # the same weights stored as bfloat16 and float16: read exactly as torch reads them
    for code, dtype in (("bf16", torch.bfloat16), ("f16", torch.float16)):
        from safetensors.torch import load_file, save_file

        d = shutil.copytree(models["b"], root / f"b-{code}")
        state = load_file(str(d / "model.safetensors"))
        save_file({k: v.to(dtype) for k, v in state.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
        models[f"b-{code}"] = d
    return {"root": root, "base": base, "models": models}


def _recipe(zoo, method, groups=("a", "b", "c"), base=True, **kw):
    params = kw.pop("params", {})
    weights = kw.pop("weights", [1.0] * len(groups))
    densities = kw.pop("densities", None)
    models = []
    for i, g in enumerate(groups):
        p = {"weight": weights[i], **({"density": densities[i]} if densities else {})}
        models.append({"model": str(zoo["models"][g]), "group": g.split("-")[0] + ("" if "-" not in g else str(i)),
                       "parameters": p})
    return {"merge_method": method, **({"base_model": str(zoo["base"])} if base else {}), "models": models,
            "parameters": params, "seed": 3, **kw}


def _both(recipe, tmp_path, monkeypatch, name) -> tuple[bytes, bytes]:
    """model.safetensors of the numpy engine and of the torch engine, and config.json equal too."""
    out = {}
    for engine in ("numpy", "torch"):
        monkeypatch.setenv(ENGINE_ENV, engine)
        d = tmp_path / f"{name}-{engine}"
        merge(recipe, d, progress=False)
        out[engine] = d
    assert (out["numpy"] / "config.json").read_text() == (out["torch"] / "config.json").read_text()
    assert (out["numpy"] / "README.md").read_text() == (out["torch"] / "README.md").read_text()
    return (out["numpy"] / "model.safetensors").read_bytes(), (out["torch"] / "model.safetensors").read_bytes()


CASES = {
    "linear": dict(method="linear"),
    "linear weighted, not normalised": dict(method="linear", weights=[0.3, 1.7, -0.45], params={"normalize": False}),
    "linear without a base": dict(method="linear", base=False, weights=[0.2, 0.5, 0.9]),
    "task arithmetic, lambda": dict(method="task_arithmetic", weights=[0.7, 1.1, 0.3], params={"lambda": 0.8}),
    "task arithmetic normalised": dict(method="task_arithmetic", weights=[0.7, 1.1, 0.3], params={"normalize": True}),
    "ties": dict(method="ties", densities=[0.2, 0.5, 0.9]),
    "ties weighted, count, rescaled": dict(method="ties", densities=[0.3, 0.3, 0.6], weights=[1.0, 0.4, 2.0],
                                           params={"consensus": "count", "rescale": True}),
    "ties, head density 0.5": dict(method="ties", densities=[0.4, 0.4, 0.4], head={"density": 0.5}),
    "ties not normalised, lambda": dict(method="ties", densities=[0.5, 0.5, 0.5],
                                        params={"normalize": False, "lambda": 1.3}),
    "dare_ties": dict(method="dare_ties", densities=[0.1, 0.5, 0.999995]),
    "dare_ties l2, normalised": dict(method="dare_ties", densities=[0.3, 0.7, 0.2],
                                     params={"rescale_norm": "l2", "normalize": True}),
    "dare_ties linf, head density model": dict(method="dare_ties", densities=[0.3, 0.7, 0.2],
                                               params={"rescale_norm": "linf"}, head={"density": "model"}),
    "dare_linear": dict(method="dare_linear", densities=[0.25, 0.5, 0.75], weights=[0.5, 1.0, 1.5]),
    "dare_linear inverse, no rescale": dict(method="dare_linear", densities=[0.25, 0.5, 0.75],
                                            params={"rescale_norm": "inverse"}),
    "dare_linear unscaled": dict(method="dare_linear", densities=[0.4, 0.4, 0.4], params={"rescale": False}),
    "float16 output": dict(method="dare_ties", densities=[0.3, 0.5, 0.6], dtype="float16"),
    "bfloat16 and float16 inputs": dict(method="ties", groups=("a", "b-bf16", "b-f16"), densities=[0.5, 0.5, 0.5]),
    "one model": dict(method="dare_ties", groups=("c",), densities=[0.5]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_numpy_engine_gives_the_torch_engines_bytes(case, zoo, tmp_path, monkeypatch):
    kw = dict(CASES[case])
    recipe = _recipe(zoo, kw.pop("method"), **kw)
    assert unsupported(prepare(recipe)) is None
    ours, theirs = _both(recipe, tmp_path, monkeypatch, "m")
    assert ours == theirs


@pytest.mark.parametrize("workers", ["1", "2", "3"])
def test_numpy_engine_workers_give_the_same_bytes(zoo, tmp_path, monkeypatch, workers):
    recipe = _recipe(zoo, "dare_ties", densities=[0.3, 0.5, 0.6])
    monkeypatch.setenv(ENGINE_ENV, "numpy")
    merge(recipe, tmp_path / "ref", progress=False, workers=1)
    monkeypatch.setenv("HM3_MERGE_WORKERS", workers)
    merge(recipe, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


def test_what_the_numpy_engine_does_not_take_goes_to_torch(zoo, tmp_path, monkeypatch):
    """Other methods, a bfloat16 output, a refit step, a hidden head layer: torch merges them (the
    same file as before), and HM3_MERGE_ENGINE=numpy says why it cannot."""
    cases = {
        "breadcrumbs": _recipe(zoo, "breadcrumbs", densities=[0.5, 0.5, 0.5]),
        "bfloat16": _recipe(zoo, "ties", densities=[0.5, 0.5, 0.5], dtype="bfloat16"),
        "model_stock": _recipe(zoo, "model_stock"),
    }
    for name, rec in cases.items():
        why = unsupported(prepare(rec))
        assert why, name
        monkeypatch.setenv(ENGINE_ENV, "auto")
        merge(rec, tmp_path / f"{name}-auto", progress=False)
        monkeypatch.setenv(ENGINE_ENV, "torch")
        merge(rec, tmp_path / f"{name}-torch", progress=False)
        assert (tmp_path / f"{name}-auto" / "model.safetensors").read_bytes() == \
            (tmp_path / f"{name}-torch" / "model.safetensors").read_bytes()
        monkeypatch.setenv(ENGINE_ENV, "numpy")
        with pytest.raises(HM3Error, match=f"{ENGINE_ENV}=numpy: this merge needs torch"):
            merge(rec, tmp_path / f"{name}-numpy", progress=False)
        assert not (tmp_path / f"{name}-numpy").exists()
    monkeypatch.setenv(ENGINE_ENV, "jax")
    with pytest.raises(HM3Error, match="use auto"):
        merge(_recipe(zoo, "ties", densities=[0.5] * 3), tmp_path / "x", progress=False)


def test_distilbert_hidden_head_layer_goes_to_torch(tmp_path):
    base = tiny_base(tmp_path / "base", family="distilbert", headless=False)  # with a pre_classifier
    rec = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(base), "group": "a", "parameters": {"density": 0.5}},
                      {"model": str(base), "group": "b", "parameters": {"density": 0.5}}]}
    assert "hidden head layer" in unsupported(prepare(rec))


def test_checkpoint_array_reads_as_tensor_reads(zoo):
    """``Checkpoint.array`` (no torch) gives ``Checkpoint.tensor``'s values for float32, float16 and
    bfloat16 storage (widened to float32 exactly), mapped or read."""
    for g in ("b", "b-bf16", "b-f16"):
        ck = load_checkpoint(zoo["models"][g])
        for name in ck.names:
            want = ck.tensor(name).numpy()
            for mapped in (False, True):
                got = ck.array(name, mapped=mapped)
                assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), (g, name)


def test_kernels_fixed_sum_is_the_documented_order():
    """Rows of 4,096 summed by numpy one by one, the rest as one more, then the row sums the same way."""
    rng = np.random.default_rng(0)
    for n in (1, 4096, 4097, 3 * 4096 + 5, 20_000_001 // 1000):
        a = rng.standard_normal(n).astype(np.float32)
        x = a
        while x.size > 4096:
            full = x.size // 4096 * 4096
            x = np.array([x[i:i + 4096].sum() for i in range(0, full, 4096)] + ([x[full:].sum()] if full < x.size else []),
                         dtype=np.float32)
        assert kernels.fixed_sum(a) == x.sum() and kernels.fixed_sum(a).dtype == np.float32


def test_ties_on_a_tie_keeps_the_first_in_memory_order():
    x = np.array([[1.0, -2.0, 2.0], [2.0, 0.5, -2.0]], dtype=np.float32)
    out = kernels.magnitude(x, 0.5)  # k = 3 of six; four tied at |2|: the first three kept
    assert out.tolist() == [[0.0, -2.0, 2.0], [2.0, 0.0, -0.0]]
    assert np.signbit(out[1, 2])  # -2 * 0: the sign of zero as torch's x * mask


@pytest.mark.parametrize("rescale", [None, kernels.Rescale.l1, kernels.Rescale.l2, kernels.Rescale.linf,
                                     kernels.Rescale.inverse])
def test_merges_that_work_in_their_task_vectors_give_the_same_numbers(rescale):
    """``consume=True`` (the numpy engine's own scratch buffer: DARE drops in place) gives the bits
    of the merge that leaves the task vectors alone: small tensors (one fixed_sum row, whose norms
    are taken whole), several blocks, densities 0, within 2^-17 of 1, and in between."""
    from hm3.merging.methods import TensorParams

    rng = np.random.default_rng(1)
    for n in (7, 4096, 2 * kernels.BLOCK + 4101):
        base = rng.standard_normal(n).astype(np.float32)
        deltas = (rng.standard_normal((3, n)) * 0.01).astype(np.float32)
        for densities in ((0.3, 0.0, 0.999995), (0.5, 0.05, 0.7)):
            p = TensorParams(weight=(1.0, 0.5, 1.5), density=densities, rescale=rescale)
            for method in ("dare_ties", "dare_linear", "ties"):
                def run(consume):
                    d = deltas.copy()
                    out = kernels.merge(method, base, d, p, np.random.Generator(np.random.SFC64(3)), consume=consume)
                    return out, d
                kept, untouched = run(False)
                worked, _ = run(True)
                assert np.array_equal(untouched, deltas)
                assert np.array_equal(kept.view(np.uint32), worked.view(np.uint32)), (n, densities, method)


def test_dare_keeps_where_the_documented_bits_fall_below_the_density():
    """The rule the docstrings and METHODS.md state, from the raw stream: element 4j+i takes bits
    16i..16i+15 of draw j, read as int16 + 2^15 (top bit flipped), and is kept below round(d·2^16)."""
    n, density = 1003, 0.3
    kept, factor = kernels.bernoulli_parts(np.ones(n, np.float32), density, np.random.Generator(np.random.SFC64(5)))
    raw = np.random.Generator(np.random.SFC64(5)).bit_generator.random_raw((n + 3) // 4)
    bits = np.array([(int(raw[e // 4]) >> (16 * (e % 4))) & 0xFFFF for e in range(n)])
    assert factor is None
    assert np.array_equal(kept, ((bits ^ 0x8000) < round(density * (1 << 16))).astype(np.float32))
