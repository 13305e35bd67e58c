"""cssfs.crypto: HKDF/SHA-256 pinned to published answers, the stanza wrap, the STREAM cipher."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cssfs import crypto
from cssfs.errors import ChunkAuthError

# A low-order X25519 point (order 8): the shared secret with any key is all zero.
LOW_ORDER = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


def test_hkdf_rfc5869_case_1() -> None:
    okm = crypto.hkdf(
        bytes([0x0B] * 22), bytes(range(13)), bytes(range(0xF0, 0xFA)), 42
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_sha256_and_hmac_known_answers() -> None:
    assert crypto.sha256(b"abc").hex() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    # RFC 4231 test case 2
    tag = crypto.hmac_sha256(b"Jefe", b"what do ya want for nothing?")
    assert tag.hex() == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    assert crypto.hmac_sha256_verify(b"Jefe", b"what do ya want for nothing?", tag)
    assert not crypto.hmac_sha256_verify(b"Jefe", b"what do ya want for nothing!", tag)


def test_derived_keys_are_distinct_and_pinned_to_labels() -> None:
    fk, salt = bytes(range(32)), bytes(16)
    keys = crypto.derive_file_keys(fk, salt)
    assert len({keys.payload_key, keys.mac_key, keys.commitment}) == 3
    assert keys.payload_key == crypto.hkdf(fk, salt, b"cssfs.v1 payload")
    assert keys.mac_key == crypto.hkdf(fk, salt, b"cssfs.v1 header mac")
    assert keys.commitment == crypto.hkdf(fk, salt, b"cssfs.v1 key commitment")
    assert "secret" in repr(keys) and keys.payload_key.hex() not in repr(keys)
    with pytest.raises(ValueError):
        crypto.derive_file_keys(fk[:31], salt)


def test_chunk_nonce_layout() -> None:
    assert crypto.chunk_nonce(0, False) == bytes(12)
    assert crypto.chunk_nonce(0, True) == bytes(11) + b"\x01"
    assert crypto.chunk_nonce(0x0102, False) == bytes(9) + b"\x01\x02\x00"
    assert crypto.chunk_nonce(crypto.MAX_CHUNK_INDEX, True) == b"\xff" * 11 + b"\x01"
    for bad in (-1, crypto.MAX_CHUNK_INDEX + 1):
        with pytest.raises(ValueError):
            crypto.chunk_nonce(bad, False)


def test_payload_cipher_round_trip_and_binding_to_index_and_flag() -> None:
    c = crypto.PayloadCipher(bytes(range(32)))
    ct = c.seal(5, b"hello", last=False)
    assert len(ct) == 5 + crypto.TAG_SIZE
    assert c.open(5, ct, last=False) == b"hello"
    for index, last in ((4, False), (6, False), (5, True)):
        with pytest.raises(ChunkAuthError) as info:
            c.open(index, ct, last=last)
        assert info.value.index == index
    other = crypto.PayloadCipher(bytes(32))
    with pytest.raises(ChunkAuthError):
        other.open(5, ct, last=False)
    assert "secret" in repr(c)


def test_payload_cipher_into_variants_and_zeroing_on_failure() -> None:
    c = crypto.PayloadCipher(bytes(range(32)))
    out = bytearray(3 + 16)
    assert c.seal_into(0, b"abc", out, last=True) == 19
    assert bytes(out) == c.seal(0, b"abc", last=True)
    pt = bytearray(3)
    assert c.open_into(0, bytes(out), pt, last=True) == 3 and pt == b"abc"
    out[0] ^= 1  # AES-GCM writes the (wrong) plaintext before checking the tag ...
    with pytest.raises(ChunkAuthError):
        c.open_into(0, bytes(out), pt, last=True)
    assert pt == bytes(3)  # ... so the buffer is wiped


def test_wrap_unwrap() -> None:
    alice, bob = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    fk = bytes(range(32))
    eph, wrapped = crypto.wrap_file_key(fk, alice.public_key().public_bytes_raw())
    assert len(eph) == 32 and len(wrapped) == 48
    assert crypto.unwrap_file_key(alice, eph, wrapped) == fk
    assert crypto.unwrap_file_key(bob, eph, wrapped) is None
    assert crypto.unwrap_file_key(alice, eph, wrapped[:-1] + bytes([wrapped[-1] ^ 1])) is None
    assert crypto.unwrap_file_key(alice, eph, wrapped[:47]) is None
    assert crypto.unwrap_file_key(alice, LOW_ORDER, wrapped) is None
    assert crypto.unwrap_file_key(alice, bytes(32), wrapped) is None


def test_wrap_is_deterministic_given_the_ephemeral_and_follows_the_spec() -> None:
    alice = X25519PrivateKey.from_private_bytes(bytes([7]) * 32)
    pub = alice.public_key().public_bytes_raw()
    eph_priv = X25519PrivateKey.from_private_bytes(bytes([9]) * 32)
    fk = bytes(32)
    eph, wrapped = crypto.wrap_file_key(fk, pub, ephemeral=eph_priv)
    assert (eph, wrapped) == crypto.wrap_file_key(fk, pub, rng=lambda n: bytes([9]) * n)
    # Independent recomputation from docs/FORMAT.md.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    shared = eph_priv.exchange(alice.public_key())
    wrap_key = crypto.hkdf(shared, eph + pub, b"cssfs.v1 X25519")
    assert wrapped == AESGCM(wrap_key).encrypt(bytes(12), fk, None)


def test_wrap_refuses_low_order_recipient() -> None:
    with pytest.raises(ValueError):
        crypto.wrap_file_key(bytes(32), LOW_ORDER)
