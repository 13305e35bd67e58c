"""The bulk transfer paths of `cssfs put` / `cssfs get`, over every store.

store.get_into (a ranged read into a buffer the caller reuses), EncryptedStore.get_to into a
regular file (segments decrypted and written at their offsets by worker threads, in any order)
against get_to into a stream (written in order), and put from a file whose sealer refills one
buffer while the S3 store refills its part buffers.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from cssfs import encstore
from cssfs.cache import ChunkCache
from cssfs.encstore import EncryptedStore
from cssfs.envelope import CHUNK_SIZE, chunk_range, envelope_size
from cssfs.errors import ChunkAuthError, NoSuchObjectError
from cssfs.keys import Identity
from cssfs.store.base import MIN_PART_SIZE, ObjectStore
from tests.test_encstore import pattern, tamper_logged

CS = CHUNK_SIZE


@pytest.fixture(scope="module")
def me() -> Identity:
    return Identity.generate()


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many segments of a few chunks each, three in flight: completion order varies.
    monkeypatch.setattr(encstore, "GET_TO_FILE_SEGMENT_CHUNKS", 3)
    monkeypatch.setattr(encstore, "GET_TO_WRITE_CHUNKS", 2)
    monkeypatch.setattr(encstore, "GET_TO_SEGMENT_CHUNKS", 3)


async def test_get_into(store: ObjectStore) -> None:
    data = pattern(3 * CS + 5)
    await store.put("obj", data)
    buf = bytearray(CS + 9)
    for start in (0, 1, CS - 3, 2 * CS + 1, len(data) - 4, len(data), len(data) + 10):
        with memoryview(buf) as view:
            n = await store.get_into("obj", start, view)
        want = data[start : start + len(buf)]
        assert n == len(want)
        assert buf[:n] == want
    with memoryview(buf) as view, view[:0] as empty:
        assert await store.get_into("obj", 5, empty) == 0
    with memoryview(buf) as view, pytest.raises(NoSuchObjectError):
        await store.get_into("missing", 0, view)


@pytest.mark.usefixtures("small_segments")
@pytest.mark.parametrize("size", [0, 1, CS, 3 * CS, 3 * CS + 1, 10 * CS + 77])
async def test_get_to_a_file_at_its_position(
    store: ObjectStore, me: Identity, tmp_path: Path, size: int
) -> None:
    es = EncryptedStore(store, me, cache=ChunkCache(0))
    data = pattern(size, size)
    await es.put("f", data)
    path = tmp_path / "out"
    with open(path, "w+b") as f:  # noqa: ASYNC230 -- a local file, as cssfs get uses
        f.write(b"prefix")  # the plaintext goes where the file was, as a stream write would
        info = await es.get_to("f", f)
        assert f.tell() == 6 + size
        f.write(b"!")  # the file object is usable afterwards, at the end
    assert info.plain_size == size
    assert path.read_bytes() == b"prefix" + data + b"!"


@pytest.mark.usefixtures("small_segments")
async def test_get_to_streams_and_appending_files_in_order(
    store: ObjectStore, me: Identity, tmp_path: Path
) -> None:
    es = EncryptedStore(store, me, cache=ChunkCache(0))
    data = pattern(10 * CS + 77, 3)
    await es.put("f", data)
    out = io.BytesIO()
    await es.get_to("f", out)
    assert out.getvalue() == data
    path = tmp_path / "log"
    path.write_bytes(b"head")
    with open(path, "ab") as f:  # noqa: ASYNC230 -- O_APPEND: positional writes go to the end
        await es.get_to("f", f)
    assert path.read_bytes() == b"head" + data


@tamper_logged
@pytest.mark.usefixtures("small_segments")
@pytest.mark.parametrize("bad", [0, 4, 10])
async def test_get_to_a_file_writes_only_verified_chunks(
    store: ObjectStore, me: Identity, tmp_path: Path, bad: int
) -> None:
    es = EncryptedStore(store, me, cache=ChunkCache(0))
    size = 10 * CS + 77
    data = pattern(size, 4)
    await es.put("f", data)
    blob = bytearray(await store.get("f"))
    off, length = chunk_range(bad, size)
    blob[off + length // 2] ^= 1
    await store.put("f", bytes(blob))
    path = tmp_path / "out"
    with open(path, "w+b") as f, pytest.raises(ChunkAuthError) as info:  # noqa: ASYNC230
        await es.get_to("f", f)
    assert info.value.index == bad
    # Other segments may have landed (in any order) but every byte written is plaintext that
    # verified, at its place; the bad chunk's bytes were never written.
    got = path.read_bytes()
    for i in range(11):
        start = i * CS
        piece = got[start : start + CS]
        if i == bad:
            assert piece.strip(b"\0") == b""
        elif piece:
            assert piece in (data[start : start + CS], bytes(len(piece)))


async def test_put_from_a_file_round_trips_over_parts(
    store: ObjectStore, me: Identity, tmp_path: Path
) -> None:
    store.part_size = MIN_PART_SIZE
    es = EncryptedStore(store, me, cache=ChunkCache(0))
    data = os.urandom(2 * MIN_PART_SIZE + 3 * CS + 11)  # three parts, the last one short
    src = tmp_path / "src"
    src.write_bytes(data)
    with open(src, "rb") as f:  # noqa: ASYNC230
        info = await es.put("big", f)
    assert info.size == envelope_size(len(data))
    dst = tmp_path / "dst"
    with open(dst, "wb") as f:  # noqa: ASYNC230
        await es.get_to("big", f)
    assert dst.read_bytes() == data
