"""Configuration: one frozen object built from flags and ``ORCD_*`` variables.

Every flag of the contract (CONTRACT §1) can also be set as ``ORCD_<FLAG>`` in the
environment (``--n-ctx`` is ``ORCD_N_CTX``); a flag on the command line wins. Nothing deeper
in the code reads ``os.environ``: the parsed :class:`Config` is passed down explicitly.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, TypeAlias

import attrs

from .auth import add_token_parser
from .client.cli import add_commands
from .errors import ConfigError
from .fleet.cli import add_parser as add_fleet_parser

DEFAULT_PORT = 8080

# --ledger: a file, "none" (no ledger), or "default" (ledger.default_path of the bound port).
LedgerSetting: TypeAlias = Path | Literal["default", "none"]


@attrs.frozen
class Config:
    model: Path | None = None  # None: the default Gemma 3 270M model, assembled on first use
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    worker_id: str = attrs.field(factory=lambda: f"orcd-{socket.gethostname()}-{os.getpid()}")
    gpu_device: int | None = None
    n_ctx: int = 4096
    threads: int = attrs.field(factory=lambda: os.cpu_count() or 1)
    slots: int = 4
    queue_depth: int = 16
    max_tokens_out: int = 2048
    inference_timeout_s: float = 300.0
    drain_timeout_s: float = 5.0
    callback_url: str | None = None
    callback_timeout_s: float = 30.0
    log_format: str = "json"
    log_level: str = "info"
    residency_check_s: float = 60.0
    max_body_bytes: int = 1024 * 1024
    job_history: int = 1000
    job_history_s: float = 3600.0
    cancel_memory_s: float = 60.0
    cancel_memory_max: int = 100_000
    cancel_complete_s: float = 5.0  # CONTRACT §4: a cancel is complete within 5 s, worst case
    step_tokens: int = 128
    engine_nice: int = 10
    prefix_cache_tokens: int = 4096
    keepalive_s: float = 15.0
    stall_timeout_s: float = 30.0
    shutdown_grace_s: float = 2.0
    auth_file: Path | None = None  # principals and their tokens (orcd/auth.py)
    public_metrics: bool = False  # /metrics without a token, even with an auth file
    insecure_no_auth: bool = False  # allow a non-loopback bind without an auth file
    # Queued + running jobs per principal; None: the queue depth with an auth file, and no
    # limit of its own without one (the one principal then is every caller).
    max_active_per_principal: int | None = None
    ledger: LedgerSetting = "default"

    def active_limit(self, authenticated: bool) -> int | None:
        """The per-principal limit of queued + running jobs in force, or None for none."""
        if self.max_active_per_principal is not None:
            return self.max_active_per_principal
        return max(1, self.queue_depth) if authenticated else None


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(config: Config) -> None:
    """Refuse to serve jobs to the network without principals (CONTRACT §10)."""
    if config.auth_file is None and not config.insecure_no_auth and not is_loopback(config.host):
        raise ConfigError(
            f"refusing to bind {config.host} without --auth-file: anyone who can reach it could "
            "run, see and cancel every job; pass --auth-file PATH, or --insecure-no-auth to "
            "serve without tokens anyway")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return value


def _nice(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 19:
        raise ValueError(f"must be 0..19, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be 0..65535, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be greater than 0, got {text}")
    return value


def _ledger(text: str) -> LedgerSetting:
    return "none" if text == "none" else Path(text)


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise ValueError(f"must be an http:// or https:// URL, got {text!r}")
    return text


# (flag, attribute, converter, help). The order is the order of `orcd serve --help`.
_FLAGS: list[tuple[str, str, object, str]] = [
    ("--model", "model", Path, "GGUF model file (default: Gemma 3 270M Q4_K_M from its package)"),
    ("--host", "host", str, "address to bind (default 127.0.0.1)"),
    ("--port", "port", _port, "port to bind; 0 picks a free one and prints it (default 8080)"),
    ("--worker-id", "worker_id", str, "name in logs, /health and the ready callback"),
    ("--gpu-device", "gpu_device", _non_negative_int,
     "offload every layer to this CUDA device (default: CPU)"),
    ("--n-ctx", "n_ctx", _positive_int,
     "context length in tokens (default 4096, or the model's own if smaller)"),
    ("--threads", "threads", _positive_int,
     "threads for decoding and prompt evaluation (default: every core)"),
    ("--slots", "slots", _positive_int,
     "jobs generating at once, in one batch (default 4)"),
    ("--step-tokens", "step_tokens", _positive_int,
     "prompt tokens evaluated per batch step, shared by joining jobs (default 128)"),
    ("--engine-nice", "engine_nice", _nice,
     "nice value 0-19 of the engine's threads, so the HTTP loop (cancels, /health) wins the "
     "CPU when it needs it; 0 shares the CPU evenly with other programs (default 10)"),
    ("--prefix-cache-tokens", "prefix_cache_tokens", _non_negative_int,
     "KV positions kept for what finished jobs evaluated (prompt and generated tokens), "
     "reused by prompts that start with it; 0 turns the cache off (default 4096)"),
    ("--queue-depth", "queue_depth", _non_negative_int,
     "jobs that may wait beyond the slots (default 16)"),
    ("--max-tokens-out", "max_tokens_out", _positive_int,
     "upper bound of a job's max_tokens (default 2048)"),
    ("--inference-timeout-s", "inference_timeout_s", _positive_float,
     "deadline of a job, queue time included (default 300)"),
    ("--drain-timeout-s", "drain_timeout_s", _positive_float,
     "how long running jobs may finish on shutdown (default 5)"),
    ("--callback-url", "callback_url", _url,
     "POST {worker_id, model_ref, vram_bytes, uri} here once ready"),
    ("--callback-timeout-s", "callback_timeout_s", _positive_float,
     "how long to retry the ready callback before exiting 1 (default 30)"),
    ("--log-format", "log_format", str, "json (default) or text"),
    ("--log-level", "log_level", str, "debug, info (default), warning or error"),
    ("--residency-check-s", "residency_check_s", _positive_float,
     "seconds between GPU residency checks (default 60)"),
    ("--max-body-bytes", "max_body_bytes", _positive_int,
     "largest accepted request body (default 1048576)"),
    ("--job-history", "job_history", _non_negative_int,
     "finished jobs remembered for GET /jobs (default 1000)"),
    ("--job-history-s", "job_history_s", _positive_float,
     "seconds a finished job is remembered (default 3600)"),
    ("--keepalive-s", "keepalive_s", _positive_float,
     "send a ': keep-alive' comment after this many seconds of silence (default 15)"),
    ("--stall-timeout-s", "stall_timeout_s", _positive_float,
     "cancel a job whose client takes no bytes for this long (default 30)"),
    ("--auth-file", "auth_file", Path,
     "principals and their token digests; every route but /health then needs a bearer "
     "token (see docs/auth.md)"),
    ("--max-active-per-principal", "max_active_per_principal", _positive_int,
     "queued + running jobs one principal may hold; past it 429 QUOTA_EXCEEDED (default: "
     "the queue depth with --auth-file, no limit of its own without)"),
    ("--ledger", "ledger", _ledger,
     "SQLite file of every job record, or 'none' (default: "
     "$XDG_STATE_HOME/orcd/ledger-PORT.sqlite3)"),
]

# (flag, attribute, help): switches without a value; ORCD_<NAME>=1/true/yes/on sets them.
_SWITCHES: list[tuple[str, str, str]] = [
    ("--public-metrics", "public_metrics", "serve /metrics without a token (with --auth-file)"),
    ("--insecure-no-auth", "insecure_no_auth",
     "allow binding a non-loopback address without --auth-file"),
]
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")

_CHOICES = {"log_format": ("json", "text"), "log_level": ("debug", "info", "warning", "error")}


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="orcd", description="orcd: an LLM inference worker over HTTP/SSE.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="serve one GGUF model over HTTP (the default command)")
    serve.error = parser.error  # type: ignore[method-assign]
    for flag, attr, _conv, help_text in _FLAGS:
        env = "ORCD_" + attr.upper()
        serve.add_argument(flag, dest=attr, default=None, metavar=attr.upper(),
                           help=f"{help_text} [env {env}]")
    for flag, attr, help_text in _SWITCHES:
        env = "ORCD_" + attr.upper()
        serve.add_argument(flag, dest=attr, action="store_true", default=None,
                           help=f"{help_text} [env {env}=1]")
    fetch = sub.add_parser("fetch-model", help="write the default model into a folder")
    fetch.error = parser.error  # type: ignore[method-assign]
    fetch.add_argument("--out", default="models", help="folder to write into (default models/)")
    add_token_parser(sub, parser)
    add_commands(sub)
    add_fleet_parser(sub, parser.error)  # type: ignore[arg-type]
    return parser


def config_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Merge parsed flags over ``ORCD_*`` variables over defaults; validate every value."""
    values: dict[str, object] = {}
    for flag, attr, conv, _help in _FLAGS:
        raw = getattr(args, attr, None)
        source = flag
        if raw is None:
            raw = environ.get("ORCD_" + attr.upper())
            source = "ORCD_" + attr.upper()
        if raw is None or raw == "":
            continue
        try:
            value = conv(raw)  # type: ignore[operator]
        except ValueError as exc:
            reason = str(exc)
            if "invalid literal" in reason or "could not convert" in reason:
                reason = "not a number"
            raise ConfigError(f"{source}={raw!r}: {reason}") from None
        choices = _CHOICES.get(attr)
        if choices is not None and value not in choices:
            raise ConfigError(f"{source}={raw!r}: must be one of {', '.join(choices)}")
        values[attr] = value
    for _flag, attr, _help in _SWITCHES:
        if getattr(args, attr, None):
            values[attr] = True
            continue
        name = "ORCD_" + attr.upper()
        raw = environ.get(name, "")
        if raw.lower() not in _TRUE + _FALSE:
            raise ConfigError(f"{name}={raw!r}: must be 1, true, yes, on or 0, false, no, off")
        values[attr] = raw.lower() in _TRUE
    return Config(**values)  # type: ignore[arg-type]


def parse_argv(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[str, argparse.Namespace]:
    """Parse a command line; ``orcd`` alone means ``orcd serve``."""
    argv = list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    return args.command, args
