"""The SQLite job ledger: round trips, batching, kill -9 recovery, failing disks, no text."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from orcd.errors import ConfigError
from orcd.ledger import COLUMNS, Ledger, default_path

from .conftest import LogCapture

ROOT = Path(__file__).resolve().parent.parent
HOUR = 3600.0


def snap(job_id: str, state: str = "queued", principal: str = "alice",
         **fields: Any) -> dict[str, Any]:
    """A record as the registry makes it: the job's snapshot plus principal."""
    return {"job_id": job_id, "state": state, "principal": principal,
            "correlation_id": f"corr-{job_id}", "created_at": "2020-05-01T10:00:00.000Z",
            "tokens_out": 0, "max_tokens": 16, "progress": 0.0, **fields}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ledger.sqlite3"


@pytest.fixture
def ledger(path: Path) -> Iterator[Ledger]:
    with Ledger.open(path, retention_s=HOUR) as opened:
        yield opened


@contextmanager
def writes_blocked(path: Path) -> Iterator[None]:
    """Hold SQLite's write lock from another connection: the ledger's writer waits on it."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def rows_in_file(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT principal, job_id, state FROM jobs ORDER BY job_id").fetchall()


def test_record_get_round_trip(ledger: Ledger) -> None:
    done = snap("job-1", "completed", started_at="2020-05-01T10:00:01.000Z",
                finished_at="2020-05-01T10:00:02.000Z", tokens_out=16, progress=1.0,
                stop_reason="max_tokens")
    failed = snap("job-2", "failed", principal="bob", tokens_out=3,
                  error={"code": "VRAM_OOM", "message": "out of memory ✗"})
    before = time.time()
    ledger.record(done)
    ledger.record(failed)
    assert ledger.flush()

    got = ledger.get("alice", "job-1")
    assert got is not None
    assert {k: got[k] for k in done} == done
    assert got["cancelled_by"] is None and got["worker_pid"] == os.getpid()
    assert before <= got["updated_at"] <= time.time()
    assert set(got) == set(COLUMNS)
    bob = ledger.get("bob", "job-2")
    assert bob is not None and bob["error"] == {"code": "VRAM_OOM", "message": "out of memory ✗"}
    # Job ids are per principal: another principal's id is simply not there.
    assert ledger.get("bob", "job-1") is None and ledger.get("alice", "nope") is None
    assert ledger.health().ok and ledger.health().written == 2


def test_every_state_change_upserts_one_row(ledger: Ledger, path: Path) -> None:
    ledger.record(snap("j", "queued"))
    ledger.record(snap("j", "running", started_at="2020-05-01T10:00:01.000Z"))
    assert ledger.flush()
    ledger.record(snap("j", "running", cancel_requested_at="2020-05-01T10:00:02.000Z",
                       cancel_reason="client_request", cancelled_by="ops"))
    ledger.record(snap("j", "cancelled", cancel_requested_at="2020-05-01T10:00:02.000Z",
                       cancelled_at="2020-05-01T10:00:02.004Z", cancel_reason="client_request",
                       cancelled_by="ops", error={"code": "CANCELLED", "message": "m"}))
    ledger.record(snap("j", "queued", principal="bob"))  # bob's own "j"
    assert ledger.flush()
    assert rows_in_file(path) == [("alice", "j", "cancelled"), ("bob", "j", "queued")]
    got = ledger.get("alice", "j")
    assert got is not None
    assert (got["cancelled_by"], got["cancelled_at"]) == ("ops", "2020-05-01T10:00:02.004Z")
    assert got["started_at"] is None  # each record is the whole snapshot, not a patch


def test_list_filters_orders_and_limits(ledger: Ledger, path: Path) -> None:
    ledger.record(snap("old", "completed", created_at="2020-05-01T09:00:00.000Z"))
    ledger.record(snap("a1", "completed", created_at="2020-05-01T10:00:01.000Z"))
    ledger.record(snap("a2", "running", created_at="2020-05-01T10:00:00.000Z"))
    ledger.record(snap("a3", "failed", created_at="2020-05-01T10:00:03.000Z"))
    ledger.record(snap("b1", "queued", principal="bob", created_at="2020-05-01T10:00:02.000Z"))
    assert ledger.flush()
    with sqlite3.connect(path) as conn:  # age one record by two hours
        conn.execute("UPDATE jobs SET updated_at = updated_at - 7200 WHERE job_id = 'old'")

    def ids(**kw: Any) -> list[str]:
        return [r["job_id"] for r in ledger.list(**kw)]

    assert ids() == ["b1", "a2", "a3", "a1", "old"]  # active first, then newest first
    assert ids(principal="alice") == ["a2", "a3", "a1", "old"]
    assert ids(principal="alice", state="completed") == ["a1", "old"]
    assert ids(since_s=HOUR) == ["b1", "a2", "a3", "a1"]
    assert ids(principal="bob", state="completed") == []
    assert ids(limit=2) == ["b1", "a2"]


async def test_reads_from_the_event_loop_go_through_a_thread(ledger: Ledger) -> None:
    for i in range(5):
        ledger.record(snap(f"job-{i}", "completed"))  # non-blocking, straight from a task
    assert await trio.to_thread.run_sync(ledger.flush)
    got = await trio.to_thread.run_sync(ledger.get, "alice", "job-3")
    assert got is not None and got["state"] == "completed"
    listed = await trio.to_thread.run_sync(lambda: ledger.list("alice", limit=10))
    assert len(listed) == 5


def test_a_burst_of_concurrent_reads_keeps_only_a_few_connections(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kept read connection holds its page cache: after 8 reads at once, only
    IDLE_READERS stay open (the pool used to keep all 8, and RSS crept up in chaos runs)."""
    import threading

    import orcd.ledger

    ledger.record(snap("job-1", "completed"))
    assert ledger.flush()
    together = threading.Barrier(8, timeout=10)
    decode = orcd.ledger._decode

    def decode_together(row: Any) -> dict[str, Any]:
        together.wait()  # every reader holds its own connection here
        return decode(row)

    monkeypatch.setattr(orcd.ledger, "_decode", decode_together)
    got: list[dict[str, Any] | None] = []
    readers = [threading.Thread(target=lambda: got.append(ledger.get("alice", "job-1")))
               for _ in range(8)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(10)
    assert [r and r["state"] for r in got] == ["completed"] * 8
    assert len(ledger._readers) == orcd.ledger.IDLE_READERS
    monkeypatch.setattr(orcd.ledger, "_decode", decode)
    assert ledger.get("alice", "job-1") is not None  # a kept connection still reads


def test_writer_commits_in_batches(ledger: Ledger, path: Path) -> None:
    """1000 records of distinct jobs while the writer waits: a couple of commits, not 1000."""
    with writes_blocked(path):
        for i in range(1000):
            ledger.record(snap(f"job-{i:04d}", "completed"))
    assert ledger.flush(timeout=10)
    health = ledger.health()
    assert health.written == 1000 and len(rows_in_file(path)) == 1000
    # The writer took a first batch before it met the lock (or its wait timed out and the
    # write is retried with everything that came since); then one commit takes the rest.
    assert 1 <= health.commits <= 2


def test_records_within_the_batch_window_share_one_commit(path: Path) -> None:
    with Ledger.open(path, retention_s=HOUR, batch_window_s=60.0) as ledger:
        for i in range(300):
            ledger.record(snap(f"job-{i}", "completed"))
        assert ledger.health().commits == 0  # the writer waits out its window
        assert ledger.flush()  # ...unless asked to write now
        health = ledger.health()
        assert (health.commits, health.written) == (1, 300)


def test_state_changes_of_one_job_in_a_batch_are_one_write(ledger: Ledger, path: Path) -> None:
    with writes_blocked(path):
        for i in range(10):
            for state in ("queued", "running", "running", "completed"):
                ledger.record(snap(f"job-{i}", state))
    assert ledger.flush(timeout=10)
    assert rows_in_file(path) == [("alice", f"job-{i}", "completed") for i in range(10)]
    assert ledger.health().written <= 20  # 40 records, at most one write per job per batch


def test_close_writes_what_is_queued(path: Path) -> None:
    ledger = Ledger.open(path, retention_s=HOUR, batch_window_s=60.0)
    for i in range(50):
        ledger.record(snap(f"job-{i}", "completed"))
    ledger.close()
    assert len(rows_in_file(path)) == 50
    with Ledger.open(path, retention_s=HOUR) as again:
        assert again.recovery.fixed == 0
        assert len(again.list(limit=100)) == 50


_KILLED_WORKER = """
import os, sys
from orcd.ledger import Ledger
def snap(job_id, state, **f):
    return {"job_id": job_id, "state": state, "principal": "alice",
            "created_at": "2020-05-01T10:00:00.000Z", "max_tokens": 16, **f}
ledger = Ledger.open(sys.argv[1], retention_s=3600)
ledger.record(snap("queued", "queued"))
ledger.record(snap("running", "running", started_at="2020-05-01T10:00:01.000Z", tokens_out=5))
ledger.record(snap("cancel-asked", "running", cancel_requested_at="2020-05-01T10:00:02.000Z",
                   cancel_reason="client_request", cancelled_by="ops"))
ledger.record(snap("queued-shutdown", "queued", cancel_requested_at="2020-05-01T10:00:02.000Z",
                   cancel_reason="shutdown", cancelled_by="system"))
ledger.record(snap("deadline", "running", cancel_requested_at="2020-05-01T10:00:03.000Z",
                   cancel_reason="deadline", cancelled_by="system"))
ledger.record(snap("done", "completed", finished_at="2020-05-01T10:00:04.000Z",
                   stop_reason="eos", tokens_out=7))
assert ledger.flush()
print("recorded", flush=True)
os.kill(os.getpid(), 9)
"""


def test_recovery_after_kill_9(path: Path, log_capture: LogCapture) -> None:
    killed = subprocess.run([sys.executable, "-c", _KILLED_WORKER, str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert killed.stdout == "recorded\n"

    with Ledger.open(path, retention_s=HOUR) as ledger:  # the dead process's lock is gone
        assert (ledger.recovery.cancelled, ledger.recovery.failed) == (3, 2)
        records = {r["job_id"]: r for r in ledger.list(limit=10)}
    assert log_capture.actions("ledger_open")[0]["recovered"] == 5
    assert {r["state"] for r in records.values()} == {"failed", "cancelled", "completed"}

    for job_id in ("queued", "running"):
        record = records[job_id]
        assert record["state"] == "failed" and record["finished_at"] is not None
        assert record["error"]["code"] == "WORKER_RESTART"
        assert record["cancelled_at"] is None and record["cancelled_by"] is None
    assert records["running"]["tokens_out"] == 5

    for job_id, by, reason in (("cancel-asked", "ops", "client_request"),
                               ("queued-shutdown", "system", "shutdown")):
        record = records[job_id]
        assert record["state"] == "cancelled" and record["error"]["code"] == "CANCELLED"
        assert (record["cancelled_by"], record["cancel_reason"]) == (by, reason)
        assert record["cancelled_at"] is not None
        assert record["cancelled_at"] == record["finished_at"] > record["cancel_requested_at"]

    deadline = records["deadline"]
    assert deadline["state"] == "failed" and deadline["error"]["code"] == "INFERENCE_TIMEOUT"
    assert deadline["cancelled_by"] == "system"

    done = records["done"]
    assert (done["state"], done["stop_reason"], done["error"]) == ("completed", "eos", None)
    assert done["finished_at"] == "2020-05-01T10:00:04.000Z"


def test_open_deletes_records_older_than_the_retention(path: Path) -> None:
    with Ledger.open(path, retention_s=HOUR) as ledger:
        ledger.record(snap("old", "completed"))
        ledger.record(snap("new", "completed"))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE jobs SET updated_at = updated_at - 7200 WHERE job_id = 'old'")
    with Ledger.open(path, retention_s=HOUR) as ledger:
        assert ledger.recovery.deleted == 1
        assert [r["job_id"] for r in ledger.list()] == ["new"]


def test_a_running_ledger_prunes_finished_records_past_the_retention(path: Path) -> None:
    with Ledger.open(path, retention_s=HOUR, prune_every_s=0.0) as ledger:
        ledger.record(snap("old-done", "completed"))
        ledger.record(snap("old-running", "running"))
        assert ledger.flush()
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE jobs SET updated_at = updated_at - 7200")
        ledger.record(snap("new", "queued"))
        assert ledger.flush()
        assert rows_in_file(path) == [("alice", "new", "queued"),
                                      ("alice", "old-running", "running")]


def test_one_process_per_ledger(path: Path, ledger: Ledger) -> None:
    with pytest.raises(ConfigError, match=f"in use by another orcd process \\(pid {os.getpid()}"):
        Ledger.open(path, retention_s=HOUR)
    ledger.record(snap("still-works", "completed"))
    assert ledger.flush()


@pytest.mark.parametrize(("content", "problem"), [
    (b"this is not a database, just some text that is long enough" * 100,
     "(file is not a database)"),
    (b"SQLite format 3\x00" + b"\xff" * 4000, "(file is not a database)"),
    ("CREATE TABLE jobs (id INTEGER PRIMARY KEY, name TEXT)",
     "(a jobs table that is not orcd's: id, name)"),
])
def test_a_corrupt_or_foreign_file_fails_open_with_one_line(path: Path, content: bytes | str,
                                                            problem: str) -> None:
    path.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        with sqlite3.connect(path) as conn:
            conn.execute(content)
    with pytest.raises(ConfigError) as info:
        Ledger.open(path, retention_s=HOUR)
    assert info.value.message == (f"ledger {path}: cannot use it {problem}; move it away or "
                                  "pass --ledger none")
    assert Ledger.open(path.with_name("fresh.sqlite3"), retention_s=HOUR) is not None


def test_a_newer_schema_is_refused(path: Path) -> None:
    Ledger.open(path, retention_s=HOUR).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(ConfigError, match="written by a newer orcd"):
        Ledger.open(path, retention_s=HOUR)


def test_disk_full_keeps_going_and_reports_once(path: Path, log_capture: LogCapture) -> None:
    """SQLite's own `max_page_count` on the write connection: the real SQLITE_FULL path."""
    with Ledger.open(path, retention_s=HOUR) as ledger:
        ledger.record(snap("before", "completed"))
    with sqlite3.connect(path) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    ledger = Ledger.open(path, retention_s=HOUR, writer_pragmas={"max_page_count": pages + 1})
    try:
        for i in range(300):
            ledger.record(snap(f"job-{i}", "completed", error={"code": "INTERNAL",
                                                                "message": "x" * 100}))
        assert not ledger.flush()
        ledger.record(snap("after", "completed"))  # still accepted, never raises
        assert not ledger.flush()  # retried, still full
        health = ledger.health()
        assert not health.ok and health.degraded
        assert health.error == "write failed: database or disk is full"
        assert health.pending == 301 and health.dropped == 0
        assert ledger.get("alice", "before") is not None  # reads keep working
        assert [line["human"] for line in log_capture.actions("ledger_error")] == [
            f"Ledger {path} write failed: database or disk is full; jobs keep running, "
            "records are kept in memory and retried"]
    finally:
        ledger.close()
    assert "301 records unwritten" in log_capture.actions("ledger_error")[-1]["human"]


def test_read_only_database_keeps_going_and_reports(path: Path) -> None:
    """`PRAGMA query_only` makes the write connection read-only (root ignores chmod)."""
    with Ledger.open(path, retention_s=HOUR, writer_pragmas={"query_only": 1}) as ledger:
        ledger.record(snap("j", "queued"))
        assert not ledger.flush()
        assert ledger.health().error == "write failed: attempt to write a readonly database"
        ledger.record(snap("j", "completed"))
        assert not ledger.flush()
        health = ledger.health()
        assert not health.ok and health.pending == 1  # both records of "j": one row to write
        assert ledger.list() == []


_FAILING_DISK = """
import io, json, os, resource, signal, sys
from orcd import logs
from orcd.ledger import Ledger
out = io.StringIO()
logs.configure("t", "json", "debug", stream=out)
path = sys.argv[1]
ledger = Ledger.open(path, retention_s=3600)
def snap(i):
    return {"job_id": f"job-{i}", "state": "completed", "principal": "alice",
            "error": {"code": "INTERNAL", "message": "x" * 200}}
ledger.record(snap(0))
assert ledger.flush()
# From here on no file of this process may grow: the next WAL frame fails with EFBIG.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
size = max(os.path.getsize(path), os.path.getsize(path + "-wal"))
resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
for i in range(1, 201):
    ledger.record(snap(i))
failed = ledger.flush()
during = ledger.health().as_dict()
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
recovered = ledger.flush()
after = ledger.health().as_dict()
rows = len(ledger.list(limit=1000))
ledger.close()
logs.flush()
actions = [json.loads(line)["action"] for line in out.getvalue().splitlines()]
print(json.dumps({"failed": failed, "during": during, "recovered": recovered,
                  "after": after, "rows": rows, "actions": actions}))
"""


def test_a_transient_write_failure_is_retried(path: Path) -> None:
    """A real OS write error (RLIMIT_FSIZE: EFBIG) in a child process, then room again."""
    path.parent.mkdir(parents=True)
    done = subprocess.run([sys.executable, "-c", _FAILING_DISK, str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["failed"] is False
    assert result["during"]["ok"] is False and result["during"]["degraded"] is True
    assert "disk I/O error" in result["during"]["error"] and result["during"]["pending"] == 200
    assert result["recovered"] is True
    assert result["after"]["ok"] is True and result["after"]["pending"] == 0
    assert result["after"]["written"] == 201 and result["rows"] == 201
    assert result["actions"].count("ledger_error") == 1
    assert result["actions"].count("ledger_recovered") == 1


def test_a_full_queue_drops_and_counts_never_blocks(path: Path, log_capture: LogCapture) -> None:
    with Ledger.open(path, retention_s=HOUR, max_pending=5) as ledger:
        with writes_blocked(path):
            for i in range(50):
                ledger.record(snap(f"job-{i}", "completed"))
            health = ledger.health()
            assert health.dropped >= 40 and health.degraded
        assert ledger.flush(timeout=10)
        health = ledger.health()
        assert health.written + health.dropped == 50
        assert len(rows_in_file(path)) == health.written
    assert any("lost" in line["human"] for line in log_capture.actions("ledger_error"))


def test_no_prompt_or_output_text_is_stored(path: Path) -> None:
    marker = "PROMPT-TEXT-8c1f9e"
    with Ledger.open(path, retention_s=HOUR) as ledger:
        ledger.record(snap("j", "completed", prompt=marker, output=f"out-{marker}",
                           text=marker, tokens=[marker]))
        assert ledger.flush()
        files = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]
        assert any(p.name.endswith("-wal") for p in files)
        for file in files:
            assert marker.encode() not in file.read_bytes()
    with sqlite3.connect(path) as conn:
        columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(jobs)"))
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master "
                                                 "WHERE type = 'table'")]
    assert columns == COLUMNS and tables == ["jobs"]
    assert marker.encode() not in path.read_bytes()


def test_default_path() -> None:
    assert default_path(8080, {"XDG_STATE_HOME": "/var/lib/x", "HOME": "/home/u"}) == Path(
        "/var/lib/x/orcd/ledger-8080.sqlite3")
    assert default_path(9000, {"XDG_STATE_HOME": "relative", "HOME": "/home/u"}) == Path(
        "/home/u/.local/state/orcd/ledger-9000.sqlite3")
    assert default_path(1, {"HOME": "/h"}) == Path("/h/.local/state/orcd/ledger-1.sqlite3")
