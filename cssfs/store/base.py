"""store.base: the object-store contract shared by the S3, local-folder and memory stores.

Knows: object keys, byte strings, ETags, sizes, modification times, and the shape of a streamed or
multipart body (:class:`PartSource`). Must not know: crypto, envelopes, FUSE, boto3. The errors
raised through this contract live in :mod:`cssfs.errors` (``NoSuchObjectError``,
``NoSuchBucketError``, ``AccessDeniedError``, ``PreconditionFailedError``,
``StoreUnavailableError``); a misuse of an argument (negative offset, empty key, a head of the
wrong size) is a ``ValueError``.

Key space: every store has a ``prefix`` inside its bucket or folder; keys passed to and returned by
the methods are relative to it, and :meth:`ObjectStore.full_key` gives the key in the bucket.

ETags are opaque strings without quotes. Two infos with the same key and ETag describe the same
bytes; a different ETag means the object may have changed. A put, copy or replace_head returns the
new object's info, so a caller can make its next write conditional on it (``if_match``).

Unfinished uploads (``list_uploads``/``abort_upload``, for ``cssfs fsck``): incomplete S3
multipart uploads, or temp files a folder store left behind. An S3 multipart upload started by a
cssfs store is marked by an empty object ``<store prefix>.cssfs-uploads/<upload_marker_name>``
(S3 does not return an upload's metadata or tags in a listing, so a marker object is the only mark
a later reader can see); an upload without one may be another tool's and is never aborted by
cssfs on its own initiative.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
import hashlib
import inspect
from collections import Counter
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, Self, runtime_checkable

import trio

from cssfs.errors import PreconditionFailedError

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_PART_SIZE",
    "DELETE_BATCH",
    "MAX_PARTS",
    "MIN_PART_SIZE",
    "UPLOAD_MARKERS",
    "Body",
    "Listing",
    "ObjectInfo",
    "ObjectStore",
    "PartReader",
    "PartSource",
    "Piece",
    "StoreBase",
    "StoreStats",
    "UploadInfo",
    "batched",
    "check_key",
    "check_range",
    "make_listing",
    "normalize_prefix",
    "upload_marker_name",
]

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB  # multipart part size, and the single-PUT threshold
MIN_PART_SIZE = 5 * MiB  # S3: every part but the last must be at least this large
MAX_PARTS = 10_000  # S3: part numbers 1..10000
DEFAULT_CONCURRENCY = 4  # parts uploaded at once (and so held in memory) per put
DELETE_BATCH = 1000  # keys per DeleteObjects request
UPLOAD_MARKERS = ".cssfs-uploads/"  # folder (below a store prefix) of multipart upload markers


@dataclass(frozen=True)
class ObjectInfo:
    """One object: key (relative to the store prefix), size in bytes, ETag, mtime (epoch s)."""

    key: str
    size: int
    etag: str
    mtime: float


@dataclass(frozen=True)
class Listing:
    """A LIST result over all pages: objects sorted by key, common prefixes sorted and ending
    in the delimiter (empty without a delimiter)."""

    objects: list[ObjectInfo]
    prefixes: list[str]


@dataclass(frozen=True)
class UploadInfo:
    """An upload that was started and neither completed nor aborted.

    ``key``: the object it was writing (relative to the store prefix; for a folder store's temp
    file, its path ``.cssfs-tmp/NAME``). ``upload_id``: what ``abort_upload`` needs. ``ours``:
    certainly started by a cssfs store (S3: its marker exists; folder: the store's own temp
    folder). ``initiated`` and ``last_activity`` (the newest part or write) are epoch seconds;
    ``size`` is the bytes uploaded so far in ``parts`` parts. An S3 marker whose upload is gone
    (it finished or was aborted, and the marker's delete never came) is listed with
    ``upload_id == ""`` and its own key (``.cssfs-uploads/NAME``); ``abort_upload`` deletes it.
    """

    key: str
    upload_id: str
    initiated: float
    last_activity: float
    size: int
    parts: int
    ours: bool


def upload_marker_name(full_key: str, upload_id: str) -> str:
    """The name, inside a ``.cssfs-uploads/`` folder, of the marker of one multipart upload of
    the bucket key ``full_key``: 32 hex digits of SHA-256 over the key and the upload id."""
    digest = hashlib.sha256(full_key.encode("utf-8") + b"\0" + upload_id.encode("utf-8"))
    return digest.hexdigest()[:32]


@dataclass
class StoreStats:
    """Requests by kind and payload bytes moved, counted per attempt (a retry counts again).

    Kinds shared by every store: ``list`` (one per page), ``head``, ``get``, ``put``, ``copy``,
    ``delete`` (one per batch of up to 1000 keys). S3 adds ``create_multipart``, ``upload_part``,
    ``upload_part_copy``, ``complete_multipart``, ``abort_multipart``, ``list_uploads``,
    ``list_parts`` and ``upload_marker`` (a marker put or a batch of them deleted).
    ``retries`` counts attempts that were repeated after a transient failure.
    """

    requests: Counter[str] = field(default_factory=Counter)
    bytes_sent: int = 0
    bytes_received: int = 0
    retries: int = 0

    def count(self, kind: str, *, sent: int = 0, received: int = 0) -> None:
        self.requests[kind] += 1
        self.bytes_sent += sent
        self.bytes_received += received

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def copy(self) -> StoreStats:
        return StoreStats(
            Counter(self.requests), self.bytes_sent, self.bytes_received, self.retries
        )

    def reset(self) -> None:
        self.requests.clear()
        self.bytes_sent = self.bytes_received = self.retries = 0


HeadFn = Callable[[], bytes | Awaitable[bytes]]
#: One piece of a streamed body: any contiguous bytes-like object.
Piece = bytes | bytearray | memoryview


@dataclass(frozen=True)
class PartSource:
    """An object body whose first ``head_size`` bytes are known only after the rest is produced.

    ``rest`` yields the bytes that follow the head, in pieces of any size (sync or async
    iterable). Once it is exhausted the store calls ``head()`` (sync or async) exactly once; it
    must return exactly ``head_size`` bytes. The stored object is ``head() + b"".join(rest)``.

    A piece may be a bytearray or memoryview that the producer refills: every store is done
    with a piece (has copied or written it) before it asks for the next one, and keeps no
    reference to it afterwards, so a producer may reuse one buffer for all its pieces.

    On S3 a body larger than the part size becomes a multipart upload whose part 1 (the head and
    the first bytes of ``rest``) is uploaded last; the other parts go up while ``rest`` is still
    being produced, with at most ``concurrency`` of them in memory at once, plus part 1.
    ``head_size`` must be smaller than the store's minimum part size (5 MiB on S3).
    """

    head_size: int
    rest: AsyncIterable[Piece] | Iterable[Piece]
    head: HeadFn

    def __post_init__(self) -> None:
        if self.head_size < 0:
            raise ValueError("PartSource.head_size must be >= 0")

    async def pieces(self) -> AsyncGenerator[Piece, None]:
        """The pieces of ``rest``, whichever kind of iterable it is; an async generator given
        as ``rest`` is closed when this one is (the store stopped early, e.g. on an error)."""
        if isinstance(self.rest, AsyncIterable):
            iterator = aiter(self.rest)
            try:
                async for piece in iterator:
                    yield piece
            finally:
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
        else:
            for piece in self.rest:
                yield piece
                await trio.lowlevel.checkpoint()

    async def read_head(self) -> bytes:
        """Call ``head`` (awaiting it if it is async) and check its length."""
        result = self.head()
        data = await result if inspect.isawaitable(result) else result
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("PartSource.head() must return bytes")
        data = bytes(data)
        if len(data) != self.head_size:
            raise ValueError(
                f"PartSource.head() returned {len(data)} bytes, head_size is {self.head_size}"
            )
        return data


Body = bytes | bytearray | memoryview | BinaryIO | PartSource


@runtime_checkable
class ObjectStore(Protocol):
    """An object store: all methods are trio-async and never block the event loop."""

    url: str  # where the store points, for messages: s3://bucket/prefix/, file:///path, memory://
    prefix: str  # the key prefix inside the bucket ("" or ending in "/")
    part_size: int  # multipart part size; bodies larger than it are uploaded in parts
    stats: StoreStats

    def full_key(self, key: str) -> str:
        """The key inside the bucket (prefix + key)."""
        ...

    async def list(self, prefix: str = "", delimiter: str | None = None) -> Listing:
        """Every object under ``prefix`` (all pages); with a delimiter, common prefixes too."""
        ...

    async def head(self, key: str) -> ObjectInfo:
        """The object's info; ``NoSuchObjectError`` if it does not exist."""
        ...

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of the object, clamped to its size like a slice."""
        ...

    async def get_into(self, key: str, start: int, buf: memoryview) -> int:
        """Bytes ``[start, start + len(buf))`` of the object into ``buf`` (a writable byte
        view); the count, fewer only where the object ends. Like ``get``, into a buffer the
        caller reuses (no allocation per read on S3)."""
        ...

    async def put(
        self,
        key: str,
        body: Body,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> ObjectInfo:
        """Store ``body`` under ``key``, atomically: readers see the old or the new object.

        ``if_none_match=True``: only if no object exists (``PreconditionFailedError`` otherwise).
        ``if_match=etag``: only if the current object has that ETag (``PreconditionFailedError``
        otherwise, ``NoSuchObjectError`` if there is none). A file object is read in
        ``part_size`` pieces from a worker thread; it is not closed.
        """
        ...

    async def copy(self, src: str, dst: str) -> ObjectInfo:
        """Server-side copy of ``src`` to ``dst`` (overwriting it); the info of ``dst``."""
        ...

    async def replace_head(
        self, key: str, new_head: bytes, old_head_len: int, *, if_match: str | None = None
    ) -> ObjectInfo:
        """Replace the first ``old_head_len`` bytes of the object by ``new_head``.

        The result is ``new_head + old[old_head_len:]``, written conditionally on the version
        that was read (``if_match``, or the current ETag when None): a concurrent change raises
        ``PreconditionFailedError`` and leaves the object as the other writer left it. On S3 a
        large object is rewritten with a multipart upload whose part 1 is ``new_head`` plus
        bytes fetched up to the 5 MiB minimum and whose other parts are server-side copies.
        """
        ...

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete the objects, in batches of 1000; keys that do not exist are fine."""
        ...

    async def list_uploads(self, prefix: str = "") -> builtins.list[UploadInfo]:
        """Unfinished uploads of keys under ``prefix`` (see the module docstring), by key."""
        ...

    async def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort one upload ``list_uploads`` returned and free what it holds (its marker too);
        one that is already gone is fine."""
        ...

    async def aclose(self) -> None:
        """Release connections and threads; the store must not be used afterwards."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None:
        """``aclose()``."""
        ...


# -- helpers for the implementations ---------------------------------------------------------


def normalize_prefix(prefix: str) -> str:
    """``"a/b"`` and ``"/a/b/"`` -> ``"a/b/"``; empty stays empty."""
    prefix = prefix.strip("/")
    return prefix + "/" if prefix else ""


def check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"object keys are non-empty strings, got {key!r}")


def check_range(start: int, end: int | None) -> None:
    if start < 0 or (end is not None and end < 0):
        raise ValueError(f"byte range [{start}, {end}) must not be negative")


def batched(keys: Sequence[str], size: int = DELETE_BATCH) -> Iterable[list[str]]:
    """Distinct keys in their first order, ``size`` at a time."""
    unique = list(dict.fromkeys(keys))
    for i in range(0, len(unique), size):
        yield unique[i : i + size]


class PartReader:
    """Regroups an async stream of pieces of any size into reads of an exact size.

    It never keeps a piece past the request for the next one (the PartSource contract): what
    is left of a piece is copied out before the stream is asked for more.
    """

    def __init__(self, pieces: AsyncIterator[Piece]) -> None:
        self._pieces = pieces
        self._left: memoryview | None = None  # the unread rest of the current piece
        self._eof = False

    async def readinto(self, out: memoryview) -> int:
        """Fill ``out`` (a writable byte view); the count, below ``len(out)`` only at the end."""
        filled = 0
        while filled < len(out):
            left = self._left
            if left is None:
                if self._eof:
                    break
                try:
                    piece = await self._pieces.__anext__()
                except StopAsyncIteration:
                    self._eof = True
                    break
                self._left = memoryview(piece).cast("B")
                continue
            n = min(len(left), len(out) - filled)
            out[filled : filled + n] = left[:n]
            filled += n
            if n == len(left):
                self._left = None
                left.release()  # the producer may refill (or resize) its buffer now
            else:
                self._left = left[n:]
                left.release()
        return filled

    async def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer only at the end of the stream."""
        buf = bytearray(n)
        with memoryview(buf) as view:
            got = await self.readinto(view)
        del buf[got:]
        return bytes(buf)


async def file_pieces(f: BinaryIO, piece_size: int) -> AsyncGenerator[bytes, None]:
    """Read a (blocking) file object in worker threads, ``piece_size`` at a time."""
    while True:
        piece = await trio.to_thread.run_sync(f.read, piece_size)
        if not piece:
            return
        yield bytes(piece)


async def bytes_pieces(
    data: bytes | bytearray | memoryview, piece_size: int
) -> AsyncGenerator[bytes, None]:
    view = memoryview(data)
    for i in range(0, len(view), piece_size):
        yield bytes(view[i : i + piece_size])
        await trio.lowlevel.checkpoint()


def as_part_source(body: Body, piece_size: int) -> PartSource:
    """Any body as a PartSource (a plain body has an empty head)."""
    if isinstance(body, PartSource):
        return body
    if isinstance(body, bytes | bytearray | memoryview):
        return PartSource(0, bytes_pieces(body, piece_size), lambda: b"")
    if hasattr(body, "read"):
        return PartSource(0, file_pieces(body, piece_size), lambda: b"")
    raise TypeError(f"cannot store a body of type {type(body).__name__}")


async def read_all(body: Body, piece_size: int) -> bytes:
    """The whole body in memory (the memory store, small objects)."""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    source = as_part_source(body, piece_size)
    rest = bytearray()
    async with contextlib.aclosing(source.pieces()) as pieces:
        async for piece in pieces:
            rest += piece
    return await source.read_head() + bytes(rest)


class StoreBase(abc.ABC):
    """What the three stores share: the prefix, ``full_key``, stats, ``async with``, and a
    generic ``replace_head`` (read, splice, conditional put) for stores without server-side copy."""

    def __init__(self, url: str, prefix: str, part_size: int) -> None:
        if part_size < 1:
            raise ValueError("part_size must be positive")
        self.url = url
        self._where = url if url.endswith("/") else url + "/"
        self.prefix = normalize_prefix(prefix)
        self.part_size = part_size
        self.stats = StoreStats()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def full_key(self, key: str) -> str:
        check_key(key)
        return self.prefix + key

    def where(self, key: str) -> str:
        """The object as a URL, for messages: ``s3://bucket/prefix/key``."""
        return self._where + key

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:  # noqa: B027 - nothing to release by default
        pass

    @abc.abstractmethod
    async def list(self, prefix: str = "", delimiter: str | None = None) -> Listing: ...

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo: ...

    @abc.abstractmethod
    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes: ...

    async def get_into(self, key: str, start: int, buf: memoryview) -> int:
        data = await self.get(key, start, start + len(buf))
        buf[: len(data)] = data
        return len(data)

    @abc.abstractmethod
    async def put(
        self, key: str, body: Body, *, if_match: str | None = None, if_none_match: bool = False
    ) -> ObjectInfo: ...

    @abc.abstractmethod
    async def copy(self, src: str, dst: str) -> ObjectInfo: ...

    @abc.abstractmethod
    async def delete(self, keys: Sequence[str]) -> None: ...

    async def list_uploads(self, prefix: str = "") -> builtins.list[UploadInfo]:
        """No store but S3 and the folder store can leave unfinished uploads behind."""
        await trio.lowlevel.checkpoint()
        return []

    async def abort_upload(self, key: str, upload_id: str) -> None:
        await trio.lowlevel.checkpoint()

    async def replace_head(
        self, key: str, new_head: bytes, old_head_len: int, *, if_match: str | None = None
    ) -> ObjectInfo:
        info = await self.head(key)
        expected = check_replace_head(info, old_head_len, if_match, self.where(key))
        rest = await self.get(key, old_head_len)
        # If the object changed between head and get, the conditional put refuses the splice.
        return await self.put(key, bytes(new_head) + rest, if_match=expected)


def check_replace_head(
    info: ObjectInfo, old_head_len: int, if_match: str | None, where: str
) -> str:
    """The ETag a replace_head must be conditional on, after checking its arguments."""
    if if_match is not None and if_match.strip('"') != info.etag:
        raise PreconditionFailedError(f"{where}: precondition failed, the object has changed")
    if not 0 <= old_head_len <= info.size:
        raise ValueError(f"old_head_len {old_head_len} is outside {where} ({info.size} bytes)")
    return info.etag


def make_listing(infos: Iterable[ObjectInfo], prefix: str, delimiter: str | None) -> Listing:
    """Group objects whose keys start with ``prefix`` the way S3 does for a delimiter."""
    objects: list[ObjectInfo] = []
    prefixes: set[str] = set()
    for info in infos:
        if not info.key.startswith(prefix):
            continue
        if delimiter:
            cut = info.key.find(delimiter, len(prefix))
            if cut >= 0:
                prefixes.add(info.key[: cut + len(delimiter)])
                continue
        objects.append(info)
    objects.sort(key=lambda i: i.key)
    return Listing(objects, sorted(prefixes))
