"""HTTP/1.1 on raw sockets, for clients that misbehave below what httpx allows: a receive
buffer too small to keep up, a close (FIN or RST) at an exact point of the exchange, a
reader that takes a few bytes now and then."""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import trio
from chaos_checks import Stream

TINY_RCVBUF = 1024  # SO_RCVBUF before connect; the kernel rounds it up to its minimum (~2 KB)


async def connect(host: str, port: int, *, rcvbuf: int | None = None) -> trio.SocketStream:
    """A TCP connection to orcd; ``rcvbuf`` is set before connecting, so that the window the
    client advertises is small from the first segment."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def execute_request(body: dict[str, Any], cid: str) -> bytes:
    payload = json.dumps(body).encode()
    return (b"POST /execute HTTP/1.1\r\nHost: orcd\r\nContent-Type: application/json\r\n"
            b"X-Correlation-Id: " + cid.encode() + b"\r\nContent-Length: "
            + str(len(payload)).encode() + b"\r\n\r\n" + payload)


def reset_on_close(stream: trio.SocketStream) -> None:
    """Make the next close send an RST instead of a FIN (SO_LINGER with a zero timeout)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def peek_status(stream: trio.SocketStream, bound: float) -> int | None:
    """The response's status code, read with MSG_PEEK: nothing leaves the receive buffer, so
    a client that must not read stays a client that did not read. None: no status line in
    ``bound`` s."""
    with trio.move_on_after(bound):
        while True:
            head = await stream.socket.recv(64, socket.MSG_PEEK)
            if not head:
                return None
            if b"\r\n" in head:
                parts = head.split(b"\r\n", 1)[0].split()
                return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
            await trio.sleep(0.005)  # a partial status line: wait for the rest
    return None


class Response:
    """An HTTP/1.1 response fed in pieces: the status line, then the SSE frames of its
    chunked body, each handed to a :class:`Stream` that checks it."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.status: int | None = None
        self.chunked = False
        self.complete = False  # the last (zero) chunk arrived
        self.malformed: str | None = None
        self._buf = b""
        self._body = b""

    def feed(self, data: bytes) -> None:
        self._buf += data
        if self.status is None:
            head, sep, rest = self._buf.partition(b"\r\n\r\n")
            if not sep:
                return
            lines = head.split(b"\r\n")
            try:
                self.status = int(lines[0].split()[1])
            except (IndexError, ValueError):
                self.status = -1
                self.malformed = f"status line {lines[0][:80]!r}"
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(b":") for line in lines[1:])}
            self.chunked = headers.get(b"transfer-encoding", b"").lower() == b"chunked"
            self._buf = rest
        if self.chunked:
            self._dechunk()
        else:
            self._body += self._buf
            self._buf = b""
        self._frames()

    def _dechunk(self) -> None:
        while not self.complete:
            line, sep, rest = self._buf.partition(b"\r\n")
            if not sep:
                return
            try:
                size = int(line.split(b";")[0], 16)
            except ValueError:
                self.malformed = f"chunk size line {line[:40]!r}"
                self._buf = b""
                return
            if len(rest) < size + 2:
                return
            self._body += rest[:size]
            self._buf = rest[size + 2:]
            self.complete = size == 0

    def _frames(self) -> None:
        if self.status != 200:
            return
        while b"\n\n" in self._body:
            frame, _, self._body = self._body.partition(b"\n\n")
            lines = [ln for ln in frame.decode("utf-8", "replace").split("\n")
                     if ln and not ln.startswith(":")]
            if not lines:
                continue  # a keep-alive comment
            if len(lines) != 2 or not lines[0].startswith("event: ") or not lines[
                    1].startswith("data: "):
                self.stream.bad(f"malformed SSE frame {lines!r}")
                continue
            try:
                data = json.loads(lines[1][6:])
            except json.JSONDecodeError:
                self.stream.bad(f"frame data is not JSON: {lines[1][:120]!r}")
                continue
            self.stream.feed(lines[0][7:], data)


async def read_until(stream: trio.SocketStream, resp: Response, bound: float, *,
                     stop: Any = None, piece: int = 65536, pause: float = 0.0) -> str:
    """Read into ``resp`` until ``stop(resp)`` holds, the stream ends or ``bound`` s pass:
    'stop', 'terminal', 'eof', 'reset' or 'timeout'. ``piece`` and ``pause`` make a slow
    reader: at most ``piece`` bytes, then a nap."""
    with trio.move_on_after(bound):
        while True:
            if stop is not None and stop(resp):
                return "stop"
            if resp.stream.terminal is not None or resp.complete:
                return "terminal"
            try:
                data = await stream.receive_some(piece)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return "reset"
            if not data:
                return "eof"
            resp.feed(data)
            if pause:
                await trio.sleep(pause)
    return "timeout"


async def close(stream: trio.SocketStream) -> None:
    with trio.CancelScope(shield=True):
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, OSError):
            pass
