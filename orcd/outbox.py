"""A job's events on their way to its stream: bounded, never blocking, never raising.

The job layer produces events from callbacks that must not fail (a token report from the
generation thread, a slot passing to the next job, a deadline). The stream consumes them
at whatever pace its client reads. The outbox sits between the two:

- ``started`` and tokens queue in order, up to a capacity fixed when the job is admitted
  (``max_tokens`` + 1 always fits: a job never produces more);
- the queue position is one coalesced value: only the latest position is kept, and it is
  delivered only when it differs from the last one delivered;
- the terminal event has a place of its own, so it always fits.

Whatever the reader does, ``put``, ``set_position`` and ``finish`` return at once, and the
memory a job's events can take stays bounded by its capacity.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio


@attrs.frozen
class StreamEvent:
    """One event of a job's stream (CONTRACT §3): ``queued``, ``started``, ``token``, ``end``
    or ``error``. Each protocol renders it its own way."""

    name: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.name in ("end", "error")


class Outbox:
    """Events of one job for its one reader."""

    def __init__(self, job_id: str, capacity: int) -> None:
        self._job_id = job_id
        self._capacity = capacity
        self._events: deque[StreamEvent] = deque()
        self._position: int | None = None  # latest position, not yet delivered
        self._delivered_position: int | None = None
        self._terminal: StreamEvent | None = None
        self._finished = False  # finish() was called
        self._ended = False  # the reader took the terminal event
        self._abandoned = False  # the reader went away; nothing is kept any more
        self._wakeup = trio.Event()
        self.dropped = 0  # events refused because the outbox was full (never expected)

    @property
    def pending(self) -> int:
        """Events waiting for the reader (the terminal one included)."""
        position = self._position is not None and self._position != self._delivered_position
        return len(self._events) + int(position) + int(self._terminal is not None)

    def put(self, event: StreamEvent) -> bool:
        """Queue a non-terminal event; False if it was not kept (full, finished, abandoned)."""
        if self._finished or self._abandoned:
            return False
        if len(self._events) >= self._capacity:
            self.dropped += 1
            return False
        self._position = None  # a job that has started has no queue position any more
        self._events.append(event)
        self._wakeup.set()
        return True

    def set_position(self, position: int) -> None:
        """The job's place in the queue; delivered only when it differs from the last one."""
        if self._finished or self._abandoned or self._events:
            return
        self._position = position
        if position != self._delivered_position:
            self._wakeup.set()

    def finish(self, event: StreamEvent) -> None:
        """Queue the terminal event: the last one the reader gets. Only the first counts."""
        assert event.terminal, event
        if self._finished:
            return
        self._finished = True
        self._position = None
        if not self._abandoned:
            self._terminal = event
        self._wakeup.set()

    def abandon(self) -> None:
        """The reader is gone: free what is queued and keep nothing from now on."""
        self._abandoned = True
        self._events.clear()
        self._terminal = None
        self._position = None
        self._wakeup.set()

    async def get(self) -> StreamEvent | None:
        """The next event, waiting for one; None once the terminal event was taken."""
        while True:
            if self._ended or self._abandoned:
                return None
            if self._position is not None:
                position, self._position = self._position, None
                if position != self._delivered_position:
                    self._delivered_position = position
                    return StreamEvent("queued", {"job_id": self._job_id, "position": position})
            if self._events:
                return self._events.popleft()
            if self._terminal is not None:
                event, self._terminal = self._terminal, None
                self._ended = True
                return event
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        while (event := await self.get()) is not None:
            yield event
