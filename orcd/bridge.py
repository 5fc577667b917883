"""The one bridge between the trio world and the engine thread.

One long-lived thread runs :meth:`BatchEngine.run`, the step loop (:func:`run_engine`, owned
by the job registry). Each job hands the engine a :class:`SeqRequest` (:func:`start`); the
engine reports from its thread through ``TrioToken.run_sync_soon``: fire and forget, in
order, so the engine never waits for the event loop. The sequence's ``finished`` report
comes last and sets :attr:`Generation.done`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from .engine import CancelFlag, EngineStats, ModelInfo, Outcome, Phase, SamplingParams, SeqRequest


class Engine(Protocol):
    """What the job layer needs from an engine (:class:`orcd.engine.BatchEngine`)."""

    info: ModelInfo

    @property
    def n_slots(self) -> int: ...

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = True
                 ) -> list[int]: ...

    def start(self, req: SeqRequest) -> None: ...

    def cancel(self, req: SeqRequest) -> None: ...

    def run(self) -> None: ...

    def stop(self) -> None: ...

    def statistics(self) -> EngineStats: ...

    def close(self) -> None: ...


class Generation:
    """One job's sequence in the engine, seen from trio; also its :class:`SeqSink`."""

    def __init__(self, prompt_tokens: Sequence[int], params: SamplingParams, flag: CancelFlag,
                 *, on_phase: Callable[[Phase], None],
                 on_token: Callable[[str, int], None], tag: str = "") -> None:
        self._trio = trio.lowlevel.current_trio_token()
        self._on_phase = on_phase
        self._on_token = on_token
        self.request = SeqRequest(prompt_tokens, params, flag, self, tag)
        self.done = trio.Event()  # set once the engine has freed the sequence
        self.outcome: Outcome | None = None

    # SeqSink: called in the engine thread
    def phase(self, phase: Phase) -> None:
        self._trio.run_sync_soon(self._on_phase, phase)

    def token(self, text: str, tokens_out: int) -> None:
        self._trio.run_sync_soon(self._on_token, text, tokens_out)

    def finished(self, outcome: Outcome) -> None:
        self._trio.run_sync_soon(self._finished, outcome)

    def _finished(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.done.set()


async def run_engine(engine: Engine) -> None:
    """Run the engine's step loop in its thread until cancelled; then stop it and wait
    until every sequence has been finished (never abandon a thread that holds the model)."""

    async def stop_when_cancelled() -> None:
        try:
            await trio.sleep_forever()
        finally:
            engine.stop()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_when_cancelled)
        await trio.to_thread.run_sync(engine.run, abandon_on_cancel=False)
        nursery.cancel_scope.cancel()
