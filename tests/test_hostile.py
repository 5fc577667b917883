"""Clients that misbehave must never hurt the worker or another client (issue #7).

Each test reproduces a failure an outside review found, on real llama.cpp (the tiny model)
over a real socket:

1. a reader that never reads, while jobs churn through the queue behind it, used to
   overflow its event channel and kill the process;
2. a client gone during admission used to leave an orphan job running for nobody;
3. a client that stops reading used to hold a shutdown open forever;

plus the bookkeeping and logging that must stay bounded and non-blocking.
"""

from __future__ import annotations

import io
import json
import socket
import threading
from pathlib import Path
from typing import Any

import trio
import trio.testing

from orcd import logs
from orcd.api.schema import CORRELATION_ID_RE
from orcd.auth import ANONYMOUS_NAME
from orcd.config import Config
from orcd.jobs import JobRegistry
from orcd.metrics import Metrics

from .conftest import LogCapture
from .harness import Event, Gate, Harness, running_worker

TINY_RCVBUF = 1024  # the kernel rounds it up to its minimum: a few KB


async def raw_execute(h: Harness, body: dict[str, Any], *, rcvbuf: int | None = TINY_RCVBUF
                      ) -> trio.SocketStream:
    """Send ``POST /execute`` on a raw socket with a tiny receive buffer; read nothing."""
    assert h.worker.uri is not None
    host, port = h.worker.uri.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect((host, int(port)))
    stream = trio.SocketStream(sock)
    payload = json.dumps(body).encode()
    await stream.send_all(
        b"POST /execute HTTP/1.1\r\nHost: orcd\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    return stream


async def wait_for(predicate: Any, within: float = 10.0) -> None:
    with trio.fail_after(within):
        while not predicate():
            await trio.sleep(0.005)


def state_of(h: Harness, job_id: str) -> str | None:
    job = h.worker.registry.get(job_id)
    return None if job is None else job.state


async def test_silent_reader_in_the_queue_survives_any_queue_churn(tiny_model: Path) -> None:
    """Regression: every departure from the queue used to send a ``queued`` event to each
    waiter, position changed or not; a waiter that never reads overflowed its channel
    (capacity max_tokens + queue_depth + 8 = 9 here) and ``trio.WouldBlock`` escaped into
    the registry's nursery, killing the process."""
    async with running_worker(tiny_model, slots=1, queue_depth=4) as h:
        gate = h.engine.at_token[2] = Gate()
        async with trio.open_nursery() as nursery:
            held: list[Event] = []

            async def hold() -> None:
                held.extend(await h.execute(job_id="holder", prompt="x", max_tokens=5))

            nursery.start_soon(hold)
            await gate.wait_reached()
            silent = await raw_execute(h, {"job_id": "silent", "prompt": "y", "max_tokens": 1})
            await wait_for(lambda: state_of(h, "silent") == "queued")
            # 60 jobs queue behind the silent one and are cancelled: 60 departures.
            for i in range(60):
                async with h.stream(job_id=f"churn-{i}", prompt="z", max_tokens=1) as events:
                    first = await events.__anext__()
                    assert first.name == "queued" and first.data["position"] == 2
                    assert (await h.cancel(f"churn-{i}")).status_code == 202
                    rest = [e async for e in events]
                assert rest[-1].name == "error" and rest[-1].data["code"] == "CANCELLED"
            job = h.worker.registry.get("silent")
            assert job is not None and job.state == "queued"
            # Its position never changed, so nothing new was queued for it: its first
            # ``queued`` event at most, however many jobs came and went behind it.
            assert job.outbox.pending <= 1  # type: ignore[union-attr]
            health = await h.client.get("/health")
            assert health.status_code == 200
            gate.open()
        assert held[-1].name == "end"
        await wait_for(lambda: state_of(h, "silent") == "completed")
        await silent.aclose()
        # The worker keeps serving everyone else.
        after = await h.execute(job_id="after", prompt="x", max_tokens=3)
        assert after[-1].name == "end"


async def test_a_client_that_stops_reading_is_cancelled_as_stalled(tiny_model: Path) -> None:
    """A client whose socket takes no bytes for --stall-timeout-s loses its job
    (``client_stalled``) and its connection; the slot goes to the next job."""
    async with running_worker(tiny_model, n_ctx=4096, max_tokens_out=4000, slots=1,
                              stall_timeout_s=0.5) as h:
        silent = await raw_execute(h, {"job_id": "stall", "prompt": "go", "max_tokens": 4000,
                                       "seed": 1})
        await wait_for(lambda: state_of(h, "stall") in ("cancelled", "completed"), within=30)
        record = await h.job("stall")
        assert record["state"] == "cancelled", record
        assert record["cancel_reason"] == "client_stalled"
        assert h.worker.connections is not None and h.worker.connections.stalls == 1
        # Its connection was closed by the worker: reading drains what the kernel held,
        # then ends, without the terminal frame (nobody could have received it).
        received = b""
        with trio.fail_after(10):
            while chunk := await silent.receive_some(65536):
                received += chunk
        assert b"event: token" in received and b"CANCELLED" not in received
        await silent.aclose()
        await h.settled()
        assert h.engine.kv_outside_cache() == 0
        after = await h.execute(job_id="after-stall", prompt="x", max_tokens=3)
        assert after[-1].name == "end"


async def test_a_disconnect_during_admission_cancels_the_job(tiny_model: Path) -> None:
    """Regression: a client gone while its prompt was being tokenized left an orphan job
    that ran to max_tokens for nobody, held a slot, and counted as an open stream."""
    async with running_worker(tiny_model, slots=1) as h:
        gate = h.engine.at_tokenize = Gate()
        client = await raw_execute(h, {"job_id": "orphan", "prompt": "p", "max_tokens": 900},
                                   rcvbuf=None)
        await gate.wait_reached()
        await client.aclose()
        # Let the server see the close and cancel the handler (still in tokenization).
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        h.engine.at_tokenize = None
        gate.open()
        await wait_for(lambda: state_of(h, "orphan") not in (None, "queued", "running"))
        record = await h.job("orphan")
        assert record["state"] == "cancelled", record
        assert record["cancel_reason"] == "client_disconnect"
        assert record["tokens_out"] < 900
        await h.settled()
        health = (await h.client.get("/health")).json()
        assert health["active_jobs"] == 0
        assert h.worker.open_streams() == 0
        assert h.engine.kv_outside_cache() == 0


async def test_a_disconnect_while_queued_or_generating_cancels_the_job(tiny_model: Path
                                                                       ) -> None:
    async with running_worker(tiny_model, slots=1) as h:
        gate = h.engine.at_token[3] = Gate()
        running = await raw_execute(h, {"job_id": "gone-run", "prompt": "a", "max_tokens": 50})
        await gate.wait_reached()
        queued = await raw_execute(h, {"job_id": "gone-q", "prompt": "b", "max_tokens": 50})
        await wait_for(lambda: state_of(h, "gone-q") == "queued")
        await queued.aclose()
        await wait_for(lambda: state_of(h, "gone-q") == "cancelled")
        await running.aclose()
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        gate.open()
        await wait_for(lambda: state_of(h, "gone-run") == "cancelled")
        for job_id in ("gone-q", "gone-run"):
            assert (await h.job(job_id))["cancel_reason"] == "client_disconnect"


async def test_unknown_cancels_are_capped_oldest_first() -> None:
    """200,000 cancels for unknown ids keep at most ``cancel_memory_max`` tombstones; the
    oldest go first, and expired ones are dropped from the front, never by a full scan."""
    registry = JobRegistry(Config(cancel_memory_max=1000, cancel_memory_s=60.0), Metrics())
    for i in range(200_000):
        assert registry.cancel(f"ghost-{i}", "c") == "unknown"
    tombstones = registry._spaces[ANONYMOUS_NAME].tombstones
    assert len(tombstones) == 1000
    assert next(iter(tombstones)) == "ghost-199000"  # the newest thousand are kept
    assert "ghost-0" not in tombstones and "ghost-199999" in tombstones


async def test_tombstones_expire_after_the_cancel_memory(autojump_clock: Any) -> None:
    registry = JobRegistry(Config(cancel_memory_s=60.0), Metrics())
    registry.cancel("early", "c")
    await trio.sleep(30)
    registry.cancel("late", "c")
    await trio.sleep(31)
    registry.get("anything")  # reading forgets what expired
    assert list(registry._spaces[ANONYMOUS_NAME].tombstones) == ["late"]
    await trio.sleep(30)
    registry.get("anything")
    assert not registry._spaces[ANONYMOUS_NAME].tombstones


class _BlockedStream(io.StringIO):
    """A log destination whose writes block until released: a stderr nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.blocked = threading.Event()

    def write(self, text: str) -> int:
        self.blocked.set()
        self.release.wait(30)
        return super().write(text)


async def test_a_stalled_log_reader_never_freezes_the_event_loop(tiny_model: Path) -> None:
    stream = _BlockedStream()
    async with running_worker(tiny_model) as h:
        logs.configure("blocked", "json", "debug", stream=stream)
        try:
            # The writer looks for lines on its own rounds: wait until it is stuck writing the
            # first one, however long its round, before anything else is asked of the worker.
            logs.log("test_first", "the line that blocks the writer")
            await wait_for(stream.blocked.is_set)
            # Each of these logs lines while the writer thread is stuck.
            for i in range(3):
                resp = await h.cancel(f"nobody-{i}")
                assert resp.status_code == 202
            events = await h.execute(job_id="while-blocked", prompt="x", max_tokens=3)
            assert events[-1].name == "end"
            assert not stream.release.is_set()
        finally:
            stream.release.set()
    assert logs.flush()
    written = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert any(line["action"] == "cancel_unknown" for line in written)


async def test_ids_with_a_trailing_newline_or_a_slash_are_invalid(tiny_model: Path) -> None:
    async with running_worker(tiny_model) as h:
        resp = await h.client.post("/execute", json={"job_id": "abc\n", "prompt": "x"})
        assert resp.status_code == 400
        assert resp.json()["error"]["details"]["errors"][0]["field"] == "job_id"
        resp = await h.client.post("/cancel", json={"job_id": "abc\n"})
        assert resp.status_code == 400
        resp = await h.client.get("/jobs/a%2Fb")
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "INVALID_REQUEST"
        resp = await h.client.get("/health", headers={"X-Correlation-Id": "bad id!"})
        assert resp.headers["X-Correlation-Id"] != "bad id!"
        assert len(resp.headers["X-Correlation-Id"]) == 16
    # A header cannot carry a newline, but the pattern is used elsewhere too.
    assert CORRELATION_ID_RE.fullmatch("abc\n") is None


async def test_x_job_id_header_must_name_the_bodys_job(tiny_model: Path) -> None:
    async with running_worker(tiny_model) as h:
        resp = await h.client.post("/execute", json={"job_id": "body-id", "prompt": "x"},
                                   headers={"X-Job-Id": "other-id"})
        assert resp.status_code == 400
        assert resp.json()["error"]["details"]["errors"][0]["field"] == "X-Job-Id"
        events: list[Event] = []
        async with h.stream(headers={"X-Job-Id": "same-id"}, job_id="same-id", prompt="x",
                            max_tokens=2) as stream:
            events = [e async for e in stream]
        assert events[-1].name == "end"


async def test_a_shutdown_during_model_loading_stops_the_load(
        tiny_model: Path, log_capture: LogCapture) -> None:
    """SIGTERM while the model loads: the load stops at its next progress report (llama.cpp's
    progress callback returns False) and serve() returns cleanly, with no fatal error."""
    loading = Gate()
    async with running_worker(tiny_model, before_load=loading.hold, wait_ready=False) as h:
        await loading.wait_reached()
        h.worker.request_shutdown("SIGTERM")
        loading.open()
    # serve() has returned (running_worker waits for it) without raising a FatalError.
    assert h.worker.engine is None
    stopped = [line for line in log_capture.actions("shutdown")
               if "Model load stopped by the shutdown" in line["human"]]
    assert stopped, "the load ran to the end instead of stopping"
    assert not log_capture.actions("ready")


async def test_shutdown_has_a_hard_deadline_behind_a_client_that_stopped_reading(
        tiny_model: Path, log_capture: LogCapture) -> None:
    """Regression: hypercorn's write to a client that stopped reading had no timeout, and
    the drain waited on it: SIGTERM never exited. Now serve() returns within
    --drain-timeout-s + the shutdown grace, and a client that still reads gets its
    terminal event and the end of its body first."""
    drain_s, grace_s = 0.5, 1.0
    reader: list[Event] = []
    async with running_worker(tiny_model, n_ctx=4096, max_tokens_out=4000, drain_timeout_s=drain_s,
                              shutdown_grace_s=grace_s, stall_timeout_s=300) as h:
        connections = h.worker.connections
        assert connections is not None
        silent = await raw_execute(h, {"job_id": "never-read", "prompt": "go", "max_tokens": 4000,
                                       "seed": 1})
        # Its socket is full and the worker's write to it waits (it would for 300 s).
        await wait_for(lambda: connections.blocked(0.2) == 1, within=60)
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                async with h.stream(job_id="reader", prompt="r", max_tokens=4000) as events:
                    async for event in events:
                        reader.append(event)

            nursery.start_soon(read)
            await wait_for(lambda: any(e.name == "token" for e in reader))
            h.worker.request_shutdown("SIGTERM")
            asked = trio.current_time()
    # running_worker has waited for serve() to return.
    took = trio.current_time() - asked
    await silent.aclose()
    assert took < drain_s + grace_s + 0.5, f"serve() returned {took:.2f} s after the shutdown"
    assert reader[-1].name == "error" and reader[-1].data["reason"] == "shutdown"
    closed = [line for line in log_capture.actions("shutdown")
              if "whose clients did not read to the end" in line["human"]]
    assert closed and closed[0]["connections"] == 1
