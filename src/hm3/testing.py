"""Tiny models and tasks for tests, examples and benchmarks: built in-process in seconds.

``tiny_base(dir)`` writes a random BERT (2 layers, hidden 32) with a word-level tokenizer;
``tiny_finetune(base, dir, task)`` trains a classifier from it on a synthetic task where the label
is decided by which marker words a text contains — separable, so a few seconds of training on a
CPU reach full accuracy.

A random base has no features, so each fine-tune builds its own and merges of them collide.
``tiny_pretrained_base(dir)`` is the realistic alternative for merge tests: a tiny BERT pretrained
(a few seconds, self-supervised) on a small language of CONTENT_WORDS among FILLER_WORDS; tasks
sampled with ``task.with_filler(FILLER_WORDS)`` are texts of that language.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

WORDS = [f"w{i}" for i in range(120)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# The tiny language of ``tiny_pretrained_base``: texts are filler words around content words.
CONTENT_WORDS = tuple(WORDS[:60])
FILLER_WORDS = tuple(WORDS[60:])
# Content words the pretrained base learns. The markers of TASK_A/B/C (w0..w23) are not among
# them: like a guard's domain words, fine-tuning has to teach them, which changes the body.
PRETRAIN_WORDS = tuple(WORDS[24:60])


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
    """A tiny config (2 layers unless ``num_hidden_layers`` says otherwise, hidden 32) of ``family``: a
    model type of ``hm3.heads.FAMILIES``."""
    import transformers as T

    vocab = len(SPECIAL) + len(WORDS)
    if family == "distilbert":
        return T.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=kw.pop("num_hidden_layers", 2), n_heads=2,
                                  hidden_dim=64, max_position_embeddings=64, **kw)
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=kw.pop("num_hidden_layers", 2),
                  num_attention_heads=2, intermediate_size=64)
    if family in ("roberta", "xlm-roberta"):  # positions start after the padding index
        cls = T.RobertaConfig if family == "roberta" else T.XLMRobertaConfig
        return cls(max_position_embeddings=70, pad_token_id=0, **common, **kw)
    if family == "electra":
        return T.ElectraConfig(embedding_size=32, max_position_embeddings=64, **common, **kw)
    if family in ("deberta", "deberta-v2"):  # disentangled attention over relative positions
        cls = T.DebertaConfig if family == "deberta" else T.DebertaV2Config
        return cls(max_position_embeddings=64, relative_attention=True, pos_att_type=["c2p", "p2c"],
                   max_relative_positions=32, position_biased_input=False, **common, **kw)
    if family == "bert":
        return T.BertConfig(max_position_embeddings=64, **common, **kw)
    raise ValueError(family)


def tiny_base(out: Path, family: str = "bert", seed: int = 0, headless: bool = True, layers: int = 2) -> Path:
    """A random tiny encoder (``headless``: a plain ``AutoModel``, like the offline MiniLM) of ``layers``
    encoder layers."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = tiny_config(family, num_hidden_layers=layers)
    model = AutoModel.from_config(cfg) if headless else AutoModelForSequenceClassification.from_config(cfg)
    model.save_pretrained(str(out))
    tiny_tokenizer().save_pretrained(str(out))
    return Path(out)


def synthetic_classifier(base_dir: Path, out: Path, labels: Sequence[str], seed: int, delta=None) -> Path:
    """An ordinary tiny ``BertForSequenceClassification`` directory without training: the headless
    base's body plus a random task vector (``delta(tensor, generator)``; default N(0, 0.01²) noise)
    and a random head with ``len(labels)`` rows. For tests of merge arithmetic."""
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(seed)
    delta = delta or (lambda t, g: t + torch.randn(t.shape, generator=g) * 0.01)
    body = load_file(str(Path(base_dir) / "model.safetensors"))  # headless BertModel: no "bert." prefix
    state = {f"bert.{k}": delta(t.float(), gen) for k, t in body.items()}
    state["classifier.weight"] = torch.randn(len(labels), 32, generator=gen) * 0.1
    state["classifier.bias"] = torch.randn(len(labels), generator=gen) * 0.1
    out = Path(out)
    out.mkdir(parents=True)
    tiny_config("bert", num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={v: i for i, v in enumerate(labels)},
                architectures=["BertForSequenceClassification"]).save_pretrained(str(out))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tiny_tokenizer().save_pretrained(str(out))
    return out


def tiny_pretrained_base(
    out: Path,
    *,
    seed: int = 0,
    steps: int = 200,
    lr: float = 1e-2,
    batch_size: int = 64,
    words: Sequence[str] = PRETRAIN_WORDS,
    length: int = 8,
) -> Path:
    """A tiny BERT encoder (2 layers, hidden 32) pretrained for a few seconds; saved headless.

    Self-supervised objective: a text is ``length`` FILLER_WORDS with one of ``words`` at a random
    place; a linear decoder on the pooled [CLS] output names that word (cross-entropy; the decoder
    is thrown away). The encoder thereby learns what a pretrained encoder has and a random one
    lacks: attention that finds a text's content and a [CLS] summary of it — features that
    fine-tunes only nudge, so their task vectors can be merged.

    Why these settings (mean loss of steps 180-200, 60-word variant, one CPU thread): BERT's
    defaults (init std 0.02, dropout 0.1) at lr 3e-3 reach only 1.17 (ln 60 ≈ 4.1 at start);
    without dropout 0.86; at lr 1e-2 0.09; with init std 0.1 (≈ 1/√32 — 0.02 is tuned for hidden
    768 and leaves attention flat for long) 0.044. Warmup is 10% of the steps, then linear decay.
    (Reconstructing the bag of all 120 words instead stayed at its prior loss for 150 steps.)
    The saved config has the usual dropout 0.1, for fine-tuning.
    """
    from transformers import BertModel

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = BertModel(tiny_config("bert", initializer_range=0.1))
    _no_dropout(model)
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    content = torch.tensor([vocab[w] for w in words])  # (C,)
    filler = torch.tensor([vocab[w] for w in FILLER_WORDS])  # (F,)
    decoder = torch.nn.Linear(model.config.hidden_size, len(content))
    opt = torch.optim.AdamW([*model.parameters(), *decoder.parameters()], lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / (steps - warmup))
    )
    rows = torch.arange(batch_size)
    model.train()
    for _ in range(steps):
        ids = filler[torch.randint(len(filler), (batch_size, length), generator=g)]  # (B, L)
        target = torch.randint(len(content), (batch_size,), generator=g)  # (B,)
        ids[rows, torch.randint(length, (batch_size,), generator=g)] = content[target]
        cls, sep = torch.full((batch_size, 1), vocab["[CLS]"]), torch.full((batch_size, 1), vocab["[SEP]"])
        ids = torch.cat([cls, ids, sep], 1)  # (B, L + 2)
        loss = torch.nn.functional.cross_entropy(decoder(model(input_ids=ids).pooler_output), target)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(str(out))
    tiny_tokenizer().save_pretrained(str(out))
    return Path(out)


def _no_dropout(model: torch.nn.Module) -> None:
    """Switch dropout off in training without touching the config (attention reads ``dropout.p``)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


@dataclass(frozen=True)
class Task:
    """Label ``labels[k]`` for texts that contain a marker word of class k (and filler words).

    ``filler``: the words around the marker; empty (default) means every word that is not one of
    this task's markers.
    """

    labels: tuple[str, ...]
    markers: tuple[tuple[str, ...], ...]
    filler: tuple[str, ...] = ()

    def with_filler(self, words: Sequence[str]) -> "Task":
        """The same task with texts made of ``words`` around the marker (e.g. FILLER_WORDS)."""
        return replace(self, filler=tuple(words))

    def sample(self, n: int, seed: int = 0, length: int = 8) -> list[tuple[str, int]]:
        rng = random.Random(seed)
        used = {w for ms in self.markers for w in ms}
        filler = list(self.filler) or [w for w in WORDS if w not in used]
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
    head_lr: float | None = None,
    dropout: bool = True,
) -> Path:
    """Fine-tune a classifier from ``base`` on ``task`` for a few seconds; save it to ``out``.

    ``train="embeddings"`` updates only the word embeddings and the head (the rest stays the
    base's). ``head_lr``: the head's learning rate (default ``lr``) — a head faster than the body,
    as in linear-probe-then-fine-tune, keeps the body's task vector a nudge. ``dropout=False``
    trains without dropout (the saved config keeps its dropout values).
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
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    body = [p for n, p in trained if n.startswith(model.base_model_prefix + ".")]
    head = [p for n, p in trained if not n.startswith(model.base_model_prefix + ".")]
    groups = [{"params": body, "lr": lr}, {"params": head, "lr": lr if head_lr is None else head_lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=0.0)
    model.train()
    if not dropout:
        _no_dropout(model)
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


def mapped_file(t: torch.Tensor) -> str | None:
    """The file whose memory map holds ``t``'s memory, None for anonymous memory (reads
    ``/proc/self/maps``: Linux only). Tests use it to check what is and is not a map of a checkpoint."""
    ptr = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5].strip() if len(parts) == 6 and parts[5].startswith("/") else None
    return None
