"""Applying a merge method tensor by tensor.

``prepare`` loads and validates the checkpoints and builds the label space; ``Prepared.inputs``
streams ``(name, kind, base, deltas)`` from disk one tensor at a time; ``merge_tensor`` merges one
tensor; ``merge`` writes an ordinary transformers checkpoint, each merged tensor appended to the
safetensors file as soon as it is made (``merged_tensors`` + ``output_specs``), so a merge holds the
tensors of one name at a time, never the merged model. ``TaskVectors`` keeps every
task vector in memory for search, where hundreds of merges reuse them.

Two engines, the same bytes: ``merge_stream`` hands a plain merge (linear, task arithmetic, TIES, DARE,
DARE-TIES of safetensors checkpoints, float32/float16 output, no hidden head layer, no ``refit:``) to
``hm3.merging.numpy_engine``, which never imports torch (~0.8 s of a 2.4 s bert-base merge, issue 6),
and everything else to ``merged_tensors`` here. The task-arithmetic family's arithmetic is numpy's in
both (``hm3.merging.kernels``).

Two tensors at once: ``in_order`` merges tensors in two threads on a machine with two cores and hands
them out in order: the same bytes as one at a time. ``HM3_MERGE_WORKERS`` (or ``workers=``) sets the
count; 1 is the one-tensor-at-a-time loop.

A plain merge (no ``refit:``, no data-aware method) never imports transformers: configs are read
and written as JSON (``merged_config_dict``) and the tokenizer files are copied
(``hm3.io.copy_tokenizer``), so a ``hm3 merge`` process starts without transformers' ~1-2 s.
``merged_config`` builds the transformers config of the merged model, for callers that build a
``torch.nn.Module`` from it (re-fit, data-aware methods, search).

Tensor kinds:

* ``body``   — shared encoder weights: the method with each model's parameters.
* ``out``    — the output projection, rows = labels: expanded per group (zero padding, zero base).
* ``hidden`` — a task-specific head layer (``pre_classifier``): merged like body tensors, with the
  head density; or the base's, with ``head.hidden: base``.
* ``copy``   — non-float buffers: identical in every model, copied.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from hm3._lazy import torch
from hm3.config import MergeConfig, load_config, resolve_param
from hm3.errors import HM3Error
from hm3.heads import expand_out, zero_out
from hm3.io import (TOKENIZER_FILES, AtomicDir, Checkpoint, SafetensorsWriter, all_finite, copy_tokenizer,
                    has_tokenizer, load_checkpoint, save_safetensors, tokenizer_vocab)
from hm3.labels import MULTI_LABEL, LabelSpace, clean_labels, group_name_from, head_kind
from hm3.merging import steps
from hm3.merging.methods import REGISTRY, Method, TensorParams
from hm3.merging.steps import Rescale
from hm3.progress import progress_bar

#: tensors of embedding tables (word, position, token type), which spectral methods do not treat as linear maps
_EMBEDDING = re.compile(r"embed", re.IGNORECASE)

log = logging.getLogger(__name__)

#: environment variable: how many tensors ``merged_tensors`` merges at once (``merge_workers``)
WORKERS_ENV = "HM3_MERGE_WORKERS"



def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype of a recipe's ``dtype`` (float32, float16 or bfloat16: ``hm3.config`` checks)."""
    return getattr(torch, name)


def tensor_generator(seed: int, name: str) -> "np.random.Generator":
    """The merge's generator for one tensor: a numpy ``SFC64`` stream seeded from ``(seed, tensor
    name)`` (128 bits of their SHA-256), independent of the global RNG and of the order tensors are
    merged in (``steps.numpy_rng``)."""
    import numpy as np

    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return np.random.Generator(np.random.SFC64(int.from_bytes(digest[:16], "little")))


def torch_generator(seed: int, name: str) -> torch.Generator:
    """A ``torch.Generator`` seeded from ``(seed, name)`` (the Fisher statistics' label sampling)."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


@dataclass
class Prepared:
    """Validated inputs of a merge."""

    config: MergeConfig
    method: Method
    base: Checkpoint | None
    models: list[Checkpoint]
    space: LabelSpace
    kinds: dict[str, str]  # tensor name -> body | out | hidden | copy, in output order
    seconds_loading: float = 0.0
    notes: list[str] = field(default_factory=list)
    stats: Any = None  # data-aware methods: hm3.merging.stats.MergeStats, built on first use
    metadata: dict = field(default_factory=dict)  # extra `hm3` config.json keys: data, refit

    @property
    def groups(self) -> list[str]:
        return self.space.names

    def ensure_stats(self, progress: bool = False) -> None:
        """Data-aware methods: compute (or read from the cache) their statistics now, recording them
        in ``metadata``; a no-op for other methods and once done. Call before building config.json."""
        if self.method.needs_stats:
            from hm3.merging.stats import ensure_stats

            ensure_stats(self, progress=progress)

    def close(self) -> None:
        """Close every input checkpoint's files."""
        for c in ([self.base] if self.base else []) + self.models:
            c.close()

    def inputs(self, names: list[str] | None = None, *, reuse: bool = False) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor]]:
        """Yield ``(name, kind, base, deltas)`` per tensor; deltas are ``(N, *shape)`` float32.

        ``reuse``: for a caller done with each tensor before it asks for the next (the streaming
        merge): inside ``steps.workspace()`` every tensor's deltas go into one kept buffer (no page
        faults on a fresh one), and the base and the models' tensors are read as maps of their files
        (``Checkpoint.tensor(mapped=True)``: no copy, no fresh pages; ``_finished`` copies a base
        tensor the merge returns as it is)."""
        for name in names or list(self.kinds):
            kind = self.kinds[name]
            if kind == "copy":
                t = self.models[0].tensor(name)
                yield name, kind, t, t.unsqueeze(0)
                continue
            if kind == "out":
                base = zero_out(self.models[0].tensor(name), self.space)
            elif self.base is not None and name in self.base:
                base = self.base.tensor(name, mapped=reuse)
            elif kind == "hidden" or self.base is None:
                # No base tensor: a headless base under a task-specific head layer, or linear
                # without a base. Zero base → the method sees whole weights (linear: their mean).
                base = torch.zeros(self.models[0].shape(name))
            else:  # validated in prepare(); defensive
                raise HM3Error(f"{self.base.path}: base model lacks tensor {name!r}")
            # One (N, *shape) buffer, filled model by model: each model's tensor lives only until
            # its task vector is written (no stacked copy of the inputs).
            shape = (len(self.models), *base.shape)
            deltas = (steps.scratch("deltas", math.prod(shape), base.dtype).view(shape) if reuse
                      else torch.empty(shape, dtype=base.dtype))
            for i, (m, g) in enumerate(zip(self.models, self.groups)):
                if kind == "out":
                    torch.sub(expand_out(m.tensor(name), self.space, g), base, out=deltas[i])
                elif reuse:  # the mapped weights minus the base, in one pass
                    torch.sub(m.tensor(name, mapped=True), base, out=deltas[i])
                else:  # read the weights straight into the buffer, then subtract in place
                    m.read_into(name, deltas[i]).sub_(base)
            yield name, kind, base, deltas


def prepare(config: "MergeConfig | str | Path | dict", *, allow_pickle: bool = False) -> Prepared:
    """Load the recipe's checkpoints, check that they can be merged, build the label space."""
    t0 = time.perf_counter()
    cfg = load_config(config)
    method = REGISTRY[cfg.merge_method]
    base = load_checkpoint(cfg.base_model, allow_pickle=allow_pickle) if cfg.base_model else None
    models = [load_checkpoint(m.model, allow_pickle=allow_pickle) for m in cfg.models]

    ref = models[0]
    for m in models + ([base] if base else []):
        if m.config.model_type != ref.config.model_type:
            raise HM3Error(
                f"{m.path}: architecture {m.config.model_type!r} differs from {ref.path} ({ref.config.model_type!r}); "
                "all models must be fine-tuned from the same base"
            )
    family = ref.family
    multi: list[bool] = []  # per model: a multi-label head (a sigmoid per label)?
    for m in models:
        if not m.has_head:
            raise HM3Error(
                f"{m.path}: not a sequence classifier (no {family.out[0]!r} tensor); "
                "hm3 merges *ForSequenceClassification checkpoints"
            )
        multi.append(head_kind(getattr(m.config, "problem_type", None), m.num_outputs, str(m.config.file)))

    # Groups and labels.
    groups: list[tuple[str, list[str], bool]] = []
    for entry, m, ml in zip(cfg.models, models, multi):
        group = entry.group or group_name_from(Path(str(m.ref).rstrip("/")).name)
        groups.append((group, clean_labels(group, m.labels(), entry.labels), ml))
    names = [g for g, *_ in groups]
    dup = sorted({g for g in names if names.count(g) > 1})
    if dup:
        raise HM3Error(f"duplicate group names {dup} (from directory names); set a distinct `group:` for each model")
    space = LabelSpace(groups)

    # Tensor table: names and shapes must agree everywhere but in the output rows.
    kinds: dict[str, str] = {}
    for name in ref.names:
        if name in family.out:
            kinds[name] = "out"
        elif name in family.hidden:
            kinds[name] = "hidden"
        elif not ref.is_float(name):
            kinds[name] = "copy"
        else:
            kinds[name] = "body"
    for m in models[1:]:
        extra = sorted(set(m.names) - set(kinds))
        missing = sorted(set(kinds) - set(m.names))
        if extra or missing:
            what = f"has unexpected tensor {extra[0]!r}" if extra else f"lacks tensor {missing[0]!r}"
            raise HM3Error(f"{m.path}: {what} (compared with {ref.path}); the models must share one architecture")
    for name, kind in kinds.items():
        for m in models[1:]:
            a, b = ref.shape(name), m.shape(name)
            if kind == "out":
                a, b = a[1:], b[1:]
            if a != b:
                raise HM3Error(
                    f"{m.path}: tensor {name!r} has shape {tuple(m.shape(name))} but {ref.path} has "
                    f"{tuple(ref.shape(name))}; the models must share one architecture"
                )
    if base is not None:
        for name, kind in kinds.items():
            if kind in ("out", "copy"):
                continue
            if name not in base:
                if kind == "hidden":
                    continue
                raise HM3Error(
                    f"{base.path}: base model lacks tensor {name!r} that the fine-tuned models have; "
                    "is it the model they were fine-tuned from?"
                )
            if base.shape(name) != ref.shape(name):
                raise HM3Error(
                    f"{base.path}: tensor {name!r} has shape {base.shape(name)} but {ref.path} has "
                    f"{ref.shape(name)}; is it the model they were fine-tuned from?"
                )
    notes = far_from_base(base, models, kinds) if base is not None else []
    if any(k == "hidden" for k in kinds.values()):
        notes.append(
            f"{family.model_type} heads have a task-specific hidden layer ({', '.join(family.hidden)}); it is merged "
            f"({cfg.head.hidden}) and shared by all groups — consider a head re-fit (`refit:`) after merging"
        )
        log.warning(notes[-1])

    _check_vocab([m for m in ([base] if base else []) + models])
    return Prepared(cfg, method, base, models, space, kinds, time.perf_counter() - t0, notes)


#: A fine-tuned classifier's body is a few percent away from its base's (the zoo's five guards: 0.7-1.9%
#: in L2 norm); a random initialisation is 100% away from a pretrained MiniLM, and two independent
#: initialisations of one shape about 140% (√2). Beyond this share, ``far_from_base`` says so.
FAR_FROM_BASE = 0.5
_DISTANCE_SAMPLE = 4  # matrices of the body, evenly spaced over the layers, at most 2^20 elements each


def far_from_base(base: Checkpoint, models: list[Checkpoint], kinds: dict[str, str]) -> list[str]:
    """A warning (also returned, for the merge report) for each model whose body is more than
    ``FAR_FROM_BASE`` away from the base's, ``‖θ − θ_base‖ / ‖θ_base‖`` over a few of the body's
    matrices: shapes and vocabulary agree, yet it was not fine-tuned from this base (e.g. two
    checkpoints of one architecture), and task vectors of it are not a fine-tune's change."""
    names = [n for n, k in kinds.items()
             if k == "body" and n in base and len(base.shape(n)) == 2 and math.prod(base.shape(n)) <= 1 << 20]
    if not names:
        return []
    step = max(1, len(names) // _DISTANCE_SAMPLE)
    sample = names[step // 2::step][:_DISTANCE_SAMPLE]

    def values(c: Checkpoint, name: str):
        return c.array(name, mapped=True, check=False) if c.readable(name) else c.tensor(name).numpy()

    import numpy as np

    ref = {n: values(base, n).ravel() for n in sample}
    ref_sq = sum(float(np.dot(v, v)) for v in ref.values())
    notes = []
    for m in models:
        diff_sq = 0.0
        for n in sample:
            d = values(m, n).ravel() - ref[n]
            diff_sq += float(np.dot(d, d))
        share = math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else math.inf
        if not share <= FAR_FROM_BASE:  # (NaN too: the checks of the merge name the broken tensor)
            notes.append(f"{m.path}: its weights are {share:.0%} away from the base's ({base.path}; a fine-tune "
                         "is usually within a few percent): was it fine-tuned from this base? Merging task vectors "
                         "of models that were not gives meaningless weights")
    for n in notes:
        log.warning(n)
    return notes


def _check_vocab(ckpts: list[Checkpoint]) -> None:
    # Among the configs that state it: a config.json without vocab_size relies on its class's
    # default, which hm3 does not know (the embedding shapes are compared in any case).
    sizes = {getattr(c.config, "vocab_size", None) for c in ckpts} - {None}
    if len(sizes) > 1:
        raise HM3Error(
            "vocabulary sizes differ: "
            + ", ".join(f"{c.path}: {getattr(c.config, 'vocab_size', None)}" for c in ckpts)
        )
    ref_vocab, ref_path, ref_files = None, None, None
    for c in ckpts:
        files = _tokenizer_files(c.path)
        if ref_files is not None and files == ref_files:
            continue  # byte-identical tokenizer files (the usual case): the same vocabulary, no load
        vocab = tokenizer_vocab(c.path)
        if vocab is None:
            continue
        if ref_vocab is None:
            ref_vocab, ref_path, ref_files = vocab, c.path, files
        elif vocab != ref_vocab:
            diff = sorted(set(vocab.items()) ^ set(ref_vocab.items()))[:3]
            raise HM3Error(
                f"{c.path}: tokenizer vocabulary differs from {ref_path} (e.g. {diff}); "
                "the models must share the base's tokenizer"
            )


def _tokenizer_files(path: Path) -> dict[str, str]:
    """SHA-256 of each tokenizer file in a model directory (what decides its vocabulary)."""
    return {n: hashlib.sha256((path / n).read_bytes()).hexdigest() for n in TOKENIZER_FILES if (path / n).is_file()}


# -- per-tensor merge ------------------------------------------------------------------------------
def tensor_params(cfg: MergeConfig, method: Method, name: str, kind: str, overrides: dict | None = None) -> TensorParams:
    """Resolve every parameter for one tensor: model entry → shared → method default → hm3 rules."""
    overrides = overrides or {}

    def shared(key, default):
        if key in overrides:
            return overrides[key]
        v = resolve_param(cfg.parameters.get(key), name)
        return default if v is None else v

    def per_model(key, default):
        out = []
        for i, m in enumerate(cfg.models):
            if key in overrides:
                ov = overrides[key]
                out.append(float(ov[i] if isinstance(ov, (list, tuple)) else ov))
                continue
            v = resolve_param(m.parameters.get(key), name)
            if v is None:
                v = resolve_param(cfg.parameters.get(key), name)
            out.append(float(default if v is None else v))
        return tuple(out)

    density = per_model("density", 1.0)
    if kind in ("out", "hidden"):
        hd = overrides.get("head_density", cfg.head.density)
        if hd == "keep":
            density = tuple(1.0 for _ in density)
        elif hd != "model":
            density = tuple(float(hd) for _ in density)
    rescale = bool(shared("rescale", method.defaults.get("rescale", False)))
    norm = shared("rescale_norm", "l1")
    return TensorParams(
        weight=per_model("weight", 1.0),
        density=density,
        normalize=bool(shared("normalize", method.defaults.get("normalize", False))),
        rescale=Rescale(norm) if rescale else None,
        lambda_=float(shared("lambda", 1.0)),
        gamma=per_model("gamma", 0.01),
        epsilon=per_model("epsilon", 0.15),
        consensus=str(shared("consensus", "sum")),
        extra={
            "filter_wise": bool(shared("filter_wise", False)),
            "embedding": bool(_EMBEDDING.search(name)),  # an embedding table, not a linear layer (spectral methods)
            # method-specific parameters (e.g. regmean_alpha) with the method's own defaults
            **{k: shared(k, v) for k, v in method.defaults.items() if k not in ("normalize", "rescale")},
        },
    )


def merge_tensor(
    prep: Prepared,
    name: str,
    kind: str,
    base: torch.Tensor,
    deltas: torch.Tensor,
    overrides: dict | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Merge one tensor. Output rows are merged per group when a head density below 1 applies,
    so a group's density counts only its own rows, never the zero padding of the others."""
    cfg, method = prep.config, prep.method
    seed = cfg.seed if seed is None else seed
    if kind == "copy":
        return base
    if kind == "hidden" and cfg.head.hidden == "base":
        if prep.base is None or name not in prep.base:
            raise HM3Error(f"head.hidden: base needs a base model with tensor {name!r}")
        return base
    p = tensor_params(cfg, method, name, kind, overrides)
    if method.needs_stats:
        from hm3.merging.stats import tensor_stats

        p = replace(p, stats=tensor_stats(prep, name))
    if kind == "hidden" and (prep.base is None or name not in prep.base):
        # A head layer the base does not have (a headless base): there is no task vector, so the
        # layer is the models' weighted average, whatever the method.
        return base + steps.weighted_mean(deltas, p.weight)
    keep_rows = method.own_head_rows or bool(method.needs_stats)
    if kind == "out" and (keep_rows or any(d < 1 for d in p.density)):
        out = base.clone()
        for i, g in enumerate(prep.space):
            rows = g.rows
            if keep_rows:
                # Groups' rows are disjoint, so task vectors there are orthogonal and Model Stock
                # would pull every head to the zero base; each group keeps its own rows instead.
                # Data-aware methods too: no other model's statistics say anything about these rows;
                # and spectral ones, whose singular vectors would spread a head over every group's rows.
                out[rows] = base[rows] + deltas[i, rows]
            else:
                out[rows] = method.fn(base[rows], deltas[:, rows], p, tensor_generator(seed, f"{name}/{g.name}"))
        return out
    return method.fn(base, deltas, p, tensor_generator(seed, name))


def merge_workers(workers: int | None = None, method: Method | None = None) -> int:
    """How many tensors a merge works on at once: ``workers``, else ``$HM3_MERGE_WORKERS``, else by
    ``method``: ``min(2, torch.get_num_threads())`` for a method whose per-tensor work runs on one
    thread (``Method.one_thread``: the task-arithmetic family and linear, whose arithmetic is numpy's,
    ``hm3.merging.kernels``), so that two tensors at once use two cores; else 1 (torch's ops split each
    tensor across its threads). A data-aware method always gets 1, whatever was asked (its statistics
    are read tensor by tensor from one cache)."""
    given = workers_setting(workers)
    if method is not None and method.needs_stats:
        return 1
    if given is not None:
        return given
    return min(2, torch.get_num_threads()) if method is not None and method.one_thread else 1


def workers_setting(workers: int | None = None) -> int | None:
    """The worker count asked for: ``workers``, else ``$HM3_MERGE_WORKERS``, else None (the engine's
    default); checked to be a whole number of at least 1."""
    where = f"workers={workers}"
    if workers is None:
        env = os.environ.get(WORKERS_ENV, "").strip()
        if not env:
            return None
        where = f"{WORKERS_ENV}={env!r}"
        try:
            workers = int(env)
        except ValueError:
            raise HM3Error(f"{where} is not a whole number; set it to 1, 2, ... or unset it") from None
    if workers < 1:
        raise HM3Error(f"{where}: a merge needs at least 1 worker; use 1 (one tensor at a time) or more")
    return workers


def _finished(prep: Prepared, name: str, kind: str, base: torch.Tensor, deltas: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor:
    """One merged tensor as it is written: checked finite, in the output dtype, contiguous, and
    never a view of ``deltas`` (the reused buffer the next tensor is read into) or of ``base`` (a
    map of the base model's file, not to outlive this tensor's merge)."""
    merged = merge_tensor(prep, name, kind, base, deltas)
    if merged.untyped_storage().data_ptr() in (deltas.untyped_storage().data_ptr(), base.untyped_storage().data_ptr()):
        merged = merged.clone()  # a view of an input
    del base, deltas  # (N, *shape): the caller frees its references before the next tensor is read
    return checked(name, merged, dtype).contiguous()


def checked(name: str, merged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A merged tensor checked finite (``io.all_finite``: one reduction, no boolean copy) and in the
    output ``dtype`` (floating tensors; others as they are)."""
    if merged.is_floating_point():
        if not all_finite(merged):
            raise HM3Error(f"merging {name!r} produced NaN/inf values; check weights and lambda")
        merged = merged.to(dtype)
    return merged


def merged_tensors(prep: Prepared, progress: bool = True, *, workers: int | None = None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, merged tensor)`` in output order and dtype, one tensor at a time, streaming from disk.

    ``workers`` (default ``merge_workers(method=...)``): with 2 or more, that many threads merge
    tensors at once (``in_order``), each running torch on ``max(1, torch threads // workers)``
    threads (torch's setting is per thread: two workers on 2 cores with 2 intra-op threads each would
    oversubscribe; the process's setting is restored at the end). The tensors, their bytes and their
    order are the same with any count."""
    dtype = torch_dtype(prep.config.dtype)
    prep.ensure_stats(progress)  # forward passes (or the disk cache) before merging
    workers = merge_workers(workers, prep.method)
    names = list(prep.kinds)

    def one(i: int) -> torch.Tensor:
        # One workspace per thread for the whole loop: the deltas and the steps' scratch buffers are
        # reused from tensor to tensor (steps.workspace), so a merge touches fresh memory only for its results.
        for name, kind, base, deltas in prep.inputs([names[i]], reuse=True):
            return _finished(prep, name, kind, base, deltas, dtype)

    total_threads = torch.get_num_threads()
    per_worker = max(1, total_threads // workers)
    try:
        yield from in_order(names, one, workers, steps.workspace, output_sizes(prep), progress,
                            setup=(lambda: torch.set_num_threads(per_worker)) if workers > 1 else None)
    finally:
        torch.set_num_threads(total_threads)  # what threads started later inherit


def in_order(names: list[str], one, workers: int, workspace, sizes: list[int], progress: bool, *,
             setup=None) -> Iterator[tuple[str, Any]]:
    """``(names[i], one(i))`` for every ``i`` in order, computed by ``workers`` threads (1: in the
    caller's), each inside its own ``workspace()`` (thread-local reused buffers), after ``setup()``.

    Why it gives the same results with any count: each tensor's merge is the same calls on the same
    inputs, its randomness from ``tensor_generator(seed, name)`` and its norms summed in a fixed order
    (``kernels.fixed_sum``), whichever thread runs it and in whatever order.

    Memory: with 2 or more workers, a second worker adds buffers for its own tensors only. Results wait
    for the caller in order; a thread starts tensor ``i`` only if it is the one the caller waits for, or
    if the elements (``sizes``) of every tensor started and not yet taken back from the caller (being
    written included) stay within twice the largest tensor's. So while one thread merges the word
    embeddings, the other runs ahead by at most that much, and never holds the merged model."""
    if workers <= 1 or len(names) <= 1:
        with progress_bar(progress, "merging", len(names)) as advance, workspace():
            for i, name in enumerate(names):
                result = one(i)
                yield name, result
                del result
                advance()
        return
    budget = 2 * max(sizes)
    cond = threading.Condition()
    done: dict[int, Any] = {}
    state = {"next": 0, "taken": 0, "in_flight": 0, "stop": False, "error": None}

    def may_start() -> bool:
        i = state["next"]
        return i == state["taken"] or state["in_flight"] + sizes[i] <= budget

    def work() -> None:
        if setup is not None:
            setup()
        with workspace():
            while True:
                with cond:
                    while not state["stop"] and state["next"] < len(names) and not may_start():
                        cond.wait()
                    if state["stop"] or state["next"] >= len(names):
                        return
                    i = state["next"]
                    state["next"] += 1
                    state["in_flight"] += sizes[i]
                try:
                    result = one(i)
                except BaseException as e:  # handed to the caller's thread, which raises it
                    with cond:
                        state["error"], state["stop"] = e, True
                        cond.notify_all()
                    return
                with cond:
                    done[i] = result
                    cond.notify_all()
                del result

    threads = [threading.Thread(target=work, name=f"hm3-merge-{k}", daemon=True) for k in range(workers)]
    try:
        with progress_bar(progress, "merging", len(names)) as advance:
            for t in threads:
                t.start()
            for i, name in enumerate(names):
                with cond:
                    while i not in done and state["error"] is None:
                        cond.wait()
                    if state["error"] is not None:
                        raise state["error"]
                    result = done.pop(i)
                yield name, result
                del result
                with cond:  # the caller is done with tensor i (written): room for the next
                    state["in_flight"] -= sizes[i]
                    state["taken"] = i + 1
                    cond.notify_all()
                advance()
    finally:
        with cond:
            state["stop"] = True
            cond.notify_all()
        for t in threads:
            if t.ident is not None:
                t.join()


def merge_state(prep: Prepared, progress: bool = True, *, workers: int | None = None
                ) -> dict[str, torch.Tensor]:
    """Merge every tensor, streaming from disk. Returns the merged state dict (output dtype)."""
    return dict(merged_tensors(prep, progress, workers=workers))


def output_specs(prep: Prepared, *, codes: bool = False) -> list[tuple[str, Any, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of every merged tensor, in ``merged_tensors`` order, known before
    merging: what the safetensors header of the merged model says. ``codes``: dtypes as safetensors
    codes ("F32", "I64", ...: no torch), else torch dtypes."""
    ref, specs = prep.models[0], []
    out_code = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[prep.config.dtype]
    for name, kind in prep.kinds.items():
        shape = tuple(ref.shape(name))
        if kind == "out":
            shape = (prep.space.total, *shape[1:])
        if codes:
            specs.append((name, out_code if ref.is_float(name) else ref.code(name), shape))
        else:
            specs.append((name, torch_dtype(prep.config.dtype) if ref.is_float(name) else ref.dtype(name), shape))
    return specs


def output_sizes(prep: Prepared) -> list[int]:
    """Elements of each merged tensor, in output order."""
    return [math.prod(shape) for _, _, shape in output_specs(prep, codes=True)]


# -- output ----------------------------------------------------------------------------------------
# Keys of a source config.json the merged one drops: where it was loaded from, and what the merged
# keys replace (``dtype`` replaces transformers 4's ``torch_dtype``; ``id2label`` sets the label count).
_DROPPED_CONFIG_KEYS = ("_name_or_path", "_commit_hash", "torch_dtype", "num_labels")


def merged_config_dict(prep: Prepared) -> dict:
    """The merged model's config.json: the first model's, with the merged label space and the hm3
    metadata. Plain JSON, built without transformers (``config_json`` writes it as transformers
    does: sorted keys, indent 2)."""
    cfg = prep.models[0].config.to_dict()
    for key in _DROPPED_CONFIG_KEYS:
        cfg.pop(key, None)
    space = prep.space
    cfg["id2label"] = {str(i): label for i, label in space.id2label().items()}
    cfg["label2id"] = space.label2id()
    # transformers' problem_type (its training loss): one kind for the whole head, none when mixed
    multi = space.multi_label()
    if not multi:
        cfg["problem_type"] = "single_label_classification"
    elif len(multi) == len(space):
        cfg["problem_type"] = MULTI_LABEL
    else:
        cfg.pop("problem_type", None)
    cfg["architectures"] = [prep.models[0].family.cls]
    cfg["dtype"] = prep.config.dtype
    recipe = json.loads(prep.config.model_dump_json(exclude_none=True))
    cfg["hm3"] = {
        "format": 1,
        "groups": space.to_json(),
        "method": prep.method.name,
        "seed": prep.config.seed,
        "recipe": recipe,
        **prep.metadata,  # data used by data-aware methods and the head re-fit: files, counts, seconds
    }
    return cfg


def config_json(cfg: dict) -> str:
    """config.json text as ``PretrainedConfig.save_pretrained`` writes it: sorted keys, indent 2."""
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def merged_config(prep: Prepared):
    """The merged model's transformers config (``merged_config_dict`` as transformers loads it from
    config.json), for building the merged ``torch.nn.Module``. Imports transformers."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = merged_config_dict(prep)
    return CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)


def write_model(out_dir: Path, state: "dict[str, torch.Tensor] | Iterator[tuple[str, torch.Tensor]]", config,
                tokenizer_src: Path, card: str, *, specs: list | None = None) -> None:
    """Write config, safetensors weights, tokenizer and model card into ``out_dir`` (exists, empty).

    ``config``: the config.json content as a dict (``merged_config_dict``), or a transformers
    config (saved with its ``save_pretrained``). ``state`` is a state dict, or an iterator of
    ``(name, tensor)`` in the order of ``specs`` (``output_specs``), written as it yields: the same
    bytes, without holding the whole model. The tokenizer files of ``tokenizer_src`` are copied
    byte for byte, first: a source without a tokenizer fails before the weights are written."""
    copy_tokenizer(Path(tokenizer_src), out_dir)
    if isinstance(config, dict):
        (out_dir / "config.json").write_text(config_json(config), encoding="utf-8")
    else:
        config.save_pretrained(str(out_dir))
    file = out_dir / "model.safetensors"
    if isinstance(state, dict):
        save_safetensors(state, file, metadata={"format": "pt"})  # no full-model copy
    else:
        if specs is None:
            raise ValueError("write_model: an iterator of tensors needs their specs (output_specs)")
        with SafetensorsWriter(file, specs, metadata={"format": "pt"}) as w:
            for name, t in state:
                w.write(name, t)
                del t
    (out_dir / "README.md").write_text(card)


def tokenizer_source(prep: Prepared) -> Path:
    if prep.config.tokenizer_source:
        src = prep.config.tokenizer_source
        if src == "base" and prep.base is not None:
            return prep.base.path
        return Path(src)
    for c in ([prep.base] if prep.base else []) + prep.models:
        if has_tokenizer(c.path):
            return c.path
    raise HM3Error("no model ships a tokenizer; set `tokenizer_source` to a directory that has one")


def model_card(prep: Prepared, extra: str = "") -> str:
    cfg = prep.config
    lines = [
        "---",
        "library_name: transformers",
        "tags: [hm3, merge, text-classification]",
        "---",
        "# Merged classifier (hm3)",
        "",
        f"Made with [hm3](https://arxiv.org/abs/2409.19173) `{cfg.merge_method}` "
        f"([reference]({prep.method.reference})), seed {cfg.seed}, dtype {cfg.dtype}.",
        "Load with `hm3.load(path)` for per-group softmax, or as an ordinary "
        "`AutoModelForSequenceClassification` (logits over all qualified labels).",
        "",
        "## Groups",
        "",
        "| group | labels | source model | parameters |",
        "|---|---|---|---|",
    ]
    for g, m in zip(prep.space, cfg.models):
        params = json.dumps({k: (v if not isinstance(v, list) else [c.model_dump() for c in v]) for k, v in m.parameters.items()})
        lines.append(f"| {g.name} | {', '.join(g.labels)} | `{m.model}` | `{params}` |")
    lines += [
        "",
        f"Base model: `{cfg.base_model}`",
        f"Shared parameters: `{json.dumps({k: v if not isinstance(v, list) else [c.model_dump() for c in v] for k, v in cfg.parameters.items()})}`",
        f"Head: density `{cfg.head.density}`, hidden layers `{cfg.head.hidden}`",
        "",
        "## Recipe",
        "",
        "```yaml",
        cfg.to_yaml().rstrip(),
        "```",
    ]
    if prep.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in prep.notes]
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"


@dataclass
class MergeResult:
    path: Path | None
    space: LabelSpace
    seconds: float
    state: dict[str, torch.Tensor] | None = None


def merge_stream(prep: Prepared, progress: bool = True, workers: int | None = None) -> tuple[Iterator, list, str]:
    """``(merged tensors, their specs, engine)`` for ``write_model``: the numpy engine's arrays where
    it takes the merge (no torch in the process: ``hm3.merging.numpy_engine``), else
    ``merged_tensors``; ``engine`` is ``"numpy"`` or ``"torch"``. The same bytes either way."""
    from hm3.merging import numpy_engine

    choice = numpy_engine.engine_choice()
    why = numpy_engine.unsupported(prep) if choice != "torch" else f"{numpy_engine.ENGINE_ENV}=torch"
    if why is None:
        return numpy_engine.merged_arrays(prep, progress, workers=workers), output_specs(prep, codes=True), "numpy"
    if choice == "numpy":
        raise HM3Error(f"{numpy_engine.ENGINE_ENV}=numpy: this merge needs torch ({why}); unset it")
    log.debug("merging with torch: %s", why)
    return merged_tensors(prep, progress, workers=workers), output_specs(prep), "torch"


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside the block, as it was after it (on error too).
    Reading and merging tensors makes little cyclic garbage, but its small allocations (headers,
    array views) set off full collections, each a walk over every object in the process: ~0.1 s
    where torch and transformers are imported, a third of an in-process merge of two bert-mini
    classifiers (session 21). Not around the statistics' and re-fit's forward passes."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def merge(
    config: "MergeConfig | str | Path | dict",
    out: "str | Path | None" = None,
    *,
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> MergeResult:
    """Merge the recipe's models. With ``out``, write an ordinary HF classifier directory
    atomically (an existing ``out`` is refused unless ``force``); without, return the state dict.
    ``workers``: tensors merged at once (default ``$HM3_MERGE_WORKERS``, else the engine's:
    ``numpy_engine.merge_workers`` or ``merge_workers``); the result is the same bytes with any number."""
    t0 = time.perf_counter()
    if out is not None:
        from hm3.io import prepare_output

        prepare_output(Path(out), force)  # fail before any work
    with gc_paused():
        prep = prepare(config, allow_pickle=allow_pickle)
    try:
        if out is not None and prep.config.refit is None:
            # Streamed: each merged tensor goes to the file as soon as it is made. Statistics first:
            # config.json and the model card are built before the tensors and must record them.
            prep.ensure_stats(progress)
            out = Path(out)
            with gc_paused():
                stream, specs, _ = merge_stream(prep, progress, workers)
                with AtomicDir(out, force) as tmp:
                    write_model(tmp, stream, merged_config_dict(prep), tokenizer_source(prep), model_card(prep),
                                specs=specs)
        else:
            with gc_paused():
                state = merge_state(prep, progress=progress, workers=workers)
            extra = ""
            if prep.config.refit is not None:
                from hm3.refit import refit_state

                state, extra = refit_state(prep, state, progress=progress)
            if out is None:
                return MergeResult(None, prep.space, time.perf_counter() - t0, state)
            out = Path(out)
            with AtomicDir(out, force) as tmp:
                write_model(tmp, state, merged_config_dict(prep), tokenizer_source(prep), model_card(prep, extra))
    finally:
        prep.close()
    seconds = time.perf_counter() - t0
    log.info("merged %d models (%s) into %s in %.1fs", len(prep.models), prep.method.name, out, seconds)
    return MergeResult(out, prep.space, seconds)
