"""fs: the pyfuse3 Operations of a cssfs mount -- POSIX calls in, store/journal calls out.

What it knows: pyfuse3's request handlers, paths and inodes (inodes.py), folder listings
(dircache.py), and the contracts of the layers below: EncryptedStore for listing, reading,
renaming and deleting objects; StagedFile for an open file's written contents; Journal for
closed files on their way to the store. What it must not know: crypto, boto3, S3 (no object
bytes are built or parsed here). Every handler translates its arguments, delegates, and maps
errors to an errno; nothing else.

How the namespace maps onto objects (docs/MOUNT.md has the user's version):

* A file ``a/b`` is the envelope object ``a/b``. A folder is a key prefix ``a/``; ``mkdir``
  also writes a zero-length marker object ``a/`` (the S3 console's and rclone's convention) so
  that an empty folder survives; a folder without a marker (files put there by other tools) is
  shown as long as it holds something.
* Sizes come from LIST alone (the envelope geometry). The mtime and mode are the ones stored in
  the envelope header; until the header of a listed object is known the object's LastModified
  is shown, with attribute timeouts of 0 so the kernel asks again, and lookup/getattr fetch the
  header (one ranged GET, cached by etag; readdir prefetches them in the background).
* Objects that are not envelopes by their size ("foreign") are shown with their raw size and
  mode 0400, never decrypted, never overwritten: open gives EACCES, creating or renaming onto
  them EEXIST/EPERM. Files not encrypted for us are listed normally; open gives EACCES.
* What the kernel sees is the union, newest first: files open here (StagedFile), files closed
  here and not yet uploaded (Journal), then the cached listing with our own changes applied.

Attributes kept per inode (S3QL's list, for reviewers): the path (inodes.py), lookup and open
counts (inodes.py), and for a file open here a FileState: its StagedFile, whether it is dirty,
the mtime and mode to commit, and the etag of the version it was opened over (the journal's
conditional PUT keeps both versions if another client changed the object meanwhile).

Error mapping (the only place a FUSEError is built, in ``_errors``): NoSuchObjectError ->
ENOENT; NoIdentityMatchError -> EACCES; format, header, signature and payload errors -> EIO (the
layer below logs the object key once); store failures -> EIO with an error log; OSError -> its
errno; anything else -> EIO, ``log.exception`` and read-only from then on (``failsafe``), or
re-raised when ``CSSFS_STRICT=1`` (tests) so the bug tears the mount down.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Concatenate, Literal, ParamSpec, Protocol, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from cssfs.dircache import DirCache
from cssfs.encstore import EncryptedStore, Entry
from cssfs.errors import (
    AccessDeniedError,
    CssfsError,
    FormatError,
    HeaderAuthError,
    JournalError,
    NoIdentityMatchError,
    NoSuchBucketError,
    NoSuchObjectError,
    PayloadError,
    SignatureError,
    UntrustedWriterError,
)
from cssfs.folderattrs import NAME as ATTRS_NAME
from cssfs.folderattrs import FileAttrs, FolderAttrs
from cssfs.inodes import ROOT_INODE, InodeTable, Node, join, split
from cssfs.journal import Journal, PendingFile, PendingInfo, Uploaded
from cssfs.staging import StagedFile
from cssfs.store.base import ObjectInfo

log = logging.getLogger(__name__)

FILE_MODE = 0o644
DIR_MODE = 0o755
FOREIGN_MODE = 0o400
NAME_MAX = 255
#: st_blksize: what cp and friends use as their buffer size. 1 MiB, the kernel's largest FUSE
#: write: a 256 MiB cp is 256 write requests instead of 2,048 (close ~15% sooner).
BLOCK_SIZE = 1024 * 1024
HEADER_PREFETCH = 16  # header GETs in flight (readdir prefetch and stats together)
META_ENTRIES = 50_000  # remembered (key, etag) -> (mtime, mode) pairs (~12 MiB at most)
XATTR_WRITER = b"user.cssfs.writer"
XATTR_RECIPIENTS = b"user.cssfs.recipients"
XATTR_SIGNATURE = b"user.cssfs.signature"
XATTRS = (XATTR_WRITER, XATTR_RECIPIENTS, XATTR_SIGNATURE)
STRICT_ENV = "CSSFS_STRICT"
#: Folder read-ahead: once two files of a folder are opened for reading one after the other in
#: listing order (cp -r, tar, grep -r), the next this many small files are opened ahead --
#: fetched whole, in parallel (EncryptedStore.prefetch_open).
FOLDER_READAHEAD_FILES = 8
#: Opening a folder's first file (in listing order) opens this many after it at once, before
#: a second open confirms a scan: a walk (cp -r, diff -r, tar) then waits for no GET of its own
#: after the first file of each folder, and a lone open of a first file costs this many GETs.
FOLDER_READAHEAD_FIRST = 2
FOLDER_SCANS = 64  # folders whose reading order is followed
#: Folder listings loaded ahead, for walks (cp -r, diff -r, rsync, find): a folder read with
#: readdir has its first this many subfolders listed in the background, and, when its parent
#: was read with readdir too, the this many subfolders of the parent after it. A walk then finds
#: each folder's LIST (and folder attrs record) done; a lone ``ls`` costs this many LISTs.
FOLDER_LIST_AHEAD = 4
#: During a walk (a folder read with readdir inside a folder read with readdir), a folder listed
#: ahead has its first subfolder listed too once its own listing is in, and that one's, down
#: this many levels: a depth-first walk that enters a folder goes to its first subfolder next,
#: and finds that LIST done too. At most this many LISTs more per folder listed ahead.
FOLDER_LIST_DEPTH = 2
#: A reading walk (cp -r, diff -r, tar, grep -r: files opened for reading in a folder read with
#: readdir whose parent was read with readdir too) lasts this long after such an open. During
#: one, a folder read with readdir has its first 1 + FOLDER_READAHEAD_FIRST files opened ahead,
#: and a folder listed ahead its first file, as soon as their listings are known: the walk then
#: waits for no GET at the first file of each folder. At most 1 + FOLDER_READAHEAD_FIRST GETs
#: per readdir and one per folder listed ahead; nothing without a reading walk (a lone ``ls``,
#: ``cat`` or ``find``).
READING_WALK_S = 2.0
#: A folder being read in listing order has its listing loaded again once it is this fraction
#: of the listing TTL old (in the background, refresh-ahead): the scan's lookups never wait for
#: a LIST when the TTL runs out (a 500-file read-back otherwise waited for several).
LISTING_REFRESH_AHEAD = 0.75
INTERNAL_PREFIX = ".cssfs-"  # cssfs.policy's names for its own objects; hidden, not creatable

Kind = Literal["file", "dir", "foreign"]


# -- the layers below, as fs.py uses them -------------------------------------------------------


class Reader(Protocol):
    """What an open file reads from: an EncryptedFile, or a journal PendingFile."""

    @property
    def size(self) -> int: ...

    async def read(self, offset: int, size: int) -> bytes: ...


#: Makes the staged contents of a file opened for writing, over a base (None: empty).
StageFactory = Callable[[Reader | None], Awaitable[StagedFile]]
#: Loads key material that may have appeared since (group keys given to us, rotated group
#: keys): True if something changed, so a refused open is worth trying again.
KeyRefresher = Callable[[], Awaitable[bool]]


# -- what the file system knows about one name ----------------------------------------------------


@dataclass
class Attrs:
    """A name's attributes as shown to the kernel, and where they came from.

    ``exact`` is False while a listed file's header is unknown (mtime is then the object's
    LastModified and the kernel must not cache it). ``etag``/``cipher_size`` name the stored
    version (None for a file that exists only here so far).
    """

    kind: Kind
    size: int = 0
    mtime_ns: int = 0
    mode: int = FILE_MODE
    exact: bool = True
    etag: str | None = None
    cipher_size: int | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"


@dataclass(eq=False)
class FileState:
    """A file open for writing here: its staged contents and what its next commit carries."""

    staged: StagedFile | None = None
    base: Reader | None = None  # what ``staged`` was opened over (closed with it)
    dirty: bool = False
    writers: int = 0
    mtime_ns: int = 0
    mode: int = FILE_MODE
    base_etag: str | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass(eq=False)
class FileHandle:
    node: Node
    writable: bool
    reader: Reader | None = None


@dataclass(eq=False)
class DirHandle:
    node: Node
    entries: list[tuple[str, Attrs]] | None = None


@dataclass(eq=False)
class _FolderScan:
    """Which files of one folder were opened for reading, in what order (folder read-ahead)."""

    listing: dict[str, Attrs]  # the listing ``names`` was sorted from
    size: int  # its length then (our own changes edit it in place)
    names: list[str]
    index: dict[str, int]
    first: int | None = None  # index of the first file in ``names`` (None: only folders)
    last: str | None = None  # the file opened last
    run: int = 0  # files opened in a row, each the next name after the one before
    ahead_until: int = 0  # names below this index were opened ahead already


P = ParamSpec("P")
R = TypeVar("R")


def _handler(
    fn: Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]:
    """Run a request handler so that only FUSEError escapes it (pyfuse3's rule)."""

    async def wrapper(self: Operations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(self, *args, **kwargs)
        except FUSEError:
            raise
        except Exception as exc:
            raise self._fuse_error(fn.__name__, exc) from None

    functools.update_wrapper(wrapper, fn)
    return wrapper


def _now_ns() -> int:
    return time.time_ns()


def _marker(path: str) -> str:
    """The key of a folder's marker object."""
    return path + "/"


def _prefix(path: str) -> str:
    """The key prefix of the folder ``path``."""
    return path + "/" if path else ""


def _valid_name(name: str) -> bool:
    """A name the mount shows and lets be created: not ``.cssfs-*`` (cssfs's own objects:
    folder policies, group records -- cssfs.policy.INTERNAL_PREFIX)."""
    return (
        bool(name)
        and "/" not in name
        and name not in (".", "..")
        and not name.startswith(INTERNAL_PREFIX)
        and len(os.fsencode(name)) <= NAME_MAX
    )


def _internal(key: str) -> bool:
    """A key with a ``.cssfs-*`` component: cssfs's own bookkeeping, never an envelope."""
    return any(part.startswith(INTERNAL_PREFIX) for part in key.split("/"))


async def _close(reader: object) -> None:
    aclose = getattr(reader, "aclose", None)
    if aclose is not None:
        await aclose()


class Operations(pyfuse3.Operations):
    """The request handlers of one mount. See the module docstring for the mapping."""

    supports_dot_lookup = True
    enable_writeback_cache = False  # the kernel's page cache would reorder our staging
    enable_acl = False
    #: Run (as a task in ``nursery``) once the kernel's INIT has been answered: settings the
    #: kernel resets when it applies the answer (the mount's read-ahead) go here.
    after_init: Callable[[], Awaitable[None]] | None = None

    def __init__(
        self,
        encstore: EncryptedStore,
        journal: Journal,
        new_staged: StageFactory,
        *,
        name_writer: Callable[[bytes], str] | None = None,
        is_trusted: Callable[[bytes], bool] | None = None,
        check_writer: Callable[[bytes], None] | None = None,
        refresh_keys: KeyRefresher | None = None,
        folder_attrs: FolderAttrs | None = None,
        on_new_folder: Callable[[str], None] | None = None,
        on_listed: Callable[[str, list[Entry], float], None] | None = None,
        list_ttl: float = 2.0,
        attr_timeout: float = 1.0,
        read_only: bool = False,
        nursery: trio.Nursery | None = None,
        uid: int | None = None,
        gid: int | None = None,
        strict: bool | None = None,
    ) -> None:
        super().__init__()
        self.encstore = encstore
        self.journal = journal
        self.new_staged = new_staged
        self.name_writer = name_writer
        self.is_trusted = is_trusted  # writer ed25519 -> you or a contact (xattr signature)
        self.check_writer = check_writer  # --trusted-writers-only: UntrustedWriterError
        self.refresh_keys = refresh_keys
        self.folder_attrs = folder_attrs  # per-folder records of mtimes/modes (folderattrs.py)
        self.on_new_folder = on_new_folder  # mkdir made an empty folder (sharing: no policy yet)
        # A folder's LIST came back (its entries, cssfs's own objects included, and when it
        # began on time.monotonic): sharing learns from it whether the folder has a policy.
        self.on_listed = on_listed
        self.attr_timeout = attr_timeout
        self.read_only = read_only
        self.failsafe = False
        self.nursery = nursery
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.strict = os.environ.get(STRICT_ENV) == "1" if strict is None else strict
        self.inodes = InodeTable()
        self.listings: DirCache[Attrs] = DirCache(list_ttl)
        self.started_ns = _now_ns()
        self._handles: dict[int, FileHandle | DirHandle] = {}
        self._next_fh = 1
        self._ns_lock = trio.Lock()
        # (key, etag) -> (mtime_ns, mode) from the header, None if not an envelope.
        self._meta: OrderedDict[tuple[str, str], tuple[int, int] | None] = OrderedDict()
        self._meta_flights: dict[tuple[str, str], trio.Event] = {}
        self._header_limiter = trio.CapacityLimiter(HEADER_PREFETCH)
        self._refused: set[str] = set()  # keys we logged "cannot open" for
        self._scans: OrderedDict[str, _FolderScan] = OrderedDict()
        self._walked: OrderedDict[str, list[str]] = OrderedDict()  # readdir'ed: subfolders
        self._reading_walk_until = 0.0  # time.monotonic() until which a reading walk is on
        # key -> (count, etag) of our own uploads that landed: a file opened over a pending
        # version that lands meanwhile must build on the landed version.
        self._landed: dict[str, tuple[int, str]] = {}
        journal.on_uploaded = self._uploaded
        journal.on_deleted = self._deleted

    def init(self) -> None:
        """pyfuse3, while it answers the kernel's INIT: start ``after_init``, which runs once
        the answer has gone out (this is synchronous, inside libfuse's INIT handling)."""
        if self.after_init is not None and self.nursery is not None:
            self.nursery.start_soon(self.after_init)

    # -- errors ---------------------------------------------------------------------------------

    def _fuse_error(self, op: str, exc: Exception) -> FUSEError:
        if isinstance(exc, NoSuchObjectError):
            log.debug("%s: %s", op, exc)
            return FUSEError(errno.ENOENT)
        if isinstance(exc, (NoIdentityMatchError, UntrustedWriterError)):
            return FUSEError(errno.EACCES)
        if isinstance(exc, (FormatError, HeaderAuthError, SignatureError, PayloadError)):
            log.debug("%s: %s", op, exc)  # the layer below logged the object once
            return FUSEError(errno.EIO)
        if isinstance(exc, JournalError):
            log.error("%s: %s", op, exc)
            return FUSEError(exc.errno or errno.EIO)
        if isinstance(exc, (AccessDeniedError, NoSuchBucketError)):
            log.error("%s: %s", op, exc)
            return FUSEError(errno.EACCES)
        if isinstance(exc, CssfsError):
            log.error("%s: %s", op, exc)
            return FUSEError(errno.EIO)
        if isinstance(exc, OSError) and exc.errno:
            log.debug("%s: %s", op, exc)
            return FUSEError(exc.errno)
        log.exception("internal error in %s; the mount is read-only from now on", op)
        self.failsafe = True
        if self.strict:
            raise exc
        return FUSEError(errno.EIO)

    def _check_writable(self) -> None:
        if self.read_only or self.failsafe:
            raise FUSEError(errno.EROFS)

    # -- attributes -----------------------------------------------------------------------------

    def _entry(self, node: Node, attrs: Attrs, *, listed: bool = False
               ) -> pyfuse3.EntryAttributes:
        """What the kernel gets for ``node``. ``listed``: ``attrs`` came from the parent's
        cached listing, so the kernel may keep them until that listing expires if that is
        later than ``attr_timeout`` -- until then a lookup would get the same answer from us;
        what the kernel shows is still at most ``list_ttl + attr_timeout`` old, as before. A
        read-back of a folder just listed with ``ls -l`` then makes no lookup per file."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = node.inode
        entry.generation = 0
        timeout = self.attr_timeout if attrs.exact else 0
        if listed and attrs.exact and node.path:
            timeout = max(timeout, self.listings.expires_in(node.parent_path))
        entry.entry_timeout = timeout
        entry.attr_timeout = timeout
        kind = stat.S_IFDIR if attrs.is_dir else stat.S_IFREG
        entry.st_mode = kind | (attrs.mode & 0o7777)
        entry.st_nlink = 2 if attrs.is_dir else 1
        entry.st_uid = self.uid
        entry.st_gid = self.gid
        entry.st_rdev = 0
        entry.st_size = attrs.size
        entry.st_blksize = BLOCK_SIZE
        entry.st_blocks = (attrs.size + 511) // 512
        entry.st_atime_ns = attrs.mtime_ns
        entry.st_mtime_ns = attrs.mtime_ns
        entry.st_ctime_ns = attrs.mtime_ns
        return entry

    def _dir_attrs(self) -> Attrs:
        return Attrs("dir", mtime_ns=self.started_ns, mode=DIR_MODE)

    def _remember(self, key: str, etag: str, meta: tuple[int, int] | None) -> None:
        self._meta[(key, etag)] = meta
        self._meta.move_to_end((key, etag))
        while len(self._meta) > META_ENTRIES:
            self._meta.popitem(last=False)

    @staticmethod
    def _apply(attrs: Attrs, meta: tuple[int, int] | None) -> Attrs:
        """Make listed ``attrs`` exact from its header (None: not an envelope after all)."""
        if meta is None:
            attrs.kind = "foreign"
            attrs.size = attrs.cipher_size or 0
            attrs.mode = FOREIGN_MODE
        else:
            attrs.mtime_ns, attrs.mode = meta[0], (meta[1] & 0o7777) or FILE_MODE
        attrs.exact = True
        return attrs

    def _from_entry(self, entry: Entry) -> Attrs:
        mtime_ns = int(entry.mtime * 1_000_000_000)
        if entry.plain_size is None:
            return Attrs("foreign", entry.cipher_size, mtime_ns, FOREIGN_MODE, True, entry.etag,
                         entry.cipher_size)
        attrs = Attrs("file", entry.plain_size, mtime_ns, FILE_MODE, False, entry.etag,
                      entry.cipher_size)
        known = (entry.key, entry.etag)
        if known in self._meta:
            self._apply(attrs, self._meta[known])
        return attrs

    async def _header_meta(self, key: str, etag: str, cipher_size: int | None = None
                           ) -> tuple[int, int] | None:
        """(mtime_ns, mode) from the header of one stored version (None: not an envelope);
        one GET per version, shared by concurrent callers (a small object's GET takes it whole:
        see EncryptedStore.header)."""
        k = (key, etag)
        while k not in self._meta:
            flight = self._meta_flights.get(k)
            if flight is not None:
                await flight.wait()
                continue
            flight = self._meta_flights[k] = trio.Event()
            try:
                async with self._header_limiter:
                    info = await self.encstore.header(key, etag, cipher_size=cipher_size)
                meta: tuple[int, int] | None = (info.mtime_ns, info.mode)
            except FormatError:
                meta = None
            finally:
                del self._meta_flights[k]
                flight.set()
            self._remember(key, etag, meta)
        return self._meta[k]

    async def _make_exact(self, path: str, attrs: Attrs) -> Attrs:
        if attrs.kind == "file" and not attrs.exact and attrs.etag is not None:
            self._apply(attrs, await self._header_meta(path, attrs.etag, attrs.cipher_size))
        return attrs

    async def _prefetch_headers(self, items: list[tuple[str, str, int | None]]) -> None:
        """Fetch headers in the background so later stats are exact (errors: debug only)."""

        async def one(key: str, etag: str, cipher_size: int | None) -> None:
            try:
                await self._header_meta(key, etag, cipher_size)
            except Exception as exc:  # background work: the stat that needs it will report
                log.debug("header prefetch %s: %s", key, exc)

        async with trio.open_nursery() as nursery:
            for key, etag, cipher_size in items:
                nursery.start_soon(one, key, etag, cipher_size)

    # -- journal events -------------------------------------------------------------------------

    def _uploaded(self, up: Uploaded) -> None:
        """A pending file landed: the listing shows its stored version from now on, and a
        file open for writing there now builds on that version (its next commit replaces it)."""
        self._remember(up.key, up.etag, (up.mtime_ns, up.mode))
        self._landed[up.key] = (self._landed.get(up.key, (0, ""))[0] + 1, up.etag)
        if len(self._landed) > META_ENTRIES:
            del self._landed[next(iter(self._landed))]
        state = self._open_file(up.key)
        if state is not None:
            state.base_etag = up.etag
        self._note_attrs(up.key, FileAttrs(up.etag, up.cipher_size, up.mtime_ns, up.mode))
        self._note(up.key, Attrs("file", up.size, up.mtime_ns, (up.mode & 0o7777) or FILE_MODE,
                                 True, up.etag, up.cipher_size))

    def _deleted(self, key: str) -> None:
        if self.journal.pending(key) is None:
            self._note(key, None)
            self._note_attrs(key, None)

    def _note_attrs(self, key: str, attrs: FileAttrs | None) -> None:
        """Tell the folder's attrs record about a version we stored (None: we removed it)."""
        if self.folder_attrs is not None:
            self.folder_attrs.note(key, attrs)

    # -- listings -------------------------------------------------------------------------------

    async def _load(self, path: str) -> dict[str, Attrs]:
        started = time.monotonic()
        entries = await self.encstore.list(_prefix(path))
        if self.on_listed is not None:
            self.on_listed(path, entries, started)
        return await self._listed(path, entries)

    async def prime_listing(self, path: str, entries: list[Entry], started: float) -> None:
        """Keep a listing of folder ``path`` made elsewhere (the mount's start-up LIST of the
        root, begun at ``started`` on the listing cache's clock), so the first lookups after
        mounting do not LIST it again."""
        if self.on_listed is not None:
            self.on_listed(path, entries, started)
        self.listings.prime(path, await self._listed(path, entries), started)

    async def _listed(self, path: str, entries: list[Entry]) -> dict[str, Attrs]:
        """The names of folder ``path`` from its LIST ``entries``."""
        prefix = _prefix(path)
        out: dict[str, Attrs] = {}
        await self._load_attrs(prefix, entries)
        for entry in entries:
            name = entry.key[len(prefix) :]
            if entry.is_dir:
                name = name.rstrip("/")
                if _valid_name(name):
                    out[name] = self._dir_attrs()
            elif _valid_name(name) and name not in out:  # "" is the folder's own marker
                out[name] = self._from_entry(entry)
        return out

    async def _load_attrs(self, prefix: str, entries: list[Entry]) -> None:
        """mtime/mode of listed files from the folder's attrs record (one GET, when the LIST
        shows one and it names files whose header we have not read)."""
        if self.folder_attrs is None:
            return
        record = next((e for e in entries if e.key == prefix + ATTRS_NAME), None)
        if record is None:
            return
        unknown = {
            e.key[len(prefix) :]: (e.etag, e.cipher_size) for e in entries
            if not e.is_dir and e.plain_size is not None and (e.key, e.etag) not in self._meta
        }
        if not unknown:
            return
        found = await self.folder_attrs.load(prefix, record.etag, unknown)
        for name, attrs in found.items():
            self._remember(prefix + name, attrs.etag, (attrs.mtime_ns, attrs.mode))

    async def _listing(self, path: str) -> dict[str, Attrs]:
        return await self.listings.get(path, lambda: self._load(path))

    def _open_file(self, path: str) -> FileState | None:
        node = self.inodes.at(path)
        if node is not None and isinstance(node.state, FileState) and node.state.staged is not None:
            return node.state
        return None

    @staticmethod
    def _pending_attrs(info: PendingInfo) -> Attrs:
        return Attrs("file", info.size, info.mtime_ns, (info.mode & 0o7777) or FILE_MODE)

    def _local(self, path: str) -> Attrs | None:
        """What this mount holds for ``path`` that the store may not show yet."""
        state = self._open_file(path)
        if state is not None and state.staged is not None:
            return Attrs("file", state.staged.size, state.mtime_ns, state.mode)
        pending = self.journal.pending(path)
        if pending is not None:
            return self._pending_attrs(pending)
        return None

    async def _attrs(self, path: str, *, exact: bool = True) -> Attrs | None:
        """The attributes of ``path``, or None if nothing is there."""
        if path == "":
            return self._dir_attrs()
        local = self._local(path)
        if local is not None:
            return local
        parent, name = split(path)
        attrs = (await self._listing(parent)).get(name)
        if attrs is None:
            # A folder we showed that holds files not uploaded yet (or open here) but nothing
            # in the store any more (another client emptied it) must not vanish under them.
            node = self.inodes.at(path)
            if node is not None and node.is_dir and self._holds_local(path):
                return self._dir_attrs()
            return None
        if not attrs.is_dir and self.journal.is_hidden(path):
            return None
        if exact:
            await self._make_exact(path, attrs)
        return attrs

    async def _children(self, path: str) -> dict[str, Attrs]:
        """The folder's names: the listing with local files laid over it."""
        children = dict(await self._listing(path))
        prefix = _prefix(path)
        for key in self.journal.hidden_under(prefix):
            name = key[len(prefix) :]
            if "/" not in name and name in children and not children[name].is_dir:
                del children[name]
        for key, info in self.journal.pending_under(prefix).items():
            name, sep, _ = key[len(prefix) :].partition("/")
            if sep:
                children.setdefault(name, self._dir_attrs())
            else:
                children[name] = self._pending_attrs(info)
        for node in self.inodes.children(path):
            local = self._local(node.path) if not node.is_dir else None
            if local is not None:
                children[node.name] = local
            elif node.is_dir and node.name not in children and self._holds_local(node.path):
                children[node.name] = self._dir_attrs()
        return children

    def _holds_local(self, path: str) -> bool:
        """Whether folder ``path`` holds files that exist only here (pending or open)."""
        if self.journal.pending_under(path + "/"):
            return True
        return any(
            self._holds_local(n.path) if n.is_dir else self._local(n.path) is not None
            for n in self.inodes.children(path)
        )

    def _note(self, path: str, attrs: Attrs | None) -> None:
        """Our own change to ``path``: show it in the cached listing at once."""
        parent, name = split(path)
        self.listings.set_entry(parent, name, attrs)

    # -- lookup and attributes ------------------------------------------------------------------

    def _path(self, parent_inode: int, name: bytes) -> str:
        parent = self._node(parent_inode)
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        text = os.fsdecode(name)
        if text.startswith(INTERNAL_PREFIX):
            raise FUSEError(errno.EPERM)
        if not _valid_name(text):
            raise FUSEError(errno.EINVAL)
        return join(parent.path, text)

    def _node(self, inode: int) -> Node:
        try:
            return self.inodes.get(inode)
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    @_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name in (b".", b".."):
            parent = self._node(parent_inode)
            path = parent.path if name == b"." else parent.parent_path
            node = self.inodes.lookup(path, True)
            return self._entry(node, self._dir_attrs())
        hidden = name.startswith(INTERNAL_PREFIX.encode())
        path = self._path(parent_inode, name) if not hidden else ""
        attrs = await self._attrs(path) if not hidden else None
        if attrs is None:
            entry = pyfuse3.EntryAttributes()
            entry.st_ino = 0  # a negative entry the kernel may cache for entry_timeout
            entry.entry_timeout = self.attr_timeout
            return entry
        node = self.inodes.lookup(path, attrs.is_dir)
        return self._entry(node, attrs, listed=self._local(path) is None)

    async def _node_attrs(self, node: Node) -> Attrs:
        if not node.detached:
            attrs = await self._attrs(node.path)
            if attrs is not None and attrs.is_dir == node.is_dir:
                return attrs
        state = node.state
        if isinstance(state, FileState) and state.staged is not None:
            return Attrs("file", state.staged.size, state.mtime_ns, state.mode)
        if node.is_dir and not node.detached:
            return self._dir_attrs()
        raise FUSEError(errno.ENOENT)

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        return self._entry(node, await self._node_attrs(node))

    @_handler
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, nlookup in inode_list:
            self.inodes.forget(inode, nlookup)

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = BLOCK_SIZE
        data.f_frsize = 4096
        data.f_blocks = 1 << 40  # 4 PiB: an object store has no fixed size
        data.f_bfree = data.f_blocks
        data.f_bavail = data.f_blocks
        data.f_files = 1 << 32
        data.f_ffree = data.f_files
        data.f_favail = data.f_files
        data.f_namemax = NAME_MAX
        return data

    # -- folders --------------------------------------------------------------------------------

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if not node.is_dir:
            raise FUSEError(errno.ENOTDIR)
        return self._add_handle(DirHandle(node))

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._handles.get(fh)
        if not isinstance(handle, DirHandle):
            raise FUSEError(errno.EBADF)
        if handle.entries is None or start_id == 0:
            children = await self._children(handle.node.path)
            handle.entries = sorted(children.items())
            unknown = [
                (join(handle.node.path, name), a.etag, a.cipher_size)
                for name, a in handle.entries
                if a.kind == "file" and not a.exact and a.etag is not None
            ]
            if unknown and self.nursery is not None:
                self.nursery.start_soon(self._prefetch_headers, unknown)
            self._list_ahead(handle.node.path, handle.entries)
        dots = self._dots(handle.node)
        for index in range(start_id, len(dots) + len(handle.entries)):
            if index < len(dots):
                # "." and "..": no lookup count is taken for them (libfuse's rule).
                dot, dot_node = dots[index]
                entry = self._entry(dot_node, self._dir_attrs())
                if not pyfuse3.readdir_reply(token, dot, entry, index + 1):
                    return
                continue
            name, attrs = handle.entries[index - len(dots)]
            node = self.inodes.node_for(join(handle.node.path, name), attrs.is_dir)
            listed = self._local(node.path) is None
            if not pyfuse3.readdir_reply(token, os.fsencode(name),
                                         self._entry(node, attrs, listed=listed), index + 1):
                self.inodes.drop_if_unused(node)
                return
            node.lookups += 1

    def _list_ahead(self, path: str, entries: list[tuple[str, Attrs]]) -> None:
        """Folder ``path`` was read with readdir (``entries`` in name order): list the first
        subfolders in the background, and, if its parent was read too (a walk), the parent's
        next subfolders after it, and below each of those its first subfolders
        (FOLDER_LIST_DEPTH). During a reading walk, open the first files of ``path`` and of the
        folders listed ahead too (READING_WALK_S). Only a guess: a listing loaded for nothing
        costs a LIST, a file opened for nothing a GET."""
        subs = [join(path, name) for name, attrs in entries if attrs.is_dir]
        self._walked[path] = subs
        self._walked.move_to_end(path)
        while len(self._walked) > FOLDER_SCANS:
            self._walked.popitem(last=False)
        if self.nursery is None:
            return
        ahead = [(sub, 0) for sub in subs[:FOLDER_LIST_AHEAD]]
        siblings = self._walked.get(split(path)[0]) if path else None
        walk = siblings is not None and path in siblings
        if walk:
            assert siblings is not None
            i = siblings.index(path)
            ahead = [(sub, FOLDER_LIST_DEPTH) for sub, _ in ahead]
            ahead += [(s, FOLDER_LIST_DEPTH) for s in siblings[i + 1 : i + 1 + FOLDER_LIST_AHEAD]]
        reading = self._reading_walk()
        if reading:
            self._open_first_files(path, 1 + FOLDER_READAHEAD_FIRST)
        for sub, depth in ahead:
            self._ahead(sub, depth, reading)

    def _ahead(self, path: str, depth: int, reading: bool) -> None:
        """Folder ``path`` lies ahead of a walk: list it in the background (unless listed or
        being listed already); once listed, the rest (``_listed_ahead``)."""
        listing = self.listings.cached(path)
        if listing is not None:
            self._listed_ahead(path, listing, depth, reading)
        elif (depth > 0 or reading or not self.listings.loading(path)) and self.nursery:
            self.nursery.start_soon(self._load_ahead, path, depth)

    def _listed_ahead(self, path: str, listing: dict[str, Attrs], depth: int,
                      reading: bool) -> None:
        """Folder ``path`` ahead of a walk is listed: during a reading walk open its first
        file ahead, and while ``depth`` allows go on with its first subfolder."""
        if reading:
            self._open_first_files(path, 1)
        if depth > 0:
            first = min((name for name, a in listing.items() if a.is_dir), default=None)
            if first is not None:
                self._ahead(join(path, first), depth - 1, reading)

    async def _load_ahead(self, path: str, depth: int = 0) -> None:
        try:
            listing = await self._listing(path)
        except Exception as exc:  # a hint: the readdir or lookup that needs it reports
            log.debug("listing of %s ahead of a walk: %s", path, exc)
            return
        self._listed_ahead(path, listing, depth, self._reading_walk())

    def _reading_walk(self) -> bool:
        """Whether files were opened for reading during a walk lately (READING_WALK_S)."""
        return time.monotonic() < self._reading_walk_until

    def _open_first_files(self, folder: str, count: int) -> None:
        """Open the first ``count`` files of ``folder`` (listing order) ahead, from its cached
        listing (none: nothing); the ones that are not small enough are left alone."""
        listing = self.listings.cached(folder)
        if not listing:
            return
        for name in sorted(n for n, a in listing.items() if a.kind == "file")[:count]:
            self._open_ahead(join(folder, name), listing[name])

    def _open_ahead(self, key: str, attrs: Attrs) -> None:
        """Open one listed file ahead (EncryptedStore.prefetch_open), unless this mount holds a
        version of its own (open here, pending, on its way out)."""
        if (attrs.kind == "file" and attrs.etag is not None and attrs.cipher_size is not None
                and self._local(key) is None and not self.journal.is_hidden(key)):
            self.encstore.prefetch_open(key, attrs.etag, attrs.cipher_size)

    def _dots(self, node: Node) -> list[tuple[bytes, Node]]:
        parent = self.inodes.at(node.parent_path) if node.path else node
        return [(b".", node), (b"..", parent or self.inodes.root)]

    @_handler
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    @_handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._check_writable()
        path = self._path(parent_inode, name)
        async with self._ns_lock:
            if await self._attrs(path, exact=False) is not None:
                raise FUSEError(errno.EEXIST)
            started = time.monotonic()  # the listings' clock
            await self.encstore.store.put(_marker(path), b"")
            attrs = self._dir_attrs()
            self._note(path, attrs)
            # Nothing was there, so the new folder was empty when its marker went up: its
            # listing (and its sharing policy: none) are known without a request until they
            # expire, like any listing (rsync makes a folder, then looks up names in it).
            self.listings.prime(path, {}, started)
            if self.on_new_folder is not None:
                self.on_new_folder(path)
            node = self.inodes.lookup(path, True)
        return self._entry(node, attrs)

    async def _is_empty(self, path: str) -> bool:
        self.listings.invalidate(path)  # decide on a fresh LIST
        return not await self._children(path)

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        path = self._path(parent_inode, name)
        async with self._ns_lock:
            attrs = await self._attrs(path, exact=False)
            if attrs is None:
                raise FUSEError(errno.ENOENT)
            if not attrs.is_dir:
                raise FUSEError(errno.ENOTDIR)
            if not await self._is_empty(path):
                raise FUSEError(errno.ENOTEMPTY)
            if self.folder_attrs is not None:  # no late write may bring the folder back
                await self.folder_attrs.forget_below(_prefix(path))
            # The marker and cssfs's own objects in the folder (its policy) go with it.
            own = [e.key for e in await self.encstore.list(_prefix(path))
                   if not e.is_dir and e.key[len(path) + 1 :].startswith(INTERNAL_PREFIX)]
            await self.encstore.store.delete([_marker(path), *own])
            self._note(path, None)
            self.inodes.detach(path)

    # -- files: open, read, write, close --------------------------------------------------------

    def _add_handle(self, handle: FileHandle | DirHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _file(self, fh: int) -> FileHandle:
        handle = self._handles.get(fh)
        if not isinstance(handle, FileHandle):
            raise FUSEError(errno.EBADF)
        return handle

    def _state(self, node: Node) -> FileState:
        if not isinstance(node.state, FileState):
            node.state = FileState()
        return node.state

    def _refuse(self, path: str, why: str, level: int = logging.INFO) -> None:
        if path not in self._refused:
            self._refused.add(path)
            log.log(level, "object %s %s; not opening it", path, why)

    async def _reader(self, path: str, attrs: Attrs) -> Reader | None:
        """Where the current contents of ``path`` can be read (None: an empty new file)."""
        if attrs.kind == "foreign":
            self._refuse(path, "is not a cssfs envelope")
            raise FUSEError(errno.EACCES)
        pending: PendingFile | None = None
        if attrs.etag is None or self.journal.pending(path) is not None:
            # Not for a stored version with nothing pending (a read-back of many files):
            # open_pending takes the journal's lock, a trip through trio's scheduler each.
            pending = await self.journal.open_pending(path)
        if pending is not None:
            return pending
        if attrs.etag is None and path in self._landed:
            # Pending when it was looked up, landed while open_pending waited for the journal:
            # read what landed (the listing shows it now), not an empty file.
            fresh = await self._attrs(path)
            if fresh is not None and fresh.kind == "file" and fresh.etag is not None:
                attrs = fresh
        if attrs.etag is None:
            return None
        retry = self.refresh_keys is not None
        while True:
            try:
                reader = await self.encstore.open(path, etag=attrs.etag,
                                                  cipher_size=attrs.cipher_size)
                break
            except NoIdentityMatchError:
                # Perhaps for a group key we were given (or that rotated) since we loaded ours.
                if retry and self.refresh_keys is not None and await self.refresh_keys():
                    retry = False
                    continue
                self._refuse(path, "is not encrypted for this identity")
                raise
        if self.check_writer is not None:
            try:
                self.check_writer(reader.info.writer)
            except UntrustedWriterError as exc:
                await _close(reader)
                self._refuse(path, f"was written by someone untrusted ({exc})", logging.WARNING)
                raise
        return reader

    def _read_ahead_folder(self, path: str) -> None:
        """Folder read-ahead: note that ``path`` is opened for reading; if it is the next name
        after the file opened before in its folder's listing, open the next small files ahead
        (a few already when it is the folder's first file: a walk starts there).
        Only a guess (from the folder's last listing, fresh or not): what it gets wrong costs a
        GET, never a wrong answer (files are opened by the version listed)."""
        parent, name = split(path)
        if parent in self._walked and parent and split(parent)[0] in self._walked:
            self._reading_walk_until = time.monotonic() + READING_WALK_S
        listing = self.listings.peek(parent)
        if listing is None:
            return
        scan = self._scans.get(parent)
        if scan is None or scan.listing is not listing or scan.size != len(listing):
            names = sorted(listing)
            last = scan.last if scan is not None else None
            run = scan.run if scan is not None else 0
            first = next((i for i, n in enumerate(names) if listing[n].kind == "file"), None)
            scan = _FolderScan(listing, len(listing), names, {n: i for i, n in enumerate(names)},
                               first, last, run)
            self._scans[parent] = scan
            while len(self._scans) > FOLDER_SCANS:
                self._scans.popitem(last=False)
        self._scans.move_to_end(parent)
        i = scan.index.get(name)
        if i is None:
            return
        before = scan.index.get(scan.last) if scan.last is not None else None
        scan.last = name
        if before is None or i != before + 1:
            scan.run = 0
            scan.ahead_until = i + 1
            if i != scan.first:
                return
            stop = min(i + 1 + FOLDER_READAHEAD_FIRST, len(scan.names))
        else:
            scan.run += 1
            if self.nursery is not None and self.listings.due(parent, LISTING_REFRESH_AHEAD):
                self.nursery.start_soon(self._refresh_listing, parent)
            stop = min(i + 1 + FOLDER_READAHEAD_FILES, len(scan.names))
        for j in range(max(scan.ahead_until, i + 1), stop):
            attrs = listing.get(scan.names[j])
            if attrs is not None:
                self._open_ahead(join(parent, scan.names[j]), attrs)
        scan.ahead_until = max(scan.ahead_until, stop)

    async def _refresh_listing(self, path: str) -> None:
        """Load a listing again before it expires (a hint: errors only at DEBUG; the lookup
        that needs the listing once it expired meets them)."""
        try:
            await self.listings.refresh(path, lambda: self._load(path))
        except Exception as exc:
            log.debug("listing of %s ahead of its expiry: %s", path or "/", exc)

    async def _stage(self, node: Node, attrs: Attrs, *, truncate: bool = False) -> FileState:
        """Make sure ``node`` has staged contents: copy-on-write over what is there now, or
        empty for O_TRUNC (libfuse passes O_TRUNC to open: atomic_o_trunc is on by default)."""
        state = self._state(node)
        if state.staged is None:
            landed = self._landed.get(node.path)
            if truncate and attrs.kind == "foreign":
                raise FUSEError(errno.EACCES)
            base = None if truncate else await self._reader(node.path, attrs)
            if state.staged is not None:  # another task staged it meanwhile
                await _close(base)
                return state
            state.staged = await self.new_staged(base)
            if base is None:  # written from its start: sealed as it is written
                state.staged.attach_sink(self.journal.seal_sink(node.path))
            state.base = base
            state.dirty = truncate
            state.mtime_ns = _now_ns() if truncate else attrs.mtime_ns
            state.mode = attrs.mode
            state.base_etag = attrs.etag
            now = self._landed.get(node.path)
            if now is not None and now != landed:
                state.base_etag = now[1]
        return state

    async def _unstage(self, state: FileState) -> None:
        staged, base = state.staged, state.base
        state.staged = state.base = None
        state.dirty = False
        if staged is not None:
            await staged.aclose()
        await _close(base)

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise FUSEError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable:
            self._check_writable()
        handle = FileHandle(node, writable)
        state = node.state if isinstance(node.state, FileState) else None
        if state is None or state.staged is None:
            attrs = await self._attrs(node.path) if not node.detached else None
            if attrs is None or attrs.is_dir:
                raise FUSEError(errno.ENOENT)
            if writable:
                await self._stage(node, attrs, truncate=bool(flags & os.O_TRUNC))
            else:
                self._read_ahead_folder(node.path)
                handle.reader = await self._reader(node.path, attrs)
        elif writable and flags & os.O_TRUNC and state.staged.size:
            await state.staged.truncate(0)
            state.dirty = True
            state.mtime_ns = _now_ns()
        if writable:
            self._state(node).writers += 1
        self.inodes.opened(node)
        return pyfuse3.FileInfo(fh=self._add_handle(handle))

    @_handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_writable()
        path = self._path(parent_inode, name)
        async with self._ns_lock:
            existing = await self._attrs(path, exact=False)
            if existing is not None and existing.is_dir:
                raise FUSEError(errno.EISDIR)
            if existing is not None and (existing.kind == "foreign" or flags & os.O_EXCL):
                raise FUSEError(errno.EEXIST)
            node = self.inodes.lookup(path, False)
            state = self._state(node)
            if existing is not None:
                # The kernel did not know it yet (another client made it within the TTL):
                # O_CREAT without O_EXCL opens the existing file, O_TRUNC empties it.
                truncate = bool(flags & os.O_TRUNC)
                if state.staged is None:
                    await self._stage(node, existing, truncate=truncate)
                elif truncate:
                    assert state.staged is not None
                    await state.staged.truncate(0)
                    state.dirty = True
                    state.mtime_ns = _now_ns()
            else:
                state.staged = await self.new_staged(None)
                state.staged.attach_sink(self.journal.seal_sink(path))
                state.mode = (mode & 0o7777) or FILE_MODE
                state.base_etag = None
                state.dirty = True  # a new file is written even if it stays empty
                state.mtime_ns = _now_ns()
            assert state.staged is not None
            state.writers += 1
            self.inodes.opened(node)
            attrs = Attrs("file", state.staged.size, state.mtime_ns, state.mode)
            fh = self._add_handle(FileHandle(node, True))
        return pyfuse3.FileInfo(fh=fh), self._entry(node, attrs)

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._file(fh)
        state = handle.node.state
        if isinstance(state, FileState) and state.staged is not None:
            return await state.staged.read(off, size)
        if handle.reader is None:
            return b""
        return await handle.reader.read(off, size)

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._file(fh)
        state = handle.node.state
        if not handle.writable or not isinstance(state, FileState) or state.staged is None:
            raise FUSEError(errno.EBADF)
        await state.staged.write(off, buf)
        state.dirty = True
        state.mtime_ns = _now_ns()
        return len(buf)

    async def _commit(self, node: Node) -> None:
        """Hand a dirty file to the journal: durable on local disk when this returns."""
        state = self._state(node)
        async with state.lock:
            if not state.dirty or state.staged is None or node.detached:
                return
            # A previous version of ours that lands while this one is sealed is fine: the
            # journal remembers what it landed last and lets this upload replace it.
            info = await self.journal.commit(
                node.path, state.staged, mtime_ns=state.mtime_ns, mode=state.mode,
                base_etag=state.base_etag,
            )
            state.dirty = False
            self._note(node.path, self._pending_attrs(info))

    @_handler
    async def flush(self, fh: int) -> None:
        # close(2) waits for this, so a file is durable in the journal when close returns.
        handle = self._file(fh)
        if handle.writable:
            await self._commit(handle.node)

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._file(fh)
        if handle.writable:
            await self._commit(handle.node)
        if not handle.node.detached:
            await self.journal.flush(handle.node.path)

    @_handler
    async def release(self, fh: int) -> None:
        handle = self._file(fh)
        del self._handles[fh]
        node = handle.node
        try:
            if handle.writable:
                state = self._state(node)
                state.writers -= 1
                if state.writers == 0:
                    try:
                        await self._commit(node)
                    finally:
                        await self._unstage(state)
            elif handle.reader is not None:
                await _close(handle.reader)
        finally:
            self.inodes.closed(node)

    # -- changing names -------------------------------------------------------------------------

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        path = self._path(parent_inode, name)
        async with self._ns_lock:
            attrs = await self._attrs(path, exact=False)
            if attrs is None:
                raise FUSEError(errno.ENOENT)
            if attrs.is_dir:
                raise FUSEError(errno.EISDIR)
            state = self._open_file(path)
            if state is not None:
                state.dirty = False  # an unlinked open file is never committed
            if not await self.journal.unlink(path) and (
                attrs.etag is not None or path in self._landed  # it may have landed meanwhile
            ):
                await self.encstore.delete(path)
                self._note_attrs(path, None)
            self.encstore.forget(path)
            self._note(path, None)
            self.inodes.detach(path)

    @_handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._check_writable()
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FUSEError(errno.EINVAL)
        old = self._path(parent_inode_old, name_old)
        new = self._path(parent_inode_new, name_new)
        async with self._ns_lock:
            src = await self._attrs(old, exact=False)
            if src is None:
                raise FUSEError(errno.ENOENT)
            if old == new:
                return
            dst = await self._attrs(new, exact=False)
            if dst is not None and flags & pyfuse3.RENAME_NOREPLACE:
                raise FUSEError(errno.EEXIST)
            if dst is not None and dst.kind == "foreign":
                raise FUSEError(errno.EPERM)
            if src.is_dir:
                if new.startswith(old + "/"):
                    raise FUSEError(errno.EINVAL)
                if dst is not None and not dst.is_dir:
                    raise FUSEError(errno.ENOTDIR)
                if dst is not None:
                    if not await self._is_empty(new):
                        raise FUSEError(errno.ENOTEMPTY)
                    await self.encstore.store.delete([_marker(new)])
                await self._rename_dir(old, new)
                moved: Attrs | None = self._dir_attrs()
            else:
                if dst is not None and dst.is_dir:
                    raise FUSEError(errno.EISDIR)
                moved = await self._rename_file(old, new, src, dst)
            self._note(old, None)
            self._note(new, moved)
            self.inodes.move(old, new)

    async def _rename_file(self, old: str, new: str, src: Attrs, dst: Attrs | None
                           ) -> Attrs | None:
        """Move one file's pending and stored versions; an open file's node moves with it.

        Returns what the listing should show under ``new`` until the next LIST (None when
        only the journal or an open file holds it: the overlay shows those)."""
        state = self._open_file(old)
        lock = state.lock if state is not None else None
        async with lock if lock is not None else _nothing():
            dst_etag = dst.etag if dst is not None else None
            moved = await self.journal.rename(old, new, dst_etag=dst_etag)
            shown: Attrs | None = None
            # Not pending (any more): what there is of it is in the store -- also when it was
            # pending a moment ago and landed meanwhile.
            if not moved and (src.etag is not None or old in self._landed):
                if src.kind == "foreign":
                    info: ObjectInfo | None = await self.encstore.store.copy(old, new)
                    await self.encstore.store.delete([old])
                else:
                    try:
                        info = await self.encstore.rename(old, new)
                    except NoSuchObjectError:
                        if src.etag is not None:
                            raise
                        info = None
                if info is not None:
                    shown = replace(src, etag=info.etag, cipher_size=info.size)
                    self._note_attrs(old, None)
                    if src.kind == "file" and src.exact:
                        self._remember(new, info.etag, (src.mtime_ns, src.mode))
                        self._note_attrs(new, FileAttrs(info.etag, info.size, src.mtime_ns,
                                                        src.mode))
                    if state is not None:
                        state.base_etag = info.etag
            elif state is not None:
                state.base_etag = dst_etag  # the next commit replaces what is at ``new``
            self.encstore.forget(old)
            self.encstore.forget(new)
        return shown

    async def _rename_dir(self, old: str, new: str) -> None:
        """Move a folder object by object (not atomic: a failure leaves part of it moved)."""
        prefix = old + "/"
        if self.folder_attrs is not None:  # no late write may bring the old folder back
            await self.folder_attrs.forget_below(prefix)
        pending = self.journal.pending_under(prefix)  # before the LIST: none slips between
        entries = {e.key: e for e in await self.encstore.list(prefix, delimiter=None)}
        hidden = self.journal.hidden_under(prefix)
        for key in sorted(set(entries) | set(pending)):
            target = new + "/" + key[len(prefix) :]
            entry = entries.get(key)
            if await self.journal.rename(key, target):
                continue
            if key in hidden and key not in pending:
                continue
            if entry is not None and key.rpartition("/")[2] == ATTRS_NAME:
                await self.encstore.store.delete([key])  # names the old folder: useless there
                continue
            if entry is not None and (entry.plain_size is None or key.endswith("/")
                                      or _internal(key)):
                await self.encstore.store.copy(key, target)  # markers, foreign objects
                await self.encstore.store.delete([key])
                continue
            try:
                info = await self.encstore.rename(key, target)
            except NoSuchObjectError:
                if entry is not None:  # listed, so it vanished meanwhile: another client
                    log.info("folder rename: %s disappeared meanwhile", key)
                continue
            meta = self._meta.get((key, entry.etag)) if entry is not None else None
            if meta is not None:  # the record of the new folder learns it
                self._remember(target, info.etag, meta)
                self._note_attrs(target, FileAttrs(info.etag, info.size, *meta))
        if prefix not in entries:
            await self.encstore.store.put(_marker(new), b"")
        self.listings.invalidate_below(old)
        self.listings.invalidate_below(new)
        for node in self.inodes.below(old):
            state = node.state
            if isinstance(state, FileState):
                state.base_etag = None  # its base moved; the next commit makes a new object

    # -- attributes -----------------------------------------------------------------------------

    @_handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.is_dir or not (fields.update_size or fields.update_mode or fields.update_mtime):
            # Folders keep no times or modes of their own; ownership is the mount's.
            return self._entry(node, await self._node_attrs(node))
        self._check_writable()
        attrs = await self._node_attrs(node)
        if attrs.kind == "foreign":
            raise FUSEError(errno.EPERM)
        mtime_ns = attr.st_mtime_ns if fields.update_mtime else None
        mode = attr.st_mode & 0o7777 if fields.update_mode else None
        state = self._open_file(node.path) if not node.detached else self._state(node)
        if fields.update_size:
            temporary = state is None or state.staged is None
            if state is None or state.staged is None:
                state = await self._stage(node, attrs)
                self.inodes.opened(node)
            try:
                assert state.staged is not None
                await state.staged.truncate(attr.st_size)
                state.dirty = True
                state.mtime_ns = _now_ns() if mtime_ns is None else mtime_ns
                if mode is not None:
                    state.mode = mode
                if temporary:
                    await self._commit(node)
            finally:
                if temporary:
                    await self._unstage(state)
                    self.inodes.closed(node)
        elif state is not None and state.staged is not None:
            if mtime_ns is not None:
                state.mtime_ns = mtime_ns
            if mode is not None:
                state.mode = mode
            if not state.dirty and not node.detached:
                await self._set_stored_attrs(node.path, attrs, mtime_ns, mode)
        else:
            await self._set_stored_attrs(node.path, attrs, mtime_ns, mode)
        return self._entry(node, await self._node_attrs(node))

    async def _set_stored_attrs(self, path: str, attrs: Attrs, mtime_ns: int | None,
                                mode: int | None) -> None:
        """mtime/mode of a closed file: the journal's pending version, else the stored header."""
        if await self.journal.set_attrs(path, mtime_ns=mtime_ns, mode=mode):
            return
        info = await self.encstore.set_attrs(path, mtime_ns=mtime_ns, mode=mode)
        new = replace(attrs, exact=True, etag=info.etag, cipher_size=info.size)
        if mtime_ns is not None:
            new.mtime_ns = mtime_ns
        if mode is not None:
            new.mode = mode
        self._remember(path, info.etag, (new.mtime_ns, new.mode))
        self._note_attrs(path, FileAttrs(info.etag, info.size, new.mtime_ns, new.mode))
        self._note(path, new)
        state = self._open_file(path)
        if state is not None:
            state.base_etag = info.etag  # the open file's next commit replaces this version

    # -- extended attributes (read-only) --------------------------------------------------------

    async def _own_xattrs(self, path: str) -> dict[bytes, bytes]:
        """Extended attributes of a file written here and not uploaded yet: we write it, for
        the recipients its folder's policy gives (what its envelope is sealed for)."""
        own = self.encstore.identity.recipient
        ids = [own.key_id, *(r.key_id for r in await self.encstore.recipients_of(path))]
        writer = self.name_writer(own.ed25519) if self.name_writer and own.ed25519 else None
        return {
            XATTR_WRITER: (writer or own.fingerprint).encode(),
            XATTR_RECIPIENTS: ",".join(dict.fromkeys(i.hex() for i in ids)).encode(),
            XATTR_SIGNATURE: b"valid",
        }

    async def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        if node.is_dir or node.detached:
            return {}
        if self._local(node.path) is not None:
            return await self._own_xattrs(node.path)
        attrs = await self._attrs(node.path, exact=False)
        if attrs is None or attrs.kind != "file" or attrs.etag is None:
            return {}
        try:
            info = await self.encstore.header(node.path, attrs.etag)
        except FormatError:
            return {}
        writer = self.name_writer(info.writer) if self.name_writer else info.writer_fingerprint
        signature: str = info.signature
        if signature == "valid" and self.is_trusted is not None and not self.is_trusted(
                info.writer):
            signature = "unknown writer"  # it verifies, but the writer is not you or a contact
        return {
            XATTR_WRITER: writer.encode(),
            XATTR_RECIPIENTS: ",".join(i.hex() for i in info.key_ids).encode(),
            XATTR_SIGNATURE: signature.encode(),
        }

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if name not in XATTRS:
            raise FUSEError(pyfuse3.ENOATTR)
        value = (await self._xattrs(node)).get(name)
        if value is None:
            raise FUSEError(pyfuse3.ENOATTR)
        return value

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return list(await self._xattrs(self._node(inode)))

    @_handler
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        raise FUSEError(errno.ENOTSUP)

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise FUSEError(errno.ENOTSUP)

    # -- shutdown -------------------------------------------------------------------------------

    async def commit_all(self) -> None:
        """Commit every dirty open file (the mount is going away with files still open)."""
        for node in self.inodes:
            state = node.state
            if isinstance(state, FileState) and state.dirty and not node.detached:
                await self._commit(node)

    def open_handles(self) -> int:
        return sum(isinstance(h, FileHandle) for h in self._handles.values())


@contextlib.asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield


__all__ = ["ROOT_INODE", "Attrs", "Operations"]
