"""The HTTP application: one QuartTrio app, the error envelope, and every route group.

Every error, whatever raised it, leaves through :func:`error_response` in the contract's
envelope ``{"error": {code, message, retriable, details, correlation_id}}``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .. import logs
from ..auth import ANONYMOUS
from ..errors import OrcdError, PayloadTooLarge, Unauthenticated, UnsupportedMediaType
from .fastcancel import FastCancel
from .lifetime import RequestLifetime
from .schema import correlation_id_for

if TYPE_CHECKING:
    from ..server import Worker

_HTTP_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}


def json_response(body: dict[str, Any], status: int = 200) -> Response:
    import json

    return Response(json.dumps(body), status=status,
                    mimetype="application/json")


def error_response(err: OrcdError, correlation_id: str) -> Response:
    response = json_response(err.envelope(correlation_id), err.http_status)
    response.headers.update(err.headers())
    if isinstance(err, (PayloadTooLarge, UnsupportedMediaType)):
        # The body was refused unread; the connection cannot carry another request.
        response.headers["Connection"] = "close"
    return response


def create_app(worker: Worker) -> QuartTrio:
    from .. import web
    from . import native, openai

    config = worker.config
    app = QuartTrio("orcd")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 30
    # Routes that hold no job data answer without a token (CONTRACT §10).
    public = {"/health", *web.ASSETS, *(["/metrics"] if config.public_metrics else [])}

    @app.before_request
    async def _correlation() -> None:
        g.correlation_id = correlation_id_for(request.headers.get("X-Correlation-Id", ""))

    @app.before_request
    async def _authenticate() -> None:
        """``g.principal``: who the request acts for. Without an auth file, ``anonymous``."""
        principals = worker.principals
        if principals is None:
            g.principal = ANONYMOUS
            return
        g.principal = None
        if request.path in public:
            return
        header = request.headers.get("Authorization")
        g.principal = principals.authenticate(header)  # constant time; the token is not kept
        if g.principal is None:
            logs.log("unauthenticated", f"{request.method} {request.path} without a valid "
                     "bearer token", level=logging.WARNING, correlation_id=g.correlation_id,
                     authorization="absent" if header is None else "not valid")
            raise Unauthenticated(
                "this route needs 'Authorization: Bearer TOKEN'" if header is None
                else "the bearer token is not valid")

    @app.after_request
    async def _echo_correlation(response: Response) -> Response:
        response.headers["X-Correlation-Id"] = g.get("correlation_id", "")
        return response

    def _render(err: OrcdError) -> Response:
        if request.path.startswith("/v1/"):  # the OpenAI-compatible API: OpenAI error objects
            return openai.error_response(err)
        return error_response(err, g.get("correlation_id", ""))

    @app.errorhandler(OrcdError)
    async def _orcd_error(err: OrcdError) -> Response:
        worker.metrics.rejected.labels(code=err.code).inc()
        return _render(err)

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
        return _render(mine)

    @app.errorhandler(Exception)
    async def _unexpected(err: Exception) -> Response:
        logs.log("error", f"Unhandled error in {request.method} {request.path}: {err!r}",
                 level=logging.ERROR, correlation_id=g.get("correlation_id"))
        return _render(OrcdError("internal error; see the worker's log"))

    native.register(app, worker)
    openai.register(app, worker)
    web.register(app, worker)
    # Outermost: every job a request binds ends when the request does (lifetime.py). Inside
    # it, the well-formed POST /cancel is answered before Quart (fastcancel.py).
    app.asgi_app = worker.lifetime = RequestLifetime(  # type: ignore[method-assign,assignment]
        FastCancel(app.asgi_app, worker), worker.on_request_end)
    return app
