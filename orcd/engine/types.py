"""The engine's shared vocabulary: the cancel flag, sampling parameters, outcomes, model info.

Plain synchronous Python with no trio import: the job layer and every engine share these.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Sequence
from typing import Literal, Protocol

import attrs

Phase = Literal["queued", "prompt", "decode"]


class CancelFlag:
    """The one flag a job's cancel sets and the generation thread and llama.cpp both read.

    ``set`` is idempotent and remembers when it was first called (``time.monotonic``), so
    the cancel latency can be measured from the moment the cancel was observed.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._byte = ctypes.c_ubyte(0)  # what the C abort callback reads, without the GIL
        self.set_at: float | None = None

    def set(self) -> None:
        if self.set_at is None:
            self.set_at = time.monotonic()
        self._byte.value = 1
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    @property
    def address(self) -> int:
        return ctypes.addressof(self._byte)


class GenerationSink(Protocol):
    """Where a generation reports its progress; called from the generation thread."""

    def phase(self, phase: Phase) -> None: ...

    def token(self, text: str, tokens_out: int) -> None:
        """Called once per generated token; ``text`` is '' while bytes are held back."""


class SeqSink(Protocol):
    """Where the batch engine reports one sequence's progress; called from the engine thread."""

    def phase(self, phase: Phase) -> None:
        """"prompt" when the sequence joins the batch, "decode" before its first token."""

    def token(self, text: str, tokens_out: int) -> None:
        """One call per generated token; ``text`` is '' while bytes are held back."""

    def finished(self, outcome: Outcome) -> None:
        """Exactly once, after the sequence's KV cells were freed (or kept as a prefix)."""


@attrs.define(eq=False)
class SeqRequest:
    """One job's generation, as the job registry hands it to :class:`BatchEngine`."""

    prompt_tokens: Sequence[int]
    params: SamplingParams
    flag: CancelFlag
    sink: SeqSink
    tag: str = ""  # the caller's name for it (the job id), shown in statistics


@attrs.frozen
class SlotStats:
    """One running sequence, as :meth:`BatchEngine.statistics` saw it."""

    slot: int
    tag: str  # the request's tag (the job id)
    phase: Phase
    prompt_tokens: int
    prompt_tokens_done: int  # evaluated or taken from the prefix cache
    tokens_out: int
    step_tokens: int  # tokens it has in the step now running (0: not in it)


@attrs.frozen
class EngineStats:
    """A snapshot of the batch engine, taken by the engine thread after each step."""

    slots: int
    # KV positions held by running sequences and cache entries, as llama.cpp reports them
    # per holder (a prefix a slot copied from the cache shares the entry's cells)
    kv_tokens_used: int
    kv_tokens_total: int  # the context's KV size
    prefix_cache_tokens: int  # positions held by prefix cache entries
    prefix_cache_entries: int
    running: tuple[SlotStats, ...]
    waiting: int  # started, not yet joined
    steps: int  # decodes started
    steps_aborted: int  # decodes stopped by the abort callback (then re-run for survivors)
    step_running: bool
    prompt_tokens_evaluated: int  # totals since load
    prompt_tokens_cached: int
    tokens_generated: int


@attrs.frozen
class ModelInfo:
    name: str
    path: str
    quant_kind: str
    tokenizer_kind: str
    vocab_size: int
    context_length: int
    n_ctx_train: int
    device: str
    size_bytes: int
    chat_template: str | None = None  # GGUF tokenizer.chat_template (Jinja2), if the model has one
    bos_text: str = ""  # the BOS token's text, for chat templates ("<bos>")
    eos_text: str = ""
    cpu_features: tuple[str, ...] = ()  # what llama.cpp's CPU kernels were built with
    cpu_sets_unused: tuple[str, ...] = ()  # x86 sets this CPU has that the build lacks


@attrs.frozen
class SamplingParams:
    max_tokens: int
    seed: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()


@attrs.frozen
class Outcome:
    """What actually happened to one generation."""

    status: Literal["completed", "cancelled", "failed"]
    phase: Phase  # where the generation was when it ended
    tokens_out: int
    decode_time_ms: float
    stopped_at: float  # time.monotonic() when generation had stopped
    stop_reason: str | None = None  # completed: max_tokens | eos | stop_sequence
    stop_sequence: str | None = None
    error_code: str | None = None  # failed: INTERNAL | VRAM_OOM
    error: str | None = None
    prompt_tokens_evaluated: int = 0  # prompt tokens this generation ran through the model
    prompt_tokens_cached: int = 0  # prompt tokens taken from the prefix cache instead


def seed32(seed: int) -> int:
    """Fold a 64-bit request seed to llama.cpp's 32-bit one, avoiding its 'random' value."""
    folded = (seed ^ (seed >> 32)) & 0xFFFFFFFF
    return 0xFFFFFFFE if folded == 0xFFFFFFFF else folded
