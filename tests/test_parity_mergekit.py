"""Parity with mergekit 0.1.5: hm3 on the original classifiers == mergekit on the expanded ones.

For every shared method, hm3 merges the original models (different label counts) and mergekit
0.1.5 merges the same models expanded by ``hm3.expand.expand_models``; every output tensor must
agree within 1e-6 (float32). Head tensors keep density 1.0 in both (hm3's default
``head: {density: keep}``; mergekit's ``density: [{filter: classifier, value: 1.0}, {value: d}]``).

The fine-tuned models are synthetic — base + a random task vector — so that within each tensor
no two task-vector entries have the same magnitude: magnitude pruning then has a unique top-k and
hm3's ``topk`` and mergekit's ``argsort`` must keep the same set (they may differ only at ties,
see docs/METHODS.md). The fixture asserts that premise.

Random sparsification (DARE, DELLA) draws different masks by design (hm3: a generator per tensor;
mergekit: the global RNG), so at density < 1 we check the properties both must share: the kept
fraction is close to the density and the l1 norm of each task vector is preserved by the rescale.
"""

from __future__ import annotations

import json
import logging
from importlib import metadata

import pytest
import torch

try:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
except Exception as e:  # noqa: BLE001 - any import failure means: no reference to compare with
    pytest.skip(f"mergekit is not importable ({type(e).__name__}: {e}); pip install mergekit==0.1.5",
                allow_module_level=True)
if metadata.version("mergekit") != "0.1.5":
    pytest.skip(f"parity is pinned to mergekit 0.1.5; {metadata.version('mergekit')} is installed",
                allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402

import hm3  # noqa: E402
from hm3.expand import BASE, expand_models, mergekit_recipe  # noqa: E402
from hm3.testing import synthetic_classifier, tiny_base  # noqa: E402

ATOL = 1e-6
GROUPS = {"a": ("neg", "pos"), "b": ("red", "green", "blue"), "c": ("yes", "no", "maybe", "other")}
WEIGHTS = {"a": 0.7, "b": 1.3, "c": 1.0}


# -- synthetic fine-tunes --------------------------------------------------------------------------
def _distinct_delta(base: torch.Tensor, gen: torch.Generator, scale: float) -> torch.Tensor:
    """A model tensor ``base + δ`` whose float32 task vector ``model − base`` has no two entries of
    equal magnitude (redrawn until so), so top-k and sort orders are unique."""
    for _ in range(20):
        model = base + torch.randn(base.shape, generator=gen) * scale
        mags = (model - base).abs().reshape(-1)
        if mags.unique().numel() == mags.numel() and bool((mags > 0).all()):
            return model
    raise AssertionError("could not draw a tie-free task vector")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    base = tiny_base(root / "base", seed=0)
    models = {g: synthetic_classifier(base, root / g, labels, seed=i + 1,
                                     delta=lambda t, gen: _distinct_delta(t, gen, 0.01))
              for i, (g, labels) in enumerate(GROUPS.items())}
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": str(p), "group": g} for g, p in models.items()]}
    expanded = expand_models(recipe, root / "expanded")
    # The premise of exact magnitude-pruning parity: no ties in any expanded task vector's body.
    base_sd = load_file(str(expanded[BASE] / "model.safetensors"))
    for g in GROUPS:
        sd = load_file(str(expanded[g] / "model.safetensors"))
        for k, t in sd.items():
            if not k.startswith("classifier"):
                mags = (t - base_sd[k]).abs().reshape(-1)
                assert mags.unique().numel() == mags.numel(), f"{g}:{k} has tied task-vector magnitudes"
    return {"root": root, "base": base, "models": models, "expanded": expanded, "runs": 0}


def _hm3_recipe(zoo, method: str, params: dict, per_model: dict | None = None, groups=tuple(GROUPS),
                **extra) -> dict:
    per_model = per_model or {}
    return {
        "merge_method": method,
        **({} if method == "linear" else {"base_model": str(zoo["base"])}),
        "models": [
            {"model": str(zoo["models"][g]), "group": g,
             "parameters": {"weight": WEIGHTS[g], **{k: v[g] for k, v in per_model.items()}}}
            for g in groups
        ],
        "parameters": params,
        **extra,
    }


def _mk_recipe(zoo, method: str, params: dict, per_model: dict | None = None, groups=tuple(GROUPS)) -> dict:
    """The same recipe for mergekit over the expanded models, written by hand (not by
    hm3.expand.mergekit_recipe, which test_translated_recipe checks separately)."""
    per_model = per_model or {}

    def keep_head(params: dict) -> dict:
        if "density" not in params:
            return params
        return {**params, "density": [{"filter": "classifier", "value": 1.0}, {"value": params["density"]}]}

    return {
        "merge_method": method,
        **({} if method == "linear" else {"base_model": str(zoo["expanded"][BASE])}),
        "models": [
            {"model": str(zoo["expanded"][g]),
             "parameters": keep_head({"weight": WEIGHTS[g], **{k: v[g] for k, v in per_model.items()}})}
            for g in groups
        ],
        "parameters": keep_head(params),
        "dtype": "float32",
    }


def _run_mergekit(zoo, recipe: dict, seed: int | None = None) -> dict[str, torch.Tensor]:
    zoo["runs"] += 1
    out = zoo["root"] / f"mergekit-{zoo['runs']}"
    options = MergeOptions(quiet=True, write_model_card=False, random_seed=seed)
    logging.getLogger("mergekit").setLevel(logging.ERROR)
    run_merge(MergeConfiguration.model_validate(recipe), str(out), options)
    return load_file(str(out / "model.safetensors"))


def _run_hm3(recipe: dict) -> dict[str, torch.Tensor]:
    return hm3.merge(recipe, progress=False).state


def _assert_same(ours: dict, theirs: dict, skip: tuple[str, ...] = ()) -> None:
    assert set(ours) == set(theirs), f"tensor names differ: {sorted(set(ours) ^ set(theirs))}"
    worst = {}
    for name in ours:
        if name in skip:
            continue
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape, f"{name}: {tuple(a.shape)} vs mergekit {tuple(b.shape)}"
        worst[name] = (a.float() - b.float()).abs().max().item()
    bad = {k: v for k, v in worst.items() if v > ATOL}
    assert not bad, f"tensors differ from mergekit by more than {ATOL}: {bad}"


# -- exact parity ----------------------------------------------------------------------------------
EXACT = [
    ("linear", {"normalize": True}, None),
    ("linear", {"normalize": False}, None),
    ("task_arithmetic", {"lambda": 0.8}, None),
    ("task_arithmetic", {"normalize": True, "lambda": 1.5}, None),
    ("ties", {"density": 1.0}, None),
    ("ties", {"density": 0.5, "normalize": True, "lambda": 1.2}, None),
    ("ties", {"density": 0.3, "normalize": False, "lambda": 0.9}, None),
    ("ties", {"normalize": True}, {"density": {"a": 0.3, "b": 0.5, "c": 1.0}}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.05}, None),
    ("breadcrumbs", {"density": 0.7, "lambda": 0.8}, {"gamma": {"a": 0.0, "b": 0.02, "c": 0.1}}),
    ("breadcrumbs_ties", {"density": 0.3, "normalize": True}, None),
    ("dare_ties", {"density": 1.0}, None),
    ("dare_linear", {"density": 1.0, "lambda": 0.7}, None),
    ("della", {"density": 1.0}, None),
    ("della_linear", {"density": 1.0, "epsilon": 0.1}, None),
]


@pytest.mark.parametrize("method,params,per_model", EXACT,
                         ids=[f"{m}-{json.dumps(p, sort_keys=True)}-{bool(pm)}" for m, p, pm in EXACT])
def test_exact_parity(zoo, method, params, per_model):
    ours = _run_hm3(_hm3_recipe(zoo, method, params, per_model))
    theirs = _run_mergekit(zoo, _mk_recipe(zoo, method, params, per_model))
    _assert_same(ours, theirs)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_parity(zoo, filter_wise):
    """Body tensors match mergekit; the head is hm3's documented deviation: each group keeps its
    own rows (mergekit would pull the disjoint, orthogonal head rows to the zero base)."""
    params = {"filter_wise": filter_wise}
    ours = _run_hm3(_hm3_recipe(zoo, "model_stock", params))
    mk = _mk_recipe(zoo, "model_stock", params)
    for m in mk["models"]:
        m["parameters"].pop("weight")  # model_stock takes no weights in mergekit
    theirs = _run_mergekit(zoo, mk)
    head = ("classifier.weight", "classifier.bias")
    _assert_same(ours, theirs, skip=head)
    for name in head:
        expected = sum(load_file(str(zoo["expanded"][g] / "model.safetensors"))[name] for g in GROUPS)
        assert torch.equal(ours[name], expected), f"{name}: hm3 should keep every group's own head rows"
        assert theirs[name].abs().max() < ATOL, f"{name}: mergekit's model_stock head is the zero base here"


def test_translated_recipe(zoo):
    """hm3.expand.mergekit_recipe + expand_models give mergekit a recipe that reproduces hm3."""
    recipe = _hm3_recipe(zoo, "ties", {"normalize": True, "lambda": 1.1},
                         {"density": {"a": 0.4, "b": 0.6, "c": 0.5}})
    mk, notes = mergekit_recipe(recipe, zoo["expanded"])
    assert notes == []
    assert mk["models"][0]["parameters"]["density"][-1] == {"value": 0.4}
    _assert_same(_run_hm3(recipe), _run_mergekit(zoo, mk))
    # No weights given: hm3's default 1.0 is spelled out (mergekit requires a weight).
    bare = {"merge_method": "breadcrumbs", "base_model": str(zoo["base"]), "parameters": {"density": 0.6},
            "models": [{"model": str(zoo["models"][g]), "group": g} for g in GROUPS]}
    mk, notes = mergekit_recipe(bare, zoo["expanded"])
    assert notes == [] and all(m["parameters"]["weight"] == 1.0 for m in mk["models"])
    _assert_same(_run_hm3(bare), _run_mergekit(zoo, mk))
    # What mergekit cannot express is reported, not silently translated.
    _, notes = mergekit_recipe({**bare, "head": {"density": 0.5}}, zoo["expanded"])
    assert any("head.density" in n for n in notes)
    with pytest.raises(hm3.HM3Error, match="consensus"):
        mergekit_recipe({**bare, "merge_method": "breadcrumbs_ties", "parameters": {"consensus": "count"}},
                        zoo["expanded"])
    written = (zoo["root"] / "expanded" / "mergekit.yml").read_text()
    assert "merge_method: task_arithmetic" in written and str(zoo["expanded"][BASE]) in written


def test_expanded_models_are_what_hm3_merges(zoo):
    """Each expanded model: own rows = the original head, other rows zero; base head all zero;
    body tensors are the originals bit for bit; config has the merged id2label and groups."""
    base = load_file(str(zoo["expanded"][BASE] / "model.safetensors"))
    assert base["classifier.weight"].shape == (9, 32) and not base["classifier.weight"].any()
    offset = 0
    for g, labels in GROUPS.items():
        orig = load_file(str(zoo["models"][g] / "model.safetensors"))
        exp = load_file(str(zoo["expanded"][g] / "model.safetensors"))
        assert set(exp) == set(orig)
        rows = slice(offset, offset + len(labels))
        for name in ("classifier.weight", "classifier.bias"):
            assert torch.equal(exp[name][rows], orig[name])
            rest = torch.cat([exp[name][:offset], exp[name][rows.stop:]])
            assert not rest.any(), f"{g}:{name}: rows of other groups must be zero"
        assert all(torch.equal(exp[k], orig[k]) for k in orig if not k.startswith("classifier"))
        cfg = json.loads((zoo["expanded"][g] / "config.json").read_text())
        assert len(cfg["id2label"]) == 9
        assert cfg["id2label"][str(offset)] == f"{g}/{labels[0]}"
        assert [x["name"] for x in cfg["hm3"]["groups"]] == list(GROUPS)
        offset += len(labels)


def test_mergekit_output_loads_groupwise(zoo):
    """mergekit copies the expanded base's config, so hm3.load reads its merge group-wise."""
    theirs_dir = zoo["root"] / "mk-load"
    run_merge(MergeConfiguration.model_validate(_mk_recipe(zoo, "ties", {"density": 0.5})), str(theirs_dir),
              MergeOptions(quiet=True, write_model_card=False))
    clf = hm3.load(theirs_dir)
    assert clf.groups == list(GROUPS)
    probs = clf.predict_proba(["w1 w2 w3"])
    for g, labels in GROUPS.items():
        assert probs[g].shape == (1, len(labels))
        assert abs(float(probs[g].sum()) - 1) < 1e-5


# -- random sparsification at density < 1: shared properties --------------------------------------
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della_linear"])
def test_random_sparsify_properties(zoo, method):
    """One model, density 0.5: every body tensor's merged task vector is the model's task vector
    on a random subset (kept fraction ≈ 0.5), scaled by one factor so its l1 norm is preserved —
    for hm3 and mergekit alike. Their masks differ (different RNGs), by design."""
    d, w = 0.5, WEIGHTS["b"]
    ours = _run_hm3(_hm3_recipe(zoo, method, {"density": d}, groups=("b",), seed=3))
    theirs = _run_mergekit(zoo, _mk_recipe(zoo, method, {"density": d}, groups=("b",)), seed=3)
    base = load_file(str(zoo["expanded"][BASE] / "model.safetensors"))
    model = load_file(str(zoo["expanded"]["b"] / "model.safetensors"))
    original = load_file(str(zoo["models"]["b"] / "model.safetensors"))
    for who, merged in (("hm3", ours), ("mergekit", theirs)):
        kept = total = 0
        by_half = {True: [0, 0], False: [0, 0]}  # della, 2-D tensors: upper/lower magnitude half -> [kept, n]
        for name, t in merged.items():
            if name.startswith("classifier"):  # head density 1.0: the whole (weighted) head; hm3's
                # one-group merge has only b's rows, mergekit's the expanded model's nine
                ref = original[name] if t.shape != model[name].shape else model[name]
                assert torch.allclose(t, w * ref, atol=ATOL), f"{who} {name}"
                continue
            delta = model[name] - base[name]
            got = t - base[name]
            mask = got != 0
            kept, total = kept + int(mask.sum()), total + mask.numel()
            # l1 rescale: ‖merged δ‖₁ = w‖δ‖₁, and the kept entries are δ times one factor.
            assert torch.allclose(got.abs().sum(), w * delta.abs().sum(), rtol=1e-4), f"{who} {name}: l1"
            scale = got[mask].abs().sum() / delta[mask].abs().sum()
            assert torch.allclose(got[mask], scale * delta[mask], atol=ATOL), f"{who} {name}: not one factor"
            if delta.dim() == 2 and method.startswith("della"):  # della ranks magnitudes per row
                ranks = delta.abs().argsort(dim=1).argsort(dim=1)
                upper = ranks >= delta.shape[1] // 2
                for half in (True, False):
                    sel = upper if half else ~upper
                    by_half[half][0] += int((mask & sel).sum())
                    by_half[half][1] += int(sel.sum())
        frac = kept / total  # ~20k Bernoulli draws: std ≈ 0.0035
        assert abs(frac - d) < 0.02, f"{who}: kept fraction {frac:.3f}, density {d}"
        if method.startswith("della"):  # keep probability d-ε..d+ε by rank: halves ≈ d ± ε/2
            hi, lo = (by_half[h][0] / by_half[h][1] for h in (True, False))
            assert hi - lo > 0.05, f"{who}: della should keep large |δ| more often ({hi:.3f} vs {lo:.3f})"


# -- step level: hm3.merging.steps vs mergekit.sparsify / get_mask ----------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from mergekit import sparsify as mk_sparsify  # noqa: E402
from mergekit.merge_methods.generalized_task_arithmetic import get_mask  # noqa: E402

from hm3.merging import steps  # noqa: E402
from hm3.merging.steps import Rescale  # noqa: E402

STEPS = settings(max_examples=50, deadline=None)


def _distinct(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return ((torch.randperm(n, generator=g).float() + 1) / n) * signs


@STEPS
@given(n=st.integers(1, 200), density=st.floats(0.01, 1.0), seed=st.integers(0, 2**16), rescale=st.booleans())
def test_magnitude_matches_mergekit(n, density, seed, rescale):
    x = _distinct(n, seed)
    ours = steps.magnitude(x, density, Rescale.l1 if rescale else None)
    theirs = mk_sparsify.magnitude(x, density, mk_sparsify.RescaleNorm.l1 if rescale else None)
    # The same kept set; the l1 rescale divides two sums, which hm3 adds in numpy's fixed order
    # (docs/METHODS.md, deviation 1) and mergekit with torch.sum, so a rescaled value (up to ~200 here)
    # may differ in its last bit: equal to float32 rounding, exactly equal without the rescale.
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=1e-6 if rescale else 0)


@STEPS
@given(n=st.integers(1, 60), density=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_magnitude_with_ties_differs_only_at_the_threshold(n, density, seed):
    """Documented deviation: with tied magnitudes at the threshold, topk (hm3) and argsort
    (mergekit) may keep different members of the tie — same count, same kept magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (n,), generator=g).float()  # many ties, zeros included
    ours = steps.magnitude(x, density)
    theirs = mk_sparsify.magnitude(x, density)
    k = max(1, int(density * n))
    ours_kept, theirs_kept = x[ours != 0].abs(), x[theirs != 0].abs()
    # Zeros can be "kept" (a zero stays zero), so compare the kept magnitudes via the masks' values.
    assert torch.equal(ours.abs().sort().values, theirs.abs().sort().values)
    assert ours_kept.numel() <= k and theirs_kept.numel() <= k
    differ = (ours != theirs)
    if differ.any():
        threshold = x.abs().sort(descending=True).values[k - 1]
        assert bool((x[differ].abs() == threshold).all()), "mismatch away from the threshold"


@STEPS
@given(n=st.integers(1, 200), density=st.floats(0.01, 1.0), gamma=st.floats(0.0, 0.3),
       seed=st.integers(0, 2**16))
def test_magnitude_outliers_matches_mergekit(n, density, gamma, seed):
    x = _distinct(n, seed)
    ours = steps.magnitude_outliers(x, density, gamma)
    theirs = mk_sparsify.magnitude_outliers(x, density, gamma=gamma)
    assert torch.equal(ours, theirs)


@STEPS
@given(seed=st.integers(0, 2**16), keep=st.floats(0.0, 1.0), norm=st.sampled_from(["l1", "l2", "linf"]))
def test_rescale_matches_mergekit(seed, keep, norm):
    x = _distinct(64, seed)
    mask = (torch.rand(64, generator=torch.Generator().manual_seed(seed)) < keep).float()
    ours = steps.rescale_masked(x, mask, Rescale(norm))
    theirs = mk_sparsify.rescaled_masked_tensor(x, mask, mk_sparsify.RescaleNorm(norm))
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=0)


@STEPS
@given(data=st.lists(st.lists(st.integers(-2, 2), min_size=6, max_size=6), min_size=1, max_size=4),
       method=st.sampled_from(["sum", "count"]))
def test_sign_consensus_matches_mergekit(data, method):
    deltas = torch.tensor(data, dtype=torch.float32)  # small integers: ties at 0 and zeros are common
    assert torch.equal(steps.sign_consensus(deltas, method), get_mask(deltas, method))


def test_della_probabilities_match_mergekit_in_distribution():
    """Same keep probabilities by rank: averaged over 3000 rows of the same 9 magnitudes, hm3's and
    mergekit's keep frequencies per rank agree within sampling noise (std ≈ 0.009 each)."""
    n, rows = 9, 3000
    g = torch.Generator().manual_seed(0)
    mags = torch.arange(1, n + 1, dtype=torch.float32)
    x = torch.stack([mags[torch.randperm(n, generator=g)] for _ in range(rows)])
    ours = steps.della_magprune(x, 0.4, 0.2, torch.Generator().manual_seed(1)) != 0
    torch.manual_seed(2)
    theirs = mk_sparsify.della_magprune(x, 0.4, 0.2) != 0
    f_ours = torch.stack([ours[x == m].float().mean() for m in mags])
    f_theirs = torch.stack([theirs[x == m].float().mean() for m in mags])
    assert (f_ours - f_theirs).abs().max() < 0.05, (f_ours, f_theirs)
