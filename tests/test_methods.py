"""Merge methods on small tensors, head-aware density and seeded reproducibility (hm3.merging)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hm3
from hm3.merging.engine import merge_tensor, prepare
from hm3.merging.methods import REGISTRY, TensorParams
from hm3.merging.steps import Rescale
from hm3.merging.steps import agrees as steps_agrees
from hm3.merging.steps import elect_sign as steps_elect_sign
from hm3.merging.steps import magnitude as steps_magnitude
from hm3.testing import synthetic_classifier, tiny_base

# The task-arithmetic family (data-aware methods, if registered, are tested with their statistics).
GTA = [n for n in REGISTRY
       if n not in ("linear", "model_stock", "tsv", "iso_c") and not getattr(REGISTRY[n], "needs_stats", False)]


def params(n: int, *, weight=1.0, density=1.0, **kw) -> TensorParams:
    w = tuple(weight) if isinstance(weight, (list, tuple)) else (weight,) * n
    d = tuple(density) if isinstance(density, (list, tuple)) else (density,) * n
    return TensorParams(weight=w, density=d, **kw)


def rand(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run(name: str, base, deltas, p, seed=0):
    return REGISTRY[name].fn(base, deltas, p, torch.Generator().manual_seed(seed))


# -- per method, small tensors ---------------------------------------------------------------------
def test_task_arithmetic_one_model_weight_one_is_the_model():
    base, delta = rand(6, 5), rand(1, 6, 5, seed=1)
    assert torch.allclose(run("task_arithmetic", base, delta, params(1)), base + delta[0], atol=1e-7)


def test_task_arithmetic_weights_and_lambda():
    base, deltas = rand(4, 3), rand(2, 4, 3, seed=1)
    out = run("task_arithmetic", base, deltas, params(2, weight=(0.5, 2.0), lambda_=0.8))
    assert torch.allclose(out, base + 0.8 * (0.5 * deltas[0] + 2.0 * deltas[1]), atol=1e-6)


@pytest.mark.parametrize("weight", [1.0, 0.3, 2.5])
def test_ties_density_one_single_model_is_the_model(weight):
    base, delta = rand(7, 4), rand(1, 7, 4, seed=2)
    out = run("ties", base, delta, params(1, weight=weight, normalize=True))
    assert torch.allclose(out, base + delta[0], atol=1e-6)  # normalised: the weight cancels


def test_ties_disjoint_mean_by_hand():
    base = torch.zeros(4)
    deltas = torch.tensor([[1.0, -2.0, 3.0, 0.0], [3.0, 1.0, -1.0, 0.0]])
    out = run("ties", base, deltas, params(2, weight=(1.0, 1.0), normalize=True))
    # signs: col0 both +; col1 sum −1 → −, only model 0; col2 sum 2 → +, only model 0; col3 nobody.
    assert out.tolist() == [2.0, -2.0, 3.0, 0.0]


def test_ties_trims_before_electing():
    base = torch.zeros(4)
    deltas = torch.tensor([[4.0, -3.0, 0.1, 0.2], [0.3, 1.0, -5.0, 0.05]])
    out = run("ties", base, deltas, params(2, density=0.5, normalize=True))
    # model 0 keeps {4, −3}, model 1 keeps {1, −5}; col1: −3 + 1 = −2 → "−": only model 0's −3.
    assert out.tolist() == [4.0, -3.0, -5.0, 0.0]


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.2, 0.5, 1.3)])
def test_linear_normalize_is_weighted_mean(weights):
    thetas = rand(3, 5, 4, seed=3)
    base = rand(5, 4, seed=4)  # linear does not depend on the base
    w = torch.tensor(weights).view(3, 1, 1)
    for b in (base, torch.zeros_like(base)):
        out = run("linear", b, thetas - b, params(3, weight=weights, normalize=True))
        assert torch.allclose(out, (w * thetas).sum(0) / w.sum(), atol=1e-6)
    unnorm = run("linear", base, thetas - base, params(3, weight=weights, normalize=False))
    assert torch.allclose(unnorm, (w * thetas).sum(0), atol=1e-5)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_identical_task_vectors_give_base_plus_delta(filter_wise):
    base, delta = rand(6, 8), rand(6, 8, seed=5)
    deltas = delta.expand(3, 6, 8).clone()
    out = run("model_stock", base, deltas, params(3, extra={"filter_wise": filter_wise}))
    assert torch.allclose(out, base + delta, atol=1e-5)  # cos θ = 1 → t = 1


def test_model_stock_orthogonal_keeps_base_and_formula():
    base = torch.ones(4)
    orth = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    assert torch.allclose(run("model_stock", base, orth, params(2)), base)  # cos 0 → t = 0
    deltas = torch.tensor([[1.0, 1.0, 0, 0], [1.0, 0, 1.0, 0]])  # cos = 1/2 → t = 2·½/(1+½) = 2/3
    assert torch.allclose(run("model_stock", base, deltas, params(2)), base + 2 / 3 * deltas.mean(0))


def test_dare_linear_density_one_is_task_arithmetic():
    base, deltas = rand(5, 5), rand(2, 5, 5, seed=6)
    p = params(2, weight=(0.7, 1.3), rescale=Rescale.l1)
    dare, ta = run("dare_linear", base, deltas, p), run("task_arithmetic", base, deltas, p)
    assert torch.allclose(dare, ta, atol=1e-6)


@pytest.mark.parametrize("name", GTA + ["linear", "model_stock"])
def test_methods_keep_shape_dtype_and_inputs(name):
    base, deltas = rand(6, 10), rand(3, 6, 10, seed=7)
    before = deltas.clone()
    p = params(3, weight=(0.5, 1.0, 1.5), density=0.5, rescale=Rescale.l1 if REGISTRY[name].random else None)
    out = run(name, base, deltas, p)
    assert out.shape == base.shape and out.dtype == base.dtype
    assert bool(torch.isfinite(out).all())
    assert torch.equal(deltas, before), f"{name} modified the caller's task vectors"


@pytest.mark.parametrize("name", [n for n in GTA if REGISTRY[n].random])
def test_random_methods_follow_the_generator(name):
    base, deltas = rand(20, 20), rand(2, 20, 20, seed=8)
    p = params(2, density=0.5, rescale=Rescale.l1)
    a, b = run(name, base, deltas, p, seed=1), run(name, base, deltas, p, seed=1)
    torch.manual_seed(1234)
    assert torch.equal(a, b) and torch.equal(a, run(name, base, deltas, p, seed=1))
    assert not torch.equal(a, run(name, base, deltas, p, seed=2))


# -- tiny real merges -------------------------------------------------------------------------------
GROUPS = {"a": ("neg", "pos"), "b": ("red", "green", "blue")}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    base = tiny_base(root / "base")
    return {"root": root, "base": base,
            "models": {g: synthetic_classifier(base, root / g, labels, i + 1)
                       for i, (g, labels) in enumerate(GROUPS.items())}}


def _recipe(synth, method: str, **kw) -> dict:
    return {"merge_method": method, "base_model": str(synth["base"]),
            "models": [{"model": str(p), "group": g, "parameters": {"weight": 1.0}}
                       for g, p in synth["models"].items()],
            **kw}


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "dare_ties"])
def test_head_density_counts_own_rows_only(synth, method):
    """head.density 0.5: each group's own rows keep max(1, int(0.5·own numel)) task-vector entries
    — the zero rows of the other groups do not dilute it. (A top-k over the whole padded 5×32
    weight would keep k = 80 entries: all 64 of group a's, 80 of group b's 96.)"""
    recipe = _recipe(synth, method, parameters={"density": 0.5}, head={"density": 0.5}, seed=1)
    prep = prepare(recipe)
    seen = 0
    for name, kind, base, deltas in prep.inputs([n for n, k in prep.kinds.items() if k == "out"]):
        merged = merge_tensor(prep, name, kind, base, deltas)
        for g in prep.space:
            own = merged[g.rows] - base[g.rows]
            numel = own.numel()
            kept = int((own != 0).sum())
            if method == "dare_ties":  # random: about half of the own rows, l1 norm preserved
                if own.dim() == 2:  # 64 or 96 draws
                    assert 0.25 < kept / numel < 0.75, (name, g.name, kept, numel)
                if kept:
                    assert torch.isclose(own.abs().sum(), deltas[:, g.rows].abs().sum(), rtol=1e-5)
            elif method == "breadcrumbs":  # int(d·n) entries (gamma drops the top 1%, rounded down)
                assert kept == int(0.5 * numel), (name, g.name, kept, numel)
            else:
                assert kept == max(1, int(0.5 * numel)), (name, g.name, kept, numel)
            seen += 1
    assert seen == 4  # weight and bias, two groups


def test_head_density_keep_is_the_default(synth):
    """The default ``head: {density: keep}``: body tensors are pruned, head rows are kept whole."""
    state = hm3.merge(_recipe(synth, "ties", parameters={"density": 0.3}), progress=False).state
    offset = 0
    for g, labels in GROUPS.items():
        orig = load_file(str(synth["models"][g] / "model.safetensors"))["classifier.weight"]
        assert torch.allclose(state["classifier.weight"][offset:offset + len(labels)], orig, atol=1e-6)
        offset += len(labels)
    body = state["bert.encoder.layer.0.attention.self.query.weight"]
    base_sd = load_file(str(synth["base"] / "model.safetensors"))
    base_q = base_sd["encoder.layer.0.attention.self.query.weight"]
    assert (body != base_q).float().mean() < 0.6  # pruned: many entries stay at the base


def _sha(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_seeded_merges_are_byte_identical(synth):
    root = synth["root"]
    recipe = _recipe(synth, "dare_ties", parameters={"density": 0.5}, head={"density": 0.5}, seed=7)
    torch.manual_seed(0)
    hm3.merge(recipe, root / "r1", progress=False)
    torch.manual_seed(12345)  # the global RNG must not matter
    torch.rand(1000)
    hm3.merge(recipe, root / "r2", progress=False)
    hm3.merge({**recipe, "seed": 8}, root / "r3", progress=False)
    assert _sha(root / "r1") == _sha(root / "r2")
    assert _sha(root / "r1") != _sha(root / "r3")
    a = load_file(str(root / "r1" / "model.safetensors"))
    c = load_file(str(root / "r3" / "model.safetensors"))
    differ = [k for k in a if not torch.equal(a[k], c[k])]
    assert "bert.encoder.layer.0.attention.self.query.weight" in differ and "classifier.weight" in differ


def test_expand_cli(synth, tmp_path):
    """`hm3 expand RECIPE --out DIR` writes one expanded model per group, the base and a mergekit
    recipe; an existing DIR is refused (exit 2, one line) unless --force."""
    import yaml
    from typer.testing import CliRunner

    from hm3.cli import app

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(synth, "ties", parameters={"density": 0.5})))
    out = tmp_path / "expanded"
    runner = CliRunner()
    res = runner.invoke(app, ["expand", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["_base", "a", "b", "mergekit.yml"]
    head = load_file(str(out / "b" / "model.safetensors"))["classifier.weight"]
    assert head.shape == (5, 32) and not head[:2].any() and head[2:].abs().min() > 0
    mk = yaml.safe_load((out / "mergekit.yml").read_text())
    density = mk["parameters"]["density"]  # head tensors first at 1.0, then the recipe's density
    assert density[-1] == {"value": 0.5}
    assert sorted(c["filter"] for c in density[:-1]) == ["classifier.bias", "classifier.weight"]
    assert all(c["value"] == 1.0 for c in density[:-1])
    assert mk["base_model"] == str((out / "_base").resolve())
    again = runner.invoke(app, ["expand", str(recipe), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    assert runner.invoke(app, ["expand", str(recipe), "--out", str(out), "--force"]).exit_code == 0


# -- TIES / DARE-TIES vs a straightforward reference (the fast in-place path must give its bits) ----
def _ref_trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """Top-k by magnitude; ties at the threshold keep the first ones in memory order (stable sort)."""
    if density >= 1:
        return x.clone()
    k = max(1, int(density * x.numel()))
    order = torch.sort(x.abs().reshape(-1), descending=True, stable=True).indices
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return x * keep.view_as(x)


def _ref_rng(seed: int) -> np.random.Generator:
    """The numpy stream a merge method draws DARE's bits from when given ``torch.Generator(seed)``:
    one SFC64 stream per tensor, seeded by one draw of it (``steps.numpy_rng``), shared by the models
    in order."""
    g = torch.Generator().manual_seed(seed)
    return np.random.Generator(np.random.SFC64(int(torch.randint(0, 2**62, (), generator=g))))


def _ref_draws(rng: np.random.Generator, n: int) -> torch.Tensor:
    """DARE's 16 random bits for ``n`` elements (int16): one 64-bit draw per 4 elements, little-endian."""
    return torch.from_numpy(rng.bit_generator.random_raw((n + 3) // 4).view(np.int16)[:n].copy())


def _ref_dare(x: torch.Tensor, density: float, g: np.random.Generator) -> torch.Tensor:
    """Keep where 16 random bits (unsigned) are below round(density·2^16), then mergekit's l1 rescale."""
    if density >= 1:
        return x.clone()
    n = x.numel()
    bits = _ref_draws(g, n).to(torch.int32) + 2**15  # unsigned 16-bit values
    keep = (bits < round(density * 2**16)).view(x.shape)
    masked = x * keep
    before, after = _ref_fixed_sum(x.abs()), _ref_fixed_sum(masked.abs())
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def _ref_gta(base, deltas, p: TensorParams, trim) -> torch.Tensor:
    """TIES pipeline written out plainly: trim, weight, elect, mask, sum, divide, λ, add. The election
    is the plain steps (``elect_sign``, ``agrees``) that the mergekit parity tests check against
    mergekit's ``get_mask``."""
    ts = [trim(deltas[i], p.density[i]) * p.weight[i] for i in range(deltas.shape[0])]
    positive = steps_elect_sign(ts, p.consensus)
    mixed = divisor = None
    for t, w in zip(ts, p.weight):
        agree = steps_agrees(t, positive)
        mixed = t * agree if mixed is None else mixed + t * agree
        if p.normalize:
            divisor = agree.float() * w if divisor is None else divisor + agree.float() * w
    if p.normalize:
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (mixed * p.lambda_ if p.lambda_ != 1 else mixed) + base


def _tied(shape, seed, zeros=True):
    """Small integers /4: many magnitudes tied at any threshold, zeros and -0.0 included."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, shape, generator=g).float() / 4
    if zeros:
        x[torch.rand(shape, generator=g) < 0.1] = -0.0
    return x


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [(7,), (33, 17), (3, 5, 40), (70_000,)])
def test_ties_equals_reference_bit_for_bit(shape, seed):
    n = 2 + seed % 3
    g = torch.Generator().manual_seed(100 + seed)
    base = _tied(shape, seed + 50)
    base[torch.rand(shape, generator=g) < 0.2] = -0.0  # where -0.0 + ±0 shows the sign of zero
    deltas = torch.stack([_tied(shape, seed * 10 + i) if i % 2 else torch.randn(shape, generator=g) for i in range(n)])
    before = deltas.clone()
    weights = tuple(float(w) for w in torch.empty(n).uniform_(-0.5, 2.0, generator=g))
    densities = tuple(float(d) for d in torch.empty(n).uniform_(0.05, 1.0, generator=g))
    for consensus in ("sum", "count"):
        for normalize in (True, False):
            p = params(n, weight=weights, density=densities, normalize=normalize, consensus=consensus,
                       lambda_=0.75 if normalize else 1.0)
            got, want = run("ties", base, deltas, p), _ref_gta(base, deltas, p, _ref_trim)
            assert torch.equal(_bits(got), _bits(want)), (consensus, normalize, int((got != want).sum()))
            assert torch.equal(deltas, before)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(9,), (40, 30), (80_000,)])
def test_dare_ties_equals_reference_bit_for_bit(shape, seed):
    n = 2 + seed % 2
    base, deltas = rand(*shape, seed=seed), torch.stack([_tied(shape, seed + i) for i in range(n)])
    p = params(n, weight=(1.0, 0.5, 1.5)[:n], density=(0.3, 0.6, 0.9)[:n], rescale=Rescale.l1)
    gen = _ref_rng(7)
    want = _ref_gta(base, deltas, p, lambda x, d: _ref_dare(x, d, gen))
    got = run("dare_ties", base, deltas, p, seed=7)
    assert torch.equal(_bits(got), _bits(want)), int((got != want).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_magnitude_equals_reference_in_every_dtype(dtype):
    """numpy's in-place selection (float32/64/16) and the torch.kthvalue fallback (bfloat16)."""
    for seed in range(5):
        x = _tied((50, 41), seed).to(dtype)
        for density in (0.01, 0.3, 0.5, 0.77):
            got = steps_magnitude(x, density)
            want = _ref_trim(x, density)
            assert got.dtype == dtype and torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())


def _ref_fixed_sum(x: torch.Tensor) -> torch.Tensor:
    """The documented order of ``steps.fixed_sum``, written out: rows of 4,096 elements summed one
    by one, the remainder as one more, then the row sums the same way, until at most 4,096 remain."""
    x = x.reshape(-1)
    while x.numel() > 4096:
        full = x.numel() // 4096 * 4096
        sums = [_np_sum(x[i:i + 4096]) for i in range(0, full, 4096)] + ([_np_sum(x[full:])] if full < x.numel() else [])
        x = torch.stack(sums)
    return _np_sum(x)


def _np_sum(x: torch.Tensor) -> torch.Tensor:
    """numpy's sum of a flat tensor (its pairwise order), as a 0-d tensor of the same dtype."""
    return torch.tensor(x.numpy().sum(), dtype=x.dtype)


def _ref_dare_rescaled(x: torch.Tensor, density: float, g: np.random.Generator, rescale: Rescale | None) -> torch.Tensor:
    """``_ref_dare`` with any rescale, written out whole-tensor: mask, then mergekit's norm ratio
    (or divide by the density, ``inverse``)."""
    if density >= 1:
        return x.clone()
    n, q = x.numel(), round(density * 2**16)
    if q >= 2**16:
        keep = torch.ones(x.shape, dtype=torch.bool)
    else:
        keep = ((_ref_draws(g, n).to(torch.int32) + 2**15) < q).view(x.shape)
    masked = x * keep
    if rescale is None:
        return masked
    if rescale is Rescale.inverse:
        return masked / density if density > 0 else masked
    sqrt = lambda t: torch.from_numpy(np.asarray(np.sqrt(t.numpy())))  # noqa: E731  (numpy's: correctly rounded)
    norm = {Rescale.l1: lambda t: _ref_fixed_sum(t.abs()), Rescale.l2: lambda t: sqrt(_ref_fixed_sum(t * t)),
            Rescale.linf: lambda t: t.abs().max()}
    before, after = norm[rescale](x), norm[rescale](masked)
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rescale", [Rescale.l1, None, Rescale.inverse, Rescale.l2])
def test_dare_blockwise_equals_reference_bit_for_bit(dtype, rescale):
    """Tensors of several blocks (steps.BLOCK), sizes not a multiple of 4, densities 0 and 1 and
    within 2^-17 of 1, negative weights, -0.0 in base and deltas, λ, normalise, both methods:
    the blockwise DARE path gives the whole-tensor reference's bits, inside a workspace too."""
    from hm3.merging import steps

    shape = (2, steps.BLOCK + 50_001)  # 2.4 blocks, odd size
    g = torch.Generator().manual_seed(11)
    base = rand(*shape, seed=3).to(dtype)
    base[torch.rand(shape, generator=g) < 0.3] = -0.0
    for densities, weights in [((0.0, 1.0, 0.37), (1.0, -0.5, 1.5)), ((0.999995, 0.5, 0.1), (1.0, 1.0, 1.0))]:
        deltas = torch.stack([_tied(shape, 20 + i) for i in range(3)]).to(dtype)
        before = deltas.clone()
        for name, normalize, lam in [("dare_ties", False, 1.0), ("dare_ties", True, 0.75), ("dare_linear", False, -1.25)]:
            p = params(3, weight=weights, density=densities, rescale=rescale, normalize=normalize, lambda_=lam)
            gen = _ref_rng(5)
            trim = lambda x, d: _ref_dare_rescaled(x, d, gen, rescale)  # noqa: E731
            if name == "dare_ties":
                want = _ref_gta(base, deltas, p, trim)
            else:  # no election: Σ w_i S(δ_i) in model order, / Σ w_i with normalise
                ts = [trim(deltas[i], densities[i]) * weights[i] for i in range(3)]
                mixed = ts[0] + ts[1] + ts[2]
                if normalize:
                    mixed = mixed / torch.tensor(weights, dtype=dtype).sum()
                want = (mixed * lam if lam != 1 else mixed) + base
            got = run(name, base, deltas, p, seed=5)
            with steps.workspace():  # scratch buffers reused: a larger tensor first leaves stale bits in them
                run(name, torch.cat([base, base], 1), torch.cat([deltas, deltas], 2), p, seed=9)
                in_ws = run(name, base, deltas, p, seed=5)
                run(name, base, deltas.flip(0), p, seed=6)  # must not touch the result above
            for out in (got, in_ws):
                assert out.dtype == dtype and torch.equal(out.view(torch.uint8), want.view(torch.uint8)), \
                    (name, densities, int((out != want).sum()))
            assert torch.equal(deltas.view(torch.uint8), before.view(torch.uint8))
