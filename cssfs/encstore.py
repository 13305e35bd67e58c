"""encstore: EncryptedStore, a plaintext API over a ciphertext ObjectStore (S3QL's comprenc idea).

What it knows: envelopes (cssfs.envelope), our identity and the default recipients, an
ObjectStore, the ChunkCache, trio. What it must not know: FUSE, boto3, the CLI, contacts.

Every object it writes is one envelope bound to its full object key
(``object_binding(store.full_key(key))``), encrypted for our identity plus the recipients and
signed by our identity. Every object it reads is checked before any plaintext leaves: header
(MAC, commitment, signature, binding), object size against the authenticated plaintext size, the
chunk table against the signed table hash, then each chunk against its table entry and GCM tag.

Invariants the ``await`` points must keep (the S3QL ``block_cache`` note):

* ``_in_flight[(key, etag, index)]`` exists exactly while one task (the leader) fetches that
  chunk. Others wait on its event and take the plaintext from the flight (not from the cache:
  the cache may be disabled or may have evicted it). A leader that fails or is cancelled
  leaves ``data=None``; a waiter then fetches the chunk itself. So a chunk costs one GET however
  many readers ask for it at once.
* The ChunkCache and the small LRUs are only touched between awaits, by synchronous code.
* Bulk crypto (more than ``INLINE_CHUNKS`` chunks) runs in worker threads behind ``cpu_limiter``;
  a chunk or two is opened inline (a thread hop costs more than the AES-GCM of 128 KiB). A
  thread that holds a CPU token never waits for the trio loop: reading a source to upload is a
  thread hop of its own, outside the limiter (its ``read`` may need the loop, and a token).
* Read-ahead runs in the nursery given at construction or opened by ``async with`` on the store.
  A read-ahead task never raises: its errors are logged at DEBUG (the foreground read that needs
  the chunk meets the same error and reports it); without a nursery there is no read-ahead.

Errors: NoIdentityMatchError (not shared with us; the mount maps it to EACCES) stays distinct
from the tamper errors (FormatError, HeaderAuthError/BindingError, SignatureError, PayloadError
and subclasses; EIO). A tamper error is logged once at WARNING naming the object key and the
chunk, never plaintext or key bytes.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import io
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import BinaryIO, Generic, Literal, TypeVar

import trio

from cssfs.cache import ChunkCache
from cssfs.envelope import (
    CHUNK_SIZE,
    HEADER_SIZE,
    TAG_SIZE,
    EnvelopeWriter,
    Header,
    OpenedEnvelope,
    check_envelope_size,
    chunk_count,
    chunk_range,
    chunks_for,
    object_binding,
    open_any,
    parse_header,
    plain_size,
    read_full,
    table_range,
    verify_signature,
)
from cssfs.errors import (
    CssfsError,
    FormatError,
    HeaderAuthError,
    NoIdentityMatchError,
    PayloadError,
    SignatureError,
    TruncatedError,
    first_error,
)
from cssfs.keys import Identity, Recipient, writer_fingerprint
from cssfs.store.base import Listing, ObjectInfo, ObjectStore, PartSource

log = logging.getLogger(__name__)

#: Chunks opened inline on the trio loop; more go to a worker thread.
INLINE_CHUNKS = 2
#: Chunks sealed per worker-thread hop when uploading (2 MiB; the buffers are reused).
SEAL_BATCH_CHUNKS = 32
#: Most chunks fetched by one coalesced ranged GET (4 MiB: per request the server and botocore
#: spend milliseconds; 4 MiB GETs read a file cold at 1.5-2x the speed of 1 MiB ones here).
MAX_COALESCE_CHUNKS = 64
#: ``header`` of an object up to this size (one chunk: header, chunk, table) fetches it whole
#: and opens it, in a store with a cache (the mount's ``ls -l``, then ``cp``/``cat``).
TINY_OBJECT_BYTES = HEADER_SIZE + CHUNK_SIZE + TAG_SIZE + 32
#: Opened envelopes kept (the mount: enough for a folder's small files listed by ``ls -l``).
OPEN_CACHE_ENTRIES = 1024
#: Ciphertext buffers of coalesced GETs kept for reuse (MAX_COALESCE_CHUNKS chunks each, ~4 MiB);
#: more are allocated while more GETs run at once, and dropped after.
RUN_BUFFERS_KEPT = 2
#: The mount's ``whole_object_bytes``: objects up to this size are fetched whole by open (one
#: GET instead of header, table and chunks: three round trips for a small file), their chunks
#: decrypted into the cache.
WHOLE_OBJECT_BYTES = 1024 * 1024 + HEADER_SIZE
#: Default sequential read-ahead window (at most a quarter of the cache): two coalesced 4 MiB
#: GETs, topped up one GET at a time (when half the window is left). Its ciphertext buffers
#: and the plaintext waiting in the cache's probation are daemon RSS: 16 MiB (four GETs, with
#: a 32 MiB probation) read 256 MiB cold no faster here (1.18 vs 1.16 s, interleaved runs)
#: and peaked at 133 MiB instead of 94.
DEFAULT_READAHEAD_BYTES = 8 * 1024 * 1024
#: get_to into a regular file: chunks per ranged GET (8 MiB, as boto3's download_file: per
#: request the server and botocore spend milliseconds, and the request count halves against
#: 4 MiB) and GETs in flight, each read into a reused buffer (store.get_into), decrypted and
#: written at its offset by a worker thread through a 1 MiB plaintext buffer. Memory ~
#: PARALLEL x 8 MiB of ciphertext, allocated once.
GET_TO_FILE_SEGMENT_CHUNKS = 128
GET_TO_FILE_PARALLEL = 3
GET_TO_WRITE_CHUNKS = 16
#: get_to into a stream (stdout, a pipe, BytesIO): written in order, so each segment's
#: plaintext waits in a pooled buffer; memory ~ 2 x 4 MiB x (PARALLEL + 1).
GET_TO_SEGMENT_CHUNKS = 64
GET_TO_PARALLEL = 4

PlainSource = bytes | bytearray | memoryview | BinaryIO

K = TypeVar("K")
V = TypeVar("V")


class _Lru(Generic[K, V]):
    """A small count-bounded LRU map (header infos, opened envelopes)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._d: OrderedDict[K, V] = OrderedDict()

    def get(self, k: K) -> V | None:
        v = self._d.get(k)
        if v is not None:
            self._d.move_to_end(k)
        return v

    def put(self, k: K, v: V) -> None:
        if self.max_entries <= 0:
            return
        self._d[k] = v
        self._d.move_to_end(k)
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)

    def drop_where(self, pred: Callable[[K], bool]) -> None:
        for k in [k for k in self._d if pred(k)]:
            del self._d[k]


# -- what callers see -----------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One name in a listing. ``plain_size`` is None for a foreign object (not an envelope by
    its size: never decrypted); folders (common prefixes) have ``is_dir`` and no size."""

    key: str
    plain_size: int | None
    etag: str
    mtime: float
    is_dir: bool = False
    cipher_size: int = 0

    @property
    def foreign(self) -> bool:
        return not self.is_dir and self.plain_size is None


@dataclass(frozen=True)
class HeaderInfo:
    """What one header says about an object, for ``ls -l`` and extended attributes.

    ``readable``: the header opened for our identity (stanza, MAC, signature and binding all
    verified); when not, ``problem`` says why in one line (no secrets). ``signature`` is the
    writer's Ed25519 signature status, checkable by anyone.
    """

    key: str
    etag: str
    plain_size: int
    mtime_ns: int
    mode: int
    writer: bytes
    writer_fingerprint: str
    key_ids: tuple[bytes, ...]
    readable: bool
    signature: Literal["valid", "invalid"]
    problem: str | None = None
    not_for_us: bool = False


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None


@dataclass
class _Segment:
    """get_to: one ranged GET's worth of plaintext, ready when ``done`` is set."""

    done: trio.Event = field(default_factory=trio.Event)
    data: bytearray | None = None  # a pooled buffer holding ``length`` bytes of plaintext
    length: int = 0


class _OpenState:
    """An opened, table-loaded envelope of one object version (shared by its EncryptedFiles)."""

    __slots__ = ("cipher_size", "envelope", "etag", "info", "key")

    def __init__(
        self, key: str, etag: str, cipher_size: int, envelope: OpenedEnvelope, info: HeaderInfo
    ) -> None:
        self.key = key
        self.etag = etag
        self.cipher_size = cipher_size
        self.envelope = envelope
        self.info = info


@asynccontextmanager
async def _nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose failure surfaces as its first real error instead of an ExceptionGroup."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        if group.subgroup((KeyboardInterrupt, SystemExit)) is not None:
            raise
        raise first_error(group) from None


# -- the sealing side (worker threads) --------------------------------------------------------


class _Sealer:
    """Reads plaintext from a source and seals it, a batch of chunks at a time.

    Reading (``read_batch``, blocking I/O) and sealing (``seal_batch``, CPU) are separate steps
    so that they run in separate thread hops: only sealing holds the CPU limiter. A source whose
    ``read`` waits for the trio loop (a journal's pending file reading its base object, say)
    therefore never holds a CPU token while it waits -- which could deadlock the readers that
    need one. Calls are sequential; ``header``/``table`` are set once the last chunk is sealed.
    One byte of look-ahead tells whether the batch ends the file.

    Its two buffers -- one batch of plaintext (plus the look-ahead byte) and its ciphertext --
    are allocated once and refilled: ``seal_batch`` returns a view of the ciphertext that stays
    valid until the next call (the store contract lets a PartSource reuse its pieces).
    """

    def __init__(
        self, writer: EnvelopeWriter, source: PlainSource, batch_chunks: int = SEAL_BATCH_CHUNKS
    ) -> None:
        self._writer = writer
        self.in_memory = isinstance(source, (bytes, bytearray, memoryview))
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._src: BinaryIO = io.BytesIO(source)
        else:
            self._src = source
        self._batch = batch_chunks * CHUNK_SIZE
        self._plain = bytearray(self._batch + 1)
        self._have = 0  # plaintext bytes in _plain
        self._out = bytearray(batch_chunks * (CHUNK_SIZE + TAG_SIZE))
        self._eof = False
        self.done = False
        self.header = b""
        self.table = b""
        self.plain_bytes = 0

    def read_batch(self) -> int:
        """Read the next batch (plus one byte of look-ahead kept for the next batch); the
        plaintext bytes it holds."""
        if not self._eof and self._have < len(self._plain):
            with memoryview(self._plain) as view, view[self._have :] as free:
                self._have += read_full(self._src, free)
            self._eof = self._have < len(self._plain)
        return min(self._have, self._batch)

    def seal_batch(self) -> memoryview:
        """Ciphertext of the batch read last (the last batch sets ``done``), as a view of a
        buffer the next call overwrites."""
        n = self._have if self._eof else self._batch
        pos = n + TAG_SIZE * chunk_count(n)
        with memoryview(self._plain) as src, memoryview(self._out) as dst:
            span = self._writer.seal_span(src[:n], dst[:pos], last=self._eof)
            self._writer.record_span(span, span.run())
            del span  # its views of the buffers, before the views themselves are released
        self.plain_bytes += n
        if self._eof:
            self._have = 0
            self.header, self.table = self._writer.finish()
            self.done = True
        else:  # the look-ahead byte starts the next batch
            self._plain[0] = self._plain[n]
            self._have = 1
        return memoryview(self._out)[:pos]


# -- the store --------------------------------------------------------------------------------


class EncryptedStore:
    """Files <-> envelope objects over an ObjectStore. See the module docstring for the rules.

    ``recipients`` are added to every envelope written (our identity is always one).
    ``nursery``: where read-ahead runs; or use ``async with store:`` to give it one.
    """

    def __init__(
        self,
        store: ObjectStore,
        identity: Identity,
        recipients: Sequence[Recipient] = (),
        *,
        cache: ChunkCache | None = None,
        cpu_limiter: trio.CapacityLimiter | None = None,
        nursery: trio.Nursery | None = None,
        readahead_bytes: int = DEFAULT_READAHEAD_BYTES,
        header_cache_entries: int = 1024,
        open_cache_entries: int = 64,
        header_concurrency: int = 16,
        whole_object_bytes: int = 0,
        identities: Sequence[Identity] = (),
        recipients_for: Callable[[str], Awaitable[Sequence[Recipient]]] | None = None,
    ) -> None:
        self.store = store
        self.identity = identity
        self.recipients = tuple(recipients)
        # Sharing hooks (cssfs.sharing, docs/SHARING.md): more identities to open headers with
        # (group keys), and the recipients of a new file by its key (its folder's policy).
        self.identities = (identity, *identities)
        self.recipients_for = recipients_for
        self.cache = cache if cache is not None else ChunkCache(0)
        self.cpu_limiter = cpu_limiter or trio.CapacityLimiter(max(1, os.cpu_count() or 1))
        self.readahead_bytes = readahead_bytes
        self.header_concurrency = header_concurrency
        self.whole_object_bytes = whole_object_bytes
        self._nursery = nursery
        self._headers: _Lru[tuple[str, str], HeaderInfo] = _Lru(header_cache_entries)
        self._opened: _Lru[tuple[str, str], _OpenState] = _Lru(open_cache_entries)
        self._in_flight: dict[tuple[str, str, int], _Flight] = {}
        self._open_flights: dict[tuple[str, str], trio.Event] = {}
        self._run_buffers: list[bytearray] = []  # ciphertext of coalesced GETs, reused
        self._own = identity.recipient
        self._exit_stack: AsyncExitStack | None = None
        self._warned: _Lru[tuple[str, str], bool] = _Lru(1024)

    # -- lifetime --------------------------------------------------------------------------

    async def __aenter__(self) -> EncryptedStore:
        """Give read-ahead a nursery for the duration of the ``async with`` block."""
        if self._exit_stack is not None:
            raise RuntimeError("EncryptedStore: already entered")
        stack = AsyncExitStack()
        self._nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(self._nursery.cancel_scope.cancel)  # read-ahead is optional: no waiting
        self._exit_stack = stack
        return self

    async def __aexit__(self, *exc: object) -> None:
        stack, self._exit_stack = self._exit_stack, None
        self._nursery = None
        if stack is not None:
            await stack.aclose()

    def binding_for(self, key: str) -> bytes:
        """The object binding an envelope stored under ``key`` must carry."""
        return object_binding(self.store.full_key(key))

    def _warn(self, key: str, etag: str, what: str) -> None:
        """Log a damaged object at WARNING once per version (then at DEBUG): the object key and
        what failed, never data or keys."""
        level = logging.DEBUG if self._warned.get((key, etag)) else logging.WARNING
        self._warned.put((key, etag), True)
        log.log(level, "object %s: %s", key, what)

    def forget(self, key: str) -> None:
        """Drop everything cached about ``key`` (after another client changed it, say)."""
        self.cache.invalidate(key)
        self._headers.drop_where(lambda k: k[0] == key)
        self._opened.drop_where(lambda k: k[0] == key)

    # -- listing and headers ---------------------------------------------------------------

    async def list(self, prefix: str = "", *, delimiter: str | None = "/") -> list[Entry]:
        """One LIST: objects with their plaintext size from the object size alone (no GET),
        foreign objects with ``plain_size=None``, and (with a delimiter) folders."""
        return entries_from_listing(await self.store.list(prefix, delimiter))

    async def header(
        self, key: str, etag: str | None = None, *, cipher_size: int | None = None
    ) -> HeaderInfo:
        """What the header of ``key`` says, from one ranged GET, cached by (key, etag).

        FormatError if the object is not an envelope. Without ``etag`` a HEAD comes first (the
        cache key must be the version the bytes came from). With ``cipher_size`` (a listing's)
        at most ``TINY_OBJECT_BYTES`` and a cache (the mount), the GET takes the whole object
        -- one chunk more than the header -- and leaves it opened, its chunk in the cache: a
        file listed with ``ls -l`` and read right after costs no second request.
        """
        if etag is None:
            etag = (await self.store.head(key)).etag
        cached = self._headers.get((key, etag))
        if cached is not None:
            return cached
        if (cipher_size is not None and self.cache.enabled
                and cipher_size <= min(TINY_OBJECT_BYTES, self.whole_object_bytes)):
            # Not for us, or damaged: the header was read (its facts noted) before that failed.
            with contextlib.suppress(
                NoIdentityMatchError, HeaderAuthError, SignatureError, PayloadError
            ):
                await self.open(key, etag=etag, cipher_size=cipher_size)
            cached = self._headers.get((key, etag))
            if cached is not None:
                return cached
        data = await self.store.get(key, 0, HEADER_SIZE)
        try:
            info = self._header_info(key, etag, data)[0]
        except FormatError as exc:
            self._warn(key, etag, f"not a cssfs envelope: {exc}")
            raise
        self._headers.put((key, etag), info)
        return info

    async def headers(
        self, entries: Iterable[Entry]
    ) -> dict[str, HeaderInfo | CssfsError]:
        """Headers of many listed objects (foreign ones and folders skipped), at most
        ``header_concurrency`` GETs at once; each value is the info or the error it raised."""
        out: dict[str, HeaderInfo | CssfsError] = {}
        limiter = trio.CapacityLimiter(self.header_concurrency)

        async def one(entry: Entry) -> None:
            async with limiter:
                try:
                    out[entry.key] = await self.header(entry.key, entry.etag or None)
                except CssfsError as exc:
                    out[entry.key] = exc

        async with _nursery() as nursery:
            for entry in entries:
                if entry.is_dir or entry.plain_size is None:
                    continue
                nursery.start_soon(one, entry)
        return out

    def _open_header(self, header: Header | bytes, binding: bytes | None) -> OpenedEnvelope:
        """open_header with the first of our identities (own, then groups) the header names."""
        return open_any(header, self.identities, binding=binding)[0]

    def _header_info(
        self, key: str, etag: str, data: bytes
    ) -> tuple[HeaderInfo, OpenedEnvelope | None]:
        header = parse_header(data)
        opened: OpenedEnvelope | None = None
        problem: str | None = None
        not_for_us = False
        try:
            opened = self._open_header(header, self.binding_for(key))
        except NoIdentityMatchError as exc:
            problem, not_for_us = str(exc), True
        except (HeaderAuthError, SignatureError) as exc:
            problem = str(exc)
        # An opened header had its signature verified by open_header (one Ed25519 check per
        # open, not two); otherwise check it here: anyone can, key or no key.
        signature: Literal["valid", "invalid"] = "valid"
        if opened is None:
            try:
                verify_signature(header)
            except SignatureError:
                signature = "invalid"
        info = HeaderInfo(
            key=key,
            etag=etag,
            plain_size=header.plain_size,
            mtime_ns=header.mtime_ns,
            mode=header.mode,
            writer=header.writer,
            writer_fingerprint=writer_fingerprint(header.writer, (self._own, *self.recipients)),
            key_ids=header.key_ids,
            readable=opened is not None,
            signature=signature,
            problem=problem,
            not_for_us=not_for_us,
        )
        return info, opened

    # -- reading ---------------------------------------------------------------------------

    async def open(
        self, key: str, *, etag: str | None = None, cipher_size: int | None = None
    ) -> EncryptedFile:
        """Open ``key`` for ranged reads: header and chunk table fetched and verified.

        ``etag``/``cipher_size`` from a listing save the HEAD. NoIdentityMatchError if the file
        is not shared with us; FormatError, HeaderAuthError, BindingError, SignatureError,
        PayloadError (TruncatedError, TrailingDataError) if it is damaged or tampered with.
        """
        if etag is None or cipher_size is None:
            obj = await self.store.head(key)
            etag, cipher_size = obj.etag, obj.size
        while True:
            state = self._opened.get((key, etag))
            if state is not None:
                return EncryptedFile(self, state)
            flight = self._open_flights.get((key, etag))
            if flight is None:
                break
            await flight.wait()  # a prefetch of this version; if it failed, open it ourselves
        state = await self._open_flight(key, etag, cipher_size)
        return EncryptedFile(self, state)

    async def _open_flight(self, key: str, etag: str, cipher_size: int) -> _OpenState:
        """Open one version, registered in ``_open_flights`` while it runs (one GET however
        many callers, prefetch included)."""
        done = self._open_flights[(key, etag)] = trio.Event()
        try:
            state = await self._open_state(key, etag, cipher_size)
            self._opened.put((key, etag), state)
        finally:
            del self._open_flights[(key, etag)]
            done.set()
        return state

    def prefetch_open(self, key: str, etag: str, cipher_size: int) -> bool:
        """Open a small object (at most ``whole_object_bytes``: fetched whole, its chunks into
        the cache) in the background, so that a later ``open`` finds it ready: the mount's folder
        read-ahead, for programs that open a folder's files one after another. False if it was
        not started (too large, opened or in flight already, no nursery or cache). Errors are
        logged at DEBUG; the ``open`` that follows meets them again."""
        if (self._nursery is None or not self.cache.enabled
                or cipher_size > self.whole_object_bytes
                or (key, etag) in self._open_flights or self._opened.get((key, etag))):
            return False
        try:
            self._nursery.start_soon(self._prefetch_open_task, key, etag, cipher_size)
        except RuntimeError:  # the nursery is closing
            return False
        # Claimed now, not when the task starts: an open right after this waits for it.
        self._open_flights[(key, etag)] = trio.Event()
        return True

    async def _prefetch_open_task(self, key: str, etag: str, cipher_size: int) -> None:
        claim = self._open_flights.pop((key, etag), None)
        try:
            if self._opened.get((key, etag)) is None:
                await self._open_flight(key, etag, cipher_size)
        except Exception as exc:  # a hint: never crash on it
            log.debug("object %s: open ahead failed: %s", key, exc)
        finally:
            if claim is not None:
                claim.set()

    async def _open_state(self, key: str, etag: str, cipher_size: int) -> _OpenState:
        whole: bytes | None = None
        try:
            if cipher_size <= self.whole_object_bytes and self.cache.enabled:
                whole, header_bytes, table = await self._fetch_whole(key, cipher_size)
                if whole is not None:
                    cipher_size = len(whole)  # changed since listed: this version, whole
            else:
                header_bytes, table = await self._fetch_header_and_table(key, cipher_size)
            info, opened = self._header_info(key, etag, header_bytes)
            self._headers.put((key, etag), info)
            if opened is None:  # raise why (not for us, tampered, moved)
                opened = self._open_header(header_bytes, self.binding_for(key))
            check_envelope_size(opened.header.plain_size, cipher_size)
            assert table is not None  # the size was possible, so it matches the header's
            opened.load_table(table)
        except NoIdentityMatchError:
            log.debug("object %s: not encrypted for this identity", key)
            raise
        except (FormatError, HeaderAuthError, SignatureError, PayloadError) as exc:
            self._warn(key, etag, str(exc))
            raise
        state = _OpenState(key, etag, cipher_size, opened, info)
        if whole is not None and opened.chunk_count:
            await self._cache_whole(state, whole)
        return state

    async def _fetch_whole(self, key: str, cipher_size: int
                           ) -> tuple[bytes | None, bytes, bytes | None]:
        """A small object in one GET: (its bytes, the header, the chunk table where its size
        puts it); the bytes are None (and the table too) when it is no possible envelope."""
        data = await self.store.get(key)
        try:
            size = plain_size(len(data))
        except FormatError:
            if len(data) < HEADER_SIZE:
                raise
            return None, data[:HEADER_SIZE], None
        if len(data) != cipher_size:
            log.debug("object %s: %d bytes, listed as %d", key, len(data), cipher_size)
        table_off, table_len = table_range(size)
        return data, data[:HEADER_SIZE], data[table_off : table_off + table_len]

    async def _cache_whole(self, state: _OpenState, data: bytes) -> None:
        """Decrypt every chunk of a whole small object into the cache (the reads that follow
        find them there); a chunk that fails is left out, and its read meets the error."""
        count = state.envelope.chunk_count
        if count <= INLINE_CHUNKS:
            opened, _ = _open_run(state.envelope, 0, count, data, 0)
        else:
            opened, _ = await trio.to_thread.run_sync(
                _open_run, state.envelope, 0, count, data, 0, limiter=self.cpu_limiter
            )
        for i, plain in opened:  # read once from the start, most likely: a stream's chunks
            if self.cache.get(state.key, state.etag, i, stream=True) is None:  # the miss it is
                self.cache.put(state.key, state.etag, i, plain, stream=True)

    async def _fetch_header_and_table(
        self, key: str, cipher_size: int
    ) -> tuple[bytes, bytes | None]:
        """The header and (in parallel) the chunk table where the object size puts it. For a
        size no envelope can have, only the header: if it authenticates, its plaintext size
        tells whether the object was truncated or extended; if not, it is foreign."""
        try:
            size = plain_size(cipher_size)
        except FormatError:
            if cipher_size < HEADER_SIZE:
                raise
            return await self.store.get(key, 0, HEADER_SIZE), None
        table_off, table_len = table_range(size)
        parts: dict[str, bytes] = {}

        async def fetch(name: str, start: int, end: int) -> None:
            parts[name] = await self.store.get(key, start, end)

        async with _nursery() as nursery:
            nursery.start_soon(fetch, "header", 0, HEADER_SIZE)
            nursery.start_soon(fetch, "table", table_off, table_off + table_len)
        return parts["header"], parts["table"]

    async def _chunks(
        self, state: _OpenState, indexes: range, *, stream: bool = False
    ) -> dict[int, bytes]:
        """Plaintext of chunks ``indexes`` of one object version: cache, shared flights, then
        coalesced ranged GETs for the rest. ``stream``: for a sequential reader (the cache
        keeps such chunks only briefly, ChunkCache's probation)."""
        out: dict[int, bytes] = {}
        pending: Iterable[int] = indexes
        while pending:
            mine, waits = self._claim(state, pending, out, stream=stream)
            if mine:
                await self._lead(state, mine, out, stream=stream)
            pending = []
            for i, flight in waits:
                await flight.done.wait()
                if flight.data is not None:
                    out[i] = flight.data
                else:  # the leader failed or was cancelled: fetch it ourselves
                    pending.append(i)
        return out

    def _claim(
        self, state: _OpenState, indexes: Iterable[int], out: dict[int, bytes], *,
        peek: bool = False, stream: bool = False,
    ) -> tuple[builtins.list[int], builtins.list[tuple[int, _Flight]]]:
        """Sort chunks into cached (copied to ``out``; with ``peek`` just skipped, uncounted),
        in flight (to wait for) and ours: a flight is registered for each of ours, here,
        without an await, so no other task can start a second GET for it."""
        mine: builtins.list[int] = []
        waits: builtins.list[tuple[int, _Flight]] = []
        for i in indexes:
            ck = (state.key, state.etag, i)
            if peek:
                if ck in self.cache:
                    continue
            else:
                data = self.cache.get(*ck, stream=stream)
                if data is not None:
                    out[i] = data
                    continue
            flight = self._in_flight.get(ck)
            if flight is not None:
                waits.append((i, flight))
                continue
            self._in_flight[ck] = _Flight()
            mine.append(i)
        return mine, waits

    async def _lead(
        self, state: _OpenState, mine: builtins.list[int], out: dict[int, bytes], *,
        stream: bool = False,
    ) -> None:
        """Fetch the chunks we claimed, then hand them to whoever waits (even on failure)."""
        try:
            await self._fetch(state, mine, out, stream=stream)
        finally:
            self._land(state, mine, out)

    def _land(self, state: _OpenState, mine: builtins.list[int], out: dict[int, bytes]) -> None:
        for i in mine:
            flight = self._in_flight.pop((state.key, state.etag, i))
            flight.data = out.get(i)
            flight.done.set()

    async def _fetch(
        self, state: _OpenState, indexes: builtins.list[int], out: dict[int, bytes], *,
        stream: bool = False,
    ) -> None:
        runs: builtins.list[tuple[int, int]] = []
        for i in sorted(indexes):
            if runs and runs[-1][1] == i and i - runs[-1][0] < MAX_COALESCE_CHUNKS:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        if len(runs) == 1:
            await self._fetch_run(state, *runs[0], out, stream=stream)
            return
        async with _nursery() as nursery:
            for first, stop in runs:
                nursery.start_soon(partial(self._fetch_run, stream=stream),
                                   state, first, stop, out)

    async def _fetch_run(
        self,
        state: _OpenState,
        first: int,
        stop: int,
        out: dict[int, bytes],
        *,
        remember: bool = True,
        stream: bool = False,
    ) -> None:
        """One ranged GET for chunks [first, stop), opened and put in ``out`` (and in the cache
        if ``remember``: with ``stream`` in its probation). A run of more than INLINE_CHUNKS
        is read into a pooled buffer (``store.get_into``: no body-sized allocation, no copies
        on S3) and opened in a worker thread."""
        if stop - first <= INLINE_CHUNKS:
            start, data = await self._get_run(state, first, stop)
            opened, failure = _open_run(state.envelope, first, stop, data, start)
        else:
            opened, failure = await self._fetch_run_pooled(state, first, stop)
        for i, plain in opened:
            out[i] = plain
            if remember:
                self.cache.put(state.key, state.etag, i, plain, stream=stream)
        if failure is not None:
            self._warn(state.key, state.etag, str(failure))
            raise failure

    async def _fetch_run_pooled(
        self, state: _OpenState, first: int, stop: int
    ) -> tuple[builtins.list[tuple[int, bytes]], PayloadError | None]:
        """Chunks [first, stop) through a pooled ciphertext buffer: ranged GET into it, then
        opened (table hash + GCM) in a worker thread behind ``cpu_limiter``."""
        size = state.envelope.header.plain_size
        start = chunk_range(first, size)[0]
        last_off, last_len = chunk_range(stop - 1, size)
        length = last_off + last_len - start
        pool = self._run_buffers
        buf = pool.pop() if pool else bytearray(MAX_COALESCE_CHUNKS * (CHUNK_SIZE + TAG_SIZE))
        if len(buf) < length:
            buf = bytearray(length)
        ct = memoryview(buf)[:length]  # not released by hand: a traceback may still hold it
        try:
            got = await self.store.get_into(state.key, start, ct)
            if got != length:
                err = TruncatedError(f"chunks {first}-{stop - 1}: short read ({got} bytes)")
                self._warn(state.key, state.etag, str(err))
                raise err
            return await trio.to_thread.run_sync(
                _open_run, state.envelope, first, stop, ct, start, limiter=self.cpu_limiter
            )
        finally:
            if len(pool) < RUN_BUFFERS_KEPT:
                pool.append(buf)

    async def _get_run(self, state: _OpenState, first: int, stop: int) -> tuple[int, bytes]:
        """The ciphertext of chunks [first, stop) in one ranged GET, and where it starts."""
        size = state.envelope.header.plain_size
        start = chunk_range(first, size)[0]
        last_off, last_len = chunk_range(stop - 1, size)
        end = last_off + last_len
        data = await self.store.get(state.key, start, end)
        if len(data) != end - start:
            err = TruncatedError(f"chunks {first}-{stop - 1}: short read ({len(data)} bytes)")
            self._warn(state.key, state.etag, str(err))
            raise err
        return start, data

    def _prefetch(self, state: _OpenState, indexes: range) -> None:
        """Read ``indexes`` ahead in the background. The flights are claimed now, so the
        sequential reader's next read waits for them instead of racing them with its own GET."""
        if self._nursery is None or not self.cache.enabled or not indexes:
            return
        mine, _ = self._claim(state, indexes, {}, peek=True)
        if not mine:
            return
        try:
            self._nursery.start_soon(self._prefetch_task, state, mine)
        except RuntimeError:  # the nursery is closing: give the claims back
            self._land(state, mine, {})

    async def _prefetch_task(self, state: _OpenState, mine: builtins.list[int]) -> None:
        try:
            await self._lead(state, mine, {}, stream=True)
        except Exception as exc:  # read-ahead is a hint: never crash on it
            log.debug("object %s: read-ahead of chunks %d-%d failed: %s",
                      state.key, mine[0], mine[-1], exc)

    async def get_to(
        self,
        key: str,
        dst: BinaryIO,
        *,
        progress: object = None,
        etag: str | None = None,
        cipher_size: int | None = None,
    ) -> HeaderInfo:
        """Write the whole plaintext of ``key`` to ``dst``; what its header says.

        A few ranged GETs run in parallel (bounded memory); a chunk's plaintext is written only
        after its table entry and GCM tag verified. Bypasses the chunk cache. ``progress``, if
        given, has ``update(n)``. ``etag``/``cipher_size`` (from a HEAD or a listing the caller
        made) save open's HEAD. On error part of the plaintext may have been written: callers
        write to a temporary file and remove it on failure.

        Into a regular file (not opened for appending) each segment is written at its offset
        from ``dst``'s position by the thread that decrypted it, and ``dst`` is left positioned
        after the plaintext; into anything else, in order, through a small pool of plaintext
        buffers.
        """
        update = getattr(progress, "update", None)
        count = 0

        def counted(n: int) -> None:
            nonlocal count
            count += n
            if callable(update):
                update(n)

        fd = await trio.to_thread.run_sync(_positional_fd, dst)
        if fd is None:
            f = await self.open(key, etag=etag, cipher_size=cipher_size)
            await self._get_to_stream(f.state, dst, counted)
        else:
            base = await trio.to_thread.run_sync(dst.tell)
            f = await self._get_to_fd(key, etag, cipher_size, fd, base, counted)
            await trio.to_thread.run_sync(dst.seek, base + count)
        await trio.to_thread.run_sync(dst.flush)
        if count != f.size:
            raise AssertionError("encstore: internal error: get_to wrote the wrong size")
        return f.info

    async def _get_to_fd(
        self,
        key: str,
        etag: str | None,
        cipher_size: int | None,
        fd: int,
        base: int,
        counted: Callable[[int], None],
    ) -> EncryptedFile:
        """get_to into a regular file: segments fetched GET_TO_FILE_PARALLEL at a time, each
        decrypted and written at its own offset (``base`` + its plaintext offset) in a worker
        thread, in whatever order they arrive; the opened file.

        With the version and size known (``etag``/``cipher_size``), the first segment's GET
        runs while open fetches and checks the header and the chunk table, so the data starts
        a round trip sooner; its ciphertext waits in its buffer until the open succeeded, and
        every chunk is still checked against the table and its tag before it is written. The
        other segments start after the open, so a file that does not open (not for us, a
        damaged header) costs at most that one GET."""
        opened = trio.Event()
        files: builtins.list[EncryptedFile] = []

        async def open_file() -> None:
            files.append(await self.open(key, etag=etag, cipher_size=cipher_size))
            opened.set()

        size = None if etag is None or cipher_size is None else _plain_size_or_none(cipher_size)
        if size is None:  # open first: it finds the size, or raises why there is none
            await open_file()
            size = files[0].size
        chunks = chunk_count(size)
        step = GET_TO_FILE_SEGMENT_CHUNKS
        limiter = trio.CapacityLimiter(GET_TO_FILE_PARALLEL)
        # Reused buffers: ciphertext of a segment (one per GET in flight) and 1 MiB of plaintext
        # (one per decrypting thread).
        segment_bytes = min(step, chunks) * (CHUNK_SIZE + TAG_SIZE)
        ciphertexts: builtins.list[bytearray] = []
        scratch: builtins.list[bytearray] = []

        async def segment(first: int) -> None:
            assert size is not None
            stop = min(first + step, chunks)
            start = chunk_range(first, size)[0]
            last_off, last_len = chunk_range(stop - 1, size)
            length = last_off + last_len - start
            if first:
                await opened.wait()
            async with limiter:  # bounds the ciphertext in memory, not just the GETs
                data = ciphertexts.pop() if ciphertexts else bytearray(segment_bytes)
                with memoryview(data) as view, view[:length] as ct:
                    got = await self.store.get_into(key, start, ct)
                    await opened.wait()
                    f = files[0]
                    if got != length:
                        err = TruncatedError(
                            f"chunks {first}-{stop - 1}: short read ({got} bytes)"
                        )
                        self._warn(key, f.etag, str(err))
                        raise err
                    buf = scratch.pop() if scratch else bytearray(GET_TO_WRITE_CHUNKS * CHUNK_SIZE)
                    try:
                        n = await trio.to_thread.run_sync(
                            _open_run_to_fd, f.state.envelope, first, stop, ct, start, buf, fd,
                            base, limiter=self.cpu_limiter,
                        )
                    except PayloadError as exc:
                        self._warn(key, f.etag, str(exc))
                        raise
                scratch.append(buf)
                ciphertexts.append(data)
            counted(n)

        async with _nursery() as nursery:
            if not opened.is_set():
                nursery.start_soon(open_file)
            for first in range(0, chunks, step):
                nursery.start_soon(segment, first)
        return files[0]

    async def _get_to_stream(
        self, state: _OpenState, dst: BinaryIO, counted: Callable[[int], None]
    ) -> None:
        """get_to into a stream: segments decrypted in parallel, written in order."""
        count = state.envelope.chunk_count
        segments = [
            range(s, min(s + GET_TO_SEGMENT_CHUNKS, count))
            for s in range(0, count, GET_TO_SEGMENT_CHUNKS)
        ]
        send, recv = trio.open_memory_channel[_Segment](GET_TO_PARALLEL - 1)
        pool: builtins.list[bytearray] = []
        buffer_size = min(GET_TO_SEGMENT_CHUNKS * CHUNK_SIZE, state.envelope.header.plain_size)

        async def fetch_segment(seg: range, out: _Segment) -> None:
            start, data = await self._get_run(state, seg.start, seg.stop)
            buf = pool.pop() if pool else bytearray(buffer_size)
            try:
                out.length = await trio.to_thread.run_sync(
                    _open_run_into, state.envelope, seg.start, seg.stop, data, start, buf,
                    limiter=self.cpu_limiter,
                )
            except PayloadError as exc:
                self._warn(state.key, state.etag, str(exc))
                raise
            out.data = buf
            out.done.set()

        def write(buf: bytearray, length: int) -> None:
            with memoryview(buf) as view, view[:length] as plain:
                dst.write(plain)

        async def produce(nursery: trio.Nursery) -> None:
            async with send:
                for seg in segments:
                    out = _Segment()
                    await send.send(out)
                    nursery.start_soon(fetch_segment, seg, out)

        async with _nursery() as nursery:
            nursery.start_soon(produce, nursery)
            async with recv:
                async for segment in recv:
                    await segment.done.wait()
                    data, length = segment.data, segment.length
                    assert data is not None
                    segment.data = None
                    if length:
                        await trio.to_thread.run_sync(write, data, length)
                    pool.append(data)
                    counted(length)

    # -- writing ---------------------------------------------------------------------------

    async def recipients_of(self, key: str) -> Sequence[Recipient]:
        """Who a new envelope at ``key`` is for (besides us): the hook, else ``recipients``."""
        if self.recipients_for is None:
            return self.recipients
        return await self.recipients_for(key)

    def _writer(
        self, key: str, mtime_ns: int | None, mode: int, recipients: Sequence[Recipient]
    ) -> EnvelopeWriter:
        return EnvelopeWriter(
            self.identity, recipients, binding=self.binding_for(key),
            mtime_ns=time.time_ns() if mtime_ns is None else mtime_ns, mode=mode & 0o7777,
        )

    async def put(
        self,
        key: str,
        source: PlainSource,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        mtime_ns: int | None = None,
        mode: int = 0o644,
        progress: object = None,
    ) -> ObjectInfo:
        """Encrypt ``source`` into a new envelope under ``key``, streaming.

        ``source`` is bytes or a readable binary file (seekable or not). Chunks are sealed in
        worker threads, ``SEAL_BATCH_CHUNKS`` per hop, and fed to the store's multipart upload
        with the header part uploaded last, so memory stays a few parts whatever the size.
        ``if_match``/``if_none_match``: the store's conditional put (PreconditionFailedError).
        """
        recipients = await self.recipients_of(key)
        sealer = _Sealer(self._writer(key, mtime_ns, mode, recipients), source)
        update = getattr(progress, "update", None)
        result = await self._upload(
            key, sealer, if_match, if_none_match, update if callable(update) else None
        )
        self.forget(key)
        return result

    async def _sealed(
        self, sealer: _Sealer, update: Callable[[int], object] | None = None
    ) -> AsyncIterator[memoryview]:
        """The ciphertext of the source, batch by batch: read in a worker thread (or inline for
        bytes in memory), sealed in a worker thread behind the CPU limiter. Each batch is a view
        of the sealer's buffer, valid until the next one is asked for."""
        while not sealer.done:
            if sealer.in_memory:
                n = sealer.read_batch()
            else:
                n = await trio.to_thread.run_sync(sealer.read_batch)
            if n <= CHUNK_SIZE * INLINE_CHUNKS:
                batch = sealer.seal_batch()
            else:
                batch = await trio.to_thread.run_sync(sealer.seal_batch, limiter=self.cpu_limiter)
            if update is not None:
                update(n)
            yield batch

    async def _upload(
        self,
        key: str,
        sealer: _Sealer,
        if_match: str | None,
        if_none_match: bool,
        update: Callable[[int], object] | None,
    ) -> ObjectInfo:
        async def rest() -> AsyncIterator[bytes | memoryview]:
            async for batch in self._sealed(sealer, update):
                yield batch
            yield sealer.table

        def head() -> bytes:
            if not sealer.done:
                raise RuntimeError("encstore: internal error: header asked for before the end")
            return sealer.header

        return await self.store.put(
            key, PartSource(HEADER_SIZE, rest(), head),
            if_match=if_match, if_none_match=if_none_match,
        )

    async def seal_to_file(
        self,
        key: str,
        source: PlainSource,
        dst: BinaryIO,
        *,
        mtime_ns: int | None = None,
        mode: int = 0o644,
    ) -> None:
        """Encrypt ``source`` into an envelope for ``key`` written to the seekable file ``dst``
        at its current position (the mount's journal: only ciphertext lands on disk). The
        header region is written as zeros first and filled in at the end."""
        recipients = await self.recipients_of(key)
        sealer = _Sealer(self._writer(key, mtime_ns, mode, recipients), source)
        start = await trio.to_thread.run_sync(dst.tell)
        await trio.to_thread.run_sync(dst.write, bytes(HEADER_SIZE))
        async for batch in self._sealed(sealer):
            await trio.to_thread.run_sync(dst.write, batch)

        def finish() -> None:
            dst.write(sealer.table)
            end = dst.tell()
            dst.seek(start)
            dst.write(sealer.header)
            dst.seek(end)
            dst.flush()

        await trio.to_thread.run_sync(finish)

    async def put_envelope_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        data: bytes | None = None,
    ) -> ObjectInfo:
        """Upload an envelope file (from seal_to_file or rebind_file) as it is. One that fits
        in a part is read whole first (one thread hop, then a single PUT of bytes); ``data``:
        the file's bytes, when the caller holds them (no read at all)."""
        if data is not None and len(data) <= self.store.part_size:
            small: bytes | None = data
        else:
            small = await trio.to_thread.run_sync(_read_if_small, path, self.store.part_size)
        if small is not None:
            result = await self.store.put(
                key, small, if_match=if_match, if_none_match=if_none_match
            )
        else:
            with open(path, "rb") as f:  # noqa: ASYNC230 -- the store reads it in worker threads
                result = await self.store.put(
                    key, f, if_match=if_match, if_none_match=if_none_match
                )
        self.forget(key)
        return result

    def rebind_header(self, header: bytes, new_key: str, *, old_key: str | None = None) -> bytes:
        """A new header region for the same payload, bound to ``new_key``.

        If ``old_key`` is given the header must currently be bound to it (BindingError).
        Synchronous and cheap (one X25519 unwrap, one HMAC).
        """
        old = None if old_key is None else self.binding_for(old_key)
        opened = self._open_header(header, old)
        return opened.reseal(binding=self.binding_for(new_key))

    async def rebind_file(
        self, path: str | os.PathLike[str], new_key: str, *, old_key: str | None = None
    ) -> None:
        """Rewrite the header of a local envelope file in place to bind it to ``new_key``
        (rename while the upload is still pending)."""

        def work() -> None:
            with open(path, "r+b") as f:
                head = f.read(HEADER_SIZE)
                new = self.rebind_header(head, new_key, old_key=old_key)
                f.seek(0)
                f.write(new)
                f.flush()
                os.fsync(f.fileno())

        await trio.to_thread.run_sync(work)

    async def set_attrs(
        self, key: str, *, mtime_ns: int | None = None, mode: int | None = None
    ) -> ObjectInfo:
        """Give the stored envelope ``key`` a new mtime and/or mode by rewriting its 4 KiB
        header (``store.replace_head``, conditional on the version read: PreconditionFailedError
        if another client changed it meanwhile). mtime and mode are under the header MAC, not
        the writer's signature, so any recipient (a group member too) may change them and the
        writer stays who wrote the file; the payload is not re-uploaded."""
        info = await self.store.head(key)
        head = await self.store.get(key, 0, HEADER_SIZE)
        try:
            opened = self._open_header(head, self.binding_for(key))
        except (FormatError, HeaderAuthError, SignatureError) as exc:
            self._warn(key, info.etag, str(exc))
            raise
        new_head = opened.reseal(mtime_ns=mtime_ns, mode=None if mode is None else mode & 0o7777)
        result = await self.store.replace_head(key, new_head, HEADER_SIZE, if_match=info.etag)
        self.forget(key)
        return result

    def set_identities(self, identities: Sequence[Identity]) -> None:
        """Open headers with ``identities`` (group keys) besides our own from now on (a mount
        that was given a group key, or saw one rotate, while running). Header facts cached as
        "not for us" are dropped; files that opened before keep opening."""
        self.identities = (self.identity, *identities)
        self._headers.drop_where(lambda k: True)

    # -- deleting and renaming -------------------------------------------------------------

    async def delete(self, key: str) -> None:
        """Delete ``key`` (missing is fine) and forget what is cached about it."""
        await self.store.delete([key])
        self.forget(key)

    async def rename(self, src: str, dst: str) -> ObjectInfo:
        """Move ``src`` to ``dst``: a new header bound to ``dst`` over the same payload, then
        ``src`` is deleted. The header is verified for us first (we must be a recipient).

        A small object is read once and written once; a larger one is copied server-side and
        its head replaced (on S3 the payload is never downloaded).
        """
        if src == dst:
            return await self.store.head(src)
        info = await self.store.head(src)
        if info.size <= self.store.part_size:
            data = await self.store.get(src)
            new_head = self._rebind_logged(data[:HEADER_SIZE], src, dst, info.etag)
            result = await self.store.put(dst, new_head + data[HEADER_SIZE:])
        else:
            copied = await self.store.copy(src, dst)
            head = await self.store.get(dst, 0, HEADER_SIZE)
            try:
                new_head = self._rebind_logged(head, src, dst, info.etag)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.store.delete([dst])
                raise
            result = await self.store.replace_head(
                dst, new_head, HEADER_SIZE, if_match=copied.etag
            )
        await self.store.delete([src])
        self.forget(src)
        self.forget(dst)
        return result

    def _rebind_logged(self, head: bytes, src: str, dst: str, etag: str) -> bytes:
        try:
            return self.rebind_header(head, dst, old_key=src)
        except (FormatError, HeaderAuthError, SignatureError) as exc:
            self._warn(src, etag, str(exc))
            raise


def _read_if_small(path: str | os.PathLike[str], limit: int) -> bytes | None:
    """The bytes of the file at ``path`` if it holds at most ``limit`` bytes, else None."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > limit:
            return None
        return f.read()


def entries_from_listing(listing: Listing) -> list[Entry]:
    """A store listing as entries (folders first by key order, like the listing itself)."""
    entries = [Entry(p, None, "", 0.0, is_dir=True) for p in listing.prefixes]
    entries += [
        Entry(o.key, _plain_size_or_none(o.size), o.etag, o.mtime, cipher_size=o.size)
        for o in listing.objects
    ]
    entries.sort(key=lambda e: e.key)
    return entries


def _plain_size_or_none(cipher_size: int) -> int | None:
    try:
        return plain_size(cipher_size)
    except FormatError:
        return None


def _open_run(
    envelope: OpenedEnvelope, first: int, stop: int, data: bytes | bytearray | memoryview,
    base: int,
) -> tuple[list[tuple[int, bytes]], PayloadError | None]:
    """Open chunks [first, stop) from ``data`` (which starts at envelope offset ``base``).

    Returns the chunks that verified, in order, and the error of the first that did not (the
    ones before it stay usable: "chunks before i are still readable").
    """
    size = envelope.header.plain_size
    view = memoryview(data)
    good: list[tuple[int, bytes]] = []
    for i in range(first, stop):
        off, length = chunk_range(i, size)
        try:
            good.append((i, envelope.open_chunk(i, view[off - base : off - base + length])))
        except PayloadError as exc:
            return good, exc
    return good, None


def _open_run_into(
    envelope: OpenedEnvelope, first: int, stop: int, data: bytes, base: int, out: bytearray
) -> int:
    """Decrypt the chunks [first, stop) from ``data`` (which starts at envelope offset
    ``base``) into the start of ``out``; the plaintext length. The first chunk that does not
    verify raises (``out`` then holds nothing unverified: open_chunk_into zeroes a chunk whose
    tag fails, and a chunk whose table entry fails is never decrypted)."""
    size = envelope.header.plain_size
    plain_start = first * CHUNK_SIZE
    length_total = min(stop * CHUNK_SIZE, size) - plain_start
    with memoryview(data) as src, memoryview(out) as dst:
        for i in range(first, stop):
            off, length = chunk_range(i, size)
            p = i * CHUNK_SIZE - plain_start
            with src[off - base : off - base + length] as ct, dst[p : p + length - TAG_SIZE] as pt:
                envelope.open_chunk_into(i, ct, pt)
    return length_total


def _positional_fd(dst: BinaryIO) -> int | None:
    """The descriptor of ``dst`` if it is a regular file that takes positional writes (not
    opened for appending), its buffer flushed; else None."""
    try:
        fd = dst.fileno()
        if not dst.seekable():
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
            return None
        dst.flush()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    return fd


def _open_run_to_fd(
    envelope: OpenedEnvelope,
    first: int,
    stop: int,
    data: bytes | bytearray | memoryview,
    base: int,
    scratch: bytearray,
    fd: int,
    file_base: int,
) -> int:
    """Decrypt the chunks [first, stop) from ``data`` (which starts at envelope offset
    ``base``) through ``scratch`` and write them at their plaintext offsets (+ ``file_base``)
    in ``fd``; the bytes written. A piece is written only once every chunk in it verified; the
    first chunk that does not verify raises."""
    size = envelope.header.plain_size
    per = len(scratch) // CHUNK_SIZE
    total = 0
    with memoryview(data) as src, memoryview(scratch) as out:
        for group in range(first, stop, per):
            n = 0
            for i in range(group, min(group + per, stop)):
                off, length = chunk_range(i, size)
                with src[off - base : off - base + length] as ct, out[
                    n : n + length - TAG_SIZE
                ] as pt:
                    envelope.open_chunk_into(i, ct, pt)
                n += length - TAG_SIZE
            with out[:n] as piece:
                _pwrite_all(fd, piece, file_base + group * CHUNK_SIZE)
            total += n
    return total


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


class EncryptedFile:
    """An opened object version: ``read(offset, size)`` returns verified plaintext.

    Detects sequential reads and asks the store to read ahead (when it has a nursery and a
    cache). Cheap to create; holds no resources to close.
    """

    def __init__(self, store: EncryptedStore, state: _OpenState) -> None:
        self._store = store
        self.state = state
        self._next_offset = 0
        self._sequential = 0
        self._ahead_until = 0  # chunks below this index were already scheduled for read-ahead

    @property
    def key(self) -> str:
        return self.state.key

    @property
    def etag(self) -> str:
        return self.state.etag

    @property
    def size(self) -> int:
        """Plaintext size in bytes."""
        return self.state.envelope.header.plain_size

    @property
    def info(self) -> HeaderInfo:
        return self.state.info

    @property
    def header(self) -> Header:
        return self.state.envelope.header

    async def read(self, offset: int, size: int) -> bytes:
        """Plaintext bytes [offset, offset + size), clipped at end of file."""
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        plain = self.size
        indexes = chunks_for(offset, size, plain)
        if not indexes:
            return b""
        first = indexes.start * CHUNK_SIZE
        end = min(offset + size, plain)
        # Noted before the fetch, not after: the kernel's read-ahead sends a sequential
        # reader's next requests while this one is still fetching, and each must find the
        # stream where the one before it (in request order) ends.
        stream = self._note_read(offset, end, indexes)
        chunks = await self._store._chunks(self.state, indexes, stream=stream)
        if len(indexes) == 1 and offset == first and end - first == len(chunks[indexes.start]):
            result = chunks[indexes.start]  # a whole chunk: no copy
        else:
            result = b"".join(chunks[i] for i in indexes)[offset - first : end - first]
        return result

    def _note_read(self, offset: int, end: int, indexes: range) -> bool:
        """Note a read starting; whether it continues the last one (or starts the file): a
        stream, whose reader's page cache keeps what it gets, so the chunk cache need not
        (drop-behind). A stream's reads top up the read-ahead."""
        stream = offset == self._next_offset
        if stream:
            self._sequential += 1
        else:
            self._sequential = 0
            self._ahead_until = 0
        self._next_offset = end
        store = self._store
        if self._sequential < 1 or store.readahead_bytes <= 0:
            return stream
        window = max(1, min(store.readahead_bytes, store.cache.max_bytes // 4) // CHUNK_SIZE)
        count = chunk_count(self.size)
        start = max(indexes.stop, self._ahead_until)
        # Top up only when less than half the window is left ahead: fewer, larger GETs.
        if start - indexes.stop > window // 2 or start >= count:
            return stream
        stop = min(indexes.stop + window, count)
        if stop <= start:
            return stream
        self._ahead_until = stop
        store._prefetch(self.state, range(start, stop))
        return stream
