"""Opt-in fast inference paths (hm3.fastpaths): what int8 quantises, and int8-checked's fp32 re-runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hm3
from hm3.errors import HM3Error
from hm3.fastpaths import (FP32_MODULES, CheckedInt8, accelerate, activation_ranges, full_range_int8,
                            int8_linears, quantize_int8, random_windows, smooth)
from hm3.testing import TASK_A, tiny_base, tiny_finetune


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    return hm3.load(tiny_finetune(tiny_base(root / "base"), root / "a", TASK_A, steps=20))


@pytest.fixture(scope="module")
def texts():
    return [t for t, _ in TASK_A.sample(40, seed=7)]


def test_int8_quantises_the_encoder_per_channel_and_keeps_head_and_down_projections_fp32(clf):
    q = quantize_int8(clf.model)
    kinds = {name: type(m) for name, m in q.named_modules()}
    dynamic = [n for n, t in kinds.items() if issubclass(t, torch.ao.nn.quantized.dynamic.Linear)]
    plain = [n for n, t in kinds.items() if t is torch.nn.Linear]
    assert dynamic and sorted(dynamic) == sorted(int8_linears(clf.model))
    assert all(not any(p in FP32_MODULES for p in n.split(".")) for n in dynamic)
    down = [n for n in plain if not any(p in FP32_MODULES for p in n.split("."))]
    assert down and all(n.endswith("output.dense") and "attention" not in n for n in down), \
        "besides the head, only the FFN down-projections stay fp32"
    assert all(q.get_submodule(n).in_features > q.get_submodule(n).out_features for n in down)
    scheme = q.get_submodule(dynamic[0]).weight().qscheme()
    assert scheme == torch.per_channel_affine  # one scale per output channel
    assert all(type(m) is torch.nn.Linear for m in clf.model.modules() if "Linear" in type(m).__name__), \
        "the fp32 model is left as it was"


def test_smoothing_keeps_the_fp32_function(clf, texts):
    """Smoothing only moves scale between a layer's input and its weight: before any int8, the
    logits are fp32's."""
    wins, _ = clf.windows(texts)
    ranges = activation_ranges(clf, texts)
    assert sorted(ranges) == sorted(int8_linears(clf.model))
    assert all(r.shape == (clf.model.get_submodule(n).in_features,) and bool((r > 0).all()) for n, r in ranges.items())
    smoothed, inner = smooth(clf.model, ranges)
    assert len(inner) == len(ranges) and all(isinstance(smoothed.get_submodule(n), torch.nn.Linear) for n in inner)
    fp32 = hm3.load(clf.name)
    fp32.model = smoothed
    torch.testing.assert_close(fp32.window_logits(wins), clf.window_logits(wins), atol=1e-4, rtol=1e-4)


def test_a_channel_calibration_never_saw_move_is_not_smoothed():
    layer, x = _outlier_layer()
    ranges = {"0": x.abs().amax(0)}
    ranges["0"][5] = 0.0
    smoothed, (inner,) = smooth(layer, ranges)
    scale = smoothed.get_submodule(inner).weight[:, 5] / layer[0].weight[:, 5]
    torch.testing.assert_close(scale, torch.ones_like(scale))
    assert smoothed.get_submodule("0").inv[5] == 1 and smoothed.get_submodule("0").inv[3] < 1


def _outlier_layer(seed=0):
    """A linear layer and inputs with one outlier channel (x 60), as transformers' activations have."""
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 96))
    with torch.no_grad():
        layer[0].weight.copy_(torch.randn(96, 64, generator=g) * 0.1)
    x = torch.randn(256, 64, generator=g)
    x[:, 3] *= 60
    return layer, x


@pytest.mark.parametrize("full_range", [False, True])
def test_smoothing_shrinks_int8_error_on_outlier_channels(full_range):
    if full_range and not full_range_int8():
        pytest.skip("8-bit activations need AVX512-VNNI (without it FBGEMM's int16 sums can overflow)")
    layer, x = _outlier_layer()
    ref = layer(x)
    ranges = {"0": x.abs().amax(0)}
    plain = (quantize_int8(layer, full_range=full_range)(x) - ref).abs().mean()
    smoothed = (quantize_int8(layer, ranges, full_range=full_range)(x) - ref).abs().mean()
    assert smoothed < 0.5 * plain, (smoothed, plain)


def test_8_bit_activations_halve_int8_error_where_the_cpu_allows():
    if not full_range_int8():
        pytest.skip("8-bit activations need AVX512-VNNI")
    layer, x = _outlier_layer(1)
    ref = layer(x)
    seven, eight = ((quantize_int8(layer, full_range=f)(x) - ref).abs().mean() for f in (False, True))
    assert eight < 0.7 * seven, (eight, seven)


def test_calibration_texts_or_seeded_random_windows(clf, texts):
    wins = random_windows(clf.tokenizer, 16, n=4)
    assert wins == random_windows(clf.tokenizer, 16, n=4) and len(wins) == 4
    special = set(clf.tokenizer.all_special_ids)
    assert all(len(w) == 16 and w[0] == clf.tokenizer.cls_token_id and w[-1] == clf.tokenizer.sep_token_id
               and not special & set(w[1:-1]) for w in wins)
    random_ranges = activation_ranges(clf)
    text_ranges = activation_ranges(clf, texts)
    name = int8_linears(clf.model)[0]
    assert not torch.equal(random_ranges[name], text_ranges[name])
    with pytest.raises(HM3Error, match="no texts"):
        activation_ranges(clf, ["", "  "])
    with pytest.raises(HM3Error, match="int8 and int8-checked"):
        accelerate(clf, "bf16", calibration=texts)
    fast = accelerate(clf, "int8", calibration=texts)
    assert any(type(m).__name__ == "SmoothedLinear" for m in fast.model.modules())
    assert np.asarray(fast.predict_proba(texts)["a"]).shape == np.asarray(clf.predict_proba(texts)["a"]).shape


def test_int8_checked_reruns_close_calls_in_fp32(clf, texts):
    ref = clf.predict_proba(texts)["a"]
    plain = accelerate(clf, "int8").predict_proba(texts)["a"]
    everything = accelerate(clf, "int8-checked")
    everything.model.margin = float("inf")  # every window is a close call: fp32 throughout
    np.testing.assert_allclose(everything.predict_proba(texts)["a"], ref, atol=1e-6)
    assert everything.model.rerun == everything.model.seen == len(clf.windows(texts)[0])
    nothing = accelerate(clf, "int8-checked")
    nothing.model.margin = 0.0  # nothing is close: int8 throughout
    np.testing.assert_allclose(nothing.predict_proba(texts)["a"], plain, atol=1e-6)
    assert nothing.model.rerun == 0


def test_int8_checked_agrees_wherever_int8_was_unsure(clf, texts):
    """Where int8's own top-two logits are closer than the margin the label is fp32's; elsewhere
    it is int8's."""
    wins, _ = clf.windows(texts)
    ref = clf.window_logits(wins)
    int8 = accelerate(clf, "int8").window_logits(wins)
    top2 = int8.topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]
    checked = accelerate(clf, "int8-checked")
    checked.model.margin = float(gap.median())  # the tiny model's gaps are small: half are close calls
    got = checked.window_logits(wins)
    close = gap < checked.model.margin
    assert torch.equal(got.argmax(1)[close], ref.argmax(1)[close])
    assert torch.equal(got.argmax(1)[~close], int8.argmax(1)[~close])
    assert checked.model.rerun == int(close.sum())
    assert 0 < int(close.sum()) < len(wins), "both kinds of window occur (else this test says little)"



def test_bf16_autocasts_the_matrix_products_and_stays_close_to_fp32(clf, texts):
    wins, _ = clf.windows(texts)
    ref = clf.window_logits(wins)
    fast = accelerate(clf, "bf16")
    seen = []
    hook = clf.model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda m, i, o: seen.append(o.dtype))
    try:
        got = fast.window_logits(wins)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}, "the encoder's linear layers ran in bf16"
    assert got.dtype == torch.float32
    assert not torch.equal(got, ref), "bf16 arithmetic differs from fp32 somewhere"
    assert (got - ref).abs().max() < 0.05 * ref.abs().max() + 0.05
    assert all(p.dtype == torch.float32 for p in clf.model.parameters()), "the weights stay fp32"
    np.testing.assert_allclose(clf.predict_proba(texts)["a"], hm3.load(clf.name).predict_proba(texts)["a"])


def test_unknown_precision_is_refused():
    from hm3.errors import HM3Error
    from hm3.fastpaths import check_precision, forward_context

    for bad in ("fp16", "float16", ""):
        with pytest.raises(HM3Error, match="unknown precision .*valid: float32, bfloat16"):
            check_precision(bad)
        with pytest.raises(HM3Error, match="unknown precision"):
            forward_context(bad)


def test_has_amx_reads_torchs_probe_and_says_no_without_it(monkeypatch):
    import torch

    import hm3.fastpaths as fp

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert fp.has_amx() is True
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert fp.has_amx() is False
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)  # a torch without the helper
    assert fp.has_amx() is False


def test_auto_precision_follows_the_cpu(monkeypatch):
    import hm3.fastpaths as fp
    from hm3.errors import HM3Error

    monkeypatch.setattr(fp, "bf16_is_fast", lambda: True)
    assert fp.resolve_precision("auto") == "bfloat16"
    monkeypatch.setattr(fp, "bf16_is_fast", lambda: False)
    assert fp.resolve_precision("auto") == "float32"
    assert fp.resolve_precision("bfloat16") == "bfloat16" and fp.resolve_precision("float32") == "float32"
    with pytest.raises(HM3Error, match="unknown precision 'fp16'; valid: float32, bfloat16, auto"):
        fp.resolve_precision("fp16")
