"""POST /execute on real llama.cpp (the tiny GGUF): events, determinism, stops, UTF-8."""

from __future__ import annotations

import json
import re
from pathlib import Path

import trio

from orcd.engine import TextAssembler

from .harness import Event, Gate, running_worker

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def text_of(events: list[Event]) -> str:
    return "".join(e.data["t"] for e in events if e.name == "token")


def assert_well_formed(events: list[Event]) -> None:
    """started first, tokens numbered from 0, exactly one terminal event, last."""
    assert events[0].name == "started", events[:2]
    terminals = [e for e in events if e.name in ("end", "error")]
    assert len(terminals) == 1 and events[-1] is terminals[0], [e.name for e in events]
    tokens = [e for e in events if e.name == "token"]
    assert [e.data["i"] for e in tokens] == list(range(len(tokens)))


async def test_event_sequence_started_tokens_end(tiny_model: Path) -> None:
    async with running_worker(tiny_model) as h:
        events = await h.execute(job_id="seq-1", prompt="Write a haiku", max_tokens=40,
                                 temperature=0.7, seed=42)
    assert_well_formed(events)
    started, end = events[0].data, events[-1]
    assert end.name == "end"
    assert set(started) == {"job_id", "model", "started_at", "seed", "prompt_tokens",
                            "correlation_id"}
    assert started["job_id"] == "seq-1" and started["seed"] == 42
    assert RFC3339.match(started["started_at"])
    assert started["prompt_tokens"] > 0
    assert end.data["stop_reason"] == "max_tokens" and end.data["tokens_out"] == 40
    assert end.data["stop_sequence"] is None and end.data["decode_time_ms"] > 0
    assert len(text_of(events)) > 0


async def test_same_seed_and_temperature_zero_give_same_tokens(tiny_model: Path) -> None:
    async with running_worker(tiny_model) as h:
        a = await h.execute(job_id="det-1", prompt="Count to five", max_tokens=60,
                            temperature=0.0, seed=42)
        b = await h.execute(job_id="det-2", prompt="Count to five", max_tokens=60,
                            temperature=0.0, seed=42)
        c = await h.execute(job_id="det-3", prompt="Count to five", max_tokens=60, seed=7)
        d = await h.execute(job_id="det-4", prompt="Count to five", max_tokens=60, seed=7)
        e = await h.execute(job_id="det-5", prompt="Count to five", max_tokens=60, seed=8)
    assert text_of(a) == text_of(b) and len(text_of(a)) > 0
    assert text_of(c) == text_of(d), "same seed at temperature 1 must repeat"
    assert text_of(c) != text_of(e), "different seeds should differ"


async def test_generated_seed_is_reported_and_reproduces(tiny_model: Path) -> None:
    async with running_worker(tiny_model) as h:
        first = await h.execute(job_id="gen-seed-1", prompt="Once", max_tokens=30)
        seed = first[0].data["seed"]
        assert isinstance(seed, int) and 0 <= seed < 2**53
        again = await h.execute(job_id="gen-seed-2", prompt="Once", max_tokens=30, seed=seed)
    assert text_of(first) == text_of(again)


async def test_stop_sequence_stops_and_is_not_sent(tiny_model: Path) -> None:
    body = {"prompt": "abc", "max_tokens": 120, "temperature": 1.0, "seed": 11}
    async with running_worker(tiny_model) as h:
        free = text_of(await h.execute(job_id="stop-free", **body))
        # A printable stop string from the middle of the seeded output: the rerun must end
        # right before its first occurrence.
        stop = next(free[i:i + 2] for i in range(10, len(free) - 2)
                    if free[i:i + 2].isascii() and free[i:i + 2].isprintable())
        cut = free.index(stop)
        events = await h.execute(job_id="stop-1", stop=[stop, "never-seen-stop"], **body)
    assert_well_formed(events)
    assert events[-1].data["stop_reason"] == "stop_sequence"
    assert events[-1].data["stop_sequence"] == stop
    assert text_of(events) == free[:cut]
    assert events[-1].data["tokens_out"] < 120


def test_multibyte_characters_are_held_back_until_complete() -> None:
    asm = TextAssembler(stops=())
    snowman = "☃".encode()
    assert asm.feed(b"a" + snowman[:1]) == "a"
    assert asm.feed(snowman[1:2]) == ""
    assert asm.feed(snowman[2:]) == "☃"
    assert asm.flush() == ""


def test_stop_prefix_is_held_back_and_released() -> None:
    asm = TextAssembler(stops=("END",))
    assert asm.feed(b"abcE") == "abc"
    assert asm.feed(b"Nx") == "ENx"
    assert asm.feed(b"yEN") == "y"
    assert asm.feed(b"D tail") == "" and asm.stopped_by == "END"


async def test_tokens_are_valid_utf8_and_join_to_the_whole_output(tiny_model: Path) -> None:
    async with running_worker(tiny_model) as h:
        async with h.client.stream("POST", "/execute", json={
            "job_id": "utf8-1", "prompt": "日本語 é ☃", "max_tokens": 300, "seed": 3,
        }) as resp:
            raw = await resp.aread()
    raw.decode("utf-8")  # the whole stream is valid UTF-8 (strict: no stray bytes)
    frames = [f for f in raw.decode().split("\n\n") if f]
    assert frames[-1].startswith("event: end")
    pieces = [json.loads(f.split("data: ", 1)[1])["t"] for f in frames
              if f.startswith("event: token")]
    text = "".join(pieces)
    # The tiny model spells non-ASCII characters over 2-3 byte tokens: a piece sent before
    # its character was complete would show up as U+FFFD (the decoder's replacement).
    assert any(ord(c) > 0x7F for c in text), "no multi-byte character was generated"
    assert "\ufffd" not in text
    assert all(p.encode("utf-8").decode("utf-8") == p for p in pieces)


async def test_health_answers_while_generating(tiny_model: Path) -> None:
    async with running_worker(tiny_model, slots=1) as h:  # one slot: busy while it runs
        gate = h.engine.at_token[5] = Gate()
        async with trio.open_nursery() as nursery:
            results: list[list[Event]] = []

            async def run() -> None:
                results.append(await h.execute(job_id="health-1", prompt="x", max_tokens=50))

            nursery.start_soon(run)
            await gate.wait_reached()
            resp = await h.client.get("/health")
            body = resp.json()
            assert resp.status_code == 200
            assert body["state"] == "busy" and body["active_jobs"] == 1
            assert body["device"] == "cpu" and body["resident"] is False
            assert body["vram_bytes_used"] == 0
            assert body["capabilities"] == ["text-gen"] and body["protocol"] == "sse"
            assert body["vocab_size"] > 256 and body["context_length"] == 1024
            assert body["load_progress"] == 1.0 and body["ram_bytes_used"] > 0
            gate.open()
        assert results[0][-1].name == "end"
        resp = await h.client.get("/health")
        assert resp.json()["state"] == "ready" and resp.json()["active_jobs"] == 0
