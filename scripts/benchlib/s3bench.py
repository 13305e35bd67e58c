"""s3bench: the bench's S3 server -- tests/support/s3server.py (moto, O(range) ranged GETs)
with large ranges streamed instead of built in memory, and multipart uploads completed in
O(parts) instead of by copying every part.

Why: the test server reads a requested range into one ``bytes`` before answering. rclone's
chunked reader asks for 128 MiB (or open-ended) ranges and hangs up after the few KiB it needs,
at every seek; 200 random reads then make moto build gigabytes of bodies nobody reads (a full
bench run got the server OOM-killed at 18 GB). S3 streams a body and stops when the client goes
away; so does this server for ranges over ``STREAM_ABOVE`` bytes, in ``PIECE``-sized reads.

Second, ``CompleteMultipartUpload`` stitches the parts instead of copying them. Stock moto reads
every part out of its spooled buffer, concatenates them, computes a checksum over the whole and
writes the result into a new buffer: O(object) -- for 256 MiB longer than the PUT of the same
bytes -- where S3 costs O(parts). Here (:func:`install_chained_complete`) the completed object's
``_value_buffer`` is a read-only :class:`PartChain` that takes over the listed parts' own buffers;
moto's ``S3Backend.complete_multipart_upload`` still runs unchanged around it (versioning,
metadata, tags, ACL, notifications, the validation errors, the ``"<md5 of part md5s>-N"`` ETag).
Stock moto also computes a checksum at completion (CRC64NVME -- CRC32 without awscrt -- over the
whole object when the client named no algorithm); here moto's own builder computes it from the
parts the first time something reads ``checksum_value`` (HEAD/GET with checksum mode,
GetObjectAttributes, CopyObject): the same value, later.

Ownership: each listed part's buffer moves into the chain and the part keeps a closed stand-in,
so what stock moto does next -- dispose the upload as it completes, and again whenever a key that
refers to it is disposed (a CopyObject copy shares its source's ``multipart``) -- closes only the
stand-ins, as it closed the parts in stock moto. The chain closes the buffers when its key is
disposed (moto disposes a key on delete, on overwrite and on reset).

Everything else -- status codes, headers, small ranges, whole-object GETs, UploadPartCopy -- is
the test server's behaviour unchanged.

    python -m benchlib.s3bench --port 0     # first stdout line: http://127.0.0.1:PORT

What it knows: moto's response path as patched by tests/support/s3server.py, and moto 5.2's
multipart completion and key buffers (FakeKey, FakeMultipart). Nothing of cssfs.
"""

from __future__ import annotations

import sys
import threading
from bisect import bisect_right
from collections.abc import Iterator
from itertools import accumulate
from typing import Any, cast

from tests.support import s3server as base

STREAM_ABOVE = 1 << 20
PIECE = 1 << 20

_tl = threading.local()  # .get: True while S3Response.get_object runs in this thread
_installed = False
_chained_installed = False


class _StreamedRange:
    """A range of an object's bytes, sized for moto's headers, read piece by piece when sent."""

    def __init__(self, lazy: Any, start: int, n: int) -> None:
        self._lazy = lazy
        self._start = start
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[bytes]:
        pos, left = self._start, self._n
        while left > 0:
            piece: bytes = self._lazy._read(pos, min(PIECE, left))
            if not piece:
                return
            base.COUNTERS.add_range(len(piece))
            pos += len(piece)
            left -= len(piece)
            yield piece


class PartChain:
    """A completed multipart object's bytes: the parts' buffers read in order, never copied.

    Implements what moto and the lazy range view use on ``FakeKey._value_buffer``: ``seek``
    (whence 0, 1, 2), ``tell``, ``read(n)``, ``read()``, ``close``, ``closed``. Read-only: moto
    never writes to a key's buffer after creating it (the value setter below replaces a chain
    instead). The position is the caller's to guard (moto and the lazy view hold the key's
    ``lock``, as for a stock buffer); the parts' buffers are guarded here, because the lazy
    checksum reads them without the key. The chain owns the buffers and closes them.
    """

    def __init__(self, buffers: list[Any], sizes: list[int]) -> None:
        self._buffers = buffers
        self._sizes = sizes
        self._ends = list(accumulate(sizes))
        self.size: int = self._ends[-1] if self._ends else 0
        self._pos = 0
        self._lock = threading.Lock()
        self.closed = False

    def _check(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file.")

    def seek(self, offset: int, whence: int = 0) -> int:
        self._check()
        if whence == 0:
            pos = offset
        elif whence == 1:
            pos = self._pos + offset
        elif whence == 2:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if pos < 0:
            raise ValueError(f"negative seek value {pos}")
        self._pos = pos
        return pos

    def tell(self) -> int:
        self._check()
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        self._check()
        left = max(0, self.size - self._pos)
        if n is not None and n >= 0:
            left = min(left, n)
        pieces: list[bytes] = []
        pos = self._pos
        i = bisect_right(self._ends, pos)
        while left > 0:
            k = min(left, self._ends[i] - pos)
            pieces.append(self._read_part(i, pos - (self._ends[i] - self._sizes[i]), k))
            pos += k
            left -= k
            i += 1
        self._pos = pos
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def parts(self) -> Iterator[bytes]:
        """Each part's bytes, in order (for the checksum); the position is not used."""
        for i, size in enumerate(self._sizes):
            yield self._read_part(i, 0, size)

    def _read_part(self, i: int, offset: int, n: int) -> bytes:
        with self._lock:
            self._check()
            buf = self._buffers[i]
            buf.seek(offset)
            data: bytes = buf.read(n)
        if len(data) != n:
            raise ValueError(f"s3bench: internal error: part {i} is shorter than its size")
        return data

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            buffers, self._buffers = self._buffers, []
        for buf in buffers:  # a part listed twice is the same buffer: closing twice is fine
            buf.close()


class _PendingChecksum:
    """A completed object's checksum, computed from its parts when first read.

    Feeds moto's ``MultipartChecksumBuilder`` the same parts in the same order as stock
    ``FakeMultipart.complete``, so the value is the one stock moto would have stored. Copies
    (deepcopy, pickle) get the computed string.
    """

    def __init__(self, builder_cls: Any, algorithm: Any, checksum_type: Any, chain: PartChain):
        self._args: tuple[Any, Any, Any, PartChain] | None = (
            builder_cls,
            algorithm,
            checksum_type,
            chain,
        )
        self._value = ""
        self._lock = threading.Lock()

    def value(self) -> str:
        with self._lock:
            if self._args is not None:
                builder_cls, algorithm, checksum_type, chain = self._args
                builder = builder_cls(algorithm, checksum_type)
                for part in chain.parts():
                    builder.addPart(part)
                self._value = str(builder.build()[1])
                self._args = None
            return self._value

    def __reduce__(self) -> tuple[Any, ...]:
        return (str, (self.value(),))


class _ChecksumValue:
    """``FakeKey.checksum_value`` as a data descriptor: a stored :class:`_PendingChecksum` is
    computed on first read; anything else is stored and returned as is (stock behaviour)."""

    def __get__(self, key: Any, owner: Any = None) -> Any:
        if key is None:
            return self
        try:
            value = key.__dict__["checksum_value"]
        except KeyError:
            raise AttributeError("checksum_value") from None
        if isinstance(value, _PendingChecksum):
            return value.value()
        return value

    def __set__(self, key: Any, value: Any) -> None:
        key.__dict__["checksum_value"] = value


class _Stitched:
    """What the patched ``FakeMultipart.complete`` returns in place of the concatenated bytes;
    the patched ``FakeKey.value`` setter installs its chain as the new key's buffer."""

    def __init__(self, chain: PartChain) -> None:
        self.chain = chain
        self.adopted = False


def install_chained_complete() -> None:
    """Patch moto (in this process) so CompleteMultipartUpload chains the parts. Idempotent."""
    global _chained_installed
    if _chained_installed:
        return
    import codecs
    import tempfile

    from moto.s3 import models
    from moto.s3.exceptions import EntityTooSmall, InvalidPart, MalformedXML
    from moto.s3.models import FakeKey, FakeMultipart, MultipartChecksumBuilder, S3Backend
    from moto.utilities.utils import md5_hash

    stock_value: property = FakeKey.__dict__["value"]  # as patched by the test server
    stock_set = stock_value.fset
    assert stock_set is not None
    stock_complete = FakeMultipart.complete
    stock_complete_upload = S3Backend.complete_multipart_upload
    completing = threading.local()  # .stitched: a list while complete_multipart_upload runs

    def closed_buffer(part: Any) -> Any:
        buf = tempfile.SpooledTemporaryFile(part._max_buffer_size)  # noqa: SIM115
        buf.close()
        return buf

    def complete(self: Any, body: Iterator[tuple[int, str]]) -> Any:
        """Stock ``FakeMultipart.complete`` (same checks, same order) without reading parts."""
        stitched = getattr(completing, "stitched", None)
        if stitched is None:  # not called by complete_multipart_upload: stock
            return stock_complete(self, body)
        checksum_algo = self.metadata.get("x-amz-checksum-algorithm")
        checksum_type = self.metadata.get("x-amz-checksum-type")
        decode_hex = codecs.getdecoder("hex_codec")
        md5s = bytearray()
        parts: list[Any] = []
        last = None
        for pn, etag in body:
            part = self.parts.get(pn)
            part_etag = None
            if part is not None:
                part_etag = part.etag.replace('"', "")
                etag = etag.replace('"', "")
            if part is None or part_etag != etag:
                raise InvalidPart()
            if last is not None and last.contentsize < vars(models)["S3_UPLOAD_PART_MIN_SIZE"]:
                raise EntityTooSmall()
            md5s.extend(cast(bytes, decode_hex(part_etag)[0]))
            parts.append(part)
            last = part
        if not parts:
            raise MalformedXML
        full_etag = md5_hash()
        full_etag.update(bytes(md5s))
        # Move the buffers into the chain; every part keeps a closed stand-in (stock moto closes
        # the parts next, when complete_multipart_upload deletes the upload).
        buffers: dict[int, Any] = {}
        for part in parts:
            if id(part) not in buffers:
                with part.lock:
                    buffers[id(part)] = part._value_buffer
                    part._value_buffer = closed_buffer(part)
        chain = PartChain([buffers[id(p)] for p in parts], [p.contentsize for p in parts])
        stitched.append(value := _Stitched(chain))
        # The builder settles the checksum type (and so the part count) without any bytes.
        kind = MultipartChecksumBuilder(checksum_algo, checksum_type).checksum_type
        pending = _PendingChecksum(MultipartChecksumBuilder, checksum_algo, checksum_type, chain)
        count = len(parts) if kind == "COMPOSITE" else 1
        return value, f"{full_etag.hexdigest()}-{len(parts)}", (kind, pending, count)

    def set_value(self: Any, new_value: Any) -> None:
        if isinstance(new_value, _Stitched):
            if new_value.adopted:
                raise RuntimeError("s3bench: internal error: a completed upload chained twice")
            self._value_buffer.close()  # the empty buffer FakeKey.__init__ just made
            self._value_buffer = new_value.chain
            self.contentsize = new_value.chain.size
            new_value.adopted = True
            return
        if isinstance(self._value_buffer, PartChain):  # moto never does this; stay correct
            self._value_buffer.close()
            # The key owns the new buffer and closes it in dispose, as FakeKey.__init__'s.
            self._value_buffer = tempfile.SpooledTemporaryFile(self._max_buffer_size)  # noqa: SIM115
        stock_set(self, new_value)

    def complete_multipart_upload(self: Any, *args: Any, **kwargs: Any) -> Any:
        previous = getattr(completing, "stitched", None)
        stitched: list[_Stitched] = []
        completing.stitched = stitched
        try:
            return stock_complete_upload(self, *args, **kwargs)
        finally:
            completing.stitched = previous
            for value in stitched:
                if not value.adopted:  # failed before a key took the parts: close them, as stock
                    value.chain.close()

    setattr(FakeKey, "value", property(stock_value.fget, set_value))  # noqa: B010
    setattr(FakeKey, "checksum_value", _ChecksumValue())  # noqa: B010
    setattr(FakeMultipart, "complete", complete)  # noqa: B010
    setattr(S3Backend, "complete_multipart_upload", complete_multipart_upload)  # noqa: B010
    _chained_installed = True


def install() -> None:
    """Install the test server's fast ranges, streaming of large GET ranges and chained
    multipart completion. Idempotent."""
    global _installed
    if _installed:
        return
    base.install_fast_range()
    from moto.s3.responses import S3Response

    lazy_cls: Any = base._LazyValue
    sliced = lazy_cls.__getitem__

    def getitem(self: Any, item: Any) -> Any:
        if getattr(_tl, "get", False) and isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            if step == 1 and stop - start > STREAM_ABOVE:
                return _StreamedRange(self, start, stop - start)
        return sliced(self, item)

    get_object = S3Response.get_object

    def streaming_get_object(self: Any) -> Any:
        previous = getattr(_tl, "get", False)
        _tl.get = True
        try:
            return get_object(self)
        finally:
            _tl.get = previous

    lazy_cls.__getitem__ = getitem
    S3Response.get_object = streaming_get_object  # type: ignore[method-assign]
    install_chained_complete()
    _installed = True


def main(argv: list[str] | None = None) -> int:
    install()
    return base.main(argv)


if __name__ == "__main__":
    sys.exit(main())
