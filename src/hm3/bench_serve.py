"""Serving benchmark: one merged model vs N separate guards, each behind `hm3 serve` on loopback.

Both setups answer the same question — every guard's label for each text — on the same texts with
the same client load:

* **separate**: N servers, one per guard; a client request is sent to all N at once and is done
  when the last one answers (what a gateway in front of N guard services does);
* **merged**: one server with the merged model; one request, one forward pass for all groups.

The CPU is shared fairly: by default the merged server gets one torch thread per core and each of
the N guard servers ``cores // N`` (at least one), so neither setup oversubscribes the cores.
The phases run one after the other, never at the same time. Servers are real subprocesses
(``python -m hm3.cli serve``) with the default micro-batching settings; the client is a lean asyncio
HTTP/1.1 load generator in this process (one keep-alive connection per client and server).

    python -m hm3.bench_serve --model zoo/jailbreak --model zoo/spam --merged merged/
    python -m hm3.bench_serve --tiny            # tiny in-process models, a smoke run
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from hm3.errors import HM3Error

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mb(pid: int) -> Optional[float]:
    """Peak resident memory of a process (Linux /proc; None elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU time of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class _Server:
    """`hm3 serve MODEL` in a subprocess on a free loopback port."""

    def __init__(self, model: Path, threads: int, extra_args: Sequence[str] = (), startup_timeout: float = 300):
        self.model = Path(model)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "HM3_API_KEY"}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        cmd = [sys.executable, "-m", "hm3.cli", "serve", str(self.model), "--host", "127.0.0.1",
               "--port", str(self.port), "--threads", str(threads), "--log-level", "warning", *extra_args]
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.startup_timeout = startup_timeout

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HM3Error(f"`hm3 serve {self.model}` exited with code {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise HM3Error(f"`hm3 serve {self.model}` not ready after {self.startup_timeout:.0f}s:\n{self.output()}")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self) -> Optional[float]:
        """Stop the server (SIGTERM, then SIGKILL); returns its peak RSS in MB."""
        rss = _peak_rss_mb(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return rss


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


class _Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams.

    The load generator shares the machine with the servers it measures; httpx costs several ms of
    CPU per request, which would make the client, not the servers, the bottleneck (and count twice
    against N separate servers, which get N requests per question)."""

    def __init__(self, url: str):
        hostport = url.split("://", 1)[1]
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        reused = self.writer is not None
        try:
            return await asyncio.wait_for(self._post(path, body), timeout)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            await self.close()
            # The server may close an idle keep-alive connection just as we reuse it (uvicorn's
            # keep-alive timeout): retry once on a fresh connection, as HTTP clients do.
            if not reused or (isinstance(e, asyncio.IncompleteReadError) and e.partial):
                raise
        except BaseException:
            await self.close()  # a half-read response would poison the next request
            raise
        try:
            return await asyncio.wait_for(self._post(path, body), timeout)
        except BaseException:
            await self.close()
            raise

    async def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await self.writer.drain()
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in head[1:] if ":" in h)}
        if "content-length" in headers:
            data = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            await self.reader.readuntil(b"\r\n")
            data = b"".join(parts)
        else:
            data = await self.reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def _load(urls: list[str], batches: list[list[str]], concurrency: int, timeout: float) -> dict:
    """Send every batch (to every url at once) from ``concurrency`` clients; latency per batch."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    queue = list(reversed(batches))

    async def one(conn: _Connection, texts: list[str]) -> None:
        status, data = await conn.post("/v1/classify", json.dumps({"texts": texts}).encode(), timeout)
        if status != 200:
            raise HM3Error(f"HTTP {status}: {data[:200].decode(errors='replace')}")
        if len(json.loads(data)) != len(texts):
            raise HM3Error(f"{conn.host}:{conn.port} answered the wrong number of rows")

    async def worker() -> None:
        conns = [_Connection(u) for u in urls]  # one keep-alive connection per client and server
        try:
            while queue:
                texts = queue.pop()
                t0 = time.perf_counter()
                # return_exceptions: wait for every server's answer even when one fails, so no
                # orphaned read is left on a connection that the next request reuses.
                results = await asyncio.gather(*(one(c, texts) for c in conns), return_exceptions=True)
                failed = [r for r in results if isinstance(r, BaseException)]
                if failed:  # counted and reported; the benchmark goes on
                    key = f"{type(failed[0]).__name__}: {str(failed[0])[:80]}"
                    errors[key] = errors.get(key, 0) + 1
                    continue
                latencies.append(time.perf_counter() - t0)
        finally:
            for c in conns:
                await c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "errors": errors, "wall": time.perf_counter() - t0}


def _phase(name: str, models: list[Path], threads: int, batches: list[list[str]], warmup: list[list[str]],
           concurrency: int, timeout: float, startup_timeout: float) -> dict:
    servers = [_Server(m, threads, startup_timeout=startup_timeout) for m in models]
    rss: list[Optional[float]] = []
    try:
        for s in servers:
            s.wait_ready()
        urls = [s.url for s in servers]
        log.info("%s: %d server(s) ready, %d threads each; warming up", name, len(servers), threads)
        asyncio.run(_load(urls, warmup, concurrency, timeout))
        log.info("%s: %d requests from %d concurrent clients", name, len(batches), concurrency)
        cpu0 = [_cpu_seconds(s.proc.pid) for s in servers]
        res = asyncio.run(_load(urls, batches, concurrency, timeout))
        cpu1 = [_cpu_seconds(s.proc.pid) for s in servers]
    finally:
        for s in servers:
            rss.append(s.stop())
    lat_ms = [x * 1000 for x in res["latencies"]]
    n_ok = len(lat_ms)
    n_texts = sum(len(b) for b in batches) * n_ok / max(1, len(batches))
    known = [r for r in rss if r is not None]
    # CPU the servers spent per answered request: unlike wall-clock numbers, it does not depend on
    # what else the machine is running.
    cpu = None
    if n_ok and all(c is not None for c in cpu0 + cpu1):
        cpu = sum(b - a for a, b in zip(cpu0, cpu1)) / n_ok * 1000
    return {
        "servers": len(servers),
        "threads_per_server": threads,
        "requests": len(batches),
        "ok": n_ok,
        "errors": sum(res["errors"].values()),
        "error_kinds": res["errors"],
        "seconds": res["wall"],
        "requests_per_s": n_ok / res["wall"],
        "texts_per_s": n_texts / res["wall"],
        "p50_ms": _percentile(lat_ms, 50),
        "p90_ms": _percentile(lat_ms, 90),
        "p99_ms": _percentile(lat_ms, 99),
        "peak_rss_mb": sum(known) if len(known) == len(rss) else None,
        "server_cpu_ms_per_request": cpu,
    }


def default_texts(models: Sequence[Path], limit: int = 512, seed: int = 0) -> list[str]:
    """Texts from the guards' ``test.jsonl`` (the zoo layout), mixed and shuffled."""
    texts: list[str] = []
    for m in models:
        f = Path(m) / "test.jsonl"
        if f.is_file():
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    texts.append(json.loads(line)["text"])
    if not texts:
        raise HM3Error(f"no test.jsonl next to the guards ({', '.join(map(str, models))}); pass texts explicitly")
    random.Random(seed).shuffle(texts)
    return texts[:limit]


def bench_serve(
    models: list[Path],
    merged: Path,
    *,
    texts: Optional[Sequence[str]] = None,
    requests: int = 400,
    concurrency: int = 16,
    texts_per_request: int = 1,
    threads: Optional[int] = None,
    warmup: int = 20,
    timeout: float = 120.0,
    startup_timeout: float = 300.0,
    seed: int = 0,
) -> dict:
    """Throughput and latency of N separate guard servers vs one merged server (see the module doc).

    ``threads``: torch threads per server for both setups; default: all cores for the merged server
    and ``cores // N`` for each guard server. Returns a dict with ``config``, ``separate`` and ``merged``
    (each: requests_per_s, texts_per_s, p50_ms, p90_ms, p99_ms, errors, peak_rss_mb, ...).
    """
    models = [Path(m) for m in models]
    merged = Path(merged)
    if not models:
        raise HM3Error("bench_serve needs at least one separate guard model")
    for m in [*models, merged]:
        if not (m / "config.json").is_file():
            raise HM3Error(f"{m}: no config.json; expected a model directory")
    if requests < 1 or concurrency < 1 or texts_per_request < 1:
        raise HM3Error("requests, concurrency and texts_per_request must be at least 1")
    pool = list(texts) if texts is not None else default_texts(models)
    if not pool:
        raise HM3Error("bench_serve got no texts")
    rng = random.Random(seed)
    batches = [[rng.choice(pool) for _ in range(texts_per_request)] for _ in range(requests)]
    warm = [[rng.choice(pool) for _ in range(texts_per_request)] for _ in range(warmup)]
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t_sep = threads or max(1, cores // len(models))
    t_merged = threads or cores
    separate = _phase("separate", models, t_sep, batches, warm, concurrency, timeout, startup_timeout)
    merged_res = _phase("merged", [merged], t_merged, batches, warm, concurrency, timeout, startup_timeout)
    return {
        "config": {
            "models": [str(m) for m in models],
            "merged": str(merged),
            "requests": requests,
            "concurrency": concurrency,
            "texts_per_request": texts_per_request,
            "text_pool": len(pool),
            "mean_text_chars": round(sum(len(t) for t in pool) / len(pool), 1),
            "cores": cores,
            # Other work on the machine shifts the wall-clock numbers (not the CPU per request).
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "separate": separate,
        "merged": merged_res,
    }


def render_markdown(result: dict) -> str:
    """A Markdown table of a ``bench_serve`` result."""
    c = result["config"]
    head = (f"{len(c['models'])} guards vs 1 merged model; {c['requests']} requests of {c['texts_per_request']} "
            f"text(s) from {c['concurrency']} concurrent clients on {c['cores']} cores "
            f"(pool of {c['text_pool']} texts, mean {c['mean_text_chars']} chars)")
    if c.get("load_average_before") is not None:
        head += f"; machine load average {c['load_average_before']:.1f} before, {c['load_average_after']:.1f} after"
    head += ".\n\n"

    def fmt(v, nd=1):
        return "n/a" if v is None else f"{v:.{nd}f}"

    rows = ["| setup | servers | torch threads/server | texts/s | requests/s | p50 ms | p90 ms | p99 ms | errors "
            "| server CPU ms/request | peak RSS MB (all servers) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, label in (("separate", f"{len(c['models'])} separate guards"), ("merged", "merged model")):
        r = result[name]
        rows.append(f"| {label} | {r['servers']} | {r['threads_per_server']} | {fmt(r['texts_per_s'])} | "
                    f"{fmt(r['requests_per_s'])} | {fmt(r['p50_ms'])} | {fmt(r['p90_ms'])} | {fmt(r['p99_ms'])} | "
                    f"{r['errors']} | {fmt(r['server_cpu_ms_per_request'], 2)} | {fmt(r['peak_rss_mb'], 0)} |")
    s, m = result["separate"], result["merged"]
    tail = ""
    if s["texts_per_s"] and m["texts_per_s"]:
        tail = (f"\nMerged vs separate: {m['texts_per_s'] / s['texts_per_s']:.2f}x throughput, "
                f"p50 {fmt(m['p50_ms'])} vs {fmt(s['p50_ms'])} ms, p99 {fmt(m['p99_ms'])} vs {fmt(s['p99_ms'])} ms")
        if s["server_cpu_ms_per_request"] and m["server_cpu_ms_per_request"]:
            tail += (f", {s['server_cpu_ms_per_request'] / m['server_cpu_ms_per_request']:.2f}x less server CPU "
                     "per request")
        tail += ".\n"
    errs = {**s["error_kinds"], **m["error_kinds"]}
    if errs:
        tail += "\nErrors: " + "; ".join(f"{k} ×{v}" for k, v in errs.items()) + "\n"
    return head + "\n".join(rows) + "\n" + tail


def tiny_setup(workdir: Path) -> tuple[list[Path], Path, list[str]]:
    """Two tiny guards, their task-arithmetic merge and texts (hm3.testing; seconds on a CPU)."""
    import hm3
    from hm3.testing import TASK_A, TASK_B, tiny_base, tiny_finetune

    workdir = Path(workdir)
    base = tiny_base(workdir / "base")
    a = tiny_finetune(base, workdir / "a", TASK_A, steps=30)
    b = tiny_finetune(base, workdir / "b", TASK_B, steps=30, seed=1)
    merged = workdir / "merged"
    hm3.merge({"merge_method": "task_arithmetic", "base_model": str(base),
               "models": [{"model": str(a), "group": "a"}, {"model": str(b), "group": "b"}],
               "parameters": {"lambda": 1.0}, "seed": 0}, merged, force=True, progress=False)
    texts = [t for t, _ in TASK_A.sample(100, seed=7)] + [t for t, _ in TASK_B.sample(100, seed=8)]
    return [a, b], merged, texts


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    import typer

    def cli(
        model: list[Path] = typer.Option([], "--model", help="A separate guard (repeat for each)."),
        merged: Optional[Path] = typer.Option(None, "--merged", help="The merged model of those guards."),
        tiny: bool = typer.Option(False, "--tiny", help="Build two tiny guards and their merge (smoke run)."),
        requests: int = typer.Option(400, help="Client requests per setup."),
        concurrency: int = typer.Option(16, help="Concurrent clients."),
        texts_per_request: int = typer.Option(1, help="Texts per request."),
        threads: Optional[int] = typer.Option(None, help="Torch threads per server (default: shared fairly)."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the result as JSON."),
    ) -> None:
        """Benchmark `hm3 serve`: N separate guard servers vs one merged server; prints Markdown."""
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would load the client
        # SIGTERM like Ctrl-C, so the `finally` blocks stop the servers this process started.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            with tempfile.TemporaryDirectory(prefix="hm3-bench-serve-") as tmp:
                texts = None
                if tiny:
                    models, merged_dir, texts = tiny_setup(Path(tmp))
                else:
                    if not model or merged is None:
                        raise HM3Error("give --model for each guard and --merged, or --tiny")
                    models, merged_dir = list(model), merged
                result = bench_serve(models, merged_dir, texts=texts, requests=requests, concurrency=concurrency,
                                     texts_per_request=texts_per_request, threads=threads)
        except HM3Error as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        if output is not None:
            from hm3.io import write_text_atomic

            write_text_atomic(output, json.dumps(result, indent=2) + "\n")
        typer.echo(render_markdown(result))

    typer.run(cli)


if __name__ == "__main__":  # pragma: no cover
    main()
