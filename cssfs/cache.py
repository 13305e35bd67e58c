"""cache: a byte-bounded LRU of plaintext chunks, in memory only.

What it knows: keys of the form (object key, etag, chunk index) and byte strings. What it must not
know: envelopes, stores, crypto, trio. It never touches the disk (plaintext is never written to
local disk), and it never decides what is cached: EncryptedStore puts a chunk here only after the
chunk's hash-table entry and GCM tag verified.

Invariant (the S3QL ``block_cache`` note, for readers of encstore.py): every method is synchronous
and runs to completion without an ``await``, so in a trio program no other task can observe the
cache half-updated. The etag in the key means a new version of an object never hits an old
version's chunks; ``invalidate(key)`` frees an object's chunks early (delete, overwrite, rename).

A cache of size 0 stores nothing and every ``get`` is a miss (the mount's "no cache" setting).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024

ChunkKey = tuple[str, str, int]


@dataclass
class CacheStats:
    """Counters for tests and ``cssfs status``: hits, misses, evictions and bytes held now."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


class ChunkCache:
    """LRU of verified plaintext chunks keyed (object key, etag, chunk index), bounded in bytes."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._lru: OrderedDict[ChunkKey, bytes] = OrderedDict()
        self._by_object: dict[str, set[ChunkKey]] = {}

    @property
    def enabled(self) -> bool:
        """False when the cache was configured with size 0."""
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, ck: object) -> bool:
        return ck in self._lru

    def get(self, key: str, etag: str, index: int) -> bytes | None:
        """The chunk's plaintext, or None; a hit makes the chunk the most recently used."""
        ck = (key, etag, index)
        data = self._lru.get(ck)
        if data is None:
            self.stats.misses += 1
            return None
        self._lru.move_to_end(ck)
        self.stats.hits += 1
        return data

    def put(self, key: str, etag: str, index: int, data: bytes) -> None:
        """Remember a verified chunk, evicting least recently used chunks to stay in budget.

        A chunk larger than the whole budget is not stored.
        """
        if len(data) > self.max_bytes:
            return
        ck = (key, etag, index)
        old = self._lru.pop(ck, None)
        if old is not None:
            self.stats.bytes -= len(old)
        self._lru[ck] = bytes(data)
        self._by_object.setdefault(key, set()).add(ck)
        self.stats.bytes += len(data)
        while self.stats.bytes > self.max_bytes:
            victim, vdata = self._lru.popitem(last=False)
            self._forget(victim, vdata)
            self.stats.evictions += 1
        self.stats.entries = len(self._lru)

    def invalidate(self, key: str) -> None:
        """Drop every cached chunk of the object ``key`` (all etags)."""
        for ck in self._by_object.pop(key, set()):
            data = self._lru.pop(ck, None)
            if data is not None:
                self.stats.bytes -= len(data)
        self.stats.entries = len(self._lru)

    def clear(self) -> None:
        """Drop everything (counters other than bytes/entries are kept)."""
        self._lru.clear()
        self._by_object.clear()
        self.stats.bytes = 0
        self.stats.entries = 0

    def _forget(self, ck: ChunkKey, data: bytes) -> None:
        self.stats.bytes -= len(data)
        keys = self._by_object.get(ck[0])
        if keys is not None:
            keys.discard(ck)
            if not keys:
                del self._by_object[ck[0]]
