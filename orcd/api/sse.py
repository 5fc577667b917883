"""Server-Sent Events: frames, keep-alives, and the stream that drains one job.

A :class:`JobStream` is the body Quart sends for a streaming response. It only drains the
job's outbox and never yields inside a cancel scope; each protocol passes its own
``render`` (the native one is :func:`native_frame`). What happens when the client goes
away is not its business: :mod:`orcd.api.lifetime` ties the job to the whole request.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import trio

from ..jobs import Job
from ..outbox import StreamEvent

KEEPALIVE = b": keep-alive\n\n"
Render = Callable[[StreamEvent], bytes]


# Characters that SSE does not treat as line ends but many clients' line splitters do
# (httpx's aiter_lines, Python's str.splitlines): sent as JSON escapes, the same string.
_LINE_BREAKERS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028",
                                "\u2029": "\\u2029"})


def data_json(data: dict[str, Any]) -> str:
    """``data`` as the JSON of one ``data:`` line: compact, UTF-8 text kept as it is except
    the characters some clients split lines at."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKERS)


def frame(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {data_json(data)}\n\n".encode()


def native_frame(event: StreamEvent) -> bytes:
    """``event: NAME`` + ``data: JSON``: the native protocol of ``POST /execute``."""
    return frame(event.name, event.data)


class JobStream:
    """The async iterator Quart sends as the body of a streaming response; it ends after
    the terminal frame."""

    def __init__(self, job: Job, keepalive_s: float, render: Render = native_frame) -> None:
        self._job = job
        self._keepalive_s = keepalive_s
        self._render = render
        self._terminal_sent = False

    def __aiter__(self) -> JobStream:
        return self

    async def __anext__(self) -> bytes:
        if self._terminal_sent:
            raise StopAsyncIteration
        while True:
            event: StreamEvent | None = None
            with trio.move_on_after(self._keepalive_s) as idle:
                event = await self._job.outbox.get()
            if idle.cancelled_caught:
                return KEEPALIVE
            if event is None:  # abandoned: nothing more will come
                self._terminal_sent = True
                raise StopAsyncIteration
            chunk = self._render(event)
            if event.terminal:
                self._terminal_sent = True
            if chunk:
                return chunk
            if self._terminal_sent:
                raise StopAsyncIteration
