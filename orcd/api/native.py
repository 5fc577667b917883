"""Native routes: thin handlers that parse, call into the job layer and render (CONTRACT §2–§6).

Every route that names a job acts in one principal's namespace (CONTRACT §10): the caller's
own, or, for an admin, the one it names (``?principal=NAME``, or ``"principal"`` in a
``/cancel`` body). A user naming another principal is refused (403) whatever the job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import Response, g, request
from quart_trio import QuartTrio

from .. import logs
from ..auth import Principal, is_admin, is_valid_name
from ..errors import Forbidden, InvalidRequest, JobNotFound, UnsupportedMediaType
from . import lifetime
from .app import json_response
from .schema import (
    CancelRequest,
    ExecuteRequest,
    cancel_accepted,
    is_json_media_type,
    parse_json_object,
    validate_job_id,
)
from .sse import JobStream

if TYPE_CHECKING:
    from ..server import Worker

JOB_STATES = ("queued", "running", "completed", "cancelled", "failed")


async def read_json() -> dict[str, Any]:
    """The request body as a JSON object (415 for another media type, 400 if malformed)."""
    ctype = request.headers.get("Content-Type")
    if ctype is not None and not is_json_media_type(ctype):
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


def caller() -> Principal:
    """The principal the current request acts for (set by the app's authentication)."""
    principal: Principal = g.principal
    return principal


def owner_named(name: object, field: str = "principal") -> str:
    """The namespace a request acts on: the caller's own (``name`` None), or the one an
    admin names. A user may name only itself."""
    principal = caller()
    if name is None or name == principal.name:
        return principal.name
    if not is_valid_name(name):
        raise InvalidRequest([{"field": field, "constraint": "format",
                               "message": "principal must be 1-64 characters of "
                                          "A-Z a-z 0-9 . _ -"}])
    if not is_admin(principal):
        raise Forbidden("only an admin may act on another principal's jobs",
                        details={"principal": principal.name})
    assert isinstance(name, str)
    return name


def known_owner(worker: Worker, name: str, field: str = "principal") -> str:
    """``name``, if it can own jobs here: a cancel never leaves a tombstone for nobody."""
    names = worker.principals.names() if worker.principals is not None else [caller().name]
    if name not in names:
        raise InvalidRequest([{"field": field, "constraint": "principal",
                               "message": f"no principal named {name!r}"}])
    return name


def register(app: QuartTrio, worker: Worker) -> None:
    config = worker.config

    @app.post("/execute")
    async def execute() -> Response:
        body = await read_json()
        req = ExecuteRequest.from_json(body, max_tokens_out=config.max_tokens_out,
                                       inference_timeout_s=config.inference_timeout_s)
        check_job_id_header(req.job_id)
        job = await worker.registry.submit(req, g.correlation_id, principal=caller())
        lifetime.bind(job)  # no checkpoint in between: a client gone by now cancels the job
        response = Response(JobStream(job, config.keepalive_s), status=200,
                            mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None
        return response

    @app.post("/cancel")
    async def cancel() -> Response:
        body = await read_json()
        named = body.pop("principal", None)  # an admin's cancel of another principal's job
        req = CancelRequest.from_json(body)
        check_job_id_header(req.job_id)
        owner = known_owner(worker, owner_named(named))
        state = await worker.registry.cancel_or_recall(req.job_id, g.correlation_id, caller(),
                                                       owner)
        response = cancel_accepted(req.job_id, state)
        if named is not None:
            response["principal"] = owner
        return json_response(response, 202)

    @app.get("/jobs/<path:job_id>")  # any path, so "a%2Fb" is a 400 for its job_id, not a 404
    async def job(job_id: str) -> Response:
        validate_job_id(job_id)
        found = await worker.registry.find(job_id, owner_named(request.args.get("principal")))
        if found is None:  # another principal's job is unknown here, never forbidden
            raise JobNotFound(f"no job {job_id!r} is active or remembered")
        return json_response(found)

    @app.get("/jobs")
    async def jobs() -> Response:
        state = request.args.get("state")
        if state is not None and state not in JOB_STATES:
            raise InvalidRequest([{"field": "state", "constraint": "enum",
                                   "message": f"state must be one of {', '.join(JOB_STATES)}, "
                                              f"got {state!r}"}])
        named = request.args.get("principal")
        # An admin sees every principal's jobs unless it names one; a user only its own.
        owner = owner_named(named) if named is not None or not is_admin(caller()) else None
        return json_response({"jobs": await worker.registry.records(state, owner)})

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
        if not is_admin(caller()):
            raise Forbidden("only an admin may shut the worker down",
                            details={"principal": caller().name})
        logs.log("shutdown_request", f"POST /shutdown by {caller().name}",
                 principal=caller().name, correlation_id=g.correlation_id)
        worker.request_shutdown("POST /shutdown")
        return json_response({"status": "draining"}, 202)

