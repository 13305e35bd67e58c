"""folderattrs: the signed per-folder record of mtimes and modes (format, trust, merging)."""

from __future__ import annotations

import pytest
import trio

from cssfs.errors import FormatError, SignatureError
from cssfs.folderattrs import NAME, FileAttrs, FolderAttrs, decode, encode, folder_of, record_key
from cssfs.keys import Identity
from cssfs.store.memory import MemoryStore

ALICE = Identity.generate()
BOB = Identity.generate()
A1 = FileAttrs("etag-1", 4113, 1_700_000_000_123_456_789, 0o640)
A2 = FileAttrs("etag-2", 4096, 5, 0o755)


def test_names() -> None:
    assert record_key("") == NAME and record_key("a/b/") == "a/b/" + NAME
    assert folder_of("x") == "" and folder_of("a/b/x") == "a/b/"


def test_round_trip_and_what_it_refuses() -> None:
    data = encode("pre/docs/", {"r.txt": A1, "name with spaces ü": A2}, ALICE)
    signer, entries = decode(data, "pre/docs/")
    assert signer == ALICE.recipient.ed25519
    assert entries == {"r.txt": A1, "name with spaces ü": A2}
    with pytest.raises(FormatError):
        decode(data, "pre/other/")  # a copy moved to another folder
    i = data.index(b"1700000000123456789")
    with pytest.raises(SignatureError):
        decode(data[:i] + b"2" + data[i + 1 :], "pre/docs/")  # an mtime changed
    for bad in (b"", b"cssfs-attrs v1\n", b"cssfs-attrs v2\n{}\nsignature AAAA\n",
                data[:-1], data.replace(b"signature ", b"signatur ")):
        with pytest.raises(FormatError):
            decode(bad, "pre/docs/")


async def test_load_trusts_only_you_and_contacts_and_matching_versions() -> None:
    store = MemoryStore()
    await store.put("d/" + NAME, encode("d/", {"a": A1, "b": A2}, BOB))
    etag = (await store.head("d/" + NAME)).etag
    listed = {"a": (A1.etag, A1.cipher_size), "b": ("changed", A2.cipher_size)}
    stranger = FolderAttrs(store, ALICE)
    assert await stranger.load("d/", etag, listed) == {}
    friend = FolderAttrs(store, ALICE, is_trusted=lambda k: k == BOB.recipient.ed25519)
    assert await friend.load("d/", etag, listed) == {"a": A1}  # b changed since: not used
    gets = store.stats.requests["get"]
    assert await friend.load("d/", etag, listed) == {"a": A1}
    assert store.stats.requests["get"] == gets  # same version: not fetched again
    assert await friend.load("d/", None, listed) == {}


async def test_writers_merge_and_never_lose_each_others_entries() -> None:
    store = MemoryStore()
    trust = {ALICE.recipient.ed25519, BOB.recipient.ed25519}
    alice = FolderAttrs(store, ALICE, is_trusted=trust.__contains__, delay_s=0)
    bob = FolderAttrs(store, BOB, is_trusted=trust.__contains__, delay_s=0)
    alice.note("d/a", A1)
    before = dict(store.stats.requests)
    await alice.flush()
    # A folder with no record: created with one conditional PUT, nothing read first.
    assert {k: v - before.get(k, 0) for k, v in store.stats.requests.items()
            if v != before.get(k, 0)} == {"put": 1}
    bob.note("d/b", A2)
    await bob.flush()  # bob never read alice's record: his create fails, he reads and merges
    _, entries = decode(await store.get("d/" + NAME), "d/")
    assert entries == {"a": A1, "b": A2}
    alice.note("d/c", A1)
    alice.note("d/a", None)  # removed
    await alice.flush()  # its cached version is stale: the conditional PUT fails, it merges
    _, entries = decode(await store.get("d/" + NAME), "d/")
    assert entries == {"b": A2, "c": A1}
    assert alice.writes == 2 and bob.writes == 1


async def test_background_writes_are_debounced_and_a_removed_folder_stays_removed() -> None:
    store = MemoryStore()
    attrs = FolderAttrs(store, ALICE, delay_s=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(attrs.run)
        for i in range(20):
            attrs.note(f"x/f{i}", A1)
        await trio.sleep(0.3)
        assert attrs.writes == 1
        attrs.note("gone/f", A1)
        await attrs.forget_below("gone/")
        await trio.sleep(0.3)
        assert not [o for o in (await store.list("gone/")).objects]
        nursery.cancel_scope.cancel()
    _, entries = decode(await store.get("x/" + NAME), "x/")
    assert len(entries) == 20
