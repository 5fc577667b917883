"""bench/chaos.py in a very short mode, so the chaos suite cannot rot unnoticed.

It starts a real ``orcd serve`` process on the tiny model and runs 30 seeded jobs (every
action: cancels in each phase, disconnects, deadlines, bursts, malformed requests), then
the shutdown-under-load check; any contract violation it finds fails this test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_chaos_short_run_finds_no_violation() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--jobs", "30", "--malformed", "20",
         "--seed", "7"],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "== orcd chaos" in proc.stdout, report
    assert proc.returncode == 0, report
