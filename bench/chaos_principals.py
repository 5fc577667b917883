#!/usr/bin/env python3
"""Chaos for principals: a second principal tries to see, cancel and pre-cancel the first
one's jobs. Invariant: it never succeeds (CONTRACT §10).

``bench/chaos.py`` calls :func:`second_principal_round` against a worker started with
``--auth-file`` holding two user principals; run alone, this script starts such a worker
(tiny model, a temporary auth file and ledger) and runs a few rounds:

    python bench/chaos_principals.py [--rounds N] [--seed N] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orcd.auth import add_token  # noqa: E402


async def _stream(client: httpx.AsyncClient, job_id: str, max_tokens: int,
                  started: trio.Event) -> list[tuple[str, dict[str, Any]]]:
    """Run ``job_id`` to its end; ``started`` is set once the worker answered."""
    events: list[tuple[str, dict[str, Any]]] = []
    body = {"job_id": job_id, "prompt": "chaos", "max_tokens": max_tokens}
    async with client.stream("POST", "/execute", json=body) as resp:
        started.set()
        if resp.status_code != 200:
            events.append(("refused", {"status": resp.status_code}))
            return events
        name = None
        async for line in resp.aiter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name is not None:
                events.append((name, json.loads(line[6:])))
    return events


async def second_principal_round(url: str, owner_token: str, intruder_token: str, *,
                                 owner: str, rng: random.Random, jobs: int = 4,
                                 max_tokens: int = 64) -> list[str]:
    """One round: ``owner`` runs ``jobs`` jobs while the intruder (another *user*) looks them
    up, lists, cancels (``/cancel``, ``/v1/requests/{id}/cancel``, naming the owner) and
    pre-cancels ids the owner is about to use. Returns the violations (empty: all held).

    Server flags: ``--auth-file`` with both tokens as role ``user``; any slots/queue depth
    (a refused owner job, 503 or 429, is not a violation, it is skipped)."""
    violations: list[str] = []
    tag = f"{rng.randrange(16**8):08x}"
    ids = [f"p-{tag}-{i}" for i in range(jobs)]
    results: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    headers_o = {"Authorization": f"Bearer {owner_token}"}
    headers_i = {"Authorization": f"Bearer {intruder_token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers_o, timeout=60) as mine, \
            httpx.AsyncClient(base_url=url, headers=headers_i, timeout=60) as theirs:

        def bad(where: str, what: str) -> None:
            violations.append(f"{where}: {what}")

        # Pre-cancel: the intruder cancels ids before the owner uses them.
        for job_id in ids[: jobs // 2]:
            resp = await theirs.post("/cancel", json={"job_id": job_id})
            if resp.status_code != 202 or resp.json().get("state") != "unknown":
                bad(job_id, f"intruder's pre-cancel answered {resp.status_code} {resp.text}")

        async def run(job_id: str) -> None:
            started = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(attack, job_id, started)
                results[job_id] = await _stream(mine, job_id, max_tokens, started)

        async def attack(job_id: str, started: trio.Event) -> None:
            await started.wait()
            for _ in range(rng.randint(1, 3)):
                choice = rng.randrange(5)
                if choice == 0:
                    resp = await theirs.get(f"/jobs/{job_id}")
                    if resp.status_code != 404:
                        bad(job_id, f"intruder GET /jobs/{{id}} answered {resp.status_code}")
                elif choice == 1:
                    listed = (await theirs.get("/jobs")).json().get("jobs", [])
                    if any(j.get("principal") == owner for j in listed):
                        bad(job_id, "intruder's GET /jobs shows the owner's jobs")
                elif choice == 2:
                    resp = await theirs.post("/cancel", json={"job_id": job_id})
                    if resp.status_code != 202 or resp.json().get("state") not in (
                            "unknown", "cancelled", "completed", "failed"):
                        bad(job_id, f"intruder /cancel: {resp.status_code} {resp.text}")
                elif choice == 3:
                    resp = await theirs.post(f"/v1/requests/{job_id}/cancel")
                    if resp.status_code != 202:
                        bad(job_id, f"intruder /v1 cancel: {resp.status_code}")
                else:
                    resp = await theirs.post("/cancel", json={"job_id": job_id,
                                                              "principal": owner})
                    if resp.status_code != 403:
                        bad(job_id, f"intruder naming {owner}: {resp.status_code}")
                await trio.sleep(rng.random() * 0.01)

        async with trio.open_nursery() as nursery:
            for job_id in ids:
                nursery.start_soon(run, job_id)

        for job_id, events in results.items():
            if events and events[0][0] == "refused":
                continue  # the worker was full: nothing to protect
            last = events[-1] if events else ("none", {})
            if last[0] != "end":
                bad(job_id, f"the owner's job ended with {last[0]} {last[1]}")
            record = (await mine.get(f"/jobs/{job_id}")).json()
            if record.get("cancelled_by") is not None or record.get("state") != "completed":
                bad(job_id, f"the owner's record: {record.get('state')}, cancelled_by "
                            f"{record.get('cancelled_by')}")
        # The intruder's own tombstones still stop its own jobs: its cancels went somewhere.
        events = await _stream(theirs, ids[0], 2, trio.Event()) if jobs >= 2 else []
        if jobs >= 2 and (not events or events[-1][1].get("reason") != "cancelled_before_start"):
            bad(ids[0], f"the intruder's own pre-cancel did not hold: {events[-1:]}")
    return violations


async def _main(url: str, tokens: dict[str, str], rounds: int, seed: int) -> int:
    rng = random.Random(seed)
    failures = 0
    for i in range(rounds):
        owner, intruder = ("alice", "bob") if i % 2 == 0 else ("bob", "alice")
        found = await second_principal_round(url, tokens[owner], tokens[intruder],
                                             owner=owner, rng=rng)
        failures += len(found)
        for line in found:
            print(f"VIOLATION round {i}: {line}")
    print(f"{rounds} rounds, {failures} violations")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from orcd._tinymodel import build_tiny_gguf

            model = build_tiny_gguf(Path(tmp) / "tiny.gguf", n_ctx=1024)
        auth = Path(tmp) / "auth"
        tokens = {name: add_token(auth, name) for name in ("alice", "bob")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "orcd", "serve", "--model", str(model), "--port", "0",
             "--n-ctx", "1024", "--auth-file", str(auth), "--ledger",
             str(Path(tmp) / "ledger.sqlite3")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        try:
            assert proc.stdout is not None
            match = re.search(r"orcd listening on (http://\S+)", proc.stdout.readline())
            if match is None:
                print("orcd did not start", file=sys.stderr)
                return 1
            url = match.group(1)
            deadline = time.monotonic() + 30
            while httpx.get(f"{url}/health", timeout=2).status_code != 200:
                if time.monotonic() > deadline:
                    print("orcd never became ready", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            return trio.run(_main, url, tokens, args.rounds, args.seed)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
            if proc.stdout is not None:
                proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
