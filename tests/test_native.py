"""The compiled merge loops (``hm3.merging.native``): the same bits as the numpy kernels on every
option they take, from models or from task vectors; built wherever a C compiler is; off with
``HM3_NATIVE=0``, and then the numpy code gives the same merges."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from hm3.merging import kernels, native, streamed
from hm3.merging.engine import tensor_generator
from hm3.merging.kernels import BLOCK, SUM_CHUNK, Rescale
from hm3.merging.methods import TensorParams

needs_native = pytest.mark.skipif(not native.available(), reason="compiled loops not built (no C compiler)")


def _compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def test_built_wherever_a_compiler_is():
    """``pip install`` builds the loops as an optional extension: with a compiler on this machine a
    missing library is a build failure to look at, not a silent fallback."""
    if _compiler() is None:
        pytest.skip("no C compiler here: hm3 runs the numpy kernels")
    assert native.library_path() is not None, "src/hm3/merging/_native*.so missing: rerun `make install`"
    assert native.available()


def test_hm3_native_0_turns_them_off():
    code = "from hm3.merging import native; print(native.available())"
    off = subprocess.run([sys.executable, "-c", code], env={"HM3_NATIVE": "0", "PATH": ""}, capture_output=True,
                         text=True, check=True)
    assert off.stdout.strip() == "False"


def _inputs(n_models: int, shape, seed: int = 0):
    """Deltas on a coarse grid (ties at TIES' threshold), exact zeros, and negative zeros in the base."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    flat = base.reshape(-1)
    flat[::97] = -0.0
    models = []
    for _ in range(n_models):
        d = (np.round(rng.standard_normal(shape, dtype=np.float32) * 40) / 40 * 2e-4).astype(np.float32)
        d.reshape(-1)[::13] = 0
        models.append((base + d).astype(np.float32))
    return base, models


def _reference(method, base, models, p, seed=3):
    deltas = np.stack([m - base for m in models])
    return kernels.merge(method, base, deltas, p, tensor_generator(seed, "t"))


CASES = {
    "linear": ("linear", 3, dict(weight=(0.7, 1.0, 1.6))),
    "linear not normalised": ("linear", 2, dict(weight=(0.3, -0.45), normalize=False)),
    "task arithmetic": ("task_arithmetic", 4, dict(weight=(0.7, 1.1, 0.3, 2.0), lambda_=0.8)),
    "task arithmetic normalised, zero total": ("task_arithmetic", 2, dict(weight=(1.0, -1.0), normalize=True)),
    "ties": ("ties", 3, dict(density=(0.2, 0.5, 0.9), normalize=True)),
    "ties weighted, lambda": ("ties", 2, dict(weight=(1.0, -0.4), density=(0.3, 0.6), lambda_=1.3)),
    "ties count": ("ties", 5, dict(density=(0.3, 0.3, 0.6, 0.1, 0.05), consensus="count", normalize=True)),
    "ties one model": ("ties", 1, dict(density=(0.4,), normalize=True)),
    "dare_ties l1": ("dare_ties", 3, dict(density=(0.1, 0.5, 0.999995), rescale=Rescale.l1, normalize=True)),
    "dare_ties inverse, count": ("dare_ties", 2, dict(density=(0.3, 0.7), rescale=Rescale.inverse,
                                                        consensus="count")),
    "dare_linear l1": ("dare_linear", 2, dict(density=(0.25, 1.0), rescale=Rescale.l1, weight=(0.5, 1.5))),
    "dare_linear unscaled": ("dare_linear", 1, dict(density=(0.4,))),
}
# above the sampled selection's cut, not a multiple of the block, of a row, or of 8; a matrix; tiny
SHAPES = {"large": (5 * kernels.SAMPLE + 12345,), "matrix": (300, 70), "tiny": (5,)}


def _params(n_models, kw):
    kw = dict(kw)
    kw.setdefault("weight", (1.0,) * n_models)
    kw.setdefault("density", (1.0,) * n_models)
    return TensorParams(**kw)


@needs_native
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_gives_the_kernels_bits(case, shape, monkeypatch):
    method, n_models, kw = CASES[case]
    base, models = _inputs(n_models, SHAPES[shape])
    p = _params(n_models, kw)
    assert streamed.unsupported(method, p, True) is None
    want = _reference(method, base, models, p).tobytes()
    from_models = streamed.merge(method, base, models, p, tensor_generator(3, "t"))
    deltas = [m - base for m in models]
    from_deltas = streamed.merge(method, base, deltas, p, tensor_generator(3, "t"), deltas=True)
    assert from_models.tobytes() == want and from_deltas.tobytes() == want
    # and the numpy path of the same function, with the loops off
    monkeypatch.setattr(native, "available", lambda: False)
    assert streamed.merge(method, base, deltas, p, tensor_generator(3, "t"), deltas=True).tobytes() == want
    assert streamed.merge(method, base, models, p, tensor_generator(3, "t")).tobytes() == want


@needs_native
def test_the_torch_methods_take_the_compiled_path_with_the_same_bits(monkeypatch):
    import torch

    from hm3.merging.methods import REGISTRY

    base, models = _inputs(3, (400, 90), seed=2)
    b, d = torch.from_numpy(base), torch.from_numpy(np.stack([m - base for m in models]))
    p = _params(3, dict(density=(0.3, 0.5, 0.7), normalize=True))
    calls = []
    real = native.merge
    monkeypatch.setattr(native, "merge", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = REGISTRY["ties"].fn(b, d, p, None)
    assert calls  # went through the loops
    monkeypatch.setattr(native, "available", lambda: False)
    assert REGISTRY["ties"].fn(b, d, p, None).numpy().tobytes() == fast.numpy().tobytes()


@needs_native
def test_bracket_scan_equals_numpy():
    rng = np.random.default_rng(4)
    n = 3 * BLOCK + 1001
    x = rng.standard_normal(n).astype(np.float32)
    base = rng.standard_normal(n).astype(np.float32)
    x[7] = np.nan
    v = np.abs(x - base)
    lo, hi = np.float32(np.quantile(v[~np.isnan(v)], 0.45)), np.float32(np.quantile(v[~np.isnan(v)], 0.47))
    want = v[(v >= lo) & (v <= hi)]
    for portable in (False, True):  # AVX2 where the CPU has it, and the plain loop
        inside, below, counts = native.bracket(x, base, lo, hi, BLOCK, portable=portable)
        assert inside.tobytes() == want.tobytes() and below == int(np.count_nonzero(v < lo))
        assert counts.tolist() == [int(np.count_nonzero((v[s] >= lo) & (v[s] <= hi))) for s in kernels.blocks(n)]
    # a bracket wider than the first guess of its size is scanned again with room for it all
    inside, below, _ = native.bracket(x, None, -np.inf, np.inf, BLOCK)
    assert inside.size == n - 1 and below == 0


@pytest.mark.parametrize("bit_generator", [np.random.SFC64, np.random.PCG64])
def test_draws_are_random_raws_values_and_leave_its_state(bit_generator):
    """SFC64 (the merge's generator): the compiled stream; any other: numpy's own draws."""
    ours, ref = np.random.Generator(bit_generator(2024)), np.random.Generator(bit_generator(2024))
    ours.random(dtype=np.float32)  # one 32-bit half of a draw buffered: random_raw leaves it, so must we
    ref.random(dtype=np.float32)
    if bit_generator is np.random.SFC64:
        assert ours.bit_generator.state["has_uint32"] == 1
    with native.Draws(ours, 1000) as draws:
        for count in (1000, 1, 0, 517):
            assert draws(count).tobytes() == kernels.draws(ref, count).tobytes()
    a, b = ours.bit_generator.state, ref.bit_generator.state
    assert repr(a) == repr(b)  # every field, the state words included (arrays compare by their repr)
    assert ours.random(5).tobytes() == ref.random(5).tobytes()  # and the generator goes on alike


@needs_native
@pytest.mark.parametrize("m", [BLOCK, 32 * 9 + 31, 32, 7, 0])
def test_keep_bits_equal_numpy_packbits(m):
    rng = np.random.default_rng(m)
    r16 = rng.integers(-(1 << 15), 1 << 15, m).astype(np.int16)
    r16[:3] = [-(1 << 15), (1 << 15) - 1, 0][: min(3, m)]  # the int16 extremes
    for density in (0.0, 0.3, 1.0 - 2 ** -16):
        below = round(density * (1 << 16)) - (1 << 15)
        want = np.packbits(r16 < below, bitorder="little").tobytes()
        for portable in (False, True):  # AVX2 where the CPU has it, and the plain loop
            assert native.keep_bits(r16, below, portable=portable).tobytes() == want


@needs_native
@pytest.mark.parametrize("m", [BLOCK, 3 * SUM_CHUNK + 5, 7])
def test_dare_block_bits_and_row_sums_equal_numpy(m):
    rng = np.random.default_rng(m)
    w, b = rng.standard_normal(m).astype(np.float32), rng.standard_normal(m).astype(np.float32)
    r16 = rng.integers(-(1 << 15), 1 << 15, m).astype(np.int16)
    below = round(0.3 * (1 << 16)) - (1 << 15)
    bits = np.empty((m + 7) // 8, np.uint8)
    rows = np.empty((2, kernels._rows(m)), np.float32)
    native.dare_block(w, b, r16, below, bits, rows)
    keep = r16 < below
    assert bits.tobytes() == np.packbits(keep, bitorder="little").tobytes()
    x = w - b
    want = np.empty_like(rows)
    kernels.row_sums(np.abs(x), want[0])
    kernels.row_sums(np.abs(keep.astype(np.float32) * x), want[1])
    assert rows.tobytes() == want.tobytes()


@needs_native
def test_wrong_inputs_are_refused_not_read_out_of_bounds():
    base = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="float32"):
        native.merge(base, [np.zeros(10, np.float64)], deltas=True, weights=[1.0])
    with pytest.raises(ValueError, match="one size"):
        native.merge(base, [np.zeros(9, np.float32)], deltas=True, weights=[1.0])
    with pytest.raises(ValueError, match="1 to"):
        native.merge(base, [base] * (native.MAX_MODELS + 1), deltas=True, weights=[1.0] * (native.MAX_MODELS + 1))
    with pytest.raises(ValueError, match="shorter"):
        native.merge(base, [base], deltas=True, weights=[1.0], bits=[np.zeros(1, np.uint8)])
