"""HTTP rules of CONTRACT §2–§5: validation, the error envelope, readiness, /jobs."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from .harness import running_worker

GOOD = {"job_id": "v-1", "prompt": "hello"}


def assert_envelope(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"code", "message", "retriable", "details", "correlation_id"}
    assert err["code"] == code and err["message"]
    assert err["correlation_id"] == resp.headers["X-Correlation-Id"]
    return err


BAD_EXECUTE = [
    ({"prompt": "x"}, "job_id", "required"),
    ({"job_id": "", "prompt": "x"}, "job_id", "pattern"),
    ({"job_id": 7, "prompt": "x"}, "job_id", "type"),
    ({"job_id": "bad id!", "prompt": "x"}, "job_id", "pattern"),
    ({"job_id": "a" * 129, "prompt": "x"}, "job_id", "pattern"),
    ({"job_id": "j"}, "prompt", "required"),
    ({"job_id": "j", "prompt": ""}, "prompt", "length"),
    ({"job_id": "j", "prompt": ["x"]}, "prompt", "type"),
    ({"job_id": "j", "prompt": "x" * 32769}, "prompt", "length"),
    ({**GOOD, "max_tokens": 0}, "max_tokens", "range"),
    ({**GOOD, "max_tokens": 2049}, "max_tokens", "range"),
    ({**GOOD, "max_tokens": "5"}, "max_tokens", "type"),
    ({**GOOD, "max_tokens": 1.5}, "max_tokens", "type"),
    ({**GOOD, "max_tokens": True}, "max_tokens", "type"),
    ({**GOOD, "temperature": 2.5}, "temperature", "range"),
    ({**GOOD, "temperature": -0.1}, "temperature", "range"),
    ({**GOOD, "top_p": 1.5}, "top_p", "range"),
    ({**GOOD, "top_k": -1}, "top_k", "range"),
    ({**GOOD, "top_k": 100000}, "top_k", "range"),
    ({**GOOD, "min_p": 2}, "min_p", "range"),
    ({**GOOD, "repetition_penalty": 0}, "repetition_penalty", "range"),
    ({**GOOD, "repetition_penalty": 2.1}, "repetition_penalty", "range"),
    ({**GOOD, "stop": "x"}, "stop", "type"),
    ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, "stop", "length"),
    ({**GOOD, "stop": [""]}, "stop[0]", "length"),
    ({**GOOD, "stop": [1]}, "stop[0]", "type"),
    ({**GOOD, "stop": ["x" * 101]}, "stop[0]", "length"),
    ({**GOOD, "seed": -1}, "seed", "range"),
    ({**GOOD, "seed": 2**64}, "seed", "range"),
    ({**GOOD, "timeout_ms": 0}, "timeout_ms", "range"),
    ({**GOOD, "timeout_ms": 300_001}, "timeout_ms", "range"),
    ({**GOOD, "bogus": 1}, "bogus", "unknown"),
    ({**GOOD, "max_tokens": 1000, "prompt": "x" * 500}, "max_tokens", "context"),
    ({**GOOD, "prompt": "x" * 1100}, "prompt", "context"),
]


async def test_every_bad_execute_body_is_400_with_its_field(tiny_model: Path) -> None:
    async with running_worker(tiny_model) as h:
        for body, field, constraint in BAD_EXECUTE:
            resp = await h.client.post("/execute", json=body)
            err = assert_envelope(resp, 400, "INVALID_REQUEST")
            problems = {(e["field"], e["constraint"]) for e in err["details"]["errors"]}
            assert (field, constraint) in problems, (body, problems)
            for e in err["details"]["errors"]:
                assert set(e) == {"field", "constraint", "message"}
        # every problem of one body is listed, not just the first
        resp = await h.client.post("/execute", json={"job_id": "", "prompt": 3, "top_p": 9})
        fields = {e["field"] for e in assert_envelope(resp, 400, "INVALID_REQUEST")
                  ["details"]["errors"]}
        assert fields == {"job_id", "prompt", "top_p"}
        assert h.engine.generations == 0


@pytest.mark.parametrize("raw, ctype", [
    (b"{not json", "application/json"),
    (b"[1, 2]", "application/json"),
    (b'"text"', "application/json"),
    (b"\xff\xfe", "application/json"),
    (b"", "application/json"),
])
async def test_malformed_bodies_are_400(tiny_model: Path, raw: bytes, ctype: str) -> None:
    async with running_worker(tiny_model) as h:
        for path in ("/execute", "/cancel"):
            resp = await h.client.post(path, content=raw, headers={"Content-Type": ctype})
            assert_envelope(resp, 400, "INVALID_REQUEST")


async def test_content_type_size_and_unknown_routes(tiny_model: Path) -> None:
    async with running_worker(tiny_model, max_body_bytes=4096) as h:
        resp = await h.client.post("/execute", content=json.dumps(GOOD),
                                   headers={"Content-Type": "text/plain"})
        assert_envelope(resp, 415, "UNSUPPORTED_MEDIA_TYPE")
        big = json.dumps({"job_id": "big", "prompt": "x" * 5000})
        resp = await h.client.post("/execute", content=big,
                                   headers={"Content-Type": "application/json"})
        assert_envelope(resp, 413, "PAYLOAD_TOO_LARGE")
        assert_envelope(await h.client.get("/nope"), 404, "NOT_FOUND")
        assert_envelope(await h.client.get("/execute"), 405, "METHOD_NOT_ALLOWED")
        assert h.worker.metrics.rejected.labels(code="PAYLOAD_TOO_LARGE")._value.get() == 1


async def test_cancel_rejects_bad_job_ids(tiny_model: Path) -> None:
    async with running_worker(tiny_model) as h:
        for body in ({"job_id": ""}, {}, {"job_id": None}, {"job_id": 5},
                     {"job_id": "white space"}, {"job_id": "x" * 129},
                     {"job_id": "ok", "extra": 1}):
            err = assert_envelope(await h.client.post("/cancel", json=body), 400,
                                  "INVALID_REQUEST")
            assert err["details"]["errors"]
        assert_envelope(await h.client.get("/jobs/bad%20id"), 400, "INVALID_REQUEST")
        assert_envelope(await h.client.get("/jobs/unknown-1"), 404, "JOB_NOT_FOUND")


async def test_correlation_id_is_kept_or_replaced(tiny_model: Path) -> None:
    async with running_worker(tiny_model) as h:
        async with h.stream(headers={"X-Correlation-Id": "trace-42"}, job_id="cid-1",
                            prompt="hi", max_tokens=3) as events:
            first = [e async for e in events][0]
        assert first.data["correlation_id"] == "trace-42"
        assert (await h.job("cid-1"))["correlation_id"] == "trace-42"
        resp = await h.client.get("/health", headers={"X-Correlation-Id": "bad id with spaces"})
        assert resp.headers["X-Correlation-Id"] != "bad id with spaces"
        assert len(resp.headers["X-Correlation-Id"]) > 0


async def test_not_ready_until_the_model_is_loaded(tiny_model: Path) -> None:
    release = threading.Event()
    async with running_worker(tiny_model, wait_ready=False,
                              before_load=lambda: release.wait(20)) as h:
        resp = await h.client.get("/health")
        assert resp.status_code == 503
        assert resp.json()["state"] == "starting" and resp.json()["load_progress"] == 0.0
        err = assert_envelope(await h.client.post("/execute", json=GOOD), 503, "NOT_READY")
        assert err["retriable"] is True
        assert (await h.client.post("/execute", json=GOOD)).headers["Retry-After"]
        cancel = await h.cancel("early")  # /cancel and /jobs work from the start
        assert cancel.status_code == 202 and cancel.json()["state"] == "unknown"
        assert (await h.client.get("/jobs")).json() == {"jobs": []}
        release.set()
        with trio.fail_after(20):
            while h.worker.engine is None:
                await trio.sleep(0.01)
        assert (await h.client.get("/health")).status_code == 200
        events = await h.execute(job_id="after-load", prompt="hi", max_tokens=3)
        assert events[-1].name == "end"


async def test_jobs_listing_filters_and_orders(tiny_model: Path) -> None:
    async with running_worker(tiny_model) as h:
        await h.execute(job_id="list-1", prompt="a", max_tokens=3)
        await h.cancel("list-2")
        await h.execute(job_id="list-2", prompt="b", max_tokens=3)
        everything = (await h.client.get("/jobs")).json()["jobs"]
        assert {j["job_id"] for j in everything} == {"list-1", "list-2"}
        done = (await h.client.get("/jobs", params={"state": "completed"})).json()["jobs"]
        assert [j["job_id"] for j in done] == ["list-1"]
        snapshot = done[0]
        assert set(snapshot) == {
            "job_id", "state", "correlation_id", "created_at", "started_at", "finished_at",
            "cancel_requested_at", "cancelled_at", "cancel_reason", "tokens_out", "max_tokens",
            "progress", "stop_reason", "error", "principal", "cancelled_by"}
        bad = await h.client.get("/jobs", params={"state": "bogus"})
        assert_envelope(bad, 400, "INVALID_REQUEST")


async def test_finished_jobs_are_forgotten_beyond_the_history_limit(tiny_model: Path) -> None:
    async with running_worker(tiny_model, job_history=2) as h:
        for i in range(4):
            await h.execute(job_id=f"hist-{i}", prompt="a", max_tokens=2)
        ids = [j["job_id"] for j in (await h.client.get("/jobs")).json()["jobs"]]
        assert sorted(ids) == ["hist-2", "hist-3"]
        assert (await h.client.get("/jobs/hist-0")).status_code == 404


async def test_hostile_json_is_400_never_500(tiny_model: Path) -> None:
    """Bodies the chaos suite found: huge integers, deep nesting, lone surrogates."""
    hostile = [
        b'{"job_id": "h", "prompt": "hi", "seed": 1' + b"0" * 5000 + b"}",
        b"[" * 100_000,
        b'{"job_id": "h", "prompt": "hi", "stop": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"job_id": "h", "prompt": "a\\ud800b"}',
        b'{"job_id": "h", "prompt": "hi", "stop": ["\\udfff"]}',
        b'{"job_id": "h", "prompt": "hi", "\\udc80": 1}',
    ]
    async with running_worker(tiny_model) as h:
        for raw in hostile:
            for path in ("/execute", "/cancel"):
                resp = await h.client.post(path, content=raw,
                                           headers={"Content-Type": "application/json"})
                assert_envelope(resp, 400, "INVALID_REQUEST")
        assert (await h.client.get("/health")).status_code == 200


async def test_refused_bodies_close_the_connection(tiny_model: Path) -> None:
    """A 413 or 415 leaves the body unread, so the connection must not be reused."""
    async with running_worker(tiny_model, max_body_bytes=4096) as h:
        big = await h.client.post("/execute", content=b"x" * 200_000,
                                  headers={"Content-Type": "application/json"})
        assert big.status_code == 413 and big.headers["Connection"] == "close"
        form = await h.client.post("/execute", content=b"a=1",
                                   headers={"Content-Type": "multipart/form-data"})
        assert form.status_code == 415 and form.headers["Connection"] == "close"
        with trio.fail_after(5):  # the next request on the same client gets an answer
            assert (await h.client.get("/health")).status_code == 200
