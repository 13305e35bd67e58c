"""fs: the pyfuse3 Operations of a cssfs mount -- POSIX calls in, store/journal calls out.

What it knows: pyfuse3's request handlers, paths and inodes (inodes.py), folder listings
(dircache.py), and the contracts of the layers below: EncryptedStore for listing, reading,
renaming and deleting objects; StagedFile for an open file's written contents; Journal for
closed files on their way to the store. What it must not know: crypto, boto3, S3 (no object
bytes are built or parsed here). Every handler translates its arguments, delegates, and maps
errors to an errno; nothing else.

How the namespace maps onto objects (docs/MOUNT.md has the user's version):

* A file ``a/b`` is the envelope object ``a/b``. A folder is a key prefix ``a/``; an empty
  folder made by ``mkdir`` is kept by a zero-length marker object ``a/.cssfs-dir`` (never shown;
  a key ending in ``/``, as other S3 tools make, is read as a folder marker too).
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

import errno
import functools
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Concatenate, Literal, ParamSpec, Protocol, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from cssfs.dircache import DirCache
from cssfs.encstore import EncryptedStore, Entry, HeaderInfo
from cssfs.errors import (
    AccessDeniedError,
    CssfsError,
    FormatError,
    HeaderAuthError,
    NoIdentityMatchError,
    NoSuchBucketError,
    NoSuchObjectError,
    PayloadError,
    PreconditionFailedError,
    SignatureError,
    StoreError,
)
from cssfs.inodes import ROOT_INODE, InodeTable, Node, join, split

log = logging.getLogger(__name__)

DIR_MARKER = ".cssfs-dir"
FILE_MODE = 0o644
DIR_MODE = 0o755
FOREIGN_MODE = 0o400
NAME_MAX = 255
BLOCK_SIZE = 128 * 1024  # st_blksize: what cp and friends use as their buffer size
HEADER_PREFETCH = 16  # header GETs in flight for one readdir prefetch
XATTR_WRITER = b"user.cssfs.writer"
XATTR_RECIPIENTS = b"user.cssfs.recipients"
XATTR_SIGNATURE = b"user.cssfs.signature"
XATTRS = (XATTR_WRITER, XATTR_RECIPIENTS, XATTR_SIGNATURE)
STRICT_ENV = "CSSFS_STRICT"

Kind = Literal["file", "dir", "foreign"]


# -- the layers below, as fs.py uses them -------------------------------------------------------


class Reader(Protocol):
    """Something an open file reads from: an EncryptedFile, or a journal entry not yet uploaded."""

    @property
    def size(self) -> int: ...

    async def read(self, offset: int, size: int) -> bytes: ...


class Staged(Protocol):
    """An open file's contents (staging.StagedFile)."""

    @property
    def size(self) -> int: ...

    async def read(self, offset: int, size: int) -> bytes: ...

    async def write(self, offset: int, data: bytes) -> int: ...

    async def truncate(self, size: int) -> None: ...

    async def aclose(self) -> None: ...


class PendingInfo(Protocol):
    """What the journal says about a closed file it has not uploaded yet."""

    @property
    def size(self) -> int: ...

    @property
    def mtime_ns(self) -> int: ...

    @property
    def mode(self) -> int: ...


class JournalLike(Protocol):
    """The journal.Journal methods the file system calls."""

    def pending(self, key: str) -> PendingInfo | None: ...

    def pending_under(self, prefix: str) -> dict[str, PendingInfo]: ...

    async def open(self, key: str) -> Reader: ...

    async def commit(
        self, key: str, staged: Any, *, mtime_ns: int, mode: int, base_etag: str | None
    ) -> None: ...

    async def rename(self, src: str, dst: str) -> bool: ...

    async def unlink(self, key: str) -> bool: ...

    async def set_attrs(
        self, key: str, *, mtime_ns: int | None = None, mode: int | None = None
    ) -> bool: ...

    async def flush(self, key: str | None = None) -> None: ...


StageFactory = Callable[[Reader | None], Awaitable[Staged]]


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
    """A file open here: its staged contents and the attributes its next commit carries."""

    staged: Staged | None = None
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


def _valid_name(name: str) -> bool:
    return (
        bool(name)
        and "/" not in name
        and name not in (".", "..")
        and len(os.fsencode(name)) <= NAME_MAX
    )


class Operations(pyfuse3.Operations):
    """The request handlers of one mount. See the module docstring for the mapping."""

    supports_dot_lookup = True
    enable_writeback_cache = False  # the kernel's page cache would reorder our staging
    enable_acl = False

    def __init__(
        self,
        encstore: EncryptedStore,
        journal: JournalLike,
        new_staged: StageFactory,
        *,
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
        # (key, etag) -> header facts, so a re-LIST within the session shows exact mtimes.
        self._headers: OrderedDict[tuple[str, str], HeaderInfo | None] = OrderedDict()
        self._header_flights: dict[tuple[str, str], trio.Event] = {}
        self._header_limiter = trio.CapacityLimiter(HEADER_PREFETCH)
        self._refused: set[str] = set()  # keys we logged "not shared with you" for

    # -- errors ---------------------------------------------------------------------------------

    def _fuse_error(self, op: str, exc: Exception) -> FUSEError:
        if isinstance(exc, NoSuchObjectError):
            log.debug("%s: %s", op, exc)
            return FUSEError(errno.ENOENT)
        if isinstance(exc, NoIdentityMatchError):
            return FUSEError(errno.EACCES)
        if isinstance(exc, (FormatError, HeaderAuthError, SignatureError, PayloadError)):
            log.debug("%s: %s", op, exc)  # encstore logged the object once
            return FUSEError(errno.EIO)
        if isinstance(exc, (AccessDeniedError, NoSuchBucketError)):
            log.error("%s: %s", op, exc)
            return FUSEError(errno.EACCES)
        if isinstance(exc, (StoreError, PreconditionFailedError)):
            log.error("%s: %s", op, exc)
            return FUSEError(errno.EIO)
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

    def _entry(self, node: Node, attrs: Attrs) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = node.inode
        entry.generation = 0
        timeout = self.attr_timeout if attrs.exact else 0
        entry.entry_timeout = timeout
        entry.attr_timeout = timeout
        if attrs.is_dir:
            entry.st_mode = stat.S_IFDIR | (attrs.mode & 0o7777)
            entry.st_nlink = 2
        else:
            entry.st_mode = stat.S_IFREG | (attrs.mode & 0o7777)
            entry.st_nlink = 1
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

    def _remember_header(self, key: str, etag: str, info: HeaderInfo | None) -> None:
        self._headers[(key, etag)] = info
        self._headers.move_to_end((key, etag))
        while len(self._headers) > 100_000:
            self._headers.popitem(last=False)

    def _apply_header(self, attrs: Attrs, info: HeaderInfo | None) -> None:
        """Make listed ``attrs`` exact from its header (None: not an envelope after all)."""
        if info is None:
            attrs.kind = "foreign"
            attrs.size = attrs.cipher_size or 0
            attrs.mode = FOREIGN_MODE
        else:
            attrs.mtime_ns = info.mtime_ns
            attrs.mode = info.mode & 0o7777 or FILE_MODE
        attrs.exact = True

    def _from_entry(self, entry: Entry) -> Attrs:
        mtime_ns = int(entry.mtime * 1_000_000_000)
        if entry.plain_size is None:
            return Attrs("foreign", entry.cipher_size, mtime_ns, FOREIGN_MODE, True, entry.etag,
                         entry.cipher_size)
        attrs = Attrs("file", entry.plain_size, mtime_ns, FILE_MODE, False, entry.etag,
                      entry.cipher_size)
        known = (entry.key, entry.etag)
        if known in self._headers:
            self._apply_header(attrs, self._headers[known])
        return attrs

    async def _header(self, key: str, etag: str) -> HeaderInfo | None:
        """The header facts of one stored version (None: not an envelope), single flight."""
        k = (key, etag)
        while k not in self._headers:
            flight = self._header_flights.get(k)
            if flight is not None:
                await flight.wait()
                continue
            flight = self._header_flights[k] = trio.Event()
            try:
                async with self._header_limiter:
                    info: HeaderInfo | None = await self.encstore.header(key, etag)
            except FormatError:
                info = None
            finally:
                del self._header_flights[k]
                flight.set()
            self._remember_header(key, etag, info)
        return self._headers[k]

    async def _make_exact(self, path: str, attrs: Attrs) -> Attrs:
        if attrs.kind == "file" and not attrs.exact and attrs.etag is not None:
            self._apply_header(attrs, await self._header(path, attrs.etag))
        return attrs

    async def _prefetch_headers(self, items: list[tuple[str, str]]) -> None:
        """Fetch headers in the background so later stats are exact (errors: debug only)."""

        async def one(key: str, etag: str) -> None:
            try:
                await self._header(key, etag)
            except CssfsError as exc:
                log.debug("header prefetch %s: %s", key, exc)

        async with trio.open_nursery() as nursery:
            for key, etag in items:
                nursery.start_soon(one, key, etag)

    # -- listings -------------------------------------------------------------------------------

    async def _load(self, path: str) -> dict[str, Attrs]:
        prefix = path + "/" if path else ""
        out: dict[str, Attrs] = {}
        for entry in await self.encstore.list(prefix):
            name = entry.key[len(prefix) :]
            if entry.is_dir:
                name = name.rstrip("/")
                if _valid_name(name):
                    out[name] = self._dir_attrs()
            elif name != DIR_MARKER and _valid_name(name) and name not in out:
                out[name] = self._from_entry(entry)
        return out

    async def _listing(self, path: str) -> dict[str, Attrs]:
        return await self.listings.get(path, lambda: self._load(path))

    def _local(self, path: str) -> Attrs | None:
        """What this mount holds for ``path`` that the store may not show yet."""
        node = self.inodes.at(path)
        if node is not None and isinstance(node.state, FileState):
            state = node.state
            if state.staged is not None:
                return Attrs("file", state.staged.size, state.mtime_ns, state.mode,
                             etag=None)
        pending = self.journal.pending(path)
        if pending is not None:
            return Attrs("file", pending.size, pending.mtime_ns, pending.mode & 0o7777 or FILE_MODE)
        return None

    async def _attrs(self, path: str, *, exact: bool = True) -> Attrs | None:
        """The attributes of ``path``, or None if nothing is there."""
        if path == "":
            return self._dir_attrs()
        local = self._local(path)
        if local is not None:
            return local
        parent, name = split(path)
        if name == DIR_MARKER:
            return None
        attrs = (await self._listing(parent)).get(name)
        if attrs is not None and exact:
            await self._make_exact(path, attrs)
        return attrs

    async def _children(self, path: str) -> dict[str, Attrs]:
        """The folder's names: the listing with local files laid over it."""
        children = dict(await self._listing(path))
        prefix = path + "/" if path else ""
        for key, info in self.journal.pending_under(prefix).items():
            name = key[len(prefix) :]
            if "/" not in name:
                children[name] = Attrs("file", info.size, info.mtime_ns,
                                       info.mode & 0o7777 or FILE_MODE)
        for node in self.inodes.below(path):
            if node.parent_path == path and not node.is_dir:
                local = self._local(node.path)
                if local is not None:
                    children[node.name] = local
        return children

    def _note(self, path: str, attrs: Attrs | None) -> None:
        """Our own change to ``path``: show it in the cached listing at once."""
        parent, name = split(path)
        self.listings.set_entry(parent, name, attrs)

    # -- lookup and attributes ------------------------------------------------------------------

    def _path(self, parent_inode: int, name: bytes) -> str:
        try:
            parent = self.inodes.get(parent_inode)
        except KeyError:
            raise FUSEError(errno.ENOENT) from None
        text = os.fsdecode(name)
        if not _valid_name(text):
            raise FUSEError(errno.ENAMETOOLONG if len(name) > NAME_MAX else errno.EINVAL)
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
        path = self._path(parent_inode, name)
        attrs = await self._attrs(path)
        if attrs is None:
            entry = pyfuse3.EntryAttributes()
            entry.st_ino = 0
            entry.entry_timeout = self.attr_timeout
            return entry
        node = self.inodes.lookup(path, attrs.is_dir)
        return self._entry(node, attrs)

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        attrs = await self._attrs(node.path) if not node.detached else None
        if attrs is None:
            state = node.state
            if isinstance(state, FileState) and state.staged is not None:
                attrs = Attrs("file", state.staged.size, state.mtime_ns, state.mode)
            elif node.is_dir:
                attrs = self._dir_attrs()
            else:
                raise FUSEError(errno.ENOENT)
        return self._entry(node, attrs)

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
                (join(handle.node.path, name), a.etag)
                for name, a in handle.entries
                if a.kind == "file" and not a.exact and a.etag is not None
            ]
            if unknown and self.nursery is not None:
                self.nursery.start_soon(self._prefetch_headers, unknown)
        for index in range(start_id, len(handle.entries)):
            name, attrs = handle.entries[index]
            path = join(handle.node.path, name)
            node = self.inodes.node_for(path, attrs.is_dir)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(node, attrs),
                                         index + 1):
                self.inodes.drop_if_unused(node)
                return
            node.lookups += 1

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
            await self.encstore.store.put(f"{path}/{DIR_MARKER}", b"")
            attrs = self._dir_attrs()
            self._note(path, attrs)
            node = self.inodes.lookup(path, True)
        return self._entry(node, attrs)

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
            self.listings.invalidate(path)  # decide emptiness on a fresh LIST
            if await self._children(path):
                raise FUSEError(errno.ENOTEMPTY)
            await self.encstore.store.delete([f"{path}/{DIR_MARKER}", f"{path}/"])
            self._note(path, None)
            self.inodes.detach(path)

    # -- files: open, read, write, close ----------------------------------------------------------

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

    async def _reader(self, path: str, attrs: Attrs) -> Reader | None:
        """Where the current contents of ``path`` can be read (None: an empty new file)."""
        if attrs.kind == "foreign":
            if path not in self._refused:
                self._refused.add(path)
                log.info("object %s is not a cssfs envelope; not opening it", path)
            raise FUSEError(errno.EACCES)
        if self.journal.pending(path) is not None:
            return await self.journal.open(path)
        if attrs.etag is None:
            return None
        try:
            return await self.encstore.open(path, etag=attrs.etag, cipher_size=attrs.cipher_size)
        except NoIdentityMatchError:
            if path not in self._refused:
                self._refused.add(path)
                log.info("object %s is not encrypted for this identity", path)
            raise

    async def _stage(self, node: Node, attrs: Attrs) -> FileState:
        """Make sure ``node`` has staged contents (copy-on-write over what is there now)."""
        state = self._state(node)
        if state.staged is None:
            base = await self._reader(node.path, attrs)
            if state.staged is None:  # another task may have staged it meanwhile
                state.staged = await self.new_staged(base)
                state.dirty = False
                state.mtime_ns = attrs.mtime_ns
                state.mode = attrs.mode
                state.base_etag = attrs.etag
        return state

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise FUSEError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable:
            self._check_writable()
        state = node.state if isinstance(node.state, FileState) else None
        handle = FileHandle(node, writable)
        if state is None or state.staged is None:
            attrs = await self._attrs(node.path)
            if attrs is None:
                raise FUSEError(errno.ENOENT)
            if writable:
                await self._stage(node, attrs)
            else:
                handle.reader = await self._reader(node.path, attrs)
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
        if os.fsdecode(name) == DIR_MARKER:
            raise FUSEError(errno.EPERM)
        async with self._ns_lock:
            existing = await self._attrs(path, exact=False)
            if existing is not None:
                if existing.is_dir:
                    raise FUSEError(errno.EISDIR)
                if existing.kind == "foreign":
                    raise FUSEError(errno.EEXIST)
            node = self.inodes.lookup(path, False)
            state = self._state(node)
            if state.staged is None:
                state.staged = await self.new_staged(None)
                state.mode = (mode & 0o7777) or FILE_MODE
                state.base_etag = existing.etag if existing is not None else None
            state.dirty = True
            state.mtime_ns = _now_ns()
            state.writers += 1
            self.inodes.opened(node)
            attrs = Attrs("file", state.staged.size, state.mtime_ns, state.mode)
        return pyfuse3.FileInfo(fh=self._add_handle(FileHandle(node, True))), self._entry(
            node, attrs
        )

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
        if not handle.writable:
            raise FUSEError(errno.EBADF)
        state = self._state(handle.node)
        if state.staged is None:
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
            await self.journal.commit(
                node.path, state.staged, mtime_ns=state.mtime_ns, mode=state.mode,
                base_etag=state.base_etag,
            )
            state.dirty = False
            self._note(node.path, Attrs("file", state.staged.size, state.mtime_ns, state.mode))

    @_handler
    async def flush(self, fh: int) -> None:
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
                    await self._commit(node)
                    staged, state.staged = state.staged, None
                    if staged is not None:
                        await staged.aclose()
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
            await self._remove_file(path, attrs)
            self._note(path, None)
            self.inodes.detach(path)

    async def _remove_file(self, path: str, attrs: Attrs) -> None:
        node = self.inodes.at(path)
        if node is not None and isinstance(node.state, FileState):
            node.state.dirty = False  # an unlinked open file is never committed
        await self.journal.unlink(path)
        self.encstore.forget(path)

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
        if os.fsdecode(name_new) == DIR_MARKER:
            raise FUSEError(errno.EPERM)
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
                    self.listings.invalidate(new)
                    if await self._children(new):
                        raise FUSEError(errno.ENOTEMPTY)
                    await self.encstore.store.delete([f"{new}/{DIR_MARKER}", f"{new}/"])
                await self._rename_dir(old, new)
            else:
                if dst is not None and dst.is_dir:
                    raise FUSEError(errno.EISDIR)
                await self._rename_file(old, new, src)
            self._note(old, None)
            self._note(new, replace(src))
            self.inodes.move(old, new)

    async def _rename_file(self, old: str, new: str, src: Attrs) -> None:
        """Move one file's stored and pending versions; an open file's node moves with it."""
        node = self.inodes.at(old)
        state = node.state if node is not None and isinstance(node.state, FileState) else None
        if state is not None:
            async with state.lock:
                await self._move_versions(old, new, src, state)
        else:
            await self._move_versions(old, new, src, None)

    async def _move_versions(
        self, old: str, new: str, src: Attrs, state: FileState | None
    ) -> None:
        await self.journal.unlink(new)  # whatever was pending under new is replaced
        moved = await self.journal.rename(old, new)
        if not moved and src.etag is not None:
            if src.kind == "foreign":
                await self.encstore.store.copy(old, new)
                await self.encstore.store.delete([old])
            else:
                info = await self.encstore.rename(old, new)
                if state is not None and state.base_etag == src.etag:
                    state.base_etag = info.etag
        self.encstore.forget(old)
        self.encstore.forget(new)

    async def _rename_dir(self, old: str, new: str) -> None:
        """Move a folder object by object (not atomic: a failure leaves some moved)."""
        prefix = old + "/"
        entries = await self.encstore.list(prefix, delimiter=None)
        pending = self.journal.pending_under(prefix)
        keys = {e.key: e for e in entries}
        for key in sorted(set(keys) | set(pending)):
            target = new + "/" + key[len(prefix) :]
            entry = keys.get(key)
            if key in pending:
                await self.journal.unlink(target)
                await self.journal.rename(key, target)
            elif entry is not None and (entry.plain_size is None or key.endswith("/" + DIR_MARKER)
                                        or key.endswith("/")):
                await self.encstore.store.copy(key, target)
                await self.encstore.store.delete([key])
            elif entry is not None:
                await self.journal.unlink(target)
                await self.encstore.rename(key, target)
        if not any(k == f"{prefix}{DIR_MARKER}" for k in keys):
            await self.encstore.store.put(f"{new}/{DIR_MARKER}", b"")
        self.listings.invalidate_below(old)
        self.listings.invalidate_below(new)
        for node in self.inodes.below(old):
            state = node.state
            if isinstance(state, FileState) and state.base_etag is not None:
                state.base_etag = None  # its base moved; the next commit writes a new object

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
        changes = fields.update_size or fields.update_mode or fields.update_mtime
        if node.is_dir or not changes:
            # Folders keep no times or modes of their own; ownership is the mount's.
            return await self.getattr(inode, ctx)
        self._check_writable()
        attrs = await self._attrs(node.path) if not node.detached else None
        state = node.state if isinstance(node.state, FileState) else None
        if attrs is None and (state is None or state.staged is None):
            raise FUSEError(errno.ENOENT)
        if attrs is not None and attrs.kind == "foreign":
            raise FUSEError(errno.EPERM)
        mtime_ns = attr.st_mtime_ns if fields.update_mtime else None
        mode = attr.st_mode & 0o7777 if fields.update_mode else None
        if fields.update_size:
            temporary = state is None or state.staged is None
            assert attrs is not None or not temporary
            state = await self._stage(node, attrs) if temporary else state  # type: ignore[arg-type]
            assert state is not None and state.staged is not None
            await state.staged.truncate(attr.st_size)
            state.dirty = True
            state.mtime_ns = _now_ns()
            if temporary:
                self.inodes.opened(node)
                try:
                    if mtime_ns is not None:
                        state.mtime_ns = mtime_ns
                    if mode is not None:
                        state.mode = mode
                    await self._commit(node)
                    staged, state.staged = state.staged, None
                    if staged is not None:
                        await staged.aclose()
                finally:
                    self.inodes.closed(node)
                return await self.getattr(inode, ctx)
        if state is not None and state.staged is not None:
            if mtime_ns is not None:
                state.mtime_ns = mtime_ns
            if mode is not None:
                state.mode = mode
            if state.dirty or node.detached:
                return await self.getattr(inode, ctx)
        if mtime_ns is not None or mode is not None:
            await self.journal.set_attrs(node.path, mtime_ns=mtime_ns, mode=mode)
            self.encstore.forget(node.path)
            if attrs is not None:
                new = replace(attrs)
                if mtime_ns is not None:
                    new.mtime_ns = mtime_ns
                if mode is not None:
                    new.mode = mode
                new.exact = True
                self._note(node.path, new)
        return await self.getattr(inode, ctx)

    # -- extended attributes (read-only) --------------------------------------------------------

    async def _info(self, node: Node) -> HeaderInfo | None:
        attrs = await self._attrs(node.path) if not node.detached else None
        if attrs is None or attrs.kind != "file" or attrs.etag is None:
            return None
        if self._local(node.path) is not None:
            return None
        return await self._header(node.path, attrs.etag)

    def _own_xattrs(self) -> dict[bytes, bytes]:
        """Extended attributes of a file written here and not uploaded yet."""
        own = self.encstore.identity.recipient
        ids = [own.key_id, *(r.key_id for r in self.encstore.recipients)]
        return {
            XATTR_WRITER: own.fingerprint.encode(),
            XATTR_RECIPIENTS: ",".join(dict.fromkeys(i.hex() for i in ids)).encode(),
            XATTR_SIGNATURE: b"valid",
        }

    async def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        if node.is_dir:
            return {}
        if self._local(node.path) is not None:
            return self._own_xattrs()
        info = await self._info(node)
        if info is None:
            return {}
        return {
            XATTR_WRITER: info.writer_fingerprint.encode(),
            XATTR_RECIPIENTS: ",".join(i.hex() for i in info.key_ids).encode(),
            XATTR_SIGNATURE: info.signature.encode(),
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


__all__ = ["ROOT_INODE", "Attrs", "Operations"]
