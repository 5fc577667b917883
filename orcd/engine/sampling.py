"""Per-sequence sampler chains, token text, and what llama_decode's return codes mean."""

from __future__ import annotations

import ctypes
from typing import Any

import attrs

from .types import SamplingParams, seed32

DECODE_OK = 0
DECODE_NO_KV_SLOT = 1  # llama.cpp found no room in the KV cache for the batch
DECODE_ABORTED = 2  # the abort callback said stop; the aborted ubatch was rolled back
PENALTY_LAST_N = 64  # tokens the repetition penalty looks back over


def make_sampler(params: SamplingParams, n_vocab: int) -> Any:
    """The sampler chain for one generation: penalties, then greedy at temperature 0, else
    top_k / top_p / min_p / temperature and a seeded draw (``seed32(params.seed)``)."""
    from llama_cpp import _internals

    p = params
    sampler = _internals.LlamaSampler()
    if p.repetition_penalty != 1.0:
        sampler.add_penalties(n_vocab, PENALTY_LAST_N, p.repetition_penalty, 0.0, 0.0)
    if p.temperature == 0.0:
        sampler.add_greedy()
    else:
        if p.top_k > 0:
            sampler.add_top_k(p.top_k)
        if p.top_p < 1.0:
            sampler.add_top_p(p.top_p, 1)
        if p.min_p > 0.0:
            sampler.add_min_p(p.min_p, 1)
        sampler.add_temp(p.temperature)
        sampler.add_dist(seed32(p.seed))
    return sampler


def sequence_sampler(params: SamplingParams, n_vocab: int) -> Any:
    """The sampler the batch engine uses for one sequence: :class:`GreedyArgmax` where it
    picks the same tokens as :func:`make_sampler`'s chain, faster; else that chain."""
    if params.temperature == 0.0 and params.repetition_penalty == 1.0:
        return GreedyArgmax(n_vocab)
    return make_sampler(params, n_vocab)


class GreedyArgmax:
    """Temperature 0 without a repetition penalty: the first highest logit, read straight from
    the step's logits row.

    llama.cpp's greedy sampler picks the same token (its first strict maximum) but first
    copies the whole vocabulary into a candidates array: with Gemma's 262k entries that took
    ~1.5 ms per token on the development machine, against ~0.2 ms here. It has no state, so
    nothing is accepted or freed.
    """

    def __init__(self, n_vocab: int) -> None:
        self._n_vocab = n_vocab

    def sample(self, ctx: Any, index: int) -> int:
        import llama_cpp
        import numpy as np

        row = llama_cpp.llama_get_logits_ith(ctx.ctx, index)
        return int(np.ctypeslib.as_array(row, shape=(self._n_vocab,)).argmax())

    def close(self) -> None:
        pass


class TokenBytes:
    """A token's bytes as the model's vocabulary spells them (no special-token text)."""

    def __init__(self, vocab: Any) -> None:
        self._vocab = vocab
        self._buf = ctypes.create_string_buffer(64)

    def __call__(self, token: int) -> bytes:
        import llama_cpp

        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0,
                                           False)
        if n < 0:  # the piece is longer than the buffer: grow it and ask again
            self._buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf),
                                               0, False)
        return self._buf.raw[:n] if n > 0 else b""


@attrs.frozen
class DecodeFailure:
    """How a failed llama_decode ends the sequences in its step."""

    error_code: str  # the contract's error code: VRAM_OOM or INTERNAL
    error: str


def decode_failure(rc: int) -> DecodeFailure:
    """The failure for llama_decode's return code ``rc`` (not 0 and not 2).

    -2 and -3 are llama.cpp failing to allocate or compute the step's graph (out of device
    memory on a GPU); 1 means no KV slot, which the engine's KV sizing rules out and retries
    once before it gets here; anything else is llama.cpp refusing the batch.
    """
    if rc in (-2, -3):
        return DecodeFailure("VRAM_OOM", f"llama.cpp could not allocate memory for the "
                                         f"decode (llama_decode returned {rc})")
    if rc == DECODE_NO_KV_SLOT:
        return DecodeFailure("INTERNAL", "llama.cpp found no room in the KV cache for the batch")
    return DecodeFailure("INTERNAL", f"llama_decode returned {rc}")
