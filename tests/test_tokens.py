"""A prompt that extends an earlier one reuses the earlier tokens, and gets exactly the tokens
llama.cpp gives the whole text (orcd/engine/tokens.py), on the tiny model and on Gemma.

The tiny model's byte-level vocabulary has few merges (298 character pairs), so a wrong
safe-point rule would still pass there; Gemma's 262,144 tokens are what test the rule:
with no rule at all the Gemma test found 328 wrong tokenizations, and 70 without the check
of escaped spaces."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orcd.api.chat import ChatMessage, ChatTemplate, tokenize_chat
from orcd.engine import BatchEngine
from orcd.engine.model import load_model
from orcd.engine.tokens import PromptTokens, safe_pairs

ALPHABET = [*"abcdefghij klmnop\n\n.,:;!?'\"", "é", "ß", "中", "😀", "\t", "  ", "\r\n",
            "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "User:", " the", "▁"]


class Whole:
    """llama.cpp's tokenizer for a model, recording how many characters it was given."""

    def __init__(self, path: Path) -> None:
        self.model = load_model(path, gpu_device=None, on_progress=None)
        self.chars = 0

    def __call__(self, text: str, add_bos: bool, special: bool) -> list[int]:
        self.chars += len(text)
        return list(self.model.tokenize(text.encode("utf-8"), add_bos, special))

    def pairs(self) -> frozenset[int] | None:
        return safe_pairs(self.model.vocab, self.model.model)


@pytest.fixture(scope="module")
def tiny_whole(tiny_model: Path) -> Iterator[Whole]:
    whole = Whole(tiny_model)
    yield whole
    whole.model.close()


def conversations(seed: int, count: int, turns: int) -> Iterator[tuple[bool, bool, list[str]]]:
    """(add_bos, special, prompts): each prompt extends the one before by a few characters."""
    rng = random.Random(seed)
    for _ in range(count):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 120)))
        prompts = []
        for _ in range(turns):
            prompts.append(text)
            text += "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30)))
        yield rng.random() < 0.5, rng.random() < 0.5, prompts


def check_exact(whole: Whole, count: int) -> int:
    """Every prompt of ``count`` random conversations gets llama.cpp's own tokens; returns
    the characters whose tokens came from memory."""
    pairs = whole.pairs()
    assert pairs is not None, "this vocabulary should allow reuse"
    reused = 0
    for add_bos, special, prompts in conversations(seed=count, count=count, turns=4):
        tokens = PromptTokens(whole, pairs, min_chars=1)
        for text in prompts:
            assert tokens.tokenize(text, add_bos=add_bos, special=special) == \
                whole(text, add_bos, special), (text, add_bos, special)
        reused += tokens.reused_chars
    return reused


def test_extended_prompts_get_exactly_the_whole_texts_tokens(tiny_whole: Whole) -> None:
    assert check_exact(tiny_whole, 600) > 10_000  # and reuse did happen, a lot


@pytest.mark.gemma
def test_extended_prompts_get_exactly_the_whole_texts_tokens_on_gemma(gemma_model: Path
                                                                      ) -> None:
    whole = Whole(gemma_model)
    try:
        assert check_exact(whole, 300) > 5_000
    finally:
        whole.model.close()


class Recorded:
    """An engine's llama.cpp tokenizer, replaced by one that records the length of each text
    it is handed. :meth:`tokenize` is llama.cpp with no memory, as the engine was before."""

    def __init__(self, engine: BatchEngine) -> None:
        model: Any = engine._model
        self.real = model.tokenize  # (bytes, add_bos, special) -> tokens
        self.given: list[int] = []
        model.tokenize = self._recording

    def _recording(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
        self.given.append(len(text))
        return list(self.real(text, add_bos, special))

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = True) -> list[int]:
        return list(self.real(text.encode("utf-8"), add_bos, special))


def test_a_second_turn_tokenizes_only_what_is_new(tiny_model: Path) -> None:
    """Through the engine: turn 2 of a long conversation hands llama.cpp's tokenizer only
    a few characters, and its tokens are those of the whole text."""
    engine = BatchEngine(tiny_model, n_ctx=4096, threads=1, slots=1)
    try:
        recorded = Recorded(engine)
        turn1 = "User: tell me about the sea.\nAssistant: It is wide and deep. " * 40
        turn2 = turn1 + "\nUser: and the sky?\nAssistant:"
        engine.tokenize(turn1)
        recorded.given.clear()
        tokens = engine.tokenize(turn2)
        assert tokens == recorded.tokenize(turn2)
        again = sum(recorded.given)
        assert again < 200, f"turn 2 tokenized {again} of {len(turn2)} characters"
    finally:
        engine.close()


@pytest.mark.parametrize("model_name", ["tiny", "gemma"])
def test_a_chats_next_turn_tokenizes_only_its_new_message(model_name: str,
                                                          request: pytest.FixtureRequest
                                                          ) -> None:
    """The /v1 chat route tokenizes the template's pieces and each message apart: the next
    turn hands llama.cpp only the new message (the rest are exact repeats), with the same
    tokens as tokenizing every piece afresh. On Gemma too, whose template has control
    tokens."""
    if model_name == "gemma":
        request.applymarker(pytest.mark.gemma)
    path = request.getfixturevalue("gemma_model" if model_name == "gemma" else "tiny_model")
    engine = BatchEngine(path, n_ctx=4096, threads=1, slots=1)
    try:
        recorded = Recorded(engine)
        template = ChatTemplate.for_model(engine.info, engine)
        history = [ChatMessage(role, f"{role} line {i}: the sea, the lamp and the log.")
                   for i in range(10) for role in ("user", "assistant")]
        tokenize_chat(template, history, engine)
        recorded.given.clear()
        turn = [*history, ChatMessage("user", "And the sky?")]
        tokens = tokenize_chat(template, turn, engine).tokens
        again = sum(recorded.given)
        assert tokens == tokenize_chat(template, turn, recorded).tokens
        # the template's space before a message goes with it (the transcript's "User: ")
        assert again <= len(" And the sky?"), f"{again} characters tokenized again"
    finally:
        engine.close()


def test_without_pairs_every_prompt_is_tokenized_whole(tiny_whole: Whole) -> None:
    tokens = PromptTokens(tiny_whole, None, min_chars=1)
    text = "some words " * 200
    for _ in range(2):
        tiny_whole.chars = 0
        assert tokens.tokenize(text, add_bos=True, special=True) == tiny_whole(text, True, True)
        assert tiny_whole.chars == 2 * len(text)
    assert not tokens.enabled and tokens.cached_chars() == 0


def test_the_memory_is_bounded_and_an_extension_replaces_its_prefix(tiny_whole: Whole
                                                                    ) -> None:
    tokens = PromptTokens(tiny_whole, tiny_whole.pairs(), min_chars=10, cache_chars=5_000,
                          cache_entries=3)
    base = "hello there, sea. " * 20  # 360 characters
    tokens.tokenize(base, add_bos=True, special=True)
    tokens.tokenize(base + "more", add_bos=True, special=True)
    assert tokens.cached_chars() == len(base) + 4  # the extension replaced its prefix
    for i in range(10):
        tokens.tokenize(f"{i} " + base, add_bos=True, special=True)
        assert len(tokens._cache) <= 3
    for i in range(3):
        tokens.tokenize(f"{i} " + base * 6, add_bos=True, special=True)  # 2,163 characters
        assert tokens.cached_chars() <= 5_000
    tokens.tokenize("x" * 6_000, add_bos=True, special=True)  # longer than the whole memory
    assert tokens.cached_chars() <= 5_000
    short = PromptTokens(tiny_whole, None, short_entries=3)
    for i in range(10):
        assert short.tokenize(f"short {i}", add_bos=False, special=True) == \
            tiny_whole(f"short {i}", False, True)
        assert len(short._short) <= 3


def test_a_text_with_a_nul_is_never_cut(tiny_whole: Whole) -> None:
    tokens = PromptTokens(tiny_whole, tiny_whole.pairs(), min_chars=1)
    text = "words and \0 more words " * 40
    tokens.tokenize(text, add_bos=True, special=True)
    tiny_whole.chars = 0
    longer = text + "and the end"
    assert tokens.tokenize(longer, add_bos=True, special=True) == tiny_whole(longer, True, True)
    assert tiny_whole.chars == 2 * len(longer) and tokens.reused_chars == 0


def test_bos_and_special_parsing_are_remembered_apart(tiny_whole: Whole) -> None:
    tokens = PromptTokens(tiny_whole, tiny_whole.pairs(), min_chars=1)
    text = "a <bos> b " * 30
    for add_bos in (True, False):
        for special in (True, False):
            assert tokens.tokenize(text, add_bos=add_bos, special=special) == \
                tiny_whole(text, add_bos, special)
            assert tokens.tokenize(text + "!", add_bos=add_bos, special=special) == \
                tiny_whole(text + "!", add_bos, special)
