"""Tiny models and tasks for tests, examples and benchmarks: built in-process in well under a second.

``tiny_base(dir)`` writes a random BERT (2 layers, hidden 32) with a word-level tokenizer;
``tiny_finetune(base, dir, task)`` trains a classifier from it on a synthetic task where the label
is decided by which marker words a text contains — separable, so a few seconds of training on a
CPU reach full accuracy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(120)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer():
    """A BERT-style fast tokenizer over WORDS (whitespace split, [CLS] … [SEP])."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )


def tiny_config(family: str = "bert", **kw):
    from transformers import BertConfig, DistilBertConfig, RobertaConfig

    vocab = len(SPECIAL) + len(WORDS)
    if family == "bert":
        return BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64, **kw)
    if family == "distilbert":
        return DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                max_position_embeddings=64, **kw)
    if family == "roberta":
        return RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=70, pad_token_id=0, **kw)
    raise ValueError(family)


def tiny_base(out: Path, family: str = "bert", seed: int = 0, headless: bool = True) -> Path:
    """A random tiny encoder (``headless``: a plain ``AutoModel``, like the offline MiniLM)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = tiny_config(family)
    model = AutoModel.from_config(cfg) if headless else AutoModelForSequenceClassification.from_config(cfg)
    model.save_pretrained(str(out))
    tiny_tokenizer().save_pretrained(str(out))
    return Path(out)


@dataclass(frozen=True)
class Task:
    """Label ``labels[k]`` for texts that contain a marker word of class k (and filler words)."""

    labels: tuple[str, ...]
    markers: tuple[tuple[str, ...], ...]

    def sample(self, n: int, seed: int = 0, length: int = 8) -> list[tuple[str, int]]:
        rng = random.Random(seed)
        used = {w for ms in self.markers for w in ms}
        filler = [w for w in WORDS if w not in used]
        out = []
        for i in range(n):
            k = i % len(self.labels)
            words = [rng.choice(filler) for _ in range(length - 1)] + [rng.choice(self.markers[k])]
            rng.shuffle(words)
            out.append((" ".join(words), k))
        rng.shuffle(out)
        return out


TASK_A = Task(("neg", "pos"), (("w0", "w1", "w2"), ("w3", "w4", "w5")))
TASK_B = Task(("red", "green", "blue"), (("w10", "w11"), ("w12", "w13"), ("w14", "w15")))
TASK_C = Task(("LABEL_0", "LABEL_1"), (("w20", "w21"), ("w22", "w23")))


def tiny_finetune(
    base: Path,
    out: Path,
    task: Task,
    *,
    steps: int = 60,
    lr: float = 3e-3,
    seed: int = 0,
    id2label: dict[int, str] | None = None,
    train: str = "all",
) -> Path:
    """Fine-tune a classifier from ``base`` on ``task`` for a few seconds; save it to ``out``.

    ``train="embeddings"`` updates only the word embeddings and the head: each task then moves
    only its own marker words' rows, so task vectors barely overlap — the regime in which
    training-free merging should keep every group's accuracy (what end-to-end tests check).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base))
    labels = id2label or dict(enumerate(task.labels))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=len(task.labels), id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    data = task.sample(steps * 16, seed=seed)
    if train == "embeddings":
        for name, p in model.named_parameters():
            p.requires_grad = "word_embeddings" in name or not name.startswith(model.base_model_prefix + ".")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for s in range(steps):
        batch = data[s * 16 : (s + 1) * 16]
        enc = tok([t for t, _ in batch], return_tensors="pt", padding=True)
        loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return Path(out)


def accuracy(clf, group: str, task: Task, n: int = 200, seed: int = 123) -> float:
    """Accuracy of a group-wise classifier's ``group`` on fresh samples of ``task``."""
    data = task.sample(n, seed=seed)
    probs = clf.predict_proba([t for t, _ in data], groups=[group])[group]
    return float((probs.argmax(1) == torch.tensor([y for _, y in data]).numpy()).mean())
