"""Server-Sent Events: frames, keep-alives, and the stream that drains one job.

The stream only drains the job's channel; it never yields inside a cancel scope. If it is
closed before the job's terminal event went out (the client disconnected: Quart cancels
the response and closes its body), it cancels the job with reason ``client_disconnect``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import trio

from .jobs import Job, StreamEvent

KEEPALIVE = b": keep-alive\n\n"


def frame(name: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {name}\ndata: {payload}\n\n".encode()


class JobStream:
    """The async iterator Quart sends as the body of a ``POST /execute`` response."""

    def __init__(self, job: Job, keepalive_s: float, on_abandon: Callable[[Job], None]) -> None:
        self._job = job
        self._keepalive_s = keepalive_s
        self._on_abandon = on_abandon
        self._done = False

    @property
    def done(self) -> bool:
        """True once the terminal event went out or the stream was closed."""
        return self._done

    def __aiter__(self) -> JobStream:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        event: StreamEvent | None = None
        try:
            with trio.move_on_after(self._keepalive_s):
                event = await self._job.events.receive()
        except trio.EndOfChannel:
            self._done = True
            raise StopAsyncIteration from None
        except BaseException:
            self.aclose_now()
            raise
        if event is None:
            return KEEPALIVE
        if event.terminal:
            self._done = True
        return frame(event.name, event.data)

    def aclose_now(self) -> None:
        if not self._done:
            self._done = True
            self._on_abandon(self._job)
        self._job.events.close()

    async def aclose(self) -> None:
        self.aclose_now()
