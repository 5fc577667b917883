"""Structured narration logs: one JSON object per line on stderr (CONTRACT §7).

Built on the standard :mod:`logging` module. Every line has ``ts, level, actor, action,
human, worker_id``; lines about a request or job add ``job_id`` and ``correlation_id``.
Prompts and outputs are never logged: only their length and the prompt's SHA-256.
``--log-format text`` renders the same records as one readable line each.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import IO, Any

LOGGER_NAME = "orcd"
_BASE = ("ts", "level", "actor", "action", "human", "worker_id")


def utc_now() -> str:
    """RFC 3339 UTC with milliseconds, as used in logs and events."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    def __init__(self, worker_id: str) -> None:
        super().__init__()
        self.worker_id = worker_id

    def record_fields(self, record: logging.LogRecord) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc)
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


def configure(worker_id: str, fmt: str = "json", level: str = "info",
              stream: IO[str] | None = None) -> logging.Logger:
    """Point the ``orcd`` logger at ``stream`` (stderr) in the chosen format."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(TextFormatter(worker_id) if fmt == "text" else JsonFormatter(worker_id))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


def log(action: str, human: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Emit one narration line: ``action`` names the event, ``human`` says it in words."""
    logger = logging.getLogger(LOGGER_NAME)
    if logger.isEnabledFor(level):
        clean = {k: v for k, v in fields.items() if v is not None}
        logger.log(level, human, extra={"action": action, "fields": clean})
