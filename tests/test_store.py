"""Object stores: every test runs against memory, a local folder and S3 (moto over HTTP).

The contract is cssfs.store.base: LIST over all pages with prefixes and delimiters, HEAD, ranged
GET as a slice, PUT of bytes / file objects / PartSource (part 1 last), conditional puts, copy,
replace_head, batched delete, the store errors, and the stats counters. A few tests at the end
cover what only one store has (LocalStore's layout and ETag rule, S3's multipart aborts, URLs).
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from cssfs.errors import (
    ConfigError,
    NoSuchBucketError,
    NoSuchObjectError,
    PreconditionFailedError,
    StoreError,
)
from cssfs.store import PartSource, open_store
from cssfs.store.base import MIN_PART_SIZE, ObjectInfo, ObjectStore
from cssfs.store.local import TMP_DIR, LocalStore
from cssfs.store.memory import MemoryBucket, MemoryStore

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]


def blob(n: int, seed: int = 0) -> bytes:
    """n pseudo-random bytes (cheap: a repeated random block of odd length)."""
    block = random.Random(seed).randbytes(65537)
    return (block * (n // len(block) + 1))[:n]


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def apieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for piece in pieces(data, size):
        await trio.lowlevel.checkpoint()
        yield piece


def is_s3(store: ObjectStore) -> bool:
    return store.url.startswith("s3://")


# -- put / head / get -------------------------------------------------------------------------


async def test_put_head_get_round_trip(store: ObjectStore) -> None:
    data = blob(1000)
    info = await store.put("dir/obj", data)
    assert (info.key, info.size) == ("dir/obj", 1000)
    assert info.etag and '"' not in info.etag
    head = await store.head("dir/obj")
    assert (head.key, head.size, head.etag) == ("dir/obj", 1000, info.etag)
    assert abs(head.mtime - info.mtime) < 2
    assert abs(head.mtime - time.time()) < 300  # a zone mistake would be hours
    assert await store.get("dir/obj") == data


@pytest.mark.parametrize("text", [
    "2026-11-26T23:42:49.000Z", "2026-11-26T23:42:49Z", "2026-11-27T00:42:49.5+01:00",
    "Thu, 26 Nov 2026 23:42:49 GMT", "2026-11-26T23:42:49", "1795736569", "20261126",
])
def test_s3_timestamps_parse_as_botocore_parses_them(text: str) -> None:
    from botocore.utils import parse_timestamp

    from cssfs.store.s3 import _parse_timestamp

    assert _parse_timestamp(text).timestamp() == parse_timestamp(text).timestamp()


async def test_ranged_get_is_a_slice(store: ObjectStore) -> None:
    data = blob(1000)
    await store.put("r", data)
    await store.put("empty", b"")
    cases = [(0, 1), (0, 1000), (999, 1000), (10, 20), (500, None), (999, None), (990, 5000)]
    for start, end in cases:
        assert await store.get("r", start, end) == data[start:end], (start, end)
    for start, end in [(0, 0), (7, 7), (20, 10), (1000, None), (1000, 1001), (5000, None)]:
        assert await store.get("r", start, end) == b"", (start, end)
    assert await store.get("empty") == b""
    assert await store.get("empty", 0, 10) == b""
    with pytest.raises(ValueError):
        await store.get("r", -1)


async def test_missing_objects(store: ObjectStore) -> None:
    with pytest.raises(NoSuchObjectError):
        await store.head("nope")
    with pytest.raises(NoSuchObjectError):
        await store.get("nope")
    with pytest.raises(NoSuchObjectError):
        await store.get("nope", 5, 10)
    with pytest.raises(NoSuchObjectError):
        await store.get("nope", 3, 3)  # an empty range still needs the object
    with pytest.raises(NoSuchObjectError):
        await store.copy("nope", "dst")
    with pytest.raises(NoSuchObjectError):
        await store.replace_head("nope", b"x", 0)
    await store.delete(["nope", "also/nope"])  # missing keys are fine
    with pytest.raises(ValueError):
        await store.head("")


async def test_overwrite_changes_etag_and_content(store: ObjectStore) -> None:
    first = await store.put("k", b"one")
    second = await store.put("k", b"two!")
    assert first.etag != second.etag
    assert await store.get("k") == b"two!"
    assert (await store.head("k")).size == 4


# -- listing ----------------------------------------------------------------------------------

KEYS = ["a/1", "a/2", "a/b/3", "ab", "b", "c/d/e"]


async def _fill(store: ObjectStore, keys: list[str]) -> dict[str, ObjectInfo]:
    return {k: await store.put(k, k.encode() * 3) for k in keys}


async def test_list_prefix_and_delimiter(store: ObjectStore) -> None:
    infos = await _fill(store, KEYS)

    async def keys(prefix: str = "", delimiter: str | None = None) -> tuple[list[str], list[str]]:
        listing = await store.list(prefix, delimiter)
        return [o.key for o in listing.objects], listing.prefixes

    assert await keys() == (KEYS, [])
    assert await keys("a/") == (["a/1", "a/2", "a/b/3"], [])
    assert await keys("a") == (["a/1", "a/2", "a/b/3", "ab"], [])
    assert await keys("", "/") == (["ab", "b"], ["a/", "c/"])
    assert await keys("a/", "/") == (["a/1", "a/2"], ["a/b/"])
    assert await keys("a", "/") == (["ab"], ["a/"])
    assert await keys("c/", "/") == ([], ["c/d/"])
    assert await keys("c/d/", "/") == (["c/d/e"], [])
    assert await keys("zz") == ([], [])
    assert await keys("zz/", "/") == ([], [])
    assert await keys("", "b/") == (["a/1", "a/2", "ab", "b", "c/d/e"], ["a/b/"])
    # sizes and ETags come from LIST itself and agree with HEAD
    for obj in (await store.list()).objects:
        assert (obj.size, obj.etag) == (infos[obj.key].size, infos[obj.key].etag)
        assert abs(obj.mtime - (await store.head(obj.key)).mtime) < 2


async def test_list_all_pages(store_factory: Callable[..., ObjectStore], store_kind: str) -> None:
    # A page size of 3 makes S3 page through 10 objects (and 10 entries with a delimiter) the way
    # it pages through thousands; the other stores have no pages.
    store = store_factory(list_page_size=3) if store_kind == "s3" else store_factory()
    names = [f"p{i}/x" for i in range(7)] + ["q0", "q1", "q2"]
    await _fill(store, names)
    before = store.stats.requests["list"]
    listing = await store.list()
    assert [o.key for o in listing.objects] == sorted(names)
    grouped = await store.list("", "/")
    assert grouped.prefixes == [f"p{i}/" for i in range(7)]
    assert [o.key for o in grouped.objects] == ["q0", "q1", "q2"]
    if store_kind == "s3":
        assert store.stats.requests["list"] - before == 4 + 4
    else:
        assert store.stats.requests["list"] - before == 2


async def test_directory_marker_keys(store: ObjectStore) -> None:
    await store.put("d/", b"")
    await store.put("d/x", b"x")
    await store.put("e/", b"marker with content")
    top = await store.list("", "/")
    assert top.prefixes == ["d/", "e/"]
    inner = await store.list("d/", "/")
    assert [o.key for o in inner.objects] == ["d/", "d/x"]
    assert (await store.head("e/")).size == len(b"marker with content")
    assert [o.key for o in (await store.list()).objects] == ["d/", "d/x", "e/"]
    await store.delete(["d/"])
    assert [o.key for o in (await store.list()).objects] == ["d/x", "e/"]


async def test_prefixed_key_space(
    store_factory: Callable[..., ObjectStore], store_kind: str
) -> None:
    if store_kind == "local":
        pytest.skip("a local store is rooted at its folder; it has no key prefix")
    inner = store_factory(prefix="pre/fix")
    outer = store_factory()
    assert inner.prefix == "pre/fix/"
    assert inner.full_key("x") == "pre/fix/x"
    info = await inner.put("x", b"inside")
    await outer.put("y", b"outside")
    assert info.key == "x"
    assert [o.key for o in (await outer.list()).objects] == ["pre/fix/x", "y"]
    assert [o.key for o in (await inner.list()).objects] == ["x"]
    assert (await inner.list("", "/")).objects[0].key == "x"
    assert await outer.get("pre/fix/x") == b"inside"
    await inner.copy("x", "z")
    assert await outer.get("pre/fix/z") == b"inside"
    await inner.delete(["x", "z"])
    assert [o.key for o in (await outer.list()).objects] == ["y"]


# -- streaming and multipart puts -------------------------------------------------------------


async def test_put_file_objects(store: ObjectStore, tmp_path: Path) -> None:
    store.part_size = MIN_PART_SIZE
    data = blob(2 * MIN_PART_SIZE + 12345)
    before = store.stats.copy()
    info = await store.put("from-bytesio", io.BytesIO(data))
    assert info.size == len(data)
    path = tmp_path / "src.bin"
    path.write_bytes(data[:1000])
    with path.open("rb") as f:
        small = await store.put("from-file", f)
    assert small.size == 1000
    assert await store.get("from-bytesio") == data
    assert await store.get("from-file") == data[:1000]
    if is_s3(store):  # 3 parts, then a plain PUT for the small file
        assert store.stats.requests["upload_part"] - before.requests["upload_part"] == 3
        assert store.stats.requests["put"] - before.requests["put"] == 1
        assert info.etag.endswith("-3")


async def test_put_large_bytes_goes_multipart(store: ObjectStore) -> None:
    store.part_size = MIN_PART_SIZE
    data = blob(MIN_PART_SIZE + 1)
    before = store.stats.copy()
    info = await store.put("big", data)
    assert info.size == len(data) and (await store.head("big")).etag == info.etag
    assert await store.get("big", MIN_PART_SIZE - 2) == data[MIN_PART_SIZE - 2 :]
    assert store.stats.bytes_sent - before.bytes_sent == len(data)
    if is_s3(store):
        assert store.stats.requests["upload_part"] - before.requests["upload_part"] == 2
        assert (
            store.stats.requests["complete_multipart"] - before.requests["complete_multipart"] == 1
        )


@pytest.mark.parametrize("size", [0, 100, MIN_PART_SIZE, 2 * MIN_PART_SIZE + 777])
async def test_part_source_uploads_first_part_last(store: ObjectStore, size: int) -> None:
    store.part_size = MIN_PART_SIZE
    head = blob(4096, seed=1)
    rest = blob(size, seed=2)
    events: list[str] = []

    async def produce() -> AsyncIterator[bytes]:
        async for piece in apieces(rest, 100_003):  # odd sizes: the store regroups them
            yield piece
        events.append("rest done")

    def make_head() -> bytes:
        events.append("head")
        return head

    before = store.stats.copy()
    info = await store.put("env", PartSource(len(head), produce(), make_head))
    assert events == ["rest done", "head"]
    assert info.size == len(head) + size
    assert await store.get("env") == head + rest
    assert (await store.head("env")).etag == info.etag
    if is_s3(store):
        parts = store.stats.requests["upload_part"] - before.requests["upload_part"]
        total = len(head) + size
        assert parts == (0 if total <= MIN_PART_SIZE else -(-total // MIN_PART_SIZE))


async def test_part_source_variants(store: ObjectStore) -> None:
    # a sync iterable and an async head
    async def async_head() -> bytes:
        await trio.lowlevel.checkpoint()
        return b"HEAD"

    await store.put("a", PartSource(4, pieces(b"payload" * 10, 7), async_head))
    assert await store.get("a") == b"HEAD" + b"payload" * 10
    # a head of the wrong size is a caller bug, and nothing is stored
    with pytest.raises(ValueError, match="head_size"):
        await store.put("b", PartSource(4, [b"x"], lambda: b"too long"))
    with pytest.raises(NoSuchObjectError):
        await store.head("b")


async def test_failed_multipart_leaves_no_object(
    store: ObjectStore, store_kind: str, request: pytest.FixtureRequest
) -> None:
    store.part_size = MIN_PART_SIZE
    data = blob(3 * MIN_PART_SIZE)

    async def broken() -> AsyncIterator[bytes]:
        async for piece in apieces(data, MIN_PART_SIZE):
            yield piece
        raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError, match="producer failed"):
        await store.put("half", PartSource(0, broken(), lambda: b""))
    with pytest.raises(NoSuchObjectError):
        await store.head("half")
    if store_kind == "s3":
        assert store.stats.requests["abort_multipart"] == 1
        assert _pending_uploads(request) == []
    if store_kind == "local":
        assert _tmp_files(request) == []


async def test_cancelled_multipart_is_aborted(
    store: ObjectStore, store_kind: str, request: pytest.FixtureRequest
) -> None:
    store.part_size = MIN_PART_SIZE
    stuck = trio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield blob(MIN_PART_SIZE)
        yield blob(MIN_PART_SIZE)
        yield b"more"
        stuck.set()
        await trio.sleep_forever()
        yield b"never"

    async with trio.open_nursery() as nursery:

        async def upload() -> None:
            await store.put("cancelled", PartSource(0, slow(), lambda: b""))

        nursery.start_soon(upload)
        await stuck.wait()
        nursery.cancel_scope.cancel()
    with pytest.raises(NoSuchObjectError):
        await store.head("cancelled")
    if store_kind == "s3":
        assert _pending_uploads(request) == []


async def test_multipart_memory_is_bounded(
    store_factory: Callable[..., ObjectStore], store_kind: str
) -> None:
    # With concurrency 1 the producer never runs more than a couple of parts ahead of the
    # uploads: at most `concurrency` parts in memory, plus part 1, plus the one being read.
    if store_kind != "s3":
        pytest.skip("only the S3 store uploads parts in parallel")
    store = store_factory(concurrency=1)
    ahead: list[int] = []
    total = 5

    async def produce() -> AsyncIterator[bytes]:
        for i in range(total):
            ahead.append(i + 1 - store.stats.requests["upload_part"])
            yield blob(MIN_PART_SIZE, seed=i)

    await store.put("bounded", PartSource(0, produce(), lambda: b""))
    assert max(ahead) <= 3, ahead
    assert (await store.head("bounded")).size == total * MIN_PART_SIZE


# -- conditional puts -------------------------------------------------------------------------


async def test_conditional_puts(store: ObjectStore) -> None:
    created = await store.put("c", b"v1", if_none_match=True)
    with pytest.raises(PreconditionFailedError):
        await store.put("c", b"v2", if_none_match=True)
    updated = await store.put("c", b"v2", if_match=created.etag)
    with pytest.raises(PreconditionFailedError):
        await store.put("c", b"v3", if_match=created.etag)  # stale
    assert await store.get("c") == b"v2"
    quoted = await store.put("c", b"v3", if_match=f'"{updated.etag}"')  # quotes are fine
    assert quoted.etag != updated.etag
    with pytest.raises(NoSuchObjectError):
        await store.put("missing", b"x", if_match=created.etag)
    with pytest.raises(NoSuchObjectError):
        await store.head("missing")


async def test_conditional_multipart_puts(store: ObjectStore) -> None:
    store.part_size = MIN_PART_SIZE
    data = blob(MIN_PART_SIZE + 10)
    first = await store.put("m", data, if_none_match=True)
    before = store.stats.copy()
    with pytest.raises(PreconditionFailedError):
        await store.put("m", io.BytesIO(data), if_none_match=True)
    with pytest.raises(PreconditionFailedError):
        await store.put("m", io.BytesIO(data), if_match="0" * 32)
    if is_s3(store):  # the condition was checked before any part was sent
        assert store.stats.bytes_sent == before.bytes_sent
    second = await store.put("m", io.BytesIO(data[::-1]), if_match=first.etag)
    assert await store.get("m") == data[::-1]
    assert second.etag == (await store.head("m")).etag


async def test_concurrent_conditional_creates(store_factory: Callable[..., ObjectStore]) -> None:
    clients = [store_factory() for _ in range(3)]
    winners: list[int] = []

    async def race(i: int) -> None:
        try:
            await clients[i % 3].put("race", f"writer {i}".encode(), if_none_match=True)
            winners.append(i)
        except PreconditionFailedError:
            pass

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(race, i)
    assert len(winners) == 1
    assert await clients[0].get("race") == f"writer {winners[0]}".encode()


def test_local_conditional_put_across_processes(tmp_path: Path) -> None:
    # flock makes the check-and-rename atomic between processes too: of several processes that
    # all wait at a barrier and then create the same key with If-None-Match, exactly one wins.
    root = tmp_path / "store"
    root.mkdir()
    script = textwrap.dedent(
        """
        import sys, trio
        from cssfs.errors import PreconditionFailedError
        from cssfs.store.local import LocalStore
        async def main():
            store = LocalStore(sys.argv[1])
            sys.stdin.readline()  # the barrier
            try:
                await store.put("k", sys.argv[2].encode(), if_none_match=True)
                print("won")
            except PreconditionFailedError:
                print("lost")
        trio.run(main)
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(root), f"p{i}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for i in range(4)
    ]
    outs = [p.communicate("go\n", timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(outs) == ["lost", "lost", "lost", "won"]
    winner = outs.index("won")
    assert (root / "k").read_bytes() == f"p{winner}".encode()


# -- copy, replace_head, delete ---------------------------------------------------------------


async def test_copy(store: ObjectStore) -> None:
    data = blob(3000)
    src = await store.put("src", data)
    await store.put("dst", b"old")
    info = await store.copy("src", "dst")
    assert (info.key, info.size) == ("dst", 3000)
    assert info.etag == (await store.head("dst")).etag
    assert await store.get("dst") == data
    assert (await store.head("src")).etag == src.etag  # the source is untouched
    await store.copy("src", "deep/er/copy")
    assert await store.get("deep/er/copy") == data


async def test_replace_head_small(store: ObjectStore) -> None:
    data = blob(1000)
    old = await store.put("h", data)
    new = await store.replace_head("h", b"NEW-HEAD", 10, if_match=old.etag)
    assert await store.get("h") == b"NEW-HEAD" + data[10:]
    assert new.size == 998 and new.etag == (await store.head("h")).etag
    with pytest.raises(PreconditionFailedError):
        await store.replace_head("h", b"X", 1, if_match=old.etag)  # stale
    assert await store.get("h") == b"NEW-HEAD" + data[10:]
    await store.replace_head("h", b"", 8)  # without if_match: the current version
    assert await store.get("h") == data[10:]
    with pytest.raises(ValueError):
        await store.replace_head("h", b"x", 5000)


async def test_replace_head_large_copies_server_side(store: ObjectStore) -> None:
    store.part_size = MIN_PART_SIZE
    data = blob(2 * MIN_PART_SIZE + 4096)
    old = await store.put("big", data)
    before = store.stats.copy()
    head = b"H" * 4096
    new = await store.replace_head("big", head, 4096, if_match=old.etag)
    assert new.size == len(data)
    assert await store.get("big") == head + data[4096:]
    assert (await store.head("big")).etag == new.etag
    sent = store.stats.bytes_sent - before.bytes_sent
    if is_s3(store):  # part 1 (head + bytes up to 5 MiB) goes up; the rest is copied
        assert sent == MIN_PART_SIZE
        assert store.stats.requests["upload_part_copy"] - before.requests["upload_part_copy"] == 1
    elif isinstance(store, LocalStore):  # the rest is copied inside the file system
        assert sent == 4096
    with pytest.raises(PreconditionFailedError):
        await store.replace_head("big", head, 4096, if_match=old.etag)


async def test_delete_in_batches(store: ObjectStore) -> None:
    await _fill(store, ["x/1", "x/2", "y"])
    keys = [f"missing/{i}" for i in range(2400)] + ["x/1", "y", "x/1"]
    before = store.stats.requests["delete"]
    await store.delete(keys)
    assert store.stats.requests["delete"] - before == 3  # 2402 distinct keys, 1000 per request
    assert [o.key for o in (await store.list()).objects] == ["x/2"]
    await store.delete([])
    assert store.stats.requests["delete"] - before == 3


# -- errors and counters ----------------------------------------------------------------------


async def test_missing_bucket(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store: ObjectStore
    if store_kind == "memory":
        bucket = MemoryBucket()
        bucket.drop()
        store = MemoryStore(bucket=bucket)
    elif store_kind == "local":
        store = LocalStore(tmp_path / "no-such-folder")
    else:
        endpoint = request.getfixturevalue("s3_server").endpoint_url
        store = open_store("s3://t-no-such-bucket/p", endpoint_url=endpoint, path_style=True)
    async with store:
        ops: list[Callable[[], Any]] = [
            lambda: store.head("k"),
            lambda: store.get("k"),
            lambda: store.get("k", 1, 2),
            lambda: store.list(),
            lambda: store.put("k", b"x"),
            lambda: store.copy("k", "l"),
        ]
        for op in ops:
            with pytest.raises(NoSuchBucketError):
                await op()
        if store_kind == "s3":
            assert store.stats.retries == 0


async def test_stats_count_requests_and_bytes(store: ObjectStore) -> None:
    store.stats.reset()
    await store.put("s", b"x" * 100)
    await store.get("s", 10, 20)
    await store.head("s")
    await store.list()
    await store.delete(["s"])
    assert dict(store.stats.requests) == {"put": 1, "get": 1, "head": 1, "list": 1, "delete": 1}
    assert (store.stats.bytes_sent, store.stats.bytes_received, store.stats.retries) == (100, 10, 0)
    assert store.stats.total_requests == 5
    snapshot = store.stats.copy()
    store.stats.reset()
    assert snapshot.total_requests == 5 and store.stats.total_requests == 0


# -- LocalStore specifics ---------------------------------------------------------------------


def _tmp_files(request: pytest.FixtureRequest) -> list[str]:
    root = request.getfixturevalue("_store_target")
    tmp = Path(root) / TMP_DIR
    return sorted(p.name for p in tmp.iterdir() if p.name != "lock") if tmp.exists() else []


def _pending_uploads(request: pytest.FixtureRequest) -> list[Any]:
    admin = request.getfixturevalue("_s3_admin")
    bucket = request.getfixturevalue("s3_bucket").bucket
    return list(admin.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


async def test_local_layout(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    async with LocalStore(root) as store:
        await store.put("a/b/c", b"abc")
        await store.put("d/", b"marker")
        assert (root / "a" / "b" / "c").read_bytes() == b"abc"
        assert (root / "d" / ".cssfs-dirobj").read_bytes() == b"marker"
        assert (root / TMP_DIR / "lock").exists()
        assert [o.key for o in (await store.list()).objects] == ["a/b/c", "d/"]
        assert (await store.list("", "/")).prefixes == ["a/", "d/"]
        # a failed conditional put leaves no temp file behind
        with pytest.raises(PreconditionFailedError):
            await store.put("a/b/c", b"x", if_none_match=True)
        assert [p.name for p in (root / TMP_DIR).iterdir()] == ["lock"]
        # files made by hand are objects; empty folders and symlinks are not
        (root / "hand").write_bytes(b"by hand")
        (root / "empty" / "dir").mkdir(parents=True)
        (root / "link").symlink_to(root / "hand")
        listing = await store.list("", "/")
        assert [o.key for o in listing.objects] == ["hand"]
        assert listing.prefixes == ["a/", "d/"]
        # a delete removes the folders it empties
        await store.delete(["a/b/c"])
        assert not (root / "a").exists()


@pytest.mark.parametrize(
    "key",
    ["a//b", "a/../b", "./a", "a/.", ".cssfs-tmp/x", "x/.cssfs-dirobj", "n\0ul", "x" * 256, "/abs"],
)
async def test_local_refuses_keys_that_are_not_paths(tmp_path: Path, key: str) -> None:
    async with LocalStore(tmp_path) as store:
        with pytest.raises(StoreError, match="cannot be stored in a folder"):
            await store.put(key, b"x")
        await store.delete([key])  # cannot exist, so deleting it is fine


async def test_local_object_below_object(tmp_path: Path) -> None:
    async with LocalStore(tmp_path) as store:
        await store.put("a", b"file")
        with pytest.raises(StoreError, match="'a' is an object"):
            await store.put("a/b", b"below")
        await store.put("x/y", b"inner")
        with pytest.raises(StoreError, match="folder"):
            await store.put("x", b"over a folder")
        assert await store.get("a") == b"file"
        with pytest.raises(NoSuchObjectError):
            await store.head("a/b")
        with pytest.raises(NoSuchObjectError):
            await store.head("x")


async def test_local_etag_rule(tmp_path: Path) -> None:
    async with LocalStore(tmp_path) as store:
        one = await store.put("k", b"same")
        assert (await store.head("k")).etag == one.etag == (await store.list()).objects[0].etag
        two = await store.put("k", b"same")
        assert two.etag != one.etag  # a new file, a new ETag, even with equal content
        os.utime(tmp_path / "k", ns=(1, 1))  # touched from outside: treated as changed
        assert (await store.head("k")).etag != two.etag
        with pytest.raises(PreconditionFailedError):
            await store.put("k", b"x", if_match=two.etag)


async def test_local_fsync_off_and_stale_temp_cleanup(tmp_path: Path) -> None:
    (tmp_path / TMP_DIR).mkdir()
    stale = tmp_path / TMP_DIR / "0123.tmp"
    stale.write_bytes(b"left by a crash")
    os.utime(stale, (0, 0))
    fresh = tmp_path / TMP_DIR / "4567.tmp"
    fresh.write_bytes(b"another writer's, in progress")
    async with LocalStore(tmp_path, fsync=False) as store:
        await store.put("k", b"v")
        assert await store.get("k") == b"v"
    assert not stale.exists() and fresh.exists()


# -- URLs -------------------------------------------------------------------------------------


def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cssfs.store.s3 import S3Store

    cases: list[tuple[str, type, str, str]] = [
        ("s3://bucket", S3Store, "s3://bucket", ""),
        ("s3://bucket/", S3Store, "s3://bucket", ""),
        ("s3://bucket/some/prefix", S3Store, "s3://bucket/some/prefix", "some/prefix/"),
        ("my-bucket.1", S3Store, "s3://my-bucket.1", ""),
        (f"file://{tmp_path}", LocalStore, tmp_path.as_uri(), ""),
        (str(tmp_path), LocalStore, tmp_path.as_uri(), ""),
        ("memory://", MemoryStore, "memory://", ""),
        ("memory://shared/p", MemoryStore, "memory://shared/p", "p/"),
    ]
    for url, cls, shown, prefix in cases:
        store = open_store(url)
        assert isinstance(store, cls), url
        assert (store.url, store.prefix) == (shown, prefix), url
    monkeypatch.chdir(tmp_path)
    local = open_store("./sub")
    assert isinstance(local, LocalStore) and local.root == str(tmp_path / "sub")
    s3 = open_store("s3://bkt/p", endpoint_url="http://127.0.0.1:9", region="eu-west-1")
    assert isinstance(s3, S3Store) and s3.endpoint_url == "http://127.0.0.1:9"
    assert open_store("memory://shared").bucket is open_store("memory://shared/x").bucket  # type: ignore[attr-defined]

    bad = [
        "",
        "   ",
        "gs://bucket",
        "http://example.com/bucket",
        "bucket/prefix",  # ambiguous: s3://bucket/prefix or ./bucket/prefix?
        "s3://",
        "s3://bad bucket",
        "s3://bkt//p",
        "file://host/path",
        "file:relative",
        "x",
    ]
    for url in bad:
        with pytest.raises(ConfigError):
            open_store(url)
    with pytest.raises(ConfigError, match="only apply to s3"):
        open_store(str(tmp_path), endpoint_url="http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="do not apply"):
        open_store("memory://", concurrency=3)
    with pytest.raises(ConfigError, match="profile"):
        open_store("s3://bkt", profile="no-such-profile-cssfs")
    with pytest.raises(ConfigError, match="minimum"):
        open_store("s3://bkt", part_size=1024)


@pytest.mark.s3
async def test_s3_endpoint_from_environment(
    s3_bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # boto3 reads AWS_ENDPOINT_URL_S3 itself; with default addressing it reaches 127.0.0.1.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_bucket.endpoint)
    async with open_store(s3_bucket.bucket) as store:
        assert store.endpoint_url == s3_bucket.endpoint  # type: ignore[attr-defined]
        await store.put("env", b"ok")
        assert await store.get("env") == b"ok"
