"""The ``orcd`` process: command-line errors, signals and drain (CONTRACT §1, §6).

Each test runs ``python -m orcd`` as a child process with the tiny GGUF model and talks
to it over HTTP. Every wait is bounded; a process left over is killed in ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from orcd._tinymodel import build_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"^orcd listening on (http://127\.0\.0\.1:(\d+))$")
LONG_CTX = 16384  # a job this long takes many seconds: still running when a signal comes


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a context long enough for a job that outlasts the test's signals."""
    return build_tiny_gguf(tmp_path_factory.mktemp("long") / "tiny-16k.gguf", n_ctx=LONG_CTX)


_STATE_HOME = tempfile.mkdtemp(prefix="orcd-test-state-")


def orcd_env(**extra: str) -> dict[str, str]:
    """The test's environment without any ORCD_* setting, plus ``extra``. Default ledgers
    go to a temporary state folder, never the user's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCD_")}
    env["XDG_STATE_HOME"] = _STATE_HOME
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orcd", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env or orcd_env())


def assert_one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("orcd: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert result.stdout == ""


class Served:
    """A running ``orcd serve`` child: its process, base URI and stderr (the JSON logs)."""

    def __init__(self, proc: subprocess.Popen[str], uri: str, stderr: Path) -> None:
        self.proc = proc
        self.uri = uri
        self.stderr = stderr

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr.read_text().splitlines()
                if line.startswith("{")]

    def wait_health(self, status: int, timeout: float = 30.0) -> dict[str, Any]:
        """Poll /health until it answers ``status``; return its body."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                resp = httpx.get(f"{self.uri}/health", timeout=2)
                if resp.status_code == status:
                    return resp.json()
                last = resp.status_code
            except httpx.HTTPError as exc:
                last = exc
            assert self.proc.poll() is None, self.stderr.read_text()
            time.sleep(0.02)
        raise AssertionError(f"/health never answered {status} (last: {last!r})")


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no line on stdout in time"
    return proc.stdout.readline()


@contextmanager
def orcd_serve(tmp_path: Path, *args: str) -> Iterator[Served]:
    """``orcd serve --port 0 ARGS`` until the block ends; ready (/health 200) on entry."""
    stderr = tmp_path / "orcd-stderr.log"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orcd", "serve", "--port", "0", "--threads", "1", *args],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=orcd_env())
    try:
        line = read_line(proc, 30).rstrip("\n")
        match = LISTENING.match(line)
        assert match, (line, stderr.read_text())
        served = Served(proc, match.group(1), stderr)
        served.wait_health(200)
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def sse(resp: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of an SSE response, as they arrive."""
    name: str | None = None
    for line in resp.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            assert name is not None
            yield name, json.loads(line[len("data: "):])
            name = None


LONG_JOB = {"prompt": "go on", "max_tokens": LONG_CTX - 100, "seed": 5}
LONG_FLAGS = ("--n-ctx", str(LONG_CTX), "--max-tokens-out", str(LONG_CTX))


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("args", "needle"), [
    (["serve", "--port", "abc"], "--port='abc': not a number"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--slots", "0"], "--slots='0'"),
    (["serve", "--drain-timeout-s", "-1"], "--drain-timeout-s"),
    (["serve", "--log-format", "xml"], "--log-format"),
    (["serve", "--no-such-flag"], "--no-such-flag"),
    (["--no-such-flag"], "--no-such-flag"),
    (["no-such-command"], "no-such-command"),
])
def test_bad_flags_exit_1_with_one_line(args: list[str], needle: str) -> None:
    assert_one_error_line(run_cli(*args), needle)


def test_bad_environment_variable_exits_1_with_one_line() -> None:
    result = run_cli("serve", env=orcd_env(ORCD_SLOTS="many"))
    assert_one_error_line(result, "ORCD_SLOTS", "not a number")


def test_missing_or_non_gguf_model_exits_1_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    assert_one_error_line(run_cli("serve", "--port", "0", "--model", str(missing)),
                          str(missing), "cannot read")
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip file, not a model")
    assert_one_error_line(run_cli("serve", "--port", "0", "--model", str(not_gguf)),
                          str(not_gguf), "not a GGUF file")


def test_corrupt_gguf_exits_1_without_traceback(tmp_path: Path) -> None:
    """GGUF magic, broken body: found only while loading, after the server listens."""
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    result = run_cli("serve", "--port", "0", "--model", str(corrupt))
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    *log_lines, last = result.stderr.splitlines()
    assert last.startswith("orcd: error: ") and str(corrupt) in last, last
    assert all(json.loads(line)["actor"] == "orcd" for line in log_lines)


# ---------------------------------------------------------------------------- signals


def test_serve_prints_its_port_and_sigint_drains_to_exit_0(tiny_model: Path,
                                                           tmp_path: Path) -> None:
    with orcd_serve(tmp_path, "--model", str(tiny_model), "--worker-id", "proc-1") as srv:
        health = srv.wait_health(200)
        assert health["worker_id"] == "proc-1" and health["state"] == "ready"
        srv.proc.send_signal(signal.SIGINT)
        assert srv.proc.wait(timeout=15) == 0
        lines = srv.log_lines()
    assert all(line["worker_id"] == "proc-1" for line in lines)
    actions = [line["action"] for line in lines]
    assert actions[0] == "startup" and "ready" in actions
    assert [x["reason"] for x in lines if x["action"] == "shutdown"] == ["SIGINT", "SIGINT"]


def test_sigterm_mid_stream_ends_the_stream_once_and_exits_0(long_model: Path,
                                                             tmp_path: Path) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    with orcd_serve(tmp_path, "--model", str(long_model), *LONG_FLAGS,
                    "--drain-timeout-s", "1") as srv:
        with httpx.Client(base_url=srv.uri, timeout=20) as client:
            with client.stream("POST", "/execute", json={"job_id": "sigterm-1", **LONG_JOB}
                               ) as resp:
                assert resp.status_code == 200
                for name, data in sse(resp):
                    events.append((name, data))
                    if name == "token" and data["i"] == 0:
                        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=15) == 0
        lines = srv.log_lines()

    names = [name for name, _ in events]
    assert names[0] == "started" and "token" in names
    terminals = [e for e in events if e[0] in ("end", "error")]
    assert len(terminals) == 1 and events[-1] is terminals[0], names[-3:]
    # The job is far longer than the 1 s drain: the drain cancels it.
    name, data = terminals[0]
    assert name == "error" and data["code"] == "CANCELLED" and data["reason"] == "shutdown"
    assert [x["reason"] for x in lines if x["action"] == "shutdown"] == ["SIGTERM", "SIGTERM"]
    [done] = [x for x in lines if x["action"] == "cancel_complete"]
    assert done["job_id"] == "sigterm-1" and done["cancel_reason"] == "shutdown"


def test_second_sigint_during_drain_exits_at_once(long_model: Path, tmp_path: Path) -> None:
    with orcd_serve(tmp_path, "--model", str(long_model), *LONG_FLAGS,
                    "--drain-timeout-s", "30") as srv:
        with httpx.Client(base_url=srv.uri, timeout=20) as client:
            with client.stream("POST", "/execute", json={"job_id": "sigint-1", **LONG_JOB}
                               ) as resp:
                assert resp.status_code == 200
                # Keep the generator referenced: closing it would close the connection,
                # which cancels the job (client_disconnect) instead of leaving it running.
                events = sse(resp)
                for name, _data in events:
                    if name == "token":
                        break
                srv.proc.send_signal(signal.SIGINT)
                health = srv.wait_health(503, timeout=10)
                assert health["state"] == "draining" and health["active_jobs"] == 1
                sent = time.monotonic()
                srv.proc.send_signal(signal.SIGINT)
                assert srv.proc.wait(timeout=10) == 130
                assert time.monotonic() - sent < 5, "the second SIGINT did not exit at once"
        lines = srv.log_lines()
    assert any(x["action"] == "shutdown" and "Second SIGINT" in x["human"] for x in lines)
