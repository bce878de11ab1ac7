"""Merging two tensors at once (``merged_tensors(workers=2)``, issue 6): the same file, byte for byte
and in the same tensor order, as one tensor at a time; a bounded number of tensors in flight; a
worker's error raised in the caller."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from hm3.errors import HM3Error
from hm3.merging import engine
from hm3.merging.engine import WORKERS_ENV, merge, merge_workers, merged_tensors, output_specs, prepare

PARAMS = {"dare_ties": {"density": 0.5}, "ties": {"density": 0.5}, "della": {"density": 0.5, "epsilon": 0.1},
          "linear": {}, "tsv": {}, "iso_c": {}}


def three_model_recipe(tiny, method: str, **params) -> dict:
    return {
        "merge_method": method,
        "base_model": str(tiny["base"]),
        "models": [{"model": str(tiny[g]), "group": g, "parameters": {"weight": w, **params}}
                   for g, w in (("a", 1.0), ("b", 0.7), ("c", 1.3))],
        "seed": 3,
    }


def header_order(file) -> list[str]:
    """Tensor names of a safetensors file in the order of their bytes."""
    raw = file.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


@pytest.mark.parametrize("method", list(PARAMS))
def test_two_workers_write_the_same_file(tiny, tmp_path, method):
    rec = three_model_recipe(tiny, method, **PARAMS[method])
    one = merge(rec, tmp_path / "one", progress=False, workers=1)
    two = merge(rec, tmp_path / "two", progress=False, workers=2)
    a, b = one.path / "model.safetensors", two.path / "model.safetensors"
    assert a.read_bytes() == b.read_bytes()
    prep = prepare(rec)
    try:
        assert header_order(a) == header_order(b) == [name for name, _, _ in output_specs(prep)]
        # and the merge did something: not a copy of an input (linear averages, the others sparsify)
        merged = dict(merged_tensors(prep, progress=False, workers=2))
        body = [n for n, k in prep.kinds.items() if k == "body"]
        assert any(not torch.equal(merged[n], prep.models[0].tensor(n)) for n in body)
    finally:
        prep.close()


def test_two_workers_give_the_same_state_in_memory(tiny):
    """``merge(out=None)`` (the state dict path, as under a re-fit) with 2 workers: the same tensors
    in the same order."""
    rec = three_model_recipe(tiny, "dare_ties", density=0.4)
    one = merge(rec, progress=False, workers=1).state
    two = merge(rec, progress=False, workers=2).state
    assert list(one) == list(two)
    for k in one:
        assert one[k].dtype == two[k].dtype and torch.equal(one[k], two[k]), k


def test_workers_run_at_once_and_stay_within_the_budget(tiny, monkeypatch):
    """The first two tensors are merged at the same time (a barrier both must reach), and the
    elements of tensors started but not yet taken by the caller never exceed twice the largest."""
    rec = three_model_recipe(tiny, "ties", density=0.5)
    prep = prepare(rec)
    sizes = {name: torch.Size(shape).numel() for name, _, shape in output_specs(prep)}
    lock, barrier = threading.Lock(), threading.Barrier(2, timeout=30)
    started: list[str] = []
    peak = {"in_flight": 0, "running": 0, "max_running": 0}
    taken: set[str] = set()
    real = engine._finished

    def spy(prep_, name, *args):
        with lock:
            started.append(name)
            first_two = len(started) <= 2
            in_flight = sum(sizes[n] for n in started if n not in taken)
            peak["in_flight"] = max(peak["in_flight"], in_flight)
            peak["running"] += 1
            peak["max_running"] = max(peak["max_running"], peak["running"])
        if first_two:
            barrier.wait()  # BrokenBarrierError if the second tensor never starts alongside the first
        try:
            return real(prep_, name, *args)
        finally:
            with lock:
                peak["running"] -= 1

    monkeypatch.setattr(engine, "_finished", spy)
    names = []
    try:
        for name, _ in merged_tensors(prep, progress=False, workers=2):
            names.append(name)
            threading.Event().wait(0.002)  # a slow writer: the workers run ahead as far as allowed
            with lock:
                taken.add(name)
    finally:
        prep.close()
    assert names == list(prep.kinds)
    assert sorted(started) == sorted(names)  # every tensor merged exactly once
    assert peak["max_running"] == 2
    assert peak["in_flight"] <= 2 * max(sizes.values())


def test_a_workers_error_reaches_the_caller_and_nothing_is_written(tiny, tmp_path):
    rec = {**three_model_recipe(tiny, "ties", density=0.5), "parameters": {"lambda": 1e39}}  # float32 inf
    with pytest.raises(HM3Error, match="produced NaN/inf"):
        merge(rec, tmp_path / "out", progress=False, workers=2)
    assert [p.name for p in tmp_path.iterdir()] == []  # neither the output nor its temporary directory
    assert not [t for t in threading.enumerate() if t.name.startswith("hm3-merge-")]


def test_torch_threads_are_restored(tiny):
    before = torch.get_num_threads()
    merge(three_model_recipe(tiny, "dare_ties", density=0.5), progress=False, workers=2)
    assert torch.get_num_threads() == before


def test_worker_count_from_argument_environment_and_default(monkeypatch):
    from hm3.merging.methods import get

    monkeypatch.delenv(WORKERS_ENV, raising=False)
    # by method: two tensors at once where a tensor's work runs on one thread (numpy's kernels)
    for name in ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                 "della"):
        assert merge_workers(method=get(name)) == min(2, torch.get_num_threads()), name
    for name in ("model_stock", "regmean", "fisher", "adamerging"):  # torch's ops use every thread
        assert merge_workers(method=get(name)) == 1, name
    assert merge_workers() == 1
    assert merge_workers(3) == 3
    monkeypatch.setenv(WORKERS_ENV, "2")
    assert merge_workers(method=get("model_stock")) == 2  # the environment wins over the method's default
    monkeypatch.setenv(WORKERS_ENV, "1")
    assert merge_workers(method=get("ties")) == 1
    assert merge_workers(2) == 2  # an explicit argument wins
    assert merge_workers(2, get("regmean")) == 1  # ... except for a data-aware method: always one tensor at a time
    monkeypatch.setenv(WORKERS_ENV, "two")
    with pytest.raises(HM3Error, match=f"{WORKERS_ENV}='two' is not a whole number"):
        merge_workers()
    monkeypatch.setenv(WORKERS_ENV, "0")
    with pytest.raises(HM3Error, match="at least 1 worker"):
        merge_workers()
    with pytest.raises(HM3Error, match="workers=0"):
        merge_workers(0)


def test_larger_tensors_same_bytes_with_any_threads_and_workers(tmp_path):
    """bert-mini-sized random models (a 7.8M-element word embedding: many blocks, multi-threaded
    reductions): 1 worker on 1 and on 2 torch threads, and 2 workers, write the same bytes."""
    from hm3 import bench

    bm = bench.make_models(tmp_path / "models", "bert-mini", 2, expanded=False)
    before = torch.get_num_threads()
    try:
        for method in ("dare_ties", "ties", "tsv"):  # tsv: LAPACK's rounding depends on its thread count
            rec = bench.recipe(bm, method)
            files = []
            for threads, workers in ((1, 1), (2, 1), (2, 2)):
                torch.set_num_threads(threads)
                out = tmp_path / f"{method}-{threads}-{workers}"
                files.append((merge(rec, out, progress=False, workers=workers).path
                              / "model.safetensors").read_bytes())
            assert files[0] == files[1] == files[2], method
    finally:
        torch.set_num_threads(before)


def test_head_hidden_base_is_the_base_tensor_not_a_reused_buffer(tmp_path):
    """``head.hidden: base`` returns the base's tensor itself: the merged state holds exactly it,
    with 1 and 2 workers (a merged tensor must never be a buffer the next tensor is read into, nor
    the map of the base's file the streaming merge reads it from)."""
    from hm3.io import load_checkpoint
    from hm3.testing import TASK_A, TASK_C, mapped_file, tiny_base, tiny_finetune

    base = tiny_base(tmp_path / "base", family="distilbert", headless=False)  # with a pre_classifier
    a = tiny_finetune(base, tmp_path / "a", TASK_A, steps=10)
    c = tiny_finetune(base, tmp_path / "c", TASK_C, steps=10, seed=1)
    rec = {"merge_method": "ties", "base_model": str(base), "head": {"hidden": "base"}, "seed": 0,
           "models": [{"model": str(m), "group": g, "parameters": {"density": 0.5}} for g, m in (("a", a), ("c", c))]}
    states = [merge(rec, progress=False, workers=w).state for w in (1, 2)]
    ref = load_checkpoint(base)
    hidden = [n for n in states[0] if n.startswith("pre_classifier.")]
    assert hidden
    for name in hidden:
        assert torch.equal(states[0][name], ref.tensor(name)) and torch.equal(states[1][name], ref.tensor(name))
        if os.path.exists("/proc/self/maps"):
            assert mapped_file(ref.tensor(name, mapped=True)) == str(base / "model.safetensors")  # the check can see maps
            assert mapped_file(states[0][name]) is None and mapped_file(states[1][name]) is None
    assert list(states[0]) == list(states[1])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
