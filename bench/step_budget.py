"""Measure the batch engine on a real model: step budget, cancel latency, determinism.

    .venv/bin/python bench/step_budget.py [--model PATH] [--budgets 32,64,128,256,512]
        [--prompts 52] [--skip-budget] [--skip-determinism] [--out results.json]

Everything goes through BatchEngine's public API, timed from outside:

* step budget: three sequences decode while a long prompt is evaluated. The long prompt's
  evaluation speed (tokens / time to its first token) is the prompt throughput; the largest
  gap between two tokens of a decoding sequence meanwhile is the worst-case step time.
* cancel latency: the long prompt is cancelled while its chunk is in the running step
  (the step is aborted) and a decoding sequence is cancelled mid-step (it leaves when the
  step ends); time from ``cancel()`` to ``finished``.
* determinism: each of N prompts greedily alone, again alone (a prefix cache hit), and in
  groups of four; how many outputs differ from the first alone run. Then each prompt's next
  turn (the prompt, its answer, a new line): right after its turn 1, so the answer comes
  from the prefix cache, against a worker with no cache evaluating it whole.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from orcd.engine import BatchEngine, CancelFlag, Outcome, SamplingParams, SeqRequest

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["rain", "the sea", "a lighthouse", "bread", "mountains", "a violin", "winter",
          "a library", "bees", "the moon", "a train", "coffee", "an old map", "rivers",
          "a garden", "snow", "a clock", "volcanoes", "the desert", "a bicycle", "owls",
          "a market", "thunder", "glass", "a forest", "salt"]
FORMS = ["Write one sentence about {}.", "Explain {} to a child in two sentences."]
LONG = ("The history of computing is long and full of surprising turns. " * 40).strip()


class Sink:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.pieces: list[str] = []
        self.decode_at = 0.0
        self.done = threading.Event()
        self.outcome: Outcome | None = None
        self.finished_at = 0.0

    def phase(self, phase: str) -> None:
        if phase == "decode":
            self.decode_at = time.perf_counter()

    def token(self, text: str, tokens_out: int) -> None:
        self.times.append(time.perf_counter())
        self.pieces.append(text)

    def finished(self, outcome: Outcome) -> None:
        self.finished_at = time.perf_counter()
        self.outcome = outcome
        self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class Bench:
    def __init__(self, model: Path, **kw: Any) -> None:
        self.engine = BatchEngine(model, **kw)
        self.thread = threading.Thread(target=self.engine.run)
        self.thread.start()

    def start(self, prompt: str, max_tokens: int) -> tuple[SeqRequest, Sink]:
        sink = Sink()
        req = SeqRequest(self.engine.tokenize(prompt),
                         SamplingParams(max_tokens=max_tokens, seed=1, temperature=0.0),
                         CancelFlag(), sink)
        self.engine.start(req)
        return req, sink

    def run(self, prompts: list[str], max_tokens: int) -> list[str]:
        sinks = [self.start(p, max_tokens)[1] for p in prompts]
        for s in sinks:
            s.done.wait()
        return [s.text for s in sinks]

    def close(self) -> None:
        self.engine.stop()
        self.thread.join()
        self.engine.close()


def measure_budget(model: Path, budget: int, threads: int | None) -> dict[str, float]:
    b = Bench(model, step_tokens=budget, threads=threads, prefix_cache_tokens=0)
    try:
        b.run(["Warm up."], 4)
        decoders = [b.start(f"Count slowly from {i} to one hundred.", 2000) for i in range(3)]
        while not all(s.decode_at for _, s in decoders):
            time.sleep(0.01)
        t0 = time.perf_counter()
        _, long_sink = b.start(LONG, 1)
        long_sink.done.wait()
        n_prompt = len(b.engine.tokenize(LONG))
        prompt_s = long_sink.decode_at - t0
        gaps = [t1 - t0_ for _, s in decoders for t0_, t1 in zip(s.times, s.times[1:], strict=False)
                if t0_ >= t0 and t1 <= long_sink.decode_at]
        # cancel latency: the long prompt while its chunk is in the step (aborts the step)
        latencies = []
        for _ in range(5):
            req, sink = b.start(LONG, 1)
            while not any(r.phase == "prompt" and r.step_tokens > 0
                          for r in b.engine.statistics().running):
                time.sleep(0.0005)
            time.sleep(0.002)
            req.flag.set()
            t = time.perf_counter()
            b.engine.cancel(req)
            sink.done.wait()
            latencies.append(sink.finished_at - t)
        for req, _ in decoders:
            req.flag.set()
            b.engine.cancel(req)
        return {
            "step_tokens": budget,
            "prompt_tokens": n_prompt,
            "prompt_tok_s": round(n_prompt / prompt_s, 1),
            "worst_step_ms": round(max(gaps) * 1000, 1),
            "median_step_with_prompt_ms": round(statistics.median(gaps) * 1000, 1),
            "cancel_prompt_max_ms": round(max(latencies) * 1000, 2),
            "cancel_prompt_median_ms": round(statistics.median(latencies) * 1000, 2),
        }
    finally:
        b.close()


def measure_determinism(model: Path, n_prompts: int, max_tokens: int,
                        threads: int | None) -> dict[str, Any]:
    prompts = [f.format(t) for f in FORMS for t in TOPICS][:n_prompts]
    b = Bench(model, threads=threads)
    try:
        alone = [b.run([p], max_tokens)[0] for p in prompts]
        again = [b.run([p], max_tokens)[0] for p in prompts]  # prefix cache hits
        batched: list[str] = []
        for i in range(0, len(prompts), 4):
            batched += b.run(prompts[i:i + 4], max_tokens)
        cached = b.engine.statistics().prompt_tokens_cached
        # a next turn that resends the answer: its positions come from the cache, computed
        # while the answer was generated (each turn 1 runs right before its turn 2)
        next_turns = [f"{p}{out}\nTell me more." for p, out in zip(prompts, alone, strict=True)]
        with_answer_cached = []
        answer_reused = 0
        for p, turn in zip(prompts, next_turns, strict=True):
            b.run([p], max_tokens)
            before = b.engine.statistics().prompt_tokens_cached
            with_answer_cached += b.run([turn], max_tokens)
            reused = b.engine.statistics().prompt_tokens_cached - before
            answer_reused += reused > len(b.engine.tokenize(p))
    finally:
        b.close()
    fresh = Bench(model, threads=threads, prefix_cache_tokens=0)
    try:
        next_turns_fresh = [fresh.run([t], max_tokens)[0] for t in next_turns]
    finally:
        fresh.close()

    def first_diff(a: str, b: str) -> int:
        pairs = enumerate(zip(a, b, strict=False))
        return next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))

    return {
        "prompts": len(prompts),
        "max_tokens": max_tokens,
        "alone_vs_alone_cached_differ": sum(a != c for a, c in zip(alone, again, strict=True)),
        "alone_vs_batched4_differ": sum(a != c for a, c in zip(alone, batched, strict=True)),
        "batched_first_diff_chars": [first_diff(a, c)
                                     for a, c in zip(alone, batched, strict=True) if a != c],
        "prompt_tokens_cached_total": cached,
        "next_turn_answer_from_cache": answer_reused,
        "next_turn_cached_vs_fresh_differ": sum(
            a != c for a, c in zip(with_answer_cached, next_turns_fresh, strict=True)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--budgets", default="32,64,128,256,512")
    ap.add_argument("--prompts", type=int, default=52)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-budget", action="store_true")
    ap.add_argument("--skip-determinism", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results: dict[str, Any] = {"model": args.model.name}
    if not args.skip_budget:
        results["budget"] = []
        for budget in (int(x) for x in args.budgets.split(",")):
            row = measure_budget(args.model, budget, args.threads)
            print(json.dumps(row), file=sys.stderr)
            results["budget"].append(row)
    if not args.skip_determinism:
        results["determinism"] = measure_determinism(args.model, args.prompts,
                                                     args.max_tokens, args.threads)
        print(json.dumps(results["determinism"]), file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
