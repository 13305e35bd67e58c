"""`cssfs get` / `cat` paths made faster, checked to keep what they guarantee.

- A file readable only through a group key: `get` opens files with our own identity first and
  loads group keys only when that fails; a file for neither fails with exit 12, leaving nothing.
- S3Store.get_into reads a body straight into the caller's buffer (below botocore's copying
  readinto): the connection goes back to the pool after each body (one TCP connection for many
  GETs), and a body cut short is an incomplete read that is retried, never a short success.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cssfs.cli import ExitCode
from cssfs.errors import NoIdentityMatchError
from tests.support.clirun import Run, ok

# -- group keys are loaded only when needed ----------------------------------------------------


def test_get_and_cat_through_a_group_key(env: Path, run: Run) -> None:
    alice = ok(run("keygen", "--no-passphrase")).out.split()[0]
    carol = ok(run("keygen", "--no-passphrase", "-o", "carol.id")).out.split()[0]
    ok(run("keygen", "--no-passphrase", "-o", "dave.id"))
    ok(run("contacts", "add", "carol", carol))
    ok(run("contacts", "add", "alice", alice))
    store = env.parent / "bucket"
    store.mkdir()
    url = f"file://{store}"
    data = b"".join(b"line %06d of the group's file\n" % i for i in range(7000))  # > 3 chunks
    (env / "plain").write_bytes(data)
    ok(run("group", "create", "--store", url, "team", "carol"))
    ok(run("share", "--store", url, "docs", "group:team"))
    ok(run("put", "plain", f"{store}//docs/f"))

    # Carol is no recipient of her own: only the group's key opens the file.
    ok(run("-i", "carol.id", "get", f"{store}//docs/f", "got"))
    assert (env / "got").read_bytes() == data
    assert ok(run("-i", "carol.id", "cat", f"{store}//docs/f")).out == data.decode()

    # Dave holds neither key: exit 12, one line, nothing left behind.
    before = sorted(os.listdir(env))
    result = run("-i", "dave.id", "get", f"{store}//docs/f", "dave-got")
    assert result.code == ExitCode.NO_MATCHING_IDENTITY, result
    assert len(result.err.splitlines()) == 1 and "docs/f" in result.err
    assert sorted(os.listdir(env)) == before


# -- S3Store.get_into: straight into the buffer ------------------------------------------------


class _RangeServer:
    """A minimal HTTP/1.1 server answering every GET with the requested range of ``data``
    (keep-alive). ``cut`` bodies are sent only half, then the connection is closed."""

    def __init__(self, data: bytes, cut: int = 0) -> None:
        self.data = data
        self.cut = cut
        self.connections = 0
        self.requests = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._stop = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = f.readline()
                    if not line:
                        return
                    head += line
                self.requests += 1
                m = re.search(rb"(?i)\r\nrange: bytes=(\d+)-(\d+)", head)
                assert m is not None, head
                start, end = int(m[1]), int(m[2]) + 1
                body = self.data[start:end]
                conn.sendall(
                    b"HTTP/1.1 206 Partial Content\r\n"
                    + f"Content-Length: {len(body)}\r\n".encode()
                    + f"Content-Range: bytes {start}-{end - 1}/{len(self.data)}\r\n".encode()
                    + b'ETag: "0123456789abcdef0123456789abcdef"\r\n'
                    + b"Content-Type: application/octet-stream\r\n\r\n"
                )
                if self.cut:
                    self.cut -= 1
                    conn.sendall(body[: len(body) // 2])
                    return
                conn.sendall(body)

    def close(self) -> None:
        """Stop accepting and end every connection: a keep-alive connection left open would
        serve whatever later test reuses a pooled connection to this port."""
        self._stop = True
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._acceptor.join(timeout=10)
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=10)


@pytest.fixture
def range_server() -> Iterator[_RangeServer]:
    server = _RangeServer(os.urandom(3 * 1024 * 1024 + 17))
    try:
        yield server
    finally:
        server.close()


def _store(endpoint: str) -> object:
    from cssfs.store.retry import RetryPolicy
    from cssfs.store.s3 import S3Store

    return S3Store(
        "b", endpoint_url=endpoint, path_style=True, region="us-east-1", seed=1,
        retry=RetryPolicy(attempts=3, budget=5.0, base_delay=0.01, max_delay=0.02),
    )


@pytest.fixture
def _aws_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("_aws_keys")
async def test_get_into_reuses_one_connection(
    range_server: _RangeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib3.response

    from cssfs.store.s3 import S3Store

    copying_reads = 0
    original = urllib3.response.HTTPResponse.read

    def counted_read(self: object, *args: object, **kwargs: object) -> object:
        nonlocal copying_reads
        copying_reads += 1
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(urllib3.response.HTTPResponse, "read", counted_read)
    store = _store(range_server.endpoint)
    assert isinstance(store, S3Store)
    data = range_server.data
    buf = bytearray(1024 * 1024 + 5)
    try:
        for start in (0, 1024 * 1024, 2 * 1024 * 1024, 7):
            with memoryview(buf) as view:
                n = await store.get_into("k", start, view)
            assert n == len(buf) and buf == data[start : start + n]
        tail = bytearray(100)
        with memoryview(tail) as view:  # a range past the end: the bytes there are
            n = await store.get_into("k", len(data) - 17, view)
        assert n == 17 and tail[:17] == data[-17:]
    finally:
        await store.aclose()
    assert range_server.requests == 5
    assert range_server.connections == 1  # every body read to its end gave the connection back
    assert copying_reads == 0  # the bodies went straight into the buffer, not through urllib3


@pytest.mark.usefixtures("_aws_keys")
@pytest.mark.expect_logs("attempt")
async def test_get_into_retries_a_body_cut_short(range_server: _RangeServer) -> None:
    from cssfs.store.s3 import S3Store

    range_server.cut = 2
    store = _store(range_server.endpoint)
    assert isinstance(store, S3Store)
    buf = bytearray(2 * 1024 * 1024)
    try:
        with memoryview(buf) as view:
            n = await store.get_into("k", 1000, view)
    finally:
        await store.aclose()
    assert n == len(buf) and buf == range_server.data[1000 : 1000 + n]
    assert range_server.requests == 3 and store.stats.retries == 2


# -- get_to with the version known: the first GET overlaps the open -----------------------------


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    from cssfs import encstore

    monkeypatch.setattr(encstore, "GET_TO_FILE_SEGMENT_CHUNKS", 3)
    monkeypatch.setattr(encstore, "GET_TO_WRITE_CHUNKS", 2)


@pytest.mark.usefixtures("small_segments")
@pytest.mark.parametrize("chunks", [0, 1, 3, 10])
async def test_get_to_with_the_version_known(store: object, tmp_path: Path, chunks: int) -> None:
    from cssfs.cache import ChunkCache
    from cssfs.encstore import EncryptedStore
    from cssfs.envelope import CHUNK_SIZE
    from cssfs.keys import Identity
    from cssfs.store.base import ObjectStore
    from tests.test_encstore import pattern

    assert isinstance(store, ObjectStore)
    es = EncryptedStore(store, Identity.generate(), cache=ChunkCache(0))
    data = pattern(chunks * CHUNK_SIZE + 77 * (chunks > 0), chunks)
    await es.put("f", data)
    obj = await store.head("f")
    path = tmp_path / "out"
    with open(path, "w+b") as f:  # noqa: ASYNC230 -- a local file, as cssfs get uses
        info = await es.get_to("f", f, etag=obj.etag, cipher_size=obj.size)
    assert info.plain_size == len(data)
    assert path.read_bytes() == data


class _Watched:
    """A MemoryStore whose header GETs take a moment, recording when each call starts/ends."""

    def __init__(self) -> None:
        from cssfs.store.memory import MemoryStore

        self.inner = MemoryStore("")
        self.events: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        import trio

        self.events.append(f"get {start} start")
        await trio.sleep(0.05)  # a slow round trip
        data = await self.inner.get(key, start, end)
        self.events.append(f"get {start} end")
        return data

    async def get_into(self, key: str, start: int, buf: memoryview) -> int:
        self.events.append(f"get_into {start}")
        return await self.inner.get_into(key, start, buf)


@pytest.mark.usefixtures("small_segments")
async def test_get_to_fetches_the_first_segment_during_the_open(tmp_path: Path) -> None:
    from cssfs.cache import ChunkCache
    from cssfs.encstore import EncryptedStore
    from cssfs.envelope import CHUNK_SIZE, HEADER_SIZE
    from cssfs.keys import Identity
    from tests.test_encstore import pattern

    store = _Watched()
    me = Identity.generate()
    es = EncryptedStore(store, me, cache=ChunkCache(0))  # type: ignore[arg-type]
    data = pattern(10 * CHUNK_SIZE + 5, 1)
    await es.put("f", data)
    obj = await store.inner.head("f")
    with open(tmp_path / "out", "w+b") as f:  # noqa: ASYNC230
        await es.get_to("f", f, etag=obj.etag, cipher_size=obj.size)
    assert (tmp_path / "out").read_bytes() == data
    events = store.events
    first = events.index(f"get_into {HEADER_SIZE}")
    assert first < events.index("get 0 end")  # the data GET began before the header arrived
    later = [i for i, e in enumerate(events) if e.startswith("get_into") and i != first]
    assert later and min(later) > events.index("get 0 end")  # the others after the open

    # A file that is not for us: the open fails, and only that one data GET was made.
    other = EncryptedStore(store, Identity.generate(), cache=ChunkCache(0))  # type: ignore[arg-type]
    store.events.clear()
    with open(tmp_path / "out2", "w+b") as f, pytest.raises(NoIdentityMatchError):  # noqa: ASYNC230
        await other.get_to("f", f, etag=obj.etag, cipher_size=obj.size)
    assert [e for e in store.events if e.startswith("get_into")] == [f"get_into {HEADER_SIZE}"]
    assert (tmp_path / "out2").read_bytes() == b""


@pytest.mark.expect_logs(r"^object \S+: ")
@pytest.mark.usefixtures("small_segments")
async def test_get_to_with_the_version_known_writes_only_verified_chunks(
    tmp_path: Path,
) -> None:
    from cssfs.cache import ChunkCache
    from cssfs.encstore import EncryptedStore
    from cssfs.envelope import CHUNK_SIZE, chunk_range
    from cssfs.errors import ChunkAuthError
    from cssfs.keys import Identity
    from cssfs.store.memory import MemoryStore
    from tests.test_encstore import pattern

    store = MemoryStore("")
    es = EncryptedStore(store, Identity.generate(), cache=ChunkCache(0))
    size = 10 * CHUNK_SIZE + 77
    data = pattern(size, 4)
    await es.put("f", data)
    blob = bytearray(await store.get("f"))
    off, length = chunk_range(1, size)  # in the first segment, fetched during the open
    blob[off + length // 2] ^= 1
    info = await store.put("f", bytes(blob))
    path = tmp_path / "out"
    with open(path, "w+b") as f, pytest.raises(ChunkAuthError) as err:  # noqa: ASYNC230
        await es.get_to("f", f, etag=info.etag, cipher_size=info.size)
    assert err.value.index == 1
    got = path.read_bytes()
    assert got[CHUNK_SIZE : 2 * CHUNK_SIZE].strip(b"\0") == b""
