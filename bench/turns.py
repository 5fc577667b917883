"""A chat's second turn (prefix reuse) and the OpenAI SDK closing a stream (issue #9).

:func:`measure_second_turn`: turn 1 is a ~1,500-token conversation plus a question (a few
tokens generated); turn 2 repeats all of it, adds the answer and a new question. The
figure is turn 2's TTFT, next to the TTFT of a fresh prompt made of only turn 2's new text
(what evaluating just the new tokens costs; the goal is within 1.2x of it) and turn 1's
(the whole prompt, cold). orcd reuses its prefix cache; llama-server its slot's KV cache
(``cache_prompt``). Every conversation starts with a nonce: nothing from an earlier sample
can be reused, only turn 1 of the same conversation.

:func:`measure_sdk_close`: the ``openai`` SDK streams a chat completion; after 8 chunks the
program closes the stream (``stream.close()``, what leaving a ``with`` block does). The
figure is the time from the close until a one-token request gets its first token, less
that request's idle latency (measured right before each sample): how long the abandoned
job still holds the worker. orcd runs
with ``--slots 1`` for it, so that a held slot shows the way it does on llama_cpp.server,
which serves one request at a time; for orcd also close -> the job's record is ``cancelled``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from peers import (
    N_CTX,
    THREADS,
    Proc,
    decode_chunks,
    log,
    ms,
    nonce,
    now,
    p50_p99,
    quantile,
)

TALK = ("User: I keep a small lighthouse on a rocky island. What should I check every "
        "evening before the lamp is lit?\nAssistant: Check the lens for salt and soot, the "
        "fuel or power supply, the clockwork that turns the light, and the log book. ")
QUESTION_1 = "\nUser: And what about the fog horn?\nAssistant:"
QUESTION_2 = ("\nUser: Thank you. Now tell me how to write the evening log entry, step by "
              "step, with an example.\nAssistant:")


def conversation(tokenize: Any, target: int = 1500) -> str:
    """About ``target`` tokens of chat history."""
    text = ""
    while len(tokenize(text)) < target:
        text += TALK
    return text


def second_turn_sample(srv: Proc, history: str) -> dict[str, Any]:
    extra = {"cache_prompt": True} if srv.kind == "llama-server" else {}
    native = srv.kind == "orcd"
    turn1 = f"[{nonce()}] {history}{QUESTION_1}"
    g1 = srv.gen(turn1, 8, native=native, extra=extra).finish()
    if g1.error or not g1.tokens:
        raise RuntimeError(f"{srv.name}: turn 1 failed: {g1.error}")
    new_text = "".join(g1.text) + QUESTION_2
    g2 = srv.gen(turn1 + new_text, 4, native=native, extra=extra).finish()
    fresh = srv.gen(f"[{nonce()}] {new_text}", 4, native=native, extra=extra).finish()
    for g in (g2, fresh):
        if g.error or not g.tokens:
            raise RuntimeError(f"{srv.name}: a turn failed: {g.error}")
    return {"turn1_ttft_s": g1.ttft, "turn2_ttft_s": g2.ttft, "new_only_ttft_s": fresh.ttft,
            "turn1": turn1, "new_text": new_text}


class RawTurns:
    """Raw llama.cpp in-process (the bench's raw settings): the time to evaluate only turn 2's
    new tokens with turn 1 already in its KV cache, through to the first token (argmax),
    and the same for the new text alone in an empty cache. The first is what "evaluating
    only the new tokens" costs at best: they attend to every cached position."""

    def __init__(self, model: Path) -> None:
        import llama_cpp

        self.lc = llama_cpp
        self.llm = llama_cpp.Llama(str(model), n_ctx=N_CTX, n_threads=THREADS,
                                   n_threads_batch=THREADS, flash_attn=True, verbose=False)
        self.ctx = self.llm._ctx.ctx
        self.n_vocab = self.llm.n_vocab()

    def _tokens(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=True, special=True))

    def _eval(self, tokens: list[int]) -> int:
        """Evaluate ``tokens`` after what the cache holds; the argmax of the last one's
        logits."""
        import numpy as np

        decode_chunks(self.ctx, tokens, self.llm.n_batch)
        row = self.lc.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(row, shape=(self.n_vocab,)).argmax())

    def sample(self, turn1: str, new_text: str) -> dict[str, float]:
        whole, first = self._tokens(turn1 + new_text), self._tokens(turn1)
        shared = next((i for i, (a, b) in enumerate(zip(whole, first, strict=False)) if a != b),
                      min(len(whole), len(first)))
        self.llm._ctx.kv_cache_clear()
        self._eval(whole[:shared])  # turn 1, not timed: it is what the cache holds
        t0 = now()
        self._eval(whole[shared:])
        in_context = now() - t0
        self.llm._ctx.kv_cache_clear()
        fresh_tokens = self._tokens(f"[{nonce()}] {new_text}")
        t0 = now()
        self._eval(fresh_tokens)
        fresh = now() - t0
        self.llm._ctx.kv_cache_clear()
        return {"in_context_s": in_context, "fresh_s": fresh, "new_tokens": len(whole) - shared,
                "fresh_tokens": len(fresh_tokens)}

    def __call__(self, texts: list[tuple[str, str]]) -> list[dict[str, float]]:
        return [self.sample(t1, new) for t1, new in texts]

    def close(self) -> None:
        self.llm.close()


def measure_second_turn(servers: list[Proc], history: str, reps: int,
                        in_context: Any = None) -> dict[str, Any]:
    """``in_context``: a :class:`RawTurns` (or None) that reruns orcd's texts raw."""
    raw: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    for _ in range(reps):
        for srv in servers:
            raw[srv.name].append(second_turn_sample(srv, history))
    summary: dict[str, Any] = {}
    for name, xs in list(raw.items()):
        cell: dict[str, Any] = {k: p50_p99([x[k] for x in xs])
                for k in ("turn1_ttft_s", "turn2_ttft_s", "new_only_ttft_s")}
        texts = [(x.pop("turn1"), x.pop("new_text")) for x in xs]
        if in_context is not None and name.startswith("orcd"):
            ctx_xs = in_context(texts)
            raw[f"{name}: raw llama.cpp"] = ctx_xs
            cell["raw_in_context_s"] = p50_p99([x["in_context_s"] for x in ctx_xs])
            cell["raw_fresh_s"] = p50_p99([x["fresh_s"] for x in ctx_xs])
            cell["ratio_in_context_p50"] = (quantile([x["turn2_ttft_s"] for x in xs], 0.5)
                                            / cell["raw_in_context_s"]["p50"])
        cell["ratio_p50"] = (quantile([x["turn2_ttft_s"] for x in xs], 0.5)
                             / quantile([x["new_only_ttft_s"] for x in xs], 0.5))
        summary[name] = cell
        log(f"{name}: second turn TTFT {ms(cell['turn2_ttft_s'])} ms vs new tokens only "
            f"{ms(cell['new_only_ttft_s'])} ms ({cell['ratio_p50']:.2f}x)")
        if "ratio_in_context_p50" in cell:
            log(f"{name}: raw llama.cpp evaluating only the new tokens after the cached turn 1: "
                f"{ms(cell['raw_in_context_s'])} ms, alone {ms(cell['raw_fresh_s'])} ms; "
                f"turn 2 / that {cell['ratio_in_context_p50']:.2f}x")
    return {"reps": reps, "summary": summary, "samples": raw}


def second_turn_rows(res: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for name, s in res.get("summary", {}).items():
        in_ctx = s.get("raw_in_context_s")
        rows.append((name, ms(s["turn1_ttft_s"]), ms(s["turn2_ttft_s"]), ms(s["new_only_ttft_s"]),
                     f"{s['ratio_p50']:.2f}x", ms(in_ctx) if in_ctx else "-",
                     f"{s['ratio_in_context_p50']:.2f}x" if in_ctx else "-"))
    return rows


SECOND_TURN_HEAD = ("system", "turn 1 TTFT ms (cold)", "turn 2 TTFT ms",
                    "new text alone TTFT ms", "turn 2 / new text alone",
                    "raw llama.cpp: only the new tokens, turn 1 cached, ms",
                    "turn 2 / raw new tokens")


def _probe(srv: Proc) -> float:
    """Seconds from sending a one-token completion to its first token."""
    g = srv.gen(f"Probe {nonce()}: Hi", 1, native=False).finish(120)
    if g.error or not g.tokens:
        raise RuntimeError(f"{srv.name}: probe failed: {g.error}")
    return g.ttft


def sdk_close_sample(srv: Proc, model_id: str) -> dict[str, Any]:
    import openai

    idle = _probe(srv)  # right before: the machine's speed changes from minute to minute

    client = openai.OpenAI(base_url=srv.base + "/v1", api_key="bench", max_retries=0,
                           timeout=120)
    job_id = f"bench-sdk-{nonce()}"
    headers = {"X-Job-Id": job_id} if srv.kind == "orcd" else {}
    stream = client.chat.completions.create(
        model=model_id, stream=True, max_tokens=400, temperature=0.0,
        messages=[{"role": "user", "content": f"[{nonce()}] Tell me a very long story."}],
        extra_headers=headers)
    seen = 0
    for _chunk in stream:
        seen += 1
        if seen >= 8:
            break
    t0 = now()
    stream.close()
    g = srv.gen(f"Probe {nonce()}: Hi", 1, native=False)  # in its thread, at once
    info: dict[str, Any] = {}
    if srv.kind == "orcd":
        deadline = now() + 10
        while now() < deadline:
            rec = srv.client.get(f"{srv.base}/jobs/{job_id}").json()
            if rec.get("state") in ("cancelled", "failed", "completed"):
                info["state"] = rec["state"]
                if rec["state"] == "cancelled":
                    info["record_final_s"] = now() - t0
                break
            time.sleep(0.002)
    g.finish(120)
    if g.error or not g.tokens:
        raise RuntimeError(f"{srv.name}: probe after close failed: {g.error}")
    info["free_s"] = g.tokens[0] - t0 - idle
    info["idle_s"] = idle
    client.close()
    return info


def measure_sdk_close(servers: list[Proc], reps: int) -> dict[str, Any]:
    ids: dict[str, str] = {}
    for srv in servers:
        ids[srv.name] = srv.client.get(srv.base + "/v1/models").json()["data"][0]["id"]
        _probe(srv)  # warm-up
    raw: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    for _ in range(reps):
        for srv in servers:
            raw[srv.name].append(sdk_close_sample(srv, ids[srv.name]))
    summary: dict[str, Any] = {}
    for name, xs in raw.items():
        summary[name] = {"free_s": p50_p99([x["free_s"] for x in xs]),
                         "record_final_s": p50_p99([x["record_final_s"] for x in xs
                                                    if x.get("record_final_s") is not None]),
                         "idle_probe_s": p50_p99([x["idle_s"] for x in xs]),
                         "states": sorted({x.get("state", "-") for x in xs})}
        log(f"{name}: SDK close -> worker free {ms(summary[name]['free_s'])} ms")
    return {"reps": reps, "summary": summary, "samples": raw}


def sdk_rows(res: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(name, ms(s["free_s"]), ms(s["record_final_s"]), ms(s["idle_probe_s"]))
            for name, s in res.get("summary", {}).items()]


SDK_HEAD = ("system", "close -> worker free ms", "close -> record cancelled ms",
            "idle probe TTFT ms")
