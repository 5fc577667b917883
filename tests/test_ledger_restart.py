"""kill -9 a real ``orcd serve`` with a running and queued jobs, restart it on the same ledger:
every id it knew still answers, active jobs are failed/WORKER_RESTART, a requested cancel is
enforced with its original ``cancelled_by`` (CONTRACT §10)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from orcd._tinymodel import build_tiny_gguf

from .harness import bearer, make_auth_file
from .test_process import orcd_serve, sse

LONG_CTX = 16384  # a job this long takes many seconds: still running when the kill comes


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gguf(tmp_path_factory.mktemp("long") / "tiny-16k.gguf", n_ctx=LONG_CTX)


def ledger_states(path: Path) -> dict[str, str]:
    """What the ledger file holds now (a read-only look, beside the live writer)."""
    if not path.exists():
        return {}
    with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as conn:
        return dict(conn.execute("SELECT job_id, state FROM jobs").fetchall())


def wait_for(predicate: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def open_stream(stack: ExitStack, client: httpx.Client, job_id: str, until: str
                ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Start ``job_id`` and read its stream up to the event ``until``. The stream stays open
    while the caller holds the returned reader (dropping it closes the connection)."""
    body = {"job_id": job_id, "prompt": "go on", "max_tokens": LONG_CTX - 100, "seed": 1}
    resp = stack.enter_context(client.stream("POST", "/execute", json=body))
    assert resp.status_code == 200, resp.read()
    events = sse(resp)
    for name, _data in events:
        if name == until:
            return events
    raise AssertionError(f"{job_id}: the stream ended before {until!r}")


def test_kill_9_then_restart_on_the_same_ledger(long_model: Path, tmp_path: Path) -> None:
    tokens = make_auth_file(tmp_path / "auth", alice="user", ops="admin")
    ledger = tmp_path / "ledger.sqlite3"
    flags = ("--model", str(long_model), "--n-ctx", str(LONG_CTX), "--max-tokens-out",
             str(LONG_CTX), "--slots", "1", "--auth-file", str(tmp_path / "auth"),
             "--ledger", str(ledger))
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()

    with orcd_serve(tmp_path / "first", *flags) as first:
        alice = httpx.Client(base_url=first.uri, headers=bearer(tokens["alice"]), timeout=30)
        with alice, ExitStack() as streams:
            done = alice.post("/execute", json={"job_id": "done-1", "prompt": "a",
                                                "max_tokens": 3})
            assert done.status_code == 200 and "event: end" in done.text
            alice.post("/cancel", json={"job_id": "canc-1"})
            assert "cancelled_before_start" in alice.post(
                "/execute", json={"job_id": "canc-1", "prompt": "a"}).text
            held = [open_stream(streams, alice, "run-1", until="started"),
                    open_stream(streams, alice, "queue-1", until="queued"),
                    open_stream(streams, alice, "queue-2", until="queued")]
            wait_for(lambda: ledger_states(ledger) == {
                "done-1": "completed", "canc-1": "cancelled", "run-1": "running",
                "queue-1": "queued", "queue-2": "queued"}, "the ledger to hold every job")
            first.proc.kill()  # SIGKILL: no drain, no last records
            first.proc.wait(timeout=10)
            del held

    # What a kill between a cancel's request and its end leaves behind (the window is
    # milliseconds on a live worker): an admin asked, the job never stopped.
    with sqlite3.connect(ledger) as conn:
        conn.execute("UPDATE jobs SET cancel_requested_at = '2030-01-01T00:00:00.000Z', "
                     "cancel_reason = 'client_request', cancelled_by = 'ops' "
                     "WHERE principal = 'alice' AND job_id = 'queue-2'")

    with orcd_serve(tmp_path / "second", *flags) as second:
        alice = httpx.Client(base_url=second.uri, headers=bearer(tokens["alice"]), timeout=30)
        ops = httpx.Client(base_url=second.uri, headers=bearer(tokens["ops"]), timeout=30)
        with alice, ops:
            records = {job_id: alice.get(f"/jobs/{job_id}").json()
                       for job_id in ("done-1", "canc-1", "run-1", "queue-1", "queue-2")}
            summary = {job_id: (r["state"], (r["error"] or {}).get("code"), r["cancelled_by"])
                       for job_id, r in records.items()}
            assert summary == {
                "done-1": ("completed", None, None),
                "canc-1": ("cancelled", "CANCELLED", "alice"),
                "run-1": ("failed", "WORKER_RESTART", None),
                "queue-1": ("failed", "WORKER_RESTART", None),
                "queue-2": ("cancelled", "CANCELLED", "ops"),
            }
            assert all(r["principal"] == "alice" for r in records.values())
            assert records["run-1"]["started_at"] and records["run-1"]["finished_at"]
            assert records["queue-1"]["started_at"] is None
            assert records["queue-2"]["cancel_requested_at"] == "2030-01-01T00:00:00.000Z"
            assert records["queue-2"]["cancelled_at"] is not None
            assert set(records["done-1"]) == set(records["run-1"])  # no ledger bookkeeping
            listed = alice.get("/jobs").json()["jobs"]
            assert sorted(j["job_id"] for j in listed) == sorted(records)
            assert len(ops.get("/jobs", params={"principal": "alice"}).json()["jobs"]) == 5
            assert ops.get("/jobs/run-1").status_code == 404  # ops's own namespace
            # Remembered ids stay taken, and a cancel finds the recorded state.
            again = alice.post("/execute", json={"job_id": "run-1", "prompt": "a"})
            assert again.status_code == 409 and again.json()["error"]["code"] == "JOB_EXISTS"
            cancel = alice.post("/cancel", json={"job_id": "run-1"})
            assert cancel.status_code == 202 and cancel.json()["state"] == "failed"
            health = alice.get("/health").json()
            assert health["ledger"]["ok"] is True and health["ledger"]["path"] == str(ledger)
        opened = [line for line in second.log_lines() if line["action"] == "ledger_open"]
        assert opened and opened[0]["recovered"] == 3


def test_a_ledger_in_use_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    """Two workers on one ledger file: the second exits 1 with one line naming it."""
    from .test_process import orcd_env, run_cli

    ledger = tmp_path / "ledger.sqlite3"
    (tmp_path / "first").mkdir()
    with orcd_serve(tmp_path / "first", "--model", str(tiny_model), "--ledger", str(ledger)):
        result = run_cli("serve", "--port", "0", "--model", str(tiny_model), "--ledger",
                         str(ledger), env=orcd_env())
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("orcd: error: ledger ") and "in use by another orcd" in last


async def test_a_full_disk_is_reported_and_jobs_go_on(tiny_model: Path, tmp_path: Path) -> None:
    """A ledger that cannot write (its file capped at its current size: SQLite's 'database
    or disk is full') is logged and shown in /health; jobs run and answer from memory."""
    import trio

    from orcd.ledger import Ledger

    from .harness import running_worker

    async with running_worker(tiny_model) as h:
        path = tmp_path / "full.sqlite3"
        Ledger.open(path, retention_s=3600).close()  # the schema, then no room beyond it
        with sqlite3.connect(path) as conn:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
        ledger = await trio.to_thread.run_sync(lambda: Ledger.open(
            path, retention_s=3600, writer_pragmas={"max_page_count": pages}))
        h.worker.registry.ledger = ledger
        try:
            for i in range(40):  # more rows than the free space of the table's pages
                events = await h.execute(job_id=f"full-{i}", prompt="hi", max_tokens=1)
                assert events[-1].name == "end"
            await trio.to_thread.run_sync(ledger.flush, 1.0)
            health = (await h.client.get("/health")).json()
            assert health["status"] == "ok"
            assert health["ledger"]["ok"] is False and "full" in health["ledger"]["error"]
            assert health["ledger"]["pending"] >= 1
            assert (await h.job("full-39"))["state"] == "completed"
            assert (await h.execute(job_id="more", prompt="hi", max_tokens=2))[-1].name == "end"
        finally:
            h.worker.registry.ledger = None
            await trio.to_thread.run_sync(ledger.close, 1.0)
