"""groups: a group is an identity whose secret key is shared, by envelope, with its members.

What it knows: where groups live in the bucket (``.cssfs-groups/<name>/``), the signed group
record (the group's public recipient, signed by whoever set its current generation), the
members' key objects (the group's secret keys, one small envelope per member), the roster
(members' recipient strings, readable by the group only), how a group is created, grown and
rotated, and how a reader tries several identities on one header. What it must not know: FUSE,
boto3, the CLI, the contacts file (it is given a :class:`~cssfs.policy.Trust`).

Layout (docs/SHARING.md has the details)::

    .cssfs-groups/<name>/recipient            signed record: name, generation, group recipient
    .cssfs-groups/<name>/members/<key id hex> envelope for one member: every generation's key
    .cssfs-groups/<name>/roster               envelope for the group: the members' recipients

A header holds at most 43 stanzas, so the keys are not one envelope for all members (a group of
200 would not fit): each member has their own tiny envelope, found by their key id with one GET.
A folder shared with the group needs one stanza however many members it has.

Trust: the record is followed only if its signature verifies and its setter is the reader or a
contact, as for folder policies -- the group's *public* key decides who can read new files, so
it must come from someone the reader trusts. The secret keys a member object holds are used only
to *read*; a key planted by the bucket lets you read nothing that was not already meant for you.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import trio

from cssfs.envelope import HEADER_SIZE, Header, object_binding, parse_header
from cssfs.envstream import decrypt_stream, encrypt_stream
from cssfs.errors import (
    ConfigError,
    CssfsError,
    FormatError,
    KeyFormatError,
    NoIdentityMatchError,
    NoSuchObjectError,
    PreconditionFailedError,
    SignatureError,
)
from cssfs.keys import Identity, Recipient, parse_identity_file
from cssfs.policy import (
    FieldReader,
    Trust,
    b64,
    check_group_name,
    decode_signed,
    encode_lines,
    parse_decimal,
    parse_recipient_entry,
    parse_setter,
    recipient_entry,
    verify_ed25519,
)
from cssfs.store.base import ObjectStore

log = logging.getLogger(__name__)

GROUPS_PREFIX = ".cssfs-groups/"
RECORD_MAGIC = "cssfs-group v1"
RECORD_LABEL = b"cssfs.v1 group record\x00"
KEYS_MAGIC = "cssfs-group-keys v1"
ROSTER_MAGIC = "cssfs-group-roster v1"
MAX_SMALL_OBJECT = 1024 * 1024
#: Member objects written or read at once.
CONCURRENCY = 16


def record_key(name: str) -> str:
    return f"{GROUPS_PREFIX}{check_group_name(name)}/recipient"


def roster_key(name: str) -> str:
    return f"{GROUPS_PREFIX}{check_group_name(name)}/roster"


def members_prefix(name: str) -> str:
    return f"{GROUPS_PREFIX}{check_group_name(name)}/members/"


def member_key(name: str, key_id: bytes) -> str:
    return members_prefix(name) + key_id.hex()


def group_label(name: str) -> str:
    """How a group is named where a recipient is expected: ``group:NAME``."""
    return f"group:{name}"


# -- small envelopes ---------------------------------------------------------------------------


def seal_bytes(
    identity: Identity, recipients: Sequence[Recipient], payload: bytes, *, binding: bytes
) -> bytes:
    """One whole envelope (written and signed by ``identity``) for a small payload."""
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(payload), out, identity, recipients, binding=binding)
    return out.getvalue()


def open_bytes(data: bytes, identity: Identity, *, binding: bytes) -> tuple[bytes, Header]:
    """(payload, header) of a whole small envelope, fully verified."""
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(data), out, identity, binding=binding)
    return out.getvalue(), parse_header(data[:HEADER_SIZE])


# -- the signed record -------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupRecord:
    """The public face of a group: its name, key generation and recipient, signed by a setter."""

    name: str
    generation: int
    recipient: Recipient
    setter: Recipient
    signature: bytes

    def body(self) -> bytes:
        lines = [
            ("group", self.name),
            ("generation", str(self.generation)),
            ("recipient", self.recipient.to_string()),
            ("setter", self.setter.to_string()),
        ]
        return (RECORD_MAGIC + "\n").encode() + encode_lines(lines)

    def to_bytes(self) -> bytes:
        return self.body() + f"signature {b64(self.signature)}\n".encode()

    def verify(self) -> None:
        assert self.setter.ed25519 is not None
        verify_ed25519(self.setter.ed25519, self.signature, RECORD_LABEL + self.body(),
                       "group record")


def make_group_record(
    identity: Identity, name: str, generation: int, recipient: Recipient
) -> GroupRecord:
    check_group_name(name)
    unsigned = GroupRecord(name, generation, recipient, identity.recipient, bytes(64))
    return GroupRecord(
        name, generation, recipient, identity.recipient,
        identity.sign(RECORD_LABEL + unsigned.body()),
    )


def parse_group_record(data: bytes) -> GroupRecord:
    """Strict parse (FormatError family only); the signature is checked by ``verify``."""
    what = "group record"
    fields, body, signature = decode_signed(data, RECORD_MAGIC, what)
    r = FieldReader(fields, what)
    name = r.one("group")
    generation = parse_decimal(r.one("generation"), what, low=1)
    recipient = parse_setter(r.one("recipient"), what)
    setter = parse_setter(r.one("setter"), what)
    r.end()
    try:
        check_group_name(name)
    except ValueError:
        raise FormatError(f"{what}: bad group name") from None
    record = GroupRecord(name, generation, recipient, setter, signature)
    if record.body() != body:
        raise FormatError(f"{what} is not canonically encoded")
    return record


def check_group_record(data: bytes, name: str, trust: Trust, *, min_generation: int = 0
                       ) -> GroupRecord:
    """The record of group ``name`` if it is to be followed; ConfigError saying why not."""
    try:
        record = parse_group_record(data)
        record.verify()
    except (FormatError, SignatureError) as exc:
        raise ConfigError(f"group {name}: record {record_key(name)} is not valid: {exc}") from None
    if record.name != name:
        raise ConfigError(f"group {name}: record {record_key(name)} names another group")
    assert record.setter.ed25519 is not None
    if not trust.is_trusted(record.setter.ed25519):
        raise ConfigError(
            f"group {name}: record {record_key(name)} was set by {record.setter.fingerprint}, "
            "who is not you or one of your contacts"
        )
    if record.generation < min_generation:
        raise ConfigError(
            f"group {name}: record {record_key(name)} is generation {record.generation}, older "
            f"than generation {min_generation} seen before (rolled back?)"
        )
    return record


# -- the secret keys and the roster -------------------------------------------------------------


class GroupKeys:
    """Every generation of a group's identity that one member holds (secret)."""

    __slots__ = ("identities", "name")

    def __init__(self, name: str, identities: dict[int, Identity]) -> None:
        if not identities:
            raise ValueError("groups: a group has at least one key")
        self.name = name
        self.identities = dict(sorted(identities.items()))

    def __repr__(self) -> str:
        return f"GroupKeys(name_len={len(self.name)}, generations={list(self.identities)})"

    @property
    def generation(self) -> int:
        return max(self.identities)

    @property
    def current(self) -> Identity:
        return self.identities[self.generation]

    def with_new(self, identity: Identity) -> GroupKeys:
        return GroupKeys(self.name, {**self.identities, self.generation + 1: identity})

    def to_bytes(self) -> bytes:
        lines = [("group", self.name)]
        for generation, identity in self.identities.items():
            blob = base64.b64encode(identity.to_file(None)).decode("ascii")
            lines.append(("key", f"{generation}:{blob}"))
        return (KEYS_MAGIC + "\n").encode() + encode_lines(lines)


def parse_group_keys(data: bytes) -> GroupKeys:
    what = "group keys"
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError(f"{what} are not ASCII") from None
    lines = text.split("\n")
    if len(lines) < 3 or lines[0] != KEYS_MAGIC or lines[-1] != "":
        raise FormatError(f"not {what}")
    name_line, key_lines = lines[1], lines[2:-1]
    if not name_line.startswith("group "):
        raise FormatError(f"{what}: expected a group line")
    name = name_line[6:]
    identities: dict[int, Identity] = {}
    for line in key_lines:
        if not line.startswith("key "):
            raise FormatError(f"{what}: expected key lines")
        gen_text, sep, blob = line[4:].partition(":")
        generation = parse_decimal(gen_text, what, low=1)
        try:
            raw = base64.b64decode(blob.encode("ascii"), validate=True)
        except (binascii.Error, ValueError):
            raise FormatError(f"{what}: key is not base64") from None
        if not sep or generation in identities:
            raise FormatError(f"{what}: malformed key line")
        try:
            identities[generation] = parse_identity_file(raw, None)
        except CssfsError as exc:  # a passphrase-protected key here is malformed too
            raise KeyFormatError(f"{what}: bad key") from exc
    try:
        keys = GroupKeys(check_group_name(name), identities)
    except ValueError:
        raise FormatError(f"{what}: bad group name or no key") from None
    if keys.to_bytes() != data:
        raise FormatError(f"{what} are not canonically encoded")
    return keys


def roster_bytes(name: str, members: Iterable[Recipient]) -> bytes:
    entries = sorted({recipient_entry(m) for m in members})
    return (ROSTER_MAGIC + "\n").encode() + encode_lines(
        [("group", name), *(("member", e) for e in entries)]
    )


def parse_roster(data: bytes, name: str) -> list[Recipient]:
    what = "group roster"
    try:
        lines = data.decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise FormatError(f"{what} is not ASCII") from None
    if len(lines) < 3 or lines[0] != ROSTER_MAGIC or lines[1] != f"group {name}" or lines[-1]:
        raise FormatError(f"not the {what} of this group")
    members = []
    for line in lines[2:-1]:
        if not line.startswith("member "):
            raise FormatError(f"{what}: expected member lines")
        members.append(parse_recipient_entry(line[7:]))
    if roster_bytes(name, members) != data:
        raise FormatError(f"{what} is not canonically encoded")
    return members


# -- the group operations ------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupIdentity:
    """One generation of a group's identity that the reader holds."""

    name: str
    generation: int
    identity: Identity


@dataclass(frozen=True)
class GroupInfo:
    """What ``cssfs group list`` shows about one group."""

    name: str
    record: GroupRecord | None  # None when the record is missing or not trusted
    problem: str | None
    member: bool  # we hold its current key
    members: tuple[Recipient, ...] | None  # the roster, if we could read it


class Groups:
    """Create, grow, rotate and read groups stored in ``store`` (the store root's groups)."""

    def __init__(self, store: ObjectStore, identity: Identity, trust: Trust) -> None:
        self.store = store
        self.identity = identity
        self.trust = trust
        self._seen_generation: dict[str, int] = {}

    def _binding(self, key: str) -> bytes:
        return object_binding(self.store.full_key(key))

    # -- reading ---------------------------------------------------------------------------

    async def record(self, name: str) -> tuple[GroupRecord, str]:
        """The trusted record of ``name`` and its etag; ConfigError if missing or untrusted."""
        key = record_key(name)
        try:
            info = await self.store.head(key)
            data = await self.store.get(key)
        except NoSuchObjectError:
            raise ConfigError(f"no group named {name!r} in this store") from None
        try:
            record = check_group_record(
                data, name, self.trust, min_generation=self._seen_generation.get(name, 0)
            )
        except ConfigError as exc:
            log.warning("%s", exc)
            raise
        self._seen_generation[name] = record.generation
        return record, info.etag

    async def recipient(self, name: str) -> Recipient:
        """The group's current public recipient, from its trusted record."""
        return (await self.record(name))[0].recipient

    async def _open_object(self, key: str, identity: Identity, missing: CssfsError) -> bytes:
        """The payload of the small envelope ``key``, opened with ``identity`` (in a worker
        thread); ``missing`` is raised if there is no such object."""
        try:
            data = await self.store.get(key)
        except NoSuchObjectError:
            raise missing from None
        payload, _ = await trio.to_thread.run_sync(
            lambda: open_bytes(data, identity, binding=self._binding(key))
        )
        return payload

    async def keys(self, name: str) -> GroupKeys:
        """Our keys of group ``name``; NoIdentityMatchError if we are not a member."""
        key = member_key(name, self.identity.recipient.key_id)
        keys = parse_group_keys(await self._open_object(
            key, self.identity, NoIdentityMatchError(f"you are not a member of group {name!r}")
        ))
        if keys.name != name:
            raise FormatError(f"group keys {key} belong to another group")
        return keys

    async def roster(self, name: str, keys: GroupKeys) -> list[Recipient]:
        key = roster_key(name)
        payload = await self._open_object(
            key, keys.current, FormatError(f"group {name!r} has no roster ({key})")
        )
        return parse_roster(payload, name)

    async def names(self) -> list[str]:
        listing = await self.store.list(GROUPS_PREFIX, "/")
        names = []
        for prefix in listing.prefixes:
            name = prefix[len(GROUPS_PREFIX) :].rstrip("/")
            try:
                names.append(check_group_name(name))
            except ValueError:
                log.warning("ignoring %s: not a valid group name", prefix)
        return sorted(names)

    async def load_identities(self) -> list[GroupIdentity]:
        """Every generation of every group key we hold (one LIST, then one GET per group).

        A member object that does not open is reported (WARNING) and skipped.
        """
        found: list[GroupIdentity] = []
        limiter = trio.CapacityLimiter(CONCURRENCY)

        async def one(name: str) -> None:
            async with limiter:
                try:
                    keys = await self.keys(name)
                except NoIdentityMatchError:
                    return
                except CssfsError as exc:
                    log.warning("group %s: your key object does not open: %s", name, exc)
                    return
            for generation, identity in keys.identities.items():
                found.append(GroupIdentity(name, generation, identity))

        async with trio.open_nursery() as nursery:
            for name in await self.names():
                nursery.start_soon(one, name)
        found.sort(key=lambda g: (g.name, -g.generation))
        return found

    async def infos(self) -> list[GroupInfo]:
        out = []
        for name in await self.names():
            record: GroupRecord | None = None
            problem: str | None = None
            try:
                record = (await self.record(name))[0]
            except ConfigError as exc:
                problem = str(exc)
            member = False
            members: tuple[Recipient, ...] | None = None
            try:
                keys = await self.keys(name)
                member = record is None or keys.generation >= record.generation
                members = tuple(await self.roster(name, keys))
            except NoIdentityMatchError:
                pass
            except CssfsError as exc:
                problem = problem or str(exc)
            out.append(GroupInfo(name, record, problem, member, members))
        return out

    # -- writing ---------------------------------------------------------------------------

    async def _put_member(
        self, name: str, keys: GroupKeys, member: Recipient, *, exclusive: bool = False
    ) -> None:
        key = member_key(name, member.key_id)
        payload = keys.to_bytes()
        data = await trio.to_thread.run_sync(
            lambda: seal_bytes(self.identity, [member], payload, binding=self._binding(key))
        )
        await self.store.put(key, data, if_none_match=exclusive)

    async def _put_members(self, name: str, keys: GroupKeys, members: Iterable[Recipient]
                           ) -> None:
        limiter = trio.CapacityLimiter(CONCURRENCY)

        async def one(member: Recipient) -> None:
            async with limiter:
                await self._put_member(name, keys, member)

        async with trio.open_nursery() as nursery:
            for member in members:
                nursery.start_soon(one, member)

    async def _put_roster(self, name: str, keys: GroupKeys, members: Iterable[Recipient]
                          ) -> None:
        key = roster_key(name)
        payload = roster_bytes(name, members)
        data = await trio.to_thread.run_sync(
            lambda: seal_bytes(
                self.identity, [keys.current.recipient], payload, binding=self._binding(key)
            )
        )
        await self.store.put(key, data)

    async def create(self, name: str, members: Sequence[Recipient] = ()) -> GroupRecord:
        """A new group with us and ``members`` in it; ConfigError if the name is taken."""
        check_group_name(name)
        everyone = _dedup([self.identity.recipient, *members])
        keys = GroupKeys(name, {1: Identity.generate()})
        record = make_group_record(self.identity, name, 1, keys.current.recipient)
        try:
            # Our own key first: if we stop after the record, we can still finish with `add`.
            await self._put_member(name, keys, self.identity.recipient, exclusive=True)
            await self.store.put(record_key(name), record.to_bytes(), if_none_match=True)
        except PreconditionFailedError:
            raise ConfigError(f"group {name!r} exists already in this store") from None
        await self._put_members(name, keys, everyone[1:])
        await self._put_roster(name, keys, everyone)
        self._seen_generation[name] = 1
        log.info("group %s created with %d members", name, len(everyone))
        return record

    async def _writable(
        self, name: str, *, finishing: bool = False
    ) -> tuple[GroupRecord, str, GroupKeys, list[Recipient]]:
        """Record, its etag, our keys and the roster of a group we may change.

        With ``finishing``, keys one generation ahead of the record are accepted: a rotation
        that stopped before its record was written (the roster is already the new one).
        """
        record, etag = await self.record(name)
        keys = await self.keys(name)
        if keys.generation < record.generation:
            raise ConfigError(
                f"you are no longer a member of group {name!r} (its key was rotated without you)"
            )
        pending = keys.generation == record.generation + 1 and (
            keys.identities.get(record.generation, keys.current).recipient == record.recipient
        )
        if not (pending and finishing) and (
            keys.generation != record.generation or keys.current.recipient != record.recipient
        ):
            raise ConfigError(
                f"group {name!r}: its record does not match your newest key (rolled back, or "
                "a rotation was interrupted: run `cssfs group remove` again to finish it)"
            )
        return record, etag, keys, await self.roster(name, keys)

    async def add(self, name: str, members: Sequence[Recipient]) -> int:
        """Give ``members`` every key of the group; returns how many were new."""
        _, _, keys, roster = await self._writable(name)
        known = {m.key_id for m in roster}
        new = [m for m in _dedup(members) if m.key_id not in known]
        # Every member object is (re)written, so an interrupted `add` finishes when run again.
        await self._put_members(name, keys, _dedup(members))
        await self._put_roster(name, keys, [*roster, *new])
        return len(new)

    async def remove(self, name: str, key_ids: Iterable[bytes]) -> GroupRecord:
        """Remove members by key id: rotate the group key and give it to the rest only.

        Files written for the group before stay readable with the old key, by anyone who kept
        it; ``cssfs unshare`` rekeys them (docs/SHARING.md).
        """
        record, etag, keys, roster = await self._writable(name, finishing=True)
        gone = set(key_ids)
        if self.identity.recipient.key_id in gone:
            raise ConfigError("you cannot remove yourself from a group; ask another member")
        remaining = [m for m in roster if m.key_id not in gone]
        # An interrupted rotation left a newer key with the members: finish with it.
        new_keys = keys if keys.generation > record.generation else keys.with_new(
            Identity.generate()
        )
        new_record = make_group_record(
            self.identity, name, new_keys.generation, new_keys.current.recipient
        )
        await self._put_members(name, new_keys, remaining)
        await self._put_roster(name, new_keys, remaining)
        try:
            await self.store.put(record_key(name), new_record.to_bytes(), if_match=etag)
        except PreconditionFailedError:
            raise ConfigError(
                f"group {name!r} changed while it was rotated; run the command again"
            ) from None
        self._seen_generation[name] = new_record.generation
        keep = {member_key(name, m.key_id) for m in remaining}
        listing = await self.store.list(members_prefix(name))
        stale = [o.key for o in listing.objects if o.key not in keep]
        await self.store.delete(stale)
        log.info("group %s rotated to generation %d", name, new_record.generation)
        return new_record


def _dedup(recipients: Iterable[Recipient]) -> list[Recipient]:
    seen: dict[bytes, Recipient] = {}
    for r in recipients:
        seen.setdefault(r.key_id, r)
    return list(seen.values())
