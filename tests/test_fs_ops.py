"""Operations in-process (S3QL's t3_fs_api): the file system without a kernel.

pytest-trio drives the request handlers directly over a MemoryStore and a LocalStore, with the
real EncryptedStore, staging and journal. ``readdir_reply`` is the one pyfuse3 function that
needs a kernel buffer; it is replaced by a collector.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing
from pyfuse3 import FUSEError

from cssfs import fs as fsmod
from cssfs.cache import ChunkCache
from cssfs.encstore import WHOLE_OBJECT_BYTES, EncryptedStore
from cssfs.envelope import CHUNK_SIZE as CS
from cssfs.folderattrs import FolderAttrs
from cssfs.fs import Operations
from cssfs.inodes import ROOT_INODE
from cssfs.journal import DEFAULT_SETTLE_S, Journal
from cssfs.keys import Identity
from cssfs.staging import StagedFile, StagingBudget
from cssfs.store.local import LocalStore
from cssfs.store.memory import MemoryStore

CANARY = b"CANARY-fs-ops-plaintext-5b1e"
CTX: Any = None


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 253 for i in range(n))


class FS:
    """Operations plus path-based helpers, the way the kernel would call them."""

    def __init__(self, ops: Operations, store: Any, journal: Any) -> None:
        self.ops = ops
        self.store = store
        self.journal = journal

    async def sync(self) -> None:
        """What ``cssfs sync`` does: uploads, then the folders' attrs records."""
        await self.journal.flush()
        assert self.ops.folder_attrs is not None
        await self.ops.folder_attrs.flush()

    async def inode(self, path: str) -> int:
        inode = ROOT_INODE
        for part in filter(None, path.split("/")):
            entry = await self.ops.lookup(inode, part.encode(), CTX)
            if entry.st_ino == 0:
                raise FUSEError(errno.ENOENT)
            inode = entry.st_ino
        return inode

    async def parent(self, path: str) -> tuple[int, bytes]:
        head, _, name = path.rpartition("/")
        return await self.inode(head), name.encode()

    async def stat(self, path: str) -> pyfuse3.EntryAttributes:
        return await self.ops.getattr(await self.inode(path), CTX)

    async def exists(self, path: str) -> bool:
        try:
            await self.inode(path)
        except FUSEError as exc:
            assert exc.errno == errno.ENOENT
            return False
        return True

    async def create(self, path: str, mode: int = 0o644) -> int:
        parent, name = await self.parent(path)
        info, _ = await self.ops.create(parent, name, mode, os.O_WRONLY, CTX)
        return info.fh

    async def open(self, path: str, flags: int = os.O_RDONLY) -> int:
        return (await self.ops.open(await self.inode(path), flags, CTX)).fh

    async def close(self, fh: int) -> None:
        await self.ops.flush(fh)
        await self.ops.release(fh)

    async def write_file(self, path: str, data: bytes, *, step: int = 128 * 1024) -> None:
        fh = await self.create(path)
        for off in range(0, len(data), step):
            assert await self.ops.write(fh, off, data[off : off + step]) == len(
                data[off : off + step])
        await self.close(fh)

    async def read_file(self, path: str, *, step: int = 128 * 1024) -> bytes:
        fh = await self.open(path)
        out = bytearray()
        try:
            while True:
                data = await self.ops.read(fh, len(out), step)
                if not data:
                    break
                out += data
        finally:
            await self.ops.release(fh)
        return bytes(out)

    async def mkdir(self, path: str) -> None:
        parent, name = await self.parent(path)
        await self.ops.mkdir(parent, name, 0o755, CTX)

    async def rmdir(self, path: str) -> None:
        parent, name = await self.parent(path)
        await self.ops.rmdir(parent, name, CTX)

    async def unlink(self, path: str) -> None:
        parent, name = await self.parent(path)
        await self.ops.unlink(parent, name, CTX)

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        p_old, n_old = await self.parent(old)
        p_new, n_new = await self.parent(new)
        await self.ops.rename(p_old, n_old, p_new, n_new, flags, CTX)

    async def listdir(self, path: str) -> dict[str, pyfuse3.EntryAttributes]:
        fh = await self.ops.opendir(await self.inode(path), CTX)
        out: dict[str, pyfuse3.EntryAttributes] = {}
        try:
            start = 0
            while True:
                token = _Token(capacity=3)
                await self.ops.readdir(fh, start, token)  # type: ignore[arg-type]
                if not token.entries:
                    break
                for name, attr, next_id in token.entries:
                    if name not in (b".", b".."):
                        out[name.decode()] = attr
                    start = next_id
        finally:
            await self.ops.releasedir(fh)
        return out

    async def setattr(self, path: str, fh: int | None = None, **changes: int) -> Any:
        attr = pyfuse3.EntryAttributes()
        fields = SimpleNamespace(update_atime=False, update_mtime=False, update_ctime=False,
                                 update_mode=False, update_uid=False, update_gid=False,
                                 update_size=False)
        if "size" in changes:
            attr.st_size = changes["size"]
            fields.update_size = True
        if "mtime_ns" in changes:
            attr.st_mtime_ns = changes["mtime_ns"]
            fields.update_mtime = True
        if "mode" in changes:
            attr.st_mode = stat.S_IFREG | changes["mode"]
            fields.update_mode = True
        return await self.ops.setattr(await self.inode(path), attr, fields, fh, CTX)

    async def getxattr(self, path: str, name: str) -> bytes:
        return await self.ops.getxattr(await self.inode(path), name.encode(), CTX)

    def objects(self) -> dict[str, bytes]:
        """Every object in the store (raw), for plaintext checks."""
        return dict(_raw_objects(self.store))


def _raw_objects(store: Any) -> list[tuple[str, bytes]]:
    if isinstance(store, MemoryStore):
        return [(k, o.data) for k, o in store.bucket.objects.items()]
    out = []
    for root, _, files in os.walk(store.root):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out.append((path, f.read()))
    return out


class _Token:
    """Stands in for pyfuse3's ReaddirToken: room for ``capacity`` entries per call."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: list[tuple[bytes, pyfuse3.EntryAttributes, int]] = []


def _readdir_reply(token: _Token, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int
                   ) -> bool:
    if len(token.entries) >= token.capacity:
        return False
    token.entries.append((name, attr, next_id))
    return True


# "racing": uploads start the moment a file is committed (no settle delay), so they land while
# the next operation on the same file runs; the others keep the default delay, so the pending
# (journal) paths are taken.
@pytest.fixture(params=["memory", "memory-racing", "local"])
async def env(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fsmod.pyfuse3, "readdir_reply", _readdir_reply)
    settle_s = 0.0 if request.param.endswith("racing") else DEFAULT_SETTLE_S
    if request.param.startswith("memory"):
        store: Any = MemoryStore()
    else:
        (tmp_path / "bucket").mkdir()
        store = LocalStore(tmp_path / "bucket", fsync=False)
    identity = Identity.generate()
    state = tmp_path / "state"
    state.mkdir()
    async with trio.open_nursery() as nursery:
        encstore = EncryptedStore(store, identity, cache=ChunkCache(8 * 1024 * 1024),
                                  nursery=nursery)
        journal = Journal(state, encstore, settle_s=settle_s)
        await journal.replay()
        nursery.start_soon(journal.run)
        budget = StagingBudget(state, max_bytes=4 * CS)

        async def new_staged(base: Any) -> Any:
            return StagedFile(budget, base)

        folder_attrs = FolderAttrs(store, identity, delay_s=0.05)
        nursery.start_soon(folder_attrs.run)
        ops = Operations(encstore, journal, new_staged, list_ttl=2.0, folder_attrs=folder_attrs,
                         nursery=nursery, strict=True)
        yield FS(ops, store, journal)
        await journal.flush()
        nursery.cancel_scope.cancel()


# -- files ----------------------------------------------------------------------------------------

SIZES = [0, 1, CS - 1, CS, CS + 1, 3 * CS + 17]


@pytest.mark.parametrize("size", SIZES)
async def test_write_read_round_trip(env: FS, size: int) -> None:
    data = pattern(size, size)
    await env.write_file("f", data, step=4096 + 3)
    assert (await env.stat("f")).st_size == size
    assert await env.read_file("f") == data
    await env.journal.flush()
    assert await env.read_file("f") == data  # now from the store
    assert (await env.stat("f")).st_size == size


async def test_only_ciphertext_in_the_store(env: FS) -> None:
    await env.write_file("secret.txt", CANARY * 1000)
    await env.journal.flush()
    objects = env.objects()
    assert objects
    assert not any(CANARY in data or CANARY[:16] in data for data in objects.values())


async def test_lookup_missing_is_negative_entry(env: FS) -> None:
    entry = await env.ops.lookup(ROOT_INODE, b"nope", CTX)
    assert entry.st_ino == 0


async def test_mode_and_mtime_survive_upload(env: FS) -> None:
    fh = await env.create("m", mode=0o600)
    await env.ops.write(fh, 0, b"abc")
    await env.close(fh)
    await env.setattr("m", mtime_ns=1_234_567_890_123_456_789)
    await env.journal.flush()
    env.ops.listings.invalidate("")
    st = await env.stat("m")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_mtime_ns == 1_234_567_890_123_456_789
    await env.setattr("m", mode=0o640, mtime_ns=42_000_000_000)
    await env.journal.flush()
    env.ops.listings.invalidate("")
    st = await env.stat("m")
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == 42_000_000_000
    assert await env.read_file("m") == b"abc"


async def test_times_of_a_stored_file_then_read_and_rewrite(env: FS) -> None:
    data = pattern(5000)
    await env.write_file("s", data)
    await env.journal.flush()
    await env.setattr("s", mtime_ns=7_000_000_000)  # not pending: the stored header is resealed
    assert (await env.stat("s")).st_mtime_ns == 7_000_000_000
    assert await env.read_file("s") == data
    fh = await env.open("s", os.O_RDWR)
    await env.setattr("s", fh=fh, mtime_ns=8_000_000_000)  # open but clean: resealed too
    await env.ops.write(fh, 0, b"Z")
    await env.close(fh)
    await env.journal.flush()  # replaces the resealed version: no conflict copy
    env.ops.listings.invalidate("")
    assert sorted(await env.listdir("")) == ["s"]
    assert await env.read_file("s") == b"Z" + data[1:]


async def test_create_over_a_name_the_kernel_did_not_know(env: FS) -> None:
    await env.write_file("c", b"0123456789")
    await env.journal.flush()
    parent, name = await env.parent("c")
    with pytest.raises(FUSEError) as err:
        await env.ops.create(parent, name, 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, CTX)
    assert err.value.errno == errno.EEXIST
    info, _ = await env.ops.create(parent, name, 0o644, os.O_WRONLY | os.O_CREAT, CTX)
    await env.ops.write(info.fh, 0, b"ab")  # O_CREAT alone opens it: the rest stays
    await env.close(info.fh)
    assert await env.read_file("c") == b"ab23456789"
    info, _ = await env.ops.create(parent, name, 0o644, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                   CTX)
    await env.close(info.fh)
    assert await env.read_file("c") == b""


async def test_overwrite_partially(env: FS) -> None:
    data = pattern(3 * CS + 5)
    await env.write_file("p", data)
    await env.journal.flush()
    fh = await env.open("p", os.O_RDWR)
    await env.ops.write(fh, CS + 10, b"XYZ")
    assert await env.ops.read(fh, CS + 8, 6) == data[CS + 8 : CS + 10] + b"XYZ" + data[
        CS + 13 : CS + 14]
    await env.close(fh)
    expect = data[: CS + 10] + b"XYZ" + data[CS + 13 :]
    assert await env.read_file("p") == expect
    await env.journal.flush()
    assert await env.read_file("p") == expect


async def test_append(env: FS) -> None:
    await env.write_file("a", b"hello ")
    fh = await env.open("a", os.O_WRONLY | os.O_APPEND)
    size = (await env.stat("a")).st_size
    await env.ops.write(fh, size, b"world")
    await env.close(fh)
    assert await env.read_file("a") == b"hello world"


async def test_truncate_paths(env: FS) -> None:
    data = pattern(2 * CS + 100)
    await env.write_file("t", data)
    await env.journal.flush()
    # truncate(path): no open handle
    await env.setattr("t", size=CS + 1)
    assert (await env.stat("t")).st_size == CS + 1
    assert await env.read_file("t") == data[: CS + 1]
    # O_TRUNC: open, then setattr(size=0) with the handle
    fh = await env.open("t", os.O_WRONLY)
    await env.setattr("t", fh=fh, size=0)
    await env.ops.write(fh, 0, b"new")
    await env.close(fh)
    assert await env.read_file("t") == b"new"
    # O_TRUNC passed to open (libfuse's atomic_o_trunc): the old contents are never read
    fh = await env.open("t", os.O_WRONLY | os.O_TRUNC)
    await env.ops.write(fh, 0, b"new")
    await env.close(fh)
    assert await env.read_file("t") == b"new"
    # ftruncate to grow: zeros
    fh = await env.open("t", os.O_RDWR)
    await env.setattr("t", fh=fh, size=10)
    await env.close(fh)
    assert await env.read_file("t") == b"new" + bytes(7)
    await env.journal.flush()
    assert await env.read_file("t") == b"new" + bytes(7)


async def test_two_readers_and_a_writer(env: FS) -> None:
    data = pattern(5 * CS)
    await env.write_file("r", data)
    await env.journal.flush()
    a = await env.open("r")
    b = await env.open("r")
    got: dict[str, bytes] = {}

    async def read_all(name: str, fh: int) -> None:
        out = bytearray()
        while chunk := await env.ops.read(fh, len(out), 10000):
            out += chunk
        got[name] = bytes(out)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, "a", a)
        nursery.start_soon(read_all, "b", b)
    assert got == {"a": data, "b": data}
    await env.ops.release(a)
    await env.ops.release(b)


async def test_unlink_open_file_lives_until_release(env: FS) -> None:
    await env.write_file("u", b"still here")
    fh = await env.open("u")
    writer = await env.open("u", os.O_RDWR)
    await env.unlink("u")
    assert not await env.exists("u")
    await env.ops.write(writer, 0, b"STILL")
    assert await env.ops.read(fh, 0, 100) == b"STILL here"
    await env.close(writer)
    await env.ops.release(fh)
    await env.journal.flush()
    env.ops.listings.invalidate("")
    assert not await env.exists("u")
    assert not env.objects() or all("u" not in k.rsplit("/", 1)[-1] for k in env.objects())


async def test_unlink_missing(env: FS) -> None:
    with pytest.raises(FUSEError) as err:
        await env.ops.unlink(ROOT_INODE, b"missing", CTX)
    assert err.value.errno == errno.ENOENT


# -- folders --------------------------------------------------------------------------------------


async def test_reading_a_folder_in_order_opens_the_next_files_ahead(env: FS) -> None:
    es = env.ops.encstore
    es.whole_object_bytes = WHOLE_OBJECT_BYTES
    fetched: list[str] = []
    get = env.store.get

    async def counting_get(key: str, start: int = 0, end: int | None = None) -> bytes:
        fetched.append(key)
        return await get(key, start, end)

    await env.mkdir("many")
    files = {f"many/f{i:03d}": pattern(100 + i, i) for i in range(20)}
    for path, data in files.items():
        await env.write_file(path, data)
    await env.journal.flush()
    env.ops.listings.invalidate("many")  # cold, as after a remount
    assert len(await env.listdir("many")) == 20
    env.store.get = counting_get
    names = sorted(files)
    async def settled() -> None:  # the opens ahead have finished (their GETs may be threads)
        while es._open_flights:
            await next(iter(es._open_flights.values())).wait()

    for path in names[:2]:  # two in listing order: a scan
        assert await env.read_file(path) == files[path]
    await settled()
    ahead = names[2 : 2 + fsmod.FOLDER_READAHEAD_FILES]
    assert sorted(k for k, _ in es._opened._d) == names[: 2 + len(ahead)]  # opened ahead
    for path in names[2:]:
        assert await env.read_file(path) == files[path]
        await settled()
    assert sorted(fetched) == names  # each one GET, however it was opened
    # Out of order: no read-ahead, nothing wrong.
    es.forget(names[5])
    assert await env.read_file(names[5]) == files[names[5]]
    assert await env.read_file(names[0]) == files[names[0]]


async def test_opening_a_folders_first_file_opens_a_few_ahead(env: FS) -> None:
    es = env.ops.encstore
    es.whole_object_bytes = WHOLE_OBJECT_BYTES
    await env.mkdir("w")
    await env.mkdir("w/a-sub")  # sorts before the files: the first *file* starts a walk
    files = {f"w/f{i}": pattern(50 + i, i) for i in range(6)}
    for path, data in files.items():
        await env.write_file(path, data)
    await env.journal.flush()
    names = sorted(files)

    async def cold_open_of(path: str) -> list[str]:
        """Read ``path`` on a cold folder; the files opened ahead meanwhile."""
        env.ops.listings.invalidate("w")
        env.ops._scans.clear()
        for name in names:
            es.forget(name)
        assert await env.read_file(path) == files[path]
        while es._open_flights:
            await next(iter(es._open_flights.values())).wait()
        return sorted(k for k, _ in es._opened._d if k != path)

    first = fsmod.FOLDER_READAHEAD_FIRST
    assert await cold_open_of(names[0]) == names[1 : 1 + first]
    assert await cold_open_of(names[3]) == []  # not where a walk starts: a lone open


async def test_ls_l_then_read_small_files_costs_one_get_each(env: FS) -> None:
    es = env.ops.encstore
    es.whole_object_bytes = WHOLE_OBJECT_BYTES
    await env.mkdir("d")
    files = {f"d/s{i}": pattern(10 * i + 1, i) for i in range(5)}
    files["d/big"] = pattern(3 * CS, 9)  # more than one chunk: only its header is read
    for path, data in files.items():
        await env.write_file(path, data)
    await env.sync()
    await env.store.delete(["d/.cssfs-attrs"])  # no folder record: the headers must tell
    # Cold, as after a remount: no listing, no header facts, nothing opened or cached.
    env.ops.listings.invalidate("d")
    env.ops._meta.clear()
    for path in files:
        es.forget(path)
    gets = env.store.stats.requests["get"]
    for path, data in files.items():  # ls -l: the mtime of each comes from its header
        assert (await env.stat(path)).st_size == len(data)
    assert env.store.stats.requests["get"] - gets == len(files)
    gets = env.store.stats.requests["get"]
    for path in sorted(files):
        if path != "d/big":
            assert await env.read_file(path) == files[path]
    assert env.store.stats.requests["get"] == gets  # opened by ls -l already
    assert await env.read_file("d/big") == files["d/big"]


async def test_a_walk_lists_the_next_folders_ahead(env: FS) -> None:
    subs = [f"t/{c}" for c in "abcdefg"]
    await env.mkdir("t")
    for sub in subs:
        await env.mkdir(sub)
        await env.write_file(f"{sub}/f", b"x")
    await env.mkdir("t/a/x")
    await env.journal.flush()
    listings = env.ops.listings
    ahead = fsmod.FOLDER_LIST_AHEAD

    async def cold() -> None:
        """Nothing listed, nothing walked (LISTs still running ahead finish first; a task
        started to list ahead has set ``loading`` once every task waits)."""
        await trio.testing.wait_all_tasks_blocked()
        while loading := [f.loading for f in listings._folders.values() if f.loading is not None]:
            await loading[0].wait()
            await trio.testing.wait_all_tasks_blocked()
        listings.invalidate_below("t")
        env.ops._walked.clear()

    async def listed_ahead() -> set[str]:
        """The folders whose LIST has started (or finished) by the time every task waits."""
        await trio.testing.wait_all_tasks_blocked()
        folders = listings._folders
        return {p for p in folders if p.startswith("t/")
                and (folders[p].loading is not None or listings.cached(p) is not None)}

    await cold()
    await env.listdir("t")  # readdir: its first subfolders are listed ahead
    assert await listed_ahead() == set(subs[:ahead])
    await env.listdir("t/a")  # a walk: t/a's subfolder, and t's next subfolders after t/a
    assert await listed_ahead() == set(subs[: 1 + ahead]) | {"t/a/x"}
    lists = listings.lists
    for sub in subs[1 : 1 + ahead]:
        assert "f" in await env.listdir(sub)
    # Each listed ahead in turn, none twice: only those not listed yet cost a LIST.
    assert await listed_ahead() == set(subs) | {"t/a/x"}
    assert listings.lists == lists + len(subs) - (1 + ahead)
    await cold()
    await env.listdir("t/d")  # its parent not read: no walk, nothing listed ahead
    assert await listed_ahead() == {"t/d"}


async def test_a_walk_lists_first_subfolders_below_the_folders_ahead(env: FS) -> None:
    # t/a, t/b, t/c, each with a chain of first subfolders x/y/z, and a second subfolder zz.
    await env.mkdir("t")
    for top in "abc":
        path = f"t/{top}"
        await env.mkdir(path)
        await env.mkdir(f"{path}/zz")
        for part in "xyz":
            path += f"/{part}"
            await env.mkdir(path)
    await env.journal.flush()
    listings = env.ops.listings
    listings.invalidate_below("t")
    env.ops._walked.clear()

    async def listed() -> set[str]:
        """Folders listed (or being listed) once the LISTs started ahead have all finished."""
        while True:
            await trio.testing.wait_all_tasks_blocked()
            loading = [f.loading for f in listings._folders.values() if f.loading is not None]
            if not loading:
                break
            await loading[0].wait()
        return {p for p in listings._folders if p.startswith("t/")
                and listings.cached(p) is not None}

    await env.listdir("t")  # no walk yet: only the first subfolders themselves
    assert await listed() == {"t/a", "t/b", "t/c"}
    await env.listdir("t/a")  # a walk: below each folder ahead its first subfolders
    depth = fsmod.FOLDER_LIST_DEPTH
    assert depth == 2
    assert await listed() == {
        "t/a", "t/b", "t/c",
        "t/a/x", "t/a/x/y", "t/a/x/y/z", "t/a/zz",  # t/a's subfolders, and below the first
        "t/b/x", "t/b/x/y", "t/c/x", "t/c/x/y",  # t's next ones after t/a, and below them
    }


async def test_a_reading_walk_opens_the_first_files_of_the_folders_ahead(env: FS) -> None:
    es = env.ops.encstore
    es.whole_object_bytes = WHOLE_OBJECT_BYTES
    files: dict[str, bytes] = {}
    await env.mkdir("t")
    for top in "abcd":
        await env.mkdir(f"t/{top}")
        for i in range(6):
            files[f"t/{top}/f{i}"] = pattern(30 + i, ord(top) + i)
    for path, data in files.items():
        await env.write_file(path, data)
    await env.journal.flush()
    listings = env.ops.listings

    async def settled() -> set[str]:
        """What was opened (ahead or not) once the LISTs and opens ahead have finished."""
        while True:
            await trio.testing.wait_all_tasks_blocked()
            waits = [f.loading for f in listings._folders.values() if f.loading is not None]
            waits += list(es._open_flights.values())
            if not waits:
                break
            await waits[0].wait()
        return {k for k, _ in es._opened._d}

    async def cold() -> None:
        await settled()
        listings.invalidate_below("t")
        env.ops._walked.clear()
        env.ops._scans.clear()
        env.ops._reading_walk_until = 0.0
        for path in files:
            es.forget(path)

    # A walk that only lists (find, ls -R, du) opens nothing ahead.
    await cold()
    await env.listdir("t")
    for top in "abcd":
        await env.listdir(f"t/{top}")
    assert await settled() == set()
    # A walk that reads (diff -r, cp -r): once it has read a file, each folder it lists next
    # has its first files opened ahead, and each folder listed ahead its first file.
    await cold()
    await env.listdir("t")
    await env.listdir("t/a")
    assert await settled() == set()  # t's next folders listed ahead: no reading yet
    assert await env.read_file("t/a/f0") == files["t/a/f0"]
    first = fsmod.FOLDER_READAHEAD_FIRST
    assert await settled() == {f"t/a/f{i}" for i in range(1 + first)}  # the first-file rule
    await env.listdir("t/b")
    assert await settled() == {f"t/a/f{i}" for i in range(1 + first)} | {
        f"t/b/f{i}" for i in range(1 + first)} | {"t/c/f0", "t/d/f0"}
    gets = env.store.stats.requests["get"]
    for top in "bcd":  # the rest of the walk: every file read once, none fetched twice
        await env.listdir(f"t/{top}")
        for i in range(6):
            assert await env.read_file(f"t/{top}/f{i}") == files[f"t/{top}/f{i}"]
    await settled()
    assert env.store.stats.requests["get"] - gets == 3 * 6 - (1 + first) - 2


async def test_names_from_a_listing_are_cached_by_the_kernel_until_it_expires(env: FS) -> None:
    await env.write_file("stored", b"s")
    await env.journal.flush()
    fh = await env.create("open-here")
    listings = env.ops.listings
    listings.ttl = 30.0
    listings.invalidate("")
    listing = await env.listdir("")
    timeout = env.ops.attr_timeout
    # Listed: as long as the listing stays fresh (a lookup would answer the same until then).
    assert timeout < listing["stored"].entry_timeout <= 30.0
    assert listing["stored"].attr_timeout == listing["stored"].entry_timeout
    assert timeout < (await env.ops.lookup(ROOT_INODE, b"stored", CTX)).entry_timeout <= 30.0
    # Open here (not from the listing): the usual timeout.
    assert listing["open-here"].entry_timeout == timeout
    assert (await env.ops.lookup(ROOT_INODE, b"open-here", CTX)).entry_timeout == timeout
    await env.close(fh)
    listings.ttl = 0.5  # a listing about to expire: never less than the usual timeout
    assert (await env.ops.lookup(ROOT_INODE, b"stored", CTX)).entry_timeout == timeout


async def test_reading_a_stored_file_does_not_wait_for_the_journal(
    env: FS, monkeypatch: pytest.MonkeyPatch
) -> None:
    await env.write_file("stored", b"landed")
    await env.journal.flush()
    await env.write_file("pending", b"not yet")  # in the journal (the settle time holds it)
    calls: list[str] = []
    open_pending = env.journal.open_pending

    async def counting(key: str) -> Any:
        calls.append(key)
        return await open_pending(key)

    monkeypatch.setattr(env.journal, "open_pending", counting)
    assert await env.read_file("stored") == b"landed"
    assert calls == []  # nothing pending under that name: no trip through the journal's lock
    if env.journal.pending("pending") is not None:
        assert await env.read_file("pending") == b"not yet"
        assert calls == ["pending"]


async def test_mkdir_readdir_rmdir(env: FS) -> None:
    await env.mkdir("d")
    await env.mkdir("d/e")
    for i in range(7):
        await env.write_file(f"d/f{i}", pattern(i * 1000))
    listing = await env.listdir("d")
    assert sorted(listing) == ["e"] + [f"f{i}" for i in range(7)]
    assert stat.S_ISDIR(listing["e"].st_mode)
    assert all(listing[f"f{i}"].st_size == i * 1000 for i in range(7))
    with pytest.raises(FUSEError) as err:
        await env.rmdir("d")
    assert err.value.errno == errno.ENOTEMPTY
    await env.rmdir("d/e")
    for i in range(7):
        await env.unlink(f"d/f{i}")
    await env.rmdir("d")
    assert not await env.exists("d")
    await env.journal.flush()
    env.ops.listings.invalidate("")
    assert not await env.exists("d")


async def test_empty_folder_survives(env: FS) -> None:
    await env.mkdir("empty")
    env.ops.listings.invalidate("")
    assert stat.S_ISDIR((await env.stat("empty")).st_mode)
    assert await env.listdir("empty") == {}


async def test_sizes_from_listing_alone(env: FS) -> None:
    for i, size in enumerate(SIZES):
        await env.write_file(f"s{i}", pattern(size))
    await env.journal.flush()
    env.ops.listings.invalidate("")
    before = env.store.stats.copy()
    listing = await env.listdir("")
    after = env.store.stats
    assert {n: a.st_size for n, a in listing.items()} == {f"s{i}": s for i, s in enumerate(SIZES)}
    assert after.requests["list"] - before.requests["list"] == 1
    assert after.requests["get"] == before.requests["get"]  # readdir itself fetched nothing


async def test_readdir_mtimes_become_exact(env: FS) -> None:
    await env.write_file("x", b"1")
    await env.setattr("x", mtime_ns=5_000_000_000)
    await env.sync()
    await env.store.delete([".cssfs-attrs"])  # no folder record: the header must tell
    env.ops.listings.invalidate("")
    env.ops._meta.clear()
    listing = await env.listdir("")
    assert listing["x"].attr_timeout == 0  # not exact yet: the kernel must ask again
    assert (await env.stat("x")).st_mtime_ns == 5_000_000_000


async def test_a_cold_listing_takes_mtimes_from_the_folder_record(env: FS, tmp_path: Path
                                                                   ) -> None:
    await env.mkdir("d")
    times = {f"f{i}": (1_600_000_000_000_000_000 + i * 1_000_000_007, 0o600 + i) for i in range(5)}
    for name, (mtime_ns, mode) in times.items():
        await env.write_file(f"d/{name}", pattern(100 + len(name)))
        await env.setattr(f"d/{name}", mtime_ns=mtime_ns, mode=mode)
    await env.write_file("d/changed", b"v1")
    await env.sync()
    # Another client rewrites "changed" behind our back: its record entry no longer applies.
    other = EncryptedStore(env.store, env.ops.encstore.identity)
    await other.put("d/changed", b"v2", mtime_ns=7_000_000_000)
    async with trio.open_nursery() as nursery:
        cold = await _another_mount(env, tmp_path / "cold", nursery)
        await cold.inode("d")  # the root's listing
        before = env.store.stats.copy()
        listing = await cold.listdir("d")
        after = env.store.stats.copy()
        assert after.requests["list"] - before.requests["list"] == 1
        assert after.requests["get"] - before.requests["get"] == 1  # the record, no header
        for name, (mtime_ns, mode) in times.items():
            assert listing[name].st_mtime_ns == mtime_ns
            assert stat.S_IMODE(listing[name].st_mode) == mode
            assert listing[name].attr_timeout > 0  # exact: the kernel may cache it
        assert listing["changed"].attr_timeout == 0  # from LIST: its header must tell
        assert (await cold.stat("d/changed")).st_mtime_ns == 7_000_000_000
        assert env.store.stats.requests["get"] - after.requests["get"] == 1
        nursery.cancel_scope.cancel()


async def test_folder_records_follow_renames_deletes_and_rmdir(env: FS, tmp_path: Path) -> None:
    await env.mkdir("a")
    await env.write_file("a/x", b"x")
    await env.write_file("a/y", b"y")
    await env.setattr("a/x", mtime_ns=3_000_000_000)
    await env.sync()
    assert "a/.cssfs-attrs" in await _keys(env)
    await env.rename("a/x", "a/z")  # stored: renamed in the store, the record follows
    await env.unlink("a/y")
    await env.sync()
    async with trio.open_nursery() as nursery:
        cold = await _another_mount(env, tmp_path / "cold", nursery)
        listing = await cold.listdir("a")
        assert sorted(listing) == ["z"]
        assert listing["z"].st_mtime_ns == 3_000_000_000 and listing["z"].attr_timeout > 0
        nursery.cancel_scope.cancel()
    await env.rename("a", "b")  # a folder: the old record names the old folder, so it goes
    await env.sync()
    keys = await _keys(env)
    assert not any(k.startswith("a/") for k in keys)
    assert "b/.cssfs-attrs" in keys  # the moved file's mtime was known: noted for b/
    await env.unlink("b/z")
    await env.rmdir("b")  # the record goes with the folder and no late write brings it back
    await env.sync()
    await trio.sleep(0.2)
    assert not any(k.startswith("b/") for k in await _keys(env))
    assert not await env.exists("b")


async def _keys(env: FS) -> set[str]:
    return {o.key for o in (await env.store.list("", None)).objects}


async def _another_mount(env: FS, state: Path, nursery: trio.Nursery) -> FS:
    """A second mount of the same store by the same identity (cold caches, its own journal)."""
    await trio.Path(state).mkdir()
    identity = env.ops.encstore.identity
    encstore = EncryptedStore(env.store, identity, cache=ChunkCache(1 << 20), nursery=nursery)
    journal = Journal(state, encstore)
    budget = StagingBudget(state, max_bytes=4 * CS)

    async def new_staged(base: Any) -> Any:
        return StagedFile(budget, base)

    attrs = FolderAttrs(env.store, identity)
    ops = Operations(encstore, journal, new_staged, folder_attrs=attrs, nursery=nursery,
                     strict=True)
    return FS(ops, env.store, journal)


@pytest.mark.parametrize("how", ["sequential", "rewrite", "truncate", "sparse", "two_closes",
                                 "renamed"])
async def test_a_file_written_from_its_start_is_sealed_as_it_is_written(
    env: FS, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """staging hands finished chunks to the journal's sink; whatever the writer does after, the
    file reads back right, open and closed, and from the store."""
    caplog.set_level(logging.DEBUG, logger="cssfs.journal")
    data = bytearray(pattern(40 * CS + 123, 3))
    await env.mkdir("elsewhere")
    fh = await env.create("big")
    start = 30 * CS if how == "sparse" else 0
    for off in range(start, len(data), 100_000):
        await env.ops.write(fh, off, bytes(data[off : off + 100_000]))
    if how == "sparse":
        data[:start] = bytes(start)
    staged = env.ops._open_file("big").staged  # type: ignore[union-attr]
    prefix = staged.sealed_prefix
    if how == "sparse":
        assert prefix is None  # a hole: nothing sealed early
    else:
        assert prefix is not None and prefix[1] >= 32
        assert await env.ops.read(fh, 5 * CS + 7, 3 * CS) == data[5 * CS + 7 : 8 * CS + 7]
    if how == "rewrite":
        await env.ops.write(fh, 3 * CS + 5, b"X" * 70_000)
        data[3 * CS + 5 : 3 * CS + 70_005] = b"X" * 70_000
        assert staged.sealed_prefix is None
    elif how == "truncate":
        await env.setattr("big", fh, size=10 * CS + 9)
        del data[10 * CS + 9 :]
        await env.ops.write(fh, 12 * CS, b"tail")
        data += bytes(12 * CS - len(data)) + b"tail"
    elif how == "two_closes":
        await env.ops.flush(fh)  # commits the sealed prefix...
        await env.ops.write(fh, len(data), b"more")  # ...and the file goes on
        data += b"more"
    elif how == "renamed":
        await env.rename("big", "elsewhere/big")
    name = "elsewhere/big" if how == "renamed" else "big"
    assert await env.ops.read(fh, 0, len(data) + 10) == data
    await env.close(fh)
    finished = [r for r in caplog.records if "sealed while written" in r.getMessage()]
    assert bool(finished) == (how in ("sequential", "two_closes", "renamed"))
    assert await env.read_file(name) == data
    await env.journal.flush()
    env.ops.listings.invalidate_below("")
    assert await env.read_file(name) == data
    assert (await env.stat(name)).st_size == len(data)
    assert not [p for p in env.journal.directory.iterdir() if p.name.startswith("seal-")]


@pytest.mark.parametrize("how", ["sequential", "renamed", "rsync_name", "unlinked", "stranger",
                                 "rewrite"])
async def test_a_large_new_file_is_uploaded_while_it_is_written(
    env: FS, how: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The early upload lands only once the close is durable and the op approves it; every
    other turn abandons it, and the file still ends up exactly where it belongs."""
    import cssfs.journal as journal_mod

    monkeypatch.setattr(journal_mod, "EAGER_MIN_BYTES", 16 * CS)
    caplog.set_level(logging.DEBUG, logger="cssfs.journal")
    data = bytearray(pattern(40 * CS + 5, 8))
    name = ".big.AbC123" if how == "rsync_name" else "big"
    fh = await env.create(name)
    for off in range(0, len(data), 128 * 1024):
        await env.ops.write(fh, off, bytes(data[off : off + 128 * 1024]))
    staged = env.ops._open_file(name).staged  # type: ignore[union-attr]
    sink = staged.sealed_prefix[0]
    eager = sink.eager
    assert (eager is None) == (how == "rsync_name")
    assert name not in await _keys(env)  # nothing visible before the close (and approval)
    if how == "renamed":
        await env.rename(name, "moved")
        name = "moved"
    elif how == "rewrite":
        await env.ops.write(fh, 0, b"new start")
        data[:9] = b"new start"
    elif how == "stranger":
        await EncryptedStore(env.store, Identity.generate()).put(name, b"theirs")
    elif how == "unlinked":
        await env.unlink(name)
    await env.close(fh)
    await env.journal.flush()
    if eager is not None:
        await eager.done.wait()
    early = [r for r in caplog.records if "uploaded while it was written" in r.getMessage()]
    assert bool(early) == (how == "sequential")
    keys = await _keys(env)
    if how == "unlinked":
        assert keys == set()
        return
    if how == "stranger":
        copies = [k for k in keys if k.startswith("big.conflict-")]
        assert len(copies) == 1 and "big" in keys
        name = copies[0]
    assert keys - {".cssfs-attrs"} == ({name, "big"} if how == "stranger" else {name})
    env.ops.listings.invalidate_below("")
    assert await env.read_file(name) == data


async def test_rename_file(env: FS) -> None:
    await env.write_file("a", b"A")
    await env.rename("a", "b")
    assert not await env.exists("a")
    assert await env.read_file("b") == b"A"
    await env.journal.flush()
    await env.rename("b", "c")
    assert await env.read_file("c") == b"A"
    await env.write_file("d", b"D")
    await env.journal.flush()
    await env.rename("c", "d")  # replaces
    assert await env.read_file("d") == b"A"
    await env.journal.flush()
    env.ops.listings.invalidate("")
    assert sorted(await env.listdir("")) == ["d"]
    assert await env.read_file("d") == b"A"
    with pytest.raises(FUSEError) as err:
        await env.write_file("e", b"E")
        await env.rename("e", "d", pyfuse3.RENAME_NOREPLACE)
    assert err.value.errno == errno.EEXIST


async def test_rename_pending_then_overwrite_like_rsync(env: FS) -> None:
    await env.mkdir("dst")
    for round_ in range(3):
        await env.write_file("dst/.file.tmp", pattern(1000, round_))
        await env.rename("dst/.file.tmp", "dst/file")
    await env.journal.flush()
    env.ops.listings.invalidate("dst")
    assert sorted(await env.listdir("dst")) == ["file"]
    assert await env.read_file("dst/file") == pattern(1000, 2)


async def test_rename_folder(env: FS) -> None:
    await env.mkdir("old")
    await env.mkdir("old/sub")
    await env.mkdir("old/empty")
    await env.write_file("old/a", b"a")
    await env.write_file("old/sub/b", b"b")
    await env.journal.flush()
    await env.write_file("old/sub/pending", b"p")  # not uploaded yet, maybe
    await env.rename("old", "new")
    assert not await env.exists("old")
    assert await env.read_file("new/a") == b"a"
    assert await env.read_file("new/sub/b") == b"b"
    assert await env.read_file("new/sub/pending") == b"p"
    await env.journal.flush()
    env.ops.listings.invalidate_below("")
    assert sorted(await env.listdir("new")) == ["a", "empty", "sub"]
    assert sorted(await env.listdir("new/sub")) == ["b", "pending"]
    assert not await env.exists("old")


async def test_rmdir_not_a_dir_and_unlink_a_dir(env: FS) -> None:
    await env.write_file("f", b"")
    await env.mkdir("d")
    with pytest.raises(FUSEError) as err:
        await env.rmdir("f")
    assert err.value.errno == errno.ENOTDIR
    with pytest.raises(FUSEError) as err:
        await env.unlink("d")
    assert err.value.errno == errno.EISDIR


# -- what cannot be read --------------------------------------------------------------------------


async def test_foreign_object(env: FS) -> None:
    await env.store.put("raw.bin", b"not an envelope at all")
    listing = await env.listdir("")
    st = listing["raw.bin"]
    assert st.st_size == len(b"not an envelope at all")
    assert stat.S_IMODE(st.st_mode) == 0o400
    with pytest.raises(FUSEError) as err:
        await env.open("raw.bin")
    assert err.value.errno == errno.EACCES
    parent, name = await env.parent("raw.bin")
    with pytest.raises(FUSEError) as err:
        await env.ops.create(parent, name, 0o644, os.O_WRONLY, CTX)
    assert err.value.errno == errno.EEXIST
    await env.write_file("mine", b"x")
    with pytest.raises(FUSEError) as err:
        await env.rename("mine", "raw.bin")
    assert err.value.errno == errno.EPERM
    assert (await env.store.get("raw.bin")) == b"not an envelope at all"


async def test_not_shared_with_us(env: FS) -> None:
    other = EncryptedStore(env.store, Identity.generate())
    await other.put("theirs", b"their secret")
    listing = await env.listdir("")
    assert listing["theirs"].st_size == len(b"their secret")
    with pytest.raises(FUSEError) as err:
        await env.open("theirs")
    assert err.value.errno == errno.EACCES
    writer = await env.getxattr("theirs", "user.cssfs.writer")
    assert writer
    assert await env.getxattr("theirs", "user.cssfs.signature") == b"valid"


async def test_tampered_object_is_eio(env: FS, caplog: pytest.LogCaptureFixture) -> None:
    data = pattern(3 * CS)
    await env.write_file("t", data)
    await env.journal.flush()
    key = "t"
    raw = bytearray(await env.store.get(key))
    raw[4096 + CS + 100] ^= 1  # inside chunk 1
    await env.store.put(key, bytes(raw))
    env.ops.listings.invalidate("")
    fh = await env.open("t")
    assert await env.ops.read(fh, 0, 100) == data[:100]
    with pytest.raises(FUSEError) as err:
        await env.ops.read(fh, CS, 100)
    assert err.value.errno == errno.EIO
    await env.ops.release(fh)
    assert any("t" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


# -- extended attributes --------------------------------------------------------------------------


async def test_xattrs(env: FS) -> None:
    await env.write_file("x", b"data")
    names = await env.ops.listxattr(await env.inode("x"), CTX)
    assert set(names) == {b"user.cssfs.writer", b"user.cssfs.recipients",
                          b"user.cssfs.signature"}
    own = env.ops.encstore.identity.recipient
    await env.journal.flush()
    env.ops.listings.invalidate("")
    assert await env.getxattr("x", "user.cssfs.signature") == b"valid"
    assert own.key_id.hex().encode() in await env.getxattr("x", "user.cssfs.recipients")
    with pytest.raises(FUSEError) as err:
        await env.getxattr("x", "user.other")
    assert err.value.errno == pyfuse3.ENOATTR
    with pytest.raises(FUSEError) as err:
        await env.ops.setxattr(await env.inode("x"), b"user.a", b"b", CTX)
    assert err.value.errno == errno.ENOTSUP


async def test_read_only_mount(env: FS) -> None:
    env.ops.read_only = True
    with pytest.raises(FUSEError) as err:
        await env.mkdir("d")
    assert err.value.errno == errno.EROFS
    with pytest.raises(FUSEError) as err:
        await env.create("f")
    assert err.value.errno == errno.EROFS


async def test_statfs(env: FS) -> None:
    data = await env.ops.statfs(CTX)
    assert data.f_namemax == 255
    assert data.f_bavail > 0


async def test_forget_drops_inodes(env: FS) -> None:
    await env.write_file("g", b"")
    inode = await env.inode("g")
    node = env.ops.inodes.get(inode)
    await env.ops.forget([(inode, node.lookups)])
    with pytest.raises(KeyError):
        env.ops.inodes.get(inode)


# -- building blocks: the inode table, the listing cache, sd_notify ------------------------------


def test_inode_table_counts_and_moves() -> None:
    from cssfs.inodes import InodeTable

    table = InodeTable()
    d = table.lookup("d", True)
    f = table.lookup("d/f", False)
    table.opened(f)
    table.move("d", "e")
    assert (d.path, f.path) == ("e", "e/f")
    assert table.at("e/f") is f and table.at("d/f") is None
    table.detach("e/f")  # unlinked while open and known to the kernel
    assert table.get(f.inode) is f and f.detached
    table.forget(f.inode, 1)
    assert table.get(f.inode) is f  # still open
    table.closed(f)
    with pytest.raises(KeyError):
        table.get(f.inode)
    g = table.lookup("e/g", False)
    table.lookup("e/g", False)
    table.forget(g.inode, 1)
    assert table.get(g.inode) is g
    table.forget(g.inode, 1)
    with pytest.raises(KeyError):
        table.get(g.inode)
    assert table.lookup("e/g", False).inode != g.inode  # numbers are never reused


def test_inode_table_below_finds_every_depth_and_only_below() -> None:
    """``below`` walks folders, not every node: it must still find nodes at any depth, nodes
    whose parent folder has no node of its own, and nothing in a sibling sharing a prefix."""
    from cssfs.inodes import InodeTable

    table = InodeTable()
    d = table.lookup("d", True)
    deep = table.lookup("d/x/y/z", False)  # "d/x" and "d/x/y" were never looked up
    f = table.lookup("d/f", False)
    sibling = table.lookup("d2/f", False)
    assert {n.path for n in table.below("d")} == {"d/x/y/z", "d/f"}
    assert {n.path for n in table.below("")} == {"d", "d/x/y/z", "d/f", "d2/f"}
    assert table.below("d/f") == [] and table.below("nothing") == []
    table.move("d", "e")
    assert (d.path, deep.path, f.path, sibling.path) == ("e", "e/x/y/z", "e/f", "d2/f")
    assert table.at("e/x/y/z") is deep and table.at("d/x/y/z") is None
    table.move("d2/f", "e/x")  # a file renamed over a path with nodes below it
    assert table.at("e/x") is sibling and deep.detached and table.below("e/x") == []
    table.detach("e")
    assert d.detached and f.detached and sibling.detached
    assert table.below("") == [] and table.at("e/x") is None


async def test_dircache_single_flight_ttl_and_edits() -> None:
    from cssfs.dircache import DirCache

    now = [0.0]
    cache: DirCache[int] = DirCache(2.0, clock=lambda: now[0])
    calls = 0
    gate = trio.Event()

    async def loader() -> dict[str, int]:
        nonlocal calls
        calls += 1
        await gate.wait()
        return {"a": 1, "gone": 2}

    results: list[dict[str, int]] = []

    async def get() -> None:
        results.append(dict(await cache.get("", loader)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(get)
        nursery.start_soon(get)
        await trio.testing.wait_all_tasks_blocked()
        cache.set_entry("", "new", 3)  # our change while the LIST runs
        cache.set_entry("", "gone", None)
        gate.set()
    assert calls == 1
    assert results == [{"a": 1, "new": 3}] * 2
    now[0] = 1.0
    assert await cache.get("", loader) == {"a": 1, "new": 3}
    now[0] = 3.0  # expired: a new LIST, and edits older than it are dropped
    assert await cache.get("", loader) == {"a": 1, "gone": 2}
    assert calls == 2
    # A listing made elsewhere (the mount's start-up LIST) counts from when it began, keeps the
    # edits made since, and never replaces a fresher one.
    now[0] = 3.7
    cache.set_entry("d", "late", 9)  # while that LIST ran: kept
    now[0] = 4.0
    cache.prime("d", {"x": 1}, started=3.5)
    assert await cache.get("d", loader) == {"x": 1, "late": 9} and calls == 2
    cache.prime("d", {"old": 1}, started=3.0)
    assert await cache.get("d", loader) == {"x": 1, "late": 9}
    now[0] = 5.6  # 2 s after the primed LIST began: expired
    assert await cache.get("d", loader) == {"a": 1, "gone": 2} and calls == 3


def test_sd_notify_plain_and_abstract_sockets(tmp_path: Path) -> None:
    import socket

    from cssfs import service

    assert service.notify("READY=1", env={}) is False
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fspath(path))
        assert service.notify("READY=1\nSTATUS=ok", env={"NOTIFY_SOCKET": os.fspath(path)})
        assert sock.recv(100) == b"READY=1\nSTATUS=ok"
    name = f"cssfs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        assert service.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"WATCHDOG=1"
    assert service.watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert service.watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert service.watchdog_interval({}) is None


@pytest.mark.timeout(20)
def test_sd_notify_never_blocks_on_a_receiver_that_does_not_read(tmp_path: Path) -> None:
    """The mount's trio thread sends these: a full queue must cost a message, not a hang."""
    import socket

    from cssfs import service

    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fspath(path))
        env = {"NOTIFY_SOCKET": os.fspath(path)}
        sent = [service.notify(f"STATUS={i}", env=env) for i in range(5000)]
        assert sent[0] and not all(sent)  # the queue filled up, and nothing blocked
        assert sock.recv(100) == b"STATUS=0"
