"""A moto S3 server on 127.0.0.1 for tests and benchmarks, with ranged GETs that cost O(range).

Stock moto 5.2.5 answers ``GET`` with ``Range: bytes=a-b`` by reading the *whole* object out of
its spooled buffer (``FakeKey.value``) and slicing afterwards (``S3Response._handle_range_header``),
so a 4 KiB read of a 64 MiB object costs as much as reading all of it. Real S3 costs O(range).
:func:`install_fast_range` patches moto in-process so that, during ``S3Response.get_object``,
``FakeKey.value`` yields a lazy view of the buffer whose ``len()`` is the size and whose slices read
only the bytes asked for. moto's own range logic then runs unchanged on that view: status codes,
headers and bodies stay identical to stock moto (``tests/test_s3server.py`` compares them). A view
that reaches the end of ``key_response`` without being sliced (a non-range answer) is read whole,
exactly as stock moto would have. ``UploadPartCopy`` with a copy-source range gets the same view.

:data:`COUNTERS` counts the bytes moto reads from object buffers (whole-object reads versus lazy
range reads), so tests can prove which path a request took without timing anything.

Use as a context manager (``with S3Server() as s3: s3.endpoint_url``) or from a shell, for
benchmarks and subprocess tests::

    python -m tests.support.s3server --port 0     # first stdout line: http://127.0.0.1:PORT

The CLI runs until SIGTERM or SIGINT. This module knows moto and nothing of cssfs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["COUNTERS", "ReadCounters", "S3Server", "install_fast_range", "main", "stock_ranges"]


@dataclass
class ReadCounters:
    """Bytes moto read out of object buffers since the last :meth:`reset`."""

    whole_bytes: int = 0  # read through stock FakeKey.value (whole object every time)
    whole_reads: int = 0
    range_bytes: int = 0  # read through the lazy view (only the requested range)
    range_reads: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reset(self) -> None:
        with self._lock:
            self.whole_bytes = self.whole_reads = self.range_bytes = self.range_reads = 0

    def add_whole(self, n: int) -> None:
        with self._lock:
            self.whole_bytes += n
            self.whole_reads += 1

    def add_range(self, n: int) -> None:
        with self._lock:
            self.range_bytes += n
            self.range_reads += 1


COUNTERS = ReadCounters()

_state = threading.local()  # .lazy: True while get_object / upload_part_copy runs in this thread
_install_lock = threading.Lock()
_installed = False
_enabled = True


class _LazyValue:
    """A FakeKey's bytes, read on demand: ``len()`` is the size, a slice reads only that slice."""

    def __init__(self, key: Any) -> None:
        self._key = key
        self._size: int = key.size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, item: slice) -> bytes:
        if not isinstance(item, slice):
            raise TypeError("lazy object values support slices only")
        start, stop, step = item.indices(self._size)
        if step != 1:
            raise ValueError("lazy object values support contiguous slices only")
        data = self._read(start, max(0, stop - start))
        COUNTERS.add_range(len(data))
        return data

    def whole(self) -> bytes:
        data = self._read(0, self._size)
        COUNTERS.add_whole(len(data))
        return data

    def _read(self, start: int, n: int) -> bytes:
        with self._key.lock:
            buf = self._key._value_buffer
            buf.seek(start)
            data: bytes = buf.read(n)
        return data


@contextlib.contextmanager
def _lazy_values() -> Iterator[None]:
    previous = getattr(_state, "lazy", False)
    _state.lazy = _enabled
    try:
        yield
    finally:
        _state.lazy = previous


def install_fast_range() -> None:
    """Patch moto (in this process) so single-range GETs read only the range. Idempotent."""
    global _installed
    with _install_lock:
        if _installed:
            return
        from moto.s3.models import FakeKey, S3Backend
        from moto.s3.responses import S3Response

        stock_value: property = FakeKey.__dict__["value"]
        stock_get = stock_value.fget
        assert stock_get is not None
        stock_get_object = S3Response.get_object
        stock_key_response = S3Response.key_response
        stock_upload_part_copy = S3Backend.upload_part_copy

        def value(self: Any) -> Any:
            if getattr(_state, "lazy", False):
                return _LazyValue(self)
            COUNTERS.add_whole(self.contentsize)
            return stock_get(self)

        def get_object(self: Any) -> Any:
            with _lazy_values():
                return stock_get_object(self)

        def key_response(self: Any, request: Any, full_url: str, headers: Any) -> Any:
            status, response_headers, body = stock_key_response(self, request, full_url, headers)
            if isinstance(body, _LazyValue):  # not sliced by the range logic: answer it whole
                body = body.whole()
            return status, response_headers, body

        def upload_part_copy(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = kwargs.get("start_byte", args[6] if len(args) > 6 else None)
            if start is None:  # the whole source is copied: stock path
                return stock_upload_part_copy(self, *args, **kwargs)
            with _lazy_values():
                return stock_upload_part_copy(self, *args, **kwargs)

        setattr(FakeKey, "value", property(value, stock_value.fset))  # noqa: B010
        setattr(S3Response, "get_object", get_object)  # noqa: B010
        setattr(S3Response, "key_response", key_response)  # noqa: B010
        setattr(S3Backend, "upload_part_copy", upload_part_copy)  # noqa: B010
        _installed = True


@contextlib.contextmanager
def stock_ranges() -> Iterator[None]:
    """Within this block, requests (in any thread) take moto's stock whole-object path."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


class S3Server:
    """A patched ``ThreadedMotoServer`` on 127.0.0.1; the port is chosen at run time by default."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._server: Any = None

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        install_fast_range()
        # werkzeug logs one line per request at INFO on stderr; tests and benchmarks don't want it.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address=self._host, port=self._port, verbose=False)
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("S3Server is not running")
        host, port = self._server.get_host_and_port()
        return f"http://{host}:{port}"

    def reset(self) -> None:
        """Forget every bucket and object (moto's in-memory state)."""
        from moto.s3.models import s3_backends

        for account in list(s3_backends.keys()):
            for region in list(s3_backends[account].keys()):
                s3_backends[account][region].reset()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.s3server",
        description="Run a moto S3 server with O(range) ranged GETs until SIGTERM/SIGINT.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (default) picks a free port")
    args = parser.parse_args(argv)
    # Block the signals before the server thread starts so that it inherits the mask and
    # sigwait below is the one place they are delivered.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    with S3Server(args.host, args.port) as server:
        sys.stdout.write(server.endpoint_url + "\n")
        sys.stdout.flush()
        signal.sigwait(stop_signals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
