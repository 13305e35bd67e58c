"""Envelope format v1: geometry, the header wire format, sealing and opening (docs/FORMAT.md).

This module knows the byte layout of an envelope object -- header region (4096 bytes), payload
chunks, chunk table -- and the checks that make it authentic: key commitment, header MAC, the
writer's Ed25519 signature over the chunk-table hash, the object binding. It must not know:
stores, FUSE, trio, config or contacts. Apart from the two stream helpers at the bottom, which
read and write file objects they are given, everything here is a pure function over bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cssfs.crypto import (
    CHUNK_SIZE,
    HASH_SIZE,
    SALT_SIZE,
    TAG_SIZE,
    WRAPPED_SIZE,
    X25519_SIZE,
    sha256,
)
from cssfs.errors import FormatError, UnsupportedVersionError

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

