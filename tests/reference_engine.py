"""The single-sequence engine orcd served with before batching, kept as a test oracle.

The batch engine's tests compare its decode loop with this one (same sampler chain, stop
sequences, max_tokens). What follows is its original description.

The llama.cpp engine: plain synchronous Python, no trio.

One :class:`LlamaEngine` holds one model and one llama.cpp context per slot. A generation
runs on one slot, in whatever thread calls :meth:`LlamaEngine.generate`, and stops when its
:class:`CancelFlag` is set: the loop checks the flag between prompt chunks and between
tokens, and llama.cpp's abort callback checks the same flag between the graph nodes of a
running decode, so a cancel never waits for the current chunk or token to finish.
Whatever ends a generation, the slot's KV cache is cleared before ``generate`` returns.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from orcd.engine.model import (
    c_abort_callback,
    effective_n_ctx,
    install_llama_log,
    load_model,
    model_info,
)
from orcd.engine.sampling import make_sampler
from orcd.engine.text import TextAssembler
from orcd.engine.types import (
    CancelFlag,
    GenerationSink,
    Outcome,
    Phase,
    SamplingParams,
)
from orcd.errors import ModelLoadError

PROMPT_CHUNK = 128  # tokens per llama_decode call: 128 halves the abort granularity of 256
# at no measurable cost in prompt speed (64 costs 20 %)
DECODE_ABORTED = 2  # llama_decode's return code when the abort callback said stop


class _Slot:
    """One llama.cpp context with its batch and abort callback; used by one job at a time."""

    def __init__(self, model: Any, n_ctx: int, threads: int) -> None:
        import llama_cpp
        from llama_cpp import _internals

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = PROMPT_CHUNK
        params.n_ubatch = PROMPT_CHUNK
        params.n_seq_max = 1
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = _internals.LlamaContext(model=model, params=params, verbose=True)
        self.batch = _internals.LlamaBatch(n_tokens=PROMPT_CHUNK, embd=0, n_seq_max=1)
        self.probe: Callable[[], None] | None = None  # tests hold a decode here
        self.flag: CancelFlag | None = None

        def _abort(_data: ctypes.c_void_p) -> bool:
            if self.probe is not None:
                self.probe()
            flag = self.flag
            return flag is not None and flag.is_set()

        self._py_abort = llama_cpp.ggml_abort_callback(_abort)
        self._c_abort = c_abort_callback()
        self._idle = ctypes.c_ubyte(0)  # what the C callback reads between jobs: never set
        self.disarm()

    def arm(self, flag: CancelFlag) -> None:
        """Point llama.cpp's abort callback at this job's flag."""
        import llama_cpp

        self.flag = flag
        if self._c_abort is not None and self.probe is None:
            llama_cpp.llama_set_abort_callback(self.ctx.ctx, self._c_abort,
                                               ctypes.c_void_p(flag.address))
        else:
            llama_cpp.llama_set_abort_callback(self.ctx.ctx, self._py_abort, None)

    def disarm(self) -> None:
        import llama_cpp

        self.flag = None
        if self._c_abort is not None:
            llama_cpp.llama_set_abort_callback(self.ctx.ctx, self._c_abort,
                                               ctypes.c_void_p(ctypes.addressof(self._idle)))
        else:
            llama_cpp.llama_set_abort_callback(self.ctx.ctx, self._py_abort, None)

    def decode(self, tokens: Sequence[int], n_past: int) -> int:
        import llama_cpp

        self.batch.set_batch(tokens, n_past=n_past, logits_all=False)
        return int(llama_cpp.llama_decode(self.ctx.ctx, self.batch.batch))

    def clear(self) -> None:
        """Forget every cached token. Only the cache's bookkeeping is reset (data=False):
        zeroing the buffer itself would cost ~8 ms per job end for a 270M model, and the next
        job overwrites whatever it uses."""
        import llama_cpp

        llama_cpp.llama_memory_clear(self.ctx.memory, False)

    def cached_tokens(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_memory_seq_pos_max(self.ctx.memory, 0)) + 1

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()


class LlamaEngine:
    """A GGUF model loaded through llama-cpp-python, with ``slots`` independent contexts."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int = 4096,
        threads: int | None = None,
        slots: int = 1,
        gpu_device: int | None = None,
        on_progress: Callable[[float], bool | None] | None = None,
        on_llama_log: Callable[[int, str], None] | None = None,
    ) -> None:
        install_llama_log(on_llama_log)
        threads = threads or os.cpu_count() or 1
        self._model = model = load_model(path, gpu_device=gpu_device, on_progress=on_progress)
        self.n_ctx = effective_n_ctx(model, n_ctx)
        try:
            self._slots = [_Slot(model, self.n_ctx, threads) for _ in range(slots)]
        except ValueError as exc:
            model.close()
            raise ModelLoadError(f"llama.cpp could not create a context: {exc}") from None
        self._vocab = model.vocab
        self._add_bos = bool(model.add_bos_token())
        self.info = model_info(model, path, n_ctx=self.n_ctx, gpu_device=gpu_device)
        self._warm_up(model)
        if on_progress is not None:
            on_progress(1.0)

    def _warm_up(self, model: Any) -> None:
        """One decode per slot, so the first job does not pay llama.cpp's first-use costs."""
        bos = model.token_bos()
        token = bos if bos >= 0 else 0
        for s in self._slots:
            s.decode((token,), 0)
            s.clear()

    @property
    def n_slots(self) -> int:
        return len(self._slots)

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = True) -> list[int]:
        """Tokens of ``text``. ``special``: parse special-token text such as ``<bos>`` into
        those tokens (never for text a user wrote into a chat message). ``add_bos``: prepend
        BOS when the model wants one."""
        return list(self._model.tokenize(text.encode("utf-8"), add_bos and self._add_bos,
                                         special))

    def generate(
        self,
        slot: int,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        flag: CancelFlag,
        sink: GenerationSink,
    ) -> Outcome:
        """Evaluate the prompt and sample up to ``params.max_tokens`` tokens on ``slot``.

        Returns how the generation ended; it does not raise for a cancel or an engine
        failure. The slot's sequence state is cleared before it returns.
        """
        s = self._slots[slot]
        s.arm(flag)
        run = _Run(self, s, params, flag, sink)
        try:
            return run.execute(prompt_tokens)
        finally:
            s.disarm()
            s.clear()

    def cached_tokens(self, slot: int) -> int:
        """Tokens held in ``slot``'s KV cache: 0 whenever no job runs on it."""
        return self._slots[slot].cached_tokens()

    def set_abort_probe(self, probe: Callable[[], None] | None) -> None:
        """Call ``probe`` from llama.cpp's abort callback (inside a decode); for tests.

        While a probe is set, generations use the Python abort callback instead of the C one.
        """
        for s in self._slots:
            s.probe = probe

    def close(self) -> None:
        for s in self._slots:
            s.close()
        self._model.close()


class _Run:
    """The state of one generation; :meth:`execute` is the generation loop."""

    def __init__(
        self, engine: LlamaEngine, slot: _Slot, params: SamplingParams, flag: CancelFlag,
        sink: GenerationSink,
    ) -> None:
        self.engine = engine
        self.slot = slot
        self.params = params
        self.flag = flag
        self.sink = sink
        self.phase: Phase = "prompt"
        self.tokens_out = 0
        self.t_decode = 0.0

    def _end(self, status: Literal["completed", "cancelled", "failed"], **kw: object) -> Outcome:
        decode_ms = (time.monotonic() - self.t_decode) * 1000 if self.t_decode else 0.0
        return Outcome(
            status=status, phase=self.phase, tokens_out=self.tokens_out,
            decode_time_ms=round(decode_ms, 3), stopped_at=time.monotonic(), **kw,  # type: ignore[arg-type]
        )

    def _failed(self, rc: int) -> Outcome:
        if rc == 1:
            return self._end("failed", error_code="INTERNAL",
                             error="llama.cpp found no room in the KV cache for the batch")
        return self._end("failed", error_code="INTERNAL", error=f"llama_decode returned {rc}")

    def execute(self, prompt_tokens: Sequence[int]) -> Outcome:
        import llama_cpp

        self.sink.phase("prompt")
        n_past = 0
        for start in range(0, len(prompt_tokens), PROMPT_CHUNK):
            if self.flag.is_set():
                return self._end("cancelled")
            chunk = prompt_tokens[start : start + PROMPT_CHUNK]
            rc = self.slot.decode(chunk, n_past)
            if rc == DECODE_ABORTED:
                return self._end("cancelled")
            if rc != 0:
                return self._failed(rc)
            n_past += len(chunk)

        sampler = make_sampler(self.params, self.engine.info.vocab_size)
        try:
            return self._decode_loop(sampler, n_past, llama_cpp)
        finally:
            sampler.close()

    def _decode_loop(self, sampler: object, n_past: int, llama_cpp: object) -> Outcome:
        vocab = self.engine._vocab
        ctx = self.slot.ctx
        text = TextAssembler(self.params.stop)
        buf = ctypes.create_string_buffer(64)
        self.phase = "decode"
        self.sink.phase("decode")
        self.t_decode = time.monotonic()
        while True:
            if self.flag.is_set():
                return self._end("cancelled")
            token = sampler.sample(ctx, -1)  # type: ignore[attr-defined]
            if llama_cpp.llama_vocab_is_eog(vocab, token):  # type: ignore[attr-defined]
                tail = text.flush()
                if tail:
                    self.sink.token(tail, self.tokens_out)
                return self._end("completed", stop_reason="eos")
            self.tokens_out += 1
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)  # type: ignore[attr-defined]
            if n < 0:  # the piece is longer than the buffer: grow it and ask again
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)  # type: ignore[attr-defined]
            piece = text.feed(buf.raw[:n] if n > 0 else b"")
            if text.stopped_by is not None:
                self.sink.token(piece, self.tokens_out)
                return self._end("completed", stop_reason="stop_sequence",
                                 stop_sequence=text.stopped_by)
            if self.tokens_out >= self.params.max_tokens:
                self.sink.token(piece + text.flush(), self.tokens_out)
                return self._end("completed", stop_reason="max_tokens")
            self.sink.token(piece, self.tokens_out)
            rc = self.slot.decode((token,), n_past)
            if rc == DECODE_ABORTED:
                return self._end("cancelled")
            if rc != 0:
                return self._failed(rc)
            n_past += 1
