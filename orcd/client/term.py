"""Terminal details: colours only on a terminal, model text made safe to print, durations."""

from __future__ import annotations

import re
from typing import TextIO

# C0 controls but tab and newline, DEL and the C1 controls: a model's output could hold an
# escape sequence that rewrites the user's terminal. On a terminal they are shown as U+FFFD.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    return _CONTROL.sub("\ufffd", text)


def ms(value: float) -> str:
    """``4.2 ms``, ``37 ms``, ``1.24 s``."""
    if value < 10:
        return f"{value:.1f} ms"
    if value < 1000:
        return f"{value:.0f} ms"
    return f"{value / 1000:.2f} s"


class Style:
    """ANSI styling, or none when the stream is not a terminal (or ``NO_COLOR`` is set)."""

    def __init__(self, stream: TextIO, *, no_color: bool = False) -> None:
        self.tty = stream.isatty()
        self.on = self.tty and not no_color

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.on else text

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def red(self, text: str) -> str:
        return self._wrap("31", text)

    def green(self, text: str) -> str:
        return self._wrap("32", text)

    def yellow(self, text: str) -> str:
        return self._wrap("33", text)

    def cyan(self, text: str) -> str:
        return self._wrap("36", text)

    def state(self, state: str) -> str:
        """A job state in its colour."""
        colour = {"running": self.cyan, "completed": self.green, "cancelled": self.yellow,
                  "failed": self.red, "queued": self.dim}.get(state)
        return colour(state) if colour else state
