"""Native routes: thin handlers that parse, call into the job layer and render (CONTRACT §2–§6)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import Response, g, request
from quart_trio import QuartTrio

from ..errors import InvalidRequest, JobNotFound, UnsupportedMediaType
from . import lifetime
from .app import json_response
from .schema import CancelRequest, ExecuteRequest, parse_json_object, validate_job_id
from .sse import JobStream

if TYPE_CHECKING:
    from ..server import Worker

JOB_STATES = ("queued", "running", "completed", "cancelled", "failed")


async def read_json() -> dict[str, Any]:
    """The request body as a JSON object (415 for another media type, 400 if malformed)."""
    ctype = request.headers.get("Content-Type")
    if ctype is not None and request.mimetype not in ("application/json", ""):
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {ctype!r}")
    body = await request.get_data(cache=False, as_text=False)
    return parse_json_object(body if isinstance(body, bytes) else body.encode())


def check_job_id_header(job_id: str) -> None:
    """An ``X-Job-Id`` header (what a proxy routes on, CONTRACT §11) must name the body's job."""
    header = request.headers.get("X-Job-Id")
    if header is not None and header != job_id:
        raise InvalidRequest([{
            "field": "X-Job-Id", "constraint": "match",
            "message": f"header X-Job-Id {header[:140]!r} differs from the body's job_id "
                       f"{job_id!r}"}])


def register(app: QuartTrio, worker: Worker) -> None:
    config = worker.config

    @app.post("/execute")
    async def execute() -> Response:
        body = await read_json()
        req = ExecuteRequest.from_json(body, max_tokens_out=config.max_tokens_out,
                                       inference_timeout_s=config.inference_timeout_s)
        check_job_id_header(req.job_id)
        job = await worker.registry.submit(req, g.correlation_id)
        lifetime.bind(job)  # no checkpoint in between: a client gone by now cancels the job
        response = Response(JobStream(job, config.keepalive_s), status=200,
                            mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None
        return response

    @app.post("/cancel")
    async def cancel() -> Response:
        req = CancelRequest.from_json(await read_json())
        check_job_id_header(req.job_id)
        state = worker.registry.cancel(req.job_id, g.correlation_id)
        return json_response({"status": "cancelling", "job_id": req.job_id, "state": state}, 202)

    @app.get("/jobs/<path:job_id>")  # any path, so "a%2Fb" is a 400 for its job_id, not a 404
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

