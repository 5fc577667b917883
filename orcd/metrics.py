"""Prometheus metrics (CONTRACT §5), through ``prometheus_client`` on a registry per worker."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CANCEL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                  2.5, 5.0)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """Every metric the worker exports; ``render()`` gives the text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.started_monotonic = time.monotonic()
        self.requests = Counter("worker_requests_total", "Finished /execute jobs by outcome.",
                                ["outcome"], registry=r)
        self.tokens_in = Counter("worker_tokens_in_total",
                                 "Prompt tokens of jobs that ran (cached or evaluated).",
                                 registry=r)
        self.tokens_out = Counter("worker_tokens_generated_total", "Tokens generated.",
                                  registry=r)
        self.inference_duration = Histogram(
            "worker_inference_duration_seconds", "Time from a job's start to its end.",
            buckets=DURATION_BUCKETS, registry=r)
        self.vram = Gauge("worker_vram_bytes", "GPU memory used on the worker's device (NVML).",
                          registry=r)
        self.uptime = Gauge("worker_uptime_seconds", "Seconds since the worker started.",
                            registry=r)
        self.uptime.set_function(lambda: time.monotonic() - self.started_monotonic)
        self.cancel_latency = Histogram(
            "orcd_cancel_latency_seconds",
            "From a cancel (request, disconnect, deadline, shutdown) being observed to the "
            "job's terminal event being sent.",
            ["phase"], buckets=CANCEL_BUCKETS, registry=r)
        self.cancel_freed = Histogram(
            "orcd_cancel_freed_seconds",
            "From a cancel being observed to the engine having freed the job's sequence and "
            "KV cells (the slot passes on then).",
            ["phase"], buckets=CANCEL_BUCKETS, registry=r)
        self.prefix_cache_hits = Counter(
            "orcd_prefix_cache_hit_tokens_total",
            "Prompt tokens taken from the prefix cache instead of being evaluated.", registry=r)
        self.batch_size = Histogram(
            "orcd_batch_sequences", "Sequences in one engine step (one llama_decode).",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.step_duration = Histogram(
            "orcd_step_duration_seconds", "Time of one engine step (one llama_decode).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r)
        self.step_tokens = Histogram(
            "orcd_step_tokens", "Tokens in one engine step (decode tokens + prompt chunks).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.active_jobs = Gauge("orcd_active_jobs", "Jobs holding a slot.", registry=r)
        self.queued_jobs = Gauge("orcd_queued_jobs", "Jobs waiting for a slot.", registry=r)
        self.rejected = Counter("orcd_rejected_total", "Requests refused, by error code.",
                                ["code"], registry=r)
        for phase in ("queued", "prompt", "decode"):
            self.cancel_latency.labels(phase=phase)
            self.cancel_freed.labels(phase=phase)
        for outcome in ("completed", "cancelled", "failed", "timeout"):
            self.requests.labels(outcome=outcome)

    def track_jobs(self, active: Callable[[], int], queued: Callable[[], int]) -> None:
        self.active_jobs.set_function(lambda: float(active()))
        self.queued_jobs.set_function(lambda: float(queued()))

    def observe_step(self, sequences: int, tokens: int, seconds: float) -> None:
        """One engine step; called from the engine thread (prometheus_client is thread-safe)."""
        self.batch_size.observe(sequences)
        self.step_tokens.observe(tokens)
        self.step_duration.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
