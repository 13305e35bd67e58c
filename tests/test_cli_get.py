"""`cssfs get` / `cat` paths made faster, checked to keep what they guarantee.

- A file readable only through a group key: `get` opens files with our own identity first and
  loads group keys only when that fails; a file for neither fails with exit 12, leaving nothing.
- S3Store.get_into reads a body straight into the caller's buffer (below botocore's copying
  readinto): the connection goes back to the pool after each body (one TCP connection for many
  GETs), and a body cut short is an incomplete read that is retried, never a short success.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cssfs.cli import ExitCode
from tests.support.clirun import Run, ok, private_home, runner

# -- group keys are loaded only when needed ----------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    yield private_home(monkeypatch, tmp_path)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    return runner(capsys)


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
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
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
        self._stop = True
        self._sock.close()


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
