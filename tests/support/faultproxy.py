"""An HTTP proxy on 127.0.0.1 that injects S3-style faults in front of an S3 endpoint (moto).

Point a client's ``endpoint_url`` at :attr:`FaultProxy.endpoint_url`; requests pass through to
``upstream`` unless the proxy decides to fail them. A share ``rate`` of requests (chosen with a
seeded RNG) get a fault, picked by weight from ``kinds``; :meth:`FaultProxy.inject` forces the
next requests' faults in order, for deterministic tests. Fault kinds:

``500`` / ``503`` / ``slowdown``   an S3 XML error (InternalError, ServiceUnavailable, SlowDown)
``403`` / ``nosuchbucket``         AccessDenied / NoSuchBucket (permanent; only when injected)
``reset``                          the connection is reset before the request is forwarded
``stall``                          no answer: the connection is held until the client gives up
                                   (its read timeout) or ``stall_seconds`` pass, then closed
``drop``                           forwarded (it takes effect upstream), then the connection is
                                   reset before the answer: the client sees a lost response

:meth:`FaultProxy.down` makes the port refuse connections (and cuts open ones) until
:meth:`FaultProxy.up`. :attr:`FaultProxy.injected` counts the faults by kind, ``requests`` the
requests seen. Threaded stdlib sockets; :meth:`FaultProxy.stop` closes everything and joins the
threads. Knows HTTP/1.1 and S3 error bodies; nothing of cssfs.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import selectors
import socket
import struct
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from typing import BinaryIO
from urllib.parse import urlsplit

__all__ = ["ERROR_REPLIES", "FaultProxy"]

ERROR_REPLIES: dict[str, tuple[int, str, str]] = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Please reduce your request rate."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "403": (403, "AccessDenied", "Access Denied"),
    "nosuchbucket": (404, "NoSuchBucket", "The specified bucket does not exist"),
}
CONNECTION_FAULTS = ("reset", "stall", "drop")
DEFAULT_KINDS: Mapping[str, float] = {
    "500": 1.0,
    "503": 1.0,
    "slowdown": 1.0,
    "reset": 1.0,
    "stall": 0.5,
    "drop": 1.0,
}
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
)
_MAX_LINE = 65536


class _ClientGone(Exception):
    """The client closed the connection or sent something unreadable."""


def _read_line(rfile: BinaryIO) -> bytes:
    line = rfile.readline(_MAX_LINE)
    if not line:
        raise _ClientGone
    return line


def _read_head(rfile: BinaryIO) -> tuple[str, str, str, list[tuple[str, str]]]:
    """Request line and headers; _ClientGone at a clean end of the connection."""
    line = _read_line(rfile)
    while line in (b"\r\n", b"\n"):  # tolerate blank lines between requests
        line = _read_line(rfile)
    try:
        method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    except ValueError:
        raise _ClientGone from None
    headers: list[tuple[str, str]] = []
    while True:
        line = _read_line(rfile)
        if line in (b"\r\n", b"\n"):
            return method, target, version, headers
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _read_body(rfile: BinaryIO, headers: list[tuple[str, str]]) -> bytes:
    if (_header(headers, "transfer-encoding") or "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int(_read_line(rfile).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while _read_line(rfile) not in (b"\r\n", b"\n"):  # trailers
                    pass
                return bytes(body)
            body += rfile.read(size)
            _read_line(rfile)
    length = int(_header(headers, "content-length") or 0)
    body_bytes = rfile.read(length) if length else b""
    if len(body_bytes) != length:
        raise _ClientGone
    return body_bytes


def _error_reply(kind: str, *, close: bool = False) -> bytes:
    status, code, message = ERROR_REPLIES[kind]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>faultproxy</RequestId></Error>"
    ).encode()
    reason = http.client.responses.get(status, "Error")
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nx-amz-request-id: faultproxy\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    ).encode() + body


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """See the module docstring. Use ``with FaultProxy(upstream) as proxy:`` or start/stop."""

    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.0,
        seed: int = 0,
        kinds: Mapping[str, float] | None = None,
        stall_seconds: float = 30.0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self._upstream = (parts.hostname, parts.port)
        self.rate = rate
        self.kinds = dict(DEFAULT_KINDS if kinds is None else kinds)
        for kind in self.kinds:
            if kind not in ERROR_REPLIES and kind not in CONNECTION_FAULTS:
                raise ValueError(f"unknown fault kind {kind!r}")
        self.stall_seconds = stall_seconds
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._forced: deque[tuple[str, Callable[[str, str], bool] | None]] = deque()
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self._port = 0
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread: threading.Thread | None = None
        self._clients: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()

    # -- control ---------------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        if not self._port:
            raise RuntimeError("FaultProxy is not started")
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> FaultProxy:
        self._listen()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.down()
        for thread in list(self._threads):
            thread.join(timeout=5)
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def down(self) -> None:
        """Refuse new connections and cut the open ones, until :meth:`up`."""
        thread, self._accept_thread = self._accept_thread, None
        if thread is not None:
            self._wake_w.send(b"x")
            thread.join(timeout=5)
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(64)
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)

    def up(self) -> None:
        """Accept connections again, on the same port."""
        if self._accept_thread is None:
            self._listen()

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The proxy is down inside the block."""
        self.down()
        try:
            yield
        finally:
            self.up()

    def inject(
        self, kind: str, count: int = 1, *, match: Callable[[str, str], bool] | None = None
    ) -> None:
        """The next ``count`` requests get fault ``kind`` (before any random ones); with
        ``match(method, target)``, only requests it accepts (e.g. the POST that completes a
        multipart upload: ``lambda m, t: m == "POST" and "uploadId=" in t``)."""
        if kind not in ERROR_REPLIES and kind not in CONNECTION_FAULTS:
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._forced.extend([(kind, match)] * count)

    def reset_counts(self) -> None:
        with self._lock:
            self.injected.clear()
            self.requests = 0

    # -- serving ---------------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self._port))
        listener.listen(64)
        self._port = listener.getsockname()[1]
        self._wake_r.setblocking(False)
        thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name="faultproxy-accept", daemon=True
        )
        self._accept_thread = thread
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        with listener, selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if self._wake_r in ready:
                    return
                try:
                    client, _ = listener.accept()
                except OSError:
                    continue
                thread = threading.Thread(
                    target=self._serve, args=(client,), name="faultproxy-conn", daemon=True
                )
                with self._lock:
                    self._clients.add(client)
                    self._threads.add(thread)
                thread.start()

    def _decide(self, method: str, target: str) -> str | None:
        with self._lock:
            self.requests += 1
            kind: str | None = None
            for i, (forced, match) in enumerate(self._forced):
                if match is None or match(method, target):
                    kind = forced
                    del self._forced[i]
                    break
            if kind is None and self.rate > 0 and self.kinds and self._rng.random() < self.rate:
                names = list(self.kinds)
                kind = self._rng.choices(names, weights=[self.kinds[n] for n in names])[0]
            if kind is not None:
                self.injected[kind] += 1
            return kind

    def _serve(self, client: socket.socket) -> None:
        upstream: http.client.HTTPConnection | None = None
        rfile = client.makefile("rb")
        try:
            while not self._stopping.is_set():
                method, target, _version, headers = _read_head(rfile)
                fault = self._decide(method, target)
                expects = (_header(headers, "expect") or "").lower() == "100-continue"
                if fault == "reset":
                    _reset(client)
                    return
                if fault == "stall":
                    self._stall(client)
                    return
                if fault in ERROR_REPLIES:
                    if expects:  # answer instead of 100 Continue; the body never comes
                        client.sendall(_error_reply(fault, close=True))
                        return
                    _read_body(rfile, headers)
                    client.sendall(_error_reply(fault))
                    continue
                if expects:
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _read_body(rfile, headers)
                if upstream is None:
                    upstream = http.client.HTTPConnection(*self._upstream, timeout=120)
                reply = self._forward(upstream, method, target, headers, body)
                if fault == "drop":
                    _reset(client)
                    return
                client.sendall(reply)
        except (_ClientGone, OSError, http.client.HTTPException, ValueError):
            pass
        finally:
            if upstream is not None:
                upstream.close()
            with contextlib.suppress(OSError):
                rfile.close()
            with contextlib.suppress(OSError):
                client.close()
            with self._lock:
                self._clients.discard(client)
                self._threads.discard(threading.current_thread())

    def _stall(self, client: socket.socket) -> None:
        """Hold the connection, unanswered, until the client closes it or time runs out."""
        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ)
            remaining = self.stall_seconds
            while remaining > 0 and not self._stopping.is_set():
                if selector.select(timeout=min(remaining, 0.5)):
                    with contextlib.suppress(OSError):
                        if not client.recv(65536):
                            break  # the client gave up
                remaining -= 0.5
        _reset(client)

    @staticmethod
    def _forward(
        upstream: http.client.HTTPConnection,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> bytes:
        upstream.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                upstream.putheader(name, value)
        if body or method in ("PUT", "POST"):
            upstream.putheader("Content-Length", str(len(body)))
        upstream.endheaders(body or None)
        response = upstream.getresponse()
        data = response.read()
        lines = [f"HTTP/1.1 {response.status} {response.reason}"]
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                lines.append(f"{name}: {value}")
        if method == "HEAD":
            length = response.getheader("Content-Length")
            if length is not None:
                lines.append(f"Content-Length: {length}")
        else:
            lines.append(f"Content-Length: {len(data)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data
