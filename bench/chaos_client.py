"""The chaos client: runs one planned job, malformed request or raw abuse against orcd and
checks every reply, stream and job record it sees (CONTRACT.md §2-5)."""

from __future__ import annotations

import json
import random
import time
from datetime import datetime
from functools import partial
from typing import Any, TypeAlias

import httpx
import trio
from chaos_checks import (
    BUSY_RETRIES,
    CANCEL_BOUND_S,
    CID_RE,
    ENVELOPE_KEYS,
    FINAL_STATES,
    FOLLOW_UP_S,
    SERVER_TIMEOUT_S,
    SNAPSHOT_KEYS,
    JobSpec,
    Report,
    Stream,
    leaves,
    read_frames,
)
from chaos_malformed import BadRequest, RawAbuse

Item: TypeAlias = JobSpec | list[JobSpec] | BadRequest | RawAbuse


class Chaos:
    """One HTTP client pool shared by the chaos clients, and what they found."""

    def __init__(self, client: httpx.AsyncClient, queue_depth: int, report: Report) -> None:
        self.client, self.queue_depth, self.report = client, queue_depth, report
        self.seq = 0

    def cid(self, job_id: str) -> str:
        self.seq += 1
        return f"c{self.seq}-{job_id}"[:64]

    # envelope / snapshots ----------------------------------------------------------------

    def check_envelope(self, where: str, resp: httpx.Response, code: str | None = None,
                       sent_cid: str | None = None) -> dict[str, Any]:
        rep = self.report
        header_cid = resp.headers.get("x-correlation-id", "")
        if not CID_RE.match(header_cid):
            rep.bad(where, f"X-Correlation-Id response header {header_cid!r}")
        elif sent_cid is not None and CID_RE.match(sent_cid) and header_cid != sent_cid:
            rep.bad(where, f"correlation id {sent_cid!r} not kept (got {header_cid!r})")
        try:
            body = resp.json()
            err = body["error"]
            assert set(body) == {"error"} and set(err) == ENVELOPE_KEYS, sorted(err)
            assert isinstance(err["message"], str) and isinstance(err["retriable"], bool)
            assert isinstance(err["details"], dict) and err["correlation_id"] == header_cid
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            rep.bad(where, f"HTTP {resp.status_code} without the error envelope ({exc!r}): "
                           f"{resp.text[:200]!r}")
            return {}
        if code is not None and err["code"] != code:
            rep.bad(where, f"HTTP {resp.status_code} code {err['code']!r}, expected {code!r}")
        if err["code"] == "INVALID_REQUEST":
            errors = err["details"].get("errors")
            if not errors or not all(isinstance(e, dict) and set(e) == {
                    "field", "constraint", "message"} for e in errors):
                rep.bad(where, f"INVALID_REQUEST without details.errors: {err['details']}")
        if resp.status_code == 503 and not resp.headers.get("retry-after", "").isdigit():
            rep.bad(where, "503 without an integer Retry-After")
        return err

    async def snapshot(self, job_id: str) -> dict[str, Any] | None:
        resp = await self.client.get(f"/jobs/{job_id}")
        if resp.status_code == 404:
            return None
        if resp.status_code != 200 or set(resp.json()) != SNAPSHOT_KEYS:
            self.report.bad(job_id, f"GET /jobs/{job_id}: {resp.status_code} {resp.text[:200]}")
            return None
        return resp.json()

    async def wait_final(self, job_id: str, bound: float = CANCEL_BOUND_S) -> dict[str, Any] | None:
        deadline = trio.current_time() + bound
        while True:
            snap = await self.snapshot(job_id)
            if snap is not None and snap["state"] in FINAL_STATES:
                return snap
            if trio.current_time() > deadline:
                self.report.bad(job_id, f"still {snap and snap['state']} {bound:g} s after "
                                        "the disconnect")
                return snap
            await trio.sleep(0.02)

    def record(self, job_id: str, snap: dict[str, Any]) -> None:
        err = snap.get("error") or {}
        outcome = snap["state"]
        if outcome == "failed" and err.get("code") == "INFERENCE_TIMEOUT":
            outcome = "timeout"
        self.report.ledger[job_id] = outcome

    def agree(self, st: Stream, snap: dict[str, Any] | None) -> None:
        """The terminal event agrees with GET /jobs/{id}."""
        assert st.terminal is not None
        name, data = st.terminal
        job_id = st.spec.job_id
        if snap is None:
            st.bad("GET /jobs/{id} 404 after the stream ended")
            return
        state, err = snap["state"], snap.get("error") or {}
        if name == "end":
            ok = (state == "completed" and snap["tokens_out"] == data.get("tokens_out")
                  and snap["stop_reason"] == data.get("stop_reason"))
        elif data.get("code") == "CANCELLED":
            ok = (state == "cancelled" and err.get("code") == "CANCELLED"
                  and snap["cancel_reason"] == data.get("reason") and snap["cancelled_at"])
        else:
            ok = state == "failed" and err.get("code") == data.get("code")
        if not ok or snap["finished_at"] is None or snap["correlation_id"] != st.cid:
            st.bad(f"terminal {name} {data} disagrees with GET: {snap}")
        self.record(job_id, snap)

    # cancels -----------------------------------------------------------------------------

    async def cancel(self, job_id: str, where: str) -> str | None:
        cid = self.cid(job_id)
        resp = await self.client.post("/cancel", json={"job_id": job_id},
                                      headers={"X-Correlation-Id": cid})
        if resp.status_code != 202:
            self.report.bad(job_id, f"/cancel ({where}) answered {resp.status_code} "
                                    f"{resp.text[:200]}")
            return None
        body = resp.json()
        if body.get("status") != "cancelling" or body.get("job_id") != job_id or body.get(
                "state") not in {"queued", "running", *FINAL_STATES, "unknown"}:
            self.report.bad(job_id, f"/cancel body {body}")
        self.report.cancels[where] += 1
        return str(body.get("state"))

    # jobs --------------------------------------------------------------------------------

    async def run_item(self, item: Item) -> None:
        try:
            if isinstance(item, list):
                async with trio.open_nursery() as nursery:
                    for sub in item:
                        nursery.start_soon(self.run_job, sub)
                self.report.counts["bursts"] += 1
            elif isinstance(item, JobSpec):
                await self.run_job(item)
            elif isinstance(item, RawAbuse):
                await self.raw(item)
            else:
                await self.bad_request(item)
        except Exception as exc:  # a transport error is a violation; anything else a bug here
            errors = leaves(exc)
            if not all(isinstance(e, httpx.HTTPError) for e in errors):
                raise
            for e in errors:
                self.report.bad("transport", f"{type(e).__name__}: {e} during {item!r:.160}")

    async def run_job(self, spec: JobSpec) -> None:
        self.report.counts["jobs"] += 1
        if spec.action == "cancel_before":
            self.report.counts["repeated_cancels"] += spec.repeats - 1
            for _ in range(spec.repeats):
                if await self.cancel(spec.job_id, "before_start") != "unknown":
                    self.report.bad(spec.job_id, "cancel of an unknown id not state=unknown")
        if spec.action == "determinism":
            await self.determinism_pair(spec, alone=False)
            return
        st = await self.execute(spec)
        if st is None or st.terminal is None:
            return
        if spec.action == "cancel_after":
            before = await self.snapshot(spec.job_id)
            self.report.counts["repeated_cancels"] += spec.repeats - 1
            for _ in range(spec.repeats):
                state = await self.cancel(spec.job_id, "after_completion")
                if before and state != before["state"]:
                    st.bad(f"cancel after the end reported {state}, job is {before['state']}")
            after = await self.snapshot(spec.job_id)
            if before != after:
                st.bad(f"a cancel after the end changed the job: {before} -> {after}")
        elif spec.action == "duplicate" and spec.trigger == 0:
            await self.duplicate(spec, active=False)

    async def determinism_pair(self, spec: JobSpec, *, alone: bool) -> None:
        """The same seed, prompt and temperature 0 twice. Alone on the worker the tokens must
        match (CONTRACT §3); under concurrent load llama.cpp's CPU kernels are not
        batch-invariant (§8), so a difference there is counted, not a violation."""
        twin = JobSpec(spec.job_id + "-b", spec.action, {**spec.body,
                                                         "job_id": spec.job_id + "-b"})
        a, b = await self.execute(spec), await self.execute(twin)
        if a and b and a.terminal and b.terminal and a.terminal[0] == b.terminal[0] == "end":
            where = "alone" if alone else "under_load"
            self.report.counts[f"determinism_pairs_{where}"] += 1
            if a.text != b.text:
                self.report.counts[f"determinism_differ_{where}"] += 1
                if alone:
                    self.report.bad(spec.job_id, "temperature 0 + same seed, alone on the "
                                                 "worker, gave other tokens")

    async def duplicate(self, spec: JobSpec, *, active: bool) -> None:
        resp = await self.client.post("/execute", json=spec.body)
        if resp.status_code == 409:
            err = self.check_envelope(spec.job_id, resp, "JOB_EXISTS")
            self.report.counts["duplicates_rejected"] += 1
            state = err.get("details", {}).get("state")
            if not active and state not in FINAL_STATES:
                self.report.bad(spec.job_id, f"409 for a finished job says state {state!r}")
        elif resp.status_code == 200:
            self.report.bad(spec.job_id, "a duplicate job_id was accepted")
        elif not (active and resp.status_code == 503):  # busy may win while active
            self.report.bad(spec.job_id, f"duplicate answered {resp.status_code}")

    async def execute(self, spec: JobSpec) -> Stream | None:
        """Run one job through /execute (retrying 503 WORKER_BUSY); None if never admitted."""
        for attempt in range(BUSY_RETRIES):
            st = await self.stream_once(spec)
            if st is not None:
                return st
            await trio.sleep(random.Random(f"{spec.job_id}{attempt}").uniform(0.02, 0.25))
        self.report.counts["gave_up_busy"] += 1
        return None

    def should_fire(self, spec: JobSpec, st: Stream) -> bool:
        a = spec.action
        if a in ("cancel_queued", "disconnect_queued") or (a == "duplicate" and spec.trigger):
            return st.queued > 0 or st.started is not None
        if a == "cancel_prompt":
            return st.started is not None
        if a in ("cancel_mid", "disconnect_mid"):
            return st.tokens >= spec.trigger
        return False

    async def stream_once(self, spec: JobSpec) -> Stream | None:
        rep, job_id = self.report, spec.job_id
        st = Stream(spec, self.cid(job_id), rep, self.queue_depth)
        cancel_states: list[str | None] = []
        t_sent = trio.current_time()
        t_fired: float | None = None
        fired_phase: str | None = None
        disconnected = False

        async def cancel_now(phase: str) -> None:
            cancel_states.append(await self.cancel(job_id, phase))

        async with trio.open_nursery() as nursery:
            async with self.client.stream("POST", "/execute", json=spec.body,
                                          headers={"X-Correlation-Id": st.cid}) as resp:
                if resp.status_code == 503:
                    await resp.aread()
                    self.check_envelope(job_id, resp, "WORKER_BUSY", st.cid)
                    rep.counts["busy_rejections"] += 1
                    if spec.action == "cancel_before":
                        st.bad("a pre-cancelled execute was refused as busy")
                    if await self.snapshot(job_id) is not None:
                        st.bad("a job refused with 503 exists in GET /jobs")
                    return None
                if resp.status_code != 200:
                    await resp.aread()
                    st.bad(f"/execute answered {resp.status_code}: {resp.text[:300]}")
                    return st  # no terminal event: the caller stops here, no retry
                if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                    st.bad(f"content-type {resp.headers.get('content-type')}")
                if resp.headers.get("x-correlation-id") != st.cid:
                    st.bad("X-Correlation-Id not echoed")
                if spec.action == "disconnect_queued" and spec.trigger < 0:
                    fired_phase, disconnected = "connected", True
                else:
                    async for name, data in read_frames(resp, st):
                        st.feed(name, data)
                        if fired_phase is not None or not self.should_fire(spec, st):
                            continue
                        fired_phase, t_fired = st.phase(), trio.current_time()
                        if spec.action.startswith("disconnect"):
                            disconnected = True
                            break
                        if spec.action == "duplicate":
                            nursery.start_soon(partial(self.duplicate, spec, active=True))
                            continue
                        rep.counts["repeated_cancels"] += spec.repeats - 1
                        for _ in range(spec.repeats):
                            nursery.start_soon(cancel_now, fired_phase)
        if disconnected:
            assert fired_phase is not None
            t_gone = time.time()
            rep.disconnects[fired_phase] += 1
            snap = await self.wait_final(job_id)
            if snap is not None and snap["finished_at"]:
                self.record(job_id, snap)
                err = snap.get("error") or {}
                lag = datetime.fromisoformat(snap["finished_at"].replace("Z", "+00:00")
                                             ).timestamp() - t_gone
                rep.disconnect_lag.append(lag)
                if snap["state"] == "cancelled" and snap["cancel_reason"] != "client_disconnect":
                    st.bad(f"disconnect recorded as {snap['cancel_reason']}")
                elif snap["state"] == "completed":
                    rep.counts[f"disconnect_lost_race_{fired_phase}"] += 1
                    if lag > 1.0:
                        st.bad(f"job ran on to completion {lag:.2f} s after its client "
                               f"disconnected ({fired_phase})")
                elif snap["state"] == "failed" and err.get("code") != "INFERENCE_TIMEOUT":
                    st.bad(f"disconnected job failed: {err}")
            return st
        if st.terminal is None:
            st.bad(f"stream closed without a terminal event (phase {st.phase()})")
            return st
        self.judge(st, cancel_states, fired_phase, t_sent, t_fired)
        self.agree(st, await self.snapshot(job_id))
        return st

    def judge(self, st: Stream, cancel_states: list[str | None], fired_phase: str | None,
              t_sent: float, t_fired: float | None) -> None:
        """Is the terminal event one this action allows?"""
        assert st.terminal is not None
        spec, rep = st.spec, self.report
        name, data = st.terminal
        code, reason = data.get("code"), data.get("reason")
        if spec.action == "cancel_before":
            if (code, reason) != ("CANCELLED", "cancelled_before_start") or st.started or st.queued:
                st.bad(f"pre-cancelled job gave {name} {data} after {st.queued} queued, "
                       f"started={st.started is not None}")
            return
        if code == "CANCELLED":
            if reason != "client_request" or not cancel_states:
                st.bad(f"CANCELLED ({reason}) though this client sent no cancel")
            elif not any(s in ("queued", "running", "cancelled") for s in cancel_states):
                st.bad(f"CANCELLED though every cancel found the job {cancel_states}")
            elif t_fired is not None:
                latency = st.t_terminal - t_fired
                rep.cancel_latency.append(latency)
                if latency > CANCEL_BOUND_S:
                    st.bad(f"cancel took {latency:.2f} s to end the stream")
        elif code == "INFERENCE_TIMEOUT":
            rep.counts["timeouts"] += 1
            limit = spec.body.get("timeout_ms")
            if limit is None:  # the server's own deadline, --inference-timeout-s
                limit = SERVER_TIMEOUT_S * 1000
            if st.t_terminal - t_sent < limit / 1000 - 0.002:
                st.bad(f"INFERENCE_TIMEOUT after {st.t_terminal - t_sent:.4f} s < {limit} ms")
            if "failed" not in cancel_states and any(s in ("completed", "cancelled")
                                                     for s in cancel_states):
                st.bad(f"INFERENCE_TIMEOUT after a cancel found {cancel_states}")
        elif name == "end":
            if "queued" in cancel_states:
                st.bad("a cancel found the job queued, yet it completed")
            elif "running" in cancel_states:
                rep.counts["cancel_lost_race"] += 1
            if {"cancelled", "failed"} & set(cancel_states):
                st.bad(f"completed, yet a cancel found it {cancel_states}")
            limit = spec.body.get("timeout_ms")
            if limit is not None and st.t_terminal - t_sent > limit / 1000 + CANCEL_BOUND_S:
                st.bad(f"deadline {limit} ms not enforced ({st.t_terminal - t_sent:.2f} s)")
        if fired_phase is None and spec.action.startswith("cancel_") and spec.action not in (
                "cancel_after", "cancel_before"):
            rep.counts["cancel_trigger_missed"] += 1

    # malformed requests ------------------------------------------------------------------

    async def bad_request(self, bad: BadRequest) -> None:
        rep = self.report
        self.seq += 1
        job_id = f"bad-{self.seq:05d}"
        content = bad.render(job_id)
        headers = {} if bad.content_type is None else {"Content-Type": bad.content_type}
        if bad.cid is not None:
            headers["X-Correlation-Id"] = bad.cid
        where = f"malformed:{bad.kind}"
        rep.malformed[bad.kind] += 1
        req_content: Any = content
        if bad.chunked and content is not None:
            async def chunks() -> Any:
                for i in range(0, len(content), 65536):
                    yield content[i:i + 65536]
            req_content = chunks()
        size = len(content or b"")
        # A connection of its own, then a second request on it: a refused request must
        # leave its keep-alive connection usable or closed, never hung.
        async with httpx.AsyncClient(base_url=self.client.base_url, timeout=FOLLOW_UP_S * 4,
                                     limits=httpx.Limits(max_connections=1)) as own:
            try:
                async with own.stream(bad.method, bad.path.replace("{id}", job_id),
                                      content=req_content, headers=headers) as resp:
                    if resp.status_code == 200 and bad.path == "/execute":
                        st = Stream(JobSpec(job_id, "complete", json.loads(content or b"{}")),
                                    resp.headers.get("x-correlation-id", ""), rep, 10**6)
                        async for name, data in read_frames(resp, st):
                            st.feed(name, data)
                        if st.terminal:
                            self.agree(st, await self.snapshot(job_id))
                    else:
                        await resp.aread()
            except httpx.HTTPError as exc:
                rep.bad(where, f"connection dropped ({type(exc).__name__}: {exc}) for "
                               f"{bad.method} {bad.path} {(content or b'')[:80]!r}")
                return
            try:
                await own.get("/health", timeout=FOLLOW_UP_S)
            except httpx.TimeoutException:
                rep.bad(where, f"keep-alive connection hung: after HTTP {resp.status_code} to "
                               f"{bad.method} {bad.path} with a {size} B body (chunked="
                               f"{bad.chunked}), the next request on it got no answer in "
                               f"{FOLLOW_UP_S:g} s")
            except httpx.HTTPError:
                rep.counts["closed_after_refusal"] += 1  # closing it is fine
        if resp.status_code not in bad.expect:
            rep.bad(where, f"{bad.method} {bad.path} answered {resp.status_code}, expected "
                           f"{sorted(bad.expect)}: body {(content or b'')[:100]!r} -> "
                           f"{resp.text[:200]!r}")
        if resp.status_code >= 400:
            self.check_envelope(where, resp, bad.code if resp.status_code in bad.expect else None,
                                bad.cid)
        if bad.fills_job_id and resp.status_code != 200 and job_id not in rep.ledger:
            if await self.snapshot(job_id) is not None:
                rep.bad(where, f"a rejected request ({resp.status_code}) created job {job_id}")

    async def raw(self, abuse: RawAbuse) -> None:
        """Speak broken HTTP on a raw socket; the server must shrug it off."""
        self.report.malformed[f"raw:{abuse.kind}"] += 1
        host, port = self.client.base_url.host, self.client.base_url.port
        assert port is not None
        stream = await trio.open_tcp_stream(host, port)
        try:
            with trio.move_on_after(2):
                await stream.send_all(abuse.payload)
                if abuse.read_reply:
                    while await stream.receive_some(65536):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await stream.aclose()
        resp = await self.client.get("/health")
        if resp.status_code != 200:
            self.report.bad(f"raw:{abuse.kind}", f"/health {resp.status_code} after the abuse")

