"""journal: closed files waiting for upload -- durable, encrypted, uploaded in the background.

What it knows: the mount's journal directory (``<state_dir>/journal/``), envelopes (it seals
them with EnvelopeWriter for the EncryptedStore's identity, recipients and bindings, reseals
their headers for a new key, mtime or mode, and reads them back), the raw ObjectStore (HEAD and
the first 4096 bytes of an object, to tell our own envelopes from somebody else's), trio. What
it must not know: FUSE, inodes, boto3, plaintext on disk -- everything it writes is ciphertext,
and a crash leaves nothing but ciphertext behind.
docs/WRITES.md is the long version of this docstring, with the on-disk format.

The model. The journal is a set of *records*, each one sidecar file ``<seq>.json`` (seq: a
counter, so replay keeps the order of events) and usually one envelope file ``<seq>.env``. A
record asks for up to two kinds of store operations, and in memory each becomes an *op*:

* a **put**: the envelope must end up under ``key``, written conditionally: If-Match the
  version we expect there, or If-None-Match for a new file;
* **deletes** (``cleanup``): after the put lands (or at once, for a tombstone record without a
  put), ``key`` must be removed -- the old name after a rename, a file unlinked while its upload
  was pending.

Ops on one key run strictly in order (a queue per key); at most one per key is in flight, and a
new put on a key *supersedes* every queued (not yet started) op on it. What may be overwritten
or deleted is an *expectation*: ETags we know of, plus the salts of our own envelopes (read from
the object's header), so an op never destroys a version it has not seen -- a put that meets a
stranger keeps both (the conflict copy), a delete that meets one leaves it. Because of this an op
can always be repeated: replay after a crash re-runs every record, and an upload that had landed
before the crash is recognised by its salt.

Invariants the ``await`` points keep (all state changes happen under ``_mutex``; the uploads and
store calls themselves run outside it):

* every op is in exactly one key queue until it is DONE or DROPPED; the queue's first op is the
  only one that may be RUNNING; an op with a ``gate`` starts only after the gate is finished;
* a RUNNING op is never changed: rename/set_attrs/commit/unlink mark it *obsolete* and queue new
  ops behind it (an obsolete put makes no conflict copy and is not retried);
* the envelope file is read by at most one RUNNING put at a time (ops sharing it are gated on
  each other); its header is rewritten only under the mutex, after the new header is saved in
  the sidecar (a redo record: a torn header write is repaired at replay);
* a record's files are removed only when its put has landed (or was superseded/unlinked) and its
  deletes are done; a sidecar is replaced atomically (write, fsync, rename, fsync directory).
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import errno
import json
import logging
import math
import os
import random
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

import trio

from cssfs.encstore import EncryptedStore
from cssfs.envelope import (
    CHUNK_SIZE,
    HEADER_SIZE,
    TAG_SIZE,
    EnvelopeWriter,
    OpenedEnvelope,
    check_envelope_size,
    chunk_count,
    chunk_range,
    chunks_for,
    open_header,
    parse_header,
    table_range,
)
from cssfs.errors import (
    ConfigError,
    CssfsError,
    FormatError,
    JournalError,
    NoSuchObjectError,
    PreconditionFailedError,
    StoreError,
    StoreUnavailableError,
)
from cssfs.keys import Recipient
from cssfs.staging import PlainFile
from cssfs.store.base import ObjectInfo, ObjectStore, PartSource

log = logging.getLogger(__name__)

FORMAT = "cssfs-journal-1"
DEFAULT_MAX_UPLOADS = 4
#: A new commit waits this long before its upload starts, so that the utimes/chmod/rename that
#: tools like rsync do right after close() reseal the local file instead of re-uploading it.
DEFAULT_SETTLE_S = 0.5
MAX_BACKOFF_S = 60.0
MAX_BACKOFF_PERMANENT_S = 300.0
_MAX_RECHECKS = 5
_MAX_REMEMBERED = 10_000
_INLINE_CHUNKS = 2
#: How long a commit waits for the store to say who a file is for (its folder's policy) before
#: it seals the file for us alone; the recipients are added before the upload.
RECIPIENTS_WAIT_S = 2.0
#: Chunks sealed per worker-thread hop at commit (2 MiB).
SEAL_BATCH_CHUNKS = 32
#: A file of at most this many chunks (1 MiB) is committed in one thread hop, under the mutex.
SMALL_COMMIT_CHUNKS = 16
#: A file being written starts its upload once this much of it is sealed (an eager upload).
EAGER_MIN_BYTES = 32 * 1024 * 1024
#: Ciphertext of small pending envelopes kept in memory for their upload, at most (all files).
HELD_BYTES = 32 * 1024 * 1024
#: rsync's temporary names (.NAME.XXXXXX): renamed right after close, so never uploaded early.
_TEMP_NAME = re.compile(r"\.[^/]+\.[A-Za-z0-9]{6}")
#: Bytes read from the envelope file per piece of an eager upload, into one reused buffer (the
#: store copies each piece into its part buffers). 1 MiB: 4 MiB held 3.7 MiB more at the peak
#: of a 256 MiB cp, for no measurable speed (a thread hop per MiB is noise next to the PUTs).
_EAGER_PIECE = 1024 * 1024

QUEUED: Literal["queued"] = "queued"
RUNNING: Literal["running"] = "running"
DONE: Literal["done"] = "done"
DROPPED: Literal["dropped"] = "dropped"
State = Literal["queued", "running", "done", "dropped"]


# -- public data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingInfo:
    """A closed file not yet in the store, as getattr/readdir should show it."""

    key: str
    size: int
    mtime_ns: int
    mode: int


@dataclass(frozen=True)
class Uploaded:
    """What the listing cache learns when a pending file lands in the store."""

    key: str
    etag: str
    size: int  # plaintext bytes
    cipher_size: int
    mtime_ns: int
    mode: int


@dataclass
class JournalStats:
    """Counters for ``cssfs status`` and tests."""

    pending: int = 0  # files waiting for upload (queued or in flight)
    pending_bytes: int = 0  # their plaintext bytes
    deleting: int = 0  # store deletes waiting (old names after renames, unlinks)
    in_flight: int = 0
    uploaded: int = 0
    bytes_uploaded: int = 0  # envelope bytes
    deleted: int = 0
    conflicts: int = 0
    broken: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # key -> last error, still waiting
    conflict_copies: list[tuple[str, str]] = field(default_factory=list)  # (key, copy key)


def conflict_name(key: str, when: datetime, writer: str, n: int = 0) -> str:
    """Where our version of ``key`` goes when the store holds a version we did not see.

    ``dir/report.txt`` -> ``dir/report.conflict-20240131-235959-ab12.txt`` (UTC time of the
    conflict, first 4 hex digits of the writer's fingerprint; ``-2``, ``-3``... if taken).
    A name without an extension (or a dotfile) gets the tag at the end.
    """
    folder, _, name = key.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    tag = f"conflict-{when:%Y%m%d-%H%M%S}-{writer}" + (f"-{n + 1}" if n else "")
    new = f"{stem}.{tag}.{ext}" if dot and stem else f"{name}.{tag}"
    return f"{folder}/{new}" if folder else new


# -- internals --------------------------------------------------------------------------------


@dataclass
class _Expect:
    """What may be under a key before an op runs: known ETags, our envelopes' salts, and the
    ETag to try first (None: try If-None-Match)."""

    etags: set[str] = field(default_factory=set)
    salts: set[bytes] = field(default_factory=set)
    hint: str | None = None

    def merge(self, other: _Expect) -> None:
        self.etags |= other.etags
        self.salts |= other.salts

    def copy(self) -> _Expect:
        return _Expect(set(self.etags), set(self.salts), self.hint)

    @property
    def anything(self) -> bool:
        """Whether some earlier version may exist under the key."""
        return bool(self.etags or self.salts)

    def to_json(self) -> dict[str, Any]:
        return {
            "etags": sorted(self.etags),
            "salts": sorted(s.hex() for s in self.salts),
            "hint": self.hint,
        }

    @classmethod
    def from_json(cls, data: Any) -> _Expect:
        if not isinstance(data, dict):
            raise ValueError("expect is not an object")
        etags = data["etags"]
        salts = data["salts"]
        hint = data["hint"]
        if not isinstance(etags, list) or not isinstance(salts, list):
            raise ValueError("bad expect lists")
        if not all(isinstance(e, str) for e in etags) or not all(isinstance(s, str) for s in salts):
            raise ValueError("bad expect lists")
        if hint is not None and not isinstance(hint, str):
            raise ValueError("bad hint")
        return cls(set(etags), {bytes.fromhex(s) for s in salts}, hint)


@dataclass(eq=False)
class _Envelope:
    """One local envelope file and what its header says now."""

    path: Path
    salt: bytes
    size: int  # plaintext
    cipher_size: int
    binding: bytes
    mtime_ns: int
    mode: int
    # Sealed for us alone because the folder's sharing policy could not be read (store down):
    # its recipients are added to the header before the upload.
    unresolved: bool = False
    # A copy of the file's bytes (ciphertext), kept for a small envelope so that its upload
    # does not read the file back; the header is rewritten in both (see HELD_BYTES).
    data: bytearray | None = field(default=None, repr=False)
    # The header as we sealed or last resealed it, opened, with its chunk table (the file key:
    # memory only), so a reseal or a read of a file we just wrote skips the unwrap and the
    # signature check. None after a replay: the first reader opens it from disk, as anyone would.
    opened: OpenedEnvelope | None = field(default=None, repr=False)


@dataclass(eq=False)
class _Op:
    kind: Literal["put", "delete"]
    key: str
    expect: _Expect
    record: _Record
    env: _Envelope | None = None  # put only
    mtime_ns: int = 0  # put: what the header must say when it is uploaded
    mode: int = 0o644
    gate: _Op | None = None
    state: State = QUEUED
    obsolete: bool = False
    attempted: bool = False  # an upload was tried (it may have landed) -- or we cannot know
    ready_at: float = 0.0
    not_before: float = 0.0
    failures: int = 0
    error: BaseException | None = None
    conflict_of: str | None = None
    conflict_n: int = 0
    changed: trio.Event = field(default_factory=trio.Event)
    eager: EagerUpload | None = None  # put: the upload started while the file was written

    @property
    def finished(self) -> bool:
        return self.state in (DONE, DROPPED)

    def signal(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


@dataclass(eq=False)
class _Record:
    """One sidecar (and its envelope file): a put and/or deletes that must reach the store."""

    seq: int
    env: _Envelope | None
    put: _Op | None = None
    cleanup: list[_Op] = field(default_factory=list)
    header_redo: bytes | None = None
    disk_put: bool = False  # whether the sidecar on disk still asks for the put
    users: int = 0  # RUNNING puts reading the envelope file
    removed: bool = False


@dataclass(frozen=True)
class _Current:
    etag: str
    salt: bytes | None


class SealSink:
    """The envelope of a new file, sealed chunk by chunk while the file is still written
    (staging.ChunkSink; made by Journal.seal_sink). Its file is ``seal-<random>.tmp`` until a
    commit finishes it and renames it into the journal; a file never committed is removed
    when the StagedFile closes (and, after a crash, at replay, as every ``*.tmp``)."""

    def __init__(self, journal: Journal, key: str) -> None:
        self.journal = journal
        self.key = key  # at open: the recipients were chosen for it
        self.live = True
        self.writer: EnvelopeWriter | None = None
        self.recipients: Sequence[Recipient] = ()
        self.unresolved = False
        self.path: Path | None = None
        self.fd = -1
        self.count = 0  # chunks sealed into the file
        self._name = ""
        self._committed = False
        self.eager: EagerUpload | None = None

    def __repr__(self) -> str:
        return f"SealSink(count={self.count}, live={self.live})"

    async def put(self, first: int, chunks: list[bytes]) -> bool:
        if not self.live or first != self.count:
            return False
        journal = self.journal
        if self.writer is None:
            self.recipients, self.unresolved = await journal._recipients_for(self.key)
            self.writer = EnvelopeWriter(journal._identity, self.recipients,
                                         binding=journal._enc.binding_for(self.key))
            self._name = f"seal-{secrets.token_hex(8)}.tmp"
            journal._seal_files.add(self._name)
            self.path = journal.directory / self._name
            self.fd = await trio.to_thread.run_sync(_create_exclusive, self.path)
        if not self.live:  # detached while we waited
            return False
        offset = HEADER_SIZE + self.count * (CHUNK_SIZE + TAG_SIZE)
        offset += await trio.to_thread.run_sync(
            _seal_batch, self.writer, [(c, False) for c in chunks], self.fd, offset,
            limiter=journal._enc.cpu_limiter,
        )
        self.count += len(chunks)
        if self.eager is not None:
            self.eager.grew(offset)
        elif offset >= EAGER_MIN_BYTES and journal.eager_uploads:
            self.eager = journal._start_eager(self, offset)
        return True

    async def get(self, index: int) -> bytes:
        if self.writer is None or index >= self.count:
            raise JournalError(f"journal: internal error: chunk {index} was not sealed here")
        sealed = await trio.to_thread.run_sync(
            os.pread, self.fd, CHUNK_SIZE + TAG_SIZE,
            HEADER_SIZE + index * (CHUNK_SIZE + TAG_SIZE),
        )
        return self.writer.open_sealed(index, sealed)

    def detach(self) -> None:
        self.live = False
        if self.eager is not None:
            self.eager.abort()
            self.eager = None

    def installed(self, path: Path) -> None:
        """A commit renamed the file into the journal: it is the journal's now (the open
        descriptor still reads the chunks back)."""
        self._committed = True
        self.path = path
        self.journal._seal_files.discard(self._name)

    def close(self) -> None:
        self.live = False
        if self.eager is not None and not self._committed:
            self.eager.abort()
        self.eager = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self._committed and self.path is not None:
            _unlink_quietly(self.path)
            self.journal._seal_files.discard(self._name)


class EagerUpload:
    """The upload of a SealSink's envelope, started while the file is still being written.

    A multipart upload (PartSource) reads the envelope file as the sink seals it; part 1, the
    header, goes last -- and only once the journal *approves* it: the file was committed (so
    the close is durable first), its put op started (after the settle time, under the key it
    still has) and the key holds nothing but versions it may replace. Anything else (the sink
    detached or closed uncommitted, the op renamed, superseded or unlinked, a stranger's
    version there) aborts it; the store then aborts the multipart upload and, if the file was
    committed, the op uploads it from the journal as usual. Nothing becomes visible in the
    store before the approval.
    """

    def __init__(self, key: str, fd: int, ready: int) -> None:
        self.key = key
        self._fd = fd  # a duplicate of the sink's descriptor: ours to close
        self._ready = ready  # bytes of the envelope file sealed so far (header region included)
        self._final: int | None = None  # its size once committed
        self._more = trio.Event()
        self._gate = trio.Event()
        self._approved = False
        self.aborted = False
        self.done = trio.Event()
        self.result: ObjectInfo | None = None
        self.error: BaseException | None = None

    def __repr__(self) -> str:
        return f"EagerUpload({self.key!r}, ready={self._ready}, final={self._final})"

    def _wake(self) -> None:
        self._more.set()
        self._more = trio.Event()

    def grew(self, ready: int) -> None:
        self._ready = ready
        self._wake()

    def committed(self, size: int) -> None:
        self._final = size
        self._wake()

    def approve(self) -> None:
        self._approved = True
        self._gate.set()

    def abort(self) -> None:
        if not self._approved:
            self.aborted = True
            self._gate.set()
            self._wake()

    async def run(self, store: ObjectStore) -> None:
        try:
            self.result = await store.put(
                self.key, PartSource(HEADER_SIZE, self._rest(), self._head)
            )
        except Exception as exc:  # the op uploads from the journal instead
            self.error = exc
            if not self.aborted:
                log.debug("journal: early upload of %s failed: %s", self.key, exc)
        finally:
            os.close(self._fd)
            self.done.set()

    async def _rest(self) -> Any:
        # One buffer, refilled for every piece (the PartSource contract allows it): a new
        # multi-MiB bytes per piece comes, once glibc's dynamic mmap threshold has risen past
        # it, from the heap between smaller blocks and leaves it fragmented (a 256 MiB cp
        # peaked 16 MiB higher, with 4 MiB pieces, and spent 13% more CPU).
        buf = bytearray(_EAGER_PIECE)
        pos = HEADER_SIZE
        while True:
            if self.aborted:
                raise JournalError("early upload abandoned")
            limit = self._final if self._final is not None else self._ready
            if pos < limit:
                n = min(limit - pos, _EAGER_PIECE)
                piece = memoryview(buf)[:n]
                got = await trio.to_thread.run_sync(os.preadv, self._fd, [piece], pos)
                if got != n:
                    raise JournalError("envelope file shorter than sealed")
                pos += n
                yield piece
            elif self._final is not None:
                return
            else:
                await self._more.wait()

    async def _head(self) -> bytes:
        await self._gate.wait()
        if not self._approved:
            raise JournalError("early upload abandoned")
        return await trio.to_thread.run_sync(os.pread, self._fd, HEADER_SIZE, 0)


class PendingFile:
    """A closed-but-not-uploaded file, read back (and verified) from its local envelope.

    Holds its own descriptor, so it keeps working when the journal reseals the header (only
    the header changes) or removes the file after the upload. Close it when done.
    """

    def __init__(
        self, key: str, f: BinaryIO | bytearray, opened: OpenedEnvelope, mtime_ns: int, mode: int
    ) -> None:
        self.key = key
        self._f = f  # the envelope file, or the journal's copy of a small one (HELD_BYTES)
        self._opened = opened
        self.mtime_ns = mtime_ns  # what the upload will say (set_attrs may be ahead of the file)
        self.mode = mode
        self.etag: str | None = None

    def __repr__(self) -> str:
        return f"PendingFile(size={self.size})"

    @property
    def size(self) -> int:
        """Plaintext size in bytes."""
        return self._opened.header.plain_size

    def _read_sync(self, indexes: range) -> list[bytes]:
        size = self.size
        first_off, _ = chunk_range(indexes.start, size)
        last_off, last_len = chunk_range(indexes.stop - 1, size)
        if isinstance(self._f, bytearray):  # only the header of a held copy ever changes
            view = memoryview(self._f)[first_off : last_off + last_len]
        else:
            view = memoryview(os.pread(self._f.fileno(), last_off + last_len - first_off,
                                       first_off))
        out = []
        for i in indexes:
            off, length = chunk_range(i, size)
            out.append(self._opened.open_chunk(i, view[off - first_off : off - first_off + length]))
        return out

    async def read(self, offset: int, size: int) -> bytes:
        """Plaintext [offset, offset + size), clipped at the end; every chunk authenticated."""
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        indexes = chunks_for(offset, size, self.size)
        if not indexes:
            return b""
        if len(indexes) <= _INLINE_CHUNKS:
            chunks = self._read_sync(indexes)
        else:
            chunks = await trio.to_thread.run_sync(self._read_sync, indexes)
        first = indexes.start * CHUNK_SIZE
        end = min(offset + size, self.size)
        return b"".join(chunks)[offset - first : end - first]

    def close(self) -> None:
        if not isinstance(self._f, bytearray):
            self._f.close()

    async def aclose(self) -> None:
        self.close()


# -- the journal ------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What a new op replacing whatever ``key`` will hold must do to the key's queue."""

    expect: _Expect
    drop: list[_Op]  # queued ops it supersedes
    obsolete: list[_Op]  # running puts whose bytes it replaces
    running: list[_Op]  # every running op on the key (the new op waits behind them)


class Journal:
    """Closed files, durable in ``<state_dir>/journal/``, uploaded in the background by run().

    ``on_uploaded(Uploaded)`` is called when a pending file has landed, ``on_deleted(key)``
    when the journal removed an object (old name after a rename, unlink); both synchronously
    from the uploader, so they must not block. ``settle_s``: how long a new commit waits before
    its upload starts (see DEFAULT_SETTLE_S); flush() skips the wait. Call replay() once at
    mount start (before or after run() starts).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        encstore: EncryptedStore,
        *,
        max_uploads: int = DEFAULT_MAX_UPLOADS,
        settle_s: float = DEFAULT_SETTLE_S,
        on_uploaded: Callable[[Uploaded], None] | None = None,
        on_deleted: Callable[[str], None] | None = None,
    ) -> None:
        if max_uploads < 1:
            raise ValueError("max_uploads must be at least 1")
        self.directory = Path(state_dir) / "journal"
        self.broken_dir = self.directory / "broken"
        self._enc = encstore
        self._store = encstore.store
        self._identity = encstore.identity
        self._writer_tag = self._identity.recipient.fingerprint.replace("-", "")[:4]
        self.max_uploads = max_uploads
        self.settle_s = settle_s
        self.on_uploaded = on_uploaded
        self.on_deleted = on_deleted
        self._mutex = trio.Lock()
        self._queues: dict[str, list[_Op]] = {}
        self._records: dict[int, _Record] = {}
        self._running = 0
        self._wakeup = trio.Event()
        self._wake_at = math.inf  # when the uploader looks again if nobody kicks it
        self._uploader = False
        self._stopped = trio.Event()
        self._sealing: dict[str, int] = {}
        self._seal_files: set[str] = set()  # temporary files of commits in progress
        self._sealing_done = trio.Event()
        self._held = 0  # bytes of _Envelope.data
        # Finished records whose files the uploader's janitor removes, outside the mutex.
        self._trash: list[_Record] = []
        self._trash_added = trio.Event()
        self._trashing = False
        self._trash_done = trio.Event()
        # Sidecars replaced without a directory fsync (_persist(durable=False)), counted, and
        # how many of them a directory fsync is known to cover (it started after them).
        self._dir_changes = 0
        self._dir_synced = 0
        self._stats = JournalStats()
        self._replayed = False
        self._nursery: trio.Nursery | None = None  # run()'s: where early uploads run
        #: Start uploading large new files while they are written (EagerUpload).
        self.eager_uploads = True
        # The store failed as unreachable since the last op that reached it: commits then seal
        # without asking it for recipients (each ask would wait out the store's retries).
        self._unreachable = False
        # The last version each key got from us this session: never a stranger's, so a later
        # commit may replace it whatever base the caller names (it may have landed while that
        # commit was being sealed).
        self._ours: OrderedDict[str, str] = OrderedDict()
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._next_seq = self._scan_max_seq() + 1
        except OSError as exc:
            raise JournalError(
                f"cannot use the journal directory {self.directory}: {exc.strerror}", exc.errno
            ) from exc

    def __repr__(self) -> str:
        return f"Journal({str(self.directory)!r}, records={len(self._records)})"

    # -- files ----------------------------------------------------------------------------

    def _scan_max_seq(self) -> int:
        top = 0
        for name in os.listdir(self.directory):
            stem = name.split(".", 1)[0]
            if stem.isdigit():
                top = max(top, int(stem))
        return top

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _sidecar_path(self, seq: int) -> Path:
        return self.directory / f"{seq:016d}.json"

    def _env_path(self, seq: int) -> Path:
        return self.directory / f"{seq:016d}.env"

    def _sidecar(self, record: _Record, dropping: Iterable[_Op] = ()) -> dict[str, Any]:
        """The sidecar of ``record`` as it will be once ``dropping`` are dropped."""
        gone = set(map(id, dropping))
        put = record.put if record.put is not None and id(record.put) not in gone else None
        cleanup = [
            {"key": op.key, "expect": op.expect.to_json()}
            for op in record.cleanup
            if not op.finished and id(op) not in gone and (put is None or op.key != put.key)
        ]
        data: dict[str, Any] = {
            "format": FORMAT,
            "seq": record.seq,
            "env": record.env.path.name if record.env is not None else None,
            "put": None,
            "cleanup": cleanup,
        }
        if put is not None:
            assert record.env is not None
            data["put"] = {
                "key": put.key,
                "size": record.env.size,
                "mtime_ns": put.mtime_ns,
                "mode": put.mode,
                "expect": put.expect.to_json(),
                "base_etag": put.expect.hint if put.expect.hint is not None else "absent",
                "conflict_of": put.conflict_of,
            }
            if record.env.unresolved:
                data["put"]["resolve_recipients"] = True
        if record.header_redo is not None:
            data["header"] = base64.b64encode(record.header_redo).decode("ascii")
        return data

    def _write_sidecar_sync(self, seq: int, data: dict[str, Any], sync_dir: bool = True) -> None:
        """Replace a sidecar atomically: write and fsync ``<seq>.json.tmp``, rename it over
        ``<seq>.json``, then (``sync_dir``) fsync the directory so that the new name is durable.
        Without ``sync_dir`` the caller must call _sync_dir() before anything reaches the store
        on the strength of the new sidecar (see _persist)."""
        path = self._sidecar_path(seq)
        tmp = path.with_name(path.name + ".tmp")
        body = json.dumps(data, sort_keys=True).encode("utf-8")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if sync_dir:
            self._fsync_dir()

    def _install_sync(self, sealed: Path, path: Path, seq: int, data: dict[str, Any]) -> None:
        """Rename a sealed envelope to ``path`` and write its record's first sidecar durably.
        On failure neither file is left behind (the caller's close fails: nothing promised)."""
        os.replace(sealed, path)
        try:
            self._write_sidecar_sync(seq, data)
        except BaseException:
            for leftover in (self._sidecar_path(seq), path):
                _unlink_quietly(leftover)
            sidecar = self._sidecar_path(seq)
            _unlink_quietly(sidecar.with_name(sidecar.name + ".tmp"))
            raise

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def _persist(
        self, record: _Record, dropping: Iterable[_Op] = (), *, durable: bool = True,
        then: Callable[[], None] | None = None,
    ) -> None:
        """Write the record's sidecar (caller holds the mutex); JournalError.

        ``durable=False`` (a rename or set_attrs of a file whose upload has not started, a
        sidecar tidied after some of its ops finished) leaves out the directory fsync: the new
        sidecar is complete on disk (its own fsync, then an atomic rename), but after a power
        loss the directory may still show the previous one -- the state before the rename or
        attribute change, as a local filesystem may forget a rename that was not fsynced; never
        less data. Every directory fsync (any commit's, _sync_dir's) makes it durable, and
        _sync_dir() runs before any upload or delete, so the store never gets ahead of it.

        ``then`` runs in the same worker thread right after the sidecar is written: one thread
        hop, not two. If it raises OSError, JournalError is raised (the sidecar stands).
        """
        if record.removed:
            return
        data = self._sidecar(record, dropping)
        changes = self._dir_changes

        def write() -> None:
            self._write_sidecar_sync(record.seq, data, durable)
            if then is not None:
                then()

        try:
            await trio.to_thread.run_sync(write)
        except OSError as exc:
            raise JournalError(
                f"cannot write journal entry {record.seq}: {exc.strerror}", exc.errno
            ) from exc
        if durable:
            self._dir_synced = max(self._dir_synced, changes)
        else:
            self._dir_changes += 1
        record.disk_put = data["put"] is not None

    async def _sync_dir(self) -> None:
        """Make every sidecar written with ``durable=False`` so far durable (one directory
        fsync for all of them; nothing to do when a later fsync covered them already)."""
        target = self._dir_changes
        if self._dir_synced >= target:
            return
        await trio.to_thread.run_sync(self._fsync_dir)
        self._dir_synced = max(self._dir_synced, target)

    async def _settle(self, record: _Record) -> None:
        """Bring a record's files in line after some of its ops finished: remove them when
        all is done, or rewrite the sidecar when only deletes remain. Never raises: a stale
        sidecar is safe (every op can be repeated), it only costs work after a crash."""
        if record.removed or record.users:
            return
        live = [op for op in record.cleanup if not op.finished]
        try:
            if record.put is None and not live:
                record.removed = True
                self._records.pop(record.seq, None)
                self._release(record)
                if self._nursery is not None:  # the janitor removes the files, not under the
                    self._trash.append(record)  # mutex (commits wait for it)
                    self._trash_added.set()
                else:
                    await self._sync_dir()  # no later change may outlive an earlier one
                    await trio.to_thread.run_sync(self._remove_record_sync, record)
            elif record.put is None and record.disk_put:
                # a replay must not upload the landed put again (if it does, the salt check
                # recognises it: a lazy write is enough)
                await self._persist(record, durable=False)
        except (OSError, JournalError) as exc:
            log.warning("journal: could not tidy entry %d: %s", record.seq, exc)

    def _release(self, record: _Record) -> None:
        """Forget the in-memory copy of a record's envelope (its files are going away)."""
        env = record.env
        if env is not None and env.data is not None:
            self._held -= len(env.data)
            env.data = None

    async def _empty_trash(self) -> None:
        """Remove the files of the finished records in the trash (one thread hop for all of
        them, after the directory fsync that makes earlier sidecar changes durable); returns
        when the trash is empty. A crash before that leaves sidecars whose ops have landed:
        replay repeats them, and the salt check recognises our uploads."""
        while self._trash or self._trashing:
            if self._trashing:
                await self._trash_done.wait()
                continue
            batch, self._trash = self._trash, []
            self._trashing = True
            try:
                await self._sync_dir()
                await trio.to_thread.run_sync(self._remove_records_sync, batch)
            except OSError as exc:
                log.warning("journal: could not tidy %d entries: %s", len(batch), exc)
            finally:
                self._trashing = False
                self._trash_done.set()
                self._trash_done = trio.Event()

    async def _janitor(self) -> None:
        while True:
            await self._trash_added.wait()
            self._trash_added = trio.Event()
            await self._empty_trash()

    def _remove_records_sync(self, records: list[_Record]) -> None:
        for record in records:
            self._remove_record_sync(record)

    def _remove_record_sync(self, record: _Record) -> None:
        _unlink_quietly(self._sidecar_path(record.seq))  # the sidecar first: no orphan record
        if record.env is not None:
            _unlink_quietly(record.env.path)

    # -- queues ---------------------------------------------------------------------------

    def _queue(self, key: str) -> list[_Op]:
        return self._queues.setdefault(key, [])

    def _unqueue(self, op: _Op) -> _Op | None:
        """Take ``op`` out of its key's queue; the op that followed it, if any."""
        q = self._queues.get(op.key)
        if q is None or op not in q:
            return None
        i = q.index(op)
        q.pop(i)
        nxt = q[i] if i < len(q) else None
        if not q:
            del self._queues[op.key]
        return nxt

    def _visible_put(self, key: str) -> _Op | None:
        q = self._queues.get(key)
        if not q:
            return None
        last = q[-1]
        if last.kind == "put" and not last.obsolete and not last.finished:
            return last
        return None

    def _new_put(
        self, seq: int, key: str, env: _Envelope, base_etag: str | None
    ) -> tuple[_Record, _Op, _Plan]:
        """The record ``seq`` of a closed file: its put of ``env`` at ``key``, over the version
        ``base_etag`` the file was opened from (None: a new file), and the plan that fits it
        into the key's queue (caller holds the mutex; changes nothing yet)."""
        plan = self._plan(key, _Expect({base_etag} if base_etag else set(), set(), base_etag))
        record = _Record(seq, env)
        op = _Op(
            "put", key, plan.expect, record, env=env, mtime_ns=env.mtime_ns, mode=env.mode,
            ready_at=trio.current_time() + self.settle_s,
        )
        record.put = op
        return record, op, plan

    def _plan(self, key: str, base: _Expect) -> _Plan:
        """How a new op can replace whatever ``key`` will hold (changes nothing).

        Every op on the key now, queued or running, may leave something there: the new op's
        expectation covers them all. Its first guess (``hint``) is the oldest dropped op's, or
        ``base``'s; if something is running, the running op's result sets it later.
        """
        plan = _Plan(base.copy(), [], [], [])
        ours = self._ours.get(key)
        if ours is not None:
            plan.expect.etags.add(ours)
        first = True
        for op in self._queues.get(key, ()):
            plan.expect.merge(op.expect)
            if op.kind == "put" and op.env is not None:
                plan.expect.salts.add(op.env.salt)
            if op.state == RUNNING:
                plan.running.append(op)
                if op.kind == "put":
                    plan.obsolete.append(op)
            elif op.state == QUEUED:
                if first and not plan.running:
                    plan.expect.hint = op.expect.hint
                first = False
                plan.drop.append(op)
        if plan.running:
            plan.expect.hint = None
        return plan

    async def _apply(self, plan: _Plan) -> None:
        for op in plan.obsolete:
            op.obsolete = True
        for op in plan.drop:
            self._drop(op)
        seen: set[int] = set()
        for op in plan.drop:
            if op.record.seq not in seen:
                seen.add(op.record.seq)
                await self._settle(op.record)

    def _drop(self, op: _Op, error: BaseException | None = None) -> None:
        """Forget a queued op (superseded, unlinked, or its record is damaged)."""
        _abort_eager(op)
        self._unqueue(op)
        op.state = DROPPED
        op.error = error
        if op.record.put is op:
            op.record.put = None
        op.signal()
        self._kick()

    # -- commit ---------------------------------------------------------------------------

    async def commit(
        self,
        key: str,
        staged: PlainFile,
        *,
        mtime_ns: int,
        mode: int,
        base_etag: str | None,
    ) -> PendingInfo:
        """Make the closed file ``key`` durable here and queue it for upload.

        ``staged``: its contents (a StagedFile; anything with ``size`` and async ``read``).
        ``base_etag``: the store version the writer's view started from, None for a new file;
        when the journal already holds work for ``key``, what it knows wins. After this
        returns, the file survives kill -9 and power loss (envelope file, sidecar and
        directory are fsynced). JournalError (with errno) if the journal cannot be written;
        nothing journaled before is affected.
        """
        self._sealing[key] = self._sealing.get(key, 0) + 1
        tmp_name = ""
        try:
            sink = await self._usable_sink(key, staged)
            if sink is not None:
                return await self._commit_sunk(key, staged, sink, mtime_ns, mode, base_etag)
            if chunk_count(staged.size) <= SMALL_COMMIT_CHUNKS:
                return await self._commit_small(key, staged, mtime_ns, mode, base_etag)
            tmp: Path | None = self.directory / f"seal-{secrets.token_hex(8)}.tmp"
            assert tmp is not None
            tmp_name = tmp.name
            self._seal_files.add(tmp_name)
            env = await self._seal(tmp, key, staged, mtime_ns, mode)
            try:
                async with self._mutex:
                    seq = self._take_seq()
                    path = self._env_path(seq)
                    record, op, plan = self._new_put(seq, key, env, base_etag)
                    env.path = path
                    # The commit point, in one thread hop: the envelope gets its entry's name,
                    # the sidecar is written and fsynced, then the directory.
                    data = self._sidecar(record)
                    changes = self._dir_changes
                    try:
                        await trio.to_thread.run_sync(self._install_sync, tmp, path, seq, data)
                    except OSError as exc:
                        raise JournalError(
                            f"cannot write the journal for {key}: {exc.strerror}", exc.errno
                        ) from exc
                    record.disk_put = True
                    self._dir_synced = max(self._dir_synced, changes)
                    tmp = None
                    self._records[seq] = record
                    self._queue(key).append(op)
                    await self._apply(plan)
                    self._kick_for(op)
            finally:
                if tmp is not None:
                    await trio.to_thread.run_sync(_unlink_quietly, tmp)
            log.debug("journal: committed entry %d (%d bytes)", seq, env.size)
            return PendingInfo(key, env.size, env.mtime_ns, env.mode)
        finally:
            self._seal_files.discard(tmp_name)
            self._sealing[key] -= 1
            if not self._sealing[key]:
                del self._sealing[key]
            self._sealing_done.set()
            self._sealing_done = trio.Event()

    def seal_sink(self, key: str) -> SealSink:
        """A sink for a new file being written at ``key``: StagedFile hands it finished chunks,
        sealed at once into the envelope its close will commit (staging.py, "Sinking")."""
        return SealSink(self, key)

    def _start_eager(self, sink: SealSink, ready: int) -> EagerUpload | None:
        """An early upload of the sink's envelope, if the uploader runs and the name is no
        rsync temporary name (those are renamed right after close: the upload would be lost)."""
        if self._nursery is None or _TEMP_NAME.fullmatch(sink.key.rpartition("/")[2]):
            return None
        eager = EagerUpload(sink.key, os.dup(sink.fd), ready)
        self._nursery.start_soon(eager.run, self._store)
        return eager

    async def _usable_sink(self, key: str, staged: PlainFile) -> SealSink | None:
        """The sink holding the start of ``staged``, if the commit can finish its envelope:
        still live, and sealed for exactly the recipients a new envelope at ``key`` gets now
        (a rename into another folder since may have changed them)."""
        prefix = getattr(staged, "sealed_prefix", None)
        if prefix is None:
            return None
        sink, sunk = prefix
        if not isinstance(sink, SealSink) or sink.journal is not self or sink.count != sunk:
            return None
        if sink.writer is None or not sink.live:
            return None
        recipients, unresolved = await self._recipients_for(key)
        if unresolved != sink.unresolved or _keys_of(recipients) != _keys_of(sink.recipients):
            sink.detach()
            return None
        return sink

    async def _commit_sunk(
        self, key: str, staged: PlainFile, sink: SealSink, mtime_ns: int, mode: int,
        base_etag: str | None,
    ) -> PendingInfo:
        """commit() of a file whose start the sink already sealed: seal the rest into the
        sink's file, build the header (bound to ``key``, with this mtime and mode), fsync, then
        rename it to ``<seq>.env`` and write the sidecar, as every commit does."""
        assert sink.writer is not None and sink.path is not None
        size = staged.size
        count = chunk_count(size)
        # From here on the file is this commit's: the sink only reads its chunks back (also
        # if the commit fails: a later one then seals the whole file anew).
        sink.live = False
        offset = HEADER_SIZE + sink.count * (CHUNK_SIZE + TAG_SIZE)
        index = sink.count
        while index < count:
            stop = min(count, index + SEAL_BATCH_CHUNKS)
            batch = await self._read_batch(key, staged, index, count, stop)
            offset += await self._write_io(
                key, _seal_batch, sink.writer, batch, sink.fd, offset,
                limiter=self._enc.cpu_limiter,
            )
            index = stop
        header, table = sink.writer.finish()
        sealed_as = sink.writer.opened(header)
        header = sealed_as.reseal(
            binding=self._enc.binding_for(key), mtime_ns=mtime_ns, mode=mode & 0o7777
        )
        opened = sealed_as.after_reseal(header)
        await self._write_io(key, _finish_envelope, sink.fd, header, table, offset)
        cipher_size = offset + len(table)
        check_envelope_size(size, cipher_size)
        parsed = parse_header(header)
        env = _Envelope(sink.path, parsed.salt, size, cipher_size, parsed.binding,
                        parsed.mtime_ns, parsed.mode, sink.unresolved, opened=opened)
        eager, sink.eager = sink.eager, None
        if eager is not None and eager.key != key:  # renamed while open
            eager.abort()
            eager = None
        async with self._mutex:
            seq = self._take_seq()
            path = self._env_path(seq)
            record, op, plan = self._new_put(seq, key, env, base_etag)
            sealed, env.path = sink.path, path
            data = self._sidecar(record)
            changes = self._dir_changes
            try:
                await trio.to_thread.run_sync(self._install_sync, sealed, path, seq, data)
            except OSError as exc:
                if eager is not None:
                    eager.abort()
                raise JournalError(
                    f"cannot write the journal for {key}: {exc.strerror}", exc.errno
                ) from exc
            sink.installed(path)
            self._dir_synced = max(self._dir_synced, changes)
            if eager is not None:
                eager.committed(cipher_size)
                op.eager = eager
            record.disk_put = True
            self._records[seq] = record
            self._queue(key).append(op)
            await self._apply(plan)
            self._kick_for(op)
        log.debug("journal: committed entry %d (%d bytes, %d chunks sealed while written)",
                  seq, env.size, sink.count)
        return PendingInfo(key, env.size, env.mtime_ns, env.mode)

    async def _commit_small(
        self, key: str, staged: PlainFile, mtime_ns: int, mode: int, base_etag: str | None
    ) -> PendingInfo:
        """commit() of a file of at most SMALL_COMMIT_CHUNKS chunks: its plaintext is read
        first, then one thread hop, under the mutex, seals it straight into ``<seq>.env`` and
        writes the sidecar (fsync envelope, fsync sidecar, rename, fsync directory). On this
        shared VM each hop waits for a CPU and the GIL: a 4 KiB close cost five, then two."""
        writer, unresolved = await self._writer_for(key, mtime_ns, mode)
        size = staged.size
        batch = await self._read_batch(key, staged, 0, chunk_count(size))
        async with self._mutex:
            seq = self._take_seq()
            path = self._env_path(seq)
            env = _Envelope(path, b"", size, 0, b"", mtime_ns, mode & 0o7777, unresolved)
            record, op, plan = self._new_put(seq, key, env, base_etag)
            data = self._sidecar(record)
            changes = self._dir_changes
            try:
                header, sealed = await trio.to_thread.run_sync(
                    self._commit_small_sync, path, writer, batch, seq, data
                )
            except OSError as exc:
                raise JournalError(
                    f"cannot write the journal for {key}: {exc.strerror}", exc.errno
                ) from exc
            env.opened = writer.opened(header)
            parsed = env.opened.header
            env.salt, env.cipher_size, env.binding = parsed.salt, len(sealed), parsed.binding
            if self._held + len(sealed) <= HELD_BYTES:
                env.data = sealed
                self._held += len(sealed)
            self._dir_synced = max(self._dir_synced, changes)
            record.disk_put = True
            self._records[seq] = record
            self._queue(key).append(op)
            await self._apply(plan)
            self._kick_for(op)
        log.debug("journal: committed entry %d (%d bytes)", seq, env.size)
        return PendingInfo(key, env.size, env.mtime_ns, env.mode)

    def _commit_small_sync(self, path: Path, writer: EnvelopeWriter,
                           batch: list[tuple[bytes, bool]], seq: int, data: dict[str, Any]
                           ) -> tuple[bytes, bytearray]:
        header, sealed = _seal_small(path, writer, batch)
        try:
            self._write_sidecar_sync(seq, data)  # fsyncs the directory too: both names
        except BaseException:
            sidecar = self._sidecar_path(seq)
            for leftover in (sidecar, sidecar.with_name(sidecar.name + ".tmp"), path):
                _unlink_quietly(leftover)
            raise
        return header, sealed

    async def _writer_for(self, key: str, mtime_ns: int, mode: int
                          ) -> tuple[EnvelopeWriter, bool]:
        """A new envelope's writer for ``key``, and whether its recipients are unresolved (the
        store did not answer: sealed for us alone, resolved before the upload)."""
        recipients, unresolved = await self._recipients_for(key)
        writer = EnvelopeWriter(
            self._identity, recipients, binding=self._enc.binding_for(key), mtime_ns=mtime_ns,
            mode=mode & 0o7777,
        )
        return writer, unresolved

    async def _recipients_for(self, key: str) -> tuple[Sequence[Recipient], bool]:
        """Who a new envelope at ``key`` is for (besides us), and whether that is unresolved."""
        # A close must not fail (or wait long) because the store is down. Why sealing for us
        # alone is safe then: the writer is a recipient of every file it writes, so this is a
        # subset of whatever the folder's policy says; the policy's recipients are added to the
        # header (a reseal) before the upload, which needs the store anyway.
        recipients: Sequence[Recipient] = ()
        unresolved = True
        if not self._unreachable:
            # Cancelling the lookup is safe: the policy cache changes only once answers are in.
            with trio.move_on_after(RECIPIENTS_WAIT_S):
                try:
                    recipients = await self._enc.recipients_of(key)
                    unresolved = False
                except StoreUnavailableError as exc:
                    log.info("journal: %s; sealing for us alone until the store answers", exc)
                    self._unreachable = True
        return recipients, unresolved

    async def _seal(
        self, path: Path, key: str, staged: PlainFile, mtime_ns: int, mode: int
    ) -> _Envelope:
        """Encrypt ``staged`` into a new envelope file at ``path`` (bound to ``key``), fsynced.

        The plaintext is read here, in the trio task (a StagedFile may have to fetch clean
        chunks from its base), and sealed in worker threads a batch at a time; a worker never
        waits for a read, so sealing cannot starve the reads of the CPU limiter.
        """
        writer, unresolved = await self._writer_for(key, mtime_ns, mode)
        size = staged.size
        count = chunk_count(size)
        if count <= SEAL_BATCH_CHUNKS:  # the usual small file: read it all, then one thread hop
            batch = await self._read_batch(key, staged, 0, count)
            try:
                header, sealed = await trio.to_thread.run_sync(
                    _seal_small, path, writer, batch, limiter=self._enc.cpu_limiter
                )
                cipher_size = len(sealed)
            except OSError as exc:
                raise JournalError(
                    f"cannot write the journal for {key}: {exc.strerror}", exc.errno
                ) from exc
            check_envelope_size(size, cipher_size)
            parsed = parse_header(header)
            return _Envelope(
                path, parsed.salt, size, cipher_size, parsed.binding, parsed.mtime_ns, parsed.mode,
                unresolved,
            )
        try:
            fd = await trio.to_thread.run_sync(_create_exclusive, path)
        except OSError as exc:
            raise JournalError(
                f"cannot write the journal for {key}: {exc.strerror}", exc.errno
            ) from exc
        ok = False
        try:
            offset = HEADER_SIZE
            index = 0
            while index < count:
                stop = min(count, index + SEAL_BATCH_CHUNKS)
                batch = await self._read_batch(key, staged, index, count, stop)
                index = stop
                offset += await self._write_io(
                    key, _seal_batch, writer, batch, fd, offset, limiter=self._enc.cpu_limiter
                )
            header, table = writer.finish()
            await self._write_io(key, _finish_envelope, fd, header, table, offset)
            cipher_size = offset + len(table)
            check_envelope_size(size, cipher_size)
            parsed = parse_header(header)
            ok = True
            return _Envelope(
                path, parsed.salt, size, cipher_size, parsed.binding, parsed.mtime_ns, parsed.mode,
                unresolved,
            )
        finally:
            os.close(fd)
            if not ok:
                await trio.to_thread.run_sync(_unlink_quietly, path)

    @staticmethod
    async def _read_batch(key: str, staged: PlainFile, first: int, count: int,
                          stop: int | None = None) -> list[tuple[bytes, bool]]:
        """Chunks [first, stop) of ``count`` as (plaintext, last) pairs, read in this task."""
        size = staged.size
        batch: list[tuple[bytes, bool]] = []
        for index in range(first, count if stop is None else stop):
            start = index * CHUNK_SIZE
            data = await staged.read(start, CHUNK_SIZE) if size else b""
            if len(data) != min(CHUNK_SIZE, size - start):
                raise JournalError(f"{key} changed size while it was being sealed")
            batch.append((data, index == count - 1))
        return batch

    async def _write_io(
        self, key: str, fn: Callable[..., int | None], *args: Any,
        limiter: trio.CapacityLimiter | None = None,
    ) -> int:
        try:
            result = await trio.to_thread.run_sync(fn, *args, limiter=limiter)
        except OSError as exc:
            raise JournalError(
                f"cannot write the journal for {key}: {exc.strerror}", exc.errno
            ) from exc
        return result or 0

    async def _wait_sealing(self, *keys: str) -> None:
        while any(k in self._sealing for k in keys):
            await self._sealing_done.wait()

    # -- what the mount sees --------------------------------------------------------------

    def pending(self, key: str) -> PendingInfo | None:
        """The closed-but-not-uploaded file ``key``, or None."""
        op = self._visible_put(key)
        if op is None:
            return None
        assert op.env is not None
        return PendingInfo(key, op.env.size, op.mtime_ns, op.mode)

    def pending_under(self, prefix: str) -> dict[str, PendingInfo]:
        """Every pending file whose key starts with ``prefix``, at any depth (a folder that
        exists only through pending files shows up as the prefix of a longer key)."""
        out: dict[str, PendingInfo] = {}
        for key in self._queues:
            if key.startswith(prefix):
                info = self.pending(key)
                if info is not None:
                    out[key] = info
        return out

    def is_hidden(self, key: str) -> bool:
        """Whether ``key`` is on its way out of the store (renamed away, unlinked, replaced):
        a listing must not show it even though the store may still have it."""
        q = self._queues.get(key)
        if not q:
            return False
        last = q[-1]
        return last.kind == "delete" or last.obsolete

    def hidden_under(self, prefix: str) -> set[str]:
        """Keys under ``prefix`` that listings must hide (see is_hidden)."""
        return {k for k in self._queues if k.startswith(prefix) and self.is_hidden(k)}

    async def open_pending(self, key: str) -> PendingFile | None:
        """The pending file ``key`` opened for reading, or None if it is not pending. It can be
        the base of a new StagedFile."""
        async with self._mutex:  # no header reseal is half-written while we read the header
            op = self._visible_put(key)
            if op is None:
                return None
            env = op.env
            assert env is not None
            source: BinaryIO | bytearray
            if env.opened is not None and env.data is not None:  # a small file we just wrote
                source, opened = env.data, env.opened
            else:
                source, opened = await trio.to_thread.run_sync(
                    self._open_env_sync, env.path, env.opened
                )
                env.opened = opened
        return PendingFile(key, source, opened, op.mtime_ns, op.mode)

    def _open_env_sync(
        self, path: Path, known: OpenedEnvelope | None
    ) -> tuple[BinaryIO, OpenedEnvelope]:
        f = open(path, "rb")  # noqa: SIM115 -- owned by the PendingFile
        try:
            if known is not None:
                check_envelope_size(known.header.plain_size, os.fstat(f.fileno()).st_size)
                return f, known
            opened = open_header(f.read(HEADER_SIZE), self._identity)
            check_envelope_size(opened.header.plain_size, os.fstat(f.fileno()).st_size)
            off, length = table_range(opened.header.plain_size)
            opened.load_table(os.pread(f.fileno(), length, off))
        except BaseException:
            f.close()
            raise
        return f, opened

    # -- rename, unlink, attributes ------------------------------------------------------

    async def rename(self, src: str, dst: str, *, dst_etag: str | None = None) -> bool:
        """Rename a pending file.

        True if ``src`` was pending: the journal then makes ``dst`` hold exactly the bytes of
        src's last close and removes whatever of ``src`` is or gets into the store -- also when
        src's upload is in flight. False if ``src`` is not pending: the caller renames in the
        store; anything pending for ``dst`` has been dropped or has finished by then.
        ``dst_etag``: the version of ``dst`` in the store as far as the caller knows (None:
        none); the journal overwrites only that, or what it knows better.
        """
        if src == dst:
            return self.pending(src) is not None
        await self._wait_sealing(src, dst)
        async with self._mutex:
            op = self._visible_put(src)
            if op is not None:
                await self._rename_pending(op, src, dst, dst_etag)
                return True
            # Everything queued for dst goes, deletes too: a delete expecting one of our
            # envelopes would take the very payload the store-side rename is about to put there.
            plan = self._plan(dst, _Expect())
            await self._apply(plan)
        for running in plan.running:
            while not running.finished and running.state == RUNNING:
                await running.changed.wait()
        return False

    async def _rename_pending(self, op: _Op, src: str, dst: str, dst_etag: str | None) -> None:
        record, env = op.record, op.env
        assert env is not None
        plan = self._plan(dst, _Expect({dst_etag} if dst_etag else set(), set(), dst_etag))
        earlier_running = any(
            o.state == RUNNING and o is not op for o in self._queues.get(src, ())
        )
        old = op.expect.copy()
        old.salts.add(env.salt)
        old.hint = None
        saved = (op.key, op.expect, record.put, list(record.cleanup))
        if op.state == QUEUED:
            target = op
            _abort_eager(op)  # its multipart upload is under src
            op.key, op.expect = dst, plan.expect
            need_delete = bool(
                old.etags or earlier_running or op.attempted or _has_salts_of_others(old, env)
            )
        else:  # in flight: it lands under src, then a second put moves the bytes to dst
            target = _Op(
                "put", dst, plan.expect, record, env=env, mtime_ns=op.mtime_ns, mode=op.mode,
                gate=op, ready_at=op.ready_at,
            )
            record.put = target
            need_delete = True
        delete = _Op("delete", src, old, record, gate=target) if need_delete else None
        if delete is not None:
            record.cleanup.append(delete)
        try:
            await self._persist(record, plan.drop, durable=False)
        except BaseException:
            op.key, op.expect, record.put, record.cleanup = saved
            raise
        if target is op:
            op.key = src  # so that _unqueue finds it
            self._unqueue(op)
            op.key = dst
        else:
            op.obsolete = True
        self._queue(dst).append(target)
        if delete is not None:
            self._queue(src).append(delete)
        await self._apply(plan)
        self._kick()

    async def unlink(self, key: str) -> bool:
        """Remove ``key`` if the journal holds work for it: True, and the journal deletes
        whatever of it is or gets into the store (after an in-flight upload lands). False:
        nothing pending; the caller deletes in the store."""
        await self._wait_sealing(key)
        async with self._mutex:
            q = self._queues.get(key)
            if not q:
                return False
            if q[-1].kind == "delete":
                return True
            plan = self._plan(key, _Expect())
            if plan.running or plan.expect.anything:
                record = _Record(self._take_seq(), None)
                delete = _Op("delete", key, plan.expect, record)
                record.cleanup.append(delete)
                await self._persist(record)
                self._records[record.seq] = record
                self._queue(key).append(delete)
            await self._apply(plan)
            self._kick()
            return True

    async def set_attrs(
        self, key: str, *, mtime_ns: int | None = None, mode: int | None = None
    ) -> bool:
        """Change the mtime/mode a pending file will be uploaded with: its header is resealed
        before the upload (if the upload is in flight, it is repeated). False if not pending."""
        await self._wait_sealing(key)
        async with self._mutex:
            op = self._visible_put(key)
            if op is None:
                return False
            new_mtime = op.mtime_ns if mtime_ns is None else mtime_ns
            new_mode = op.mode if mode is None else mode & 0o7777
            if (new_mtime, new_mode) == (op.mtime_ns, op.mode):
                return True
            record = op.record
            if op.state == QUEUED:
                saved = (op.mtime_ns, op.mode)
                op.mtime_ns, op.mode = new_mtime, new_mode
                try:
                    await self._persist(record, durable=False)
                except BaseException:
                    op.mtime_ns, op.mode = saved
                    raise
            else:
                assert op.env is not None
                expect = op.expect.copy()
                expect.salts.add(op.env.salt)
                expect.hint = None
                again = _Op(
                    "put", key, expect, record, env=op.env, mtime_ns=new_mtime, mode=new_mode,
                    gate=op,
                )
                record.put = again
                try:
                    await self._persist(record)
                except BaseException:
                    record.put = op
                    raise
                op.obsolete = True
                self._queue(key).append(again)
                self._kick()  # (a queued op's new attrs make nothing ready sooner: no kick)
            return True

    # -- flush and stats ------------------------------------------------------------------

    async def flush(self, key: str | None = None) -> None:
        """Wait until ``key`` (or everything pending now) has reached the store.

        Skips the settle delay and any retry back-off. Raises the error of an upload attempt
        that fails meanwhile (StoreUnavailableError while the store is down, AccessDeniedError,
        JournalError for a damaged entry); the entries stay journaled and are retried.
        """
        async with self._mutex:
            if key is None:
                targets = [op for q in self._queues.values() for op in q]
            else:
                targets = list(self._queues.get(key, ()))
            closure: list[_Op] = []
            for first in targets:
                o: _Op | None = first
                while o is not None and not o.finished and o not in closure:
                    closure.append(o)
                    o = o.gate
            for o in closure:
                o.ready_at = 0.0
                o.not_before = 0.0
            self._kick()
        for o in closure:
            failures = o.failures
            while not o.finished:
                if not self._uploader:
                    raise JournalError("the journal's uploader is not running", errno.EIO)
                stopped = self._stopped
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_wait_then_cancel, o.changed, nursery.cancel_scope)
                    nursery.start_soon(_wait_then_cancel, stopped, nursery.cancel_scope)
                if o.failures > failures and o.error is not None:
                    raise o.error
            if o.error is not None:
                raise o.error
        await self._empty_trash()

    def stats(self) -> JournalStats:
        """A snapshot of the counters."""
        s = self._stats
        puts = [r.put for r in self._records.values() if r.put is not None]
        return JournalStats(
            pending=len(puts),
            pending_bytes=sum(op.env.size for op in puts if op.env is not None),
            deleting=sum(1 for q in self._queues.values() for op in q if op.kind == "delete"),
            in_flight=self._running,
            uploaded=s.uploaded,
            bytes_uploaded=s.bytes_uploaded,
            deleted=s.deleted,
            conflicts=s.conflicts,
            broken=s.broken,
            failures=dict(s.failures),
            conflict_copies=list(s.conflict_copies),
        )

    # -- replay ---------------------------------------------------------------------------

    async def replay(self) -> int:
        """Queue every record found in the journal directory (once, at mount start).

        Leftovers of a crash in the middle of a commit -- a sealed file without a sidecar, a
        sidecar's temporary file -- are deleted: commit had not returned, so nobody was told
        the file was safe (the writer's close failed or never finished). A damaged record
        (unreadable sidecar, envelope that does not open for us or has the wrong size) is
        moved to ``journal/broken/`` and logged; the others are still queued. Returns the
        number of records queued.
        """
        async with self._mutex:
            if self._replayed:
                return 0
            self._replayed = True
            loaded = await trio.to_thread.run_sync(
                self._load_all, set(self._records), set(self._seal_files)
            )
            for record, put, cleanup in loaded:
                self._records[record.seq] = record
                if put is not None:
                    plan = self._plan(put.key, put.expect)
                    put.expect = plan.expect
                    record.put = put
                    self._queue(put.key).append(put)
                    await self._apply(plan)
                for op in cleanup:
                    op.gate = put
                    record.cleanup.append(op)
                    self._queue(op.key).append(op)
                if put is None and not cleanup:
                    await self._settle(record)
            self._kick()
            count = len(loaded)
        if count:
            log.info("journal: %d entries to upload from an earlier session", count)
        return count

    def _load_all(
        self, known: set[int], sealing: set[str]
    ) -> list[tuple[_Record, _Op | None, list[_Op]]]:
        names = sorted(os.listdir(self.directory))
        referenced = {f"{seq:016d}.env" for seq in known}
        out: list[tuple[_Record, _Op | None, list[_Op]]] = []
        for name in names:
            if name.endswith(".tmp"):
                if name not in sealing:
                    _unlink_quietly(self.directory / name)
                continue
            if not name.endswith(".json"):
                continue
            stem = name.split(".", 1)[0]
            if stem.isdigit() and int(stem) in known:
                continue
            try:
                loaded = self._load_record(self.directory / name)
            except (OSError, ValueError, KeyError, TypeError, CssfsError) as exc:
                self._move_broken_sync(name, exc)
                continue
            if loaded[0].env is not None:
                referenced.add(loaded[0].env.path.name)
            out.append(loaded)
        for name in names:
            if name.endswith(".env") and name not in referenced:
                path = self.directory / name
                if path.exists():
                    log.info("journal: discarding %s, left by a commit that did not finish", name)
                    _unlink_quietly(path)
        return out

    def _load_record(self, path: Path) -> tuple[_Record, _Op | None, list[_Op]]:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a journal sidecar of this version")
        seq = data["seq"]
        if not isinstance(seq, int) or path.name != f"{seq:016d}.json":
            raise ValueError("sidecar name and sequence number differ")
        record = _Record(seq, None)
        if data.get("header") is not None:
            record.header_redo = base64.b64decode(data["header"], validate=True)
            if len(record.header_redo) != HEADER_SIZE:
                raise ValueError("bad header redo record")
        if data["env"] is not None:
            if data["env"] != f"{seq:016d}.env":
                raise ValueError("sidecar names another entry's envelope file")
            record.env = self._check_env(self.directory / data["env"], record.header_redo)
        put: _Op | None = None
        put_data = data["put"]
        if put_data is not None:
            env = record.env
            if env is None:
                raise ValueError("a put without an envelope file")
            key = put_data["key"]
            if not isinstance(key, str) or not key:
                raise ValueError("bad key")
            if put_data["size"] != env.size:
                raise ValueError("sidecar size and envelope size differ")
            env.unresolved = put_data.get("resolve_recipients") is True
            mtime_ns, mode = put_data["mtime_ns"], put_data["mode"]
            if not isinstance(mtime_ns, int) or not isinstance(mode, int):
                raise ValueError("bad mtime or mode")
            put = _Op(
                "put", key, _Expect.from_json(put_data["expect"]), record, env=env,
                mtime_ns=mtime_ns, mode=mode & 0o7777, attempted=True,
            )
            record.disk_put = True
            conflict_of = put_data.get("conflict_of")
            if isinstance(conflict_of, str):
                put.conflict_of = conflict_of
        cleanup: list[_Op] = []
        for item in data["cleanup"]:
            key = item["key"]
            if not isinstance(key, str) or not key:
                raise ValueError("bad cleanup key")
            if put is not None and key == put.key:
                continue  # never delete what this very record uploads
            cleanup.append(_Op("delete", key, _Expect.from_json(item["expect"]), record))
        return record, put, cleanup

    def _check_env(self, path: Path, redo: bytes | None) -> _Envelope:
        with open(path, "r+b") as f:
            head = f.read(HEADER_SIZE)
            if redo is not None and head != redo:
                os.pwrite(f.fileno(), redo, 0)  # finish a header reseal cut short by a crash
                os.fsync(f.fileno())
                head = redo
            opened = open_header(head, self._identity)
            size = os.fstat(f.fileno()).st_size
        h = opened.header
        check_envelope_size(h.plain_size, size)
        return _Envelope(path, h.salt, h.plain_size, size, h.binding, h.mtime_ns, h.mode)

    def _move_broken_sync(self, sidecar_name: str, exc: BaseException) -> None:
        self._stats.broken += 1
        stem = sidecar_name.split(".", 1)[0]
        log.warning(
            "journal: entry %s is damaged (%s: %s); moved to %s",
            stem, type(exc).__name__, exc, self.broken_dir,
        )
        self.broken_dir.mkdir(exist_ok=True, mode=0o700)
        for name in (f"{stem}.json", f"{stem}.env"):
            with _ignore_missing():
                os.replace(self.directory / name, self.broken_dir / name)

    # -- the uploader ---------------------------------------------------------------------

    def _kick(self) -> None:
        self._wakeup.set()

    def _kick_for(self, op: _Op) -> None:
        """Wake the uploader for a newly queued ``op`` only if it may start before the uploader
        looks again anyway: a commit's put waits out the settle delay, so a burst of closes no
        longer makes the uploader scan every queue once per close. Caller holds the mutex."""
        if op.gate is not None or max(op.ready_at, op.not_before) < self._wake_at:
            self._kick()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The uploader: starts ready ops, at most ``max_uploads`` at once, until cancelled."""
        if self._uploader:
            raise RuntimeError("journal: the uploader is already running")
        self._uploader = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._janitor)
                task_status.started()
                while True:
                    self._wakeup = trio.Event()
                    async with self._mutex:  # _kick_for reads _wake_at under it too
                        deadline = self._wake_at = self._start_ready(nursery)
                    with trio.move_on_at(deadline):
                        await self._wakeup.wait()
        finally:
            self._nursery = None
            self._uploader = False
            self._stopped.set()
            self._stopped = trio.Event()

    def _start_ready(self, nursery: trio.Nursery) -> float:
        """Start what can run; the time at which something waiting becomes ready."""
        now = trio.current_time()
        deadline = math.inf
        for q in self._queues.values():  # keys in the order they were first queued
            if self._running >= self.max_uploads:
                break
            op = q[0]
            if op.state != QUEUED:
                continue
            if op.gate is not None and not op.gate.finished:
                continue
            when = max(op.ready_at, op.not_before)
            if when > now:
                deadline = min(deadline, when)
                continue
            op.state = RUNNING
            self._running += 1
            if op.kind == "put":
                op.record.users += 1
            nursery.start_soon(self._run_op, op)
        return deadline

    async def _run_op(self, op: _Op) -> None:
        try:
            if op.kind == "put":
                await self._run_put(op)
            else:
                await self._run_delete(op)
        except Exception as exc:  # never let one entry take the mount down
            log.exception("journal: internal error on entry %d", op.record.seq)
            async with self._mutex:
                if op.state == RUNNING:
                    await self._attempt_failed(op, exc)
        finally:
            self._running -= 1
            self._kick()

    async def _run_put(self, op: _Op) -> None:
        env = op.env
        assert env is not None
        key = op.key
        add: Sequence[Recipient] = ()
        if env.unresolved or self._enc.binding_for(key) != env.binding:
            # sealed while the store was down, or renamed: maybe into another folder
            try:
                add = await self._enc.recipients_of(key)
            except StoreError as exc:
                async with self._mutex:
                    await self._attempt_failed(op, exc)
                return
        async with self._mutex:
            if op.obsolete:  # renamed or replaced before it started: nothing in flight yet
                op.record.users -= 1
                self._finish_unlanded(op)
                await self._settle(op.record)
                return
            try:
                same = op.key == key
                await self._reseal_if_needed(op, add if same else (), resolved=same)
            except JournalError as exc:
                await self._attempt_failed(op, exc)
                return
            except (OSError, CssfsError) as exc:
                await self._break(op.record, exc)
                return
            op.attempted = True
        try:
            await self._sync_dir()  # what the upload acts on (a rename, say) is durable first
            result = await self._upload(op)
        except (StoreError, OSError) as exc:
            async with self._mutex:
                await self._attempt_failed(op, exc)
            return
        async with self._mutex:
            if isinstance(result, ObjectInfo):
                await self._landed(op, result)
            else:
                await self._conflict(op)

    async def _reseal_if_needed(
        self, op: _Op, add: Sequence[Recipient], *, resolved: bool = False
    ) -> None:
        """Rewrite the envelope's header for op.key/mtime/mode (and ``add`` the recipients of
        a folder it was renamed into) if it does not say so already. ``resolved``: ``add`` are
        op.key's recipients (an envelope sealed while they were unknown gets them here)."""
        env, record = op.env, op.record
        assert env is not None
        if env.unresolved and not resolved:
            raise JournalError(f"journal entry {record.seq}: its recipients are not known yet")
        binding = self._enc.binding_for(op.key)
        if not env.unresolved and (env.binding, env.mtime_ns, env.mode) == (
            binding, op.mtime_ns, op.mode
        ):
            return
        opened = env.opened
        if opened is None:  # replayed after a restart: open it from disk once
            head = await trio.to_thread.run_sync(_read_head, env.path)
            opened = open_header(head, self._identity)
        try:
            new = opened.reseal(add=add, binding=binding, mtime_ns=op.mtime_ns, mode=op.mode)
        except ConfigError as exc:  # too many recipients for one header: keep the old ones
            log.warning("journal: entry %d keeps its recipients: %s", record.seq, exc)
            new = opened.reseal(binding=binding, mtime_ns=op.mtime_ns, mode=op.mode)
        if env.data is None:
            record.header_redo = new
            # The redo record first, durably, then the header in the same thread hop: a torn
            # or lost write of the header is repaired at replay, so it needs no fsync of its own.
            await self._persist(record, then=lambda: _write_head(env.path, new, False))
        else:
            # A held envelope is uploaded from memory (and read from there), so only the copy
            # in memory needs the new header. The file keeps the header it was sealed with: a
            # consistent envelope, which a replay after a crash reseals again from the sidecar.
            env.data[:HEADER_SIZE] = new
        # (opened from disk above: its chunk table is not loaded, the next reader loads it)
        env.opened = opened.after_reseal(new) if opened.table_loaded else None
        env.binding, env.mtime_ns, env.mode = binding, op.mtime_ns, op.mode
        env.unresolved = False  # the next sidecar write drops the flag (a replay before that
        # resolves again: adding recipients already there changes nothing)

    async def _current(self, key: str, expect: _Expect) -> tuple[_Current | None, bool]:
        """(what is under ``key`` now, whether ``expect`` allows replacing or deleting it)."""
        try:
            info = await self._store.head(key)
        except NoSuchObjectError:
            return None, True
        if info.etag in expect.etags:
            return _Current(info.etag, None), True
        try:
            salt: bytes | None = parse_header(await self._store.get(key, 0, HEADER_SIZE)).salt
        except (FormatError, NoSuchObjectError):
            salt = None
        return _Current(info.etag, salt), salt is not None and salt in expect.salts

    async def _upload(self, op: _Op) -> ObjectInfo | _Current:
        """Put the envelope under op.key conditionally; the stranger's version on conflict."""
        env = op.env
        assert env is not None
        expect = op.expect.copy()
        expect.salts.add(env.salt)
        hint = op.expect.hint
        eager, op.eager = op.eager, None
        if eager is not None:
            adopted = await self._adopt(op, eager, expect)
            if adopted is not None:
                return adopted
        for _ in range(_MAX_RECHECKS):
            try:
                # a copy: a store may keep the body it is given, and a reseal changes env.data
                data = bytes(env.data) if env.data is not None else None
                if hint is None:
                    return await self._enc.put_envelope_file(
                        op.key, env.path, if_none_match=True, data=data
                    )
                return await self._enc.put_envelope_file(op.key, env.path, if_match=hint,
                                                         data=data)
            except (PreconditionFailedError, NoSuchObjectError):
                current, ours = await self._current(op.key, expect)
                if current is None:
                    hint = None
                elif ours:
                    if current.etag not in expect.etags:
                        log.debug("journal: entry %d: an earlier upload of ours is there",
                                  op.record.seq)
                    hint = current.etag
                else:
                    return current
        raise StoreUnavailableError(f"{op.key}: the object kept changing during the upload")

    async def _adopt(self, op: _Op, eager: EagerUpload, expect: _Expect
                     ) -> ObjectInfo | _Current | None:
        """Let the early upload of op's envelope finish if the key holds nothing but what we
        may replace (the check a conditional PUT makes); the stranger's version if not. None:
        it failed or was abandoned -- upload from the journal."""
        try:
            if eager.key != op.key or eager.aborted:
                eager.abort()
                return None
            current, ours = await self._current(op.key, expect)
            if current is not None and not ours:
                eager.abort()
                return current
            eager.approve()
            await eager.done.wait()
        except BaseException:
            eager.abort()  # no-op once approved: then it finishes or fails by itself
            raise
        if eager.result is not None:
            log.debug("journal: entry %d uploaded while it was written", op.record.seq)
        return eager.result

    async def _landed(self, op: _Op, info: ObjectInfo) -> None:
        env, record = op.env, op.record
        assert env is not None
        op.state = DONE
        op.error = None
        record.users -= 1
        self._stats.uploaded += 1
        self._stats.bytes_uploaded += env.cipher_size
        self._unreachable = False
        self._stats.failures.pop(op.key, None)
        nxt = self._unqueue(op)
        if nxt is not None:
            nxt.expect.etags.add(info.etag)
            nxt.expect.hint = info.etag
        self._remember(op.key, info.etag)
        if record.put is op:
            record.put = None
        log.debug("journal: entry %d uploaded (%d bytes)", record.seq, env.cipher_size)
        if not op.obsolete and self.on_uploaded is not None:
            self.on_uploaded(
                Uploaded(op.key, info.etag, env.size, env.cipher_size, op.mtime_ns, op.mode)
            )
        op.signal()
        await self._settle(record)
        self._kick()

    async def _conflict(self, op: _Op) -> None:
        """Somebody else's version is under op.key: keep ours next to it (a conflict copy)."""
        record, env = op.record, op.env
        assert env is not None
        record.users -= 1
        if op.obsolete:  # a newer op carries these bytes elsewhere: nothing to keep here
            self._finish_unlanded(op)
            await self._settle(record)
            return
        original = op.conflict_of or op.key
        n = op.conflict_n + 1 if op.conflict_of else 0
        copy_key = conflict_name(original, datetime.now(UTC), self._writer_tag, n)
        plan = self._plan(copy_key, _Expect())
        saved = (op.key, op.expect, op.conflict_of, op.conflict_n)
        op.key, op.expect, op.conflict_of, op.conflict_n = copy_key, plan.expect, original, n
        try:
            await self._persist(record, plan.drop)
        except JournalError as exc:
            op.key, op.expect, op.conflict_of, op.conflict_n = saved
            op.state = QUEUED
            await self._attempt_failed_queued(op, exc)
            return
        op.key = saved[0]
        nxt = self._unqueue(op)
        op.key = copy_key
        if nxt is not None:
            nxt.expect.merge(saved[1])
        if n == 0:
            self._stats.conflicts += 1
            self._stats.conflict_copies.append((original, copy_key))
            log.warning(
                "journal: %s was changed by another writer; keeping ours as %s",
                original, copy_key,
            )
        op.state = QUEUED
        op.ready_at = 0.0
        self._queue(copy_key).append(op)
        await self._apply(plan)
        op.signal()
        self._kick()

    def _remember(self, key: str, etag: str) -> None:
        self._ours[key] = etag
        self._ours.move_to_end(key)
        while len(self._ours) > _MAX_REMEMBERED:
            self._ours.popitem(last=False)

    def _finish_unlanded(self, op: _Op) -> None:
        """An obsolete put that will not land: hand its expectation on and forget it."""
        _abort_eager(op)
        nxt = self._unqueue(op)
        if nxt is not None:
            nxt.expect.merge(op.expect)
            if op.env is not None:
                nxt.expect.salts.add(op.env.salt)
        op.state = DROPPED
        op.error = None
        if op.record.put is op:
            op.record.put = None
        op.signal()
        self._kick()

    async def _run_delete(self, op: _Op) -> None:
        try:
            await self._sync_dir()
            current, ours = await self._current(op.key, op.expect)
            if current is not None and ours:
                await self._enc.delete(op.key)
        except (StoreError, OSError) as exc:
            async with self._mutex:
                await self._attempt_failed(op, exc)
            return
        async with self._mutex:
            op.state = DONE
            op.error = None
            self._stats.failures.pop(op.key, None)
            nxt = self._unqueue(op)
            if nxt is not None:
                nxt.expect.merge(op.expect)
                if current is None or ours:
                    nxt.expect.hint = None
            if current is not None and not ours:
                log.info("journal: left an object alone that another writer changed since")
            if current is None or ours:
                self._ours.pop(op.key, None)
            if current is not None and ours:
                self._stats.deleted += 1
                if self.on_deleted is not None:
                    self.on_deleted(op.key)
            op.signal()
            await self._settle(op.record)
            self._kick()

    async def _attempt_failed(self, op: _Op, exc: BaseException) -> None:
        """A RUNNING op's attempt failed: keep it and retry later (caller holds the mutex)."""
        if op.kind == "put":
            op.record.users -= 1
        if op.kind == "put" and op.obsolete:
            self._finish_unlanded(op)  # superseded meanwhile: no point retrying these bytes
            op.failures += 1
            op.error = exc
            await self._settle(op.record)
            return
        op.state = QUEUED
        await self._attempt_failed_queued(op, exc)

    async def _attempt_failed_queued(self, op: _Op, exc: BaseException) -> None:
        op.failures += 1
        op.error = exc
        if isinstance(exc, StoreUnavailableError):
            self._unreachable = True
        transient = isinstance(exc, StoreUnavailableError | OSError | JournalError)
        cap = MAX_BACKOFF_S if transient else MAX_BACKOFF_PERMANENT_S
        delay = min(cap, 0.5 * 2 ** (op.failures - 1)) * (0.75 + random.random() / 2)
        op.not_before = trio.current_time() + delay
        self._stats.failures[op.key] = f"{type(exc).__name__}: {exc}"
        level = logging.WARNING if op.failures == 1 or not transient else logging.INFO
        log.log(
            level, "journal: %s of entry %d failed (attempt %d, retry in %.0fs): %s",
            "upload" if op.kind == "put" else "delete", op.record.seq, op.failures, delay, exc,
        )
        op.signal()
        self._kick()

    async def _break(self, record: _Record, exc: BaseException) -> None:
        """Move a damaged record aside; its ops end with a JournalError."""
        error = JournalError(f"journal entry {record.seq} is damaged: {exc}")
        record.users = 0
        for q in list(self._queues.values()):
            for op in list(q):
                if op.record is record and not op.finished:
                    self._drop(op, error)
        record.removed = True
        self._records.pop(record.seq, None)
        self._release(record)
        await trio.to_thread.run_sync(
            self._move_broken_sync, self._sidecar_path(record.seq).name, exc
        )
        self._kick()


def _abort_eager(op: _Op) -> None:
    if op.eager is not None:
        op.eager.abort()
        op.eager = None


def _keys_of(recipients: Sequence[Recipient]) -> set[bytes]:
    return {r.x25519 for r in recipients}


def _has_salts_of_others(expect: _Expect, env: _Envelope) -> bool:
    """Whether ``expect`` names envelopes other than ``env`` (earlier versions of ours)."""
    return bool(expect.salts - {env.salt})


async def _wait_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


# -- small blocking helpers (run in worker threads) --------------------------------------------


class _ignore_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return isinstance(exc, FileNotFoundError)


def _unlink_quietly(path: Path) -> None:
    with _ignore_missing():
        os.unlink(path)


def _create_exclusive(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)


def _pwrite_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _seal_batch(
    writer: EnvelopeWriter, batch: list[tuple[bytes, bool]], fd: int, offset: int
) -> int:
    """Seal a batch of chunks and write the ciphertext at ``offset``; its length. The kernel
    starts writing it to disk at once (_start_writeback), so the fsync at commit finds most of
    a large file on disk already instead of writing all of it while close() waits."""
    out = bytearray()
    for data, last in batch:
        out += writer.seal_chunk(data, last=last)
    _pwrite_all(fd, out, offset)
    _start_writeback(fd, offset, len(out))
    return len(out)


_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writing dirty pages, do not wait
_sync_file_range: Any = None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + length)`` of ``fd`` to disk, without
    waiting (Linux sync_file_range; best effort, nothing elsewhere). Durability still comes
    from the fsync: this only moves the writing earlier."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        name = ctypes.util.find_library("c")
        if name is not None:
            try:
                fn = ctypes.CDLL(name, use_errno=True).sync_file_range
            except (OSError, AttributeError):
                pass
            else:
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _sync_file_range = fn
    if _sync_file_range:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _seal_small(path: Path, writer: EnvelopeWriter, batch: list[tuple[bytes, bool]]
                ) -> tuple[bytes, bytearray]:
    """A whole envelope file at ``path`` from one batch (all of a file's chunks), fsynced:
    (its header, its bytes). On failure the file is removed."""
    fd = _create_exclusive(path)
    try:
        out = bytearray(HEADER_SIZE)
        for data, last in batch:
            out += writer.seal_chunk(data, last=last)
        header, table = writer.finish()
        out[:HEADER_SIZE] = header
        out += table
        _pwrite_all(fd, out, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    os.close(fd)
    return header, out


def _finish_envelope(fd: int, header: bytes, table: bytes, offset: int) -> None:
    """The chunk table after the payload, the header in front, then fsync."""
    _pwrite_all(fd, table, offset)
    _pwrite_all(fd, header, 0)
    os.fsync(fd)


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEADER_SIZE)


def _write_head(path: Path, head: bytes, sync: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        if os.pwrite(fd, head, 0) != len(head):
            raise OSError(errno.EIO, "short write of an envelope header")
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "DEFAULT_MAX_UPLOADS",
    "DEFAULT_SETTLE_S",
    "Journal",
    "JournalStats",
    "PendingFile",
    "PendingInfo",
    "Uploaded",
    "conflict_name",
]
