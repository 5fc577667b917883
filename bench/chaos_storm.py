"""A storm of ``/cancel`` calls for job ids nobody ever executes (issue #7).

Each such cancel leaves a tombstone (CONTRACT §4: remembered 60 s, so that a cancel that
overtakes its execute still wins). orcd keeps at most ``cancel_memory_max`` of them (100,000
by default), dropping the oldest first, and expires them in O(1). The storm sends its calls
pipelined on a few keep-alive connections while a probe, on a connection of its own, times
``GET /health`` and one ``/cancel`` every 25 ms before, during and after it. Then:

- the newest storm id is still remembered: its ``/execute`` gets only ``CANCELLED``
  (``cancelled_before_start``);
- past the cap, the oldest is forgotten (its ``/execute`` runs); below it, it is remembered;
- RSS stops growing once the cap is reached (checked when the storm passes 1.5 x the cap);
- the worker answers every call 202 and stays healthy.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import trio
from chaos_checks import JobSpec, Report, Stream
from chaos_client import Chaos
from chaos_raw import Response, close, connect, execute_request, read_until

CANCEL_MEMORY_MAX = 100_000  # orcd's default cancel_memory_max
CANCEL_MEMORY_S = 60.0  # orcd's default cancel_memory_s
CAP_RSS_GROWTH = 0.05  # RSS growth allowed from 1.1 x the cap to the end of the storm
CONNECTIONS, DEPTH = 6, 32  # storm connections, requests in flight on each
PROBE_EVERY_S = 0.025
QUIET_S = 1.5  # probing alone before and after the storm


def cancel_request(job_id: str) -> bytes:
    payload = json.dumps({"job_id": job_id}).encode()
    return (b"POST /cancel HTTP/1.1\r\nHost: orcd\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)


def storm_id(i: int) -> str:
    return f"storm-{i:07d}"


def take_responses(buf: bytearray, statuses: list[int]) -> None:
    """Move every complete response at the head of ``buf`` into ``statuses``."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).split(b"\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(buf) < end + 4 + length:
            return
        statuses.append(int(head[0].split()[1]))
        del buf[:end + 4 + length]


class Storm:
    def __init__(self, chaos: Chaos, server: Any, n: int, budget_s: float | None) -> None:
        self.chaos, self.server, self.n, self.budget_s = chaos, server, n, budget_s
        url = chaos.client.base_url
        assert url.port is not None
        self.host, self.port = url.host, url.port
        self.sent = 0  # ids handed out
        self.answered: dict[int, int] = {}  # status -> count
        self.phase = "before"
        self.latency: dict[str, dict[str, list[float]]] = {
            p: {"health": [], "cancel": []} for p in ("before", "during", "after")}
        self.rss: list[tuple[int, int]] = []  # (calls answered, RSS kB)
        self.probe_failures = 0
        self.reconnects = 0
        self.t_first_storm_cancel = 0.0

    @property
    def done_calls(self) -> int:
        return sum(self.answered.values())

    async def run(self) -> dict[str, Any]:
        rep = self.chaos.report
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._probe)
            nursery.start_soon(self._sample_rss)
            await trio.sleep(QUIET_S)
            self.phase = "during"
            t0 = time.monotonic()
            self.t_first_storm_cancel = trio.current_time()
            async with trio.open_nursery() as storm:
                deadline = None if self.budget_s is None else trio.current_time() + self.budget_s
                for _ in range(CONNECTIONS):
                    storm.start_soon(self._connection, deadline)
            elapsed = time.monotonic() - t0
            self.phase = "after"
            await trio.sleep(QUIET_S)
            nursery.cancel_scope.cancel()
        calls = self.done_calls
        if self.answered.get(202, 0) != calls:
            rep.bad("storm", f"/cancel for unknown ids answered {self.answered}")
        if self.probe_failures:
            rep.bad("storm", f"{self.probe_failures} probe requests failed during the storm")
        await self._check_tombstones(calls)
        growth = self._rss_growth_past_cap()
        if growth is not None and growth > CAP_RSS_GROWTH:
            rep.bad("storm", f"RSS grew {growth * 100:.1f} % after the tombstone cap was "
                             f"reached: {self.rss[-1]}")
        fig = {"calls": calls, "seconds": round(elapsed, 1), "reconnects": self.reconnects,
               "rate_per_s": round(calls / elapsed) if elapsed else 0,
               "budget_s": self.budget_s, "rss_kb": [kb for _, kb in self.rss[:1] + self.rss[-1:]],
               "rss_growth_past_cap": growth,
               "latency_ms": {p: {ep: percentiles(v) for ep, v in eps.items()}
                              for p, eps in self.latency.items()}}
        rep.figures["storm"] = fig
        return fig

    async def _connection(self, deadline: float | None) -> None:
        """Send batches of pipelined cancels until the ids or the time run out. hypercorn
        closes a keep-alive connection after its 1000th request (keep_alive_max_requests):
        the calls it left unanswered go again on a new connection."""
        pending: list[str] = []
        while True:
            stream = await connect(self.host, self.port)
            buf = bytearray()
            try:
                while True:
                    if not pending:
                        if deadline is not None and trio.current_time() >= deadline:
                            return
                        batch = min(DEPTH, self.n - self.sent)
                        if batch <= 0:
                            return
                        pending = [storm_id(self.sent + k) for k in range(batch)]
                        self.sent += batch
                    await stream.send_all(b"".join(cancel_request(i) for i in pending))
                    statuses: list[int] = []
                    while len(statuses) < len(pending):
                        try:
                            data = await stream.receive_some(65536)
                        except trio.BrokenResourceError:
                            data = b""
                        if not data:
                            break
                        buf += data
                        take_responses(buf, statuses)
                    for status in statuses:
                        self.answered[status] = self.answered.get(status, 0) + 1
                    pending = pending[len(statuses):]
                    if pending:  # closed by the worker: the rest on a new connection
                        self.reconnects += 1
                        break
            finally:
                await close(stream)

    async def _probe(self) -> None:
        async with httpx.AsyncClient(base_url=self.chaos.client.base_url, timeout=30.0,
                                     limits=httpx.Limits(max_connections=1)) as own:
            k = 0
            while True:
                k += 1
                phase = self.phase
                for endpoint in ("health", "cancel"):
                    t = time.perf_counter()
                    try:
                        if endpoint == "health":
                            resp = await own.get("/health")
                        else:
                            resp = await own.post("/cancel", json={"job_id": f"probe-{k:07d}"})
                    except httpx.HTTPError:
                        self.probe_failures += 1
                        continue
                    if resp.status_code not in (200, 202):
                        self.probe_failures += 1
                    self.latency[phase][endpoint].append(time.perf_counter() - t)
                await trio.sleep(PROBE_EVERY_S)

    async def _sample_rss(self) -> None:
        while True:
            self.rss.append((self.done_calls, await trio.to_thread.run_sync(self.server.rss_kb)))
            await trio.sleep(0.5)

    def _rss_growth_past_cap(self) -> float | None:
        """RSS growth from the first sample past 1.1 x the cap to the end; None when the
        storm stayed below 1.5 x the cap (too short to tell)."""
        past = [kb for calls, kb in self.rss if calls >= 1.1 * CANCEL_MEMORY_MAX]
        if self.done_calls < 1.5 * CANCEL_MEMORY_MAX or len(past) < 2:
            return None
        return max(past) / past[0] - 1

    async def _check_tombstones(self, calls: int) -> None:
        """The newest storm id is remembered; the oldest only while under the cap."""
        if calls == 0:
            self.chaos.report.bad("storm", "no /cancel call was answered")
            return
        newest = await self._execute(storm_id(self.sent - 1))
        if newest != "cancelled_before_start":
            self.chaos.report.bad("storm", f"the newest tombstone is lost: /execute gave "
                                           f"{newest}")
        age = trio.current_time() - self.t_first_storm_cancel
        oldest = await self._execute(storm_id(0))
        if calls > CANCEL_MEMORY_MAX and oldest == "cancelled_before_start":
            self.chaos.report.bad("storm", f"{calls} tombstones, yet the oldest is still "
                                           f"remembered: not capped at {CANCEL_MEMORY_MAX}")
        if calls < CANCEL_MEMORY_MAX * 0.9 and age < CANCEL_MEMORY_S - 5 and (
                oldest != "cancelled_before_start"):
            self.chaos.report.bad("storm", f"the oldest of {calls} tombstones was forgotten "
                                           f"after {age:.0f} s: /execute gave {oldest}")
        self.chaos.report.figures["storm_oldest"] = oldest

    async def _execute(self, job_id: str) -> str:
        """How an /execute of ``job_id`` ends: the cancel reason, 'end', or what went wrong."""
        st = Stream(JobSpec(job_id, "storm", {"job_id": job_id, "prompt": "x", "max_tokens": 1}),
                    self.chaos.cid(job_id), self.chaos.report, self.chaos.queue_depth)
        stream = await connect(self.host, self.port)
        try:
            await stream.send_all(execute_request(st.spec.body, st.cid))
            resp = Response(st)
            how = await read_until(stream, resp, 30.0)
        finally:
            await close(stream)
        if st.terminal is None:
            return f"no terminal event ({how}, HTTP {resp.status})"
        name, data = st.terminal
        if name == "end":
            snap = await self.chaos.snapshot(job_id)
            if snap is not None:
                self.chaos.record(job_id, snap)
            return "end"
        if data.get("reason") == "cancelled_before_start" and (st.started or st.queued):
            st.bad("a pre-cancelled job was queued or started first")
        snap = await self.chaos.snapshot(job_id)
        if snap is not None:
            self.chaos.record(job_id, snap)
        return str(data.get("reason") or data.get("code"))


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    s = sorted(samples)

    def pick(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 2)

    return {"n": len(s), "p50": pick(0.5), "p99": pick(0.99), "max": pick(1.0)}


def storm_lines(rep: Report) -> list[str]:
    """The storm's figures for the summary."""
    fig = rep.figures.get("storm")
    if not fig:
        return []
    budget = f", time budget {fig['budget_s']:g} s" if fig["budget_s"] else ""
    lines = [f"cancel storm        {fig['calls']} /cancel for unknown ids in {fig['seconds']} s "
             f"({fig['rate_per_s']}/s{budget}, {fig['reconnects']} reconnects); "
             f"RSS {fig['rss_kb'][0]} -> {fig['rss_kb'][-1]} kB"
             f", past the cap {fig['rss_growth_past_cap']}; oldest id then "
             f"{rep.figures.get('storm_oldest')}"]
    for phase, eps in fig["latency_ms"].items():
        parts = [f"{ep} p50 {v['p50']} / p99 {v['p99']} / max {v['max']} ms (n={v['n']})"
                 for ep, v in eps.items() if v]
        lines.append(f"  {phase:<7} latency  " + "; ".join(parts))
    return lines
