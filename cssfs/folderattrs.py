"""folderattrs: one signed object per folder remembering its files' mtime and mode.

What it knows: the object ``<folder>/.cssfs-attrs`` (its encoding, the signature over it, who
may have signed it), an ObjectStore (GET, conditional PUT), trio (a debounced background
writer). What it must not know: FUSE, inodes, envelopes' insides, the journal.

Why. A file's size follows from its object size, so LIST alone gives ``ls`` its sizes; but the
mtime and mode are in each envelope's header, so an exact ``ls -l`` (or rsync's quick check) of
a folder this mount has not seen yet would cost one ranged GET per file -- 2,000 GETs for a
2,000-file folder, several times the LIST itself. A mount that uploads files therefore also
keeps, per folder, a small record of what it knows: name -> (ETag, object size, mtime, mode).
A later mount lists the folder, sees the record in the listing, fetches it (one GET) and takes
from it the mtime and mode of every file whose ETag and size still match the listing; the other
files still get their header read. The record is only a cache of what the headers say:

* it is signed (Ed25519) by whoever wrote it last, and followed only if the signer is the reader
  or one of the reader's contacts (``is_trusted``) and the record names the folder it lies in
  (a copy moved elsewhere is ignored);
* an entry counts only for the exact object version it names (ETag and size from the same
  LIST), so a file changed by a client that did not update the record falls back to its header;
* the writer merges: notes are written at most every ``delay_s`` per folder, with a
  conditional PUT on the version it read (If-Match, or If-None-Match when there is none); when
  another mount wrote meanwhile, it reads theirs, merges its own notes on top and tries again.

The bucket is untrusted, so a record can only be replayed, never forged: the storage provider
can serve an older record of ours, whose entries then apply only where it also reports the old
ETags -- the mtime and mode a stat shows before the file is opened. (Opening a file verifies
its header as always.) The record holds names, ETags, sizes, mtimes and modes: nothing the
listing and the headers do not already show the provider.

Encoding (UTF-8)::

    cssfs-attrs v1
    {"entries": {"NAME": ["ETAG", SIZE, MTIME_NS, MODE], ...}, "folder": "PREFIX", "signer": "B64"}
    signature B64

The second line is JSON (keys sorted, no spaces); ``folder`` is the folder's full key prefix in
the store (the store prefix included; "" for the root); ``signer`` the writer's 32-byte Ed25519
public key; the signature covers ``LABEL`` followed by the first two lines (newlines included).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import trio

from cssfs.errors import (
    CssfsError,
    FormatError,
    NoSuchObjectError,
    PreconditionFailedError,
    SignatureError,
)
from cssfs.keys import Identity
from cssfs.policy import verify_ed25519
from cssfs.store.base import ObjectStore

log = logging.getLogger(__name__)

NAME = ".cssfs-attrs"
MAGIC = b"cssfs-attrs v1\n"
LABEL = b"cssfs.v1 folder attrs\x00"
#: Largest record read or written (about 100 bytes per entry: ~600,000 files).
MAX_RECORD_SIZE = 64 * 1024 * 1024
#: How long a folder's notes wait before they are written (more notes join the same write).
DEFAULT_DELAY_S = 1.0
#: Folders whose last record is kept in memory (to merge without reading it again).
CACHED_FOLDERS = 64
#: Folders whose records are written at the same time (each write is a HEAD or GET and a PUT:
#: one folder after another, rsync's tree of 60 folders waited 60 round trips at ``sync``).
PARALLEL_WRITES = 8
_MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class FileAttrs:
    """What the record says about one file: valid for the object version (etag, cipher_size)."""

    etag: str
    cipher_size: int
    mtime_ns: int
    mode: int


def record_key(folder: str) -> str:
    """The record's key for the folder with key prefix ``folder`` ("" or ending in "/")."""
    return folder + NAME


def folder_of(key: str) -> str:
    """The key prefix of the folder holding ``key`` ("" at the root, else ending in "/")."""
    head, sep, _ = key.rpartition("/")
    return head + sep


# -- the record, as bytes ---------------------------------------------------------------------


def encode(folder: str, entries: Mapping[str, FileAttrs], identity: Identity) -> bytes:
    """The signed record of ``entries`` for the folder whose full key prefix is ``folder``."""
    signer = identity.recipient.ed25519
    assert signer is not None
    body = {
        "entries": {
            name: [a.etag, a.cipher_size, a.mtime_ns, a.mode] for name, a in entries.items()
        },
        "folder": folder,
        "signer": base64.b64encode(signer).decode("ascii"),
    }
    signed = MAGIC + json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    signature = identity.sign(LABEL + signed)
    return signed + b"signature " + base64.b64encode(signature) + b"\n"


def decode(data: bytes, folder: str) -> tuple[bytes, dict[str, FileAttrs]]:
    """(signer's Ed25519 public key, entries) of a record for ``folder`` (its full key prefix).

    FormatError if it is malformed or names another folder; SignatureError if its signature
    does not verify. Whether to trust the signer is the caller's business.
    """
    if len(data) > MAX_RECORD_SIZE:
        raise FormatError("folder attrs record is too large")
    if not data.startswith(MAGIC):
        raise FormatError("not a folder attrs record")
    signed_end = data.find(b"\n", len(MAGIC)) + 1
    if signed_end <= 0:
        raise FormatError("folder attrs record is truncated")
    sig_line = data[signed_end:]
    if not sig_line.startswith(b"signature ") or not sig_line.endswith(b"\n"):
        raise FormatError("folder attrs record has no signature line")
    try:
        signature = base64.b64decode(sig_line[len(b"signature ") : -1], validate=True)
        body = json.loads(data[len(MAGIC) : signed_end])
        signer = base64.b64decode(body["signer"], validate=True)
        named = body["folder"]
        raw = body["entries"]
    except (ValueError, binascii.Error, KeyError, TypeError):
        raise FormatError("folder attrs record is malformed") from None
    if not isinstance(named, str) or not isinstance(raw, dict) or len(signer) != 32:
        raise FormatError("folder attrs record is malformed")
    verify_ed25519(signer, signature, LABEL + data[:signed_end], "folder attrs record")
    if named != folder:
        raise FormatError("folder attrs record belongs to another folder")
    entries: dict[str, FileAttrs] = {}
    for name, value in raw.items():
        if not (
            isinstance(value, list) and len(value) == 4 and isinstance(value[0], str)
            and all(type(v) is int and v >= 0 for v in value[1:])
        ):
            raise FormatError("folder attrs record has a malformed entry")
        entries[name] = FileAttrs(value[0], value[1], value[2], value[3])
    return signer, entries


# -- the store side ---------------------------------------------------------------------------


@dataclass
class _Known:
    """The record of one folder as last read or written: the base our next write merges on."""

    etag: str | None  # None: no record in the store
    entries: dict[str, FileAttrs]


@dataclass
class _Folder:
    notes: dict[str, FileAttrs | None] = field(default_factory=dict)  # name -> new or removed
    due: float = 0.0
    writing: bool = False
    written: trio.Event = field(default_factory=trio.Event)


class FolderAttrs:
    """Reads folders' records for listings and writes this mount's notes back (see module doc).

    ``is_trusted(ed25519)``: whether a record signed by that key is followed (our own key
    always is). Call ``run()`` in a nursery for the writes; ``flush()`` writes what is noted now.
    """

    def __init__(
        self,
        store: ObjectStore,
        identity: Identity,
        *,
        is_trusted: Callable[[bytes], bool] | None = None,
        delay_s: float = DEFAULT_DELAY_S,
    ) -> None:
        self.store = store
        self.identity = identity
        self.is_trusted = is_trusted
        self.delay_s = delay_s
        self._known: OrderedDict[str, _Known] = OrderedDict()
        self._folders: dict[str, _Folder] = {}
        self._wakeup = trio.Event()
        self._distrusted: set[bytes] = set()  # signers we logged a refusal for
        self._limiter = trio.CapacityLimiter(PARALLEL_WRITES)
        self.reads = 0
        self.writes = 0

    def _trusted(self, signer: bytes) -> bool:
        if signer == self.identity.recipient.ed25519:
            return True
        return self.is_trusted is not None and self.is_trusted(signer)

    def _remember(self, folder: str, known: _Known) -> None:
        self._known[folder] = known
        self._known.move_to_end(folder)
        while len(self._known) > CACHED_FOLDERS:
            self._known.popitem(last=False)

    async def _read(self, folder: str, etag: str | None = None) -> _Known:
        """The folder's record now (entries empty if missing, damaged or untrusted). ``etag``:
        the version a LIST showed; without it a HEAD asks first (the GET does not say)."""
        key = record_key(folder)
        try:
            if etag is None:
                etag = (await self.store.head(key)).etag
            data = await self.store.get(key)
        except NoSuchObjectError:
            return _Known(None, {})
        self.reads += 1
        try:
            signer, entries = decode(data, self.store.prefix + folder)
        except (FormatError, SignatureError) as exc:
            log.debug("folder attrs %s ignored: %s", key, exc)
            return _Known(etag, {})
        if not self._trusted(signer):
            if signer not in self._distrusted:
                self._distrusted.add(signer)
                log.info("folder attrs %s: signed by a key that is not yours or a contact's; "
                         "ignored", key)
            return _Known(etag, {})
        return _Known(etag, entries)

    async def load(self, folder: str, etag: str | None,
                   listed: Mapping[str, tuple[str, int]]) -> dict[str, FileAttrs]:
        """The entries of folder ``folder``'s record that match ``listed`` (name -> (etag,
        cipher size) from the LIST that showed the record with ``etag``; None: no record).

        One GET when the record changed since this mount last read or wrote it, else none.
        Never raises for a missing, damaged or untrusted record (it just gives nothing).
        """
        known = self._known.get(folder)
        if etag is None:
            return {}
        if known is None or known.etag != etag:
            try:
                known = await self._read(folder, etag)
            except CssfsError as exc:  # a hint only: the headers still tell
                log.debug("folder attrs %s: %s", record_key(folder), exc)
                return {}
            self._remember(folder, known)
        else:
            self._known.move_to_end(folder)
        return {
            name: attrs for name, attrs in known.entries.items()
            if listed.get(name) == (attrs.etag, attrs.cipher_size)
        }

    # -- notes and writes ------------------------------------------------------------------

    def note(self, key: str, attrs: FileAttrs | None) -> None:
        """This mount wrote ``key`` (``attrs`` of the version in the store) or removed it
        (None); the folder's record learns it at the next write."""
        folder = folder_of(key)
        name = key[len(folder) :]
        if not name or name.startswith(".cssfs-"):
            return
        state = self._folders.get(folder)
        if state is None:
            state = self._folders[folder] = _Folder()
        if not state.notes:
            state.due = trio.current_time() + self.delay_s
        state.notes[name] = attrs
        self._wakeup.set()

    async def forget_below(self, folder: str) -> None:
        """Folder ``folder`` (a key prefix ending in "/") is being removed or moved: drop the
        notes of it and of every folder below it, and wait for their writes in progress, so
        that no late write brings a folder back."""
        for name in [f for f in self._folders if f.startswith(folder)]:
            state = self._folders.get(name)
            if state is None:
                continue
            state.notes.clear()
            while state.writing:
                await state.written.wait()
            if not state.notes and self._folders.get(name) is state:
                del self._folders[name]
        for name in [f for f in self._known if f.startswith(folder)]:
            del self._known[name]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Write folders' notes when they are due (up to PARALLEL_WRITES folders at a time),
        until cancelled."""
        task_status.started()
        while True:
            self._wakeup = trio.Event()
            now = trio.current_time()
            due = [f for f, s in self._folders.items() if s.notes and not s.writing
                   and s.due <= now]
            if due:
                async with trio.open_nursery() as nursery:
                    for folder in due:
                        nursery.start_soon(self._write_limited, folder)
            waits = [s.due for s in self._folders.values() if s.notes and not s.writing]
            with trio.move_on_at(min(waits, default=now + 3600.0)):
                await self._wakeup.wait()

    async def flush(self) -> None:
        """Write every folder's notes now, up to PARALLEL_WRITES folders at a time (errors are
        logged: the records are only hints)."""

        async def one(folder: str) -> None:
            state = self._folders.get(folder)
            while state is not None and state.writing:
                await state.written.wait()
                state = self._folders.get(folder)
            if state is not None and state.notes:
                await self._write_limited(folder)

        async with trio.open_nursery() as nursery:
            for folder in list(self._folders):
                nursery.start_soon(one, folder)

    async def _write_limited(self, folder: str) -> None:
        async with self._limiter:
            await self._write(folder)

    async def _write(self, folder: str) -> None:
        state = self._folders.get(folder)
        if state is None or state.writing or not state.notes:
            return
        notes, state.notes = state.notes, {}
        state.writing = True
        try:
            await self._merge_and_put(folder, notes)
        except CssfsError as exc:
            log.info("folder attrs %s not written: %s", record_key(folder), exc)
        finally:
            state.writing = False
            state.written.set()
            state.written = trio.Event()
            if not state.notes and self._folders.get(folder) is state:
                del self._folders[folder]

    async def _merge_and_put(self, folder: str, notes: dict[str, FileAttrs | None]) -> None:
        known = self._known.get(folder)
        key = record_key(folder)
        full = self.store.prefix + folder
        if known is None and any(attrs is not None for attrs in notes.values()):
            # Never read: most likely a folder that has no record yet (one this mount just
            # filled). Try to create it first -- one PUT instead of a HEAD and a PUT; if a
            # record is there after all, the conditional PUT fails and we read and merge.
            known = _Known(None, {})
        for _ in range(_MAX_ATTEMPTS):
            if known is None:
                known = await self._read(folder)
            entries = dict(known.entries)
            for name, attrs in notes.items():
                if attrs is None:
                    entries.pop(name, None)
                else:
                    entries[name] = attrs
            if not entries and known.etag is None:
                return  # nothing to say, and no record to correct
            data = encode(full, entries, self.identity)
            try:
                if known.etag is None:
                    info = await self.store.put(key, data, if_none_match=True)
                else:
                    info = await self.store.put(key, data, if_match=known.etag)
            except (PreconditionFailedError, NoSuchObjectError):
                known = None  # another mount wrote it meanwhile: merge onto theirs
                continue
            self.writes += 1
            self._remember(folder, _Known(info.etag, entries))
            return
        log.info("folder attrs %s kept changing; not written this time", key)


__all__ = ["NAME", "FileAttrs", "FolderAttrs", "decode", "encode", "folder_of", "record_key"]
