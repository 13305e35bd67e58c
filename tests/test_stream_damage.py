"""cssfs.envelope stream helpers on a ten-chunk file: on damage anywhere, the first bad chunk is
the one reported, with its table entry checked before its tag, and exactly the chunks before it
are released (seekable input); a pipe releases chunks as their tags verify and finds a chunk that
a co-recipient forged (tag valid, not in the table) at the end."""

from __future__ import annotations

import io

import pytest

from cssfs import envelope as env
from cssfs.crypto import CHUNK_SIZE, PayloadCipher, derive_file_keys
from cssfs.envelope import chunk_range, envelope_size, open_header
from cssfs.envstream import decrypt_stream, encrypt_stream
from cssfs.errors import ChunkAuthError, PayloadError, TruncatedError
from tests.test_envelope import ALICE, BOB, Pipe, Sink, flipped, plaintext, seal

CS = CHUNK_SIZE
SIZE = 9 * CS + 321  # ten chunks, the last one short
PT = plaintext(SIZE, 7)


def _decrypt(data: bytes, pipe: bool) -> bytes:
    out: Sink | io.BytesIO = Sink() if pipe else io.BytesIO()
    decrypt_stream(Pipe(data) if pipe else io.BytesIO(data), out, ALICE)
    return _released(out)


def _released(out: Sink | io.BytesIO) -> bytes:
    return bytes(out.data) if isinstance(out, Sink) else out.getvalue()


@pytest.mark.parametrize("size", [0, 1, CS, 2 * CS, 3 * CS, 6 * CS + 1, SIZE])
def test_round_trip(size: int) -> None:
    pt = plaintext(size, size)
    data = seal(pt, BOB)
    assert len(data) == envelope_size(size)
    for pipe in (False, True):
        assert _decrypt(data, pipe) == pt
    sink = Sink()  # the spooled (non-seekable output) path gives the same envelope size
    encrypt_stream(io.BytesIO(pt), sink, ALICE, [])
    assert len(sink.data) == envelope_size(size)


@pytest.mark.parametrize("chunk", range(10))
@pytest.mark.parametrize("pipe", [False, True])
def test_flipped_chunk_releases_exactly_the_chunks_before_it(chunk: int, pipe: bool) -> None:
    data = seal(PT)
    off, length = chunk_range(chunk, SIZE)
    out: Sink | io.BytesIO = Sink() if pipe else io.BytesIO()
    with pytest.raises(ChunkAuthError) as info:
        decrypt_stream(Pipe(flipped(data, off + length // 2)) if pipe
                       else io.BytesIO(flipped(data, off + length // 2)), out, ALICE)
    assert info.value.index == chunk
    assert _released(out) == PT[: chunk * CS]
    if not pipe:  # the table is checked first: a changed chunk fails its entry
        assert "chunk table" in str(info.value)


def _forge(data: bytes, index: int) -> bytes:
    """Chunk ``index`` replaced by one BOB (a co-recipient, who knows the file key) made: its
    tag verifies, its table entry does not."""
    opened = open_header(data[: env.HEADER_SIZE], BOB)
    cipher = PayloadCipher(derive_file_keys(opened.file_key, opened.header.salt).payload_key)
    off, length = chunk_range(index, SIZE)
    forged = cipher.seal(index, b"F" * (length - env.TAG_SIZE), last=index == 9)
    return data[:off] + forged + data[off + length :]


def _listed_bad_tag(index: int) -> bytes:
    """The envelope of PT as ALICE would write it, except that chunk ``index`` has a broken
    tag that its (signed) table entry lists: the table check passes, GCM fails."""
    w = env.EnvelopeWriter(ALICE, [BOB.recipient])
    chunks = []
    for i in range(10):
        ct = bytearray(w.seal_chunk(PT[i * CS : (i + 1) * CS], last=i == 9))
        if i == index:
            ct[-1] ^= 1
            w._hashes[i] = env.sha256(ct)  # the writer lists the broken chunk
        chunks.append(bytes(ct))
    header, table = w.finish()
    return header + b"".join(chunks) + table


@pytest.mark.parametrize(("forged", "bad_tag"), [(3, 7), (7, 3), (4, 5), (5, 4), (8, 9), (9, 8)])
def test_first_bad_chunk_wins_whichever_check_fails(forged: int, bad_tag: int) -> None:
    data = _forge(_listed_bad_tag(bad_tag), forged)
    out = io.BytesIO()
    with pytest.raises(ChunkAuthError) as info:
        decrypt_stream(io.BytesIO(data), out, ALICE)
    first = min(forged, bad_tag)
    assert info.value.index == first
    assert ("chunk table" in str(info.value)) == (first == forged)
    assert out.getvalue() == PT[: first * CS]


@pytest.mark.parametrize("bad_tag", [0, 5, 9])
@pytest.mark.parametrize("pipe", [False, True])
def test_listed_chunk_with_a_bad_tag(bad_tag: int, pipe: bool) -> None:
    out: Sink | io.BytesIO = Sink() if pipe else io.BytesIO()
    data = _listed_bad_tag(bad_tag)
    with pytest.raises(ChunkAuthError, match="does not authenticate") as info:
        decrypt_stream(Pipe(data) if pipe else io.BytesIO(data), out, ALICE)
    assert info.value.index == bad_tag
    assert _released(out) == PT[: bad_tag * CS]


def test_pipe_forgery_found_at_the_end() -> None:
    data = _forge(seal(PT, BOB), 6)
    sink = Sink()
    with pytest.raises(PayloadError, match="signature"):
        decrypt_stream(Pipe(data), sink, ALICE)
    assert bytes(sink.data) == PT[: 6 * CS] + b"F" * CS + PT[7 * CS :]


@pytest.mark.parametrize("chunk", [1, 4, 9])
def test_truncated_inside_a_chunk_names_it(chunk: int) -> None:
    data = seal(PT)
    off, _ = chunk_range(chunk, SIZE)
    sink = Sink()
    with pytest.raises(TruncatedError, match=f"chunk {chunk}"):
        decrypt_stream(Pipe(data[: off + 10]), sink, ALICE)
    assert PT.startswith(bytes(sink.data))
