"""Two search workers share one study on a real PostgreSQL server (started by scripts/pg-test-server.sh)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hm3.testing import TASK_A, TASK_B, tiny_base, tiny_finetune

pytestmark = pytest.mark.postgres

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pg-test-server.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway server for the session; installs PostgreSQL with apt-get if it is missing."""
    r = subprocess.run(["bash", str(SCRIPT), "start", str(free_port())], capture_output=True, text=True, timeout=600)
    if r.returncode == 3:
        pytest.skip(f"PostgreSQL cannot be installed on this machine: {r.stderr.strip()}")
    assert r.returncode == 0, f"pg-test-server.sh start failed:\n{r.stderr}"
    url, cluster = r.stdout.split()
    yield url
    subprocess.run(["bash", str(SCRIPT), "stop", cluster], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pg")
    base = tiny_base(d / "base")
    a = tiny_finetune(base, d / "a", TASK_A, steps=20)
    b = tiny_finetune(base, d / "b", TASK_B, steps=20)
    rows = [{"text": t, "expected": {"a": TASK_A.labels[y]}} for t, y in TASK_A.sample(16, seed=1)]
    rows += [{"text": t, "expected": {"b": TASK_B.labels[y]}} for t, y in TASK_B.sample(16, seed=2)]
    (d / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "recipe.yaml").write_text(
        f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n")
    return d


def test_two_workers_share_one_study(postgres_url, setup, tmp_path):
    import optuna

    trials = 6
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "hm3.cli", "search", str(setup / "recipe.yaml"), "--validation",
             str(setup / "val.jsonl"), "--trials", str(trials), "--out", str(tmp_path / f"w{i}"), "--storage",
             postgres_url, "--study", "shared", "--seed", str(i), "--sampler", "tpe", "--no-prune", "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    for w in workers:
        _, err = w.communicate(timeout=400)
        assert w.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # MaxTrialsCallback stops both workers once the study holds `trials`; each may finish one in flight
    assert trials <= len(done) <= trials + 1
    numbers = [t.number for t in done]
    assert len(set(numbers)) == len(numbers)
    pids = {t.user_attrs["worker"] for t in done}
    assert len(pids) == 2, pids  # both workers contributed trials
    params = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(params)) == len(params)
    # each worker wrote the whole study's trials and the same best trial
    for i in range(2):
        lines = (tmp_path / f"w{i}" / "trials.csv").read_text().splitlines()
        assert len(lines) - 1 >= trials
    best = {json.loads((tmp_path / f"w{i}" / "best" / "search.json").read_text())["trial"] for i in range(2)}
    assert study.best_trial.number in best  # the worker that finished last saw the final best
