"""Opt-in fast inference paths (hm3.fastpaths): what int8 quantises, and int8-checked's fp32 re-runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hm3
from hm3.fastpaths import FP32_MODULES, CheckedInt8, accelerate, quantize_int8
from hm3.testing import TASK_A, tiny_base, tiny_finetune


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    return hm3.load(tiny_finetune(tiny_base(root / "base"), root / "a", TASK_A, steps=20))


@pytest.fixture(scope="module")
def texts():
    return [t for t, _ in TASK_A.sample(40, seed=7)]


def test_int8_quantises_the_encoder_per_channel_and_keeps_the_head_fp32(clf):
    q = quantize_int8(clf.model)
    kinds = {name: type(m) for name, m in q.named_modules()}
    dynamic = [n for n, t in kinds.items() if t is torch.ao.nn.quantized.dynamic.Linear]
    plain = [n for n, t in kinds.items() if t is torch.nn.Linear]
    assert dynamic and all(not any(p in FP32_MODULES for p in n.split(".")) for n in dynamic)
    assert plain and all(any(p in FP32_MODULES for p in n.split(".")) for n in plain)
    scheme = q.get_submodule(dynamic[0]).weight().qscheme()
    assert scheme == torch.per_channel_affine  # one scale per output channel
    assert all(type(m) is torch.nn.Linear for m in clf.model.modules() if "Linear" in type(m).__name__), \
        "the fp32 model is left as it was"


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
