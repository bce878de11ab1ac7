"""The streamed merge (``hm3.merging.streamed``): reading the inputs block by block, without task
vectors in memory, gives ``kernels.merge``'s bits on the stacked task vectors, for every method and
option it takes; what it does not take it says, and the numpy engine merges those as before."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from hm3.errors import HM3Error
from hm3.merging import kernels, streamed
from hm3.merging.engine import merge, tensor_generator
from hm3.merging.kernels import BLOCK, Rescale
from hm3.merging.methods import TensorParams
from hm3.merging.numpy_engine import ENGINE_ENV
from hm3.testing import synthetic_classifier, tiny_base


def _inputs(n_models: int, shape, seed: int = 0, grid: float = 50.0):
    """A base and fine-tunes whose deltas lie on a coarse grid: many magnitudes tie, at TIES'
    threshold too, so the dropped ties are exercised."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    models = [(base + np.round(rng.standard_normal(shape, dtype=np.float32) * grid) / grid * 2e-4).astype(np.float32)
              for _ in range(n_models)]
    return base, models


def _reference(method, base, models, p, name="t"):
    deltas = np.stack([m - base for m in models]) if models else np.zeros((0, *base.shape), np.float32)
    return kernels.merge(method, base, deltas, p, tensor_generator(3, name))


# n: above the sampled selection's cut and not a multiple of the block; one 2-D tensor
LARGE = (5 * kernels.SAMPLE + 12345,)
CASES = {
    "linear": ("linear", 3, dict(weight=(0.7, 1.0, 1.6))),
    "linear not normalised": ("linear", 2, dict(weight=(0.3, -0.45), normalize=False)),
    "task arithmetic, lambda": ("task_arithmetic", 3, dict(weight=(0.7, 1.1, 0.3), lambda_=0.8)),
    "task arithmetic normalised": ("task_arithmetic", 3, dict(weight=(0.7, 1.1, 0.3), normalize=True)),
    "ties": ("ties", 3, dict(density=(0.2, 0.5, 0.9), normalize=True)),
    "ties weighted, not normalised, lambda": ("ties", 2, dict(weight=(1.0, 0.4), density=(0.3, 0.6), lambda_=1.3)),
    "ties count": ("ties", 3, dict(density=(0.3, 0.3, 0.6), consensus="count", normalize=True)),
    "ties density 1": ("ties", 2, dict(density=(1.0, 0.5), normalize=True)),
    "ties one model": ("ties", 1, dict(density=(0.4,), normalize=True)),
    "dare_ties l1": ("dare_ties", 3, dict(density=(0.1, 0.5, 0.999995), rescale=Rescale.l1, normalize=True)),
    "dare_ties unscaled": ("dare_ties", 2, dict(density=(0.3, 0.7), normalize=True)),
    "dare_linear inverse": ("dare_linear", 3, dict(density=(0.25, 0.5, 0.999995), rescale=Rescale.inverse,
                                                    weight=(0.5, 1.0, 1.5))),
    "dare_linear l1, one model": ("dare_linear", 1, dict(density=(0.4,), rescale=Rescale.l1)),
}


def _params(n_models, kw):
    kw = dict(kw)
    kw.setdefault("weight", (1.0,) * n_models)
    kw.setdefault("density", (1.0,) * n_models)
    return TensorParams(**kw)


@pytest.mark.parametrize("shape", [LARGE, (300, 70), (5,), (0, 4)], ids=["large", "matrix", "tiny", "empty"])
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_gives_kernels_bits(case, shape):
    method, n_models, kw = CASES[case]
    base, models = _inputs(n_models, shape)
    p = _params(n_models, kw)
    assert streamed.unsupported(method, p, True) is None
    ours = streamed.merge(method, base, models, p, tensor_generator(3, "t"))
    theirs = _reference(method, base, models, p)
    assert ours.shape == base.shape and ours.dtype == np.float32
    assert ours.tobytes() == theirs.tobytes()


def test_ties_drops_the_last_ties_in_memory_order_across_blocks():
    """Every magnitude tied: the kept set is the first k in memory order, whichever block they are in."""
    n = 3 * BLOCK + 77
    base = np.zeros(n, np.float32)
    model = np.where(np.arange(n) % 2 == 0, 1.0, -1.0).astype(np.float32)
    p = _params(1, dict(density=(0.4,)))
    ours = streamed.merge("ties", base, [model], p, None)
    k = kernels.keep_count(0.4, n)
    assert np.count_nonzero(ours) == k and np.count_nonzero(ours[:k]) == k
    assert ours.tobytes() == _reference("ties", base, [model], p).tobytes()


def test_a_missed_bracket_partitions_everything(monkeypatch):
    base, models = _inputs(2, LARGE, seed=5)
    p = _params(2, dict(density=(0.3, 0.6), normalize=True))
    want = _reference("ties", base, models, p)
    monkeypatch.setattr(kernels, "_bracket", lambda *a, **k: None)
    assert streamed.merge("ties", base, models, p, None).tobytes() == want.tobytes()


def test_what_it_does_not_take_it_says():
    p = _params(2, dict(density=(0.5, 0.5)))
    assert streamed.unsupported("ties", p, False) == "no base model"
    assert "breadcrumbs" in streamed.unsupported("breadcrumbs", p, True)
    assert streamed.unsupported("ties", _params(2, dict(density=(0.5, 0.5), rescale=Rescale.l1)), True) \
        == "TIES with a rescale"
    assert "l2" in streamed.unsupported("dare_ties", _params(2, dict(density=(0.5, 0.5), rescale=Rescale.l2)), True)
    assert "0 or below" in streamed.unsupported("dare_ties", _params(2, dict(density=(0.0, 0.5))), True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    base = tiny_base(root / "base")
    a = synthetic_classifier(base, root / "a", ("neg", "pos"), 1)
    b = synthetic_classifier(base, root / "b", ("x", "y", "z"), 2)
    return root, base, a, b


def _recipe(base, a, b, method):
    params = {"density": 0.5} if method != "linear" else {}
    return {"merge_method": method, "base_model": str(base), "seed": 1,
            "models": [{"model": str(a), "group": "a", "parameters": dict(params)},
                       {"model": str(b), "group": "b", "parameters": dict(params)}]}


def test_the_numpy_engine_streams_body_tensors(pair, tmp_path, monkeypatch):
    """A plain merge's body tensors go through ``streamed.merge`` (the head rows do not): the file is
    the torch engine's."""
    root, base, a, b = pair
    calls = {"numpy": [], "torch": []}  # (the torch engine's methods call it too, on task vectors)
    real = streamed.merge
    out = {}
    for engine in ("numpy", "torch"):
        monkeypatch.setattr(streamed, "merge", lambda *args, _c=calls[engine], **kw: _c.append(args[0]) or real(*args, **kw))
        monkeypatch.setenv(ENGINE_ENV, engine)
        merge(_recipe(base, a, b, "ties"), tmp_path / engine, progress=False)
        out[engine] = (tmp_path / engine / "model.safetensors").read_bytes()
    n_body = sum(1 for k in load_file(str(a / "model.safetensors")) if not k.startswith("classifier."))
    assert calls["numpy"] == ["ties"] * n_body
    assert out["numpy"] == out["torch"]


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_nan_in_an_input_names_its_file(pair, tmp_path, monkeypatch, method):
    root, base, a, b = pair
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in b.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    state = load_file(str(b / "model.safetensors"))
    key = next(k for k in state if "encoder" in k and k.endswith("weight"))
    state[key] = state[key].clone()
    state[key].view(-1)[3] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setenv(ENGINE_ENV, "numpy")
    with pytest.raises(HM3Error, match=f"{bad}.*{key}.*NaN or inf"):
        merge(_recipe(base, a, bad, method), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("enabled", [True, False])
def test_merge_pauses_the_garbage_collector_and_restores_it(pair, tmp_path, monkeypatch, enabled):
    """Collections are off while tensors are read and merged (each is a walk over every object of a
    process with torch imported), and the collector is left as it was, after an error too."""
    import gc

    root, base, a, b = pair
    seen = []
    real = streamed.merge
    monkeypatch.setattr(streamed, "merge", lambda *args, **kw: seen.append(gc.isenabled()) or real(*args, **kw))
    monkeypatch.setenv(ENGINE_ENV, "numpy")
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        merge(_recipe(base, a, b, "ties"), tmp_path / "out", progress=False)
        assert seen and not any(seen)
        assert gc.isenabled() == enabled
        monkeypatch.setattr(streamed, "merge", lambda *args, **kw: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            merge(_recipe(base, a, b, "ties"), tmp_path / "out2", progress=False)
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()
