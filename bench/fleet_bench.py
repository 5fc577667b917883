#!/usr/bin/env python3
"""Cancel latency and per-request cost, direct to a worker vs through the fleet's HAProxy.

    python bench/fleet_bench.py [--model PATH] [--workers 3] [--runs 20] [--out FILE]

Starts a real fleet with ``orcd fleet run`` (N workers + HAProxy on loopback), then, for
each of ``direct`` (worker w1's own port) and ``front`` (HAProxy):

* cancel latency: a job is started; at its first token (``decode``) or at ``started``
  with a long prompt (``prompt``) a body-only ``POST /cancel`` is sent; the figure is the
  time from sending the cancel to reading the stream's ``error CANCELLED`` event;
* per-request cost: ``GET /health`` and ``POST /cancel`` of an unknown id (a body HAProxy
  must buffer, parse and hash) on a kept-alive connection.

:func:`measure_fleet` returns the numbers and :func:`rows` the table lines, so
``bench/bench.py`` can add the "cancel latency direct vs through the front door" row.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
LONG_PROMPT = "The keeper watched the grey sea roll against the rocks every evening. " * 40
now = time.perf_counter


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summary(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "p50": quantile(xs, 0.5), "p99": quantile(xs, 0.99),
            "max": max(xs), "mean": sum(xs) / len(xs)}


def _free_base_port(count: int) -> int:
    for _ in range(100):
        base = random.randrange(20000, 60000 - count)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free loopback ports")


@contextmanager
def running_fleet(model: Path, workers: int, threads: int
                  ) -> Iterator[tuple[str, list[str], Path]]:
    """``orcd fleet run`` for the block: (front URI, worker URIs, run folder); drained
    afterwards."""
    port = _free_base_port(workers + 1)
    run_dir = Path(tempfile.mkdtemp(prefix="orcd-fleet-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCD_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orcd", "fleet", "run", str(workers), "--model", str(model),
         "--port", str(port), "--run-dir", str(run_dir),
         "--serve-args", f"--threads {threads} --log-level warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    # One reader owns the pipe for the fleet's life (HAProxy's request log goes on into it).
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                line = ""
            if line.startswith("orcd fleet ready on"):
                break
            if proc.poll() is not None:
                raise RuntimeError(f"orcd fleet run exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("the fleet was not ready in 300 s")
        yield (f"http://127.0.0.1:{port}",
               [f"http://127.0.0.1:{port + 1 + i}" for i in range(workers)], run_dir)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(run_dir, ignore_errors=True)


def _events(resp: httpx.Response) -> Iterator[tuple[str, float]]:
    pending = b""
    name = ""
    for chunk in resp.iter_raw():
        at = now()
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"event: "):
                name = line[7:].decode()
                yield name, at


def cancel_sample(client: httpx.Client, base: str, job_id: str, phase: str) -> float:
    """Seconds from sending a body-only cancel to reading CANCELLED, in ``phase``."""
    body: dict[str, Any] = {"job_id": job_id, "seed": 1, "max_tokens": 1000}
    body["prompt"] = LONG_PROMPT if phase == "prompt" else "Tell me a very long story."
    wait_for = "started" if phase == "prompt" else "token"
    sent = 0.0
    with client.stream("POST", f"{base}/execute", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"/execute answered {resp.status_code}: {resp.read()[:200]!r}")
        for name, at in _events(resp):
            if name == wait_for and not sent:
                sent = now()
                client.post(f"{base}/cancel", json={"job_id": job_id})
            elif name == "error":
                return at - sent
            elif name == "end":
                raise RuntimeError(f"{job_id} ended before its cancel")
    raise RuntimeError(f"{job_id}: the stream closed without a terminal event")


def request_costs(client: httpx.Client, base: str, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"health": [], "cancel_unknown": []}
    for i in range(runs):
        t = now()
        client.get(f"{base}/health")
        out["health"].append(now() - t)
        t = now()
        client.post(f"{base}/cancel", json={"job_id": f"bench-unknown-{i}-{random.random()}"})
        out["cancel_unknown"].append(now() - t)
    return out


def haproxy_cpu_s(run_dir: Path) -> float:
    """CPU seconds (user + system) the fleet's HAProxy has used, from its admin socket's
    ``show info`` (its pid) and /proc."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(run_dir / "haproxy.sock"))
        sock.sendall(b"show info\n")
        info = b""
        while chunk := sock.recv(65536):
            info += chunk
    pid = next(line.split(b":")[1].strip() for line in info.splitlines()
               if line.startswith(b"Pid:"))
    fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def token_stream(client: httpx.Client, base: str, tokens: int) -> int:
    body = {"job_id": f"bench-stream-{random.getrandbits(48):012x}", "seed": 1,
            "prompt": "Tell me a very long story.", "max_tokens": tokens}
    with client.stream("POST", f"{base}/execute", json=body) as resp:
        return sum(1 for name, _at in _events(resp) if name == "token")


def measure_fleet(model: Path, *, workers: int = 3, runs: int = 20, threads: int = 1,
                  requests: int = 1000) -> dict[str, Any]:
    """Cancel latency per phase and per-request cost, direct (w1) vs front (HAProxy)."""
    result: dict[str, Any] = {"workers": workers, "runs": runs, "model": str(model)}
    with running_fleet(model, workers, threads) as (front, worker_uris, run_dir):
        targets = {"direct": worker_uris[0], "front": front}
        with httpx.Client(timeout=60) as client:
            for phase in ("decode", "prompt"):
                samples: dict[str, list[float]] = {"direct": [], "front": []}
                for i in range(runs):
                    for where, base in targets.items():  # interleaved: same conditions
                        job_id = f"bench-{phase}-{where}-{i}-{random.getrandbits(32):08x}"
                        samples[where].append(cancel_sample(client, base, job_id, phase))
                result[f"cancel_{phase}_s"] = {k: summary(v) for k, v in samples.items()}
            for base in targets.values():
                request_costs(client, base, 20)  # warm the connections
            costs = {where: request_costs(client, base, requests)
                     for where, base in targets.items()}
            for kind in ("health", "cancel_unknown"):
                result[f"{kind}_s"] = {w: summary(c[kind]) for w, c in costs.items()}
            # HAProxy's own CPU per proxied request and per forwarded token frame, less its
            # idle rate (health checks) over the same time.
            cpu, t = haproxy_cpu_s(run_dir), now()
            time.sleep(5.0)
            idle_rate = (haproxy_cpu_s(run_dir) - cpu) / (now() - t)
            cpu, t = haproxy_cpu_s(run_dir), now()
            request_costs(client, front, requests)
            busy = haproxy_cpu_s(run_dir) - cpu - idle_rate * (now() - t)
            result["haproxy_cpu_us_per_request"] = max(0.0, busy) / (2 * requests) * 1e6
            cpu, t = haproxy_cpu_s(run_dir), now()
            streamed = sum(token_stream(client, front, 1000) for _ in range(3))
            busy = haproxy_cpu_s(run_dir) - cpu - idle_rate * (now() - t)
            result["haproxy_cpu_us_per_token"] = max(0.0, busy) / streamed * 1e6
    return result


def rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, direct, front) lines in milliseconds, p50 / p99."""
    def ms(s: dict[str, Any]) -> str:
        return f"{s['p50'] * 1e3:.2f} / {s['p99'] * 1e3:.2f}" if s.get("n") else "-"

    out = []
    for key, label in (("cancel_decode_s", "cancel -> CANCELLED, decode"),
                       ("cancel_prompt_s", "cancel -> CANCELLED, prompt"),
                       ("health_s", "GET /health"),
                       ("cancel_unknown_s", "POST /cancel (unknown id)")):
        cell = result.get(key, {})
        out.append((f"{label} ms p50/p99", ms(cell.get("direct", {})), ms(cell.get("front", {}))))
    for key in ("haproxy_cpu_us_per_request", "haproxy_cpu_us_per_token"):
        if key in result:
            out.append((key.replace("_", " "), "", f"{result[key]:.1f}"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None,
                    help="GGUF model (default: Gemma 3 270M from models/, else the tiny model)")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="threads per worker")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = ap.parse_args(argv)
    model = args.model
    if model is None:
        if DEFAULT_MODEL.exists():
            model = DEFAULT_MODEL
        else:
            from orcd._tinymodel import build_tiny_gguf

            model = build_tiny_gguf(Path(tempfile.mkdtemp()) / "tiny.gguf", n_ctx=4096)
    result = measure_fleet(model, workers=args.workers, runs=args.runs, threads=args.threads)
    table = [("", "direct", "front door"), *rows(result)]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
