"""Cancel one of four under load, seen by a lean client: raw sockets, no HTTP library.

The ``cancel-load`` section's main figure is taken with the benchmark's own client (httpx,
one Python thread per stream), which on two busy cores adds its own milliseconds to every
request. This measures the same scenario from a client that costs next to nothing: each
stream is a plain socket read by its own thread, chunked SSE decoded by hand, and the
cancel is one pre-built ``POST /cancel`` on a kept-alive connection. The figure is the time
from sending the cancel to reading the victim's ``error`` event (and, separately, the 202).

Next to it, in the same load window of every sample, the client times a few round trips to
a bare echo process (:class:`Echo`: a separate Python process that reads a byte and writes
it back, no HTTP, no server logic). That is the floor this machine sets under the same load:
two processes waking each other across the cores the engine keeps busy. A cancel needs the
same two wake-ups plus the server's own work, so its tail cannot sit below the echo's.

    .venv/bin/python bench/lean_cancel.py --port 8000 [--reps 30]

:func:`measure` is what ``just bench`` calls, against an orcd it started.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from peers import ms, nonce, now, p50_p99

ECHO_ROUNDS = 5  # echo round trips per sample, in the load window just before the cancel
ECHO_SERVER = """
import socket, sys
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while (data := conn.recv(64)):
    conn.sendall(data)
"""
PROMPT = "Write a long, detailed story about a lighthouse keeper and a lost whale."


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _request(method: str, path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


class LeanStream(threading.Thread):
    """``POST /execute`` on its own socket; ``events``: (arrival time, event name)."""

    def __init__(self, port: int, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.job_id = f"lean-{nonce()}"
        self.sock = _connect(port)
        self.sock.sendall(_request("POST", "/execute", {
            "job_id": self.job_id, "prompt": f"[{self.job_id}] {PROMPT}",
            "max_tokens": max_tokens, "temperature": 0.0}))
        self.events: list[tuple[float, str]] = []
        self.done = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._read()
        except Exception as exc:  # noqa: BLE001 - reported through .error
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.sock.close()
            self.done.set()

    def _read(self) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self._recv()
        head, buf = buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
        text = b""
        while True:  # chunked transfer coding: size line, data, CRLF
            while b"\r\n" not in buf:
                buf += self._recv()
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                return
            while len(buf) < size + 2:
                buf += self._recv()
            t = now()
            text, buf = text + buf[:size], buf[size + 2:]
            while b"\n\n" in text:
                frame, text = text.split(b"\n\n", 1)
                for line in frame.split(b"\n"):
                    if line.startswith(b"event:"):
                        name = line[6:].strip().decode()
                        self.events.append((t, name))
                        if name in ("done", "error"):
                            return

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the stream")
        return data

    def count(self, kind: str) -> int:
        return sum(1 for _, name in self.events if name == kind)

    def first(self, kind: str) -> float | None:
        return next((t for t, name in self.events if name == kind), None)


class Control:
    """One kept-alive connection for ``POST /cancel``."""

    def __init__(self, port: int) -> None:
        self.sock = _connect(port)

    def cancel(self, job_id: str) -> float:
        """Send the cancel; return when its 202 has been read (the time it was sent)."""
        t0 = now()
        self.sock.sendall(_request("POST", "/cancel", {"job_id": job_id}))
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self.sock.recv(65536)
        head, rest = buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 202"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(rest) < length:
            rest += self.sock.recv(65536)
        return t0

    def close(self) -> None:
        self.sock.close()


class Echo:
    """A bare echo process: the machine's own round-trip floor under the same load."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        self.sock = _connect(int(self.proc.stdout.readline()))

    def round_trip(self) -> float:
        t0 = now()
        self.sock.sendall(b"x")
        if not self.sock.recv(64):
            raise ConnectionError("the echo process closed its socket")
        return now() - t0

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(10)


def sample(port: int, ctl: Control, echo: Echo, victim: int, tokens: int) -> dict[str, Any]:
    """Four streams generate; once each has 8 tokens, time ``ECHO_ROUNDS`` echo round trips,
    then cancel stream ``victim``."""
    streams = [LeanStream(port, tokens) for _ in range(4)]
    for st in streams:
        st.start()
    try:
        deadline = now() + 120
        while not all(st.count("token") >= 8 for st in streams):
            if now() > deadline or any(st.done.is_set() for st in streams):
                raise RuntimeError("the four streams did not all get going")
            time.sleep(0.002)
        echo_s = [echo.round_trip() for _ in range(ECHO_ROUNDS)]
        v = streams[victim]
        t0 = ctl.cancel(v.job_id)
        t_202 = now()
        v.done.wait(30)
        t_err = v.first("error")
        if t_err is None:
            raise RuntimeError(f"the victim ended without an error event: {v.error}")
        return {"valid": True, "cancelled_s": t_err - t0, "accepted_s": t_202 - t0,
                "job_id": v.job_id, "sent_at": t0, "echo_s": echo_s}
    except Exception as exc:  # noqa: BLE001 - one bad sample must not end the run
        return {"valid": False, "why": f"{type(exc).__name__}: {exc}"}
    finally:
        for st in streams:
            if not st.done.is_set():
                ctl.cancel(st.job_id)
        for st in streams:
            st.done.wait(30)


def measure(port: int, reps: int, tokens: int = 400) -> dict[str, Any]:
    ctl, echo = Control(port), Echo()
    try:
        xs = [sample(port, ctl, echo, i % 4, tokens) for i in range(reps)]
    finally:
        ctl.close()
        echo.close()
    ok = [x for x in xs if x["valid"]]
    summary = {k: p50_p99([x[k] for x in ok]) for k in ("cancelled_s", "accepted_s")}
    summary["echo_s"] = p50_p99([e for x in ok for e in x["echo_s"]])
    return {"reps": reps, "invalid": len(xs) - len(ok), "samples": xs, "summary": summary}


HEAD = ("orcd --slots 4, lean client (raw sockets)", "cancel -> CANCELLED ms p50 / p99",
        "cancel -> 202 ms p50 / p99", "samples (invalid)")


def rows(res: dict[str, Any]) -> list[tuple[str, ...]]:
    s = res["summary"]
    out = [("cancel one of 4", ms(s["cancelled_s"], 2), ms(s["accepted_s"], 2),
            f"{s['cancelled_s']['n']} ({res['invalid']})")]
    if "echo_s" in s:  # results saved before the echo floor existed have none
        out.append(("floor: bare echo round trip, same load", ms(s["echo_s"], 2), "–",
                    str(s["echo_s"]["n"])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    res = measure(args.port, args.reps)
    for key, cell in res["summary"].items():
        print(f"{key}: p50 {cell['p50'] * 1e3:.2f} ms, p99 {cell['p99'] * 1e3:.2f} ms, "
              f"max {cell['max'] * 1e3:.2f} ms (n={cell['n']})")
    print(f"invalid samples: {res['invalid']}")


if __name__ == "__main__":
    main()
