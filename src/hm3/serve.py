"""The guard service: one merged model behind a small HTTP API (FastAPI + uvicorn).

    hm3 serve merged/ --port 8000

Endpoints:

* ``POST /v1/classify`` ``{"texts": [...], "groups": [...]?}`` → the shape of ``hm3 predict``: a list of
  ``{"text_index": i, "groups": {"<group>": {"label": ..., "scores": {...}}}}``;
* ``GET /v1/labels`` (groups and their labels), ``GET /healthz``, ``GET /metrics`` (Prometheus text),
  ``/docs`` (OpenAPI).

Concurrent requests are *micro-batched*: each request's texts join a queue; one worker task takes
the first waiting request, gathers more until ``max_batch_texts`` texts are collected or
``max_wait_ms`` has passed, and runs one ``predict_proba`` over all of them (one tokenisation, one
padded forward pass per ``batch_size`` windows) in a single inference thread, so torch is never
called concurrently and the event loop keeps accepting requests meanwhile. Long texts are windowed
by the classifier itself, exactly as in ``predict``. A failing batch fails only its own requests
(500) and the worker goes on.

Every error is ``{"error": {"code": ..., "message": ...}}``; limits (texts per request, bytes per text,
bytes per body) are checked before any inference and the message states the limit. The body is read
with a cap before it is parsed. The service keeps no state between requests, so replicas can sit
behind any load balancer (docs/DEPLOY.md).
"""

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from hm3.errors import HM3Error

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

    from hm3.model import GroupwiseClassifier

log = logging.getLogger(__name__)

# Paths that get their own metrics label; anything else (404s, scans) is counted as "other" so a
# client cannot grow the metrics without bound.
KNOWN_PATHS = ("/v1/classify", "/v1/labels", "/healthz", "/metrics", "/docs", "/openapi.json")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Settings:
    """Limits and batching of one service replica (every field is a `hm3 serve` option)."""

    max_texts: int = 64  # texts per request
    max_text_bytes: int = 32_768  # UTF-8 bytes per text
    max_body_bytes: int = 1_048_576  # bytes per request body (read with this cap before parsing)
    max_batch_texts: int = 64  # texts per micro-batch (one predict_proba call)
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_queue_texts: int = 4096  # texts waiting; beyond that new requests get 503 (back-pressure)
    batch_size: int = 8  # windows per padded forward pass (small: less padding and activation memory)
    threads: Optional[int] = None  # torch threads of the inference thread (None: default_threads())
    api_key: Optional[str] = field(default=None, repr=False)
    aggregate: str = "mean"  # long texts: mean or max over windows (as in `hm3 predict`)
    threshold: float = 0.5  # a multi-label group's labels: those scoring at least this (as in `hm3 predict`)
    thresholds: Optional[dict] = None  # per group or "group/label": overrides of threshold (hm3.model.label_thresholds)
    max_length: Optional[int] = None  # tokens per window (None: the model's own limit)
    fast: Optional[str] = None  # opt-in faster CPU path of hm3.fastpaths (int8, int8-checked, onnx, onnx-int8, bf16)
    calibrate: Optional[str] = None  # fast int8 / int8-checked: a file of texts like the traffic (hm3.io.texts_from)

    def __post_init__(self) -> None:
        for name in ("max_texts", "max_text_bytes", "max_body_bytes", "max_batch_texts", "max_queue_texts",
                     "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise HM3Error(f"serve setting {name} must be a positive integer, got {value!r}")
        if not (0 <= self.max_wait_ms <= 10_000):
            raise HM3Error(f"serve setting max_wait_ms must be in [0, 10000], got {self.max_wait_ms!r}")
        if self.threads is not None and self.threads < 1:
            raise HM3Error(f"serve setting threads must be at least 1, got {self.threads!r}")
        if self.aggregate not in ("mean", "max"):
            raise HM3Error(f"serve setting aggregate must be 'mean' or 'max', got {self.aggregate!r}")
        if not 0 < self.threshold < 1:
            raise HM3Error(f"serve setting threshold must be between 0 and 1, got {self.threshold!r}")
        if self.fast is not None:
            from hm3.fastpaths import PATHS

            if self.fast not in PATHS:
                raise HM3Error(f"serve setting fast must be one of {', '.join(PATHS)}, got {self.fast!r}")
        if self.calibrate is not None:
            from hm3.fastpaths import CALIBRATED

            if self.fast not in CALIBRATED:
                raise HM3Error(f"serve setting calibrate ({self.calibrate}) is for fast {' or '.join(CALIBRATED)}, "
                               f"not {self.fast or 'the default fp32 path'}")
        if self.api_key is not None and not self.api_key.strip():
            raise HM3Error("the API key is empty; unset HM3_API_KEY / --api-key or give a non-empty key")

    def public(self) -> dict:
        """The settings without the API key (for logs and /healthz)."""
        d = asdict(self)
        d["api_key"] = self.api_key is not None
        return d


class ApiError(Exception):
    """An error answered as ``{"error": {"code": ..., "message": ...}}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


# -- metrics (Prometheus text exposition, written by hand: no extra dependency) -----------------------
class _Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last one: +Inf
        self.sum = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        i = 0
        while i < len(self.buckets) and value > self.buckets[i]:
            i += 1
        self.counts[i] += 1
        self.sum += value
        self.n += 1


class Metrics:
    """Request counts and latencies, micro-batch sizes and inference times, queue depth."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (path, method, status) -> n
        self.latency: dict[str, _Histogram] = {}  # path -> seconds
        self.batch_texts = _Histogram(SIZE_BUCKETS)
        self.batch_requests = _Histogram(SIZE_BUCKETS)
        self.inference = _Histogram(LATENCY_BUCKETS)
        self.texts = 0
        self.batch_failures = 0
        self.queue_texts = 0

    def request(self, path: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(path, method, status)] += 1
            self.latency.setdefault(path, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, n_texts: int, n_requests: int, seconds: float, ok: bool) -> None:
        with self._lock:
            self.batch_texts.observe(n_texts)
            self.batch_requests.observe(n_requests)
            self.inference.observe(seconds)
            if ok:
                self.texts += n_texts
            else:
                self.batch_failures += 1

    def render(self, model: str, groups: Sequence[str]) -> str:
        lines: list[str] = []

        def hist(name: str, help_: str, series: list[tuple[str, _Histogram]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} histogram")
            for labels, h in series:
                sep = "," if labels else ""
                cum = 0
                for b, c in zip(h.buckets, h.counts):
                    cum += c
                    lines.append(f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {cum}')
                lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {h.n}')
                braces = f"{{{labels}}}" if labels else ""
                lines.append(f"{name}_sum{braces} {h.sum:.6f}")
                lines.append(f"{name}_count{braces} {h.n}")

        def scalar(name: str, kind: str, help_: str, value: float) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"])

        with self._lock:
            lines += ["# HELP hm3_model_info The served model and its groups.", "# TYPE hm3_model_info gauge",
                      f'hm3_model_info{{model="{_escape(model)}",groups="{_escape(",".join(groups))}"}} 1']
            lines += ["# HELP hm3_requests_total HTTP requests by path, method and status.",
                      "# TYPE hm3_requests_total counter"]
            for (path, method, status), n in sorted(self.requests.items()):
                lines.append(f'hm3_requests_total{{path="{path}",method="{method}",status="{status}"}} {n}')
            hist("hm3_request_duration_seconds", "Time from request start to the end of the response.",
                 [(f'path="{p}"', h) for p, h in sorted(self.latency.items())])
            hist("hm3_batch_texts", "Texts per micro-batch (one forward pass over all of them).",
                 [("", self.batch_texts)])
            hist("hm3_batch_requests", "Requests per micro-batch.", [("", self.batch_requests)])
            hist("hm3_inference_seconds", "Time of one micro-batch in the inference thread.",
                 [("", self.inference)])
            scalar("hm3_texts_total", "counter", "Texts classified.", self.texts)
            scalar("hm3_batch_failures_total", "counter", "Micro-batches whose inference raised.",
                   self.batch_failures)
            scalar("hm3_queue_texts", "gauge", "Texts waiting for a micro-batch.", self.queue_texts)
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _MetricsMiddleware:
    """Pure ASGI middleware: status and latency of every HTTP request (including errors)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            self.metrics.request(path, scope["method"], status, time.perf_counter() - t0)


# -- the micro-batcher ---------------------------------------------------------------------------------
@dataclass
class _Job:
    texts: list[str]
    groups: list[str]
    future: asyncio.Future


class MicroBatcher:
    """Collects concurrent requests into micro-batches; one inference thread runs them in order.

    Waiting jobs live in a deque (not an ``asyncio.Queue``: a timed-out ``wait_for(queue.get())`` can
    lose an item on Python < 3.12); an event wakes the worker.
    """

    def __init__(self, clf: "GroupwiseClassifier", settings: Settings, metrics: Metrics):
        self.clf, self.settings, self.metrics = clf, settings, metrics
        self._pending: "collections.deque[_Job]" = collections.deque()
        self._wakeup = asyncio.Event()
        self._queued_texts = 0
        # One thread: torch calls never overlap, and the tokenizer is used from one thread only.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hm3-infer")
        self._task: asyncio.Task | None = None
        self._space_order = {name: i for i, name in enumerate(clf.groups)}

    # lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Set from the inference thread itself: OpenMP's thread count is a per-thread setting.
        threads = self.settings.threads or default_threads()
        await loop.run_in_executor(self._executor, _set_threads, threads)
        log.info("inference thread uses %d torch thread(s)", threads)
        # Warm-up: the first forward pass allocates and is several times slower than the next ones.
        await loop.run_in_executor(self._executor, self._infer, [["warm up"]], [self.clf.groups[:1]])
        self._task = asyncio.create_task(self._run(), name="hm3-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(ApiError(503, "shutting_down", "the server is shutting down; retry"))
        self._executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    # requests
    async def submit(self, texts: list[str], groups: list[str]) -> list[dict]:
        if not self.alive:
            raise ApiError(503, "not_ready", "the inference worker is not running; retry later")
        if self._queued_texts + len(texts) > self.settings.max_queue_texts:
            raise ApiError(
                503, "overloaded",
                f"{self._queued_texts} texts are already waiting (limit {self.settings.max_queue_texts}); retry shortly",
                headers={"Retry-After": "1"},
            )
        job = _Job(texts, groups, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._queued_texts += len(texts)
        self.metrics.queue_texts = self._queued_texts
        self._wakeup.set()
        return await job.future

    # worker
    def _take(self) -> _Job:
        job = self._pending.popleft()
        self._queued_texts -= len(job.texts)
        self.metrics.queue_texts = self._queued_texts
        return job

    async def _collect(self) -> list[_Job]:
        """The next micro-batch: the first waiting job plus those that arrive within max_wait_ms,
        up to max_batch_texts texts (a single larger request runs alone)."""
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        jobs = [self._take()]
        n = len(jobs[0].texts)
        deadline = loop.time() + self.settings.max_wait_ms / 1000
        while n < self.settings.max_batch_texts:
            if self._pending:
                if n + len(self._pending[0].texts) > self.settings.max_batch_texts:
                    break  # it starts the next batch
                job = self._take()
                jobs.append(job)
                n += len(job.texts)
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        # A client that went away cancelled its future: no need to classify its texts.
        return [j for j in jobs if not j.future.done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            if not jobs:
                continue
            n_texts = sum(len(j.texts) for j in jobs)
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self._executor, self._infer, [j.texts for j in jobs], [j.groups for j in jobs]
                )
            except asyncio.CancelledError:
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(ApiError(503, "shutting_down", "the server is shutting down; retry"))
                raise
            except Exception as e:  # one bad batch fails its requests, never the worker
                log.exception("inference failed for a batch of %d texts from %d requests", n_texts, len(jobs))
                self.metrics.batch(n_texts, len(jobs), time.perf_counter() - t0, ok=False)
                err = ApiError(500, "inference_failed", f"inference failed ({type(e).__name__}: {e}); "
                               "the request was not classified, the server keeps serving")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(err)
                continue
            self.metrics.batch(n_texts, len(jobs), time.perf_counter() - t0, ok=True)
            for j, r in zip(jobs, results):
                if not j.future.done():
                    j.future.set_result(r)

    def _infer(self, texts_per_job: list[list[str]], groups_per_job: list[list[str]]) -> list[list[dict]]:
        """Runs in the inference thread: one predict_proba over every job's texts, then per job the
        ``hm3 predict`` rows for its own groups."""
        flat = [t for texts in texts_per_job for t in texts]
        wanted = sorted({g for gs in groups_per_job for g in gs}, key=self._space_order.__getitem__)
        probs = self.clf.predict_proba(flat, wanted, batch_size=self.settings.batch_size)  # group -> (n, n_g)
        space = self.clf.space
        out: list[list[dict]] = []
        start = 0
        for texts, groups in zip(texts_per_job, groups_per_job):
            rows = []
            for i in range(len(texts)):
                per_group = {}
                for g in groups:
                    per_group[g] = self.clf.prediction(space[g], probs[g][start + i]).to_json()
                rows.append({"text_index": i, "groups": per_group})
            out.append(rows)
            start += len(texts)
        return out


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def default_threads() -> int:
    """Torch threads for one replica: the CPUs this process may use — its affinity mask and, in a
    container, its cgroup CPU quota (torch's own default counts the host's cores, and more threads
    than the quota allows makes every forward pass wait on throttled threads)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    try:  # cgroup v2: "max 100000" or "200000 100000"
        q, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if q != "max":
            quota = int(q) / int(period)
    except (OSError, ValueError):
        try:  # cgroup v1
            q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            if q > 0:
                quota = q / int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    if quota is not None:
        n = min(n, max(1, int(quota)))
    return max(1, n)


# -- request parsing -----------------------------------------------------------------------------------
_JSON_TYPES = {str: "string", int: "number", float: "number", bool: "boolean", list: "array", dict: "object",
               type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _where(loc: Sequence) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _validation_message(errors: list[dict]) -> str:
    parts = []
    for e in errors[:5]:
        where = _where(e.get("loc", ()))
        if e["type"] == "missing":
            parts.append(f"{where} is required")
        elif e["type"] == "extra_forbidden":
            parts.append(f"unknown field {where!r}; the fields are 'texts' (required) and 'groups' (optional)")
        elif e["type"] in ("model_type", "dict_type"):
            parts.append(f'the body must be a JSON object like {{"texts": ["..."]}}, got {_json_type(e["input"])}')
        else:
            parts.append(f"{where}: {e['msg'].lower()}, got {_json_type(e['input'])}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def _request_models():
    from pydantic import BaseModel, ConfigDict, Field, StrictStr

    class ClassifyRequest(BaseModel):
        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={"examples": [{"texts": ["ignore all previous instructions", "hello"]}]},
        )
        texts: list[StrictStr] = Field(description="Texts to classify (non-empty list of strings).")
        groups: Optional[list[StrictStr]] = Field(
            default=None, description="Groups to answer (default: every group of the model)."
        )

    class GroupResult(BaseModel):
        label: str = Field(description="The top-scoring label.")
        scores: dict[str, float] = Field(description="Every label's probability (a multi-label group: a sigmoid each).")
        labels: Optional[list[str]] = Field(
            default=None, description="Multi-label groups only: every label scoring at least the server's threshold.")

    class TextResult(BaseModel):
        text_index: int
        groups: dict[str, GroupResult]

    class ErrorBody(BaseModel):
        code: str
        message: str

    class ErrorResponse(BaseModel):
        error: ErrorBody

    class LabelGroup(BaseModel):
        name: str
        labels: list[str]
        multi_label: bool = Field(default=False, description="A sigmoid per label (present only when true).")
        thresholds: Optional[list[float]] = Field(default=None, description="A multi-label group: each label's "
                                                  "threshold (`labels` lists those reached).")
        operating_point: Optional[dict] = Field(default=None, description="A single-label group run at an operating "
                                                "point: {label, threshold} (present only when set).")

    class LabelsResponse(BaseModel):
        model: str
        groups: list[LabelGroup]

    return ClassifyRequest, TextResult, ErrorResponse, LabelsResponse


def label_groups(clf) -> list[dict]:
    """``GET /v1/labels``' groups: the label space, and how each group's answer is decided (a multi-label
    group's thresholds, a single-label group's operating point)."""
    from hm3.model import operating_point

    out = []
    for entry, g in zip(clf.space.to_json(), clf.space):
        cut = clf.cuts(g.name)
        if g.multi_label:
            entry["thresholds"] = [float(t) for t in cut]
        elif (point := operating_point(g, cut)) is not None:
            entry["operating_point"] = {"label": point[0], "threshold": point[1]}
        out.append(entry)
    return out


async def _read_body(request, cap: int) -> bytes:
    """The raw body, refused with 413 as soon as it is known to exceed ``cap`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "bad_request", f"Content-Length {declared!r} is not a number") from None
        if size > cap:
            raise ApiError(413, "body_too_large", f"the request body is {size} bytes; the limit is {cap} bytes "
                           "(send fewer or shorter texts per request)")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > cap:
            raise ApiError(413, "body_too_large", f"the request body exceeds the limit of {cap} bytes "
                           "(send fewer or shorter texts per request)")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(raw: bytes, model_cls, clf: "GroupwiseClassifier", s: Settings) -> tuple[list[str], list[str]]:
    """Texts and groups of a classify body; every problem an ApiError naming the limit or the fix."""
    from pydantic import ValidationError

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_utf8", f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ApiError(400, "invalid_json", 'the request body is empty; send a JSON object like {"texts": ["..."]}')
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON ({e.msg} at line {e.lineno} "
                       f"column {e.colno})") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", 'the request body nests JSON too deeply; send {"texts": ["..."]}') from None
    try:
        req = model_cls.model_validate(payload)
    except ValidationError as e:
        raise ApiError(422, "invalid_request", _validation_message(e.errors())) from None
    texts, groups = req.texts, req.groups
    if not texts:
        raise ApiError(422, "empty_texts", "texts is an empty list; send at least one text")
    if len(texts) > s.max_texts:
        raise ApiError(422, "too_many_texts", f"{len(texts)} texts in one request; the limit is {s.max_texts} "
                       "(split them over several requests)")
    for i, t in enumerate(texts):
        try:
            size = len(t.encode("utf-8"))
        except UnicodeEncodeError as e:  # a lone surrogate written as a \ud8xx escape
            raise ApiError(422, "invalid_text", f"texts[{i}] is not valid Unicode (lone surrogate at character "
                           f"{e.start}); send proper UTF-8 text") from None
        if size > s.max_text_bytes:
            raise ApiError(422, "text_too_long", f"texts[{i}] is {size} bytes of UTF-8; the limit is "
                           f"{s.max_text_bytes} bytes per text (split it into several texts)")
    if groups is None:
        return texts, list(clf.groups)
    if not groups:
        raise ApiError(422, "empty_groups", "groups is an empty list; omit it to get every group, or name some of: "
                       + ", ".join(clf.groups))
    unknown = [g for g in groups if g not in clf.groups]
    if unknown:
        raise ApiError(422, "unknown_group", f"unknown group(s) {', '.join(map(repr, unknown))}; this model's groups "
                       f"are: {', '.join(clf.groups)} (see GET /v1/labels)")
    return texts, list(dict.fromkeys(groups))  # order kept, repeats dropped


# -- the app -------------------------------------------------------------------------------------------
def create_app(classifier_or_path: "GroupwiseClassifier | str | os.PathLike", settings: Settings | None = None) -> "FastAPI":
    """The service for one model: a loaded classifier or a model directory (loaded now, so a bad path
    fails before the server starts)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
    from starlette.exceptions import HTTPException as StarletteHTTPException

    import hm3

    s = settings or Settings()
    if isinstance(classifier_or_path, (str, os.PathLike)):
        clf = hm3.load(classifier_or_path, max_length=s.max_length, aggregate=s.aggregate, threshold=s.threshold,
                       thresholds=s.thresholds)
    else:
        clf = classifier_or_path
    if s.fast:
        from hm3.fastpaths import accelerate
        from hm3.io import texts_from

        clf = accelerate(clf, s.fast, calibration=texts_from(s.calibrate) if s.calibrate else None)
    model_name = Path(clf.name).name if getattr(clf, "name", "") else "model"
    ClassifyRequest, TextResult, ErrorResponse, LabelsResponse = _request_models()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = MicroBatcher(clf, s, metrics)
        await batcher.start()
        app.state.batcher = batcher
        log.info("serving %s (groups %s) with %s", model_name, ", ".join(clf.groups), s.public())
        try:
            yield
        finally:
            await batcher.stop()

    limits = (f"Limits: at most {s.max_texts} texts per request, {s.max_text_bytes} UTF-8 bytes per text, "
              f"{s.max_body_bytes} bytes per request body.")
    app = FastAPI(
        title="hm3 guard service",
        version=hm3.__version__,
        description=f"Model `{model_name}` with groups {', '.join(clf.groups)}. One forward pass answers every "
                    f"group. {limits} Errors are `{{\"error\": {{\"code\", \"message\"}}}}`.",
        lifespan=lifespan,
    )
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    # Both header styles are accepted; declaring them makes /docs show an "Authorize" button.
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
    bearer = HTTPBearer(auto_error=False)

    async def require_key(
        key: Optional[str] = Depends(key_header), cred: Optional[HTTPAuthorizationCredentials] = Depends(bearer)
    ) -> None:
        if s.api_key is None:
            return
        given = key if key is not None else (cred.credentials if cred is not None else None)
        if given is None:
            raise ApiError(401, "unauthorized", "missing API key: send the header 'X-API-Key: <key>' or "
                           "'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode(), s.api_key.encode()):
            raise ApiError(401, "unauthorized", "wrong API key", headers={"WWW-Authenticate": "Bearer"})

    def error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error(e.status, e.code, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        message = {404: f"no endpoint {request.url.path}; see /docs",
                   405: f"{request.method} is not allowed on {request.url.path}; see /docs"}.get(e.status_code, str(e.detail))
        return error(e.status_code, code, message, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error(422, "invalid_request", _validation_message(list(e.errors())))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, "internal_error", f"unexpected server error ({type(e).__name__}); the server keeps serving")

    err_responses = {
        400: {"model": ErrorResponse, "description": "Body is not UTF-8 or not JSON."},
        401: {"model": ErrorResponse, "description": "Missing or wrong API key (when the server has one)."},
        413: {"model": ErrorResponse, "description": f"Body larger than {s.max_body_bytes} bytes."},
        422: {"model": ErrorResponse, "description": "Wrong types, empty lists, unknown groups, limits exceeded."},
        500: {"model": ErrorResponse, "description": "Inference failed for this request's micro-batch."},
        503: {"model": ErrorResponse, "description": "Queue full or shutting down; retry."},
    }

    @app.post(
        "/v1/classify",
        response_model=list[TextResult],
        responses=err_responses,
        dependencies=[Depends(require_key)],
        summary="Classify texts: per text and group, the label and the group's softmax scores.",
        description=limits + " Long texts are split into overlapping windows, as in `hm3 predict`.",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": ClassifyRequest.model_json_schema()}}}},
    )
    async def classify(request: Request):
        raw = await _read_body(request, s.max_body_bytes)
        texts, groups = _parse(raw, ClassifyRequest, clf, s)
        rows = await request.app.state.batcher.submit(texts, groups)
        return JSONResponse(rows)

    @app.get("/v1/labels", response_model=LabelsResponse, dependencies=[Depends(require_key)],
             responses={401: err_responses[401]}, summary="The model's groups and their labels.")
    async def labels():
        return JSONResponse({"model": model_name, "groups": label_groups(clf)})

    @app.get("/healthz", summary="Liveness and readiness: 200 while the inference worker runs (no API key).")
    async def healthz(request: Request):
        batcher = getattr(request.app.state, "batcher", None)
        if batcher is None or not batcher.alive:
            return error(503, "unhealthy", "the inference worker is not running")
        return JSONResponse({"status": "ok", "model": model_name, "groups": clf.groups, "fast": s.fast,
                             "queue_texts": batcher.queued_texts})

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(require_key)],
             summary="Prometheus metrics: requests, latencies, micro-batch sizes, inference time.")
    async def metrics_endpoint():
        return PlainTextResponse(metrics.render(model_name, clf.groups),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    app.state.classifier = clf
    app.state.settings = s
    app.state.metrics = metrics
    return app


# -- running -------------------------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


# Seconds an idle connection stays open. Longer than common clients' idle expiry (httpx 5 s, aiohttp
# 15 s): when both sides time out together, a request sent as the server closes is reset (HTTP/1.1's
# keep-alive race; uvicorn's own default of 5 s equals httpx's and produced such resets in our load test).
KEEP_ALIVE = 20.0


def run(model: "str | os.PathLike", host: str = "127.0.0.1", port: int = 8000, settings: Settings | None = None,
        log_level: str = "info", keep_alive: float = KEEP_ALIVE) -> None:
    """Load ``model`` and serve it until interrupted (SIGINT/SIGTERM finish in-flight requests first).

    ``keep_alive``: seconds an idle HTTP connection stays open; behind a load balancer that reuses
    upstream connections, make it longer than the balancer's own idle timeout."""
    import uvicorn

    # Idle OpenMP threads sleep instead of spinning. With spinning (the default), a replica sharing
    # its cores with anything else — other replicas, a busy host — was measured 10-50x slower per
    # forward pass. Must be set before torch loads; an explicit OMP_WAIT_POLICY wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    s = settings or Settings()
    if not (0 <= port <= 65535):
        raise HM3Error(f"port must be in 0..65535, got {port}")
    if not _is_loopback(host) and s.api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model "
                    "(set HM3_API_KEY or --api-key)", host)
    app = create_app(model, s)
    # One process, one event loop, one inference thread: replicas scale out, not in (docs/DEPLOY.md).
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, workers=1,
                timeout_keep_alive=keep_alive, timeout_graceful_shutdown=30)


@contextlib.contextmanager
def background_server(app: "FastAPI", host: str = "127.0.0.1", port: int = 0,
                      startup_timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread of this process; yields its base URL.

    For tests and notebooks. The socket is bound before the server starts, so ``port=0`` picks a free
    port with no race.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           timeout_keep_alive=KEEP_ALIVE))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="hm3-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise HM3Error("the server stopped during startup (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise HM3Error(f"the server did not start within {startup_timeout:.0f}s")
        time.sleep(0.02)
    try:
        yield f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


# -- CLI -----------------------------------------------------------------------------------------------
def register(app, user_errors) -> None:
    from typing import List

    import typer

    from hm3.fastpaths import CALIBRATE_HELP
    from hm3.labels import LABEL_THRESHOLD_HELP

    @app.command()
    @user_errors
    def serve(
        model: Path = typer.Argument(..., help="Merged model or single classifier directory."),
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0: every interface)."),
        port: int = typer.Option(8000, "--port", help="TCP port."),
        api_key: Optional[str] = typer.Option(
            None, "--api-key", envvar="HM3_API_KEY", show_envvar=True,
            help="Require this key (header X-API-Key or Authorization: Bearer). Prefer the env var: "
                 "command lines are visible to other users.",
        ),
        max_texts: int = typer.Option(Settings.max_texts, help="Texts per request."),
        max_text_bytes: int = typer.Option(Settings.max_text_bytes, help="UTF-8 bytes per text."),
        max_body_bytes: int = typer.Option(Settings.max_body_bytes, help="Bytes per request body."),
        max_batch_texts: int = typer.Option(Settings.max_batch_texts, help="Texts per micro-batch."),
        max_wait_ms: float = typer.Option(Settings.max_wait_ms, help="Longest wait to fill a micro-batch (ms)."),
        max_queue_texts: int = typer.Option(Settings.max_queue_texts, help="Waiting texts before 503."),
        batch_size: int = typer.Option(Settings.batch_size, help="Windows per padded forward pass."),
        threads: Optional[int] = typer.Option(None, help="Torch threads (default: the CPUs this process may use)."),
        aggregate: str = typer.Option("mean", help="Long texts: 'mean' or 'max' over windows."),
        threshold: float = typer.Option(Settings.threshold, help="Multi-label groups: report the labels scoring "
                                        "at least this."),
        label_threshold: Optional[List[str]] = typer.Option(
            None, "--label-threshold", help=LABEL_THRESHOLD_HELP),
        keep_alive: float = typer.Option(KEEP_ALIVE, help="Seconds an idle connection stays open (above the "
                                         "clients' and load balancer's idle timeouts)."),
        log_level: str = typer.Option("info", help="uvicorn log level."),
        fast: Optional[str] = typer.Option(None, help="Opt-in faster CPU path: int8, int8-checked, onnx, onnx-int8, "
                                           "bf16 (answers can differ from fp32 near a boundary; docs/BENCHMARKS.md)."),
        calibrate: Optional[Path] = typer.Option(None, help=CALIBRATE_HELP),
    ) -> None:
        """Serve a model over HTTP: POST /v1/classify, GET /v1/labels, /healthz, /metrics, /docs."""
        from hm3.model import thresholds_option  # here: `hm3 --help` must not import torch

        settings = Settings(
            max_texts=max_texts, max_text_bytes=max_text_bytes, max_body_bytes=max_body_bytes,
            max_batch_texts=max_batch_texts, max_wait_ms=max_wait_ms, max_queue_texts=max_queue_texts,
            batch_size=batch_size, threads=threads, api_key=api_key, aggregate=aggregate, threshold=threshold,
            thresholds=thresholds_option(label_threshold) or None, fast=fast,
            calibrate=str(calibrate) if calibrate is not None else None,
        )
        run(model, host, port, settings, log_level=log_level, keep_alive=keep_alive)
