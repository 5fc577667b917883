"""The HAProxy front door of a fleet: one config, rendered from a :class:`FleetSpec`.

Routing (CONTRACT §11). Every request that names a job is hashed on its job id over ONE
consistent-hash ring (backend ``keyed``). The id is the first present of:

1. the ``X-Job-Id`` header;
2. the path of ``/jobs/{id}`` or ``/v1/requests/{id}/cancel``;
3. the JSON body's ``job_id`` for ``POST /execute`` and ``POST /cancel`` (read by HAProxy
   with ``option http-buffer-request`` + ``req.body,json_query``). The id read from the body
   is forwarded as ``X-Job-Id``, so the worker refuses (400) a body whose id differs from
   the one the proxy routed on.

An ``/execute`` or ``/cancel`` whose id the proxy cannot read (a body larger than its
buffer, no string ``job_id``, a malformed id) is answered 400 in orcd's error envelope by
HAProxy itself: it is never placed at random. Everything else (``/health``, ``/v1/*``
without ``X-Job-Id``, ``GET /jobs``, ``/metrics``) goes to the least-loaded worker (backend
``any``): the one with the fewest requests in flight through this proxy, both backends
counted. Both backends list the same servers; ``any`` tracks the health checks of ``keyed``.
"""

from __future__ import annotations

import csv
import io
import json
import re
import socket
from collections.abc import Iterable
from pathlib import Path

import attrs

JOB_ID_RE = r"^[A-Za-z0-9._:-]{1,128}$"
CORRELATION_ID_RE = r"^[A-Za-z0-9._:-]{1,64}$"
DEFAULT_BUFSIZE = 65536
MAXREWRITE = 1024
_SERVER_LINE = re.compile(r"^\s*server\s+(\S+)\s+(\S+):(\d+)\b", re.MULTILINE)


@attrs.frozen
class WorkerAddr:
    """One worker of the fleet: its HAProxy server name and address."""

    name: str
    host: str
    port: int

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"


def consecutive_workers(count: int, base_port: int, host: str = "127.0.0.1"
                        ) -> list[WorkerAddr]:
    """``count`` workers ``w1..wN`` on ``host`` at ``base_port``, ``base_port + 1``, ..."""
    if count < 1:
        raise ValueError(f"a fleet needs at least 1 worker, got {count}")
    if not 1 <= base_port <= 65535 - count + 1:
        raise ValueError(f"ports {base_port}..{base_port + count - 1} are not all valid")
    return [WorkerAddr(f"w{i + 1}", host, base_port + i) for i in range(count)]


def _worker_tuple(workers: Iterable[WorkerAddr]) -> tuple[WorkerAddr, ...]:
    return tuple(workers)


@attrs.frozen
class FleetSpec:
    """Everything the rendered config depends on.

    Timeouts: a worker may be silent for up to ``keepalive_s`` inside an SSE stream (it
    then sends ``: keep-alive``), and for a whole job on a non-streaming ``/v1`` request
    (bounded by its ``inference_timeout_s``). ``timeout server``/``client``/``tunnel``
    must outlast both, so the default is ``inference_timeout_s + 15`` and anything not
    above ``2 * keepalive_s`` is refused.
    """

    workers: tuple[WorkerAddr, ...] = attrs.field(converter=_worker_tuple)
    bind_host: str = "127.0.0.1"
    bind_port: int = 8080
    keepalive_s: float = 15.0
    inference_timeout_s: float = 300.0
    idle_timeout_s: float | None = None  # timeout server/client/tunnel; None: derived
    bufsize: int = DEFAULT_BUFSIZE
    check_interval_ms: int = 1000
    stats_socket: Path | None = None
    log: bool = True

    @workers.validator
    def _check_workers(self, _attr: object, value: tuple[WorkerAddr, ...]) -> None:
        if not value:
            raise ValueError("a fleet needs at least 1 worker")
        names = [w.name for w in value]
        if len(set(names)) != len(names):
            raise ValueError(f"worker names must be unique, got {names}")

    @property
    def timeout_s(self) -> float:
        if self.idle_timeout_s is not None:
            timeout = self.idle_timeout_s
        else:
            timeout = self.inference_timeout_s + 15.0
        if timeout <= 2 * self.keepalive_s:
            raise ValueError(f"idle timeout {timeout:g} s must exceed twice the worker's "
                             f"keep-alive interval ({self.keepalive_s:g} s): a long prompt's "
                             "silence would cut the stream")
        return timeout

    @property
    def body_limit(self) -> int:
        """The largest request (headers + body) HAProxy can read whole to find the job_id."""
        return self.bufsize - MAXREWRITE


def _ms(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _refuse(status: int, code: str, message: str, field: str | None = None,
            constraint: str | None = None) -> str:
    """An ``http-request return`` of orcd's error envelope, made by HAProxy itself."""
    details: dict[str, object] = {"source": "fleet-proxy"}
    if field is not None:
        details["errors"] = [{"field": field, "constraint": constraint, "message": message}]
    body = json.dumps({"error": {"code": code, "message": message, "retriable": False,
                                 "details": details, "correlation_id": "CID"}},
                      separators=(",", ":"))
    if "'" in body or "%" in body:
        raise ValueError(f"cannot quote {body!r} in haproxy.cfg")
    body = body.replace('"CID"', '"%[var(txn.cid)]"')  # log-format: filled per request
    return (f"http-request return status {status} content-type application/json "
            f"lf-string '{body}' hdr X-Correlation-Id %[var(txn.cid)]")


def render(spec: FleetSpec) -> str:
    """The haproxy.cfg text for ``spec`` (HAProxy 2.6 or later)."""
    t = _ms(spec.timeout_s)
    lines = [
        f"# orcd fleet front door: {len(spec.workers)} workers behind "
        f"{spec.bind_host}:{spec.bind_port}.",
        "# Generated by `orcd fleet config` (orcd/fleet/haproxy.py): regenerate, do not edit.",
        "global",
        f"    tune.bufsize {spec.bufsize}",
        f"    tune.maxrewrite {MAXREWRITE}",
        "    maxconn 4096",
        "    hard-stop-after 30s",
    ]
    if spec.log:
        lines.append("    log stdout format raw local0 info")
    if spec.stats_socket is not None:
        lines.append(f"    stats socket {spec.stats_socket} mode 600 level admin")
    lines += [
        "",
        "defaults",
        "    mode http",
        "    log global" if spec.log else "    no log",
        "    # A client that goes away mid-stream closes its worker connection: the worker",
        "    # cancels the job (client_disconnect). Queued or connecting requests are dropped.",
        "    option abortonclose",
        "    # SSE: forward every frame as it comes (no Nagle/MSG_MORE coalescing, no",
        "    # compression filter, no response buffering).",
        "    option http-no-delay",
        "    option redispatch 1",
        "    retries 2",
        "    timeout connect 3s",
        "    timeout http-request 15s",
        "    timeout queue 10s",
        "    timeout http-keep-alive 15s",
        "    timeout check 2s",
        f"    # Rule: > 2 x worker keep-alive ({spec.keepalive_s:g} s, a long prompt's silence)",
        f"    # and > inference timeout ({spec.inference_timeout_s:g} s, a non-streaming /v1 job).",
        f"    timeout server {t}",
        f"    timeout client {t}",
        f"    timeout tunnel {t}",
        "    timeout client-fin 5s",
        "    timeout server-fin 5s",
        '    log-format "%ci:%cp [%tr] %ft %b/%s %TR/%Tw/%Tc/%Tr/%Ta %ST %B %tsc '
        '%{+Q}r job=%[var(txn.job_id)] cid=%[var(txn.cid)]"',
        "",
        "frontend orcd",
        f"    bind {spec.bind_host}:{spec.bind_port}",
        "    option http-buffer-request",
        "    # Correlation id: the client's if valid, else a new one; sent on to the worker.",
        "    http-request set-var(txn.cid) req.fhdr(X-Correlation-Id) "
        f"if {{ req.fhdr(X-Correlation-Id) -m reg {CORRELATION_ID_RE} }}",
        "    http-request set-var(txn.cid) uuid if !{ var(txn.cid) -m found }",
        "    http-request set-header X-Correlation-Id %[var(txn.cid)]",
        "    acl body_keyed method POST",
        "    acl body_keyed_path path /execute /cancel",
        "    acl has_id var(txn.job_id) -m found",
        f"    acl id_ok var(txn.job_id) -m reg {JOB_ID_RE}",
        "    " + _refuse(400, "INVALID_REQUEST", "send one X-Job-Id header, not several",
                    "X-Job-Id", "single") + " if { req.fhdr_cnt(X-Job-Id) gt 1 }",
        "    # The job id, from the first place that has it.",
        "    http-request set-var(txn.job_id) req.fhdr(X-Job-Id) "
        "if { req.fhdr_cnt(X-Job-Id) eq 1 }",
        "    http-request set-var(txn.job_id) path,field(3,/),url_dec "
        "if !has_id { path_reg ^/jobs/[^/]+$ }",
        "    http-request set-var(txn.job_id) path,field(4,/),url_dec "
        "if !has_id { path_reg ^/v1/requests/[^/]+/cancel$ }",
        "    # POST /execute and /cancel without the header: the id is in the body, which",
        f"    # HAProxy reads only up to its buffer (tune.bufsize {spec.bufsize} less "
        f"{MAXREWRITE}, headers included).",
        "    http-request set-var(txn.body_len) req.body_len if body_keyed body_keyed_path !has_id",
        "    " + _refuse(400, "INVALID_REQUEST",
                      "request body too large for the fleet proxy to read its job_id: "
                      "send the job id in the X-Job-Id header", "job_id", "readable")
        + " if body_keyed body_keyed_path !has_id { req.body_size,sub(txn.body_len) gt 0 }",
        "    http-request set-var(txn.job_id) req.body,json_query('$.job_id') "
        "if body_keyed body_keyed_path !has_id",
        "    http-request unset-var(txn.job_id) "
        "if body_keyed body_keyed_path !id_ok { req.fhdr_cnt(X-Job-Id) eq 0 }",
        "    " + _refuse(400, "INVALID_REQUEST",
                      "job_id must be a string of 1-128 characters [A-Za-z0-9._:-]",
                      "job_id", "pattern")
        + " if body_keyed body_keyed_path !id_ok { req.fhdr_cnt(X-Job-Id) eq 0 }",
        "    http-request set-header X-Job-Id %[var(txn.job_id)] "
        "if body_keyed body_keyed_path { req.fhdr_cnt(X-Job-Id) eq 0 }",
        "    # POST /shutdown stops one worker: send it to that worker, not to the fleet.",
        "    " + _refuse(403, "FORBIDDEN", "POST /shutdown stops one worker: "
                    "send it to that worker directly") + " if { path /shutdown }",
        "    use_backend keyed if has_id",
        "    default_backend any",
        "",
        "backend keyed",
        "    # ONE consistent-hash ring over the workers, keyed on the job id.",
        "    balance hash var(txn.job_id)",
        "    hash-type consistent",
        "    option httpchk GET /health",
        "    http-check expect status 200",
        f"    default-server check inter {spec.check_interval_ms}ms "
        f"fastinter {max(spec.check_interval_ms // 4, 100)}ms "
        f"downinter {spec.check_interval_ms}ms fall 2 rise 2 "
        "observe layer4 error-limit 1 on-error mark-down",
    ]
    # Ring points derive from each server's id: pinned, every HAProxy given this config
    # (replicas, reloads) builds the same ring.
    for i, w in enumerate(spec.workers, start=1):
        lines.append(f"    server {w.name} {w.host}:{w.port} id {i}")
    lines += [
        "",
        "backend any",
        "    # Least loaded: fewest requests in flight to the worker through both backends.",
        "    balance leastconn",
        "    http-request set-var(txn.lb_min) int(2147483647)",
    ]
    for w in spec.workers:
        up = f"{{ srv_is_up(keyed/{w.name}) }}"
        fewer = "{ var(txn.lb_n),sub(txn.lb_min) -m int lt 0 }"
        lines += [
            f"    http-request set-var(txn.lb_n) srv_conn(any/{w.name})",
            f"    http-request set-var(txn.lb_n) srv_conn(keyed/{w.name}),add(txn.lb_n)",
            f"    http-request set-var(txn.lb_best) str({w.name}) if {up} {fewer}",
            f"    http-request set-var(txn.lb_min) var(txn.lb_n) if {up} {fewer}",
        ]
    for w in spec.workers:
        lines.append(f"    use-server {w.name} if {{ var(txn.lb_best) -m str {w.name} }}")
    for w in spec.workers:
        lines.append(f"    server {w.name} {w.host}:{w.port} track keyed/{w.name}")
    return "\n".join(lines) + "\n"


def workers_in(config_text: str) -> list[WorkerAddr]:
    """The workers a rendered config routes to (its ``keyed`` backend's servers)."""
    section = config_text.split("\nbackend keyed\n", 1)
    if len(section) != 2:
        raise ValueError("not an orcd fleet config: no 'backend keyed' section")
    body = section[1].split("\nbackend ", 1)[0]
    return [WorkerAddr(name, host, int(port))
            for name, host, port in _SERVER_LINE.findall(body)]


def stats_socket_in(config_text: str) -> Path | None:
    """The admin socket a rendered config opens, if any."""
    match = re.search(r"^\s*stats socket (\S+)", config_text, re.MULTILINE)
    return Path(match.group(1)) if match else None


def server_states(stats_socket: Path, backend: str = "keyed", timeout: float = 2.0
                  ) -> dict[str, str]:
    """HAProxy's view of each server of ``backend`` (``UP``, ``DOWN``, ``MAINT``, ...),
    read with ``show stat`` on its admin socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(stats_socket))
        sock.sendall(b"show stat\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    rows = csv.reader(io.StringIO(b"".join(chunks).decode().lstrip("# ")))
    header = next(rows)
    px, sv, status = header.index("pxname"), header.index("svname"), header.index("status")
    return {row[sv]: row[status].split(" ")[0] for row in rows
            if len(row) > status and row[px] == backend
            and row[sv] not in ("FRONTEND", "BACKEND")}
