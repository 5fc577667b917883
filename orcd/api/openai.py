"""The OpenAI-compatible API: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Every completion request is an orcd job (CONTRACT §9): its id is the ``X-Job-Id`` request
header or a generated ``chatcmpl-…``/``cmpl-…``, it is returned in the ``X-Job-Id`` response
header and as the response ``id``, and ``/cancel``, ``/jobs/{id}`` and
``POST /v1/requests/{id}/cancel`` work on it. The job's events are rendered as OpenAI chunks
(streaming) or gathered into one response. Errors are OpenAI error objects
``{"error": {message, type, param, code}}``; the statuses are chosen so that the SDKs
retry on their own only what is worth retrying (429, 5xx), never a cancel (499) nor a
duplicate ``X-Job-Id`` (400). docs/openai.md is the user's side of this module.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs
import trio
from quart import Response, g, request
from quart_trio import QuartTrio

from .. import logs
from ..errors import (
    InvalidRequest,
    NotReady,
    OrcdError,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from ..outbox import StreamEvent
from . import lifetime
from .app import json_response
from .chat import ChatMessage, ChatTemplate, ChatTemplateError, content_text
from .chat import tokenize_chat as _tokenize_chat
from .native import caller, known_owner, owner_named, read_json
from .schema import (
    MAX_STOP_CHARS,
    MAX_STOPS,
    ExecuteRequest,
    cancel_accepted,
    job_id_problem,
    validate_job_id,
)
from .sse import JobStream, data_json

if TYPE_CHECKING:
    from ..bridge import Engine
    from ..jobs import Job
    from ..server import Worker

Kind = Literal["chat", "completion"]
DONE = b"data: [DONE]\n\n"
CANCELLED_STATUS = 499  # "client closed request": no SDK retries it on its own
_SEED_RANGE = (-(2**63), 2**64 - 1)  # OpenAI's int64 seeds, and orcd's uint64 ones
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class V1Error(OrcdError):
    """An error in OpenAI's terms: HTTP status, ``type``, ``param`` and ``code``."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int = 400, type: str = "invalid_request_error",
                 orcd_code: str = "INVALID_REQUEST") -> None:
        super().__init__(message)
        self.param, self.openai_code, self.type = param, code, type
        self.http_status, self.code = status, orcd_code


def _unsupported(param: str, what: str) -> V1Error:
    return V1Error(f"{param}: {what} is not supported by this server", param=param,
                   code="unsupported_parameter")


# -- requests --------------------------------------------------------------------------


@attrs.frozen
class CompletionRequest:
    """A validated ``/v1/chat/completions`` or ``/v1/completions`` body."""

    kind: Kind
    model: str | None
    messages: tuple[ChatMessage, ...] = ()
    prompt: str = ""
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False

    @classmethod
    def from_json(cls, body: dict[str, Any], kind: Kind, *, max_tokens_out: int
                  ) -> CompletionRequest:
        """Validate ``body``; raise :class:`V1Error` naming the first bad parameter.

        Parameters orcd does not know are ignored; known ones it cannot honour are refused.
        """
        _refuse_unsupported(body, kind)
        model = _typed(body, "model", str)
        max_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
            else "max_tokens"
        stream_options = _typed(body, "stream_options", dict) or {}
        include_usage = stream_options.get("include_usage")
        if include_usage is not None and not isinstance(include_usage, bool):
            raise V1Error("stream_options.include_usage must be a boolean",
                          param="stream_options.include_usage")
        _typed(body, "user", str)
        seed = _number(body, "seed", *_SEED_RANGE, integer=True)
        common: dict[str, Any] = dict(
            kind=kind, model=model,
            max_tokens=_number(body, max_param, 1, max_tokens_out, integer=True),
            max_tokens_param=max_param,
            temperature=_number(body, "temperature", 0.0, 2.0, default=1.0),
            top_p=_number(body, "top_p", 0.0, 1.0, default=1.0),
            stop=_stops(body.get("stop")),
            seed=None if seed is None else int(seed) % 2**64,
            stream=bool(_typed(body, "stream", bool)),
            include_usage=bool(include_usage),
        )
        if kind == "chat":
            return cls(messages=_messages(body.get("messages")), **common)
        return cls(prompt=_prompt(body.get("prompt")), **common)


def _refuse_unsupported(body: dict[str, Any], kind: Kind) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise _unsupported("n", "more than one choice (n other than 1)")
    if kind == "chat":
        if body.get("logprobs") not in (None, False):
            raise _unsupported("logprobs", "logprobs")
        if body.get("top_logprobs") is not None:
            raise _unsupported("top_logprobs", "top_logprobs")
    else:
        if body.get("logprobs") is not None:
            raise _unsupported("logprobs", "logprobs")
        if body.get("echo") not in (None, False):
            raise _unsupported("echo", "echo")
        if body.get("suffix") is not None:
            raise _unsupported("suffix", "suffix")
        if body.get("best_of") not in (None, 1):
            raise _unsupported("best_of", "best_of other than 1")
    for name in ("tools", "functions"):
        if body.get(name) not in (None, []):
            raise _unsupported(name, "tool and function calling")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none"):
            raise _unsupported(name, "tool and function calling")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise _unsupported("response_format", "a response_format other than text")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise _unsupported(name, f"a non-zero {name}")
    if body.get("logit_bias") not in (None, {}):
        raise _unsupported("logit_bias", "logit_bias")


def _typed(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, kind)
                              or (kind is not bool and isinstance(value, bool))):
        names = {str: "a string", bool: "a boolean", dict: "an object", list: "an array"}
        raise V1Error(f"{name} must be {names[kind]}, got {json.dumps(value)[:60]}", param=name)
    return value


def _number(body: dict[str, Any], name: str, lo: float, hi: float, *, integer: bool = False,
            default: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    exact = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not exact):
        what = "an integer" if integer else "a number"
        raise V1Error(f"{name} must be {what}, got {json.dumps(value)[:60]}", param=name)
    if not lo <= value <= hi:
        raise V1Error(f"{name} must be {lo:g}..{hi:g}, got {value}", param=name)
    return int(value) if integer else float(value)


def _stops(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise V1Error("stop must be a string or an array of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise V1Error(f"stop holds at most {MAX_STOPS} strings, got {len(stops)}", param="stop")
    for stop in stops:
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise V1Error(f"each stop must be 1..{MAX_STOP_CHARS} characters, got {len(stop)}",
                          param="stop")
        _unicode(stop, "stop")
    return tuple(stops)


def _unicode(text: str, param: str) -> str:
    """``text``, if it is valid Unicode (JSON can carry a lone surrogate, UTF-8 cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise V1Error(f"{param} holds a lone surrogate, which is not valid Unicode",
                      param=param) from None
    return text


def _messages(value: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise V1Error("messages must be a non-empty array of message objects",
                      param="messages")
    messages = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise V1Error(f"{where} must be an object", param=where)
        role = item.get("role")
        if role in ("tool", "function") or item.get("tool_calls"):
            raise _unsupported(f"{where}.role", "tool and function calling")
        if role not in _ROLES:
            raise V1Error(f"{where}.role must be one of {', '.join(_ROLES)}, got "
                          f"{json.dumps(role)[:40]}", param=f"{where}.role")
        text = content_text(item.get("content"))
        if text is None:
            raise V1Error(f"{where}.content must be a string or an array of text parts",
                          param=f"{where}.content")
        messages.append(ChatMessage(_ROLES[role], _unicode(text, f"{where}.content")))
    return tuple(messages)


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        raise _unsupported("prompt", "more than one prompt per request")
    if not isinstance(value, str) or not value:
        raise V1Error("prompt must be a non-empty string", param="prompt")
    return _unicode(value, "prompt")


# -- the model ---------------------------------------------------------------------------


@attrs.frozen
class ModelCard:
    """The one model this worker serves, as ``/v1`` names it, and its chat template."""

    id: str
    created: int
    template: ChatTemplate

    @classmethod
    def of(cls, engine: Engine) -> ModelCard:
        """Runs in a thread: reads the file's time and tokenizes the template's markers."""
        path = Path(engine.info.path)
        try:
            created = int(path.stat().st_mtime)
        except OSError:
            created = 0
        return cls(path.name.removesuffix(".gguf"), created,
                   ChatTemplate.for_model(engine.info, engine))

    def require(self, model: str) -> None:
        """Raise 404 ``model_not_found`` unless ``model`` names this model."""
        if model != self.id:
            raise V1Error(f"The model {model!r} does not exist; this worker serves {self.id!r}",
                          param="model", code="model_not_found", status=404,
                          orcd_code="MODEL_NOT_FOUND")

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "orcd"}


@attrs.define(eq=False)
class _Models:
    engine: Engine | None = None
    card: ModelCard | None = None

    async def get(self, worker: Worker) -> tuple[Engine, ModelCard]:
        engine = worker.registry.engine
        if engine is None:
            raise NotReady("the model is still loading; retry shortly")
        if self.engine is not engine or self.card is None:
            card = await trio.to_thread.run_sync(ModelCard.of, engine)
            self.engine, self.card = engine, card
            template = card.template
            logs.log("chat_template", f"Chat template for /v1: {template.name}"
                     + (f" ({template.problem})" if template.problem else ""),
                     level=logging.WARNING if template.problem else logging.INFO,
                     template=template.name)
        return engine, self.card


# -- rendering -----------------------------------------------------------------------------


def _data(body: dict[str, Any]) -> bytes:
    return f"data: {data_json(body)}\n\n".encode()


def _finish_reason(stop_reason: str) -> str:
    return "length" if stop_reason == "max_tokens" else "stop"


def stream_error(data: dict[str, Any]) -> dict[str, Any]:
    """An orcd ``error`` event's data as an OpenAI error object."""
    code = str(data.get("code", "INTERNAL"))
    kind = {"CANCELLED": "cancelled", "INFERENCE_TIMEOUT": "timeout"}.get(code, "server_error")
    return {"message": data.get("message", "the job failed"), "type": kind, "param": None,
            "code": code.lower()}


def _error_status(data: dict[str, Any]) -> int:
    return {"CANCELLED": CANCELLED_STATUS, "INFERENCE_TIMEOUT": 504,
            "VRAM_OOM": 503}.get(str(data.get("code")), 500)


@attrs.define(eq=False)
class ChunkRenderer:
    """Renders one job's events as OpenAI stream chunks (``render`` for :class:`JobStream`)."""

    kind: Kind
    id: str
    created: int
    model: str
    prompt_tokens: int
    include_usage: bool
    _text_begun: bool = False  # a chat message's leading whitespace is dropped until then

    def chunk(self, content: str | None, finish_reason: str | None,
              role: bool = False) -> dict[str, Any]:
        choice: dict[str, Any]
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if content is not None:
                delta["content"] = content
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": content or "", "logprobs": None,
                      "finish_reason": finish_reason}
        body = self._envelope("chat.completion.chunk" if self.kind == "chat"
                              else "text_completion", [choice])
        if self.include_usage:
            body["usage"] = None
        return body

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def usage(self, tokens_out: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": tokens_out,
                "total_tokens": self.prompt_tokens + tokens_out}

    def __call__(self, event: StreamEvent) -> bytes:
        if event.name == "started":
            return _data(self.chunk("", None, role=True)) if self.kind == "chat" else b""
        if event.name == "token":
            text = event.data["t"]
            if self.kind == "chat" and not self._text_begun:
                text = text.lstrip()
                if not text:
                    return b""
                self._text_begun = True
            return _data(self.chunk(text, None))
        if event.name == "end":
            frames = _data(self.chunk(None, _finish_reason(event.data["stop_reason"])))
            if self.include_usage:
                last = self._envelope(self.chunk(None, None)["object"], [])
                last["usage"] = self.usage(event.data["tokens_out"])
                frames += _data(last)
            return frames + DONE
        if event.name == "error":
            return _data({"error": stream_error(event.data)}) + DONE
        return b""  # queued: the SSE keep-alive comments hold the line meanwhile

    def response(self, text: str, end: dict[str, Any]) -> dict[str, Any]:
        """The whole non-streaming response of a completed job."""
        reason = _finish_reason(end["stop_reason"])
        if self.kind == "chat":
            body = self._envelope("chat.completion", [{
                "index": 0,
                "message": {"role": "assistant", "content": text.lstrip(), "refusal": None},
                "logprobs": None, "finish_reason": reason}])
        else:
            body = self._envelope("text_completion", [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}])
        body["usage"] = self.usage(end["tokens_out"])
        return body


# -- errors --------------------------------------------------------------------------------

# orcd code -> (status, type, code) for OrcdErrors raised by the layers below
_ERRORS: dict[str, tuple[int, str, str | None]] = {
    "JOB_EXISTS": (400, "invalid_request_error", "job_exists"),
    "JOB_NOT_FOUND": (404, "invalid_request_error", "job_not_found"),
    "UNAUTHENTICATED": (401, "invalid_request_error", "invalid_api_key"),
    "FORBIDDEN": (403, "invalid_request_error", "forbidden"),
    "QUOTA_EXCEEDED": (429, "rate_limit_error", "quota_exceeded"),
    "WORKER_BUSY": (429, "rate_limit_error", "worker_busy"),
    "NOT_READY": (503, "server_error", "not_ready"),
    "SHUTTING_DOWN": (503, "server_error", "shutting_down"),
    "PAYLOAD_TOO_LARGE": (413, "invalid_request_error", "payload_too_large"),
    "UNSUPPORTED_MEDIA_TYPE": (415, "invalid_request_error", "unsupported_media_type"),
}


def error_response(err: OrcdError) -> Response:
    """Any orcd error as an OpenAI error object (the app's handlers call this for /v1/)."""
    param: str | None = None
    if isinstance(err, V1Error):
        status, kind, code, param = err.http_status, err.type, err.openai_code, err.param
    elif isinstance(err, InvalidRequest):
        first = err.errors[0] if err.errors else {}
        status, kind, param = 400, "invalid_request_error", first.get("field")
        code = "context_length_exceeded" if first.get("constraint") == "context" else None
    elif err.code in _ERRORS:
        status, kind, code = _ERRORS[err.code]
    else:
        status = err.http_status
        kind = "invalid_request_error" if status < 500 else "server_error"
        code = err.code.lower()
    if status == 400 and err.code == "JOB_EXISTS":
        param = "X-Job-Id"
    response = json_response({"error": {"message": err.message, "type": kind, "param": param,
                                        "code": code}}, status)
    response.headers.update(err.headers())
    if isinstance(err, (PayloadTooLarge, UnsupportedMediaType)):
        response.headers["Connection"] = "close"
    return response


# -- routes --------------------------------------------------------------------------------


def _job_id(kind: Kind) -> str:
    given = request.headers.get("X-Job-Id")
    if given is None:
        return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
    problem = job_id_problem(given)
    if problem is not None:
        raise V1Error(f"X-Job-Id: {problem['message']}", param="X-Job-Id",
                      code="invalid_job_id")
    return given


def register(app: QuartTrio, worker: Worker) -> None:
    config = worker.config
    models = _Models()

    @app.get("/v1/models")
    async def v1_models() -> Response:
        _, card = await models.get(worker)
        return json_response({"object": "list", "data": [card.describe()]})

    @app.get("/v1/models/<path:model>")
    async def v1_model(model: str) -> Response:
        _, card = await models.get(worker)
        card.require(model)
        return json_response(card.describe())

    async def complete(kind: Kind) -> Response:
        req = CompletionRequest.from_json(await read_json(), kind,
                                          max_tokens_out=config.max_tokens_out)
        job_id = _job_id(kind)
        engine, card = await models.get(worker)
        if req.model is not None:
            card.require(req.model)
        tokens: list[int] | None = None
        text, stop = req.prompt, req.stop
        if kind == "chat":
            try:
                prompt = await trio.to_thread.run_sync(
                    _tokenize_chat, card.template, req.messages, engine)
            except ChatTemplateError as exc:
                raise V1Error(str(exc), param="messages", code="chat_template") from None
            tokens, text = prompt.tokens, prompt.text
            stop += tuple(s for s in card.template.stop if s not in stop)
        execute = ExecuteRequest(job_id=job_id, prompt=text, max_tokens=req.max_tokens,
                                 temperature=req.temperature, top_p=req.top_p, stop=stop,
                                 seed=req.seed)
        try:
            job = await worker.registry.submit(execute, g.correlation_id, tokens=tokens,
                                               principal=caller())
        except InvalidRequest as exc:
            first = exc.errors[0]
            param = {"prompt": "messages" if kind == "chat" else "prompt",
                     "max_tokens": req.max_tokens_param}.get(first["field"], first["field"])
            raise V1Error(exc.message, param=param,
                          code="context_length_exceeded"
                          if first["constraint"] == "context" else None) from None
        lifetime.bind(job)  # no checkpoint in between: a client gone by now cancels the job
        renderer = ChunkRenderer(kind, job_id, int(time.time()), card.id,
                                 len(job.prompt_tokens), req.include_usage)
        if req.stream:
            response = Response(JobStream(job, config.keepalive_s, renderer), status=200,
                                mimetype="text/event-stream")
            response.headers["Cache-Control"] = "no-cache"
            response.headers["X-Accel-Buffering"] = "no"
            response.timeout = None
        else:
            response = await _gather(job, renderer)
        response.headers["X-Job-Id"] = job_id
        return response

    @app.post("/v1/chat/completions")
    async def v1_chat_completions() -> Response:
        return await complete("chat")

    @app.post("/v1/completions")
    async def v1_completions() -> Response:
        return await complete("completion")

    @app.post("/v1/requests/<path:job_id>/cancel")
    async def v1_cancel(job_id: str) -> Response:
        """``/cancel``'s semantics; an admin names another principal with ``?principal=``."""
        validate_job_id(job_id)
        owner = known_owner(worker, owner_named(request.args.get("principal")))
        state = await worker.registry.cancel_or_recall(job_id, g.correlation_id, caller(),
                                                       owner)
        return json_response(cancel_accepted(job_id, state), 202)


async def _gather(job: Job, renderer: ChunkRenderer) -> Response:
    """Wait for the job's end; the whole response, or its error as an OpenAI error."""
    pieces: list[str] = []
    while (event := await job.outbox.get()) is not None:
        if event.name == "token":
            pieces.append(event.data["t"])
        elif event.name == "end":
            return json_response(renderer.response("".join(pieces), event.data))
        elif event.name == "error":
            return json_response({"error": stream_error(event.data)}, _error_status(event.data))
    # The outbox ends without a terminal event only when the request was abandoned.
    return json_response({"error": stream_error({"code": "CANCELLED",
                                                 "message": "the job was abandoned"})},
                         CANCELLED_STATUS)
