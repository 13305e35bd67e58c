"""sharing: who may read a folder, and changing it for the files already there.

What it knows: folder policies in the bucket (found by cssfs.policy's names, followed by its trust
rule), groups (cssfs.groups), envelope headers (cssfs.envelope), an ObjectStore and trio. What it
must not know: FUSE, boto3, argparse, the contacts file (it is given a Trust).

* ``resolve_recipients(key)``: the recipients a new file at ``key`` is encrypted for -- the
  nearest followed policy of its folder or an ancestor (groups resolved to their current key),
  else the defaults (the mount's ``--recipient``s). Cached for ``ttl`` seconds per folder.
* ``share(prefix, ...)``: the policy gains the recipients, then every envelope under ``prefix``
  that we can open gets a stanza for them by rewriting its 4 KiB header in place
  (``store.replace_head``, conditional on the ETag read): the payload is not re-uploaded.
* ``unshare(prefix, ...)``: the policy loses them, then every envelope that still has a stanza
  for one of them is re-encrypted under a fresh file key for the remaining recipients (streamed,
  bounded memory, conditional put). We become the writer of those files (we sign them).
* ``access(prefix)``: the policy that applies, and each file's writer and stanzas, named.

Both changes are resumable: a file that already has (share) or no longer has (unshare) the
stanzas is skipped, so running an interrupted command again finishes it. Per-file problems are
collected in the report (and logged at WARNING naming the object), never raised; a store that
fails outright (unreachable, access denied) stops the run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import trio

from cssfs.envelope import (
    HEADER_SIZE,
    MAGIC,
    MAX_RECIPIENTS,
    EnvelopeWriter,
    Header,
    OpenedEnvelope,
    check_envelope_size,
    chunk_range,
    object_binding,
    open_any,
    parse_header,
    plain_size,
    table_range,
    verify_signature,
)
from cssfs.errors import (
    ConfigError,
    CssfsError,
    FormatError,
    HeaderAuthError,
    NoIdentityMatchError,
    NoSuchObjectError,
    PayloadError,
    PreconditionFailedError,
    SignatureError,
)
from cssfs.groups import GroupIdentity, Groups, group_label
from cssfs.keys import Identity, Recipient
from cssfs.policy import (
    POLICY_NAME,
    Policy,
    Trust,
    Verdict,
    check_folder,
    check_policy,
    folder_chain,
    folder_of,
    is_internal,
    make_policy,
    policy_key,
)
from cssfs.store.base import ObjectInfo, ObjectStore, PartSource

log = logging.getLogger(__name__)

#: Seconds a folder's policy (or its absence) and a group's key are cached.
DEFAULT_TTL = 10.0
#: Files whose headers are rewritten at once (share), and files re-encrypted at once (unshare).
SHARE_CONCURRENCY = 8
REKEY_CONCURRENCY = 2
#: Chunks fetched and re-encrypted per ranged GET when rekeying (1 MiB).
REKEY_BATCH_CHUNKS = 16
#: Attempts per file when another client changes it while we do.
ATTEMPTS = 3


class _NotEnvelope(Exception):
    """An object that is not a cssfs envelope (by size or magic): left alone, not an error."""


@dataclass(frozen=True)
class ShareProgress:
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int


ProgressFn = Callable[[ShareProgress], None]


@dataclass
class ShareReport:
    """What a share/unshare did. Keys are object keys relative to the store."""

    changed: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)  # had (share) / lacked (unshare) the stanzas
    not_readable: list[str] = field(default_factory=list)  # not encrypted for us: left alone
    foreign: list[str] = field(default_factory=list)  # not cssfs envelopes: left alone
    failed: dict[str, str] = field(default_factory=dict)  # key -> reason
    dropped: dict[str, list[str]] = field(default_factory=dict)  # key -> unknown key ids lost
    policies: list[str] = field(default_factory=list)  # policy objects written
    policies_skipped: dict[str, str] = field(default_factory=dict)  # not followed: left alone

    @property
    def complete(self) -> bool:
        return not self.failed and not self.not_readable


@dataclass(frozen=True)
class Reader:
    """One stanza of a file, or one recipient of a policy, as a person would name it."""

    key_id: bytes
    name: str | None  # "me", a contact, "group:NAME"; None if unknown
    fingerprint: str | None  # None if we know no public key with this key id

    def label(self) -> str:
        """``name (fingerprint)``, with "unknown" and the key id for what we cannot name."""
        return f"{self.name or 'unknown'} ({self.fingerprint or 'key id ' + self.key_id.hex()})"


@dataclass(frozen=True)
class PolicyStatus:
    folder: str  # relative to the store
    key: str
    policy: Policy | None
    problem: str | None  # None when followed

    @property
    def followed(self) -> bool:
        return self.policy is not None and self.problem is None


@dataclass(frozen=True)
class FileAccess:
    key: str
    writer: str | None  # name or writer fingerprint
    signature: str  # "valid", "unknown writer", "invalid", or "not an envelope"
    readers: tuple[Reader, ...]
    readable: bool  # by us (or one of our groups)


@dataclass
class AccessReport:
    folder: str
    applies: PolicyStatus | None  # the followed policy new files under the folder get
    readers: tuple[Reader, ...]  # its recipients, then its groups
    policies: list[PolicyStatus]  # every policy object at, above and under the folder
    files: list[FileAccess]


def signature_status(header: Header, trust: Trust) -> str:
    """"valid" (the writer is you or a contact and signed this), "unknown writer" (signed, by
    someone not in your contacts) or "invalid" (the signature does not verify): the values of
    the ``user.cssfs.signature`` xattr."""
    try:
        verify_signature(header)
    except SignatureError:
        return "invalid"
    return "valid" if trust.is_trusted(header.writer) else "unknown writer"


@dataclass
class _Found:
    """A folder's policy object as last fetched: absent (``etag is None``) or its verdict."""

    expires: float
    etag: str | None
    verdict: Verdict | None


class Sharing:
    """Folder policies and share/unshare/access over one store (see the module docstring).

    ``identity`` signs; ``group_identities`` (from Groups.load_identities) are tried too when a
    header must be opened. ``default_recipients`` apply where no policy is followed. ``trust`` may
    be a callable giving the current Trust (a long-running mount re-reads the contacts book):
    it is called whenever a policy or group record is fetched again.
    """

    def __init__(
        self,
        store: ObjectStore,
        identity: Identity,
        trust: Trust | Callable[[], Trust],
        *,
        group_identities: Sequence[GroupIdentity] = (),
        default_recipients: Sequence[Recipient] = (),
        ttl: float = DEFAULT_TTL,
        cpu_limiter: trio.CapacityLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.identity = identity
        self._trust_source = trust
        self.trust = trust if isinstance(trust, Trust) else trust()
        self.groups = Groups(store, identity, self.trust)
        self.group_identities = tuple(group_identities)
        self.identities = (identity, *(g.identity for g in self.group_identities))
        self.default_recipients = tuple(default_recipients)
        self.ttl = ttl
        self.cpu_limiter = cpu_limiter or trio.CapacityLimiter(max(1, os.cpu_count() or 1))
        self._clock = clock
        self._policies: dict[str, _Found] = {}
        self._seen_versions: dict[str, int] = {}
        self._warned: set[tuple[str, str]] = set()
        self._group_cache: dict[str, tuple[float, Recipient | None]] = {}
        self._known: dict[bytes, Recipient] = {}  # key id -> public key met in policies

    @classmethod
    async def load(
        cls, store: ObjectStore, identity: Identity, trust: Trust | Callable[[], Trust],
        **kwargs: object,
    ) -> Sharing:
        """A Sharing with every group key we hold loaded (one LIST + one GET per group)."""
        now = trust if isinstance(trust, Trust) else trust()
        group_identities = await Groups(store, identity, now).load_identities()
        return cls(store, identity, trust, group_identities=group_identities, **kwargs)  # type: ignore[arg-type]

    async def reload_groups(self) -> bool:
        """Load the group keys we hold again (after being added to a group, or a rotation
        while running); True if the set changed. ``identities`` is updated in place of the old
        tuple, so a caller that passed it on (EncryptedStore) must pass it again."""
        loaded = tuple(await self.groups.load_identities())
        key = {(g.name, g.generation, g.identity.recipient) for g in loaded}
        if key == {(g.name, g.generation, g.identity.recipient) for g in self.group_identities}:
            return False
        self.group_identities = loaded
        self.identities = (self.identity, *(g.identity for g in loaded))
        self._group_cache.clear()
        return True

    # -- names ------------------------------------------------------------------------------

    def _binding(self, key: str) -> bytes:
        return object_binding(self.store.full_key(key))

    def _full_folder(self, folder: str) -> str:
        """The folder as the policy names it: relative to the bucket, not to the store, so a
        mount of ``s3://b/p`` and a command on ``s3://b/p/docs`` agree on one policy."""
        return folder_of(self.store.full_key(policy_key(folder)))

    # -- policies ---------------------------------------------------------------------------

    def _refresh_trust(self) -> None:
        if not isinstance(self._trust_source, Trust):
            self.trust = self.groups.trust = self._trust_source()

    def forget_policies(self) -> None:
        """Drop cached policies and group keys (after a change, or on demand)."""
        self._policies.clear()
        self._group_cache.clear()

    async def _lookup(self, folder: str, *, fresh: bool = False) -> _Found:
        now = self._clock()
        found = self._policies.get(folder)
        if found is not None and not fresh and found.expires > now:
            return found
        key = policy_key(folder)
        self._refresh_trust()
        try:
            info = await self.store.head(key)
            data = await self.store.get(key)
        except NoSuchObjectError:
            found = _Found(now + self.ttl, None, None)
        else:
            verdict = check_policy(
                data, self._full_folder(folder), self.trust,
                min_version=self._seen_versions.get(folder, 0),
            )
            if verdict.followed:
                assert verdict.policy is not None
                self._seen_versions[folder] = verdict.policy.version
                for r in verdict.policy.recipients:
                    self._known.setdefault(r.key_id, r)
            elif (key, info.etag) not in self._warned:
                self._warned.add((key, info.etag))
                log.warning("policy %s is not followed: %s", key, verdict.problem)
            found = _Found(now + self.ttl, info.etag, verdict)
        self._policies[folder] = found
        return found

    def note_new_folder(self, folder: str) -> None:
        """``folder`` was just made, empty, by this mount: it holds no policy object, so its
        lookup is settled for ``ttl`` as if a HEAD had found nothing (a policy written since by
        somebody else is seen after that, as any cached answer is). What was cached for an
        earlier folder of that name went with it (rmdir removes the policy object too)."""
        self._policies[folder] = _Found(self._clock() + self.ttl, None, None)

    def note_listing(self, folder: str, policy_etag: str | None, started: float) -> None:
        """A LIST of ``folder`` begun at ``started`` (on this object's clock) showed its policy
        object with ``policy_etag``, or none. A lookup within ``ttl`` of that LIST then needs
        no HEAD when the answer is one we hold: no policy, or the version we checked already
        (a new version is still fetched and checked by the next lookup)."""
        expires = started + self.ttl
        found = self._policies.get(folder)
        if found is not None and found.expires >= expires:
            return
        if policy_etag is None:
            self._policies[folder] = _Found(expires, None, None)
        elif found is not None and found.etag == policy_etag:
            self._policies[folder] = _Found(expires, found.etag, found.verdict)

    async def policy_status(self, folder: str, *, fresh: bool = False) -> PolicyStatus | None:
        """The policy object of ``folder`` itself (not inherited), or None if it has none."""
        found = await self._lookup(folder, fresh=fresh)
        if found.etag is None or found.verdict is None:
            return None
        v = found.verdict
        return PolicyStatus(folder, policy_key(folder), v.policy, v.problem)

    async def effective_policy(self, folder: str) -> PolicyStatus | None:
        """The nearest followed policy of ``folder`` or an ancestor (within the store)."""
        for f in folder_chain(check_folder(folder)):
            status = await self.policy_status(f)
            if status is not None and status.followed:
                return status
        return None

    async def group_recipient(self, name: str) -> Recipient | None:
        """The current key of group ``name`` if its record is trusted (cached), else None."""
        now = self._clock()
        cached = self._group_cache.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        recipient: Recipient | None
        self._refresh_trust()
        try:
            recipient = await self.groups.recipient(name)
        except ConfigError:  # logged by Groups.record
            recipient = None
        self._group_cache[name] = (now + self.ttl, recipient)
        return recipient

    async def _policy_recipients(self, policy: Policy) -> list[Recipient]:
        out = list(policy.recipients)
        for name in policy.groups:
            recipient = await self.group_recipient(name)
            if recipient is not None:
                out.append(recipient)
        return out

    async def resolve_recipients(self, key: str) -> list[Recipient]:
        """Who a new file at ``key`` is encrypted for (our identity is added by the writer)."""
        status = await self.effective_policy(folder_of(key))
        if status is None or status.policy is None:
            return list(self.default_recipients)
        return await self._policy_recipients(status.policy)

    async def _write_policy(
        self,
        folder: str,
        *,
        add: Sequence[Recipient] = (),
        remove: frozenset[bytes] = frozenset(),
        add_groups: Sequence[str] = (),
        remove_groups: frozenset[str] = frozenset(),
        create: bool,
        report: ShareReport,
    ) -> None:
        """Apply a change to the policy object of ``folder``, signed by us.

        ``create``: a folder without a followed policy of its own gets one, starting from the
        policy it inherited (or the defaults). Otherwise only an existing followed policy is
        changed. Our own identity is always among the recipients of a policy we set.
        """
        own = self.identity.recipient
        for _ in range(ATTEMPTS):
            found = await self._lookup(folder, fresh=True)
            verdict = found.verdict
            if verdict is not None and not verdict.followed:
                if not create:
                    report.policies_skipped[policy_key(folder)] = verdict.problem or "?"
                    return
                log.info("replacing policy %s, which is not followed", policy_key(folder))
            if verdict is not None and verdict.followed and verdict.policy is not None:
                base: Policy | None = verdict.policy
            elif create:
                base = None
            else:
                return
            if base is not None:
                recipients, groups = list(base.recipients), list(base.groups)
            else:
                inherited = await self.effective_policy(folder)
                if inherited is not None and inherited.policy is not None:
                    recipients = list(inherited.policy.recipients)
                    groups = list(inherited.policy.groups)
                else:
                    recipients, groups = [*self.default_recipients], []
            recipients = [r for r in [own, *recipients, *add] if r.key_id not in remove]
            groups = [g for g in [*groups, *add_groups] if g not in remove_groups]
            old_version = max(
                verdict.policy.version if verdict is not None and verdict.policy else 0,
                self._seen_versions.get(folder, 0),
            )
            new = make_policy(
                self.identity, self._full_folder(folder), old_version + 1, recipients, groups
            )
            if base is not None and (new.recipients, new.groups) == (
                base.recipients, base.groups
            ):
                return  # nothing to change: idempotent
            stanzas = len(new.recipients) + len(new.groups)  # one per recipient, one per group
            if stanzas > MAX_RECIPIENTS and (
                base is None or stanzas > len(base.recipients) + len(base.groups)
            ):  # no file could be written under it: refuse before anything changes
                raise ConfigError(
                    f"too many readers for {policy_key(folder)} ({stanzas}; a file holds at "
                    f"most {MAX_RECIPIENTS}): share with a group instead"
                )
            try:
                if found.etag is None:
                    await self.store.put(policy_key(folder), new.to_bytes(), if_none_match=True)
                else:
                    await self.store.put(policy_key(folder), new.to_bytes(), if_match=found.etag)
            except (PreconditionFailedError, NoSuchObjectError):
                continue  # someone changed it meanwhile: read it again
            self._seen_versions[folder] = new.version
            self._policies.pop(folder, None)
            report.policies.append(policy_key(folder))
            log.info("policy %s set to version %d", policy_key(folder), new.version)
            return
        raise ConfigError(f"policy {policy_key(folder)} keeps changing; run the command again")

    # -- walking files ----------------------------------------------------------------------

    async def _walk(self, folder: str) -> tuple[list[ObjectInfo], list[str]]:
        """(files, sub-folders with a policy object) under ``folder``; internal names and
        folder markers (``dir/``, what mkdir in a mount writes) skipped."""
        listing = await self.store.list(f"{folder}/" if folder else "")
        files: list[ObjectInfo] = []
        policy_folders: list[str] = []
        for obj in listing.objects:
            name = obj.key.rpartition("/")[2]
            if not name:
                continue  # a folder marker: nothing to share
            if name == POLICY_NAME and not is_internal(folder_of(obj.key)):
                sub = folder_of(obj.key)
                if sub != folder:
                    policy_folders.append(sub)
            elif not is_internal(obj.key):
                files.append(obj)
        return files, policy_folders

    async def _run(
        self,
        files: list[ObjectInfo],
        one: Callable[[ObjectInfo], Awaitable[None]],
        concurrency: int,
        progress: ProgressFn | None,
    ) -> None:
        total_bytes = sum(o.size for o in files)
        done = [0, 0]
        limiter = trio.CapacityLimiter(concurrency)

        async def task(obj: ObjectInfo) -> None:
            async with limiter:
                await one(obj)
            done[0] += 1
            done[1] += obj.size
            if progress is not None:
                progress(ShareProgress(done[0], len(files), done[1], total_bytes))

        if progress is not None:
            progress(ShareProgress(0, len(files), 0, total_bytes))
        async with trio.open_nursery() as nursery:
            for obj in files:
                nursery.start_soon(task, obj)

    async def _read_header(self, key: str, info: ObjectInfo | None = None) -> tuple[Header, str]:
        """The header of ``key`` and the ETag it was read under; _NotEnvelope for an object
        that is not a cssfs envelope at all (a foreign file: nothing to share).

        ``info`` from a listing saves the HEAD; if the object changed since, the header read
        may be newer than its ETag, and the conditional write that follows fails and retries.
        """
        if info is None:
            info = await self.store.head(key)
        try:
            plain_size(info.size)
            data = await self.store.get(key, 0, HEADER_SIZE)
            if not data.startswith(MAGIC):
                raise FormatError("no cssfs magic")
        except FormatError as exc:
            log.debug("object %s is not a cssfs envelope: %s", key, exc)
            raise _NotEnvelope from None
        return parse_header(data), info.etag

    def _file_failed(self, report: ShareReport, key: str, exc: CssfsError) -> None:
        log.warning("object %s: left unchanged: %s", key, exc)
        report.failed[key] = str(exc)

    # -- share ------------------------------------------------------------------------------

    async def _group_recipients(self, names: Sequence[str]) -> list[Recipient]:
        out = []
        for name in names:
            recipient = await self.group_recipient(name)
            if recipient is None:
                raise ConfigError(
                    f"group {name!r} has no trusted record in this store (see `cssfs group list`)"
                )
            out.append(recipient)
        return out

    async def share(
        self,
        prefix: str,
        recipients: Sequence[Recipient] = (),
        groups: Sequence[str] = (),
        *,
        progress: ProgressFn | None = None,
    ) -> ShareReport:
        """Add ``recipients`` and ``groups`` to the folder ``prefix`` and to every file in it
        we can open (header only). Run it again to finish an interrupted share."""
        folder = check_folder(prefix.strip("/"))
        self.forget_policies()
        adds = _dedup([*recipients, *await self._group_recipients(groups)])
        if not adds:
            raise ConfigError("share with whom? name at least one recipient or group")
        report = ShareReport()
        files, sub_policies = await self._walk(folder)
        await self._write_policy(
            folder, add=recipients, add_groups=groups, create=True, report=report
        )
        for sub in sub_policies:
            await self._write_policy(
                sub, add=recipients, add_groups=groups, create=False, report=report
            )

        async def one(obj: ObjectInfo) -> None:
            await self._share_file(obj, adds, report)

        await self._run(files, one, SHARE_CONCURRENCY, progress)
        return report

    async def _share_file(self, obj: ObjectInfo, adds: Sequence[Recipient], report: ShareReport
                          ) -> None:
        key = obj.key
        listed: ObjectInfo | None = obj
        for _ in range(ATTEMPTS):
            try:
                header, etag = await self._read_header(key, listed)
                listed = None
                missing = [r for r in adds if r.key_id not in header.key_ids]
                if not missing:
                    report.already.append(key)
                    return
                opened, _ = open_any(header, self.identities, binding=self._binding(key))
                new_head = opened.reseal(add=missing)
                await self.store.replace_head(key, new_head, HEADER_SIZE, if_match=etag)
            except PreconditionFailedError:
                continue
            except NoSuchObjectError:
                return  # deleted meanwhile: nothing to share
            except NoIdentityMatchError:
                report.not_readable.append(key)
                return
            except _NotEnvelope:
                report.foreign.append(key)
                return
            except (FormatError, HeaderAuthError, SignatureError, ConfigError) as exc:
                self._file_failed(report, key, exc)
                return
            report.changed.append(key)
            return
        self._file_failed(report, key, PreconditionFailedError("it kept changing"))

    # -- unshare ----------------------------------------------------------------------------

    async def _removed_key_ids(self, recipients: Sequence[Recipient], groups: Sequence[str]
                               ) -> frozenset[bytes]:
        ids = {r.key_id for r in recipients}
        for name in groups:
            ids.update(g.identity.recipient.key_id for g in self.group_identities
                       if g.name == name)
            current = await self.group_recipient(name)
            if current is not None:
                ids.add(current.key_id)
        if self.identity.recipient.key_id in ids:
            raise ConfigError("you cannot unshare a folder with yourself")
        return frozenset(ids)

    async def unshare(
        self,
        prefix: str,
        recipients: Sequence[Recipient] = (),
        groups: Sequence[str] = (),
        *,
        progress: ProgressFn | None = None,
    ) -> ShareReport:
        """Remove ``recipients`` and ``groups`` from the folder ``prefix``, and re-encrypt every
        file in it that still has a stanza for one of them under a fresh file key.

        We become the writer of the re-encrypted files. Whatever the removed people
        downloaded (or whose file keys they kept) before stays theirs.
        """
        folder = check_folder(prefix.strip("/"))
        self.forget_policies()
        removed = await self._removed_key_ids(recipients, groups)
        if not removed:
            raise ConfigError("unshare with whom? name at least one recipient or group")
        gone_groups = frozenset(groups)
        report = ShareReport()
        files, sub_policies = await self._walk(folder)
        await self._write_policy(
            folder, remove=removed, remove_groups=gone_groups, create=True, report=report
        )
        for sub in sub_policies:
            await self._write_policy(
                sub, remove=removed, remove_groups=gone_groups, create=False, report=report
            )
        self.forget_policies()

        async def one(obj: ObjectInfo) -> None:
            await self._unshare_file(obj.key, removed, report)

        await self._run(files, one, REKEY_CONCURRENCY, progress)
        return report

    async def _keepers(self, key: str, header: Header, removed: frozenset[bytes]
                       ) -> tuple[list[Recipient], list[str]]:
        """Recipients of the re-encrypted ``key``: its folder's policy, plus every other
        remaining stanza whose public key we know; and the key ids we do not know."""
        keep = [r for r in await self.resolve_recipients(key) if r.key_id not in removed]
        kept = {r.key_id for r in keep} | {self.identity.recipient.key_id}
        unknown: list[str] = []
        for kid in header.key_ids:
            if kid in removed or kid in kept:
                continue
            recipient = await self._recipient_for_key_id(kid)
            if recipient is None:
                unknown.append(kid.hex())
            elif recipient.key_id not in removed:
                keep.append(recipient)
                kept.add(recipient.key_id)
        return keep, unknown

    async def _recipient_for_key_id(self, kid: bytes) -> Recipient | None:
        for g in self.group_identities:  # any generation of a group -> its current key
            if g.identity.recipient.key_id == kid:
                return await self.group_recipient(g.name)
        return self.trust.recipient_for_key_id(kid) or self._known.get(kid)

    async def _unshare_file(self, key: str, removed: frozenset[bytes], report: ShareReport
                            ) -> None:
        for _ in range(ATTEMPTS):
            try:
                header, etag = await self._read_header(key)
                if not removed & set(header.key_ids):
                    report.already.append(key)
                    return
                opened, _ = open_any(header, self.identities, binding=self._binding(key))
                keep, unknown = await self._keepers(key, header, removed)
                info = await self.store.head(key)
                if info.etag != etag:
                    continue
                await self._rekey(key, info, opened, keep)
            except PreconditionFailedError:
                continue
            except NoSuchObjectError:
                return
            except NoIdentityMatchError:
                log.warning("object %s: not encrypted for you, so it cannot be rekeyed", key)
                report.not_readable.append(key)
                return
            except _NotEnvelope:
                report.foreign.append(key)
                return
            except (FormatError, HeaderAuthError, SignatureError, PayloadError,
                    ConfigError) as exc:
                self._file_failed(report, key, exc)
                return
            if unknown:
                log.warning(
                    "object %s: %d recipient(s) with unknown keys lost access; share again",
                    key, len(unknown),
                )
                report.dropped[key] = unknown
            report.changed.append(key)
            return
        self._file_failed(report, key, PreconditionFailedError("it kept changing"))

    async def _rekey(
        self, key: str, info: ObjectInfo, opened: OpenedEnvelope, recipients: Sequence[Recipient]
    ) -> None:
        """Re-encrypt ``key`` under a fresh file key, streaming: ranged GETs of 1 MiB, chunks
        opened and resealed in a worker thread, uploaded with the header last."""
        h = opened.header
        size = h.plain_size
        check_envelope_size(size, info.size)
        offset, length = table_range(size)
        opened.load_table(await self.store.get(key, offset, offset + length))
        writer = EnvelopeWriter(
            self.identity, recipients, binding=self._binding(key), mtime_ns=h.mtime_ns,
            mode=h.mode,
        )
        count = h.chunk_count
        header_box: list[bytes] = []

        async def rest() -> AsyncIterator[bytes]:
            for first in range(0, count, REKEY_BATCH_CHUNKS):
                indexes = range(first, min(count, first + REKEY_BATCH_CHUNKS))
                start = chunk_range(indexes[0], size)[0]
                last_off, last_len = chunk_range(indexes[-1], size)
                data = await self.store.get(key, start, last_off + last_len)

                def work(indexes: range = indexes, data: bytes = data, start: int = start
                         ) -> bytes:
                    out = bytearray()
                    for i in indexes:
                        off, clen = chunk_range(i, size)
                        plain = opened.open_chunk(i, data[off - start : off - start + clen])
                        out += writer.seal_chunk(plain, last=i == count - 1)
                    return bytes(out)

                yield await trio.to_thread.run_sync(work, limiter=self.cpu_limiter)
            head, table = writer.finish()
            header_box.append(head)
            yield table

        await self.store.put(
            key, PartSource(HEADER_SIZE, rest(), lambda: header_box[0]), if_match=info.etag
        )

    # -- access -----------------------------------------------------------------------------

    async def _reader(self, kid: bytes) -> Reader:
        if kid == self.identity.recipient.key_id:
            return Reader(kid, "me", self.identity.recipient.fingerprint)
        for g in self.group_identities:
            if g.identity.recipient.key_id == kid:
                current = await self.group_recipient(g.name)
                label = group_label(g.name)
                if current is None or current.key_id != kid:
                    label += f" (old key, generation {g.generation})"
                return Reader(kid, label, g.identity.recipient.fingerprint)
        name = self.trust.name_for_key_id(kid)
        recipient = self.trust.recipient_for_key_id(kid) or self._known.get(kid)
        return Reader(kid, name, recipient.fingerprint if recipient else None)

    async def access(self, prefix: str) -> AccessReport:
        """Who can read under ``prefix``: the policy that applies and every file's stanzas."""
        folder = check_folder(prefix.strip("/"))
        self.forget_policies()
        files, sub_policies = await self._walk(folder)
        policies: list[PolicyStatus] = []
        for f in [*reversed(folder_chain(folder)), *sub_policies]:
            status = await self.policy_status(f)
            if status is not None:
                policies.append(status)
        applies = await self.effective_policy(folder)
        readers: list[Reader] = []
        if applies is not None and applies.policy is not None:
            for r in applies.policy.recipients:
                self._known.setdefault(r.key_id, r)
                readers.append(await self._reader(r.key_id))
            for name in applies.policy.groups:
                recipient = await self.group_recipient(name)
                readers.append(Reader(
                    recipient.key_id if recipient else b"", group_label(name),
                    recipient.fingerprint if recipient else None,
                ))
        out: dict[str, FileAccess] = {}
        limiter = trio.CapacityLimiter(SHARE_CONCURRENCY)

        async def one(obj: ObjectInfo) -> None:
            async with limiter:
                out[obj.key] = await self._file_access(obj.key)

        async with trio.open_nursery() as nursery:
            for obj in files:
                nursery.start_soon(one, obj)
        return AccessReport(folder, applies, tuple(readers), policies,
                            [out[k] for k in sorted(out)])

    async def _file_access(self, key: str) -> FileAccess:
        try:
            header, _ = await self._read_header(key)
        except NoSuchObjectError:
            return FileAccess(key, None, "deleted", (), False)
        except (_NotEnvelope, FormatError):
            return FileAccess(key, None, "not an envelope", (), False)
        readers = tuple([await self._reader(kid) for kid in header.key_ids])
        readable = any(i.recipient.key_id in header.key_ids for i in self.identities)
        return FileAccess(
            key, self.trust.describe_signer(header.writer), signature_status(header, self.trust),
            readers, readable,
        )


def _dedup(recipients: Iterable[Recipient]) -> list[Recipient]:
    seen: dict[bytes, Recipient] = {}
    for r in recipients:
        seen.setdefault(r.key_id, r)
    return list(seen.values())

