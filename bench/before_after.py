"""Issue #7's figures before and after, and the engine threads' CPU priority experiment.

Variants, every one a real ``orcd serve`` process with its default settings:

* ``before`` -- the previous release (commit 3ae4f10: one generation at a time), checked out
  into a temporary worktree (``git worktree add``) and run with this venv and
  ``PYTHONPATH`` at that worktree;
* ``after`` -- this checkout (continuous batching, 4 slots, ``--engine-nice 10``);
* ``after --engine-nice N`` -- this checkout whose engine threads run at nice N: on 2 cores
  llama.cpp's threads take both, and the HTTP loop (nice 0) gets the CPU first when it has
  work only if they run at a higher nice value.

Per variant and round (variants interleaved, round after round): ``/health`` latency
polled every 20 ms while one job decodes; cancel -> ``error CANCELLED`` in three phases
(queued behind every slot busy, mid-prompt 100 ms into a ~1,600-token prompt, mid-decode
after 4 tokens); single-stream decode tokens/s over 64 tokens.
"""

from __future__ import annotations

import functools
import subprocess
import time
from pathlib import Path
from typing import Any

from peers import Gen, Proc, before_command, log, ms, nonce, now, orcd_command, p50_p99, quantile

BEFORE_COMMIT = "3ae4f10"
PROMPT = "Write a long, detailed story about a lighthouse keeper and a lost whale."


def before_worktree(root: Path, path: Path = Path("/tmp/orcd-before")) -> Path:
    """The previous release in a worktree at ``path`` (made once), with the C abort flag."""
    if not (path / "orcd" / "__init__.py").is_file():
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(path),
                        BEFORE_COMMIT], check=True, capture_output=True)
    for so in (root / "orcd").glob("_abortflag*.so"):  # same C source at both commits
        target = path / "orcd" / so.name
        if not target.exists():
            target.write_bytes(so.read_bytes())
    return path


def variants(model: Path, logdir: Path, root: Path, nices: tuple[int, ...],
             with_before: bool) -> list[Proc]:
    import os

    out: list[Proc] = []
    if with_before:
        tree = before_worktree(root)
        env = dict(os.environ, PYTHONPATH=str(tree))  # and run there: `-m` puts cwd first
        out.append(Proc("before", "orcd", lambda p: before_command(model, p), logdir, env=env,
                        cwd=tree))
    out.append(Proc("after", "orcd", lambda p: orcd_command(model, p), logdir))
    for n in nices:
        out.append(Proc(f"after --engine-nice {n}", "orcd",
                        functools.partial(orcd_command, model, nice=n), logdir))
    return out


def health_while_generating(srv: Proc) -> list[float]:
    g = srv.gen(f"[{nonce()}] {PROMPT}", 48)
    g.wait_tokens(1)
    lat: list[float] = []
    while not g.done.is_set():
        t = now()
        lat.append(srv.health_once())
        time.sleep(max(0.0, 0.02 - (now() - t)))
    g.finish()
    return lat[:-1]  # the last call may have been sent after the job ended


def cancel_latency(srv: Proc, phase: str, body: str, slots: int) -> float | None:
    """cancel sent -> ``error CANCELLED`` read, one sample; None if it missed the phase."""
    busy: list[Gen] = []
    try:
        if phase == "queued":
            busy = [srv.gen(f"[{nonce()}] {PROMPT}", 400) for _ in range(slots)]
            for b in busy:
                b.wait_tokens(1)
            g = srv.gen(f"[{nonce()}] {PROMPT}", 16)
            g.wait_event("queued")
        elif phase == "prompt":
            g = srv.gen(f"[{nonce()}] {body}", 16)
            g.wait_event("started")
            time.sleep(0.1)
        else:
            g = srv.gen(f"[{nonce()}] {PROMPT}", 400)
            g.wait_tokens(4)
        t0 = now()
        srv.cancel(g)
        g.finish(60)
        err = g.first("error")
        if err is None:
            return None
        if phase == "prompt" and any(t < t0 for t in g.tokens):
            return None  # the prompt was done before the cancel
        return err - t0
    finally:
        for b in busy:
            srv.cancel(b)
        for b in busy:
            b.finish(60)


def decode_tps(srv: Proc) -> float:
    g = srv.gen(f"[{nonce()}] {PROMPT}", 64).finish()
    if g.error or len(g.tokens) < 2:
        raise RuntimeError(f"{srv.name}: generation failed: {g.error}")
    return (len(g.tokens) - 1) / (g.tokens[-1] - g.tokens[0])


def measure(servers: list[Proc], body: str, rounds: int) -> dict[str, Any]:
    raw: dict[str, dict[str, list[float]]] = {
        s.name: {"health_s": [], "queued_s": [], "prompt_s": [], "decode_s": [], "tps": []}
        for s in servers}
    slots = {s.name: int(s.client.get(s.base + "/health").json().get("slots", 1))
             for s in servers}
    skipped = {s.name: 0 for s in servers}
    for s in servers:  # warm-up
        s.gen(f"[{nonce()}] {PROMPT}", 8).finish()
    threads = {s.name: s.threads_nice() for s in servers}
    for r in range(rounds):
        for s in servers:
            x = raw[s.name]
            x["health_s"] += health_while_generating(s)
            for phase in ("queued", "prompt", "decode"):
                lat = cancel_latency(s, phase, body, slots[s.name])
                if lat is None:
                    skipped[s.name] += 1
                else:
                    x[f"{phase}_s"].append(lat)
            x["tps"].append(decode_tps(s))
        log(f"issue #7 figures: round {r + 1}/{rounds} done")
    summary: dict[str, dict[str, Any]] = {}
    for name, x in raw.items():
        summary[name] = {k: p50_p99(v) for k, v in x.items()}
        summary[name]["tps_median"] = quantile(x["tps"], 0.5)
        summary[name]["slots"] = slots[name]
        summary[name]["skipped_samples"] = skipped[name]
        summary[name]["threads_by_nice"] = {str(k): v for k, v in threads[name].items()}
    base = summary.get("after", {}).get("tps_median")
    for cell in summary.values():
        cell["tps_vs_after"] = cell["tps_median"] / base if base else None
    return {"rounds": rounds, "summary": summary, "samples": raw}


def rows(res: dict[str, Any]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for name, s in res.get("summary", {}).items():
        vs = s.get("tps_vs_after")
        out.append((name, str(s["slots"]), ms(s["health_s"], 2), ms(s["queued_s"]),
                    ms(s["prompt_s"]), ms(s["decode_s"]), f"{s['tps_median']:.1f}",
                    f"{vs:.3f}" if vs else "-"))
    return out


HEAD = ("variant", "slots", "/health ms p50 / p99 (generating)", "cancel queued ms",
        "cancel prompt ms", "cancel decode ms", "decode tok/s", "tok/s vs after")
