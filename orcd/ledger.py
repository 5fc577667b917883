"""The job ledger: every job record in an embedded SQLite file, written off the event loop.

One row per (principal, job_id) holds what ``GET /jobs/{id}`` shows of the job, plus
``principal``, ``cancelled_by``, ``worker_pid`` and ``updated_at``; never prompt or output text
(unknown keys of a snapshot are ignored, there is no column for them).

Writes: :meth:`Ledger.record` only puts the snapshot on a bounded queue (``put_nowait``; a full
queue counts a drop and marks the ledger degraded, it never blocks). One writer thread owns the
write connection; woken by a record, it lets ``batch_window_s`` (50 ms) of records gather, then
commits them in one transaction, several records of one job as one upsert. A failed write (disk
full, read-only file, corruption) is logged once, shown in :meth:`Ledger.health`, kept in memory
and retried with a backoff; the caller never sees an exception after :meth:`Ledger.open`.

Reads: :meth:`Ledger.get` and :meth:`Ledger.list` are plain blocking methods for a worker thread
(``trio.to_thread.run_sync``), on their own read-only connections (WAL mode lets them run beside
the writer); a burst of concurrent reads opens what it needs, and ``IDLE_READERS`` of them are
kept afterwards. They see what has been committed, up to one batch window behind ``record``.

Recovery: :meth:`Ledger.open` takes an exclusive lock on ``<path>.lock`` (one process per
ledger), then settles what a killed predecessor left active: a queued or running job whose cancel
was requested becomes ``cancelled`` (``failed``/``INFERENCE_TIMEOUT`` for a deadline, as the
live worker would have done); every other one becomes ``failed`` with ``WORKER_RESTART``.
"""

from __future__ import annotations

import builtins
import fcntl
import functools
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import attrs

from . import priority
from .errors import ConfigError
from .logs import log, utc_now

CACHE_KIB = 256  # each connection's SQLite page cache
IDLE_READERS = 2  # read-only connections kept between reads

SCHEMA_VERSION = 1

# The record columns, in table order; the first 14 are the fields of GET /jobs/{id}.
COLUMNS: tuple[str, ...] = (
    "job_id", "state", "correlation_id", "created_at", "started_at", "finished_at",
    "cancel_requested_at", "cancelled_at", "cancel_reason", "tokens_out", "max_tokens",
    "progress", "stop_reason", "error",
    "principal", "cancelled_by", "worker_pid", "updated_at",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id              TEXT NOT NULL,
    state               TEXT NOT NULL,
    correlation_id      TEXT,
    created_at          TEXT,
    started_at          TEXT,
    finished_at         TEXT,
    cancel_requested_at TEXT,
    cancelled_at        TEXT,
    cancel_reason       TEXT,
    tokens_out          INTEGER NOT NULL DEFAULT 0,
    max_tokens          INTEGER,
    progress            REAL,
    stop_reason         TEXT,
    error               TEXT,   -- JSON: {"code": ..., "message": ...}
    principal           TEXT NOT NULL,
    cancelled_by        TEXT,
    worker_pid          INTEGER NOT NULL,
    updated_at          REAL NOT NULL,  -- Unix seconds of the state change
    PRIMARY KEY (principal, job_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS jobs_by_update ON jobs (updated_at);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
"""

# Rows per INSERT: 50 x 18 columns stays under SQLite's oldest limit of 999 parameters.
_ROWS_PER_STATEMENT = 50


@functools.lru_cache(maxsize=_ROWS_PER_STATEMENT)
def _upsert(rows: int) -> str:
    """An upsert of ``rows`` records in one statement: a later state replaces the row."""
    values = "(" + ", ".join("?" * len(COLUMNS)) + ")"
    updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c not in ("principal", "job_id"))
    return (f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES {', '.join([values] * rows)} "
            f"ON CONFLICT (principal, job_id) DO UPDATE SET {updates}")


_Key = tuple[str, str]
_Row = tuple[Any, ...]


def default_path(port: int, environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/orcd/ledger-<port>.sqlite3``, else ``~/.local/state/orcd/...``."""
    env = os.environ if environ is None else environ
    state_home = env.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state_home):  # the XDG spec ignores relative paths
        home = env.get("HOME") or os.path.expanduser("~")
        state_home = os.path.join(home, ".local", "state")
    return Path(state_home) / "orcd" / f"ledger-{port}.sqlite3"


@attrs.frozen
class Recovery:
    """What :meth:`Ledger.open` settled of a previous process's records."""

    cancelled: int  # cancel requested, now enforced (a deadline becomes INFERENCE_TIMEOUT)
    failed: int  # active when the process died: WORKER_RESTART
    deleted: int  # older than the retention

    @property
    def fixed(self) -> int:
        return self.cancelled + self.failed


@attrs.frozen
class LedgerHealth:
    """A snapshot of the ledger's state, for ``/health`` and ``/metrics``."""

    ok: bool  # the last write (or read) succeeded
    error: str | None  # the current failure, while not ok
    dropped: int  # records lost to a full queue (or to the in-memory bound while failing)
    pending: int  # records waiting to be written
    written: int  # rows upserted since open
    commits: int  # write transactions since open

    @property
    def degraded(self) -> bool:
        return not self.ok or self.dropped > 0

    def as_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "degraded": self.degraded}


class _Flush:
    """A marker on the queue: write everything before it now, then report."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False


_WAKE = object()  # a marker that only wakes the writer (close)


@attrs.define(eq=False)
class Ledger:
    """The SQLite job ledger of one worker process. Build it with :meth:`open`."""

    path: Path
    retention_s: float
    recovery: Recovery
    batch_window_s: float = 0.05
    max_pending: int = 10_000
    prune_every_s: float = 60.0
    writer_pragmas: Mapping[str, int | str] = attrs.field(factory=dict)
    _queue: queue.Queue[Any] = attrs.field(init=False)
    _thread: threading.Thread = attrs.field(init=False)
    _stopping: threading.Event = attrs.field(init=False, factory=threading.Event)
    _hurry: threading.Event = attrs.field(init=False, factory=threading.Event)  # write now
    _lock_file: IO[str] | None = None
    _readers: builtins.list[sqlite3.Connection] = attrs.field(init=False, factory=list)
    _readers_lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _pid: int = attrs.field(init=False, factory=os.getpid)
    # `_dropped` is written by the caller's thread only, the rest by the writer; read anywhere.
    _dropped: int = attrs.field(init=False, default=0)
    _lost: int = attrs.field(init=False, default=0)  # malformed, or over max_pending
    _dropped_logged: int = attrs.field(init=False, default=0)
    _pending: int = attrs.field(init=False, default=0)
    _written: int = attrs.field(init=False, default=0)
    _commits: int = attrs.field(init=False, default=0)
    _error: str | None = attrs.field(init=False, default=None)
    _last_prune: float = attrs.field(init=False, factory=time.monotonic)

    def __attrs_post_init__(self) -> None:
        self._queue = queue.Queue(maxsize=self.max_pending)
        self._thread = threading.Thread(target=self._run, name="orcd-ledger", daemon=True)

    # -- opening and recovery ---------------------------------------------------------

    @classmethod
    def open(cls, path: Path | str, *, retention_s: float, **options: Any) -> Ledger:
        """Open (or create) the ledger at ``path``, settle a dead predecessor's active jobs,
        delete records older than ``retention_s`` and start the writer.

        Raises :class:`ConfigError` if the file cannot be opened, is not an orcd ledger, or
        another live process holds it. ``options``: ``batch_window_s``, ``max_pending``,
        ``prune_every_s``, ``writer_pragmas`` (extra PRAGMAs for the write connection, e.g.
        ``{"max_page_count": N}`` to cap the file's size).
        """
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"ledger {path}: cannot create its folder ({exc.strerror})") from None
        lock_file = _lock(path)
        try:
            recovery = _setup(path, retention_s)
        except BaseException:
            lock_file.close()
            raise
        ledger = cls(path, retention_s, recovery, lock_file=lock_file, **options)
        ledger._thread.start()
        priority.keep(ledger._thread)  # the event loop puts into its queue
        log("ledger_open",
            f"Ledger {path}: {recovery.cancelled} cancels enforced and {recovery.failed} jobs "
            f"failed (WORKER_RESTART) from a previous process, {recovery.deleted} old records "
            "deleted", path=str(path), recovered=recovery.fixed)
        return ledger

    # -- the caller's side: non-blocking ----------------------------------------------

    def record(self, snapshot: Mapping[str, Any]) -> None:
        """Queue one job snapshot (with ``principal``; ``cancelled_by`` if any). Never blocks,
        never raises: a full queue counts a drop."""
        try:
            self._queue.put_nowait((time.time(), dict(snapshot)))
        except queue.Full:
            self._dropped += 1

    @property
    def thread_id(self) -> int | None:
        """The native id of the writer thread."""
        return self._thread.native_id

    def health(self) -> LedgerHealth:
        return LedgerHealth(ok=self._error is None, error=self._error,
                            dropped=self._dropped + self._lost,
                            pending=self._pending + self._queue.qsize(),
                            written=self._written, commits=self._commits)

    # -- blocking: call from a thread -------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """Write everything recorded so far now (retrying a failing write once). True when it
        is committed; False if the write failed or ``timeout`` passed. Blocking."""
        if not self._thread.is_alive():
            return False
        marker = _Flush()
        try:
            self._queue.put(marker, timeout=timeout)
        except queue.Full:
            return False
        self._hurry.set()
        return marker.done.wait(timeout) and marker.ok

    def get(self, principal: str, job_id: str) -> dict[str, Any] | None:
        """The record of ``principal``'s job ``job_id``, or None. Blocking; never raises."""
        rows = self._read("SELECT * FROM jobs WHERE principal = ? AND job_id = ?",
                          (principal, job_id))
        return rows[0] if rows else None

    def list(self, principal: str | None = None, state: str | None = None,
             since_s: float | None = None, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """Records, active first, then newest first: of one principal (None: all), in one
        state (None: any), changed in the last ``since_s`` seconds (None: any). Blocking."""
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if principal is not None:
            where.append("principal = ?")
            params.append(principal)
        if state is not None:
            where.append("state = ?")
            params.append(state)
        if since_s is not None:
            where.append("updated_at >= ?")
            params.append(time.time() - since_s)
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY state IN ('queued', 'running') DESC, created_at DESC, job_id LIMIT ?"
        params.append(max(0, limit))
        return self._read(sql, tuple(params))

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, stop the writer (waiting up to ``timeout``), release the file."""
        self._stopping.set()
        self._hurry.set()
        try:
            self._queue.put_nowait(_WAKE)
        except queue.Full:
            pass  # the writer is busy and sees `_stopping` after this batch
        if self._thread.is_alive():
            self._thread.join(timeout)
        priority.forget(self._thread)
        if self._thread.is_alive():
            log("ledger_error", f"Ledger writer did not stop within {timeout} s; "
                f"{self.health().pending} records may be lost", level=logging.WARNING)
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read(self, sql: str, params: tuple[Any, ...]) -> builtins.list[dict[str, Any]]:
        conn: sqlite3.Connection | None = None
        try:
            conn = self._acquire_reader()
            rows = [_decode(row) for row in conn.execute(sql, params)]
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            self._fail(f"read failed: {exc}")
            return []
        self._release_reader(conn)
        return rows

    def _acquire_reader(self) -> sqlite3.Connection:
        """An idle read-only connection, or a new one when every kept one is in use."""
        with self._readers_lock:
            if self._readers:
                return self._readers.pop()
        conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                               timeout=2.0, check_same_thread=False)
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        conn.row_factory = sqlite3.Row
        return conn

    def _release_reader(self, conn: sqlite3.Connection) -> None:
        """Keep ``conn`` for the next read, unless IDLE_READERS are kept already: a burst of
        concurrent reads opens as many connections as it needs, and each kept one holds its
        page cache, so the pool must not stay at the burst's size."""
        with self._readers_lock:
            if len(self._readers) < IDLE_READERS:
                self._readers.append(conn)
                return
        conn.close()

    # -- the writer thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a bug: say so, never take the worker down with it
            self._error = f"writer stopped: {exc!r}"
            log("ledger_error", f"Ledger writer stopped: {exc!r}; no more records are written",
                level=logging.ERROR, path=str(self.path))

    def _loop(self) -> None:
        conn: sqlite3.Connection | None = None
        pending: dict[_Key, _Row] = {}  # the last record of each job not yet written
        retry_at: float | None = None  # while writes fail
        backoff = 0.5
        while True:
            timeout = None if retry_at is None else max(0.0, retry_at - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if isinstance(item, tuple) and retry_at is None and not self._stopping.is_set():
                # The first record of a batch: let the window's records gather without waking
                # this thread for each of them (flush() and close() cut the wait short).
                self._hurry.wait(self.batch_window_s)
            self._hurry.clear()
            stopping = self._stopping.is_set()  # before draining: nothing recorded is left
            flushes: builtins.list[_Flush] = []
            while item is not None:
                if isinstance(item, _Flush):
                    flushes.append(item)
                elif isinstance(item, tuple):
                    self._add(pending, *item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            self._pending = len(pending)
            self._note_drops()
            if pending and (retry_at is None or flushes or stopping
                            or time.monotonic() >= retry_at):
                conn = self._write(conn, pending)
                if self._error is None:
                    pending.clear()
                    retry_at, backoff = None, 0.5
                else:
                    retry_at = time.monotonic() + backoff
                    backoff = min(backoff * 2, 30.0)
                self._pending = len(pending)
            if conn is not None and self._error is None:
                self._prune(conn)
            for marker in flushes:
                marker.ok = not pending
                marker.done.set()
            if stopping:
                break
        if pending:
            log("ledger_error", f"Ledger closed with {len(pending)} records unwritten "
                f"({self._error})", level=logging.WARNING, path=str(self.path))
        if conn is not None:
            conn.close()

    def _add(self, pending: dict[_Key, _Row], at: float, snapshot: dict[str, Any]) -> None:
        try:
            row = self._row(at, snapshot)
        except (TypeError, ValueError) as exc:
            self._note_drops()
            self._lost += 1
            self._dropped_logged += 1
            log("ledger_error", f"Ledger skipped a malformed record: {exc}",
                level=logging.ERROR, job_id=snapshot.get("job_id"))
            return
        key = (row[COLUMNS.index("principal")], row[0])
        pending.pop(key, None)  # re-insert: the dict stays ordered by last change
        pending[key] = row
        while len(pending) > self.max_pending:  # failing for long: forget the oldest
            del pending[next(iter(pending))]
            self._lost += 1

    def _row(self, at: float, snap: dict[str, Any]) -> _Row:
        values: dict[str, Any] = {c: snap.get(c) for c in COLUMNS}
        for required in ("job_id", "state", "principal"):
            if not isinstance(values[required], str):
                raise ValueError(f"{required} must be a string, got {values[required]!r}")
        values["tokens_out"] = int(values["tokens_out"] or 0)
        if values["error"] is not None:
            values["error"] = json.dumps(values["error"], ensure_ascii=False)
        values["worker_pid"] = self._pid
        values["updated_at"] = at
        return tuple(values[c] for c in COLUMNS)

    def _write(self, conn: sqlite3.Connection | None,
               pending: dict[_Key, _Row]) -> sqlite3.Connection | None:
        """One transaction for every pending row; on failure keep them, and drop the
        connection to open a fresh one on the retry.

        Rows go in multi-row statements: sqlite3 releases the GIL for every statement step,
        so one step for many rows keeps the writer from contending with the event loop.
        """
        rows = builtins.list(pending.values())
        try:
            if conn is None:
                conn = _connect_writer(self.path, self.writer_pragmas)
            if len(rows) <= _ROWS_PER_STATEMENT:  # one statement: atomic by itself
                conn.execute(_upsert(len(rows)), [v for row in rows for v in row])
            else:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for i in range(0, len(rows), _ROWS_PER_STATEMENT):
                        chunk = rows[i:i + _ROWS_PER_STATEMENT]
                        conn.execute(_upsert(len(chunk)), [v for row in chunk for v in row])
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            self._fail(f"write failed: {exc}")
            if conn is not None:
                conn.close()
            return None
        self._written += len(rows)
        self._commits += 1
        if self._error is not None:
            log("ledger_recovered", f"Ledger {self.path} writes again after: {self._error}",
                path=str(self.path))
            self._error = None
        return conn

    def _prune(self, conn: sqlite3.Connection) -> None:
        """Delete finished records older than the retention, at most every ``prune_every_s``."""
        now = time.monotonic()
        if now - self._last_prune < self.prune_every_s:
            return
        self._last_prune = now
        try:
            with conn:
                conn.execute("DELETE FROM jobs WHERE updated_at < ? AND state NOT IN "
                             "('queued', 'running')", (time.time() - self.retention_s,))
        except sqlite3.Error as exc:
            self._fail(f"pruning failed: {exc}")

    def _fail(self, error: str) -> None:
        if self._error is None:
            log("ledger_error",
                f"Ledger {self.path} {error}; jobs keep running, records are kept in memory "
                "and retried", level=logging.ERROR, path=str(self.path))
        self._error = error

    def _note_drops(self) -> None:
        dropped = self._dropped + self._lost
        if dropped > self._dropped_logged:
            log("ledger_error", f"Ledger lost {dropped - self._dropped_logged} records "
                f"({dropped} in all): more than {self.max_pending} were waiting",
                level=logging.WARNING, path=str(self.path), dropped=dropped)
            self._dropped_logged = dropped


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    record = dict(row)
    if record["error"] is not None:
        record["error"] = json.loads(record["error"])
    return record


def _connect_writer(path: Path, pragmas: Mapping[str, int | str]) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=2.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")  # WAL: a commit survives kill -9, not power loss
    # The writer only appends and upserts: a small page cache (SQLite's default is 2 MiB)
    # keeps the worker's memory flat as the file grows.
    conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    for name, value in pragmas.items():
        if not name.isidentifier() or not (isinstance(value, int) or value.isalnum()):
            raise ValueError(f"bad writer PRAGMA {name} = {value!r}")
        conn.execute(f"PRAGMA {name} = {int(value) if isinstance(value, int) else value}")
    return conn


def _lock(path: Path) -> IO[str]:
    """Hold ``<path>.lock`` for the ledger's lifetime: one process per ledger file. The lock
    goes with the process, so a killed worker never blocks its successor."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_file = open(lock_path, "a+", encoding="utf-8")  # held until close()
    except OSError as exc:
        raise ConfigError(f"ledger {path}: cannot open {lock_path} ({exc.strerror})") from None
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise ConfigError(f"ledger {path} is in use by another orcd process (pid {holder}); "
                          "give this worker its own --ledger PATH") from None
    lock_file.truncate(0)
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file


def _setup(path: Path, retention_s: float) -> Recovery:
    """Create or check the schema, settle a dead predecessor's jobs, prune old records."""
    try:
        conn = _connect_writer(path, {})
    except sqlite3.Error as exc:
        raise ConfigError(f"ledger {path}: cannot use it ({exc}); move it away or pass "
                          "--ledger none") from None
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(f"ledger {path} was written by a newer orcd (schema {version}); "
                              "pass another --ledger PATH")
        existing = tuple(row[1] for row in conn.execute("PRAGMA table_info(jobs)"))
        if existing and existing != COLUMNS:
            raise ConfigError(f"ledger {path}: cannot use it (a jobs table that is not orcd's: "
                              f"{', '.join(existing)}); move it away or pass --ledger none")
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            recovery = _recover(conn, retention_s)
        return recovery
    except sqlite3.Error as exc:
        raise ConfigError(f"ledger {path}: cannot use it ({exc}); move it away or pass "
                          "--ledger none") from None
    finally:
        conn.close()


def _recover(conn: sqlite3.Connection, retention_s: float) -> Recovery:
    now_text, now = utc_now(), time.time()
    cancelled = failed = 0
    active = conn.execute("SELECT principal, job_id, cancel_requested_at, cancel_reason "
                          "FROM jobs WHERE state IN ('queued', 'running')").fetchall()
    for principal, job_id, requested_at, reason in active:
        cancelled_at = None
        if requested_at is None:  # nobody asked it to stop: the crash ended it
            state, failed = "failed", failed + 1
            error = {"code": "WORKER_RESTART",
                     "message": "the worker process died while the job was active"}
        elif reason == "deadline":  # as the live worker does: a deadline is a failure
            state, cancelled, cancelled_at = "failed", cancelled + 1, now_text
            error = {"code": "INFERENCE_TIMEOUT",
                     "message": "the job's deadline passed before it finished"}
        else:
            reason = reason or "client_request"
            state, cancelled, cancelled_at = "cancelled", cancelled + 1, now_text
            error = {"code": "CANCELLED", "message": f"Job cancelled ({reason}); the cancel "
                     "was enforced after the worker restarted"}
        conn.execute(
            "UPDATE jobs SET state = ?, finished_at = ?, cancelled_at = ?, cancel_reason = ?, "
            "error = ?, updated_at = ? WHERE principal = ? AND job_id = ?",
            (state, now_text, cancelled_at, reason, json.dumps(error), now, principal, job_id))
    deleted = conn.execute("DELETE FROM jobs WHERE updated_at < ?",
                           (now - retention_s,)).rowcount
    return Recovery(cancelled=cancelled, failed=failed, deleted=deleted)
