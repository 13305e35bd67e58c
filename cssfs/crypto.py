"""Cryptographic primitives of format v1, all from ``cryptography``.

This module knows: HKDF-SHA256 and the v1 labels, SHA-256, HMAC-SHA256, the X25519 stanza wrap
(ECDH + HKDF + AES-256-GCM) and the STREAM payload cipher (AES-256-GCM, nonce = 11-byte chunk
counter || last-chunk flag). It must not know: the header layout (envelope.py), identity files
and recipient strings (keys.py), any I/O. Functions that draw randomness take ``rng`` (a callable
``n -> n random bytes``, default :func:`os.urandom`) so test vectors can be deterministic.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.utils import Buffer

from cssfs.errors import ChunkAuthError

Rng = Callable[[int], bytes]

FILE_KEY_SIZE = 32
SALT_SIZE = 16
TAG_SIZE = 16
CHUNK_SIZE = 65536
HASH_SIZE = 32
X25519_SIZE = 32
WRAPPED_SIZE = FILE_KEY_SIZE + TAG_SIZE  # 48

# Labels: readable, versioned, never reused for two purposes.
PAYLOAD_INFO = b"cssfs.v1 payload"
MAC_INFO = b"cssfs.v1 header mac"
COMMITMENT_INFO = b"cssfs.v1 key commitment"
X25519_INFO = b"cssfs.v1 X25519"

# The largest chunk index a 12-byte STREAM nonce can carry (11 bytes of counter).
MAX_CHUNK_INDEX = (1 << 88) - 1


def default_rng(n: int) -> bytes:
    """n bytes from the operating system's CSPRNG."""
    return os.urandom(n)


def sha256(data: Buffer) -> bytes:
    """SHA-256 of ``data`` (32 bytes)."""
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def sha256_hasher() -> hashes.Hash:
    """An incremental SHA-256 (update(), finalize())."""
    return hashes.Hash(hashes.SHA256())


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``ikm`` with ``salt`` and ``info``, ``length`` bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def hmac_sha256(key: bytes, data: Buffer) -> bytes:
    """HMAC-SHA256 of ``data`` under ``key`` (32 bytes)."""
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def hmac_sha256_verify(key: bytes, data: Buffer, tag: bytes) -> bool:
    """Whether ``tag`` is the HMAC-SHA256 of ``data`` (constant-time comparison)."""
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    try:
        h.verify(tag)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True, repr=False)
class FileKeys:
    """The three keys derived from one envelope's file key and salt."""

    payload_key: bytes
    mac_key: bytes
    commitment: bytes

    def __repr__(self) -> str:
        return "FileKeys(<secret>)"


def derive_file_keys(file_key: bytes, salt: bytes) -> FileKeys:
    """payload key, header MAC key and key commitment: HKDF(file_key, salt, label)."""
    if len(file_key) != FILE_KEY_SIZE or len(salt) != SALT_SIZE:
        raise ValueError("crypto: internal error: bad file key or salt length")
    return FileKeys(
        payload_key=hkdf(file_key, salt, PAYLOAD_INFO),
        mac_key=hkdf(file_key, salt, MAC_INFO),
        commitment=hkdf(file_key, salt, COMMITMENT_INFO),
    )


# -- X25519 stanza wrap ---------------------------------------------------------------------

# The wrap key is derived from a fresh ephemeral key pair, so it encrypts exactly one message:
# a fixed all-zero nonce is safe (as in age's X25519 recipient).
_WRAP_NONCE = bytes(12)


def _wrap_key(shared: bytes, ephemeral_public: bytes, recipient_public: bytes) -> bytes:
    return hkdf(shared, ephemeral_public + recipient_public, X25519_INFO)


def wrap_file_key(
    file_key: bytes,
    recipient_x25519: bytes,
    *,
    ephemeral: X25519PrivateKey | None = None,
    rng: Rng | None = None,
) -> tuple[bytes, bytes]:
    """Wrap ``file_key`` to one X25519 public key: (ephemeral public 32 B, wrapped 48 B).

    The ephemeral key is ``ephemeral`` if given, else made from ``rng(32)``. Raises ValueError
    for a low-order recipient key (the shared secret would be all zero).
    """
    if len(file_key) != FILE_KEY_SIZE or len(recipient_x25519) != X25519_SIZE:
        raise ValueError("crypto: internal error: bad file key or public key length")
    if ephemeral is None:
        ephemeral = X25519PrivateKey.from_private_bytes((rng or default_rng)(X25519_SIZE))
    eph_pub = ephemeral.public_key().public_bytes_raw()
    # cryptography raises ValueError on an all-zero shared secret (low-order point).
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_x25519))
    wrapped = AESGCM(_wrap_key(shared, eph_pub, recipient_x25519)).encrypt(
        _WRAP_NONCE, file_key, None
    )
    return eph_pub, wrapped


def unwrap_file_key(
    identity_x25519: X25519PrivateKey, ephemeral: bytes, wrapped: bytes
) -> bytes | None:
    """The file key in a stanza, or None if it was not wrapped to this key (or is malformed)."""
    if len(ephemeral) != X25519_SIZE or len(wrapped) != WRAPPED_SIZE:
        return None
    try:
        shared = identity_x25519.exchange(X25519PublicKey.from_public_bytes(ephemeral))
    except ValueError:  # low-order ephemeral share: all-zero shared secret
        return None
    recipient_pub = identity_x25519.public_key().public_bytes_raw()
    try:
        return AESGCM(_wrap_key(shared, ephemeral, recipient_pub)).decrypt(
            _WRAP_NONCE, wrapped, None
        )
    except InvalidTag:
        return None


# -- STREAM payload cipher ------------------------------------------------------------------


def chunk_nonce(index: int, last: bool) -> bytes:
    """12-byte nonce: 11-byte big-endian chunk index || 0x01 if last else 0x00."""
    if not 0 <= index <= MAX_CHUNK_INDEX:
        raise ValueError("crypto: internal error: chunk index out of range")
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class PayloadCipher:
    """AES-256-GCM over chunks with STREAM nonces; no associated data.

    A payload key encrypts exactly one payload (it is derived from a fresh random file key), so
    the counter nonce never repeats under one key.
    """

    __slots__ = ("_aead",)

    def __init__(self, payload_key: bytes) -> None:
        if len(payload_key) != 32:
            raise ValueError("crypto: internal error: payload key must be 32 bytes")
        self._aead = AESGCM(payload_key)

    def __repr__(self) -> str:
        return "PayloadCipher(<secret>)"

    def seal(self, index: int, plaintext: Buffer, *, last: bool) -> bytes:
        """Ciphertext of chunk ``index`` (len(plaintext) + 16 bytes)."""
        return self._aead.encrypt(chunk_nonce(index, last), plaintext, None)

    def seal_into(self, index: int, plaintext: Buffer, out: Buffer, *, last: bool) -> int:
        """Like :meth:`seal`, writing into ``out`` (exactly len(plaintext) + 16 bytes)."""
        return self._aead.encrypt_into(chunk_nonce(index, last), plaintext, None, out)

    def open(self, index: int, ciphertext: Buffer, *, last: bool) -> bytes:
        """Plaintext of chunk ``index``; ChunkAuthError(index) if the tag does not verify."""
        try:
            return self._aead.decrypt(chunk_nonce(index, last), ciphertext, None)
        except InvalidTag:
            raise ChunkAuthError(index) from None

    def open_into(self, index: int, ciphertext: Buffer, out: bytearray | memoryview, *,
                  last: bool) -> int:
        """Like :meth:`open`, writing into ``out`` (exactly len(ciphertext) - 16 bytes).

        AES-GCM decrypts before it checks the tag, so on failure ``out`` is zeroed: unverified
        plaintext is never left behind.
        """
        try:
            return self._aead.decrypt_into(chunk_nonce(index, last), ciphertext, None, out)
        except InvalidTag:
            view = memoryview(out)
            view[:] = bytes(len(view))
            raise ChunkAuthError(index) from None
