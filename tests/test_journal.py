"""Journal: durable commits, background upload, rename/unlink in flight, conflicts, crashes.

Every test runs against real stores (memory, local folder, moto S3 through the shared ``store``
fixture where it matters). Two wrappers stand in for a slow or broken network: ``GatedStore``
holds puts until the test lets them go (an upload "in flight"), and its ``down`` switch makes
every call fail the way the store reports an outage after its own retries.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from cssfs.encstore import EncryptedStore
from cssfs.envelope import HEADER_SIZE, object_binding, open_header, parse_header
from cssfs.errors import JournalError, StoreError, StoreUnavailableError
from cssfs.journal import Journal, PendingInfo, Uploaded, conflict_name
from cssfs.keys import Identity
from cssfs.staging import StagedFile, StagingBudget
from cssfs.store.base import ObjectStore
from cssfs.store.memory import MemoryStore

CANARY = b"CANARY-plaintext-9d1e-never-on-disk!"
CS = 65536


@pytest.fixture(scope="module")
def identity() -> Identity:
    return Identity.generate()


class GatedStore:
    """A real store whose puts can be held (in flight) or whose calls can fail (outage)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.hold: trio.Event | None = None
        self.after = False  # hold puts after they reached the store instead of before
        self.started = trio.Event()
        self.down = False
        self.puts: list[str] = []
        self.deletes: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailableError("the store is down (test)")

    async def put(self, key: str, body: Any, **kw: Any) -> Any:
        self._check()
        self.puts.append(key)
        hold = self.hold
        if hold is not None and not self.after:
            self.started.set()
            await hold.wait()
        result = await self.inner.put(key, body, **kw)
        if hold is not None and self.after:  # landed, but the answer is late (or never comes)
            self.started.set()
            await hold.wait()
        return result

    async def head(self, key: str) -> Any:
        self._check()
        return await self.inner.head(key)

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        self._check()
        return await self.inner.get(key, start, end)

    async def delete(self, keys: Any) -> None:
        self._check()
        self.deletes.extend(keys)
        await self.inner.delete(keys)

    def held(self, *, after: bool = False) -> trio.Event:
        self.after = after
        self.hold = trio.Event()
        self.started = trio.Event()
        return self.hold


class Mount:
    """One 'mount': a journal over a (gated) store, with a staging budget."""

    def __init__(self, state: Path, store: ObjectStore, identity: Identity, **kw: Any) -> None:
        self.state = state
        self.gated = GatedStore(store)
        self.enc = EncryptedStore(self.gated, identity)
        self.budget = StagingBudget(state / "spill", kw.pop("budget", 1 << 26))
        self.uploaded: list[Uploaded] = []
        self.deleted: list[str] = []
        kw.setdefault("settle_s", 0.0)
        self.journal = Journal(
            state, self.enc, on_uploaded=self.uploaded.append, on_deleted=self.deleted.append, **kw
        )

    async def commit(
        self, key: str, data: bytes, *, base_etag: str | None = None, mtime_ns: int = 10**18,
        mode: int = 0o640, base: Any = None,
    ) -> PendingInfo:
        staged = StagedFile(self.budget, base)
        if base is not None:
            await staged.truncate(0)
        await staged.write(0, data)
        try:
            return await self.journal.commit(
                key, staged, mtime_ns=mtime_ns, mode=mode, base_etag=base_etag
            )
        finally:
            await staged.aclose()

    async def read(self, key: str) -> bytes:
        f = await self.enc.open(key)
        return await f.read(0, f.size)

    async def keys(self) -> set[str]:
        return {o.key for o in (await self.gated.inner.list()).objects}

    def files(self) -> list[str]:
        d = self.journal.directory
        return sorted(p.name for p in d.iterdir() if p.is_file())


@contextlib.asynccontextmanager
async def uploading(*journals: Journal) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        for j in journals:
            await nursery.start(j.run)
        yield
        nursery.cancel_scope.cancel()


@pytest.fixture
def mount(tmp_path: Path, store: ObjectStore, identity: Identity) -> Mount:
    return Mount(tmp_path / "state", store, identity)


@pytest.fixture
def memmount(tmp_path: Path, identity: Identity) -> Mount:
    return Mount(tmp_path / "state", MemoryStore(), identity)


def scan_for(directory: Path, needle: bytes) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() and needle in p.read_bytes()]


# -- the basic path ---------------------------------------------------------------------------


async def test_commit_flush_decrypts_to_the_bytes(mount: Mount) -> None:
    data = CANARY * 5000  # several chunks
    info = await mount.commit("dir/a.txt", data, mtime_ns=1_700_000_000_123_456_789, mode=0o600)
    assert info == PendingInfo("dir/a.txt", len(data), 1_700_000_000_123_456_789, 0o600)
    assert mount.journal.pending("dir/a.txt") == info
    assert mount.journal.pending_under("dir/") == {"dir/a.txt": info}
    assert scan_for(mount.state, CANARY) == []
    async with uploading(mount.journal):
        await mount.journal.flush()
    assert await mount.read("dir/a.txt") == data
    head = parse_header(await mount.gated.inner.get("dir/a.txt", 0, HEADER_SIZE))
    assert (head.mtime_ns, head.mode) == (1_700_000_000_123_456_789, 0o600)
    assert mount.journal.pending("dir/a.txt") is None
    assert mount.files() == []
    [up] = mount.uploaded
    assert (up.key, up.size) == ("dir/a.txt", len(data))
    assert up.etag == (await mount.gated.inner.head("dir/a.txt")).etag
    stats = mount.journal.stats()
    assert (stats.pending, stats.uploaded, stats.conflicts) == (0, 1, 0)
    assert stats.bytes_uploaded == up.cipher_size


async def test_empty_file_and_overwrite_of_a_known_version(memmount: Mount) -> None:
    m = memmount
    async with uploading(m.journal):
        await m.commit("e", b"")
        await m.journal.flush("e")
        assert await m.read("e") == b""
        etag = (await m.gated.inner.head("e")).etag
        await m.commit("e", b"v2", base_etag=etag)
        await m.journal.flush("e")
    assert await m.read("e") == b"v2"
    assert m.journal.stats().conflicts == 0


async def test_the_journal_holds_only_ciphertext(memmount: Mount) -> None:
    m = memmount
    m.budget.max_bytes = CS  # the staging spills too
    for i in range(3):
        await m.commit(f"f{i}", CANARY * (CS // len(CANARY) * 3))
    assert len(m.files()) == 6  # one envelope and one sidecar each
    assert scan_for(m.state, CANARY) == []
    assert scan_for(m.state, CANARY[:12]) == []
    sidecar = json.loads((m.journal.directory / m.files()[1]).read_bytes())
    assert sidecar["put"]["key"] == "f0" and sidecar["put"]["base_etag"] == "absent"


async def test_open_pending_reads_and_is_a_base(memmount: Mount) -> None:
    m = memmount
    data = bytes(range(256)) * 600
    await m.commit("p", data)
    pending = await m.journal.open_pending("p")
    assert pending is not None
    assert pending.size == len(data)
    assert await pending.read(CS - 3, 10) == data[CS - 3 : CS + 7]
    assert await pending.read(0, len(data) + 5) == data
    staged = StagedFile(m.budget, pending)
    await staged.write(5, b"XY")
    await m.journal.commit("p", staged, mtime_ns=5, mode=0o644, base_etag=None)
    await staged.aclose()
    pending.close()
    async with uploading(m.journal):
        await m.journal.flush()
    assert await m.read("p") == data[:5] + b"XY" + data[7:]
    assert m.gated.puts == ["p"]  # the first version was superseded before it went up
    assert await m.journal.open_pending("p") is None


# -- crash and replay -------------------------------------------------------------------------


async def test_crash_before_upload_then_replay(tmp_path: Path, store: ObjectStore,
                                               identity: Identity) -> None:
    first = Mount(tmp_path / "s", store, identity)
    want = {f"d/{i}": CANARY + os.urandom(i * 10_000) for i in range(6)}
    for key, data in want.items():
        await first.commit(key, data)
    del first  # kill -9: nothing flushed, nothing closed
    second = Mount(tmp_path / "s", store, identity)
    assert second.journal.pending("d/0") is None
    assert await second.journal.replay() == 6
    assert set(second.journal.pending_under("d/")) == set(want)
    async with uploading(second.journal):
        await second.journal.flush()
    for key, data in want.items():
        assert await second.read(key) == data
    assert second.files() == []


async def test_crash_during_upload_then_replay(tmp_path: Path, identity: Identity) -> None:
    store = MemoryStore()
    first = Mount(tmp_path / "s", store, identity)
    await first.commit("a", b"one")
    await first.commit("b", b"two")
    hold = first.gated.held()
    with trio.CancelScope() as scope:
        async with uploading(first.journal):
            await first.gated.started.wait()  # an upload is in flight...
            scope.cancel()  # ...when the daemon dies
    assert not hold.is_set()
    second = Mount(tmp_path / "s", store, identity)
    await second.journal.replay()
    async with uploading(second.journal):
        await second.journal.flush()
    assert await second.read("a") == b"one" and await second.read("b") == b"two"


async def test_replay_after_a_landed_upload_is_not_a_conflict(tmp_path: Path,
                                                              identity: Identity) -> None:
    """The upload landed but the daemon died before it removed the entry."""
    store = MemoryStore()
    first = Mount(tmp_path / "s", store, identity)
    await first.commit("a", b"one")
    snapshot = {p.name: p.read_bytes() for p in first.journal.directory.iterdir()}
    async with uploading(first.journal):
        await first.journal.flush()
    for name, data in snapshot.items():  # the entry as it was just before the upload
        (first.journal.directory / name).write_bytes(data)
    second = Mount(tmp_path / "s", store, identity)
    await second.journal.replay()
    async with uploading(second.journal):
        await second.journal.flush()
    assert await second.read("a") == b"one"
    assert await second.keys() == {"a"}
    assert second.journal.stats().conflicts == 0


_CHILD = """
import sys, trio
from pathlib import Path
from cssfs.encstore import EncryptedStore
from cssfs.journal import Journal
from cssfs.keys import parse_identity_file
from cssfs.staging import StagedFile, StagingBudget
from cssfs.store.local import LocalStore

async def main(state, root, ident, n):
    identity = parse_identity_file(Path(ident).read_bytes(), None)
    journal = Journal(state, EncryptedStore(LocalStore(root), identity))
    budget = StagingBudget(state)
    for i in range(n):
        staged = StagedFile(budget)
        await staged.write(0, b"file %d " % i * 1000)
        await journal.commit(f"k/{i}", staged, mtime_ns=i, mode=0o644, base_etag=None)
    print("committed", flush=True)
    await trio.sleep_forever()

trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
"""


async def test_kill_9_after_commit_loses_nothing(tmp_path: Path, identity: Identity) -> None:
    """A real daemon process killed with SIGKILL right after its commits returned."""
    from cssfs.store.local import LocalStore

    (tmp_path / "root").mkdir()
    ident = tmp_path / "identity"
    ident.write_bytes(identity.to_file(None))
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", _CHILD, str(tmp_path / "s"), str(tmp_path / "root"), str(ident),
         "8"],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(100)
            assert chunk, "the child died before committing"
            line += chunk
        assert line == b"committed\n"
    finally:
        proc.kill()  # SIGKILL: no cleanup of any kind
        await proc.wait()
    store = LocalStore(tmp_path / "root")
    m = Mount(tmp_path / "s", store, identity)
    assert await m.journal.replay() == 8
    async with uploading(m.journal):
        await m.journal.flush()
    for i in range(8):
        assert await m.read(f"k/{i}") == b"file %d " % i * 1000


@pytest.mark.expect_logs("damaged")
async def test_damaged_entries_are_moved_aside(tmp_path: Path, identity: Identity) -> None:
    store = MemoryStore()
    first = Mount(tmp_path / "s", store, identity)
    for key in ("good", "badjson", "badheader"):
        await first.commit(key, key.encode() * 100)
    d = first.journal.directory
    (d / "0000000000000002.json").write_bytes(b"{not json")
    env = bytearray((d / "0000000000000003.env").read_bytes())
    env[200] ^= 0xFF  # inside the stanzas: the header no longer opens
    (d / "0000000000000003.env").write_bytes(bytes(env))
    (d / "0000000000000099.env").write_bytes(b"half-written envelope, no sidecar")
    (d / "seal-0123.tmp").write_bytes(b"a seal in progress when the daemon died")
    second = Mount(tmp_path / "s", store, identity)
    assert await second.journal.replay() == 1
    async with uploading(second.journal):
        await second.journal.flush()
    assert await second.keys() == {"good"}
    assert sorted(p.name for p in second.journal.broken_dir.iterdir()) == [
        "0000000000000002.env", "0000000000000002.json",
        "0000000000000003.env", "0000000000000003.json",
    ]
    assert second.files() == []
    assert second.journal.stats().broken == 2


async def test_torn_header_reseal_is_repaired_at_replay(tmp_path: Path, identity: Identity
                                                        ) -> None:
    """A crash in the middle of rewriting an envelope header (rename before the upload)."""
    store2 = MemoryStore()
    third = Mount(tmp_path / "t", store2, identity)
    await third.commit("x", b"abc" * 1000)
    await third.journal.rename("x", "y")
    d = third.journal.directory
    side = json.loads((d / "0000000000000001.json").read_bytes())
    good_head = (d / "0000000000000001.env").read_bytes()[:HEADER_SIZE]
    # the uploader saved the new header in the sidecar, then died while writing it
    new = open_header(good_head, identity).reseal(binding=object_binding("y"))
    side["header"] = base64.b64encode(new).decode()
    (d / "0000000000000001.json").write_text(json.dumps(side))
    torn = bytearray((d / "0000000000000001.env").read_bytes())
    torn[:2000] = bytes(2000)  # torn: half the header is zeros
    (d / "0000000000000001.env").write_bytes(bytes(torn))
    fourth = Mount(tmp_path / "t", store2, identity)
    assert await fourth.journal.replay() == 1
    async with uploading(fourth.journal):
        await fourth.journal.flush()
    assert await fourth.read("y") == b"abc" * 1000
    assert await fourth.keys() == {"y"}


# -- rename, unlink, attributes ---------------------------------------------------------------


async def test_rename_while_queued_moves_the_entry(mount: Mount) -> None:
    m = mount
    await m.commit(".a.txt.XYZ123", CANARY + b"v1")
    assert await m.journal.set_attrs(".a.txt.XYZ123", mtime_ns=12345, mode=0o600)
    assert await m.journal.rename(".a.txt.XYZ123", "a.txt")
    assert m.journal.pending(".a.txt.XYZ123") is None
    assert m.journal.pending("a.txt") == PendingInfo("a.txt", len(CANARY) + 2, 12345, 0o600)
    assert not m.journal.is_hidden(".a.txt.XYZ123")  # never in the store: nothing to hide
    async with uploading(m.journal):
        await m.journal.flush()
    assert await m.keys() == {"a.txt"}
    assert await m.read("a.txt") == CANARY + b"v1"
    head = parse_header(await m.gated.inner.get("a.txt", 0, HEADER_SIZE))
    assert (head.mtime_ns, head.mode) == (12345, 0o600)
    assert m.gated.puts == ["a.txt"]  # the temp name never went up
    assert m.gated.deletes == []


async def test_rename_of_an_uploaded_then_changed_file(memmount: Mount) -> None:
    m = memmount
    async with uploading(m.journal):
        await m.commit("old", b"v1")
        await m.journal.flush()
        etag = (await m.gated.inner.head("old")).etag
        m.journal.settle_s = 60  # keep the next one queued
        await m.commit("old", b"v2", base_etag=etag)
        assert await m.journal.rename("old", "new")
        assert m.journal.is_hidden("old")
        assert m.journal.hidden_under("") == {"old"}
        await m.journal.flush()
    assert await m.keys() == {"new"}
    assert await m.read("new") == b"v2"
    assert m.deleted == ["old"]


async def test_rename_over_an_existing_file(memmount: Mount) -> None:
    m = memmount
    async with uploading(m.journal):
        await m.commit("target", b"old target")
        await m.journal.flush()
        etag = (await m.gated.inner.head("target")).etag
        await m.commit("tmp", b"new target")
        assert await m.journal.rename("tmp", "target", dst_etag=etag)
        await m.journal.flush()
    assert await m.keys() == {"target"}
    assert await m.read("target") == b"new target"
    assert m.journal.stats().conflicts == 0


async def test_rename_while_in_flight(mount: Mount) -> None:
    m = mount
    await m.commit("tmp", CANARY + b"last close")
    hold = m.gated.held()
    async with uploading(m.journal):
        await m.gated.started.wait()  # the upload of tmp is in flight
        assert m.journal.stats().in_flight == 1
        assert await m.journal.rename("tmp", "dst")
        assert m.journal.pending("tmp") is None and m.journal.is_hidden("tmp")
        assert m.journal.pending("dst") is not None
        m.gated.hold = None
        hold.set()
        await m.journal.flush()
    assert await m.keys() == {"dst"}
    assert await m.read("dst") == CANARY + b"last close"
    assert m.gated.puts == ["tmp", "dst"]
    assert m.files() == []


async def test_rename_chain_in_flight_and_back(memmount: Mount) -> None:
    m = memmount
    await m.commit("a", b"bytes of a")
    hold = m.gated.held()
    async with uploading(m.journal):
        await m.gated.started.wait()
        assert await m.journal.rename("a", "b")
        assert await m.journal.rename("b", "c")
        assert await m.journal.rename("c", "a")
        m.gated.hold = None
        hold.set()
        await m.journal.flush()
    assert await m.keys() == {"a"}
    assert await m.read("a") == b"bytes of a"


async def test_rename_of_a_file_that_is_not_pending(memmount: Mount) -> None:
    m = memmount
    assert not await m.journal.rename("x", "y")
    await m.commit("y", b"pending y")
    m.journal.settle_s = 60
    assert not await m.journal.rename("x", "y")  # the caller renames x over y in the store
    assert m.journal.pending("y") is None  # the pending y is superseded
    async with uploading(m.journal):
        await m.journal.flush()
    assert await m.keys() == set()


async def test_unlink_while_queued(mount: Mount) -> None:
    m = mount
    await m.commit("gone", b"never uploaded")
    assert await m.journal.unlink("gone")
    assert not await m.journal.unlink("never-existed")
    assert m.journal.pending("gone") is None
    async with uploading(m.journal):
        await m.journal.flush()
    assert await m.keys() == set()
    assert m.gated.puts == [] and m.files() == []


async def test_unlink_while_in_flight(mount: Mount) -> None:
    m = mount
    await m.commit("gone", b"in flight")
    hold = m.gated.held()
    async with uploading(m.journal):
        await m.gated.started.wait()
        assert await m.journal.unlink("gone")
        assert m.journal.is_hidden("gone")
        m.gated.hold = None
        hold.set()
        await m.journal.flush()
    assert await m.keys() == set()
    assert m.deleted == ["gone"]
    assert m.files() == []


async def test_unlink_and_recreate_while_in_flight(mount: Mount) -> None:
    """An editor's save: the old file is removed and a new one written under the same name."""
    m = mount
    await m.commit("doc", b"first")
    hold = m.gated.held()
    async with uploading(m.journal):
        await m.gated.started.wait()
        assert await m.journal.unlink("doc")
        await m.commit("doc", b"second")
        m.gated.hold = None
        hold.set()
        await m.journal.flush()
    assert await m.keys() == {"doc"}
    assert await m.read("doc") == b"second"
    assert m.journal.stats().conflicts == 0
    assert m.files() == []


async def test_rename_in_flight_then_write_the_old_name_again(memmount: Mount) -> None:
    m = memmount
    await m.commit("log", b"old log")
    hold = m.gated.held()
    async with uploading(m.journal):
        await m.gated.started.wait()
        assert await m.journal.rename("log", "log.1")  # logrotate
        await m.commit("log", b"new log")
        m.gated.hold = None
        hold.set()
        await m.journal.flush()
    assert await m.keys() == {"log", "log.1"}
    assert await m.read("log") == b"new log"
    assert await m.read("log.1") == b"old log"
    assert m.journal.stats().conflicts == 0


async def test_our_own_landed_version_is_never_a_conflict(memmount: Mount) -> None:
    """The previous upload landed while the next commit was being sealed (stale base)."""
    m = memmount
    e0 = (await m.enc.put("k", b"v0", mtime_ns=1, mode=0o644)).etag
    async with uploading(m.journal):
        await m.commit("k", b"v1", base_etag=e0)
        await m.journal.flush()
        await m.commit("k", b"v2", base_etag=e0)  # the caller had not heard of v1 yet
        await m.journal.flush()
    assert await m.read("k") == b"v2"
    assert await m.keys() == {"k"}
    assert m.journal.stats().conflicts == 0


async def test_newest_commit_wins(memmount: Mount) -> None:
    m = memmount
    for i in range(5):
        await m.commit("k", f"version {i}".encode())
    async with uploading(m.journal):
        await m.journal.flush()
    assert await m.read("k") == b"version 4"
    assert m.gated.puts == ["k"]


async def test_newest_commit_wins_over_one_in_flight(memmount: Mount) -> None:
    m = memmount
    await m.commit("k", b"version 0")
    hold = m.gated.held()
    async with uploading(m.journal):
        await m.gated.started.wait()
        for i in range(1, 4):
            await m.commit("k", f"version {i}".encode())
        m.gated.hold = None
        hold.set()
        await m.journal.flush()
    assert await m.read("k") == b"version 3"
    assert m.gated.puts == ["k", "k"]
    assert m.journal.stats().conflicts == 0


async def test_set_attrs_while_in_flight_uploads_again(memmount: Mount) -> None:
    m = memmount
    await m.commit("f", b"data", mtime_ns=1, mode=0o644)
    hold = m.gated.held()
    async with uploading(m.journal):
        await m.gated.started.wait()
        assert await m.journal.set_attrs("f", mtime_ns=777, mode=0o400)
        assert m.journal.pending("f") == PendingInfo("f", 4, 777, 0o400)
        pending = await m.journal.open_pending("f")
        assert pending is not None and (pending.mtime_ns, pending.mode) == (777, 0o400)
        pending.close()
        m.gated.hold = None
        hold.set()
        await m.journal.flush()
    head = parse_header(await m.gated.inner.get("f", 0, HEADER_SIZE))
    assert (head.mtime_ns, head.mode) == (777, 0o400)
    assert not await m.journal.set_attrs("f", mtime_ns=5)


# -- conflicts and outages --------------------------------------------------------------------


def test_conflict_names() -> None:
    from datetime import UTC, datetime

    when = datetime(2024, 1, 31, 23, 59, 58, tzinfo=UTC)
    want = "d/report.conflict-20240131-235958-ab12.txt"
    assert conflict_name("d/report.txt", when, "ab12") == want
    assert conflict_name("Makefile", when, "ab12") == "Makefile.conflict-20240131-235958-ab12"
    assert conflict_name(".bashrc", when, "ab12", 1) == ".bashrc.conflict-20240131-235958-ab12-2"


@pytest.mark.expect_logs("changed by another writer")
async def test_two_mounts_write_the_same_base(tmp_path: Path, store_factory: Callable[..., Any],
                                              identity: Identity) -> None:
    one = Mount(tmp_path / "one", store_factory(), identity)
    two = Mount(tmp_path / "two", store_factory(), identity)
    async with uploading(one.journal, two.journal):
        await one.commit("doc.txt", b"base")
        await one.journal.flush()
        base = (await one.gated.inner.head("doc.txt")).etag
        await one.commit("doc.txt", b"edited on one", base_etag=base)
        await one.journal.flush()
        await two.commit("doc.txt", b"edited on two", base_etag=base)
        await two.journal.flush()
    keys = await one.keys()
    assert len(keys) == 2 and "doc.txt" in keys
    [copy] = keys - {"doc.txt"}
    tag = identity.recipient.fingerprint.replace("-", "")[:4]
    assert re.fullmatch(rf"doc\.conflict-\d{{8}}-\d{{6}}-{tag}\.txt", copy)
    assert await one.read("doc.txt") == b"edited on one"
    assert await two.read(copy) == b"edited on two"
    assert two.journal.stats().conflicts == 1
    assert two.journal.stats().conflict_copies == [("doc.txt", copy)]
    assert [u.key for u in two.uploaded] == [copy]


@pytest.mark.expect_logs("failed")
async def test_store_down_keeps_entries_until_it_is_back(memmount: Mount) -> None:
    m = memmount
    await m.commit("a", CANARY)
    await m.commit("b", b"bee")
    m.gated.down = True
    async with uploading(m.journal):
        with pytest.raises(StoreUnavailableError):
            await m.journal.flush()
        stats = m.journal.stats()
        assert stats.pending == 2 and stats.failures
        assert len(m.files()) == 4  # nothing given up
        m.gated.down = False
        await m.journal.flush()
    assert await m.keys() == {"a", "b"}
    assert m.journal.stats().failures == {}
    assert m.files() == []


@pytest.mark.expect_logs("failed")
async def test_reseal_of_a_held_envelope_survives_a_restart(tmp_path: Path,
                                                            identity: Identity) -> None:
    """A small envelope is resealed in memory only (new name, mode, mtime) when its upload
    starts; if that upload fails and the daemon dies, the next run reseals the file on disk
    again from its sidecar and uploads the right header."""
    store = MemoryStore()
    m = Mount(tmp_path / "s", store, identity)
    await m.commit(".tmp.x1", b"held bytes " * 100, mode=0o600, mtime_ns=10**18)
    assert await m.journal.set_attrs(".tmp.x1", mode=0o644, mtime_ns=5 * 10**17)
    assert await m.journal.rename(".tmp.x1", "final")
    on_disk = m.files()
    head_before = (m.journal.directory / on_disk[0]).read_bytes()[:HEADER_SIZE]
    m.gated.down = True
    async with uploading(m.journal):
        with pytest.raises(StoreUnavailableError):
            await m.journal.flush()  # resealed in memory, then the put failed
    assert (m.journal.directory / on_disk[0]).read_bytes()[:HEADER_SIZE] == head_before
    again = Mount(tmp_path / "s", store, identity)  # the daemon died; the store is back
    assert await again.journal.replay() == 1
    async with uploading(again.journal):
        await again.journal.flush()
    assert await again.keys() == {"final"}
    assert await again.read("final") == b"held bytes " * 100
    info = await again.enc.header("final", (await store.head("final")).etag)
    assert (info.mode, info.mtime_ns) == (0o644, 5 * 10**17)


@pytest.mark.s3
@pytest.mark.expect_logs("failed", "retry", "attempt")
async def test_s3_outage_through_the_fault_proxy(tmp_path: Path, fault_proxy: Any,
                                                 s3_bucket: Any, identity: Identity) -> None:
    from cssfs.store.retry import RetryPolicy
    from cssfs.store.s3 import S3Store

    store = S3Store(
        s3_bucket.bucket, endpoint_url=fault_proxy.endpoint_url, path_style=True,
        retry=RetryPolicy(attempts=2, budget=2.0, base_delay=0.01, max_delay=0.02),
        connect_timeout=1.0, read_timeout=2.0,
    )
    try:
        m = Mount(tmp_path / "s", store, identity)
        await m.commit("x/y", b"through the outage")
        fault_proxy.down()
        async with uploading(m.journal):
            with pytest.raises(StoreError):  # refused connections: StoreUnavailableError
                await m.journal.flush()
            assert m.journal.pending("x/y") is not None
            fault_proxy.up()
            await m.journal.flush()
        assert await m.read("x/y") == b"through the outage"
    finally:
        await store.aclose()


# -- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Any:
    where = tmp_path / "tiny"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
        capture_output=True, check=False,
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def test_full_disk_is_a_clear_error_and_loses_nothing(tiny_fs: Path,
                                                            identity: Identity) -> None:
    m = Mount(tiny_fs, MemoryStore(), identity)
    await m.commit("small", b"fits")
    with pytest.raises(JournalError) as info:
        await m.commit("big", os.urandom(400_000))
    assert info.value.errno == 28  # ENOSPC
    assert "big" in str(info.value)
    assert m.journal.pending("big") is None
    assert m.files() == ["0000000000000001.env", "0000000000000001.json"]
    async with uploading(m.journal):
        await m.journal.flush()
    assert await m.keys() == {"small"}


# -- bigger and wider -------------------------------------------------------------------------


async def test_large_file_over_an_existing_version(mount: Mount) -> None:
    """Open for write over a stored file: copy-on-write from the EncryptedFile, multipart up."""
    m = mount
    data = os.urandom(6 * 1024 * 1024 + 123)  # above the 5 MiB part size of the s3 fixture
    info = await m.enc.put("big.bin", data, mtime_ns=1, mode=0o644)
    base = await m.enc.open("big.bin")
    staged = StagedFile(m.budget, base)
    await staged.write(3 * CS + 7, CANARY)
    await m.journal.commit("big.bin", staged, mtime_ns=2, mode=0o644, base_etag=info.etag)
    await staged.aclose()
    assert scan_for(m.state, CANARY) == []
    async with uploading(m.journal):
        await m.journal.flush()
    want = bytearray(data)
    want[3 * CS + 7 : 3 * CS + 7 + len(CANARY)] = CANARY
    assert await m.read("big.bin") == want
    assert m.journal.stats().conflicts == 0


async def test_uploads_are_bounded_and_all_land(tmp_path: Path, identity: Identity) -> None:
    m = Mount(tmp_path / "s", MemoryStore(), identity, max_uploads=3)
    busy = peak = 0
    inner_put = m.gated.put

    async def counting_put(key: str, body: Any, **kw: Any) -> Any:
        nonlocal busy, peak
        busy += 1
        peak = max(peak, busy)
        try:
            await trio.sleep(0.01)
            return await inner_put(key, body, **kw)
        finally:
            busy -= 1

    m.gated.put = counting_put  # type: ignore[method-assign]
    for i in range(12):
        await m.commit(f"many/{i:02d}", f"file {i}".encode())
    async with uploading(m.journal):
        await m.journal.flush()
    assert peak == 3
    assert len(await m.keys()) == 12
    assert m.journal.stats().uploaded == 12


async def test_rename_into_a_shared_folder_adds_its_recipients(tmp_path: Path,
                                                               identity: Identity) -> None:
    bob = Identity.generate()
    store = MemoryStore()
    m = Mount(tmp_path / "s", store, identity)

    async def recipients_for(key: str) -> list[Any]:
        return [bob.recipient] if key.startswith("shared/") else []

    m.enc.recipients_for = recipients_for
    await m.commit("private/draft", b"for bob, once it moves")
    assert await m.journal.rename("private/draft", "shared/final")
    async with uploading(m.journal):
        await m.journal.flush()
    as_bob = EncryptedStore(store, bob)
    f = await as_bob.open("shared/final")
    assert await f.read(0, 100) == b"for bob, once it moves"


async def test_flush_without_the_uploader_is_an_error_not_a_hang(memmount: Mount) -> None:
    m = memmount
    await m.commit("k", b"data")
    with pytest.raises(JournalError, match="not running"):
        await m.journal.flush()
    async with uploading(m.journal):
        await m.journal.flush()
    await m.journal.flush()  # nothing pending: returns at once
    assert await m.read("k") == b"data"


@pytest.mark.parametrize("seed", range(int(os.environ.get("JOURNAL_SEEDS", "12"))))
async def test_random_operations_match_a_model(tmp_path: Path, identity: Identity,
                                               seed: int) -> None:
    """Commits, renames and unlinks as fs.py issues them, while uploads are held and released
    at random and the daemon crashes now and then (a new journal replays the directory): at the
    end the store holds exactly the model, and there was no conflict."""
    import random

    rng = random.Random(seed)
    m = Mount(tmp_path / "s", MemoryStore(), identity, max_uploads=rng.choice([1, 2, 4]))
    model: dict[str, bytes] = {}
    names = ["a", "b", "c", "d/e", "d/f"]
    known: dict[str, str] = {}  # what fs.py knows of the store: the ETag of each key

    def uploaded(up: Uploaded) -> None:
        known[up.key] = up.etag

    def deleted(key: str) -> None:
        known.pop(key, None)

    async def release_later(event: trio.Event) -> None:
        await trio.sleep(rng.random() * 0.01)
        event.set()

    async with trio.open_nursery() as outer:
        for life in range(3):
            if life:  # the daemon died: a new one replays the journal and lists the bucket
                m.journal = Journal(m.state, m.enc, settle_s=0.0)
                await m.journal.replay()
                known = {o.key: o.etag for o in (await m.gated.inner.list()).objects}
            m.journal.on_uploaded = uploaded
            m.journal.on_deleted = deleted
            async with trio.open_nursery() as nursery:
                await nursery.start(m.journal.run)
                for step in range(15):
                    if rng.random() < 0.3:
                        hold = m.gated.held(after=rng.random() < 0.5)
                        outer.start_soon(release_later, hold)
                    what = rng.random()
                    if what < 0.45 or not model:
                        key = rng.choice(names)
                        data = f"{key} v{life}.{step} ".encode() * rng.randint(0, 3000)
                        await m.commit(key, data, base_etag=known.get(key))
                        model[key] = data
                    elif what < 0.75:
                        src = rng.choice(sorted(model))
                        dst = rng.choice([n for n in names if n != src])
                        if not await m.journal.rename(src, dst, dst_etag=known.get(dst)):
                            info = await m.enc.rename(src, dst)
                            known[dst] = info.etag
                            known.pop(src, None)
                        model[dst] = model.pop(src)
                    else:
                        key = rng.choice(sorted(model))
                        if not await m.journal.unlink(key):
                            await m.enc.delete(key)
                            known.pop(key, None)
                        del model[key]
                    await trio.sleep(rng.random() * 0.003)
                if life == 2:
                    m.gated.hold = None
                    await m.journal.flush()
                nursery.cancel_scope.cancel()  # kill -9 (or, the last time, unmount)
    assert await m.keys() == set(model)
    for key, data in model.items():
        assert await m.read(key) == data, key
    assert m.journal.stats().conflicts == 0
    assert m.files() == []


async def test_rename_and_attrs_of_a_queued_file_skip_the_directory_fsync(
    memmount: Mount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rsync's utimes + rename after close cost no directory fsync each; one directory fsync
    makes them durable before the upload acts on them (then the renamed file lands)."""
    m = memmount
    events: list[str] = []
    real = Journal._fsync_dir

    def counted(self: Journal) -> None:
        events.append("fsync-dir")
        real(self)

    monkeypatch.setattr(Journal, "_fsync_dir", counted)
    put = m.gated.put

    async def logged_put(key: str, body: Any, **kw: Any) -> Any:
        events.append(f"put {key}")
        return await put(key, body, **kw)

    monkeypatch.setattr(m.gated, "put", logged_put)
    await m.commit("d/.a.txt.Xy12ab", CANARY)
    assert events == ["fsync-dir"]  # the commit itself is durable at once
    events.clear()
    assert await m.journal.set_attrs("d/.a.txt.Xy12ab", mtime_ns=5, mode=0o600)
    assert await m.journal.rename("d/.a.txt.Xy12ab", "d/a.txt")
    assert events == []
    sidecars = [n for n in m.files() if n.endswith(".json")]
    data = json.loads((m.journal.directory / sidecars[0]).read_bytes())
    assert (data["put"]["key"], data["put"]["mtime_ns"]) == ("d/a.txt", 5)  # written, not synced
    async with uploading(m.journal):
        await m.journal.flush()
    assert "put d/a.txt" in events
    assert "fsync-dir" in events[: events.index("put d/a.txt")]
    assert await m.read("d/a.txt") == CANARY
    assert await m.keys() == {"d/a.txt"}
    head = parse_header(await m.gated.inner.get("d/a.txt", 0, HEADER_SIZE))
    assert (head.mtime_ns, head.mode) == (5, 0o600)
