"""cache: a byte-bounded cache of plaintext chunks, in memory only, that a scan does not flush.

What it knows: keys of the form (object key, etag, chunk index) and byte strings. What it must not
know: envelopes, stores, crypto, trio. It never touches the disk (plaintext is never written to
local disk), and it never decides what is cached: EncryptedStore puts a chunk here only after the
chunk's hash-table entry and GCM tag verified.

Two segments share the byte budget (the 2Q / segmented-LRU idea):

* *main*, an LRU, holds what is read at random and what is read again: chunks a program may ask
  for more than once.
* *probation*, small (``probation_bytes``), holds what a sequential stream brings in: read-ahead
  and the chunks of a file read from its start. The kernel's page cache (the mount keeps it
  across opens) already holds what a sequential reader got, so keeping the same plaintext here
  too would be double caching: a one-pass read of a large file would fill the whole budget with
  chunks nobody asks for again (and the daemon's memory with it). A chunk delivered to a
  sequential reader (``get(..., stream=True)``) moves to the front of probation -- the next to go
  (drop-behind) -- while read-ahead not read yet waits at the back. A hit by a read that is not
  part of a stream (random access, a second reader) promotes the chunk to main.

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
#: Probation's share of the budget: at most this, and at most half the budget. As large as
#: the largest read-ahead window (8 MiB; encstore keeps it at most a quarter of the budget):
#: read-ahead not read yet is never more than the window, and delivered chunks go first, so
#: none of it is pushed out (a cold 256 MiB read fetches 256 MiB, in 4 MiB GETs). Every MiB
#: here is daemon RSS during a large sequential read (with the 8 MiB window: 94 MiB peak for
#: a cold 256 MiB read, 133 MiB with 32 MiB and a 16 MiB window; as fast).
DEFAULT_PROBATION_BYTES = 8 * 1024 * 1024

ChunkKey = tuple[str, str, int]


@dataclass
class CacheStats:
    """Counters for tests and ``cssfs status``: hits, misses, evictions and bytes held now
    (``probation_bytes`` of them in probation)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0
    probation_bytes: int = 0
    promotions: int = 0


class ChunkCache:
    """Verified plaintext chunks keyed (object key, etag, chunk index), bounded in bytes: an LRU
    (main) plus a small probation segment for sequential streams (see the module docstring)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, *,
                 probation_bytes: int | None = None) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        if probation_bytes is None:
            probation_bytes = min(DEFAULT_PROBATION_BYTES, max_bytes // 2)
        self.probation_bytes = max(0, min(probation_bytes, max_bytes))
        self.stats = CacheStats()
        self._lru: OrderedDict[ChunkKey, bytes] = OrderedDict()  # main: LRU first
        self._probation: OrderedDict[ChunkKey, bytes] = OrderedDict()  # next to go first
        self._by_object: dict[str, set[ChunkKey]] = {}

    @property
    def enabled(self) -> bool:
        """False when the cache was configured with size 0."""
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._lru) + len(self._probation)

    def __contains__(self, ck: object) -> bool:
        return ck in self._lru or ck in self._probation

    def get(self, key: str, etag: str, index: int, *, stream: bool = False) -> bytes | None:
        """The chunk's plaintext, or None.

        ``stream``: the read is part of a sequential stream (its reader's page cache keeps what
        it gets), so a chunk in probation stays there, first in line to go; otherwise a hit in
        probation promotes the chunk to main, and a hit in main makes it the most recently used.
        """
        ck = (key, etag, index)
        data = self._lru.get(ck)
        if data is not None:
            self._lru.move_to_end(ck)
            self.stats.hits += 1
            return data
        data = self._probation.get(ck)
        if data is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        if stream:
            self._probation.move_to_end(ck, last=False)
        else:
            del self._probation[ck]
            self.stats.probation_bytes -= len(data)
            self._lru[ck] = data
            self.stats.promotions += 1
        return data

    def put(self, key: str, etag: str, index: int, data: bytes, *, stream: bool = False) -> None:
        """Remember a verified chunk, evicting to stay in budget: in main, or with ``stream``
        (read-ahead, a sequential reader's chunks) at the back of probation.

        A chunk larger than the segment's budget is not stored.
        """
        if len(data) > (self.probation_bytes if stream else self.max_bytes):
            return
        ck = (key, etag, index)
        self._drop(ck)
        if stream:
            self._probation[ck] = bytes(data)
            self.stats.probation_bytes += len(data)
        else:
            self._lru[ck] = bytes(data)
        self._by_object.setdefault(key, set()).add(ck)
        self.stats.bytes += len(data)
        while self.stats.probation_bytes > self.probation_bytes:
            self._evict(self._probation)
        while self.stats.bytes > self.max_bytes:
            self._evict(self._lru if self._lru else self._probation)
        self.stats.entries = len(self)

    def invalidate(self, key: str) -> None:
        """Drop every cached chunk of the object ``key`` (all etags)."""
        for ck in self._by_object.pop(key, set()):
            self._drop(ck)
        self.stats.entries = len(self)

    def clear(self) -> None:
        """Drop everything (counters other than bytes/entries are kept)."""
        self._lru.clear()
        self._probation.clear()
        self._by_object.clear()
        self.stats.bytes = 0
        self.stats.probation_bytes = 0
        self.stats.entries = 0

    def _drop(self, ck: ChunkKey) -> None:
        """Remove ``ck`` from whichever segment holds it (the object index is the caller's)."""
        old = self._lru.pop(ck, None)
        if old is None:
            old = self._probation.pop(ck, None)
            if old is None:
                return
            self.stats.probation_bytes -= len(old)
        self.stats.bytes -= len(old)

    def _evict(self, segment: OrderedDict[ChunkKey, bytes]) -> None:
        ck, data = segment.popitem(last=False)
        if segment is self._probation:
            self.stats.probation_bytes -= len(data)
        self.stats.bytes -= len(data)
        self.stats.evictions += 1
        keys = self._by_object.get(ck[0])
        if keys is not None:
            keys.discard(ck)
            if not keys:
                del self._by_object[ck[0]]
