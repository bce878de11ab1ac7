"""Fine-tune one guard from the shared base: a plain, seeded torch loop on CPU.

AdamW with linear warmup and decay, explicit truncation, dynamic padding over length-grouped batches
(short texts are not padded to the longest jailbreak), and the epoch with the best validation macro
F1 kept. The result is an ordinary ``*ForSequenceClassification`` checkpoint (safetensors + tokenizer)
written atomically.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from hm3.errors import HM3Error
from hm3.io import AtomicDir, prepare_output
from hm3.zoo.data import Example

log = logging.getLogger(__name__)


def _check_inputs(labels: Sequence[str], train: Sequence[Example], validation: Sequence[Example]) -> None:
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise HM3Error(f"labels must be at least two distinct names, got {list(labels)}")
    if not train:
        raise HM3Error("no training examples; build the guard's data first (hm3.zoo.data.load_guard)")
    for name, examples in (("train", train), ("validation", validation)):
        unknown = sorted({ex.label for ex in examples} - set(labels))
        if unknown:
            raise HM3Error(f"{name} examples use labels {unknown} that are not in {list(labels)}")


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    # truncate explicitly: MiniLM was trained on <= 256 tokens although its config allows 512
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]


def _length_grouped_batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random | None, mega: int = 50
) -> list[list[int]]:
    """Batches of indices with similar lengths, so dynamic padding stays small.

    Training (``rng`` given): shuffle, sort within mega-batches of ``mega`` batches, shuffle the batches —
    the usual length-grouped sampler. Inference (``rng`` None): sort everything by length.
    """
    order = list(range(len(lengths)))
    if rng is None:
        order.sort(key=lambda i: lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(order)
    batches: list[list[int]] = []
    span = batch_size * mega
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _collate(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch: (B, T) input_ids and attention_mask."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


@torch.no_grad()
def _predict_ids(
    model: Any, tokenizer: Any, texts: Sequence[str], max_length: int = 128, batch_size: int = 64
) -> np.ndarray:
    """Predicted class ids for ``texts`` (batched, length-sorted, truncated like training)."""
    if not texts:
        return np.zeros(0, dtype=np.int64)
    was_training = model.training
    model.eval()
    encoded = _encode(tokenizer, texts, max_length)
    preds = np.zeros(len(texts), dtype=np.int64)
    for batch in _length_grouped_batches([len(x) for x in encoded], batch_size, None):
        logits = model(**_collate([encoded[i] for i in batch], tokenizer.pad_token_id)).logits  # (B, C)
        preds[batch] = logits.argmax(-1).cpu().numpy()
    model.train(was_training)
    return preds


def _scores(y_true: Sequence[int], y_pred: Sequence[int], n_labels: int) -> dict[str, float]:
    return {
        "macro_f1": float(
            f1_score(y_true, y_pred, average="macro", labels=list(range(n_labels)), zero_division=0)
        ),
        "accuracy": float(accuracy_score(y_true, y_pred)),
    }


def _progress(enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )


def _save_atomic(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Write into a temp dir beside ``out_dir``, then swap it in (``io.AtomicDir``): a crash never
    leaves half a model, and only a folder ``--force`` may replace is replaced (a model's, or empty)."""
    with AtomicDir(out_dir, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def finetune(
    base_dir: str | os.PathLike[str],
    group: str,
    labels: Sequence[str],
    train: Sequence[Example],
    validation: Sequence[Example],
    out_dir: str | os.PathLike[str],
    *,
    num_threads: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Fine-tune ``base_dir`` into a ``len(labels)``-way classifier saved at ``out_dir``.

    Returns metrics: validation macro F1 / accuracy of the kept (best) epoch, per-epoch history,
    sizes, timing and the hyper-parameters used. Validation picks the epoch; it is not a test score.
    ``num_threads`` sets torch's intra-op threads for this call only (see :func:`torch_threads`).
    Options (keyword): ``epochs`` 3, ``lr`` 5e-5, ``batch_size`` 16, ``max_length`` 128, ``seed`` 0,
    ``freeze_embeddings`` False, ``probe_epochs`` 0 and ``probe_lr`` 1e-3 (LP-FT: train the head alone
    on the frozen base first, then everything), ``warmup_ratio`` 0.1, ``weight_decay`` 0.01,
    ``progress`` True.
    """
    with torch_threads(num_threads):
        return _finetune(base_dir, group, labels, train, validation, out_dir, **options)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (``None``: leave it).

    On a shared machine, 1 thread is often faster than 2: with more runnable processes than cores,
    every parallel region waits for a descheduled sibling thread. We measured 2.5x less wall time and
    4x less CPU per step with 1 thread while five other jobs shared the 2 cores.
    """
    if n is None:
        yield
        return
    if n < 1:
        raise HM3Error(f"num_threads must be >= 1, got {n}")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _epoch(model, train_ids, train_y, lengths, batch_size: int, pad_id: int, rng: random.Random, optimizer,
           scheduler=None, clip: float | None = None, on_step=None) -> list[float]:
    """One pass over the training set in length-grouped batches; returns the per-step losses.
    ``clip``: max gradient norm; ``on_step(losses)`` after every step (progress)."""
    losses: list[float] = []
    for batch in _length_grouped_batches(lengths, batch_size, rng):
        out = model(**_collate([train_ids[i] for i in batch], pad_id), labels=train_y[batch])
        out.loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if on_step is not None:
            on_step(losses)
    return losses


def _linear_probe(model, train_ids, train_y, lengths, batch_size: int, pad_id: int, rng: random.Random,
                  epochs: int, lr: float, group: str) -> float:
    """LP-FT's first stage (Kumar et al. 2022): fit the head alone on the frozen pre-trained body, so
    that fine-tuning starts from a head that already fits and distorts the body's features less. Only
    the classifier's parameters get gradients; the body's ``requires_grad`` is restored after."""
    t0 = time.perf_counter()
    head = dict(model.classifier.named_parameters()) if hasattr(model, "classifier") else {}
    if not head:
        raise HM3Error(f"{group}: linear probing needs a `classifier` head module")
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("classifier."))
    opt = torch.optim.AdamW(list(head.values()), lr=lr, weight_decay=0.0)
    try:
        for epoch in range(1, epochs + 1):
            losses = _epoch(model, train_ids, train_y, lengths, batch_size, pad_id, rng, opt)
            log.info("%s linear probe epoch %d/%d: loss %.4f", group, epoch, epochs, float(np.mean(losses)))
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    return time.perf_counter() - t0


def _finetune(
    base_dir: str | os.PathLike[str],
    group: str,
    labels: Sequence[str],
    train: Sequence[Example],
    validation: Sequence[Example],
    out_dir: str | os.PathLike[str],
    *,
    epochs: int = 3,
    lr: float = 5e-5,
    batch_size: int = 16,
    max_length: int = 128,
    seed: int = 0,
    freeze_embeddings: bool = False,
    probe_epochs: int = 0,
    probe_lr: float = 1e-3,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.01,
    progress: bool = True,
) -> dict[str, Any]:
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    labels = list(labels)
    _check_inputs(labels, train, validation)
    if epochs < 1 or batch_size < 1 or max_length < 8 or lr <= 0:
        raise HM3Error(
            f"need epochs >= 1, batch_size >= 1, max_length >= 8 and lr > 0; got epochs={epochs}, "
            f"batch_size={batch_size}, max_length={max_length}, lr={lr}"
        )
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if not (base_dir / "config.json").is_file():
        raise HM3Error(
            f"{base_dir}: no config.json; pass the base model directory (hm3.zoo.base.base_model_dir())"
        )
    prepare_output(out_dir, force=True)  # a folder that is not a model's: said now, not after the training
    label2id = {label: i for i, label in enumerate(labels)}
    # seed everything that draws: head init (torch), dropout (torch), batch order (our rng)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    rng = random.Random(seed)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label2id,
        problem_type="single_label_classification",
    )
    if freeze_embeddings:
        for p in model.base_model.embeddings.parameters():
            p.requires_grad_(False)
    model.train()

    train_ids = _encode(tokenizer, [ex.text for ex in train], max_length)
    train_y = torch.tensor([label2id[ex.label] for ex in train], dtype=torch.long)
    val_texts = [ex.text for ex in validation]
    val_y = [label2id[ex.label] for ex in validation]
    lengths = [len(x) for x in train_ids]
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps = steps_per_epoch * epochs

    # no weight decay on biases and LayerNorm weights (standard BERT recipe)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)

    log.info(
        "fine-tuning %s: %d train, %d validation, %d labels, %d epochs x %d steps, max_length %d",
        group,
        len(train),
        len(validation),
        len(labels),
        epochs,
        steps_per_epoch,
        max_length,
    )
    probe_seconds = _linear_probe(model, train_ids, train_y, lengths, batch_size, tokenizer.pad_token_id, rng,
                                  probe_epochs, probe_lr, group) if probe_epochs > 0 else 0.0
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"macro_f1": -1.0}
    best_state: dict[str, torch.Tensor] | None = None
    start, cpu_start = time.perf_counter(), time.process_time()
    train_seconds = 0.0
    with _progress(progress) as bar:
        task = bar.add_task(f"{group}", total=total_steps, status="")
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            losses = _epoch(
                model, train_ids, train_y, lengths, batch_size, tokenizer.pad_token_id, rng, optimizer, scheduler,
                clip=1.0,
                on_step=lambda losses: bar.update(
                    task, advance=1, status=f"epoch {epoch}/{epochs} loss {np.mean(losses[-20:]):.3f}"),
            )
            train_seconds += time.perf_counter() - t0
            scores = (
                _scores(val_y, _predict_ids(model, tokenizer, val_texts, max_length), len(labels))
                if val_texts
                else {"macro_f1": float("nan"), "accuracy": float("nan")}
            )
            history.append({"epoch": epoch, "loss": float(np.mean(losses)), **scores})
            log.info(
                "%s epoch %d/%d: loss %.4f, validation macro F1 %.4f, accuracy %.4f (%.0fs)",
                group,
                epoch,
                epochs,
                np.mean(losses),
                scores["macro_f1"],
                scores["accuracy"],
                time.perf_counter() - t0,
            )
            # keep the best epoch by validation macro F1 (ties: the later, more trained one)
            if not val_texts or scores["macro_f1"] >= best["macro_f1"]:
                best = {"epoch": epoch, **scores}
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None and best.get("epoch") != epochs:
        log.info("%s: keeping epoch %d (best validation macro F1)", group, best["epoch"])
        model.load_state_dict(best_state)
    model.eval()
    _save_atomic(model, tokenizer, out_dir)
    total = time.perf_counter() - start
    log.info("%s saved to %s (%.0fs)", group, out_dir, total)
    return {
        "group": group,
        "labels": labels,
        "validation_macro_f1": best.get("macro_f1"),
        "validation_accuracy": best.get("accuracy"),
        "best_epoch": best.get("epoch"),
        "history": history,
        "train_examples": len(train),
        "validation_examples": len(validation),
        "train_seconds": round(train_seconds, 1),
        "train_examples_per_second": round(len(train) * epochs / max(train_seconds, 1e-9), 1),
        "seconds": round(total, 1),
        # CPU time of this process: on a shared machine, wall time says more about the neighbours
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "hyperparameters": {
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "max_length": max_length,
            "seed": seed,
            "freeze_embeddings": freeze_embeddings,
            "probe_epochs": probe_epochs,
            "probe_lr": probe_lr if probe_epochs else None,
            "probe_seconds": round(probe_seconds, 1),
            "warmup_ratio": warmup_ratio,
            "weight_decay": weight_decay,
            "num_threads": torch.get_num_threads(),
        },
    }
