"""ChunkCache: byte budget, LRU order, per-object invalidation, counters, size 0."""

from __future__ import annotations

import pytest

from cssfs.cache import ChunkCache


def test_get_put_and_counters() -> None:
    c = ChunkCache(1000)
    assert c.get("a", "e1", 0) is None
    c.put("a", "e1", 0, b"x" * 100)
    assert c.get("a", "e1", 0) == b"x" * 100
    assert c.get("a", "e2", 0) is None  # another version never hits
    assert c.get("a", "e1", 1) is None
    assert (c.stats.hits, c.stats.misses, c.stats.bytes, c.stats.entries) == (1, 3, 100, 1)


def test_lru_eviction_respects_byte_budget() -> None:
    c = ChunkCache(300)
    for i in range(3):
        c.put("a", "e", i, bytes([i]) * 100)
    assert c.get("a", "e", 0) is not None  # 0 becomes most recently used
    c.put("a", "e", 3, b"z" * 100)  # evicts 1, the least recently used
    assert c.get("a", "e", 1) is None
    assert all(c.get("a", "e", i) is not None for i in (0, 2, 3))
    assert c.stats.bytes == 300
    assert c.stats.evictions == 1
    c.put("b", "e", 0, b"w" * 250)  # evicts until it fits
    assert c.stats.bytes <= 300
    assert c.get("b", "e", 0) == b"w" * 250


def test_replacing_an_entry_keeps_accounting() -> None:
    c = ChunkCache(1000)
    c.put("a", "e", 0, b"1" * 100)
    c.put("a", "e", 0, b"2" * 50)
    assert c.stats.bytes == 50
    assert c.get("a", "e", 0) == b"2" * 50


def test_invalidate_drops_all_versions_of_one_object() -> None:
    c = ChunkCache(10_000)
    c.put("a", "e1", 0, b"a" * 10)
    c.put("a", "e2", 1, b"b" * 10)
    c.put("ab", "e1", 0, b"c" * 10)
    c.invalidate("a")
    assert c.get("a", "e1", 0) is None
    assert c.get("a", "e2", 1) is None
    assert c.get("ab", "e1", 0) == b"c" * 10
    assert c.stats.bytes == 10
    c.invalidate("missing")  # harmless
    c.clear()
    assert len(c) == 0
    assert c.stats.bytes == 0


def test_eviction_then_invalidate_is_consistent() -> None:
    c = ChunkCache(20)
    c.put("a", "e", 0, b"x" * 10)
    c.put("b", "e", 0, b"y" * 10)
    c.put("c", "e", 0, b"z" * 10)  # evicts a
    c.invalidate("a")
    c.invalidate("b")
    assert c.stats.bytes == 10
    assert len(c) == 1


def test_size_zero_disables() -> None:
    c = ChunkCache(0)
    assert not c.enabled
    c.put("a", "e", 0, b"x")
    assert c.get("a", "e", 0) is None
    assert c.stats.bytes == 0


def test_oversized_chunk_is_not_stored() -> None:
    c = ChunkCache(10)
    c.put("a", "e", 0, b"x" * 5)
    c.put("a", "e", 1, b"y" * 11)
    assert c.get("a", "e", 1) is None
    assert c.get("a", "e", 0) == b"x" * 5


def test_negative_size_rejected() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        ChunkCache(-1)
