"""Body distillation (hm3.body_distill): the training itself, the `refit: body:` recipe step and the command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import hm3
from hm3.body_distill import _batches, distill_body
from hm3.errors import HM3Error
from hm3.testing import TASK_A, TASK_B, _no_dropout


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HM3_CACHE", str(tmp_path / "cache"))


def _texts(task, n, seed):
    return [t for t, _ in task.sample(n, seed=seed)]


def _jsonl(path: Path, texts) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _kl_to_teachers(clf, teachers: dict[str, Path], texts) -> float:
    """Mean over groups of KL(guard || merged group's softmax) on ``texts``."""
    total = 0.0
    for g, path in teachers.items():
        t = torch.tensor(next(iter(hm3.load(path).predict_proba(texts).values())), dtype=torch.float64)
        s = torch.tensor(clf.predict_proba(texts, groups=[g])[g], dtype=torch.float64)
        total += float((t * (t.clamp_min(1e-12).log() - s.clamp_min(1e-12).log())).sum(1).mean())
    return total / len(teachers)


def _merged(tiny, recipe, tmp_path, name="merged"):
    return hm3.merge(recipe("ties", density=0.3), tmp_path / name, progress=False).path


def test_batches_cover_every_text_once_per_epoch_in_length_buckets():
    import random

    lengths = [(i * 7919) % 97 for i in range(1000)]
    batches = _batches(lengths, 16, random.Random(0))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert all(len(b) <= 16 for b in batches)
    # within a batch the lengths are close: sorted buckets of 800 texts out of lengths 0..96
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10
    assert _batches(lengths, 16, random.Random(0)) == batches
    assert _batches(lengths, 16, random.Random(1)) != batches


def _setup(tiny, recipe, tmp_path):
    """The merged tiny model, its guards, training and held-out texts, and its KL to the guards before."""
    teachers = {"a": tiny["a"], "b": tiny["b"]}
    train = _texts(TASK_A, 120, 1) + _texts(TASK_B, 120, 2)
    held = _texts(TASK_A, 100, 50) + _texts(TASK_B, 100, 51)
    clf = hm3.load(_merged(tiny, recipe, tmp_path))
    return clf, teachers, train, held, _kl_to_teachers(clf, teachers, held)


def test_body_distillation_brings_the_merged_model_closer_to_its_guards(tiny, tmp_path, recipe):
    clf, teachers, train, held, before = _setup(tiny, recipe, tmp_path)
    report = distill_body(clf.model, clf.tokenizer, clf.space, teachers, train, epochs=4, lr=1e-3, batch_size=16,
                          max_length=32)
    after = _kl_to_teachers(clf, teachers, held)
    assert after < 0.5 * before, (before, after)
    assert report.texts == 240 and report.steps == 4 * 15 and len(report.loss) == 4
    assert report.loss[-1] < report.loss[0]
    assert not clf.model.training and all(p.requires_grad for p in clf.model.parameters())


def test_bf16_body_distillation_trains_in_mixed_precision_and_still_gets_closer(tiny, tmp_path, recipe):
    clf, teachers, train, held, before = _setup(tiny, recipe, tmp_path)
    seen = []
    hook = clf.model.bert.encoder.layer[0].output.dense.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        report = distill_body(clf.model, clf.tokenizer, clf.space, teachers, train, epochs=4, lr=1e-3,
                              batch_size=16, max_length=32, precision="bfloat16")
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}, "the student's matrix products ran in bf16"
    assert all(p.dtype == torch.float32 for p in clf.model.parameters()), "weights stay fp32"
    assert _kl_to_teachers(clf, teachers, held) < 0.5 * before
    assert report.to_json()["precision"] == "bfloat16" and "bfloat16 (autocast)" in report.markdown()
    top = distill_body(clf.model, clf.tokenizer, clf.space, teachers, train, epochs=1, lr=1e-3, batch_size=16,
                       max_length=32, precision="bfloat16", layers=1)
    assert top.cached, "the split's check passes in bf16 too (both sides under autocast)"
    with pytest.raises(HM3Error, match="unknown precision"):
        distill_body(clf.model, clf.tokenizer, clf.space, teachers, train, precision="fp16")


def test_label_weight_trains_towards_each_texts_own_label_in_its_group_only(tiny, tmp_path, recipe):
    clf, teachers, train, held, _ = _setup(tiny, recipe, tmp_path)
    rows = TASK_A.sample(120, seed=1)  # = train's first 120 texts, with their labels
    flipped = {t: 1 - y for t, y in rows}  # labels that contradict group a's guard
    guard_a = hm3.load(tiny["a"])
    report = distill_body(clf.model, clf.tokenizer, clf.space, teachers, train, epochs=15, lr=1e-3, batch_size=16,
                          max_length=32, labels={"a": flipped}, label_weight=1.0)
    assert report.labelled == {"a": 120} and report.to_json()["labelled"] == {"a": 120}
    assert "label with weight 1" in report.markdown()
    # group a has moved from its guard's answers to the (flipped) labels; group b still follows its guard
    probs = clf.predict_proba([t for t, _ in rows], groups=["a"])["a"]
    assert (probs.argmax(1) == [flipped[t] for t, _ in rows]).mean() > 0.7
    assert _agreement(clf, guard_a, "a", [t for t, _ in rows]) < 0.3  # without the labels it would follow the guard
    b_texts = _texts(TASK_B, 100, 51)
    assert _agreement(clf, hm3.load(tiny["b"]), "b", b_texts) > 0.9
    with pytest.raises(HM3Error, match="label_weight must be in"):
        distill_body(clf.model, clf.tokenizer, clf.space, teachers, train, labels={"a": flipped}, label_weight=1.5)
    with pytest.raises(HM3Error, match="no group's data has labels"):
        distill_body(clf.model, clf.tokenizer, clf.space, teachers, train, label_weight=0.3)


def _agreement(clf, guard, group, texts) -> float:
    import numpy as np

    mine = np.asarray(clf.predict_proba(texts, groups=[group])[group]).argmax(1)
    theirs = np.asarray(next(iter(guard.predict_proba(texts).values()))).argmax(1)
    return float((mine == theirs).mean())


def test_top_layers_only_leave_the_rest_byte_identical(tiny, tmp_path, recipe):
    merged = _merged(tiny, recipe, tmp_path)
    clf = hm3.load(merged)
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    report = distill_body(clf.model, clf.tokenizer, clf.space, {"a": tiny["a"], "b": tiny["b"]},
                          _texts(TASK_A, 40, 3), epochs=1, lr=1e-3, layers=1, max_length=32)
    after = clf.model.state_dict()
    n_layers = clf.model.config.num_hidden_layers
    top = f"bert.encoder.layer.{n_layers - 1}."
    for k, v in before.items():
        moved = not torch.equal(v, after[k])
        trainable = k.startswith(top) or k.startswith("bert.pooler.") or k.startswith("classifier.")
        if not trainable:
            assert not moved, k
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(top) and k.endswith("weight"))
    assert report.trained == f"top 1 of {n_layers} encoder layers, pooler and head"
    with pytest.raises(HM3Error, match="> the model's"):
        distill_body(clf.model, clf.tokenizer, clf.space, {"a": tiny["a"], "b": tiny["b"]}, ["w0 w1"], layers=99)


@pytest.mark.parametrize("layers", [1, 2])
def test_top_layers_from_cached_states_train_like_the_whole_model(tiny, tmp_path, recipe, monkeypatch, layers):
    """Without dropout, training the top layers from the frozen part's cached output is the same
    training as running the whole model each step (to float rounding); the model is whole again after.
    (The tiny models have 2 layers: with ``layers`` 2 only the embeddings are frozen and nothing is cached.)"""
    import hm3.body_distill as bd

    merged = _merged(tiny, recipe, tmp_path)
    texts = _texts(TASK_A, 30, 3) + _texts(TASK_B, 30, 4)
    runs = {}
    for cached in (True, False):
        clf = hm3.load(merged)
        _no_dropout(clf.model)
        stack, emb = clf.model.bert.encoder.layer, clf.model.bert.embeddings
        if not cached:
            monkeypatch.setattr(bd._LowerStates, "build", classmethod(lambda *a, **k: None))
        report = distill_body(clf.model, clf.tokenizer, clf.space, {"a": tiny["a"], "b": tiny["b"]}, texts,
                              epochs=2, lr=1e-3, layers=layers, max_length=32)
        assert report.cached is (cached and layers < 2)
        assert clf.model.bert.encoder.layer is stack and clf.model.bert.embeddings is emb
        runs[cached] = {k: v.clone() for k, v in clf.model.state_dict().items()}
        monkeypatch.undo()
    for k, v in runs[True].items():
        torch.testing.assert_close(v, runs[False][k], rtol=1e-4, atol=1e-5, msg=k)
    before = hm3.load(merged).model.state_dict()
    moved = [k for k in before if not torch.equal(before[k], runs[True][k])]
    assert any(k.startswith("classifier.") for k in moved) and any(".encoder.layer." in k for k in moved)


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2", "distilbert"])
def test_every_family_splits_at_its_top_layers(family):
    """The cached lower part plus the top layers give the whole model's logits in each family hm3 reads
    (``_LowerStates.build`` compares them itself and returns None when they differ); the model is
    whole again afterwards."""
    from transformers import AutoModelForSequenceClassification

    from hm3.body_distill import _LowerStates
    from hm3.testing import tiny_config, tiny_tokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family, num_labels=3, num_hidden_layers=3))
    before = [id(m) for m in model.modules()]
    ids = tiny_tokenizer()(["w1 w2 w3 w4", "w5 w6", "w7 w8 w9 w1 w2 w3 w4 w5"])["input_ids"]
    for layers in (1, 2):
        lower = _LowerStates.build(model, layers, ids, 0, 2, "float32")
        assert lower is not None and lower.cut == 3 - layers
        assert [len(s) for s in lower.states] == [len(x) for x in ids]
    assert _LowerStates.build(model, 3, ids, 0, 2, "float32") is None  # every layer trains: only embeddings below
    assert [id(m) for m in model.modules()] == before


def test_an_encoder_that_does_more_than_its_layers_falls_back_to_whole_passes(tiny, tmp_path, recipe, monkeypatch, caplog):
    """The cache is checked against the whole model first: an encoder whose forward pass adds
    something of its own (here: a shift of its input) would be applied twice by the split, so the
    check fails and training runs the whole model every step."""
    from transformers.models.bert import modeling_bert

    original = modeling_bert.BertEncoder.forward

    def shifted(self, hidden_states, *args, **kwargs):
        return original(self, hidden_states + 1.0, *args, **kwargs)

    monkeypatch.setattr(modeling_bert.BertEncoder, "forward", shifted)
    clf = hm3.load(_merged(tiny, recipe, tmp_path))
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    with caplog.at_level("WARNING", logger="hm3.body_distill"):
        report = distill_body(clf.model, clf.tokenizer, clf.space, {"a": tiny["a"], "b": tiny["b"]},
                              _texts(TASK_A, 20, 3), epochs=1, lr=1e-3, layers=1, max_length=32)
    assert report.cached is False
    assert "differ from its whole forward pass" in caplog.text
    assert any(not torch.equal(v, clf.model.state_dict()[k]) for k, v in before.items() if k.startswith("classifier."))


def test_deberta_v2_with_its_convolution_after_the_first_layer_is_not_split(caplog):
    """DeBERTa-v2's encoder applies a convolution after its first layer (``conv_kernel_size``): the
    top layers alone would apply it again, so the check catches it and training runs whole passes."""
    from transformers import AutoModelForSequenceClassification

    from hm3.body_distill import _LowerStates
    from hm3.testing import tiny_config, tiny_tokenizer

    torch.manual_seed(0)
    cfg = tiny_config("deberta-v2", num_labels=3, num_hidden_layers=3, conv_kernel_size=3, conv_act="gelu")
    model = AutoModelForSequenceClassification.from_config(cfg)
    ids = tiny_tokenizer()(["w1 w2 w3 w4", "w5 w6", "w7 w8 w9 w1 w2 w3 w4 w5"])["input_ids"]
    with caplog.at_level("WARNING", logger="hm3.body_distill"):
        assert _LowerStates.build(model, 2, ids, 0, 2, "float32") is None
    assert "differ from its whole forward pass" in caplog.text


def test_frozen_word_embeddings_stay_byte_identical_while_the_rest_trains(tiny, tmp_path, recipe):
    merged = _merged(tiny, recipe, tmp_path)
    clf = hm3.load(merged)
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    report = distill_body(clf.model, clf.tokenizer, clf.space, {"a": tiny["a"], "b": tiny["b"]},
                          _texts(TASK_A, 40, 3), epochs=1, lr=1e-3, max_length=32, freeze_embeddings=True)
    after = clf.model.state_dict()
    assert torch.equal(before["bert.embeddings.word_embeddings.weight"], after["bert.embeddings.word_embeddings.weight"])
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert "bert.embeddings.position_embeddings.weight" in moved and "bert.encoder.layer.0.attention.self.query.weight" in moved
    assert report.trained == "all weights but the word embeddings"
    assert all(p.requires_grad for p in clf.model.parameters())  # unfrozen again afterwards
    top = distill_body(clf.model, clf.tokenizer, clf.space, {"a": tiny["a"], "b": tiny["b"]}, ["w0 w1"],
                       epochs=1, layers=1, max_length=32, freeze_embeddings=True)
    assert top.trained == f"top 1 of {clf.model.config.num_hidden_layers} encoder layers, pooler and head"


def test_every_group_needs_its_own_guard(tiny, tmp_path, recipe):
    clf = hm3.load(_merged(tiny, recipe, tmp_path))
    with pytest.raises(HM3Error, match=r"every group; missing \['b'\]"):
        distill_body(clf.model, clf.tokenizer, clf.space, {"a": tiny["a"]}, ["w0 w1"])
    with pytest.raises(HM3Error, match="has 2 labels but group 'b' has 3"):
        distill_body(clf.model, clf.tokenizer, clf.space, {"a": tiny["a"], "b": tiny["a"]}, ["w0 w1"])
    with pytest.raises(HM3Error, match="no texts"):
        distill_body(clf.model, clf.tokenizer, clf.space, {"a": tiny["a"], "b": tiny["b"]}, [])


def test_teacher_logits_run_each_window_once_and_match_a_fresh_pass(tiny):
    from hm3.refit import TeacherLogits, teacher_logits

    clf = hm3.load(tiny["a"])
    wins, _ = clf.windows(_texts(TASK_A, 40, 3))
    distinct = list(dict.fromkeys(map(tuple, wins)))
    memo = TeacherLogits()
    first = memo(tiny["a"], clf.tokenizer, wins[:25], 8, cache=False)
    assert memo.computed == len(set(map(tuple, wins[:25]))) and memo.reused == 0
    both = memo(tiny["a"], clf.tokenizer, wins[15:], 8, cache=False)
    assert memo.computed == len(distinct)
    assert memo.reused == len(set(map(tuple, wins[:25])) & set(map(tuple, wins[15:])))
    fresh = teacher_logits(tiny["a"], clf.tokenizer, wins, 8, cache=False)
    torch.testing.assert_close(first, fresh[:25], rtol=0, atol=1e-5)  # other batches: rounding only
    torch.testing.assert_close(both, fresh[15:], rtol=0, atol=1e-5)
    assert memo(tiny["b"], clf.tokenizer, wins[:5], 8, cache=False).shape[0] == 5
    assert memo.computed == len(distinct) + len(set(map(tuple, wins[:5]))), "another guard: its own windows"


def test_recipe_body_step_is_recorded_reproducible_and_needs_distill(tiny, tmp_path, recipe):
    from hm3.io import load_checkpoint

    r = recipe("ties", density=0.3)
    r["data"] = {"texts": {"a": _jsonl(tmp_path / "a.jsonl", _texts(TASK_A, 60, 4)),
                           "b": _jsonl(tmp_path / "b.jsonl", _texts(TASK_B, 60, 5))}}
    r["refit"] = {"mode": "distill", "body": {"epochs": 1, "lr": 1e-3, "max_length": 32}}
    one = hm3.merge(r, tmp_path / "one", progress=False).path
    two = hm3.merge(r, tmp_path / "two", progress=False).path  # teachers' logits from the cache
    assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()

    heads_only = dict(r, refit={"mode": "distill"})
    plain = load_checkpoint(hm3.merge(heads_only, tmp_path / "heads", progress=False).path)
    trained = load_checkpoint(one)
    assert not torch.equal(plain.tensor("bert.encoder.layer.0.attention.self.query.weight"),
                           trained.tensor("bert.encoder.layer.0.attention.self.query.weight"))
    meta = json.loads((one / "config.json").read_text())["hm3"]["refit"]
    assert meta["body"]["texts"] == 120 and meta["body"]["teachers"] == {"a": str(tiny["a"]), "b": str(tiny["b"])}
    assert meta["body"]["steps"] == 8 and set(meta["groups"]) == {"a", "b"}
    # each guard's own texts (all shorter than 32 tokens) already ran in the head re-fit: looked up
    tok = hm3.load(one).tokenizer
    short = {g: sum(len(x) <= 32 for x in tok(_texts(task, 60, seed))["input_ids"])
             for g, task, seed in (("a", TASK_A, 4), ("b", TASK_B, 5))}
    assert short["a"] > 0 and meta["body"]["teacher_reused"] == short["a"] + short["b"]
    assert "## Body distillation" in (one / "README.md").read_text()

    after = dict(r, refit={"mode": "distill", "body": {"epochs": 1, "lr": 1e-3, "max_length": 32, "heads_after": True}})
    res = hm3.merge(after, tmp_path / "after", progress=False).path
    again = load_checkpoint(res)
    for name in trained.names:  # the same body (same seed, same training); the heads fitted once more on it
        same = torch.equal(trained.tensor(name), again.tensor(name))
        assert same != name.startswith("classifier."), name
    meta = json.loads((res / "config.json").read_text())["hm3"]["refit"]
    assert set(meta["heads_after"]["groups"]) == {"a", "b"}
    assert "## Head re-fit after the body" in (res / "README.md").read_text()

    r["refit"] = {"mode": "labelled", "data": {"a": r["data"]["texts"]["a"]}, "body": {"epochs": 1}}
    with pytest.raises(HM3Error, match="body needs mode: distill"):
        hm3.merge(r, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_refit_targets_train_each_group_on_its_own_refit_texts_without_more_guard_passes(tiny, tmp_path, recipe):
    """``targets: refit``: group a learns on a's re-fit texts only (b's on b's): the guards are asked
    about those windows alone, all of which the head re-fit had run; ``all`` asks every guard about
    every text."""
    r = recipe("ties", density=0.3)
    r["data"] = {"texts": {"a": _jsonl(tmp_path / "a.jsonl", _texts(TASK_A, 40, 4)),
                           "b": _jsonl(tmp_path / "b.jsonl", _texts(TASK_B, 40, 5))}}
    body = {"epochs": 1, "lr": 1e-3, "max_length": 32}
    metas = {}
    for targets in ("all", "refit"):
        r["refit"] = {"mode": "distill", "max_length": 32, "truncate": True, "body": dict(body, targets=targets)}
        out = hm3.merge(r, tmp_path / targets, progress=False).path
        metas[targets] = json.loads((out / "config.json").read_text())["hm3"]["refit"]
    texts = metas["all"]["body"]["texts"]
    own = {g: metas["refit"]["groups"][g]["texts"] for g in ("a", "b")}
    assert metas["all"]["body"]["teacher_windows"] == 2 * texts
    assert metas["refit"]["body"]["teacher_windows"] == own["a"] + own["b"] < 2 * texts
    assert metas["refit"]["body"]["teacher_reused"] == own["a"] + own["b"]  # no new guard pass
    assert metas["refit"]["body"]["targets"] == "refit" and metas["refit"]["body"]["steps"] > 0
    # the masked loss: every text in every group's set is the unmasked training, byte for byte; a group
    # that learns on fewer texts trains to other weights
    texts = _texts(TASK_A, 20, 8) + _texts(TASK_B, 20, 9)
    trained = {}
    for name, targets, sets in (("all", "all", None), ("full", "refit", {"a": texts, "b": texts}),
                                ("part", "refit", {"a": texts[:20], "b": texts})):
        clf = hm3.load(tmp_path / "all")
        distill_body(clf.model, clf.tokenizer, clf.space, {"a": tiny["a"], "b": tiny["b"]}, texts, epochs=1,
                     lr=1e-3, max_length=32, targets=targets, group_texts=sets)
        trained[name] = clf.model.state_dict()
    assert all(torch.equal(v, trained["full"][k]) for k, v in trained["all"].items())
    assert not all(torch.equal(v, trained["part"][k]) for k, v in trained["all"].items())
    clf = hm3.load(tmp_path / "all")
    with pytest.raises(HM3Error, match="needs each group's re-fit texts"):
        distill_body(clf.model, clf.tokenizer, clf.space, {"a": tiny["a"], "b": tiny["b"]}, ["w0 w1"], targets="refit")
    with pytest.raises(HM3Error, match="has no re-fit texts"):
        distill_body(clf.model, clf.tokenizer, clf.space, {"a": tiny["a"], "b": tiny["b"]}, ["w0 w1"], targets="refit",
                     group_texts={"a": ["w0 w1"], "b": ["w2"]})
    with pytest.raises(HM3Error, match="'all' or 'refit'"):
        distill_body(clf.model, clf.tokenizer, clf.space, {"a": tiny["a"], "b": tiny["b"]}, ["w0 w1"], targets="some")


def test_refit_dir_checks_the_body_options_as_a_recipe_does_before_any_work(tiny, tmp_path, recipe):
    from hm3.refit import GroupRefit, refit_dir

    merged = _merged(tiny, recipe, tmp_path)
    a = _jsonl(tmp_path / "a.jsonl", _texts(TASK_A, 40, 6))
    specs = [GroupRefit("a", a, teacher=Path(tiny["a"]))]
    for body, message in (({"epochs": 1, "lrate": 1e-3}, "lrate: unknown key"),
                          ({"epochs": 0}, "epochs: Input should be greater than 0"),
                          ({"layers": 0}, "layers: Input should be greater than or equal to 1"),
                          ({"heads_after": True}, "run `hm3 refit` again on the output")):
        with pytest.raises(HM3Error, match=re.escape(message)):
            refit_dir(merged, specs, tmp_path / "out", body=body)
        assert not (tmp_path / "out").exists()


def test_refit_command_with_body_epochs(tiny, tmp_path, recipe):
    from typer.testing import CliRunner

    from hm3.cli import app

    merged = _merged(tiny, recipe, tmp_path)
    a = _jsonl(tmp_path / "a.jsonl", _texts(TASK_A, 40, 6))
    b = _jsonl(tmp_path / "b.jsonl", _texts(TASK_B, 40, 7))
    runner = CliRunner()
    args = ["refit", str(merged), "--data", f"a={a}", "--data", f"b={b}", "--distill-from", f"a={tiny['a']}",
            "--body-epochs", "1", "--body-lr", "1e-3", "--body-max-length", "32", "--no-progress"]
    missing = runner.invoke(app, [*args, "-o", str(tmp_path / "x")])  # b has no guard
    assert missing.exit_code == 2 and "missing ['b']" in missing.output
    assert not (tmp_path / "x").exists()
    res = runner.invoke(app, [*args, "--distill-from", f"b={tiny['b']}", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["hm3"]["refit"]
    assert meta["body"]["texts"] == 80 and meta["body"]["epochs"] == 1
    assert "labelled" not in meta["body"] and meta["body"]["targets"] == "all"
    both = [*args, "--distill-from", f"b={tiny['b']}", "--body-layers", "1"]
    res = runner.invoke(app, [*both, "--body-targets", "refit", "-o", str(tmp_path / "own")])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "own" / "config.json").read_text())["hm3"]["refit"]["body"]
    assert meta["targets"] == "refit" and meta["cached"] is True and meta["teacher_windows"] == 80
    bad = runner.invoke(app, [*both, "--body-targets", "some", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "targets: Input should be 'all' or 'refit'" in bad.output
    assert not (tmp_path / "bad").exists()


def test_body_label_weight_from_a_recipe_and_the_command_uses_the_groups_labelled_data(tiny, tmp_path, recipe):
    from typer.testing import CliRunner

    from hm3.cli import app

    def labelled(path, task, n, seed):
        path.write_text("".join(json.dumps({"text": t, "label": task.labels[y]}) + "\n" for t, y in task.sample(n, seed=seed)))
        return str(path)

    a = labelled(tmp_path / "a.jsonl", TASK_A, 40, 6)  # a has labels, b only texts
    b = _jsonl(tmp_path / "b.jsonl", _texts(TASK_B, 40, 7))
    r = recipe("ties", density=0.3)
    r["refit"] = {"mode": "distill", "data": {"a": a, "b": b},
                  "body": {"epochs": 1, "lr": 1e-3, "max_length": 32, "label_weight": 0.5}}
    res = hm3.merge(r, tmp_path / "m", progress=False).path
    body = json.loads((res / "config.json").read_text())["hm3"]["refit"]["body"]
    assert body["label_weight"] == 0.5 and body["labelled"] == {"a": 40}
    assert "label with weight 0.5 on 40 a texts" in (res / "README.md").read_text()

    merged = _merged(tiny, recipe, tmp_path)
    out = CliRunner().invoke(app, ["refit", str(merged), "--data", f"a={a}", "--data", f"b={b}",
                                   "--distill-from", f"a={tiny['a']}", "--distill-from", f"b={tiny['b']}",
                                   "--body-epochs", "1", "--body-lr", "1e-3", "--body-max-length", "32",
                                   "--body-label-weight", "0.5", "--no-progress", "-o", str(tmp_path / "out")])
    assert out.exit_code == 0, out.output
    body = json.loads((tmp_path / "out" / "config.json").read_text())["hm3"]["refit"]["body"]
    assert body["labelled"] == {"a": 40}
    alone = CliRunner().invoke(app, ["refit", str(merged), "--data", f"a={a}", "--distill-from", f"a={tiny['a']}",
                                     "--body-label-weight", "0.5", "-o", str(tmp_path / "none")])
    assert alone.exit_code == 2 and "needs --body-epochs" in alone.output and not (tmp_path / "none").exists()
