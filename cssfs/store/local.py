"""store.local: a folder used as an object store (the embedded default, ``file:///path``).

Knows: POSIX files, directories, rename, fsync and flock. Must not know: crypto, boto3, FUSE.

Layout. The key ``a/b/c`` is the file ``ROOT/a/b/c``; directories are implied: created by a put,
removed by the delete that empties them. A key ending in ``/`` (an S3 "directory marker") is the
file ``ROOT/<key>/.cssfs-dirobj``. The store's own files live in ``ROOT/.cssfs-tmp/`` (temp files
and the lock file) and never appear in listings. Only regular files are objects: symlinks and
other special files are ignored. A key that cannot be a path is refused with ``StoreError``:
empty, ``.`` or ``..`` components, NUL, a component longer than 255 bytes, the reserved names
(``.cssfs-dirobj`` anywhere, ``.cssfs-tmp`` at the top), or a key below another object (S3 allows
both ``a`` and ``a/b``; a folder cannot).

Writes are atomic: the body goes to a temp file in ``.cssfs-tmp/``, is fsynced, and is renamed
over the target; then the directory is fsynced. The check of a conditional put, the rename, the
creation of parent directories and the pruning of emptied ones all happen under the store lock:
a ``threading.Lock`` (other tasks and stores in this process) plus ``fcntl.flock`` on
``.cssfs-tmp/lock`` (other processes), so conditional puts are atomic against any writer that uses
this class. Temp files older than a day (left by a crash) are removed at the first write;
``list_uploads`` shows the temp files there (keys ``.cssfs-tmp/NAME``) and ``abort_upload`` removes
one, for ``cssfs fsck``.

ETag: the first 32 hex digits of BLAKE2b over the file's (st_dev, st_ino, st_size, st_mtime_ns,
st_ctime_ns), taken after the rename. It costs one ``stat`` (LIST stays cheap), it is stable while
the file is untouched, and every put, copy or replace makes a new file (a new inode and ctime), so
a new version always gets a new ETag, even with identical content. Touching a file from outside
(chmod, touch, editing in place) changes its ETag, which makes cssfs treat it as changed: the safe
direction. Blocking file I/O runs in worker threads.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import trio

from cssfs.errors import (
    AccessDeniedError,
    NoSuchBucketError,
    NoSuchObjectError,
    PreconditionFailedError,
    StoreError,
)
from cssfs.store.base import (
    DEFAULT_PART_SIZE,
    Body,
    Listing,
    ObjectInfo,
    PartReader,
    StoreBase,
    UploadInfo,
    as_part_source,
    batched,
    check_key,
    check_range,
    check_replace_head,
    make_listing,
)

__all__ = ["DIR_OBJECT", "TMP_DIR", "LocalStore", "local_etag"]

log = logging.getLogger(__name__)

T = TypeVar("T")

TMP_DIR = ".cssfs-tmp"  # at the root: temp files and the lock file
DIR_OBJECT = ".cssfs-dirobj"  # in a directory D: the object whose key is "D/"
_LOCK_FILE = "lock"
_STALE_TEMP_SECONDS = 24 * 3600
_WRITE_PIECE = 1024 * 1024  # bytes per write() when streaming a body to the temp file
_NAME_MAX = 255


def local_etag(st: os.stat_result) -> str:
    """The ETag of a file from its stat (see the module docstring)."""
    packed = struct.pack("<QQQqq", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return hashlib.blake2b(packed, digest_size=16).hexdigest()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    while n > 0:
        chunk = os.pread(fd, n, offset)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, count: int) -> None:
    """Copy ``count`` bytes between files, in the kernel where it can (copy_file_range)."""
    try:
        while count > 0:
            n = os.copy_file_range(src_fd, dst_fd, count, src_off, dst_off)
            if n == 0:
                raise StoreError("source file ended early during a copy")
            src_off += n
            dst_off += n
            count -= n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while count > 0:
        chunk = os.pread(src_fd, min(count, _WRITE_PIECE), src_off)
        if not chunk:
            raise StoreError("source file ended early during a copy")
        _pwrite_all(dst_fd, chunk, dst_off)
        src_off += len(chunk)
        dst_off += len(chunk)
        count -= len(chunk)


class LocalStore(StoreBase):
    """An ObjectStore over the folder ``root``, which must exist (else ``NoSuchBucketError``)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        part_size: int = DEFAULT_PART_SIZE,
        fsync: bool = True,
        threads: int = 8,
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        super().__init__(Path(self.root).as_uri(), "", part_size)
        self._fsync = fsync
        self._tmp_dir = os.path.join(self.root, TMP_DIR)
        self._limiter = trio.CapacityLimiter(threads)
        self._mutex = threading.Lock()
        self._lock_fd: int | None = None
        self._tmp_ready = False

    # -- plumbing ----------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _refuse(self, key: str, why: str) -> StoreError:
        return StoreError(f"{self.where(key)}: this key cannot be stored in a folder ({why})")

    def _path(self, key: str) -> str:
        """The file holding ``key``; ``StoreError`` if no file can."""
        check_key(key)
        marker = key.endswith("/")
        parts = (key[:-1] if marker else key).split("/")
        for part in parts:
            if part in ("", ".", ".."):
                raise self._refuse(key, "empty, '.' or '..' path component")
            if "\0" in part:
                raise self._refuse(key, "NUL character")
            if len(os.fsencode(part)) > _NAME_MAX:
                raise self._refuse(key, f"a path component is longer than {_NAME_MAX} bytes")
            if part == DIR_OBJECT:
                raise self._refuse(key, f"{DIR_OBJECT} is reserved")
        if parts[0] == TMP_DIR:
            raise self._refuse(key, f"{TMP_DIR} is reserved")
        if marker:
            parts.append(DIR_OBJECT)
        return os.path.join(self.root, *parts)

    def _check_root(self) -> None:
        if not os.path.isdir(self.root):
            raise NoSuchBucketError(f"{self.url}: the store folder does not exist")

    def _error(self, exc: OSError, op: str, key: str) -> Exception:
        """An OSError from reading ``key`` as a store error."""
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP):
            self._check_root()
            return NoSuchObjectError(f"{self.where(key)}: no such object")
        return self._os_error(exc, op, key)

    def _os_error(self, exc: OSError, op: str, key: str) -> Exception:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return AccessDeniedError(f"{op} {self.where(key)}: {exc.strerror}")
        return StoreError(f"{op} {self.where(key)}: {exc.strerror or exc}")

    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(key, st.st_size, local_etag(st), st.st_mtime_ns / 1e9)

    def _stat_object(self, path: str) -> os.stat_result | None:
        """The stat of the object file at ``path``, or None if there is none."""
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st if stat.S_ISREG(st.st_mode) else None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The store lock: this process's threads, then other processes (flock)."""
        with self._mutex:
            if self._lock_fd is None:
                self._ensure_tmp_dir()
                self._lock_fd = os.open(
                    os.path.join(self._tmp_dir, _LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                )
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _ensure_tmp_dir(self) -> None:
        if self._tmp_ready:
            return
        self._check_root()
        with contextlib.suppress(FileExistsError):
            os.mkdir(self._tmp_dir)
        now = time.time()
        with os.scandir(self._tmp_dir) as entries:
            for entry in entries:
                if entry.name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        if now - entry.stat().st_mtime > _STALE_TEMP_SECONDS:
                            os.unlink(entry.path)
                            log.info("removed stale temp file %s", entry.path)
        self._tmp_ready = True

    def _new_temp(self) -> tuple[int, str]:
        self._ensure_tmp_dir()
        path = os.path.join(self._tmp_dir, secrets.token_hex(8) + ".tmp")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        return fd, path

    def _fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _makedirs(self, key: str, directory: str) -> builtins.list[str]:
        """Create the missing directories down to ``directory``; the ones created."""
        created: builtins.list[str] = []
        rel = os.path.relpath(directory, self.root)
        current = self.root
        for part in [] if rel == "." else rel.split(os.sep):
            current = os.path.join(current, part)
            try:
                os.mkdir(current)
                created.append(current)
            except FileExistsError:
                if not os.path.isdir(current) or os.path.islink(current):
                    key_above = os.path.relpath(current, self.root).replace(os.sep, "/")
                    raise self._refuse(key, f"{key_above!r} is an object") from None
        return created

    def _prune(self, directory: str) -> str:
        """Remove ``directory`` and its parents while empty; the deepest one left."""
        while directory != self.root:
            try:
                os.rmdir(directory)
            except OSError:
                break
            directory = os.path.dirname(directory)
        return directory

    # -- writing -----------------------------------------------------------------------------

    def _commit(
        self,
        temp: str,
        key: str,
        path: str,
        if_match: str | None,
        if_none_match: bool,
    ) -> ObjectInfo:
        """Rename ``temp`` over ``path`` if the preconditions hold (under the store lock)."""
        with self._locked():
            current = self._stat_object(path)
            if if_none_match and current is not None:
                raise PreconditionFailedError(f"{self.where(key)}: precondition failed, it exists")
            if if_match is not None:
                if current is None:
                    raise NoSuchObjectError(f"{self.where(key)}: no such object (If-Match)")
                if local_etag(current) != if_match.strip('"'):
                    raise PreconditionFailedError(
                        f"{self.where(key)}: precondition failed, the object has changed"
                    )
            parent = os.path.dirname(path)
            created = self._makedirs(key, parent)
            try:
                os.replace(temp, path)
            except (IsADirectoryError, NotADirectoryError):
                raise self._refuse(key, "a folder of other objects has this name") from None
            st = os.lstat(path)
            if self._fsync:
                for directory in {parent, *(os.path.dirname(d) for d in created)}:
                    self._fsync_dir(directory)
        return self._info(key, st)

    async def put(
        self, key: str, body: Body, *, if_match: str | None = None, if_none_match: bool = False
    ) -> ObjectInfo:
        path = self._path(key)
        fd, temp = await self._run(self._new_temp)
        try:
            size = await self._fill(fd, body)
            self.stats.count("put", sent=size)
            if self._fsync:
                await self._run(os.fsync, fd)
            await self._run(os.close, fd)
            fd = -1
            return await self._run(self._commit, temp, key, path, if_match, if_none_match)
        except OSError as exc:
            raise self._os_error(exc, "PUT", key) from exc
        finally:
            with trio.CancelScope(shield=True):
                await self._run(self._discard, fd, temp)

    @staticmethod
    def _discard(fd: int, temp: str) -> None:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)

    async def _fill(self, fd: int, body: Body) -> int:
        """Write the body into the temp file; its size."""
        if isinstance(body, bytes | bytearray | memoryview):
            data = bytes(body)
            await self._run(_pwrite_all, fd, data, 0)
            return len(data)
        source = as_part_source(body, self.part_size)
        offset = source.head_size
        async with contextlib.aclosing(source.pieces()) as pieces:
            reader = PartReader(pieces)
            while piece := await reader.read(_WRITE_PIECE):
                await self._run(_pwrite_all, fd, piece, offset)
                offset += len(piece)
        head = await source.read_head()
        await self._run(_pwrite_all, fd, head, 0)
        return offset

    async def copy(self, src: str, dst: str) -> ObjectInfo:
        src_path, dst_path = self._path(src), self._path(dst)
        self.stats.count("copy")
        fd, temp = await self._run(self._new_temp)
        try:
            await self._run(self._copy_file, src, src_path, fd)
            if self._fsync:
                await self._run(os.fsync, fd)
            return await self._run(self._commit, temp, dst, dst_path, None, False)
        except OSError as exc:
            raise self._os_error(exc, "COPY", dst) from exc
        finally:
            with trio.CancelScope(shield=True):
                await self._run(self._discard, fd, temp)

    def _copy_file(self, key: str, path: str, dst_fd: int) -> None:
        try:
            src_fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise self._error(exc, "COPY", key) from exc
        try:
            st = os.fstat(src_fd)
            if not stat.S_ISREG(st.st_mode):
                raise NoSuchObjectError(f"{self.where(key)}: no such object")
            _copy_range(src_fd, dst_fd, 0, 0, st.st_size)
        finally:
            os.close(src_fd)

    async def replace_head(
        self, key: str, new_head: bytes, old_head_len: int, *, if_match: str | None = None
    ) -> ObjectInfo:
        path = self._path(key)
        self.stats.count("head")
        src_fd, info = await self._run(self._open_object, key, path)
        try:
            expected = check_replace_head(info, old_head_len, if_match, self.where(key))
            self.stats.count("put", sent=len(new_head))
            fd, temp = await self._run(self._new_temp)
            try:
                await self._run(_pwrite_all, fd, bytes(new_head), 0)
                # The open descriptor pins the version we checked: files are never changed in
                # place, and the conditional commit fails if the name now holds another one.
                await self._run(
                    _copy_range, src_fd, fd, old_head_len, len(new_head), info.size - old_head_len
                )
                if self._fsync:
                    await self._run(os.fsync, fd)
                return await self._run(self._commit, temp, key, path, expected, False)
            except OSError as exc:
                raise self._os_error(exc, "PUT", key) from exc
            finally:
                with trio.CancelScope(shield=True):
                    await self._run(self._discard, fd, temp)
        finally:
            await self._run(os.close, src_fd)

    def _open_object(self, key: str, path: str) -> tuple[int, ObjectInfo]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise self._error(exc, "GET", key) from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise NoSuchObjectError(f"{self.where(key)}: no such object")
        return fd, self._info(key, st)

    async def delete(self, keys: Sequence[str]) -> None:
        for batch in batched(keys):
            self.stats.count("delete")
            await self._run(self._delete_batch, batch)

    def _delete_batch(self, keys: builtins.list[str]) -> None:
        self._check_root()
        touched: set[str] = set()
        with self._locked():
            for key in keys:
                try:
                    path = self._path(key)
                except StoreError:
                    continue  # no file can hold it, so it does not exist
                try:
                    os.unlink(path)
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    continue
                except OSError as exc:
                    raise self._os_error(exc, "DELETE", key) from exc
                touched.add(self._prune(os.path.dirname(path)))
            if self._fsync:
                for directory in touched:
                    # A later key of the batch may have emptied and pruned it; then its
                    # surviving parent is in ``touched`` too.
                    if os.path.isdir(directory):
                        self._fsync_dir(directory)

    # -- reading -----------------------------------------------------------------------------

    async def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        self.stats.count("head")
        return await self._run(self._head, key, path)

    def _head(self, key: str, path: str) -> ObjectInfo:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise self._error(exc, "HEAD", key) from exc
        if not stat.S_ISREG(st.st_mode):
            raise NoSuchObjectError(f"{self.where(key)}: no such object")
        return self._info(key, st)

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        check_range(start, end)
        path = self._path(key)
        data = await self._run(self._get, key, path, start, end)
        self.stats.count("get", received=len(data))
        return data

    def _get(self, key: str, path: str, start: int, end: int | None) -> bytes:
        fd, info = self._open_object(key, path)
        try:
            stop = info.size if end is None else min(end, info.size)
            return _pread_all(fd, stop - start, start) if stop > start else b""
        except OSError as exc:
            raise self._os_error(exc, "GET", key) from exc
        finally:
            os.close(fd)

    async def list(self, prefix: str = "", delimiter: str | None = None) -> Listing:
        self.stats.count("list")
        return await self._run(self._list, prefix, delimiter)

    def _list(self, prefix: str, delimiter: str | None) -> Listing:
        self._check_root()
        dir_part, _, name_start = prefix.rpartition("/")
        if dir_part:
            try:
                start_dir = os.path.dirname(self._path(dir_part + "/"))
            except StoreError:
                return Listing([], [])  # no file can be below such a prefix
        else:
            start_dir = self.root
        key_base = dir_part + "/" if dir_part else ""
        if delimiter != "/":
            infos = (i for i in self._walk(start_dir, key_base) if i.key.startswith(prefix))
            return make_listing(infos, prefix, delimiter)
        objects: builtins.list[ObjectInfo] = []
        prefixes: builtins.list[str] = []
        for entry in self._scan(start_dir):
            name = entry.name
            if name == DIR_OBJECT:
                if key_base and not name_start and entry.is_file(follow_symlinks=False):
                    objects.append(self._info(key_base, entry.stat(follow_symlinks=False)))
                continue
            if not name.startswith(name_start):
                continue
            if entry.is_dir(follow_symlinks=False):
                if self._has_objects(entry.path):
                    prefixes.append(key_base + name + "/")
            elif entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    objects.append(self._info(key_base + name, entry.stat(follow_symlinks=False)))
        objects.sort(key=lambda i: i.key)
        return Listing(objects, sorted(prefixes))

    def _scan(self, directory: str) -> builtins.list[os.DirEntry[str]]:
        """The entries of ``directory`` (none if it is gone), without the store's own folder."""
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            return []
        if directory == self.root:
            entries = [e for e in entries if e.name != TMP_DIR]
        return entries

    def _walk(self, directory: str, key_base: str) -> Iterator[ObjectInfo]:
        for entry in self._scan(directory):
            try:
                if entry.is_dir(follow_symlinks=False):
                    yield from self._walk(entry.path, key_base + entry.name + "/")
                elif entry.is_file(follow_symlinks=False):
                    if entry.name == DIR_OBJECT:
                        if key_base:
                            yield self._info(key_base, entry.stat(follow_symlinks=False))
                    else:
                        yield self._info(key_base + entry.name, entry.stat(follow_symlinks=False))
            except FileNotFoundError:
                continue  # deleted while we looked

    def _has_objects(self, directory: str) -> bool:
        for entry in self._scan(directory):
            if entry.is_file(follow_symlinks=False):
                return True
            if entry.is_dir(follow_symlinks=False) and self._has_objects(entry.path):
                return True
        return False

    async def list_uploads(self, prefix: str = "") -> builtins.list[UploadInfo]:
        """The temp files in ``.cssfs-tmp/``: puts that crashed, or that are running now (their
        ``last_activity`` is recent). Their keys are ``.cssfs-tmp/NAME``."""
        return await self._run(self._list_uploads, prefix)

    def _list_uploads(self, prefix: str) -> builtins.list[UploadInfo]:
        self._check_root()
        found: builtins.list[UploadInfo] = []
        try:
            with os.scandir(self._tmp_dir) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            return found
        for entry in entries:
            key = f"{TMP_DIR}/{entry.name}"
            if not entry.name.endswith(".tmp") or not key.startswith(prefix):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # its put finished meanwhile
            if stat.S_ISREG(st.st_mode):
                mtime = st.st_mtime_ns / 1e9
                found.append(UploadInfo(key, entry.name, mtime, mtime, st.st_size, 1, True))
        found.sort(key=lambda u: u.key)
        return found

    async def abort_upload(self, key: str, upload_id: str) -> None:
        if (
            key != f"{TMP_DIR}/{upload_id}"
            or not upload_id.endswith(".tmp")
            or "/" in upload_id
            or upload_id.startswith(".")
        ):
            raise ValueError(f"{self.where(key)}: not a temp file of this store")
        self.stats.count("delete")
        path = os.path.join(self._tmp_dir, upload_id)

        def remove() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

        try:
            await self._run(remove)
        except OSError as exc:
            raise self._os_error(exc, "DELETE", key) from exc

    async def aclose(self) -> None:
        await self._run(self._close_lock)

    def _close_lock(self) -> None:
        with self._mutex:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
