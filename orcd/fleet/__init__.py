"""A fleet of orcd workers behind one HAProxy (CONTRACT §11).

- :mod:`.haproxy` renders the front door's config: one consistent-hash ring keyed on the
  job id, least-loaded placement for requests that name no job;
- :mod:`.supervisor` runs N workers and HAProxy in the foreground (``just fleet N``);
- :mod:`.status` asks every worker for ``/health`` and ``/jobs`` (``orcd fleet status``).
"""

from __future__ import annotations

from .haproxy import FleetSpec, WorkerAddr, consecutive_workers, render, server_states, workers_in

__all__ = [
    "FleetSpec",
    "WorkerAddr",
    "consecutive_workers",
    "render",
    "server_states",
    "workers_in",
]
