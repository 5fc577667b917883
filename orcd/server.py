"""The worker process: HTTP first, the model in the background, drain on the way out.

:func:`serve` owns every task: the job registry's nursery, hypercorn, the model loader,
the health refresher and the ready callback. It supports ``nursery.start`` and reports
the bound port once the server listens and the job ledger is open (the model may still be
loading then).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig

from . import logs
from .api import create_app
from .api.lifetime import RequestLifetime
from .api.transport import Connections, serve_http
from .auth import AuthFile, Principals
from .bridge import Engine
from .config import Config, check_exposure
from .errors import ConfigError, OrcdError
from .health import HealthState, Nvml
from .jobs import CancelReason, Job, JobRegistry
from .ledger import Ledger, default_path
from .metrics import Metrics

try:
    VERSION = version("orcd")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    VERSION = "0.0.0"

# The loader gets a progress callback; when it returns False the load should stop.
EngineFactory = Callable[[Config, Callable[[float], bool]], Engine]


class FatalError(OrcdError):
    """The worker cannot go on (the model did not load, the ready callback failed)."""

    code = "FATAL"


def llama_engine_factory(config: Config, on_progress: Callable[[float], bool]) -> Engine:
    """Load the configured model (or the default one) with llama.cpp; runs in a thread."""
    from .engine import BatchEngine
    from .models import default_model

    path = config.model if config.model is not None else default_model()

    def on_llama_log(level: int, text: str) -> None:
        logs.log("llama_log", f"llama.cpp: {text}", level=level)

    return BatchEngine(path, n_ctx=config.n_ctx, threads=config.threads, slots=config.slots,
                       step_tokens=config.step_tokens, nice=config.engine_nice,
                       prefix_cache_tokens=config.prefix_cache_tokens,
                       gpu_device=config.gpu_device, on_progress=on_progress,
                       on_llama_log=on_llama_log)


@attrs.define(eq=False)
class Worker:
    """The state every route reads: config, jobs, metrics, health and lifecycle."""

    config: Config
    registry: JobRegistry
    metrics: Metrics
    principals: Principals | None = None  # None: no auth file, every caller is `anonymous`
    health_state: HealthState = attrs.field(factory=HealthState)
    load_progress: float = 0.0
    uri: str | None = None
    nvml: Nvml | None = None
    shutdown_reason: str | None = None
    connections: Connections | None = None
    lifetime: RequestLifetime | None = None  # set by create_app
    load_abort: threading.Event = attrs.field(factory=threading.Event)
    _shutdown: trio.Event = attrs.field(factory=trio.Event)
    _logged_pct: int = -1

    def open_streams(self) -> int:
        """Requests holding a job whose stream has not been written to its end."""
        return self.lifetime.holding if self.lifetime is not None else 0

    @property
    def engine(self) -> Engine | None:
        return self.registry.engine

    def request_shutdown(self, why: str) -> None:
        if self.shutdown_reason is None:
            self.shutdown_reason = why
            self.registry.draining = True
        self.load_abort.set()  # a model still loading stops loading
        self._shutdown.set()

    async def wait_shutdown(self) -> None:
        await self._shutdown.wait()

    def on_request_end(self, job: Job, peer: tuple[str, int] | None) -> None:
        """The request that created ``job`` ended; if the job has not, its client is gone."""
        stalled = self.connections is not None and self.connections.was_stalled(peer)
        reason: CancelReason = "client_stalled" if stalled else "client_disconnect"
        phase = job.phase
        if job.request_cancel(reason, job.principal):  # the owner's client went away
            logs.log("client_disconnect", f"Client of job {job.job_id} "
                     f"{'stopped reading' if stalled else 'disconnected'}", job_id=job.job_id,
                     correlation_id=job.correlation_id, phase=phase, reason=reason)

    def on_load_progress(self, fraction: float) -> None:
        """Record load progress; logs ``model_load_progress`` at 0/25/50/75/100 %."""
        self.load_progress = max(self.load_progress, min(1.0, fraction))
        pct = int(self.load_progress * 100) // 25 * 25
        while self._logged_pct < pct:
            self._logged_pct += 25 if self._logged_pct >= 0 else 1
            logs.log("model_load_progress", f"Model load {self._logged_pct}%",
                     progress=self._logged_pct)

    def health(self) -> dict[str, Any]:
        stats = self.registry.statistics()
        engine = self.engine
        h = self.health_state
        if self.registry.draining:
            state, status = "draining", "draining"
        elif engine is None:
            state, status = "starting", "loading"
        else:
            state = "busy" if stats.running >= stats.slots else "ready"
            status = "unhealthy" if h.unhealthy_reason else "ok"
        info = engine.info if engine is not None else None
        body: dict[str, Any] = {
            "status": status,
            "state": state,
            "worker_id": self.config.worker_id,
            "model": info.name if info else None,
            "quant_kind": info.quant_kind if info else None,
            "resident": h.resident if self.nvml else False,
            "device": info.device if info else (
                "cpu" if self.config.gpu_device is None else f"cuda:{self.config.gpu_device}"),
            "vram_bytes_used": h.vram_bytes_used if self.nvml else 0,
            "ram_bytes_used": h.ram_bytes_used,
            "tokenizer_kind": info.tokenizer_kind if info else None,
            "vocab_size": info.vocab_size if info else None,
            "context_length": info.context_length if info else None,
            "uptime_seconds": round(time.monotonic() - h.started_mono, 3),
            "capabilities": ["text-gen"],
            "protocol": "sse",
            "slots": stats.slots,
            "active_jobs": stats.running,
            "queued_jobs": stats.queued,
            "load_progress": round(self.load_progress, 4),
            "version": VERSION,
            "ledger": self._ledger_health(),
        }
        if engine is not None:
            body.update(self._engine_health(engine))
        if h.unhealthy_reason:
            body["unhealthy_reason"] = h.unhealthy_reason
        return body

    def _ledger_health(self) -> dict[str, Any] | None:
        """The ledger's state (None without one): serving goes on while it fails."""
        ledger = self.registry.ledger
        if ledger is None:
            return None
        return {"path": str(ledger.path), **ledger.health().as_dict()}

    def _engine_health(self, engine: Engine) -> dict[str, Any]:
        """The batch: KV use, the prefix cache and what runs in each slot (CONTRACT §8).

        With principals, /health needs no token, so it names no job: to a user another
        principal's job does not exist."""
        stats = engine.statistics()
        named = self.principals is None
        running = []
        for s in stats.running:
            running.append({
                "slot": s.slot, "job_id": s.tag if named and s.tag else None,
                "phase": s.phase, "prompt_tokens": s.prompt_tokens,
                "prompt_tokens_done": s.prompt_tokens_done, "tokens_out": s.tokens_out})
        return {
            "kv_tokens_used": stats.kv_tokens_used,
            "kv_tokens_total": stats.kv_tokens_total,
            "prefix_cache_tokens": stats.prefix_cache_tokens,
            "prefix_cache_entries": stats.prefix_cache_entries,
            "running": running,
            "abort_callback": getattr(engine, "abort_callback", "c"),
        }


def load_principals(config: Config) -> Principals | None:
    """The auth file's principals (None without one), after checking that a worker without
    them binds loopback only. Raises :class:`ConfigError` (one line) on either problem."""
    principals = AuthFile.load(config.auth_file) if config.auth_file is not None else None
    check_exposure(config)
    return principals


async def serve(
    config: Config,
    *,
    principals: Principals | None = None,
    engine_factory: EngineFactory = llama_engine_factory,
    nvml_module: Any | None = None,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[Worker] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the worker until it is told to shut down, then drain and return.

    ``principals``: already loaded from ``config.auth_file`` (the CLI does, to fail before
    anything starts); loaded here when None. Raises :class:`ConfigError` for a bad auth
    file or an unprotected public bind, and :class:`FatalError` when the ledger cannot be
    opened, the model cannot be loaded or the ready callback never succeeds; the CLI turns
    those into one line on stderr and exit code 1.
    """
    if principals is None:
        principals = load_principals(config)
    else:
        check_exposure(config)
    metrics = Metrics()
    registry = JobRegistry(config, metrics,
                           active_limit=config.active_limit(principals is not None))
    worker = Worker(config, registry, metrics, principals=principals)
    worker.connections = connections = Connections(config.stall_timeout_s)
    app = create_app(worker)
    hcfg = HypercornConfig()
    hcfg.bind = [f"[{config.host}]:{config.port}" if ":" in config.host
                 else f"{config.host}:{config.port}"]
    hcfg.accesslog = None
    http_log = logging.getLogger("orcd.http")
    http_log.setLevel(logging.WARNING)
    hcfg.errorlog = http_log
    hcfg.keep_alive_timeout = 75.0
    stop_http = trio.Event()
    http_done = trio.Event()

    async def run_http(task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await serve_http(app, hcfg, connections, shutdown_trigger=stop_http.wait,
                             task_status=task_status)
        finally:
            http_done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        if handle_signals:
            nursery.start_soon(_watch_signals, worker)
        binds = await nursery.start(run_http)
        worker.uri = binds[0]
        port = int(binds[0].rsplit(":", 1)[1])
        logs.log("startup", f"Listening on {worker.uri}", uri=worker.uri, port=port,
                 version=VERSION, principals=len(principals) if principals else 0)
        fatal: list[FatalError] = []
        # Opened now that the port is known (--port 0 has its own file), before any job.
        try:
            registry.ledger = await _open_ledger(config, port)
        except ConfigError as exc:
            logs.log("error", f"Cannot open the ledger: {exc.message}", level=logging.ERROR)
            fatal.append(FatalError(exc.message))
            worker.request_shutdown("ledger unavailable")
        task_status.started(worker)
        if not fatal:
            nursery.start_soon(_load_then_announce, worker, engine_factory, nvml_module, fatal)
        await worker.wait_shutdown()
        # From here the process has drain_timeout_s + shutdown_grace_s, whatever clients do.
        deadline = trio.current_time() + config.drain_timeout_s + config.shutdown_grace_s
        if handle_signals:
            _exit_backstop(config.drain_timeout_s + config.shutdown_grace_s + 1.0)
        logs.log("shutdown", f"Draining ({worker.shutdown_reason}); running jobs get "
                 f"{config.drain_timeout_s:g} s", reason=worker.shutdown_reason)
        with trio.move_on_at(deadline):
            await registry.drain(config.drain_timeout_s)
        # Every job has ended: clients that still read get the terminal frame and the end
        # of the body. A request is done once the server has written all of it.
        with trio.move_on_at(deadline):
            while worker.open_streams():  # noqa: ASYNC110 - a bounded poll of live requests
                await trio.sleep(0.005)
        # Stop listening; requests still in flight finish, idle connections are closed;
        # at the hard deadline whatever is left is closed too.
        hcfg.graceful_timeout = max(0.0, deadline - trio.current_time())
        stop_http.set()
        lifetime = worker.lifetime
        assert lifetime is not None
        with trio.move_on_at(deadline):
            while not http_done.is_set():
                connections.close_idle(lifetime.busy)
                with trio.move_on_after(0.01):
                    await http_done.wait()
        if not http_done.is_set():
            aborted = connections.abort_all()
            logs.log("shutdown", f"Closed {aborted} connection(s) whose clients did not "
                     "read to the end", level=logging.WARNING, connections=aborted)
            with trio.move_on_after(1.0):
                await http_done.wait()
        nursery.cancel_scope.cancel()
    if registry.ledger is not None:  # every job has ended: its last records go out now
        await trio.to_thread.run_sync(registry.ledger.close)
    if worker.engine is not None:
        await trio.to_thread.run_sync(worker.engine.close)
    if worker.nvml is not None:
        worker.nvml.close()
    logs.log("shutdown", "Stopped", reason=worker.shutdown_reason)
    if fatal:
        raise fatal[0]


async def _open_ledger(config: Config, port: int) -> Ledger | None:
    """Open ``--ledger`` (in a thread: it takes a file lock and settles a dead predecessor's
    jobs), or None for ``--ledger none``."""
    if config.ledger == "none":
        return None
    path = default_path(port) if config.ledger == "default" else config.ledger
    return await trio.to_thread.run_sync(
        partial(Ledger.open, path, retention_s=config.job_history_s))


def _exit_backstop(after_s: float) -> None:
    """The last line of the shutdown deadline, for a process: if ``serve`` has not
    returned ``after_s`` from now (a bug, never a client), exit anyway."""

    def force_exit() -> None:
        logs.log("shutdown", f"Shutdown did not finish in {after_s:g} s; exiting now",
                 level=logging.ERROR)
        logs.flush(0.5)
        os._exit(0)

    timer = threading.Timer(after_s, force_exit)
    timer.daemon = True
    timer.start()


def _freeze_startup_objects() -> None:
    """Take what is alive once the model is loaded out of the cyclic collector's sight.

    A full collection walks every tracked object, holding the GIL: 29-40 ms for the 68-72k
    alive after start-up (modules, the app, the model's metadata), measured on the 2-core VM.
    It runs on whichever thread allocates, usually the event loop, so a cancel or a
    ``/health`` that meets it waits that long. Those objects live as long as the process, so
    they are collected once, then frozen; later collections walk only what came after.
    Once per process (the tests serve many workers in one): nothing is frozen yet.
    """
    if gc.get_freeze_count() == 0:
        gc.collect()  # garbage frozen now would never be collected
        gc.freeze()


async def _load_then_announce(worker: Worker, engine_factory: EngineFactory,
                              nvml_module: Any | None, fatal: list[FatalError]) -> None:
    config = worker.config
    token = trio.lowlevel.current_trio_token()
    worker.on_load_progress(0.0)

    def on_progress(fraction: float) -> bool:  # in the loading thread
        token.run_sync_soon(worker.on_load_progress, fraction)
        return not worker.load_abort.is_set()

    try:
        engine = await trio.to_thread.run_sync(engine_factory, config, on_progress)
    except OrcdError as exc:
        if worker.shutdown_reason is not None:
            logs.log("shutdown", f"Model load stopped by the shutdown: {exc.message}")
            return
        logs.log("error", f"Model failed to load: {exc.message}", level=logging.ERROR)
        fatal.append(FatalError(exc.message))
        worker.request_shutdown("model load failed")
        return
    if worker.shutdown_reason is not None:  # loaded just as the shutdown began
        await trio.to_thread.run_sync(engine.close)
        return
    worker.on_load_progress(1.0)
    if config.gpu_device is not None:
        try:
            worker.nvml = Nvml(config.gpu_device, nvml_module)
        except Exception as exc:  # noqa: BLE001 - NVML missing or broken: report, don't invent
            logs.log("error", f"NVML unavailable, GPU memory is not reported: {exc}",
                     level=logging.ERROR, device=config.gpu_device)
    # First readings before the worker says it is ready: neither /health nor the ready
    # callback shows a GPU worker's VRAM as 0 just because nobody has looked yet.
    worker.health_state.refresh_memory()
    if worker.nvml is not None:
        await _check_gpu(worker, engine)
    if getattr(engine, "abort_callback", "c") != "c":
        logs.log("startup", "orcd's C abort callback (orcd/_abortflag.c) is not built: a "
                 "cancel inside a decode waits for Python's GIL. Reinstall orcd with a C "
                 "compiler present.", level=logging.WARNING, abort_callback="python")
    unused = engine.info.cpu_sets_unused
    if engine.info.device == "cpu" and unused:
        logs.log("startup", f"llama.cpp was built without {', '.join(unused)}, which this CPU "
                 "has: `just rebuild-llama` builds it for this machine (README, "
                 "\"Building for this CPU\")",
                 level=logging.WARNING, cpu_sets_unused=list(unused))
    if hasattr(engine, "on_step"):
        engine.on_step = worker.metrics.observe_step
    worker.registry.attach_engine(engine)
    _freeze_startup_objects()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_refresh_health, worker, engine)
        info = engine.info
        logs.log("ready", f"Model {info.name} loaded ({info.quant_kind}, {info.device}, "
                 f"context {info.context_length}); ready for jobs", model=info.name,
                 device=info.device, context_length=info.context_length,
                 cpu_features=list(info.cpu_features))
        if config.callback_url:
            if not await _send_ready_callback(worker, engine):
                fatal.append(FatalError(
                    f"ready callback to {config.callback_url} failed for "
                    f"{config.callback_timeout_s:g} s"))
                worker.request_shutdown("ready callback failed")


async def _refresh_health(worker: Worker, engine: Engine) -> None:
    """Keep /health's numbers fresh: memory every second, GPU residency every N seconds."""
    h = worker.health_state
    while True:
        h.refresh_memory()
        if worker.nvml is not None:
            due = time.monotonic() - h.last_residency_check >= worker.config.residency_check_s
            if due:
                await _check_gpu(worker, engine)
        await trio.sleep(1.0)


async def _check_gpu(worker: Worker, engine: Engine) -> None:
    """Read VRAM and residency through NVML, in a thread (NVML calls may block)."""
    assert worker.nvml is not None
    h = worker.health_state
    await trio.to_thread.run_sync(h.check_gpu, worker.nvml, engine.info.size_bytes)
    worker.metrics.vram.set(h.vram_bytes_used)


async def _send_ready_callback(worker: Worker, engine: Engine) -> bool:
    """POST the ready announcement, retrying with backoff; False if it never succeeded."""
    import httpx

    config = worker.config
    assert config.callback_url is not None
    body = {"worker_id": config.worker_id, "model_ref": engine.info.path,
            "vram_bytes": worker.health_state.vram_bytes_used if worker.nvml else 0,
            "uri": worker.uri}
    delay = 0.25
    last = "no attempt"
    with trio.move_on_after(config.callback_timeout_s):
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                try:
                    resp = await client.post(config.callback_url, json=body)
                    if resp.status_code < 300:
                        logs.log("callback", f"Ready callback accepted by {config.callback_url}",
                                 status=resp.status_code)
                        return True
                    last = f"HTTP {resp.status_code}"
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                logs.log("callback", f"Ready callback failed ({last}); retrying in {delay:g} s",
                         level=logging.WARNING)
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
    logs.log("error", f"Ready callback to {config.callback_url} never succeeded: {last}",
             level=logging.ERROR)
    return False


async def _watch_signals(worker: Worker) -> None:
    """First SIGTERM/SIGINT drains; a second SIGINT exits at once."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if worker.shutdown_reason is not None and signum == signal.SIGINT:
                logs.log("shutdown", "Second SIGINT: exiting at once", level=logging.WARNING)
                logs.flush(0.2)
                sys.stderr.flush()
                os._exit(130)
            worker.request_shutdown(name)
