"""HTTP for the terminal client: one httpx client, errors as one line, both SSE dialects.

Whatever goes wrong (connection refused, a timeout, the worker's error envelope
``{"error": {code, message}}``, an OpenAI error object) becomes a :class:`ClientError`
whose message is the one line the user sees.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
STREAM_READ_TIMEOUT_S = 60.0  # the worker sends a keep-alive every 15 s of silence


class ClientError(Exception):
    """A failure the user reads as one line; the command exits 1."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status  # the HTTP status, when the worker answered with an error


@attrs.frozen
class Event:
    """One stream event in the native vocabulary: ``queued``, ``started``, ``token``,
    ``end`` or ``error``; ``at`` is when it arrived (``time.perf_counter``)."""

    name: str
    data: dict[str, Any]
    at: float = attrs.field(factory=time.perf_counter)

    @property
    def terminal(self) -> bool:
        return self.name in ("end", "error")

    @property
    def cancelled(self) -> bool:
        return self.name == "error" and self.data.get("code") == "CANCELLED"


def server_error(resp: httpx.Response) -> ClientError:
    """The response's error (the envelope, or an OpenAI error object) as one line."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        code = err.get("code") or err.get("type") or "ERROR"
        message = str(err.get("message") or resp.reason_phrase).strip()
        return ClientError(f"{code}: {message} (HTTP {resp.status_code})", resp.status_code)
    first = resp.text.strip().splitlines()[0][:200] if resp.text.strip() else resp.reason_phrase
    return ClientError(f"HTTP {resp.status_code}: {first}", resp.status_code)


@attrs.define(eq=False)
class Api:
    """A worker at ``url``; ``token`` (if any) goes out as ``Authorization: Bearer``."""

    url: str
    token: str | None = None
    timeout_s: float = 10.0
    _http: httpx.Client = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=self.timeout_s)

    def twin(self) -> Api:
        """The same worker and token on a connection of its own (to cancel beside a stream)."""
        return Api(self.url, self.token, self.timeout_s)

    def close(self) -> None:
        self._http.close()

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except httpx.ConnectError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else str(exc)
            raise ClientError(f"cannot reach orcd at {self.url}: {reason} "
                              "(is `orcd serve` running? see --url)") from None
        except httpx.TimeoutException:
            raise ClientError(f"orcd at {self.url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise ClientError(f"talking to orcd at {self.url} failed: {exc}") from None

    def request(self, method: str, path: str, *, body: dict[str, Any] | None = None,
                params: dict[str, str] | None = None) -> dict[str, Any]:
        """One JSON request; its JSON answer, or a :class:`ClientError`."""
        with self._translated():
            resp = self._http.request(method, path, json=body, params=params)
        if resp.status_code >= 400:
            raise server_error(resp)
        try:
            answer = resp.json()
        except ValueError:
            raise ClientError(f"{method} {path} answered something that is not JSON") from None
        if not isinstance(answer, dict):
            raise ClientError(f"{method} {path} answered {type(answer).__name__}, not an object")
        return answer

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", "/cancel", body={"job_id": job_id})

    @contextmanager
    def stream(self, path: str, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> Iterator[Iterator[str]]:
        """``POST path`` with a streaming answer: its lines, once the status is 200."""
        timeout = httpx.Timeout(self.timeout_s, read=STREAM_READ_TIMEOUT_S)
        with self._translated():
            with self._http.stream("POST", path, json=body, headers=headers,
                                   timeout=timeout) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise server_error(resp)
                yield self._lines(resp)

    def _lines(self, resp: httpx.Response) -> Iterator[str]:
        with self._translated():
            yield from resp.iter_lines()


def native_events(lines: Iterator[str]) -> Iterator[Event]:
    """Events of ``POST /execute`` (``event: NAME`` / ``data: JSON`` frames)."""
    name: str | None = None
    for line in lines:
        if line.startswith("event:"):
            name = line[len("event:"):].strip()
        elif line.startswith("data:") and name is not None:
            yield Event(name, json.loads(line[len("data:"):]))
            name = None


def openai_events(lines: Iterator[str]) -> Iterator[Event]:
    """Events of a streaming ``/v1/chat/completions``, in the native vocabulary.

    Each chunk's ``delta.content`` is a ``token``; ``data: [DONE]`` is the ``end`` (with the
    last ``finish_reason``); an error frame ``{"error": {message, type, code}}`` is an
    ``error``, with ``code`` ``CANCELLED`` when the job was cancelled.
    """
    finish_reason: str | None = None
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            yield Event("end", {"stop_reason": finish_reason})
            return
        chunk = json.loads(payload)
        err = chunk.get("error")
        if isinstance(err, dict):
            yield Event("error", _openai_error(err))
            return
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            if text:
                yield Event("token", {"t": text})
            finish_reason = choice.get("finish_reason") or finish_reason


def _openai_error(err: dict[str, Any]) -> dict[str, Any]:
    code = str(err.get("code") or err.get("type") or "error")
    if "cancel" in code.lower():
        code = "CANCELLED"
    return {"code": code.upper(), "message": str(err.get("message") or ""),
            "reason": err.get("reason")}
