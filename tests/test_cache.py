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


# -- probation: sequential streams do not flush the cache ----------------------------------


def test_a_stream_stays_in_probation_and_leaves_main_alone() -> None:
    c = ChunkCache(1000, probation_bytes=300)
    for i in range(5):
        c.put("hot", "e", i, b"h" * 100)  # main: random access
    for i in range(50):  # a long sequential stream through the same cache
        c.put("scan", "e", i, b"s" * 100, stream=True)
        assert c.get("scan", "e", i, stream=True) == b"s" * 100
    assert all(c.get("hot", "e", i) is not None for i in range(5))
    assert c.stats.probation_bytes <= 300
    assert c.stats.bytes == 500 + c.stats.probation_bytes


def test_delivered_chunks_go_before_read_ahead_not_read_yet() -> None:
    c = ChunkCache(1000, probation_bytes=300)
    c.put("f", "e", 0, b"0" * 100, stream=True)
    c.put("f", "e", 1, b"1" * 100, stream=True)
    c.put("f", "e", 2, b"2" * 100, stream=True)
    assert c.get("f", "e", 1, stream=True) is not None  # delivered: next to go
    c.put("f", "e", 3, b"3" * 100, stream=True)
    assert ("f", "e", 1) not in c
    assert all(("f", "e", i) in c for i in (0, 2, 3))


def test_a_hit_outside_a_stream_promotes_to_main() -> None:
    c = ChunkCache(1000, probation_bytes=200)
    c.put("f", "e", 0, b"0" * 100, stream=True)
    assert c.get("f", "e", 0) == b"0" * 100  # random access (or a second reader): keep it
    assert c.stats.promotions == 1
    assert c.stats.probation_bytes == 0
    for i in range(1, 10):  # a stream passes by
        c.put("f", "e", i, b"x" * 100, stream=True)
    assert c.get("f", "e", 0) == b"0" * 100
    assert c.stats.bytes == 100 + c.stats.probation_bytes


def test_main_full_then_stream_stays_in_budget() -> None:
    c = ChunkCache(500, probation_bytes=200)
    for i in range(5):
        c.put("m", "e", i, b"m" * 100)
    c.put("s", "e", 0, b"s" * 100, stream=True)
    c.put("s", "e", 1, b"s" * 100, stream=True)
    assert c.stats.bytes <= 500
    assert c.get("s", "e", 1, stream=True) is not None  # the stream's chunk is there
    assert c.get("m", "e", 4) is not None  # the most recent of main too
    c.invalidate("s")
    assert c.stats.probation_bytes == 0
    assert c.stats.bytes == 100 * len(c)


def test_default_probation_is_small_and_fits_the_budget() -> None:
    assert ChunkCache(256 << 20).probation_bytes == 8 << 20
    assert ChunkCache(8 << 20).probation_bytes == 4 << 20
    assert ChunkCache(0).probation_bytes == 0
