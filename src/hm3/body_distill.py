"""Body distillation: fine-tune the whole merged model so each group's softmax follows its guard.

Why: a head re-fit (hm3.refit) only moves a group's output rows, so it can use no more than what the
merged body's features still hold. On the small MiniLM base that caps a 2-guard merge at 0.97–1.00 of
the originals' macro F1. Training the body too, with the original guards as teachers on unlabelled
text (multi-task knowledge distillation, Hinton et al. 2015; the soft targets of every group at once),
lets the one body serve every group again. It is a fine-tune: minutes, not seconds, and it is opt-in
(``refit.body`` in a recipe, ``hm3 refit --body-epochs``).

Loss per batch: ``Σ_groups KL(teacher_g ‖ softmax(z[:, rows_g]))``, mean over texts (a multi-label
group: the binary KL of each label's sigmoid, summed over its labels); AdamW with linear
decay; dropout on as in fine-tuning; texts truncated to ``max_length`` tokens (the teachers see the
same tokens). Batches are drawn from length buckets (texts of similar length together: less padding)
in a seeded order. ``layers`` trains only the top encoder layers (and pooler and head): the frozen
rest runs once per text, in eval mode, and every step starts from its cached output (no forward or
backward pass through it at each step).

Teachers' logits are cached on disk per guard and text set (hm3.merging.stats). The result is the same
architecture with new weights: still one ordinary checkpoint with group-wise heads.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from hm3.errors import HM3Error

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from hm3.labels import LabelSpace
    from hm3.refit import TeacherLogits

log = logging.getLogger(__name__)

BUCKET = 50  # batches per length bucket
# Bump when the training's arithmetic changes (same recipe, different weights): hm3.results keys its
# cached body-distilled merges on it. 2: fused AdamW (session 9). 3: teachers' logits of windows the
# head re-fit already ran are reused (hm3.refit.TeacherLogits; other batches, other bf16 rounding).
VERSION = 3


@dataclass
class BodyReport:
    texts: int = 0
    steps: int = 0
    epochs: float = 0.0
    lr: float = 0.0
    max_length: int = 0
    trained: str = "all"
    targets: str = "all"  # "refit": each group on its re-fit texts only
    cached: bool = False  # the frozen lower layers ran once per text (``layers``), not once per step
    teachers: dict[str, str] = field(default_factory=dict)
    loss: list[float] = field(default_factory=list)  # mean training loss per epoch (last one may be partial)
    teacher_seconds: float = 0.0
    teacher_reused: int = 0  # (guard, window) pairs whose logits the head re-fit had computed
    teacher_windows: int = 0  # (guard, window) pairs asked for
    seconds: float = 0.0
    precision: str = "float32"
    label_weight: float = 0.0
    labelled: dict[str, int] = field(default_factory=dict)  # group -> texts whose targets mix in their label

    def to_json(self) -> dict[str, Any]:
        return {"texts": self.texts, "steps": self.steps, "epochs": self.epochs, "lr": self.lr,
                "precision": self.precision,
                "max_length": self.max_length, "trained": self.trained, "cached": self.cached,
                "targets": self.targets, "teachers": self.teachers,
                "loss": [round(x, 5) for x in self.loss], "teacher_seconds": round(self.teacher_seconds, 1),
                "teacher_reused": self.teacher_reused, "teacher_windows": self.teacher_windows,
                **({"label_weight": self.label_weight, "labelled": self.labelled} if self.label_weight else {}),
                "seconds": round(self.seconds, 1)}

    def markdown(self) -> str:
        loss = " → ".join(f"{x:.4f}" for x in self.loss)
        return "\n".join([
            "## Body distillation",
            "",
            f"The merged model ({self.trained}"
            + ("; the frozen layers below ran once per text, their output cached" if self.cached else "")
            + f") was trained for {self.epochs:g} epochs ({self.steps} steps, "
            f"lr {self.lr:g}) so that each group's softmax follows its original guard on "
            + (f"{self.texts} texts" if self.targets == "all" else
               f"the texts its head was re-fitted on (of {self.texts})")
            + f" (first {self.max_length} tokens each), in {self.seconds:.1f} s, {self.teacher_seconds:.1f} s of it "
            f"the guards' forward passes (hm3.body_distill"
            + (f"; the head re-fit's logits reused for {self.teacher_reused} of the "
               f"{self.teacher_windows} (guard, text) windows" if self.teacher_reused else "") + ")"
            + (f", forward and backward passes in {self.precision} (autocast)" if self.precision != "float32" else "")
            + (f"; targets mix in the training label with weight {self.label_weight:g} on "
               + ", ".join(f"{n} {g}" for g, n in self.labelled.items()) + " texts" if self.label_weight else "")
            + f". Mean KL loss per epoch: {loss}.",
            "",
            "| group | teacher |",
            "|---|---|",
            *(f"| {g} | `{t}` |" for g, t in self.teachers.items()),
        ])


def _batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches: a seeded shuffle, cut in buckets of ``BUCKET`` batches, each sorted by
    length and cut into batches; the batches' order shuffled again."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    out = []
    span = batch_size * BUCKET
    for s in range(0, len(order), span):
        chunk = sorted(order[s: s + span], key=lambda i: lengths[i])
        out += [chunk[k: k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


def _trainable(model, layers: int | None, freeze_embeddings: bool = False) -> str:
    """Freeze all but the top ``layers`` encoder layers, the pooler and the head (and, with
    ``freeze_embeddings``, the word embeddings); describe what trains."""
    what = _trainable_layers(model, layers)
    if freeze_embeddings and layers is None:  # (with ``layers`` the embeddings are frozen already)
        model.get_input_embeddings().weight.requires_grad_(False)
        what += " but the word embeddings"
    return what


def _layer_stack(model) -> tuple[Any, str, Any]:
    """``(parent module, attribute name, ModuleList)`` of the encoder's layer stack."""
    stacks = [(name, m) for name, m in model.named_modules()
              if name.endswith("encoder.layer") or name.endswith("transformer.layer")]
    if len(stacks) != 1:
        raise HM3Error(f"body.layers: cannot find the encoder's layer stack of this {model.config.model_type} model; "
                       "leave body.layers unset to train all weights")
    name, stack = stacks[0]
    parent, attr = name.rsplit(".", 1)
    return model.get_submodule(parent), attr, stack


def _trainable_layers(model, layers: int | None) -> str:
    if layers is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return "all weights"
    _, _, stack = _layer_stack(model)
    if layers > len(stack):
        raise HM3Error(f"body.layers: {layers} > the model's {len(stack)} encoder layers")
    frozen = {id(p) for p in model.base_model.parameters()}
    for layer in list(stack)[len(stack) - layers:]:
        frozen -= {id(p) for p in layer.parameters()}
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None:
        frozen -= {id(p) for p in pooler.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    return f"top {layers} of {len(stack)} encoder layers, pooler and head"


class _LowerStates:
    """The frozen lower part of the body, run once: with ``layers`` = k, the embeddings and the encoder
    layers below the top k do not train, so their output for a text is the same at every step. It is
    computed once per text (eval mode: no dropout in the frozen part) and kept; each training step
    then runs the top k layers, pooler and head from it (the forward pass below the cut is skipped,
    not just its backward pass). The stack and the embeddings are swapped only inside ``training()``.

    ``build`` returns None where the model does not split this way (no ``embeddings`` module, or the
    split's output differs from the whole model's on the longest texts: an encoder that does more than
    run its layers in turn); training then runs the whole model every step, as without the cache."""

    CHECK = 8  # texts of the split-vs-whole check

    def __init__(self, model, layers: int) -> None:
        self.base = model.base_model
        self.parent, self.attr, self.stack = _layer_stack(model)
        self.cut = len(self.stack) - layers
        self.embeddings = self.base.embeddings
        self.states: list = []

    @classmethod
    def build(cls, model, layers: int, ids, pad: int, batch_size: int, precision: str) -> "_LowerStates | None":
        import torch

        from hm3.fastpaths import forward_context
        from hm3.merging.stats import batches, pad_batch

        if not isinstance(getattr(model.base_model, "embeddings", None), torch.nn.Module):
            log.info("body distillation: no embeddings module to cache below the top layers; running the whole model")
            return None
        self = cls(model, layers)
        if self.cut == 0:  # only the embeddings below: a lookup, nothing worth keeping
            return None
        self.states = [None] * len(ids)
        model.eval()
        with torch.no_grad():
            with self._swapped(self.stack[: self.cut]), forward_context(precision):
                for idx, x, mask in batches(ids, batch_size, pad):
                    h = self.base(input_ids=x, attention_mask=mask).last_hidden_state.float()
                    for r, i in enumerate(idx):
                        self.states[i] = h[r, : len(ids[i])].clone()
            # the split must be the model: the whole model's logits against the top from the states
            idx = sorted(range(len(ids)), key=lambda i: -len(ids[i]))[: cls.CHECK]
            x, mask = pad_batch(ids, idx, pad)
            with forward_context(precision):
                whole = model(input_ids=x, attention_mask=mask).logits.float()
                with self.training() as feed:
                    feed(idx)
                    split = model(input_ids=x, attention_mask=mask).logits.float()
        # fp32: the same arithmetic up to the batch's rounding; bf16 rounds every matrix product anew
        tol = 1e-4 if precision == "float32" else 5e-2
        if not torch.allclose(whole, split, rtol=tol, atol=tol * max(1.0, float(whole.abs().max()))):
            log.warning("body distillation: the model's top %d layers from cached states differ from its whole "
                        "forward pass (max |Δ| %.3g); running the whole model every step", layers,
                        float((whole - split).abs().max()))
            return None
        return self

    @contextlib.contextmanager
    def _swapped(self, layers, embeddings=None):
        import torch

        setattr(self.parent, self.attr, torch.nn.ModuleList(list(layers)))
        if embeddings is not None:
            self.base.embeddings = embeddings
        try:
            yield
        finally:
            setattr(self.parent, self.attr, self.stack)
            self.base.embeddings = self.embeddings

    @contextlib.contextmanager
    def training(self):
        """A context in which the model starts from the cached states: it yields ``feed(idx)``, which
        sets the states of texts ``idx``, right-padded with zeros to the longest (as ``pad_batch`` pads
        their tokens: its attention mask applies), as the next forward pass's embedding output."""
        import torch

        class Given(torch.nn.Module):  # stands in for the embeddings: returns the states it was given
            states = None

            def forward(self, *args, **kwargs):
                return self.states

        given = Given()

        def feed(idx):
            given.states = torch.nn.utils.rnn.pad_sequence([self.states[i] for i in idx], batch_first=True)

        with self._swapped(self.stack[self.cut:], given):
            yield feed


def distill_body(
    model: "torch.nn.Module",
    tokenizer,
    space: "LabelSpace",
    teachers: Mapping[str, Path],
    texts: Sequence[str],
    *,
    epochs: float = 2.0,
    lr: float = 2e-5,
    batch_size: int = 16,
    max_length: int = 128,
    layers: int | None = None,
    freeze_embeddings: bool = False,
    weight_decay: float = 0.01,
    seed: int = 0,
    cache: bool = True,
    progress: bool = False,
    precision: str = "float32",
    teacher_memo: "TeacherLogits | None" = None,
    labels: "Mapping[str, Mapping[str, int]] | None" = None,
    label_weight: float = 0.0,
    targets: str = "all",
    group_texts: "Mapping[str, Sequence[str]] | None" = None,
) -> BodyReport:
    """Train ``model`` (in place) so that every group's softmax follows ``teachers[group]`` on ``texts``.

    ``teachers`` must name a guard for every group of ``space``: a group without one would drift as the
    body moves under its head. ``precision`` ``bfloat16``: teachers' and student's forward (and the
    student's backward) passes under ``torch.autocast`` — mixed precision: the weights, the optimiser
    and the loss stay fp32. ``teacher_memo``: an ``hm3.refit.TeacherLogits`` holding the guards' logits
    the head re-fit computed (texts no longer than ``max_length`` are the same windows: not run again).
    ``label_weight`` ``a`` > 0: a text with a label in ``labels[group]`` (``{text: label index}``, the
    group's own training data) has targets ``(1 − a)·teacher + a·one-hot(label)`` in that group, so
    the merged model learns from the labels as well as from its guards (which it can then surpass);
    other texts and groups keep the teacher's probabilities. ``targets`` ``refit``: group g learns only on
    ``group_texts[g]`` (the texts its head was re-fitted on, whose guard logits ``teacher_memo`` holds:
    no further passes of the guards), its KL averaged over those texts of each batch; ``all``: every
    group on every text."""
    import torch

    from hm3.fastpaths import forward_context, resolve_precision

    from hm3.merging.stats import encode, pad_batch
    from hm3.progress import progress_bar
    from hm3.refit import TeacherLogits, check_teacher_kind

    t0 = time.perf_counter()
    multi = space.multi_label()
    missing = [g for g in space.names if g not in teachers]
    if missing:
        raise HM3Error(f"body distillation needs an original guard for every group; missing {missing} "
                       "(a group without a teacher would drift as the body moves)")
    for g in space.names:
        check_teacher_kind(Path(teachers[g]), space[g])
    unknown = sorted(set(teachers) - set(space.names))
    if unknown:
        raise HM3Error(f"body distillation: unknown groups {unknown}; the model's groups are {', '.join(space.names)}")
    if not epochs > 0 or not lr > 0:
        raise HM3Error(f"body distillation needs epochs > 0 and lr > 0, got {epochs} and {lr}")
    if not 0 <= label_weight <= 1:
        raise HM3Error(f"body distillation: label_weight must be in [0, 1], got {label_weight}")
    if targets not in ("all", "refit"):
        raise HM3Error(f"body distillation: targets must be 'all' or 'refit', got {targets!r}")
    if targets == "refit" and not group_texts:
        raise HM3Error("body distillation: targets 'refit' needs each group's re-fit texts (group_texts)")
    if label_weight and not any((labels or {}).values()):
        raise HM3Error("body distillation: label_weight > 0 but no group's data has labels "
                       "(refit data rows need a \"label\"); or set body.label_weight to 0")
    precision = resolve_precision(precision, model.config.model_type)
    texts = list(dict.fromkeys(texts))
    if not texts:
        raise HM3Error("body distillation: no texts to train on")
    ids = encode(tokenizer, texts, max_length)
    report = BodyReport(texts=len(texts), epochs=epochs, lr=lr, max_length=max_length,
                        teachers={g: str(t) for g, t in teachers.items()}, precision=precision,
                        label_weight=label_weight, targets=targets)

    tt = time.perf_counter()
    soft = {}
    on: dict[str, "torch.Tensor"] = {}  # group -> texts it learns on (targets "refit"; else every text)
    teacher_memo = TeacherLogits() if teacher_memo is None else teacher_memo
    reused = teacher_memo.reused
    for g in space.names:
        sel = list(range(len(texts)))
        if targets == "refit":
            mine = set(group_texts.get(g, ()))
            on[g] = torch.tensor([t in mine for t in texts])
            sel = on[g].nonzero().flatten().tolist()
            if not sel:
                raise HM3Error(f"body distillation: targets 'refit' but group {g!r} has no re-fit texts "
                               "among the body's")
        logits = teacher_memo(Path(teachers[g]), tokenizer, [ids[i] for i in sel], 32, cache, precision)
        report.teacher_windows += len(sel)
        if len(sel) < len(texts):  # the other texts' rows are never read (masked out of the loss)
            full = logits.new_zeros((len(texts), logits.shape[1]))
            full[sel] = logits
            logits = full
        if logits.shape[1] != space[g].size:
            raise HM3Error(f"{teachers[g]}: has {logits.shape[1]} labels but group {g!r} has {space[g].size}; "
                           "distill each group from its own original guard")
        # a multi-label group's targets: the guard's sigmoid per label
        soft[g] = torch.sigmoid(logits.float()) if space[g].multi_label else torch.softmax(logits.float(), -1)
        if label_weight and (labels or {}).get(g):
            if space[g].multi_label:  # each labelled text's 0/1 row of labels
                rows = [labels[g].get(t) for t in texts]
                at = torch.tensor([r is not None for r in rows])
                onehot = torch.tensor([r for r in rows if r is not None], dtype=torch.float32).reshape(-1, space[g].size)
            else:
                y = torch.tensor([labels[g].get(t, -1) for t in texts])
                at = y >= 0
                onehot = torch.nn.functional.one_hot(y[at], space[g].size).float()
            soft[g][at] = (1 - label_weight) * soft[g][at] + label_weight * onehot
            report.labelled[g] = int(at.sum())
    report.teacher_seconds = time.perf_counter() - tt
    report.teacher_reused = teacher_memo.reused - reused

    model.float()
    report.trained = _trainable(model, layers, freeze_embeddings)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # biases and LayerNorm, as in BERT fine-tuning
    # fused: one kernel per step instead of a dozen passes over every weight; 97 → 14 ms per step for
    # MiniLM's 22.7M weights at 2 threads (session 9), half a step's time on the small batches here
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=True)
    per_epoch = (len(texts) + batch_size - 1) // batch_size
    total = max(1, int(round(epochs * per_epoch)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
    rows = {g: space[g].rows for g in space.names}
    log_t = {g: soft[g].clamp_min(1e-12).log() for g in space.names}
    log_not_t = {g: (1 - soft[g]).clamp_min(1e-12).log() for g in multi}  # log(1 − t) of sigmoid targets
    pad = tokenizer.pad_token_id or 0
    rng = random.Random(f"hm3:{seed}:body")
    torch.manual_seed(seed)  # dropout masks
    lengths = [len(x) for x in ids]

    lower = None
    if layers is not None:  # the frozen part's output once per text, not once per step
        lower = _LowerStates.build(model, layers, ids, pad, 32, precision)
        report.cached = lower is not None
    model.train()
    step, losses = 0, []
    try:
        with progress_bar(progress, "body distillation", total) as advance, \
                (lower.training() if lower is not None else contextlib.nullcontext()) as feed:
            while step < total:
                run, n = 0.0, 0
                for idx in _batches(lengths, batch_size, rng):
                    if step >= total:
                        break
                    x, mask = pad_batch(ids, idx, pad)
                    if feed is not None:
                        feed(idx)
                    with forward_context(precision):
                        z = model(input_ids=x, attention_mask=mask).logits.float()
                    loss = z.new_zeros(())
                    for g, r in rows.items():
                        t = soft[g][idx]
                        if g in log_not_t:  # binary KL per label, summed: KL(Bernoulli(t) ‖ Bernoulli(σ(z)))
                            zg = z[:, r]
                            kl = (t * (log_t[g][idx] - torch.nn.functional.logsigmoid(zg))
                                  + (1 - t) * (log_not_t[g][idx] - torch.nn.functional.logsigmoid(-zg))).sum(-1)
                        else:
                            kl = (t * (log_t[g][idx] - torch.log_softmax(z[:, r], -1))).sum(-1)
                        if g in on:  # the mean over this batch's texts of the group
                            m = on[g][idx]
                            loss = loss + (kl * m).sum() / m.sum().clamp_min(1)
                        else:
                            loss = loss + kl.mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    run, n, step = run + loss.item(), n + 1, step + 1
                    advance()
                losses.append(run / max(n, 1))
                log.info("body distillation: epoch %d, mean loss %.4f, %d/%d steps", len(losses), losses[-1], step, total)
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    report.steps, report.loss = step, losses
    report.seconds = time.perf_counter() - t0
    return report
