"""Shared fixtures: tiny BERTs built in-process once per session (a few seconds in all)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """Statistics and data caches of the session's own: the tests neither read what an earlier run
    left in ``~/.cache/hm3`` (a cache hit hid a DeBERTa RegMean bug) nor write there."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HM3_CACHE", str(tmp_path_factory.mktemp("hm3-cache")))
        yield


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models are overhead-bound: one intra-op thread is as fast and does not fight other jobs."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny headless base and two classifiers fine-tuned from it (groups `a` and `b`)."""
    from transformers.utils import logging as hf_logging

    from hm3.testing import TASK_A, TASK_B, TASK_C, tiny_base, tiny_finetune

    hf_logging.set_verbosity_error()
    d = tmp_path_factory.mktemp("tiny")
    base = tiny_base(d / "base")
    return {
        "base": base,
        "a": tiny_finetune(base, d / "a", TASK_A, seed=0),
        "b": tiny_finetune(base, d / "b", TASK_B, seed=1),
        "c": tiny_finetune(base, d / "c", TASK_C, seed=2),  # LABEL_0 / LABEL_1: uninformative names
        "root": d,
    }


@pytest.fixture
def recipe(tiny):
    """A valid TIES recipe over the tiny models; tests mutate their own copy."""

    def make(method: str = "ties", **params):
        return {
            "merge_method": method,
            "base_model": str(tiny["base"]),
            "models": [
                {"model": str(tiny["a"]), "group": "a", "parameters": {"weight": 1.0, **params}},
                {"model": str(tiny["b"]), "group": "b", "parameters": {"weight": 1.0, **params}},
            ],
            "seed": 0,
        }

    return make


@pytest.fixture(scope="session")
def pair(tmp_path_factory) -> dict[str, Path]:
    """Two guards fine-tuned from a tiny base (``a``: TASK_A; ``b``: TASK_B, whose three classes need
    more steps) and their task-arithmetic merge: the models of eval, search and operating-point tests."""
    import hm3
    from hm3.testing import TASK_A, TASK_B, tiny_base, tiny_finetune

    d = tmp_path_factory.mktemp("pair")
    base = tiny_base(d / "base")
    a = tiny_finetune(base, d / "a", TASK_A)
    b = tiny_finetune(base, d / "b", TASK_B, steps=120)
    merged = hm3.merge({"merge_method": "task_arithmetic", "base_model": str(base),
                        "models": [{"model": str(a)}, {"model": str(b)}]}, d / "merged", progress=False).path
    return {"base": base, "a": a, "b": b, "merged": merged}
