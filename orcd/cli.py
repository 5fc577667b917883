"""``orcd``: the command line. Errors are one line on stderr and exit code 1."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

import trio

from . import logs
from .auth import run_token_command
from .client.cli import COMMANDS as CLIENT_COMMANDS
from .client.cli import run_command
from .config import Config, config_from, parse_argv
from .errors import OrcdError
from .fleet.cli import main as fleet_main


class _ProgressBar:
    """A load progress bar on a terminal (stderr is a TTY and logs are text)."""

    def __init__(self) -> None:
        self.last = -1

    def __call__(self, fraction: float) -> None:
        pct = int(fraction * 100)
        if pct != self.last:
            self.last = pct
            filled = pct // 4
            end = "\n" if pct >= 100 else ""
            print(f"\rloading model [{'#' * filled}{'.' * (25 - filled)}] {pct:3d}%",
                  end=end, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        command, args = parse_argv(argv, os.environ)
        if command in CLIENT_COMMANDS:
            return run_command(command, args)
        if command == "fleet":
            return fleet_main(args)
        if command == "token":
            return run_token_command(args, os.environ)
        if command == "fetch-model":
            from .models import default_model

            print(default_model(args.out))
            return 0
        config = config_from(args, os.environ)
        return _serve(config)
    except OrcdError as exc:
        print(f"orcd: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _serve(config: Config) -> int:
    from .bridge import Engine
    from .engine import check_gguf
    from .server import (
        EngineFactory,
        FatalError,
        Worker,
        llama_engine_factory,
        load_principals,
        serve,
    )

    principals = load_principals(config)  # a bad auth file or a public bind fails now
    if config.model is not None:
        check_gguf(config.model)  # a bad path or file fails now, before anything listens
    logs.configure(config.worker_id, config.log_format, config.log_level)
    factory: EngineFactory = llama_engine_factory
    if sys.stderr.isatty() and config.log_format == "text":
        bar = _ProgressBar()

        def with_bar(cfg: Config, on_progress: Callable[[float], bool]) -> Engine:
            def both(f: float) -> bool:
                bar(f)
                return on_progress(f)
            return llama_engine_factory(cfg, both)

        factory = with_bar

    fatal: list[FatalError] = []

    async def serve_or_record(task_status: trio.TaskStatus[Worker]) -> None:
        # Caught here, inside the task: a nursery would wrap it in an ExceptionGroup.
        try:
            await serve(config, principals=principals, engine_factory=factory,
                        handle_signals=True, task_status=task_status)
        except FatalError as exc:
            fatal.append(exc)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            worker = await nursery.start(serve_or_record)
            print(f"orcd listening on {worker.uri}", flush=True)

    trio.run(run)
    logs.flush()  # every log line is out before the last word
    if fatal:
        print(f"orcd: error: {fatal[0].message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
