#!/usr/bin/env python3
"""Chaos run: a randomized, seeded, bounded storm against a real ``orcd serve`` process.

Starts orcd on loopback (a tiny random-weight GGUF by default; --slots 4, a 1 s stall
timeout, a 2 s drain), warms it up, takes an RSS baseline, then lets a few concurrent clients
run a seeded plan of jobs: plain completions, cancels in every phase (before the execute,
queued, prompt evaluation, mid-stream, after completion, repeated), client disconnects
(queued, mid-stream), short deadlines, bursts that fill the queue, duplicate job ids,
determinism pairs, malformed requests drawn from hypothesis strategies, and hostile clients
(chaos_hostile: readers that stall, clients that vanish during admission, right after the
stream opened, or during prompt evaluation). Then: determinism pairs alone, the idle checks
(no job, slot or KV cell left behind; RSS within 5 % of the baseline), a storm of /cancel
calls for unknown ids with /health and /cancel latency measured before, during and after it
(chaos_storm), and SIGTERM while stalled, trickling and ordinary readers hold every slot.
Every stream, every reply and the final server state are checked against CONTRACT.md; any
invariant violation makes the exit status 1.

    python bench/chaos.py [--quick|--long] [--seed N] [--model PATH] [--jobs N]
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeAlias

import httpx
import trio
from chaos_checks import (
    CANCEL_BOUND_S,
    FINAL_STATES,
    FRAGMENTS,
    MAX_TOKENS_OUT,
    N_CTX,
    PLAN_CTX,
    RSS_TOLERANCE,
    STOP_POOL,
    JobSpec,
    Report,
)
from chaos_client import Chaos, Item
from chaos_hostile import Hostile, HostileClients, make_hostiles, shutdown_with_hostiles
from chaos_malformed import BadRequest, RawAbuse, generate_malformed, raw_abuses
from chaos_server import Server, check_idle, metric_values
from chaos_storm import Storm, storm_lines

STALL_TIMEOUT_S = 1.0  # --stall-timeout-s of the server under test
DRAIN_TIMEOUT_S = 2.0  # --drain-timeout-s
SHUTDOWN_GRACE_S = 2.0  # orcd's hard deadline after the drain (shutdown_grace_s)
STORM_CALLS = 200_000
PlanItem: TypeAlias = Item | Hostile


@dataclass(frozen=True)
class Mode:
    name: str
    jobs: int
    clients: int
    slots: int = 4  # orcd's default: jobs share one batch
    queue_depth: int = 4
    # The server remembers this many finished jobs (--job-history): enough for every per-job
    # GET /jobs check, small enough that the bounded history (about 1.2 KB a job) stays far
    # below the 5 % memory budget. The warm-up also brings the allocator to its working size
    # (the per-thread arenas that llama.cpp's and trio's threads create on first use).
    job_history: int = 256
    warmup: int = 60
    default_max: float = 0.02  # share of jobs without max_tokens (up to --max-tokens-out)
    hostile: int = 5  # hostile clients of each kind
    storm_budget_s: float | None = None  # None: all STORM_CALLS, however long it takes
    alone_pairs: int = 3  # determinism pairs run with nothing else on the worker


MODES = {
    # Quick warm-up: 200 jobs. With 40, RSS still climbed ~4 % through the first third of the
    # plan before flattening (allocator arenas, history, the ledger's page cache); with 100
    # it still rose 3.6-4.9 % over the plan. The Python heap is flat by then (tracemalloc:
    # only the capped history); the rest is the allocator settling, which slows with every
    # job (in-process, 1,200 jobs: +280 kB over the first 150 after warm-up, +90 kB over the
    # last). The baseline must be taken at the working size, or the 5 % bound measures
    # warm-up.
    "quick": Mode("quick", jobs=150, clients=4, warmup=200, storm_budget_s=20.0),
    "default": Mode("default", jobs=400, clients=4, hostile=10),
    "long": Mode("long", jobs=1200, clients=6, hostile=25, alone_pairs=6),
}
# (action, weight). A burst is several concurrent jobs that overfill slots + queue.
ACTIONS = [
    ("complete", 26), ("cancel_before", 6), ("cancel_queued", 5), ("cancel_prompt", 8),
    ("cancel_mid", 12), ("cancel_after", 6), ("disconnect_mid", 8), ("disconnect_queued", 4),
    ("timeout", 9), ("duplicate", 4), ("determinism", 3), ("burst", 5),
]


def server_flags(mode: Mode) -> list[str]:
    return ["--slots", str(mode.slots), "--queue-depth", str(mode.queue_depth),
            "--n-ctx", str(N_CTX), "--max-tokens-out", str(MAX_TOKENS_OUT),
            "--job-history", str(mode.job_history), "--stall-timeout-s", str(STALL_TIMEOUT_S),
            "--drain-timeout-s", str(DRAIN_TIMEOUT_S)]


# -- the plan ----------------------------------------------------------------------------


def make_prompt(rng: random.Random, max_bytes: int) -> str:
    """A prompt of at most ``max_bytes`` UTF-8 bytes (at least one character)."""
    parts: list[str] = []
    size = 0
    while True:
        frag = rng.choice(FRAGMENTS)
        if rng.random() < 0.2:
            frag = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(20))
        n = len(frag.encode())
        if size + n > max_bytes:
            break
        parts.append(frag)
        size += n
    return "".join(parts) or "x"


def sample_body(rng: random.Random, job_id: str, vocab: int, *, prompt_bytes: tuple[int, int],
                max_tokens: tuple[int, int], default_max: float = 0.02) -> dict[str, Any]:
    prompt = make_prompt(rng, rng.randint(*prompt_bytes))
    room = PLAN_CTX - len(prompt.encode()) - 1  # tokens <= bytes (+BOS) for byte-fallback vocabs
    body: dict[str, Any] = {"job_id": job_id, "prompt": prompt}
    if rng.random() >= default_max:
        body["max_tokens"] = max(1, min(rng.randint(*max_tokens), room))
    if rng.random() < 0.6:
        body["temperature"] = rng.choice([0.0, 0.0, 0.7, 2.0, round(rng.uniform(0, 2), 3)])
    if rng.random() < 0.4:
        body["top_p"] = rng.choice([1.0, 0.0, 0.9, round(rng.random(), 3)])
    if rng.random() < 0.4:
        body["top_k"] = rng.choice([0, 1, 40, vocab, rng.randint(0, vocab)])
    if rng.random() < 0.3:
        body["min_p"] = rng.choice([0.0, 0.05, 1.0, round(rng.random(), 3)])
    if rng.random() < 0.3:
        body["repetition_penalty"] = rng.choice([1.0, 2.0, 1e-6, round(rng.uniform(0.01, 2), 3)])
    if rng.random() < 0.3:
        stops = [rng.choice(STOP_POOL) if rng.random() < 0.7 else make_prompt(rng, 100)[:100]
                 for _ in range(rng.randint(1, 4))]
        body["stop"] = stops
    if rng.random() < 0.7:
        body["seed"] = rng.choice([0, 2**64 - 1, 2**53, rng.randrange(2**64), rng.randrange(1000)])
    return body


def make_plan(rng: random.Random, mode: Mode, n_jobs: int, vocab: int,
              malformed: list[BadRequest], raws: list[RawAbuse],
              hostiles: list[Hostile], prefix: str = "chaos") -> list[PlanItem]:
    plan: list[PlanItem] = []
    names, weights = zip(*ACTIONS, strict=True)
    jobs = 0

    def spec(action: str, **kw: Any) -> JobSpec:
        nonlocal jobs
        jobs += 1
        job_id = f"{prefix}-{jobs:05d}-{action}"
        short = dict(prompt_bytes=(1, 120), max_tokens=(1, 48))
        long_out = dict(prompt_bytes=(1, 120), max_tokens=(200, 800))
        shape = {"cancel_prompt": dict(prompt_bytes=(500, 900), max_tokens=(1, 64)),
                 "timeout": rng.choice([long_out, dict(prompt_bytes=(500, 900),
                                                        max_tokens=(1, 100))])}.get(action)
        if shape is None:
            shape = long_out if action in ("cancel_mid", "disconnect_mid", "cancel_queued",
                                           "disconnect_queued") else short
        body = sample_body(rng, job_id, vocab, default_max=mode.default_max, **shape)
        if action == "timeout":
            body["timeout_ms"] = rng.choice([1, rng.randint(1, 30), rng.randint(30, 250)])
        if action == "determinism":
            body["temperature"] = 0.0
            body["max_tokens"] = min(body.get("max_tokens", 32), 64)
        return JobSpec(job_id, action, body, **kw)

    while jobs < n_jobs:
        action = rng.choices(names, weights)[0]
        if action == "burst":
            subs = ["complete", "cancel_queued", "disconnect_queued", "cancel_mid"]
            plan.append([spec(rng.choice(subs), trigger=rng.randint(1, 5))
                         for _ in range(mode.slots + mode.queue_depth + 2)])
        elif action in ("cancel_mid", "disconnect_mid"):
            plan.append(spec(action, trigger=rng.randint(1, 20), repeats=rng.choice([1, 1, 2, 3])))
        elif action == "disconnect_queued":
            plan.append(spec(action, trigger=rng.choice([0, -1])))
        elif action == "duplicate":
            plan.append(spec(action, trigger=rng.randint(0, 1)))
        else:
            plan.append(spec(action, repeats=rng.choice([1, 1, 1, 2, 4])))
    plan.extend(malformed)
    plan.extend(raws)
    plan.extend(hostiles)
    rng.shuffle(plan)
    return plan



# -- the run -----------------------------------------------------------------------------


class Runner:
    """Hands each planned item to the client that knows how to play it."""

    def __init__(self, chaos: Chaos, hostile: HostileClients) -> None:
        self.chaos, self.hostile = chaos, hostile

    async def run_item(self, item: PlanItem) -> None:
        if isinstance(item, Hostile):
            try:
                await self.hostile.run(item)
            except (OSError, trio.BrokenResourceError) as exc:
                self.chaos.report.bad("transport", f"{type(exc).__name__}: {exc} during "
                                                   f"{item!r:.160}")
        else:
            await self.chaos.run_item(item)

    async def client_loop(self, recv: trio.MemoryReceiveChannel[PlanItem]) -> None:
        async with recv:
            async for item in recv:
                await self.run_item(item)


async def run_plan(runner: Runner, mode: Mode, plan: list[PlanItem], rss_trace: list[int],
                   server: Server | None) -> None:
    """Run ``plan`` with ``mode.clients`` concurrent clients, sampling RSS if ``server``."""
    send, recv = trio.open_memory_channel[PlanItem](len(plan))
    for item in plan:
        send.send_nowait(item)
    send.close()
    async with trio.open_nursery() as outer:
        if server is not None:
            outer.start_soon(sample_rss, server, rss_trace)
        async with trio.open_nursery() as nursery:
            for _ in range(mode.clients):
                nursery.start_soon(runner.client_loop, recv.clone())
        outer.cancel_scope.cancel()


async def sample_rss(server: Server, trace: list[int]) -> None:
    while True:
        trace.append(await trio.to_thread.run_sync(server.rss_kb))
        await trio.sleep(1.0)


async def determinism_alone(chaos: Chaos, rng: random.Random, n: int, vocab: int) -> None:
    """Determinism pairs with nothing else on the worker: the tokens must match."""
    await check_idle(chaos.client, chaos.report, "determinism", CANCEL_BOUND_S + 5)
    for i in range(n):
        job_id = f"alone-{i:03d}"
        body = sample_body(rng, job_id, vocab, prompt_bytes=(1, 120), max_tokens=(8, 64),
                           default_max=0.0)
        body["temperature"] = 0.0
        await chaos.determinism_pair(JobSpec(job_id, "determinism", body), alone=True)


async def final_checks(chaos: Chaos, server: Server, baseline_kb: int) -> dict[str, Any]:
    client, rep = chaos.client, chaos.report
    health = await check_idle(client, rep, "final", CANCEL_BOUND_S + 5)
    for state in ("running", "queued"):
        resp = await client.get("/jobs", params={"state": state})
        if resp.status_code != 200 or resp.json()["jobs"]:
            rep.bad("final", f"GET /jobs?state={state}: {resp.status_code} {resp.text[:300]}")
    listed = (await client.get("/jobs")).json()["jobs"]
    for job in listed:
        if job["job_id"] not in rep.ledger:
            rep.bad("final", f"job {job['job_id']} ({job['state']}) was never seen admitted")
        elif job["state"] not in FINAL_STATES:
            rep.bad("final", f"job {job['job_id']} still {job['state']}")
    metrics = (await client.get("/metrics")).text
    buckets = metric_values(metrics, "orcd_cancel_latency_seconds_bucket")
    server_cancels = {"n": 0, "le_10ms": 0, "le_100ms": 0, "le_5s": 0}
    for labels, value in buckets.items():
        for key, le in (("n", "+Inf"), ("le_10ms", "0.01"), ("le_100ms", "0.1"), ("le_5s", "5.0")):
            if f'le="{le}"' in labels:
                server_cancels[key] += int(value)
    if server_cancels["le_5s"] < server_cancels["n"]:
        rep.bad("final", f"server-side cancel latency over 5 s: {server_cancels}")
    for gauge in ("orcd_active_jobs", "orcd_queued_jobs"):
        if metric_values(metrics, gauge).get("", 0.0) != 0.0:
            rep.bad("final", f"{gauge} is {metric_values(metrics, gauge)} at the end")
    served = {k.split('"')[1]: int(v) for k, v in
              metric_values(metrics, "worker_requests_total").items() if '"' in k}
    mine = Counter(rep.ledger.values())
    if {k: v for k, v in served.items() if v} != dict(mine):
        rep.bad("final", f"worker_requests_total {served} != outcomes seen by clients "
                         f"{dict(mine)}")
    await trio.sleep(0.5)
    end_kb = await trio.to_thread.run_sync(server.rss_kb)
    if end_kb > baseline_kb * (1 + RSS_TOLERANCE):
        rep.bad("final", f"RSS grew from {baseline_kb} kB to {end_kb} kB "
                         f"(+{(end_kb / baseline_kb - 1) * 100:.1f} %)")
    resp = await client.get("/health")
    if resp.status_code != 200 or resp.json().get("status") != "ok" or not server.alive():
        rep.bad("final", f"server not healthy at the end: {resp.status_code} {resp.text[:200]}")
    return {"rss_end_kb": end_kb, "jobs_listed": len(listed), "server_cancels": server_cancels,
            "kv_idle": (health.get("kv_tokens_used"), health.get("prefix_cache_tokens"))}



async def chaos_main(args: argparse.Namespace, mode: Mode, server: Server) -> dict[str, Any]:
    rep = Report()
    rng = random.Random(args.seed)
    url = await trio.to_thread.run_sync(server.start)
    timeout = httpx.Timeout(120.0, connect=10.0)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        with trio.fail_after(300):
            while True:
                resp = await client.get("/health")
                if resp.status_code == 200 and resp.json().get("status") == "ok":
                    vocab = int(resp.json()["vocab_size"])
                    break
                await trio.sleep(0.05)
        chaos = Chaos(client, mode.queue_depth, rep)
        runner = Runner(chaos, HostileClients(chaos, STALL_TIMEOUT_S))
        t0 = time.monotonic()
        # Warm-up: a small plan of the same mix (its own seed), so that every path, and the
        # allocator's per-thread arenas, have been used once before the RSS baseline.
        warm_rng = random.Random(args.seed ^ 0x5EED)
        warm_plan = make_plan(warm_rng, mode, mode.warmup, vocab,
                              generate_malformed(12, args.seed + 1, vocab),
                              raw_abuses(warm_rng, 3), make_hostiles(warm_rng, 1, "warm"),
                              prefix="warm")
        await run_plan(runner, mode, warm_plan, [], None)
        await check_idle(client, rep, "warm-up", 10)
        # The final checks list every job (from memory and the ledger) and read /metrics:
        # their first use is warm-up too.
        await client.get("/jobs")
        await client.get("/metrics")
        phases = {"warm-up": time.monotonic() - t0}
        await trio.sleep(0.5)
        baseline_kb = await trio.to_thread.run_sync(server.rss_kb)
        n_bad = args.malformed if args.malformed is not None else max(20, args.jobs // 2)
        malformed = generate_malformed(n_bad, args.seed, vocab)
        plan = make_plan(rng, mode, args.jobs, vocab, malformed, raw_abuses(rng, n_bad // 8 + 2),
                         make_hostiles(rng, args.hostile, "hostile"))
        rss_trace: list[int] = []
        t = time.monotonic()
        await run_plan(runner, mode, plan, rss_trace, server)
        phases["plan"], t = time.monotonic() - t, time.monotonic()
        await determinism_alone(chaos, rng, mode.alone_pairs, vocab)
        phases["determinism alone"], t = time.monotonic() - t, time.monotonic()
        elapsed = time.monotonic() - t0
        final = await final_checks(chaos, server, baseline_kb)
        if args.storm:
            t = time.monotonic()
            await Storm(chaos, server, args.storm, args.storm_budget).run()
            await check_idle(client, rep, "after the storm", CANCEL_BOUND_S + 5)
            if not server.alive():
                rep.bad("storm", "the worker died")
            phases["storm"] = time.monotonic() - t
        t = time.monotonic()
        final.update(await shutdown_with_hostiles(
            chaos, server, slots=mode.slots, queue_depth=mode.queue_depth,
            drain_s=DRAIN_TIMEOUT_S, grace_s=SHUTDOWN_GRACE_S))
        phases["shutdown"] = time.monotonic() - t
    return {"report": rep, "baseline_kb": baseline_kb, "elapsed": elapsed,
            "rss_trace": rss_trace, "phases": phases, **final}


def summarize(res: dict[str, Any], log_errors: list[str], args: argparse.Namespace,
              mode: Mode) -> int:
    rep: Report = res["report"]
    server_exit = res["exit_code"]
    if server_exit != 0:
        rep.bad("shutdown", f"SIGTERM drain: exit code {server_exit} (expected 0)")
    for line in log_errors:
        rep.bad("server-log", line)
    lat = sorted(rep.cancel_latency)
    pct = (lambda q: f"{lat[min(len(lat) - 1, int(q * len(lat)))] * 1000:.1f} ms") if lat else (
        lambda q: "n/a")
    c = rep.counts
    print(f"\n== orcd chaos ({mode.name}, seed {args.seed}, model {args.model or 'tiny'}) ==")
    print(f"time                {res['elapsed']:.1f} s (server start, storm and shutdown "
          f"excluded); " + ", ".join(f"{k} {v:.1f} s" for k, v in res["phases"].items()))
    print(f"jobs                {c['jobs']} executed (+{mode.warmup} warm-up), "
          f"{c['bursts']} bursts, slots {mode.slots}, queue {mode.queue_depth}")
    print(f"determinism         alone {c['determinism_pairs_alone']} pairs, "
          f"{c['determinism_differ_alone']} differ; under load "
          f"{c['determinism_pairs_under_load']} pairs, {c['determinism_differ_under_load']} "
          f"differ (not batch-invariant, CONTRACT §8)")
    print(f"outcomes            {dict(Counter(rep.ledger.values()))}")
    print(f"cancels by phase    {dict(rep.cancels)} ({c['repeated_cancels']} of them repeats)")
    print(f"cancel -> terminal  p50 {pct(0.5)}, p95 {pct(0.95)}, max {pct(1.0)} "
          f"(n={len(lat)}); lost races {c['cancel_lost_race']}, "
          f"trigger missed {c['cancel_trigger_missed']}, over 100 ms "
          f"{sum(x > 0.1 for x in lat)}")
    sc = res["server_cancels"]
    print(f"server cancel stop  {sc['n']} cancels: {sc['le_10ms']} within 10 ms, "
          f"{sc['le_100ms']} within 100 ms (orcd_cancel_latency_seconds)")
    lag = sorted(rep.disconnect_lag)
    lost = {k.removeprefix("disconnect_lost_race_"): v for k, v in c.items()
            if k.startswith("disconnect_lost_race_")}
    print(f"disconnects         {dict(rep.disconnects)}; job final after p50 "
          f"{lag[len(lag) // 2] * 1000 if lag else 0:.0f} ms, max "
          f"{lag[-1] * 1000 if lag else 0:.0f} ms; completed anyway {lost}")
    print(f"timeouts            {c['timeouts']} INFERENCE_TIMEOUT")
    print(f"busy rejections     {c['busy_rejections']} (gave up {c['gave_up_busy']}); "
          f"duplicates rejected {c['duplicates_rejected']}")
    print(f"malformed requests  {sum(rep.malformed.values())}: "
          f"{dict(sorted(rep.malformed.items()))}")
    print(f"RSS                 baseline {res['baseline_kb']} kB, end {res['rss_end_kb']} kB "
          f"({(res['rss_end_kb'] / res['baseline_kb'] - 1) * 100:+.1f} %); during the run "
          f"{min(res['rss_trace'], default=0)}..{max(res['rss_trace'], default=0)} kB")
    trace = res["rss_trace"]
    if len(trace) >= 10:
        print("RSS trace (kB)      " + " ".join(str(trace[i * (len(trace) - 1) // 9])
                                                for i in range(10)))
    print(f"job history         {res['jobs_listed']} jobs listed by GET /jobs at the end")
    print(f"idle KV             kv_tokens_used, prefix_cache_tokens = {res['kv_idle']}")
    hostile = dict(sorted(rep.hostile.items()))
    print(f"hostile clients     {hostile} (stall timeout {STALL_TIMEOUT_S:g} s)")
    for line in storm_lines(rep):
        print(line)
    sd = rep.figures.get("shutdown", {})
    print(f"shutdown under load {c['drain_end']} streams ended, {c['drain_cancelled']} "
          f"cancelled (shutdown) while {sd.get('stalled')} stalled and trickling readers "
          f"({sd.get('drip')}) held streams; exit code {server_exit} after "
          f"{res['exit_s']:.2f} s (bound {DRAIN_TIMEOUT_S + SHUTDOWN_GRACE_S + 1:g} s)")
    print(f"violations          {len(rep.violations)}")
    groups: dict[str, list[str]] = {}
    for v in rep.violations:  # group repeats of one problem: ids and numbers blanked out
        key = re.sub(r'(bad|chaos|warm|hostile|storm|drain)-[\w-]*|"correlation_id": "[^"]*"|'
                     r'\d+', "#", v)
        groups.setdefault(key, []).append(v)
    for same in groups.values():
        print(f"  - {same[0]}" + (f"  (x{len(same)})" if len(same) > 1 else ""))
    return 1 if rep.violations else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true",
                       help="~150 jobs, a 20 s cancel storm (CI, under 3 minutes)")
    group.add_argument("--long", action="store_true", help="1200 jobs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: tiny model)")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--malformed", type=int, default=None, help="malformed requests")
    parser.add_argument("--hostile", type=int, default=None,
                        help="hostile clients of each kind (stall, vanish_*)")
    parser.add_argument("--storm", type=int, default=STORM_CALLS,
                        help=f"/cancel calls for unknown ids (default {STORM_CALLS}; 0: none)")
    parser.add_argument("--storm-budget", type=float, default=None,
                        help="stop the storm after this many seconds (--quick: 20)")
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "long" if args.long else "default"]
    args.jobs = args.jobs or mode.jobs
    if args.jobs < 50:
        mode = replace(mode, warmup=min(mode.warmup, 6))
    args.hostile = mode.hostile if args.hostile is None else args.hostile
    if args.storm_budget is None:
        args.storm_budget = mode.storm_budget_s
    if args.model is not None:  # a real model is slow: no job runs to the context's end
        mode = replace(mode, default_max=0.0)
    workdir = Path(tempfile.mkdtemp(prefix="orcd-chaos-"))
    model = args.model
    if model is None:
        from orcd._tinymodel import build_tiny_gguf

        model = build_tiny_gguf(workdir / "tiny.gguf", n_ctx=N_CTX)
    server = Server(model.resolve(), server_flags(mode), workdir)
    try:
        res = trio.run(chaos_main, args, mode, server)
    except BaseException:
        server.stop()
        print(f"chaos run aborted; server log kept in {server.log_path}", file=sys.stderr)
        raise
    server.stop()
    status = summarize(res, server.error_log_lines(), args, mode)
    if status:
        print(f"server log kept in {server.log_path}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
