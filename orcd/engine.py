"""The llama.cpp engine: plain synchronous Python, no trio.

One :class:`LlamaEngine` holds one model and one llama.cpp context per slot. A generation
runs on one slot, in whatever thread calls :meth:`LlamaEngine.generate`, and stops when its
:class:`CancelFlag` is set: the loop checks the flag between prompt chunks and between
tokens, and llama.cpp's abort callback checks the same flag between the graph nodes of a
running decode, so a cancel never waits for the current chunk or token to finish.
Whatever ends a generation, the slot's KV cache is cleared before ``generate`` returns.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import attrs

from .errors import ModelLoadError

Phase = Literal["queued", "prompt", "decode"]
GGUF_MAGIC = b"GGUF"
PROMPT_CHUNK = 128  # tokens per llama_decode call: 128 halves the abort granularity of 256
# at no measurable cost in prompt speed (64 costs 20 %)
DECODE_ABORTED = 2  # llama_decode's return code when the abort callback said stop

# general.file_type -> name (llama.cpp's enum llama_ftype)
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 32: "BF16",
}


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


def seed32(seed: int) -> int:
    """Fold a 64-bit request seed to llama.cpp's 32-bit one, avoiding its 'random' value."""
    folded = (seed ^ (seed >> 32)) & 0xFFFFFFFF
    return 0xFFFFFFFE if folded == 0xFFFFFFFF else folded


class TextAssembler:
    """Turns token bytes into text pieces that are valid UTF-8 and free of stop sequences.

    Bytes of a multi-byte character split across tokens are held back until complete.
    Text that could be the start of a stop sequence is held back until it is known not to be.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(stops)
        self._pending = ""
        self.stopped_by: str | None = None

    def feed(self, data: bytes) -> str:
        """Add a token's bytes; return the text that is now safe to send ('' if none)."""
        self._pending += self._decoder.decode(data)
        if not self._stops:
            out, self._pending = self._pending, ""
            return out
        first: tuple[int, str] | None = None
        for stop in self._stops:
            at = self._pending.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            self.stopped_by = first[1]
            out, self._pending = self._pending[: first[0]], ""
            return out
        keep = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), keep, -1):
                if self._pending.endswith(stop[:n]):
                    keep = n
                    break
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """The held-back text at the end of a generation that did not hit a stop sequence."""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out


def check_gguf(path: Path) -> None:
    """Raise :class:`ModelLoadError` unless ``path`` is a readable GGUF file."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model {str(path)!r}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"model {str(path)!r} is not a GGUF file (magic {magic!r})")


# llama.cpp logs through one process-wide callback; orcd forwards warnings and errors to its
# own log (and never redirects file descriptors, which would swallow other threads' lines).
GGML_LOG_WARN = 3  # enum ggml_log_level in ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT
GGML_LOG_ERROR = 4
# What llama.cpp logs when the abort callback stops a decode (GGML_STATUS_ABORTED is 1,
# llama_decode returns 2): expected on every cancel, so not a warning or an error.
_ABORT_MARKERS = (
    "failed with error 1",
    "compute status: 1",
    "failed to decode, ret = 2",
    "removing memory module entries",
)
_log_sink: list[Callable[[int, str], None]] = []  # (logging level, message)


def _install_llama_log() -> None:
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        if level in (GGML_LOG_WARN, GGML_LOG_ERROR) and _log_sink:
            message = text.decode("utf-8", "replace").strip()
            if any(marker in message for marker in _ABORT_MARKERS):
                py_level = logging.DEBUG  # an aborted decode: a cancel doing its job
            elif level == GGML_LOG_ERROR:
                py_level = logging.ERROR
            else:
                py_level = logging.WARNING
            _log_sink[0](py_level, message)

    globals()["_llama_log_cb"] = _on_log  # keep the C callback alive
    llama_cpp.llama_log_set(_on_log, ctypes.c_void_p(0))


def _c_abort_callback() -> Any:
    """orcd's C abort callback (orcd/_abortflag.c), or None if it was not built."""
    import llama_cpp

    try:
        from . import _abortflag  # type: ignore[attr-defined]
    except ImportError:
        return None
    lib = ctypes.CDLL(_abortflag.__file__)
    _C_LIBS.append(lib)  # keep the library loaded as long as the pointer lives
    address = ctypes.cast(lib.orcd_abort_requested, ctypes.c_void_p).value
    return llama_cpp.ggml_abort_callback(address) if address else None


_C_LIBS: list[ctypes.CDLL] = []


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
        self._c_abort = _c_abort_callback()
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
        on_progress: Callable[[float], None] | None = None,
        on_llama_log: Callable[[int, str], None] | None = None,
    ) -> None:
        check_gguf(path)
        import llama_cpp
        from llama_cpp import _internals

        _install_llama_log()
        _log_sink[:] = [on_llama_log] if on_llama_log else []
        threads = threads or os.cpu_count() or 1
        mparams = llama_cpp.llama_model_default_params()
        if gpu_device is None:
            mparams.n_gpu_layers = 0
        else:
            mparams.n_gpu_layers = -1
            mparams.main_gpu = gpu_device
            mparams.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
        if on_progress is not None:

            def _progress(fraction: float, _user: ctypes.c_void_p) -> bool:
                on_progress(float(fraction))
                return True

            progress_cb = llama_cpp.llama_progress_callback(_progress)
            mparams.progress_callback = progress_cb
        try:
            self._model = _internals.LlamaModel(path_model=str(path), params=mparams, verbose=True)
        except ValueError as exc:
            raise ModelLoadError(f"llama.cpp could not load {str(path)!r}: {exc}") from None
        model = self._model
        n_ctx_train = model.n_ctx_train()
        self.n_ctx = min(n_ctx, n_ctx_train) if n_ctx_train > 0 else n_ctx
        try:
            self._slots = [_Slot(model, self.n_ctx, threads) for _ in range(slots)]
        except ValueError as exc:
            model.close()
            raise ModelLoadError(f"llama.cpp could not create a context: {exc}") from None
        meta = model.metadata()
        self._vocab = model.vocab
        self._add_bos = bool(model.add_bos_token())
        self.info = ModelInfo(
            name=meta.get("general.name") or path.name,
            path=str(path),
            quant_kind=_FILE_TYPES.get(int(meta.get("general.file_type", -1)), "unknown"),
            tokenizer_kind=meta.get("tokenizer.ggml.model", "unknown"),
            vocab_size=model.n_vocab(),
            context_length=self.n_ctx,
            n_ctx_train=n_ctx_train,
            device="cpu" if gpu_device is None else f"cuda:{gpu_device}",
            size_bytes=model.size(),
        )
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

    def tokenize(self, text: str) -> list[int]:
        """Tokens of a prompt, with BOS when the model wants one; special tokens are parsed."""
        return list(self._model.tokenize(text.encode("utf-8"), self._add_bos, True))

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
        from llama_cpp import _internals

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

        p = self.params
        sampler = _internals.LlamaSampler()
        try:
            if p.repetition_penalty != 1.0:
                sampler.add_penalties(
                    self.engine.info.vocab_size, 64, p.repetition_penalty, 0.0, 0.0)
            if p.temperature == 0.0:
                sampler.add_greedy()
            else:
                if p.top_k > 0:
                    sampler.add_top_k(p.top_k)
                if p.top_p < 1.0:
                    sampler.add_top_p(p.top_p, 1)
                if p.min_p > 0.0:
                    sampler.add_min_p(p.min_p, 1)
                sampler.add_temp(p.temperature)
                sampler.add_dist(seed32(p.seed))
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
