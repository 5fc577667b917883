"""--engine-nice: the engine's threads (and ggml's compute threads) run at a lower priority,
the event loop's thread at its own."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import httpx
import pytest

from orcd.engine import BatchEngine, CancelFlag, Outcome, SamplingParams, SeqRequest


class _Done:
    def __init__(self) -> None:
        self.event = threading.Event()

    def phase(self, phase: str) -> None:
        pass

    def token(self, text: str, tokens_out: int) -> None:
        pass

    def finished(self, outcome: Outcome) -> None:
        self.event.set()


def _nice_values(pid: int | None = None) -> dict[int, int]:
    """Each thread of process ``pid`` (this one by default): its nice value."""
    out = {}
    for tid in os.listdir(f"/proc/{pid or os.getpid()}/task"):
        try:
            out[int(tid)] = os.getpriority(os.PRIO_PROCESS, int(tid))
        except OSError:
            continue  # the thread exited
    return out


def test_the_engine_threads_take_the_nice_value_and_the_main_thread_keeps_its_own(
        tiny_model: Path) -> None:
    engine = BatchEngine(tiny_model, n_ctx=512, threads=2, slots=1, nice=5)
    loop = threading.Thread(target=engine.run)
    loop.start()
    try:
        done = _Done()
        engine.start(SeqRequest(engine.tokenize("hello"), SamplingParams(max_tokens=8, seed=1),
                                CancelFlag(), done))
        assert done.event.wait(30)
        nice = _nice_values()
        assert nice[loop.native_id] == 5, nice
        assert nice[threading.main_thread().native_id] == 0, nice
    finally:
        engine.stop()
        loop.join(30)
        engine.close()


@pytest.mark.parametrize(("args", "engine_nice"), [((), 10), (("--engine-nice", "0"), 0)])
def test_orcd_serve_runs_its_engine_at_nice_10_by_default(
        tiny_model: Path, tmp_path: Path, args: tuple[str, ...], engine_nice: int) -> None:
    from .test_process import orcd_serve, sse

    with orcd_serve(tmp_path, "--model", str(tiny_model), *args) as srv:
        body = {"job_id": "nice-1", "prompt": "hello", "max_tokens": 4}
        with httpx.stream("POST", f"{srv.uri}/execute", json=body, timeout=30) as resp:
            assert [name for name, _ in sse(resp)][-1] == "end"
        nice = _nice_values(srv.proc.pid)
        assert nice[srv.proc.pid] == 0, nice  # the main thread runs the event loop
        assert sorted(set(nice.values())) == sorted({0, engine_nice}), nice


def test_the_threads_the_event_loop_waits_on_keep_their_priority(
        tiny_model: Path, tmp_path: Path) -> None:
    """The ledger writer shares a lock with the event loop (its queue): lowered, it could
    hold it while the scheduler keeps it off the CPU, and a cancel would wait milliseconds
    inside a call that records a job. The log writer shares none (its deque takes no lock)
    and keeps nice 0 so that a busy engine does not hold back the log."""
    from orcd import logs
    from orcd.ledger import Ledger

    listener = logs.writer_thread_id()
    with Ledger.open(tmp_path / "ledger.sqlite", retention_s=3600) as ledger:
        engine = BatchEngine(tiny_model, n_ctx=512, threads=2, slots=1, nice=6)
        loop = threading.Thread(target=engine.run)
        loop.start()
        try:
            done = _Done()
            engine.start(SeqRequest(engine.tokenize("hello"),
                                    SamplingParams(max_tokens=4, seed=1), CancelFlag(), done))
            assert done.event.wait(30)
            nice = _nice_values()
            assert nice[loop.native_id] == 6, nice
            assert listener is not None and nice[listener] == 0, nice
            assert ledger.thread_id is not None and nice[ledger.thread_id] == 0, nice
        finally:
            engine.stop()
            loop.join(30)
            engine.close()
