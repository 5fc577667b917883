"""``orcd fleet run`` (``just fleet N``): N workers and their HAProxy, in the foreground.

The supervisor owns every child: N ``orcd serve`` processes on consecutive loopback ports
and one ``haproxy -db`` in front of them. Each child runs in its own session, so a Ctrl-C
in the terminal reaches only the supervisor, which then stops the fleet in order:

1. SIGTERM to every worker: each drains (``/health`` turns 503 so HAProxy takes it out of
   the ring, running streams still get their terminal events through the proxy);
2. once every worker has exited (or ``drain_timeout_s`` + a grace has passed: SIGKILL),
   SIGUSR1 to HAProxy (soft stop), then SIGTERM if it lingers.

A second Ctrl-C forwards SIGINT to the workers, which exit at once. A worker that dies on
its own is reported and left out of the ring by HAProxy's health checks; HAProxy dying
stops the fleet.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import IO

import attrs
import trio

from ..errors import OrcdError
from .haproxy import FleetSpec, WorkerAddr, consecutive_workers, render

MIN_HAPROXY = (2, 6)
STOP_GRACE_S = 5.0


class FleetError(OrcdError):
    """The fleet cannot start or run (HAProxy missing, a worker that never got ready)."""


@attrs.frozen
class FleetOptions:
    count: int = 3
    model: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    base_port: int = 8081
    run_dir: Path = Path(".")
    keepalive_s: float = 15.0
    inference_timeout_s: float = 300.0
    drain_timeout_s: float = 5.0
    ready_timeout_s: float = 300.0
    serve_args: tuple[str, ...] = ()
    install_haproxy: bool = False

    def spec(self) -> FleetSpec:
        return FleetSpec(consecutive_workers(self.count, self.base_port, self.host),
                         bind_host=self.host, bind_port=self.port,
                         keepalive_s=self.keepalive_s,
                         inference_timeout_s=self.inference_timeout_s,
                         stats_socket=self.run_dir / "haproxy.sock")

    def serve_command(self, worker: WorkerAddr) -> list[str]:
        cmd = [sys.executable, "-m", "orcd", "serve", "--host", worker.host,
               "--port", str(worker.port), "--worker-id", f"fleet-{worker.name}",
               "--keepalive-s", f"{self.keepalive_s:g}",
               "--inference-timeout-s", f"{self.inference_timeout_s:g}",
               "--drain-timeout-s", f"{self.drain_timeout_s:g}"]
        if self.model is not None:
            cmd += ["--model", str(self.model)]
        return cmd + list(self.serve_args)


def _say(line: str) -> None:
    print(line, flush=True)


def haproxy_version(binary: str) -> tuple[int, int]:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10).stdout
    words = out.split()
    try:
        major, minor = words[words.index("version") + 1].split(".")[:2]
        return int(major), int(minor)
    except (ValueError, IndexError):
        raise FleetError(f"cannot read the version of {binary}: {out[:80]!r}") from None


def ensure_haproxy(install: bool, say: Callable[[str], None] = _say) -> str:
    """The haproxy binary (2.6 or later); installed with apt-get when missing, if allowed
    and root; otherwise a :class:`FleetError` that says exactly what to run."""
    binary = shutil.which("haproxy")
    apt = shutil.which("apt-get")
    if binary is None and install and apt is not None and os.geteuid() == 0:
        say("orcd fleet: haproxy is missing; running: apt-get update && "
            "apt-get install -y haproxy")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run([apt, "update", "-q"], check=False, env=env)
        subprocess.run([apt, "install", "-y", "-q", "haproxy"], check=False, env=env)
        binary = shutil.which("haproxy")
    if binary is None:
        how = ("sudo apt-get update && sudo apt-get install -y haproxy" if apt is not None
               else "install HAProxy 2.6 or later with your package manager")
        raise FleetError(f"haproxy is not installed; run: {how}")
    if haproxy_version(binary) < MIN_HAPROXY:
        raise FleetError(f"{binary} is older than HAProxy 2.6 (needed for 'balance hash')")
    return binary


def _health(worker: WorkerAddr) -> int | None:
    try:
        with urllib.request.urlopen(f"{worker.uri}/health", timeout=1.0) as resp:  # noqa: S310
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except OSError:
        return None


@attrs.define(eq=False)
class _Child:
    name: str
    proc: trio.Process
    exited: trio.Event = attrs.field(factory=trio.Event)
    code: int | None = None

    async def watch(self, on_exit: Callable[[_Child], None]) -> None:
        self.code = await self.proc.wait()
        self.exited.set()
        on_exit(self)

    def signal(self, sig: int) -> None:
        if self.code is None:
            self.proc.send_signal(sig)


@attrs.define(eq=False)
class Supervisor:
    """Starts, watches and stops one fleet; :meth:`run` is its whole life."""

    options: FleetOptions
    say: Callable[[str], None] = _say
    workers: list[_Child] = attrs.field(factory=list)
    proxy: _Child | None = None
    stopping: bool = False
    stop: trio.Event = attrs.field(factory=trio.Event)
    hurry: trio.Event = attrs.field(factory=trio.Event)

    async def run(self, haproxy: str, config: Path,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        """Start the workers and HAProxy (``config``, see :func:`write_config`), report
        ready, wait for a signal, stop them; the exit code."""
        opts = self.options
        spec = opts.spec()
        logs: list[IO[bytes]] = []
        failure: str | None = None
        code = 1
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_signals, signals)
                    self.say(f"orcd fleet: starting {len(spec.workers)} workers; their logs "
                             f"and haproxy.cfg are in {opts.run_dir}")
                    for w in spec.workers:
                        log = (opts.run_dir / f"{w.name}.log").open("wb")
                        logs.append(log)
                        child = await self._spawn(nursery, w.name, opts.serve_command(w),
                                                  stdout=log, stderr=subprocess.STDOUT)
                        self.workers.append(child)
                    failure = await self._wait_ready(spec.workers)
                    if failure is None and not self.stop.is_set():
                        # HAProxy starts once every worker is ready, so its first checks
                        # pass. Its request log goes to stdout, its warnings to haproxy.log.
                        log = (opts.run_dir / "haproxy.log").open("wb")
                        logs.append(log)
                        self.proxy = await self._spawn(
                            nursery, "haproxy", [haproxy, "-db", "-f", str(config)], stderr=log)
                        failure = await self._wait_proxy(spec)
                    if failure is None and not self.stop.is_set():
                        for w in spec.workers:
                            self.say(f"  {w.name}  {w.uri}  ready")
                        self.say(f"orcd fleet ready on http://{spec.bind_host}:{spec.bind_port}"
                                 " (Ctrl-C drains every worker and stops HAProxy)")
                        task_status.started()
                    await self.stop.wait()
                    code = await self._shut_down()
                    nursery.cancel_scope.cancel()
            finally:
                for child in [*self.workers, *([self.proxy] if self.proxy else [])]:
                    child.signal(signal.SIGKILL)
                for opened in logs:
                    opened.close()
        if failure is not None:
            raise FleetError(failure)
        return code

    async def _spawn(self, nursery: trio.Nursery, name: str, command: list[str], *,
                     stderr: IO[bytes] | int, stdout: IO[bytes] | None = None) -> _Child:
        """Start one child in its own session (a terminal's Ctrl-C reaches only us)."""
        proc = await trio.lowlevel.open_process(command, start_new_session=True,
                                                stdout=stdout, stderr=stderr)
        child = _Child(name, proc)
        nursery.start_soon(child.watch, self._on_exit)
        return child

    async def _wait_proxy(self, spec: FleetSpec) -> str | None:
        front = WorkerAddr("front", spec.bind_host, spec.bind_port)
        with trio.move_on_after(10):
            while not self.stop.is_set():
                if await trio.to_thread.run_sync(_health, front) == 200:
                    return None
                await trio.sleep(0.05)
        self.stop.set()
        log = self.options.run_dir / "haproxy.log"
        return f"haproxy did not serve {front.uri}: {log.read_text()[-300:].strip()}"

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if self.stop.is_set():
                self.say("orcd fleet: second signal, stopping the workers at once")
                self.hurry.set()
            else:
                self.say(f"orcd fleet: {signal.Signals(signum).name}, draining every worker")
                self.stop.set()

    def _on_exit(self, child: _Child) -> None:
        if self.stopping:
            return
        self.say(f"orcd fleet: {child.name} exited with code {child.code}")
        if child is self.proxy:
            self.stop.set()

    async def _wait_ready(self, workers: Sequence[WorkerAddr]) -> str | None:
        """Poll every worker's /health until 200; the reason it failed, or None."""
        pending = {w.name: w for w in workers}
        with trio.move_on_after(self.options.ready_timeout_s):
            while pending and not self.stop.is_set():
                for child in self.workers:
                    if child.name in pending and child.exited.is_set():
                        log = self.options.run_dir / f"{child.name}.log"
                        tail = log.read_text(errors="replace").strip().splitlines()[-1:]
                        self.stop.set()
                        return (f"worker {child.name} exited with code {child.code} before "
                                f"it was ready: {' '.join(tail)[:300]}")
                for name, w in list(pending.items()):
                    if await trio.to_thread.run_sync(_health, w) == 200:
                        del pending[name]
                await trio.sleep(0.1)
        if pending and not self.stop.is_set():
            self.stop.set()
            return (f"workers {', '.join(pending)} not ready after "
                    f"{self.options.ready_timeout_s:g} s (see their logs in "
                    f"{self.options.run_dir})")
        return None

    async def _shut_down(self) -> int:
        """Drain the workers, then stop HAProxy; 0 when every worker exited 0."""
        self.stopping = True
        for child in self.workers:
            child.signal(signal.SIGTERM)
        with trio.move_on_after(self.options.drain_timeout_s + STOP_GRACE_S):
            async with trio.open_nursery() as nursery:
                async def forward_hurry() -> None:
                    await self.hurry.wait()
                    for child in self.workers:
                        child.signal(signal.SIGINT)
                nursery.start_soon(forward_hurry)
                for child in self.workers:
                    await child.exited.wait()
                nursery.cancel_scope.cancel()
        for child in self.workers:
            if not child.exited.is_set():
                self.say(f"orcd fleet: {child.name} did not exit in time, killing it")
                child.signal(signal.SIGKILL)
                await child.exited.wait()
        if self.proxy is not None:
            self.proxy.signal(signal.SIGUSR1)
            with trio.move_on_after(STOP_GRACE_S):
                await self.proxy.exited.wait()
            self.proxy.signal(signal.SIGTERM)
            await self.proxy.exited.wait()
        codes = {child.name: child.code for child in self.workers}
        self.say(f"orcd fleet: stopped ({json.dumps(codes)})")
        return 0 if all(code == 0 for code in codes.values()) else 1


def write_config(options: FleetOptions, haproxy: str) -> Path:
    """Render the fleet's haproxy.cfg into its run folder and have HAProxy check it."""
    options.run_dir.mkdir(parents=True, exist_ok=True)
    config = options.run_dir / "haproxy.cfg"
    config.write_text(render(options.spec()))
    check = subprocess.run([haproxy, "-c", "-q", "-f", str(config)],
                           capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise FleetError(f"haproxy rejects {config}: {check.stderr.strip()[:300]}")
    return config


def run_fleet(options: FleetOptions, say: Callable[[str], None] = _say) -> int:
    """Run a fleet in the foreground until a signal; the process exit code."""
    haproxy = ensure_haproxy(options.install_haproxy, say)
    config = write_config(options, haproxy)
    return trio.run(Supervisor(options, say).run, haproxy, config)
