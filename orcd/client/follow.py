"""Follow one job's stream on the terminal; the first Ctrl-C cancels it, a second one quits.

The stream is read on a daemon thread (:class:`Pump`) that stamps each event with its
arrival time and puts it in a queue. The main thread only takes from that queue, and while
a job is followed SIGINT does not raise: it puts a marker in the same queue (a
``SimpleQueue.put`` is safe inside a signal handler). So a Ctrl-C never lands inside
httpx, the cancel goes out on its own connection while the stream goes on being read, and
the ``error CANCELLED`` that answers it is timed from the moment the cancel was sent.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import FrameType
from typing import Protocol

import attrs

from .api import ClientError, Event

CANCEL_WAIT_S = 10.0  # the contract: cancellation is complete within 5 s in the worst case

OpenEvents = Callable[[], AbstractContextManager[Iterator[Event]]]


class _Interrupt:
    """The marker a Ctrl-C puts in the queue."""


_INTERRUPT = _Interrupt()
_Item = Event | ClientError | _Interrupt


class View(Protocol):
    """What the terminal shows of a followed job."""

    def show(self, event: Event) -> None: ...


@attrs.frozen
class Finished:
    """How a followed job ended: its terminal event, and when our cancel went out (if it did)."""

    event: Event
    cancel_sent_at: float | None

    @property
    def cancelled_by_us(self) -> bool:
        return self.cancel_sent_at is not None and self.event.cancelled

    @property
    def cancel_latency_ms(self) -> float | None:
        """From sending ``/cancel`` to receiving the terminal event."""
        if self.cancel_sent_at is None:
            return None
        return max(0.0, self.event.at - self.cancel_sent_at) * 1000


class Pump:
    """Reads one stream on a daemon thread; its events, or the error that ended it, queue up."""

    def __init__(self, open_events: OpenEvents) -> None:
        self._open = open_events
        self.queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._read, name="orcd-stream", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _read(self) -> None:
        try:
            with self._open() as events:
                for event in events:
                    self.queue.put(event)
                    if event.terminal:
                        return
            self.queue.put(ClientError("the stream ended without a terminal event"))
        except ClientError as exc:
            self.queue.put(exc)
        except Exception as exc:  # a malformed frame: the main thread reports it in one line
            self.queue.put(ClientError(f"unreadable stream: {exc!r}"))


@contextmanager
def _ctrl_c_into(q: queue.SimpleQueue[_Item]) -> Iterator[None]:
    """While inside: the first SIGINT queues a marker, the next raises KeyboardInterrupt."""
    presses = 0

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        nonlocal presses
        presses += 1
        if presses > 1:
            raise KeyboardInterrupt
        q.put(_INTERRUPT)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def follow(open_events: OpenEvents, cancel: Callable[[], object], view: View) -> Finished:
    """Show a job's events until its terminal one; Ctrl-C calls ``cancel`` and keeps following.

    Raises :class:`ClientError` when the stream fails, or when no terminal event comes within
    :data:`CANCEL_WAIT_S` of the cancel; ``KeyboardInterrupt`` on a second Ctrl-C.
    """
    pump = Pump(open_events)
    cancel_sent_at: float | None = None
    with _ctrl_c_into(pump.queue):
        pump.start()
        while True:
            try:
                item = pump.queue.get(timeout=None if cancel_sent_at is None else CANCEL_WAIT_S)
            except queue.Empty:
                raise ClientError(f"the job sent no terminal event within {CANCEL_WAIT_S:g} s "
                                  "of the cancel") from None
            if isinstance(item, _Interrupt):
                if cancel_sent_at is None:
                    cancel_sent_at = time.perf_counter()
                    cancel()
                continue
            if isinstance(item, ClientError):
                raise item
            view.show(item)
            if item.terminal:
                return Finished(item, cancel_sent_at)
