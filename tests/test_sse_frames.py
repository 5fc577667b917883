"""The bytes of a stream's events, read the way common clients read them.

SSE ends a line only at CR or LF, but many clients split a stream with their language's
"lines" function: httpx's ``aiter_lines`` (and Python's ``str.splitlines``) also break at
U+0085, U+2028 and U+2029, and Gemma's vocabulary has tokens holding them. Every frame must
survive that: those characters travel as JSON escapes.
"""

from __future__ import annotations

import json

import pytest

from orcd.api.openai import ChunkRenderer
from orcd.api.sse import native_frame
from orcd.outbox import StreamEvent

SEPARATORS = ["\x85", "\u2028", "\u2029", "a\u2028b\u2029c\x85d"]


def _data_lines(body: bytes) -> list[object]:
    """Every ``data:`` payload, the stream split the way httpx's aiter_lines splits it."""
    return [json.loads(line[len("data: "):]) for line in body.decode().splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("text", SEPARATORS)
def test_a_native_token_frame_is_one_line_whatever_its_text(text: str) -> None:
    body = native_frame(StreamEvent("token", {"t": text, "i": 0}))
    assert _data_lines(body) == [{"t": text, "i": 0}]


@pytest.mark.parametrize("text", SEPARATORS)
def test_an_openai_chunk_is_one_line_whatever_its_text(text: str) -> None:
    render = ChunkRenderer("completion", "job-1", 0, "model", 3, False)
    (chunk,) = _data_lines(render(StreamEvent("token", {"t": text, "i": 0})))
    assert isinstance(chunk, dict) and chunk["choices"][0]["text"] == text


def test_other_text_stays_unescaped() -> None:
    body = native_frame(StreamEvent("token", {"t": "café ☕", "i": 0}))
    assert "café ☕".encode() in body
