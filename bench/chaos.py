#!/usr/bin/env python3
"""Chaos run: a randomized, seeded, bounded storm against a real ``orcd serve`` process.

Starts orcd on loopback (a tiny random-weight GGUF by default), warms it up, takes an RSS
baseline, then lets a few concurrent clients run a seeded plan of jobs: plain completions,
cancels in every phase (before the execute, queued, prompt evaluation, mid-stream, after
completion, repeated), client disconnects (queued, mid-stream), short deadlines, bursts
that fill the queue, duplicate job ids, determinism pairs, and malformed requests drawn
from hypothesis strategies. Every stream, every reply and the final server state are
checked against CONTRACT.md; any invariant violation makes the exit status 1.

    python bench/chaos.py [--quick|--long] [--seed N] [--model PATH] [--jobs N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio

N_CTX = 1024
BUSY_RETRIES = 6
CANCEL_BOUND_S = 5.0  # CONTRACT §4: cancellation complete within 5 s in the worst case
RSS_TOLERANCE = 0.05
SERVER_TIMEOUT_S = 300  # orcd's default --inference-timeout-s
FOLLOW_UP_S = 3.0  # a request on a refused request's connection must answer by then
JOB_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
ENVELOPE_KEYS = {"code", "message", "retriable", "details", "correlation_id"}
SNAPSHOT_KEYS = {
    "job_id", "state", "correlation_id", "created_at", "started_at", "finished_at",
    "cancel_requested_at", "cancelled_at", "cancel_reason", "tokens_out", "max_tokens",
    "progress", "stop_reason", "error",
}
FINAL_STATES = {"completed", "cancelled", "failed"}
STREAM_CODES = {"CANCELLED", "INFERENCE_TIMEOUT", "VRAM_OOM", "INTERNAL"}
CANCEL_REASONS = {"client_request", "client_disconnect", "shutdown", "cancelled_before_start"}
FRAGMENTS = [
    "hello", "world", "The quick brown fox jumps over the lazy dog.", "héllo", "naïve café",
    "Grüße aus Köln", "日本語のテキスト", "中文字符", "한국어", "emoji 🙂🚀", "👩‍💻 at work",
    "e\u0301 combining", "Ελληνικά", "русский текст", "עברית", "العربية", "∑∫√∞≠",
    "\t", "\n", "<s>", "</s>", '{"json": true}', "1234567890", "a", "  spaces  ", "ǅ",
]
STOP_POOL = ["a", "e", " ", "\n", "é", "🙂", "the", "xyz", "!", "0", "Q", "END"]


@dataclass(frozen=True)
class Mode:
    name: str
    jobs: int
    clients: int
    slots: int = 2
    queue_depth: int = 2
    # The server remembers this many finished jobs (--job-history): enough for every per-job
    # GET /jobs check, small enough that the bounded history (about 1.2 KB a job) stays far
    # below the 5 % memory budget. The warm-up also brings the allocator to its working size
    # (the per-thread arenas that llama.cpp's and trio's threads create on first use).
    job_history: int = 256
    warmup: int = 60
    default_max: float = 0.04  # share of jobs without max_tokens (the context's room)


MODES = {
    "quick": Mode("quick", jobs=150, clients=4),
    "default": Mode("default", jobs=400, clients=4),
    "long": Mode("long", jobs=1200, clients=6),
}
# (action, weight). A burst is several concurrent jobs that overfill slots + queue.
ACTIONS = [
    ("complete", 26), ("cancel_before", 6), ("cancel_queued", 5), ("cancel_prompt", 8),
    ("cancel_mid", 12), ("cancel_after", 6), ("disconnect_mid", 8), ("disconnect_queued", 4),
    ("timeout", 9), ("duplicate", 4), ("determinism", 3), ("burst", 5),
]


@dataclass
class JobSpec:
    job_id: str
    action: str
    body: dict[str, Any]
    trigger: int = 0  # tokens to see before a mid-stream cancel/disconnect (-1: at once)
    repeats: int = 1  # how many cancels to send


# -- malformed requests (hypothesis) --------------------------------------------------

FILL = "@@JOB@@"  # replaced by a fresh job id when the request is sent
FIELDS = ("job_id", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p",
          "repetition_penalty", "stop", "seed", "timeout_ms")
ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"


@dataclass(frozen=True)
class BadRequest:
    kind: str
    method: str
    path: str  # "{id}" becomes a fresh job id
    payload: Any = None  # a JSON value to send, or None for no body
    raw: bytes | None = None  # sent as is instead of payload
    content_type: str | None = "application/json"
    expect: frozenset[int] = frozenset({400})
    code: str | None = "INVALID_REQUEST"
    cid: str | None = None  # X-Correlation-Id to send (valid or not)
    pad: int = 0  # make payload["prompt"] this long (oversized bodies)
    chunked: bool = False

    @property
    def fills_job_id(self) -> bool:
        return isinstance(self.payload, dict) and self.payload.get("job_id") == FILL

    def render(self, job_id: str) -> bytes | None:
        if self.raw is not None:
            return self.raw.replace(FILL.encode(), job_id.encode())
        if self.payload is None:
            return None
        obj = self.payload
        if isinstance(obj, dict):
            obj = {**obj, **({"job_id": job_id} if self.fills_job_id else {}),
                   **({"prompt": "a" * self.pad} if self.pad else {})}
        return json.dumps(obj).encode()  # ensure_ascii: lone surrogates go out as \udxxx


@dataclass(frozen=True)
class RawAbuse:
    kind: str
    payload: bytes
    read_reply: bool


def hostile(digits: int, depth: int) -> list[tuple[str, bytes, frozenset[int]]]:
    """Bodies that tend to break JSON parsers and UTF-8 handling."""
    f = FILL.encode()
    ok, either = frozenset({400}), frozenset({200, 400})
    return [
        ("bigint", b'{"job_id":"' + f + b'","prompt":"hi","seed":1' + b"0" * digits + b"}", ok),
        ("deep", b"[" * depth + b"]" * depth, ok),
        ("deep_field", b'{"job_id":"' + f + b'","prompt":"hi","stop":' + b"[" * depth
         + b"]" * depth + b"}", ok),
        ("nan", b'{"job_id":"' + f + b'","prompt":"hi","temperature":NaN}', ok),
        ("infinity", b'{"job_id":"' + f + b'","prompt":"hi","top_p":-Infinity}', ok),
        ("surrogate_prompt", b'{"job_id":"' + f + b'","prompt":"a\\ud800b","max_tokens":2}',
         either),
        ("surrogate_key", b'{"job_id":"' + f + b'","prompt":"hi","\\udc80":1}', ok),
        ("surrogate_stop", b'{"job_id":"' + f + b'","prompt":"hi","max_tokens":2,'
         b'"stop":["\\ud83d"]}', either),
        ("invalid_utf8", b'{"job_id":"' + f + b'","prompt":"\xff\xfe"}', ok),
        ("bom", b'\xef\xbb\xbf{"job_id":"' + f + b'","prompt":"hi","max_tokens":2}', either),
    ]


def bad_requests(vocab: int) -> Any:
    """A hypothesis strategy of requests that orcd must refuse with a 4xx envelope."""
    from hypothesis import strategies as st

    nonnum = st.one_of(st.booleans(), st.text(max_size=8), st.lists(st.integers(), max_size=3),
                       st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
    nonstr = st.one_of(st.booleans(), st.integers(), st.floats(allow_nan=False),
                       st.lists(st.text(max_size=3), max_size=3))
    fraction = st.floats(allow_nan=False, allow_infinity=False).filter(
        lambda f: not f.is_integer())

    def ints_out(lo: int, hi: int) -> Any:
        return st.one_of(st.integers(max_value=lo - 1), st.integers(min_value=hi + 1),
                         fraction, nonnum)

    def floats_out(lo: float, hi: float) -> Any:
        return st.one_of(st.floats(max_value=lo, exclude_max=True),
                         st.floats(min_value=hi, exclude_min=True), nonnum)

    bad_id = st.one_of(nonstr, st.just(""), st.none(),
                       st.text(min_size=1, max_size=40).filter(lambda s: not JOB_ID_RE.match(s)),
                       st.text(alphabet=ID_CHARS, min_size=129, max_size=200))
    bad = {
        "job_id": bad_id,
        "prompt": st.one_of(st.just(""), st.none(), nonstr, st.just("x" * 32769),
                            st.just("x y " * 1200)),  # too long / longer than the context
        "max_tokens": st.one_of(ints_out(1, 2048), st.just(2000)),  # 2000 + prompt > n_ctx
        "temperature": floats_out(0.0, 2.0),
        "top_p": floats_out(0.0, 1.0),
        "top_k": ints_out(0, vocab),
        "min_p": floats_out(0.0, 1.0),
        "repetition_penalty": st.one_of(st.floats(max_value=0.0),
                                        st.floats(min_value=2.0, exclude_min=True), nonnum),
        "stop": st.one_of(st.text(max_size=5), st.integers(), st.dictionaries(
            st.text(max_size=3), st.text(max_size=3), max_size=2),
            st.lists(st.text(min_size=1, max_size=5), min_size=5, max_size=8),
            st.lists(st.one_of(st.integers(), st.just(""), st.text(min_size=101, max_size=130)),
                     min_size=1, max_size=3)),
        "seed": ints_out(0, 2**64 - 1),
        "timeout_ms": ints_out(1, 300_000),
    }
    json_value = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=6))
    unknown = st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda k: k not in FIELDS),
                              json_value, min_size=1, max_size=3)
    ctypes = st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "text/json",
                              "multipart/form-data; boundary=x", "application/octet-stream",
                              "application/xml", "image/png"])
    cids = st.one_of(st.none(), st.just("chaos.cid:1"), st.sampled_from(
        ["has space", "x" * 65, "", "bad/slash", "semi;colon"]))
    bad_path_id = st.text(min_size=1, max_size=40).filter(
        lambda s: not JOB_ID_RE.match(s) and "/" not in s)

    @st.composite
    def build(draw: Any) -> BadRequest:
        kind = draw(st.sampled_from([
            "exec_field", "exec_field", "exec_field", "exec_unknown", "exec_missing",
            "exec_not_object", "exec_garbage", "exec_truncated", "exec_hostile", "exec_hostile",
            "content_type", "oversize", "cancel_bad", "get_bad_id", "get_long_id",
            "get_unknown", "get_bad_state", "wrong_method"]))
        cid = draw(cids)
        base: dict[str, Any] = {"job_id": FILL, "prompt": draw(st.text(min_size=1, max_size=30)),
                                "max_tokens": 4}
        if kind == "exec_field":
            for name in draw(st.lists(st.sampled_from(sorted(bad)), min_size=1, max_size=3,
                                      unique=True)):
                base[name] = draw(bad[name])
            return BadRequest(kind, "POST", "/execute", base, cid=cid)
        if kind == "exec_unknown":
            return BadRequest(kind, "POST", "/execute", {**base, **draw(unknown)}, cid=cid)
        if kind == "exec_missing":
            for name in draw(st.sampled_from([["job_id"], ["prompt"], ["job_id", "prompt"]])):
                del base[name]
            return BadRequest(kind, "POST", "/execute", base, cid=cid)
        if kind == "exec_not_object":
            value = draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(),
                                   st.text(max_size=8), st.booleans(), st.none()))
            return BadRequest(kind, "POST", draw(st.sampled_from(["/execute", "/cancel"])),
                              raw=json.dumps(value).encode(), cid=cid)
        if kind == "exec_garbage":
            raw = draw(st.binary(max_size=64))
            try:
                if isinstance(json.loads(raw), dict):
                    raw += b"}"
            except ValueError:
                pass
            return BadRequest(kind, "POST", draw(st.sampled_from(["/execute", "/cancel"])),
                              raw=raw or b"\x00", cid=cid)
        if kind == "exec_truncated":
            text = json.dumps(base).replace(FILL, "trunc-job")
            cut = draw(st.integers(min_value=0, max_value=len(text) - 1))
            return BadRequest(kind, "POST", "/execute", raw=text[:cut].encode(), cid=cid)
        if kind == "exec_hostile":
            sub, raw, expect = draw(st.sampled_from(hostile(
                draw(st.integers(4301, 9000)), draw(st.integers(1000, 60000)))))
            return BadRequest(f"hostile_{sub}", "POST", "/execute", raw=raw, expect=expect,
                              cid=cid)
        if kind == "content_type":
            path = draw(st.sampled_from(["/execute", "/cancel"]))
            payload = base if path == "/execute" else {"job_id": FILL}
            return BadRequest(kind, "POST", path, payload, content_type=draw(ctypes),
                              pad=draw(st.sampled_from([0, 0, 200_000, 900_000])),
                              expect=frozenset({415}), code="UNSUPPORTED_MEDIA_TYPE", cid=cid)
        if kind == "oversize":
            path = draw(st.sampled_from(["/execute", "/cancel"]))
            return BadRequest(kind, "POST", path, base, pad=(1 << 20) + draw(
                st.integers(1, 300_000)), chunked=draw(st.booleans()), expect=frozenset({413}),
                code="PAYLOAD_TOO_LARGE", cid=cid)
        if kind == "cancel_bad":
            payload = draw(st.one_of(
                st.builds(lambda v: {"job_id": v}, bad_id.filter(lambda v: v is not None)),
                st.just({}), st.builds(lambda u: {"job_id": FILL, **u}, unknown)))
            return BadRequest(kind, "POST", "/cancel", payload, cid=cid)
        if kind == "get_bad_id":
            return BadRequest(kind, "GET", "/jobs/" + quote(draw(bad_path_id), safe=""), cid=cid)
        if kind == "get_long_id":
            long_id = draw(st.text(alphabet=ID_CHARS, min_size=129, max_size=300))
            return BadRequest(kind, "GET", "/jobs/" + long_id, cid=cid)
        if kind == "get_unknown":
            return BadRequest(kind, "GET", "/jobs/{id}", expect=frozenset({404}),
                              code="JOB_NOT_FOUND", cid=cid)
        if kind == "get_bad_state":
            state = draw(st.text(max_size=12).filter(lambda s: s not in (
                "queued", "running", "completed", "cancelled", "failed")))
            return BadRequest(kind, "GET", "/jobs?state=" + quote(state, safe=""), cid=cid)
        method, path = draw(st.sampled_from([
            ("GET", "/execute"), ("GET", "/cancel"), ("PUT", "/execute"), ("DELETE", "/jobs/x"),
            ("PATCH", "/cancel"), ("POST", "/health"), ("POST", "/jobs"), ("PUT", "/metrics")]))
        return BadRequest("wrong_method", method, path, expect=frozenset({405}),
                          code="METHOD_NOT_ALLOWED", cid=cid)

    return build()


def generate_malformed(n: int, seed: int, vocab: int) -> list[BadRequest]:
    """``n`` malformed requests, the same ones for the same seed."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    out: list[BadRequest] = []

    @hseed(seed)
    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(bad_requests(vocab))
    def collect(bad: BadRequest) -> None:
        out.append(bad)

    collect()
    fixed = [BadRequest(f"hostile_{sub}", "POST", "/execute", raw=raw, expect=expect)
             for sub, raw, expect in hostile(4400, 20_000)]  # each at least once
    return out[:n] + fixed


def raw_abuses(rng: random.Random, n: int) -> list[RawAbuse]:
    """Broken HTTP on raw sockets: partial bodies, garbage, missing Host, huge headers."""
    kinds = [
        RawAbuse("partial_body", b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: 500\r\n\r\n{\"job_id\": \"raw", False),
        RawAbuse("headers_then_close", b"POST /execute HTTP/1.1\r\nHost: x\r\n", False),
        RawAbuse("garbage", b"\x16\x03\x01\x02\x00garbage\r\n\r\n", True),
        RawAbuse("no_host", b"GET /health HTTP/1.1\r\n\r\n", True),
        RawAbuse("huge_header", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000
                 + b"\r\n\r\n", True),
        RawAbuse("pipelined", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 3
                 + b"GET /jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", True),
        RawAbuse("bad_chunked", b"POST /cancel HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
                 True),
    ]
    return [rng.choice(kinds) for _ in range(n)]


Item = JobSpec | list[JobSpec] | BadRequest | RawAbuse


@dataclass
class Report:
    counts: Counter[str] = field(default_factory=Counter)
    cancels: Counter[str] = field(default_factory=Counter)
    disconnects: Counter[str] = field(default_factory=Counter)
    malformed: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    cancel_latency: list[float] = field(default_factory=list)
    disconnect_lag: list[float] = field(default_factory=list)  # disconnect -> job final
    ledger: dict[str, str] = field(default_factory=dict)  # job_id -> outcome

    def bad(self, where: str, msg: str) -> None:
        self.violations.append(f"[{where}] {msg}")


# -- the server process ------------------------------------------------------------------


class Server:
    def __init__(self, model: Path, mode: Mode, workdir: Path) -> None:
        self.model, self.mode, self.workdir = model, mode, workdir
        self.log_path = workdir / "orcd.log"
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> str:
        """Start orcd and return the 'orcd listening on' URL (blocking)."""
        cmd = [sys.executable, "-m", "orcd", "serve", "--model", str(self.model), "--port", "0",
               "--slots", str(self.mode.slots), "--queue-depth", str(self.mode.queue_depth),
               "--n-ctx", str(N_CTX), "--job-history", str(self.mode.job_history)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCD_")}
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"orcd listening on (http://\S+)", line)
        if match is None:
            raise RuntimeError(f"orcd did not start: {line!r}; see {self.log_path}")
        self.url = match.group(1)
        return self.url

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait for the drain; the exit code, or None if it had to be killed."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def error_log_lines(self) -> list[str]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                out.append(f"non-JSON log line: {line[:160]}")
                continue
            if rec.get("level") in ("error", "critical"):
                out.append(f"{rec.get('action')}: {str(rec.get('human'))[:200]}")
        return out


# -- the plan ----------------------------------------------------------------------------


def make_prompt(rng: random.Random, max_bytes: int) -> str:
    """A prompt of at most ``max_bytes`` UTF-8 bytes (at least one character)."""
    parts: list[str] = []
    size = 0
    while True:
        frag = rng.choice(FRAGMENTS)
        if rng.random() < 0.2:
            frag = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(20))
        n = len(frag.encode())
        if size + n > max_bytes:
            break
        parts.append(frag)
        size += n
    return "".join(parts) or "x"


def sample_body(rng: random.Random, job_id: str, vocab: int, *, prompt_bytes: tuple[int, int],
                max_tokens: tuple[int, int], default_max: float = 0.04) -> dict[str, Any]:
    prompt = make_prompt(rng, rng.randint(*prompt_bytes))
    room = N_CTX - len(prompt.encode()) - 1  # tokens <= bytes (+BOS) for byte-fallback vocabs
    body: dict[str, Any] = {"job_id": job_id, "prompt": prompt}
    if rng.random() >= default_max:
        body["max_tokens"] = max(1, min(rng.randint(*max_tokens), room))
    if rng.random() < 0.6:
        body["temperature"] = rng.choice([0.0, 0.0, 0.7, 2.0, round(rng.uniform(0, 2), 3)])
    if rng.random() < 0.4:
        body["top_p"] = rng.choice([1.0, 0.0, 0.9, round(rng.random(), 3)])
    if rng.random() < 0.4:
        body["top_k"] = rng.choice([0, 1, 40, vocab, rng.randint(0, vocab)])
    if rng.random() < 0.3:
        body["min_p"] = rng.choice([0.0, 0.05, 1.0, round(rng.random(), 3)])
    if rng.random() < 0.3:
        body["repetition_penalty"] = rng.choice([1.0, 2.0, 1e-6, round(rng.uniform(0.01, 2), 3)])
    if rng.random() < 0.3:
        stops = [rng.choice(STOP_POOL) if rng.random() < 0.7 else make_prompt(rng, 100)[:100]
                 for _ in range(rng.randint(1, 4))]
        body["stop"] = stops
    if rng.random() < 0.7:
        body["seed"] = rng.choice([0, 2**64 - 1, 2**53, rng.randrange(2**64), rng.randrange(1000)])
    return body


def make_plan(rng: random.Random, mode: Mode, n_jobs: int, vocab: int,
              malformed: list[BadRequest], raws: list[RawAbuse],
              prefix: str = "chaos") -> list[Item]:
    plan: list[Item] = []
    names, weights = zip(*ACTIONS, strict=True)
    jobs = 0

    def spec(action: str, **kw: Any) -> JobSpec:
        nonlocal jobs
        jobs += 1
        job_id = f"{prefix}-{jobs:05d}-{action}"
        short = dict(prompt_bytes=(1, 120), max_tokens=(1, 48))
        long_out = dict(prompt_bytes=(1, 120), max_tokens=(200, 800))
        shape = {"cancel_prompt": dict(prompt_bytes=(500, 900), max_tokens=(1, 64)),
                 "timeout": rng.choice([long_out, dict(prompt_bytes=(500, 900),
                                                        max_tokens=(1, 100))])}.get(action)
        if shape is None:
            shape = long_out if action in ("cancel_mid", "disconnect_mid", "cancel_queued",
                                           "disconnect_queued") else short
        body = sample_body(rng, job_id, vocab, default_max=mode.default_max, **shape)
        if action == "timeout":
            body["timeout_ms"] = rng.choice([1, rng.randint(1, 30), rng.randint(30, 250)])
        if action == "determinism":
            body["temperature"] = 0.0
            body["max_tokens"] = min(body.get("max_tokens", 32), 64)
        return JobSpec(job_id, action, body, **kw)

    while jobs < n_jobs:
        action = rng.choices(names, weights)[0]
        if action == "burst":
            subs = ["complete", "cancel_queued", "disconnect_queued", "cancel_mid"]
            plan.append([spec(rng.choice(subs), trigger=rng.randint(1, 5))
                         for _ in range(mode.slots + mode.queue_depth + 2)])
        elif action in ("cancel_mid", "disconnect_mid"):
            plan.append(spec(action, trigger=rng.randint(1, 20), repeats=rng.choice([1, 1, 2, 3])))
        elif action == "disconnect_queued":
            plan.append(spec(action, trigger=rng.choice([0, -1])))
        elif action == "duplicate":
            plan.append(spec(action, trigger=rng.randint(0, 1)))
        else:
            plan.append(spec(action, repeats=rng.choice([1, 1, 1, 2, 4])))
    plan.extend(malformed)
    plan.extend(raws)
    rng.shuffle(plan)
    return plan


# -- streams -----------------------------------------------------------------------------


@dataclass
class Stream:
    """What one client saw on one /execute stream, checked event by event."""

    spec: JobSpec
    cid: str
    report: Report
    queue_depth: int
    queued: int = 0
    last_position: int = 10**9
    started: dict[str, Any] | None = None
    tokens: int = 0
    text: list[str] = field(default_factory=list)
    terminal: tuple[str, dict[str, Any]] | None = None
    t_terminal: float = 0.0

    def phase(self) -> str:
        if self.terminal is not None:
            return "after_completion"
        if self.tokens:
            return "mid_stream"
        if self.started is not None:
            return "prompt"
        return "queued" if self.queued else "connected"

    def bad(self, msg: str) -> None:
        self.report.bad(self.spec.job_id, msg)

    def feed(self, name: str, data: dict[str, Any]) -> None:
        body, job_id = self.spec.body, self.spec.job_id
        if self.terminal is not None:
            self.bad(f"event {name!r} after the terminal event {self.terminal[0]!r}")
            return
        if name == "queued":
            if self.started is not None:
                self.bad("queued after started")
            pos = data.get("position")
            if data.get("job_id") != job_id or not isinstance(pos, int) or not (
                    1 <= pos <= self.queue_depth):
                self.bad(f"bad queued event {data}")
            if isinstance(pos, int) and pos > self.last_position:
                self.bad(f"queue position grew from {self.last_position} to {pos}")
            self.queued += 1
            self.last_position = pos if isinstance(pos, int) else self.last_position
        elif name == "started":
            if self.started is not None:
                self.bad("second started event")
            want = {"job_id", "model", "started_at", "seed", "prompt_tokens", "correlation_id"}
            if set(data) != want:
                self.bad(f"started keys {sorted(data)}")
            if data.get("job_id") != job_id or data.get("correlation_id") != self.cid:
                self.bad(f"started names another job or correlation id: {data}")
            if "seed" in body and data.get("seed") != body["seed"]:
                self.bad(f"started.seed {data.get('seed')} != requested {body['seed']}")
            if not RFC3339.match(str(data.get("started_at"))):
                self.bad(f"started_at not RFC 3339: {data.get('started_at')!r}")
            pt = data.get("prompt_tokens")
            if not isinstance(pt, int) or not 1 <= pt <= N_CTX:
                self.bad(f"prompt_tokens {pt!r}")
            self.started = data
        elif name == "token":
            if self.started is None:
                self.bad("token before started")
            if data.get("i") != self.tokens or not isinstance(data.get("t"), str):
                self.bad(f"token {data} where i={self.tokens} was due")
                if isinstance(data.get("i"), int):
                    self.tokens = data["i"]  # resync: report a gap once, not per token
            self.tokens += 1
            self.text.append(str(data.get("t")))
        elif name in ("end", "error"):
            self.terminal = (name, data)
            self.t_terminal = trio.current_time()
            if name == "end":
                self._check_end(data)
            else:
                self._check_error(data)
        else:
            self.bad(f"unknown event {name!r}")

    def _check_end(self, data: dict[str, Any]) -> None:
        body = self.spec.body
        if self.started is None:
            self.bad("end without started")
        if set(data) != {"tokens_out", "decode_time_ms", "stop_reason", "stop_sequence"}:
            self.bad(f"end keys {sorted(data)}")
        out, reason = data.get("tokens_out"), data.get("stop_reason")
        seq = data.get("stop_sequence")
        limit = body.get("max_tokens", N_CTX)
        if not isinstance(out, int) or not self.tokens <= out <= limit:
            self.bad(f"end.tokens_out={out!r} with {self.tokens} token events, limit {limit}")
        if reason == "max_tokens" and "max_tokens" in body and out != body["max_tokens"]:
            self.bad(f"stop_reason max_tokens but tokens_out {out} != {body['max_tokens']}")
        if reason not in ("max_tokens", "eos", "stop_sequence"):
            self.bad(f"stop_reason {reason!r}")
        if (reason == "stop_sequence") != (seq is not None) or (
                seq is not None and seq not in body.get("stop", [])):
            self.bad(f"stop_reason {reason!r} with stop_sequence {seq!r}")
        text = "".join(self.text)
        for stop in body.get("stop", []):
            if stop in text:
                self.bad(f"output contains stop sequence {stop!r}")

    def _check_error(self, data: dict[str, Any]) -> None:
        if set(data) != {"code", "message", "retriable", "reason"}:
            self.bad(f"error keys {sorted(data)}")
        code = data.get("code")
        if code not in STREAM_CODES or not isinstance(data.get("retriable"), bool):
            self.bad(f"error event {data}")
        if code == "CANCELLED" and data.get("reason") not in CANCEL_REASONS:
            self.bad(f"CANCELLED with reason {data.get('reason')!r}")
        if code in ("INTERNAL", "VRAM_OOM"):
            self.bad(f"job failed: {data}")


async def sse_lines(resp: httpx.Response) -> Any:
    """Lines as SSE defines them: ended by LF only (httpx's aiter_lines also splits at U+2028,
    U+0085 and friends, which are plain text inside a data line)."""
    pending = ""
    async for chunk in resp.aiter_text():
        pending += chunk
        *complete, pending = pending.split("\n")
        for line in complete:
            yield line.removesuffix("\r")
    if pending:
        yield pending


async def read_frames(resp: httpx.Response, st: Stream) -> Any:
    """Yield (name, data) per SSE frame; a frame must be one event line + one data line."""
    lines: list[str] = []
    async for line in sse_lines(resp):
        if line.startswith(":"):
            continue
        if line:
            lines.append(line)
            continue
        if not lines:
            continue
        if len(lines) != 2 or not lines[0].startswith("event: ") or not lines[1].startswith(
                "data: "):
            st.bad(f"malformed SSE frame {lines!r}")
        else:
            try:
                yield lines[0][7:], json.loads(lines[1][6:])
            except json.JSONDecodeError:
                st.bad(f"frame data is not JSON: {lines[1][:120]!r}")
        lines = []
    if lines:
        st.bad(f"stream ended inside a frame: {lines!r}")


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    inner = getattr(exc, "exceptions", None)
    if inner is None:
        return [exc]
    return [leaf for e in inner for leaf in leaves(e)]


# -- the chaos client --------------------------------------------------------------------


class Chaos:
    def __init__(self, client: httpx.AsyncClient, mode: Mode, report: Report) -> None:
        self.client, self.mode, self.report = client, mode, report
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
            twin = JobSpec(spec.job_id + "-b", spec.action, {**spec.body,
                                                             "job_id": spec.job_id + "-b"})
            a, b = await self.execute(spec), await self.execute(twin)
            if a and b and a.terminal and b.terminal and a.terminal[0] == b.terminal[0] == "end":
                self.report.counts["determinism_pairs"] += 1
                if a.text != b.text:
                    self.report.bad(spec.job_id, "temperature 0 + same seed gave other tokens")
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
        st = Stream(spec, self.cid(job_id), rep, self.mode.queue_depth)
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


# -- the run -----------------------------------------------------------------------------


async def run_plan(chaos: Chaos, mode: Mode, plan: list[Item], rss_trace: list[int],
                   server: Server | None) -> None:
    """Run ``plan`` with ``mode.clients`` concurrent clients, sampling RSS if ``server``."""
    send, recv = trio.open_memory_channel[Item](len(plan))
    for item in plan:
        send.send_nowait(item)
    send.close()
    async with trio.open_nursery() as outer:
        if server is not None:
            outer.start_soon(sample_rss, server, rss_trace)
        async with trio.open_nursery() as nursery:
            for _ in range(mode.clients):
                nursery.start_soon(client_loop, chaos, recv.clone())
        outer.cancel_scope.cancel()


async def wait_idle(client: httpx.AsyncClient, bound: float) -> dict[str, Any]:
    deadline = trio.current_time() + bound
    while True:
        health = (await client.get("/health")).json()
        if (health.get("active_jobs"), health.get("queued_jobs")) == (0, 0):
            return health
        if trio.current_time() > deadline:
            return health
        await trio.sleep(0.05)


def metric_values(text: str, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in re.finditer(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out


async def final_checks(chaos: Chaos, server: Server, baseline_kb: int) -> dict[str, Any]:
    client, rep = chaos.client, chaos.report
    health = await wait_idle(client, CANCEL_BOUND_S + 5)
    if (health.get("active_jobs"), health.get("queued_jobs")) != (0, 0):
        rep.bad("final", f"not idle at the end: active {health.get('active_jobs')}, "
                         f"queued {health.get('queued_jobs')}")
    for state in ("running", "queued"):
        resp = await client.get("/jobs", params={"state": state})
        if resp.status_code != 200 or resp.json()["jobs"]:
            rep.bad("final", f"GET /jobs?state={state}: {resp.status_code} {resp.text[:300]}")
    listed = (await client.get("/jobs")).json()["jobs"]
    for job in listed:
        if job["job_id"] not in rep.ledger:
            rep.bad("final", f"job {job['job_id']} ({job['state']}) was never seen admitted")
        elif job["state"] not in FINAL_STATES:
            rep.bad("final", f"job {job['job_id']} still {job['state']}")
    metrics = (await client.get("/metrics")).text
    buckets = metric_values(metrics, "orcd_cancel_latency_seconds_bucket")
    server_cancels = {"n": 0, "le_10ms": 0, "le_100ms": 0, "le_5s": 0}
    for labels, value in buckets.items():
        for key, le in (("n", "+Inf"), ("le_10ms", "0.01"), ("le_100ms", "0.1"), ("le_5s", "5.0")):
            if f'le="{le}"' in labels:
                server_cancels[key] += int(value)
    if server_cancels["le_5s"] < server_cancels["n"]:
        rep.bad("final", f"server-side cancel latency over 5 s: {server_cancels}")
    for gauge in ("orcd_active_jobs", "orcd_queued_jobs"):
        if metric_values(metrics, gauge).get("", 0.0) != 0.0:
            rep.bad("final", f"{gauge} is {metric_values(metrics, gauge)} at the end")
    served = {k.split('"')[1]: int(v) for k, v in
              metric_values(metrics, "worker_requests_total").items() if '"' in k}
    mine = Counter(rep.ledger.values())
    if {k: v for k, v in served.items() if v} != dict(mine):
        rep.bad("final", f"worker_requests_total {served} != outcomes seen by clients "
                         f"{dict(mine)}")
    await trio.sleep(0.5)
    end_kb = await trio.to_thread.run_sync(server.rss_kb)
    if end_kb > baseline_kb * (1 + RSS_TOLERANCE):
        rep.bad("final", f"RSS grew from {baseline_kb} kB to {end_kb} kB "
                         f"(+{(end_kb / baseline_kb - 1) * 100:.1f} %)")
    resp = await client.get("/health")
    if resp.status_code != 200 or resp.json().get("status") != "ok" or not server.alive():
        rep.bad("final", f"server not healthy at the end: {resp.status_code} {resp.text[:200]}")
    return {"rss_end_kb": end_kb, "jobs_listed": len(listed), "server_cancels": server_cancels}


async def shutdown_under_load(chaos: Chaos, server: Server) -> int | None:
    """SIGTERM with every slot and queue place taken: each open stream still gets exactly one
    terminal event (end, or CANCELLED reason shutdown), new work gets 503 SHUTTING_DOWN, and
    the process exits 0."""
    rep, mode = chaos.report, chaos.mode
    n = mode.slots + mode.queue_depth
    seen_first = trio.Semaphore(0)
    done: list[Stream] = []

    async def one(i: int) -> None:
        job_id = f"drain-{i}"
        body = {"job_id": job_id, "prompt": "drain é🙂", "max_tokens": N_CTX - 64}
        st = Stream(JobSpec(job_id, "drain", body), chaos.cid(job_id), rep, mode.queue_depth)
        try:
            async with chaos.client.stream("POST", "/execute", json=body,
                                           headers={"X-Correlation-Id": st.cid}) as resp:
                if resp.status_code != 200:
                    st.bad(f"/execute before the shutdown answered {resp.status_code}")
                    seen_first.release()
                    return
                first = True
                async for name, data in read_frames(resp, st):
                    st.feed(name, data)
                    if first:
                        first = False
                        seen_first.release()
        except httpx.HTTPError as exc:
            st.bad(f"stream cut during the drain: {type(exc).__name__}: {exc}")
        if st.terminal is None:
            st.bad(f"no terminal event before the worker exited (phase {st.phase()})")
        elif st.terminal[0] == "error" and (st.terminal[1].get("code"), st.terminal[1].get(
                "reason")) != ("CANCELLED", "shutdown"):
            st.bad(f"drained with {st.terminal[1]}")
        done.append(st)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
        with trio.move_on_after(30):
            for _ in range(n):
                await seen_first.acquire()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
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
    for st in done:
        outcome = "end" if st.terminal and st.terminal[0] == "end" else "cancelled"
        rep.counts[f"drain_{outcome}"] += 1
    try:
        return await trio.to_thread.run_sync(server.proc.wait, 30)
    except subprocess.TimeoutExpired:
        return None


async def chaos_main(args: argparse.Namespace, mode: Mode, server: Server) -> dict[str, Any]:
    rep = Report()
    rng = random.Random(args.seed)
    url = await trio.to_thread.run_sync(server.start)
    timeout = httpx.Timeout(120.0, connect=10.0)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        with trio.fail_after(300):
            while True:
                resp = await client.get("/health")
                if resp.status_code == 200 and resp.json().get("status") == "ok":
                    vocab = int(resp.json()["vocab_size"])
                    break
                await trio.sleep(0.05)
        chaos = Chaos(client, mode, rep)
        t0 = time.monotonic()
        # Warm-up: a small plan of the same mix (its own seed), so that every path, and the
        # allocator's per-thread arenas, have been used once before the RSS baseline.
        warm_rng = random.Random(args.seed ^ 0x5EED)
        warm_plan = make_plan(warm_rng, mode, mode.warmup, vocab,
                              generate_malformed(12, args.seed + 1, vocab),
                              raw_abuses(warm_rng, 3), prefix="warm")
        await run_plan(chaos, mode, warm_plan, [], None)
        await wait_idle(client, 10)
        await trio.sleep(0.5)
        baseline_kb = await trio.to_thread.run_sync(server.rss_kb)
        n_bad = args.malformed if args.malformed is not None else max(20, args.jobs // 2)
        malformed = generate_malformed(n_bad, args.seed, vocab)
        plan = make_plan(rng, mode, args.jobs, vocab, malformed, raw_abuses(rng, n_bad // 8 + 2))
        rss_trace: list[int] = []
        await run_plan(chaos, mode, plan, rss_trace, server)
        elapsed = time.monotonic() - t0
        final = await final_checks(chaos, server, baseline_kb)
        final["exit_code"] = await shutdown_under_load(chaos, server)
    return {"report": rep, "baseline_kb": baseline_kb, "elapsed": elapsed,
            "rss_trace": rss_trace, **final}


async def sample_rss(server: Server, trace: list[int]) -> None:
    while True:
        trace.append(await trio.to_thread.run_sync(server.rss_kb))
        await trio.sleep(1.0)


async def run_all(chaos: Chaos, items: list[Item]) -> None:
    for item in items:
        await chaos.run_item(item)


async def client_loop(chaos: Chaos, recv: trio.MemoryReceiveChannel[Item]) -> None:
    async with recv:
        async for item in recv:
            await chaos.run_item(item)


def summarize(res: dict[str, Any], server_exit: int | None, log_errors: list[str],
              args: argparse.Namespace, mode: Mode) -> int:
    rep: Report = res["report"]
    if server_exit != 0:
        rep.bad("shutdown", f"SIGTERM drain: exit code {server_exit} (expected 0)")
    for line in log_errors:
        rep.bad("server-log", line)
    lat = sorted(rep.cancel_latency)
    pct = (lambda q: f"{lat[min(len(lat) - 1, int(q * len(lat)))] * 1000:.1f} ms") if lat else (
        lambda q: "n/a")
    c = rep.counts
    print(f"\n== orcd chaos ({mode.name}, seed {args.seed}, model {args.model or 'tiny'}) ==")
    print(f"time                {res['elapsed']:.1f} s (server start excluded)")
    print(f"jobs                {c['jobs']} executed (+{mode.warmup} warm-up), "
          f"{c['bursts']} bursts, {c['determinism_pairs']} determinism pairs")
    print(f"outcomes            {dict(Counter(rep.ledger.values()))}")
    print(f"cancels by phase    {dict(rep.cancels)} ({c['repeated_cancels']} of them repeats)")
    print(f"cancel -> terminal  p50 {pct(0.5)}, p95 {pct(0.95)}, max {pct(1.0)} "
          f"(n={len(lat)}); lost races {c['cancel_lost_race']}, "
          f"trigger missed {c['cancel_trigger_missed']}, over 100 ms "
          f"{sum(x > 0.1 for x in lat)}")
    sc = res["server_cancels"]
    print(f"server cancel stop  {sc['n']} cancels: {sc['le_10ms']} within 10 ms, "
          f"{sc['le_100ms']} within 100 ms (orcd_cancel_latency_seconds)")
    lag = sorted(rep.disconnect_lag)
    lost = {k.removeprefix("disconnect_lost_race_"): v for k, v in c.items()
            if k.startswith("disconnect_lost_race_")}
    print(f"disconnects         {dict(rep.disconnects)}; job final after p50 "
          f"{lag[len(lag) // 2] * 1000 if lag else 0:.0f} ms, max "
          f"{lag[-1] * 1000 if lag else 0:.0f} ms; completed anyway {lost}")
    print(f"timeouts            {c['timeouts']} INFERENCE_TIMEOUT")
    print(f"busy rejections     {c['busy_rejections']} (gave up {c['gave_up_busy']}); "
          f"duplicates rejected {c['duplicates_rejected']}")
    print(f"malformed requests  {sum(rep.malformed.values())}: "
          f"{dict(sorted(rep.malformed.items()))}")
    print(f"RSS                 baseline {res['baseline_kb']} kB, end {res['rss_end_kb']} kB "
          f"({(res['rss_end_kb'] / res['baseline_kb'] - 1) * 100:+.1f} %); during the run "
          f"{min(res['rss_trace'], default=0)}..{max(res['rss_trace'], default=0)} kB")
    trace = res["rss_trace"]
    if len(trace) >= 10:
        print("RSS trace (kB)      " + " ".join(str(trace[i * (len(trace) - 1) // 9])
                                                for i in range(10)))
    print(f"job history         {res['jobs_listed']} jobs listed by GET /jobs at the end")
    print(f"shutdown under load {c['drain_end']} streams ended, {c['drain_cancelled']} "
          f"cancelled (shutdown); exit code {server_exit}")
    print(f"violations          {len(rep.violations)}")
    groups: dict[str, list[str]] = {}
    for v in rep.violations:  # group repeats of one problem: ids and numbers blanked out
        key = re.sub(r'(bad|chaos|warm)-\d+[\w-]*|"correlation_id": "[^"]*"|\d+', "#", v)
        groups.setdefault(key, []).append(v)
    for same in groups.values():
        print(f"  - {same[0]}" + (f"  (x{len(same)})" if len(same) > 1 else ""))
    return 1 if rep.violations else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="~150 jobs (CI)")
    group.add_argument("--long", action="store_true", help="1200 jobs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: tiny model)")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--malformed", type=int, default=None, help="malformed requests")
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "long" if args.long else "default"]
    args.jobs = args.jobs or mode.jobs
    if args.jobs < 50:
        mode = replace(mode, warmup=min(mode.warmup, 6))
    if args.model is not None:  # a real model is slow: no job runs to the context's end
        mode = replace(mode, default_max=0.0)
    workdir = Path(tempfile.mkdtemp(prefix="orcd-chaos-"))
    model = args.model
    if model is None:
        from orcd._tinymodel import build_tiny_gguf

        model = build_tiny_gguf(workdir / "tiny.gguf", n_ctx=4096)
    server = Server(model.resolve(), mode, workdir)
    try:
        res = trio.run(chaos_main, args, mode, server)
    except BaseException:
        server.stop()
        print(f"chaos run aborted; server log kept in {server.log_path}", file=sys.stderr)
        raise
    server.stop()
    status = summarize(res, res["exit_code"], server.error_log_lines(), args, mode)
    if status:
        print(f"server log kept in {server.log_path}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
