"""The terminal client: ``orcd run``, ``orcd chat``, ``orcd jobs`` and ``orcd cancel``.

A small synchronous httpx client of a running worker. ``cli`` holds the commands; ``api``
speaks HTTP (the error envelope, both SSE dialects); ``follow`` streams one job to the
terminal and turns Ctrl-C into a ``POST /cancel``; ``chat`` is the interactive loop.
"""

from __future__ import annotations

COMMANDS = ("run", "chat", "jobs", "cancel")

__all__ = ["COMMANDS"]
