"""Concurrent clients (issue #8) and cancelling one job of four under load.

:func:`measure_concurrency`: for 1, 2, 4 and 8 clients that each stream one completion of
``tokens`` tokens at once (``/v1/completions``, temperature 0, every prompt unique), the
aggregate tokens/s (all tokens over first send -> last token), TTFT and inter-token latency
p50/p99 over every request and gap. Systems: orcd ``--slots 4`` (8 clients: 4 generate,
4 wait in its queue) and ``--slots 8`` for the 8 row, llama-server ``--parallel N``
(continuous batching) for each N, and llama_cpp.server (one request at a time). Levels and
systems are interleaved, round after round, so a noisy neighbour hits them all alike.

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

from peers import Gen, Proc, log, ms, nonce, now, p50_p99, quantile

PROMPT = "Write a long, detailed story about a lighthouse keeper and a lost whale."
LEVELS = (1, 2, 4, 8)


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
                        tokens: int) -> dict[str, Any]:
    """``rounds`` interleaved rounds over every (system, level); raw samples per cell."""
    raw: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for srv, levels in systems:  # warm-up: first-use costs are not what is measured
        srv.gen(f"[{nonce()}] {PROMPT}", 8, native=False).finish()
        raw[srv.name] = {n: [] for n in levels}
    for r in range(rounds):
        for n in LEVELS:
            for srv, levels in systems:
                if n in levels:
                    raw[srv.name][n].append(one_level(srv, n, tokens))
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
    return {"tokens_per_request": tokens, "rounds": rounds, "summary": summary,
            "samples": {k: {str(n): v for n, v in c.items()} for k, c in raw.items()}}


def concurrency_rows(res: dict[str, Any]) -> list[tuple[str, ...]]:
    """(system, clients, tok/s, TTFT p50/p99, ITL p50/p99) lines of the table."""
    rows: list[tuple[str, ...]] = []
    s = res.get("summary", {})
    order = ["orcd-slots4", "orcd-slots8", *[f"llama-server-p{n}" for n in LEVELS],
             "llama_cpp.server"]
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
