"""Sharing through the mount's Operations, in-process (no kernel): --trusted-writers-only, the
contacts book re-read while mounted, group keys given or rotated while mounted, the xattrs of a
pending file, a bad signature, and mtime changes on a file shared through a group.

Each "mount" is wired the way cssfs.mount.serve wires one: Sharing (folder policies, group keys)
-> EncryptedStore(identities=, recipients_for=) -> Journal -> Operations with the mount's hooks
(ContactsTrust, GroupRefresher, check_trusted_writer).
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
from pyfuse3 import FUSEError

from cssfs import config
from cssfs.cache import ChunkCache
from cssfs.encstore import EncryptedStore
from cssfs.envelope import HEADER_SIZE, parse_header
from cssfs.errors import ConfigError
from cssfs.fs import Operations
from cssfs.groups import Groups
from cssfs.journal import Journal
from cssfs.keys import Identity, Recipient
from cssfs.mount import ContactsTrust, GroupRefresher
from cssfs.policy import Trust, check_trusted_writer
from cssfs.sharing import Sharing
from cssfs.staging import StagedFile, StagingBudget
from cssfs.store.local import LocalStore
from cssfs.store.memory import MemoryStore
from tests.support.mounting import fuse_available, mounted
from tests.test_fs_ops import FS, _readdir_reply

ALICE = Identity.generate()
BOB = Identity.generate()
CAROL = Identity.generate()
CANARY = b"CANARY-mount-sharing-41c9"


@dataclass
class Client:
    fs: FS
    ops: Operations
    encstore: EncryptedStore
    sharing: Sharing
    journal: Journal
    refresher: GroupRefresher
    contacts: Path


def write_contacts(path: Path, people: dict[str, Identity]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    book = config.Contacts.load(path)
    for name, identity in people.items():
        if book.get(name) is None:
            book.add(name, identity.recipient)
    book.save()


@asynccontextmanager
async def client(
    store: MemoryStore, identity: Identity, home: Path, *, contacts: dict[str, Identity],
    trusted_only: bool = False, settle_s: float = 0.0,
) -> AsyncIterator[Client]:
    """A mount of ``store`` as ``identity``, wired as mount.serve wires one (ttl 0)."""
    book = home / "contacts"
    write_contacts(book, contacts)
    trust = ContactsTrust(identity.recipient, book)
    sharing = await Sharing.load(store, identity, trust, ttl=0.0)
    async with trio.open_nursery() as nursery:
        encstore = EncryptedStore(
            store, identity, cache=ChunkCache(1 << 20), nursery=nursery,
            identities=[g.identity for g in sharing.group_identities],
            recipients_for=sharing.resolve_recipients,
        )
        journal = Journal(home / "state", encstore, settle_s=settle_s)
        (home / "state").mkdir(exist_ok=True)
        await journal.replay()
        nursery.start_soon(journal.run)
        budget = StagingBudget(home / "state")

        async def new_staged(base: Any) -> StagedFile:
            return StagedFile(budget, base)

        def check_writer(ed25519: bytes) -> None:
            check_trusted_writer(ed25519, trust())

        refresher = GroupRefresher(sharing, encstore, 0.0)
        ops = Operations(
            encstore, journal, new_staged, name_writer=trust.writer_name,
            is_trusted=lambda ed: trust().is_trusted(ed),
            check_writer=check_writer if trusted_only else None,
            refresh_keys=refresher, list_ttl=0.0, nursery=nursery, strict=True,
        )
        try:
            yield Client(FS(ops, store, journal), ops, encstore, sharing, journal, refresher,
                         book)
        finally:
            await journal.flush()
            nursery.cancel_scope.cancel()


@pytest.fixture(autouse=True)
def _no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyfuse3, "readdir_reply", _readdir_reply)


async def put_as(store: MemoryStore, writer: Identity, key: str, data: bytes,
                 recipients: list[Recipient]) -> None:
    """Another client (no mount) writes ``key`` for ``recipients``."""
    await EncryptedStore(store, writer, recipients).put(key, data)


async def fails(coro: Any, code: int) -> None:
    with pytest.raises(FUSEError) as info:
        await coro
    assert info.value.errno == code


# -- --trusted-writers-only ---------------------------------------------------------------------


@pytest.mark.expect_logs(r"object shared/from-alice\.txt was written by someone untrusted "
                         r"\(the file's writer ed25519:[0-9a-f-]+ is not in your contacts\)")
async def test_trusted_writers_only_and_contacts_added_while_mounted(tmp_path: Path) -> None:
    store = MemoryStore("b")
    await put_as(store, ALICE, "shared/from-alice.txt", CANARY, [BOB.recipient])
    async with client(store, BOB, tmp_path / "bob", contacts={}, trusted_only=True) as bob:
        # Listed, but it does not open; its xattrs still say who wrote it and whether it verifies.
        assert "from-alice.txt" in await bob.fs.listdir("shared")
        await fails(bob.fs.read_file("shared/from-alice.txt"), errno.EACCES)
        await fails(bob.fs.open("shared/from-alice.txt", os.O_RDWR), errno.EACCES)
        assert await bob.fs.getxattr("shared/from-alice.txt", "user.cssfs.signature") == (
            b"unknown writer")
        writer = await bob.fs.getxattr("shared/from-alice.txt", "user.cssfs.writer")
        assert writer.startswith(b"ed25519:")
        # Bob adds Alice to his contacts while mounted: the book is re-read, the file opens.
        write_contacts(bob.contacts, {"alice": ALICE})
        assert await bob.fs.read_file("shared/from-alice.txt") == CANARY
        assert await bob.fs.getxattr("shared/from-alice.txt", "user.cssfs.signature") == b"valid"
        assert await bob.fs.getxattr("shared/from-alice.txt", "user.cssfs.writer") == b"alice"
        # His own files always open.
        await bob.fs.write_file("shared/mine.txt", b"bob's")
        await bob.journal.flush()
        assert await bob.fs.read_file("shared/mine.txt") == b"bob's"


async def test_without_the_option_strangers_files_open(tmp_path: Path) -> None:
    store = MemoryStore("b")
    await put_as(store, CAROL, "x.txt", CANARY, [BOB.recipient])
    async with client(store, BOB, tmp_path / "bob", contacts={"alice": ALICE}) as bob:
        assert await bob.fs.read_file("x.txt") == CANARY
        assert await bob.fs.getxattr("x.txt", "user.cssfs.signature") == b"unknown writer"


def test_contacts_trust_rereads_only_on_change_and_keeps_the_last_good_book(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    book = tmp_path / "contacts"
    trust = ContactsTrust(BOB.recipient, book)
    assert trust() == Trust.of(BOB.recipient)  # no book yet
    write_contacts(book, {"alice": ALICE})
    first = trust()
    assert first.is_trusted(ALICE.recipient.ed25519 or b"")
    assert trust() is first  # unchanged file: not parsed again
    book.write_text("alice not-a-recipient\n")
    assert trust() is first  # a broken book: the contacts read before still count
    assert "the contacts read before still count" in caplog.text


# -- a bad signature never opens ----------------------------------------------------------------


@pytest.mark.expect_logs(r"object signed\.txt: .*signature")
async def test_a_file_whose_signature_fails_never_opens(tmp_path: Path) -> None:
    store = MemoryStore("b")
    await put_as(store, ALICE, "signed.txt", CANARY, [BOB.recipient])
    obj = store.bucket.objects[store.full_key("signed.txt")]
    head = parse_header(obj.data[:HEADER_SIZE])
    bad = bytes([head.signature[0] ^ 1]) + head.signature[1:]
    forged = dataclasses.replace(head, signature=bad).to_bytes() + obj.data[HEADER_SIZE:]
    await store.put("signed.txt", forged)
    for trusted_only in (False, True):
        async with client(store, BOB, tmp_path / f"bob{trusted_only}", contacts={"alice": ALICE},
                          trusted_only=trusted_only) as bob:
            await fails(bob.fs.read_file("signed.txt"), errno.EIO)
            assert await bob.fs.getxattr("signed.txt", "user.cssfs.signature") == b"invalid"


# -- groups while mounted -----------------------------------------------------------------------


async def test_group_membership_and_rotation_while_mounted(tmp_path: Path) -> None:
    store = MemoryStore("b")
    alice_groups = Groups(store, ALICE, Trust.of(ALICE.recipient, []))
    team1 = (await alice_groups.create("team", [CAROL.recipient])).recipient
    await put_as(store, ALICE, "team/one.txt", b"one " + CANARY, [team1])
    async with client(store, BOB, tmp_path / "bob", contacts={"alice": ALICE}) as bob:
        assert bob.sharing.group_identities == ()
        await fails(bob.fs.read_file("team/one.txt"), errno.EACCES)
        # Alice adds Bob: his next open loads the group keys again and succeeds.
        await alice_groups.add("team", [BOB.recipient])
        assert await bob.fs.read_file("team/one.txt") == b"one " + CANARY
        assert bob.refresher.changes == 1
        # Alice removes Carol: the key rotates; a file for the new key opens for Bob too.
        team2 = (await alice_groups.remove("team", [CAROL.recipient.key_id])).recipient
        assert team2 != team1
        await put_as(store, ALICE, "team/two.txt", b"two", [team2])
        assert await bob.fs.read_file("team/two.txt") == b"two"
        assert await bob.fs.read_file("team/one.txt") == b"one " + CANARY
        assert bob.refresher.changes == 2
        # A file for nobody Bob is stays refused, and costs no change.
        await put_as(store, ALICE, "team/private.txt", b"alice only", [])
        await fails(bob.fs.read_file("team/private.txt"), errno.EACCES)
        assert bob.refresher.changes == 2
        # mtime/mode of a file Bob reads only through the group: a header rewrite.
        await bob.fs.setattr("team/two.txt", mtime_ns=1_000_000_000, mode=0o600)
        info = await bob.encstore.header("team/two.txt")
        assert (info.mtime_ns, info.mode & 0o777) == (1_000_000_000, 0o600)
        assert info.writer == ALICE.recipient.ed25519  # the writer stays Alice
        assert await bob.fs.read_file("team/two.txt") == b"two"


async def test_refresher_rate_limit_and_shared_reload() -> None:
    store = MemoryStore("b")
    alice_groups = Groups(store, ALICE, Trust.of(ALICE.recipient, []))
    await alice_groups.create("team")
    bob_trust = Trust.of(BOB.recipient, [Contact("alice", ALICE.recipient)])
    sharing = await Sharing.load(store, BOB, bob_trust)
    encstore = EncryptedStore(store, BOB)
    now = [100.0]
    refresher = GroupRefresher(sharing, encstore, 10.0, clock=lambda: now[0])
    assert not await refresher()  # nothing new
    await alice_groups.add("team", [BOB.recipient])
    assert not await refresher()  # within the interval: no reload at all
    now[0] += 10.0
    results: list[bool] = []

    async def call() -> None:
        results.append(await refresher())

    async with trio.open_nursery() as nursery:  # two opens at once: one reload, both told
        nursery.start_soon(call)
        nursery.start_soon(call)
    assert results == [True, True] and refresher.changes == 1
    assert len(encstore.identities) == 2


@dataclass(frozen=True)
class Contact:
    name: str
    recipient: Recipient


# -- xattrs of a pending file -------------------------------------------------------------------


async def test_pending_file_xattrs_show_its_folder_policy(tmp_path: Path) -> None:
    store = MemoryStore("b")
    async with client(store, ALICE, tmp_path / "alice", contacts={"bob": BOB},
                      settle_s=3600.0) as alice:
        await alice.fs.mkdir("shared")
        report = await alice.sharing.share("shared", [BOB.recipient])
        assert report.policies
        await alice.fs.write_file("shared/new.txt", b"pending")
        await alice.fs.write_file("solo.txt", b"pending too")
        assert alice.journal.pending("shared/new.txt") is not None  # not uploaded yet
        shown = await alice.fs.getxattr("shared/new.txt", "user.cssfs.recipients")
        ids = {bytes.fromhex(h) for h in shown.decode().split(",")}
        assert ids == {ALICE.recipient.key_id, BOB.recipient.key_id}
        solo = await alice.fs.getxattr("solo.txt", "user.cssfs.recipients")
        assert solo.decode() == ALICE.recipient.key_id.hex()
        assert await alice.fs.getxattr("shared/new.txt", "user.cssfs.signature") == b"valid"
        await alice.journal.flush()
        # Uploaded: the header says the same.
        stored = await alice.fs.getxattr("shared/new.txt", "user.cssfs.recipients")
        assert {bytes.fromhex(h) for h in stored.decode().split(",")} == ids


# -- the option on a real mount -----------------------------------------------------------------


@pytest.mark.fuse
@pytest.mark.skipif(not fuse_available()[0], reason=fuse_available()[1])
def test_real_mount_trusted_writers_only(tmp_path: Path) -> None:
    """`cssfs mount --trusted-writers-only` over a folder store: the option reaches the daemon."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    trio.run(put_as, LocalStore(bucket), ALICE, "x.txt", CANARY, [BOB.recipient])
    bob_id = tmp_path / "bob.id"
    bob_id.write_bytes(BOB.to_file(None))
    bob_id.chmod(0o600)
    with mounted(os.fspath(bucket), tmp_path / "mnt", bob_id,
                 args=["--trusted-writers-only"]) as m:
        m.allow(r"WARNING cssfs\.fs: object x\.txt was written by someone untrusted")
        path = m.path("x.txt")
        with pytest.raises(PermissionError):
            path.read_bytes()
        assert os.getxattr(path, "user.cssfs.signature") == b"unknown writer"
        write_contacts(Path(m.env["XDG_CONFIG_HOME"]) / "cssfs" / "contacts", {"alice": ALICE})
        assert path.read_bytes() == CANARY
        assert os.getxattr(path, "user.cssfs.writer") == b"alice"


# -- header capacity ------------------------------------------------------------------------------


async def test_share_refuses_a_policy_no_file_could_be_written_under() -> None:
    store = MemoryStore("b")
    await put_as(store, ALICE, "d/x.txt", b"x", [])
    sharing = Sharing(store, ALICE, Trust.of(ALICE.recipient))
    many = [Identity.generate().recipient for _ in range(43)]  # + Alice: 44 stanzas
    with pytest.raises(ConfigError, match=r"too many readers .* share with a group instead"):
        await sharing.share("d", many)
    assert [o.key for o in (await store.list("d/")).objects] == ["d/x.txt"]  # no policy
    report = await sharing.share("d", many[:42])  # 43 stanzas: fits
    assert report.changed == ["d/x.txt"] and not report.failed


async def test_share_and_access_skip_folder_markers(tmp_path: Path) -> None:
    """mkdir in a mount writes a marker object ``shared/``: not a file not to share."""
    store = MemoryStore("b")
    async with client(store, ALICE, tmp_path / "alice", contacts={"bob": BOB}) as alice:
        await alice.fs.mkdir("shared")
        await alice.fs.write_file("shared/a.txt", b"a")
        await alice.journal.flush()
        report = await alice.sharing.share("shared", [BOB.recipient])
        assert report.changed == ["shared/a.txt"] and not report.foreign
        access = await alice.sharing.access("shared")
        assert [f.key for f in access.files] == ["shared/a.txt"]
