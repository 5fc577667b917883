"""The error hierarchy: every failure a client can see carries its contract code.

Foreign exceptions (llama.cpp, NVML, the OS) are translated to these at one edge each;
HTTP handlers render them with :func:`orcd.api.app.error_response`.
"""

from __future__ import annotations

from typing import Any


class OrcdError(Exception):
    """Base class: an error with a contract ``code``, an HTTP status and retriability."""

    code = "INTERNAL"
    http_status = 500
    retriable = False

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def headers(self) -> dict[str, str]:
        """Response headers the error's status calls for (``Retry-After``, ...)."""
        return {}

    def envelope(self, correlation_id: str) -> dict[str, Any]:
        """The contract's error body (CONTRACT §7)."""
        return {"error": {
            "code": self.code, "message": self.message, "retriable": self.retriable,
            "details": self.details, "correlation_id": correlation_id,
        }}


class InvalidRequest(OrcdError):
    """The request body or a field is wrong; ``details.errors`` lists every problem."""

    code = "INVALID_REQUEST"
    http_status = 400

    def __init__(self, errors: list[dict[str, str]], message: str | None = None) -> None:
        if message is None:
            message = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        super().__init__(message, details={"errors": errors})
        self.errors = errors


class Unauthenticated(OrcdError):
    """No ``Authorization: Bearer`` token, or one no principal holds (CONTRACT §10)."""

    code = "UNAUTHENTICATED"
    http_status = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="orcd"'}


class Forbidden(OrcdError):
    """The principal is known but its role does not allow this (a user shutting down)."""

    code = "FORBIDDEN"
    http_status = 403


class QuotaExceeded(OrcdError):
    """The principal already has ``--max-active-per-principal`` jobs queued or running."""

    code = "QUOTA_EXCEEDED"
    http_status = 429
    retriable = True
    retry_after = 1

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class JobNotFound(OrcdError):
    code = "JOB_NOT_FOUND"
    http_status = 404


class JobExists(OrcdError):
    code = "JOB_EXISTS"
    http_status = 409


class PayloadTooLarge(OrcdError):
    code = "PAYLOAD_TOO_LARGE"
    http_status = 413


class UnsupportedMediaType(OrcdError):
    code = "UNSUPPORTED_MEDIA_TYPE"
    http_status = 415


class Unavailable(OrcdError):
    """503 family: the worker cannot take this request now; ``retry_after`` seconds."""

    http_status = 503
    retriable = True
    retry_after = 1

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class NotReady(Unavailable):
    code = "NOT_READY"
    retry_after = 2


class WorkerBusy(Unavailable):
    code = "WORKER_BUSY"
    retry_after = 1


class ShuttingDown(Unavailable):
    code = "SHUTTING_DOWN"
    retry_after = 5


class ModelLoadError(OrcdError):
    """The model file cannot be read or is not a GGUF model llama.cpp can load."""

    code = "MODEL_LOAD_FAILED"


class EngineError(OrcdError):
    """llama.cpp failed while running one job; that job fails, the worker keeps serving."""

    code = "INTERNAL"


class VramOom(EngineError):
    code = "VRAM_OOM"
    retriable = True


class ConfigError(OrcdError):
    """A bad flag or environment variable; the CLI prints one line and exits 1."""

    code = "CONFIG"
