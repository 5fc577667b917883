"""The one bridge between the trio world and a generation thread.

:func:`run_generation` runs :meth:`Engine.generate` in a worker thread with
``abandon_on_cancel=False`` (a thread that holds model memory is never abandoned) and
carries the thread's reports back into trio with ``TrioToken.run_sync_soon``: fire and
forget, in order, so the generation thread never waits for the event loop. The thread's
return value arrives after every report it queued, because trio delivers it the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from .engine import CancelFlag, GenerationSink, ModelInfo, Outcome, Phase, SamplingParams


class Engine(Protocol):
    """What the job layer needs from an engine (:class:`orcd.engine.LlamaEngine`, or a fake)."""

    info: ModelInfo

    @property
    def n_slots(self) -> int: ...

    def tokenize(self, text: str) -> list[int]: ...

    def generate(self, slot: int, prompt_tokens: Sequence[int], params: SamplingParams,
                 flag: CancelFlag, sink: GenerationSink) -> Outcome: ...

    def close(self) -> None: ...


class _TrioSink:
    """A :class:`GenerationSink` that replays every report inside the trio thread."""

    def __init__(self, token: trio.lowlevel.TrioToken, on_phase: Callable[[Phase], None],
                 on_token: Callable[[str, int], None]) -> None:
        self._token = token
        self._on_phase = on_phase
        self._on_token = on_token

    def phase(self, phase: Phase) -> None:
        self._token.run_sync_soon(self._on_phase, phase)

    def token(self, text: str, tokens_out: int) -> None:
        self._token.run_sync_soon(self._on_token, text, tokens_out)


async def run_generation(
    engine: Engine,
    slot: int,
    prompt_tokens: Sequence[int],
    params: SamplingParams,
    flag: CancelFlag,
    *,
    on_phase: Callable[[Phase], None],
    on_token: Callable[[str, int], None],
) -> Outcome:
    """Generate on ``slot`` in a thread; return what actually happened.

    Cancelling the calling task does not interrupt this call: set ``flag`` to stop the
    generation; it then returns promptly with a ``cancelled`` outcome.
    """
    sink = _TrioSink(trio.lowlevel.current_trio_token(), on_phase, on_token)
    return await trio.to_thread.run_sync(
        engine.generate, slot, prompt_tokens, params, flag, sink, abandon_on_cancel=False
    )
