"""A job's cancel-on-disconnect is tied to the life of its HTTP request.

Quart cancels a handler when its client disconnects, but a cancellation can land at many
places: inside admission (a thread that tokenizes the prompt finishes anyway, and the
``Cancelled`` arrives at the next checkpoint), before the response starts, or while the
body streams. Rather than guard each place, every job a request creates is bound to the
request (:func:`bind`), and :class:`RequestLifetime` - ASGI middleware around the whole
app - cancels each bound job that is still active when the request ends, for whatever
reason it ended. A job that already finished is not touched (its cancel is a no-op).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quart import request

from ..jobs import Job

_JOBS = "orcd.jobs"  # ASGI scope key: the jobs bound to this request

OnRequestEnd = Callable[[Job, "tuple[str, int] | None"], None]


def bind(job: Job) -> None:
    """Tie ``job`` to the current request: when the request ends before the job has, the
    job is cancelled (``client_disconnect``, or ``client_stalled`` if the client's socket
    stopped taking bytes). Call it right after ``JobRegistry.submit``, with no checkpoint
    in between."""
    scope: dict[str, Any] = request.scope  # type: ignore[assignment]
    scope.setdefault(_JOBS, []).append(job)


class RequestLifetime:
    """ASGI middleware that ends every job its request bound, when the request ends."""

    def __init__(self, app: Any, on_end: OnRequestEnd) -> None:
        self._app = app
        self._on_end = on_end
        self._in_flight: dict[int, list[Job]] = {}  # id(scope) -> the jobs it bound
        self._busy: dict[tuple[str, int] | None, int] = {}  # peer -> requests in flight

    @property
    def holding(self) -> int:
        """Requests in flight that hold a job: streams not yet written to the end."""
        return sum(1 for jobs in self._in_flight.values() if jobs)

    def busy(self, peer: tuple[str, int] | None) -> bool:
        """Whether a request from ``peer``'s connection is in flight."""
        return peer in self._busy

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        jobs: list[Job] = []
        scope[_JOBS] = jobs
        client = scope.get("client")
        peer: tuple[str, int] | None = (client[0], client[1]) if client else None
        self._in_flight[id(scope)] = jobs
        self._busy[peer] = self._busy.get(peer, 0) + 1
        try:
            await self._app(scope, receive, send)
        finally:
            del self._in_flight[id(scope)]
            self._busy[peer] -= 1
            if not self._busy[peer]:
                del self._busy[peer]
            for job in jobs:
                self._on_end(job, scope.get("client"))
