"""EncryptedStore over every store (memory, local folder, moto S3 over HTTP).

Round trips at the chunk boundaries, ranged reads, multipart uploads, tamper tests modelled on
S3QL ``t1_backends`` (flip, append, truncate, swap, copy, foreign objects, not for us), the
chunk cache and single-flight GETs, read-ahead, rename by header rewrite, and the byte cost of a
small read in a large object.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from cssfs.cache import ChunkCache
from cssfs.encstore import WHOLE_OBJECT_BYTES, EncryptedFile, EncryptedStore, HeaderInfo
from cssfs.envelope import (
    CHUNK_SIZE,
    HEADER_SIZE,
    TAG_SIZE,
    chunk_range,
    envelope_size,
    table_range,
)
from cssfs.errors import (
    BindingError,
    ChunkAuthError,
    FormatError,
    HeaderAuthError,
    NoIdentityMatchError,
    NoSuchObjectError,
    PayloadError,
    PreconditionFailedError,
    TrailingDataError,
    TruncatedError,
)
from cssfs.keys import Identity
from cssfs.store.base import MIN_PART_SIZE, ObjectStore

CS = CHUNK_SIZE
CANARY = b"CANARY-encstore-1b9e: plaintext that must never reach a log\n"
BOUNDARY_SIZES = [0, 1, CS - 1, CS, CS + 1, 2 * CS + 500]
# A damaged object is logged once at WARNING, naming it ("object KEY: what failed").
tamper_logged = pytest.mark.expect_logs(r"^object \S+: ")


@pytest.fixture(scope="module")
def me() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate()


def pattern(n: int, seed: int = 0) -> bytes:
    """n bytes that differ at every offset within a chunk and between chunks (cheap to make)."""
    rnd = random.Random(seed)
    block = rnd.randbytes(CS + 13)  # not a multiple of CS: chunks differ from each other
    reps = -(-n // len(block)) if n else 0
    data = (CANARY + block * reps)[:n]
    return data


def es_for(store: ObjectStore, identity: Identity, cache: int = 0, **kw: object) -> EncryptedStore:
    return EncryptedStore(store, identity, cache=ChunkCache(cache), **kw)  # type: ignore[arg-type]


async def raw(store: ObjectStore, key: str) -> bytes:
    return await store.get(key)


async def put_raw(store: ObjectStore, key: str, data: bytes) -> None:
    await store.put(key, data)


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
async def test_round_trip_boundary_sizes(store: ObjectStore, me: Identity, size: int) -> None:
    es = es_for(store, me)
    data = pattern(size, size)
    info = await es.put("dir/file.bin", data, mtime_ns=1_700_000_000_123_456_789, mode=0o640)
    assert info.size == envelope_size(size)
    assert store.stats.requests["put"] == 1  # small: one PUT, no multipart upload
    assert store.stats.requests["create_multipart"] == 0

    [entry] = await es.list("dir/")
    assert (entry.key, entry.plain_size, entry.foreign) == ("dir/file.bin", size, False)

    f = await es.open("dir/file.bin")
    assert f.size == size
    assert f.info.readable and f.info.signature == "valid"
    assert (f.info.mtime_ns, f.info.mode) == (1_700_000_000_123_456_789, 0o640)
    assert await f.read(0, size + 100) == data
    for off in {0, 1, CS - 1, CS, CS + 1, size // 2, max(size - 1, 0), size, size + 5}:
        for n in (0, 1, 100, CS, CS + 2):
            assert await f.read(off, n) == data[off : off + n], (off, n)

    out = io.BytesIO()
    got = await es.get_to("dir/file.bin", out)
    assert out.getvalue() == data
    assert got.plain_size == size


async def test_random_ranged_reads(store: ObjectStore, me: Identity) -> None:
    es = es_for(store, me, cache=1 << 20)
    data = pattern(5 * CS + 777, 1)
    await es.put("r", data)
    f = await es.open("r")
    rnd = random.Random(7)
    for _ in range(60):
        off = rnd.randrange(0, len(data) + 10)
        n = rnd.choice([1, 17, 4096, CS - 3, CS, 3 * CS + 5, len(data)])
        assert await f.read(off, n) == data[off : off + n]


class OnlyRead:
    """A non-seekable source with read() only (a pipe, a socket)."""

    def __init__(self, data: bytes, step: int = 100_003) -> None:
        self._src = io.BytesIO(data)
        self._step = step

    def read(self, n: int = -1) -> bytes:
        return self._src.read(min(n, self._step) if n >= 0 else self._step)


async def test_multipart_upload_streams_with_header_last(store: ObjectStore, me: Identity) -> None:
    store.part_size = MIN_PART_SIZE  # 5 MiB parts: 12 MiB makes three
    es = es_for(store, me)
    data = pattern(12 * 1024 * 1024 + 123, 2)
    before = store.stats.copy()
    info = await es.put("big/obj", OnlyRead(data))  # type: ignore[arg-type]
    assert info.size == envelope_size(len(data))
    if "upload_part" in store.stats.requests or "create_multipart" in store.stats.requests:
        assert store.stats.requests["upload_part"] - before.requests["upload_part"] >= 3
    out = io.BytesIO()
    await es.get_to("big/obj", out)
    assert out.getvalue() == data
    f = await es.open("big/obj")
    for off in (0, 5 * 1024 * 1024 - 7, len(data) - 10):
        assert await f.read(off, 70_000) == data[off : off + 70_000]


class FromEncryptedFile:
    """A source whose read() waits for the trio loop: it reads another envelope's plaintext
    (the mount copying a file, a journal reading its base object)."""

    def __init__(self, f: EncryptedFile) -> None:
        self._f = f
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        n = self._f.size - self._pos if n < 0 else n
        data = trio.from_thread.run(self._f.read, self._pos, n)
        self._pos += len(data)
        return data


async def test_put_from_a_source_that_reads_through_trio(
    store: ObjectStore, me: Identity
) -> None:
    """Reading the source must not hold the CPU limiter: with one token, two such copies at
    once would otherwise deadlock (each read needs a token to open its chunks)."""
    es = es_for(store, me, cpu_limiter=trio.CapacityLimiter(1))
    data = pattern(3 * 1024 * 1024 + 5, 13)
    await es.put("original", data)
    src = await es.open("original")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for name in ("copy1", "copy2"):
                nursery.start_soon(
                    es.put, name, FromEncryptedFile(src)  # type: ignore[arg-type]
                )
    for name in ("copy1", "copy2"):
        assert await (await es.open(name)).read(0, len(data)) == data


async def test_put_from_seekable_file(store: ObjectStore, me: Identity, tmp_path: Path) -> None:
    es = es_for(store, me)
    data = pattern(3 * CS + 1, 3)
    path = tmp_path / "src"
    path.write_bytes(data)
    with path.open("rb") as src:
        await es.put("from-file", src)
    f = await es.open("from-file")
    assert await f.read(0, len(data)) == data


async def test_conditional_put(store: ObjectStore, me: Identity) -> None:
    es = es_for(store, me)
    first = await es.put("c", b"one", if_none_match=True)
    with pytest.raises(PreconditionFailedError):
        await es.put("c", b"two", if_none_match=True)
    second = await es.put("c", b"two", if_match=first.etag)
    with pytest.raises(PreconditionFailedError):
        await es.put("c", b"three", if_match=first.etag)
    f = await es.open("c")
    assert f.etag == second.etag
    assert await f.read(0, 10) == b"two"


# -- sharing and identities -----------------------------------------------------------------


async def test_not_for_us_and_shared(store: ObjectStore, me: Identity, alice: Identity) -> None:
    mine = es_for(store, me)
    await mine.put("private", CANARY)
    shared = EncryptedStore(store, me, [alice.recipient])
    await shared.put("shared", CANARY)

    theirs = es_for(store, alice)
    with pytest.raises(NoIdentityMatchError):
        await theirs.open("private")
    info = await theirs.header("private")
    assert not info.readable and info.not_for_us
    assert info.signature == "valid"
    assert info.key_ids == (me.recipient.key_id,)
    assert info.writer == me.recipient.ed25519

    f = await theirs.open("shared")
    assert await f.read(0, 1000) == CANARY
    assert f.info.writer_fingerprint == me.recipient.fingerprint or f.info.writer_fingerprint
    assert set(f.info.key_ids) == {me.recipient.key_id, alice.recipient.key_id}


async def test_headers_of_a_listing(store: ObjectStore, me: Identity, alice: Identity) -> None:
    es = es_for(store, me)
    for i in range(5):
        await es.put(f"h/{i}", pattern(i * 1000, i))
    await put_raw(store, "h/foreign", b"just some text")
    await EncryptedStore(store, alice).put("h/alices", b"x")
    await es.put("h/sub/deeper", b"y")
    entries = await es.list("h/")
    by_key = {e.key: e for e in entries}
    assert by_key["h/foreign"].foreign
    assert by_key["h/sub/"].is_dir
    infos = await es.headers(entries)
    assert set(infos) == {f"h/{i}" for i in range(5)} | {"h/alices"}
    for key, value in infos.items():
        assert isinstance(value, HeaderInfo)
        assert value.readable == (key != "h/alices")
    theirs = infos["h/alices"]
    assert isinstance(theirs, HeaderInfo) and theirs.not_for_us
    # Cached by (key, etag): asking again costs no request.
    before = store.stats.total_requests
    await es.headers(entries)
    assert store.stats.total_requests == before


# -- tampering (S3QL t1_backends) ------------------------------------------------------------


async def _sample(store: ObjectStore, me: Identity, key: str = "t", chunks: int = 4) -> bytes:
    data = pattern(chunks * CS - 100, 11)
    await es_for(store, me).put(key, data)
    return data


@pytest.mark.parametrize("bad", [0, 2, 3])
async def test_flip_a_byte_in_chunk(
    store: ObjectStore, me: Identity, bad: int, caplog: pytest.LogCaptureFixture
) -> None:
    data = await _sample(store, me)
    blob = bytearray(await raw(store, "t"))
    off, length = chunk_range(bad, len(data))
    blob[off + length // 2] ^= 0x40
    await put_raw(store, "t", bytes(blob))

    es = es_for(store, me)
    f = await es.open("t")  # header and table are intact
    if bad > 0:
        assert await f.read(0, bad * CS) == data[: bad * CS]  # chunks before are readable
    with caplog.at_level(logging.WARNING, logger="cssfs.encstore"), pytest.raises(
        ChunkAuthError
    ) as exc:
        await f.read(bad * CS + 10, 10)
    assert exc.value.index == bad
    assert any("t" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert all(CANARY not in r.getMessage().encode() for r in caplog.records)

    out = io.BytesIO()
    with pytest.raises(ChunkAuthError):
        await es.get_to("t", out)
    assert data.startswith(out.getvalue())  # only verified plaintext before the bad chunk
    assert len(out.getvalue()) <= bad * CS


@tamper_logged
async def test_swap_two_chunks(store: ObjectStore, me: Identity) -> None:
    data = await _sample(store, me)
    blob = bytearray(await raw(store, "t"))
    (a, n), (b, _) = chunk_range(0, len(data)), chunk_range(1, len(data))
    blob[a : a + n], blob[b : b + n] = blob[b : b + n], blob[a : a + n]
    await put_raw(store, "t", bytes(blob))
    f = await es_for(store, me).open("t")
    with pytest.raises(ChunkAuthError) as exc:
        await f.read(0, 10)
    assert exc.value.index == 0


@tamper_logged
async def test_append_bytes(store: ObjectStore, me: Identity) -> None:
    await _sample(store, me)
    blob = await raw(store, "t")
    for extra in (b"\0" * 48, b"x"):  # a possible envelope size, an impossible one
        await put_raw(store, "t", blob + extra)
        with pytest.raises(TrailingDataError):
            await es_for(store, me).open("t")


@tamper_logged
async def test_truncate_drop_last_chunk(store: ObjectStore, me: Identity) -> None:
    data = await _sample(store, me)
    blob = await raw(store, "t")
    last = len(data) // CS
    off, _ = chunk_range(last, len(data))
    table_off, table_len = table_range(len(data))
    # Drop the last chunk and its table entry: a well-formed size for one chunk fewer.
    cut = blob[:off] + blob[table_off : table_off + table_len - 32]
    await put_raw(store, "t", cut)
    with pytest.raises(TruncatedError):
        await es_for(store, me).open("t")
    await put_raw(store, "t", blob[:-1])
    with pytest.raises(TruncatedError):
        await es_for(store, me).open("t")
    await put_raw(store, "t", blob[:HEADER_SIZE - 1])  # not even a header left: foreign
    with pytest.raises(FormatError):
        await es_for(store, me).open("t")


@tamper_logged
async def test_flip_table_and_header(store: ObjectStore, me: Identity) -> None:
    data = await _sample(store, me)
    blob = await raw(store, "t")
    table_off, _ = table_range(len(data))
    bad_table = bytearray(blob)
    bad_table[table_off + 3] ^= 1
    await put_raw(store, "t", bytes(bad_table))
    with pytest.raises(PayloadError):
        await es_for(store, me).open("t")
    bad_header = bytearray(blob)
    bad_header[100] ^= 1  # inside the MAC'd fixed fields
    await put_raw(store, "t", bytes(bad_header))
    with pytest.raises((HeaderAuthError, FormatError)):
        await es_for(store, me).open("t")


@tamper_logged
async def test_swap_two_objects(store: ObjectStore, me: Identity) -> None:
    await _sample(store, me, "a")
    await _sample(store, me, "b")
    a, b = await raw(store, "a"), await raw(store, "b")
    await put_raw(store, "a", b)
    await put_raw(store, "b", a)
    es = es_for(store, me)
    for key in ("a", "b"):
        with pytest.raises(BindingError):
            await es.open(key)
        info = await es.header(key)
        assert not info.readable and info.problem


@tamper_logged
async def test_copy_to_another_key(store: ObjectStore, me: Identity) -> None:
    await _sample(store, me, "orig")
    await store.copy("orig", "elsewhere")
    es = es_for(store, me)
    with pytest.raises(BindingError):
        await es.open("elsewhere")
    assert (await es.open("orig")).size > 0


@tamper_logged
async def test_raw_plaintext_object_is_foreign(store: ObjectStore, me: Identity) -> None:
    await put_raw(store, "notes.txt", b"hello, not encrypted")
    await put_raw(store, "padded.txt", b"A" * envelope_size(0))  # a possible envelope size
    es = es_for(store, me)
    entries = {e.key: e for e in await es.list("")}
    assert entries["notes.txt"].foreign and entries["notes.txt"].plain_size is None
    assert entries["padded.txt"].plain_size == 0  # size alone cannot tell
    for key in ("notes.txt", "padded.txt"):
        with pytest.raises(FormatError):
            await es.open(key)
    with pytest.raises(FormatError):
        await es.header("padded.txt")


async def test_missing_object(store: ObjectStore, me: Identity) -> None:
    with pytest.raises(NoSuchObjectError):
        await es_for(store, me).open("nope")


# -- cache, single flight, read-ahead, cost --------------------------------------------------


async def test_cached_reread_makes_no_get(store: ObjectStore, me: Identity) -> None:
    es = es_for(store, me, cache=8 << 20)
    data = pattern(6 * CS, 4)
    await es.put("c", data)
    f = await es.open("c")
    assert await f.read(CS - 10, 2 * CS) == data[CS - 10 : 3 * CS - 10]
    gets = store.stats.requests["get"]
    assert await f.read(CS - 10, 2 * CS) == data[CS - 10 : 3 * CS - 10]
    assert await f.read(CS, 100) == data[CS : CS + 100]
    assert store.stats.requests["get"] == gets
    g = await es.open("c")  # a HEAD for the current version, no GET (opened state cached)
    assert await g.read(CS, 100) == data[CS : CS + 100]
    assert store.stats.requests["get"] == gets
    assert es.cache.stats.hits >= 3


@pytest.mark.parametrize("cache", [0, 4 << 20])
async def test_concurrent_readers_share_one_get(
    store: ObjectStore, me: Identity, cache: int
) -> None:
    es = es_for(store, me, cache=cache)
    data = pattern(3 * CS, 5)
    await es.put("s", data)
    f = await es.open("s")
    gets = store.stats.requests["get"]
    results: list[bytes] = []

    async def reader(off: int) -> None:
        results.append(await f.read(CS + off, 100))

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(reader, i)
    assert store.stats.requests["get"] - gets == 1
    assert sorted(results) == sorted(data[CS + i : CS + i + 100] for i in range(10))


async def test_sequential_reads_prefetch(memory_store: ObjectStore, me: Identity) -> None:
    store = memory_store
    data = pattern(40 * CS, 6)
    await es_for(store, me).put("seq", data)
    async with es_for(store, me, cache=16 << 20, readahead_bytes=16 * CS) as es:
        f = await es.open("seq")
        assert await f.read(0, 2 * CS) == data[: 2 * CS]
        assert await f.read(2 * CS, 2 * CS) == data[2 * CS : 4 * CS]
        await trio.testing.wait_all_tasks_blocked()
        gets = store.stats.requests["get"]
        for off in range(4 * CS, 12 * CS, 2 * CS):  # all read ahead already
            assert await f.read(off, 2 * CS) == data[off : off + 2 * CS]
        assert store.stats.requests["get"] == gets
        # Keep going to the end: everything still right, a bounded number of GETs.
        off = 12 * CS
        while off < len(data):
            assert await f.read(off, 2 * CS) == data[off : off + 2 * CS]
            off += 2 * CS
        assert store.stats.requests["get"] - gets <= 3  # one per read-ahead top-up


async def test_a_sequential_read_leaves_the_cache_to_random_access(
    memory_store: ObjectStore, me: Identity
) -> None:
    store = memory_store
    data = pattern(64 * CS, 21)
    await es_for(store, me).put("stream", data)
    await es_for(store, me).put("random", data[: 8 * CS])
    async with es_for(store, me, cache=2 << 20, readahead_bytes=8 * CS) as es:
        r = await es.open("random")
        for i in (5, 1, 3):  # random access: kept (main)
            assert await r.read(i * CS + 7, 10) == data[i * CS + 7 : i * CS + 17]
        f = await es.open("stream")
        for off in range(0, len(data), 2 * CS):  # a one-pass read, 4x the cache
            assert await f.read(off, 2 * CS) == data[off : off + 2 * CS]
        await trio.testing.wait_all_tasks_blocked()
        assert es.cache.stats.probation_bytes <= es.cache.probation_bytes
        gets = store.stats.requests["get"]
        for i in (5, 1, 3):
            assert await r.read(i * CS + 7, 10) == data[i * CS + 7 : i * CS + 17]
        assert store.stats.requests["get"] == gets
        # A chunk a stream brought in and another reader asks for is kept from then on.
        g = await es.open("stream")
        assert await g.read(63 * CS + 1, 5) == data[63 * CS + 1 : 63 * CS + 6]
        assert es.cache.stats.promotions == 1
        assert await g.read(63 * CS + 9, 5) == data[63 * CS + 9 : 63 * CS + 14]
        assert store.stats.requests["get"] == gets


class HeldGets:
    """A store whose GETs wait for ``release``: reads overlap, as the kernel's read-ahead makes
    a sequential reader's requests overlap."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.release = trio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def get(self, *args: object, **kw: object) -> bytes:
        await self.release.wait()
        return await self.inner.get(*args, **kw)  # type: ignore[arg-type]

    async def get_into(self, *args: object, **kw: object) -> int:
        await self.release.wait()
        return await self.inner.get_into(*args, **kw)  # type: ignore[arg-type]


async def test_overlapping_sequential_reads_are_one_stream(
    memory_store: ObjectStore, me: Identity
) -> None:
    data = pattern(16 * CS, 23)
    await es_for(memory_store, me).put("seq", data)
    store = HeldGets(memory_store)
    async with es_for(store, me, cache=4 << 20, readahead_bytes=4 * CS) as es:  # type: ignore[arg-type]
        store.release.set()
        f = await es.open("seq")
        store.release = trio.Event()
        got: dict[int, bytes] = {}

        async def read(off: int) -> None:
            got[off] = await f.read(off, 2 * CS)

        async with trio.open_nursery() as nursery:
            for off in range(0, len(data), 2 * CS):  # each sent before the one before is answered
                nursery.start_soon(read, off)
                await trio.testing.wait_all_tasks_blocked()
            store.release.set()
        assert b"".join(got[off] for off in sorted(got)) == data
        # Every read continued the stream: nothing went to the cache's main segment.
        assert es.cache.stats.bytes == es.cache.stats.probation_bytes
        assert es.cache.stats.promotions == 0


async def test_open_ahead_shares_one_get_with_the_open(
    memory_store: ObjectStore, me: Identity
) -> None:
    store = memory_store
    data = pattern(3 * CS + 5, 22)
    info = await es_for(store, me).put("small", data)
    async with es_for(store, me, cache=4 << 20, whole_object_bytes=WHOLE_OBJECT_BYTES) as es:
        gets = store.stats.requests["get"]
        assert es.prefetch_open("small", info.etag, info.size)
        assert not es.prefetch_open("small", info.etag, info.size)  # in flight already
        f = await es.open("small", etag=info.etag, cipher_size=info.size)  # waits for it
        assert await f.read(0, len(data)) == data
        assert store.stats.requests["get"] - gets == 1
        assert not es.prefetch_open("small", info.etag, info.size)  # opened already
        assert not es.prefetch_open("big", "x", WHOLE_OBJECT_BYTES + 1)  # not small


async def test_open_ahead_of_a_missing_object_is_quiet(
    memory_store: ObjectStore, me: Identity
) -> None:
    async with es_for(memory_store, me, cache=4 << 20,
                      whole_object_bytes=WHOLE_OBJECT_BYTES) as es:
        assert es.prefetch_open("gone", "e", 9000)
        await trio.testing.wait_all_tasks_blocked()
        assert not es._open_flights
        with pytest.raises(NoSuchObjectError):
            await es.open("gone", etag="e", cipher_size=9000)


async def test_closing_the_store_cancels_read_ahead(
    memory_store: ObjectStore, me: Identity
) -> None:
    data = pattern(40 * CS, 14)
    await es_for(memory_store, me).put("x", data)
    es = es_for(memory_store, me, cache=16 << 20, readahead_bytes=32 * CS)
    async with es:
        f = await es.open("x")
        assert await f.read(0, CS) == data[:CS]  # a sequential start: read-ahead claimed
        assert es._in_flight
    assert not es._in_flight  # cancelled, and every claim handed back
    assert await f.read(5 * CS, 10) == data[5 * CS : 5 * CS + 10]


@tamper_logged
async def test_readahead_errors_do_not_crash(memory_store: ObjectStore, me: Identity) -> None:
    store = memory_store
    data = pattern(20 * CS, 8)
    await es_for(store, me).put("bad", data)
    blob = bytearray(await raw(store, "bad"))
    off, _ = chunk_range(6, len(data))
    blob[off + 5] ^= 1
    await put_raw(store, "bad", bytes(blob))
    async with es_for(store, me, cache=16 << 20, readahead_bytes=16 * CS) as es:
        f = await es.open("bad")
        assert await f.read(0, CS) == data[:CS]
        assert await f.read(CS, CS) == data[CS : 2 * CS]
        await trio.testing.wait_all_tasks_blocked()
        assert await f.read(2 * CS, 4 * CS) == data[2 * CS : 6 * CS]
        with pytest.raises(ChunkAuthError):
            await f.read(6 * CS, CS)
        assert await f.read(7 * CS, CS) == data[7 * CS : 8 * CS]


async def test_small_read_in_a_large_object_is_cheap(store: ObjectStore, me: Identity) -> None:
    size = 100 * 1024 * 1024
    es = es_for(store, me)
    await es.put("huge", PatternReader(size))
    before = store.stats.copy()
    f = await es.open("huge")
    mid = size // 2 + 1000
    got = await f.read(mid, 4096)
    assert got == PatternReader.slice(mid, 4096)
    received = store.stats.bytes_received - before.bytes_received
    assert received <= 2 * (CS + TAG_SIZE), received
    assert store.stats.requests["get"] - before.requests["get"] == 3  # header, table, chunk


async def test_a_small_object_opens_in_one_get(store: ObjectStore, me: Identity) -> None:
    data = pattern(3 * CS + 5, 9)
    await es_for(store, me).put("small", data)
    es = es_for(store, me, cache=4 << 20, whole_object_bytes=WHOLE_OBJECT_BYTES)
    before = store.stats.copy()
    f = await es.open("small")
    assert await f.read(0, len(data) + 1) == data
    assert store.stats.requests["get"] - before.requests["get"] == 1  # header+table+chunks
    big = es_for(store, me, cache=4 << 20, whole_object_bytes=HEADER_SIZE)  # too small: ranged
    before = store.stats.copy()
    assert await (await big.open("small")).read(0, 10) == data[:10]
    assert store.stats.requests["get"] - before.requests["get"] == 3


@tamper_logged
async def test_a_bad_chunk_of_a_whole_small_object_is_still_an_error(
    store: ObjectStore, me: Identity
) -> None:
    data = await _sample(store, me)
    blob = bytearray(await raw(store, "t"))
    off = chunk_range(2, len(data))[0]
    blob[off + 7] ^= 0x01
    await put_raw(store, "t", bytes(blob))
    es = es_for(store, me, cache=4 << 20, whole_object_bytes=WHOLE_OBJECT_BYTES)
    f = await es.open("t")
    assert await f.read(0, 2 * CS) == data[: 2 * CS]
    with pytest.raises(ChunkAuthError):
        await f.read(2 * CS, 10)


class PatternReader:
    """A readable of ``size`` bytes of a repeating 251-byte pattern, made on the fly."""

    BLOCK = bytes(range(251)) * (CS // 251 + 2)

    def __init__(self, size: int) -> None:
        self._left = size
        self._pos = 0

    @classmethod
    def slice(cls, off: int, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            start = (off + len(out)) % 251
            out += cls.BLOCK[start : start + n - len(out)]
        return bytes(out)

    def readinto(self, buf: memoryview | bytearray) -> int:
        n = min(len(buf), self._left)
        buf[:n] = self.slice(self._pos, n)
        self._pos += n
        self._left -= n
        return n

    def read(self, n: int = -1) -> bytes:
        buf = bytearray(min(n, self._left) if n >= 0 else self._left)
        got = self.readinto(buf)
        return bytes(buf[:got])


# -- rename, delete, journal helpers ---------------------------------------------------------


async def test_rename_rebinds_and_deletes_source(store: ObjectStore, me: Identity) -> None:
    es = es_for(store, me, cache=1 << 20)
    data = pattern(3 * CS + 9, 9)
    await es.put("old/name", data)
    f = await es.open("old/name")
    await f.read(0, 10)
    await es.rename("old/name", "new/name")
    with pytest.raises(NoSuchObjectError):
        await store.head("old/name")
    g = await es.open("new/name")
    assert await g.read(0, len(data)) == data
    assert g.info.signature == "valid"  # the writer is still who wrote it


async def test_rename_large_object_uses_server_side_copy(store: ObjectStore, me: Identity) -> None:
    store.part_size = MIN_PART_SIZE
    es = es_for(store, me)
    data = pattern(MIN_PART_SIZE + 3 * CS, 10)
    await es.put("large", data)
    sent = store.stats.bytes_sent
    await es.rename("large", "moved/large")
    if type(store).__name__ == "S3Store":  # server-side copy: the payload is not sent again
        assert store.stats.bytes_sent - sent < len(data)
    out = io.BytesIO()
    await es.get_to("moved/large", out)
    assert out.getvalue() == data


async def test_rename_of_a_file_not_for_us_fails_cleanly(
    store: ObjectStore, me: Identity, alice: Identity
) -> None:
    await es_for(store, alice).put("theirs", b"secret")
    es = es_for(store, me)
    with pytest.raises(NoIdentityMatchError):
        await es.rename("theirs", "mine")
    assert (await store.head("theirs")).size > 0
    with pytest.raises(NoSuchObjectError):
        await store.head("mine")


async def test_delete_forgets_cache(store: ObjectStore, me: Identity) -> None:
    es = es_for(store, me, cache=1 << 20)
    await es.put("d", b"data")
    f = await es.open("d")
    await f.read(0, 4)
    await es.delete("d")
    assert len(es.cache) == 0
    with pytest.raises(NoSuchObjectError):
        await es.open("d")
    await es.delete("d")  # missing is fine


@tamper_logged
async def test_seal_to_file_rebind_and_upload(
    store: ObjectStore, me: Identity, tmp_path: Path
) -> None:
    es = es_for(store, me)
    data = pattern(2 * CS + 3, 12)
    path = tmp_path / "staged.env"
    with path.open("w+b") as dst:
        await es.seal_to_file("first", data, dst, mtime_ns=5, mode=0o600)
    assert CANARY not in path.read_bytes()  # only ciphertext on disk
    await es.put_envelope_file("first", path)
    assert await (await es.open("first")).read(0, len(data)) == data

    await es.rebind_file(path, "second", old_key="first")
    await es.put_envelope_file("second", path)
    g = await es.open("second")
    assert (await g.read(0, len(data)), g.info.mode, g.info.mtime_ns) == (data, 0o600, 5)
    await es.put_envelope_file("wrong", path)
    with pytest.raises(BindingError):
        await es.open("wrong")
    with pytest.raises(BindingError):
        await es.rebind_file(path, "third", old_key="first")


def test_pattern_helper_is_deterministic() -> None:
    assert pattern(10, 1) == pattern(10, 1)
    r = PatternReader(1000)
    assert r.read(1000) == PatternReader.slice(0, 1000)


@pytest.fixture
def memory_store() -> Iterator[ObjectStore]:
    from cssfs.store.memory import MemoryStore

    yield MemoryStore()

