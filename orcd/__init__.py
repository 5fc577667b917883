"""orcd: an HTTP/SSE LLM inference worker that stops work as reliably as it starts it."""

from __future__ import annotations

from .api.schema import CancelRequest, ExecuteRequest
from .auth import ANONYMOUS, SYSTEM, AuthFile, Principal, Principals
from .config import Config
from .engine import BatchEngine, CancelFlag, ModelInfo, Outcome, SamplingParams
from .errors import OrcdError
from .jobs import Job, JobRegistry
from .ledger import Ledger
from .outbox import StreamEvent
from .server import FatalError, Worker, serve

__all__ = [
    "BatchEngine",
    "ANONYMOUS",
    "SYSTEM",
    "AuthFile",
    "CancelFlag",
    "CancelRequest",
    "Config",
    "ExecuteRequest",
    "FatalError",
    "Job",
    "JobRegistry",
    "Ledger",
    "ModelInfo",
    "OrcdError",
    "Outcome",
    "Principal",
    "Principals",
    "SamplingParams",
    "StreamEvent",
    "Worker",
    "serve",
]
