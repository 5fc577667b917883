"""``orcd fleet status``: every worker's ``/health`` and ``/jobs`` in one table.

Each worker named in the fleet's haproxy.cfg is asked directly (not through the proxy, which
would hash or balance the request away from it), all at once, each with a short timeout:
a worker that does not answer is a row that says so, never a hang. Where the config opens
an admin socket, HAProxy's own view of each worker (UP, DOWN, ...) is shown beside it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs

from .haproxy import WorkerAddr, server_states, stats_socket_in, workers_in

COLUMNS = ("WORKER", "ADDRESS", "PROXY", "HEALTH", "STATE", "ACTIVE", "QUEUED", "JOBS",
           "RUNNING")


@attrs.frozen
class WorkerStatus:
    """One worker as seen by ``orcd fleet status``; ``error`` is set when it did not answer."""

    addr: WorkerAddr
    proxy_state: str | None
    http_status: int | None
    health: dict[str, Any]
    jobs: list[dict[str, Any]]
    error: str | None = None

    def row(self) -> tuple[str, ...]:
        h = self.health
        if self.error is not None:
            health = self.error
        else:
            health = f"{self.http_status} {h.get('status', '?')}"
        counts = Counter(str(j.get("state")) for j in self.jobs)
        jobs = " ".join(f"{state}={n}" for state, n in sorted(counts.items())) or "-"
        running = [str(j["job_id"]) for j in self.jobs if j.get("state") == "running"]
        return (self.addr.name, f"{self.addr.host}:{self.addr.port}",
                self.proxy_state or "-", health, str(h.get("state", "-")),
                str(h.get("active_jobs", "-")), str(h.get("queued_jobs", "-")), jobs,
                ",".join(running) or "-")


def _get(uri: str, timeout: float) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(uri, timeout=timeout) as resp:  # noqa: S310 - http only
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 503 while loading or draining: still a body
        with exc:
            return exc.code, json.loads(exc.read() or b"{}")


def ask_worker(addr: WorkerAddr, proxy_state: str | None, timeout: float = 2.0
               ) -> WorkerStatus:
    """``/health`` and ``/jobs`` of one worker, or the reason it gave neither."""
    try:
        status, health = _get(f"{addr.uri}/health", timeout)
        jobs_status, jobs = _get(f"{addr.uri}/jobs", timeout)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return WorkerStatus(addr, proxy_state, None, {}, [], f"unreachable ({reason})")
    job_list = jobs.get("jobs", []) if jobs_status == 200 and isinstance(jobs, dict) else []
    return WorkerStatus(addr, proxy_state, status, health if isinstance(health, dict) else {},
                        job_list)


def collect(workers: Sequence[WorkerAddr], stats_socket: Path | None = None,
            timeout: float = 2.0) -> list[WorkerStatus]:
    """Ask every worker at once; the rows come back in the config's order."""
    states: dict[str, str] = {}
    if stats_socket is not None:
        try:
            states = server_states(stats_socket, timeout=timeout)
        except (OSError, ValueError, StopIteration):
            states = {}
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(workers)))) as pool:
        return list(pool.map(lambda w: ask_worker(w, states.get(w.name), timeout), workers))


def render_table(rows: Sequence[WorkerStatus]) -> str:
    """A plain text table, one line per worker and a summary line."""
    cells = [COLUMNS, *(r.row() for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(COLUMNS))).rstrip()
             for c in cells]
    healthy = sum(1 for r in rows if r.http_status == 200)
    active = sum(int(r.health.get("active_jobs", 0) or 0) for r in rows)
    queued = sum(int(r.health.get("queued_jobs", 0) or 0) for r in rows)
    lines.append(f"{healthy}/{len(rows)} workers healthy, {active} jobs running, "
                 f"{queued} queued")
    return "\n".join(lines)


def fleet_status(config: Path, timeout: float = 2.0) -> list[WorkerStatus]:
    """The status of every worker that the haproxy.cfg at ``config`` routes to."""
    text = config.read_text()
    return collect(workers_in(text), stats_socket_in(text), timeout)
