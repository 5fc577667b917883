#!/usr/bin/env python3
"""Does the ledger slow down ``POST /cancel``? Two workers in one process, one with
``--ledger none`` and one with a ledger file, the same tiny model; each round starts a long
job on both, waits for its first token, and times ``POST /cancel`` (request to 202) on
each, in alternating order. Prints p50/p99 side by side.

    python bench/ledger_cancel_latency.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orcd._tinymodel import build_tiny_gguf  # noqa: E402
from orcd.config import Config  # noqa: E402
from orcd.server import Worker, serve  # noqa: E402


async def cancel_once(client: httpx.AsyncClient, job_id: str) -> float:
    """Start a long job, wait for its first token, time its cancel (seconds)."""
    body = {"job_id": job_id, "prompt": "go on", "max_tokens": 900}
    async with client.stream("POST", "/execute", json=body) as resp:
        lines = resp.aiter_lines()  # one reader for the whole stream
        async for line in lines:
            if line == "event: token":
                break
        start = time.perf_counter()
        answer = await client.post("/cancel", json={"job_id": job_id})
        elapsed = time.perf_counter() - start
        assert answer.status_code == 202 and answer.json()["state"] == "running", answer.text
        async for _ in lines:
            pass
    return elapsed


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _measure(rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_gguf(Path(tmp) / "tiny.gguf", n_ctx=1024)
        base = dict(model=model, port=0, n_ctx=1024, threads=1, slots=2, worker_id="bench")
        configs = {"--ledger none": Config(**base, ledger="none"),  # type: ignore[arg-type]
                   "--ledger FILE": Config(**base,  # type: ignore[arg-type]
                                           ledger=Path(tmp) / "ledger.sqlite3")}
        times: dict[str, list[float]] = {name: [] for name in configs}
        async with trio.open_nursery() as nursery:
            workers: dict[str, Worker] = {}
            for name, config in configs.items():
                workers[name] = await nursery.start(partial(serve, config))
            clients = {name: httpx.AsyncClient(base_url=w.uri or "", timeout=30)
                       for name, w in workers.items()}
            while any(w.engine is None for w in workers.values()):
                await trio.sleep(0.05)
            names = list(configs)
            for i in range(rounds + 5):  # the first 5 warm up
                for name in names if i % 2 == 0 else names[::-1]:
                    elapsed = await cancel_once(clients[name], f"c-{i}")
                    if i >= 5:
                        times[name].append(elapsed)
            ledger = workers["--ledger FILE"].registry.ledger
            written = ledger.health().written if ledger is not None else 0
            for client in clients.values():
                await client.aclose()
            for worker in workers.values():
                worker.request_shutdown("bench over")
    return {"rounds": rounds, "ledger_rows_written": written, "seconds": times}


def measure(rounds: int) -> dict[str, Any]:
    """``rounds`` timed cancels on each worker: ``{"seconds": {name: [...]}, ...}``."""
    return trio.run(_measure, rounds)


def main(rounds: int) -> None:
    res = measure(rounds)
    print(f"POST /cancel of a running job, request to 202, {rounds} rounds each "
          f"(ledger rows written: {res['ledger_rows_written']})")
    print(f"{'':16}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, values in res["seconds"].items():
        print(f"{name:16}{pct(values, 0.5):10.3f}{pct(values, 0.99):10.3f}"
              f"{statistics.fmean(values) * 1000:10.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    main(parser.parse_args().rounds)
