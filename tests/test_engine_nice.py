"""--engine-nice: the engine's threads (and ggml's compute threads) run at a lower priority,
the event loop's thread at its own."""

from __future__ import annotations

import os
import threading
from pathlib import Path

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


def _nice_values() -> dict[int, int]:
    return {int(tid): os.getpriority(os.PRIO_PROCESS, int(tid))
            for tid in os.listdir("/proc/self/task")}


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
