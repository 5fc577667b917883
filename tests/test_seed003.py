"""Seed 003's cancellation cases, against a real worker with principals and a ledger.

The seed's two steps map onto orcd's record: a cancel *request* sets ``cancel_requested_at``
and ``cancelled_by`` while the job is still ``running`` or ``queued``; its *enforcement*
makes the job ``cancelled`` and sets ``cancelled_at``. Every case is checked in the HTTP
record and in the ledger row that outlives the process (the restart case, where a requested
cancel is enforced by the next process, is in test_ledger_restart.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from orcd.auth import Principal

from .conftest import LogCapture
from .harness import Event, Gate, Harness, bearer, make_auth_file, running_worker, sse_events

ROLES = {"alice": "user", "bob": "user", "ops": "admin"}
# What a cancel must never change in a record.
METADATA = ("job_id", "principal", "correlation_id", "created_at", "started_at", "max_tokens")


@asynccontextmanager
async def seed_worker(tiny_model: Path, tmp_path: Path, **overrides: Any
                      ) -> AsyncIterator[tuple[Harness, dict[str, httpx.AsyncClient]]]:
    tokens = make_auth_file(tmp_path / "auth", **ROLES)
    async with running_worker(tiny_model, auth_file=tmp_path / "auth",
                              ledger=tmp_path / "ledger.sqlite3", **overrides) as h:
        clients = {name: httpx.AsyncClient(base_url=h.worker.uri, timeout=30,
                                           headers=bearer(token))
                   for name, token in tokens.items()}
        try:
            yield h, clients
        finally:
            for client in clients.values():
                await client.aclose()


async def stream_into(client: httpx.AsyncClient, job_id: str, events: list[Event],
                      **body: Any) -> None:
    body = {"job_id": job_id, "prompt": "hello", "max_tokens": 50, **body}
    async with client.stream("POST", "/execute", json=body,
                             headers={"X-Correlation-Id": f"corr-{job_id}"}) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for event in sse_events(resp):
            events.append(event)


async def ledger_row(h: Harness, principal: str, job_id: str) -> dict[str, Any]:
    ledger = h.worker.registry.ledger
    assert ledger is not None
    assert await trio.to_thread.run_sync(ledger.flush)
    row = await trio.to_thread.run_sync(ledger.get, principal, job_id)
    assert row is not None, (principal, job_id)
    return row


async def until(predicate: Any) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.005)


async def test_cancel_marks_requested_then_cancelled(tiny_model: Path, tmp_path: Path,
                                                     log_capture: LogCapture) -> None:
    async with seed_worker(tiny_model, tmp_path) as (h, users):
        registry = h.worker.registry
        h.engine.at_token[2] = gate = Gate()
        events: list[Event] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream_into, users["alice"], "s-1", events)
            await gate.wait_reached()
            # Step 1, the request: the same call POST /cancel makes, read before the job's
            # task has run again.
            state = registry.cancel("s-1", "corr-cancel", Principal("alice", "user"))
            job = registry.get("s-1", "alice")
            assert state == "running" and job is not None
            requested = job.snapshot()
            assert requested["state"] == "running"
            assert requested["cancel_requested_at"] is not None
            assert requested["cancelled_by"] == "alice"
            assert requested["cancel_reason"] == "client_request"
            assert requested["cancelled_at"] is None
            # Step 2, enforced: the stream ends and the record says cancelled.
            await until(lambda: bool(events) and events[-1].name == "error")
            gate.open()
        record = (await users["alice"].get("/jobs/s-1")).json()
        assert record["state"] == "cancelled" and record["cancelled_by"] == "alice"
        assert record["cancel_requested_at"] == requested["cancel_requested_at"]
        assert record["cancelled_at"] is not None
        assert record["cancelled_at"] >= record["cancel_requested_at"]
        assert record["error"]["code"] == "CANCELLED"
        row = await ledger_row(h, "alice", "s-1")
        assert {k: row[k] for k in record} == record
        # The log tells the two steps apart, in order.
        actions = [(line["action"], line.get("cancelled_by")) for line in log_capture.lines()
                   if line.get("job_id") == "s-1" and line["action"] in
                   ("cancel", "cancel_complete")]
        assert actions == [("cancel", "alice"), ("cancel_complete", "alice")]


async def test_a_cancel_through_the_api_enforces_before_it_answers(
        tiny_model: Path, tmp_path: Path, log_capture: LogCapture) -> None:
    """``POST /cancel`` (``cancel_or_recall``): the request is recorded, then enforced in the
    same call, while the engine still holds the sequence: the terminal event is queued and
    the record says cancelled when the call returns, before the job's own task has had the
    scheduler turns it needs to do it."""
    async with seed_worker(tiny_model, tmp_path) as (h, users):
        registry = h.worker.registry
        h.engine.at_token[2] = gate = Gate()
        events: list[Event] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream_into, users["alice"], "s-now", events)
            await gate.wait_reached()  # the engine thread is held: nothing can free the job
            job = registry.get("s-now", "alice")
            assert job is not None and job.state == "running"
            state = await registry.cancel_or_recall("s-now", "corr-now",
                                                    Principal("alice", "user"))
            assert state == "running"  # what the cancel found
            record = job.snapshot()
            assert record["state"] == "cancelled" and record["cancelled_at"] is not None
            assert record["cancel_requested_at"] <= record["cancelled_at"]
            assert job.generation is not None and not job.generation.done.is_set()
            await until(lambda: bool(events) and events[-1].name == "error")
            assert events[-1].data["code"] == "CANCELLED"
            assert registry.statistics().running == 1  # the slot waits for the engine
            gate.open()
        await h.settled()
        actions = [line["action"] for line in log_capture.lines()
                   if line.get("job_id") == "s-now" and line["action"] in
                   ("cancel", "cancel_complete")]
        assert actions == ["cancel", "cancel_complete"]


async def test_cancel_of_a_job_without_a_running_generation(tiny_model: Path,
                                                            tmp_path: Path) -> None:
    """A queued job (no sequence in the engine yet) and an id with no job at all."""
    async with seed_worker(tiny_model, tmp_path, slots=1) as (h, users):
        alice = users["alice"]
        h.engine.at_token[2] = gate = Gate()
        running: list[Event] = []
        queued: list[Event] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream_into, alice, "busy", running)
            await gate.wait_reached()
            nursery.start_soon(stream_into, alice, "waiting", queued)
            await until(lambda: bool(queued) and queued[0].name == "queued")
            resp = await alice.post("/cancel", json={"job_id": "waiting"})
            assert resp.status_code == 202 and resp.json()["state"] == "queued"
            await until(lambda: queued[-1].name == "error")
            gate.open()
        record = (await alice.get("/jobs/waiting")).json()
        assert record["state"] == "cancelled" and record["started_at"] is None
        assert record["cancelled_by"] == "alice" and record["tokens_out"] == 0
        assert record["cancel_requested_at"] and record["cancelled_at"]
        assert running[-1].name == "end"  # the running job never noticed
        # No job at all: the request is remembered, and enforced when the job arrives.
        resp = await alice.post("/cancel", json={"job_id": "later"})
        assert resp.status_code == 202 and resp.json()["state"] == "unknown"
        assert (await alice.get("/jobs/later")).status_code == 404
        events: list[Event] = []
        await stream_into(alice, "later", events)
        assert [e.name for e in events] == ["error"]
        assert events[0].data["reason"] == "cancelled_before_start"
        record = (await alice.get("/jobs/later")).json()
        assert (record["state"], record["cancelled_by"]) == ("cancelled", "alice")
        assert (await ledger_row(h, "alice", "later"))["state"] == "cancelled"


async def test_repeated_cancel_changes_nothing(tiny_model: Path, tmp_path: Path) -> None:
    async with seed_worker(tiny_model, tmp_path) as (h, users):
        alice, ops = users["alice"], users["ops"]
        h.engine.at_token[2] = gate = Gate()
        events: list[Event] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream_into, alice, "r-1", events)
            await gate.wait_reached()
            first = await alice.post("/cancel", json={"job_id": "r-1"})
            assert first.json()["state"] == "running"
            await until(lambda: bool(events) and events[-1].name == "error")
            settled = (await alice.get("/jobs/r-1")).json()
            for client, body in [(alice, {"job_id": "r-1"}), (alice, {"job_id": "r-1"}),
                                 (ops, {"job_id": "r-1", "principal": "alice"})]:
                again = await client.post("/cancel", json=body)
                assert again.status_code == 202 and again.json()["state"] == "cancelled"
            gate.open()
        assert (await alice.get("/jobs/r-1")).json() == settled  # first canceller kept
        assert settled["cancelled_by"] == "alice"
        assert [e.name for e in events].count("error") == 1
        # A completed job stays completed, however often it is cancelled.
        done: list[Event] = []
        await stream_into(alice, "r-2", done, max_tokens=3)
        for _ in range(3):
            assert (await alice.post("/cancel", json={"job_id": "r-2"})).json()["state"] \
                == "completed"
        record = (await alice.get("/jobs/r-2")).json()
        assert (record["state"], record["cancelled_by"], record["cancel_requested_at"]) == (
            "completed", None, None)


async def test_cancel_keeps_the_metadata(tiny_model: Path, tmp_path: Path) -> None:
    async with seed_worker(tiny_model, tmp_path) as (h, users):
        alice = users["alice"]
        h.engine.at_token[3] = gate = Gate()
        events: list[Event] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(stream_into, alice, "m-1", events, max_tokens=40, seed=7))
            await gate.wait_reached()
            before = (await alice.get("/jobs/m-1")).json()
            await alice.post("/cancel", json={"job_id": "m-1"})
            await until(lambda: bool(events) and events[-1].name == "error")
            gate.open()
        after = (await alice.get("/jobs/m-1")).json()
        assert {k: after[k] for k in METADATA} == {k: before[k] for k in METADATA}
        assert after["correlation_id"] == "corr-m-1" and after["max_tokens"] == 40
        assert after["tokens_out"] >= before["tokens_out"] >= 3
        assert after["started_at"] is not None
        row = await ledger_row(h, "alice", "m-1")
        assert {k: row[k] for k in METADATA} == {k: before[k] for k in METADATA}
        assert "prompt" not in row and "hello" not in str(row)  # never the text


async def test_two_users_cannot_see_each_others_cancelled_jobs(tiny_model: Path,
                                                               tmp_path: Path) -> None:
    async with seed_worker(tiny_model, tmp_path) as (h, users):
        for name in ("alice", "bob"):
            await users[name].post("/cancel", json={"job_id": f"{name}-c"})
            events: list[Event] = []
            await stream_into(users[name], f"{name}-c", events)
            await stream_into(users[name], f"{name}-done", events, max_tokens=2)
        for name in ("alice", "bob"):
            cancelled = (await users[name].get("/jobs", params={"state": "cancelled"})).json()
            assert [(j["principal"], j["job_id"]) for j in cancelled["jobs"]] == [
                (name, f"{name}-c")]
            everything = (await users[name].get("/jobs")).json()["jobs"]
            assert {j["principal"] for j in everything} == {name}
        seen = (await users["ops"].get("/jobs", params={"state": "cancelled"})).json()["jobs"]
        assert sorted((j["principal"], j["job_id"]) for j in seen) == [
            ("alice", "alice-c"), ("bob", "bob-c")]
        ledger = h.worker.registry.ledger
        assert ledger is not None and await trio.to_thread.run_sync(ledger.flush)
        rows = await trio.to_thread.run_sync(ledger.list, "bob", "cancelled")
        assert [(r["principal"], r["job_id"]) for r in rows] == [("bob", "bob-c")]


async def test_the_states_stay_distinct(tiny_model: Path, tmp_path: Path) -> None:
    """Requested is not cancelled, cancelled is not failed, and ``cancelled_by`` tells who:
    the canceller, the owner for a disconnect, ``system`` for a deadline and a shutdown."""
    async with seed_worker(tiny_model, tmp_path) as (h, users):
        alice = users["alice"]
        states = {}

        async def stopped(job_id: str, stop: Callable[[], Awaitable[object]],
                          **body: Any) -> None:
            """Alice's job ``job_id`` held at its second token while ``stop()`` runs, until
            its stream ends with an error; then the engine goes on."""
            h.engine.at_token[2] = gate = Gate()
            events: list[Event] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(stream_into, alice, job_id, events, **body))
                await gate.wait_reached()
                await stop()
                await until(lambda: bool(events) and events[-1].name == "error")
                gate.open()

        async def nothing() -> None:
            pass

        # A deadline: failed, INFERENCE_TIMEOUT, cancelled by the worker.
        await stopped("d-1", nothing, timeout_ms=200)
        states["deadline"] = (await alice.get("/jobs/d-1")).json()
        # A disconnect: cancelled by the owner.
        h.engine.at_token[2] = gate = Gate()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream_into, alice, "x-1", [])
            await gate.wait_reached()
            nursery.cancel_scope.cancel()  # the client goes away
        await until(lambda: getattr(h.worker.registry.get("x-1", "alice"), "state", "")
                    == "cancelled")
        gate.open()
        states["disconnect"] = (await alice.get("/jobs/x-1")).json()
        # A cancel by an admin.
        await stopped("o-1", partial(users["ops"].post, "/cancel",
                                     json={"job_id": "o-1", "principal": "alice"}))
        states["admin"] = (await alice.get("/jobs/o-1")).json()

        # A shutdown: the running job is cancelled by the worker.
        async def shut_down() -> None:
            h.worker.request_shutdown("test")

        await stopped("z-1", shut_down)
        states["shutdown"] = (await ledger_row(h, "alice", "z-1"))
    got = {cause: (r["state"], r["cancel_reason"], r["cancelled_by"],
                   (r["error"] or {}).get("code")) for cause, r in states.items()}
    assert got == {
        "deadline": ("failed", "deadline", "system", "INFERENCE_TIMEOUT"),
        "disconnect": ("cancelled", "client_disconnect", "alice", "CANCELLED"),
        "admin": ("cancelled", "client_request", "ops", "CANCELLED"),
        "shutdown": ("cancelled", "shutdown", "system", "CANCELLED"),
    }
    for record in states.values():
        assert record["cancel_requested_at"] and record["cancelled_at"]
