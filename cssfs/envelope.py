"""Envelope format v1: geometry, the header wire format, sealing and opening (docs/FORMAT.md).

This module knows the byte layout of an envelope object -- header region (4096 bytes), payload
chunks, chunk table -- and the checks that make it authentic: key commitment, header MAC, the
writer's Ed25519 signature over the chunk-table hash, the object binding. It must not know:
stores, FUSE, trio, config or contacts, or threads: spans of chunks (SealSpan, OpenSpan) are
jobs a caller may run on any thread, and envstream.py pipelines them over file objects. Apart
from ``read_full``, everything here is a pure function over bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import constant_time
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.utils import Buffer

from cssfs.crypto import CHUNK_SIZE as CHUNK_SIZE  # re-exported: a format constant
from cssfs.crypto import (
    FILE_KEY_SIZE,
    HASH_SIZE,
    SALT_SIZE,
    WRAPPED_SIZE,
    X25519_SIZE,
    FileKeys,
    PayloadCipher,
    Rng,
    default_rng,
    derive_file_keys,
    hmac_sha256,
    hmac_sha256_verify,
    sha256,
    wrap_file_key,
)
from cssfs.crypto import TAG_SIZE as TAG_SIZE
from cssfs.errors import (
    BindingError,
    ChunkAuthError,
    ConfigError,
    FormatError,
    HeaderAuthError,
    KeyFormatError,
    NoIdentityMatchError,
    PayloadError,
    SignatureError,
    TrailingDataError,
    TruncatedError,
    UnsupportedVersionError,
)
from cssfs.keys import Identity, Recipient

MAGIC = b"cssfs\x00"
VERSION = 1
CHUNK_SIZE_LOG2 = 16
assert 1 << CHUNK_SIZE_LOG2 == CHUNK_SIZE

HEADER_SIZE = 4096
STANZA_SIZE = 8 + X25519_SIZE + WRAPPED_SIZE  # 88
MAC_SIZE = 32
SIGNATURE_SIZE = 64
KEY_ID_SIZE = 8
BINDING_SIZE = 32
ED25519_SIZE = 32
# Fixed part: magic..stanza count. Stanzas start at STANZAS_OFFSET.
STANZAS_OFFSET = 178
MAX_RECIPIENTS = (HEADER_SIZE - STANZAS_OFFSET - MAC_SIZE - SIGNATURE_SIZE) // STANZA_SIZE  # 43
assert MAX_RECIPIENTS == 43

CHUNK_OVERHEAD = TAG_SIZE + HASH_SIZE  # 48 bytes per chunk: GCM tag + chunk-table entry
MODE_MASK = 0o7777

UNBOUND = bytes(BINDING_SIZE)
_OBJECT_LABEL = b"cssfs.v1 object\x00"
_SIGNATURE_LABEL = b"cssfs.v1 signature\x00"

#                       magic ver log size  mtime mode rsvd
_FIXED = struct.Struct(">6s B B Q Q I I 16s 32s 32s 32s 32s H")
assert _FIXED.size == STANZAS_OFFSET


def object_binding(key: str) -> bytes:
    """The binding of an envelope stored under object ``key``: SHA-256(label || key UTF-8)."""
    return sha256(_OBJECT_LABEL + key.encode("utf-8"))


# -- geometry (pure) ------------------------------------------------------------------------


def chunk_count(plain_size: int) -> int:
    """Number of payload chunks for ``plain_size`` plaintext bytes: max(1, ceil(P / 64 KiB))."""
    if plain_size < 0:
        raise ValueError("envelope: negative plaintext size")
    return max(1, -(-plain_size // CHUNK_SIZE))


def envelope_size(plain_size: int) -> int:
    """Size of the envelope object of ``plain_size`` plaintext bytes: 4096 + P + 48 N."""
    return HEADER_SIZE + plain_size + CHUNK_OVERHEAD * chunk_count(plain_size)


def plain_size(envelope_size: int) -> int:
    """Plaintext size of an envelope of ``envelope_size`` bytes; FormatError if impossible."""
    rest = envelope_size - HEADER_SIZE
    if rest < CHUNK_OVERHEAD:
        raise FormatError(f"object of {envelope_size} bytes is too short to be a cssfs envelope")
    n = max(1, -(-rest // (CHUNK_SIZE + CHUNK_OVERHEAD)))
    size = rest - CHUNK_OVERHEAD * n
    if chunk_count(size) != n:
        raise FormatError(f"object of {envelope_size} bytes is not a possible cssfs envelope size")
    return size


def chunk_plain_range(index: int, plain_size: int) -> tuple[int, int]:
    """(offset in the plaintext, plaintext length) of chunk ``index``."""
    n = chunk_count(plain_size)
    if not 0 <= index < n:
        raise ValueError(f"envelope: chunk {index} out of range (file has {n})")
    start = index * CHUNK_SIZE
    return start, min(CHUNK_SIZE, plain_size - start)


def chunk_range(index: int, plain_size: int) -> tuple[int, int]:
    """(offset in the envelope, ciphertext length) of chunk ``index``."""
    _, length = chunk_plain_range(index, plain_size)
    return HEADER_SIZE + index * (CHUNK_SIZE + TAG_SIZE), length + TAG_SIZE


def chunks_for(offset: int, length: int, plain_size: int) -> range:
    """Indexes of the chunks holding plaintext bytes [offset, offset + length) (clipped to EOF)."""
    if offset < 0 or length < 0:
        raise ValueError("envelope: negative offset or length")
    end = min(offset + length, plain_size)
    if end <= offset:
        return range(0)
    return range(offset // CHUNK_SIZE, -(-end // CHUNK_SIZE))


def table_range(plain_size: int) -> tuple[int, int]:
    """(offset in the envelope, length) of the chunk table: 32 bytes per chunk."""
    n = chunk_count(plain_size)
    return HEADER_SIZE + plain_size + TAG_SIZE * n, HASH_SIZE * n


# -- header ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stanza:
    """The file key wrapped to one recipient: key id hint, ephemeral X25519 share, wrapped key."""

    key_id: bytes
    ephemeral: bytes
    wrapped: bytes

    def __post_init__(self) -> None:
        if (
            len(self.key_id) != KEY_ID_SIZE
            or len(self.ephemeral) != X25519_SIZE
            or len(self.wrapped) != WRAPPED_SIZE
        ):
            raise ValueError("envelope: bad stanza field length")

    def to_bytes(self) -> bytes:
        return self.key_id + self.ephemeral + self.wrapped

    @classmethod
    def from_bytes(cls, data: bytes) -> Stanza:
        return cls(data[:8], data[8:40], data[40:88])


@dataclass(frozen=True)
class Header:
    """A parsed v1 header. Field sizes are checked; authenticity is not (see open_header)."""

    version: int
    chunk_size: int
    plain_size: int
    mtime_ns: int
    mode: int
    salt: bytes
    binding: bytes
    writer: bytes
    commitment: bytes
    table_hash: bytes
    stanzas: tuple[Stanza, ...]
    mac: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if self.version != VERSION or self.chunk_size != CHUNK_SIZE:
            raise ValueError("envelope: only version 1 with 64 KiB chunks can be built")
        if not 0 <= self.plain_size < 1 << 64 or not 0 <= self.mtime_ns < 1 << 64:
            raise ValueError("envelope: plaintext size or mtime out of range")
        if self.mode & ~MODE_MASK or self.mode < 0:
            raise ValueError("envelope: mode has bits outside 0o7777")
        sizes = (
            (self.salt, SALT_SIZE), (self.binding, BINDING_SIZE), (self.writer, ED25519_SIZE),
            (self.commitment, 32), (self.table_hash, HASH_SIZE), (self.mac, MAC_SIZE),
            (self.signature, SIGNATURE_SIZE),
        )
        if any(len(value) != size for value, size in sizes):
            raise ValueError("envelope: bad header field length")
        if not 1 <= len(self.stanzas) <= MAX_RECIPIENTS:
            raise ValueError("envelope: stanza count out of range")

    @property
    def chunk_count(self) -> int:
        return chunk_count(self.plain_size)

    @property
    def key_ids(self) -> tuple[bytes, ...]:
        """The recipients' 8-byte key ids, in stanza order (the writer's first)."""
        return tuple(s.key_id for s in self.stanzas)

    def mac_input(self) -> bytes:
        """The bytes the header MAC covers: offsets [0, 178 + 88 n)."""
        fixed = _FIXED.pack(
            MAGIC, self.version, CHUNK_SIZE_LOG2, self.plain_size, self.mtime_ns, self.mode, 0,
            self.salt, self.binding, self.writer, self.commitment, self.table_hash,
            len(self.stanzas),
        )
        return fixed + b"".join(s.to_bytes() for s in self.stanzas)

    def signed_message(self) -> bytes:
        """The message the writer signs (docs/FORMAT.md, "Signature")."""
        head = MAGIC + struct.pack(">BBQ", self.version, CHUNK_SIZE_LOG2, self.plain_size)
        return (
            _SIGNATURE_LABEL + head + self.salt + self.writer + self.commitment + self.table_hash
        )

    def to_bytes(self) -> bytes:
        """The header region: exactly HEADER_SIZE bytes, zero-padded."""
        body = self.mac_input() + self.mac + self.signature
        return body + bytes(HEADER_SIZE - len(body))


def parse_header(data: bytes) -> Header:
    """Parse a 4096-byte header region strictly; FormatError / UnsupportedVersionError."""
    if len(data) != HEADER_SIZE:
        raise FormatError(f"header must be {HEADER_SIZE} bytes, got {len(data)}")
    data = bytes(data)
    if data[:6] != MAGIC:
        raise FormatError("not a cssfs envelope (bad magic)")
    (
        _magic, version, log2, size, mtime_ns, mode, reserved,
        salt, binding, writer, commitment, table_hash, count,
    ) = _FIXED.unpack_from(data)
    if version != VERSION:
        raise UnsupportedVersionError(f"unsupported envelope version {version}")
    if log2 != CHUNK_SIZE_LOG2:
        raise FormatError(f"unsupported chunk size 2^{log2}")
    if mode & ~MODE_MASK:
        raise FormatError("mode has bits outside 0o7777")
    if reserved != 0:
        raise FormatError("reserved header field is not zero")
    if not 1 <= count <= MAX_RECIPIENTS:
        raise FormatError(f"bad stanza count {count}")
    end = STANZAS_OFFSET + STANZA_SIZE * count
    stanzas = tuple(
        Stanza.from_bytes(data[off : off + STANZA_SIZE])
        for off in range(STANZAS_OFFSET, end, STANZA_SIZE)
    )
    mac = data[end : end + MAC_SIZE]
    signature = data[end + MAC_SIZE : end + MAC_SIZE + SIGNATURE_SIZE]
    if any(data[end + MAC_SIZE + SIGNATURE_SIZE :]):
        raise FormatError("header padding is not zero")
    return Header(
        version=version, chunk_size=1 << log2, plain_size=size, mtime_ns=mtime_ns, mode=mode,
        salt=salt, binding=binding, writer=writer, commitment=commitment, table_hash=table_hash,
        stanzas=stanzas, mac=mac, signature=signature,
    )



def verify_signature(header: Header) -> None:
    """Check the writer's signature; needs no identity. SignatureError if it does not verify."""
    try:
        Ed25519PublicKey.from_public_bytes(header.writer).verify(
            header.signature, header.signed_message()
        )
    except (InvalidSignature, ValueError):
        raise SignatureError("the writer's signature does not verify") from None


def check_envelope_size(plain_size: int, actual_size: int) -> None:
    """TruncatedError / TrailingDataError unless an object of ``actual_size`` bytes is exactly
    the envelope of ``plain_size`` plaintext bytes (the size authenticated by the header)."""
    expected = envelope_size(plain_size)
    if actual_size < expected:
        raise TruncatedError(f"envelope is truncated ({actual_size} of {expected} bytes)")
    if actual_size > expected:
        raise TrailingDataError(f"{actual_size - expected} bytes of trailing data after envelope")


# -- sealing --------------------------------------------------------------------------------


def _stanza_for(file_key: bytes, recipient: Recipient, rng: Rng) -> Stanza:
    try:
        ephemeral, wrapped = wrap_file_key(file_key, recipient.x25519, rng=rng)
    except ValueError:  # a low-order public key
        raise KeyFormatError(
            f"recipient {recipient.fingerprint} has an invalid X25519 key (low-order point)"
        ) from None
    return Stanza(recipient.key_id, ephemeral, wrapped)


def _sealed_header(header: Header, mac_key: bytes) -> Header:
    return replace(header, mac=hmac_sha256(mac_key, header.mac_input()))


def _check_meta(binding: bytes, mtime_ns: int, mode: int) -> None:
    if len(binding) != BINDING_SIZE:
        raise ValueError("envelope: binding must be 32 bytes")
    if not 0 <= mtime_ns < 1 << 64:
        raise ValueError("envelope: mtime_ns out of range")
    if mode < 0 or mode & ~MODE_MASK:
        raise ValueError("envelope: mode has bits outside 0o7777")


def _too_many(count: int) -> ConfigError:
    return ConfigError(
        f"too many recipients ({count}; a file holds at most {MAX_RECIPIENTS}): "
        "share with a group instead"
    )


class EnvelopeWriter:
    """Seal one envelope: feed the plaintext chunks in order, then build the header.

    The writer's own identity is always the first recipient; recipients are deduplicated by
    X25519 key. Randomness is drawn in this order: file key (32), salt (16), then one ephemeral
    key (32) per stanza, in stanza order.
    """

    def __init__(
        self,
        identity: Identity,
        recipients: Sequence[Recipient],
        *,
        binding: bytes = UNBOUND,
        mtime_ns: int = 0,
        mode: int = 0o644,
        rng: Rng | None = None,
    ) -> None:
        _check_meta(binding, mtime_ns, mode)
        rng = rng or default_rng
        everyone: dict[bytes, Recipient] = {identity.recipient.x25519: identity.recipient}
        for recipient in recipients:
            everyone.setdefault(recipient.x25519, recipient)
        if len(everyone) > MAX_RECIPIENTS:
            raise _too_many(len(everyone))
        self._identity = identity
        self._binding = binding
        self._mtime_ns = mtime_ns
        self._mode = mode
        file_key = rng(FILE_KEY_SIZE)
        self._file_key = file_key
        self._salt = rng(SALT_SIZE)
        self._keys = derive_file_keys(file_key, self._salt)
        self._stanzas = tuple(_stanza_for(file_key, r, rng) for r in everyone.values())
        self._cipher = PayloadCipher(self._keys.payload_key)
        self._hashes: list[bytes] = []
        self._plain_size = 0
        self._done = False
        self._next_index = 0  # seal_span: the first chunk of the next span
        self._spans_done = False

    def __repr__(self) -> str:
        return f"EnvelopeWriter(chunks={len(self._hashes)}, done={self._done})"

    @property
    def plain_size(self) -> int:
        """Plaintext bytes sealed so far."""
        return self._plain_size

    def _check_chunk(self, length: int, last: bool) -> int:
        if self._done:
            raise ValueError("envelope: internal error: chunk sealed after the last chunk")
        index = len(self._hashes)
        if index != self._next_index:
            raise ValueError("envelope: internal error: seal_chunk mixed with seal_span")
        if length > CHUNK_SIZE or (not last and length != CHUNK_SIZE):
            raise ValueError("envelope: internal error: only the last chunk may be short")
        if last and length == 0 and index > 0:
            raise ValueError("envelope: internal error: empty last chunk after a full chunk")
        return index

    def _record(self, ciphertext: Buffer, length: int, last: bool) -> None:
        self._hashes.append(sha256(ciphertext))
        self._next_index += 1
        self._plain_size += length
        self._done = last

    def seal_chunk(self, plaintext: Buffer, *, last: bool) -> bytes:
        """The ciphertext (len + 16 bytes) of the next chunk. Only the last may be short."""
        length = len(memoryview(plaintext))
        index = self._check_chunk(length, last)
        ciphertext = self._cipher.seal(index, plaintext, last=last)
        self._record(ciphertext, length, last)
        return ciphertext

    def seal_chunk_into(self, plaintext: Buffer, out: Buffer, *, last: bool) -> int:
        """Like seal_chunk, writing into ``out`` (exactly len + 16 bytes); returns its length."""
        length = len(memoryview(plaintext))
        index = self._check_chunk(length, last)
        written = self._cipher.seal_into(index, plaintext, out, last=last)
        self._record(out, length, last)
        return written

    def seal_span(self, plaintext: memoryview, out: memoryview, *, last: bool) -> SealSpan:
        """The next ``ceil(len / CHUNK_SIZE)`` chunks (at least one), sealed later by the
        returned job's ``run()`` -- on any thread -- into ``out`` (len + 16 per chunk), then
        given back with :meth:`record_span`, in the order the spans were made. Only the last
        span may end with a short chunk; an empty span is the empty last chunk of a 0-byte file.
        """
        length = len(plaintext)
        count = chunk_count(length)
        if self._done or self._spans_done:
            raise ValueError("envelope: internal error: chunk sealed after the last chunk")
        if not last and length % CHUNK_SIZE:
            raise ValueError("envelope: internal error: only the last chunk may be short")
        if length == 0 and (not last or self._next_index > 0):
            raise ValueError("envelope: internal error: empty last chunk after a full chunk")
        if len(out) != length + TAG_SIZE * count:
            raise ValueError("envelope: internal error: span output of the wrong size")
        span = SealSpan(self._keys.payload_key, self._next_index, plaintext, out, last)
        self._next_index += count
        self._spans_done = last
        return span

    def record_span(self, span: SealSpan, hashes: Sequence[bytes]) -> None:
        """Take back a span sealed by ``span.run()`` (which returned ``hashes``), in order."""
        if span.first != len(self._hashes) or len(hashes) != span.count:
            raise ValueError("envelope: internal error: spans recorded out of order")
        self._hashes.extend(hashes)
        self._plain_size += len(span.plaintext)
        self._done = span.last

    def opened(self, header: bytes) -> OpenedEnvelope:
        """The envelope this writer sealed, as :func:`open_header` gives it to a recipient:
        ``header`` is what :meth:`finish` returned (or a reseal of it). The writer holds the
        file key, so nothing is unwrapped and its own signature is not checked again; the
        header must still belong to this writer's payload (same commitment and chunk table)
        and carry a MAC made with its key, or ValueError: a mix-up in the caller, not bad input.
        """
        if not self._done:
            raise ValueError("envelope: internal error: opened() before the last chunk")
        parsed = parse_header(header)
        table = b"".join(self._hashes)
        if (
            parsed.commitment != self._keys.commitment
            or parsed.table_hash != sha256(table)
            or not hmac_sha256_verify(self._keys.mac_key, parsed.mac_input(), parsed.mac)
        ):
            raise ValueError("envelope: internal error: header of another envelope")
        opened = OpenedEnvelope(parsed, self._file_key, self._keys)
        opened.load_table(table)
        return opened

    def open_sealed(self, index: int, ciphertext: Buffer) -> bytes:
        """The plaintext of chunk ``index`` (not the last) that this writer sealed earlier:
        to read back a file while it is still being written. ChunkAuthError if it changed."""
        if index >= len(self._hashes) or (self._done and index == len(self._hashes) - 1):
            raise ValueError("envelope: internal error: open_sealed of a chunk not sealed")
        return self._cipher.open(index, ciphertext, last=False)

    def finish(self) -> tuple[bytes, bytes]:
        """(header region of HEADER_SIZE bytes, chunk table) once the last chunk is sealed."""
        if not self._done:
            raise ValueError("envelope: internal error: finish() before the last chunk")
        table = b"".join(self._hashes)
        header = Header(
            version=VERSION, chunk_size=CHUNK_SIZE, plain_size=self._plain_size,
            mtime_ns=self._mtime_ns, mode=self._mode, salt=self._salt, binding=self._binding,
            writer=self._identity.recipient.ed25519 or b"", commitment=self._keys.commitment,
            table_hash=sha256(table), stanzas=self._stanzas, mac=bytes(MAC_SIZE),
            signature=bytes(SIGNATURE_SIZE),
        )
        header = replace(header, signature=self._identity.sign(header.signed_message()))
        return _sealed_header(header, self._keys.mac_key).to_bytes(), table


class SealSpan:
    """A run of consecutive chunks to seal, made by :meth:`EnvelopeWriter.seal_span`.

    ``run()`` touches only its own buffers and a cipher of its own, so spans of one envelope
    can be sealed on several threads at once (AES-GCM and SHA-256 in `cryptography` release the
    GIL); the writer takes the hashes back in order.
    """

    __slots__ = ("_payload_key", "count", "first", "last", "out", "plaintext")

    def __init__(
        self, payload_key: bytes, first: int, plaintext: memoryview, out: memoryview, last: bool
    ) -> None:
        self._payload_key = payload_key
        self.first = first
        self.plaintext = plaintext
        self.out = out
        self.last = last
        self.count = chunk_count(len(plaintext))

    def run(self) -> list[bytes]:
        """Seal every chunk of the span into ``out``; their SHA-256 hashes, in order."""
        cipher = PayloadCipher(self._payload_key)
        hashes: list[bytes] = []
        at = 0
        for k in range(self.count):
            plain = self.plaintext[k * CHUNK_SIZE : (k + 1) * CHUNK_SIZE]
            sealed = self.out[at : at + len(plain) + TAG_SIZE]
            cipher.seal_into(
                self.first + k, plain, sealed, last=self.last and k == self.count - 1
            )
            hashes.append(sha256(sealed))
            at += len(sealed)
        return hashes


class OpenSpan:
    """A run of consecutive chunks to open, made by :meth:`OpenedEnvelope.open_span`.

    ``run()`` checks each chunk's hash (against the table entries it was given) before its GCM
    tag and writes plaintext only into ``out``. It stops at the first chunk that fails: then
    ``failure`` holds the ChunkAuthError, ``out`` from that chunk on is zeroed (no unverified
    plaintext is left behind) and ``verified`` says how many bytes at the start of ``out`` are
    the verified chunks before it. Safe to run on any thread.
    """

    __slots__ = ("_count", "_expected", "_first", "_key", "_lengths", "ciphertext", "failure",
                 "out", "verified")

    def __init__(
        self, payload_key: bytes, first: int, count: int, lengths: list[int],
        ciphertext: memoryview, out: memoryview, expected: memoryview | None,
    ) -> None:
        self._key = payload_key
        self._first = first
        self._count = count
        self._lengths = lengths
        self._expected = expected
        self.ciphertext = ciphertext
        self.out = out
        self.verified = 0
        self.failure: ChunkAuthError | None = None

    def run(self) -> list[bytes]:
        """Open the span into ``out``; the hashes of the chunks that verified, in order."""
        cipher = PayloadCipher(self._key)
        hashes: list[bytes] = []
        ct_at = pt_at = 0
        try:
            for k, ct_len in enumerate(self._lengths):
                index = self._first + k
                ct = self.ciphertext[ct_at : ct_at + ct_len]
                digest = sha256(ct)
                expected = self._expected
                if expected is not None and not constant_time.bytes_eq(
                    digest, bytes(expected[k * HASH_SIZE : (k + 1) * HASH_SIZE])
                ):
                    raise ChunkAuthError(index, "does not match the chunk table")
                pt = self.out[pt_at : pt_at + ct_len - TAG_SIZE]
                cipher.open_into(index, ct, pt, last=index == self._count - 1)
                hashes.append(digest)
                ct_at += ct_len
                pt_at += len(pt)
                self.verified = pt_at
        except ChunkAuthError as exc:
            self.out[pt_at:] = bytes(len(self.out) - pt_at)
            self.failure = exc
        return hashes


# -- opening --------------------------------------------------------------------------------


class OpenedEnvelope:
    """A header verified for one identity: the file key, and the checks for payload chunks."""

    __slots__ = ("_cipher", "_keys", "_table", "file_key", "header")

    def __init__(self, header: Header, file_key: bytes, keys: FileKeys) -> None:
        self.header = header
        self.file_key = file_key
        self._keys = keys
        self._cipher = PayloadCipher(keys.payload_key)
        self._table: bytes | None = None

    def __repr__(self) -> str:
        return f"OpenedEnvelope(plain_size={self.header.plain_size})"

    @property
    def chunk_count(self) -> int:
        return self.header.chunk_count

    @property
    def table_loaded(self) -> bool:
        return self._table is not None

    def load_table(self, table: bytes) -> None:
        """Check the chunk table against the signed table hash and keep it for open_chunk."""
        expected = HASH_SIZE * self.chunk_count
        if len(table) < expected:
            raise TruncatedError(f"chunk table is truncated ({len(table)} of {expected} bytes)")
        if len(table) > expected:
            raise PayloadError(f"chunk table is too long ({len(table)} of {expected} bytes)")
        if sha256(table) != self.header.table_hash:
            raise PayloadError("chunk table does not match the writer's signature")
        self._table = bytes(table)

    def chunk_hash(self, index: int) -> bytes:
        """Entry ``index`` of the loaded chunk table."""
        if self._table is None:
            raise ValueError("envelope: internal error: load_table() before reading chunks")
        if not 0 <= index < self.chunk_count:
            raise ValueError(f"envelope: chunk {index} out of range")
        return self._table[HASH_SIZE * index : HASH_SIZE * (index + 1)]

    def _check_length(self, index: int, ciphertext: Buffer) -> None:
        if len(memoryview(ciphertext)) != chunk_range(index, self.header.plain_size)[1]:
            raise ChunkAuthError(index, "has the wrong length")

    def open_chunk(self, index: int, ciphertext: Buffer) -> bytes:
        """Plaintext of chunk ``index``, checked against the chunk table then its GCM tag."""
        expected = self.chunk_hash(index)
        self._check_length(index, ciphertext)
        if sha256(ciphertext) != expected:
            raise ChunkAuthError(index, "does not match the chunk table")
        return self._cipher.open(index, ciphertext, last=index == self.chunk_count - 1)

    def open_chunk_into(self, index: int, ciphertext: Buffer, out: bytearray | memoryview) -> int:
        """Like open_chunk, writing into ``out`` (exactly the chunk's plaintext length)."""
        return self._open_checked_into(index, ciphertext, out, self.chunk_hash(index))

    def _open_checked_into(
        self, index: int, ciphertext: Buffer, out: bytearray | memoryview, expected: Buffer
    ) -> int:
        # The table entry comes from the caller: decrypt_stream reads the table in windows.
        self._check_length(index, ciphertext)
        if sha256(ciphertext) != expected:
            raise ChunkAuthError(index, "does not match the chunk table")
        return self._cipher.open_into(
            index, ciphertext, out, last=index == self.chunk_count - 1
        )

    def open_span(
        self, first: int, ciphertext: memoryview, out: memoryview,
        expected: memoryview | None,
    ) -> OpenSpan:
        """A job that opens chunks ``first, first + 1, ...`` (as many as ``ciphertext`` holds,
        each its exact stored length) into ``out`` when ``run()`` -- on any thread -- checking
        each against ``expected`` (their chunk-table entries) first, or, when that is None,
        returning their hashes for the caller to check (a stream whose table comes last)."""
        size, count = self.header.plain_size, self.chunk_count
        lengths: list[int] = []
        left = len(ciphertext)
        index = first
        while left > 0:
            if index >= count:
                raise ValueError("envelope: internal error: span past the last chunk")
            ct_len = chunk_range(index, size)[1]
            if ct_len > left:
                raise ValueError("envelope: internal error: span ends inside a chunk")
            lengths.append(ct_len)
            left -= ct_len
            index += 1
        if len(out) != len(ciphertext) - TAG_SIZE * len(lengths):
            raise ValueError("envelope: internal error: span output of the wrong size")
        if expected is not None and len(expected) != HASH_SIZE * len(lengths):
            raise ValueError("envelope: internal error: span table entries of the wrong size")
        return OpenSpan(self._keys.payload_key, first, count, lengths, ciphertext, out, expected)

    def after_reseal(self, header: bytes) -> OpenedEnvelope:
        """This envelope under ``header``, a header :meth:`reseal` returned: the same file key
        and chunk table, the new stanzas, binding, mtime and mode. ValueError if ``header``
        is not a reseal of this envelope (another commitment, table or MAC key)."""
        parsed = parse_header(header)
        h = self.header
        if (
            (parsed.commitment, parsed.table_hash, parsed.writer, parsed.signature)
            != (h.commitment, h.table_hash, h.writer, h.signature)
            or not hmac_sha256_verify(self._keys.mac_key, parsed.mac_input(), parsed.mac)
        ):
            raise ValueError("envelope: internal error: not a reseal of this envelope")
        opened = OpenedEnvelope(parsed, self.file_key, self._keys)
        opened._table = self._table
        return opened

    def reseal(
        self,
        *,
        add: Sequence[Recipient] = (),
        binding: bytes | None = None,
        mtime_ns: int | None = None,
        mode: int | None = None,
        rng: Rng | None = None,
    ) -> bytes:
        """A new header for the same payload: stanzas appended for ``add`` (skipping key ids
        already present), binding/mtime/mode changed if given, a new MAC. The commitment, table
        hash, writer and signature are kept, so the writer stays who wrote the file."""
        h = self.header
        new_binding = h.binding if binding is None else binding
        new_mtime = h.mtime_ns if mtime_ns is None else mtime_ns
        new_mode = h.mode if mode is None else mode
        _check_meta(new_binding, new_mtime, new_mode)
        rng = rng or default_rng
        stanzas = list(h.stanzas)
        present = {s.key_id for s in stanzas}
        for recipient in add:
            if recipient.key_id in present:
                continue
            present.add(recipient.key_id)
            stanzas.append(_stanza_for(self.file_key, recipient, rng))
        if len(stanzas) > MAX_RECIPIENTS:
            raise _too_many(len(stanzas))
        new = replace(
            h, binding=new_binding, mtime_ns=new_mtime, mode=new_mode, stanzas=tuple(stanzas)
        )
        return _sealed_header(new, self._keys.mac_key).to_bytes()


def open_header(
    data: bytes | Header, identity: Identity, *, binding: bytes | None = None
) -> OpenedEnvelope:
    """Parse and authenticate a header for ``identity``.

    Order: parse (FormatError) -> unwrap a stanza with our key id (NoIdentityMatchError if none
    has it, HeaderAuthError if every one fails) -> key commitment and header MAC
    (HeaderAuthError) -> writer's signature (SignatureError) -> binding, if ``binding`` is given
    (BindingError).
    """
    header = data if isinstance(data, Header) else parse_header(data)
    own_id = identity.recipient.key_id
    candidates = [s for s in header.stanzas if s.key_id == own_id]
    if not candidates:
        raise NoIdentityMatchError("the file is not encrypted for this identity")
    file_key = None
    for stanza in candidates:
        file_key = identity.unwrap(stanza.ephemeral, stanza.wrapped)
        if file_key is not None:
            break
    if file_key is None:
        raise HeaderAuthError("the stanza for this identity does not decrypt (tampered header)")
    keys = derive_file_keys(file_key, header.salt)
    if not constant_time.bytes_eq(keys.commitment, header.commitment):
        raise HeaderAuthError("the key commitment does not match (tampered header)")
    if not hmac_sha256_verify(keys.mac_key, header.mac_input(), header.mac):
        raise HeaderAuthError("the header MAC does not verify (tampered header)")
    verify_signature(header)
    if binding is not None and binding != header.binding:
        raise BindingError("the envelope belongs to another object (moved or swapped)")
    return OpenedEnvelope(header, file_key, keys)


def open_any(
    data: bytes | Header, identities: Sequence[Identity], *, binding: bytes | None = None
) -> tuple[OpenedEnvelope, Identity]:
    """open_header with the first of ``identities`` (yours, then group keys) it has a stanza for.

    Only identities whose key id is in the header are tried, so a reader with many group keys
    pays one X25519 per open, not one per key. Errors as open_header; when several identities
    match and all fail, the first failure is raised.
    """
    header = data if isinstance(data, Header) else parse_header(data)
    present = set(header.key_ids)
    first: HeaderAuthError | None = None
    for identity in identities:
        if identity.recipient.key_id not in present:
            continue
        try:
            return open_header(header, identity, binding=binding), identity
        except HeaderAuthError as exc:  # a key-id collision, or a tampered header
            first = first or exc
    if first is not None:
        raise first
    raise NoIdentityMatchError("the file is not encrypted for this identity or its groups")


# -- stream helpers ----------------------------------------------------------------------------


def read_full(src: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``src`` (short reads retried); returns the bytes read (< len at EOF)."""
    readinto = getattr(src, "readinto", None)
    total = 0
    while total < len(view):
        if readinto is not None:
            n = readinto(view[total:])
            if n is None:  # a non-blocking source with nothing ready: not EOF
                raise BlockingIOError("cssfs needs a blocking input stream")
        else:
            data = src.read(len(view) - total)
            n = len(data)
            view[total : total + n] = data
        if not n:
            break
        total += n
    return total
