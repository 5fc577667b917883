"""The terminal client (``orcd run``, ``chat``, ``jobs``, ``cancel``), used as a person uses it.

Each interactive test types into a real terminal: a tmux session (on a private socket)
runs a shell, the test sends keys (``C-c`` included) and reads the screen with
``capture-pane``. The worker is a real ``orcd serve`` child process with the tiny model
and a long context, so a job with a large ``max_tokens`` is still streaming when Ctrl-C
comes; what is asserted is what the user sees and the job's recorded state. Two protocol
corners a real worker cannot be held in (a cancel that never answers; exact chat history)
use a small scripted HTTP worker.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from orcd._tinymodel import build_tiny_gguf

from .test_process import LONG_CTX, orcd_env, orcd_serve, sse

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 20.0
LONG = LONG_CTX - 200  # max_tokens of a job that is still streaming when the test presses C-c


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``orcd serve`` (tiny model, 16k context) for the module; its base URI."""
    tmp = tmp_path_factory.mktemp("client")
    model = build_tiny_gguf(tmp / "tiny-16k.gguf", n_ctx=LONG_CTX)
    with orcd_serve(tmp, "--model", str(model), "--n-ctx", str(LONG_CTX),
                    "--max-tokens-out", str(LONG_CTX)) as served:
        yield served.uri


class Terminal:
    """A shell in a tmux pane: type into it, press keys, read the screen."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", str(self.socket), *args], check=True, text=True,
                              capture_output=True, timeout=10).stdout

    def type(self, line: str) -> None:
        self.tmux("send-keys", "-t", "main", "-l", line)
        self.tmux("send-keys", "-t", "main", "Enter")

    def press(self, key: str) -> None:
        self.tmux("send-keys", "-t", "main", key)

    def screen(self) -> str:
        """Everything the pane shows and scrolled by (wrapped lines joined, no colours)."""
        return self.tmux("capture-pane", "-p", "-J", "-t", "main", "-S", "-2000")

    def orcd(self, *args: str) -> None:
        """Type ``orcd ARGS; echo "[exit $?]"`` at the shell prompt."""
        words = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "orcd", *args))
        self.type(f'{words}; echo "[exit $?]"')

    def wait_for(self, pattern: str, *, count: int = 1) -> re.Match[str]:
        """Wait until ``pattern`` shows up ``count`` times on the screen; its last match."""
        deadline = time.monotonic() + WAIT_S
        while True:
            screen = self.screen()
            found = list(re.finditer(pattern, screen))
            if len(found) >= count:
                return found[count - 1]
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} (x{count}) never showed up; screen:\n{screen}")
            time.sleep(0.05)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux): the client's Ctrl-C "
                    "handling is tested in a real terminal")
    term = Terminal(tmp_path / "tmux.sock")  # a tmux server of its own, gone with the test
    env = orcd_env(PS1="$ ", TERM="xterm-256color", HISTFILE="/dev/null")
    env.pop("NO_COLOR", None)
    subprocess.run(["tmux", "-S", str(term.socket), "-f", "/dev/null", "new-session", "-d",
                    "-s", "main", "-x", "200", "-y", "50", "-c", str(ROOT),
                    "bash --norc --noprofile"], check=True, env=env, timeout=10)
    try:
        yield term
    finally:
        subprocess.run(["tmux", "-S", str(term.socket), "kill-server"], timeout=10,
                       capture_output=True)


def client(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``orcd ARGS`` with pipes (not a terminal)."""
    return subprocess.run([sys.executable, "-m", "orcd", *args], capture_output=True,
                          text=True, input=stdin, timeout=60, cwd=ROOT, env=orcd_env())


def job(uri: str, job_id: str) -> dict[str, Any]:
    resp = httpx.get(f"{uri}/jobs/{job_id}", timeout=5)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def wait_job(uri: str, job_id: str, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        resp = httpx.get(f"{uri}/jobs/{job_id}", timeout=5)
        if resp.status_code == 200 and ready(resp.json()):
            body: dict[str, Any] = resp.json()
            return body
        assert time.monotonic() < deadline, f"job {job_id} never got there: {resp.text}"
        time.sleep(0.02)


def streaming(record: dict[str, Any]) -> bool:
    return bool(record["state"] == "running" and record["tokens_out"] > 20)


# ----------------------------------------------------------------------------- orcd run


def test_run_streams_exactly_the_jobs_text_to_stdout(worker: str) -> None:
    """Piped, stdout is the text and nothing else, and no status line goes to stderr."""
    body = {"job_id": "cli-ref", "prompt": "once upon a time", "max_tokens": 60,
            "temperature": 0, "seed": 11}
    with httpx.stream("POST", f"{worker}/execute", json=body, timeout=30) as resp:
        expected = "".join(data["t"] for name, data in sse(resp) if name == "token")
    result = client("run", "once upon a time", "--url", worker, "--max-tokens", "60",
                    "--temperature", "0", "--seed", "11", "--job-id", "cli-piped")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected and expected
    assert result.stderr == ""
    record = job(worker, "cli-piped")
    assert record["state"] == "completed" and record["tokens_out"] == 60


def test_run_reads_the_prompt_from_stdin(worker: str) -> None:
    result = client("run", "-", "--url", worker, "--max-tokens", "5", "--job-id", "cli-stdin",
                    stdin="a prompt from a pipe")
    assert result.returncode == 0, result.stderr
    assert job(worker, "cli-stdin")["state"] == "completed"


def test_run_in_a_terminal_shows_status_lines(worker: str, terminal: Terminal) -> None:
    terminal.orcd("run", "hello there", "--url", worker, "--max-tokens", "30", "--seed", "3",
                  "--job-id", "cli-tty")
    terminal.wait_for(r"\[exit 0\]")
    screen = terminal.screen()
    assert re.search(r"● cli-tty · orcd-tiny-seed0 · seed 3 · \d+ prompt tokens", screen), screen
    assert re.search(r"■ end · max_tokens · 30 tokens · [\d.]+ m?s · \d+ tok/s", screen), screen


def test_ctrl_c_cancels_the_job_prints_the_latency_and_exits_130(
        worker: str, terminal: Terminal) -> None:
    terminal.orcd("run", "tell me a very long story", "--url", worker,
                  "--max-tokens", str(LONG), "--job-id", "cli-ctrl-c")
    before = wait_job(worker, "cli-ctrl-c", streaming)
    terminal.wait_for(r"● cli-ctrl-c")
    terminal.press("C-c")
    shown = terminal.wait_for(r"cli-ctrl-c cancelled in (\d+(?:\.\d)?) (ms|s) \((\w+)\)")
    terminal.wait_for(r"\[exit 130\]")
    assert shown.group(3) == "client_request"
    record = job(worker, "cli-ctrl-c")
    assert record["state"] == "cancelled" and record["cancel_reason"] == "client_request"
    assert record["error"]["code"] == "CANCELLED"
    assert before["tokens_out"] <= record["tokens_out"] < LONG
    assert "Traceback" not in terminal.screen()


def test_a_job_cancelled_elsewhere_is_one_error_line(worker: str) -> None:
    """``orcd cancel`` from another terminal: the running ``orcd run`` says so and exits 1."""
    proc = subprocess.Popen([sys.executable, "-m", "orcd", "run", "go on", "--url", worker,
                             "--max-tokens", str(LONG), "--job-id", "cli-elsewhere"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=orcd_env())
    try:
        wait_job(worker, "cli-elsewhere", streaming)
        result = client("cancel", "cli-elsewhere", "--url", worker)
        assert result.returncode == 0, result
        assert "cancelling cli-elsewhere (it was running)" in result.stdout, \
            (result.stdout, job(worker, "cli-elsewhere"))
        _, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == 1
    assert err.splitlines() == [
        "orcd: error: CANCELLED: Job cancelled by client request (client_request)"]


# ----------------------------------------------------------------------------- jobs, cancel


def test_jobs_prints_a_table_and_filters_by_state(worker: str, terminal: Terminal) -> None:
    assert client("run", "x", "--url", worker, "--max-tokens", "7",
                  "--job-id", "cli-table-done").returncode == 0
    assert client("cancel", "cli-table-gone", "--url", worker).returncode == 0
    result = client("run", "x", "--url", worker, "--job-id", "cli-table-gone")
    assert result.returncode == 1 and "cancelled_before_start" in result.stderr

    terminal.orcd("jobs", "--url", worker)
    terminal.wait_for(r"\[exit 0\]")
    lines = terminal.screen().splitlines()
    assert any(re.fullmatch(r"JOB +STATE +TOKENS +PROGRESS +CREATED +DETAIL", ln)
               for ln in lines), lines
    assert any(re.fullmatch(r"cli-table-done +completed +7/7 +100% +\d\d:\d\d:\d\d +max_tokens",
                            ln) for ln in lines), lines
    assert any(re.fullmatch(r"cli-table-gone +cancelled +0/\d+ +0% +\d\d:\d\d:\d\d +"
                            r"cancelled_before_start", ln) for ln in lines), lines

    only = client("jobs", "--state", "cancelled", "--url", worker)
    assert only.returncode == 0
    rows = only.stdout.splitlines()[1:]
    assert rows and all(re.search(r" cancelled ", row) for row in rows), only.stdout
    assert any(row.startswith("cli-table-gone ") for row in rows)

    raw = client("jobs", "--json", "--url", worker)
    assert {"cli-table-done", "cli-table-gone"} <= {j["job_id"] for j in json.loads(raw.stdout)}


def test_cancel_stops_a_running_job(worker: str, terminal: Terminal) -> None:
    events: list[tuple[str, dict[str, Any]]] = []

    def read() -> None:
        body = {"job_id": "cli-victim", "prompt": "go", "max_tokens": LONG}
        with httpx.stream("POST", f"{worker}/execute", json=body, timeout=30) as resp:
            events.extend(sse(resp))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        wait_job(worker, "cli-victim", streaming)
        terminal.orcd("cancel", "cli-victim", "--url", worker)
        terminal.wait_for(r"cancelling cli-victim \(it was running\)\s+\[exit 0\]")
    finally:
        reader.join(WAIT_S)
    assert events[-1][0] == "error"
    assert events[-1][1]["code"] == "CANCELLED" and events[-1][1]["reason"] == "client_request"
    again = client("cancel", "cli-victim", "--url", worker)
    assert again.stdout == "cli-victim was already cancelled\n"


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("args", "needles"), [
    (["jobs", "--url", "http://127.0.0.1:9"], ["cannot reach orcd at http://127.0.0.1:9",
                                               "connection refused"]),
    (["run", "hi", "--url", "http://127.0.0.1:9"], ["connection refused"]),
    (["run", "hi", "--max-tokens", "999999"], ["INVALID_REQUEST", "max_tokens", "HTTP 400"]),
    (["run", "hi", "--temperature", "7"], ["INVALID_REQUEST", "temperature"]),
    (["cancel", "not a valid id"], ["INVALID_REQUEST", "job_id"]),
    (["run", "hi", "--max-tokens", "many"], ["--max-tokens", "invalid int value"]),
])
def test_errors_are_one_line_and_exit_1(worker: str, args: list[str],
                                        needles: list[str]) -> None:
    if "--url" not in args:
        args = [*args, "--url", worker]
    result = client(*args)
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("orcd: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_url_and_token_come_from_the_environment() -> None:
    """``$ORCD_URL`` names the worker; ``$ORCD_TOKEN`` goes out as a bearer token."""
    fake = ScriptedWorker()
    with fake.serving() as fake_uri:
        env = orcd_env(ORCD_URL=fake_uri, ORCD_TOKEN="s3cret")
        result = subprocess.run([sys.executable, "-m", "orcd", "jobs"], capture_output=True,
                                text=True, timeout=60, cwd=ROOT, env=env)
    assert result.returncode == 0 and result.stdout == "no jobs\n", result
    assert fake.seen[0]["authorization"] == "Bearer s3cret"


# ----------------------------------------------------------------------------- a scripted worker


class ScriptedWorker:
    """A minimal HTTP worker for what a real one cannot be held in.

    ``POST /execute`` and ``POST /v1/chat/completions`` stream ``word`` pieces every 20 ms
    until the job is cancelled (or, for a chat question without "forever", 5 pieces);
    ``POST /cancel`` ends that stream with the cancel error, unless ``hold_cancels``, when it
    never answers. Every request is recorded in ``seen``.
    """

    def __init__(self, *, hold_cancels: bool = False) -> None:
        self.hold_cancels = hold_cancels
        self.seen: list[dict[str, Any]] = []
        self.cancelled: set[str] = set()
        self.release = threading.Event()

    @contextmanager
    def serving(self) -> Iterator[str]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            self.release.set()
            server.shutdown()
            server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> dict[str, Any]:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                seen = {"path": self.path, "body": body,
                        "authorization": self.headers.get("Authorization"),
                        "job_id": self.headers.get("X-Job-Id")}
                fake.seen.append(seen)
                return seen

            def do_GET(self) -> None:
                self._record()
                if self.path.startswith("/jobs"):
                    self._json(200, {"jobs": []})
                elif self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": "scripted"}]})
                else:
                    self._json(404, {"error": {"code": "NOT_FOUND", "message": "no route"}})

            def do_POST(self) -> None:
                seen = self._record()
                if self.path == "/cancel":
                    if fake.hold_cancels:
                        fake.release.wait(60)
                        return
                    fake.cancelled.add(seen["body"]["job_id"])
                    self._json(202, {"status": "cancelling", "job_id": seen["body"]["job_id"],
                                     "state": "running"})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                if self.path == "/execute":
                    self._native(seen["body"]["job_id"])
                else:
                    question = seen["body"]["messages"][-1]["content"]
                    self._chat(seen["job_id"], forever="forever" in question)
                self.close_connection = True

            def _native(self, job_id: str) -> None:
                self.wfile.write(b'event: started\ndata: {"job_id": "%s", "model": "scripted",'
                                 b' "seed": 1, "prompt_tokens": 1}\n\n' % job_id.encode())
                for i in range(3000):
                    if job_id in fake.cancelled:
                        break
                    self.wfile.write(b'event: token\ndata: {"t": "word ", "i": %d}\n\n' % i)
                    self.wfile.flush()
                    time.sleep(0.02)
                self.wfile.write(b'event: error\ndata: {"code": "CANCELLED", "message": '
                                 b'"cancelled", "reason": "client_request"}\n\n')

            def _chat(self, job_id: str, *, forever: bool) -> None:
                for _ in range(3000 if forever else 5):
                    if job_id in fake.cancelled:
                        error = {"error": {"message": "Job cancelled by client request",
                                           "type": "cancelled", "code": "cancelled"}}
                        self.wfile.write(b"data: " + json.dumps(error).encode() + b"\n\n")
                        break
                    chunk = {"choices": [{"index": 0, "delta": {"content": "word "}}]}
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
                    time.sleep(0.02)
                self.wfile.write(b"data: [DONE]\n\n")

        return Handler


def test_a_second_ctrl_c_quits_at_once(terminal: Terminal) -> None:
    """The first Ctrl-C sends the cancel; if it hangs, a second one quits with 130."""
    fake = ScriptedWorker(hold_cancels=True)
    with fake.serving() as uri:
        terminal.orcd("run", "go", "--url", uri, "--job-id", "cli-twice")
        terminal.wait_for(r"(word ){10}")
        terminal.press("C-c")
        deadline = time.monotonic() + WAIT_S
        while not any(s["path"] == "/cancel" for s in fake.seen):
            assert time.monotonic() < deadline, "the first Ctrl-C sent no cancel"
            time.sleep(0.02)
        terminal.press("C-c")
        terminal.wait_for(r"orcd: interrupted\s+\[exit 130\]")
    cancels = [s for s in fake.seen if s["path"] == "/cancel"]
    assert [c["body"] for c in cancels] == [{"job_id": "cli-twice"}]


# ----------------------------------------------------------------------------- orcd chat


def test_chat_keeps_the_history_and_ctrl_c_cancels_one_answer(terminal: Terminal) -> None:
    fake = ScriptedWorker()
    with fake.serving() as uri:
        terminal.orcd("chat", "--url", uri, "--system", "be brief", "--max-tokens", "50")
        terminal.wait_for(r"orcd chat · scripted at ")
        terminal.type("first question")
        terminal.wait_for(r"you> ", count=2)
        terminal.type("tell me forever")
        terminal.wait_for(r"(word ){10}")
        terminal.press("C-c")
        terminal.wait_for(r"answer cancelled in \d+(\.\d)? m?s \(not kept in the conversation\)")
        terminal.type("second question")
        terminal.wait_for(r"you> ", count=4)
        terminal.type("/exit")
        terminal.wait_for(r"\[exit 0\]")
    chats = [s for s in fake.seen if s["path"] == "/v1/chat/completions"]
    assert [c["body"]["messages"][-1]["content"] for c in chats] == [
        "first question", "tell me forever", "second question"]
    assert chats[2]["body"]["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "word " * 5},
        {"role": "user", "content": "second question"},
    ]
    assert all(c["body"]["stream"] is True and c["body"]["model"] == "scripted"
               and c["body"]["max_tokens"] == 50 for c in chats)
    job_ids = [c["job_id"] for c in chats]
    assert len(set(job_ids)) == 3 and all(j and j.startswith("chat-") for j in job_ids)
    cancels = [s["body"] for s in fake.seen if s["path"] == "/cancel"]
    assert cancels == [{"job_id": job_ids[1]}]


def test_chat_quits_on_ctrl_d_and_ctrl_c_at_the_prompt_clears_the_line(
        terminal: Terminal) -> None:
    fake = ScriptedWorker()
    with fake.serving() as uri:
        terminal.orcd("chat", "--url", uri)
        terminal.wait_for(r"you> ")
        terminal.tmux("send-keys", "-t", "main", "-l", "half a line")
        terminal.press("C-c")
        terminal.wait_for(r"you> ", count=2)
        terminal.press("C-d")
        terminal.wait_for(r"\[exit 0\]")
    assert not [s for s in fake.seen if s["path"] == "/v1/chat/completions"]


def test_chat_against_the_real_worker(worker: str, terminal: Terminal) -> None:
    """The real /v1 route: an answer streams, Ctrl-C cancels the next one, the chat goes on."""
    terminal.orcd("chat", "--url", worker, "--max-tokens", "20")
    terminal.wait_for(r"orcd chat · \S+ at ")
    terminal.type("hello")
    terminal.wait_for(r"you> ", count=2)
    terminal.type("/exit")
    terminal.wait_for(r"\[exit 0\]")
    terminal.orcd("chat", "--url", worker, "--max-tokens", str(LONG // 2))
    terminal.wait_for(r"you> ", count=3)
    terminal.type("tell me everything")
    deadline = time.monotonic() + WAIT_S
    while True:
        running = httpx.get(f"{worker}/jobs", params={"state": "running"}, timeout=5).json()
        mine = [j for j in running["jobs"] if j["job_id"].startswith("chat-")]
        if mine and mine[0]["tokens_out"] > 20:
            break
        assert time.monotonic() < deadline, running
        time.sleep(0.02)
    terminal.press("C-c")
    terminal.wait_for(r"answer cancelled in \d+(\.\d)? m?s")
    record = job(worker, mine[0]["job_id"])
    assert record["state"] == "cancelled" and record["cancel_reason"] == "client_request"
    terminal.type("/exit")
    terminal.wait_for(r"\[exit 0\]", count=2)
