"""End to end: the real `orcd serve` process with the default Gemma model, over a socket.

FT-024's flow: started → token* → end, determinism, /health during inference, cancel
mid-stream, and a clean SIGTERM exit.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.gemma


@pytest.fixture
def gemma_server(gemma_model: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    log = (tmp_path / "orcd.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "orcd", "serve", "--model", str(gemma_model), "--port", "0",
         "--n-ctx", "2048", "--worker-id", "e2e", "--slots", "1", "--ledger", "none"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("orcd listening on http://"), line
        uri = line.split()[-1]
        deadline = time.monotonic() + 60
        while httpx.get(f"{uri}/health").json()["status"] != "ok":
            assert time.monotonic() < deadline, "the model did not load in 60 s"
            time.sleep(0.1)
        yield uri, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        log.close()


def events_of(resp: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    name = None
    for line in resp.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: ") and name:
            yield name, json.loads(line[6:])


def run_job(client: httpx.Client, **body: Any) -> list[tuple[str, dict[str, Any]]]:
    with client.stream("POST", "/execute", json=body) as resp:
        assert resp.status_code == 200
        return list(events_of(resp))


def test_real_model_over_http(gemma_server: tuple[str, subprocess.Popen[str]]) -> None:
    uri, proc = gemma_server
    with httpx.Client(base_url=uri, timeout=60) as client:
        health = client.get("/health").json()
        assert health["model"] and health["quant_kind"] == "Q4_K_M"
        assert health["device"] == "cpu" and health["vocab_size"] == 262144

        first = run_job(client, job_id="e2e-1", prompt="Write a haiku about GPU computing",
                        max_tokens=24, temperature=0.0, seed=42)
        names = [n for n, _ in first]
        assert names[0] == "started" and names[-1] == "end" and "token" in names
        assert names.count("end") == 1 and "error" not in names
        text = "".join(d["t"] for n, d in first if n == "token")
        assert text.strip(), "the model produced no text"
        second = run_job(client, job_id="e2e-2", prompt="Write a haiku about GPU computing",
                         max_tokens=24, temperature=0.0, seed=42)
        assert "".join(d["t"] for n, d in second if n == "token") == text

        # Health while generating, then cancel mid-stream.
        with client.stream("POST", "/execute", json={
            "job_id": "e2e-long", "prompt": "Write a very long story about a dragon.",
            "max_tokens": 1500, "temperature": 0.7, "seed": 42,
        }) as resp:
            stream = events_of(resp)
            tokens = 0
            for name, _ in stream:
                tokens += name == "token"
                if tokens == 5:
                    break
            with httpx.Client(base_url=uri, timeout=5) as side:
                t0 = time.perf_counter()
                busy = side.get("/health")
                assert time.perf_counter() - t0 < 1.0
                assert busy.status_code == 200 and busy.json()["state"] == "busy"
                cancel = side.post("/cancel", json={"job_id": "e2e-long"})
                assert cancel.status_code == 202 and cancel.json()["state"] == "running"
            rest = list(stream)
        assert rest[-1][0] == "error" and rest[-1][1]["code"] == "CANCELLED"
        assert [n for n, _ in rest].count("error") == 1
        job = client.get("/jobs/e2e-long").json()
        assert job["state"] == "cancelled" and job["tokens_out"] < 1500
        after = run_job(client, job_id="e2e-after", prompt="Hello", max_tokens=4, seed=1)
        assert after[-1][0] == "end"

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
