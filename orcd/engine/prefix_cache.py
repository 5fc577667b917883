"""The prefix cache: evaluated positions kept in the KV cache for reuse.

When a sequence ends, the positions it evaluated (its prompt, then the tokens it generated
and fed back) stay in the one llama.cpp context under a cache sequence id
(``llama_memory_seq_cp`` shares the cells, nothing is copied), bounded by a token budget
and evicted least recently used first. A new prompt that starts with a cached prefix copies
it into its own sequence and evaluates only the rest.

Every owner of KV cells (a slot or a cache entry) holds *two* sequence ids: ``base`` and
its pin ``base + 1``, and every position belongs to both (the engine puts both ids on each
token it decodes). llama.cpp reuses a cell of a sliding-window layer once it has slid out
of its sequence's window, but only while the cell belongs to a single sequence, and then
purges that sequence's older positions. With two ids on every cell that never happens, so
the full-size SWA cache keeps every position of Gemma 3's SWA layers, and a long cached
prompt stays reusable (a pruned one could not be reused from an earlier position).

This module is the bookkeeping; the engine does the KV operations through :class:`KvOps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import attrs

MIN_REUSE = 4  # shorter matches (a shared BOS) save nothing and would refresh unrelated entries


class KvOps(Protocol):
    """The KV operations the cache needs, on owners (a base sequence id and its pin)."""

    def copy(self, src: int, dst: int, n: int) -> None:
        """Give ``dst`` positions [0, n) of ``src`` (shared cells)."""

    def drop(self, owner: int) -> None:
        """Remove every position of ``owner``."""

    def intact(self, owner: int, n: int) -> bool:
        """Whether ``owner`` holds exactly positions [0, n) in every layer."""


@attrs.define(eq=False)
class CacheEntry:
    owner: int  # base sequence id; owner + 1 is its pin
    tokens: tuple[int, ...]
    last_used: int


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """At most ``budget`` cached positions in entries on the given owner ids, LRU."""

    def __init__(self, ops: KvOps, budget: int, owners: Sequence[int]) -> None:
        self._ops = ops
        self.budget = budget
        self._free = list(owners)
        self._entries: list[CacheEntry] = []
        self._clock = 0

    @property
    def tokens(self) -> int:
        return sum(len(e.tokens) for e in self._entries)

    @property
    def entries(self) -> tuple[CacheEntry, ...]:
        return tuple(self._entries)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _evict(self, entry: CacheEntry) -> None:
        self._entries.remove(entry)
        self._ops.drop(entry.owner)
        self._free.append(entry.owner)

    def lookup(self, prompt: Sequence[int], owner: int) -> int:
        """Copy the longest cached prefix of ``prompt`` into ``owner``; return its length.

        At most ``len(prompt) - 1`` positions are reused: the last prompt token is always
        evaluated, since its logits give the first generated token. Matches shorter than
        ``MIN_REUSE`` are not reused.
        """
        best: CacheEntry | None = None
        best_n = MIN_REUSE - 1
        for entry in list(self._entries):
            n = min(common_prefix(entry.tokens, prompt), len(prompt) - 1)
            if n <= best_n:
                continue
            if not self._ops.intact(entry.owner, len(entry.tokens)):
                self._evict(entry)  # never reuse cells llama.cpp no longer fully holds
                continue
            best, best_n = entry, n
        if best is None:
            return 0
        best.last_used = self._tick()
        self._ops.copy(best.owner, owner, best_n)
        return best_n

    def insert(self, tokens: Sequence[int], owner: int) -> None:
        """Keep positions [0, len(tokens)) of ``owner``, which evaluated ``tokens`` there.

        A prefix longer than the whole budget is cut to it; entries that are prefixes of
        the new one are dropped (it covers them); when an entry already covers ``tokens``,
        only its age is refreshed.
        """
        kept = tuple(tokens[: self.budget])
        if not kept:
            return
        for entry in self._entries:
            if entry.tokens[: len(kept)] == kept:
                entry.last_used = self._tick()
                return
        for entry in [e for e in self._entries if kept[: len(e.tokens)] == e.tokens]:
            self._evict(entry)
        while self._entries and (self.tokens + len(kept) > self.budget or not self._free):
            self._evict(min(self._entries, key=lambda e: e.last_used))
        if not self._free:
            return
        entry = CacheEntry(owner=self._free.pop(), tokens=kept, last_used=self._tick())
        self._ops.copy(owner, entry.owner, len(kept))
        self._entries.append(entry)

    def clear(self) -> None:
        for entry in list(self._entries):
            self._evict(entry)
