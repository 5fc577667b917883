"""Structured narration logs: one JSON object per line on stderr (CONTRACT §7).

Built on the standard :mod:`logging` module. Every line has ``ts, level, actor, action,
human, worker_id``; lines about a request or job add ``job_id`` and ``correlation_id``.
Prompts and outputs are never logged: only their length and the prompt's SHA-256.
``--log-format text`` renders the same records as one readable line each.

Logging never blocks the event loop: a record goes into a bounded queue (dropped and
counted if the queue is full) and one writer thread formats and writes it, so a stderr
that nobody reads stalls only that thread.
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import sys
import threading
import time
from datetime import UTC, datetime
from logging.handlers import QueueHandler, QueueListener
from typing import IO, Any

from . import priority

LOGGER_NAME = "orcd"
_BASE = ("ts", "level", "actor", "action", "human", "worker_id")


def utc_now() -> str:
    """RFC 3339 UTC with milliseconds, as used in logs and events."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    def __init__(self, worker_id: str) -> None:
        super().__init__()
        self.worker_id = worker_id

    def record_fields(self, record: logging.LogRecord) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "actor": "orcd",
            "action": getattr(record, "action", "log"),
            "human": record.getMessage(),
            "worker_id": self.worker_id,
        }
        fields.update(getattr(record, "fields", {}))
        return fields

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(self.record_fields(record), ensure_ascii=False, default=str)


class TextFormatter(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        f = self.record_fields(record)
        extra = " ".join(f"{k}={v}" for k, v in f.items() if k not in _BASE)
        line = f"{f['ts']} {f['level'].upper():7} {f['action']:<20} {f['human']}"
        return f"{line}  {extra}" if extra else line


QUEUE_SIZE = 10_000


class _DroppingQueueHandler(QueueHandler):
    """Puts records on the writer's queue without ever waiting; counts what did not fit."""

    def __init__(self, q: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(q)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


_listener: QueueListener | None = None
_queue: queue.Queue[logging.LogRecord] | None = None


def configure(worker_id: str, fmt: str = "json", level: str = "info",
              stream: IO[str] | None = None) -> logging.Logger:
    """Point the ``orcd`` logger at ``stream`` (stderr) in the chosen format, through the
    queue and its writer thread."""
    global _listener, _queue
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    if _listener is not None:
        writer_thread = _writer_thread(_listener)
        if writer_thread is not None:
            priority.forget(writer_thread)
        _listener.stop()  # writes what is queued, then ends the writer thread
    writer = logging.StreamHandler(stream or sys.stderr)
    writer.setFormatter(TextFormatter(worker_id) if fmt == "text" else JsonFormatter(worker_id))
    _queue = queue.Queue(QUEUE_SIZE)
    _listener = QueueListener(_queue, writer)
    _listener.start()
    writer_thread = _writer_thread(_listener)
    if writer_thread is not None:
        priority.keep(writer_thread)  # the event loop puts into its queue
    logger.addHandler(_DroppingQueueHandler(_queue))
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


def _writer_thread(listener: QueueListener | None) -> threading.Thread | None:
    """The listener's writer thread (QueueListener keeps no public handle on it)."""
    return getattr(listener, "_thread", None)


def writer_thread_id() -> int | None:
    """The native id of the thread that writes the log lines (None before configure)."""
    writer_thread = _writer_thread(_listener)
    return None if writer_thread is None else writer_thread.native_id


def flush(timeout_s: float = 2.0) -> bool:
    """Wait (in the calling thread) until every queued line is written; False on timeout."""
    q = _queue
    if q is None:
        return True
    end = time.monotonic() + timeout_s
    while q.unfinished_tasks:
        if time.monotonic() >= end:
            return False
        time.sleep(0.001)
    return True


def dropped() -> int:
    """Log lines dropped because the writer could not keep up."""
    handlers = logging.getLogger(LOGGER_NAME).handlers
    return sum(h.dropped for h in handlers if isinstance(h, _DroppingQueueHandler))


@atexit.register
def _stop() -> None:
    if _listener is not None:
        _listener.stop()


def log(action: str, human: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Emit one narration line: ``action`` names the event, ``human`` says it in words."""
    logger = logging.getLogger(LOGGER_NAME)
    if logger.isEnabledFor(level):
        clean = {k: v for k, v in fields.items() if v is not None}
        logger.log(level, human, extra={"action": action, "fields": clean})
