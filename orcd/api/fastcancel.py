"""``POST /cancel`` answered in front of Quart, on its common path.

A cancel is the request whose latency orcd promises. Through Quart it pays for a request
object, the routing, two before-request hooks, a response object and its conversion back to
ASGI: 0.6-0.8 ms of Python on a loop whose cores llama.cpp keeps busy (lean client, cancel
one of 4 under load, alternating with a worker without it: CANCELLED p50 3.53 -> 2.93 ms
over 50 samples each; a first prototype, without authentication, 3.51 -> 2.72 over 60).
:class:`FastCancel` answers the well-formed cancel itself and passes everything else to the
app, so every error still comes from one place, in its envelope.

It answers when all of these hold, and otherwise hands the request to the app untouched:

- ``POST /cancel``, no query string, ``Content-Length`` of at most :data:`MAX_BODY` bytes
  (within ``--max-body-bytes``), no ``Transfer-Encoding``, ``Content-Type`` absent or
  ``application/json``; none of the headers it reads given twice;
- the caller authenticates (or the worker has no auth file), before any of the body is read;
- the body arrives whole within :data:`BODY_WAIT_S`, and is ``{"job_id": ...}`` with a valid
  id and nothing else (an admin's ``"principal"`` goes to the app), matching ``X-Job-Id`` if
  that is given.

A request it read and then declined goes to the app with its body replayed, message for
message, so the app sees exactly what the client sent. A body slower than
:data:`BODY_WAIT_S` goes the same way, and the app's own body timeout then applies.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from .. import logs
from ..auth import ANONYMOUS, Principal
from ..errors import InvalidRequest, OrcdError
from .schema import (
    CancelRequest,
    cancel_accepted,
    correlation_id_for,
    is_json_media_type,
    parse_json_object,
)

if TYPE_CHECKING:
    from ..server import Worker

MAX_BODY = 4096  # a cancel body is under 200 bytes; anything longer is left to the app
BODY_WAIT_S = 1.0  # a cancel body comes with its headers; a slower one is left to the app
_READS = (b"content-type", b"content-length", b"transfer-encoding", b"authorization",
          b"x-correlation-id", b"x-job-id")

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class FastCancel:
    """ASGI middleware: answers the well-formed ``POST /cancel`` without the app."""

    def __init__(self, app: Any, worker: Worker) -> None:
        self._app = app
        self._worker = worker
        self._max_body = min(MAX_BODY, worker.config.max_body_bytes)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        headers = self._headers(scope)
        principal = None if headers is None else self._principal(headers)
        if headers is None or principal is None:
            await self._app(scope, receive, send)
            return
        read: list[Message] = []
        body = await self._read_body(receive, int(headers[b"content-length"]), read)
        job_id = None if body is None else self._job_id(body, headers)
        if job_id is None:
            await self._app(scope, _replay(read, receive), send)
            return
        await self._answer(send, headers, principal, job_id)

    def _headers(self, scope: dict[str, Any]) -> dict[bytes, bytes] | None:
        """The headers this path reads, if the request may be answered here at all."""
        if (scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/cancel"
                or scope.get("query_string") or scope.get("root_path")):
            return None
        found: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in _READS:
                if name in found:
                    return None
                found[name] = value
        length = found.get(b"content-length", b"")
        if (b"transfer-encoding" in found or not length.isdigit()
                or not 0 < int(length) <= self._max_body):
            return None
        ctype = found.get(b"content-type")
        if ctype is not None and not is_json_media_type(ctype.decode("latin-1")):
            return None
        return found

    @staticmethod
    async def _read_body(receive: Receive, length: int, read: list[Message]) -> bytes | None:
        """The whole body, or None; every message taken is kept in ``read``."""
        size = 0
        with trio.move_on_after(BODY_WAIT_S):
            while True:
                message = await receive()
                read.append(message)
                if message["type"] != "http.request":
                    return None
                size += len(message.get("body", b""))
                if size > length:
                    return None
                if not message.get("more_body", False):
                    return b"".join(m.get("body", b"") for m in read) if size == length else None
        return None

    def _principal(self, headers: dict[bytes, bytes]) -> Principal | None:
        """Who the request acts for, as the app's authentication decides (None: let the app
        refuse it, in its envelope, with its log line)."""
        principals = self._worker.principals
        if principals is None:
            return ANONYMOUS
        header = headers.get(b"authorization")
        return principals.authenticate(None if header is None else header.decode("latin-1"))

    @staticmethod
    def _job_id(body: bytes, headers: dict[bytes, bytes]) -> str | None:
        try:
            job_id = CancelRequest.from_json(parse_json_object(body)).job_id
        except InvalidRequest:
            return None
        named = headers.get(b"x-job-id")
        if named is not None and named.decode("latin-1") != job_id:
            return None
        return job_id

    async def _answer(self, send: Send, headers: dict[bytes, bytes], principal: Principal,
                      job_id: str) -> None:
        cid = correlation_id_for(headers.get(b"x-correlation-id", b"").decode("latin-1"))
        try:
            state = await self._worker.registry.cancel_or_recall(
                job_id, cid, principal, principal.name)
        except Exception as exc:  # noqa: BLE001 - the app's catch-all, in the same envelope
            logs.log("error", f"Unhandled error in POST /cancel: {exc!r}", level=logging.ERROR,
                     correlation_id=cid)
            err = OrcdError("internal error; see the worker's log")
            self._worker.metrics.rejected.labels(code=err.code).inc()
            status, body = err.http_status, err.envelope(cid)
        else:
            status, body = 202, cancel_accepted(job_id, state)
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            (b"x-correlation-id", cid.encode()),
        ]})
        await send({"type": "http.response.body", "body": data})


def _replay(read: list[Message], receive: Receive) -> Receive:
    """``receive``, with the messages already taken from it given back first."""
    pending = list(read)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
