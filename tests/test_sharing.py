"""sharing: policies in the bucket, share (header only), unshare (rekey), access, resumability."""

from __future__ import annotations

import dataclasses
import io
import logging
import os

import pytest
import trio

from cssfs.envelope import (
    HEADER_SIZE,
    object_binding,
    open_header,
    parse_header,
)
from cssfs.envstream import decrypt_stream, encrypt_stream
from cssfs.errors import ConfigError, NoIdentityMatchError
from cssfs.keys import Identity, Recipient
from cssfs.policy import Trust, make_policy, parse_policy, policy_key
from cssfs.sharing import ShareProgress, Sharing, signature_status
from cssfs.store.base import ObjectStore
from cssfs.store.memory import MemoryStore

ALICE = Identity.generate()
BOB = Identity.generate()
CAROL = Identity.generate()
DAVE = Identity.generate()


class Interrupted(Exception):
    pass


class Contact:
    def __init__(self, name: str, recipient: Recipient) -> None:
        self.name = name
        self.recipient = recipient


def trust_of(me: Identity, *others: tuple[str, Identity]) -> Trust:
    return Trust.of(me.recipient, [Contact(n, i.recipient) for n, i in others])


ALICE_TRUST = trust_of(ALICE, ("bob", BOB), ("carol", CAROL), ("dave", DAVE))
BOB_TRUST = trust_of(BOB, ("alice", ALICE))


async def put_file(store: ObjectStore, key: str, data: bytes, writer: Identity = ALICE,
                   recipients: tuple[Recipient, ...] = ()) -> None:
    out = io.BytesIO()
    await trio.to_thread.run_sync(
        lambda: encrypt_stream(io.BytesIO(data), out, writer, recipients,
                               binding=object_binding(store.full_key(key)), mtime_ns=123,
                               mode=0o640)
    )
    await store.put(key, out.getvalue())


async def read_file(store: ObjectStore, key: str, identity: Identity) -> bytes:
    data = await store.get(key)
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(data), out, identity, binding=object_binding(store.full_key(key)))
    return out.getvalue()


@pytest.fixture
def mem() -> MemoryStore:
    """A memory store with a prefix (policies name folders inside the bucket: "root/...")."""
    return MemoryStore("root")


async def test_no_policy_uses_defaults(mem: MemoryStore) -> None:
    s = Sharing(mem, ALICE, ALICE_TRUST, default_recipients=[DAVE.recipient])
    assert await s.resolve_recipients("a/b/c.txt") == [DAVE.recipient]


async def test_policy_inherited_nearest_wins(mem: MemoryStore) -> None:
    await mem.put(policy_key(""), make_policy(ALICE, "root", 1, [BOB.recipient]).to_bytes())
    await mem.put(policy_key("a/b"),
                    make_policy(ALICE, "root/a/b", 1, [CAROL.recipient]).to_bytes())
    s = Sharing(mem, ALICE, ALICE_TRUST)
    assert await s.resolve_recipients("x.txt") == [BOB.recipient]
    assert await s.resolve_recipients("a/x.txt") == [BOB.recipient]
    assert await s.resolve_recipients("a/b/x.txt") == [CAROL.recipient]
    assert await s.resolve_recipients("a/b/c/d/x.txt") == [CAROL.recipient]


async def test_a_listing_or_a_new_folder_settles_policy_lookups(mem: MemoryStore) -> None:
    """What a LIST of the folder showed (no policy, or the version we checked) and a folder we
    just made stand in for the HEAD until the ttl runs out; a new version is still fetched."""
    now = [100.0]
    s = Sharing(mem, ALICE, ALICE_TRUST, ttl=2.0, clock=lambda: now[0])
    s.note_listing("", None, started=99.5)  # the root, listed half a second ago: no policy
    s.note_listing("a", None, started=99.5)
    s.note_new_folder("a/b")
    heads = mem.stats.requests.get("head", 0)
    assert await s.resolve_recipients("a/b/x.txt") == []
    assert mem.stats.requests.get("head", 0) == heads
    now[0] = 101.6  # the root's and a's listings are too old now: asked again
    await mem.put(policy_key("a"), make_policy(ALICE, "root/a", 1, [BOB.recipient]).to_bytes())
    assert await s.resolve_recipients("a/b/x.txt") == [BOB.recipient]
    etag = (await mem.head(policy_key("a"))).etag
    heads = mem.stats.requests.get("head", 0)
    now[0] = 103.0
    s.note_listing("a/b", None, started=102.9)
    s.note_listing("a", etag, started=102.9)  # the version checked already: no HEAD
    assert await s.resolve_recipients("a/b/x.txt") == [BOB.recipient]
    assert mem.stats.requests.get("head", 0) == heads
    await mem.put(policy_key("a"), make_policy(ALICE, "root/a", 2, [CAROL.recipient]).to_bytes())
    new_etag = (await mem.head(policy_key("a"))).etag
    now[0] = 105.5
    s.note_listing("a/b", None, started=105.4)
    s.note_listing("a", new_etag, started=105.4)  # a new version: fetched and checked
    assert await s.resolve_recipients("a/b/x.txt") == [CAROL.recipient]
    s.note_listing("a", None, started=90.0)  # an older LIST never replaces a fresher answer
    assert await s.resolve_recipients("a/b/x.txt") == [CAROL.recipient]


async def test_untrusted_or_tampered_policy_not_followed(mem: MemoryStore, caplog) -> None:
    await mem.put(policy_key(""), make_policy(ALICE, "root", 1, [BOB.recipient]).to_bytes())
    # Carol (not Bob's contact) sets a policy for "a": Bob falls back to the root policy.
    await mem.put(policy_key("a"), make_policy(CAROL, "root/a", 1, [CAROL.recipient]).to_bytes())
    bob = Sharing(mem, BOB, BOB_TRUST)
    with caplog.at_level(logging.WARNING, logger="cssfs.sharing"):
        assert await bob.resolve_recipients("a/x") == [BOB.recipient]
    assert "root/a/.cssfs-policy" in caplog.text or "a/.cssfs-policy" in caplog.text
    assert "not you or one of your contacts" in caplog.text
    # Tamper with the root policy: nothing followed, defaults apply.
    data = await mem.get(policy_key(""))
    forged = data.replace(b"version 1", b"version 2")
    await mem.put(policy_key(""), forged)
    bob = Sharing(mem, BOB, BOB_TRUST, default_recipients=[ALICE.recipient])
    with caplog.at_level(logging.WARNING, logger="cssfs.sharing"):
        assert await bob.resolve_recipients("a/x") == [ALICE.recipient]
    assert "signature does not verify" in caplog.text


async def test_policy_from_another_folder_not_followed(mem: MemoryStore, caplog) -> None:
    data = make_policy(ALICE, "root/public", 1, [CAROL.recipient]).to_bytes()
    await mem.put(policy_key("private"), data)
    s = Sharing(mem, ALICE, ALICE_TRUST)
    with caplog.at_level(logging.WARNING, logger="cssfs.sharing"):
        assert await s.resolve_recipients("private/x") == []
    assert "another folder" in caplog.text


async def test_policy_rollback_not_followed(mem: MemoryStore, caplog) -> None:
    v1 = make_policy(ALICE, "root/d", 1, [BOB.recipient]).to_bytes()
    v2 = make_policy(ALICE, "root/d", 2, [CAROL.recipient]).to_bytes()
    await mem.put(policy_key("d"), v2)
    s = Sharing(mem, ALICE, ALICE_TRUST, ttl=0.0)
    assert await s.resolve_recipients("d/x") == [CAROL.recipient]
    await mem.put(policy_key("d"), v1)  # the bucket serves an old, validly signed policy
    with caplog.at_level(logging.WARNING, logger="cssfs.sharing"):
        assert await s.resolve_recipients("d/x") == []
    assert "older than version 2" in caplog.text


async def test_share_reseals_headers_only_and_is_idempotent(store: ObjectStore) -> None:
    big = bytes(range(256)) * 4096 * 3  # 3 MiB
    await put_file(store, "docs/big.bin", big)
    await put_file(store, "docs/sub/small.txt", b"hello")
    await put_file(store, "other/x.txt", b"not shared")
    before = {k: await store.get(k) for k in ("docs/big.bin", "docs/sub/small.txt")}
    s = Sharing(store, ALICE, ALICE_TRUST)
    seen: list[ShareProgress] = []
    report = await s.share("docs", [BOB.recipient], progress=seen.append)
    assert sorted(report.changed) == ["docs/big.bin", "docs/sub/small.txt"]
    assert report.complete
    assert seen[-1].files_done == seen[-1].files_total == 2
    for key, old in before.items():
        new = await store.get(key)
        assert new[HEADER_SIZE:] == old[HEADER_SIZE:]  # payload untouched
        assert new[:HEADER_SIZE] != old[:HEADER_SIZE]
        # The writer stays Alice, the signature still verifies.
        assert parse_header(new[:HEADER_SIZE]).writer == ALICE.recipient.ed25519
    assert await read_file(store, "docs/big.bin", BOB) == big
    assert await read_file(store, "docs/sub/small.txt", BOB) == b"hello"
    with pytest.raises(NoIdentityMatchError):
        await read_file(store, "other/x.txt", BOB)
    # The folder's policy now names Alice and Bob; new files there are for Bob too.
    policy = parse_policy(await store.get(policy_key("docs")))
    assert {r.key_id for r in policy.recipients} == {ALICE.recipient.key_id, BOB.recipient.key_id}
    assert BOB.recipient in await s.resolve_recipients("docs/new.txt")
    # Again: nothing to do.
    again = await s.share("docs", [BOB.recipient])
    assert again.changed == [] and sorted(again.already) == sorted(before)
    assert again.policies == []


async def test_share_resumes_after_interruption(mem: MemoryStore) -> None:
    for i in range(6):
        await put_file(mem, f"d/f{i}", b"x" * i)
    s = Sharing(mem, ALICE, ALICE_TRUST)

    calls = [0]
    real = mem.replace_head

    async def flaky(*args, **kwargs):
        calls[0] += 1
        result = await real(*args, **kwargs)
        if calls[0] >= 3:
            raise Interrupted  # the run stops half-way, after this header was written
        return result

    mem.replace_head = flaky  # type: ignore[method-assign]
    with pytest.raises(BaseExceptionGroup):
        await s.share("d", [BOB.recipient])
    mem.replace_head = real  # type: ignore[method-assign]
    report = await s.share("d", [BOB.recipient])
    assert len(report.already) >= 1 and len(report.changed) + len(report.already) == 6
    for i in range(6):
        assert await read_file(mem, f"d/f{i}", BOB) == b"x" * i


async def test_share_skips_files_we_cannot_open(store: ObjectStore) -> None:
    await put_file(store, "d/carols", b"secret", writer=CAROL)
    await put_file(store, "d/mine", b"mine")
    report = await Sharing(store, ALICE, ALICE_TRUST).share("d", [BOB.recipient])
    assert report.not_readable == ["d/carols"]
    assert report.changed == ["d/mine"]


async def test_share_concurrent_change_is_not_overwritten(mem: MemoryStore) -> None:
    await put_file(mem, "d/f", b"v1")
    s = Sharing(mem, ALICE, ALICE_TRUST)
    real_get = mem.get
    changed = [False]

    async def get_then_change(key, start=0, end=None):
        data = await real_get(key, start, end)
        if key == "d/f" and end == HEADER_SIZE and not changed[0]:
            changed[0] = True
            await put_file(mem, "d/f", b"v2 by someone else")
        return data

    mem.get = get_then_change  # type: ignore[method-assign]
    report = await s.share("d", [BOB.recipient])
    mem.get = real_get  # type: ignore[method-assign]
    assert report.changed == ["d/f"]
    assert await read_file(mem, "d/f", BOB) == b"v2 by someone else"


async def test_unshare_rekeys(store: ObjectStore) -> None:
    data = bytes(range(256)) * 1000  # 250 KiB: several chunks
    await put_file(store, "d/a", data, recipients=(BOB.recipient, CAROL.recipient))
    await put_file(store, "d/b", b"b", recipients=(CAROL.recipient,))
    s = Sharing(store, ALICE, ALICE_TRUST)
    await s.share("d", [BOB.recipient, CAROL.recipient])
    old_key = open_header((await store.get("d/a"))[:HEADER_SIZE], ALICE).file_key
    report = await s.unshare("d", [BOB.recipient])
    assert sorted(report.changed) == ["d/a", "d/b"]  # the share gave d/b a stanza for Bob too
    assert report.complete
    for key in ("d/a",):
        head = parse_header((await store.get(key))[:HEADER_SIZE])
        assert BOB.recipient.key_id not in head.key_ids
        assert CAROL.recipient.key_id in head.key_ids
        assert head.writer == ALICE.recipient.ed25519
        assert (head.mtime_ns, head.mode) == (123, 0o640)
    assert open_header((await store.get("d/a"))[:HEADER_SIZE], ALICE).file_key != old_key
    assert await read_file(store, "d/a", ALICE) == data
    assert await read_file(store, "d/a", CAROL) == data
    with pytest.raises(NoIdentityMatchError):
        await read_file(store, "d/a", BOB)
    assert BOB.recipient not in await s.resolve_recipients("d/new")
    again = await s.unshare("d", [BOB.recipient])
    assert again.changed == []


async def test_unshare_all_files_shared_by_share(store: ObjectStore) -> None:
    for i in range(3):
        await put_file(store, f"d/{i}", b"z" * (70000 * i))
    s = Sharing(store, ALICE, ALICE_TRUST)
    await s.share("d", [BOB.recipient])
    report = await s.unshare("d", [BOB.recipient])
    assert sorted(report.changed) == ["d/0", "d/1", "d/2"]
    for i in range(3):
        assert await read_file(store, f"d/{i}", ALICE) == b"z" * (70000 * i)
        with pytest.raises(NoIdentityMatchError):
            await read_file(store, f"d/{i}", BOB)


async def test_unshare_resumes(mem: MemoryStore) -> None:
    for i in range(5):
        await put_file(mem, f"d/{i}", b"q" * 1000, recipients=(BOB.recipient,))
    s = Sharing(mem, ALICE, ALICE_TRUST)
    real = mem.put
    puts = [0]

    async def flaky(key, body, **kw):
        result = await real(key, body, **kw)
        if key.startswith("d/") and not key.endswith("policy"):
            puts[0] += 1
            if puts[0] >= 2:
                raise Interrupted  # after this file was rekeyed
        return result

    mem.put = flaky  # type: ignore[method-assign]
    with pytest.raises(BaseExceptionGroup):
        await s.unshare("d", [BOB.recipient])
    mem.put = real  # type: ignore[method-assign]
    report = await s.unshare("d", [BOB.recipient])
    assert len(report.already) >= 1
    for i in range(5):
        with pytest.raises(NoIdentityMatchError):
            await read_file(mem, f"d/{i}", BOB)


async def test_unshare_unknown_recipient_is_reported(mem: MemoryStore, caplog) -> None:
    stranger = Identity.generate()
    await put_file(mem, "d/f", b"f", recipients=(BOB.recipient, stranger.recipient))
    s = Sharing(mem, ALICE, ALICE_TRUST)
    with caplog.at_level(logging.WARNING, logger="cssfs.sharing"):
        report = await s.unshare("d", [BOB.recipient])
    assert report.dropped == {"d/f": [stranger.recipient.key_id.hex()]}
    assert "unknown keys lost access" in caplog.text


async def test_cannot_unshare_yourself(mem: MemoryStore) -> None:
    with pytest.raises(ConfigError):
        await Sharing(mem, ALICE, ALICE_TRUST).unshare("d", [ALICE.recipient])


async def test_share_updates_sub_folder_policies(mem: MemoryStore) -> None:
    s = Sharing(mem, ALICE, ALICE_TRUST)
    await s.share("d/sub", [CAROL.recipient])
    await s.share("d", [BOB.recipient])
    sub = parse_policy(await mem.get(policy_key("d/sub")))
    assert {r.key_id for r in sub.recipients} >= {BOB.recipient.key_id, CAROL.recipient.key_id}
    await s.unshare("d", [BOB.recipient])
    sub = parse_policy(await mem.get(policy_key("d/sub")))
    assert BOB.recipient.key_id not in {r.key_id for r in sub.recipients}
    assert CAROL.recipient in await s.resolve_recipients("d/sub/x")


async def test_access_names_readers(store: ObjectStore) -> None:
    stranger = Identity.generate()
    await put_file(store, "d/a", b"a", recipients=(stranger.recipient,))
    await put_file(store, "d/b", b"b", writer=stranger, recipients=(ALICE.recipient,))
    await store.put("d/junk", b"not an envelope")
    s = Sharing(store, ALICE, ALICE_TRUST)
    shared = await s.share("d", [BOB.recipient])
    assert shared.foreign == ["d/junk"] and not shared.failed
    report = await s.access("d")
    assert report.applies is not None and report.applies.followed
    assert {r.name for r in report.readers} == {"me", "bob"}
    files = {f.key: f for f in report.files}
    a = files["d/a"]
    assert a.writer == "me" and a.signature == "valid" and a.readable
    names = {r.name for r in a.readers}
    assert {"me", "bob", None} == names
    assert any(r.label().startswith("unknown (key id ") for r in a.readers)
    b = files["d/b"]
    assert b.signature == "unknown writer" and b.writer is not None
    assert b.writer.startswith("ed25519:")
    assert files["d/junk"].signature == "not an envelope"


async def test_signature_status(mem: MemoryStore) -> None:
    await put_file(mem, "f", b"x", writer=BOB)
    header = parse_header((await mem.get("f"))[:HEADER_SIZE])
    assert signature_status(header, ALICE_TRUST) == "valid"
    assert signature_status(header, trust_of(ALICE)) == "unknown writer"
    forged = dataclasses.replace(header, signature=bytes(64))
    assert signature_status(forged, ALICE_TRUST) == "invalid"


# -- the command line -------------------------------------------------------------------------


def _cli_setup(tmp_path, monkeypatch):
    from cssfs import config
    from cssfs.store.local import LocalStore

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("CSSFS_IDENTITY", raising=False)
    ident = tmp_path / "alice.id"
    ident.write_bytes(ALICE.to_file(None))
    ident.chmod(0o600)
    book = config.Contacts.load()
    book.add("bob", BOB.recipient)
    book.add("carol", CAROL.recipient)
    book.save()
    root = tmp_path / "store"
    root.mkdir()

    async def fill() -> None:
        store = LocalStore(str(root))
        await put_file(store, "docs/a.txt", b"a" * 100)
        await put_file(store, "docs/sub/b.txt", b"b" * 70000)
        await store.aclose()

    trio.run(fill)
    return str(ident), f"file://{root}", root


def _read_local(root, key: str, identity: Identity) -> bytes:
    from cssfs.store.local import LocalStore

    async def go() -> bytes:
        store = LocalStore(str(root))
        try:
            return await read_file(store, key, identity)
        finally:
            await store.aclose()

    return trio.run(go)


def test_cli_share_access_unshare_group(tmp_path, monkeypatch, capsys) -> None:
    from cssfs import cli

    ident, url, root = _cli_setup(tmp_path, monkeypatch)

    def run(*argv: str) -> str:
        rc = cli.main(["-i", ident, *argv])
        out, err = capsys.readouterr()
        assert (rc, err) == (0, ""), (argv, rc, err)
        return out

    out = run("share", "--store", url, "docs", "bob")
    assert "docs: 2 file(s) shared, 0 already done" in out
    assert _read_local(root, "docs/sub/b.txt", BOB) == b"b" * 70000
    out = run("access", "--store", url, "docs")
    assert f"bob ({BOB.recipient.fingerprint})" in out
    assert "docs/a.txt: written by me (valid)" in out
    out = run("share", "--store", url, "docs", "bob")
    assert "0 file(s) shared, 2 already done" in out
    out = run("unshare", "--store", url, "docs", "bob")
    assert "2 file(s) re-encrypted" in out
    with pytest.raises(NoIdentityMatchError):
        _read_local(root, "docs/a.txt", BOB)

    out = run("group", "create", "--store", url, "team", "carol")
    assert "group:team created, 2 member(s)" in out
    out = run("group", "list", "--store", url)
    assert "group:team" in out and "you are a member" in out and "carol" in out
    out = run("share", "--store", url, "docs", "group:team")
    assert "2 file(s) shared" in out
    out = run("group", "add", "--store", url, "team", "bob")
    assert "1 new member(s)" in out
    out = run("group", "remove", "--store", url, "team", "bob")
    assert "generation 2" in out

    # Errors: one line, a non-zero code.
    rc = cli.main(["-i", ident, "share", "--store", url, "docs", "nobody"])
    _, err = capsys.readouterr()
    assert rc == cli.ExitCode.CONFIG and err.count("\n") == 1 and "nobody" in err
    rc = cli.main(["-i", ident, "share", "--store", url, "docs", "group:nope"])
    _, err = capsys.readouterr()
    assert rc == cli.ExitCode.CONFIG and "nope" in err


def test_mount_target_from_proc_mounts(tmp_path) -> None:
    from cssfs.cmd_share import Target, cssfs_mounts, mount_target, resolve_target

    mnt = tmp_path / "my mnt"
    (mnt / "docs" / "deep").mkdir(parents=True)
    escaped = str(mnt).replace(" ", "\\040")
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "proc /proc proc rw 0 0\n"
        f"cssfs:s3://bucket/pre {escaped} fuse.cssfs rw,nosuid 0 0\n"
        f"other {escaped}/docs fuse.sshfs rw 0 0\n"
    )
    assert cssfs_mounts(str(mounts)) == [(str(mnt), "s3://bucket/pre")]
    assert mount_target(str(mnt / "docs" / "deep"), str(mounts)) == Target(
        "s3://bucket/pre", "docs/deep")
    assert mount_target(str(mnt), str(mounts)) == Target("s3://bucket/pre", "")
    assert mount_target(str(tmp_path), str(mounts)) is None
    assert resolve_target(str(mnt / "docs"), None, str(mounts)) == Target(
        "s3://bucket/pre", "docs")
    assert resolve_target("s3://b/p", None, str(mounts)) == Target("s3://b/p", "")
    assert resolve_target("x/y/", "s3://b", str(mounts)) == Target("s3://b", "x/y")
    assert resolve_target("deep", str(mnt / "docs"), str(mounts)) == Target(
        "s3://bucket/pre", "docs/deep")


# -- on S3 (moto over HTTP): sharing a multi-MiB file uploads about a part, not the file -------


@pytest.mark.s3
async def test_share_on_s3_sends_header_not_payload(s3_bucket) -> None:
    from cssfs.store.s3 import S3Store

    store = S3Store(s3_bucket.bucket, "pfx", endpoint_url=s3_bucket.endpoint, path_style=True)
    try:
        size = 12 * 1024 * 1024
        data = os.urandom(1024) * (size // 1024)
        await put_file(store, "d/big.bin", data)
        await put_file(store, "d/small.txt", b"small")
        obj = await store.head("d/big.bin")
        s = Sharing(store, ALICE, ALICE_TRUST)
        store.stats.reset()
        report = await s.share("d", [BOB.recipient])
        assert sorted(report.changed) == ["d/big.bin", "d/small.txt"]
        sent = store.stats.bytes_sent
        assert sent < 6 * 1024 * 1024 < obj.size // 2, sent  # the first part at most
        assert store.stats.requests["upload_part_copy"] >= 1
        assert await read_file(store, "d/big.bin", BOB) == data
        # Unshare re-encrypts: everything goes up again, under a new file key.
        store.stats.reset()
        report = await s.unshare("d", [BOB.recipient])
        assert sorted(report.changed) == ["d/big.bin", "d/small.txt"]
        assert store.stats.bytes_sent >= obj.size
        assert await read_file(store, "d/big.bin", ALICE) == data
        with pytest.raises(NoIdentityMatchError):
            await read_file(store, "d/big.bin", BOB)
    finally:
        await store.aclose()


# -- the EncryptedStore hooks the mount uses ------------------------------------------------------


async def test_encstore_hooks_policy_recipients_and_group_identities(mem: MemoryStore) -> None:
    from cssfs.encstore import EncryptedStore
    from cssfs.groups import Groups

    alice_trust = ALICE_TRUST
    await Groups(mem, ALICE, alice_trust).create("team", [BOB.recipient])
    sharing = await Sharing.load(mem, ALICE, alice_trust)
    await sharing.share("shared", [CAROL.recipient], groups=["team"])
    es = EncryptedStore(mem, ALICE, recipients_for=sharing.resolve_recipients)
    await es.put("shared/new.txt", b"for the folder")
    await es.put("private/own.txt", b"for me")
    head = parse_header((await mem.get("shared/new.txt"))[:HEADER_SIZE])
    team = await sharing.group_recipient("team")
    assert team is not None
    assert set(head.key_ids) == {ALICE.recipient.key_id, CAROL.recipient.key_id, team.key_id}
    head = parse_header((await mem.get("private/own.txt"))[:HEADER_SIZE])
    assert head.key_ids == (ALICE.recipient.key_id,)
    # Bob reads through the group key he holds, not through a stanza of his own.
    bob_sharing = await Sharing.load(mem, BOB, BOB_TRUST)
    bob = EncryptedStore(mem, BOB, identities=[g.identity for g in bob_sharing.group_identities])
    f = await bob.open("shared/new.txt")
    assert await f.read(0, 100) == b"for the folder"
    with pytest.raises(NoIdentityMatchError):
        await bob.open("private/own.txt")


@pytest.mark.expect_logs("not followed")
async def test_share_replaces_a_tampered_policy_of_the_folder(mem: MemoryStore) -> None:
    s = Sharing(mem, ALICE, ALICE_TRUST)
    await s.share("d", [BOB.recipient])
    data = await mem.get(policy_key("d"))
    await mem.put(policy_key("d"), data.replace(b"version 1", b"version 7"))  # forged
    report = await s.share("d", [CAROL.recipient])
    assert report.policies == [policy_key("d")] and not report.policies_skipped
    policy = parse_policy(await mem.get(policy_key("d")))
    policy.verify()
    assert policy.version == 8  # above the forged version: no reader can prefer the forgery
    # Only what Alice chose: the forged policy's contents were not inherited.
    assert {r.key_id for r in policy.recipients} == {ALICE.recipient.key_id, CAROL.recipient.key_id}


@pytest.mark.expect_logs("not you or one of your contacts")
async def test_trust_source_is_read_again_when_policies_are(mem: MemoryStore) -> None:
    await mem.put(policy_key("d"), make_policy(ALICE, "root/d", 1, [ALICE.recipient]).to_bytes())
    current = [trust_of(BOB)]  # Bob does not know Alice yet
    bob = Sharing(mem, BOB, lambda: current[0], ttl=0.0)
    assert await bob.resolve_recipients("d/x") == []
    current[0] = BOB_TRUST  # he adds her to his contacts while mounted
    assert await bob.resolve_recipients("d/x") == [ALICE.recipient]
