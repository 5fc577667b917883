"""``orcd fleet run|config|status``: the fleet's command line.

``orcd/config.py`` adds this parser with :func:`add_parser`; ``orcd/cli.py`` hands the
parsed arguments to :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from .haproxy import DEFAULT_BUFSIZE, FleetSpec, WorkerAddr, consecutive_workers, render

DEFAULT_FRONT_PORT = 8080


def default_run_dir(port: int = DEFAULT_FRONT_PORT) -> Path:
    """Where ``orcd fleet run`` keeps the config, admin socket and worker logs."""
    return Path(tempfile.gettempdir()) / f"orcd-fleet-{port}"


def _workers(text: str) -> list[WorkerAddr]:
    workers = []
    for i, item in enumerate(text.split(",")):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"{item!r} is not HOST:PORT")
        workers.append(WorkerAddr(f"w{i + 1}", host, int(port)))
    return workers


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               error: Callable[[str], None]) -> None:
    """``orcd fleet ...`` under ``sub`` (the ``orcd`` command's subparsers)."""
    fleet = sub.add_parser("fleet", help="run or inspect N workers behind HAProxy")
    fleet.error = error  # type: ignore[method-assign, assignment]
    commands = fleet.add_subparsers(dest="fleet_command", metavar="FLEET_COMMAND",
                                    required=True)
    run = commands.add_parser("run", help="N workers on consecutive ports + HAProxy, "
                              "in the foreground (Ctrl-C drains them)")
    run.add_argument("count", nargs="?", type=int, default=3, help="workers (default 3)")
    run.add_argument("--model", type=Path, help="GGUF model for every worker")
    run.add_argument("--host", default="127.0.0.1", help="address of HAProxy and workers")
    run.add_argument("--port", type=int, default=DEFAULT_FRONT_PORT,
                     help="HAProxy's port (default 8080)")
    run.add_argument("--base-port", type=int, default=None,
                     help="first worker's port (default: --port + 1)")
    run.add_argument("--run-dir", type=Path, default=None,
                     help="config, admin socket and worker logs (default: "
                          f"{default_run_dir()})")
    run.add_argument("--keepalive-s", type=float, default=15.0)
    run.add_argument("--inference-timeout-s", type=float, default=300.0)
    run.add_argument("--drain-timeout-s", type=float, default=5.0)
    run.add_argument("--ready-timeout-s", type=float, default=300.0)
    run.add_argument("--install-haproxy", action="store_true",
                     help="apt-get install haproxy when missing (as root)")
    run.add_argument("--serve-args", default="", metavar="'FLAGS'",
                     help="more `orcd serve` flags for every worker, in one quoted string "
                          "(e.g. --serve-args '--slots 2 --threads 4')")

    config = commands.add_parser("config", help="print the haproxy.cfg for a fleet")
    where = config.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_workers, help="HOST:PORT,HOST:PORT,...")
    where.add_argument("--count", type=int, default=3,
                       help="workers on consecutive ports from --base-port (default 3)")
    config.add_argument("--base-port", type=int, default=DEFAULT_FRONT_PORT + 1)
    config.add_argument("--bind", default=f"127.0.0.1:{DEFAULT_FRONT_PORT}",
                        help="HAProxy's HOST:PORT (default 127.0.0.1:8080)")
    config.add_argument("--keepalive-s", type=float, default=15.0)
    config.add_argument("--inference-timeout-s", type=float, default=300.0)
    config.add_argument("--bufsize", type=int, default=DEFAULT_BUFSIZE)
    config.add_argument("--stats-socket", type=Path, default=None)

    status = commands.add_parser("status", help="every worker's /health and /jobs, one table")
    status.add_argument("--config", type=Path, default=None,
                        help="the fleet's haproxy.cfg (default: that of `orcd fleet run` "
                             f"on port {DEFAULT_FRONT_PORT})")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--timeout-s", type=float, default=2.0)
    for parser in (run, config, status):
        parser.error = error  # type: ignore[method-assign, assignment]


def main(args: argparse.Namespace) -> int:
    try:
        if args.fleet_command == "run":
            return _run(args)
        if args.fleet_command == "config":
            return _config(args)
        return _status(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _run(args: argparse.Namespace) -> int:
    from .supervisor import FleetOptions, run_fleet

    options = FleetOptions(
        count=args.count, model=args.model, host=args.host, port=args.port,
        base_port=args.base_port if args.base_port is not None else args.port + 1,
        run_dir=args.run_dir or default_run_dir(args.port), keepalive_s=args.keepalive_s,
        inference_timeout_s=args.inference_timeout_s, drain_timeout_s=args.drain_timeout_s,
        ready_timeout_s=args.ready_timeout_s, serve_args=tuple(shlex.split(args.serve_args)),
        install_haproxy=args.install_haproxy)
    return run_fleet(options)


def _config(args: argparse.Namespace) -> int:
    host, _, port = args.bind.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--bind={args.bind!r}: must be HOST:PORT")
    workers = args.workers or consecutive_workers(args.count, args.base_port)
    spec = FleetSpec(workers, bind_host=host, bind_port=int(port),
                     keepalive_s=args.keepalive_s, inference_timeout_s=args.inference_timeout_s,
                     bufsize=args.bufsize, stats_socket=args.stats_socket)
    sys.stdout.write(render(spec))
    return 0


def _status(args: argparse.Namespace) -> int:
    from .status import fleet_status, render_table

    config = args.config or default_run_dir() / "haproxy.cfg"
    if not config.exists():
        raise ValueError(f"no fleet config at {config}: start a fleet with `just fleet` "
                         "or pass --config PATH")
    rows = fleet_status(config, args.timeout_s)
    if args.json:
        print(json.dumps([{"worker": r.addr.name, "uri": r.addr.uri, "proxy": r.proxy_state,
                           "http_status": r.http_status, "error": r.error,
                           "health": r.health, "jobs": r.jobs} for r in rows], indent=2))
    else:
        print(render_table(rows))
    return 0 if all(r.http_status == 200 for r in rows) else 1
