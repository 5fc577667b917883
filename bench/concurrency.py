"""Concurrent clients (issue #8) and cancelling one job of four under load.

:func:`measure_concurrency`: for 1, 2, 4 and 8 clients that each stream one completion of
``tokens`` tokens at once (``/v1/completions``, temperature 0, every prompt unique), the
aggregate tokens/s (all tokens over first send -> last token), TTFT and inter-token latency
p50/p99 over every request and gap. Systems: orcd ``--slots 4`` (8 clients: 4 generate,
4 wait in its queue) and ``--slots 8`` for the 8 row, llama-server ``--parallel N``
(continuous batching) for each N, and llama_cpp.server (one request at a time); beside them
:class:`RawBatch`, raw llama.cpp doing the same work in-process with no server in the way.
Levels and systems are interleaved, round after round, so a noisy neighbour hits them all
alike.

:func:`measure_cancel_under_load`: four jobs generate, a fifth waits for a slot; one of the
four is cancelled (orcd: ``POST /cancel``; llama-server: the client closes the connection,
its only cancel). Figures: cancel -> ``CANCELLED`` event (orcd), cancel -> the waiting job
takes the slot (orcd: its ``started`` event) and -> its first token, and the worst
inter-token gap of the three other jobs within one second of the cancel.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from peers import THREADS, Gen, Proc, log, ms, nonce, now, p50_p99, quantile

PROMPT = "Write a long, detailed story about a lighthouse keeper and a lost whale."
LEVELS = (1, 2, 4, 8)
RAW = "raw llama.cpp (in-process)"


def systems_for_concurrency(model: Path, logdir: Path, llama_server: Any
                            ) -> list[tuple[Proc, tuple[int, ...]]]:
    """(server, the client counts it runs) for every system of the concurrency table."""
    from peers import llama_cpp_server_command, llama_server_command, orcd_command

    out: list[tuple[Proc, tuple[int, ...]]] = [
        (Proc("orcd-slots4", "orcd", lambda p: orcd_command(model, p, slots=4), logdir),
         LEVELS),
        (Proc("orcd-slots8", "orcd", lambda p: orcd_command(model, p, slots=8), logdir), (8,)),
    ]
    if llama_server is not None:
        exe, env = llama_server
        for n in LEVELS:
            out.append((Proc(f"llama-server-p{n}", "llama-server",
                             functools.partial(llama_server_command, exe, model, parallel=n),
                             logdir,
                             env=env), (n,)))
    out.append((Proc("llama_cpp.server", "llama_cpp.server",
                     lambda p: llama_cpp_server_command(model, p), logdir), LEVELS))
    return out


class RawBatch:
    """Raw llama.cpp in-process, doing one level's work with no server: ``n`` unique
    prompts evaluated together in one ``llama_decode``, then a step of one token for each of
    the ``n`` sequences (argmax of its logits) until each has ``tokens``. One context with a
    unified KV cache, like orcd's and llama-server's; flash attention and threads as the
    servers have them. Its 4-to-1 ratio is what batching alone gives on this machine and
    build at that moment. It is a reference, not a bound: a server's prompts arrive one
    after another, so its first jobs decode while the later prompts are evaluated, where
    here every sequence waits for all four prompts."""

    def __init__(self, model: Path, max_seqs: int = max(LEVELS), n_ctx_seq: int = 256) -> None:
        import llama_cpp

        self.lc = llama_cpp
        self.llm = llama_cpp.Llama(str(model), n_ctx=256, n_threads=THREADS,
                                   n_threads_batch=THREADS, verbose=False)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = max_seqs * n_ctx_seq
        params.n_batch = params.n_ubatch = max_seqs * n_ctx_seq
        params.n_seq_max = max_seqs
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = THREADS
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.llm.model, params)
        if not self.ctx:
            raise RuntimeError("raw llama.cpp: could not create the batch context")
        self.batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self.n_vocab = self.llm.n_vocab()
        self.n_ctx_seq = n_ctx_seq

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants logits) rows."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, 1
            b.seq_id[i][0], b.logits[i] = seq, logits
        b.n_tokens = len(rows)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"raw llama.cpp: llama_decode returned {rc}")

    def _argmax(self, index: int) -> int:
        import numpy as np

        row = self.lc.llama_get_logits_ith(self.ctx, index)
        return int(np.ctypeslib.as_array(row, shape=(self.n_vocab,)).argmax())

    def __call__(self, n: int, tokens: int) -> dict[str, Any]:
        """One sample of level ``n``, in :func:`one_level`'s form (TTFT from the start)."""
        prompts = [list(self.llm.tokenize(f"[{nonce()}] {PROMPT}".encode(), add_bos=True,
                                          special=True)) for _ in range(n)]
        if max(len(p) for p in prompts) + tokens > self.n_ctx_seq:
            raise RuntimeError("raw llama.cpp: a sequence would not fit its share of the KV")
        mem = self.lc.llama_get_memory(self.ctx)
        self.lc.llama_memory_clear(mem, True)
        t0 = now()
        rows = [(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)]
        self._decode(rows)
        last = [self._argmax(i) for i, row in enumerate(rows) if row[3]]
        stamps = [[now()] for _ in range(n)]
        pos = [len(p) for p in prompts]
        for _ in range(tokens - 1):
            self._decode([(last[s], pos[s], s, True) for s in range(n)])
            last = [self._argmax(s) for s in range(n)]
            t = now()
            for s in range(n):
                pos[s] += 1
                stamps[s].append(t)
        wall = stamps[0][-1] - t0
        return {"tokens": n * tokens, "wall_s": wall, "tok_s": n * tokens / wall,
                "ttft_s": [x[0] - t0 for x in stamps],
                "itl_s": [b - a for x in stamps for a, b in zip(x, x[1:], strict=False)]}

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.llm.close()


def one_level(srv: Proc, clients: int, tokens: int) -> dict[str, Any]:
    """``clients`` streams sent at once; every token's arrival, as raw samples."""
    gens = [srv.gen(f"[{nonce()}] {PROMPT}", tokens, native=False) for _ in range(clients)]
    for g in gens:
        g.finish()
        if g.error or not g.tokens:
            raise RuntimeError(f"{srv.name}: a stream failed: {g.error}")
    t0 = min(g.t_send for g in gens)
    t1 = max(g.tokens[-1] for g in gens)
    n = sum(len(g.tokens) for g in gens)
    return {"tokens": n, "wall_s": t1 - t0, "tok_s": n / (t1 - t0),
            "ttft_s": [g.ttft for g in gens], "itl_s": [x for g in gens for x in g.gaps()]}


def measure_concurrency(systems: list[tuple[Proc, tuple[int, ...]]], rounds: int,
                        tokens: int, in_process: RawBatch | None = None) -> dict[str, Any]:
    """``rounds`` interleaved rounds over every (system, level), and ``in_process`` (a
    :class:`RawBatch`, or None) at each level in the same rounds; raw samples per cell."""
    raw: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for srv, levels in systems:  # warm-up: first-use costs are not what is measured
        srv.gen(f"[{nonce()}] {PROMPT}", 8, native=False).finish()
        raw[srv.name] = {n: [] for n in levels}
    if in_process is not None:
        in_process(1, 8)
        raw[RAW] = {n: [] for n in LEVELS}
    for r in range(rounds):
        for n in LEVELS:
            for srv, levels in systems:
                if n in levels:
                    raw[srv.name][n].append(one_level(srv, n, tokens))
            if in_process is not None:
                raw[RAW][n].append(in_process(n, tokens))
        log(f"concurrency: round {r + 1}/{rounds} done")
    summary: dict[str, Any] = {}
    for name, cells in raw.items():
        summary[name] = {}
        for n, runs in cells.items():
            summary[name][n] = {
                "tok_s": quantile([x["tok_s"] for x in runs], 0.5),
                "ttft_s": p50_p99([t for x in runs for t in x["ttft_s"]]),
                "itl_s": p50_p99([t for x in runs for t in x["itl_s"]]),
            }
    goals = goal_ratios(summary)
    log("concurrency: " + ", ".join(f"{k} {v:.2f}x" for k, v in goals.items()))
    return {"tokens_per_request": tokens, "rounds": rounds, "summary": summary, "goals": goals,
            "samples": {k: {str(n): v for n, v in c.items()} for k, c in raw.items()}}


def goal_ratios(summary: dict[str, Any]) -> dict[str, float]:
    """Issue #8's throughput goals read off the medians: orcd at 4 clients against
    llama-server ``--parallel 4``, and each system's 4-client figure over its 1-client one."""
    def tok_s(name: str, n: int) -> float | None:
        cell = summary.get(name, {}).get(n) or summary.get(name, {}).get(str(n))
        return cell["tok_s"] if cell else None

    out: dict[str, float] = {}
    orcd4, ls4 = tok_s("orcd-slots4", 4), tok_s("llama-server-p4", 4)
    if orcd4 and ls4:
        out["orcd 4 clients / llama-server 4"] = orcd4 / ls4
    for label, one, four in (("orcd", "orcd-slots4", "orcd-slots4"),
                             ("llama-server", "llama-server-p1", "llama-server-p4"),
                             ("raw llama.cpp", RAW, RAW)):
        a, b = tok_s(one, 1), tok_s(four, 4)
        if a and b:
            out[f"{label} 4 / 1"] = b / a
    return out


def concurrency_rows(res: dict[str, Any]) -> list[tuple[str, ...]]:
    """(system, clients, tok/s, TTFT p50/p99, ITL p50/p99) lines of the table."""
    rows: list[tuple[str, ...]] = []
    s = res.get("summary", {})
    order = ["orcd-slots4", "orcd-slots8", *[f"llama-server-p{n}" for n in LEVELS],
             "llama_cpp.server", RAW]
    for n in LEVELS:
        for name in order:
            cell = s.get(name, {}).get(n) or s.get(name, {}).get(str(n))
            if cell:
                label = name if not name.startswith("llama-server") else "llama-server --parallel N"
                rows.append((str(n), label, f"{cell['tok_s']:.1f}", ms(cell["ttft_s"]),
                             ms(cell["itl_s"])))
    return rows


def _past(g: Gen, t: float) -> bool:
    return bool(g.tokens) and g.tokens[-1] >= t


def cancel_one_of_four(srv: Proc, victim: int, tokens: int) -> dict[str, Any]:
    """Four jobs generating and one waiting; cancel job ``victim``; one sample."""
    native = srv.kind == "orcd"
    jobs = [srv.gen(f"[{nonce()}] {PROMPT}", tokens, native=native) for _ in range(4)]
    info: dict[str, Any] = {}
    waiting: Gen | None = None
    try:
        for g in jobs:
            g.wait_tokens(8)
        waiting = srv.gen(f"[{nonce()}] {PROMPT}", 4, native=native)
        if native:
            waiting.wait_event("queued")
        else:
            time.sleep(0.15)  # let the request reach llama-server's queue
            if waiting.tokens:
                raise RuntimeError("the fifth job was not kept waiting")
        others = [g for i, g in enumerate(jobs) if i != victim]
        t0 = now()
        srv.cancel(jobs[victim])
        waiting.wait_tokens(1, 60)
        info["slot_first_token_s"] = waiting.tokens[0] - t0
        if native:
            started = waiting.first("started")
            info["slot_started_s"] = None if started is None else started - t0
            jobs[victim].finish(30)
            err = jobs[victim].first("error")
            if err is None:
                raise RuntimeError("the cancelled job did not end with an error event")
            info["cancelled_s"] = err - t0
        t_end = t0 + 1.0
        for g in others:
            g.wait_until(functools.partial(_past, g, t_end), 60)
        before = [b - a for g in others for a, b in zip(g.tokens, g.tokens[1:], strict=False)
                  if b < t0]
        around = [b - a for g in others for a, b in zip(g.tokens, g.tokens[1:], strict=False)
                  if t0 <= b <= t_end]
        info["others_gap_before_p50_s"] = quantile(before, 0.5) if before else None
        info["others_worst_gap_s"] = max(around) if around else None
        info["valid"] = True
    except Exception as exc:  # noqa: BLE001 - one bad sample must not end the run
        info.update(valid=False, why=f"{type(exc).__name__}: {exc}")
        log(f"{srv.name}: cancel under load sample failed: {info['why']}")
    finally:
        everyone = [*jobs, *([waiting] if waiting else [])]
        for g in everyone:
            if not g.done.is_set():
                srv.cancel(g)
        for g in everyone:
            g.finish(60)
    return info


def measure_cancel_under_load(servers: list[Proc], reps: int, tokens: int) -> dict[str, Any]:
    """``reps`` samples per server, interleaved; the victim rotates over the four slots."""
    raw: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    for i in range(reps):
        for srv in servers:
            raw[srv.name].append(cancel_one_of_four(srv, i % 4, tokens))
    summary: dict[str, Any] = {}
    for name, xs in raw.items():
        ok = [x for x in xs if x.get("valid")]
        summary[name] = {key: p50_p99([x[key] for x in ok if x.get(key) is not None])
                         for key in ("cancelled_s", "slot_started_s", "slot_first_token_s",
                                     "others_worst_gap_s", "others_gap_before_p50_s")}
        summary[name]["invalid"] = len(xs) - len(ok)
        log(f"{name}: cancel under load: CANCELLED {ms(summary[name]['cancelled_s'])} ms, "
            f"slot {ms(summary[name]['slot_first_token_s'])} ms, others' worst gap "
            f"{ms(summary[name]['others_worst_gap_s'])} ms ({len(xs) - len(ok)} invalid)")
    return {"reps": reps, "summary": summary, "samples": raw}


def cancel_rows(res: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for name, s in res.get("summary", {}).items():
        rows.append((name, ms(s["cancelled_s"]), ms(s["slot_started_s"]),
                     ms(s["slot_first_token_s"]), ms(s["others_worst_gap_s"]),
                     ms(s["others_gap_before_p50_s"])))
    return rows


CANCEL_HEAD = ("system", "cancel -> CANCELLED ms", "-> next job started ms",
               "-> next job 1st token ms", "others' worst gap in 1 s ms",
               "others' usual gap ms")
CONCURRENCY_HEAD = ("clients", "system", "aggregate tok/s", "TTFT ms p50 / p99",
                    "inter-token ms p50 / p99")
