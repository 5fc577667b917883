"""Operating a worker in-process: /metrics, the JSON logs, drain, the ready callback, NVML.

CONTRACT §5 (metrics, health), §6 (shutdown) and §7 (logs), on real llama.cpp with the
tiny GGUF. Jobs are held at a chosen token with a :class:`Gate`; every wait is a bounded
poll of state the worker exposes, never a sleep that hopes.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from prometheus_client.parser import text_string_to_metric_families
from quart import request
from quart_trio import QuartTrio

from orcd import logs
from orcd.bridge import Engine
from orcd.config import Config
from orcd.health import GpuReading, Nvml
from orcd.server import FatalError, serve

from .conftest import LogCapture
from .harness import Event, Gate, GatedEngine, Harness, engine_factory, running_worker, sse_events

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
MiB = 1024 * 1024

# ---------------------------------------------------------------------------- helpers


async def wait_until(predicate: Callable[[], object], within: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail after ``within`` seconds."""
    with trio.fail_after(within):
        while not predicate():
            await trio.sleep(0.005)


async def run_stream(h: Harness, into: list[Event], body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
    """POST /execute and append every event of the stream to ``into``."""
    async with h.stream(headers=headers, **body) as events:
        async for event in events:
            into.append(event)


def ended(events: list[Event]) -> bool:
    return bool(events) and events[-1].name in ("end", "error")


def terminal(events: list[Event]) -> Event:
    """The stream's one terminal event, which must also be its last."""
    terminals = [e for e in events if e.name in ("end", "error")]
    assert len(terminals) == 1, [e.name for e in events]
    assert events[-1] is terminals[0], "nothing may follow the terminal event"
    return terminals[0]


def assert_cancelled(events: list[Event], reason: str) -> None:
    last = terminal(events)
    assert last.name == "error", last
    assert last.data["code"] == "CANCELLED" and last.data["reason"] == reason, last.data


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: httpx.AsyncClient) -> tuple[Samples, set[str]]:
    """GET /metrics, parsed: every sample by (name, labels), and the family names."""
    resp = await client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    families: set[str] = set()
    for family in text_string_to_metric_families(resp.text):
        families.add(family.name)
        for s in family.samples:
            assert "job_id" not in s.labels, s
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, families


def sample(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a labelled child that does not exist yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


FOREIGN_PID = 4_194_304 + 7  # above Linux's largest pid_max: never a PID we can see


class FakeNvml:
    """A ``pynvml`` double: this process holds ``used`` bytes on the device, or NVML fails."""

    class NVMLError(Exception):
        pass

    def __init__(self, used: int | None) -> None:
        self.used = used
        self.listed = True  # whether this process appears in the device's process list
        self.foreign = False  # whether NVML lists only PIDs of another PID namespace
        self.device_used = 0  # nvmlDeviceGetMemoryInfo(...).used
        self.fail = False
        self.fail_init = False
        self.calls: list[str] = []

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, index: int) -> tuple[str, int]:
        self.calls.append(f"handle:{index}")
        return ("gpu", index)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: tuple[str, int]) -> list[Any]:
        assert handle[0] == "gpu"
        if self.fail:
            raise self.NVMLError("GPU is lost")
        # Another process of ours on the GPU (the parent: a PID that exists in /proc).
        procs = [SimpleNamespace(pid=os.getppid(), usedGpuMemory=8 * 1024 * MiB)]
        if self.foreign:  # NVML inside a container: only host PIDs we cannot see
            procs = [SimpleNamespace(pid=FOREIGN_PID, usedGpuMemory=self.used)]
            return procs
        if self.listed:
            procs.append(SimpleNamespace(pid=os.getpid(), usedGpuMemory=self.used))
        return procs

    def nvmlDeviceGetMemoryInfo(self, handle: tuple[str, int]) -> Any:
        return SimpleNamespace(total=80 * 1024 * MiB, used=self.device_used,
                               free=80 * 1024 * MiB - self.device_used)

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")


@asynccontextmanager
async def serving(model: Path, *, nvml_module: Any | None = None, device: str | None = None,
                  **overrides: Any) -> AsyncIterator[tuple[Harness, trio.Event]]:
    """Like ``running_worker``, plus an event set when ``serve()`` has returned by itself.

    ``device`` relabels the engine (which runs on the CPU in tests) as that GPU device.
    """
    config = Config(**{"port": 0, "n_ctx": 1024, "threads": 1, "worker_id": "test",
                       **overrides})
    engines: list[Any] = []
    base = engine_factory(model, engines)

    def factory(cfg: Config, on_progress: Callable[[float], None]) -> Engine:
        engine = base(cfg, on_progress)
        if device is not None:
            assert isinstance(engine, GatedEngine)
            engine.info = attrs.evolve(engine.info, device=device)
        return engine

    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[Any]) -> None:
        try:
            await serve(config, engine_factory=factory, nvml_module=nvml_module,
                        task_status=task_status)
        finally:
            stopped.set()

    async with trio.open_nursery() as nursery:
        worker = await nursery.start(run)
        async with httpx.AsyncClient(base_url=worker.uri, timeout=30) as client:
            h = Harness(worker, client, engines)
            try:
                await wait_until(lambda: worker.engine is not None, 30)
                yield h, stopped
            finally:
                for engine in engines:
                    for gate in [engine.at_prompt, engine.in_decode, *engine.at_token.values()]:
                        if gate is not None:
                            gate.open()
                worker.request_shutdown("test over")


@asynccontextmanager
async def callback_server(status: int) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """An orchestrator double: records each ready callback and the worker's /health then."""
    app = QuartTrio("callback-double")
    received: list[dict[str, Any]] = []

    @app.post("/ready")
    async def ready() -> tuple[str, int]:
        body = await request.get_json()
        async with httpx.AsyncClient(timeout=5) as client:
            health = await client.get(f"{body['uri']}/health")
        received.append({"body": body, "health_status": health.status_code,
                         "health": health.json()})
        return "", status

    cfg = HypercornConfig()
    cfg.bind = ["127.0.0.1:0"]
    cfg.accesslog = None
    cfg.errorlog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn_serve, app, cfg,
                                            shutdown_trigger=stop.wait))
        try:
            yield f"{binds[0]}/ready", received
        finally:
            stop.set()


def strings_in(value: Any) -> Iterator[str]:
    """Every string inside a parsed JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings_in(v)


# ---------------------------------------------------------------------------- metrics

CONTRACT_FAMILIES = {
    "worker_requests", "worker_tokens_in", "worker_tokens_generated",
    "worker_inference_duration_seconds", "worker_vram_bytes", "worker_uptime_seconds",
    "orcd_cancel_latency_seconds", "orcd_active_jobs", "orcd_queued_jobs", "orcd_rejected",
}


async def test_metrics_expose_the_contract_and_count_finished_jobs(tiny_model: Path) -> None:
    async with running_worker(tiny_model, threads=1) as h:
        before, families = await scrape(h.client)
        assert CONTRACT_FAMILIES <= families, CONTRACT_FAMILIES - families
        assert sample(before, "worker_uptime_seconds") > 0
        assert sample(before, "worker_vram_bytes") == 0, "CPU: no made-up VRAM figure"
        assert sample(before, "orcd_active_jobs") == 0
        assert sample(before, "orcd_queued_jobs") == 0

        plain = await h.execute(job_id="m-plain", prompt="hello metrics", max_tokens=25, seed=1)
        # A stop sequence from the middle of a seeded output: the tokens that spelled it
        # were generated (and count) even though their text is never sent.
        free = "".join(e.data["t"] for e in plain if e.name == "token")
        stop = next(free[i:i + 2] for i in range(5, len(free) - 2)
                    if free[i:i + 2].isascii() and free[i:i + 2].isprintable())
        stopped = await h.execute(job_id="m-stop", prompt="hello metrics", max_tokens=25,
                                  seed=1, stop=[stop])
        after, _ = await scrape(h.client)

    assert terminal(plain).data["stop_reason"] == "max_tokens"
    assert terminal(stopped).data["stop_reason"] == "stop_sequence"

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("worker_requests_total", outcome="completed") == 2
    assert delta("worker_requests_total", outcome="cancelled") == 0
    prompt_tokens = plain[0].data["prompt_tokens"] + stopped[0].data["prompt_tokens"]
    assert delta("worker_tokens_in_total") == prompt_tokens
    # The second job's prompt is the first's: all but its last token come from the cache.
    assert delta("orcd_prefix_cache_hit_tokens_total") == stopped[0].data["prompt_tokens"] - 1
    tokens_out = terminal(plain).data["tokens_out"] + terminal(stopped).data["tokens_out"]
    assert delta("worker_tokens_generated_total") == tokens_out
    assert delta("worker_inference_duration_seconds_count") == 2
    assert delta("worker_inference_duration_seconds_sum") > 0


async def hold_one_queue_one(h: Harness, nursery: trio.Nursery,
                             running: list[Event], running_body: dict[str, Any],
                             queued: list[Event], queued_body: dict[str, Any]) -> Gate:
    """Start a job held at its third token and a second one queued behind it (slots=1)."""
    gate = h.engine.at_token[3] = Gate()
    nursery.start_soon(run_stream, h, running, running_body)
    await gate.wait_reached()
    nursery.start_soon(run_stream, h, queued, queued_body)
    await wait_until(lambda: queued)
    return gate


async def test_metrics_follow_cancels_the_queue_and_rejections(tiny_model: Path) -> None:
    async with running_worker(tiny_model, threads=1, slots=1) as h:
        before, _ = await scrape(h.client)
        running: list[Event] = []
        queued: list[Event] = []
        async with trio.open_nursery() as nursery:
            gate = await hold_one_queue_one(
                h, nursery, running, {"job_id": "m-run", "prompt": "abc", "max_tokens": 50},
                queued, {"job_id": "m-queued", "prompt": "abc", "max_tokens": 5})
            assert queued[0].name == "queued"

            held, _ = await scrape(h.client)
            assert sample(held, "orcd_active_jobs") == 1
            assert sample(held, "orcd_queued_jobs") == 1

            assert (await h.cancel("m-queued")).status_code == 202
            await wait_until(lambda: ended(queued))
            assert (await h.cancel("m-run")).status_code == 202
            gate.open()
            await wait_until(lambda: ended(running))

        bad = await h.client.post("/execute", json={"job_id": "m-bad", "prompt": "x",
                                                    "max_tokens": -1})
        assert bad.status_code == 400
        await h.settled()  # the cancelled job's slot passes on when the engine frees it
        after, _ = await scrape(h.client)

    assert_cancelled(queued, "client_request")
    assert_cancelled(running, "client_request")

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("orcd_cancel_latency_seconds_count", phase="decode") == 1
    assert delta("orcd_cancel_latency_seconds_count", phase="queued") == 1
    assert delta("orcd_cancel_latency_seconds_count", phase="prompt") == 0
    assert 0 < delta("orcd_cancel_latency_seconds_sum", phase="decode") < 5
    assert delta("worker_requests_total", outcome="cancelled") == 2
    assert delta("worker_requests_total", outcome="completed") == 0
    assert delta("orcd_rejected_total", code="INVALID_REQUEST") == 1
    assert sample(after, "orcd_active_jobs") == 0 and sample(after, "orcd_queued_jobs") == 0


# ---------------------------------------------------------------------------- logs


async def test_logs_narrate_startup_and_jobs_with_ids(tiny_model: Path,
                                                      log_capture: LogCapture) -> None:
    corr = "corr-logs.1:a"
    prompt = "zebra-quokka-PRIVATE-7731 never log me"
    async with running_worker(tiny_model, threads=1) as h:
        async with h.client.stream("POST", "/execute", headers={"X-Correlation-Id": corr},
                                   json={"job_id": "log-1", "prompt": prompt,
                                         "max_tokens": 40, "seed": 9}) as resp:
            assert resp.status_code == 200
            assert resp.headers["X-Correlation-Id"] == corr
            events = [e async for e in sse_events(resp)]

        unknown = await h.client.post("/cancel", json={"job_id": "log-never-sent"},
                                      headers={"X-Correlation-Id": "corr-unknown"})
        assert unknown.status_code == 202 and unknown.json()["state"] == "unknown"

        gate = h.engine.at_token[2] = Gate()
        cancelled: list[Event] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_stream, h, cancelled,
                               {"job_id": "log-2", "prompt": prompt, "max_tokens": 40},
                               {"X-Correlation-Id": "corr-logs-2"})
            await gate.wait_reached()
            assert (await h.cancel("log-2")).status_code == 202
            gate.open()
            await wait_until(lambda: ended(cancelled))

    assert events[0].name == "started" and events[0].data["correlation_id"] == corr
    assert terminal(events).name == "end"
    assert_cancelled(cancelled, "client_request")
    lines = log_capture.lines()
    assert lines, "no log line at all"

    for line in lines:  # the contract's fields, on every line
        assert {"ts", "level", "actor", "action", "human", "worker_id"} <= set(line), line
        assert line["actor"] == "orcd" and line["worker_id"] == "test-worker"
        assert line["level"] in ("debug", "info", "warning", "error"), line
        assert RFC3339.match(line["ts"]), line
        assert isinstance(line["human"], str) and line["human"]
        if "job_id" in line:
            assert line.get("correlation_id"), f"job line without correlation_id: {line}"

    actions = [line["action"] for line in lines]
    progress = [line["progress"] for line in lines if line["action"] == "model_load_progress"]
    assert progress == [0, 25, 50, 75, 100]
    assert actions.index("startup") < actions.index("model_load_progress")
    assert actions.index("ready") > len(actions) - 1 - actions[::-1].index("model_load_progress")
    assert "shutdown" in actions

    def about(job_id: str, action: str) -> list[dict[str, Any]]:
        return [x for x in lines if x.get("job_id") == job_id and x["action"] == action]

    [start] = about("log-1", "execute_start")
    assert start["correlation_id"] == corr
    assert start["prompt_chars"] == len(prompt)
    assert start["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
    [end] = about("log-1", "execute_end")
    assert end["correlation_id"] == corr and end["tokens_out"] == 40

    [warn] = about("log-never-sent", "cancel_unknown")
    assert warn["level"] == "warning" and warn["correlation_id"] == "corr-unknown"

    assert about("log-2", "execute_start")[0]["correlation_id"] == "corr-logs-2"
    assert len(about("log-2", "cancel")) == 1
    [done] = about("log-2", "cancel_complete")
    assert done["correlation_id"] == "corr-logs-2" and done["cancel_reason"] == "client_request"

    # Neither the prompt nor any output is ever logged.
    output = "".join(e.data["t"] for e in events if e.name == "token")
    assert len(output) >= 20
    raw = log_capture.stream.getvalue()
    assert "zebra-quokka" not in raw
    for line in lines:
        for text in strings_in(line):
            assert "zebra-quokka" not in text and output not in text, line


async def test_objects_alive_at_startup_are_frozen_out_of_full_collections(
        tiny_model: Path) -> None:
    # A full collection walks every tracked object on whichever thread allocates, usually
    # the event loop: ~40 ms for the 68k alive after start-up on the 2-core VM, 0.1 ms
    # once they are frozen (README, "Garbage collector"). Frozen once per process.
    async with running_worker(tiny_model) as h:
        assert (await h.client.get("/health")).json()["state"] == "ready"
        frozen = gc.get_freeze_count()
        assert frozen > 1000, frozen
    async with running_worker(tiny_model):
        # a second worker in the process freezes nothing more (freed objects leave the count)
        assert gc.get_freeze_count() <= frozen


def test_a_log_line_never_wakes_the_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer finds lines on its own rounds: a log call that woke it would hand the GIL
    to it in the middle of the request that logged (a cancel logs two lines)."""
    monkeypatch.setattr(logs, "BATCH_WINDOW_S", 30.0, raising=False)  # no round in the test
    stream = io.StringIO()
    logs.configure("w-rounds", "json", "info", stream=stream)
    for n in range(3):
        logs.log("burst", f"line {n}", n=n)
    time.sleep(0.1)  # the event loop's thread waits in epoll: a woken writer would run now
    assert stream.getvalue() == "", "a log call woke the writer"
    assert logs.flush(), "flush() must cut the round short"
    assert [json.loads(line)["n"] for line in stream.getvalue().splitlines()] == [0, 1, 2]


def test_the_log_queue_is_bounded_and_counts_what_it_drops(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setattr(logs, "BATCH_WINDOW_S", 30.0)
    monkeypatch.setattr(logs, "QUEUE_SIZE", 3)
    stream = io.StringIO()
    logs.configure("w-full", "json", "info", stream=stream)
    for n in range(5):
        logs.log("burst", f"line {n}", n=n)
    assert logs.dropped() == 2
    assert logs.flush()
    assert [json.loads(line)["n"] for line in stream.getvalue().splitlines()] == [0, 1, 2]


def test_text_log_format_is_readable_and_not_json() -> None:
    stream = io.StringIO()
    logs.configure("w-text", "text", "info", stream=stream)
    logs.log("execute_start", "Job j1 admitted", job_id="j1", correlation_id="c1",
             prompt_chars=5)
    logs.log("debug_detail", "not shown at level info", level=logging.DEBUG)
    logs.log("cancel_unknown", "Cancel for unknown job zz", level=logging.WARNING,
             job_id="zz")
    assert logs.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    for line in lines:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
    first, second = lines
    assert RFC3339.match(first.split()[0])
    assert "INFO" in first and "execute_start" in first and "Job j1 admitted" in first
    assert "job_id=j1" in first and "correlation_id=c1" in first and "prompt_chars=5" in first
    assert "WARNING" in second and "cancel_unknown" in second and "job_id=zz" in second


# ---------------------------------------------------------------------------- drain


async def test_shutdown_drains_queue_refuses_work_and_lets_running_job_finish(
        tiny_model: Path, log_capture: LogCapture) -> None:
    async with serving(tiny_model, slots=1, drain_timeout_s=10) as (h, stopped):
        running: list[Event] = []
        queued: list[Event] = []
        async with trio.open_nursery() as nursery:
            gate = await hold_one_queue_one(
                h, nursery, running, {"job_id": "d-run", "prompt": "drain", "max_tokens": 20},
                queued, {"job_id": "d-queued", "prompt": "wait", "max_tokens": 5})

            resp = await h.client.post("/shutdown")
            assert resp.status_code == 202
            health = await h.client.get("/health")
            assert health.status_code == 503
            assert health.json()["state"] == "draining"
            assert health.json()["status"] == "draining"

            refused = await h.client.post("/execute", json={"job_id": "d-late", "prompt": "x"})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "SHUTTING_DOWN"
            assert refused.json()["error"]["retriable"] is True
            assert int(refused.headers["Retry-After"]) > 0

            await wait_until(lambda: ended(queued))
            assert_cancelled(queued, "shutdown")
            assert not ended(running) and not stopped.is_set(), "the running job gets its time"
            gate.open()
            await wait_until(lambda: ended(running))

        end = terminal(running)
        assert end.name == "end" and end.data["tokens_out"] == 20
        await wait_until(stopped.is_set)
        assert h.worker.registry.get("d-run").state == "completed"  # type: ignore[union-attr]
        job = h.worker.registry.get("d-queued")
        assert job is not None and job.state == "cancelled" and job.cancel_reason == "shutdown"
    reasons = [x.get("reason") for x in log_capture.actions("shutdown")]
    assert "POST /shutdown" in reasons


async def test_drain_timeout_cancels_the_running_job(tiny_model: Path) -> None:
    async with serving(tiny_model, drain_timeout_s=0.5) as (h, stopped):
        gate = h.engine.at_token[3] = Gate()
        events: list[Event] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_stream, h, events,
                               {"job_id": "d-slow", "prompt": "slow", "max_tokens": 200})
            await gate.wait_reached()
            job = h.worker.registry.get("d-slow")
            assert job is not None
            asked = trio.current_time()
            h.worker.request_shutdown("test drain")
            await wait_until(lambda: job.cancel_reason is not None)
            assert job.cancel_reason == "shutdown"
            assert trio.current_time() - asked >= 0.45, "cancelled before the drain timeout"
            gate.open()  # the generation thread goes on and finds the cancel
            await wait_until(lambda: ended(events))

        assert_cancelled(events, "shutdown")
        assert 3 <= job.tokens_out < 200 and job.state == "cancelled"
        await wait_until(stopped.is_set)
        latency = h.worker.metrics.cancel_latency.labels(phase="decode")
        assert latency._sum.get() > 0  # the drain's cancel is measured like any other


# ---------------------------------------------------------------------------- ready callback


async def test_ready_callback_arrives_once_health_is_200(tiny_model: Path,
                                                         log_capture: LogCapture) -> None:
    fake = FakeNvml(used=256 * MiB)
    async with callback_server(204) as (url, received):
        async with serving(tiny_model, callback_url=url, worker_id="cb-worker",
                           gpu_device=0, nvml_module=fake, device="cuda:0") as (h, _):
            await wait_until(lambda: received)
            [got] = received
            assert got["body"] == {"worker_id": "cb-worker", "model_ref": str(tiny_model),
                                   "vram_bytes": 256 * MiB, "uri": h.worker.uri}
            assert got["health_status"] == 200, got["health"]
            assert got["health"]["state"] == "ready" and got["health"]["resident"] is True
    actions = [line["action"] for line in log_capture.lines()]
    assert "callback" in actions and actions.index("ready") < actions.index("callback")


async def test_ready_callback_that_never_succeeds_is_fatal(tiny_model: Path,
                                                           log_capture: LogCapture) -> None:
    async with callback_server(500) as (url, received):
        config = Config(port=0, n_ctx=1024, threads=1, worker_id="test", callback_url=url,
                        callback_timeout_s=1.0)
        with trio.fail_after(20), pytest.raises(FatalError, match="ready callback"):
            await serve(config, engine_factory=engine_factory(tiny_model, []))
    assert len(received) >= 2, "the callback is retried"
    errors = [x for x in log_capture.lines() if x["level"] == "error"]
    assert any("callback" in x["human"].lower() for x in errors), errors


# ---------------------------------------------------------------------------- NVML


def test_nvml_reads_this_process_on_the_device() -> None:
    fake = FakeNvml(used=5000)
    nvml = Nvml(1, fake)
    assert fake.calls == ["init", "handle:1"]
    assert nvml.read(4000) == GpuReading(5000, True, None)

    short = nvml.read(6000)
    assert short.vram_bytes_used == 5000 and not short.resident
    assert short.error is not None and "6000" in short.error

    fake.used, fake.device_used = None, 7000  # NVML has no per-process figure
    assert nvml.read(4000) == GpuReading(7000, True, None)

    fake.listed = False
    gone = nvml.read(4000)
    assert gone.vram_bytes_used == 0 and not gone.resident and gone.error

    fake.listed, fake.foreign, fake.device_used = False, True, 9000
    in_container = nvml.read(4000)  # host PIDs only: the device total is the figure
    assert in_container == GpuReading(9000, True, None)
    fake.foreign = False
    fake.listed, fake.fail = True, True
    failed = nvml.read(4000)
    assert failed == GpuReading(0, False, "NVML failed: GPU is lost")

    nvml.close()
    assert fake.calls[-1] == "shutdown"


async def test_health_reports_nvml_residency_and_turns_unhealthy(
        tiny_model: Path, log_capture: LogCapture) -> None:
    fake = FakeNvml(used=256 * MiB)

    async def health() -> tuple[int, dict[str, Any]]:
        resp = await h.client.get("/health")
        return resp.status_code, resp.json()

    async def wait_health(predicate: Callable[[int, dict[str, Any]], bool]
                          ) -> tuple[int, dict[str, Any]]:
        with trio.fail_after(10):
            while True:
                status, body = await health()
                if predicate(status, body):
                    return status, body
                await trio.sleep(0.02)

    async with serving(tiny_model, gpu_device=0, nvml_module=fake, device="cuda:0",
                       residency_check_s=0.1) as (h, _):
        status, body = await health()
        assert status == 200 and body["status"] == "ok"
        assert body["device"] == "cuda:0" and body["resident"] is True
        assert body["vram_bytes_used"] == 256 * MiB
        samples, _ = await scrape(h.client)
        assert sample(samples, "worker_vram_bytes") == 256 * MiB

        fake.used = 1000  # the weights are no longer on the GPU
        status, body = await wait_health(lambda s, b: s == 503)
        assert body["status"] == "unhealthy" and body["resident"] is False
        assert body["vram_bytes_used"] == 1000 and "1000" in body["unhealthy_reason"]

        fake.fail = True
        status, body = await wait_health(
            lambda s, b: "NVML failed" in b.get("unhealthy_reason", ""))
        assert status == 503 and body["vram_bytes_used"] == 0

        fake.fail, fake.used = False, 256 * MiB
        status, body = await wait_health(lambda s, b: s == 200)
        assert body["status"] == "ok" and body["resident"] is True

    errors = log_capture.actions("error")
    assert len(errors) == 2, errors  # one line per new problem, not one per check
    assert all(x["level"] == "error" and x["device"] == 0 for x in errors)
    assert log_capture.actions("residency_ok")
    assert fake.calls[-1] == "shutdown"


async def test_nvml_that_cannot_start_is_logged_and_never_invents_numbers(
        tiny_model: Path, log_capture: LogCapture) -> None:
    fake = FakeNvml(used=256 * MiB)
    fake.fail_init = True
    async with serving(tiny_model, gpu_device=0, nvml_module=fake, device="cuda:0") as (h, _):
        body = (await h.client.get("/health")).json()
        assert body["vram_bytes_used"] == 0 and body["resident"] is False
        events = await h.execute(job_id="nvml-off", prompt="still works", max_tokens=5)
        assert terminal(events).name == "end"
    [error] = log_capture.actions("error")
    assert error["level"] == "error" and "NVML" in error["human"] and error["device"] == 0
