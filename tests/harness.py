"""Test harness: a real orcd server in-process on port 0, an SSE client, and gates.

A :class:`Gate` holds the generation thread at a chosen point (the prompt phase, the
N-th token, or inside a running llama_decode through the abort callback) until the test
releases it, so "cancel in phase X" is deterministic: no sleeps, no hoping.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from orcd.auth import add_token
from orcd.bridge import Engine
from orcd.config import Config
from orcd.engine import BatchEngine, EngineStats, Outcome, Phase, SeqRequest
from orcd.server import Worker, serve

HOLD_LIMIT_S = 20.0


@attrs.frozen
class Event:
    name: str
    data: dict[str, Any]


class Gate:
    """Blocks the generation thread once at its point until :meth:`open` is called."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.released = threading.Event()
        self.armed = True

    def hold(self) -> None:
        if self.armed:
            self.armed = False
            self.reached.set()
            self.released.wait(HOLD_LIMIT_S)

    async def wait_reached(self) -> None:
        ok = await trio.to_thread.run_sync(self.reached.wait, HOLD_LIMIT_S)
        assert ok, "the generation never reached the gate"

    def open(self) -> None:
        self.released.set()


class GatedEngine:
    """The real :class:`BatchEngine`, with gates the test can place on its way.

    A gate holds the engine thread, so it holds every running sequence at once.
    """

    def __init__(self, inner: BatchEngine) -> None:
        self.inner = inner
        self.info = inner.info
        self.at_tokenize: Gate | None = None  # inside admission's tokenization
        self.at_prompt: Gate | None = None  # when a sequence joins, before its prompt
        self.at_token: dict[int, Gate] = {}  # after the N-th token was reported
        self.in_decode: Gate | None = None  # inside llama_decode (through the abort callback)
        self.generations = 0

    @property
    def n_slots(self) -> int:
        return self.inner.n_slots

    @property
    def abort_callback(self) -> str:
        return self.inner.abort_callback

    @property
    def on_step(self) -> Callable[[int, int, float], None] | None:
        return self.inner.on_step

    @on_step.setter
    def on_step(self, observe: Callable[[int, int, float], None] | None) -> None:
        self.inner.on_step = observe

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = True) -> list[int]:
        if self.at_tokenize is not None:
            self.at_tokenize.hold()
        return self.inner.tokenize(text, special=special, add_bos=add_bos)

    def run(self) -> None:
        self.inner.run()

    def stop(self) -> None:
        self.inner.stop()

    def cancel(self, req: SeqRequest) -> None:
        self.inner.cancel(req)

    def statistics(self) -> EngineStats:
        return self.inner.statistics()

    def close(self) -> None:
        self.inner.close()

    def kv_outside_cache(self) -> int:
        """KV positions held by anything but the prefix cache: 0 whenever no job runs."""
        stats = self.inner.statistics()
        return stats.kv_tokens_used - stats.prefix_cache_tokens

    def start(self, req: SeqRequest) -> None:
        self.generations += 1
        gates = self
        sink = req.sink

        class _Sink:
            def phase(self, phase: Phase) -> None:
                sink.phase(phase)
                if phase == "prompt":
                    if gates.in_decode is not None:
                        gates.inner.set_abort_probe(gates.in_decode.hold)
                    if gates.at_prompt is not None:
                        gates.at_prompt.hold()

            def token(self, text: str, tokens_out: int) -> None:
                sink.token(text, tokens_out)
                gate = gates.at_token.get(tokens_out)
                if gate is not None:
                    gate.hold()

            def finished(self, outcome: Outcome) -> None:
                gates.inner.set_abort_probe(None)
                sink.finished(outcome)

        req.sink = _Sink()  # the same request object: the registry cancels it by identity
        self.inner.start(req)


def engine_factory(model: Path, holder: list[Any], *, gated: bool = True,
                   before_load: Callable[[], None] | None = None
                   ) -> Callable[[Config, Callable[[float], None]], Engine]:
    def factory(config: Config, on_progress: Callable[[float], None]) -> Engine:
        if before_load is not None:
            before_load()
        inner = BatchEngine(model, n_ctx=config.n_ctx, threads=config.threads,
                            slots=config.slots, step_tokens=config.step_tokens,
                            prefix_cache_tokens=config.prefix_cache_tokens,
                            on_progress=on_progress)
        engine: Engine = GatedEngine(inner) if gated else inner
        holder.append(engine)
        return engine
    return factory


@attrs.define
class Harness:
    worker: Worker
    client: httpx.AsyncClient
    engines: list[Any]

    @property
    def engine(self) -> GatedEngine:
        return self.engines[0]

    async def execute(self, **body: Any) -> list[Event]:  # noqa: D102
        async with self.stream(**body) as events:
            return [e async for e in events]

    @asynccontextmanager
    async def stream(self, headers: dict[str, str] | None = None, **body: Any
                     ) -> AsyncIterator[AsyncIterator[Event]]:
        async with self.client.stream("POST", "/execute", json=body, headers=headers) as resp:
            assert resp.status_code == 200, (resp.status_code, await resp.aread())
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = sse_events(resp)
            try:
                yield events
            finally:
                await events.aclose()

    async def cancel(self, job_id: Any) -> httpx.Response:
        return await self.client.post("/cancel", json={"job_id": job_id})

    async def job(self, job_id: str) -> dict[str, Any]:
        resp = await self.client.get(f"/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()

    async def settled(self) -> None:
        """Wait until no job holds a slot or waits for one.

        A cancel's terminal event goes out at once; the slot passes on only when the engine
        has freed the sequence, at the end of its step. KV checks come after this.
        """
        with trio.fail_after(10):
            while True:
                stats = self.worker.registry.statistics()
                if stats.running == 0 and stats.queued == 0:
                    return
                await trio.sleep(0.005)

    async def wait_state(self, job_id: str, *states: str) -> dict[str, Any]:
        with trio.fail_after(10):
            while True:
                job = self.worker.registry.get(job_id)
                if job is not None and job.state in states:
                    return await self.job(job_id)
                await trio.sleep(0.005)


async def sse_events(resp: httpx.Response) -> AsyncGenerator[Event, None]:
    """Parse an SSE body into events; checks every frame's shape on the way."""
    name: str | None = None
    async for line in resp.aiter_lines():
        if line.startswith(":"):
            continue
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            assert name is not None, "data line without an event line"
            yield Event(name, json.loads(line[len("data: "):]))
            name = None


def make_auth_file(path: Path, **roles: str) -> dict[str, str]:
    """An auth file with one principal per ``name=role``; returns each one's token."""
    return {name: add_token(path, name, admin=role == "admin") for name, role in roles.items()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def running_worker(model: Path, *, gated: bool = True,
                         before_load: Callable[[], None] | None = None,
                         wait_ready: bool = True, **overrides: Any
                         ) -> AsyncIterator[Harness]:
    """Serve ``model`` on 127.0.0.1:0 for the block; drain and stop it afterwards."""
    config = Config(**{"port": 0, "n_ctx": 1024, "threads": 1, "worker_id": "test",
                       "ledger": "none", **overrides})
    engines: list[Any] = []
    factory = engine_factory(model, engines, gated=gated, before_load=before_load)
    async with trio.open_nursery() as nursery:
        worker = await nursery.start(partial(serve, config, engine_factory=factory))
        async with httpx.AsyncClient(base_url=worker.uri, timeout=30) as client:
            harness = Harness(worker, client, engines)
            try:
                if wait_ready:
                    with trio.fail_after(30):
                        while worker.engine is None:
                            await trio.sleep(0.01)
                yield harness
            finally:
                for engine in engines:
                    if isinstance(engine, GatedEngine):
                        for gate in [engine.at_prompt, engine.in_decode,
                                     *engine.at_token.values()]:
                            if gate is not None:
                                gate.open()
                worker.request_shutdown("test over")
