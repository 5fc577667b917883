"""The engine: llama.cpp behind plain synchronous Python. Nothing in this package imports trio."""

from __future__ import annotations

from .batch import BatchEngine
from .model import check_gguf
from .text import TextAssembler
from .types import (
    CancelFlag,
    EngineStats,
    GenerationSink,
    ModelInfo,
    Outcome,
    Phase,
    SamplingParams,
    SeqRequest,
    SeqSink,
    SlotStats,
    seed32,
)

__all__ = [
    "BatchEngine",
    "CancelFlag",
    "EngineStats",
    "GenerationSink",
    "ModelInfo",
    "Outcome",
    "Phase",
    "SamplingParams",
    "SeqRequest",
    "SeqSink",
    "SlotStats",
    "TextAssembler",
    "check_gguf",
    "seed32",
]
