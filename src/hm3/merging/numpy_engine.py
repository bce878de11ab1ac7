"""Merging without torch: the engine behind a plain ``hm3 merge``.

``import torch`` alone takes ~0.8 s, a third of a whole ``hm3 merge`` of two bert-base classifiers
(issue 6). A merge by linear, task arithmetic, TIES, DARE or DARE-TIES of safetensors checkpoints
needs none of it: this module streams such a merge tensor by tensor with numpy — the inputs read as
copy-on-write maps of their files (``Checkpoint.array``), each body tensor merged block by block
where its inputs lie (``streamed``; other tensors by ``kernels.merge`` on their task vectors), each
result appended to the output file as soon as it is made — and gives the same bytes as the torch engine
(``engine.merged_tensors``; ``tests/test_numpy_engine.py``). ``engine.merge`` takes this path
whenever ``unsupported`` finds no reason against it; ``HM3_MERGE_ENGINE=torch`` (or ``numpy``, to
fail instead of falling back) chooses.

Workers: numpy's steps run on one thread, so two tensors are merged at once on a machine with two
or more cores (``merge_workers``), each thread with its own scratch buffers; results are handed out
in output order (``engine.in_order``).
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import numpy as np

from hm3.errors import HM3Error
from hm3.heads import expand_out, zero_out
from hm3.io import array_finite
from hm3.merging import kernels, streamed

#: environment variable: ``auto`` (default), ``numpy`` (fail where it cannot) or ``torch``
ENGINE_ENV = "HM3_MERGE_ENGINE"
_OUT_DTYPES = {"float32": np.float32, "float16": np.float16}


def engine_choice() -> str:
    choice = os.environ.get(ENGINE_ENV, "").strip().lower() or "auto"
    if choice not in ("auto", "numpy", "torch"):
        raise HM3Error(f"{ENGINE_ENV}={choice!r}: use auto (the default), numpy or torch")
    return choice


def unsupported(prep) -> str | None:
    """Why this engine cannot do ``prep``'s merge, or None when it can (the same bytes as torch's)."""
    cfg = prep.config
    if prep.method.name not in kernels.METHODS:
        return f"method {prep.method.name!r} (numpy: {', '.join(kernels.METHODS)})"
    if cfg.refit is not None:
        return "a `refit:` step"
    if cfg.dtype not in _OUT_DTYPES:
        return f"dtype {cfg.dtype}"
    if "hidden" in prep.kinds.values():
        return "a task-specific hidden head layer"
    for c in ([prep.base] if prep.base is not None else []) + prep.models:
        for name in prep.kinds:
            if name in c and not c.readable(name):
                return f"{c.path}: tensor {name!r} is not read from a safetensors file"
    return None


def merge_workers(workers: int | None = None) -> int:
    """Tensors merged at once: ``workers``, else ``$HM3_MERGE_WORKERS``, else 2 where the machine has
    two or more cores (numpy's steps are single-threaded)."""
    from hm3.merging.engine import workers_setting

    given = workers_setting(workers)
    return given if given is not None else min(2, os.cpu_count() or 1)


def merged_arrays(prep, progress: bool = True, *, workers: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, merged array)`` in output order and dtype, streaming from disk: ``engine.merged_tensors``
    without torch."""
    from hm3.merging.engine import in_order, output_sizes

    out_dtype = _OUT_DTYPES[prep.config.dtype]
    names = list(prep.kinds)

    def one(i: int) -> np.ndarray:
        return _merged(prep, names[i], prep.kinds[names[i]], out_dtype)

    yield from in_order(names, one, merge_workers(workers), kernels.workspace, output_sizes(prep), progress)


def _merged(prep, name: str, kind: str, out_dtype) -> np.ndarray:
    """One tensor as it is written: merged (``engine.merge_tensor``'s rules), checked finite, in the
    output dtype, never a view of the reused deltas buffer or of an input's map."""
    from hm3.merging.engine import tensor_generator, tensor_params

    if kind == "copy":
        return np.ascontiguousarray(prep.models[0].array(name))
    cfg, method = prep.config, prep.method.name
    p = tensor_params(cfg, prep.method, name, kind)
    has_base = prep.base is not None and name in prep.base
    streams = kind != "out" and streamed.unsupported(method, p, has_base) is None
    if streams:  # read twice where the inputs lie, block by block: no task vectors in memory
        merged = streamed.merge(method, prep.base.array(name, mapped=True, check=False),
                                [m.array(name, mapped=True, check=False) for m in prep.models], p,
                                tensor_generator(cfg.seed, name))
    else:
        base, deltas = _inputs(prep, name, kind)
        if kind == "out" and any(d < 1 for d in p.density):  # each group's density counts its own rows only
            merged = base.copy()
            for i, g in enumerate(prep.space):
                rows = g.rows
                merged[rows] = kernels.merge(method, base[rows], deltas[:, rows], p,
                                             tensor_generator(cfg.seed, f"{name}/{g.name}"))
        else:  # the task vectors are this tensor's scratch buffer: the merge may work in it
            merged = kernels.merge(method, base, deltas, p, tensor_generator(cfg.seed, name), consume=True)
        if np.shares_memory(merged, deltas) or np.shares_memory(merged, base):
            merged = merged.copy()
        del base, deltas
    if not array_finite(merged):
        if streams:  # its inputs were not checked (_inputs checks the task vectors): NaN/inf in one reach here
            _check_inputs(prep, name)
        raise HM3Error(f"merging {name!r} produced NaN/inf values; check weights and lambda")
    return np.ascontiguousarray(merged.astype(out_dtype, copy=False))


def _inputs(prep, name: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``(base, deltas)`` of one tensor, as ``Prepared.inputs(reuse=True)`` gives them: the base (a
    map of its file, the zero head for output rows, zeros without a base model) and the task vectors
    ``(N, *shape)`` in a kept scratch buffer."""
    models = prep.models
    if kind == "out":
        base = zero_out(models[0].array(name), prep.space)
    elif prep.base is not None and name in prep.base:
        base = prep.base.array(name, mapped=True, check=False)  # checked through the task vectors
    else:  # linear without a base model: the method sees whole weights
        base = np.zeros(models[0].shape(name), dtype=np.float32)
    shape = (len(models), *base.shape)
    deltas = kernels.scratch("deltas", math.prod(shape), np.float32).reshape(shape)
    for i, (m, g) in enumerate(zip(models, prep.groups)):
        w = expand_out(m.array(name), prep.space, g) if kind == "out" else m.array(name, mapped=True, check=False)
        np.subtract(w, base, out=deltas[i])
    # NaN/inf in the base or a model make the task vectors NaN/inf: one check of them instead of one
    # of every input (a pass over the inputs less); the inputs are checked one by one only to say which.
    if not array_finite(deltas):
        _check_inputs(prep, name)
        raise HM3Error(f"tensor {name!r}: the task vectors hold NaN or inf values although no input does")
    return base, deltas


def _check_inputs(prep, name: str) -> None:
    """An error naming the file if the base's or a model's ``name`` holds NaN or inf."""
    for c in ([prep.base] if prep.base is not None and name in prep.base else []) + prep.models:
        c.check_finite(name, c.array(name, mapped=True, check=False))
