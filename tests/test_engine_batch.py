"""The continuous-batching engine on real llama.cpp (the tiny GGUF), driven from threads.

Each test runs ``BatchEngine.run`` in its own thread and drives it with start/cancel the
way the job registry does; a recorder sink collects what each sequence reported. Where a
test needs the engine *inside* a decode, an abort probe holds it there on a gate.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from orcd.engine import BatchEngine, CancelFlag, Outcome, SamplingParams, SeqRequest
from orcd.engine.sampling import decode_failure
from orcd.errors import ModelLoadError

from .reference_engine import LlamaEngine

WAIT = 30.0  # seconds; generous, only to turn a hang into a failure

PROMPTS = ["Write a haiku about rain", "1, 2, 3, 4,", "The capital of France is",
           "def fib(n):"]
LONG_PROMPT = "In the beginning " * 40  # ~680 tokens of the tiny byte-level vocabulary


class Recorder:
    """A SeqSink that remembers every call; hooks run in the engine thread."""

    def __init__(self, on_token: Callable[[Recorder], None] | None = None) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, Any]] = []
        self.done = threading.Event()
        self.outcome: Outcome | None = None
        self.on_token = on_token
        self.on_finished: Callable[[Recorder], None] | None = None
        self.decoding = threading.Event()

    def phase(self, phase: str) -> None:
        with self.lock:
            self.calls.append(("phase", phase))
        if phase == "decode":
            self.decoding.set()

    def token(self, text: str, tokens_out: int) -> None:
        with self.lock:
            self.calls.append(("token", (text, tokens_out)))
        if self.on_token is not None:
            self.on_token(self)

    def finished(self, outcome: Outcome) -> None:
        with self.lock:
            self.calls.append(("finished", outcome))
            self.outcome = outcome
        if self.on_finished is not None:
            self.on_finished(self)
        self.done.set()

    @property
    def tokens(self) -> list[tuple[str, int]]:
        with self.lock:
            return [c[1] for c in self.calls if c[0] == "token"]

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.tokens)

    def wait(self) -> Outcome:
        assert self.done.wait(WAIT), "the sequence never finished"
        assert self.outcome is not None
        finished = [c for c in self.calls if c[0] == "finished"]
        assert len(finished) == 1 and self.calls[-1][0] == "finished", self.calls[-3:]
        return self.outcome


class Driver:
    """One engine with its run() thread."""

    def __init__(self, engine: BatchEngine) -> None:
        self.engine = engine
        self.thread = threading.Thread(target=engine.run, name="batch-engine")
        self.thread.start()

    def request(self, prompt: str, *, max_tokens: int = 40, rec: Recorder | None = None,
                **params: Any) -> tuple[SeqRequest, Recorder]:
        rec = rec or Recorder()
        params.setdefault("temperature", 0.0)
        params.setdefault("seed", 1)
        req = SeqRequest(prompt_tokens=self.engine.tokenize(prompt),
                         params=SamplingParams(max_tokens=max_tokens, **params),
                         flag=CancelFlag(), sink=rec)
        return req, rec

    def start(self, prompt: str, **kw: Any) -> tuple[SeqRequest, Recorder]:
        req, rec = self.request(prompt, **kw)
        self.engine.start(req)
        return req, rec

    def run(self, prompt: str, **kw: Any) -> tuple[str, Outcome]:
        _, rec = self.start(prompt, **kw)
        outcome = rec.wait()
        return rec.text, outcome

    def cancel(self, req: SeqRequest) -> None:
        req.flag.set()
        self.engine.cancel(req)

    def assert_only_cache_holds_kv(self) -> None:
        stats = self.engine.statistics()
        assert stats.running == ()
        assert stats.kv_tokens_used == stats.prefix_cache_tokens

    def close(self) -> None:
        self.engine.stop()
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        self.engine.close()


@pytest.fixture
def make_engine(tiny_model: Path) -> Iterator[Callable[..., Driver]]:
    drivers: list[Driver] = []

    def make(**kw: Any) -> Driver:
        kw.setdefault("n_ctx", 2048)
        kw.setdefault("threads", 1)
        driver = Driver(BatchEngine(tiny_model, **kw))
        drivers.append(driver)
        return driver

    yield make
    for d in drivers:
        d.close()


def cached_positions(d: Driver, prompt: str, outcome: Outcome) -> int:
    """What a sequence that ended in its decode phase leaves in the prefix cache: its prompt
    and each generated token a step fed back, which is every one it reported except one that
    ended it (the max_tokens-th, or the one completing a stop sequence; an end-of-generation
    token is not reported)."""
    last_unfed = outcome.stop_reason in ("max_tokens", "stop_sequence")
    return len(d.engine.tokenize(prompt)) + outcome.tokens_out - last_unfed


def alone(make_engine: Callable[..., Driver], prompts: list[str], **kw: Any) -> list[str]:
    """Each prompt's output on a fresh engine, with nothing else running."""
    d = make_engine()
    outs = [d.run(p, **kw)[0] for p in prompts]
    d.close()
    return outs


def test_four_concurrent_sequences_match_each_alone(make_engine: Callable[..., Driver]) -> None:
    lengths = [40, 25, 60, 33]  # they leave the batch at different steps
    ref = [make_engine().run(p, max_tokens=n)[0] for p, n in zip(PROMPTS, lengths, strict=True)]
    d = make_engine()
    started = [d.start(p, max_tokens=n) for p, n in zip(PROMPTS, lengths, strict=True)]
    outcomes = [rec.wait() for _, rec in started]
    assert [rec.text for _, rec in started] == ref
    assert all(len(t) > 0 for t in ref)
    for (_, rec), outcome, n in zip(started, outcomes, lengths, strict=True):
        assert outcome.status == "completed" and outcome.stop_reason == "max_tokens"
        assert outcome.tokens_out == n and [i for _, i in rec.tokens] == list(range(1, n + 1))
        assert [c for c in rec.calls if c[0] == "phase"] == [("phase", "prompt"),
                                                              ("phase", "decode")]
    assert d.engine.statistics().tokens_generated == sum(lengths)
    d.assert_only_cache_holds_kv()


def test_sampling_and_stops_match_the_single_sequence_engine(
        tiny_model: Path, make_engine: Callable[..., Driver]) -> None:
    """The batch engine's decode loop has LlamaEngine's semantics: seeded sampling with
    top_k/top_p/min_p, repetition penalty, greedy, stop sequences (not sent), max_tokens."""
    cases: list[dict[str, Any]] = [
        {"temperature": 0.8, "seed": 5, "top_k": 40, "top_p": 0.9},
        {"temperature": 1.0, "seed": 11, "min_p": 0.05, "repetition_penalty": 1.3},
        {"temperature": 0.0, "seed": 1, "repetition_penalty": 1.5},
        {"temperature": 0.0, "seed": 1},  # the batch engine's argmax against llama's greedy
    ]
    single = LlamaEngine(tiny_model, n_ctx=2048, threads=1)
    try:
        refs = []
        for c in cases:
            sink = Recorder()
            outcome = single.generate(0, single.tokenize("Once upon"),
                                      SamplingParams(max_tokens=80, **c), CancelFlag(), sink)
            refs.append((sink.text, outcome))
    finally:
        single.close()
    d = make_engine(step_tokens=128)
    for c, (ref_text, ref_outcome) in zip(cases, refs, strict=True):
        text, outcome = d.run("Once upon", max_tokens=80, **c)
        assert (text, outcome.stop_reason, outcome.tokens_out) == (
            ref_text, ref_outcome.stop_reason, ref_outcome.tokens_out)
    # a stop string from the middle of the first output ends it right before that string
    ref_text = refs[0][0]
    stop = next(ref_text[i:i + 2] for i in range(10, len(ref_text) - 2)
                if ref_text[i:i + 2].isascii() and ref_text[i:i + 2].isprintable())
    text, outcome = d.run("Once upon", max_tokens=80, stop=(stop, "never-seen"), **cases[0])
    assert text == ref_text[: ref_text.index(stop)]
    assert outcome.stop_reason == "stop_sequence" and outcome.stop_sequence == stop
    d.assert_only_cache_holds_kv()


def _cancel_when(victim: list[SeqRequest], d: Driver, ready: Callable[[Recorder], bool],
                 ) -> Recorder:
    """A recorder that cancels ``victim[0]`` from the engine thread, between steps, at its
    first token once ``ready(victim's recorder)``; it notes the victim's tokens then."""

    def on_token(rec: Recorder) -> None:
        victim_rec = victim[0].sink
        assert isinstance(victim_rec, Recorder)
        if not victim[0].flag.is_set() and ready(victim_rec):
            rec.victim_tokens_at_cancel = len(victim_rec.tokens)  # type: ignore[attr-defined]
            d.cancel(victim[0])

    return Recorder(on_token=on_token)


def _in_prompt_phase(d: Driver) -> Callable[[Recorder], bool]:
    """Ready once a sequence is part-way through its prompt."""
    return lambda _rec: any(s.phase == "prompt" and s.prompt_tokens_done > 0
                            for s in d.engine.statistics().running)


def test_cancel_in_prompt_phase_leaves_the_others_unchanged(
        make_engine: Callable[..., Driver]) -> None:
    others = PROMPTS[:3]
    ref = alone(make_engine, others, max_tokens=50)
    d = make_engine(step_tokens=64)
    victim: list[SeqRequest] = []
    watcher = _cancel_when(victim, d, _in_prompt_phase(d))
    started = [d.request(others[0], max_tokens=50, rec=watcher)]
    started += [d.request(p, max_tokens=50) for p in others[1:]]
    victim.append(d.request(LONG_PROMPT, max_tokens=50)[0])
    for req, _ in started:
        d.engine.start(req)
    d.engine.start(victim[0])
    outcomes = [rec.wait() for _, rec in started]
    cancelled = victim[0].sink.wait()  # type: ignore[attr-defined]
    assert [rec.text for _, rec in started] == ref
    assert all(o.status == "completed" for o in outcomes)
    assert cancelled.status == "cancelled" and cancelled.phase == "prompt"
    assert 0 < cancelled.prompt_tokens_evaluated < len(d.engine.tokenize(LONG_PROMPT))
    assert victim[0].sink.tokens == []  # type: ignore[attr-defined]
    # a prompt cancelled half-way is never cached: only the three others' work is
    stats = d.engine.statistics()
    assert stats.prefix_cache_tokens == sum(cached_positions(d, p, o)
                                            for p, o in zip(others, outcomes, strict=True))
    d.assert_only_cache_holds_kv()


def test_cancel_in_decode_phase_sends_no_further_token(
        make_engine: Callable[..., Driver]) -> None:
    others = PROMPTS[:3]
    ref = alone(make_engine, others, max_tokens=50)
    d = make_engine()
    victim: list[SeqRequest] = []
    watcher = _cancel_when(victim, d, lambda rec: len(rec.tokens) >= 5)
    started = [d.request(others[0], max_tokens=50, rec=watcher)]
    started += [d.request(p, max_tokens=50) for p in others[1:]]
    victim.append(d.request(PROMPTS[3], max_tokens=200)[0])
    for req, _ in started:
        d.engine.start(req)
    d.engine.start(victim[0])
    outcomes = [rec.wait() for _, rec in started]
    victim_rec = victim[0].sink
    assert isinstance(victim_rec, Recorder)
    cancelled = victim_rec.wait()
    assert [rec.text for _, rec in started] == ref
    assert all(o.status == "completed" for o in outcomes)
    assert cancelled.status == "cancelled" and cancelled.phase == "decode"
    at_cancel = watcher.victim_tokens_at_cancel  # type: ignore[attr-defined]
    assert at_cancel > 0 and len(victim_rec.tokens) == at_cancel == cancelled.tokens_out
    # its prompt was fully evaluated, so it stays in the prefix cache with the others' work,
    # and so do the tokens it had generated: all of them, or all but the last one if the
    # cancel was seen before a step fed that one back
    others_cached = sum(cached_positions(d, p, o) for p, o in zip(others, outcomes, strict=True))
    victim_cached = d.engine.statistics().prefix_cache_tokens - others_cached
    n_victim = len(d.engine.tokenize(PROMPTS[3]))
    assert victim_cached - n_victim in (cancelled.tokens_out - 1, cancelled.tokens_out)
    d.assert_only_cache_holds_kv()


class Hold:
    """An abort probe that holds the decode of a step matching ``when`` on a gate."""

    def __init__(self, engine: BatchEngine, when: Callable[[Any], bool]) -> None:
        self.engine = engine
        self.when = when
        self.entered = threading.Event()
        self.release = threading.Event()
        self.held_steps: list[int] = []

    def __call__(self) -> None:
        stats = self.engine.statistics()
        if stats.steps in self.held_steps or not self.when(stats):
            return
        self.held_steps.append(stats.steps)
        self.entered.set()
        assert self.release.wait(WAIT)

    def hold_next(self) -> None:
        self.entered.clear()
        self.release.clear()


def _long_prompt_dominates(stats: Any) -> bool:
    return any(s.phase == "prompt" and s.step_tokens >= 128 for s in stats.running)


@attrs.define
class HeldLongPrompt:
    """Three sequences decoding and a long prompt (the victim) held inside the step its
    chunk dominates; ``ref``: the three outputs, each alone on a fresh engine."""

    d: Driver
    ref: list[str]
    started: list[tuple[SeqRequest, Recorder]]
    hold: Hold
    victim: SeqRequest
    victim_rec: Recorder

    @classmethod
    def start(cls, make_engine: Callable[..., Driver]) -> HeldLongPrompt:
        others = PROMPTS[:3]
        ref = alone(make_engine, others, max_tokens=40)
        d = make_engine(step_tokens=256)
        started = [d.start(p, max_tokens=40) for p in others]
        for _, rec in started:
            assert rec.decoding.wait(WAIT)
        hold = Hold(d.engine, _long_prompt_dominates)
        d.engine.set_abort_probe(hold)
        victim, victim_rec = d.start(LONG_PROMPT, max_tokens=40)
        assert hold.entered.wait(WAIT)
        return cls(d, ref, started, hold, victim, victim_rec)


def test_cancel_of_the_dominating_sequence_aborts_the_step(
        make_engine: Callable[..., Driver]) -> None:
    held = HeldLongPrompt.start(make_engine)
    d, started, hold, victim, victim_rec = (held.d, held.started, held.hold, held.victim,
                                            held.victim_rec)
    stats = d.engine.statistics()
    assert stats.step_running and stats.steps_aborted == 0
    d.cancel(victim)  # inside the decode: the step is aborted, not finished
    hold.release.set()
    cancelled = victim_rec.wait()
    assert [rec.wait().status for _, rec in started] == ["completed"] * 3
    assert [rec.text for _, rec in started] == held.ref
    assert d.engine.statistics().steps_aborted == 1
    assert cancelled.status == "cancelled" and cancelled.phase == "prompt"
    # the aborted chunk was rolled back: only the chunk before it had been evaluated
    assert cancelled.prompt_tokens_evaluated < 256 and victim_rec.tokens == []
    d.engine.set_abort_probe(None)
    d.assert_only_cache_holds_kv()


def test_cancel_of_a_minor_member_does_not_abort_the_step(
        make_engine: Callable[..., Driver]) -> None:
    d = make_engine(step_tokens=256)
    minor, minor_rec = d.start(PROMPTS[0], max_tokens=200)
    assert minor_rec.decoding.wait(WAIT)
    hold = Hold(d.engine, _long_prompt_dominates)
    d.engine.set_abort_probe(hold)
    _, long_rec = d.start(LONG_PROMPT, max_tokens=10)
    assert hold.entered.wait(WAIT)
    tokens_at_cancel = len(minor_rec.tokens)
    d.cancel(minor)  # one decode token of a 257-token step: let the step finish
    hold.release.set()
    assert minor_rec.wait().status == "cancelled"
    assert len(minor_rec.tokens) == tokens_at_cancel
    assert long_rec.wait().status == "completed"
    assert d.engine.statistics().steps_aborted == 0
    d.engine.set_abort_probe(None)
    d.assert_only_cache_holds_kv()


def test_a_late_cancel_cannot_abort_the_next_step(make_engine: Callable[..., Driver]) -> None:
    held = HeldLongPrompt.start(make_engine)
    d, started, hold, victim, victim_rec = (held.d, held.started, held.hold, held.victim,
                                            held.victim_rec)
    d.cancel(victim)  # aborts the step the victim dominates
    hold.hold_next()
    hold.when = lambda stats: True  # hold the re-run of that step as well
    first = hold.held_steps[0]
    hold.release.set()
    assert hold.entered.wait(WAIT) and hold.held_steps[-1] > first
    assert victim_rec.done.is_set()  # it left before the re-run
    d.cancel(victim)  # again, late: its step is over, the running one is not its
    d.engine.set_abort_probe(None)
    hold.release.set()
    assert [rec.wait().status for _, rec in started] == ["completed"] * 3
    assert [rec.text for _, rec in started] == held.ref
    assert d.engine.statistics().steps_aborted == 1
    d.assert_only_cache_holds_kv()


def test_prefix_cache_hit_evaluates_only_new_tokens(make_engine: Callable[..., Driver]) -> None:
    base = "You are a helpful assistant. Answer briefly. Question: what is rain?"
    longer = base + " And snow?"
    fresh = make_engine()
    ref_base, _ = fresh.run(base, max_tokens=60)
    ref_longer, _ = make_engine().run(longer, max_tokens=60)
    n_base = len(fresh.engine.tokenize(base))
    n_longer = len(fresh.engine.tokenize(longer))

    again, outcome = fresh.run(base, max_tokens=60)
    assert outcome.prompt_tokens_cached == n_base - 1  # the last token gives the logits
    assert outcome.prompt_tokens_evaluated == 1
    assert again == ref_base

    text, outcome = fresh.run(longer, max_tokens=60)
    assert outcome.prompt_tokens_cached == n_base
    assert outcome.prompt_tokens_evaluated == n_longer - n_base
    assert text == ref_longer
    # the longer prompt does not cover the base prompt's answer: both stay
    assert fresh.engine.statistics().prefix_cache_entries == 2
    fresh.assert_only_cache_holds_kv()


def test_a_next_turn_evaluates_only_what_follows_the_answer(
        make_engine: Callable[..., Driver]) -> None:
    """A chat client resends the answer it got in its next turn. The tokens a sequence
    generated are cached with its prompt, so the next turn evaluates only its new text, and
    gets the output of a fresh evaluation of the whole."""
    base = "You are a helpful assistant. Answer briefly. Question: what is rain?"
    d = make_engine()
    answer, first = d.run(base, max_tokens=24)
    assert first.stop_reason == "max_tokens" and first.tokens_out == 24
    turn2 = base + answer + " And snow?"
    ref_turn2, _ = make_engine().run(turn2, max_tokens=24)
    n_seen = len(d.engine.tokenize(base)) + 23  # the 24th token was never fed back
    assert d.engine.statistics().prefix_cache_tokens == n_seen

    text, outcome = d.run(turn2, max_tokens=24)
    assert outcome.prompt_tokens_cached == n_seen
    assert outcome.prompt_tokens_evaluated == len(d.engine.tokenize(turn2)) - n_seen
    assert text == ref_turn2
    # turn 2's entry covers turn 1's, which it replaced
    stats = d.engine.statistics()
    assert (stats.prefix_cache_entries, stats.prefix_cache_tokens) == (
        1, cached_positions(d, turn2, outcome))
    d.assert_only_cache_holds_kv()


def test_prefix_cache_is_lru_bounded(make_engine: Callable[..., Driver]) -> None:
    d = make_engine(prefix_cache_tokens=100)
    prompts = [f"{c}{c}{c} " * 10 for c in "abcd"]  # 41 tokens each, first token BOS
    n = len(d.engine.tokenize(prompts[0]))
    for p in prompts:
        d.run(p, max_tokens=5)
        stats = d.engine.statistics()
        assert stats.prefix_cache_tokens <= 100
        d.assert_only_cache_holds_kv()
    assert d.engine.statistics().prefix_cache_entries == 2  # c and d; a and b evicted
    _, outcome = d.run(prompts[3], max_tokens=5)
    assert outcome.prompt_tokens_cached == n - 1
    _, outcome = d.run(prompts[0], max_tokens=5)
    assert outcome.prompt_tokens_cached == 0  # evicted (a shared BOS is not reused)
    # a prompt longer than the whole budget keeps its first 100 positions
    huge = "z" * 300
    d.run(huge, max_tokens=5)
    _, outcome = d.run(huge + "!", max_tokens=5)
    assert outcome.prompt_tokens_cached == 100
    d.assert_only_cache_holds_kv()


def test_finished_comes_after_the_cells_are_freed(make_engine: Callable[..., Driver]) -> None:
    d = make_engine()
    seen: list[tuple[int, int, int]] = []

    def on_finished(rec: Recorder) -> None:
        stats = d.engine.statistics()
        seen.append((len(stats.running), stats.kv_tokens_used, stats.prefix_cache_tokens))

    rec = Recorder()
    rec.on_finished = on_finished
    d.start(PROMPTS[0], max_tokens=20, rec=rec)
    rec.wait()
    assert seen == [(0, seen[0][2], seen[0][2])] and seen[0][2] > 0


def test_stop_finishes_every_sequence_as_cancelled(make_engine: Callable[..., Driver]) -> None:
    d = make_engine(step_tokens=32)
    decoding = [d.start(p, max_tokens=1000) for p in PROMPTS[:3]]
    for _, rec in decoding:
        assert rec.decoding.wait(WAIT)
    _, in_prompt = d.start(LONG_PROMPT * 2, max_tokens=10)
    d.engine.stop()
    d.thread.join(WAIT)
    assert not d.thread.is_alive()
    outcomes = [rec.wait() for _, rec in decoding] + [in_prompt.wait()]
    assert [o.status for o in outcomes] == ["cancelled"] * 4
    assert outcomes[3].phase == "prompt" and in_prompt.tokens == []
    d.assert_only_cache_holds_kv()
    with pytest.raises(RuntimeError):
        d.start(PROMPTS[0])


def test_prompt_must_fit_the_context(make_engine: Callable[..., Driver]) -> None:
    d = make_engine(n_ctx=256)
    with pytest.raises(ValueError, match="n_ctx"):
        d.start("x" * 200, max_tokens=100)


def test_decode_failures_map_to_contract_codes() -> None:
    assert decode_failure(-2).error_code == "VRAM_OOM"
    assert decode_failure(-3).error_code == "VRAM_OOM"
    assert decode_failure(1).error_code == "INTERNAL"
    assert decode_failure(-1).error_code == "INTERNAL"
    assert "-1" in decode_failure(-1).error


def test_load_cancelled_through_on_progress(tiny_model: Path) -> None:
    calls: list[float] = []

    def on_progress(fraction: float) -> bool:
        calls.append(fraction)
        return False

    with pytest.raises(ModelLoadError, match="^model load was cancelled$"):
        BatchEngine(tiny_model, n_ctx=512, threads=1, on_progress=on_progress)
    assert calls


def test_progress_reaches_one_when_loaded(tiny_model: Path) -> None:
    calls: list[float] = []
    engine = BatchEngine(tiny_model, n_ctx=512, threads=1, on_progress=calls.append)
    engine.close()
    assert calls and calls[-1] == 1.0


def test_bad_files_raise_model_load_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        BatchEngine(text)
    with pytest.raises(ModelLoadError, match="cannot read model"):
        BatchEngine(tmp_path / "missing.gguf")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="llama.cpp could not load"):
        BatchEngine(broken)


@pytest.mark.gemma
def test_gemma_prefix_reuse_past_the_sliding_window(gemma_model: Path) -> None:
    """Gemma 3's sliding-window layers (512 positions): a cached prompt longer than the
    window is reused whole and gives the output of a fresh evaluation."""
    story = ("The lighthouse keeper wrote in his log every night about the sea. " * 50).strip()
    longer = story + " What did he write about?"
    drivers: list[Driver] = []
    try:
        fresh = Driver(BatchEngine(gemma_model, n_ctx=2048, slots=2))
        drivers.append(fresh)
        ref_longer, _ = fresh.run(longer, max_tokens=24)
        fresh.close()
        drivers.remove(fresh)
        d = Driver(BatchEngine(gemma_model, n_ctx=2048, slots=2))
        drivers.append(d)
        n_story = len(d.engine.tokenize(story))
        assert n_story > 600
        ref_story, _ = d.run(story, max_tokens=24)
        again, outcome = d.run(story, max_tokens=24)
        assert outcome.prompt_tokens_cached == n_story - 1 and again == ref_story
        text, outcome = d.run(longer, max_tokens=24)
        assert outcome.prompt_tokens_cached == n_story
        assert text == ref_longer
        d.assert_only_cache_holds_kv()
    finally:
        for driver in drivers:
            driver.close()
