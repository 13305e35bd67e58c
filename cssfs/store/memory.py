"""store.memory: a dict-backed ObjectStore with S3's semantics, for fast tests.

Knows: a dict of key -> (bytes, ETag, mtime) per bucket. Must not know: crypto, files, boto3.
The ETag is the MD5 of the content, as S3 gives for a single-part upload (equal content, equal
ETag). Every check-and-set (conditional put) runs without an ``await`` between the check and the
set, so it is atomic with respect to other tasks. Several stores may share one
:class:`MemoryBucket` (two "clients" of the same bucket in one process); ``memory://name`` names a
process-wide shared bucket, ``memory://`` is a fresh one.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from cssfs.errors import NoSuchBucketError, NoSuchObjectError, PreconditionFailedError
from cssfs.store.base import (
    DEFAULT_PART_SIZE,
    Body,
    Listing,
    ObjectInfo,
    StoreBase,
    batched,
    check_key,
    check_range,
    make_listing,
    read_all,
)

__all__ = ["MemoryBucket", "MemoryStore", "named_bucket"]


@dataclass(frozen=True)
class _Object:
    data: bytes
    etag: str
    mtime: float


class MemoryBucket:
    """The objects of one in-memory bucket, keyed by full key."""

    def __init__(self) -> None:
        self.objects: dict[str, _Object] = {}
        self.exists = True

    def drop(self) -> None:
        """Delete the bucket: later operations raise ``NoSuchBucketError`` (for tests)."""
        self.objects.clear()
        self.exists = False


_named: dict[str, MemoryBucket] = {}
_named_lock = threading.Lock()


def named_bucket(name: str) -> MemoryBucket:
    """The process-wide bucket called ``name``, created on first use."""
    with _named_lock:
        return _named.setdefault(name, MemoryBucket())


def _etag(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class MemoryStore(StoreBase):
    """An ObjectStore over a :class:`MemoryBucket` (a fresh one unless given)."""

    def __init__(
        self,
        prefix: str = "",
        *,
        bucket: MemoryBucket | None = None,
        name: str = "",
        part_size: int = DEFAULT_PART_SIZE,
    ) -> None:
        if bucket is None:
            bucket = named_bucket(name) if name else MemoryBucket()
        path = prefix.strip("/")
        super().__init__(f"memory://{name}" + (f"/{path}" if path else ""), prefix, part_size)
        self.bucket = bucket

    def _objects(self) -> dict[str, _Object]:
        if not self.bucket.exists:
            raise NoSuchBucketError(f"{self.url}: the bucket does not exist")
        return self.bucket.objects

    def _info(self, key: str, obj: _Object) -> ObjectInfo:
        return ObjectInfo(key, len(obj.data), obj.etag, obj.mtime)

    def _lookup(self, key: str) -> _Object:
        obj = self._objects().get(self.full_key(key))
        if obj is None:
            raise NoSuchObjectError(f"{self.where(key)}: no such object")
        return obj

    async def list(self, prefix: str = "", delimiter: str | None = None) -> Listing:
        await trio.lowlevel.checkpoint()
        self.stats.count("list")
        n = len(self.prefix)
        infos = (
            self._info(full[n:], obj)
            for full, obj in self._objects().items()
            if full.startswith(self.prefix + prefix)
        )
        return make_listing(infos, prefix, delimiter)

    async def head(self, key: str) -> ObjectInfo:
        await trio.lowlevel.checkpoint()
        self.stats.count("head")
        return self._info(key, self._lookup(key))

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        check_range(start, end)
        await trio.lowlevel.checkpoint()
        data = self._lookup(key).data[start:end]
        self.stats.count("get", received=len(data))
        return data

    async def put(
        self, key: str, body: Body, *, if_match: str | None = None, if_none_match: bool = False
    ) -> ObjectInfo:
        check_key(key)
        data = await read_all(body, self.part_size)
        await trio.lowlevel.checkpoint()
        self.stats.count("put", sent=len(data))
        # No await from here on: the check and the set are atomic.
        objects = self._objects()
        current = objects.get(self.full_key(key))
        if if_none_match and current is not None:
            raise PreconditionFailedError(f"{self.where(key)}: precondition failed, it exists")
        if if_match is not None:
            if current is None:
                raise NoSuchObjectError(f"{self.where(key)}: no such object (If-Match)")
            if current.etag != if_match.strip('"'):
                raise PreconditionFailedError(
                    f"{self.where(key)}: precondition failed, the object has changed"
                )
        obj = _Object(data, _etag(data), time.time())
        objects[self.full_key(key)] = obj
        return self._info(key, obj)

    async def copy(self, src: str, dst: str) -> ObjectInfo:
        check_key(dst)
        await trio.lowlevel.checkpoint()
        self.stats.count("copy")
        source = self._lookup(src)
        obj = _Object(source.data, source.etag, time.time())
        self._objects()[self.full_key(dst)] = obj
        return self._info(dst, obj)

    async def delete(self, keys: Sequence[str]) -> None:
        for batch in batched(keys):
            await trio.lowlevel.checkpoint()
            self.stats.count("delete")
            objects = self._objects()
            for key in batch:
                objects.pop(self.full_key(key), None)
