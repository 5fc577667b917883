"""The orcd process under test: start, watch and stop a real ``orcd serve`` on loopback, and
read its state from outside (health, metrics, RSS, error log lines)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from chaos_checks import Report


class Server:
    def __init__(self, model: Path, flags: list[str], workdir: Path) -> None:
        self.model, self.flags, self.workdir = model, flags, workdir
        self.log_path = workdir / "orcd.log"
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> str:
        """Start orcd and return the 'orcd listening on' URL (blocking)."""
        cmd = [sys.executable, "-m", "orcd", "serve", "--model", str(self.model), "--port", "0",
               "--ledger", str(self.workdir / "ledger.sqlite3"), *self.flags]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCD_")}
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"orcd listening on (http://\S+)", line)
        if match is None:
            raise RuntimeError(f"orcd did not start: {line!r}; see {self.log_path}")
        self.url = match.group(1)
        return self.url

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait for the drain; the exit code, or None if it had to be killed."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def error_log_lines(self) -> list[str]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                out.append(f"non-JSON log line: {line[:160]}")
                continue
            if rec.get("level") in ("error", "critical"):
                out.append(f"{rec.get('action')}: {str(rec.get('human'))[:200]}")
        return out


    def wait_exit(self, bound: float) -> tuple[int | None, float]:
        """Wait up to ``bound`` s for the process to exit: (exit code or None, seconds)."""
        assert self.proc is not None
        t0 = time.monotonic()
        try:
            code: int | None = self.proc.wait(bound)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - t0


def is_idle(health: dict[str, Any]) -> bool:
    """No job runs or waits, no slot holds one, and every KV cell in use belongs to the
    prefix cache."""
    return ((health.get("active_jobs"), health.get("queued_jobs")) == (0, 0)
            and not health.get("running")
            and health.get("kv_tokens_used") == health.get("prefix_cache_tokens"))


async def wait_idle(client: httpx.AsyncClient, bound: float) -> dict[str, Any]:
    """/health once the worker is idle (or after ``bound`` s, whatever it says then)."""
    deadline = trio.current_time() + bound
    while True:
        health = (await client.get("/health")).json()
        if is_idle(health) or trio.current_time() > deadline:
            return health
        await trio.sleep(0.05)


async def check_idle(client: httpx.AsyncClient, report: Report, where: str,
                     bound: float) -> dict[str, Any]:
    """No job left behind, no slot or KV cell leaked: idle, with every KV cell in use held
    by the prefix cache (CONTRACT §4, §8)."""
    health = await wait_idle(client, bound)
    if (health.get("active_jobs"), health.get("queued_jobs")) != (0, 0):
        report.bad(where, f"not idle: active {health.get('active_jobs')}, queued "
                          f"{health.get('queued_jobs')}, running {health.get('running')}")
    if health.get("running"):
        report.bad(where, f"idle, yet slots still hold jobs: {health.get('running')}")
    used, cached = health.get("kv_tokens_used"), health.get("prefix_cache_tokens")
    if used is None or cached is None:
        report.bad(where, "/health lacks kv_tokens_used / prefix_cache_tokens")
    elif used != cached:
        report.bad(where, f"KV leak: {used} KV cells in use when idle, the prefix cache "
                          f"holds {cached}")
    return health


def metric_values(text: str, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in re.finditer(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out
