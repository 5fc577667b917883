"""HTTP routes: thin handlers that parse, call into the job layer and render (CONTRACT §2–§6).

Every error, whatever raised it, leaves through :func:`error_response` in the contract's
envelope ``{"error": {code, message, retriable, details, correlation_id}}``.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING, Any

from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import logs
from .errors import (
    InvalidRequest,
    JobNotFound,
    OrcdError,
    PayloadTooLarge,
    Unavailable,
    UnsupportedMediaType,
)
from .schema import (
    CORRELATION_ID_RE,
    CancelRequest,
    ExecuteRequest,
    parse_json_object,
    validate_job_id,
)
from .sse import JobStream

if TYPE_CHECKING:
    from .server import Worker

_HTTP_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}
JOB_STATES = ("queued", "running", "completed", "cancelled", "failed")


def json_response(body: dict[str, Any], status: int = 200) -> Response:
    import json

    return Response(json.dumps(body), status=status,
                    mimetype="application/json")


def error_response(err: OrcdError, correlation_id: str) -> Response:
    response = json_response({"error": {
        "code": err.code, "message": err.message, "retriable": err.retriable,
        "details": err.details, "correlation_id": correlation_id,
    }}, err.http_status)
    if isinstance(err, Unavailable):
        response.headers["Retry-After"] = str(err.retry_after)
    if isinstance(err, (PayloadTooLarge, UnsupportedMediaType)):
        # The body was refused unread; the connection cannot carry another request.
        response.headers["Connection"] = "close"
    return response


def create_app(worker: Worker) -> QuartTrio:
    config = worker.config
    app = QuartTrio("orcd")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 30

    @app.before_request
    async def _correlation() -> None:
        given = request.headers.get("X-Correlation-Id", "")
        g.correlation_id = given if CORRELATION_ID_RE.match(given) else secrets.token_hex(8)

    @app.after_request
    async def _echo_correlation(response: Response) -> Response:
        response.headers["X-Correlation-Id"] = g.get("correlation_id", "")
        return response

    @app.errorhandler(OrcdError)
    async def _orcd_error(err: OrcdError) -> Response:
        worker.metrics.rejected.labels(code=err.code).inc()
        return error_response(err, g.get("correlation_id", ""))

    @app.errorhandler(HTTPException)
    async def _http_error(err: HTTPException) -> Response:
        status = err.code or 500
        if isinstance(err, RequestEntityTooLarge):
            mine: OrcdError = PayloadTooLarge(
                f"request body is over the limit of {config.max_body_bytes} bytes")
        else:
            mine = OrcdError(err.description or err.name)
            mine.code = _HTTP_CODES.get(status, "INVALID_REQUEST" if status < 500 else "INTERNAL")
            mine.http_status = status
        worker.metrics.rejected.labels(code=mine.code).inc()
        return error_response(mine, g.get("correlation_id", ""))

    @app.errorhandler(Exception)
    async def _unexpected(err: Exception) -> Response:
        logs.log("error", f"Unhandled error in {request.method} {request.path}: {err!r}",
                 level=logging.ERROR, correlation_id=g.get("correlation_id"))
        return error_response(OrcdError("internal error; see the worker's log"),
                              g.get("correlation_id", ""))

    async def read_json() -> dict[str, Any]:
        ctype = request.headers.get("Content-Type")
        if ctype is not None and request.mimetype not in ("application/json", ""):
            raise UnsupportedMediaType(
                f"Content-Type must be application/json, got {ctype!r}")
        body = await request.get_data(cache=False, as_text=False)
        return parse_json_object(body if isinstance(body, bytes) else body.encode())

    @app.post("/execute")
    async def execute() -> Response:
        body = await read_json()
        req = ExecuteRequest.from_json(body, max_tokens_out=config.max_tokens_out,
                                       inference_timeout_s=config.inference_timeout_s)
        job = await worker.registry.submit(req, g.correlation_id)
        stream = JobStream(job, config.keepalive_s, worker.on_stream_abandoned)
        worker.streams.add(stream)
        response = Response(stream, status=200, mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None
        return response

    @app.post("/cancel")
    async def cancel() -> Response:
        req = CancelRequest.from_json(await read_json())
        state = worker.registry.cancel(req.job_id, g.correlation_id)
        return json_response({"status": "cancelling", "job_id": req.job_id, "state": state}, 202)

    @app.get("/jobs/<job_id>")
    async def job(job_id: str) -> Response:
        validate_job_id(job_id)
        found = worker.registry.get(job_id)
        if found is None:
            raise JobNotFound(f"no job {job_id!r} is active or remembered")
        return json_response(found.snapshot())

    @app.get("/jobs")
    async def jobs() -> Response:
        state = request.args.get("state")
        if state is not None and state not in JOB_STATES:
            raise InvalidRequest([{"field": "state", "constraint": "enum",
                                   "message": f"state must be one of {', '.join(JOB_STATES)}, "
                                              f"got {state!r}"}])
        return json_response({"jobs": [j.snapshot() for j in worker.registry.jobs(state)]})

    @app.get("/health")
    async def health() -> Response:
        body = worker.health()
        return json_response(body, 200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(worker.metrics.render(), status=200,
                        content_type=worker.metrics.content_type)

    @app.post("/shutdown")
    async def shutdown() -> Response:
        worker.request_shutdown("POST /shutdown")
        return json_response({"status": "draining"}, 202)

    return app
