"""A plain merge (training-free method, no ``refit:``) never imports transformers: config.json is read
and written as JSON, tokenizer vocabularies are read from their files, and the merged model's tokenizer
is a byte-for-byte copy. The output must still be an ordinary transformers classifier whose tokenizer
tokenizes exactly as the source's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from hm3.errors import HM3Error
from hm3.io import TOKENIZER_FILES, load_checkpoint, tokenizer_vocab
from hm3.merging.engine import merge, merged_config, prepare

TEXTS = ["w0 w1 w77 w119", "w3 w4 w12 notaword", "w10 " * 100, "W3 [MASK] w22 w14", ""]


def test_plain_merge_process_never_imports_transformers_or_torch(recipe, tmp_path):
    """The `hm3 merge` command of linear, TIES and DARE-TIES recipes, in a fresh interpreter: every
    merge writes its model, and no transformers or torch module is loaded at the end (the numpy
    engine merges them; ``import torch`` alone is ~0.8 s)."""
    outs = {}
    for method, params in [("linear", {}), ("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5})]:
        (tmp_path / f"{method}.yaml").write_text(yaml.safe_dump(recipe(method, **params)))
        outs[method] = tmp_path / f"out-{method}"
    script = textwrap.dedent(f"""
        import json, sys
        from hm3.cli import app
        for method, out in {json.dumps({m: str(p) for m, p in outs.items()})}.items():
            app(["merge", {str(tmp_path)!r} + "/" + method + ".yaml", "--out", out, "--no-progress"],
                standalone_mode=False)
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "torch"))))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert loaded == [], f"a plain merge imported {loaded[:5]}"
    for out in outs.values():
        assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5})])
def test_output_loads_with_transformers_and_tokenizes_as_the_source(recipe, tiny, tmp_path, method, params):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    import hm3

    rec = recipe(method, **params)
    out = merge(rec, tmp_path / "out", progress=False).path

    # config.json: what transformers itself writes for the merged config, and it loads back to it
    prep = prepare(rec)
    cfg = merged_config(prep)
    assert (out / "config.json").read_text() == cfg.to_json_string()
    loaded = AutoConfig.from_pretrained(str(out))
    assert loaded.num_labels == 5 and loaded.id2label == cfg.id2label == dict(enumerate(prep.space.id2label().values()))
    assert loaded.hm3["groups"] == prep.space.to_json()
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert type(model).__name__ == "BertForSequenceClassification" and model.classifier.out_features == 5
    clf = hm3.load(out)
    assert clf.groups == ["a", "b"]
    assert set(clf.predict_proba(TEXTS[:2])["b"].shape) == {2, 3}

    # tokenizer: the source's files byte for byte, and the same tokens as the source tokenizer
    src = tiny["base"]  # the recipe's first model with a tokenizer: its base
    copied = sorted(p.name for p in out.iterdir() if p.name in TOKENIZER_FILES)
    assert copied == sorted(p.name for p in src.iterdir() if p.name in TOKENIZER_FILES) and copied
    for name in copied:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    ours, theirs = AutoTokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(src))
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours.model_max_length == theirs.model_max_length
    for kw in ({}, {"padding": True, "truncation": True}, {"truncation": True, "max_length": 16}):
        assert ours(TEXTS, **kw).data == theirs(TEXTS, **kw).data, kw
    assert ours(TEXTS[0], TEXTS[1]).data == theirs(TEXTS[0], TEXTS[1]).data  # pairs
    # ...and the same as the fine-tuned models' own (re-saved) tokenizers
    assert ours(TEXTS, padding=True).data == AutoTokenizer.from_pretrained(str(tiny["a"]))(TEXTS, padding=True).data


def _model_copy(tiny, tmp_path, name="m"):
    d = tmp_path / name
    shutil.copytree(tiny["a"], d)
    return d


@pytest.mark.parametrize("content,pattern", [
    ("{not json", "cannot read the model config"),
    ("[1, 2]", "expected a JSON object"),
    ('{"hidden_size": 32}', 'no "model_type"'),
    ('{"model_type": "gpt2"}', "model_type 'gpt2' is not supported"),
    ('{"model_type": "bert", "id2label": {"zero": "neg"}}', '"id2label" must map label ids'),
    ('{"model_type": "bert", "id2label": ["neg", "pos"]}', '"id2label" must map label ids'),
])
def test_broken_config_json_is_an_error_naming_the_file(tiny, tmp_path, content, pattern):
    d = _model_copy(tiny, tmp_path)
    (d / "config.json").write_text(content)
    with pytest.raises(HM3Error, match=pattern) as e:
        load_checkpoint(d)
    assert str(d / "config.json") in str(e.value)
    rec = {"merge_method": "ties", "base_model": str(tiny["base"]),
           "models": [{"model": str(tiny["b"]), "group": "b"}, {"model": str(d), "group": "x"}]}
    with pytest.raises(HM3Error, match=pattern):
        merge(rec, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_config_json_is_an_error(tiny, tmp_path):
    d = _model_copy(tiny, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(HM3Error, match=f"{d}: no config.json"):
        load_checkpoint(d)


def test_checkpoint_config_reads_what_autoconfig_reads(tiny):
    from transformers import AutoConfig

    ours, theirs = load_checkpoint(tiny["a"]).config, AutoConfig.from_pretrained(str(tiny["a"]))
    for key in ("model_type", "vocab_size", "hidden_size", "id2label", "label2id", "architectures"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert getattr(ours, "no_such_key", None) is None


def _bpe_and_unigram_tokenizers(tmp_path):
    """Small BPE and Unigram tokenizers (trained in milliseconds) with two added tokens each."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["hello world this is a test", "another line of text for the tokenizer", "merging models"] * 20
    specials = ["<s>", "</s>", "<unk>", "<pad>"]
    dirs = []
    for kind, model, trainer in [
        ("bpe", models.BPE(unk_token="<unk>"), trainers.BpeTrainer(vocab_size=80, special_tokens=specials)),
        ("unigram", models.Unigram(), trainers.UnigramTrainer(vocab_size=60, special_tokens=specials, unk_token="<unk>")),
    ]:
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(texts, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="<pad>")
        fast.add_tokens(["newtok1", "newtok2"])
        fast.save_pretrained(str(tmp_path / kind))
        dirs.append(tmp_path / kind)
    return dirs


def test_tokenizer_vocab_reads_the_files_as_transformers_does(tiny, tmp_path):
    """tokenizer.json (WordLevel, BPE, Unigram; added tokens) and a bare vocab.txt give the
    vocabulary transformers' tokenizer reports."""
    from transformers import AutoTokenizer

    wordpiece = tmp_path / "wordpiece"  # a slow-style BERT tokenizer: vocab.txt, no tokenizer.json
    wordpiece.mkdir()
    words = list(AutoTokenizer.from_pretrained(str(tiny["base"])).get_vocab())
    (wordpiece / "vocab.txt").write_text("".join(f"{w}\n" for w in words + ["##s", "extra"]))
    (wordpiece / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                                 "do_lower_case": False}))
    for d in [tiny["base"], tiny["a"], wordpiece, *_bpe_and_unigram_tokenizers(tmp_path)]:
        vocab = tokenizer_vocab(d)
        assert vocab == AutoTokenizer.from_pretrained(str(d)).get_vocab(), d
    assert tokenizer_vocab(tmp_path) is None  # no tokenizer files


def test_vocab_txt_mismatch_is_still_detected(recipe, tiny, tmp_path):
    """Models shipping only vocab.txt: the same vocabulary merges, a changed token is an error."""
    rec = recipe("ties", density=0.5)
    words = list(tokenizer_vocab(tiny["a"]))
    for name, vocab in [("a", words), ("b", words[:-1] + ["zzz"])]:
        d = tmp_path / name
        shutil.copytree(tiny[name], d)
        for f in TOKENIZER_FILES:
            (d / f).unlink(missing_ok=True)
        (d / "vocab.txt").write_text("".join(f"{w}\n" for w in vocab))
    rec["models"][0]["model"] = str(tmp_path / "a")  # vocab.txt; the base and b have tokenizer.json
    prepare(rec)
    rec["models"][1]["model"] = str(tmp_path / "b")
    with pytest.raises(HM3Error, match="tokenizer vocabulary differs"):
        prepare(rec)


def test_expanded_models_carry_the_source_tokenizer(recipe, tiny, tmp_path):
    from hm3.expand import BASE, expand_models

    paths = expand_models(recipe("ties", density=0.5), tmp_path / "x")
    for key in ("a", "b", BASE):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (paths[key] / name).read_bytes() == (tiny["base"] / name).read_bytes(), (key, name)


def test_tokenizer_source_without_tokenizer_fails_before_writing(recipe, tmp_path):
    (tmp_path / "empty").mkdir()
    rec = {**recipe("ties", density=0.5), "tokenizer_source": str(tmp_path / "empty")}
    with pytest.raises(HM3Error, match="no tokenizer to copy.*set `tokenizer_source`"):
        merge(rec, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
