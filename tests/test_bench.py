"""Smoke runs of the benchmarks on tiny models: the structure of the results, never their timings
(timings belong to docs/BENCHMARKS.md, not to assertions)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from hm3 import bench

HAS_MERGEKIT = importlib.util.find_spec("mergekit") is not None
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def merge_results(workdir):
    # the cheapest complete run: hm3 in-process, one method, one repeat (one child process)
    return bench.bench_merge(workdir, sizes=("tiny",), counts=(2,), methods=("linear",), repeats=1,
                             mergekit=False, whole_process=False, bandwidth_mb=16)


@pytest.fixture(scope="module")
def inference_results(workdir):
    return bench.bench_inference(workdir, counts=(2,), n_texts=12, repeats=1, zoo=workdir / "no-zoo",
                                 fast=(), size="tiny")


def test_make_models_reuses_and_extends(tmp_path):
    two = bench.make_models(tmp_path, "tiny", 2, expanded=False)
    stamp = (two.models[0] / "model.safetensors").stat().st_mtime_ns
    three = bench.make_models(tmp_path, "tiny", 3, expanded=True)
    assert [p.name for p in three.models] == ["model0", "model1", "model2"]
    assert (three.models[0] / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert three.n_params > 0 and three.bytes_fp32 == 4 * three.n_params
    # mergekit's inputs: every head expanded to all labels (2 + 3 + 4), the base with a zero head
    cfgs = [json.loads((p / "config.json").read_text()) for p in [three.xbase, *three.xmodels]]
    assert {c["num_labels"] if "num_labels" in c else len(c["id2label"]) for c in cfgs} == {9}


def test_merge_bench_structure(merge_results):
    rows = merge_results["rows"]
    assert {(r["tool"], r["mode"]) for r in rows} == {("hm3", "in-process"), ("hm3", "in-memory")}
    for r in rows:
        assert {"size", "n", "method", "tool", "mode", "times_s", "median_s", "peak_rss_mb", "rss_x_model",
                "floor_s", "params_m"} <= set(r)
        assert r["size"] == "tiny" and r["n"] == 2 and r["method"] == "linear"
        assert len(r["times_s"]) == 1 and r["peak_rss_mb"] > 0 and r["floor_s"] > 0
    (s,) = merge_results["summary"]
    assert {"speedup_process", "speedup_inprocess", "hm3_inprocess_x_floor", "hm3_rss_x_model"} <= set(s)
    assert s["hm3_inprocess_s"] is not None and s["hm3_process_s"] is None and s["speedup_process"] is None
    assert merge_results["bandwidth_gbs"] > 0
    assert "hm3 in-process" in next(iter(merge_results["commands"].values()))
    # the search's engine: task vectors in memory, merged into a preallocated model (no files)
    memory = next(r for r in rows if r["mode"] == "in-memory")
    assert s["hm3_inmemory_s"] == memory["median_s"] > 0
    assert s["hm3_inmemory_x_floor"] == pytest.approx(memory["median_s"] / s["floor_s"])
    assert "hm3 in-memory" in next(iter(merge_results["commands"].values()))
    # the page cache's floor: one per (size, N), beside the in-process runs
    (f,) = merge_results["io_floors"]
    assert (f["size"], f["n"]) == ("tiny", 2) and f["read_s"] > 0 and f["write_s"] > 0 and f["seconds"] > 0
    assert len(f["runs"]) == 1  # one per repeat
    assert f["read_s"] == min(r["read_s"] for r in f["runs"]) and f["seconds"] == f["read_s"] + f["write_s"]
    assert s["io_floor_s"] == f["seconds"] and s["hm3_inprocess_x_io_floor"] == pytest.approx(s["hm3_inprocess_s"] / f["seconds"])
    text = bench.render_markdown(merge_results, None, command="x", images={})
    assert "### The page cache's floor" in text and f"| tiny | 2 | {s['floor_s']:.3f} | {f['read_s']:.3f} |" in text
    assert f["fresh_s"] == min(r["fresh_s"] for r in f["runs"]) > 0 and f["warm_s"] > 0
    assert f"| {f['fresh_s']:.3f} | {f['warm_s']:.3f} |" in text
    assert f"| {s['hm3_inmemory_s']:.2f} | {s['hm3_inmemory_x_floor']:.1f}× |" in text


def test_io_floor_is_the_fastest_read_plus_the_fastest_write():
    """A write-back stall in one repeat (0.110 s against 0.015 s, seen on the VM) must not raise the floor."""
    runs = [{"read_s": 0.012, "write_s": 0.110, "seconds": 0.122}, {"read_s": 0.010, "write_s": 0.016, "seconds": 0.026},
            {"read_s": 0.011, "write_s": 0.015, "seconds": 0.026}]
    assert bench.io_floor_of(runs) == {"read_s": 0.010, "write_s": 0.015, "seconds": 0.010 + 0.015}
    # the fresh-memory probe of each run: its fastest too (results of older runs have none)
    fresh = [dict(r, fresh_s=f, warm_s=w) for r, f, w in zip(runs, (0.30, 0.70, 0.35), (0.05, 0.04, 0.06))]
    assert bench.io_floor_of(fresh) == {"read_s": 0.010, "write_s": 0.015, "seconds": 0.010 + 0.015,
                                        "fresh_s": 0.30, "warm_s": 0.04}


def test_fresh_memory_times_a_first_and_a_second_write_of_the_bytes(monkeypatch):
    got = bench.measure_fresh_memory(3 << 20)
    assert set(got) == {"fresh_s", "warm_s"} and got["fresh_s"] > 0 and got["warm_s"] > 0
    ticks = iter([1.0, 1.5, 1.6])  # the three clock reads: before, between and after the two writes
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    assert bench.measure_fresh_memory(0) == pytest.approx({"fresh_s": 0.5, "warm_s": 0.1})  # 0 bytes: one page


def test_io_floor_reads_every_input_and_writes_the_model_size(tmp_path, monkeypatch):
    files = []
    for i, size in enumerate((4096 * 3 + 8, 100)):
        files.append(tmp_path / f"m{i}.safetensors")
        files[-1].write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    sizes = {}
    real_unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: (sizes.setdefault(self.name, self.stat().st_size),
                                                                 real_unlink(self, *a, **k))[1])
    got = bench.measure_io_floor(files, tmp_path / "out.bin", nbytes=2500, block=1000)
    assert sizes == {"out.bin": 2500} and not (tmp_path / "out.bin").exists()  # written whole, then removed
    assert got["seconds"] == pytest.approx(got["read_s"] + got["write_s"]) and got["read_s"] > 0
    assert got["fresh_s"] > 0 and got["warm_s"] > 0  # the memory probe rides along, outside "seconds"
    with pytest.raises(FileNotFoundError):
        bench.measure_io_floor([tmp_path / "missing.safetensors"], tmp_path / "out.bin", nbytes=10)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MERGEKIT, reason="mergekit not installed")
def test_whole_process_runs_and_mergekit_agreement(tmp_path):
    """hm3 and mergekit console scripts on the same merge; linear differs by rounding only."""
    res = bench.bench_merge(tmp_path, sizes=("tiny",), counts=(2,), methods=("linear",), repeats=1,
                            mergekit=True, in_process=False, bandwidth_mb=16)
    assert {(r["tool"], r["mode"]) for r in res["rows"]} == {("hm3", "process"), ("mergekit", "process")}
    (s,) = res["summary"]
    assert s["speedup_process"] is not None
    assert s["max_abs_diff_vs_mergekit"] is not None and s["max_abs_diff_vs_mergekit"] < 1e-5


def test_hm3_phases_profile_a_real_merge(tiny, tmp_path):
    """The whole-process breakdown makes the same model as hm3.merge and accounts for its time."""
    import yaml

    from hm3.merging import numpy_engine
    from hm3.merging.engine import merge

    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(tiny["base"]), "seed": 0,
                                   "models": [{"model": str(tiny[g]), "group": g, "parameters": {"density": 0.5}}
                                              for g in ("a", "b")]}))
    ph = bench.hm3_phases(str(cfg), str(tmp_path / "out"))
    assert ph["engine"] == "numpy"  # a plain TIES merge: no torch needed
    parts = ("import_s", "prepare_s", "read_merge_s", "write_s")
    assert all(ph[k] >= 0 for k in parts)
    assert sum(ph[k] for k in parts) == pytest.approx(ph["seconds"], rel=1e-6, abs=1e-6)
    merge(str(cfg), tmp_path / "ref", progress=False)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    res = {"machine": {}, "bandwidth_gbs": 1.0, "summary": [], "rows": [], "commands": {},
           "phases": [{"size": "tiny", "n": 2, "method": "ties", **ph, "process_s": 1.0, "peak_rss_mb": 1.0}]}
    text = bench.render_markdown(res, None, command="x", images={})
    assert "Where a whole-process `hm3 merge` spends its time" in text and "| tiny | 2 | ties | numpy (" in text
    # the workers each method ran with, as hm3 merge chose them (numpy engine: 2 on a machine with 2 cores)
    assert ph["workers"] == numpy_engine.merge_workers()
    text = bench.render_markdown({**res, "hm3_workers": {"ties": 2, "dare_ties": 1}}, None, command="x", images={})
    assert "| hm3 merge workers | ties 2, dare_ties 1 (" in text


def test_cached_merged_model_is_reused_only_for_the_same_guards(inference_results, workdir, tmp_path):
    """A merged model left by an earlier run of other guards (e.g. random ones before the zoo was
    built) must not be compared with these guards."""
    merged = workdir / "inference" / "merged2"
    models = bench._merged_from(merged)
    assert models is not None and len(models) == 2 and all("tiny" in m for m in models)
    assert bench._merged_from(tmp_path / "absent") is None


def test_inference_bench_structure(inference_results):
    res = inference_results
    setups = {r["setup"] for r in res["rows"]}
    assert setups == {"originals", "merged"}
    for r in res["rows"]:
        assert {"load_s", "infer_s", "total_s", "texts_per_s", "peak_rss_mb", "forward_passes"} <= set(r)
        (run,) = r["runs"]  # repeats=1: the run is the median
        assert run["infer_s"] == r["infer_s"] and run["load_s"] == r["load_s"] and run["first_pass_s"] > 0
    originals = next(r for r in res["rows"] if r["setup"] == "originals")
    merged = next(r for r in res["rows"] if r["setup"] == "merged")
    assert originals["forward_passes"] == 2 * merged["forward_passes"] == 2 * 12
    (s,) = res["summary"]
    assert s["target_ratio"] == pytest.approx(1.15 / 2)
    assert {"load_ratio", "infer_ratio", "total_ratio", "meets_target"} <= set(s)
    assert res["fast"] == []


def test_report_and_plots(merge_results, inference_results, tmp_path):
    img = {"merge": "img/m.png", "inference": "img/i.png"}
    assert bench.plot_merge(merge_results, tmp_path / "img" / "m.png").is_file()
    assert bench.plot_inference(inference_results, tmp_path / "img" / "i.png").is_file()
    text = bench.render_markdown(merge_results, inference_results, command="hm3 bench all --out x", images=img)
    for heading in ("# Benchmarks", "## Machine", "## Merging: hm3 vs mergekit", "### Raw numbers", "### Commands",
                    "## Inference: N guards vs one merged model", "![merge time vs model size](img/m.png)"):
        assert heading in text
    assert "| tiny | 2 | linear | hm3 | in-process |" in text


def test_run_child_reports_the_childs_own_peak_rss():
    small = bench.run_child([sys.executable, "-c", "pass"])
    big = bench.run_child([sys.executable, "-c", "b = bytearray(200 * 2**20); print('{\"seconds\": 0.5}')"])
    assert big.inner_s == 0.5
    assert big.peak_rss_mb - small.peak_rss_mb > 150  # the 200 MB it touched, not this process's RSS


def test_run_child_failure_is_a_clear_error():
    with pytest.raises(bench.HM3Error, match="exit 3"):
        bench.run_child([sys.executable, "-c", "import sys; sys.exit(3)"])


def test_helpers():
    assert bench.floor_seconds(10**9, 2, 4.0) == pytest.approx(1.0)  # (2 + 2) GB at 4 GB/s
    agree = bench.label_agreement({"a": ["x", "y"], "b": ["p", "q"]}, {"a": ["x", "x"], "b": ["p", "q"]})
    assert agree == {"a": 0.5, "b": 1.0, "all": 0.75}
    texts, source = bench.bench_texts(5, zoo="/nonexistent")
    assert len(texts) == 5 and all(isinstance(t, str) and t for t in texts) and "generated" in source


def test_fastpaths_agree_with_fp32(tmp_path):
    import hm3
    from hm3.fastpaths import accelerate, agreement
    from hm3.testing import TASK_A, tiny_base, tiny_finetune

    model = tiny_finetune(tiny_base(tmp_path / "base"), tmp_path / "a", TASK_A, steps=20)
    clf = hm3.load(model)
    texts = [t for t, _ in TASK_A.sample(24, seed=5)]
    for path in ("int8", "onnx") if HAS_ORT else ("int8",):
        fast = accelerate(clf, path, cache_dir=tmp_path / "fast")
        assert fast.space.names == clf.space.names
        agree = agreement(clf, fast, texts)
        assert set(agree) == {"a", "all"} and 0 <= agree["all"] <= 1
    assert bench.label_agreement({"a": ["x"]}, {"a": ["x"]})["all"] == 1.0
    if not HAS_ORT:
        return
    # fp32 ONNX Runtime computes the same function: its probabilities match torch's closely
    onnx = accelerate(clf, "onnx", cache_dir=tmp_path / "fast")
    import numpy as np

    np.testing.assert_allclose(onnx.predict_proba(texts)["a"], clf.predict_proba(texts)["a"], atol=1e-4)


def test_save_safetensors_roundtrip(tmp_path):
    """hm3.io.save_safetensors (the merge's copy-free writer) is read back exactly by safetensors."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from hm3.io import save_safetensors

    state = {"w": torch.randn(3, 5), "ids": torch.arange(7), "bf": torch.randn(4).to(torch.bfloat16),
             "empty": torch.zeros(0, 3), "flag": torch.tensor([True, False]), "t": torch.randn(6, 4).t(),
             "h": torch.randn(5).half()}
    save_safetensors(state, tmp_path / "m.safetensors", {"format": "pt"})
    back = load_file(str(tmp_path / "m.safetensors"))
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as h:
        assert h.metadata() == {"format": "pt"}


def test_inference_bench_reports_fast_paths(workdir, inference_results):
    """A fast path's row: agreement per group, speed vs the fp32 merged model and, for int8-checked,
    the share of windows re-run in fp32; the report's table shows them."""
    # after inference_results: the same tiny guards and merged model, reused
    res = bench.bench_inference(workdir, counts=(2,), n_texts=12, repeats=1, zoo=workdir / "no-zoo",
                                fast=("int8-checked",), size="tiny")
    (row,) = res["fast"]
    assert row["path"] == "int8-checked" and set(row["agreement"]) == {"g0", "g1", "all"}
    assert row["speedup"] > 0 and 0 <= row["rerun_share"] <= 1
    assert "merged+int8-checked" in {r["setup"] for r in res["rows"]}
    text = bench.render_markdown({}, res, command="x", images={})
    assert f"| 2 | int8-checked | {row['speedup']:.2f}× | {row['agreement']['all']:.2%} |" in text
    assert f"| {row['rerun_share']:.1%} |" in text
    assert res["calibration"] == "random-token windows" and "activation ranges from random-token windows" in text


def test_int8_calibration_texts_are_the_zoo_validation_suite(tmp_path):
    """int8 is calibrated on the zoo's validation suite, never on the test suite it is measured on."""
    assert bench.calibration_texts(tmp_path / "no-zoo") == (None, "random-token windows")
    suites = tmp_path / "zoo" / "suites"
    suites.mkdir(parents=True)
    (suites / "test.jsonl").write_text(json.dumps({"text": "a test text", "expected": {"g": "x"}}) + "\n")
    (suites / "validation.jsonl").write_text("".join(json.dumps({"text": f"validation {i}", "expected": {"g": "x"}}) + "\n"
                                                     for i in range(3)))
    texts, source = bench.calibration_texts(tmp_path / "zoo")
    assert texts == ["validation 0", "validation 1", "validation 2"] and source == str(suites / "validation.jsonl")


def test_trial_bench_structure_and_report(workdir):
    from hm3.bench_trial import bench_trial, trial_markdown
    from hm3.errors import HM3Error

    res = bench_trial(workdir, counts=(2,), n_texts=12, trials=2, size="tiny", zoo=workdir / "no-zoo", max_length=16)
    assert res["guards"].startswith("random tiny") and res["n_texts"] == 12 and len(res["densities"]) == 2
    rows = {r["precision"]: r for r in res["rows"]}
    assert set(rows) == {"float32", "bfloat16"} and all(r["n"] == 2 and r["target_s"] == 3.0 for r in rows.values())
    assert rows["float32"]["agreement_min"] == 1.0  # float32 is the reference
    assert 0.0 <= rows["bfloat16"]["agreement_min"] <= rows["bfloat16"]["agreement_mean"] <= 1.0
    for r in rows.values():
        assert r["tokens"] > 12 and len(r["runs_s"]) == 2
        assert 0 < r["merge_s"] <= r["trial_s"] and 0 < r["forward_s"] <= r["trial_s"]
    md = trial_markdown(res, "hm3 bench trial --models 2")
    assert "| 2 | bfloat16 |" in md and "| 2 | float32 |" in md and "hm3 bench trial --models 2" in md
    with pytest.raises(HM3Error, match="list float32 first"):
        bench_trial(workdir, counts=(2,), n_texts=4, trials=1, size="tiny", precisions=("bfloat16",))
    with pytest.raises(HM3Error, match="unknown precision"):
        bench_trial(workdir, counts=(2,), n_texts=4, trials=1, size="tiny", precisions=("float32", "int4"))


def test_trial_texts_are_a_seeded_draw_from_the_validation_suite_or_say_they_repeat(tmp_path):
    import json as _json

    from hm3.bench_trial import _texts

    (tmp_path / "suites").mkdir()
    rows = [{"text": t, "expected": {"a": "x"}} for t in ("one", "two", "three", "two")]
    (tmp_path / "suites" / "validation.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    drawn, source = _texts(2, tmp_path)
    assert len(set(drawn)) == 2 and set(drawn) <= {"one", "two", "three"} and "2 distinct texts, a seeded draw" in source
    assert _texts(2, tmp_path) == (drawn, source)
    more, source = _texts(5, tmp_path)
    assert more == ["one", "two", "three", "one", "two"] and "3 distinct texts, repeated to 5" in source


def test_byte_compile_hm3_leaves_a_current_pyc_of_the_engine():
    """Whole-process timings read hm3's bytecode as mergekit's is read: compiled at install."""
    import importlib.util
    from pathlib import Path

    import hm3.merging.engine as engine

    pyc = Path(importlib.util.cache_from_source(engine.__file__))
    pyc.unlink(missing_ok=True)
    bench.byte_compile_hm3()
    assert pyc.exists()
    # current: the header records the source's mtime and size, so Python uses it instead of compiling
    src = Path(engine.__file__).stat()
    header = pyc.read_bytes()[:16]
    assert int.from_bytes(header[8:12], "little") == int(src.st_mtime) & 0xFFFFFFFF
    assert int.from_bytes(header[12:16], "little") == src.st_size & 0xFFFFFFFF


def test_inference_worker_times_the_steady_state_after_an_untimed_first_pass(tmp_path):
    """With warmup, the worker's first pass is reported apart and kept out of load and inference;
    the labels it writes are those of a cold run, and the report says how inference was timed."""
    bm = bench.make_models(tmp_path / "models", "tiny", 2, expanded=False)
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps([f"text number {i} " * (1 + i % 5) for i in range(10)]))
    got = {}
    for warm in (True, False):
        spec = {"models": [str(m) for m in bm.models], "texts": str(texts), "batch_size": 4, "warmup": warm,
                "labels": str(tmp_path / f"labels-{warm}.json")}
        got[warm] = bench._infer(spec)
    assert got[True]["first_pass_s"] > 0 and got[False]["first_pass_s"] is None
    for r in got.values():
        assert r["seconds"] == pytest.approx(r["load_s"] + (r["first_pass_s"] or 0) + r["infer_s"], abs=0.05)
    assert json.loads((tmp_path / "labels-True.json").read_text()) == json.loads((tmp_path / "labels-False.json").read_text())
    row = {"n": 2, "setup": "merged", "load_s": 0.1, "infer_s": 1.0, "total_s": 1.1, "texts_per_s": 10.0,
           "peak_rss_mb": 1.0, "forward_passes": 10}
    res = {"guards": "g", "texts": "t", "n_texts": 10, "batch_size": 4, "repeats": 1, "summary": [], "fast": []}
    warm = bench.render_markdown(None, {**res, "warmup": True, "rows": [{**row, "first_pass_s": 1.5}]}, command="x", images={})
    cold = bench.render_markdown(None, {**res, "warmup": False, "rows": [{**row, "first_pass_s": None}]}, command="x", images={})
    assert "untimed first pass s |" in warm and "| 10 | 1.50 |" in warm and "steady state" in warm
    assert "first pass" not in cold
