"""Text assembly: token bytes to UTF-8 pieces, with stop sequences held back."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextAssembler:
    """Turns token bytes into text pieces that are valid UTF-8 and free of stop sequences.

    Bytes of a multi-byte character split across tokens are held back until complete.
    Text that could be the start of a stop sequence is held back until it is known not to be.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(stops)
        self._pending = ""
        self.stopped_by: str | None = None

    def feed(self, data: bytes) -> str:
        """Add a token's bytes; return the text that is now safe to send ('' if none)."""
        self._pending += self._decoder.decode(data)
        if not self._stops:
            out, self._pending = self._pending, ""
            return out
        first: tuple[int, str] | None = None
        for stop in self._stops:
            at = self._pending.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            self.stopped_by = first[1]
            out, self._pending = self._pending[: first[0]], ""
            return out
        keep = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), keep, -1):
                if self._pending.endswith(stop[:n]):
                    keep = n
                    break
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """The held-back text at the end of a generation that did not hit a stop sequence."""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out
