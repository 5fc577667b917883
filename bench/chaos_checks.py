"""The chaos run's vocabulary: limits, the report, and the checks of one SSE stream.

A :class:`Stream` is what one client saw on one ``/execute`` stream, checked event by event
against CONTRACT.md §3; :class:`Report` collects every figure and every violation.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

# The server's context and --max-tokens-out: room for the long generations that a reader
# with a full socket needs to be caught stalling. The planned jobs stay within PLAN_CTX.
N_CTX = 2048
MAX_TOKENS_OUT = 2048
PLAN_CTX = 1024
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
    "progress", "stop_reason", "error", "principal", "cancelled_by",
}
FINAL_STATES = {"completed", "cancelled", "failed"}
STREAM_CODES = {"CANCELLED", "INFERENCE_TIMEOUT", "VRAM_OOM", "INTERNAL"}
CANCEL_REASONS = {"client_request", "client_disconnect", "client_stalled", "shutdown",
                  "cancelled_before_start"}
FRAGMENTS = [
    "hello", "world", "The quick brown fox jumps over the lazy dog.", "héllo", "naïve café",
    "Grüße aus Köln", "日本語のテキスト", "中文字符", "한국어", "emoji 🙂🚀", "👩‍💻 at work",
    "e\u0301 combining", "Ελληνικά", "русский текст", "עברית", "العربية", "∑∫√∞≠",
    "\t", "\n", "<s>", "</s>", '{"json": true}', "1234567890", "a", "  spaces  ", "ǅ",
]
STOP_POOL = ["a", "e", " ", "\n", "é", "🙂", "the", "xyz", "!", "0", "Q", "END"]


@dataclass
class JobSpec:
    job_id: str
    action: str
    body: dict[str, Any]
    trigger: int = 0  # tokens to see before a mid-stream cancel/disconnect (-1: at once)
    repeats: int = 1  # how many cancels to send


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
    hostile: Counter[str] = field(default_factory=Counter)  # hostile client -> job outcome
    figures: dict[str, Any] = field(default_factory=dict)  # measured by the extra phases

    def bad(self, where: str, msg: str) -> None:
        self.violations.append(f"[{where}] {msg}")


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

