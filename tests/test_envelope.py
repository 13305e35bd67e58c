"""cssfs.envelope: geometry, header wire format, sealing/opening, reseal, stream helpers, tamper."""

from __future__ import annotations

import contextlib
import io
import os
import random
import tempfile
import threading
import tracemalloc
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cssfs import envelope as env
from cssfs import envstream
from cssfs.crypto import CHUNK_SIZE, sha256
from cssfs.envelope import (
    HEADER_SIZE,
    MAX_RECIPIENTS,
    UNBOUND,
    EnvelopeWriter,
    Header,
    Stanza,
    chunk_count,
    chunk_plain_range,
    chunk_range,
    chunks_for,
    envelope_size,
    object_binding,
    open_header,
    parse_header,
    plain_size,
    table_range,
    verify_signature,
)
from cssfs.envstream import decrypt_stream, encrypt_stream
from cssfs.errors import (
    BindingError,
    ChunkAuthError,
    ConfigError,
    FormatError,
    HeaderAuthError,
    NoIdentityMatchError,
    PayloadError,
    SignatureError,
    TrailingDataError,
    TruncatedError,
    UnsupportedVersionError,
)
from cssfs.keys import Identity

CS = CHUNK_SIZE
BOUNDARY = [0, 1, CS - 1, CS, CS + 1, CS + 100, 2 * CS, 2 * CS + 500]

ALICE = Identity.generate()
BOB = Identity.generate()
CAROL = Identity.generate()


def plaintext(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def seeded_rng(seed: int):
    r = random.Random(seed)
    return r.randbytes


class Pipe(io.RawIOBase):
    """A non-seekable stream over bytes that returns short reads, like a pipe."""

    def __init__(self, data: bytes, step: int = 10007) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = min(len(b), self._step, len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


class Sink(io.RawIOBase):
    """A non-seekable writable stream that keeps what it got."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.data += bytes(b)
        return len(b)


def seal(pt: bytes, *recipients: Identity, writer: Identity = ALICE, **kw) -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(pt), out, writer, [r.recipient for r in recipients], **kw)
    return out.getvalue()


def decrypt(data: bytes, who: Identity = ALICE, *, pipe: bool = False, **kw) -> bytes:
    if pipe:
        sink = Sink()
        decrypt_stream(Pipe(data), sink, who, **kw)
        return bytes(sink.data)
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(data), out, who, **kw)
    return out.getvalue()


def decrypt_random_access(data: bytes, who: Identity = ALICE) -> bytes:
    opened = open_header(data[:HEADER_SIZE], who)
    size = opened.header.plain_size
    env.check_envelope_size(size, len(data))
    off, length = table_range(size)
    opened.load_table(data[off : off + length])
    parts = []
    for i in range(chunk_count(size)):
        o, n = chunk_range(i, size)
        parts.append(opened.open_chunk(i, data[o : o + n]))
    return b"".join(parts)


# -- geometry -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "n", "size", "table"),
    [
        (0, 1, 4144, (4112, 32)),
        (1, 1, 4145, (4113, 32)),
        (CS, 1, 69680, (69648, 32)),
        (CS + 1, 2, 69729, (69665, 64)),
        (2 * CS, 2, 135264, (135200, 64)),
    ],
)
def test_geometry_worked_examples(p: int, n: int, size: int, table: tuple[int, int]) -> None:
    assert chunk_count(p) == n
    assert envelope_size(p) == size == HEADER_SIZE + p + 48 * n
    assert plain_size(size) == p
    assert table_range(p) == table
    assert table[0] + table[1] == size


def test_chunk_ranges_are_contiguous() -> None:
    for p in BOUNDARY:
        pos = HEADER_SIZE
        plain = 0
        for i in range(chunk_count(p)):
            off, length = chunk_range(i, p)
            poff, plen = chunk_plain_range(i, p)
            assert (off, poff) == (pos, plain)
            assert length == plen + 16
            assert plen == CS or i == chunk_count(p) - 1
            pos += length
            plain += plen
        assert plain == p
        assert table_range(p)[0] == pos
        with pytest.raises(ValueError):
            chunk_range(chunk_count(p), p)
        with pytest.raises(ValueError):
            chunk_range(-1, p)


@settings(max_examples=300)
@given(st.integers(0, 1 << 50))
def test_plain_size_inverts_envelope_size(n: int) -> None:
    assert plain_size(envelope_size(n)) == n


@settings(max_examples=300)
@given(st.integers(1, 1 << 34), st.integers(1, 48))
def test_impossible_sizes_rejected(chunks: int, gap: int) -> None:
    # Between the largest envelope of k chunks and the smallest of k+1 lie 48 impossible sizes.
    size = envelope_size(chunks * CS) + gap
    with pytest.raises(FormatError):
        plain_size(size)


def test_plain_size_exhaustive_small() -> None:
    valid = {envelope_size(p) for p in range(0, 3 * CS + 100)}
    for s in range(0, envelope_size(3 * CS) + 60):
        if s in valid:
            assert envelope_size(plain_size(s)) == s
        else:
            with pytest.raises(FormatError):
                plain_size(s)


@settings(max_examples=300)
@given(st.integers(0, 5 * CS), st.integers(0, 5 * CS), st.integers(0, 5 * CS))
def test_chunks_for_covers_exactly(offset: int, length: int, size: int) -> None:
    idx = chunks_for(offset, length, size)
    want_end = min(offset + length, size)
    if want_end <= offset:
        assert len(idx) == 0
        return
    covered = [chunk_plain_range(i, size) for i in idx]
    assert covered[0][0] <= offset < covered[0][0] + covered[0][1]
    last_off, last_len = covered[-1]
    assert last_off < want_end <= last_off + last_len
    assert list(idx) == list(range(idx.start, idx.stop))  # contiguous, in order


def test_chunks_for_rejects_negative() -> None:
    with pytest.raises(ValueError):
        chunks_for(-1, 1, 10)
    with pytest.raises(ValueError):
        chunk_count(-1)


def test_object_binding() -> None:
    assert object_binding("a/b") == sha256(b"cssfs.v1 object\x00a/b")
    assert object_binding("a/b") != object_binding("a/c")
    assert object_binding("é") == sha256(b"cssfs.v1 object\x00" + "é".encode())
    assert bytes(32) == UNBOUND


# -- header wire format ---------------------------------------------------------------------

b32 = st.binary(min_size=32, max_size=32)
stanzas = st.builds(
    Stanza, st.binary(min_size=8, max_size=8), b32, st.binary(min_size=48, max_size=48)
)
headers = st.builds(
    Header,
    version=st.just(1),
    chunk_size=st.just(CS),
    plain_size=st.integers(0, (1 << 64) - 1),
    mtime_ns=st.integers(0, (1 << 64) - 1),
    mode=st.integers(0, 0o7777),
    salt=st.binary(min_size=16, max_size=16),
    binding=b32,
    writer=b32,
    commitment=b32,
    table_hash=b32,
    stanzas=st.lists(stanzas, min_size=1, max_size=MAX_RECIPIENTS).map(tuple),
    mac=b32,
    signature=st.binary(min_size=64, max_size=64),
)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(headers)
def test_header_round_trip(h: Header) -> None:
    raw = h.to_bytes()
    assert len(raw) == HEADER_SIZE
    assert parse_header(raw) == h
    n = len(h.stanzas)
    assert raw[176:178] == n.to_bytes(2, "big")
    assert h.mac_input() == raw[: 178 + 88 * n]
    assert raw[178 + 88 * n : 210 + 88 * n] == h.mac
    assert raw[210 + 88 * n : 274 + 88 * n] == h.signature
    assert not any(raw[274 + 88 * n :])


@settings(max_examples=300)
@given(st.binary(max_size=5000))
def test_parse_random_bytes_only_format_error(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        parse_header(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(headers, st.lists(st.tuples(st.integers(0, HEADER_SIZE - 1), st.integers(0, 255)),
                         min_size=1, max_size=4))
def test_parse_mutated_header_only_format_error(h: Header, edits) -> None:
    raw = bytearray(h.to_bytes())
    for pos, value in edits:
        raw[pos] = value
    try:
        got = parse_header(bytes(raw))
    except FormatError:
        return
    assert got.to_bytes() == bytes(raw)  # what parses re-serializes identically


def valid_header_bytes() -> bytes:
    return seal(b"x")[:HEADER_SIZE]


@pytest.mark.parametrize(
    ("pos", "value", "exc"),
    [
        (0, ord("C"), FormatError),
        (6, 0, UnsupportedVersionError),
        (6, 2, UnsupportedVersionError),
        (7, 12, FormatError),
        (24, 0x01, FormatError),  # mode bit 24
        (26, 0x10, FormatError),  # mode bit 0o10000
        (28, 0x01, FormatError),  # reserved
        (176, 0x01, FormatError),  # count 256 + 1
        (4095, 0x01, FormatError),  # padding
    ],
)
def test_parse_strictness(pos: int, value: int, exc: type[Exception]) -> None:
    raw = bytearray(valid_header_bytes())
    raw[pos] = value
    with pytest.raises(exc):
        parse_header(bytes(raw))


def test_parse_length_checked() -> None:
    raw = valid_header_bytes()
    for bad in (raw[:-1], raw + b"\x00", b""):
        with pytest.raises(FormatError):
            parse_header(bad)


def test_header_constructor_validates() -> None:
    h = parse_header(valid_header_bytes())
    for change in (
        {"version": 2}, {"chunk_size": 4096}, {"mode": 0o10000}, {"salt": bytes(15)},
        {"stanzas": ()}, {"stanzas": h.stanzas * 44}, {"plain_size": 1 << 64}, {"mac": b""},
    ):
        with pytest.raises(ValueError):
            replace(h, **change)
    with pytest.raises(ValueError):
        Stanza(bytes(7), bytes(32), bytes(48))


# -- sealing and opening --------------------------------------------------------------------


@pytest.mark.parametrize("size", BOUNDARY)
def test_writer_and_open_header_round_trip(size: int) -> None:
    pt = plaintext(size, size)
    w = EnvelopeWriter(ALICE, [BOB.recipient], binding=object_binding("k"), mtime_ns=123,
                       mode=0o600)
    pieces = [pt[i : i + CS] for i in range(0, len(pt), CS)] or [b""]
    chunks = [w.seal_chunk(p, last=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    assert w.plain_size == size
    header, table = w.finish()
    assert len(header) == HEADER_SIZE and len(table) == 32 * chunk_count(size)
    data = header + b"".join(chunks) + table
    assert len(data) == envelope_size(size)
    for who in (ALICE, BOB):
        opened = open_header(header, who, binding=object_binding("k"))
        h = opened.header
        assert (h.plain_size, h.mtime_ns, h.mode) == (size, 123, 0o600)
        assert h.writer == ALICE.recipient.ed25519
        assert h.key_ids == (ALICE.recipient.key_id, BOB.recipient.key_id)
        assert decrypt_random_access(data, who) == pt
    with pytest.raises(NoIdentityMatchError):
        open_header(header, CAROL)


@pytest.mark.parametrize("size", BOUNDARY)
@pytest.mark.parametrize("src_pipe", [False, True])
@pytest.mark.parametrize("dst_pipe", [False, True])
def test_stream_round_trip(size: int, src_pipe: bool, dst_pipe: bool) -> None:
    pt = plaintext(size, size + 1)
    src = Pipe(pt, step=777) if src_pipe else io.BytesIO(pt)
    if dst_pipe:
        sink = Sink()
        encrypt_stream(src, sink, ALICE, [BOB.recipient])
        data = bytes(sink.data)
    else:
        out = io.BytesIO()
        out.write(b"prefix")  # the header goes where dst was, not at offset 0
        encrypt_stream(src, out, ALICE, [BOB.recipient])
        data = out.getvalue()[6:]
    assert len(data) == envelope_size(size)
    for who in (ALICE, BOB):
        assert decrypt(data, who) == pt
        assert decrypt(data, who, pipe=True) == pt
        assert decrypt_random_access(data, who) == pt


def test_stream_decrypt_from_the_middle_of_a_file() -> None:
    data = seal(plaintext(CS + 5))
    src = io.BytesIO(b"junk" + data)
    src.seek(4)
    out = io.BytesIO()
    decrypt_stream(src, out, ALICE)
    assert out.getvalue() == plaintext(CS + 5)


def test_deterministic_given_rng() -> None:
    a = seal(b"hello", BOB, rng=seeded_rng(3))
    b = seal(b"hello", BOB, rng=seeded_rng(3))
    c = seal(b"hello", BOB, rng=seeded_rng(4))
    assert a == b != c
    sink = Sink()
    encrypt_stream(io.BytesIO(b"hello"), sink, ALICE, [BOB.recipient], rng=seeded_rng(3))
    assert bytes(sink.data) == a  # the spooled path writes the same bytes


def test_fresh_file_key_and_salt_per_envelope() -> None:
    a, b = parse_header(seal(b"x")[:HEADER_SIZE]), parse_header(seal(b"x")[:HEADER_SIZE])
    assert a.salt != b.salt and a.commitment != b.commitment


def test_writer_enforces_chunk_rules() -> None:
    w = EnvelopeWriter(ALICE, [])
    with pytest.raises(ValueError):
        w.seal_chunk(b"short", last=False)
    with pytest.raises(ValueError):
        w.seal_chunk(bytes(CS + 1), last=True)
    with pytest.raises(ValueError):
        w.finish()
    w.seal_chunk(bytes(CS), last=False)
    with pytest.raises(ValueError):
        w.seal_chunk(b"", last=True)  # a multiple of 64 KiB has no empty final chunk
    w.seal_chunk(bytes(CS), last=True)
    with pytest.raises(ValueError):
        w.seal_chunk(b"", last=True)
    header, _ = w.finish()
    assert parse_header(header).plain_size == 2 * CS


def test_recipients_writer_first_and_deduplicated() -> None:
    w = EnvelopeWriter(ALICE, [BOB.recipient, ALICE.recipient, BOB.recipient, CAROL.recipient])
    w.seal_chunk(b"", last=True)
    h = parse_header(w.finish()[0])
    assert h.key_ids == tuple(i.recipient.key_id for i in (ALICE, BOB, CAROL))


def test_recipient_limit() -> None:
    many = [Identity.generate().recipient for _ in range(MAX_RECIPIENTS)]
    w = EnvelopeWriter(ALICE, many[: MAX_RECIPIENTS - 1])
    w.seal_chunk(b"x", last=True)
    header, _ = w.finish()
    assert len(parse_header(header).stanzas) == MAX_RECIPIENTS
    with pytest.raises(ConfigError, match="43"):
        EnvelopeWriter(ALICE, many)


def test_low_order_recipient_refused_by_the_writer() -> None:
    from cssfs.errors import KeyFormatError
    from cssfs.keys import Recipient

    with pytest.raises(KeyFormatError, match="low-order"):
        EnvelopeWriter(ALICE, [Recipient(bytes(32), None)])


def test_writer_validates_metadata() -> None:
    with pytest.raises(ValueError):
        EnvelopeWriter(ALICE, [], mode=0o10000)
    with pytest.raises(ValueError):
        EnvelopeWriter(ALICE, [], binding=bytes(31))
    with pytest.raises(ValueError):
        EnvelopeWriter(ALICE, [], mtime_ns=-1)


def test_signature_and_commitment_follow_the_spec() -> None:
    data = seal(b"hello", BOB)
    h = parse_header(data[:HEADER_SIZE])
    verify_signature(h)  # no identity needed
    msg = b"cssfs.v1 signature\x00" + data[:16] + h.salt + h.writer + h.commitment + h.table_hash
    assert h.signed_message() == msg
    opened = open_header(data[:HEADER_SIZE], BOB)
    from cssfs.crypto import derive_file_keys, hmac_sha256

    keys = derive_file_keys(opened.file_key, h.salt)
    assert keys.commitment == h.commitment
    assert hmac_sha256(keys.mac_key, data[: 178 + 88 * 2]) == h.mac
    off, length = table_range(5)
    assert sha256(data[off : off + length]) == h.table_hash
    assert data[off : off + length] == sha256(data[HEADER_SIZE:off])


def test_binding() -> None:
    data = seal(b"hello", binding=object_binding("a"))
    head = data[:HEADER_SIZE]
    open_header(head, ALICE)  # None: not checked
    open_header(head, ALICE, binding=object_binding("a"))
    with pytest.raises(BindingError):
        open_header(head, ALICE, binding=object_binding("b"))
    with pytest.raises(BindingError):
        decrypt(data, binding=UNBOUND)
    assert decrypt(data, binding=object_binding("a")) == b"hello"
    unbound = seal(b"hello")
    assert parse_header(unbound[:HEADER_SIZE]).binding == UNBOUND
    with pytest.raises(BindingError):
        open_header(unbound[:HEADER_SIZE], ALICE, binding=object_binding("a"))


# -- reseal ---------------------------------------------------------------------------------


def test_reseal_adds_recipients_keeps_writer_and_payload() -> None:
    pt = plaintext(CS + 10)
    data = seal(pt, BOB, binding=object_binding("a"), mtime_ns=5, mode=0o640)
    opened = open_header(data[:HEADER_SIZE], BOB)  # a co-recipient may add recipients
    new_head = opened.reseal(add=[CAROL.recipient, ALICE.recipient, CAROL.recipient],
                             binding=object_binding("b"), mtime_ns=9, mode=0o600)
    old, new = parse_header(data[:HEADER_SIZE]), parse_header(new_head)
    assert new.key_ids == (*old.key_ids, CAROL.recipient.key_id)
    assert new.stanzas[:2] == old.stanzas
    assert (new.signature, new.writer, new.commitment, new.table_hash) == (
        old.signature, old.writer, old.commitment, old.table_hash)
    assert (new.binding, new.mtime_ns, new.mode) == (object_binding("b"), 9, 0o600)
    new_data = new_head + data[HEADER_SIZE:]
    for who in (ALICE, BOB, CAROL):
        assert decrypt(new_data, who, binding=object_binding("b")) == pt
    with pytest.raises(BindingError):
        decrypt(new_data, CAROL, binding=object_binding("a"))
    # Nothing changed: same header bytes but a fresh MAC computation gives the same MAC.
    assert opened.reseal() == data[:HEADER_SIZE]


def test_writer_opened_and_after_reseal_match_a_real_open() -> None:
    """What the journal keeps in memory for a file it just sealed (the writer's own view, then
    the view after a reseal) opens chunks exactly as open_header of those bytes does, and
    refuses a header of another envelope."""
    pt = plaintext(2 * CS + 3)
    writer = env.EnvelopeWriter(ALICE, [BOB.recipient], binding=object_binding("a"))
    chunks = [writer.seal_chunk(pt[i : i + CS], last=i + CS >= len(pt))
              for i in range(0, len(pt), CS)]
    header, table = writer.finish()
    data = header + b"".join(chunks) + table
    mine = writer.opened(header)
    assert mine.header == open_header(header, ALICE).header and mine.table_loaded
    assert decrypt_random_access(data) == pt
    for i, ct in enumerate(chunks):
        assert mine.open_chunk(i, ct) == pt[i * CS : (i + 1) * CS]
    new_head = mine.reseal(add=[CAROL.recipient], mtime_ns=7, mode=0o600)
    after = mine.after_reseal(new_head)
    assert after.header == open_header(new_head, CAROL).header
    assert after.open_chunk(2, chunks[2]) == pt[2 * CS :]
    other = seal(pt)  # same plaintext, another file key
    with pytest.raises(ValueError):
        writer.opened(other[:HEADER_SIZE])
    with pytest.raises(ValueError):
        mine.after_reseal(other[:HEADER_SIZE])
    forged = bytearray(new_head)
    forged[-1] ^= 1  # a flipped MAC or signature byte
    with pytest.raises((ValueError, FormatError)):
        mine.after_reseal(bytes(forged))
    unfinished = env.EnvelopeWriter(ALICE, [])
    with pytest.raises(ValueError):
        unfinished.opened(header)


def test_reseal_limit_and_validation() -> None:
    many = [Identity.generate().recipient for _ in range(MAX_RECIPIENTS - 1)]
    data = seal(b"x")
    opened = open_header(data[:HEADER_SIZE], ALICE)
    full_header = opened.reseal(add=many)
    full = open_header(full_header, ALICE)
    assert len(full.header.stanzas) == MAX_RECIPIENTS
    with pytest.raises(ConfigError):
        full.reseal(add=[BOB.recipient])
    assert full.reseal(add=[many[0]]) == full_header  # already present: no-op
    with pytest.raises(ValueError):
        opened.reseal(mode=0o170000)
    with pytest.raises(ValueError):
        opened.reseal(binding=b"short")


def test_reseal_by_the_cloud_is_impossible() -> None:
    # Without the file key, appending a stanza means re-MACing: the cloud cannot.
    data = seal(b"x")
    h = parse_header(data[:HEADER_SIZE])
    fake = Stanza(CAROL.recipient.key_id, bytes(range(32)), bytes(48))
    forged = replace(h, stanzas=(*h.stanzas, fake)).to_bytes()
    with pytest.raises(HeaderAuthError):
        open_header(forged, ALICE)


# -- table and chunk checks -----------------------------------------------------------------


def test_load_table_and_open_chunk_checks() -> None:
    pt = plaintext(CS + 3)
    data = seal(pt)
    opened = open_header(data[:HEADER_SIZE], ALICE)
    off, length = table_range(len(pt))
    table = data[off : off + length]
    with pytest.raises(ValueError):
        opened.open_chunk(0, b"")  # table first
    with pytest.raises(TruncatedError):
        opened.load_table(table[:-1])
    with pytest.raises(PayloadError):
        opened.load_table(table + b"\x00")
    with pytest.raises(PayloadError):
        opened.load_table(table[32:] + table[:32])
    assert not opened.table_loaded
    opened.load_table(table)
    o0, n0 = chunk_range(0, len(pt))
    o1, n1 = chunk_range(1, len(pt))
    c0, c1 = data[o0 : o0 + n0], data[o1 : o1 + n1]
    assert opened.open_chunk(1, c1) == pt[CS:]
    buf = bytearray(CS)
    assert opened.open_chunk_into(0, c0, buf) == CS and buf == pt[:CS]
    with pytest.raises(ChunkAuthError) as info:
        opened.open_chunk(1, c1[:-1])
    assert info.value.index == 1
    with pytest.raises(ChunkAuthError, match="chunk table"):
        opened.open_chunk(0, c0[:-1] + bytes([c0[-1] ^ 1]))
    with pytest.raises(ValueError):
        opened.open_chunk(2, c1)


# -- tamper tests on the streaming decrypt --------------------------------------------------

SIZE = 2 * CS + 500  # three chunks, the last short
PT = plaintext(SIZE, 99)
DATA = seal(PT, BOB)


def flipped(data: bytes, pos: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[pos] ^= mask
    return bytes(b)


HEADER_TAMPER = [
    (8, HeaderAuthError),  # top byte of the plaintext size: parses, the MAC fails
    (16, HeaderAuthError),  # mtime (MAC)
    (27, HeaderAuthError),  # mode (MAC)
    (32, HeaderAuthError),  # salt (commitment)
    (48, HeaderAuthError),  # binding (MAC)
    (80, HeaderAuthError),  # writer (MAC)
    (112, HeaderAuthError),  # commitment
    (144, HeaderAuthError),  # table hash (MAC)
    (178 + 88 + 40, HeaderAuthError),  # bob's wrapped key: MAC still covers it
    (178 + 40, HeaderAuthError),  # alice's wrapped key: her unwrap fails
    (178, NoIdentityMatchError),  # alice's key id
    (178 + 176, HeaderAuthError),  # MAC
    (178 + 176 + 32, SignatureError),  # signature
]


@pytest.mark.parametrize(("pos", "exc"), HEADER_TAMPER)
@pytest.mark.parametrize("pipe", [False, True])
def test_header_tamper_detected_before_any_output(pos: int, exc: type[Exception],
                                                  pipe: bool) -> None:
    bad = flipped(DATA, pos)
    out = Sink()
    src = Pipe(bad) if pipe else io.BytesIO(bad)
    with pytest.raises(exc):
        decrypt_stream(src, out, ALICE)
    assert out.data == b""


@pytest.mark.parametrize("chunk", [0, 1, 2])
@pytest.mark.parametrize("where", [0, -1])  # first ciphertext byte, last tag byte
def test_chunk_flip(chunk: int, where: int) -> None:
    off, length = chunk_range(chunk, SIZE)
    bad = flipped(DATA, off + (where % length))
    with pytest.raises(ChunkAuthError) as info:
        decrypt(bad)
    assert info.value.index == chunk
    # A pipe decrypt releases exactly the chunks before the bad one, then fails.
    sink = Sink()
    with pytest.raises(ChunkAuthError):
        decrypt_stream(Pipe(bad), sink, ALICE)
    assert bytes(sink.data) == PT[: chunk * CS]


def test_table_flip() -> None:
    off, _ = table_range(SIZE)
    bad = flipped(DATA, off + 40)
    with pytest.raises(PayloadError, match="table"):
        decrypt(bad)
    sink = Sink()
    with pytest.raises(PayloadError):
        decrypt_stream(Pipe(bad), sink, ALICE)
    assert bytes(sink.data) == PT


def test_chunks_swapped() -> None:
    o0, n0 = chunk_range(0, SIZE)
    o1, n1 = chunk_range(1, SIZE)
    bad = DATA[:o0] + DATA[o1 : o1 + n1] + DATA[o0 : o0 + n0] + DATA[o1 + n1 :]
    for pipe in (False, True):
        with pytest.raises(ChunkAuthError):
            decrypt(bad, pipe=pipe)


@pytest.mark.parametrize("cut", [chunk_range(1, SIZE)[0], chunk_range(2, SIZE)[0],
                                 table_range(SIZE)[0], len(DATA) - 1, HEADER_SIZE])
def test_truncation(cut: int) -> None:
    with pytest.raises(TruncatedError):
        decrypt(DATA[:cut])
    sink = Sink()
    with pytest.raises(PayloadError):
        decrypt_stream(Pipe(DATA[:cut]), sink, ALICE)
    assert PT.startswith(bytes(sink.data))


def test_short_header_is_a_format_error() -> None:
    for pipe in (False, True):
        with pytest.raises(FormatError):
            decrypt(DATA[: HEADER_SIZE - 1], pipe=pipe)
        with pytest.raises(FormatError):
            decrypt(b"", pipe=pipe)


def test_not_an_envelope() -> None:
    with pytest.raises(FormatError):
        decrypt(b"hello world, I was never encrypted" * 200)


def test_trailing_data() -> None:
    with pytest.raises(TrailingDataError):
        decrypt(DATA + b"\x00")
    sink = Sink()
    with pytest.raises(TrailingDataError):
        decrypt_stream(Pipe(DATA + b"xyz"), sink, ALICE)
    assert bytes(sink.data) == PT


def test_chunk_moved_from_another_file() -> None:
    other = seal(PT, BOB)
    off, length = chunk_range(1, SIZE)
    bad = DATA[:off] + other[off : off + length] + DATA[off + length :]
    for pipe in (False, True):
        with pytest.raises(ChunkAuthError):
            decrypt(bad, pipe=pipe)


def test_forgery_by_a_co_recipient() -> None:
    """Bob knows the file key: he can make chunks whose GCM tags verify, but they are not in
    alice's signed table. A seekable decrypt refuses the forged chunk before releasing it; a
    pipe decrypt can only tell at the end."""
    from cssfs.crypto import PayloadCipher, derive_file_keys

    opened = open_header(DATA[:HEADER_SIZE], BOB)
    cipher = PayloadCipher(derive_file_keys(opened.file_key, opened.header.salt).payload_key)
    off, length = chunk_range(1, SIZE)
    forged_chunk = cipher.seal(1, b"F" * CS, last=False)
    bad = DATA[:off] + forged_chunk + DATA[off + length :]
    out = Sink()
    with pytest.raises(ChunkAuthError, match="table"):
        decrypt_stream(io.BytesIO(bad), out, ALICE)
    assert out.data == PT[:CS]  # chunk 0 is authentic; the forged chunk 1 is never released
    sink = Sink()
    with pytest.raises(PayloadError, match="signature"):
        decrypt_stream(Pipe(bad), sink, ALICE)
    # Bob also rewrites the table: then it no longer matches the signed hash.
    table = b"".join(sha256(bad[chunk_range(i, SIZE)[0] :][: chunk_range(i, SIZE)[1]])
                     for i in range(3))
    toff, _ = table_range(SIZE)
    with pytest.raises(PayloadError, match="signature"):
        decrypt(bad[:toff] + table)
    # And if he re-signs as himself, the file is simply his: the writer changes.
    h = parse_header(bad[:HEADER_SIZE])
    h2 = replace(h, writer=BOB.recipient.ed25519 or b"", table_hash=sha256(table))
    h2 = replace(h2, signature=BOB.sign(h2.signed_message()))
    keys = derive_file_keys(opened.file_key, h.salt)
    from cssfs.crypto import hmac_sha256

    h2 = replace(h2, mac=hmac_sha256(keys.mac_key, h2.mac_input()))
    mine = open_header(h2.to_bytes(), ALICE)
    assert mine.header.writer == BOB.recipient.ed25519 != ALICE.recipient.ed25519


# -- bounded memory -------------------------------------------------------------------------


class Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


class Discard(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        return len(b)


def _stream_peaks(size: int, spool: bool) -> tuple[int, int]:
    """Peak Python allocations of encrypt_stream and decrypt_stream over ``size`` zero bytes."""
    with tempfile.TemporaryFile() as f:
        tracemalloc.start()
        try:
            if spool:
                encrypt_stream(Zeros(size), Discard(), ALICE, [])  # spools ciphertext
            encrypt_stream(Zeros(size), f, ALICE, [])
            _, peak_enc = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            f.seek(0)
            with open(os.devnull, "wb") as null:
                decrypt_stream(f, null, ALICE)
            _, peak_dec = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    return peak_enc, peak_dec


@pytest.mark.parametrize("spool", [False, True])
def test_memory_stays_flat(spool: bool) -> None:
    small = _stream_peaks(4 * 1024 * 1024 + 123, spool)
    big = _stream_peaks(32 * 1024 * 1024 + 123, spool)
    # The pipeline's lanes (a few spans of about 2 MiB each, whatever the size), plus the
    # table (32 bytes per 64 KiB chunk): 28 MiB more data may add only its 14 KiB of table.
    lanes = (envstream.MAX_WORKERS + 3) * (envstream.SPAN_BYTES + envstream.SEALED_SPAN_BYTES)
    for before, after in zip(small, big, strict=True):
        assert after < lanes + 1024 * 1024, after
        assert after - before < 256 * 1024, (before, after)


def test_seekable_decrypt_reads_the_table_in_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envstream, "TABLE_WINDOW", 2)
    size = 4 * CS + 7  # five chunks: windows [0, 1], [2, 3], [4]
    pt = plaintext(size, 5)
    data = seal(pt)
    assert decrypt(data) == pt
    off, _ = chunk_range(3, size)
    sink = Sink()
    with pytest.raises(ChunkAuthError) as info:
        decrypt_stream(io.BytesIO(flipped(data, off + 5)), sink, ALICE)
    assert info.value.index == 3 and bytes(sink.data) == pt[: 3 * CS]
    toff, tlen = table_range(size)
    sink = Sink()
    with pytest.raises(PayloadError, match="table"):
        decrypt_stream(io.BytesIO(flipped(data, toff + tlen - 1)), sink, ALICE)
    assert sink.data == b""


@pytest.mark.parametrize("step", [1, 1000, CS - 1])
def test_encrypt_with_tiny_reads(step: int) -> None:
    pt = plaintext(CS + 300, step)
    sink = Sink()
    encrypt_stream(Pipe(pt, step=step), sink, ALICE, [])
    assert decrypt(bytes(sink.data)) == pt
    out = Sink()
    decrypt_stream(Pipe(bytes(sink.data), step=step), out, ALICE)
    assert bytes(out.data) == pt


# -- the pipelined stream (envstream): spans on worker threads ---------------------------------


SPAN = envstream.SPAN_CHUNKS


@pytest.mark.parametrize("chunks", [SPAN - 1, SPAN, SPAN + 1, 3 * SPAN + 5])
def test_threads_change_nothing_in_the_output(chunks: int) -> None:
    """The same randomness gives the same envelope, byte for byte, with 0, 1 or 3 workers
    (a span's chunks are sealed on a worker, the hashes recorded in order), and every way of
    decrypting it gives the plaintext back."""
    pt = plaintext(chunks * CS - 5, 21)
    envelopes = {w: seal(pt, BOB, rng=seeded_rng(9), workers=w) for w in (0, 1, 3)}
    assert envelopes[0] == envelopes[1] == envelopes[3]
    for w in (0, 1, 3):
        for pipe in (False, True):
            assert decrypt(envelopes[0], BOB, pipe=pipe, workers=w) == pt


@pytest.mark.parametrize("pipe", [False, True])
@pytest.mark.parametrize("bad", [0, SPAN - 1, SPAN, 2 * SPAN + 7])
def test_a_bad_chunk_in_any_span_releases_exactly_the_chunks_before_it(
    bad: int, pipe: bool
) -> None:
    size = 3 * SPAN * CS + 11
    pt = plaintext(size, 22)
    data = seal(pt)
    off, _ = chunk_range(bad, size)
    src: io.RawIOBase = Pipe(flipped(data, off + 9)) if pipe else io.BytesIO(flipped(data, off + 9))
    sink = Sink()
    with pytest.raises(ChunkAuthError) as info:
        decrypt_stream(src, sink, ALICE, workers=2)  # type: ignore[arg-type]
    assert info.value.index == bad
    assert bytes(sink.data) == pt[: bad * CS]


def test_a_failing_write_stops_the_pipeline() -> None:
    """An error while writing span k (a full disk, a closed pipe) comes out of decrypt_stream
    as it is, and no worker is left running (the pool is shut down before it returns)."""
    pt = plaintext(4 * SPAN * CS, 23)
    data = seal(pt)

    class Full(Sink):
        def write(self, b) -> int:  # type: ignore[override]
            if len(self.data) >= SPAN * CS:
                raise OSError(28, "No space left on device")
            return super().write(b)

    sink = Full()
    with pytest.raises(OSError, match="No space"):
        decrypt_stream(io.BytesIO(data), sink, ALICE, workers=2)
    assert bytes(sink.data) == pt[: SPAN * CS]
    assert not [t for t in threading.enumerate() if t.name.startswith("cssfs-span")]
