"""Envelope format v1: geometry, the header wire format, sealing and opening (docs/FORMAT.md).

This module knows the byte layout of an envelope object -- header region (4096 bytes), payload
chunks, chunk table -- and the checks that make it authentic: key commitment, header MAC, the
writer's Ed25519 signature over the chunk-table hash, the object binding. It must not know:
stores, FUSE, trio, config or contacts. Apart from the two stream helpers at the bottom, which
read and write file objects they are given, everything here is a pure function over bytes.
"""

from __future__ import annotations

import io
import shutil
import struct
import tempfile
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
    sha256_hasher,
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
        self._salt = rng(SALT_SIZE)
        self._keys = derive_file_keys(file_key, self._salt)
        self._stanzas = tuple(_stanza_for(file_key, r, rng) for r in everyone.values())
        self._cipher = PayloadCipher(self._keys.payload_key)
        self._hashes: list[bytes] = []
        self._plain_size = 0
        self._done = False

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
        if length > CHUNK_SIZE or (not last and length != CHUNK_SIZE):
            raise ValueError("envelope: internal error: only the last chunk may be short")
        if last and length == 0 and index > 0:
            raise ValueError("envelope: internal error: empty last chunk after a full chunk")
        return index

    def _record(self, ciphertext: Buffer, length: int, last: bool) -> None:
        self._hashes.append(sha256(ciphertext))
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

    def _open_unlisted_into(
        self, index: int, ciphertext: Buffer, out: bytearray | memoryview
    ) -> int:
        # GCM only: for a streaming decrypt that meets the table after the payload; the caller
        # must check sha256(ciphertext) against the table at the end.
        self._check_length(index, ciphertext)
        return self._cipher.open_into(
            index, ciphertext, out, last=index == self.chunk_count - 1
        )

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


# -- whole-stream helpers (the CLI's encrypt/decrypt) ---------------------------------------


def _seekable(f: BinaryIO) -> bool:
    try:
        if not f.seekable():
            return False
        f.tell()
    except (OSError, AttributeError, ValueError):
        return False
    return True


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


def encrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    identity: Identity,
    recipients: Sequence[Recipient],
    *,
    binding: bytes = UNBOUND,
    mtime_ns: int = 0,
    mode: int = 0o644,
    rng: Rng | None = None,
) -> None:
    """Encrypt all of ``src`` into one envelope written to ``dst``, in bounded memory.

    The header is built last: on a seekable ``dst`` a 4096-byte hole is written first and
    filled at the end; otherwise the ciphertext (never plaintext) is spooled to a temporary
    file and copied out after the header.
    """
    writer = EnvelopeWriter(
        identity, recipients, binding=binding, mtime_ns=mtime_ns, mode=mode, rng=rng
    )
    seekable = _seekable(dst)
    body: BinaryIO
    if seekable:
        start = dst.tell()
        dst.write(bytes(HEADER_SIZE))
        body = dst
    else:
        body = tempfile.TemporaryFile()  # noqa: SIM115 -- closed below
    try:
        bufs = (bytearray(CHUNK_SIZE), bytearray(CHUNK_SIZE))
        out = memoryview(bytearray(CHUNK_SIZE + TAG_SIZE))
        cur = 0
        n = read_full(src, memoryview(bufs[cur]))
        while True:
            # One chunk of read-ahead: a full chunk is the last only if nothing follows it.
            next_n = read_full(src, memoryview(bufs[1 - cur])) if n == CHUNK_SIZE else 0
            last = next_n == 0
            sealed = out[: n + TAG_SIZE]
            writer.seal_chunk_into(memoryview(bufs[cur])[:n], sealed, last=last)
            body.write(sealed)
            if last:
                break
            cur, n = 1 - cur, next_n
        header, table = writer.finish()
        body.write(table)
        if seekable:
            end = dst.tell()
            dst.seek(start)
            dst.write(header)
            dst.seek(end)
        else:
            dst.write(header)
            body.seek(0)
            shutil.copyfileobj(body, dst, CHUNK_SIZE)
    finally:
        if body is not dst:
            body.close()
    dst.flush()


# Chunk-table entries read at a time by decrypt_stream (64 KiB of table per 128 MiB of data).
TABLE_WINDOW = 2048


def _read_exact(src: BinaryIO, length: int) -> bytearray:
    buf = bytearray(length)
    if read_full(src, memoryview(buf)) != length:
        raise TruncatedError("envelope is truncated")
    return buf


def _hash_region(src: BinaryIO, length: int) -> bytes:
    """SHA-256 of the next ``length`` bytes of ``src``, read in bounded pieces."""
    hasher = sha256_hasher()
    buf = bytearray(min(length, TABLE_WINDOW * HASH_SIZE))
    left = length
    while left:
        view = memoryview(buf)[: min(left, len(buf))]
        if read_full(src, view) != len(view):
            raise TruncatedError("envelope is truncated in the chunk table")
        hasher.update(view)
        left -= len(view)
    return hasher.finalize()


def decrypt_stream(
    src: BinaryIO, dst: BinaryIO, identity: Identity, *, binding: bytes | None = None
) -> None:
    """Decrypt one envelope from ``src`` to ``dst``, in bounded memory whatever its size.

    No chunk's plaintext is written before its GCM tag verifies. On a seekable ``src`` the
    size and the chunk table are checked first, so every chunk is also checked against the
    writer's signature before release. On a pipe the table comes after the payload: chunks are
    released once their tag verifies and the table is compared at the end, so content forged by
    a co-recipient (who knows the file key) is detected only then -- PayloadError, after some
    output. The cloud, which lacks the file key, cannot forge any chunk.
    """
    seekable = _seekable(src)
    start = src.tell() if seekable else 0
    header_bytes = bytearray(HEADER_SIZE)
    got = read_full(src, memoryview(header_bytes))
    if got != HEADER_SIZE:
        raise FormatError(f"too short to be a cssfs envelope ({got} bytes)")
    opened = open_header(bytes(header_bytes), identity, binding=binding)
    if seekable:
        _decrypt_seekable(src, dst, opened, start)
    else:
        _decrypt_sequential(src, dst, opened)
    dst.flush()


def _read_chunk(src: BinaryIO, buf: bytearray, index: int, size: int) -> memoryview:
    _, ct_len = chunk_range(index, size)
    ct = memoryview(buf)[:ct_len]
    if read_full(src, ct) != ct_len:
        raise TruncatedError(f"envelope is truncated in chunk {index}")
    return ct


def _decrypt_seekable(src: BinaryIO, dst: BinaryIO, opened: OpenedEnvelope, start: int) -> None:
    header = opened.header
    size, count = header.plain_size, opened.chunk_count
    table_offset, table_length = table_range(size)
    end = src.seek(0, io.SEEK_END)
    check_envelope_size(size, end - start)
    # Pass 1: the table must match the signed hash before anything is released.
    src.seek(start + table_offset)
    if _hash_region(src, table_length) != header.table_hash:
        raise PayloadError("chunk table does not match the writer's signature")
    # Pass 2: chunks, each checked against its table entry; the table is read a window at a
    # time (memory stays flat) and hashed again, in case the file changed between passes.
    ct_buf = bytearray(CHUNK_SIZE + TAG_SIZE)
    pt_buf = bytearray(CHUNK_SIZE)
    recheck = sha256_hasher()
    for base in range(0, count, TABLE_WINDOW):
        n = min(TABLE_WINDOW, count - base)
        src.seek(start + table_offset + HASH_SIZE * base)
        window = _read_exact(src, HASH_SIZE * n)
        recheck.update(window)
        src.seek(start + chunk_range(base, size)[0])
        for index in range(base, base + n):
            ct = _read_chunk(src, ct_buf, index, size)
            pt = memoryview(pt_buf)[: len(ct) - TAG_SIZE]
            k = HASH_SIZE * (index - base)
            opened._open_checked_into(index, ct, pt, memoryview(window)[k : k + HASH_SIZE])
            dst.write(pt)
    if recheck.finalize() != header.table_hash:
        raise PayloadError("the envelope changed while it was being read")


def _decrypt_sequential(src: BinaryIO, dst: BinaryIO, opened: OpenedEnvelope) -> None:
    header = opened.header
    size, count = header.plain_size, opened.chunk_count
    _, table_length = table_range(size)
    ct_buf = bytearray(CHUNK_SIZE + TAG_SIZE)
    pt_buf = bytearray(CHUNK_SIZE)
    # SHA-256 over the hashes of the chunks as read: equals the table hash iff they are the
    # chunks the writer listed -- no need to keep the hashes themselves.
    payload_digest = sha256_hasher()
    for index in range(count):
        ct = _read_chunk(src, ct_buf, index, size)
        pt = memoryview(pt_buf)[: len(ct) - TAG_SIZE]
        payload_digest.update(sha256(ct))
        opened._open_unlisted_into(index, ct, pt)
        dst.write(pt)
    table_digest = _hash_region(src, table_length)
    if src.read(1):
        raise TrailingDataError("trailing data after the envelope")
    if table_digest != header.table_hash:
        raise PayloadError("chunk table does not match the writer's signature")
    if payload_digest.finalize() != header.table_hash:
        raise PayloadError("payload does not match the writer's signature")
