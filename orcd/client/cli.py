"""The client commands of ``orcd``: ``run``, ``chat``, ``jobs`` and ``cancel``.

:func:`add_commands` adds them to ``orcd``'s argument parser; :func:`run_command` runs one.
A failure is one line on stderr (``orcd: error: ...``) and exit code 1. The worker is
``--url`` (else ``$ORCD_URL``, else ``http://127.0.0.1:8080``); ``--token`` (else
``$ORCD_TOKEN``) is sent as ``Authorization: Bearer``. httpx is imported only when a client
command runs, so ``orcd serve`` does not need it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

from . import COMMANDS

if TYPE_CHECKING:
    from .api import Api

DEFAULT_URL = "http://127.0.0.1:8080"
JOB_STATES = ("queued", "running", "completed", "cancelled", "failed")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None,
                        help=f"the worker (default $ORCD_URL, else {DEFAULT_URL})")
    parser.add_argument("--token", default=None,
                        help="bearer token for a worker with --auth-file (default $ORCD_TOKEN)")


def _sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help="most tokens to generate (default: the worker's)")
    parser.add_argument("--temperature", type=float, default=None, metavar="T",
                        help="0 = greedy, up to 2 (default 1)")
    parser.add_argument("--seed", type=int, default=None, metavar="N",
                        help="sampling seed (default: random)")


def add_commands(sub: Any) -> None:
    """Add the client commands to ``orcd``'s subparsers (an argparse ``_SubParsersAction``)."""
    run = sub.add_parser("run", help="stream one job's text to stdout; Ctrl-C cancels it")
    run.add_argument("prompt", help='the prompt ("-" reads it from stdin)')
    _sampling(run)
    run.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling")
    run.add_argument("--top-k", type=int, default=None, metavar="K", help="0 = off")
    run.add_argument("--stop", action="append", default=None, metavar="TEXT",
                     help="stop sequence (repeat for up to 4)")
    run.add_argument("--timeout-ms", type=int, default=None, metavar="MS",
                     help="the job's deadline (default: the worker's)")
    run.add_argument("--job-id", default=None, help="the job's id (default run-<random>)")
    _common(run)

    chat = sub.add_parser("chat", help="chat through /v1/chat/completions; Ctrl-C stops an "
                                       "answer, Ctrl-D quits")
    _sampling(chat)
    chat.add_argument("--system", default=None, help="a system message opening the chat")
    chat.add_argument("--model", default=None,
                      help="the model name to send (default: the one /v1/models lists)")
    _common(chat)

    jobs = sub.add_parser("jobs", help="list the worker's jobs, active first")
    jobs.add_argument("--state", choices=JOB_STATES, default=None, help="only jobs in this state")
    jobs.add_argument("--json", action="store_true", help="print the raw JSON records")
    _common(jobs)

    cancel = sub.add_parser("cancel", help="cancel a job by its id")
    cancel.add_argument("job_id", help="the job to cancel")
    _common(cancel)


def run_command(command: str, args: argparse.Namespace) -> int:
    """Run one client command; its exit code."""
    assert command in COMMANDS, command
    try:
        from .api import Api, ClientError
    except ImportError as exc:  # httpx: `orcd serve` alone does not need it
        print(f"orcd: error: the client commands need {exc.name} (pip install {exc.name})",
              file=sys.stderr)
        return 1

    url = args.url or os.environ.get("ORCD_URL") or DEFAULT_URL
    token = args.token or os.environ.get("ORCD_TOKEN") or None
    no_color = bool(os.environ.get("NO_COLOR"))
    api = Api(url, token)
    try:
        if command == "run":
            return _run(api, args, no_color)
        if command == "chat":
            return _chat(api, args, no_color)
        if command == "jobs":
            return _jobs(api, args.state, args.json, sys.stdout, no_color)
        return _cancel(api, args.job_id, sys.stdout)
    except ClientError as exc:
        print(f"orcd: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\norcd: interrupted", file=sys.stderr)
        return 130
    finally:
        api.close()


def _sampling_body(args: argparse.Namespace) -> dict[str, Any]:
    body = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    return {k: v for k, v in body.items() if v is not None}


def _run(api: Api, args: argparse.Namespace, no_color: bool) -> int:
    from .run import run

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    body: dict[str, Any] = {"job_id": args.job_id or f"run-{secrets.token_hex(4)}",
                            "prompt": prompt, **_sampling_body(args)}
    extra = {"top_p": args.top_p, "top_k": args.top_k, "stop": args.stop,
             "timeout_ms": args.timeout_ms}
    body.update({k: v for k, v in extra.items() if v is not None})
    control = api.twin()  # the cancel goes out on its own connection
    try:
        return run(api, control, body, sys.stdout, sys.stderr, no_color=no_color)
    finally:
        control.close()


def _chat(api: Api, args: argparse.Namespace, no_color: bool) -> int:
    from .chat import chat

    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:  # pragma: no cover - not on every platform
        pass
    control = api.twin()
    try:
        return chat(api, control, _sampling_body(args), system=args.system, model=args.model,
                    read_line=input, out=sys.stdout, no_color=no_color)
    finally:
        control.close()


def _clock(stamp: str | None) -> str:
    """An RFC 3339 UTC time as local ``HH:MM:SS``."""
    if not stamp:
        return "-"
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone().strftime(
            "%H:%M:%S")
    except ValueError:
        return stamp


def _jobs(api: Api, state: str | None, as_json: bool, out: TextIO, no_color: bool) -> int:
    import json

    from .term import Style

    params = {"state": state} if state else None
    jobs = api.request("GET", "/jobs", params=params).get("jobs") or []
    if as_json:
        out.write(json.dumps(jobs, indent=2) + "\n")
        return 0
    if not jobs:
        out.write(f"no {state} jobs\n" if state else "no jobs\n")
        return 0
    s = Style(out, no_color=no_color)
    rows = [("JOB", "STATE", "TOKENS", "PROGRESS", "CREATED", "DETAIL")]
    for job in jobs:
        error = job.get("error") or {}
        detail = job.get("stop_reason") or job.get("cancel_reason") or error.get("code") or ""
        rows.append((str(job["job_id"]), str(job["state"]),
                     f"{job.get('tokens_out', 0)}/{job.get('max_tokens', '?')}",
                     f"{float(job.get('progress') or 0.0) * 100:.0f}%",
                     _clock(job.get("created_at")), str(detail)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        cells.append(row[-1])
        if n == 0:
            cells = [s.bold(c) for c in cells]
        else:
            cells[1] = s.state(row[1]) + " " * (widths[1] - len(row[1]))
        out.write("  ".join(cells).rstrip() + "\n")
    return 0


_CANCEL_SAYS = {
    "queued": "cancelled {id} (it was queued)",
    "running": "cancelling {id} (it was running)",
    "completed": "{id} had already completed; nothing changed",
    "cancelled": "{id} was already cancelled",
    "failed": "{id} had already failed; nothing changed",
    "unknown": "no job {id} is known yet; the cancel is remembered for 60 s, so a job "
               "submitted under that id in that time is cancelled at once",
}


def _cancel(api: Api, job_id: str, out: TextIO) -> int:
    answer = api.cancel(job_id)
    state = str(answer.get("state"))
    out.write(_CANCEL_SAYS.get(state, "cancel sent for {id} (" + state + ")").format(id=job_id)
              + "\n")
    return 0
