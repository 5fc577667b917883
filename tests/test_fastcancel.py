"""``POST /cancel`` answered in front of Quart (orcd/api/fastcancel.py).

The fast path must answer exactly as the app would, act only for the caller it
authenticates, and hand every request it does not answer to the app as the client sent it.
The rest of the suite's cancels (httpx, JSON bodies) take the fast path too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from quart import request, request_started

from orcd.api import fastcancel
from orcd.api.fastcancel import FastCancel
from orcd.api.schema import is_json_media_type

from .harness import Gate, Harness, bearer, make_auth_file, running_worker
from .test_http import assert_envelope

Message = dict[str, Any]


class App:
    """The app behind the fast path: records what reached it, answers 299."""

    def __init__(self) -> None:
        self.got: list[tuple[str, list[Message]]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        messages = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        self.got.append((scope["path"], messages))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})


def scope(headers: dict[str, str], *, path: str = "/cancel", method: str = "POST",
          query: bytes = b"") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "query_string": query,
            "root_path": "", "http_version": "1.1", "scheme": "http",
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080),
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}


def chunks(*parts: bytes) -> list[Message]:
    """The body as hypercorn delivers it: a message per chunk, then an empty last one."""
    return ([{"type": "http.request", "body": p, "more_body": True} for p in parts]
            + [{"type": "http.request", "body": b"", "more_body": False}])


async def drive(fast: FastCancel, sc: dict[str, Any], messages: list[Message],
                pause_before: int | None = None, pause_s: float = 0.0) -> list[Message]:
    """Run one request through ``fast``; returns what it sent. The client pauses
    ``pause_s`` before message ``pause_before``."""
    sent: list[Message] = []
    tx, rx = trio.open_memory_channel[Message](len(messages))

    async def client() -> None:
        for i, message in enumerate(messages):
            if i == pause_before:
                await trio.sleep(pause_s)
            await tx.send(message)

    async def send(message: Message) -> None:
        sent.append(message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        with trio.fail_after(10):
            await fast(sc, rx.receive, send)
    return sent


async def remembered_cancel(h: Harness, job_id: str) -> bool:
    """Whether a cancel of ``job_id`` was taken: a late ``/execute`` of it is cancelled."""
    events = await h.execute(job_id=job_id, prompt="hi", max_tokens=2)
    return events[-1].name == "error" and events[-1].data["code"] == "CANCELLED"


def body_of(job_id: str, **more: Any) -> bytes:
    return json.dumps({"job_id": job_id, **more}).encode()


def json_headers(body: bytes, **more: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Content-Length": str(len(body)), **more}


async def test_a_well_formed_cancel_is_answered_without_the_app(tiny_model: Path) -> None:
    async with running_worker(tiny_model) as h:
        app = App()
        fast = FastCancel(app, h.worker)
        body = body_of("f-1")
        sent = await drive(fast, scope(json_headers(body, **{"X-Correlation-Id": "trace-7",
                                                               "X-Job-Id": "f-1"})),
                           chunks(body[:5], body[5:]))
        assert app.got == []
        start, out = sent
        assert start["status"] == 202
        assert dict(start["headers"]) == {b"content-type": b"application/json",
                                          b"content-length": str(len(out["body"])).encode(),
                                          b"x-correlation-id": b"trace-7"}
        assert json.loads(out["body"]) == {"status": "cancelling", "job_id": "f-1",
                                           "state": "unknown"}
        assert await remembered_cancel(h, "f-1")


JSON = {"Content-Type": "application/json"}
DECLINED = [  # (case, headers, body, whether to add Content-Length)
    ("chunked", {**JSON, "Transfer-Encoding": "chunked"}, body_of("d-1"), False),
    ("no length", JSON, body_of("d-1"), False),
    ("text/plain", {"Content-Type": "text/plain"}, body_of("d-1"), True),
    ("typed twice", {**JSON, "content-type": "text/plain"}, body_of("d-1"), True),
    ("an admin's principal", JSON, body_of("d-1", principal="anonymous"), True),
    ("unknown field", JSON, body_of("d-1", extra=1), True),
    ("bad job id", JSON, body_of("d 1"), True),
    ("not json", JSON, b"{job_id: d-1}", True),
    ("not an object", JSON, b'["d-1"]', True),
    ("X-Job-Id differs", {**JSON, "X-Job-Id": "other"}, body_of("d-1"), True),
    ("too long", JSON, body_of("d-1") + b" " * fastcancel.MAX_BODY, True),
]


@pytest.mark.parametrize(("case", "headers", "body", "length"), DECLINED,
                         ids=[c[0] for c in DECLINED])
async def test_anything_else_reaches_the_app_as_sent(tiny_model: Path, case: str,
                                                     headers: dict[str, str], body: bytes,
                                                     length: bool) -> None:
    async with running_worker(tiny_model) as h:
        app = App()
        if length:
            headers = {**headers, "Content-Length": str(len(body))}
        messages = chunks(body[:3], body[3:])
        sent = await drive(FastCancel(app, h.worker), scope(headers), messages)
        assert [m.get("status") for m in sent] == [299, None]
        assert app.got == [("/cancel", messages)], case
        assert not await remembered_cancel(h, "d-1"), "the fast path must not have cancelled"


@pytest.mark.parametrize("other", [
    {"path": "/cancel", "method": "GET"}, {"path": "/cancel/", "method": "POST"},
    {"path": "/cancel", "method": "POST", "query": b"principal=x"},
    {"path": "/execute", "method": "POST"},
])
async def test_other_routes_pass_through_unread(tiny_model: Path, other: dict[str, Any]
                                                ) -> None:
    async with running_worker(tiny_model) as h:
        app = App()
        body = body_of("d-1")
        messages = chunks(body)
        sent = await drive(FastCancel(app, h.worker), scope(json_headers(body), **other),
                           messages)
        assert sent[0]["status"] == 299 and app.got == [(other["path"], messages)]


async def test_a_slow_body_goes_to_the_app_with_what_was_read(tiny_model: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.setattr(fastcancel, "BODY_WAIT_S", 0.05)
    async with running_worker(tiny_model) as h:
        app = App()
        body = body_of("d-1")
        messages = chunks(body[:4], body[4:])
        sent = await drive(FastCancel(app, h.worker), scope(json_headers(body)), messages,
                           pause_before=1, pause_s=0.2)
        assert sent[0]["status"] == 299
        assert app.got == [("/cancel", messages)], "a message was lost or reordered"
        assert not await remembered_cancel(h, "d-1")


async def test_a_client_gone_mid_body_reaches_the_app(tiny_model: Path) -> None:
    async with running_worker(tiny_model) as h:
        app = App()
        body = body_of("d-1")
        messages = [{"type": "http.request", "body": body[:4], "more_body": True},
                    {"type": "http.disconnect"}]
        await drive(FastCancel(app, h.worker), scope(json_headers(body)), messages)
        assert app.got == [("/cancel", messages)]
        assert not await remembered_cancel(h, "d-1")


async def test_the_worker_answers_cancels_in_front_of_quart(tiny_model: Path) -> None:
    seen: list[str] = []

    async def started(_app: Any, **_extra: Any) -> None:
        seen.append(request.path)

    request_started.connect(started)
    try:
        async with running_worker(tiny_model) as h:
            assert (await h.cancel("q-1")).status_code == 202
            assert (await h.client.post("/cancel", json={"job_id": ""})).status_code == 400
            assert (await h.client.get("/health")).status_code == 200
    finally:
        request_started.disconnect(started)
    assert seen == ["/cancel", "/health"], "the well-formed cancel reached Quart"


async def test_the_fast_answer_equals_the_apps(tiny_model: Path) -> None:
    """The same cancel, once answered in front of Quart and once (a query string makes the
    fast path decline it) by Quart: the same status, headers and body."""
    async with running_worker(tiny_model) as h:
        answers = []
        for path in ("/cancel", "/cancel?via=app"):
            resp = await h.client.post(path, json={"job_id": "same"},
                                       headers={"X-Correlation-Id": "trace-9"})
            answers.append((resp.status_code, resp.json(),
                            {k: v for k, v in resp.headers.items() if k != "date"}))
        assert answers[0] == answers[1]
        assert answers[0][0] == 202 and answers[0][1]["state"] == "unknown"
        assert answers[0][2]["x-correlation-id"] == "trace-9"
        resp = await h.client.post("/cancel", json={"job_id": "same"},
                                   headers={"X-Correlation-Id": "not valid!"})
        assert resp.headers["x-correlation-id"] != "not valid!"


async def test_the_fast_path_and_the_app_agree_on_every_content_type(tiny_model: Path
                                                                      ) -> None:
    """One media-type rule (``schema.is_json_media_type``) for both: each Content-Type gets
    the same status in front of Quart as through it."""
    types = ["application/json", "Application/JSON; charset=utf-8", "application/json ;x=1",
             "", "text/plain", "application/jsonx", "application/json-patch+json"]
    async with running_worker(tiny_model) as h:
        for ctype in types:
            statuses = []
            for path in ("/cancel", "/cancel?via=app"):
                resp = await h.client.post(path, content=b'{"job_id": "ct"}',
                                           headers={"Content-Type": ctype})
                statuses.append(resp.status_code)
            assert statuses[0] == statuses[1], (ctype, statuses)
            assert statuses[0] == (202 if is_json_media_type(ctype) else 415), ctype


async def test_the_fast_path_acts_only_for_the_caller_it_authenticates(tiny_model: Path,
                                                                       tmp_path: Path
                                                                       ) -> None:
    tokens = make_auth_file(tmp_path / "auth", alice="user", bob="user")
    async with running_worker(tiny_model, auth_file=tmp_path / "auth") as h:
        h.engine.at_token[2] = gate = Gate()
        body = {"job_id": "a-1", "prompt": "story", "max_tokens": 50}
        async with h.client.stream("POST", "/execute", json=body,
                                   headers=bearer(tokens["alice"])) as stream:
            assert stream.status_code == 200
            await gate.wait_reached()
            for headers in ({}, bearer("wrong")):  # refused by the app, in its envelope
                resp = await h.client.post("/cancel", json={"job_id": "a-1"}, headers=headers)
                err = assert_envelope(resp, 401, "UNAUTHENTICATED")
                assert resp.headers["www-authenticate"] == 'Bearer realm="orcd"', err
            resp = await h.client.post("/cancel", json={"job_id": "a-1"},
                                       headers=bearer(tokens["bob"]))
            assert resp.status_code == 202 and resp.json()["state"] == "unknown"
            assert h.worker.registry.get("a-1", "alice").state == "running"  # type: ignore
            resp = await h.client.post("/cancel", json={"job_id": "a-1"},
                                       headers=bearer(tokens["alice"]))
            assert resp.status_code == 202 and resp.json()["state"] == "running"
            gate.open()
            text = (await stream.aread()).decode()
        event, data = text.rstrip().split("\n\n")[-1].split("\n")
        assert event == "event: error"
        assert json.loads(data.removeprefix("data: "))["code"] == "CANCELLED"


async def test_a_failing_registry_is_answered_in_the_envelope(tiny_model: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    async with running_worker(tiny_model) as h:
        async def broken(*_args: Any) -> str:
            raise RuntimeError("registry broke")

        monkeypatch.setattr(type(h.worker.registry), "cancel_or_recall", broken)
        resp = await h.client.post("/cancel", json={"job_id": "x-1"})
        err = assert_envelope(resp, 500, "INTERNAL")
        assert "registry broke" not in err["message"]
        assert h.worker.metrics.rejected.labels(code="INTERNAL")._value.get() == 1


async def test_a_raw_socket_cancel_gets_one_complete_answer(tiny_model: Path) -> None:
    """A client that writes the request in two pieces, far apart, on a kept-alive
    connection: one answer per request, and the connection stays usable."""
    async with running_worker(tiny_model) as h:
        body = body_of("r-1")
        head = (f"POST /cancel HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        assert h.worker.uri is not None
        host, port = h.worker.uri.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            for piece in (head + body[:6], body[6:], head + body):
                await stream.send_all(piece)
                await trio.sleep(0.05)
            got = b""
            with trio.fail_after(5):
                while got.count(b"HTTP/1.1 202") < 2 or not got.endswith(b"}"):
                    got += await stream.receive_some()
        assert got.count(b'"state": "unknown"') + got.count(b'"state": "cancelled"') == 2
