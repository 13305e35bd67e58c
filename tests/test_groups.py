"""groups: create/add/remove (rotation), records and trust, the identity set, 100 members."""

from __future__ import annotations

import contextlib
import io
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cssfs.envelope import HEADER_SIZE, object_binding, open_any, parse_header
from cssfs.envstream import encrypt_stream
from cssfs.errors import ConfigError, FormatError, NoIdentityMatchError
from cssfs.groups import (
    GroupKeys,
    Groups,
    check_group_record,
    make_group_record,
    member_key,
    parse_group_keys,
    parse_group_record,
    parse_roster,
    record_key,
    roster_bytes,
)
from cssfs.keys import Identity, Recipient
from cssfs.policy import Trust
from cssfs.sharing import Sharing
from cssfs.store.base import ObjectStore
from cssfs.store.memory import MemoryStore

ALICE = Identity.generate()
BOB = Identity.generate()
CAROL = Identity.generate()


class Contact:
    def __init__(self, name: str, recipient: Recipient) -> None:
        self.name = name
        self.recipient = recipient


def trust(me: Identity, *others: Identity) -> Trust:
    return Trust.of(me.recipient, [Contact(f"c{i}", o.recipient) for i, o in enumerate(others)])


async def read_with(store: ObjectStore, key: str, identities) -> bytes:
    """Open an envelope with a reader's identity set (own + group keys)."""
    data = await store.get(key)
    _opened, identity = open_any(data[:HEADER_SIZE], identities,
                                binding=object_binding(store.full_key(key)))
    from cssfs.envstream import decrypt_stream

    out = io.BytesIO()
    decrypt_stream(io.BytesIO(data), out, identity, binding=object_binding(store.full_key(key)))
    return out.getvalue()


async def write_for(store: ObjectStore, key: str, writer: Identity, recipients) -> None:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(b"data of " + key.encode()), out, writer, recipients,
                   binding=object_binding(store.full_key(key)))
    await store.put(key, out.getvalue())


async def identity_set(store: ObjectStore, me: Identity, t: Trust) -> list[Identity]:
    return [me, *(g.identity for g in await Groups(store, me, t).load_identities())]


def test_record_roundtrip_and_trust() -> None:
    gid = Identity.generate()
    r = make_group_record(ALICE, "team", 2, gid.recipient)
    data = r.to_bytes()
    assert parse_group_record(data) == r
    assert check_group_record(data, "team", trust(BOB, ALICE)) == r
    with pytest.raises(ConfigError, match="not you or one of your contacts"):
        check_group_record(data, "team", trust(BOB))
    with pytest.raises(ConfigError, match="another group"):
        check_group_record(data, "meet", trust(ALICE))  # copied to another group's place
    with pytest.raises(ConfigError, match="older"):
        check_group_record(data, "team", trust(ALICE), min_generation=3)
    with pytest.raises(ConfigError, match="not valid"):
        check_group_record(data.replace(b"generation 2", b"generation 3"), "team", trust(ALICE))


def test_keys_and_roster_roundtrip() -> None:
    keys = GroupKeys("g", {1: Identity.generate(), 2: Identity.generate()})
    back = parse_group_keys(keys.to_bytes())
    assert back.generation == 2
    assert back.current.recipient == keys.current.recipient
    assert "Identity" not in repr(keys) and "generations" in repr(keys)
    members = [BOB.recipient, ALICE.recipient, BOB.recipient]
    assert set(parse_roster(roster_bytes("g", members), "g")) == {ALICE.recipient, BOB.recipient}


@settings(max_examples=200)
@given(st.binary(max_size=600))
def test_parsers_raise_format_errors_only(data: bytes) -> None:
    for parse in (parse_group_record, parse_group_keys, lambda d: parse_roster(d, "g")):
        with contextlib.suppress(FormatError):
            parse(data)


async def test_create_add_remove_rotates() -> None:
    store = MemoryStore("b")
    alice = Groups(store, ALICE, trust(ALICE, BOB, CAROL))
    record = await alice.create("team", [BOB.recipient])
    assert record.generation == 1
    with pytest.raises(ConfigError, match="exists"):
        await alice.create("team")
    assert await alice.add("team", [CAROL.recipient]) == 1
    assert await alice.add("team", [CAROL.recipient]) == 0  # idempotent
    infos = await alice.infos()
    assert [i.name for i in infos] == ["team"] and infos[0].member
    assert infos[0].members is not None and len(infos[0].members) == 3

    bob_trust = trust(BOB, ALICE)
    team1 = (await alice.record("team"))[0].recipient
    await write_for(store, "old.txt", ALICE, [team1])
    bob_ids = await identity_set(store, BOB, bob_trust)
    assert await read_with(store, "old.txt", bob_ids) == b"data of old.txt"

    new = await alice.remove("team", [BOB.recipient.key_id])
    assert new.generation == 2 and new.recipient != team1
    # Bob's member object is gone; Carol's holds both generations.
    with pytest.raises(NoIdentityMatchError):
        await Groups(store, BOB, bob_trust).keys("team")
    carol_keys = await Groups(store, CAROL, trust(CAROL, ALICE)).keys("team")
    assert sorted(carol_keys.identities) == [1, 2]
    await write_for(store, "new.txt", ALICE, [new.recipient])
    # Bob kept his old identity set: still reads old.txt (documented), never new.txt.
    assert await read_with(store, "old.txt", bob_ids) == b"data of old.txt"
    with pytest.raises(NoIdentityMatchError):
        await read_with(store, "new.txt", bob_ids)
    carol_ids = await identity_set(store, CAROL, trust(CAROL, ALICE))
    assert await read_with(store, "new.txt", carol_ids) == b"data of new.txt"
    assert await read_with(store, "old.txt", carol_ids) == b"data of old.txt"
    # Bob can no longer change the group.
    with pytest.raises((ConfigError, NoIdentityMatchError)):
        await Groups(store, BOB, bob_trust).add("team", [BOB.recipient])
    with pytest.raises(ConfigError):
        await alice.remove("team", [ALICE.recipient.key_id])


async def test_forged_record_is_not_followed(caplog) -> None:
    store = MemoryStore()
    await Groups(store, ALICE, trust(ALICE)).create("team", [BOB.recipient])
    # Carol (whom Bob doesn't know) replaces the record with her own key.
    carol_gid = Identity.generate()
    await store.put(record_key("team"), make_group_record(CAROL, "team", 5, carol_gid.recipient)
                    .to_bytes())
    bob = Sharing(store, BOB, trust(BOB, ALICE))
    with caplog.at_level(logging.WARNING, logger="cssfs.groups"):
        assert await bob.group_recipient("team") is None
    assert "not you or one of your contacts" in caplog.text


async def test_interrupted_rotation_is_finished_by_running_remove_again() -> None:
    store = MemoryStore()
    alice = Groups(store, ALICE, trust(ALICE))
    await alice.create("g", [BOB.recipient, CAROL.recipient])
    real_put = store.put

    async def no_record(key, body, **kw):
        if key == record_key("g"):
            raise RuntimeError("stopped")
        return await real_put(key, body, **kw)

    store.put = no_record  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await alice.remove("g", [BOB.recipient.key_id])
    store.put = real_put  # type: ignore[method-assign]
    alice = Groups(store, ALICE, trust(ALICE))
    with pytest.raises(ConfigError, match="interrupted"):
        await alice.add("g", [])
    record = await alice.remove("g", [BOB.recipient.key_id])
    assert record.generation == 2
    keys = await alice.keys("g")
    assert keys.current.recipient == record.recipient


async def test_group_of_100_share_read_remove() -> None:
    store = MemoryStore("bkt")
    members = [Identity.generate() for _ in range(100)]
    t = Trust.of(ALICE.recipient, [Contact(f"m{i}", m.recipient) for i, m in enumerate(members)])
    groups = Groups(store, ALICE, t)
    await groups.create("big", [m.recipient for m in members])
    assert len((await store.list("")).objects) == 101 + 2  # 101 member objects, record, roster

    await write_for(store, "shared/before.txt", ALICE, [])
    alice = await Sharing.load(store, ALICE, t)
    report = await alice.share("shared", groups=["big"])
    assert report.changed == ["shared/before.txt"]
    head = parse_header((await store.get("shared/before.txt"))[:HEADER_SIZE])
    assert len(head.stanzas) == 2  # Alice + the group: one stanza for 100 people

    member = members[37]
    member_trust = Trust.of(member.recipient, [Contact("alice", ALICE.recipient)])
    ids = await identity_set(store, member, member_trust)
    assert await read_with(store, "shared/before.txt", ids) == b"data of shared/before.txt"

    # New files in the folder go to the group's current key (the policy names the group).
    recipients = await alice.resolve_recipients("shared/x.txt")
    group_now = (await groups.record("big"))[0].recipient
    assert group_now in recipients
    await write_for(store, "shared/during.txt", ALICE, recipients)
    assert await read_with(store, "shared/during.txt", ids) == b"data of shared/during.txt"

    await groups.remove("big", [member.recipient.key_id])
    alice = await Sharing.load(store, ALICE, t, ttl=0.0)
    recipients = await alice.resolve_recipients("shared/x.txt")
    assert group_now not in recipients
    await write_for(store, "shared/after.txt", ALICE, recipients)
    with pytest.raises(NoIdentityMatchError):
        await read_with(store, "shared/after.txt", ids)
    # A remaining member reads everything, old and new.
    other = members[3]
    other_ids = await identity_set(store, other, Trust.of(other.recipient, [
        Contact("alice", ALICE.recipient)]))
    for name in ("before", "during", "after"):
        key = f"shared/{name}.txt"
        assert await read_with(store, key, other_ids) == f"data of {key}".encode()
    # The removed member's key object is gone; the others were rewritten.
    assert not any(o.key == member_key("big", member.recipient.key_id)
                   for o in (await store.list("")).objects)


async def test_unshare_group_rekeys_for_remaining() -> None:
    store = MemoryStore()
    t = trust(ALICE, BOB, CAROL)
    groups = Groups(store, ALICE, t)
    await groups.create("g", [BOB.recipient])
    await write_for(store, "d/f", ALICE, [])
    alice = await Sharing.load(store, ALICE, t)
    await alice.share("d", [CAROL.recipient], groups=["g"])
    report = await alice.unshare("d", groups=["g"])
    assert report.changed == ["d/f"]
    head = parse_header((await store.get("d/f"))[:HEADER_SIZE])
    assert set(head.key_ids) == {ALICE.recipient.key_id, CAROL.recipient.key_id}


async def test_reload_groups_after_being_added() -> None:
    store = MemoryStore()
    t = trust(ALICE, BOB)
    bob = await Sharing.load(store, BOB, trust(BOB, ALICE))
    assert bob.group_identities == ()
    await Groups(store, ALICE, t).create("late", [])
    assert not await bob.reload_groups()
    await Groups(store, ALICE, t).add("late", [BOB.recipient])
    assert await bob.reload_groups()
    assert [g.name for g in bob.group_identities] == ["late"] and len(bob.identities) == 2
