#!/usr/bin/env python3
"""Benchmark orcd against raw llama-cpp-python and llama_cpp.server, on one machine and model.

    python bench/bench.py [--model PATH] [--quick] [--out bench/results.json]

Three systems, measured one after the other (never concurrently: the machine's cores belong
to whichever one is being measured):

* raw  -- an in-process greedy generation loop on a ``llama_cpp.Llama`` context through
  llama.cpp's C API (batch prompt decode, greedy sampler, one decode per token): the limit.
* orcd -- the real ``orcd serve`` process over HTTP/SSE.
* peer -- ``python -m llama_cpp.server`` (OpenAI-compatible), streaming ``/v1/completions``.

Every prompt starts with a unique nonce, so no system can reuse a KV-cache prefix from an
earlier request. Writes a table to stdout, the JSON results (with every raw sample) and a PNG
chart of cancel latency per phase. Goals are reported as PASS/MISS; they never fail the run.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from peers import (
    N_CTX,
    ROOT,
    THREADS,
    decode_chunks,
    free_port,
    llama_cpp_server_command,
    log,
    nonce,
    now,
    quantile,
    stream_sse,
)

DEFAULT_MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
SHORT_PROMPT = "Write a long, detailed story about a lighthouse keeper and a lost whale."
SENTENCE = "The old lighthouse keeper watched the grey sea roll against the rocks every evening. "
LONG_TOKENS = 1600
# llama.cpp's own default (auto) turns flash attention on for CPU, and orcd keeps that default;
# llama_cpp.Llama and llama_cpp.server turn it off unless asked. Same kernels for all three.
FLASH_ATTN = True
TIMEOUT = httpx.Timeout(60.0, connect=5.0)


@dataclass(frozen=True)
class Plan:
    idle_probes: int
    short_reps: int
    long_reps: int
    short_tokens: int
    long_tokens_out: int
    cancel_reps: int
    health_jobs: int
    cycles: int


QUICK = Plan(idle_probes=5, short_reps=3, long_reps=2, short_tokens=64, long_tokens_out=16,
             cancel_reps=5, health_jobs=2, cycles=20)
FULL = Plan(idle_probes=10, short_reps=8, long_reps=4, short_tokens=96, long_tokens_out=32,
            cancel_reps=12, health_jobs=3, cycles=100)


# -- statistics --------------------------------------------------------------------------

def summary(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0, "median": None, "p99": None, "min": None, "max": None}
    return {"n": len(xs), "median": quantile(xs, 0.5), "p99": quantile(xs, 0.99),
            "min": min(xs), "max": max(xs)}


def _cpu_jiffies(pid: int | None = None) -> int:
    """Busy jiffies of the whole machine (pid None) or of one process (all its threads)."""
    if pid is None:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(v) - v[3] - v[4]
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


class CpuWatch:
    """How much CPU other processes took while one system was measured (0 = a quiet box)."""

    def __init__(self, pid: int | None = None) -> None:
        self.pids = [os.getpid()] + ([pid] if pid else [])
        self.t0, self.busy0, self.ours0 = now(), _cpu_jiffies(), self._ours()

    def _ours(self) -> int:
        return sum(_cpu_jiffies(p) for p in self.pids)

    def foreign(self) -> float:
        """Foreign CPU time as a fraction of the machine's capacity over the interval."""
        hz = os.sysconf("SC_CLK_TCK")
        capacity = (now() - self.t0) * hz * THREADS
        other = (_cpu_jiffies() - self.busy0) - (self._ours() - self.ours0)
        return max(0.0, other / capacity) if capacity > 0 else 0.0


def idle_check() -> float:
    """Fraction of the machine busy over one second, before anything of ours runs."""
    w = CpuWatch()
    time.sleep(1.0)
    return w.foreign()


def wait_quiet(max_wait: float, what: str) -> float:
    """Wait (up to ``max_wait`` s) until other processes leave the CPU; returns their share."""
    deadline = now() + max_wait
    busy = idle_check()
    while busy > 0.10 and now() < deadline:
        log(f"{what}: other processes keep {busy:.0%} of the CPU busy; waiting for quiet")
        time.sleep(min(10.0, max(0.0, deadline - now())))
        busy = idle_check()
    if busy > 0.10:
        log(f"WARNING: other processes keep {busy:.0%} of the CPU busy; results will be noisy")
    return busy


# -- generation records ------------------------------------------------------------------

@dataclass
class Gen:
    """One generation as a client saw it (times in seconds, perf_counter)."""

    prompt_tokens: int = 0
    tokens: int = 0
    ttft_s: float = 0.0
    decode_tps: float = 0.0
    text: str = ""
    server_decode_ms: float | None = None

    @staticmethod
    def build(t_send: float, stamps: list[float], tokens: int, **kw: Any) -> Gen:
        if not stamps:
            raise RuntimeError("the generation produced no token")
        span = stamps[-1] - stamps[0]
        tps = (tokens - 1) / span if tokens > 1 and span > 0 else 0.0
        return Gen(tokens=tokens, ttft_s=stamps[0] - t_send, decode_tps=tps, **kw)


class RawEngine:
    """The physical limit: greedy decoding straight on llama.cpp's C API, in-process."""

    def __init__(self, model: Path) -> None:
        import llama_cpp

        self.lc = llama_cpp
        self.llm = llama_cpp.Llama(str(model), n_ctx=N_CTX, n_threads=THREADS,
                                   n_threads_batch=THREADS, flash_attn=FLASH_ATTN,
                                   verbose=False)
        self.ctx = self.llm._ctx.ctx
        self.vocab = self.llm._model.vocab

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=True, special=True))

    def generate(self, prompt: str, max_tokens: int) -> Gen:
        lc = self.lc
        t_send = now()
        toks = self.tokenize(prompt)
        self.llm._ctx.kv_cache_clear()
        smpl = lc.llama_sampler_init_greedy()
        buf = ctypes.create_string_buffer(256)
        stamps: list[float] = []
        pieces: list[bytes] = []
        try:
            decode_chunks(self.ctx, toks, self.llm.n_batch)
            while len(stamps) < max_tokens:
                tok = lc.llama_sampler_sample(smpl, self.ctx, -1)
                if lc.llama_vocab_is_eog(self.vocab, tok):
                    break
                n = lc.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, False)
                pieces.append(buf.raw[:max(n, 0)])
                stamps.append(now())
                if len(stamps) < max_tokens:
                    decode_chunks(self.ctx, [tok], 1)
        finally:
            lc.llama_sampler_free(smpl)
            self.llm._ctx.kv_cache_clear()
        return Gen.build(t_send, stamps, len(stamps), prompt_tokens=len(toks),
                         text=b"".join(pieces).decode("utf-8", "replace"))

    def close(self) -> None:
        self.llm.close()


# -- streams ------------------------------------------------------------------------------

@dataclass
class Event:
    t: float
    kind: str  # queued | started | token | end | error
    data: dict[str, Any]


class Stream(threading.Thread):
    """Reads one streaming generation in a background thread, timestamping every event."""

    def __init__(self, server: Server, prompt: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.job_id = f"bench-{uuid.uuid4().hex}"
        self.body = server.body(self.job_id, prompt, max_tokens)
        self.events: list[Event] = []
        self.error: str | None = None
        self.t_send = 0.0
        self.t_closed: float | None = None
        self._cond = threading.Condition()
        self._sock: socket.socket | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.t_send = self.t_send or now()
            stream_sse(self.server.client, self.server.base + self.server.gen_path, self.body,
                       {}, on_open=self._opened,
                       on_frame=lambda t, name, data: self._add(
                           self.server.normalize(t, name, data)))
        except (httpx.HTTPError, OSError) as exc:
            if self.t_closed is None:
                self.error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - reported to the waiting thread
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.done.set()
            with self._cond:
                self._cond.notify_all()

    def _opened(self, sock: socket.socket | None) -> None:
        self._sock = sock
        self._add(Event(now(), "headers", {}))

    def _add(self, ev: Event) -> None:
        with self._cond:
            self.events.append(ev)
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[list[Event]], bool], timeout: float = 60.0) -> None:
        deadline = now() + timeout
        with self._cond:
            while not pred(self.events):
                if self.done.is_set() and not pred(self.events):
                    raise RuntimeError(f"stream ended early ({self.error or 'no error'}): "
                                       f"{[e.kind for e in self.events][-5:]}")
                left = deadline - now()
                if left <= 0:
                    raise TimeoutError(f"stream condition not met in {timeout} s")
                self._cond.wait(left)

    def wait_kind(self, kind: str, count: int = 1, timeout: float = 60.0) -> None:
        self.wait_for(lambda evs: sum(e.kind == kind for e in evs) >= count, timeout)

    def close_now(self) -> None:
        """Drop the connection at once (shutdown wakes the reader thread immediately)."""
        self.t_closed = now()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def first(self, kind: str) -> Event | None:
        return next((e for e in self.events if e.kind == kind), None)

    def finish(self, timeout: float = 120.0) -> None:
        if not self.done.wait(timeout):
            raise TimeoutError(f"stream {self.job_id} did not finish in {timeout} s")
        self.join(5)

    def gen(self) -> Gen:
        self.finish()
        if self.error:
            raise RuntimeError(f"generation failed: {self.error}")
        stamps = [e.t for e in self.events if e.kind == "token"]
        end = self.first("end")
        tokens = len(stamps)
        kw: dict[str, Any] = {"text": "".join(e.data.get("t", "") for e in self.events
                                              if e.kind == "token")}
        if end is not None and "tokens_out" in end.data:
            tokens = int(end.data["tokens_out"])
            kw["server_decode_ms"] = end.data.get("decode_time_ms")
        started = self.first("started")
        if started is not None:
            kw["prompt_tokens"] = int(started.data.get("prompt_tokens", 0))
        return Gen.build(self.t_send, stamps, tokens, **kw)


# -- servers ------------------------------------------------------------------------------

class Server:
    name = "server"
    gen_path = ""
    health_path = ""
    health_label = ""

    def __init__(self, model: Path, logdir: Path) -> None:
        self.model = model
        self.logdir = logdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = ""
        self.client = httpx.Client(timeout=TIMEOUT, limits=httpx.Limits(max_connections=32))

    # subclass hooks
    def command(self) -> list[str]: raise NotImplementedError
    def body(self, job_id: str, prompt: str, max_tokens: int) -> dict[str, Any]:
        raise NotImplementedError
    def normalize(self, t: float, name: str, data: str) -> Event: raise NotImplementedError
    def wait_ready(self, deadline: float) -> None: raise NotImplementedError
    def cancel(self, stream: Stream) -> None: raise NotImplementedError
    def probe_ok(self, text: str) -> bool: raise NotImplementedError

    def slots(self) -> int:
        """How many jobs it runs at once (the peer: one)."""
        return 1

    def start(self) -> None:
        out = open(self.logdir / f"{self.name}.stdout", "wb")  # noqa: SIM115
        err = open(self.logdir / f"{self.name}.stderr", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, stdout=out, stderr=err,
                                     stdin=subprocess.DEVNULL)
        out.close()
        err.close()
        self.wait_ready(now() + 180)

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = (self.logdir / f"{self.name}.stderr").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        self.client.close()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def probe(self) -> float:
        """A one-token request, read to its end: seconds from send to done."""
        t0 = now()
        return self.probe_run()[1] - t0

    def probe_run(self) -> tuple[float | None, float]:
        """Send a one-token request and read it to its end.

        Returns when its ``started`` event arrived (orcd only: the job got the slot) and
        when the response was complete.
        """
        body = self.body(f"bench-probe-{uuid.uuid4().hex}", f"Probe {nonce()}: Hi", 1)
        t_started: float | None = None
        buf = b""
        with self.client.stream("POST", self.base + self.gen_path, json=body) as r:
            for chunk in r.iter_raw():
                buf += chunk
                if t_started is None and b"event: started" in buf:
                    t_started = now()
        text = buf.decode("utf-8", "replace")
        if r.status_code != 200 or not self.probe_ok(text):
            raise RuntimeError(f"{self.name} probe failed: HTTP {r.status_code} {text[:300]}")
        return t_started, now()

    def health_once(self) -> float:
        t0 = now()
        r = self.client.get(self.base + self.health_path)
        r.raise_for_status()
        return now() - t0

    def stream(self, prompt: str, max_tokens: int) -> Stream:
        s = Stream(self, prompt, max_tokens)
        s.t_send = now()
        s.start()
        return s


class Orcd(Server):
    name = "orcd"
    gen_path = "/execute"
    health_path = "/health"
    health_label = "GET /health"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "orcd", "serve", "--model", str(self.model), "--port", "0",
                "--log-format", "json"]

    def body(self, job_id: str, prompt: str, max_tokens: int) -> dict[str, Any]:
        return {"job_id": job_id, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0.0, "seed": 1}

    def normalize(self, t: float, name: str, data: str) -> Event:
        return Event(t, name, json.loads(data))

    def wait_ready(self, deadline: float) -> None:
        stdout = self.logdir / f"{self.name}.stdout"
        while not self.base:
            self.check_alive()
            for line in stdout.read_text(errors="replace").splitlines():
                if line.startswith("orcd listening on "):
                    self.base = line.split()[-1].rstrip("/")
            if now() > deadline:
                raise TimeoutError("orcd never printed its listening line")
            time.sleep(0.05)
        while True:
            self.check_alive()
            try:
                if self.client.get(self.base + "/health").json().get("status") == "ok":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if now() > deadline:
                raise TimeoutError("orcd's /health never reported status ok")
            time.sleep(0.1)

    def cancel(self, stream: Stream) -> None:
        r = self.client.post(self.base + "/cancel", json={"job_id": stream.job_id})
        if r.status_code != 202:
            raise RuntimeError(f"/cancel answered {r.status_code}: {r.text[:200]}")

    def probe_ok(self, text: str) -> bool:
        return "event: end" in text

    def slots(self) -> int:
        return int(self.client.get(self.base + "/health").json()["slots"])

    def cancel_metrics(self) -> dict[str, float]:
        """Mean of orcd's own orcd_cancel_latency_seconds{phase} (flag set -> stopped), ms."""
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        for line in self.client.get(self.base + "/metrics").text.splitlines():
            for suffix, into in (("_sum{", sums), ("_count{", counts)):
                if line.startswith("orcd_cancel_latency_seconds" + suffix):
                    phase = line.split('phase="', 1)[1].split('"', 1)[0]
                    into[phase] = float(line.rsplit(" ", 1)[1])
        return {ph: round(sums[ph] / n * 1e3, 3) for ph, n in counts.items() if n}

    def tokens_out(self, job_id: str) -> int:
        return int(self.client.get(f"{self.base}/jobs/{job_id}").json().get("tokens_out", -1))


class Peer(Server):
    name = "peer"
    gen_path = "/v1/completions"
    health_path = "/v1/models"
    health_label = "GET /v1/models (no /health)"

    def __init__(self, model: Path, logdir: Path) -> None:
        super().__init__(model, logdir)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return llama_cpp_server_command(self.model, self.port)

    def body(self, job_id: str, prompt: str, max_tokens: int) -> dict[str, Any]:
        return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": 1,
                "repeat_penalty": 1.0, "stream": True}

    def normalize(self, t: float, name: str, data: str) -> Event:
        if data.strip() == "[DONE]":
            return Event(t, "end", {})
        chunk = json.loads(data)
        text = chunk["choices"][0].get("text") or ""
        return Event(t, "token" if text else "meta", {"t": text})

    def wait_ready(self, deadline: float) -> None:
        while True:
            self.check_alive()
            try:
                if self.client.get(self.base + "/v1/models").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if now() > deadline:
                raise TimeoutError("llama_cpp.server never answered /v1/models")
            time.sleep(0.2)

    def cancel(self, stream: Stream) -> None:
        stream.close_now()  # the only cancel llama_cpp.server offers

    def probe_ok(self, text: str) -> bool:
        return "[DONE]" in text


# -- measurements -------------------------------------------------------------------------

@dataclass
class Results:
    gens: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    idle_probe_s: dict[str, list[float]] = field(default_factory=dict)
    cancel: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    health: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    foreign_cpu: dict[str, float] = field(default_factory=dict)
    server_cancel_ms: dict[str, float] = field(default_factory=dict)  # orcd's own metric
    raw_halves: dict[str, list[list[float]]] = field(default_factory=dict)  # raw tok/s per half


def long_prompt(tokenize: Callable[[str], list[int]]) -> str:
    per = max(1, len(tokenize(SENTENCE)) - 1)
    text = SENTENCE * (LONG_TOKENS // per)
    while len(tokenize(text)) < LONG_TOKENS - 40:
        text += SENTENCE
    return text + "\nSummarize the text above in one paragraph."


def bench_raw(model: Path, plan: Plan, res: Results, half: int) -> str:
    """Half ``half`` (0 or 1) of raw's repetitions: raw runs before and after the servers,
    so that a drift of the machine's speed during the run shows (``raw_drift``)."""
    log(f"raw: loading the model in-process ({'first' if half == 0 else 'second'} half)")
    watch = CpuWatch()
    raw = RawEngine(model)
    body = long_prompt(raw.tokenize)
    try:
        raw.generate(f"[{nonce()}] {SHORT_PROMPT}", 8)  # warm-up
        for kind, prompt, n, reps in (("short", SHORT_PROMPT, plan.short_tokens, plan.short_reps),
                                      ("long", body, plan.long_tokens_out, plan.long_reps)):
            first = (reps + 1) // 2
            gens = [asdict(raw.generate(f"[{nonce()}] {prompt}", n))
                    for _ in range(first if half == 0 else reps - first)]
            res.gens.setdefault("raw", {}).setdefault(kind, []).extend(gens)
            res.raw_halves.setdefault(kind, []).append([g["decode_tps"] for g in gens])
            if gens:
                log(f"raw: {kind} prompt done ({gens[-1]['prompt_tokens']} prompt tokens, "
                    f"{gens[-1]['tokens']} out)")
    finally:
        res.foreign_cpu[f"raw{half + 1}"] = watch.foreign()
        raw.close()
        del raw
        gc.collect()
    return body


def measure_gens(srv: Server, plan: Plan, body: str, res: Results) -> None:
    res.gens[srv.name] = {"short": [], "long": []}
    for kind, prompt, n, reps in (("short", SHORT_PROMPT, plan.short_tokens, plan.short_reps),
                                  ("long", body, plan.long_tokens_out, plan.long_reps)):
        for _ in range(reps):
            g = srv.stream(f"[{nonce()}] {prompt}", n).gen()
            res.gens[srv.name][kind].append(asdict(g))
        log(f"{srv.name}: {kind} prompt done ({g.tokens} tokens out)")


class Skip(Exception):
    """The cancel did not land in the intended phase: the sample is dropped (and counted)."""


def cancel_sample(srv: Server, phase: str, body: str, idle: float, long_ttft: float,
                  n_busy: int) -> dict[str, Any]:
    """One cancel in ``phase``; returns the black-box and (orcd) stream-event latencies.

    ``n_busy`` tokens keep the server generating for about 1.5 s.
    """
    streams: list[Stream] = []
    info: dict[str, Any] = {"valid": True}

    def open_stream(prompt: str, max_tokens: int) -> Stream:
        st = srv.stream(f"[{nonce()}] {prompt}", max_tokens)
        streams.append(st)
        return st

    try:
        running: list[Stream] = []
        if phase == "queued":  # cancel B, queued behind running jobs that fill every slot
            running = [open_stream(SHORT_PROMPT, n_busy) for _ in range(srv.slots())]
            for a in running:
                a.wait_kind("token", 2)
            s = open_stream(SHORT_PROMPT, 16)
            if isinstance(srv, Orcd):
                s.wait_for(lambda evs: any(e.kind in ("queued", "started") for e in evs))
                if s.first("queued") is None:
                    raise Skip("the second job was not queued")
            else:
                s.wait_kind("headers")
                time.sleep(0.05)  # let the request reach llama_cpp.server's model lock
        elif phase == "prompt":
            s = open_stream(body, 16)
            delay = min(random.uniform(0.1, 0.3), 0.5 * long_ttft)
            info["delay_s"] = delay
            time.sleep(max(0.0, s.t_send + delay - now()))
        else:
            s = open_stream(SHORT_PROMPT, n_busy)
            s.wait_kind("token", 8)
        t0 = now()
        srv.cancel(s)
        t_started, t_done = srv.probe_run()
        info["probe_total_s"] = t_done - t0
        s.finish(60)
        t_ref = t0
        if running:
            for a in running:
                a.finish()
            ends = [a.first("end") for a in running]
            if any(end is None or end.t < t0 for end in ends):
                raise Skip("a running job was over before the cancel")
            # queued: what the cancelled job still costs the next one, from the first slot
            # that comes free
            t_ref = min(end.t for end in ends if end is not None)
        info["blackbox_s"] = t_done - t_ref - idle
        if t_started is not None:
            info["slot_s"] = t_started - t_ref
        if phase == "prompt" and (any(e.kind == "token" and e.t < t0 for e in s.events) or (
                isinstance(srv, Orcd) and srv.tokens_out(s.job_id) > 0)):
            raise Skip("the prompt was evaluated before the cancel")
        s_end = s.first("end")
        if s_end is not None and (isinstance(srv, Orcd) or s_end.t < t0):
            raise Skip("the job finished before the cancel")
        if isinstance(srv, Orcd):
            err = s.first("error")
            if err is None or err.data.get("code") != "CANCELLED":
                raise RuntimeError("orcd: the cancelled stream did not end with error "
                                   f"CANCELLED: {[(e.kind, e.data) for e in s.events[-2:]]}")
            info["event_s"] = err.t - t0
            info["reason"] = err.data.get("reason")
    except Skip as exc:
        info.update(valid=False, why=str(exc))
    except Exception as exc:  # noqa: BLE001 - one bad sample must not end the run
        info.update(valid=False, why=f"{type(exc).__name__}: {exc}")
        log(f"{srv.name}: cancel/{phase} sample failed: {info['why']}")
    finally:
        for st in streams:
            if not st.done.is_set():
                st.close_now()
            st.finish(60)
    return info


def measure_cancel(srv: Server, plan: Plan, body: str, res: Results) -> None:
    idle = quantile(res.idle_probe_s[srv.name], 0.5)
    long_ttft = quantile([g["ttft_s"] for g in res.gens[srv.name]["long"]], 0.5)
    tps = quantile([g["decode_tps"] for g in res.gens[srv.name]["short"]], 0.5)
    n_busy = max(24, min(2000, int(tps * 1.5)))
    res.cancel[srv.name] = {}
    for phase in ("queued", "prompt", "decode"):
        samples = [cancel_sample(srv, phase, body, idle, long_ttft, n_busy)
                   for _ in range(plan.cancel_reps)]
        res.cancel[srv.name][phase] = samples
        bb = summary([x["blackbox_s"] for x in samples if x["valid"]])
        dropped = sum(not x["valid"] for x in samples)
        if bb["n"]:
            log(f"{srv.name}: cancel/{phase}: median {bb['median'] * 1e3:.1f} ms, "
                f"p99 {bb['p99'] * 1e3:.1f} ms ({dropped} dropped)")
        else:
            log(f"{srv.name}: cancel/{phase}: no valid sample ({dropped} dropped)")


def measure_health(srv: Server, plan: Plan, res: Results) -> None:
    idle = [srv.health_once() for _ in range(10)]
    busy: list[float] = []
    for _ in range(plan.health_jobs):
        s = srv.stream(f"[{nonce()}] {SHORT_PROMPT}", 64)
        s.wait_kind("token")
        calls: list[tuple[float, float]] = []
        while not s.done.is_set() and len(calls) < 50:
            calls.append((now(), srv.health_once()))
            time.sleep(0.02)
        s.finish()
        end = s.first("end")
        t_end = end.t if end is not None else s.events[-1].t
        busy += [lat for t, lat in calls if t < t_end]  # only calls sent while it generated
    res.health[srv.name] = {"endpoint": srv.health_label, "idle_s": idle, "busy_s": busy}


def measure_memory(srv: Server, plan: Plan, res: Results) -> None:
    srv.probe()
    time.sleep(0.5)
    before = srv.rss_bytes()
    for i in range(plan.cycles):
        s = srv.stream(f"[{nonce()}] {SHORT_PROMPT}", 64)
        s.wait_kind("started" if isinstance(srv, Orcd) and i % 2 else "token")
        srv.cancel(s)
        s.finish(30)
    srv.probe()
    time.sleep(0.5)
    after = srv.rss_bytes()
    res.memory[srv.name] = {"cycles": plan.cycles, "rss_warm_bytes": before,
                            "rss_after_bytes": after, "delta_bytes": after - before}
    log(f"{srv.name}: RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
        f"after {plan.cycles} execute/cancel cycles")


def bench_server(srv: Server, plan: Plan, body: str, res: Results) -> None:
    log(f"{srv.name}: starting {' '.join(srv.command()[1:])}")
    t0 = now()
    try:
        srv.start()
        log(f"{srv.name}: ready in {now() - t0:.1f} s at {srv.base}")
        assert srv.proc is not None
        watch = CpuWatch(srv.proc.pid)
        for _ in range(2):
            srv.stream(f"[{nonce()}] {SHORT_PROMPT}", 16).gen()
        srv.stream(f"[{nonce()}] {body}", 4).gen()
        res.idle_probe_s[srv.name] = [srv.probe() for _ in range(plan.idle_probes)]
        measure_gens(srv, plan, body, res)
        measure_health(srv, plan, res)
        measure_cancel(srv, plan, body, res)
        if isinstance(srv, Orcd):
            res.server_cancel_ms = srv.cancel_metrics()
        measure_memory(srv, plan, res)
        res.foreign_cpu[srv.name] = watch.foreign()
    finally:
        srv.stop()


# -- report -------------------------------------------------------------------------------

def fmt(s: dict[str, Any], scale: float, digits: int = 1) -> str:
    if not s or s.get("median") is None:
        return "n/a"
    return f"{s['median'] * scale:.{digits}f} ({s['p99'] * scale:.{digits}f})"


def ratio(a: dict[str, Any], b: dict[str, Any]) -> str:
    if not a or not b or not a.get("median") or not b.get("median"):
        return "n/a"
    return f"{a['median'] / b['median']:.3f}"


def build_summary(res: Results) -> dict[str, Any]:
    out: dict[str, Any] = {"gens": {}, "cancel": {}, "health": {}, "idle_probe_s": {}}
    for sys_name, kinds in res.gens.items():
        out["gens"][sys_name] = {
            kind: {"decode_tps": summary([g["decode_tps"] for g in gs]),
                   "ttft_s": summary([g["ttft_s"] for g in gs]),
                   "tokens_out": summary([float(g["tokens"]) for g in gs]),
                   "prompt_tokens": gs[0]["prompt_tokens"] if gs else None}
            for kind, gs in kinds.items()}
    for name, probes in res.idle_probe_s.items():
        out["idle_probe_s"][name] = summary(probes)
    for name, phases in res.cancel.items():
        out["cancel"][name] = {}
        for phase, xs in phases.items():
            valid = [x for x in xs if x["valid"]]
            out["cancel"][name][phase] = {
                "blackbox_s": summary([x["blackbox_s"] for x in valid]),
                "event_s": summary([x["event_s"] for x in valid if "event_s" in x]),
                "slot_s": summary([x["slot_s"] for x in valid if "slot_s" in x]),
                "invalid_samples": len(xs) - len(valid)}
    for name, h in res.health.items():
        out["health"][name] = {"endpoint": h["endpoint"], "idle_s": summary(h["idle_s"]),
                               "busy_s": summary(h["busy_s"])}
    return out


def report(summ: dict[str, Any], res: Results) -> list[dict[str, Any]]:
    g = summ["gens"]
    rows: list[tuple[str, str, str, str, str, str]] = []
    for kind in ("short", "long"):
        pt = g.get("orcd", {}).get(kind, {}).get("prompt_tokens")
        for metric, scale, label in (("decode_tps", 1.0, "tok/s"), ("ttft_s", 1e3, "TTFT ms")):
            cells = [g.get(s, {}).get(kind, {}).get(metric, {}) for s in ("raw", "orcd", "peer")]
            rows.append((f"{label} ({kind}, {pt} prompt tok)", fmt(cells[0], scale),
                         fmt(cells[1], scale), fmt(cells[2], scale), ratio(cells[1], cells[0]),
                         ratio(cells[1], cells[2])))
    ip = summ["idle_probe_s"]
    rows.append(("idle 1-token probe ms", "", fmt(ip.get("orcd", {}), 1e3),
                 fmt(ip.get("peer", {}), 1e3), "", ratio(ip.get("orcd", {}), ip.get("peer", {}))))
    c = summ["cancel"]
    for phase in ("queued", "prompt", "decode"):
        o = c.get("orcd", {}).get(phase, {})
        p = c.get("peer", {}).get(phase, {})
        rows.append((f"cancel {phase} ms (server free)", "", fmt(o.get("blackbox_s", {}), 1e3),
                     fmt(p.get("blackbox_s", {}), 1e3), "",
                     ratio(o.get("blackbox_s", {}), p.get("blackbox_s", {}))))
        rows.append((f"cancel {phase} ms (to CANCELLED)", "", fmt(o.get("event_s", {}), 1e3),
                     "-", "", ""))
        rows.append((f"cancel {phase} ms (probe started)", "", fmt(o.get("slot_s", {}), 1e3),
                     "-", "", ""))
    h = summ["health"]
    for key, label in (("idle_s", "idle"), ("busy_s", "while generating")):
        rows.append((f"health ms {label}", "", fmt(h.get("orcd", {}).get(key, {}), 1e3, 2),
                     fmt(h.get("peer", {}).get(key, {}), 1e3, 2), "",
                     ratio(h.get("orcd", {}).get(key, {}), h.get("peer", {}).get(key, {}))))
    m = res.memory
    if m:
        def mem(n: str) -> str:
            x = m.get(n)
            return (f"{x['rss_warm_bytes'] / 2**20:.0f}->{x['rss_after_bytes'] / 2**20:.0f}"
                    if x else "n/a")
        rows.append((f"RSS MiB warm->after {next(iter(m.values()))['cycles']} cancels", "",
                     mem("orcd"), mem("peer"), "", ""))
    head = ("metric: median (p99)", "raw", "orcd", "peer", "orcd/raw", "orcd/peer")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(6)]
    print()
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)))
    print(f"(health peer = {h.get('peer', {}).get('endpoint', 'n/a')}; "
          "cancel 'server free' = extra wait of a 1-token probe sent right after the cancel)")
    if res.foreign_cpu:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in res.foreign_cpu.items())
        print(f"CPU taken by other processes while measuring: {shares}")
    for kind, halves in res.raw_halves.items():
        if len(halves) == 2 and all(halves):
            h1, h2 = (quantile(h, 0.5) for h in halves)
            print(f"raw {kind} tok/s before the servers {h1:.1f}, after {h2:.1f} "
                  f"(machine drift {h2 / h1 - 1:+.1%})")
    if res.server_cancel_ms:
        print("orcd's own cancel latency metric (flag set -> generation stopped), mean ms: "
              + ", ".join(f"{k} {v}" for k, v in res.server_cancel_ms.items()))
        if max(res.foreign_cpu.values()) > 0.10:
            print("WARNING: the machine was not quiet; llama.cpp's threads degrade badly when "
                  "they share cores, so these figures are unreliable")
    # goals
    goals: list[dict[str, Any]] = []
    for kind in ("short", "long"):
        o, r = g.get("orcd", {}).get(kind), g.get("raw", {}).get(kind)
        if o and r:
            x = o["decode_tps"]["median"] / r["decode_tps"]["median"]
            goals.append({"goal": f"orcd throughput >= 0.98x raw ({kind})", "value": round(x, 4),
                          "pass": x >= 0.98})
            d = (o["ttft_s"]["median"] - r["ttft_s"]["median"]) * 1e3
            goals.append({"goal": f"TTFT overhead over raw < 5 ms ({kind})",
                          "value_ms": round(d, 2), "pass": d < 5})
    for phase in ("queued", "prompt", "decode"):
        s = c.get("orcd", {}).get(phase, {})
        for key in ("blackbox_s", "event_s"):
            p99 = s.get(key, {}).get("p99")
            if p99 is not None:
                goals.append({"goal": f"cancel p99 < 10 ms ({phase}, {key[:-2]})",
                              "value_ms": round(p99 * 1e3, 2), "pass": p99 < 0.010})
    print()
    for goal in goals:
        val = goal.get("value", goal.get("value_ms"))
        unit = "x" if "value" in goal else " ms"
        print(f"{'PASS' if goal['pass'] else 'MISS'}  {goal['goal']}: {val}{unit}")
    return goals


def chart(summ: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = ["queued", "prompt", "decode"]
    series = [("orcd (server free)", "orcd", "blackbox_s", "#1f77b4"),
              ("orcd (to CANCELLED event)", "orcd", "event_s", "#7fb2e5"),
              ("llama_cpp.server (server free)", "peer", "blackbox_s", "#d62728")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.26
    floor = 0.1  # ms: a log axis cannot show 0 (or the small negative noise around it)
    for i, (label, name, key, color) in enumerate(series):
        for j, ph in enumerate(phases):
            s = summ["cancel"].get(name, {}).get(ph, {}).get(key, {})
            x = j + (i - 1) * width
            if s.get("median") is None:
                ax.text(x, floor * 1.2, "n/a", ha="center", fontsize=7)
                continue
            med, p99 = s["median"] * 1e3, s["p99"] * 1e3
            ax.bar(x, max(med, floor), width, color=color, label=label if j == 0 else None)
            ax.scatter([x], [max(p99, floor)], marker="_", s=300, color="black", zorder=3)
            ax.text(x, max(med, floor) * 1.15, f"{med:.1f}" if med > floor else "~0",
                    ha="center", fontsize=7)
    ax.axhline(10, color="green", linestyle="--", linewidth=1, label="goal: p99 < 10 ms")
    ax.set_yscale("log")
    ax.set_xticks(range(len(phases)))
    ax.set_xticklabels([f"{p}" for p in ("queued", "mid-prompt", "mid-decode")])
    ax.set_ylabel("cancel latency, ms (bar: median, tick: p99)")
    ax.set_title("Cancel latency per phase: orcd vs llama_cpp.server")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for pkg in ("llama-cpp-python", "orcd", "httpx"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    import llama_cpp

    from orcd.engine.model import cpu_build

    built, unused = cpu_build(llama_cpp)
    return {"nproc": nproc, "cpu_model": cpu, "threads": THREADS,
            "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions, "cpu_features": list(built),
            "cpu_sets_unused": list(unused)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    ap.add_argument("--only", choices=["raw", "orcd", "peer"], action="append",
                    help="measure only these systems (repeatable; default: all three)")
    ap.add_argument("--sections", default=None, metavar="LIST",
                    help="comma-separated: base (the single-stream table above), "
                         "concurrency, cancel-load, turns, sdk, issue7, fleet (default: all; "
                         "--quick: base only; --quick --sections X: X with few repetitions)")
    ap.add_argument("--nice", default="0,19", metavar="LIST",
                    help="--engine-nice values to compare with orcd's default (10) in the "
                         "issue #7 section (default 0,19; --quick: the first)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each system, wait up to S seconds for other processes to "
                         "leave the CPU (default: don't wait, just warn)")
    args = ap.parse_args(argv)
    model = args.model.resolve()
    if not model.is_file():
        print(f"bench: model not found: {model}", file=sys.stderr)
        return 1
    plan = QUICK if args.quick else FULL
    only = set(args.only or ["raw", "orcd", "peer"])
    from sections import ALL, QUICK_SECTIONS

    chosen = (tuple(x.strip() for x in args.sections.split(",") if x.strip())
              if args.sections else ("base", *(QUICK_SECTIONS if args.quick else ALL)))
    unknown = set(chosen) - {"base", *ALL}
    if unknown:
        print(f"bench: unknown sections: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 1
    if "base" not in chosen:
        only = set()
    logdir = Path(tempfile.mkdtemp(prefix="orcd-bench-"))
    log(f"model {model.name}, {THREADS} threads, {'quick' if args.quick else 'full'} mode; "
        f"server logs in {logdir}")
    random.seed(1)
    load_start = os.getloadavg()
    busy: dict[str, float] = {}
    res = Results()
    t_start = now()
    errors: list[str] = []
    if "raw" in only:
        busy["raw"] = wait_quiet(args.wait_quiet, "raw")
        body = bench_raw(model, plan, res, 0)
    from llama_cpp import Llama

    vocab = Llama(str(model), vocab_only=True, verbose=False)

    def tokenize(text: str) -> list[int]:
        return list(vocab.tokenize(text.encode(), add_bos=True, special=True))

    if "raw" not in only:
        body = long_prompt(tokenize)
    for cls in (Orcd, Peer):
        if cls.name not in only:
            continue
        try:
            busy[cls.name] = wait_quiet(args.wait_quiet, cls.name)
            bench_server(cls(model, logdir), plan, body, res)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other system
            msg = f"{cls.name}: {type(exc).__name__}: {exc}"
            errors.append(msg)
            log(f"ERROR {msg} (logs in {logdir})")
    if "raw" in only:
        busy["raw2"] = wait_quiet(args.wait_quiet, "raw")
        bench_raw(model, plan, res, 1)
    summ = build_summary(res)
    goals = report(summ, res) if only else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pngs = [args.out.parent / "cancel_latency.png"] if only else []
    try:
        for png in pngs:
            chart(summ, png)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"chart: {exc}")
    from sections import charts, run_sections

    nices = tuple(int(x) for x in args.nice.split(",") if x.strip())
    extra, tables = run_sections(model, logdir, ROOT, tuple(c for c in chosen if c != "base"),
                                 args.quick, tokenize, body, nices)
    errors += extra.pop("errors")
    try:
        pngs += charts(extra, args.out.parent)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"charts: {exc}")
    for t in tables:
        print("\n" + t)
    doc = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full", "plan": asdict(plan),
        "machine": machine(),
        "model": {"path": str(model), "size_bytes": model.stat().st_size},
        "settings": {"n_ctx": N_CTX, "threads": THREADS, "temperature": 0.0,
                     "flash_attn": FLASH_ATTN, "peer_interrupt_requests": False,
                     "long_prompt_target_tokens": LONG_TOKENS, "short_prompt": SHORT_PROMPT},
        "duration_s": round(now() - t_start, 1), "errors": errors, "log_dir": str(logdir),
        # other processes on the machine skew every figure; the load shows how much
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "busy_before": busy, "foreign_cpu": res.foreign_cpu,
        "summary": summ, "goals": goals, "samples": asdict(res),
        "sections": list(chosen), "tables_markdown": tables, **extra,
    }
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"\nresults: {args.out}\ncharts:  {', '.join(map(str, pngs))}\n"
          f"took {doc['duration_s']} s")
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
