"""s3bench: the bench's S3 server -- tests/support/s3server.py (moto, O(range) ranged GETs)
with large ranges streamed instead of built in memory.

Why: the test server reads a requested range into one ``bytes`` before answering. rclone's
chunked reader asks for 128 MiB (or open-ended) ranges and hangs up after the few KiB it needs,
at every seek; 200 random reads then make moto build gigabytes of bodies nobody reads (a full
bench run got the server OOM-killed at 18 GB). S3 streams a body and stops when the client goes
away; so does this server for ranges over ``STREAM_ABOVE`` bytes, in ``PIECE``-sized reads.
Everything else -- status codes, headers, small ranges, whole-object GETs, UploadPartCopy -- is
the test server's behaviour unchanged.

    python -m benchlib.s3bench --port 0     # first stdout line: http://127.0.0.1:PORT

What it knows: moto's response path as patched by tests/support/s3server.py. Nothing of cssfs.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any

from tests.support import s3server as base

STREAM_ABOVE = 1 << 20
PIECE = 1 << 20

_tl = threading.local()  # .get: True while S3Response.get_object runs in this thread
_installed = False


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


def install() -> None:
    """Install the test server's fast ranges, then streaming of large GET ranges. Idempotent."""
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
    _installed = True


def main(argv: list[str] | None = None) -> int:
    install()
    return base.main(argv)


if __name__ == "__main__":
    sys.exit(main())
