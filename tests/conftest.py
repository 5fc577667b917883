from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orcd import logs
from orcd._tinymodel import build_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
GEMMA = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight GGUF with a byte-level vocabulary, built for this test session."""
    return build_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", n_ctx=4096)


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    """The default model, as `just test` writes it into models/ (fetched if missing)."""
    if not GEMMA.exists():
        from orcd.models import default_model

        default_model(GEMMA.parent, show_progress=False)
    return GEMMA


class LogCapture:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    def lines(self) -> list[dict[str, Any]]:
        logs.flush()
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line]

    def actions(self, action: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line["action"] == action]


@pytest.fixture(autouse=True)
def log_capture() -> Iterator[LogCapture]:
    """Every test's orcd log lines, as parsed JSON objects."""
    capture = LogCapture()
    logs.configure("test-worker", "json", "debug", stream=capture.stream)
    yield capture
