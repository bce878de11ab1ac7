"""Merge and inference benchmarks: hm3 against mergekit, against the memory-bandwidth floor, and a
merged model against the guards it replaces.

``hm3 bench merge``     the same merge (linear, TIES, DARE-TIES; 2 and 5 models) by hm3 and by
                        mergekit (on pre-expanded heads), whole process and in-process, with peak RSS
                        and the bandwidth floor for the same bytes.
``hm3 bench inference`` N original guards vs their merged model on the same texts: load, inference,
                        texts/s, peak memory; optional fast paths (ONNX Runtime, dynamic int8) with
                        their agreement with fp32.
``hm3 bench all``       both, written as docs/BENCHMARKS.md with plots (``make bench``).

Every timed run is a fresh child process (``python -m hm3.bench worker``), so peak RSS is that run's
own (``os.wait4``) and runs never share caches or allocator state. Competing implementations run
side by side in one invocation, interleaved per repeat, so the ratios hold on a shared machine even
when the absolute times drift. Timings live here, never in test assertions.

Models are random weights in standard configurations (merge and inference cost do not depend on
the values): a headless base like the offline MiniLM, and fine-tuned classifiers = base + small
noise with heads of 2-4 labels.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hm3.errors import HM3Error
from hm3.sysinfo import package_version

log = logging.getLogger(__name__)

#: BERT shapes from the standard configurations (vocabulary 30522, as the MiniLM tokenizer).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),  # tests
    "bert-mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
LABEL_COUNTS = (2, 3, 4, 2, 3, 4, 2, 3)  # heads of the benchmark classifiers, in order
METHODS = ("linear", "ties", "dare_ties")
PYTHON = sys.executable


def _bin(name: str) -> str:
    """A console script of this environment (``hm3``, ``mergekit-yaml``)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        if not found:
            raise HM3Error(f"{name}: console script not found next to {sys.executable} or on PATH; install it")
        return found
    return str(path)


# -- benchmark models ------------------------------------------------------------------------------
@dataclass
class BenchModels:
    """Checkpoints for one size: a headless base, N classifiers, and (for mergekit) the same N and
    the base with their heads pre-expanded to the union of the label spaces."""

    size: str
    base: Path
    models: list[Path]
    xbase: Path | None = None
    xmodels: list[Path] | None = None
    n_params: int = 0  # parameters of one classifier
    bytes_fp32: int = 0  # of one classifier


def _bert_config(size: str, num_labels: int | None = None):
    from transformers import BertConfig

    if size not in SIZES:
        raise HM3Error(f"unknown model size {size!r}; valid: {', '.join(SIZES)}")
    if size == "tiny":  # hm3.testing's word-level tokenizer: 125 tokens, 64 positions
        from hm3.testing import tiny_config

        vocab_size, positions = tiny_config().vocab_size, 64
    else:
        vocab_size, positions = 30522, 512
    kw: dict[str, Any] = dict(SIZES[size], vocab_size=vocab_size, max_position_embeddings=positions)
    if num_labels is not None:
        kw["num_labels"] = num_labels
        kw["architectures"] = ["BertForSequenceClassification"]
    else:
        kw["architectures"] = ["BertModel"]
    return BertConfig(**kw)


def _save_tokenizer(out: Path, size: str) -> None:
    """The MiniLM tokenizer (BERT uncased, 30522 tokens) when installed, else (and for ``tiny``)
    hm3's tiny word-level one."""
    try:
        if size == "tiny":
            raise ImportError("tiny models use the tiny tokenizer")
        from hm3.zoo.base import base_model_dir

        src = base_model_dir()
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (src / f).is_file():
                shutil.copyfile(src / f, out / f)
        return
    except (ImportError, HM3Error):
        pass
    from hm3.testing import tiny_tokenizer

    tiny_tokenizer().save_pretrained(str(out))


def _write(out: Path, state: dict, config, size: str) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    _save_tokenizer(out, size)


def make_models(root: str | os.PathLike, size: str, n: int, *, seed: int = 0, expanded: bool = True) -> BenchModels:
    """Write (or reuse) a random base and ``n`` random classifiers of ``size`` under ``root/size``.

    Fine-tuned weights are ``base + 0.01·σ·N(0, 1)`` per tensor (σ of the base tensor), so task
    vectors look like real ones in scale; classifier ``i`` has ``LABEL_COUNTS[i]`` labels and its
    own generator, so models are reused when a later run asks for more of them. With ``expanded``,
    also the mergekit inputs (see ``_expand``).
    """
    import torch

    if not 1 <= n <= len(LABEL_COUNTS):
        raise HM3Error(f"between 1 and {len(LABEL_COUNTS)} benchmark models, got {n}")
    root = Path(root) / size
    stamp = root / "models.json"
    meta = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if meta.get("seed") != seed or meta.get("size") != size:
        shutil.rmtree(root, ignore_errors=True)
        meta = {"seed": seed, "size": size, "n": 0}
    root.mkdir(parents=True, exist_ok=True)
    base = None
    if not (root / "base" / "model.safetensors").is_file():
        from transformers import BertModel

        g = torch.Generator().manual_seed(seed)
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in BertModel(_bert_config(size)).state_dict().items()}
        base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
        for k in base:  # LayerNorm weights near 1, as in a trained model
            if k.endswith("LayerNorm.weight"):
                base[k] += 1.0
        _write(root / "base", base, _bert_config(size), size)
        meta["n"] = 0
    if meta["n"] < n:
        if base is None:
            from safetensors.torch import load_file

            base = load_file(str(root / "base" / "model.safetensors"))
        hidden = SIZES[size]["hidden_size"]
        for i in range(meta["n"], n):
            g = torch.Generator().manual_seed(seed * 1000 + i + 1)
            state = {
                f"bert.{k}": v + (0.01 * v.std().clamp(min=1e-3)) * torch.randn(v.shape, generator=g)
                for k, v in base.items()
            }
            state["classifier.weight"] = torch.randn(LABEL_COUNTS[i], hidden, generator=g) * 0.02
            state["classifier.bias"] = torch.zeros(LABEL_COUNTS[i])
            meta["n_params"] = sum(v.numel() for v in state.values())
            _write(root / f"model{i}", state, _bert_config(size, LABEL_COUNTS[i]), size)
            del state
        meta["n"] = n
        stamp.write_text(json.dumps(meta))
    bm = BenchModels(size, root / "base", [root / f"model{i}" for i in range(n)],
                     n_params=meta["n_params"], bytes_fp32=4 * meta["n_params"])
    if expanded:
        paths = expand(bm, root / f"expanded{n}")
        bm.xbase, bm.xmodels = paths["_base"], [paths[f"g{i}"] for i in range(n)]
    return bm



def recipe(bm: BenchModels, method: str, density: float = 0.5, seed: int = 0) -> dict:
    """The benchmark's hm3 recipe: weight 1 each, density 0.5 for the sparsifying methods."""
    from hm3.merging.methods import REGISTRY

    params: dict[str, float] = {"weight": 1.0}
    if REGISTRY[method].uses_density:
        params["density"] = density
    return {
        "merge_method": method,
        "base_model": str(bm.base),
        "models": [{"model": str(m), "group": f"g{i}", "parameters": dict(params)} for i, m in enumerate(bm.models)],
        "dtype": "float32",
        "seed": seed,
    }


def expand(bm: BenchModels, out: Path) -> dict[str, Path]:
    """mergekit's inputs: the models and the base with heads pre-expanded (``hm3.expand``), once."""
    from hm3.expand import expand_models

    done = out / "paths.json"
    if done.is_file():
        return {k: Path(v) for k, v in json.loads(done.read_text()).items()}
    paths = expand_models(recipe(bm, "ties"), out, force=True)
    done.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


def mergekit_recipe(bm: BenchModels, method: str, seed: int = 0) -> dict:
    """The same merge in mergekit's terms, over the pre-expanded models (``hm3.expand``)."""
    from hm3.expand import BASE
    from hm3.expand import mergekit_recipe as translate

    paths = {BASE: bm.xbase, **{f"g{i}": p for i, p in enumerate(bm.xmodels or [])}}
    cfg, _notes = translate(recipe(bm, method, seed=seed), paths)
    return cfg


# -- measuring ---------------------------------------------------------------------------------------
@dataclass
class Run:
    """One timed child process."""

    wall_s: float  # spawn to exit
    peak_rss_mb: float  # the child's own peak resident set (os.wait4)
    inner_s: float | None = None  # the timed call inside the child (in-process runs)
    extra: dict | None = None


# Runs the command as a grandchild and reports its own peak RSS. A child forked from this (large)
# process would inherit our resident set as its starting high-water mark, which exec keeps in
# ru_maxrss; a tiny launcher process makes the measured peak the command's own (± a few MB).
_LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
json.dump({"wall": time.perf_counter() - t0, "rc": os.waitstatus_to_exitcode(status),
           "maxrss_kb": usage.ru_maxrss}, open(sys.argv[1], "w"))
"""


def run_child(cmd: list[str], *, env: dict | None = None, timeout: float = 3600) -> Run:
    """Run ``cmd`` in a fresh process: its wall time (spawn to exit) and its own peak RSS.
    An in-process worker prints one JSON line ``{"seconds": ...}`` last; it becomes ``inner_s``."""
    with tempfile.TemporaryDirectory(prefix="hm3-bench-") as tmp:
        report = Path(tmp) / "rusage.json"
        try:
            proc = subprocess.run([PYTHON, "-c", _LAUNCHER, str(report), *cmd], capture_output=True, text=True,
                                  env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise HM3Error(f"benchmark command timed out after {timeout:.0f}s: {' '.join(cmd)}") from None
        if not report.is_file():
            raise HM3Error(f"benchmark launcher failed: {proc.stderr.strip()[-500:]}")
        usage = json.loads(report.read_text())
    if usage["rc"] != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise HM3Error(f"benchmark command failed (exit {usage['rc']}): {' '.join(cmd)}\n{tail}")
    inner, extra = None, None
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if lines:
        extra = json.loads(lines[-1])
        inner = extra.pop("seconds", None)
    return Run(usage["wall"], usage["maxrss_kb"] / 1024, inner, extra)  # ru_maxrss: KiB on Linux


def child_env(threads: int | None) -> dict | None:
    """The environment of timed children: with ``threads``, every tool's OpenMP/MKL pools get that
    many threads (the same for hm3 and mergekit); else the environment as it is."""
    if not threads:
        return None
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _worker_cmd(kind: str, **spec) -> list[str]:
    return [PYTHON, "-m", "hm3.bench", kind, json.dumps(spec)]


def measure_bandwidth(mbytes: int = 256, repeats: int = 7) -> float:
    """Streaming bandwidth in GB/s: ``torch.add(a, b, out=c)`` on warm buffers moves 3× their size.

    The floor of a merge is the bytes it must move at this rate (see ``floor_seconds``)."""
    import torch

    n = mbytes * 2**20 // 4
    a, b, c = torch.rand(n), torch.rand(n), torch.empty(n)
    torch.add(a, b, out=c)  # touch every page first
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.add(a, b, out=c)
        times.append(time.perf_counter() - t0)
    return 3 * 4 * n / statistics.median(times) / 1e9


def floor_seconds(model_bytes: int, n: int, gbs: float) -> float:
    """Reading the base and N models and writing one merged model: (N + 2) models' bytes."""
    return (n + 2) * model_bytes / (gbs * 1e9)


def measure_io_floor(files: list[Path], out_file: Path, nbytes: int, block: int = 1 << 24) -> dict:
    """What this machine's page cache alone costs a merge: every byte of ``files`` read once through a
    read-only map (a xor over its 64-bit words, a block at a time), then ``nbytes`` written to the new
    ``out_file`` from one reused buffer (removed after). No merging: a merge that reads its inputs and
    writes its output cannot take less. ``{"read_s", "write_s", "seconds"}`` (their sum), and
    ``fresh_s`` / ``warm_s`` (``measure_fresh_memory``): what the write's new page-cache pages cost
    as memory alone."""
    import mmap

    import numpy as np

    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            words = np.frombuffer(m, dtype=np.uint64, count=len(m) // 8)
            step = block // 8
            for i in range(0, words.size, step):
                np.bitwise_xor.reduce(words[i:i + step])
            del words  # the map cannot close while a view holds it
    t1 = time.perf_counter()
    buf = memoryview(np.ones(block, dtype=np.uint8))
    with open(out_file, "wb") as fh:
        left = nbytes
        while left > 0:
            fh.write(buf[:min(left, block)])
            left -= block
    t2 = time.perf_counter()
    Path(out_file).unlink()
    return {"seconds": t2 - t0, "read_s": t1 - t0, "write_s": t2 - t1, **measure_fresh_memory(nbytes)}


def measure_fresh_memory(nbytes: int) -> dict:
    """``{"fresh_s", "warm_s"}``: writing ``nbytes`` into memory the process has just mapped (every page
    newly allocated, as a written file's new page-cache pages are), then the same bytes again (the
    pages now warm). On the benchmark VM of session 36 (its virtio balloon has free page reporting on:
    pages the guest frees go back to the host, so a first write probably waits for the host to supply
    the page again; THP did not change it) the first write took 0.30-0.31 s against 0.016 s warm for
    bert-base's 438 MB (19×), whatever the file system; the page-cache write of the same bytes took
    0.13-1.02 s, the fast end when it reused pages a just-deleted file had freed. A page-cache write
    floor near ``fresh_s`` is that memory's cost, not the file system's."""
    import mmap

    import numpy as np

    with mmap.mmap(-1, max(nbytes, 1)) as m:
        a = np.frombuffer(m, dtype=np.uint8)
        t0 = time.perf_counter()
        a.fill(1)
        t1 = time.perf_counter()
        a.fill(2)
        t2 = time.perf_counter()
        del a  # the map cannot close while a view holds it
    return {"fresh_s": t1 - t0, "warm_s": t2 - t1}


def io_floor_of(runs: list[dict]) -> dict:
    """A floor from repeated ``measure_io_floor`` runs: the fastest read plus the fastest write. Noise on a
    shared machine (write-back stalls above all) only ever adds time, so the fastest repeat is the floor."""
    read, write = min(r["read_s"] for r in runs), min(r["write_s"] for r in runs)
    memory = {k: min(r[k] for r in runs) for k in ("fresh_s", "warm_s") if all(k in r for r in runs)}
    return {"read_s": read, "write_s": write, "seconds": read + write, **memory}


def _machine() -> dict:
    from hm3.sysinfo import machine

    mk = package_version("mergekit")  # not installed: the comparison is skipped
    return {**machine(), "mergekit": mk, "hm3": package_version("hm3") or "dev"}


# -- the merge benchmark -------------------------------------------------------------------------------
def byte_compile_hm3() -> None:
    """Byte-compile hm3's modules, as ``pip install`` of a wheel leaves an installed package (and
    leaves mergekit). An editable install run under ``PYTHONDONTWRITEBYTECODE=1`` (CI, this project's
    machines) otherwise compiles hm3's sources again in every timed process: ~65 ms of a whole-process
    ``hm3 merge`` (imports 0.215 s → 0.152 s), time mergekit never pays."""
    import compileall

    compileall.compile_dir(str(Path(__file__).parent), quiet=1)


def bench_merge(
    workdir: str | os.PathLike,
    *,
    sizes: tuple[str, ...] = ("minilm", "bert-base"),
    counts: tuple[int, ...] = (2, 5),
    methods: tuple[str, ...] = METHODS,
    repeats: int = 3,
    mergekit: bool = True,
    in_process: bool = True,
    whole_process: bool = True,
    check: bool = True,
    bandwidth_mb: int = 256,
    threads: int | None = None,
    phases: bool = True,
    io_floors: bool = True,
) -> dict:
    """hm3 vs mergekit on the same merges, side by side: per (size, N, method) and repeat, hm3's
    and mergekit's whole-process runs (console scripts) and in-process runs (a worker timing the
    library call) are interleaved. Returns a JSON-able dict; medians over ``repeats``.

    With ``phases`` (and ``whole_process``), one more fresh hm3 process per (size, N, method) times where a whole-process
    ``hm3 merge`` spends its time (``hm3_phases``): imports, prepare, read + merge, write.

    With ``io_floors`` (and ``in_process``), a fresh child per (size, N) and repeat, started like the
    in-process runs, times the page cache alone (``measure_io_floor``): reading the inputs through
    maps and writing one model to a new file, the part of the floor no merge engine can change."""
    workdir = Path(workdir).resolve()
    env = child_env(threads)
    if whole_process:
        byte_compile_hm3()
    if mergekit and package_version("mergekit") is None:
        log.warning("mergekit is not installed: comparing against the bandwidth floor only")
        mergekit = False
    # with a thread count, measured in a child with the runs' environment; else here (same default)
    gbs = (run_child(_worker_cmd("bandwidth", mbytes=bandwidth_mb), env=env).extra["gbs"] if env
           else measure_bandwidth(bandwidth_mb))
    from hm3.merging import native

    results: dict[str, Any] = {"machine": _machine(), "bandwidth_gbs": gbs, "repeats": repeats, "rows": [],
                               "native": native.available(),
                               "commands": {}, "threads": threads, "phases": [], "io_floors": []}
    hm3_cli, mk_cli = _bin("hm3"), (_bin("mergekit-yaml") if mergekit else None)
    for size in sizes:
        for n in counts:
            log.info("models: %s × %d", size, n)
            bm = make_models(workdir / "models", size, n, expanded=mergekit)
            run_dir = workdir / "runs" / f"{size}-{n}"
            run_dir.mkdir(parents=True, exist_ok=True)
            io_floor = None
            if in_process and io_floors:  # the page cache's share, under the in-process runs' conditions
                files = [f for d in (bm.base, *bm.models) for f in sorted(Path(d).glob("*.safetensors"))]
                spec = {"files": [str(f) for f in files], "out": str(run_dir / "io-floor.bin"), "nbytes": bm.bytes_fp32}
                runs_io = []
                for _ in range(repeats):
                    ready_to_time(run_dir / "out", [bm.base, *bm.models])
                    x = run_child(_worker_cmd("io-floor", **spec), env=env)
                    runs_io.append({**x.extra, "seconds": x.inner_s})  # read_s, write_s, fresh_s, warm_s
                io_floor = io_floor_of(runs_io)
                results["io_floors"].append({"size": size, "n": n, **io_floor, "runs": runs_io})
                log.info("page-cache floor %s×%d: read %.3fs write %.3fs (fresh memory %.3fs, warm %.3fs)", size, n,
                         io_floor["read_s"], io_floor["write_s"], io_floor["fresh_s"], io_floor["warm_s"])
            for method in methods:
                hm3_cfg = run_dir / f"{method}.hm3.yaml"
                _write_yaml(hm3_cfg, recipe(bm, method))
                jobs: list[tuple[str, str, list[str]]] = []  # (tool, mode, command)
                out = str(run_dir / "out")
                if whole_process:
                    jobs.append(("hm3", "process", [hm3_cli, "merge", str(hm3_cfg), "--out", out, "--force", "--no-progress"]))
                if in_process:
                    jobs.append(("hm3", "in-process", _worker_cmd("hm3-merge", config=str(hm3_cfg), out=out)))
                    jobs.append(("hm3", "in-memory", _worker_cmd("hm3-memory", config=str(hm3_cfg))))
                if mergekit:
                    mk_cfg = run_dir / f"{method}.mergekit.yaml"
                    _write_yaml(mk_cfg, mergekit_recipe(bm, method))
                    mk_out = str(run_dir / "out-mergekit")
                    if whole_process:
                        jobs.append(("mergekit", "process", [mk_cli, str(mk_cfg), mk_out, "--no-copy-tokenizer", "--quiet",
                                                             "--random-seed", "0"]))
                    if in_process:
                        jobs.append(("mergekit", "in-process", _worker_cmd("mergekit-merge", config=str(mk_cfg), out=mk_out)))
                runs: dict[tuple[str, str], list[Run]] = {(t, m): [] for t, m, _ in jobs}
                inputs = {"hm3": [bm.base, *bm.models], "mergekit": [bm.xbase, *bm.xmodels] if mergekit else []}
                for r in range(repeats):
                    for tool, mode, cmd in jobs:
                        ready_to_time(run_dir / ("out-mergekit" if tool == "mergekit" else "out"), inputs[tool])
                        run = run_child(cmd, env=env)
                        runs[(tool, mode)].append(run)
                        log.info("%s %s×%d %s %s #%d: %.2fs (inner %s) rss %.0f MB", tool, size, n, method, mode, r,
                                 run.wall_s, f"{run.inner_s:.2f}s" if run.inner_s is not None else "-", run.peak_rss_mb)
                results["commands"].setdefault(f"{size}-{n}-{method}", {f"{t} {m}": " ".join(c) for t, m, c in jobs})
                if phases and whole_process:
                    ready_to_time(run_dir / "out", inputs["hm3"])
                    run = run_child(_worker_cmd("hm3-phases", config=str(hm3_cfg), out=out), env=env)
                    results["phases"].append({"size": size, "n": n, "method": method, **run.extra,
                                              "process_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb})
                    results.setdefault("hm3_workers", {})[method] = run.extra.get("workers")  # same for each size
                diff = None
                if check and mergekit and method in ("linear", "ties") and whole_process:
                    diff = _max_abs_diff(run_dir / "out", run_dir / "out-mergekit")
                for (tool, mode), rs in runs.items():
                    times = [x.inner_s if mode in ("in-process", "in-memory") else x.wall_s for x in rs]
                    results["rows"].append({
                        "size": size, "params_m": bm.n_params / 1e6, "model_mb": bm.bytes_fp32 / 2**20, "n": n,
                        "method": method, "tool": tool, "mode": mode, "times_s": times,
                        "median_s": statistics.median(times),
                        "peak_rss_mb": max(x.peak_rss_mb for x in rs),
                        "rss_x_model": max(x.peak_rss_mb for x in rs) / (bm.bytes_fp32 / 2**20),
                        "floor_s": floor_seconds(bm.bytes_fp32, n, gbs),
                        "io_floor_s": io_floor["seconds"] if io_floor else None,
                        "max_abs_diff_vs_mergekit": diff if tool == "hm3" else None,
                    })
                shutil.rmtree(run_dir / "out", ignore_errors=True)
                shutil.rmtree(run_dir / "out-mergekit", ignore_errors=True)
    results["summary"] = merge_summary(results)
    return results


def ready_to_time(out: Path, inputs: list) -> None:
    """What every timed run (and page-cache floor) starts from: no previous output at ``out`` (removing
    one is not part of a merge), its ``inputs`` in the page cache (``read_through``), and nothing that
    earlier runs left dirty (``os.sync``), so no run pays for the write-back of the run before it."""
    shutil.rmtree(out, ignore_errors=True)
    read_through(inputs)
    os.sync()


def read_through(dirs: list) -> None:
    """Read every safetensors file of ``dirs`` once (and drop the bytes): a timed run then reads its
    inputs from the page cache, whatever the kernel evicted since they were last read."""
    for d in dirs:
        for f in sorted(Path(d).glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.read(1 << 24):
                    pass


def _write_yaml(path: Path, data: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _max_abs_diff(a: Path, b: Path) -> float | None:
    """Largest |hm3 − mergekit| over every tensor both outputs hold (deterministic methods)."""
    import torch
    from safetensors import safe_open

    fa, fb = a / "model.safetensors", b / "model.safetensors"
    if not fa.is_file() or not fb.is_file():
        return None
    worst = 0.0
    with safe_open(str(fa), "pt") as ha, safe_open(str(fb), "pt") as hb:
        common = set(ha.keys()) & set(hb.keys())
        if not common:
            return None
        for k in common:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
            if x.is_floating_point() and x.shape == y.shape:
                worst = max(worst, float((x.float() - y.float()).abs().max()))
    return worst


def merge_summary(results: dict) -> list[dict]:
    """Per (size, N, method): mergekit ÷ hm3 (whole process and in-process), hm3 in-process ÷
    floor, peak RSS in models."""
    by: dict[tuple, dict] = {}
    for r in results["rows"]:
        by.setdefault((r["size"], r["n"], r["method"]), {})[(r["tool"], r["mode"])] = r
    out = []
    for (size, n, method), rows in by.items():
        def med(tool, mode):
            r = rows.get((tool, mode))
            return r["median_s"] if r else None

        hp, hi, mp, mi = med("hm3", "process"), med("hm3", "in-process"), med("mergekit", "process"), med("mergekit", "in-process")
        hm = med("hm3", "in-memory")
        any_row = next(iter(rows.values()))
        floor, io_floor = any_row["floor_s"], any_row.get("io_floor_s")
        out.append({
            "size": size, "n": n, "method": method, "params_m": any_row["params_m"],
            "hm3_process_s": hp, "mergekit_process_s": mp, "speedup_process": (mp / hp) if hp and mp else None,
            "hm3_inprocess_s": hi, "mergekit_inprocess_s": mi, "speedup_inprocess": (mi / hi) if hi and mi else None,
            "floor_s": floor, "hm3_inprocess_x_floor": (hi / floor) if hi else None,
            "io_floor_s": io_floor, "hm3_inprocess_x_io_floor": (hi / io_floor) if hi and io_floor else None,
            "hm3_inmemory_s": hm, "hm3_inmemory_x_floor": (hm / floor) if hm else None,
            "hm3_rss_x_model": rows.get(("hm3", "process"), rows.get(("hm3", "in-process"), {})).get("rss_x_model"),
            "mergekit_rss_x_model": rows.get(("mergekit", "process"), rows.get(("mergekit", "in-process"), {})).get("rss_x_model"),
            "max_abs_diff_vs_mergekit": rows.get(("hm3", "process"), {}).get("max_abs_diff_vs_mergekit"),
        })
    return out


# -- the inference benchmark ---------------------------------------------------------------------------
def zoo_dir(zoo: str | os.PathLike | None = None) -> Path:
    """The zoo the benchmarks read: ``zoo``, else ``$HM3_ZOO``, else ``.cache/hm3/zoo``."""
    return Path(zoo) if zoo else Path(os.environ.get("HM3_ZOO", ".cache/hm3/zoo"))


def zoo_guards(zoo: str | os.PathLike | None = None) -> list[Path]:
    """The real guards of the zoo, when it has been built (``<zoo>/<group>/hm3-zoo.json``)."""
    zoo = zoo_dir(zoo)
    if not zoo.is_dir():
        return []
    return sorted(p.parent for p in zoo.glob("*/hm3-zoo.json"))


def bench_texts(n: int, zoo: str | os.PathLike | None = None, seed: int = 0) -> tuple[list[str], str]:
    """``n`` texts: the zoo's test suite when built, else generated word sequences of 4-200 words
    (from the BERT vocabulary), lengths spread like real guard inputs. Returns (texts, source)."""
    import random

    suite = zoo_dir(zoo) / "suites" / "test.jsonl"
    texts: list[str] = []
    if suite.is_file():
        from hm3.evaluate import load_suite

        texts = [r.text for r in load_suite(suite)]  # not splitlines(): texts may hold U+2028 and the like
        if texts:
            reps = -(-n // len(texts))
            return (texts * reps)[:n], str(suite)
    rng = random.Random(seed)
    words = [w for w in _vocab_words() if w.isalpha()] or [f"w{i}" for i in range(1000)]
    for _ in range(n):
        length = min(200, max(4, int(rng.lognormvariate(3.0, 0.8))))
        texts.append(" ".join(rng.choice(words) for _ in range(length)))
    return texts, f"generated (seed {seed}, log-normal lengths, median 20 words)"


def calibration_texts(zoo: str | os.PathLike | None = None) -> tuple[list[str] | None, str]:
    """The int8 paths' calibration texts: the zoo's validation suite (never the test suite the bench
    classifies), else none — random-token windows (``hm3.fastpaths.activation_ranges``)."""
    suite = zoo_dir(zoo) / "suites" / "validation.jsonl"
    if suite.is_file():
        from hm3.evaluate import load_suite

        if texts := [r.text for r in load_suite(suite)]:
            return texts, str(suite)
    return None, "random-token windows"


def _vocab_words() -> list[str]:
    try:
        from hm3.zoo.base import base_model_dir

        vocab = base_model_dir() / "vocab.txt"
        return [w for w in vocab.read_text(encoding="utf-8").splitlines() if not w.startswith(("[", "#"))]
    except (ImportError, HM3Error, OSError):
        return []


def bench_inference(
    workdir: str | os.PathLike,
    *,
    counts: tuple[int, ...] = (2, 5),
    n_texts: int = 512,
    batch_size: int = 32,
    repeats: int = 3,
    zoo: str | os.PathLike | None = None,
    fast: tuple[str, ...] = ("int8", "int8-checked", "onnx", "bf16"),
    size: str = "minilm",
    threads: int | None = None,
    warmup: bool = True,
) -> dict:
    """N original guards vs their merged model on the same texts, each run in a fresh child:
    load time, inference time, total, texts/s, peak RSS; and opt-in fast paths of the merged model
    (``hm3.fastpaths``) with their group-label agreement against fp32.

    ``warmup``: each child first runs its first model over the texts once, untimed (``_infer``), so
    inference is timed in the steady state of a long run for both setups; without it, the setup
    whose first pass is timed alone (the merged model's one pass) also carries the process's
    first-pass costs, which the originals' N passes share."""
    from hm3.fastpaths import CALIBRATED, SMOOTH_ALPHA, full_range_int8
    from hm3.merging.engine import merge

    workdir = Path(workdir).resolve()
    env = child_env(threads)
    guards = zoo_guards(zoo)
    source = "zoo guards"
    if len(guards) < max(counts):
        bm = make_models(workdir / "models", size, max(counts), expanded=False)
        guards, source = bm.models, "random MiniLM-config classifiers (zoo not built)"
    texts, text_source = bench_texts(n_texts, zoo)
    run_dir = workdir / "inference"
    run_dir.mkdir(parents=True, exist_ok=True)
    texts_file = run_dir / "texts.json"
    texts_file.write_text(json.dumps(texts))
    calibration, calibration_source = calibration_texts(zoo)
    calibration_file = None
    if calibration is not None:
        calibration_file = run_dir / "calibration.json"
        calibration_file.write_text(json.dumps(calibration))
    results: dict[str, Any] = {"machine": _machine(), "guards": source, "texts": text_source, "n_texts": len(texts),
                               "calibration": calibration_source, "smooth_alpha": SMOOTH_ALPHA,
                               "full_range": full_range_int8(),
                               "batch_size": batch_size, "repeats": repeats, "rows": [], "fast": [], "threads": threads,
                               "warmup": warmup}
    for n in counts:
        members = guards[:n]
        merged = run_dir / f"merged{n}"
        if _merged_from(merged) != [str(m) for m in members]:  # absent, or merged from other guards
            base = _base_of(members)
            merge({"merge_method": "ties", "base_model": str(base), "dtype": "float32",
                   "models": [{"model": str(m), "group": f"g{i}", "parameters": {"weight": 1.0, "density": 0.5}}
                              for i, m in enumerate(members)]}, merged, force=True, progress=False)
        jobs = {
            "originals": _worker_cmd("infer", models=[str(m) for m in members], texts=str(texts_file),
                                     batch_size=batch_size, warmup=warmup),
            "merged": _worker_cmd("infer", models=[str(merged)], texts=str(texts_file), batch_size=batch_size,
                                  warmup=warmup, labels=str(run_dir / f"labels{n}-fp32.json")),
        }
        for name in fast:
            calibrate = {"calibration": str(calibration_file)} if calibration_file and name in CALIBRATED else {}
            jobs[f"merged+{name}"] = _worker_cmd("infer", models=[str(merged)], texts=str(texts_file),
                                                 batch_size=batch_size, fast=name, warmup=warmup,
                                                 labels=str(run_dir / f"labels{n}-{name}.json"), **calibrate)
        for name in fast:  # one-time exports are a build step, not load time: make them first
            if name.startswith("onnx"):
                try:
                    from hm3.fastpaths import accelerate
                    from hm3.model import load

                    accelerate(load(merged), name, cache_dir=merged / ".hm3-fast")
                except HM3Error as e:
                    log.warning("skipping %s: %s", name, e)
                    jobs.pop(f"merged+{name}", None)
        runs: dict[str, list[Run]] = {k: [] for k in jobs}
        for r in range(repeats):
            for name, cmd in list(jobs.items()):
                try:
                    run = run_child(cmd, env=env)
                except HM3Error as e:
                    if name.startswith("merged+"):  # an optional fast path that is not installed
                        log.warning("skipping %s: %s", name, str(e).splitlines()[-1])
                        runs.pop(name, None)
                        jobs = {k: v for k, v in jobs.items() if k != name}
                        continue
                    raise
                runs[name].append(run)
                log.info("inference N=%d %s #%d: load %.2fs infer %.2fs rss %.0f MB", n, name, r,
                         run.extra["load_s"], run.extra["infer_s"], run.peak_rss_mb)
        for name, rs in runs.items():
            if not rs:
                continue
            load = statistics.median(x.extra["load_s"] for x in rs)
            infer = statistics.median(x.extra["infer_s"] for x in rs)
            results["rows"].append({
                "n": n, "setup": name, "load_s": load, "infer_s": infer, "total_s": load + infer,
                "first_pass_s": statistics.median(x.extra["first_pass_s"] for x in rs) if warmup else None,
                "process_s": statistics.median(x.wall_s for x in rs), "texts_per_s": len(texts) / infer,
                "peak_rss_mb": max(x.peak_rss_mb for x in rs), "forward_passes": len(texts) * (n if name == "originals" else 1),
                # every run in the order it ran, to tell a setup's noise from a slow setup
                "runs": [{k: x.extra[k] for k in ("load_s", "infer_s", "first_pass_s")} for x in rs],
            })
        ref = _read_labels(run_dir / f"labels{n}-fp32.json")
        for name in fast:
            got = _read_labels(run_dir / f"labels{n}-{name}.json")
            if ref is not None and got is not None:
                item = {"n": n, "path": name, "agreement": label_agreement(ref, got)}
                rs, base = runs.get(f"merged+{name}"), runs.get("merged")
                if rs and base:  # speed of the path vs the fp32 merged model, same texts, same process kind
                    item["speedup"] = (statistics.median(x.extra["infer_s"] for x in base)
                                       / statistics.median(x.extra["infer_s"] for x in rs))
                    if "rerun_share" in rs[0].extra:
                        item["rerun_share"] = rs[0].extra["rerun_share"]
                results["fast"].append(item)
    results["summary"] = inference_summary(results)
    return results


def _merged_from(merged: Path) -> list[str] | None:
    """The models a cached merged model was made from (its recipe in config.json), or None."""
    from hm3.io import recipe_models

    models = recipe_models(merged)
    return None if models is None else [m["model"] for m in models]


def _base_of(models: list[Path]) -> Path:
    """The base the guards were fine-tuned from: the zoo's offline MiniLM, or the benchmark base."""
    sibling = models[0].parent / "base"
    if (sibling / "config.json").is_file():
        return sibling
    from hm3.zoo.base import base_model_dir

    return base_model_dir()


def _read_labels(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def label_agreement(ref: dict[str, list[str]], got: dict[str, list[str]]) -> dict[str, float]:
    """Per group and overall: the fraction of texts whose predicted label is the same."""
    out, same, total = {}, 0, 0
    for g, labels in ref.items():
        other = got.get(g, [])
        k = sum(a == b for a, b in zip(labels, other))
        out[g] = k / max(1, len(labels))
        same += k
        total += len(labels)
    out["all"] = same / max(1, total)
    return out


def inference_summary(results: dict) -> list[dict]:
    """Per N: merged ÷ originals for load, inference and total, against the 1.15/N target."""
    out = []
    for n in sorted({r["n"] for r in results["rows"]}):
        rows = {r["setup"]: r for r in results["rows"] if r["n"] == n}
        o, m = rows.get("originals"), rows.get("merged")
        if not o or not m:
            continue
        item = {"n": n, "load_ratio": m["load_s"] / o["load_s"], "infer_ratio": m["infer_s"] / o["infer_s"],
                "total_ratio": m["total_s"] / o["total_s"], "target_ratio": 1.15 / n,
                "rss_ratio": m["peak_rss_mb"] / o["peak_rss_mb"]}
        item["meets_target"] = item["total_ratio"] <= item["target_ratio"]
        for k, r in rows.items():
            if k.startswith("merged+"):
                item[f"{k}_total_ratio"] = r["total_s"] / o["total_s"]
        out.append(item)
    return out


# -- report -------------------------------------------------------------------------------------------
def _workers(w: "dict | int") -> str:
    """The merge workers each method ran with (older results: one number for all)."""
    return ", ".join(f"{m} {k}" for m, k in w.items()) if isinstance(w, dict) else str(w)


def _f(x, fmt="{:.2f}", none="–") -> str:
    return none if x is None else fmt.format(x)


def plot_merge(results: dict, out: Path) -> Path | None:
    """Time vs model size: whole process and in-process, per N; the bandwidth floor (and, in-process,
    the page cache's) for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    counts = sorted({r["n"] for r in rows})
    modes = [m for m in ("process", "in-process") if any(r["mode"] == m for r in rows)]
    if not rows or not modes:
        return None
    fig, axes = plt.subplots(len(counts), len(modes), figsize=(5.5 * len(modes), 3.8 * len(counts)), squeeze=False)
    colors = {"linear": "tab:green", "ties": "tab:blue", "dare_ties": "tab:orange"}
    for a, n in enumerate(counts):
        for b, mode in enumerate(modes):
            ax = axes[a][b]
            for method in dict.fromkeys(r["method"] for r in rows):
                for tool, style in (("hm3", "-o"), ("mergekit", "--s")):
                    pts = sorted((r["params_m"], r["median_s"]) for r in rows
                                 if r["n"] == n and r["mode"] == mode and r["method"] == method and r["tool"] == tool)
                    if pts:
                        ax.plot(*zip(*pts), style, color=colors.get(method, "gray"), label=f"{tool} {method}")
            floor = sorted({(r["params_m"], r["floor_s"]) for r in rows if r["n"] == n})
            ax.plot(*zip(*floor), ":", color="black", label="bandwidth floor")
            io_floor = sorted({(r["params_m"], r["io_floor_s"]) for r in rows if r["n"] == n and r.get("io_floor_s")})
            if io_floor and mode == "in-process":
                ax.plot(*zip(*io_floor), "-.", color="gray", label="page-cache floor")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("parameters per model (M)")
            ax.set_ylabel("seconds")
            ax.set_title(f"{n} models, {'whole process' if mode == 'process' else 'in-process call'}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_inference(results: dict, out: Path) -> Path | None:
    """Load + inference time of N guards vs the merged model (and fast paths), per N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    if not rows:
        return None
    labels = [f"N={r['n']}\n{r['setup']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    x = range(len(rows))
    ax.bar(x, [r["load_s"] for r in rows], label="load", color="tab:gray")
    ax.bar(x, [r["infer_s"] for r in rows], bottom=[r["load_s"] for r in rows], label="inference", color="tab:blue")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("seconds")
    ax.set_title(f"{results['n_texts']} texts: N guards vs one merged model")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _io_floor_lines(merge_res: dict) -> list[str]:
    """The page cache's floor beside the bandwidth floor, and hm3's in-process time against each."""
    methods = list(dict.fromkeys(r["method"] for r in merge_res["summary"]))
    lines = ["### The page cache's floor", "",
             "The bandwidth floor moves bytes between warm buffers. A merge also reads its inputs from files and "
             "writes a new one: one more fresh process per (size, N) and repeat, started like the in-process runs "
             "(inputs read just before, no previous output), reads every byte of the base and the N models "
             "through read-only maps (a xor over their words) and writes one model's bytes to a new file from a "
             "reused buffer (`python -m hm3.bench io-floor`, `bench.measure_io_floor`; each child started after "
             "`os.sync()`; the fastest read plus the fastest write of the repeats, as noise only adds). No merging: the "
             "time a merge of these files cannot go below on this machine, whatever its engine. *Fresh memory*: the "
             "same child writes one model's bytes into memory it has just mapped, then again "
             "(`bench.measure_fresh_memory`): a written file's new page-cache pages cost at least the first; where "
             "it is many times the second (a VM whose memory balloon hands freed pages back to the host), the write "
             "column is that memory's price, not the file system's.", "",
             "| size | N | bandwidth floor s | page cache: read s | write s | total s (× bandwidth floor) | "
             "fresh memory: first write s | again s | "
             + " | ".join(f"hm3 in-process {m} ÷ page-cache floor" for m in methods) + " |",
             "|" + "---|" * (8 + len(methods))]
    summary = {(r["size"], r["n"], r["method"]): r for r in merge_res["summary"]}
    for f in merge_res["io_floors"]:
        any_row = next(r for (size, n, _), r in summary.items() if (size, n) == (f["size"], f["n"]))
        ratios = [_f(summary.get((f["size"], f["n"], m), {}).get("hm3_inprocess_x_io_floor"), "{:.1f}×")
                  for m in methods]
        lines.append(f"| {f['size']} | {f['n']} | {any_row['floor_s']:.3f} | {f['read_s']:.3f} | {f['write_s']:.3f} | "
                     f"{f['seconds']:.3f} ({f['seconds'] / any_row['floor_s']:.1f}×) | {_f(f.get('fresh_s'), '{:.3f}')} | "
                     f"{_f(f.get('warm_s'), '{:.3f}')} | " + " | ".join(ratios) + " |")
    return lines + [""]


def render_markdown(merge_res: dict | None, infer_res: dict | None, *, command: str, images: dict[str, str]) -> str:
    """docs/BENCHMARKS.md: machine, commands, summary tables against the targets, raw numbers."""
    res = merge_res or infer_res or {}
    m = res.get("machine", {})
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` (`{command}`) — do not edit by hand; rerun it. "
        "Timings live here only, never in the test suite's assertions.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m.get('cpu', '?')} ({m.get('cores', '?')} cores, torch threads {m.get('torch_threads', '?')}) |",
        f"| memory | {m.get('memory', '?')} |",
        f"| software | Python {m.get('python')}, torch {m.get('torch')}, transformers {m.get('transformers')}, "
        f"mergekit {m.get('mergekit')} |",
        f"| threads per timed process | {res.get('threads') or 'torch default'} (OMP_NUM_THREADS, same for hm3 and mergekit) |",
        *([f"| hm3 merge workers | {_workers(res['hm3_workers'])} (tensors merged at once; `HM3_MERGE_WORKERS`; "
           "numpy engine: default min(2, cores), each worker one thread; torch engine: default min(2, torch threads) "
           "for the task-arithmetic family and linear, 1 for model_stock and data-aware methods, each on torch "
           "threads ÷ workers) |"]
          if (merge_res or {}).get("hm3_workers") else []),
        f"| load average at start | {_f(m.get('load_average'))} (the machine is shared: compare the ratios, "
        "measured side by side, more than the absolute times) |",
        f"| date | {m.get('date', '?')} |",
        "",
        "How: every timed run is a fresh process started through a tiny launcher, so its peak RSS "
        "(`wait4` → `ru_maxrss`) is its own. *Whole process* = the console script from spawn to exit "
        "(`hm3 merge`, `mergekit-yaml`); *in-process* = the library call alone inside a worker that "
        "imported everything first (`hm3.merge(...)`, `mergekit.merge.run_merge(...)`), both reading the "
        "inputs and writing the output. Repeats are interleaved (hm3, mergekit, hm3, ...) and medians "
        "reported. Before each run its input files are read once, so that every run reads them from the page "
        "cache, as the bandwidth floor assumes (on the VM this was measured on, files left alone lost pages "
        "from the cache at ~0.5 MB/s each — 20 of 418 MB in 50 s — and a merge that read them back from "
        "disk took up to 30 times as long: 11.8 s instead of 0.4 s for one bert-base linear merge). "
        "Then `os.sync()` writes back what earlier runs left dirty, as before each page-cache floor below, so "
        "no run pays for the write-back of the run before it (here four 438 MB writes to a file in a row took "
        "0.73-1.24 s each, 0.10-0.51 s each after a sync). "
        "Both tools run with the environment as it is; the `hm3` command, once its files are "
        "written and its output flushed, ends with `os._exit` (Python's shutdown after `import torch` "
        "costs ~0.25 s). "
        "hm3's modules are byte-compiled first, as `pip install` leaves mergekit's.",
        "",
    ]
    if merge_res:
        gbs = merge_res["bandwidth_gbs"]
        lines += [
            "## Merging: hm3 vs mergekit",
            "",
            "Random-weight BERT classifiers in standard shapes (vocabulary 30522; heads of 2, 3, 4, 2, 3 labels), "
            "fine-tuned = base + small noise; weight 1, density 0.5 (TIES, DARE-TIES); float32. mergekit merges "
            "the same models with heads pre-expanded by `hm3 expand` (`--no-copy-tokenizer`, `--random-seed 0`). "
            f"Bandwidth floor: (N + 2) models' bytes (read base and N models, write one) at the measured "
            f"{gbs:.1f} GB/s (`torch.add`, warm buffers, measured in a child with the runs' thread count).",
            "",
            "Targets (issue 6): ≥ 5× faster than mergekit's whole process for TIES and DARE-TIES on bert-base; "
            "in-process within 10× of the floor; peak RSS ≤ (N + 2) × one model.",
            "",
            "*In-memory* = the search's engine (`hm3.merging.fast`, `python -m hm3.bench hm3-memory`): base and "
            "task vectors already in memory, every tensor merged into a preallocated model in place — exactly "
            "the bytes the floor counts (read the base and N task vectors, write one model), no files; the "
            "median of 3 merges after a first, as each of a search's trials runs. "
            f"Compiled merge loops (`hm3.merging.native`): {'yes' if merge_res.get('native') else 'no (numpy kernels)'}.",
            "",
            "| size | N | method | hm3 process s | mergekit process s | speed-up | hm3 in-process s | "
            "mergekit in-process s | speed-up | floor s | hm3 in-process ÷ floor | hm3 in-memory s | "
            "in-memory ÷ floor | peak RSS hm3 (× model) | peak RSS mergekit (× model) | max abs diff hm3 vs mergekit |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in merge_res["summary"]:
            lines.append(
                f"| {r['size']} ({r['params_m']:.0f} M) | {r['n']} | {r['method']} | {_f(r['hm3_process_s'])} | "
                f"{_f(r['mergekit_process_s'])} | {_f(r['speedup_process'], '{:.1f}×')} | {_f(r['hm3_inprocess_s'])} | "
                f"{_f(r['mergekit_inprocess_s'])} | {_f(r['speedup_inprocess'], '{:.1f}×')} | {_f(r['floor_s'], '{:.3f}')} | "
                f"{_f(r['hm3_inprocess_x_floor'], '{:.0f}×')} | {_f(r.get('hm3_inmemory_s'))} | "
                f"{_f(r.get('hm3_inmemory_x_floor'), '{:.1f}×')} | {_f(r['hm3_rss_x_model'], '{:.1f}')} | "
                f"{_f(r['mergekit_rss_x_model'], '{:.1f}')} | {_f(r['max_abs_diff_vs_mergekit'], '{:.1e}')} |"
            )
        lines += ["", "Peak RSS includes the Python interpreter, torch and transformers (about 0.3–0.5 GB), which "
                  "weighs most on the small models. hm3 streams: each input tensor is read as a copy-on-write map "
                  "of its own bytes, unmapped once the tensor is merged (never a map of the whole file, whose "
                  "touched pages would stay in the process until the end), merged block by block where it lies "
                  "(no task vectors in memory: `hm3.merging.streamed`), and each merged tensor is appended to the "
                  "output file as soon as it is made, so its peak is the interpreter plus the working set of the "
                  "largest tensor (the word embeddings' maps and their merged copy). Max abs diff (read from the whole-process outputs): linear "
                  "differs by rounding only (hm3 averages task vectors, mergekit weights); TIES differs only at "
                  "elements tied at the trim threshold, where the two keep different members of the tie "
                  "(documented in `hm3.merging.steps`) — these random fine-tunes have many tied magnitudes, as "
                  "their deltas lie on the float32 grid of the base. DARE-TIES draws from different RNGs and is "
                  "not compared.", ""]
        if merge_res.get("io_floors"):
            lines += _io_floor_lines(merge_res)
        if merge_res.get("phases"):
            lines += ["### Where a whole-process `hm3 merge` spends its time", "",
                      "One more fresh process per merge (`python -m hm3.bench hm3-phases`, the same calls as "
                      "`hm3 merge` with clocks between them): imports (the CLI and the engine — a plain merge "
                      "imports neither transformers nor, on the numpy engine, torch), `prepare` (configs, tensor "
                      "tables, tokenizer check), reading + merging the tensors, writing (safetensors bytes as they "
                      "are merged, config, tokenizer, card, rename). *Engine*: `numpy` (`hm3.merging.numpy_engine`) "
                      "or `torch` (then its import counts with the imports).", "",
                      "| size | N | method | engine (workers) | imports s | prepare s | read + merge s | write s | "
                      "process s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
            for r in merge_res["phases"]:
                lines.append(f"| {r['size']} | {r['n']} | {r['method']} | {r['engine']} ({r['workers']}) | "
                             f"{r['import_s']:.2f} | {r['prepare_s']:.2f} | {r['read_merge_s']:.2f} | "
                             f"{r['write_s']:.2f} | {r['process_s']:.2f} | {r['peak_rss_mb']:.0f} |")
            lines.append("")
        if images.get("merge"):
            lines += [f"![merge time vs model size]({images['merge']})", ""]
        lines += ["### Raw numbers", "", "| size | N | method | tool | mode | runs (s) | median s | peak RSS MB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in merge_res["rows"]:
            runs = ", ".join(f"{t:.2f}" for t in r["times_s"])
            lines.append(f"| {r['size']} | {r['n']} | {r['method']} | {r['tool']} | {r['mode']} | {runs} | "
                         f"{r['median_s']:.2f} | {r['peak_rss_mb']:.0f} |")
        lines += ["", "### Commands", "", "```"]
        for key, cmds in merge_res["commands"].items():
            for label, cmd in cmds.items():
                lines.append(f"# {key} {label}")
                lines.append(cmd)
        lines += ["```", ""]
    if infer_res:
        lines += [
            "## Inference: N guards vs one merged model",
            "",
            f"Models: {infer_res['guards']}. Texts: {infer_res['n_texts']} from {infer_res['texts']}; batch size "
            f"{infer_res['batch_size']}, length-sorted dynamic padding, `torch.inference_mode`. *Originals* load "
            "every guard and run each on every text (N forward passes per text); *merged* loads the one merged "
            "model (TIES) and runs it once. Medians of "
            f"{infer_res['repeats']} fresh processes. Target: merged total ≤ 1.15 / N of the originals' total.",
        ]
        warm = infer_res.get("warmup")
        if warm:
            lines += [
                "",
                "*Inference* is timed in the steady state: each process first runs its first model over the same "
                "texts once, untimed (*first pass*), in every setup alike. A process's first forward passes pay "
                "one-time costs (first touches of fresh memory above all) that later passes do not; the "
                "originals' N passes share "
                "them, the merged model's one pass would carry them alone, and in a long run (the paper's "
                "40-minute inference) they vanish. `--no-warmup` times the first pass instead.",
            ]
        lines += [
            "",
            "| N | setup | load s | inference s | total s | texts/s | peak RSS MB | forward passes |"
            + (" untimed first pass s |" if warm else ""),
            "|---|---|---|---|---|---|---|---|" + ("---|" if warm else ""),
        ]
        for r in infer_res["rows"]:
            lines.append(f"| {r['n']} | {r['setup']} | {r['load_s']:.2f} | {r['infer_s']:.2f} | {r['total_s']:.2f} | "
                         f"{r['texts_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['forward_passes']} |"
                         + (f" {_f(r.get('first_pass_s'))} |" if warm else ""))
        lines += ["", "| N | merged ÷ originals: load | inference | total | target (1.15/N) | met | peak RSS |",
                  "|---|---|---|---|---|---|---|"]
        for r in infer_res["summary"]:
            lines.append(f"| {r['n']} | {r['load_ratio']:.2f} | {r['infer_ratio']:.2f} | {r['total_ratio']:.2f} | "
                         f"{r['target_ratio']:.2f} | {'yes' if r['meets_target'] else 'no'} | {r['rss_ratio']:.2f} |")
        if infer_res.get("fast"):
            lines += ["", "Opt-in fast paths of the merged model (`hm3.fastpaths`): group-label agreement with fp32 "
                      "on the same texts (target ≥ 99%), and inference speed relative to the fp32 merged model "
                      "(its inference s ÷ the path's). `int8`: per-channel dynamic quantisation of the encoder's "
                      "linear layers but the FFN down-projections (they, the pooler and the classifier stay fp32), "
                      "each layer's input smoothed first (SmoothQuant, alpha "
                      f"{infer_res.get('smooth_alpha', 0.7)}) on activation ranges from "
                      f"{infer_res.get('calibration', 'random-token windows')} (calibration: part of the load "
                      "time), activations at "
                      f"{'8 bits (this CPU has AVX512-VNNI)' if infer_res.get('full_range') else '7 bits (no VNNI here)'}. "
                      "`int8-checked`: int8, with the windows where some group's "
                      "top-two logits are within 0.5 nats re-run in fp32 (share re-run shown). `bf16`: `torch.autocast` "
                      "to bfloat16 (matrix products in bf16, softmax and layer norms fp32; fast only on CPUs with "
                      "AMX or AVX512-BF16).", "",
                      "| N | path | speed vs fp32 | agreement (all groups) | per group | windows re-run in fp32 |",
                      "|---|---|---|---|---|---|"]
            for r in infer_res["fast"]:
                per = ", ".join(f"{g} {v:.1%}" for g, v in r["agreement"].items() if g != "all")
                speed = f"{r['speedup']:.2f}×" if "speedup" in r else "–"
                rerun = f"{r['rerun_share']:.1%}" if "rerun_share" in r else "–"
                lines.append(f"| {r['n']} | {r['path']} | {speed} | {r['agreement']['all']:.2%} | {per} | {rerun} |")
        if images.get("inference"):
            lines += ["", f"![inference time]({images['inference']})"]
        lines.append("")
    return "\n".join(lines)


def bench_all(out: str | os.PathLike, workdir: str | os.PathLike, *, quick: bool = False, repeats: int = 3,
              sizes: tuple[str, ...] = ("bert-mini", "minilm", "bert-base"), counts: tuple[int, ...] = (2, 5),
              infer_counts: tuple[int, ...] = (2, 5), n_texts: int = 512, threads: int | None = None,
              command: str = "hm3 bench all", inference_repeats: int | None = None, trials: int = 5) -> dict:
    """Both benchmarks, their plots under ``<out dir>/img/``, and the markdown report at ``out``.
    ``inference_repeats`` (default ``repeats``): inference runs are short, so more repeats of them
    cost little and steady their medians on a shared machine."""
    from hm3.io import write_text_atomic

    out = Path(out)
    workdir = Path(workdir)
    from hm3.bench_trial import bench_trial, trial_markdown

    trial_texts = 1000
    if quick:
        sizes, counts, infer_counts, repeats, n_texts = ("bert-mini",), (2,), (2,), 1, 64
        trials, trial_texts = 2, 64
    merge_res = bench_merge(workdir, sizes=sizes, counts=counts, repeats=repeats, threads=threads)
    infer_res = bench_inference(workdir, counts=infer_counts, n_texts=n_texts, threads=threads,
                                repeats=repeats if inference_repeats is None else inference_repeats)
    trial_res = bench_trial(workdir, counts=infer_counts, n_texts=trial_texts, trials=trials, threads=threads)
    img = out.parent / "img"
    images = {}
    if plot_merge(merge_res, img / "bench_merge.png"):
        images["merge"] = "img/bench_merge.png"
    if plot_inference(infer_res, img / "bench_inference.png"):
        images["inference"] = "img/bench_inference.png"
    write_text_atomic(out, render_markdown(merge_res, infer_res, command=command, images=images) + "\n"
                      + trial_markdown(trial_res))
    results = {"merge": merge_res, "inference": infer_res, "trial": trial_res}
    write_text_atomic(workdir / "results.json", json.dumps(results, indent=1))
    return results


# -- CLI --------------------------------------------------------------------------------------------------
def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in _csv(text))
    except ValueError:
        raise HM3Error(f"expected comma-separated integers, got {text!r}") from None


def register(app, user_errors) -> None:
    import typer

    bench = typer.Typer(help="Merge and inference benchmarks (hm3 vs mergekit, N guards vs one merged model).",
                        no_args_is_help=True)
    app.add_typer(bench, name="bench")
    default_workdir = Path(".cache/hm3/bench")

    def _sizes(text: str) -> tuple[str, ...]:
        sizes = _csv(text)
        bad = [x for x in sizes if x not in SIZES]
        if bad:
            raise HM3Error(f"--sizes: unknown size {bad[0]!r}; valid: {', '.join(SIZES)}")
        return sizes

    @bench.command("merge")
    @user_errors
    def merge_cmd(
        sizes: str = typer.Option("minilm,bert-base", help=f"Model sizes: {', '.join(SIZES)}."),
        models: str = typer.Option("2,5", "--models", help="Numbers of models merged."),
        methods: str = typer.Option(",".join(METHODS), help="Merge methods."),
        repeats: int = typer.Option(3, min=1),
        workdir: Path = typer.Option(default_workdir, help="Benchmark models and runs (reused between runs)."),
        mergekit: bool = typer.Option(True, "--mergekit/--no-mergekit", help="Also run mergekit."),
        threads: Optional[int] = typer.Option(None, min=1, help="OMP/MKL threads of every timed process."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the raw results as JSON."),
    ) -> None:
        """The same merges by hm3 and mergekit, whole process and in-process, vs the bandwidth floor."""
        from hm3.merging.methods import REGISTRY

        bad = [m for m in _csv(methods) if m not in REGISTRY]
        if bad:
            raise HM3Error(f"--methods: unknown method {bad[0]!r}; valid: {', '.join(REGISTRY)}")
        res = bench_merge(workdir, sizes=_sizes(sizes), counts=_ints(models), methods=_csv(methods),
                          repeats=repeats, mergekit=mergekit, threads=threads)
        _echo_json(res["summary"], json_out, res)

    @bench.command("inference")
    @user_errors
    def inference_cmd(
        models: str = typer.Option("2,5", "--models", help="Numbers of guards."),
        texts: int = typer.Option(512, min=1, help="Number of texts."),
        batch_size: int = typer.Option(32, min=1),
        repeats: int = typer.Option(3, min=1),
        fast: str = typer.Option("int8,int8-checked,onnx,bf16",
                                 help="Fast paths to compare (int8, int8-checked, onnx, onnx-int8, bf16; empty: none)."),
        zoo: Optional[Path] = typer.Option(None, help="Guard zoo (default .cache/hm3/zoo; random guards if absent)."),
        threads: Optional[int] = typer.Option(None, min=1, help="OMP/MKL threads of every timed process."),
        warmup: bool = typer.Option(True, help="One untimed pass per process before inference is timed."),
        workdir: Path = typer.Option(default_workdir),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the raw results as JSON."),
    ) -> None:
        """N original guards vs their merged model: load, inference, texts/s, peak memory."""
        from hm3.fastpaths import PATHS

        bad = [p for p in _csv(fast) if p not in PATHS]
        if bad:
            raise HM3Error(f"--fast: unknown path {bad[0]!r}; valid: {', '.join(PATHS)}")
        res = bench_inference(workdir, counts=_ints(models), n_texts=texts, batch_size=batch_size, repeats=repeats,
                              zoo=zoo, fast=_csv(fast), threads=threads, warmup=warmup)
        _echo_json(res["summary"] + res["fast"], json_out, res)

    @bench.command("trial")
    @user_errors
    def trial_cmd(
        models: str = typer.Option("2,5", "--models", help="Numbers of guards merged per trial."),
        texts: int = typer.Option(1000, min=1, help="Validation texts per trial."),
        trials: int = typer.Option(5, min=1, help="Trials per precision (Beta(1.5, 4) densities)."),
        precisions: str = typer.Option("float32,bfloat16", help="Forward-pass precisions (float32 first)."),
        max_length: int = typer.Option(128, min=8, help="Tokens read per text (its first window)."),
        batch_size: int = typer.Option(64, min=1),
        threads: Optional[int] = typer.Option(None, min=1, help="torch threads (default: torch's)."),
        zoo: Optional[Path] = typer.Option(None, help="Guard zoo (default .cache/hm3/zoo; random guards if absent)."),
        workdir: Path = typer.Option(default_workdir),
        markdown: bool = typer.Option(False, "--markdown", help="Print the docs/BENCHMARKS.md section."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the raw results as JSON."),
    ) -> None:
        """What one `hm3 search` trial costs (merge + forward passes), float32 vs bfloat16."""
        from hm3.bench_trial import bench_trial, trial_markdown

        res = bench_trial(workdir, counts=_ints(models), n_texts=texts, trials=trials, precisions=_csv(precisions),
                          max_length=max_length, batch_size=batch_size, threads=threads, zoo=zoo)
        if markdown:
            typer.echo(trial_markdown(res, "hm3 bench trial " + " ".join(sys.argv[3:])))
        _echo_json([{k: v for k, v in r.items() if k != "runs_s"} for r in res["rows"]], json_out, res)

    @bench.command("all")
    @user_errors
    def all_cmd(
        out: Path = typer.Option(Path("docs/BENCHMARKS.md"), "--out", help="Markdown report (plots go to <dir>/img/)."),
        workdir: Path = typer.Option(default_workdir),
        repeats: int = typer.Option(3, min=1),
        inference_repeats: Optional[int] = typer.Option(None, min=1, help="Repeats of the inference runs (default: --repeats)."),
        sizes: str = typer.Option("bert-mini,minilm,bert-base"),
        models: str = typer.Option("2,5", "--models", help="Numbers of models merged."),
        inference_models: str = typer.Option("2,5", "--inference-models", help="Numbers of guards (inference)."),
        texts: int = typer.Option(512, min=1),
        threads: Optional[int] = typer.Option(None, min=1, help="OMP/MKL threads of every timed process."),
        quick: bool = typer.Option(False, help="A minute-scale smoke run: bert-mini, 2 models, 1 repeat, 64 texts."),
    ) -> None:
        """Both benchmarks; writes the report with machine, commands, raw numbers and plots."""
        cmd = "hm3 bench all " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else "hm3 bench all --out docs/BENCHMARKS.md"
        bench_all(out, workdir, quick=quick, repeats=repeats, sizes=_sizes(sizes), counts=_ints(models),
                  infer_counts=_ints(inference_models), n_texts=texts, threads=threads, command=cmd.strip(),
                  inference_repeats=inference_repeats)
        typer.echo(f"wrote {out}")


def _echo_json(summary, json_out, full) -> None:
    import typer

    for row in summary:
        typer.echo(json.dumps(row))
    if json_out is not None:
        from hm3.io import write_text_atomic

        write_text_atomic(json_out, json.dumps(full, indent=1))


# -- child processes ------------------------------------------------------------------------------------
def _worker(kind: str, spec: dict) -> dict:
    """The timed call of an in-process run; its caller (``run_child``) measures wall time and RSS."""
    if kind == "hm3-merge":
        import torch  # noqa: F401  imports are not part of the timed call
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401

        from hm3.merging.engine import merge

        shutil.rmtree(spec["out"], ignore_errors=True)  # as for mergekit: no old output to replace
        t0 = time.perf_counter()
        merge(spec["config"], spec["out"], force=True, progress=False)
        return {"seconds": time.perf_counter() - t0}
    if kind == "hm3-memory":
        return hm3_in_memory(spec["config"], spec.get("merges", 3))
    if kind == "hm3-phases":
        return hm3_phases(spec["config"], spec["out"])
    if kind == "mergekit-merge":
        import torch  # noqa: F401
        import yaml
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        cfg = MergeConfiguration.model_validate(yaml.safe_load(Path(spec["config"]).read_text()))
        shutil.rmtree(spec["out"], ignore_errors=True)
        t0 = time.perf_counter()
        run_merge(cfg, spec["out"], MergeOptions(copy_tokenizer=False, quiet=True, random_seed=0))
        return {"seconds": time.perf_counter() - t0}
    if kind == "infer":
        return _infer(spec)
    if kind == "io-floor":
        return measure_io_floor([Path(f) for f in spec["files"]], Path(spec["out"]), spec["nbytes"])
    if kind == "bandwidth":
        return {"seconds": 0.0, "gbs": measure_bandwidth(spec.get("mbytes", 256))}
    raise HM3Error(f"unknown benchmark worker {kind!r}")


def hm3_in_memory(config: str, merges: int = 3) -> dict:
    """The search's merge (``hm3.merging.fast``): base and task vectors read into memory once, then
    each trial merges every tensor into a preallocated model in place. After one merge (the model's
    and the workers' buffers touched for the first time), the median of ``merges`` more: what each
    of a search's hundreds of trials pays, and the memory traffic the bandwidth floor counts."""
    from hm3.merging import native
    from hm3.merging.engine import prepare
    from hm3.merging.fast import TaskVectors

    tv = TaskVectors.from_prepared(prepare(config))
    model = tv.new_model()
    tv.merge_into(model)
    times = []
    for _ in range(merges):
        t0 = time.perf_counter()
        tv.merge_into(model)
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "merges_s": times, "native": native.available()}


def hm3_phases(config: str, out: str) -> dict:
    """Where a fresh ``hm3 merge`` process spends its time, in the order it spends it: the imports
    the command makes (the CLI and the engine — not transformers; torch only when the merge needs it,
    ``engine.merge_stream``), ``prepare`` (configs, tensor tables, tokenizer check), reading + merging
    the tensors, and writing (safetensors bytes, config, tokenizer, card, the atomic rename). Same
    calls as ``hm3.merge``, with clocks between them."""
    t0 = time.perf_counter()
    import hm3.cli  # noqa: F401  (registers every command, as the console script does)

    from hm3.io import AtomicDir
    from hm3.merging import engine, numpy_engine

    t1 = time.perf_counter()
    prep = engine.prepare(config)
    prep.ensure_stats()  # as hm3.merge: statistics before config.json and the card are built
    stream, specs, which = engine.merge_stream(prep, progress=False)
    t2 = time.perf_counter()
    if which == "torch":  # imported on first use, inside the merge: counted with the imports here
        import torch  # noqa: F401
    t3 = time.perf_counter()
    merging = [0.0]

    def timed(it):
        while True:
            a = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                merging[0] += time.perf_counter() - a
                return
            merging[0] += time.perf_counter() - a
            yield item

    with AtomicDir(Path(out), force=True) as tmp:
        engine.write_model(tmp, timed(stream), engine.merged_config_dict(prep), engine.tokenizer_source(prep),
                           engine.model_card(prep), specs=specs)
    t4 = time.perf_counter()
    workers = engine.merge_workers(None, prep.method) if which == "torch" else numpy_engine.merge_workers(None)
    return {"seconds": t4 - t0, "engine": which, "import_s": (t1 - t0) + (t3 - t2), "prepare_s": t2 - t1,
            "read_merge_s": merging[0], "write_s": t4 - t3 - merging[0], "workers": workers}


def _infer(spec: dict) -> dict:
    """Load every model, then classify the texts with each: what serving N guards (or one merged
    model) costs. Writes the predicted label per group when asked (agreement of fast paths)."""
    import torch  # noqa: F401
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401  (not timed)

    from hm3.model import load

    texts = json.loads(Path(spec["texts"]).read_text())
    fast = spec.get("fast")
    # Import the architecture's modelling code before timing: a one-time cost of the process that
    # would otherwise land in the first model's load time and blur the load comparison.
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(AutoConfig.from_pretrained(spec["models"][0]))]
    t0 = time.perf_counter()
    clfs = [load(m) for m in spec["models"]]
    if fast:
        from hm3.fastpaths import accelerate

        calibration = json.loads(Path(spec["calibration"]).read_text()) if spec.get("calibration") else None
        clfs = [accelerate(c, fast, cache_dir=Path(spec["models"][0]) / ".hm3-fast", calibration=calibration)
                for c in clfs]
    t1 = time.perf_counter()
    load_s, first_pass = t1 - t0, None
    if spec.get("warmup"):
        # The first forward passes of a process pay one-time costs that later passes over the same
        # shapes do not, first touches of fresh memory above all (512 texts on the session-13 VM:
        # ~0.1 s, ~0.6 s with torch's huge-page allocation on); in a long run they vanish. One
        # untimed pass of the first model over the texts, in every setup alike.
        clfs[0].predict_proba(texts, batch_size=spec.get("batch_size", 32))
        first_pass = time.perf_counter() - t1
        t1 = time.perf_counter()
    labels: dict[str, list[str]] = {}
    for clf in clfs:
        probs = clf.predict_proba(texts, batch_size=spec.get("batch_size", 32))
        for g, p in probs.items():
            names = clf.space[g].labels
            labels[g] = [names[i] for i in p.argmax(axis=1)]
    t2 = time.perf_counter()
    if spec.get("labels"):
        Path(spec["labels"]).write_text(json.dumps(labels))
    result = {"seconds": t2 - t0, "load_s": load_s, "infer_s": t2 - t1,
              "first_pass_s": first_pass}
    checked = [c.model for c in clfs if hasattr(c.model, "rerun")]  # int8-checked: windows re-run in fp32
    if checked:
        result["rerun_share"] = sum(m.rerun for m in checked) / max(1, sum(m.seen for m in checked))
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m hm3.bench <worker> <json spec>``: one timed run in a fresh process."""
    argv = sys.argv[1:] if argv is None else argv
    kind, spec = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    logging.basicConfig(level=logging.WARNING)
    for name in ("transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    result = _worker(kind, spec)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":  # pragma: no cover
    main()
