"""Request bodies: parsing and validation of what clients send (CONTRACT §2–§4).

Every problem is collected, not just the first, so one 400 answer lists them all in
``details.errors`` as ``{field, constraint, message}``.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from typing import Any

import attrs

from ..errors import InvalidRequest

JOB_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # always fullmatch: "$" accepts "\n"
CORRELATION_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
MAX_PROMPT_CHARS = 32768
MAX_STOPS = 4
MAX_STOP_CHARS = 100
MAX_SEED = 2**64 - 1


def correlation_id_for(given: str) -> str:
    """The request's correlation id: the client's ``X-Correlation-Id`` if it is valid, else a
    new random one."""
    return given if CORRELATION_ID_RE.fullmatch(given) else secrets.token_hex(8)


def cancel_accepted(job_id: str, state: str) -> dict[str, Any]:
    """The body of a cancel's ``202`` (CONTRACT §4): what the job was when the cancel came."""
    return {"status": "cancelling", "job_id": job_id, "state": state}


def is_json_media_type(content_type: str) -> bool:
    """Whether a ``Content-Type`` value names JSON (or nothing): ``application/json``, any
    case, with or without parameters. The one rule for every route that reads a body."""
    return content_type.split(";", 1)[0].strip().lower() in ("application/json", "")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decode a UTF-8 JSON object, or raise :class:`InvalidRequest` saying why not."""
    try:
        value = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            [_err("body", "utf8", f"body is not valid UTF-8 ({exc.reason})")]) from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            [_err("body", "json", f"malformed JSON: {exc.msg} at {exc.pos}")]) from None
    except RecursionError:
        raise InvalidRequest([_err("body", "json", "JSON nested too deeply")]) from None
    except ValueError as exc:  # e.g. an integer longer than Python will parse
        raise InvalidRequest([_err("body", "json", f"malformed JSON: {exc}")]) from None
    if not isinstance(value, dict):
        raise InvalidRequest(
            [_err("body", "type", f"body must be a JSON object, got {_kind(value)}")]
        )
    return value


def _err(field: str, constraint: str, message: str) -> dict[str, str]:
    return {"field": _printable(field), "constraint": constraint, "message": message}


def _printable(text: str) -> str:
    """``text`` with anything that is not valid Unicode (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def job_id_problem(value: object) -> dict[str, str] | None:
    """The error entry for a bad job_id, or None when it is valid."""
    if value is None:
        return _err("job_id", "required", "job_id is required")
    if not isinstance(value, str):
        return _err("job_id", "type", f"job_id must be a string, got {_kind(value)}")
    if not JOB_ID_RE.fullmatch(value):
        shown = value if len(value) <= 40 else value[:40] + "..."
        return _err(
            "job_id", "pattern",
            f"job_id {shown!r} must be 1-128 characters of A-Z a-z 0-9 . _ : -",
        )
    return None


def validate_job_id(value: object) -> str:
    problem = job_id_problem(value)
    if problem is not None:
        raise InvalidRequest([problem])
    assert isinstance(value, str)
    return value


class _Checker:
    """Collects field problems while reading typed values out of a JSON object."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.errors: list[dict[str, str]] = []

    def integer(self, name: str, lo: int, hi: int) -> int | None:
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()
        ):
            self.errors.append(_err(name, "type", f"{name} must be an integer, got {value!r}"))
            return None
        value = int(value)
        if not lo <= value <= hi:
            self.errors.append(_err(name, "range", f"{name} must be {lo}..{hi}, got {value}"))
            return None
        return value

    def number(self, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value
        ):
            self.errors.append(_err(name, "type", f"{name} must be a number, got {value!r}"))
            return None
        below = value <= lo if lo_open else value < lo
        if below or value > hi:
            bound = f"> {lo} and <= {hi}" if lo_open else f"{lo}..{hi}"
            self.errors.append(_err(name, "range", f"{name} must be {bound}, got {value}"))
            return None
        return float(value)


@attrs.frozen
class ExecuteRequest:
    """A validated ``POST /execute`` body. Model-dependent limits are checked later."""

    job_id: str
    prompt: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    timeout_ms: int | None = None

    FIELDS = (
        "job_id", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p",
        "repetition_penalty", "stop", "seed", "timeout_ms",
    )

    @classmethod
    def from_json(
        cls, body: dict[str, Any], *, max_tokens_out: int, inference_timeout_s: float
    ) -> ExecuteRequest:
        check = _Checker(body)
        for name in sorted(set(body) - set(cls.FIELDS)):
            check.errors.append(_err(name, "unknown", f"unknown field {_printable(name)!r}"))
        problem = job_id_problem(body.get("job_id"))
        if problem is not None:
            check.errors.append(problem)
        prompt = body.get("prompt")
        if prompt is None:
            check.errors.append(_err("prompt", "required", "prompt is required"))
        elif not isinstance(prompt, str):
            check.errors.append(
                _err("prompt", "type", f"prompt must be a string, got {_kind(prompt)}")
            )
        elif not 1 <= len(prompt) <= MAX_PROMPT_CHARS:
            check.errors.append(_err(
                "prompt", "length",
                f"prompt must be 1..{MAX_PROMPT_CHARS} characters, got {len(prompt)}",
            ))
        elif not _valid_unicode(prompt):
            check.errors.append(_err("prompt", "unicode",
                                     "prompt holds a lone surrogate, which is not valid Unicode"))
        max_tokens = check.integer("max_tokens", 1, max_tokens_out)
        temperature = check.number("temperature", 0.0, 2.0)
        top_p = check.number("top_p", 0.0, 1.0)
        top_k = check.integer("top_k", 0, 2**31 - 1)
        min_p = check.number("min_p", 0.0, 1.0)
        penalty = check.number("repetition_penalty", 0.0, 2.0, lo_open=True)
        seed = check.integer("seed", 0, MAX_SEED)
        timeout_ms = check.integer("timeout_ms", 1, int(inference_timeout_s * 1000))
        stop = cls._stops(body.get("stop"), check)
        if check.errors:
            raise InvalidRequest(check.errors)
        return cls(
            job_id=body["job_id"],
            prompt=body["prompt"],
            max_tokens=max_tokens,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=0 if top_k is None else top_k,
            min_p=0.0 if min_p is None else min_p,
            repetition_penalty=1.0 if penalty is None else penalty,
            stop=stop,
            seed=seed,
            timeout_ms=timeout_ms,
        )

    @staticmethod
    def _stops(value: object, check: _Checker) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            check.errors.append(
                _err("stop", "type", f"stop must be an array of strings, got {_kind(value)}")
            )
            return ()
        if len(value) > MAX_STOPS:
            check.errors.append(
                _err("stop", "length", f"stop holds at most {MAX_STOPS} strings, got {len(value)}")
            )
        for i, item in enumerate(value):
            if not isinstance(item, str):
                check.errors.append(
                    _err(f"stop[{i}]", "type", f"stop[{i}] must be a string, got {_kind(item)}")
                )
            elif not 1 <= len(item) <= MAX_STOP_CHARS:
                check.errors.append(_err(
                    f"stop[{i}]", "length",
                    f"stop[{i}] must be 1..{MAX_STOP_CHARS} characters, got {len(item)}",
                ))
            elif not _valid_unicode(item):
                check.errors.append(_err(
                    f"stop[{i}]", "unicode",
                    f"stop[{i}] holds a lone surrogate, which is not valid Unicode"))
        return tuple(v for v in value if isinstance(v, str))


@attrs.frozen
class CancelRequest:
    job_id: str

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> CancelRequest:
        unknown = sorted(set(body) - {"job_id"})
        errors = [_err(n, "unknown", f"unknown field {_printable(n)!r}") for n in unknown]
        problem = job_id_problem(body.get("job_id"))
        if problem is not None:
            errors.append(problem)
        if errors:
            raise InvalidRequest(errors)
        return cls(job_id=body["job_id"])
