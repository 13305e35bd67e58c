"""cssfs.keys: recipient strings, fingerprints, identity files (plain and scrypt), PEM."""

from __future__ import annotations

import base64
import re

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from cssfs import keys
from cssfs.crypto import sha256
from cssfs.errors import KeyFormatError, PassphraseError
from cssfs.keys import (
    Identity,
    Recipient,
    identity_from_pem,
    parse_identity_file,
    parse_recipient,
    recipient_from_pem,
    writer_fingerprint,
)

B32 = "abcdefghijklmnopqrstuvwxyz234567"
LOW_ORDER = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


def counter_rng(seed: int = 0):
    state = [seed]

    def rng(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += sha256(state[0].to_bytes(8, "big"))
            state[0] += 1
        return out[:n]

    return rng


ALICE = Identity.generate(counter_rng(1))
BOB = Identity.generate(counter_rng(2))


def secret_hexes(identity: Identity) -> list[str]:
    secret = identity._secret()
    return [secret.hex(), secret[:32].hex(), secret[32:].hex(), base64.b64encode(secret).decode()]


def test_generate_uses_rng_in_order() -> None:
    a, b = Identity.generate(counter_rng(1)), Identity.generate(counter_rng(1))
    assert a.recipient == b.recipient == ALICE.recipient
    assert ALICE.recipient != BOB.recipient
    r = counter_rng(1)
    raw = r(32)
    assert ALICE.recipient.x25519 == (
        x25519.X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    )
    assert Identity.generate().recipient != Identity.generate().recipient


def test_recipient_string_round_trip_and_shape() -> None:
    s = ALICE.recipient.to_string()
    assert s.startswith("cssfs1") and len(s) == 115 and set(s[6:]) <= set(B32)
    assert parse_recipient(s) == ALICE.recipient
    assert parse_recipient(f"  {s}\n") == ALICE.recipient  # pasted with whitespace
    assert str(ALICE.recipient) == s
    # Layout: base32(x25519 || ed25519 || checksum)
    raw = base64.b32decode(s[6:].upper() + "===")
    assert raw[:32] == ALICE.recipient.x25519 and raw[32:64] == ALICE.recipient.ed25519
    assert raw[64:] == sha256(b"cssfs.v1 recipient" + raw[:64])[:4]


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda s: "age1" + s[6:], "prefix"),
        (lambda s: "CSSFS1" + s[6:], "prefix"),
        (lambda s: s.upper(), "prefix"),
        (lambda s: s[:6] + s[6:].upper(), "lowercase"),
        (lambda s: s[:-1], "length"),
        (lambda s: s + "a", "length"),
        (lambda s: s[:50] + "1" + s[51:], "base32"),
        (lambda s: s[:50] + ("a" if s[50] != "a" else "b") + s[51:], "checksum"),
        (lambda s: s[:40] + " " + s[41:], "base32"),
        (lambda s: s[:40] + "=" + s[41:], "base32"),
        (lambda s: "", "prefix"),
    ],
)
def test_recipient_string_rejects(mutate, why) -> None:
    with pytest.raises(KeyFormatError):
        parse_recipient(mutate(ALICE.recipient.to_string()))


def test_recipient_string_rejects_non_canonical_trailing_bits() -> None:
    s = ALICE.recipient.to_string()
    # 68 bytes = 544 bits in 109 characters: the last character carries 1 unused bit.
    last = B32.index(s[-1])
    assert last % 2 == 0
    with pytest.raises(KeyFormatError, match="canonical"):
        parse_recipient(s[:-1] + B32[last | 1])


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, 114), char=st.characters(codec="ascii"))
def test_mutated_recipient_strings_raise_key_format_error(pos: int, char: str) -> None:
    s = ALICE.recipient.to_string()
    mutated = s[:pos] + char + s[pos + 1 :]
    if mutated.strip() == s:
        assert parse_recipient(mutated) == ALICE.recipient
        return
    with pytest.raises(KeyFormatError):
        parse_recipient(mutated)


@settings(max_examples=50, deadline=None)
@given(x=st.binary(min_size=32, max_size=32), ed=st.binary(min_size=32, max_size=32))
def test_any_recipient_round_trips(x: bytes, ed: bytes) -> None:
    r = Recipient(x, ed)
    try:
        keys.check_x25519_public(x)
    except KeyFormatError:
        with pytest.raises(KeyFormatError, match="low-order"):
            parse_recipient(r.to_string())
        return
    assert parse_recipient(r.to_string()) == r


def test_low_order_recipient_keys_rejected() -> None:
    for point in (bytes(32), b"\x01" + bytes(31), LOW_ORDER):
        with pytest.raises(KeyFormatError, match="low-order"):
            parse_recipient(Recipient(point, bytes(32)).to_string())
    pem = x25519.X25519PublicKey.from_public_bytes(LOW_ORDER).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(KeyFormatError, match="low-order"):
        recipient_from_pem(pem)


def test_recipient_field_lengths_checked() -> None:
    with pytest.raises(KeyFormatError):
        Recipient(bytes(31), bytes(32))
    with pytest.raises(KeyFormatError):
        Recipient(bytes(32), bytes(33))


def test_key_id_and_fingerprints() -> None:
    r = ALICE.recipient
    assert r.key_id == sha256(b"cssfs.v1 key id" + r.x25519)[:8]
    assert r.ed25519 is not None
    digest = sha256(b"cssfs.v1 fingerprint" + r.x25519 + r.ed25519)[:10].hex()
    assert r.fingerprint == "-".join(digest[i : i + 4] for i in range(0, 20, 4))
    assert re.fullmatch(r"([0-9a-f]{4}-){4}[0-9a-f]{4}", r.fingerprint)
    assert Recipient(r.x25519, None).fingerprint != r.fingerprint
    # The fingerprint covers the X25519 key: pairing alice's signing key with another
    # decryption key gives a different fingerprint.
    assert Recipient(BOB.recipient.x25519, r.ed25519).fingerprint != r.fingerprint


def test_writer_fingerprint() -> None:
    ed = ALICE.recipient.ed25519
    assert ed is not None
    assert writer_fingerprint(ed, [BOB.recipient, ALICE.recipient]) == ALICE.recipient.fingerprint
    unknown = writer_fingerprint(ed)
    assert unknown == writer_fingerprint(ed, [BOB.recipient])
    assert re.fullmatch(r"ed25519:([0-9a-f]{4}-){4}[0-9a-f]{4}", unknown)
    digest = sha256(b"cssfs.v1 writer fingerprint" + ed)[:10].hex()
    assert unknown == "ed25519:" + "-".join(digest[i : i + 4] for i in range(0, 20, 4))


def test_identity_repr_and_str_hide_secrets() -> None:
    for text in (repr(ALICE), str(ALICE)):
        assert ALICE.recipient.fingerprint in text
        for secret in secret_hexes(ALICE):
            assert secret not in text


def test_sign_and_unwrap() -> None:
    ed = ALICE.recipient.ed25519
    assert ed is not None
    sig = ALICE.sign(b"msg")
    ed25519.Ed25519PublicKey.from_public_bytes(ed).verify(sig, b"msg")
    from cssfs.crypto import wrap_file_key

    eph, wrapped = wrap_file_key(bytes(32), ALICE.recipient.x25519)
    assert ALICE.unwrap(eph, wrapped) == bytes(32)
    assert BOB.unwrap(eph, wrapped) is None


# -- identity files -------------------------------------------------------------------------


def test_identity_file_plain_round_trip_and_layout() -> None:
    data = ALICE.to_file(None)
    lines = data.decode("utf-8").splitlines()
    assert lines[0] == "# cssfs identity — keep this file secret"
    assert lines[1] == "# public: " + ALICE.recipient.to_string()
    tag, body = lines[2].split(" ")
    assert tag == "CSSFS-IDENTITY-1"
    assert base64.b64decode(body) == ALICE._secret()
    assert len(lines) == 3 and data.endswith(b"\n")
    assert parse_identity_file(data, None).recipient == ALICE.recipient
    # The passphrase callback is not called for a plain file.
    assert parse_identity_file(data, lambda: pytest.fail("asked")).recipient == ALICE.recipient
    # A bare key line (as in the test vectors) is enough.
    assert parse_identity_file(lines[2].encode(), None).recipient == ALICE.recipient


def test_identity_file_scrypt_round_trip_and_layout() -> None:
    data = ALICE.to_file(b"correct horse", scrypt_log_n=10)
    for secret in secret_hexes(ALICE):
        assert secret.encode() not in data
    line = data.decode().splitlines()[2]
    tag, body = line.split(" ")
    assert tag == "CSSFS-IDENTITY-1-SCRYPT"
    blob = base64.b64decode(body)
    assert len(blob) == 16 + 1 + 12 + 64 + 16 and blob[16] == 10
    got = parse_identity_file(data, lambda: b"correct horse")
    assert got.recipient == ALICE.recipient
    with pytest.raises(PassphraseError):
        parse_identity_file(data, lambda: b"wrong")
    with pytest.raises(PassphraseError):
        parse_identity_file(data, None)


def test_scrypt_work_factor_bounds() -> None:
    with pytest.raises(ValueError):
        ALICE.to_file(b"pw", scrypt_log_n=9)
    with pytest.raises(PassphraseError):
        ALICE.to_file(b"", scrypt_log_n=10)
    data = ALICE.to_file(b"pw", scrypt_log_n=10, rng=counter_rng(5))
    line = data.decode().splitlines()[2]
    blob = bytearray(base64.b64decode(line.split(" ")[1]))
    for bad in (9, 23, 255):
        blob[16] = bad
        forged = data.decode().replace(line, "CSSFS-IDENTITY-1-SCRYPT " + base64.b64encode(
            bytes(blob)).decode())
        with pytest.raises(KeyFormatError, match="work factor"):
            parse_identity_file(forged.encode(), lambda: pytest.fail("asked"))


def test_scrypt_file_is_deterministic_given_rng() -> None:
    a = ALICE.to_file(b"pw", scrypt_log_n=10, rng=counter_rng(5))
    b = ALICE.to_file(b"pw", scrypt_log_n=10, rng=counter_rng(5))
    assert a == b


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"# only a comment\n",
        b"CSSFS-IDENTITY-1\n",
        b"CSSFS-IDENTITY-2 AAAA\n",
        b"AGE-SECRET-KEY-1XYZ\n",
        b"\xff\xfe\n",
        b"CSSFS-IDENTITY-1 " + base64.b64encode(bytes(63)) + b"\n",
        b"CSSFS-IDENTITY-1 " + base64.b64encode(bytes(65)) + b"\n",
        b"CSSFS-IDENTITY-1 " + base64.b64encode(bytes(64)).rstrip(b"=") + b"\n",
        b"CSSFS-IDENTITY-1 " + base64.urlsafe_b64encode(b"\xff" * 64) + b"\n",
        b"CSSFS-IDENTITY-1-SCRYPT " + base64.b64encode(bytes(50)) + b"\n",
    ],
)
def test_malformed_identity_files(text: bytes) -> None:
    with pytest.raises(KeyFormatError):
        parse_identity_file(text, lambda: b"pw")


def test_identity_file_strictness() -> None:
    data = ALICE.to_file(None).decode()
    line = data.splitlines()[2]
    # Two key lines.
    with pytest.raises(KeyFormatError, match="exactly one"):
        parse_identity_file((data + line + "\n").encode(), None)
    # Non-canonical base64: the last character before "==" carries 4 unused bits.
    body = line.split(" ")[1]
    idx = len(body) - 3
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    bumped = alphabet[alphabet.index(body[idx]) ^ 1]
    forged = line.replace(body, body[:idx] + bumped + body[idx + 1 :])
    with pytest.raises(KeyFormatError, match="canonical"):
        parse_identity_file(forged.encode(), None)
    # The "# public:" line must match the key.
    wrong = data.replace(ALICE.recipient.to_string(), BOB.recipient.to_string())
    with pytest.raises(KeyFormatError, match="public"):
        parse_identity_file(wrong.encode(), None)


@settings(max_examples=100, deadline=None)
@given(pos=st.integers(0, 200), byte=st.integers(0, 255))
def test_mutated_identity_file_raises_or_is_the_same_key(pos: int, byte: int) -> None:
    data = bytearray(ALICE.to_file(None))
    pos %= len(data)
    data[pos] = byte
    try:
        got = parse_identity_file(bytes(data), None)
    except KeyFormatError:
        return
    # Only harmless edits parse: inside the comment, whitespace, or X25519 bits that
    # clamping ignores -- never a different key.
    assert got.recipient == ALICE.recipient


def test_identity_file_comments_and_blank_lines_ignored() -> None:
    data = ALICE.to_file(None).decode()
    noisy = "\n# hello\n\n" + data.replace("\n", "\r\n") + "\n# bye\n"
    assert parse_identity_file(noisy.encode(), None).recipient == ALICE.recipient


# -- PEM ------------------------------------------------------------------------------------


def test_pem_round_trip() -> None:
    private, public = ALICE.to_pem()
    assert private.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.startswith(b"-----BEGIN PUBLIC KEY-----")
    r = recipient_from_pem(public)
    assert r == Recipient(ALICE.recipient.x25519, None)
    signing = ed25519.Ed25519PrivateKey.from_private_bytes(ALICE._secret()[32:])
    same = identity_from_pem(private, signing)
    assert same.recipient == ALICE.recipient
    fresh = identity_from_pem(private)
    assert fresh.recipient.x25519 == ALICE.recipient.x25519
    assert fresh.recipient.ed25519 != ALICE.recipient.ed25519
    with pytest.raises(KeyFormatError, match="PEM"):
        r.to_string()
    assert r.fingerprint in str(r)


def test_pem_other_key_types_rejected() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    for k in (ec_key, rsa_key, ed_key):
        priv = k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        pub = k.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        with pytest.raises(KeyFormatError, match="only X25519"):
            identity_from_pem(priv)
        with pytest.raises(KeyFormatError, match="only X25519"):
            recipient_from_pem(pub)


def test_pem_garbage_and_encrypted_rejected() -> None:
    for bad in (b"", b"hello", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"):
        with pytest.raises(KeyFormatError):
            identity_from_pem(bad)
        with pytest.raises(KeyFormatError):
            recipient_from_pem(bad)
    k = x25519.X25519PrivateKey.generate()
    enc = k.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(KeyFormatError, match="encrypted"):
        identity_from_pem(enc)
    private, _ = ALICE.to_pem()
    with pytest.raises(KeyFormatError):
        recipient_from_pem(private)


def test_constants() -> None:
    assert keys.SCRYPT_LOG_N_MIN == 10 and keys.SCRYPT_LOG_N_MAX == 22


@settings(max_examples=50, deadline=None)
@given(secret=st.binary(min_size=64, max_size=64))
def test_any_identity_file_round_trips(secret: bytes) -> None:
    identity = Identity._from_secret(secret)
    got = parse_identity_file(identity.to_file(None), None)
    assert got.recipient == identity.recipient
    assert got._secret() == secret
