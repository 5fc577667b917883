"""``orcd run PROMPT``: stream one job's text to stdout; Ctrl-C cancels it.

stdout carries the model's text and nothing else, so ``orcd run ... > out.txt`` is the
output. A status line (queued, started, the end's summary) goes to stderr only when
stderr is a terminal; the outcome of a cancel or an error is always one line on stderr.
Exit codes: 0 finished, 130 cancelled by Ctrl-C, 1 anything else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from .api import Api, ClientError, Event, native_events
from .follow import follow
from .term import Style, ms, printable


class RunView:
    """What ``orcd run`` shows of its job."""

    def __init__(self, job_id: str, out: TextIO, err: TextIO, *, no_color: bool) -> None:
        self.job_id = job_id
        self.out, self.err = out, err
        self.out_tty = out.isatty()
        self.s = Style(err, no_color=no_color)
        self._status_line = False  # a \r-rewritten line is on stderr
        self._at_line_start = True  # stdout's text ends with a newline (or is empty)

    def _status(self, text: str) -> None:
        if self.s.tty:
            self.err.write(f"\r\x1b[K{self.s.dim(text)}")
            self.err.flush()
            self._status_line = True

    def _clear_status(self) -> None:
        if self._status_line:
            self.err.write("\r\x1b[K")
            self._status_line = False

    def show(self, event: Event) -> None:
        data = event.data
        if event.name == "queued":
            self._status(f"{self.job_id}: queued at position {data.get('position')}")
        elif event.name == "started":
            self._clear_status()
            if self.s.tty:
                self.err.write(self.s.dim(
                    f"● {self.job_id} · {data.get('model')} · seed {data.get('seed')} · "
                    f"{data.get('prompt_tokens')} prompt tokens") + "\n")
                self.err.flush()
        elif event.name == "token":
            text = str(data.get("t", ""))
            self.out.write(printable(text) if self.out_tty else text)
            self.out.flush()
            if text:
                self._at_line_start = text.endswith("\n")
        elif event.terminal:
            self._clear_status()
            if self.out_tty and not self._at_line_start:
                self.out.write("\n")
                self.out.flush()
                self._at_line_start = True

    def summary(self, event: Event) -> None:
        """The end's numbers, on a terminal only."""
        if not self.s.tty:
            return
        d = event.data
        tokens, decode_ms = d.get("tokens_out") or 0, float(d.get("decode_time_ms") or 0.0)
        rate = f" · {tokens / decode_ms * 1000:.0f} tok/s" if decode_ms > 0 else ""
        reason = d.get("stop_reason")
        if reason == "stop_sequence":
            reason = f"stop sequence {d.get('stop_sequence')!r}"
        self.err.write(self.s.dim(f"■ end · {reason} · {tokens} tokens · {ms(decode_ms)}{rate}")
                       + "\n")
        self.err.flush()


@contextmanager
def _execute(api: Api, body: dict[str, Any]) -> Iterator[Iterator[Event]]:
    with api.stream("/execute", body) as lines:
        yield native_events(lines)


def run(api: Api, control: Api, body: dict[str, Any], out: TextIO, err: TextIO, *,
        no_color: bool = False) -> int:
    """Stream the job ``body`` describes; ``control`` (its own connection) sends the cancel."""
    job_id = body["job_id"]
    view = RunView(job_id, out, err, no_color=no_color)
    finished = follow(lambda: _execute(api, body), lambda: control.cancel(job_id), view)
    event, s = finished.event, view.s
    if event.name == "end":
        view.summary(event)
        return 0
    code, reason = event.data.get("code"), event.data.get("reason")
    if finished.cancelled_by_us:
        latency = finished.cancel_latency_ms
        assert latency is not None
        err.write(s.yellow(f"{job_id} cancelled in {ms(latency)}") + s.dim(f" ({reason})") + "\n")
        err.flush()
        return 130
    detail = f" ({reason})" if reason else ""
    raise ClientError(f"{code}: {event.data.get('message')}{detail}")
