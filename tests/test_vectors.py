"""The CCTV-style test vectors in tests/vectors/ (format: tests/vectors/README.md).

(a) scripts/gen_vectors.py reproduces the committed files byte for byte; (b) each vector fails
(or succeeds) exactly as its ``expect:`` line says, through every decoder: streaming from a
seekable file, streaming from a pipe, and random access (header, table, then chunk by chunk);
(c) whatever plaintext a decoder releases before a failure is a prefix of the vector's
plaintext, and matches the ``payload:`` hash when it is all of it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType

import pytest

from cssfs.envelope import (
    HEADER_SIZE,
    check_envelope_size,
    chunk_count,
    chunk_range,
    open_header,
    table_range,
)
from cssfs.envstream import decrypt_stream
from cssfs.errors import (
    CssfsError,
    FormatError,
    HeaderAuthError,
    NoIdentityMatchError,
    PayloadError,
    SignatureError,
)
from cssfs.keys import Identity, parse_identity_file

ROOT = Path(__file__).resolve().parent.parent
VECTOR_DIR = ROOT / "tests" / "vectors"
VECTOR_FILES = sorted(VECTOR_DIR.glob("*.txt"))

EXPECT: dict[str, type[CssfsError] | None] = {
    "success": None,
    "no match": NoIdentityMatchError,
    "header failure": FormatError,
    "header MAC failure": HeaderAuthError,
    "signature failure": SignatureError,
    "payload failure": PayloadError,
}


def load_generator() -> ModuleType:
    path = ROOT / "scripts" / "gen_vectors.py"
    spec = importlib.util.spec_from_file_location("gen_vectors", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_vectors", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    return load_generator()


@pytest.fixture(scope="module")
def plaintexts(generator: ModuleType) -> dict[str, bytes]:
    return {v.name: v.plaintext for v in generator.all_vectors()}


def parse_vector(data: bytes) -> tuple[dict[str, str], bytes]:
    head, sep, body = data.partition(b"\n\n")
    assert sep, "no blank line after the vector header"
    meta: dict[str, str] = {}
    for line in head.decode("utf-8").splitlines():
        key, _, value = line.partition(": ")
        assert key not in meta
        meta[key] = value
    assert set(meta) == {"expect", "payload", "file key", "identity", "comment"}
    return meta, body


class Pipe(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = min(len(b), 4099, len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


class Sink(io.RawIOBase):
    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.data += bytes(b)
        return len(b)


def decode_seekable(data: bytes, identity: Identity, out: bytearray) -> None:
    sink = Sink()
    try:
        decrypt_stream(io.BytesIO(data), sink, identity)
    finally:
        out += sink.data


def decode_pipe(data: bytes, identity: Identity, out: bytearray) -> None:
    sink = Sink()
    try:
        decrypt_stream(Pipe(data), sink, identity)
    finally:
        out += sink.data


def decode_random_access(data: bytes, identity: Identity, out: bytearray) -> None:
    opened = open_header(data[:HEADER_SIZE], identity)
    size = opened.header.plain_size
    check_envelope_size(size, len(data))
    off, length = table_range(size)
    opened.load_table(data[off : off + length])
    for i in range(chunk_count(size)):
        o, n = chunk_range(i, size)
        out += opened.open_chunk(i, data[o : o + n])


DECODERS = {"seekable": decode_seekable, "pipe": decode_pipe, "random": decode_random_access}


def test_vectors_exist() -> None:
    names = {p.stem for p in VECTOR_FILES}
    expects = {parse_vector(p.read_bytes())[0]["expect"] for p in VECTOR_FILES}
    assert expects == set(EXPECT)
    for required in ("success_empty", "success_1", "success_65536", "success_65537",
                     "no_match", "chunks_swapped", "trailing_data", "header_bad_padding",
                     "header_unknown_version", "truncated_chunk_edge", "chunk_from_other_file",
                     "signature_other_key", "stanza_tampered", "chunk_flipped"):
        assert required in names


def test_regenerating_reproduces_the_committed_files(generator: ModuleType,
                                                     tmp_path: Path) -> None:
    written = generator.generate(tmp_path)
    assert sorted(p.name for p in written) == [p.name for p in VECTOR_FILES]
    for path in VECTOR_FILES:
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), (
            f"{path.name} drifted: run scripts/gen_vectors.py and review the diff"
        )


def test_generator_rng_is_the_documented_chacha20(generator: ModuleType) -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    key = b"TEST RANDOMNESS TEST RANDOMNESS!"
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    rng = generator.TestRng()
    assert rng(5) + rng(100) == stream.update(bytes(105))


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("path", VECTOR_FILES, ids=[p.stem for p in VECTOR_FILES])
def test_vector(path: Path, decoder: str, plaintexts: dict[str, bytes]) -> None:
    meta, data = parse_vector(path.read_bytes())
    expected = EXPECT[meta["expect"]]
    identity = parse_identity_file(meta["identity"].encode(), None)
    full = plaintexts[path.stem]
    assert hashlib.sha256(full).hexdigest() == meta["payload"]
    out = bytearray()
    if expected is None:
        DECODERS[decoder](data, identity, out)
        assert hashlib.sha256(out).hexdigest() == meta["payload"]
    else:
        with pytest.raises(CssfsError) as info:
            DECODERS[decoder](data, identity, out)
        assert isinstance(info.value, expected), repr(info.value)
        others = [c for c in EXPECT.values() if c is not None and c is not expected]
        assert not any(isinstance(info.value, c) for c in others), repr(info.value)
        # (c) released plaintext is a prefix, and all of it only if it hashes right.
        assert full.startswith(bytes(out))
        if len(out) == len(full):
            assert hashlib.sha256(out).hexdigest() == meta["payload"]
        if meta["expect"] != "payload failure":
            assert out == b""  # header failures release nothing


@pytest.mark.parametrize("path", VECTOR_FILES, ids=[p.stem for p in VECTOR_FILES])
def test_vector_file_key(path: Path) -> None:
    meta, data = parse_vector(path.read_bytes())
    if meta["expect"] not in ("success", "payload failure"):
        return
    identity = parse_identity_file(meta["identity"].encode(), None)
    assert open_header(data[:HEADER_SIZE], identity).file_key.hex() == meta["file key"]
