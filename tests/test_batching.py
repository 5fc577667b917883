"""Continuous batching end to end (issue #8): a real server, real llama.cpp, real sockets.

Four jobs share the batch while one of them ends in some way (cancelled in each phase,
disconnected, timed out); the other three must produce exactly the tokens they produce
alone, and afterwards no KV cell may be held outside the bounded prefix cache.

The tiny model is fast, so "while the others run" is made true with the harness's gates:
a gate holds the engine thread, hence every sequence at once. The usual shape is

* ``at_token[2]`` holds the victim, alone, at its 2nd token while the others are admitted;
* ``at_token[30]`` then holds the batch when the victim (always two tokens ahead) reaches
  its 30th token, with the others part-way through theirs;
* the test acts (cancel, hang up, let the deadline pass) and releases the gate.

No test measures time; each waits on gates, events and states.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
import trio

from orcd.jobs import Job

from .harness import Event, Gate, Harness, running_worker

WAIT_S = 20.0  # only turns a hang into a failure

PROMPTS = ["Write a haiku about rain", "1, 2, 3, 4,", "The capital of France is",
           "def fib(n):"]
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 12  # ~541 tokens
VICTIM_PROMPT = "Victim: " + LONG_PROMPT  # shares no prefix with the others' prompts
HOLD_AT = 30  # the victim's token at which the batch is held (others are near it)

Output = tuple[list[str], dict[str, Any]]  # the token pieces, and the end event without timing


def greedy(prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": 1, **extra}


OTHERS = {"o-haiku": greedy(PROMPTS[0], 40), "o-count": greedy(PROMPTS[1], 55),
          "o-paris": greedy(PROMPTS[2], 70)}


# ---- helpers ----------------------------------------------------------------------------


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` until it holds; ``what`` names the failure."""
    with trio.fail_after(WAIT_S):
        while not predicate():
            await trio.sleep(0.002)


def ended(events: list[Event]) -> bool:
    return bool(events) and events[-1].name in ("end", "error")


def has(events: list[Event], name: str) -> bool:
    return any(e.name == name for e in events)


def terminal(events: list[Event]) -> Event:
    terminals = [e for e in events if e.name in ("end", "error")]
    assert len(terminals) == 1, [e.name for e in events]
    assert events[-1] is terminals[0], "nothing may follow the terminal event"
    return terminals[0]


def output(events: list[Event]) -> Output:
    """What a job produced: its pieces (checked to be numbered 0, 1, ...) and its end."""
    end = terminal(events)
    assert end.name == "end", end
    tokens = [e.data for e in events if e.name == "token"]
    assert [t["i"] for t in tokens] == list(range(len(tokens)))
    return [t["t"] for t in tokens], {k: v for k, v in end.data.items() if k != "decode_time_ms"}


def assert_error(events: list[Event], code: str, reason: str) -> None:
    last = terminal(events)
    assert last.name == "error", last
    assert (last.data["code"], last.data["reason"]) == (code, reason), last.data


class Jobs:
    """Streams opened side by side; each one's events collected as they arrive."""

    def __init__(self, h: Harness, nursery: trio.Nursery) -> None:
        self.h = h
        self.nursery = nursery
        self.events: dict[str, list[Event]] = {}

    def start(self, job_id: str, body: dict[str, Any],
              hang_up: trio.Event | None = None) -> list[Event]:
        """Open ``job_id``'s stream. With ``hang_up``: read until ``started``, then close
        the connection once ``hang_up`` is set (a client that disconnects mid-way)."""
        events = self.events[job_id] = []

        async def read() -> None:
            async with self.h.stream(job_id=job_id, **body) as stream:
                async for event in stream:
                    events.append(event)
                    if hang_up is not None and event.name == "started":
                        await hang_up.wait()
                        return

        self.nursery.start_soon(read, name=f"stream:{job_id}")
        return events

    async def wait(self, name: str, *job_ids: str) -> None:
        for job_id in job_ids:
            await until(partial(has, self.events[job_id], name), f"{job_id}: no {name}")

    async def wait_ended(self, *job_ids: str) -> None:
        for job_id in job_ids or tuple(self.events):
            await until(partial(ended, self.events[job_id]), f"{job_id} never ended")


async def alone(h: Harness, bodies: dict[str, dict[str, Any]]) -> dict[str, Output]:
    """Each job's output when it runs by itself (the reference), one after another."""
    return {job_id: output(await h.execute(job_id=f"ref-{job_id}", **body))
            for job_id, body in bodies.items()}


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from the Prometheus text (labels in any order)."""
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if found == labels:
            return float(m.group(3))
    raise AssertionError(f"no sample {name}{labels} in /metrics")


async def metrics(h: Harness) -> str:
    resp = await h.client.get("/metrics")
    assert resp.status_code == 200
    return resp.text


async def health(h: Harness) -> dict[str, Any]:
    resp = await h.client.get("/health")
    body: dict[str, Any] = resp.json()
    return body


async def assert_clean(h: Harness) -> None:
    """Every job gone: no slot, no queue, no KV cell outside the bounded prefix cache."""
    await h.settled()  # no slot taken, nothing queued
    body = await health(h)
    assert body["active_jobs"] == 0 and body["queued_jobs"] == 0 and body["running"] == []
    budget = h.worker.config.prefix_cache_tokens
    assert body["kv_tokens_used"] == body["prefix_cache_tokens"] <= budget, body
    assert h.engine.kv_outside_cache() == 0


async def hold_victim_among_others(h: Harness, jobs: Jobs, victim: str, body: dict[str, Any],
                                   hang_up: trio.Event | None = None) -> Gate:
    """Start ``victim`` alone, hold it at its 2nd token while the three others are admitted,
    then let the batch run until the victim's ``HOLD_AT``-th token and return that gate (the
    engine, so every sequence, is held there; the others are a few tokens behind)."""
    h.engine.at_token[2] = first = Gate()
    jobs.start(victim, body, hang_up)
    await first.wait_reached()
    for job_id, other in OTHERS.items():
        jobs.start(job_id, other)
    await jobs.wait("started", *OTHERS)
    h.engine.at_token[HOLD_AT] = held = Gate()
    first.open()
    return held


async def others_unchanged(h: Harness, jobs: Jobs, ref: dict[str, Output]) -> None:
    await jobs.wait_ended(*OTHERS)
    for job_id in OTHERS:
        assert output(jobs.events[job_id]) == ref[job_id], f"{job_id} changed"


# ---- all four complete ------------------------------------------------------------------


async def test_four_concurrent_jobs_each_match_their_output_alone(tiny_model: Path) -> None:
    bodies = {f"four-{i}": greedy(p, n)
              for i, (p, n) in enumerate(zip(PROMPTS, [40, 25, 60, 33], strict=True))}
    bodies["four-3"]["prompt"] = PROMPTS[3] + " " + LONG_PROMPT[:200]  # a longer prompt too
    async with running_worker(tiny_model) as h:
        ref_out = await alone(h, bodies)
        text = await metrics(h)
        four_before = metric(text, "orcd_batch_sequences_count") - metric(
            text, "orcd_batch_sequences_bucket", le="3.0")
        async with trio.open_nursery() as nursery:
            jobs = Jobs(h, nursery)
            h.engine.at_token[1] = gate = Gate()  # nobody gets far before all four are in
            for job_id, body in bodies.items():
                jobs.start(job_id, body)
            await jobs.wait("started", *bodies)
            gate.open()
            await jobs.wait_ended()
        for job_id in bodies:
            pieces, end = output(jobs.events[job_id])
            assert (pieces, end) == ref_out[job_id], job_id
            assert pieces and end["stop_reason"] in ("max_tokens", "eos")
        text = await metrics(h)
        four_after = metric(text, "orcd_batch_sequences_count") - metric(
            text, "orcd_batch_sequences_bucket", le="3.0")
        assert four_after > four_before, "no step ever held all four sequences"
        await assert_clean(h)


# ---- one of four ends early: the other three are unchanged ------------------------------


async def test_cancel_a_queued_fifth_job_while_four_run(tiny_model: Path) -> None:
    four = {**OTHERS, "o-fib": greedy(PROMPTS[3], 45)}
    async with running_worker(tiny_model) as h:
        ref = await alone(h, four)
        generations = h.engine.generations
        async with trio.open_nursery() as nursery:
            jobs = Jobs(h, nursery)
            h.engine.at_token[2] = gate = Gate()
            for job_id, body in four.items():
                jobs.start(job_id, body)
            await jobs.wait("started", *four)
            queued = jobs.start("victim-q", greedy(PROMPTS[0], 30))
            await jobs.wait("queued", "victim-q")
            assert queued[0].data == {"job_id": "victim-q", "position": 1}
            resp = await h.cancel("victim-q")
            assert resp.json()["state"] == "queued"
            await jobs.wait_ended("victim-q")
            gate.open()
            await jobs.wait_ended()
        assert [e.name for e in queued] == ["queued", "error"]
        assert_error(queued, "CANCELLED", "client_request")
        for job_id in four:
            assert output(jobs.events[job_id]) == ref[job_id], f"{job_id} changed"
        assert h.engine.generations == generations + 4, "the queued job reached the engine"
        await assert_clean(h)


@pytest.mark.parametrize("where", ["at_prompt", "in_decode"])
async def test_cancel_one_of_four_in_its_prompt(tiny_model: Path, where: str) -> None:
    """``at_prompt``: it has joined the batch, nothing evaluated yet. ``in_decode``: its
    first prompt chunk is inside llama_decode, in one step with the others' tokens."""
    async with running_worker(tiny_model) as h:
        ref = await alone(h, OTHERS)
        async with trio.open_nursery() as nursery:
            jobs = Jobs(h, nursery)
            h.engine.at_token[1] = first = Gate()  # held until all three are admitted
            for job_id, body in OTHERS.items():
                jobs.start(job_id, body)
            await jobs.wait("started", *OTHERS)
            h.engine.at_token[6] = decoding = Gate()  # held again once all three decode
            first.open()
            await decoding.wait_reached()
            victim = jobs.start("victim-p", greedy(VICTIM_PROMPT, 50))
            await jobs.wait("started", "victim-p")
            gate = Gate()
            setattr(h.engine, where, gate)
            aborted = h.engine.statistics().steps_aborted
            decoding.open()
            await gate.wait_reached()
            running = h.engine.statistics().running
            assert sum(s.phase == "decode" for s in running) == 3, running
            if where == "in_decode":  # the step in llama_decode: its chunk and their tokens
                assert [(s.phase, s.step_tokens) for s in running if s.phase == "prompt"] == [
                    ("prompt", h.worker.config.step_tokens)]
            resp = await h.cancel("victim-p")
            assert resp.json()["state"] == "running"
            gate.open()
            await jobs.wait_ended("victim-p")
            await others_unchanged(h, jobs, ref)
        assert [e.name for e in victim] == ["started", "error"]
        assert_error(victim, "CANCELLED", "client_request")
        record = await h.job("victim-p")
        assert record["state"] == "cancelled" and record["tokens_out"] == 0
        if where == "in_decode":  # its chunk dominated the step: the step was aborted
            assert h.engine.statistics().steps_aborted == aborted + 1
        await assert_clean(h)
        text = await metrics(h)
        assert metric(text, "orcd_cancel_freed_seconds_count", phase="prompt") == 1
        # a prompt cancelled half-way is not cached: the next run evaluates it in full
        evaluated = h.engine.statistics().prompt_tokens_evaluated
        await h.execute(job_id="after", **greedy(VICTIM_PROMPT, 5))
        n_prompt = len(h.engine.tokenize(VICTIM_PROMPT))
        assert h.engine.statistics().prompt_tokens_evaluated - evaluated == n_prompt


async def test_cancel_one_of_four_mid_decode(tiny_model: Path) -> None:
    async with running_worker(tiny_model) as h:
        ref = await alone(h, OTHERS)
        async with trio.open_nursery() as nursery:
            jobs = Jobs(h, nursery)
            held = await hold_victim_among_others(h, jobs, "victim-d", greedy(PROMPTS[3], 400))
            await held.wait_reached()
            resp = await h.cancel("victim-d")
            assert resp.json()["state"] == "running"
            await jobs.wait_ended("victim-d")  # at once, while the engine is still held
            assert not any(ended(jobs.events[j]) for j in OTHERS)
            held.open()
            await others_unchanged(h, jobs, ref)
        victim = jobs.events["victim-d"]
        assert_error(victim, "CANCELLED", "client_request")
        assert (await h.job("victim-d"))["tokens_out"] == HOLD_AT
        assert sum(e.name == "token" for e in victim) <= HOLD_AT
        await assert_clean(h)
        text = await metrics(h)  # the engine's freeing of the cancelled sequence was measured
        assert metric(text, "orcd_cancel_freed_seconds_count", phase="decode") == 1
        assert metric(text, "orcd_cancel_latency_seconds_count", phase="decode") == 1


async def test_disconnect_one_of_four_mid_decode(tiny_model: Path) -> None:
    async with running_worker(tiny_model) as h:
        ref = await alone(h, OTHERS)
        hang_up = trio.Event()
        async with trio.open_nursery() as nursery:
            jobs = Jobs(h, nursery)
            held = await hold_victim_among_others(h, jobs, "victim-x", greedy(PROMPTS[3], 400),
                                                  hang_up)
            await held.wait_reached()
            hang_up.set()  # the victim's client closes its stream
            record = await h.wait_state("victim-x", "cancelled", "completed", "failed")
            held.open()
            await others_unchanged(h, jobs, ref)
        assert record["state"] == "cancelled"
        assert record["cancel_reason"] == "client_disconnect"
        assert record["tokens_out"] == HOLD_AT
        await assert_clean(h)


async def test_deadline_on_one_of_four(tiny_model: Path) -> None:
    async with running_worker(tiny_model) as h:
        ref = await alone(h, OTHERS)
        async with trio.open_nursery() as nursery:
            jobs = Jobs(h, nursery)
            # whichever gate holds the batch, the victim cannot finish before its deadline
            held = await hold_victim_among_others(h, jobs, "victim-t",
                                                  greedy(PROMPTS[3], 400, timeout_ms=1000))
            await jobs.wait_ended("victim-t")
            held.open()
            await others_unchanged(h, jobs, ref)
        victim = jobs.events["victim-t"]
        assert_error(victim, "INFERENCE_TIMEOUT", "deadline")
        record = await h.job("victim-t")
        assert record["state"] == "failed" and record["error"]["code"] == "INFERENCE_TIMEOUT"
        assert record["tokens_out"] < 400
        await assert_clean(h)


# ---- the queue -----------------------------------------------------------------------------


async def test_a_fifth_job_takes_the_slot_the_first_ending_job_frees(tiny_model: Path) -> None:
    long_runners = {"long-1": greedy(PROMPTS[0], 200), "long-2": greedy(PROMPTS[1], 200),
                    "long-3": greedy(PROMPTS[2], 200)}
    fifth = greedy(PROMPTS[3], 20)
    async with running_worker(tiny_model) as h:
        ref = await alone(h, {"fifth": fifth})
        async with trio.open_nursery() as nursery:
            jobs = Jobs(h, nursery)
            h.engine.at_token[5] = first = Gate()
            for job_id, body in long_runners.items():
                jobs.start(job_id, body)
            await jobs.wait("started", *long_runners)
            await first.wait_reached()
            jobs.start("short", greedy(PROMPTS[3], 3))  # the fourth slot; ends first
            await jobs.wait("started", "short")
            waiting = jobs.start("fifth", fifth)
            await jobs.wait("queued", "fifth")
            # the long runners will be held again at their 50th token: still running
            h.engine.at_token[50] = held = Gate()
            first.open()
            await jobs.wait("started", "fifth")
            short = await h.job("short")
            assert short["state"] == "completed" and short["tokens_out"] == 3
            for job_id in long_runners:
                job = h.worker.registry.get(job_id)
                assert isinstance(job, Job) and job.state == "running" and job.tokens_out < 200
                assert not ended(jobs.events[job_id])
            assert short["finished_at"] <= (await h.job("fifth"))["started_at"]
            held.open()
            await jobs.wait_ended()
        assert [e.name for e in waiting[:2]] == ["queued", "started"]
        assert waiting[0].data == {"job_id": "fifth", "position": 1}
        assert output(waiting) == ref["fifth"]
        for job_id in long_runners:
            assert terminal(jobs.events[job_id]).name == "end"
        await assert_clean(h)


# ---- the prefix cache ----------------------------------------------------------------------


async def test_second_turn_evaluates_only_the_appended_tokens(tiny_model: Path) -> None:
    """Turn 2 resends turn 1 and its answer: both come from the cache, and only the new
    question is evaluated."""
    first_turn = "User: " + LONG_PROMPT + "\nAssistant:"
    async with running_worker(tiny_model) as h:
        pieces, end = output(await h.execute(job_id="turn-1", **greedy(first_turn, 30)))
        assert (end["stop_reason"], end["tokens_out"]) == ("max_tokens", 30)
        second_turn = first_turn + "".join(pieces) + "\nUser: and then?\nAssistant:"
        t1, t2 = h.engine.tokenize(first_turn), h.engine.tokenize(second_turn)
        assert t2[: len(t1)] == t1 and len(t1) > 500
        seen = len(t1) + 29  # the prompt and the answer, but its last token: never fed back
        before, hits_before = h.engine.statistics(), metric(await metrics(h),
                                                            "orcd_prefix_cache_hit_tokens_total")
        second = output(await h.execute(job_id="turn-2", **greedy(second_turn, 30)))
        after, hits_after = h.engine.statistics(), metric(await metrics(h),
                                                          "orcd_prefix_cache_hit_tokens_total")
        assert after.prompt_tokens_evaluated - before.prompt_tokens_evaluated == len(t2) - seen
        assert hits_after - hits_before == seen
        await assert_clean(h)
    async with running_worker(tiny_model) as fresh:
        assert output(await fresh.execute(job_id="turn-2", **greedy(second_turn, 30))) == second
        assert fresh.engine.statistics().prompt_tokens_evaluated == len(t2)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
async def test_same_seed_and_prompt_alone_twice_gives_the_same_tokens(
        tiny_model: Path, temperature: float) -> None:
    body: dict[str, Any] = {"prompt": "Once upon a time", "max_tokens": 60,
                            "temperature": temperature, "seed": 1234}
    async with running_worker(tiny_model) as h:
        first = output(await h.execute(job_id="seed-1", **body))
        hits = metric(await metrics(h), "orcd_prefix_cache_hit_tokens_total")
        second = output(await h.execute(job_id="seed-2", **body))
        n_prompt = len(h.engine.tokenize(body["prompt"]))
        # the second run took all but the last prompt token from the cache
        assert metric(await metrics(h), "orcd_prefix_cache_hit_tokens_total") - hits == (
            n_prompt - 1)
        assert second == first and len(first[0]) > 0


# ---- what /health and /metrics show --------------------------------------------------------


async def test_health_shows_the_four_running_slots(tiny_model: Path) -> None:
    four = {**OTHERS, "o-fib": greedy(PROMPTS[3], 45)}
    async with running_worker(tiny_model) as h:
        async with trio.open_nursery() as nursery:
            jobs = Jobs(h, nursery)
            h.engine.at_token[1] = first = Gate()
            for job_id, body in four.items():
                jobs.start(job_id, body)
            await jobs.wait("started", *four)
            h.engine.at_token[8] = held = Gate()
            first.open()
            await held.wait_reached()
            body = await health(h)
            held.open()
            await jobs.wait_ended()
        assert body["state"] == "busy" and body["active_jobs"] == 4 and body["slots"] == 4
        running = body["running"]
        assert sorted(s["job_id"] for s in running) == sorted(four)
        assert sorted(s["slot"] for s in running) == [0, 1, 2, 3]
        assert all(s["phase"] == "decode" and s["tokens_out"] > 0 for s in running), running
        assert sorted(s["prompt_tokens"] for s in running) == sorted(
            len(h.engine.tokenize(b["prompt"])) for b in four.values())
        assert all(s["prompt_tokens_done"] == s["prompt_tokens"] for s in running)
        config = h.worker.config
        assert body["kv_tokens_total"] >= config.slots * config.n_ctx + config.prefix_cache_tokens
        prompts = sum(s["prompt_tokens"] for s in running)
        assert prompts <= body["kv_tokens_used"] <= body["kv_tokens_total"]
        assert body["prefix_cache_tokens"] == 0  # nothing has finished yet
        assert body["abort_callback"] in ("c", "python")
        text = await metrics(h)
        for name in ("orcd_batch_sequences_count", "orcd_step_duration_seconds_count",
                     "orcd_step_tokens_count"):
            assert metric(text, name) > 0, name
        assert metric(text, "orcd_cancel_freed_seconds_count", phase="decode") == 0
        await assert_clean(h)


async def test_health_names_the_job_each_slot_runs(tiny_model: Path) -> None:
    """Each ``running`` entry's job_id is the job whose sequence that slot runs (its prompt
    length tells them apart), also when four jobs start at once (five rounds)."""
    four = {f"len{i}": greedy(f"{PROMPTS[i]}{'.' * (5 * i)}", 45) for i in range(4)}
    n_prompt = {job_id: len(b["prompt"]) + 1 for job_id, b in four.items()}  # bytes + BOS
    assert len(set(n_prompt.values())) == 4
    async with running_worker(tiny_model) as h:
        assert n_prompt == {j: len(h.engine.tokenize(b["prompt"])) for j, b in four.items()}
        for round_ in range(5):
            async with trio.open_nursery() as nursery:
                jobs = Jobs(h, nursery)
                h.engine.at_token[1] = first = Gate()
                for job_id, body in four.items():
                    jobs.start(f"{job_id}-{round_}", body)
                await jobs.wait("started", *jobs.events)
                h.engine.at_token[8] = held = Gate()
                first.open()
                await held.wait_reached()
                running = (await health(h))["running"]
                held.open()
                await jobs.wait_ended()
            named = {s["job_id"].rsplit("-", 1)[0]: s["prompt_tokens"] for s in running}
            assert named == n_prompt, running


# ---- every kind of ending, then nothing held -----------------------------------------------


async def test_after_every_kind_of_ending_only_the_prefix_cache_holds_kv(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_worker(tiny_model, n_ctx=2048, prefix_cache_tokens=1500) as h:
        hang_up = trio.Event()
        async with trio.open_nursery() as nursery:
            jobs = Jobs(h, nursery)
            h.engine.at_token[3] = gate = Gate()
            jobs.start("m-done", greedy(PROMPTS[0], 20))
            jobs.start("m-cancel", greedy(PROMPTS[1], 300))
            jobs.start("m-gone", greedy(PROMPTS[2], 300), hang_up)
            jobs.start("m-late", greedy(PROMPTS[3], 300, timeout_ms=500))
            await jobs.wait("started", "m-done", "m-cancel", "m-gone", "m-late")
            jobs.start("m-queued", greedy(LONG_PROMPT, 10))
            await jobs.wait("queued", "m-queued")
            await gate.wait_reached()
            await h.cancel("m-cancel")
            await h.cancel("m-queued")
            hang_up.set()
            await h.wait_state("m-gone", "cancelled")
            await jobs.wait_ended("m-cancel", "m-queued", "m-late")
            gate.open()
            await jobs.wait_ended("m-done")
        assert terminal(jobs.events["m-done"]).name == "end"
        assert_error(jobs.events["m-cancel"], "CANCELLED", "client_request")
        assert_error(jobs.events["m-queued"], "CANCELLED", "client_request")
        assert_error(jobs.events["m-late"], "INFERENCE_TIMEOUT", "deadline")
        assert (await h.job("m-gone"))["cancel_reason"] == "client_disconnect"
        await assert_clean(h)

        # cancelled in its prompt (inside llama_decode), alone
        h.engine.in_decode = in_decode = Gate()
        async with trio.open_nursery() as nursery:
            jobs = Jobs(h, nursery)
            jobs.start("m-prompt", greedy("Once more: " + LONG_PROMPT, 10))
            await in_decode.wait_reached()
            await h.cancel("m-prompt")
            in_decode.open()
        assert_error(jobs.events["m-prompt"], "CANCELLED", "client_request")
        await assert_clean(h)

        # a decode that fails (injected: llama.cpp has no way to fail on demand)
        fail_next = [True]
        real_decode = llama_cpp.llama_decode

        def failing_decode(ctx: Any, batch: Any) -> int:
            if fail_next[0]:
                fail_next[0] = False
                return -1
            return int(real_decode(ctx, batch))

        monkeypatch.setattr(llama_cpp, "llama_decode", failing_decode)
        failed = await h.execute(job_id="m-failed", **greedy(LONG_PROMPT + " fail", 10))
        assert_error(failed, "INTERNAL", "engine")
        assert (await h.job("m-failed"))["state"] == "failed"
        await assert_clean(h)

        # and the worker serves as before: a long prompt that fills the cache, then another
        done = await h.execute(job_id="m-after", **greedy(LONG_PROMPT * 2, 20))
        assert terminal(done).name == "end"
        await assert_clean(h)
        body = await health(h)
        assert 0 < body["prefix_cache_tokens"] <= 1500
        assert body["status"] == "ok" and body["state"] == "ready"


# ---- the C abort callback -------------------------------------------------------------------


async def test_the_c_abort_callback_interrupts_a_running_prompt_decode(tiny_model: Path) -> None:
    """No probe is set, so llama.cpp polls the C callback's byte (orcd/_abortflag.c). A
    1024-token step takes long enough for a cancel to land inside it, usually first time."""
    attempts = 20
    async with running_worker(tiny_model, n_ctx=2048, step_tokens=1024) as h:
        assert (await health(h))["abort_callback"] == "c"
        hits = 0
        for attempt in range(attempts):
            job_id = f"c-abort-{attempt}"
            before = h.engine.statistics().steps_aborted
            async with trio.open_nursery() as nursery:
                jobs = Jobs(h, nursery)
                # a new prompt each time: never a prefix-cache hit
                events = jobs.start(job_id, greedy(f"{attempt} {LONG_PROMPT * 2}", 20))

                def in_prompt_step(events: list[Event] = events) -> bool:
                    stats = h.engine.statistics()
                    return ended(events) or (stats.step_running and any(
                        s.phase == "prompt" for s in stats.running))

                await until(in_prompt_step, "the prompt step never ran")
                await h.cancel(job_id)
            await assert_clean(h)
            if h.engine.statistics().steps_aborted > before:
                hits += 1
                break
        assert hits == 1, f"no cancel landed inside a decode in {attempts} attempts"
        assert_error(events, "CANCELLED", "client_request")
        assert [e.name for e in events] == ["started", "error"]
        assert (await h.job(job_id))["tokens_out"] == 0
        print(f"the C abort callback aborted a step on attempt {attempt + 1}")

