"""The HTTP API: the native routes (``/execute``, ``/cancel``, ``/jobs``...), SSE and schemas."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
