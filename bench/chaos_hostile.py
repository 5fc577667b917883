"""Hostile clients for the chaos run (issue #7), mixed with the ordinary traffic.

- ``stall``: a raw socket with a tiny SO_RCVBUF sends ``/execute`` and never reads. Once the
  kernel buffers are full, orcd's write makes no progress; after ``--stall-timeout-s`` the
  worker must close the connection and end the job ``cancelled`` / ``client_stalled``.
- ``vanish_admission``: the client closes right after sending headers and body, before any
  reply: its job, if it was admitted at all, ends ``cancelled`` / ``client_disconnect``.
- ``vanish_sent``: the client closes right after the response's status line arrived (the
  job was admitted, its stream opened), before reading an event.
- ``vanish_prompt``: a long prompt; the client closes right after ``started``, while the
  prompt is evaluated.

Each close is a FIN or, drawn at random, an RST. A job that finished before the worker could
notice its client was gone may end ``completed``; nothing else is allowed, and the job must
be final within the cancel bound.
"""

from __future__ import annotations

import random
import signal
import time
from dataclasses import dataclass
from typing import Any

import httpx
import trio
from chaos_checks import BUSY_RETRIES, CANCEL_BOUND_S, FINAL_STATES, JobSpec, Stream
from chaos_client import Chaos
from chaos_raw import (
    TINY_RCVBUF,
    Response,
    close,
    connect,
    execute_request,
    peek_status,
    read_until,
    reset_on_close,
)

KINDS = ("stall", "vanish_admission", "vanish_sent", "vanish_prompt")
STALL_TOKENS = 2000  # far more than the ~400 frames (~20 KB) two socket buffers hold
PROMPT_BYTES = 1500  # vanish_prompt: many evaluation steps of --step-tokens (128)
ADMIT_WINDOW_S = 2.0  # a job not visible this long after its client vanished never was


@dataclass(frozen=True)
class Hostile:
    kind: str
    job_id: str
    body: dict[str, Any]
    rst: bool  # close with an RST instead of a FIN


def make_hostiles(rng: random.Random, per_kind: int, prefix: str) -> list[Hostile]:
    out = []
    for kind in KINDS:
        for i in range(per_kind):
            job_id = f"{prefix}-{kind}-{i:03d}"
            body: dict[str, Any] = {"job_id": job_id, "prompt": "go", "seed": rng.randrange(1000)}
            if kind == "stall":
                body["max_tokens"] = STALL_TOKENS
            elif kind == "vanish_prompt":
                body["prompt"] = "".join(rng.choice("abcdefgh ") for _ in range(PROMPT_BYTES))
                body["max_tokens"] = rng.randint(50, 400)
            else:
                body["max_tokens"] = rng.randint(20, 800)
            out.append(Hostile(kind, job_id, body, rst=rng.random() < 0.5))
    return out


class HostileClients:
    """Runs hostile clients against one worker and judges their jobs' records."""

    def __init__(self, chaos: Chaos, stall_timeout_s: float) -> None:
        self.chaos = chaos
        self.stall_timeout_s = stall_timeout_s
        url = chaos.client.base_url
        assert url.port is not None
        self.host, self.port = url.host, url.port

    def count(self, h: Hostile, outcome: str) -> None:
        self.chaos.report.hostile[f"{h.kind}:{outcome}"] += 1

    def bad(self, h: Hostile, msg: str) -> None:
        self.chaos.report.bad(f"{h.kind} {h.job_id}", msg)

    async def run(self, h: Hostile) -> None:
        """One hostile client, retried like any client while the worker answers busy."""
        for attempt in range(BUSY_RETRIES):
            if await self._once(h):
                return
            await trio.sleep(random.Random(f"{h.job_id}{attempt}").uniform(0.05, 0.3))
        self.count(h, "gave_up_busy")

    async def _once(self, h: Hostile) -> bool:
        """False when the worker answered 503 (busy): try again."""
        st = Stream(JobSpec(h.job_id, h.kind, h.body), self.chaos.cid(h.job_id),
                    self.chaos.report, self.chaos.queue_depth)
        rcvbuf = TINY_RCVBUF if h.kind == "stall" else None
        stream = await connect(self.host, self.port, rcvbuf=rcvbuf)
        try:
            if h.rst:
                reset_on_close(stream)
            await stream.send_all(execute_request(h.body, st.cid))
            if h.kind == "vanish_admission":
                await close(stream)
                await self._judge_vanished(h, may_be_unknown=True)
                return True
            status = await peek_status(stream, CANCEL_BOUND_S * 2)
            if status == 503:
                return False
            if status != 200:
                self.bad(h, f"/execute answered {status}")
                return True
            if h.kind == "stall":
                await self._stalled(h, stream, st)
                return True
            if h.kind == "vanish_prompt":
                resp = Response(st)
                how = await read_until(stream, resp, 60.0,
                                       stop=lambda r: r.stream.started is not None)
                if how != "stop":
                    self.bad(h, f"stream ended ({how}) before started; phase {st.phase()}")
                    return True
            await close(stream)
            await self._judge_vanished(h, may_be_unknown=False)
            return True
        finally:
            await close(stream)

    async def _stalled(self, h: Hostile, stream: trio.SocketStream, st: Stream) -> None:
        snap = await self._wait_final(h, bound=CANCEL_BOUND_S + self.stall_timeout_s + 60)
        if snap is None:
            return
        state, reason = snap["state"], snap.get("cancel_reason")
        if state == "cancelled" and reason == "client_stalled":
            self.count(h, "client_stalled")
        elif state == "completed":  # it ran to its end before its writes were stuck that long
            self.count(h, "completed")
        else:
            self.bad(h, f"a client that never read ended {state}/{reason}: {snap.get('error')}")
        # What the kernel held for it: well-formed frames; a stalled stream is cut before its
        # terminal event, a completed one may end with it; nothing after it either way.
        resp = Response(st)
        how = await read_until(stream, resp, self.stall_timeout_s + CANCEL_BOUND_S)
        if how == "timeout":
            self.bad(h, f"connection still open {self.stall_timeout_s + CANCEL_BOUND_S:g} s "
                        f"after its job ended {state}, {st.tokens} token frames read")
        if reason == "client_stalled" and st.terminal is not None:
            self.bad(h, f"a stalled stream got its terminal event {st.terminal}")
        if st.tokens == 0 and resp.status == 200:
            self.bad(h, "the stalled client's socket held no token frame")

    async def _judge_vanished(self, h: Hostile, *, may_be_unknown: bool) -> None:
        snap = await self._wait_final(h, bound=CANCEL_BOUND_S, may_be_unknown=may_be_unknown)
        if snap is None:
            if may_be_unknown:
                self.count(h, "never_admitted")
            return
        state, reason = snap["state"], snap.get("cancel_reason")
        if state == "cancelled" and reason == "client_disconnect":
            self.count(h, "client_disconnect")
        elif state == "completed":
            self.count(h, "completed")
        else:
            self.bad(h, f"a vanished client's job ended {state}/{reason}: {snap.get('error')}")

    async def _wait_final(self, h: Hostile, *, bound: float,
                          may_be_unknown: bool = False) -> dict[str, Any] | None:
        """The job's record once final (and recorded in the ledger); None if it never
        existed (only where ``may_be_unknown``) or never became final (a violation)."""
        chaos = self.chaos
        t0 = trio.current_time()
        first_seen: float | None = None
        snap = None
        while True:
            snap = await chaos.snapshot(h.job_id)
            now = trio.current_time()
            if snap is not None:
                first_seen = now if first_seen is None else first_seen
                if snap["state"] in FINAL_STATES:
                    chaos.record(h.job_id, snap)
                    return snap
                if now - first_seen > bound:
                    self.bad(h, f"still {snap['state']} {bound:g} s after its client "
                                f"{'stopped reading' if h.kind == 'stall' else 'vanished'}")
                    return None
            elif now - t0 > (ADMIT_WINDOW_S if may_be_unknown else bound):
                if not may_be_unknown:
                    self.bad(h, "GET /jobs/{id} is 404 for a job whose stream had opened")
                return None
            await trio.sleep(0.02)


# -- SIGTERM while hostile clients hold streams -------------------------------------------

DRIP_PIECE, DRIP_PAUSE = 1024, 0.1  # ~10 KB/s: progress every write, far behind the tokens


async def shutdown_with_hostiles(chaos: Chaos, server: Any, *, slots: int, queue_depth: int,
                                 drain_s: float, grace_s: float) -> dict[str, Any]:
    """The last phase: every slot and queue place taken by a client that never reads, one
    that reads a trickle, and ordinary readers; then SIGTERM. Each ordinary reader still
    gets exactly one terminal event (end, or CANCELLED reason shutdown), new work gets 503
    SHUTTING_DOWN, and the process exits 0 within --drain-timeout-s plus the grace, whatever
    the hostile clients do. Returns the exit code and how long the exit took."""
    rep = chaos.report
    hc = HostileClients(chaos, 0.0)
    n_stall, n_drip = min(2, slots), 1 if slots > 2 else 0
    n_read = max(1, slots + queue_depth - n_stall - n_drip)
    first_frames = trio.Semaphore(0)
    done: list[Stream] = []
    socks: list[trio.SocketStream] = []
    drips: list[str] = []

    async def hostile_stream(i: int, drip: bool) -> None:
        job_id = f"drain-{'drip' if drip else 'stall'}-{i}"
        body = {"job_id": job_id, "prompt": "drain", "max_tokens": STALL_TOKENS}
        st = Stream(JobSpec(job_id, "drain", body), chaos.cid(job_id), rep, queue_depth)
        stream = await connect(hc.host, hc.port, rcvbuf=TINY_RCVBUF)
        socks.append(stream)
        await stream.send_all(execute_request(body, st.cid))
        if drip:
            resp = Response(st)
            how = await read_until(stream, resp, 60.0, piece=DRIP_PIECE, pause=DRIP_PAUSE)
            drips.append("terminal" if st.terminal is not None else how)

    async def reader(i: int) -> None:
        job_id = f"drain-read-{i}"
        body = {"job_id": job_id, "prompt": "drain é🙂", "max_tokens": 960}
        st = Stream(JobSpec(job_id, "drain", body), chaos.cid(job_id), rep, queue_depth)
        stream = await connect(hc.host, hc.port)
        socks.append(stream)
        resp = Response(st)
        await stream.send_all(execute_request(body, st.cid))
        how = await read_until(stream, resp, 60.0, stop=lambda r: r.stream.queued or
                               r.stream.started or r.status not in (None, 200))
        first_frames.release()
        if resp.status != 200:
            st.bad(f"/execute before the shutdown answered {resp.status}")
            return
        if how == "stop":
            how = await read_until(stream, resp, 60.0)
        if st.terminal is None:
            st.bad(f"no terminal event before the worker exited ({how}, phase {st.phase()})")
        elif st.terminal[0] == "error" and (st.terminal[1].get("code"), st.terminal[1].get(
                "reason")) != ("CANCELLED", "shutdown"):
            st.bad(f"drained with {st.terminal[1]}")
        else:  # nothing after the terminal event: the connection stays quiet or closes
            extra = await read_until(stream, resp, 0.2)
            if extra not in ("timeout", "eof", "reset", "terminal"):
                st.bad(f"after the terminal event: {extra}")
        done.append(st)

    async def running(job_id: str) -> None:
        with trio.move_on_after(30):
            while True:
                snap = await chaos.snapshot(job_id)
                if snap is not None and snap["state"] != "queued":
                    return
                await trio.sleep(0.02)
        rep.bad("shutdown", f"{job_id} never started before the SIGTERM")

    exit_code: int | None = None
    exit_s = 0.0
    async with trio.open_nursery() as nursery:
        for i in range(n_stall):
            nursery.start_soon(hostile_stream, i, False)
            await running(f"drain-stall-{i}")
        for i in range(n_drip):
            nursery.start_soon(hostile_stream, i, True)
            await running(f"drain-drip-{i}")
        for i in range(n_read):
            nursery.start_soon(reader, i)
        with trio.move_on_after(30):
            for _ in range(n_read):
                await first_frames.acquire()
        assert server.proc is not None
        t_signal = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        bound = drain_s + grace_s + 1.0
        await trio.sleep(0.05)
        try:
            resp = await chaos.client.post("/execute", json={"job_id": "after-sigterm",
                                                             "prompt": "hi", "max_tokens": 1})
            if resp.status_code != 503:
                rep.bad("shutdown", f"/execute while draining answered {resp.status_code}")
            else:
                chaos.check_envelope("shutdown", resp, "SHUTTING_DOWN")
        except httpx.HTTPError:
            pass  # already stopped listening
        exit_code, _ = await trio.to_thread.run_sync(server.wait_exit, bound + 30)
        exit_s = time.monotonic() - t_signal
        if exit_code is None or exit_s > bound:
            rep.bad("shutdown", f"the process took {exit_s:.2f} s to exit after SIGTERM "
                                f"(bound: drain {drain_s:g} s + grace {grace_s:g} s + 1 s)")
        for stream in socks:  # the stallers never read; their sockets just close now
            await close(stream)
    for st in done:
        outcome = "end" if st.terminal and st.terminal[0] == "end" else "cancelled"
        rep.counts[f"drain_{outcome}"] += 1
    rep.figures["shutdown"] = {"exit_code": exit_code, "exit_s": round(exit_s, 2),
                               "stalled": n_stall, "drip": drips, "readers": n_read}
    return {"exit_code": exit_code, "exit_s": exit_s}
