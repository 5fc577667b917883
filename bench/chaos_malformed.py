"""Malformed requests for the chaos run: hypothesis-drawn bodies, headers and methods that
orcd must refuse with a 4xx envelope, and broken HTTP spoken on raw sockets."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from chaos_checks import JOB_ID_RE, MAX_TOKENS_OUT, N_CTX

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
                            st.just("x y " * (N_CTX + 100))),  # too long / longer than the context
        # max_tokens = n_ctx: within --max-tokens-out, but the prompt leaves less room
        "max_tokens": st.one_of(ints_out(1, MAX_TOKENS_OUT), st.just(N_CTX)),
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

