"""The continuous-batching engine: every running job shares one llama.cpp context.

One thread runs :meth:`BatchEngine.run`, a loop of *steps*. A step is one ``llama_decode``
over one token of every decoding sequence plus prompt chunks of prompt-phase sequences
(first come, first served) within ``step_tokens``. ``n_batch == n_ubatch`` is larger than
any step, so a step is exactly one ubatch: an aborted step leaves nothing behind in the KV
cache, and its logits are never read. Sequences join and leave between steps.

Cancelling (:meth:`BatchEngine.cancel`, right after the job's ``CancelFlag`` was set):

* the sequence leaves before the next step; a cancelled sequence never gets another token;
* if it dominates the running step (its prompt chunk is more than half the step's tokens)
  or every member of the step is cancelled, the step itself is aborted through llama.cpp's
  abort callback, polled after every graph node; the survivors re-run it, losing one step;
* the abort flag is one fresh byte per step, published under the engine lock together with
  the step's members, so a cancel that arrives late can only ever abort the step it saw.

KV cells are never held by anything but running sequences and the prefix cache
(:mod:`.prefix_cache`); what a finished sequence evaluated, its prompt and the tokens it
generated (all but the last, which no step fed), stays there for reuse unless it was
cancelled during its prompt: a chat's next turn resends the answer, and finds it cached.
The context holds ``n_ctx * slots + prefix_cache_tokens`` cells, so every job always has
room for its full ``n_ctx``.

Choosing ``step_tokens`` (bench/step_budget.py measures it): a step's time grows with its
prompt tokens, and on a CPU the abort callback cuts a step short within one graph node, so
there the budget trades prompt throughput against how long decoding sequences wait while a
long prompt is evaluated (one step per chunk), not cancel latency. Measured with Gemma 3
270M Q4_K_M on the shared 2-core development machine (three sequences decoding, a
481-token prompt joining; two runs under heavy load from other processes, so noisy):
budgets 32/64/128/256/512 gave 38-147 / 66-72 / 89-164 / 60-95 / 71 prompt tokens/s and
worst steps of 0.3-1.6 / 1.2-1.6 / 0.8-1.5 / 2.5-5.0 / 6.6 s. 128 had the best prompt
throughput in both runs and a worst step no longer than smaller budgets', so it is the
default (the single-sequence engine's chunk, 128, was chosen the same way). Cancelling the
sequence that dominates a step took 0.8-9.6 ms median (the aborted step) at every budget.

On a GPU (CUDA) a step cannot be cut short: llama.cpp hands the abort callback only to
backends that take one (CPU, Metal), and CUDA's does not. There the budget bounds cancel
latency: take the largest budget whose worst step stays under the latency target,
``step_tokens ~ target_seconds * prompt_tokens_per_second - slots``, with the throughput
measured on that device (run bench/step_budget.py there).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import attrs

from ..errors import ModelLoadError
from ..priority import lower_threads
from .model import c_abort_callback, effective_n_ctx, install_llama_log, load_model, model_info
from .prefix_cache import PrefixCache
from .sampling import (
    DECODE_ABORTED,
    DECODE_NO_KV_SLOT,
    DECODE_OK,
    TokenBytes,
    decode_failure,
    sequence_sampler,
)
from .text import TextAssembler
from .tokens import PromptTokens, safe_pairs
from .types import EngineStats, Outcome, Phase, SeqRequest, SlotStats

STEP_TOKENS = 128  # default prompt tokens per step (see the module docstring)
PREFIX_CACHE_TOKENS = 4096  # default prefix cache budget, in KV positions
CACHE_ENTRIES_PER_SLOT = 2  # prefix cache entries (sequence ids) per slot


@attrs.define(eq=False)
class _Seq:
    """One running sequence; touched only by the engine thread."""

    req: SeqRequest
    slot: int
    prompt: tuple[int, ...]
    sampler: Any
    text: TextAssembler
    phase: Phase = "prompt"
    n_past: int = 0  # positions held in the KV cache
    n_cached: int = 0  # prompt positions taken from the prefix cache
    n_evaluated: int = 0  # prompt positions evaluated by this sequence's steps
    # generated tokens its steps have fed (positions len(prompt) .. n_past - 1 of its KV)
    fed: list[int] = attrs.Factory(list)
    tokens_out: int = 0
    next_token: int = -1  # decode phase: the sampled token its next step feeds
    t_decode: float = 0.0

    @property
    def owner(self) -> int:
        """The base sequence id; ``owner + 1`` is its pin (see prefix_cache)."""
        return 2 * self.slot


@attrs.define(eq=False)
class _Step:
    """The step now in ``llama_decode``: published under the engine lock."""

    members: list[tuple[_Seq, int]]  # (sequence, tokens it has in the step)
    abort: ctypes.c_ubyte  # this step's own abort flag, read by llama.cpp

    @property
    def n_tokens(self) -> int:
        return sum(n for _, n in self.members)


class _Kv:
    """The KV operations the prefix cache needs, on owners (base id and pin)."""

    def __init__(self, memory: Any) -> None:
        self.memory = memory

    def copy(self, src: int, dst: int, n: int) -> None:
        import llama_cpp

        for d in (dst, dst + 1):
            llama_cpp.llama_memory_seq_cp(self.memory, src, d, 0, n)

    def drop(self, owner: int) -> None:
        import llama_cpp

        for s in (owner, owner + 1):
            llama_cpp.llama_memory_seq_rm(self.memory, s, -1, -1)

    def truncate(self, owner: int, n: int) -> None:
        """Keep only positions [0, n) of ``owner``."""
        import llama_cpp

        for s in (owner, owner + 1):
            llama_cpp.llama_memory_seq_rm(self.memory, s, n, -1)

    def span(self, seq_id: int) -> tuple[int, int]:
        import llama_cpp

        return (int(llama_cpp.llama_memory_seq_pos_min(self.memory, seq_id)),
                int(llama_cpp.llama_memory_seq_pos_max(self.memory, seq_id)))

    def intact(self, owner: int, n: int) -> bool:
        expected = (0, n - 1) if n > 0 else (-1, -1)
        return self.span(owner) == expected and self.span(owner + 1) == expected

    def held(self, owner: int) -> int:
        lo, hi = self.span(owner)
        return hi - lo + 1 if hi >= 0 else 0


class BatchEngine:
    """A GGUF model in one llama.cpp context, generating for up to ``slots`` jobs at once."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int = 4096,
        threads: int | None = None,
        slots: int = 4,
        step_tokens: int = STEP_TOKENS,
        prefix_cache_tokens: int = PREFIX_CACHE_TOKENS,
        gpu_device: int | None = None,
        on_progress: Callable[[float], bool | None] | None = None,
        on_llama_log: Callable[[int, str], None] | None = None,
        nice: int = 0,
    ) -> None:
        import llama_cpp
        from llama_cpp import _internals

        if slots < 1 or step_tokens < 1 or prefix_cache_tokens < 0:
            raise ValueError("slots and step_tokens must be positive, the cache budget >= 0")
        install_llama_log(on_llama_log)
        self._model = model = load_model(path, gpu_device=gpu_device, on_progress=on_progress)
        self.n_ctx = effective_n_ctx(model, n_ctx)
        self.step_tokens = step_tokens
        self._slots = slots
        self.nice = nice  # the engine threads' nice value, set by run() (0: unchanged)
        n_entries = CACHE_ENTRIES_PER_SLOT * slots
        threads = threads or os.cpu_count() or 1
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx * slots + prefix_cache_tokens
        params.n_batch = params.n_ubatch = step_tokens + slots
        params.n_seq_max = 2 * (slots + n_entries)  # an owner is two sequence ids
        params.kv_unified = True
        params.swa_full = True
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        try:
            self._ctx = _internals.LlamaContext(model=model, params=params, verbose=True)
        except ValueError as exc:
            model.close()
            raise ModelLoadError(f"llama.cpp could not create a context: {exc}") from None
        self.kv_size = int(llama_cpp.llama_n_ctx(self._ctx.ctx))
        self._batch = llama_cpp.llama_batch_init(params.n_batch, 0, 2)
        self._kv = _Kv(self._ctx.memory)
        owners = [2 * (slots + i) for i in range(n_entries)]
        self._cache = PrefixCache(self._kv, prefix_cache_tokens, owners)
        self._vocab = model.vocab
        self._add_bos = bool(model.add_bos_token())
        self._tokenizer = PromptTokens(self._tokenize_whole, safe_pairs(self._vocab, model.model))
        self._token_bytes = TokenBytes(self._vocab)
        self.info = model_info(model, path, n_ctx=self.n_ctx, gpu_device=gpu_device)

        # Called in the engine thread after each decode: (sequences, tokens, seconds).
        self.on_step: Callable[[int, int, float], None] | None = None
        self._probe: Callable[[], None] | None = None
        self._armed = ctypes.c_ubyte(0)  # the abort byte of the step in llama_decode

        def _py_abort(_data: ctypes.c_void_p) -> bool:
            probe = self._probe
            if probe is not None:
                probe()
            return bool(self._armed.value)

        self._py_abort = llama_cpp.ggml_abort_callback(_py_abort)
        self._c_abort = c_abort_callback()
        # "c": the GIL-free callback of orcd/_abortflag.c; "python" if it was not built (a
        # cancel inside a decode then waits for the GIL between graph nodes).
        self.abort_callback = "c" if self._c_abort is not None else "python"

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[SeqRequest] = []
        self._step: _Step | None = None
        self._stopping = False
        self._exited = False
        self._live: list[_Seq] = []  # join order
        self._free_slots = list(range(slots))
        self._steps = 0
        self._steps_aborted = 0
        self._totals = [0, 0, 0]  # prompt evaluated, prompt cached, tokens generated
        self._kv_used = 0
        self._cache_tokens = 0
        self._cache_entries = 0
        self._running: tuple[SlotStats, ...] = ()
        self._warm_up(model)
        if on_progress is not None and on_progress(1.0) is False:
            self.close()
            raise ModelLoadError("model load was cancelled")

    # ---- the API the job registry calls (thread-safe) ----

    @property
    def n_slots(self) -> int:
        return self._slots

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = True) -> list[int]:
        """Tokens of ``text``. ``special``: parse special-token text such as ``<bos>`` into
        those tokens (never for text a user wrote into a chat message). ``add_bos``: prepend
        BOS when the model wants one."""
        return self._tokenizer.tokenize(text, add_bos=add_bos and self._add_bos,
                                        special=special)

    def _tokenize_whole(self, text: str, add_bos: bool, special: bool) -> list[int]:
        return list(self._model.tokenize(text.encode("utf-8"), add_bos, special))

    def start(self, req: SeqRequest) -> None:
        """Queue ``req`` to join the batch at the next step."""
        n_prompt = len(req.prompt_tokens)
        if n_prompt < 1 or n_prompt + req.params.max_tokens > self.n_ctx:
            raise ValueError(f"prompt ({n_prompt} tokens) plus max_tokens "
                             f"({req.params.max_tokens}) must fit n_ctx ({self.n_ctx})")
        with self._lock:
            if self._exited or self._stopping:
                raise RuntimeError("the batch engine has stopped")
            self._pending.append(req)
            self._wake.notify()

    def cancel(self, req: SeqRequest) -> None:
        """React to ``req.flag`` having been set: abort the running step if the sequence
        dominates it or every member is cancelled; wake the loop. Never waits."""
        with self._lock:
            step = self._step
            if step is not None and not step.abort.value and self._should_abort(step, req):
                step.abort.value = 1
            self._wake.notify()

    def stop(self) -> None:
        """Make :meth:`run` finish every sequence as cancelled and return."""
        with self._lock:
            self._stopping = True
            if self._step is not None:
                self._step.abort.value = 1
            self._wake.notify()

    def statistics(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                slots=self._slots,
                kv_tokens_used=self._kv_used,
                kv_tokens_total=self.kv_size,
                prefix_cache_tokens=self._cache_tokens,
                prefix_cache_entries=self._cache_entries,
                running=self._running,
                waiting=len(self._pending),
                steps=self._steps,
                steps_aborted=self._steps_aborted,
                step_running=self._step is not None,
                prompt_tokens_evaluated=self._totals[0],
                prompt_tokens_cached=self._totals[1],
                tokens_generated=self._totals[2],
            )

    def set_abort_probe(self, probe: Callable[[], None] | None) -> None:
        """Call ``probe`` from llama.cpp's abort callback inside every decode (for tests);
        while one is set, steps use the Python abort callback instead of the C one."""
        self._probe = probe

    def close(self) -> None:
        """Free the batch, the context and the model (after :meth:`run` returned)."""
        import llama_cpp

        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        self._ctx.close()
        self._model.close()

    # ---- the step loop (engine thread) ----

    def run(self) -> None:
        """The step loop; returns after :meth:`stop`, every sequence finished."""
        if self.nice:
            lower_threads(self.nice)
        try:
            while self._next_step():
                pass
        except BaseException as exc:
            for seq in list(self._live):
                self._finish(seq, "failed", error_code="INTERNAL", error=f"engine error: {exc!r}")
            raise
        finally:
            with self._lock:
                self._exited = True
                joining, self._pending = self._pending, []
            for req in joining[: len(self._free_slots)]:
                self._join(req)
            for seq in list(self._live):
                self._finish(seq, "cancelled")

    def _next_step(self) -> bool:
        with self._lock:
            while not (self._stopping or self._pending or self._live):
                self._wake.wait()
            if self._stopping:
                return False
            joining = self._pending[: len(self._free_slots)]
            del self._pending[: len(joining)]
        for req in joining:
            self._join(req)
        for seq in [s for s in self._live if s.req.flag.is_set()]:
            self._finish(seq, "cancelled")
        members = self._plan()
        if not members:
            return True
        step = _Step(members=members, abort=ctypes.c_ubyte(0))
        with self._lock:
            if self._stopping or any(s.req.flag.is_set() for s, _ in members):
                return True  # a cancel came in while planning: plan again without it
            self._step = step
            self._steps += 1
            self._running = self._slot_stats(step)
        t0 = time.monotonic()
        rc = self._decode(step)
        with self._lock:
            self._step = None
        on_step = self.on_step
        if on_step is not None:
            on_step(len(members), step.n_tokens, time.monotonic() - t0)
        self._after_step(step, rc)
        self._publish()
        return True

    def _join(self, req: SeqRequest) -> None:
        slot = self._free_slots.pop(0)
        seq = _Seq(req=req, slot=slot, prompt=tuple(req.prompt_tokens),
                   sampler=sequence_sampler(req.params, self.info.vocab_size),
                   text=TextAssembler(req.params.stop))
        self._live.append(seq)
        req.sink.phase("prompt")
        seq.n_cached = seq.n_past = self._cache.lookup(seq.prompt, seq.owner)

    def _plan(self) -> list[tuple[_Seq, int]]:
        """One token per decoding sequence, then prompt chunks within the budget."""
        members = [(s, 1) for s in self._live if s.phase == "decode"]
        budget = self.step_tokens
        for s in self._live:
            if s.phase == "prompt" and budget > 0:
                n = min(budget, len(s.prompt) - s.n_past)
                members.append((s, n))
                budget -= n
        return members

    def _should_abort(self, step: _Step, req: SeqRequest) -> bool:
        if all(s.req.flag.is_set() for s, _ in step.members):
            return True
        return any(s.req is req and s.phase == "prompt" and 2 * n > step.n_tokens
                   for s, n in step.members)

    def _decode(self, step: _Step) -> int:
        import llama_cpp

        b = self._batch
        i = 0
        for seq, n in step.members:
            if seq.phase == "decode":
                tokens: tuple[int, ...] = (seq.next_token,)
            else:
                tokens = seq.prompt[seq.n_past : seq.n_past + n]
            last_prompt = seq.phase == "prompt" and seq.n_past + n == len(seq.prompt)
            for j, token in enumerate(tokens):
                b.token[i] = token
                b.pos[i] = seq.n_past + j
                b.n_seq_id[i] = 2
                b.seq_id[i][0] = seq.owner
                b.seq_id[i][1] = seq.owner + 1
                b.logits[i] = seq.phase == "decode" or (last_prompt and j == n - 1)
                i += 1
        b.n_tokens = i
        self._armed = step.abort
        if self._c_abort is not None and self._probe is None:
            llama_cpp.llama_set_abort_callback(self._ctx.ctx, self._c_abort,
                                               ctypes.c_void_p(ctypes.addressof(step.abort)))
        else:
            llama_cpp.llama_set_abort_callback(self._ctx.ctx, self._py_abort, None)
        rc = int(llama_cpp.llama_decode(self._ctx.ctx, b))
        if rc == DECODE_NO_KV_SLOT and self._cache.entries:
            self._cache.clear()  # cannot happen with the KV sizing; make room and retry once
            rc = int(llama_cpp.llama_decode(self._ctx.ctx, b))
        return rc

    def _after_step(self, step: _Step, rc: int) -> None:
        if rc == DECODE_ABORTED:
            self._steps_aborted += 1
        if rc != DECODE_OK:
            # nothing of the step may stay: llama.cpp rolled back the first sequence id of
            # each token (the owner), the pins are ours to roll back
            for seq, _ in step.members:
                self._kv.truncate(seq.owner, seq.n_past)
                if not self._kv.intact(seq.owner, seq.n_past) and seq in self._live:
                    self._finish(seq, "failed", error_code="INTERNAL",
                                 error="the KV cache lost positions of an aborted step")
            if rc != DECODE_ABORTED:
                failure = decode_failure(rc)
                for seq, _ in step.members:
                    if seq in self._live:
                        self._finish(seq, "failed", error_code=failure.error_code,
                                     error=failure.error)
            return  # survivors re-run the step; cancelled ones leave before it
        index = 0
        for seq, n in step.members:
            seq.n_past += n
            index += n
            if seq.phase == "prompt":
                seq.n_evaluated += n
                self._totals[0] += n
                if seq.n_past < len(seq.prompt):
                    continue
            else:
                seq.fed.append(seq.next_token)
            if seq.req.flag.is_set():
                self._finish(seq, "cancelled")
                continue
            if seq.phase == "prompt":
                seq.phase = "decode"
                seq.req.sink.phase("decode")
                seq.t_decode = time.monotonic()
            self._sample(seq, index - 1)

    def _sample(self, seq: _Seq, index: int) -> None:
        """Sample ``seq``'s next token from the step's logits at batch ``index`` and report
        it, exactly as the single-sequence engine did (tests/reference_engine.py)."""
        import llama_cpp

        token = seq.sampler.sample(self._ctx, index)
        sink, text = seq.req.sink, seq.text
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            tail = text.flush()
            if tail and not seq.req.flag.is_set():
                sink.token(tail, seq.tokens_out)
            self._finish(seq, "completed", stop_reason="eos")
            return
        if seq.req.flag.is_set():  # never a token after the cancel
            self._finish(seq, "cancelled")
            return
        seq.tokens_out += 1
        self._totals[2] += 1
        piece = text.feed(self._token_bytes(token))
        if text.stopped_by is not None:
            sink.token(piece, seq.tokens_out)
            self._finish(seq, "completed", stop_reason="stop_sequence",
                         stop_sequence=text.stopped_by)
        elif seq.tokens_out >= seq.req.params.max_tokens:
            sink.token(piece + text.flush(), seq.tokens_out)
            self._finish(seq, "completed", stop_reason="max_tokens")
        else:
            sink.token(piece, seq.tokens_out)
            seq.next_token = token

    def _finish(self, seq: _Seq, status: Literal["completed", "cancelled", "failed"],
                **fields: Any) -> None:
        """Free the sequence's cells, then report how it ended. What it evaluated (its prompt
        and the tokens it generated and fed back) goes to the prefix cache first, unless it
        was cancelled during the prompt."""
        keep = min(seq.n_past, len(seq.prompt))
        if not (status == "cancelled" and seq.phase == "prompt") and keep > 0:
            self._cache.insert(seq.prompt[:keep] + tuple(seq.fed), seq.owner)
        self._kv.drop(seq.owner)
        self._live.remove(seq)
        self._free_slots.append(seq.slot)
        self._free_slots.sort()
        self._totals[1] += seq.n_cached
        decode_ms = (time.monotonic() - seq.t_decode) * 1000 if seq.t_decode else 0.0
        outcome = Outcome(
            status=status, phase=seq.phase, tokens_out=seq.tokens_out,
            decode_time_ms=round(decode_ms, 3), stopped_at=time.monotonic(),
            prompt_tokens_evaluated=seq.n_evaluated, prompt_tokens_cached=seq.n_cached,
            **fields,
        )
        seq.sampler.close()
        self._publish()
        seq.req.sink.finished(outcome)

    def _publish(self) -> None:
        """Refresh what :meth:`statistics` reports from llama.cpp's own KV bookkeeping."""
        owners = [s.owner for s in self._live] + [e.owner for e in self._cache.entries]
        kv_used = sum(self._kv.held(owner) for owner in owners)
        running = self._slot_stats(None)
        cache_tokens, cache_entries = self._cache.tokens, len(self._cache.entries)
        with self._lock:
            self._kv_used = kv_used
            self._running = running
            self._cache_tokens, self._cache_entries = cache_tokens, cache_entries

    def _slot_stats(self, step: _Step | None) -> tuple[SlotStats, ...]:
        in_step = {id(s): n for s, n in step.members} if step is not None else {}
        return tuple(
            SlotStats(slot=s.slot, tag=s.req.tag, phase=s.phase, prompt_tokens=len(s.prompt),
                      prompt_tokens_done=s.n_past if s.phase == "prompt" else len(s.prompt),
                      tokens_out=s.tokens_out, step_tokens=in_step.get(id(s), 0))
            for s in self._live
        )

    def _warm_up(self, model: Any) -> None:
        """One decode, so the first job does not pay llama.cpp's first-use costs."""
        import llama_cpp

        bos = model.token_bos()
        b = self._batch
        b.token[0], b.pos[0], b.n_seq_id[0] = bos if bos >= 0 else 0, 0, 1
        b.seq_id[0][0], b.logits[0], b.n_tokens = 0, 1, 1
        llama_cpp.llama_set_abort_callback(self._ctx.ctx, self._py_abort, None)
        llama_cpp.llama_decode(self._ctx.ctx, b)
        self._kv.drop(0)
