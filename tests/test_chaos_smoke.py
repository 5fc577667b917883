"""bench/chaos.py in a very short mode, so the chaos suite cannot rot unnoticed.

It starts a real ``orcd serve`` process on the tiny model and runs 20 seeded jobs (every
action: cancels in each phase, disconnects, deadlines, bursts, malformed requests) mixed with
one hostile client of each kind (a reader that stalls, clients that vanish during admission,
right after the stream opened and during prompt evaluation), the idle checks (no slot or KV
cell leaked), a short /cancel storm for unknown ids, and SIGTERM while stalled, trickling and
ordinary readers hold every slot; any contract violation it finds fails this test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(200)
def test_chaos_short_run_finds_no_violation() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--jobs", "20", "--malformed", "12",
         "--hostile", "1", "--storm", "2000", "--storm-budget", "4", "--seed", "7"],
        cwd=ROOT, capture_output=True, text=True, timeout=190, check=False,
    )
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "== orcd chaos" in proc.stdout, report
    for figure in ("hostile clients", "cancel storm", "shutdown under load"):
        assert figure in proc.stdout, report
    assert proc.returncode == 0, report
