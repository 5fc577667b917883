"""Tokenizing a prompt that extends an earlier one without tokenizing the earlier part again.

Chat clients resend the whole conversation every turn. llama.cpp's SentencePiece tokenizer
takes 3.5-13 ms for a 1,500-token conversation of Gemma 3 on the development machine, and a
server that tokenizes each prompt whole pays that again every turn, before its prefix cache
saves anything. :class:`PromptTokens` remembers the tokens of recent long prompts (a bounded
LRU). A new prompt that begins with a remembered one is cut at a *safe point* near the end of
the remembered text: the tokens before the cut are taken from memory, and only the text
after it is tokenized. Short texts (the ``/v1`` chat route tokenizes the template's pieces
and each message apart) are remembered whole, for exact repeats.

Why a cut at a safe point is exact, read from llama.cpp's ``llama_vocab::impl::tokenize``
and ``llm_tokenizer_spm_session`` (``src/llama-vocab.cpp``):

* special tokens are split out first, by string search for each one's text; an occurrence
  that spans the cut would contain the two characters on either side of it;
* each remaining fragment has its spaces escaped (``" "`` -> ``"▁"``), is split into UTF-8
  characters, and adjacent symbols merge only when their concatenated text is a vocabulary
  token; a merge across the cut would make a token containing those two characters too;
* so where no vocabulary token contains the pair of characters at the cut (raw or escaped),
  no special token and no merge spans it, the merges on each side never touch the other
  side, and the tokens of the whole text are the tokens of the part before the cut followed
  by those of the part after it (tokenized without BOS).

That holds only for the SPM tokenizer with no space prefix (``add_space_prefix`` true would
put a space before the second part), no EOS appended, and no special token that strips the
whitespace beside it (``LSTRIP``/``RSTRIP``), and where every token text is whole UTF-8
characters (llama.cpp's special-token search is by bytes). :func:`safe_pairs` checks each;
the prompts of any other vocabulary are tokenized whole, as before. So is a prompt with a
NUL in it: llama.cpp hands token texts out as C strings, which end at a NUL.

The tokens before the cut are the remembered tokens less those of the remembered text after
the cut, which is tokenized again (it is short: the cut is the last safe point before the end
of the remembered text).
"""

from __future__ import annotations

import ctypes
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

MIN_CHARS = 1024  # shorter texts are only remembered whole (exact repeats)
CACHE_CHARS = 2 * 1024 * 1024  # the long prompts remembered, in characters (plus their tokens)
CACHE_ENTRIES = 256
# Short texts repeat exactly: the chat template's pieces in every request, and every earlier
# message of a conversation in each of its turns. The /v1 chat route tokenizes each piece
# and message on its own, and each llama.cpp call costs ~0.1 ms however short its text (it
# searches the text for each of Gemma's 6,414 special tokens): a 30-message, 983-token
# conversation took 10.3-11.3 ms to tokenize. Remembered, a repeat is a dictionary lookup.
SHORT_ENTRIES = 4096
LOOK_BACK_CHARS = 4096  # how far before the end of a remembered prompt to look for a cut

_SPACE, _ESCAPED_SPACE = " ", "\u2581"
_ATTR_LSTRIP, _ATTR_RSTRIP = 1 << 7, 1 << 8  # enum llama_token_attr in llama.h
_VOCAB_TYPE_SPM = 1  # enum llama_vocab_type in llama.h

Tokenize = Callable[[str, bool, bool], list[int]]  # (text, add_bos, special) -> tokens


def _pair(a: str, b: str) -> int:
    return (ord(a) << 21) | ord(b)


def _escape(c: str) -> str:
    return _ESCAPED_SPACE if c == _SPACE else c


class PromptTokens:
    """Tokenizes through ``tokenize`` (llama.cpp, whole text), reusing the tokens of a
    remembered prompt that the new one extends. ``pairs``: every adjacent character pair in
    the vocabulary's token texts (:func:`safe_pairs`); None tokenizes every prompt whole."""

    def __init__(self, tokenize: Tokenize, pairs: frozenset[int] | None, *,
                 min_chars: int = MIN_CHARS, cache_chars: int = CACHE_CHARS,
                 cache_entries: int = CACHE_ENTRIES, short_entries: int = SHORT_ENTRIES
                 ) -> None:
        self._tokenize = tokenize
        self._pairs = pairs
        self._min_chars = min_chars
        self._cache_chars = cache_chars
        self._cache_entries = cache_entries
        # (add_bos, special, text) -> its tokens; least recently used first
        self._cache: OrderedDict[tuple[bool, bool, str], array[int]] = OrderedDict()
        self._cached_chars = 0
        # (add_bos, special, text) -> its tokens, for texts shorter than min_chars
        self._short: OrderedDict[tuple[bool, bool, str], array[int]] = OrderedDict()
        self._short_entries = short_entries
        self._lock = threading.Lock()  # held only for dictionary work, never while tokenizing
        self.reused_chars = 0  # characters whose tokens came from memory (tests, the bench)

    @property
    def enabled(self) -> bool:
        """Whether this vocabulary allows reuse (:func:`safe_pairs`)."""
        return self._pairs is not None

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        if len(text) < self._min_chars:
            return self._short_tokens(text, add_bos, special)
        if self._pairs is None or "\0" in text:
            # (llama.cpp hands token texts out as C strings: a token with a NUL in it would
            # be cut short there, so a text with a NUL is never cut)
            return self._tokenize(text, add_bos, special)
        with self._lock:
            known = self._longest_known_prefix(text, add_bos, special)
        tokens = self._extend(known, text, add_bos, special) if known else None
        if tokens is None:
            tokens = self._tokenize(text, add_bos, special)
        self._remember(text, add_bos, special, tokens, replacing=known)
        return tokens

    def _short_tokens(self, text: str, add_bos: bool, special: bool) -> list[int]:
        """A short text's tokens, remembered whole (any vocabulary: the same text always
        gets the same tokens)."""
        key = (add_bos, special, text)
        with self._lock:
            known = self._short.get(key)
            if known is not None:
                self._short.move_to_end(key)
                return known.tolist()
        tokens = self._tokenize(text, add_bos, special)
        with self._lock:
            self._short[key] = array("i", tokens)
            if len(self._short) > self._short_entries:
                self._short.popitem(last=False)
        return tokens

    def _longest_known_prefix(self, text: str, add_bos: bool, special: bool
                              ) -> tuple[str, array[int]] | None:
        best: tuple[str, array[int]] | None = None
        for (bos, sp, known), tokens in self._cache.items():
            if (bos == add_bos and sp == special and len(known) <= len(text)
                    and (best is None or len(known) > len(best[0]))
                    and text.startswith(known)):
                best = (known, tokens)
        return best

    def _extend(self, known: tuple[str, array[int]], text: str, add_bos: bool,
                special: bool) -> list[int] | None:
        """The tokens of ``text``, which begins with the remembered ``known`` text; None if
        no safe point is near the end of ``known``."""
        known_text, known_tokens = known
        if len(known_text) == len(text):
            return known_tokens.tolist()
        cut = self._safe_point(text, len(known_text))
        if cut is None:
            return None
        self.reused_chars += cut
        # The remembered tokens are those of known_text[:cut] followed by those of
        # known_text[cut:]; keep the first part.
        drop = len(self._tokenize(known_text[cut:], False, special)) if cut < len(known_text) else 0
        head = known_tokens[:len(known_tokens) - drop]
        return head.tolist() + self._tokenize(text[cut:], False, special)

    def _safe_point(self, text: str, end: int) -> int | None:
        """The last safe cut of ``text`` at or before ``end`` (``0 < cut < len(text)``),
        looking back at most :data:`LOOK_BACK_CHARS`."""
        pairs = self._pairs
        assert pairs is not None
        for cut in range(min(end, len(text) - 1), max(0, end - LOOK_BACK_CHARS), -1):
            a, b = text[cut - 1], text[cut]
            if _pair(a, b) not in pairs and _pair(_escape(a), _escape(b)) not in pairs:
                return cut
        return None

    def _remember(self, text: str, add_bos: bool, special: bool, tokens: list[int],
                  replacing: tuple[str, array[int]] | None) -> None:
        if len(text) > self._cache_chars:
            return
        with self._lock:
            if replacing is not None:  # the longer prompt now answers for it
                self._forget((add_bos, special, replacing[0]))
            key = (add_bos, special, text)
            if key in self._cache:
                self._cache.move_to_end(key)
                return
            self._cache[key] = array("i", tokens)
            self._cached_chars += len(text)
            while (self._cached_chars > self._cache_chars
                   or len(self._cache) > self._cache_entries):
                (_, _, old), _old_tokens = self._cache.popitem(last=False)
                self._cached_chars -= len(old)

    def _forget(self, key: tuple[bool, bool, str]) -> None:
        if self._cache.pop(key, None) is not None:
            self._cached_chars -= len(key[2])

    def cached_chars(self) -> int:
        with self._lock:
            return self._cached_chars


def safe_pairs(vocab: Any, model: Any) -> frozenset[int] | None:
    """Every adjacent character pair in the vocabulary's token texts, or None where the
    vocabulary does not allow cutting a prompt (module docstring)."""
    import llama_cpp
    import numpy as np

    if llama_cpp.llama_vocab_type(vocab) != _VOCAB_TYPE_SPM:
        return None
    if llama_cpp.llama_vocab_get_add_eos(vocab):
        return None
    buf = ctypes.create_string_buffer(16)
    n = llama_cpp.llama_model_meta_val_str(model, b"tokenizer.ggml.add_space_prefix", buf,
                                           len(buf))
    if n < 0 or buf.value != b"false":  # llama.cpp's default for SPM is a space prefix
        return None
    n_tokens = llama_cpp.llama_vocab_n_tokens(vocab)
    if any(llama_cpp.llama_vocab_get_attr(vocab, t) & (_ATTR_LSTRIP | _ATTR_RSTRIP)
           for t in range(n_tokens)):
        return None
    # Every text at once, NUL-separated, as code points: 0.6 s for Gemma's 262,144 tokens
    # (a Python loop over the pairs took 1.9 s).
    joined = b"\0".join(llama_cpp.llama_vocab_get_text(vocab, t) for t in range(n_tokens))
    try:
        text = joined.decode("utf-8")
    except UnicodeDecodeError:
        # a special token of partial characters could match across a character boundary
        # that its decoded pairs would not show
        return None
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    left, right = points[:-1], points[1:]
    pairs = (left << np.uint64(21)) | right
    return frozenset(np.unique(pairs[(left != 0) & (right != 0)]).tolist())
