"""The CLI: merge / predict / inspect, and every bad input → one-line error, exit 2, nothing written."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from typer.testing import CliRunner

from hm3.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_recipe(path, cfg) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def assert_user_error(result, pattern: str):
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]


def assert_nothing_written(parent, name="out"):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-")]


# -- happy paths ------------------------------------------------------------------------------------
def test_merge_predict_inspect(recipe, tmp_path):
    cfg = write_recipe(tmp_path / "r.yaml", recipe("ties", density=0.5))
    r = run("merge", cfg, "-o", tmp_path / "out", "--no-progress")
    assert r.exit_code == 0, r.output + r.stderr
    assert "5 labels in groups a(2), b(3)" in r.output

    (tmp_path / "in.txt").write_text("w0 w30 w31\n\nw12 w40\n")
    r = run("predict", tmp_path / "out", "--input", tmp_path / "in.txt")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert [row["text_index"] for row in rows] == [0, 1]  # blank lines are skipped
    assert set(rows[0]["groups"]) == {"a", "b"}
    scores = rows[0]["groups"]["b"]["scores"]
    assert set(scores) == {"red", "green", "blue"} and math.isclose(sum(scores.values()), 1.0, abs_tol=1e-5)
    assert rows[0]["groups"]["a"]["label"] in ("neg", "pos")

    (tmp_path / "in.jsonl").write_text('{"text": "w0 w30"}\n{"text": "w3 w31", "id": 7}\n')
    r = run("predict", tmp_path / "out", "--input", tmp_path / "in.jsonl", "--groups", "a", "--output", tmp_path / "p.jsonl", "--batch-size", "1")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and set(rows[1]["groups"]) == {"a"}

    r = run("inspect", tmp_path / "out")
    assert r.exit_code == 0 and "red, green, blue" in r.output and "ties" in r.output


def test_predict_fast_path(tiny, tmp_path):
    """`--fast` runs an opt-in path: same output shape; int8-checked re-runs close calls in fp32."""
    (tmp_path / "in.txt").write_text("w0 w30 w31\nw12 w40\nw3 w31 w7\n")
    plain = run("predict", tiny["a"], "--input", tmp_path / "in.txt")
    assert plain.exit_code == 0, plain.stderr
    for path in ("int8", "int8-checked"):
        r = run("predict", tiny["a"], "--input", tmp_path / "in.txt", "--fast", path)
        assert r.exit_code == 0, r.stderr
        rows, ref = ([json.loads(x) for x in out.splitlines()] for out in (r.output, plain.output))
        assert [set(x["groups"]) for x in rows] == [set(x["groups"]) for x in ref]
        for row in rows:
            for pred in row["groups"].values():
                assert pred["label"] in pred["scores"] and math.isclose(sum(pred["scores"].values()), 1.0, abs_tol=1e-5)
        if path == "int8":  # the quantised path really ran: its scores are not fp32's
            assert [x["groups"] for x in rows] != [x["groups"] for x in ref]
        else:  # the tiny model's calls are close, so fp32 decides them again
            assert all(a["groups"][g]["label"] == b["groups"][g]["label"] for a, b in zip(rows, ref) for g in a["groups"])
    assert_user_error(run("predict", tiny["a"], "--input", tmp_path / "in.txt", "--fast", "fp4"), "unknown fast path 'fp4'")


def test_predict_int8_calibrates_on_the_given_texts(tiny, tmp_path):
    """`--calibrate FILE` smooths int8 on those texts instead of random tokens (other scores); it is
    refused without an int8 path, and a missing file is a one-line error."""
    (tmp_path / "in.txt").write_text("w0 w30 w31\nw12 w40\nw3 w31 w7\n")
    (tmp_path / "cal.jsonl").write_text("".join(json.dumps({"text": f"w{i} w{i + 30} w{i + 7}"}) + "\n" for i in range(20)))
    default = run("predict", tiny["a"], "--input", tmp_path / "in.txt", "--fast", "int8")
    calibrated = run("predict", tiny["a"], "--input", tmp_path / "in.txt", "--fast", "int8",
                     "--calibrate", tmp_path / "cal.jsonl")
    assert default.exit_code == 0 and calibrated.exit_code == 0, (default.stderr, calibrated.stderr)
    scores = [[row["groups"]["a"]["scores"] for row in map(json.loads, r.output.splitlines())] for r in (default, calibrated)]
    assert len(scores[0]) == len(scores[1]) == 3 and scores[0] != scores[1]
    assert_user_error(run("predict", tiny["a"], "--input", tmp_path / "in.txt", "--calibrate", tmp_path / "cal.jsonl"),
                      "is for --fast int8 or int8-checked")
    assert_user_error(run("predict", tiny["a"], "--input", tmp_path / "in.txt", "--fast", "int8",
                          "--calibrate", tmp_path / "none.txt"), "none.txt")


def test_predict_reads_stdin_and_text_options(tiny, tmp_path):
    """`--input -` reads one text a line from stdin and `--text` takes texts on the command line: the
    same predictions as the file; giving neither, both, or an empty stdin is a one-line error."""
    (tmp_path / "in.txt").write_text("w0 w30 w31\nw12 w40\n")
    ref = run("predict", tiny["a"], "--input", tmp_path / "in.txt")
    assert ref.exit_code == 0, ref.stderr
    piped = runner.invoke(app, ["predict", str(tiny["a"]), "--input", "-"], input="w0 w30 w31\r\n\nw12 w40\n")
    assert piped.exit_code == 0, piped.stderr
    given = run("predict", tiny["a"], "-t", "w0 w30 w31", "--text", "w12 w40")
    assert given.exit_code == 0, given.stderr
    assert len(ref.output.splitlines()) == 2
    assert piped.output == ref.output and given.output == ref.output
    assert_user_error(run("predict", tiny["a"]), "no texts: pass --input")
    assert_user_error(run("predict", tiny["a"], "-t", "w0", "--input", tmp_path / "in.txt"), "not both")
    assert_user_error(runner.invoke(app, ["predict", str(tiny["a"]), "--input", "-"], input="\n \n"), "stdin (--input -): no texts")


def test_methods_lists_the_registry():
    r = run("methods")
    for name in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "della", "model_stock"):
        assert name in r.output


# -- broken inputs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broken(tiny, tmp_path_factory):
    """Damaged copies of the tiny classifier `a`, one per failure the CLI must explain."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification, BertConfig

    from hm3.testing import tiny_base, tiny_tokenizer

    d = tmp_path_factory.mktemp("broken")

    def copy(name):
        shutil.copytree(tiny["a"], d / name)
        return d / name

    out = {}
    p = copy("pickle")
    torch.save(load_file(str(p / "model.safetensors")), p / "pytorch_model.bin")
    (p / "model.safetensors").unlink()
    out["pickle"] = p

    p = copy("truncated")
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated"] = p

    p = copy("corrupt")
    (p / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    out["corrupt"] = p

    p = copy("nan")
    state = load_file(str(p / "model.safetensors"))
    state["bert.encoder.layer.0.output.dense.weight"][0, 0] = float("nan")
    save_file(state, str(p / "model.safetensors"), metadata={"format": "pt"})
    out["nan"] = p

    p = copy("vocab")
    tok = json.loads((p / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["zzz"] = vocab.pop("w119")
    (p / "tokenizer.json").write_text(json.dumps(tok))
    out["vocab"] = p

    p = copy("multilabel")  # the same weights, read as independent sigmoids
    cfg = json.loads((p / "config.json").read_text())
    (p / "config.json").write_text(json.dumps({**cfg, "problem_type": "multi_label_classification"}))
    out["multilabel"] = p

    p = copy("one_output")  # one logit: a regression or single-sigmoid head
    state = load_file(str(p / "model.safetensors"))
    state["classifier.weight"], state["classifier.bias"] = state["classifier.weight"][:1], state["classifier.bias"][:1]
    save_file(state, str(p / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((p / "config.json").read_text())
    cfg.update(id2label={"0": "score"}, label2id={"score": 0})
    cfg.pop("problem_type", None)  # as such heads are saved (transformers refuses single-label with 1 output)
    (p / "config.json").write_text(json.dumps(cfg))
    out["one_output"] = p

    cfg = BertConfig(vocab_size=len(tiny_tokenizer()), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=2)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(d / "narrow")
    tiny_tokenizer().save_pretrained(d / "narrow")
    out["narrow"] = d / "narrow"

    out["distil"] = tiny_base(d / "distilbase", family="distilbert", headless=False)
    return out


def two_model_recipe(tiny, second, **extra):
    cfg = {
        "merge_method": "ties",
        "base_model": str(tiny["base"]),
        "models": [{"model": str(tiny["a"]), "group": "a"}, {"model": str(second), "group": "x"}],
    }
    cfg.update(extra)
    return cfg


CASES = {
    "missing model path": (lambda t, b: two_model_recipe(t, t["root"] / "nope"), "no such model directory"),
    "not a classifier": (lambda t, b: two_model_recipe(t, t["base"]), "not a sequence classifier"),
    "one-output head": (lambda t, b: two_model_recipe(t, b["one_output"]), "a head with 1 output;"),
    "architecture mismatch": (lambda t, b: two_model_recipe(t, b["distil"]), "architecture 'distilbert' differs"),
    "shape mismatch": (lambda t, b: two_model_recipe(t, b["narrow"]), "has shape"),
    "vocabulary mismatch": (lambda t, b: two_model_recipe(t, b["vocab"]), "tokenizer vocabulary differs"),
    "pickle without flag": (lambda t, b: two_model_recipe(t, b["pickle"]), "--allow-pickle"),
    "truncated safetensors": (lambda t, b: two_model_recipe(t, b["truncated"]), "not a valid safetensors file"),
    "corrupt safetensors": (lambda t, b: two_model_recipe(t, b["corrupt"]), "not a valid safetensors file"),
    "nan weights": (lambda t, b: two_model_recipe(t, b["nan"]), "NaN or inf"),
    "missing base": (lambda t, b: {k: v for k, v in two_model_recipe(t, t["b"]).items() if k != "base_model"}, "needs `base_model`"),
    "duplicate groups": (
        lambda t, b: {**two_model_recipe(t, t["b"]), "models": [{"model": str(t["a"]), "group": "g"}, {"model": str(t["b"]), "group": "g"}]},
        "duplicate group",
    ),
    "duplicate default groups": (
        lambda t, b: {**two_model_recipe(t, t["b"]), "models": [{"model": str(t["a"])}, {"model": str(t["a"])}]},
        "duplicate group",
    ),
    "density out of range": (
        lambda t, b: {**two_model_recipe(t, t["b"]), "parameters": {"density": 1.5}},
        "density must be in (0, 1], got 1.5",
    ),
    "density NaN": (lambda t, b: {**two_model_recipe(t, t["b"]), "parameters": {"density": float("nan")}}, "finite"),
    "weight NaN": (
        lambda t, b: {**two_model_recipe(t, t["b"]), "models": [{"model": str(t["a"]), "parameters": {"weight": float("nan")}}, {"model": str(t["b"])}]},
        "models[0].parameters.weight: must be a finite number",
    ),
    "unknown method": (lambda t, b: {**two_model_recipe(t, t["b"]), "merge_method": "tiez"}, "valid: linear"),
    "unknown parameter": (lambda t, b: {**two_model_recipe(t, t["b"]), "parameters": {"densty": 0.5}}, "densty"),
    "unknown key": (lambda t, b: {**two_model_recipe(t, t["b"]), "base": "x"}, "unknown key"),
    "wrong labels count": (
        lambda t, b: {**two_model_recipe(t, t["b"]), "models": [{"model": str(t["a"]), "labels": ["only"]}, {"model": str(t["b"])}]},
        "lists 1 names",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_merge_input(case, tiny, broken, tmp_path):
    make, pattern = CASES[case]
    cfg = write_recipe(tmp_path / "r.yaml", make(tiny, broken))
    assert_user_error(run("merge", cfg, "-o", tmp_path / "out"), pattern)
    assert_nothing_written(tmp_path)


def test_pickle_is_read_with_the_flag(tiny, broken, tmp_path):
    cfg = write_recipe(tmp_path / "r.yaml", two_model_recipe(tiny, broken["pickle"]))
    r = run("merge", cfg, "-o", tmp_path / "out", "--allow-pickle", "--no-progress")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_malformed_yaml(tmp_path):
    (tmp_path / "r.yaml").write_text("merge_method: ties\nmodels: [\n  - oops: {\n")
    assert_user_error(run("merge", tmp_path / "r.yaml", "-o", tmp_path / "out"), "malformed YAML")
    assert_nothing_written(tmp_path)


def test_missing_recipe(tmp_path):
    assert_user_error(run("merge", tmp_path / "nope.yaml", "-o", tmp_path / "out"), "no such recipe file")


def test_existing_output_without_force(recipe, tmp_path):
    (tmp_path / "out").mkdir()
    cfg = write_recipe(tmp_path / "r.yaml", recipe())
    assert_user_error(run("merge", cfg, "-o", tmp_path / "out"), "pass --force")


def test_force_replaces_only_a_previous_output(recipe, tmp_path):
    """--force replaces a directory as a whole: a previous model, never a folder of other files (a
    session once replaced its home directory with a model through a mistyped -o)."""
    cfg = write_recipe(tmp_path / "r.yaml", recipe())
    home = tmp_path / "home"
    (home / "projects").mkdir(parents=True)
    (home / "notes.txt").write_text("keep me")
    (home / "projects" / "a.py").write_text("print(1)")
    assert_user_error(run("merge", cfg, "-o", home, "--force", "--no-progress"), "holds 'notes.txt', which is not a model")
    assert (home / "notes.txt").read_text() == "keep me" and (home / "projects" / "a.py").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "r.yaml"]  # no temporary sibling left
    (home / "notes.txt").unlink()
    assert_user_error(run("merge", cfg, "-o", home, "--force"), "holds 'projects', which is not a model")
    # a previous output (and an empty directory) is replaced
    out = tmp_path / "out"
    assert run("merge", cfg, "-o", out, "--no-progress").exit_code == 0
    (out / "stale.bin").write_text("from an older merge")
    r = run("merge", cfg, "-o", out, "--force", "--no-progress")
    assert r.exit_code == 0, r.stderr
    assert (out / "model.safetensors").is_file() and not (out / "stale.bin").exists()
    (tmp_path / "empty").mkdir()
    assert run("merge", cfg, "-o", tmp_path / "empty", "--force", "--no-progress").exit_code == 0


def test_replaceable_directories(tmp_path):
    from hm3.io import replaceable

    (tmp_path / "empty").mkdir()
    assert replaceable(tmp_path / "empty") is None
    x = tmp_path / "expanded"  # hm3 expand's output: the models it expanded and their mergekit recipe
    for g in ("_base", "a"):
        (x / g).mkdir(parents=True)
        (x / g / "config.json").write_text(json.dumps({"hm3": {"expanded": {"group": g}}}))
    (x / "mergekit.yml").write_text("")
    assert replaceable(x) is None
    assert replaceable(x / "a") is None  # a model directory
    (x / "probes").mkdir()
    assert replaceable(x) == "'probes'"
    mine = tmp_path / "my-models"  # a folder of one's own models is not an expand output
    (mine / "spam").mkdir(parents=True)
    (mine / "spam" / "config.json").write_text("{}")
    assert replaceable(mine) == "'spam'"


def test_predict_output_that_is_a_folder_fails_before_any_work(tiny, tmp_path, monkeypatch):
    import hm3.model

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(hm3.model, "load", no_load)
    (tmp_path / "preds").mkdir()
    assert_user_error(run("predict", tiny["a"], "--text", "hi", "--output", tmp_path / "preds"),
                      f"{tmp_path / 'preds'}: is a folder; give the output file's name")
    assert list((tmp_path / "preds").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["preds"]


@pytest.mark.parametrize(
    "content,suffix,pattern",
    [
        ("", ".txt", "has no texts"),
        ("\n  \n", ".txt", "has no texts"),
        ('{"txt": "x"}\n', ".jsonl", 'field "text"'),
        ("{not json\n", ".jsonl", "invalid JSON"),
        (b"\xff\xfe bad", ".txt", "not valid UTF-8"),
        ("x\n1\n", ".csv", "the header row needs the column text; it has x"),
        ("x", ".parquet", "unsupported text file type"),
    ],
)
def test_bad_predict_input(tiny, tmp_path, content, suffix, pattern):
    f = tmp_path / f"in{suffix}"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_user_error(run("predict", tiny["a"], "--input", f, "--output", tmp_path / "p.jsonl"), pattern)
    assert not (tmp_path / "p.jsonl").exists()


def test_a_one_output_head_is_refused_at_load(broken, tmp_path):
    """A guard loaded on its own (predict, eval --against, agree --guard): a one-output head that does
    not say it is a sigmoid is an error naming its config.json and the fix, not a softmax's 1.0."""
    out = tmp_path / "p.jsonl"
    r = run("predict", broken["one_output"], "-t", "w0 w1", "--output", out)
    assert_user_error(r, "a head with 1 output;")
    assert "multi_label_classification" in r.stderr
    assert str(broken["one_output"] / "config.json") in r.stderr
    assert not out.exists()


def test_multi_label_guard_merges_predicts_and_inspects(tiny, broken, tmp_path):
    """A multi-label guard (a sigmoid per label) merged with a single-label one: `hm3 merge` says so,
    `hm3 predict` lists its labels at --threshold, `hm3 inspect` shows each group's kind."""
    r = run("merge", write_recipe(tmp_path / "r.yaml", two_model_recipe(tiny, broken["multilabel"])), "-o", tmp_path / "m")
    assert r.exit_code == 0, r.output
    assert "a(2), x(2, multi-label)" in r.output
    for threshold in ("0.5", "0.99"):
        r = run("predict", tmp_path / "m", "-t", "w0 w1 w2", "--threshold", threshold)
        assert r.exit_code == 0, r.output
        groups = json.loads(r.stdout.strip())["groups"]
        x = groups["x"]
        assert x["labels"] == [lab for lab, p in x["scores"].items() if p >= float(threshold)]
        assert "labels" not in groups["a"] and sum(groups["a"]["scores"].values()) == pytest.approx(1)
    r = run("inspect", tmp_path / "m")
    assert r.exit_code == 0 and "multi-label (a sigmoid per label)" in r.stdout and "single-label (softmax)" in r.stdout
    assert_user_error(run("predict", tmp_path / "m", "-t", "w0", "--threshold", "1.5"), "threshold")


def test_predict_missing_model_and_unknown_group(tiny, tmp_path):
    (tmp_path / "in.txt").write_text("w0\n")
    assert_user_error(run("predict", tmp_path / "nope", "--input", tmp_path / "in.txt"), "no such model directory")
    assert_user_error(run("predict", tiny["a"], "--input", tmp_path / "in.txt", "--groups", "zz"), "unknown group 'zz'")


def test_help_imports_no_heavy_library():
    """`hm3 --help` and `hm3 merge --help` start without torch or transformers (transformers alone
    took ~1.5 s at import, scanning its model files; the CLI callback used to import it)."""
    import subprocess
    import sys

    probe = ("import sys\nfrom hm3.cli import app\n"
             "for args in (['--help'], ['merge', '--help']):\n"
             "    try:\n        app(args)\n    except SystemExit:\n        pass\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'optuna', 'fastapi', 'matplotlib'}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out


# -- the console script's quick exit ---------------------------------------------------------------


def test_console_script_process_writes_everything_and_keeps_exit_codes(recipe, tmp_path):
    """``hm3`` as a process (``main`` ends with ``os._exit``): a merge's files are complete and its
    report reaches a pipe; a user error still exits 2 with its one line on stderr."""
    import os
    import subprocess
    import sys

    from hm3.merging.engine import merge

    cfg = write_recipe(tmp_path / "r.yaml", recipe("ties", density=0.5))
    cmd = [sys.executable, "-m", "hm3.cli"]
    r = subprocess.run([*cmd, "merge", cfg, "--out", str(tmp_path / "out"), "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "out") in r.stdout
    merge(cfg, tmp_path / "ref", progress=False)  # the same merge in this process
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name

    bad = subprocess.run([*cmd, "merge", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "missing.yaml" in bad.stderr
    assert not (tmp_path / "o2").exists()

    # a command's plain print() to a pipe is block-buffered: main flushes it before os._exit
    script = "from hm3 import cli; cli.app = lambda: print('answer ' * 100); cli.main()"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and r.stdout == "answer " * 100 + "\n", (r.stdout[-80:], r.stderr)


@pytest.mark.parametrize("raised,code,stderr", [(SystemExit(0), 0, ""), (SystemExit(None), 0, ""),
                                                (SystemExit(2), 2, ""), (SystemExit("gone"), 1, "gone\n")])
def test_main_maps_exit_codes_to_os_exit(monkeypatch, capsys, raised, code, stderr):
    import os

    from hm3 import cli

    def command():
        print("answer")
        raise raised

    exits = []
    monkeypatch.setattr(cli, "app", command)
    monkeypatch.setattr(os, "_exit", exits.append)
    # threads other tests leave running (a server's executor) would make main take the normal exit
    monkeypatch.setattr(cli.threading, "enumerate", lambda: [cli.threading.main_thread()])
    cli.main()
    assert exits == [code]
    out = capsys.readouterr()
    assert out.out == "answer\n" and out.err == stderr


def test_main_exits_normally_while_a_thread_of_its_own_runs(monkeypatch):
    """Python's own exit waits for non-daemon threads; os._exit would cut them off."""
    import os
    import threading

    from hm3 import cli

    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    monkeypatch.setattr(cli, "app", lambda: None)
    monkeypatch.setattr(os, "_exit", lambda code: pytest.fail("os._exit with a thread still running"))
    try:
        with pytest.raises(SystemExit) as e:
            cli.main()
        assert e.value.code == 0
    finally:
        release.set()
        worker.join()


def test_group_pairs_reads_group_value_items_and_names_the_option_in_errors():
    from hm3.errors import HM3Error
    from hm3.io import group_pairs

    assert group_pairs(["a=x.jsonl", " b = dir/y "], "--data") == {"a": "x.jsonl", "b": "dir/y"}
    assert group_pairs(None, "--data") == {}
    for bad, message in [("a", "--data 'a': expected GROUP=PATH"), ("=x", "expected GROUP=PATH"),
                         ("a= ", "expected GROUP=PATH")]:
        with pytest.raises(HM3Error, match=message):
            group_pairs([bad], "--data")
    with pytest.raises(HM3Error, match=r"--guard 'g': expected GROUP=DIR, e\.g\. --guard jailbreak=\./j"):
        group_pairs(["g"], "--guard", "DIR", "jailbreak=./j")
    with pytest.raises(HM3Error, match="--data: group 'a' given twice"):
        group_pairs(["a=x", "a=y"], "--data")
