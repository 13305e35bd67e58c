"""fsck: check every object of a store, say what is wrong, remove only cssfs's own garbage.

What it knows: the envelope checks (cssfs.envelope: header, key commitment and MAC, the writer's
signature, the object binding, the size, the chunk table, every chunk), an ObjectStore (one
LIST, ranged GETs, ``list_uploads``/``abort_upload``, delete), and the names cssfs gives its own
objects: folder markers (``dir/``), bookkeeping (any ``.cssfs-*`` path component: folder
policies, groups) and the journal's conflict copies. What it must not know: the command
line and its output, FUSE, boto3.

Every listed object is one of:

* **folder marker** or **bookkeeping**: recognised by name, counted, not opened;
* **foreign**: its first bytes are not the envelope magic (whatever its size);
* an envelope **readable** by one of the identities: header opened (bound to the object's key),
  size, chunk table and every chunk verified -- the plaintext goes to a scratch buffer in memory
  and nowhere else. ``ok`` or **damaged** with the reason;
* an envelope **not readable** by them: what needs no key is checked (the header parses, the
  writer's signature verifies, it is bound to this key, the object size matches the plaintext
  size the header states); **unreadable** if that holds, else damaged;
* **error**: the store failed on it (the check could not be made); **gone**: deleted meanwhile.

A damaged object whose ETag changed since the LIST is checked again once (another client
replaced it while we read it: that is not damage). Conflict copies (``name.conflict-<UTC
time>-<writer>.ext``, see cssfs.journal.conflict_name) are checked like any file and listed
too; they are never removed.

Leftovers of interrupted uploads: what the store's ``list_uploads`` finds (S3 incomplete
multipart uploads and upload markers whose upload is gone, folder-store temp files). Without
``repair`` nothing in the store changes. With it, only what a cssfs store certainly created and
what has been idle for ``older_than`` seconds is removed: a multipart upload with its cssfs
marker (aborted), a folder store's temp file, a marker without an upload. Another tool's
multipart upload is listed and left alone: S3 cannot say who started it.

Memory stays bounded whatever the object sizes: ``objects_at_once`` objects are verified at
once, each one segment of ``SEGMENT_CHUNKS`` chunks and one window of the chunk table at a time
(the table is hashed window by window against the signed table hash first, then read again
with the chunks and hashed again, as envstream.decrypt_stream does).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import trio

from cssfs.crypto import HASH_SIZE, TAG_SIZE, sha256_hasher
from cssfs.envelope import (
    CHUNK_SIZE,
    HEADER_SIZE,
    MAGIC,
    UNBOUND,
    Header,
    OpenedEnvelope,
    check_envelope_size,
    chunk_range,
    object_binding,
    open_any,
    parse_header,
    table_range,
    verify_signature,
)
from cssfs.errors import (
    BindingError,
    CssfsError,
    FormatError,
    HeaderAuthError,
    NoIdentityMatchError,
    NoSuchObjectError,
    PayloadError,
    SignatureError,
    StoreError,
    TruncatedError,
)
from cssfs.keys import Identity
from cssfs.policy import is_internal
from cssfs.store.base import ObjectInfo, ObjectStore
from cssfs.store.local import TMP_DIR

log = logging.getLogger(__name__)

#: Objects verified at once.
OBJECTS_AT_ONCE = 4
#: Chunks fetched by one ranged GET (2 MiB) and verified in one worker-thread hop.
SEGMENT_CHUNKS = 32
#: Chunk-table entries read at once (1 MiB of table covers 2 GiB of payload).
TABLE_WINDOW = 32768
#: --repair leaves alone what showed activity more recently than this (seconds).
DEFAULT_OLDER_THAN = 3600.0

_CONFLICT = re.compile(r"\.conflict-\d{8}-\d{6}-[0-9a-f]{4}(?:-\d+)?(?=\.|$)")

Kind = Literal["damaged", "unreadable", "foreign", "error", "gone"]


@dataclass(frozen=True)
class Finding:
    """One object that is not simply fine. ``error`` is the exception for damaged and error
    findings (its class says which check failed: the CLI maps it to an exit code)."""

    key: str
    kind: Kind
    reason: str
    error: CssfsError | None = None


@dataclass(frozen=True)
class Leftover:
    """Something an interrupted upload left behind, and what fsck did about it.

    ``what``: ``multipart upload``, ``temp file`` or ``upload marker``. ``ours``: certainly
    created by cssfs. ``idle``: seconds since its last activity. ``removed``: gone now
    (only with repair). ``note``: why it was kept, or what went wrong removing it.
    """

    key: str
    what: str
    size: int
    idle: float
    ours: bool
    removed: bool
    note: str
    upload_id: str = ""
    error: CssfsError | None = None


@dataclass
class FsckReport:
    """What one run found. ``objects`` counts every listed object; ``bytes_verified`` the
    envelope bytes authenticated (headers, tables and chunks)."""

    url: str
    prefix: str
    repair: bool
    objects: int = 0
    bytes_verified: int = 0
    ok: int = 0
    folders: int = 0
    bookkeeping: int = 0
    findings: list[Finding] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)
    conflict_copies: list[tuple[str, str]] = field(default_factory=list)  # (copy, original)

    def of(self, kind: Kind) -> list[Finding]:
        """The findings of one kind, by key."""
        return sorted((f for f in self.findings if f.kind == kind), key=lambda f: f.key)

    @property
    def damaged(self) -> list[Finding]:
        return self.of("damaged")

    @property
    def clean(self) -> bool:
        """True when nothing that could be checked is damaged."""
        return not self.damaged


def conflict_original(key: str) -> str | None:
    """The file a journal conflict copy was made of (``report.conflict-...-ab12.txt`` ->
    ``report.txt``); None if ``key`` is not named like one."""
    folder, slash, name = key.rpartition("/")
    match = _CONFLICT.search(name)
    if match is None:
        return None
    original = name[: match.start()] + name[match.end() :]
    return folder + slash + original if original else None


def _under(key: str, prefix: str) -> bool:
    """``key`` is ``prefix`` itself or inside the folder ``prefix`` names."""
    if not prefix or key == prefix:
        return True
    return key.startswith(prefix if prefix.endswith("/") else prefix + "/")


def _verify_chunks(
    opened: OpenedEnvelope,
    first: int,
    stop: int,
    data: bytes,
    base: int,
    table: memoryview,
    table_first: int,
    scratch: bytearray,
) -> None:
    """Check chunks [first, stop) in ``data`` (which starts at envelope offset ``base``)
    against their table entries and GCM tags; the plaintext lands in ``scratch`` only."""
    size = opened.header.plain_size
    view = memoryview(data)
    out = memoryview(scratch)
    for index in range(first, stop):
        off, length = chunk_range(index, size)
        k = HASH_SIZE * (index - table_first)
        # envstream.decrypt_stream's check with a table entry read in windows: the whole table
        # is never held (OpenedEnvelope.load_table would hold it).
        opened._open_checked_into(
            index, view[off - base : off - base + length], out[: length - TAG_SIZE],
            table[k : k + HASH_SIZE],
        )
    out[:] = bytes(len(out))


class Fsck:
    """One check of ``store`` under ``prefix`` with ``identities`` (own identity first, then
    group identities). ``run()`` returns the report. See the module docstring."""

    def __init__(
        self,
        store: ObjectStore,
        identities: Sequence[Identity],
        *,
        prefix: str = "",
        repair: bool = False,
        older_than: float = DEFAULT_OLDER_THAN,
        progress: Callable[[int], Callable[[int], object]] | None = None,
        objects_at_once: int = OBJECTS_AT_ONCE,
        table_window: int = TABLE_WINDOW,
        cpu_limiter: trio.CapacityLimiter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not identities:
            raise ValueError("fsck needs at least one identity")
        if objects_at_once < 1 or table_window < 1 or older_than < 0:
            raise ValueError("fsck: bad objects_at_once, table_window or older_than")
        self.store = store
        self.identities = tuple(identities)
        self.prefix = prefix
        self.repair = repair
        self.older_than = older_than
        self.objects_at_once = objects_at_once
        self.table_window = table_window
        self.cpu_limiter = cpu_limiter or trio.CapacityLimiter(max(1, os.cpu_count() or 1))
        self._progress = progress
        self._update: Callable[[int], object] = lambda n: None
        self._clock = clock
        self._owners: dict[bytes, str] | None = None
        self._keys: list[str] = []
        self.report = FsckReport(store.url, prefix, repair)

    # -- the run ----------------------------------------------------------------------------

    async def run(self) -> FsckReport:
        """List, classify and verify everything, then look for upload leftovers."""
        report = self.report
        listing = await self.store.list(self.prefix)
        objects = [o for o in listing.objects if _under(o.key, self.prefix)]
        report.objects = len(objects)
        self._keys = [o.key for o in objects]
        files: list[ObjectInfo] = []
        for obj in objects:
            if obj.key.endswith("/"):
                report.folders += 1
            elif is_internal(obj.key):
                report.bookkeeping += 1
            else:
                files.append(obj)
                original = conflict_original(obj.key)
                if original is not None:
                    report.conflict_copies.append((obj.key, original))
        report.conflict_copies.sort()
        if self._progress is not None:
            self._update = self._progress(sum(o.size for o in files))
        await self._check_all(files)
        await self._leftovers()
        report.findings.sort(key=lambda f: (f.kind, f.key))
        report.leftovers.sort(key=lambda x: (x.key, x.upload_id))
        return report

    async def _check_all(self, files: list[ObjectInfo]) -> None:
        send, recv = trio.open_memory_channel[ObjectInfo](0)

        async def worker(mine: trio.MemoryReceiveChannel[ObjectInfo]) -> None:
            scratch = bytearray(CHUNK_SIZE)
            async with mine:
                async for obj in mine:
                    await self._check(obj, scratch, again=True)

        async with trio.open_nursery() as nursery:
            async with recv:
                for _ in range(self.objects_at_once):
                    nursery.start_soon(worker, recv.clone())
            async with send:
                for obj in files:
                    await send.send(obj)

    async def _check(self, obj: ObjectInfo, scratch: bytearray, *, again: bool) -> None:
        """Classify and verify one object; its finding (if any) goes into the report."""
        counted = 0

        def verified(n: int) -> None:
            nonlocal counted
            counted += n
            self.report.bytes_verified += n
            self._update(n)

        finding: Finding | None = None
        try:
            head = await self.store.get(obj.key, 0, HEADER_SIZE)
            if head[: len(MAGIC)] != MAGIC:
                why = "empty object" if obj.size == 0 else "no cssfs envelope magic"
                finding = Finding(obj.key, "foreign", f"not a cssfs envelope ({why})")
            else:
                readable = await self._verify(obj, head, scratch, verified)
                if readable:
                    self.report.ok += 1
                else:
                    finding = Finding(obj.key, "unreadable", "not encrypted for you")
        except NoSuchObjectError:
            finding = Finding(obj.key, "gone", "deleted while fsck ran")
        except (FormatError, HeaderAuthError, SignatureError, PayloadError) as exc:
            if again and await self._changed(obj, scratch):
                self._update(max(0, obj.size - counted))
                return
            log.debug("object %s: damaged: %s", obj.key, exc)
            finding = Finding(obj.key, "damaged", str(exc), exc)
        except StoreError as exc:
            finding = Finding(obj.key, "error", f"could not be checked: {exc}", exc)
        if finding is not None:
            self.report.findings.append(finding)
        self._update(max(0, obj.size - counted))

    async def _changed(self, obj: ObjectInfo, scratch: bytearray) -> bool:
        """After a failure: if the object was replaced since the LIST, check the new version
        instead (True); False if it is the version that failed."""
        try:
            now = await self.store.head(obj.key)
        except NoSuchObjectError:
            self.report.findings.append(Finding(obj.key, "gone", "deleted while fsck ran"))
            return True
        except StoreError:
            return False
        if now.etag == obj.etag:
            return False
        log.debug("object %s: changed while being checked; checking it again", obj.key)
        await self._check(now, scratch, again=False)
        return True

    async def _verify(
        self,
        obj: ObjectInfo,
        head: bytes,
        scratch: bytearray,
        verified: Callable[[int], None],
    ) -> bool:
        """Check one envelope; True if readable and intact, False if intact as far as can be
        seen without its key. Raises the error of the first check that fails."""
        if len(head) < HEADER_SIZE:
            raise FormatError(
                f"the envelope is truncated inside its header ({len(head)} of {HEADER_SIZE} "
                "bytes)"
            )
        header = parse_header(head)
        binding = object_binding(self.store.full_key(obj.key))
        try:
            opened, _ = open_any(header, self.identities, binding=binding)
        except NoIdentityMatchError:
            verify_signature(header)
            self._check_binding(header, binding)
            check_envelope_size(header.plain_size, obj.size)
            verified(HEADER_SIZE)
            return False
        except BindingError:
            self._check_binding(header, binding)
            raise
        check_envelope_size(header.plain_size, obj.size)
        verified(HEADER_SIZE)
        await self._verify_payload(obj.key, opened, scratch, verified)
        return True

    def _check_binding(self, header: Header, binding: bytes) -> None:
        """BindingError naming the object the envelope belongs to, if it is not this one (for
        a header we cannot open, the binding is unauthenticated but still tells a swap)."""
        if header.binding == binding:
            return
        if header.binding == UNBOUND:
            raise BindingError(
                "the envelope is bound to no object (made by `cssfs encrypt` and copied in?)"
            )
        if self._owners is None:
            self._owners = {object_binding(self.store.full_key(k)): k for k in self._keys}
        owner = self._owners.get(header.binding)
        where = f" ({owner})" if owner is not None else ""
        raise BindingError(f"the envelope belongs to another object{where}: moved or swapped")

    async def _get_exact(self, key: str, start: int, length: int, what: str) -> bytes:
        data = await self.store.get(key, start, start + length)
        if len(data) != length:
            raise TruncatedError(f"{what}: short read ({len(data)} of {length} bytes)")
        return data

    async def _verify_payload(
        self,
        key: str,
        opened: OpenedEnvelope,
        scratch: bytearray,
        verified: Callable[[int], None],
    ) -> None:
        """The chunk table against the signed hash, then every chunk against the table."""
        size = opened.header.plain_size
        count = opened.chunk_count
        table_off, _ = table_range(size)
        windows = [
            range(s, min(s + self.table_window, count))
            for s in range(0, count, self.table_window)
        ]

        async def window(w: range) -> bytes:
            return await self._get_exact(
                key, table_off + HASH_SIZE * w.start, HASH_SIZE * len(w), "chunk table"
            )

        # Pass 1: the table must match the writer's signature before any chunk is trusted.
        first: bytes | None = None
        hasher = sha256_hasher()
        for w in windows:
            data = await window(w)
            hasher.update(data)
            if len(windows) == 1:
                first = data  # small table: pass 2 reuses it
        if hasher.finalize() != opened.header.table_hash:
            raise PayloadError("chunk table does not match the writer's signature")
        verified(HASH_SIZE * count)
        # Pass 2: every chunk, a segment at a time, against its table entry and GCM tag.
        recheck = sha256_hasher()
        for w in windows:
            table = first if first is not None else await window(w)
            recheck.update(table)
            for s in range(w.start, w.stop, SEGMENT_CHUNKS):
                stop = min(s + SEGMENT_CHUNKS, w.stop)
                start = chunk_range(s, size)[0]
                last_off, last_len = chunk_range(stop - 1, size)
                data = await self._get_exact(
                    key, start, last_off + last_len - start, f"chunks {s}-{stop - 1}"
                )
                await trio.to_thread.run_sync(
                    _verify_chunks, opened, s, stop, data, start, memoryview(table), w.start,
                    scratch, limiter=self.cpu_limiter,
                )
                verified(len(data))
        if recheck.finalize() != opened.header.table_hash:
            raise PayloadError("the envelope changed while it was being checked")

    # -- leftovers of interrupted uploads ---------------------------------------------------

    async def _leftovers(self) -> None:
        uploads = await self.store.list_uploads(self.prefix)
        now = self._clock()
        for upload in uploads:
            if not _under(upload.key, self.prefix):
                continue
            if not upload.upload_id:
                what = "upload marker"  # S3: its upload finished or was aborted
            elif upload.key == f"{TMP_DIR}/{upload.upload_id}":
                what = "temp file"  # the folder store's
            else:
                what = "multipart upload"
            idle = max(0.0, now - upload.last_activity)
            if upload.ours:
                note = self._not_yet(idle)
            else:
                note = "not started by cssfs (or its marker is missing): left alone"
            removed, error = False, None
            if not note:
                try:
                    await self.store.abort_upload(upload.key, upload.upload_id)
                    removed, note = True, "removed"
                except StoreError as exc:
                    note, error = f"could not be removed: {exc}", exc
            self.report.leftovers.append(Leftover(
                upload.key, what, upload.size, idle, upload.ours, removed, note,
                upload.upload_id, error,
            ))

    def _not_yet(self, idle: float) -> str:
        """Why a leftover of ours is kept ("" if it is to be removed now)."""
        if idle < self.older_than:
            return (f"idle less than {self.older_than / 60:g} min, may still be running: "
                    "left alone")
        if not self.repair:
            return "cssfs garbage: --repair removes it"
        return ""
