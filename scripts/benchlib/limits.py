"""limits: in-process measurements of what the hardware and the libraries allow, with no cssfs
code in the path -- bare AES-256-GCM over 64 KiB chunks, the same plus SHA-256 per chunk, and
the X25519/Ed25519 operations a per-file header costs.

What it knows: ``cryptography`` and hashlib. What it must not know: cssfs (so that its figures
stay a baseline even if cssfs changes), files, stores, mounts.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

CHUNK = 64 * 1024
TAG = 16


def _nonce(i: int, last: bool) -> bytes:
    return i.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def aesgcm_seal(data: memoryview, *, with_sha256: bool = False) -> float:
    """Seconds to seal ``data`` in 64 KiB chunks with AESGCM.encrypt_into (one core).

    With ``with_sha256``, each ciphertext chunk is also hashed (the chunk table of format v1).
    """
    aead = AESGCM(os.urandom(32))
    out = bytearray(CHUNK + TAG)
    view = memoryview(out)
    n = -(-len(data) // CHUNK) or 1
    sha = hashlib.sha256
    t0 = time.perf_counter()
    for i in range(n):
        piece = data[i * CHUNK:(i + 1) * CHUNK]
        k = aead.encrypt_into(_nonce(i, i == n - 1), piece, None, view[:len(piece) + TAG])
        if with_sha256:
            sha(view[:k]).digest()
    return time.perf_counter() - t0


def aesgcm_open(data: memoryview, *, with_sha256: bool = False) -> float:
    """Seconds to open ``data`` (sealed first, untimed) in 64 KiB chunks with decrypt_into.

    With ``with_sha256`` each ciphertext chunk is hashed before it is opened, as a reader that
    checks the chunk table does.
    """
    key = os.urandom(32)
    aead = AESGCM(key)
    n = -(-len(data) // CHUNK) or 1
    sealed = [aead.encrypt(_nonce(i, i == n - 1), data[i * CHUNK:(i + 1) * CHUNK], None)
              for i in range(n)]
    out = bytearray(CHUNK)
    view = memoryview(out)
    sha = hashlib.sha256
    t0 = time.perf_counter()
    for i, ct in enumerate(sealed):
        if with_sha256:
            sha(ct).digest()
        aead.decrypt_into(_nonce(i, i == n - 1), ct, None, view[:len(ct) - TAG])
    secs = time.perf_counter() - t0
    return secs


def sha256_only(data: memoryview) -> float:
    """Seconds to SHA-256 ``data`` in 64 KiB pieces."""
    sha = hashlib.sha256
    t0 = time.perf_counter()
    for i in range(0, len(data), CHUNK):
        sha(data[i:i + CHUNK]).digest()
    return time.perf_counter() - t0


def per_call(fn: Callable[[], object], *, min_time: float = 0.3, min_iter: int = 20) -> float:
    """Median-free simple mean: seconds per call of ``fn`` over >= min_time and >= min_iter."""
    fn()  # warm up
    n = 0
    t0 = time.perf_counter()
    while True:
        fn()
        n += 1
        el = time.perf_counter() - t0
        if n >= min_iter and el >= min_time:
            return el / n


def wrap_ops() -> dict[str, Callable[[], object]]:
    """The public-key operations of sealing/opening one header, bare.

    wrap: fresh X25519 key, ECDH, HKDF-SHA256, AES-GCM of a 32-byte key (one recipient stanza).
    unwrap: ECDH, HKDF, AES-GCM open. sign / verify: Ed25519 over ~200 bytes.
    """
    recipient = X25519PrivateKey.generate()
    recipient_pub = recipient.public_key()
    recipient_raw = recipient_pub.public_bytes(Encoding.Raw, PublicFormat.Raw)
    file_key = os.urandom(32)
    nonce = bytes(12)

    def derive(shared: bytes, eph: bytes) -> bytes:
        return HKDF(hashes.SHA256(), 32, eph + recipient_raw, b"bench wrap").derive(shared)

    def wrap() -> tuple[bytes, bytes]:
        eph = X25519PrivateKey.generate()
        eph_raw = eph.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        k = derive(eph.exchange(recipient_pub), eph_raw)
        return eph_raw, AESGCM(k).encrypt(nonce, file_key, None)

    eph_raw, wrapped = wrap()
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    eph_pub = X25519PublicKey.from_public_bytes(eph_raw)

    def unwrap() -> bytes:
        k = derive(recipient.exchange(eph_pub), eph_raw)
        return AESGCM(k).decrypt(nonce, wrapped, None)

    signer = Ed25519PrivateKey.generate()
    verifier = signer.public_key()
    msg = os.urandom(200)
    sig = signer.sign(msg)
    return {
        "wrap": wrap,
        "unwrap": unwrap,
        "sign": lambda: signer.sign(msg),
        "verify": lambda: verifier.verify(sig, msg),
    }
