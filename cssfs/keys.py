"""Identities (secret) and recipients (public): their encodings and their key operations.

This module knows: the recipient string ("cssfs1" + base32), fingerprints, the identity file
(plain or scrypt-protected), PEM import/export of X25519 keys, and how an identity unwraps a
stanza and signs. It must not know: the envelope layout (envelope.py), where identity files live
or their permissions (config.py), contacts, I/O. Secrets never appear in a repr or an error.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from cssfs.crypto import X25519_SIZE, Rng, default_rng, sha256, unwrap_file_key
from cssfs.errors import KeyFormatError, PassphraseError

RECIPIENT_PREFIX = "cssfs1"
IDENTITY_TAG = "CSSFS-IDENTITY-1"
IDENTITY_SCRYPT_TAG = "CSSFS-IDENTITY-1-SCRYPT"
IDENTITY_COMMENT = "# cssfs identity — keep this file secret"
PUBLIC_COMMENT = "# public: "

SCRYPT_LOG_N_MIN = 10
SCRYPT_LOG_N_MAX = 22
SCRYPT_LOG_N_DEFAULT = 17
SCRYPT_R = 8
SCRYPT_P = 1

_KEY_ID_LABEL = b"cssfs.v1 key id"
_RECIPIENT_LABEL = b"cssfs.v1 recipient"
_FINGERPRINT_LABEL = b"cssfs.v1 fingerprint"
_WRITER_LABEL = b"cssfs.v1 writer fingerprint"
_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_CHECKSUM_SIZE = 4
_SECRET_SIZE = 64  # X25519 private key || Ed25519 seed
_SCRYPT_SALT_SIZE = 16
_NONCE_SIZE = 12


def key_id(x25519_public: bytes) -> bytes:
    """The 8-byte stanza hint of an X25519 public key (not a secret, not unique)."""
    return sha256(_KEY_ID_LABEL + x25519_public)[:8]


# Any scalar works: X25519 clamps it to a multiple of 8, so a low-order point always gives 0.
_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(32)))


def check_x25519_public(public: bytes) -> None:
    """KeyFormatError if ``public`` is a low-order point (no one could decrypt files sent to it;
    the all-zero shared secret it yields is refused)."""
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise KeyFormatError("the X25519 public key is invalid (a low-order point)") from None


def _grouped(digest: bytes) -> str:
    text = digest.hex()
    return "-".join(text[i : i + 4] for i in range(0, len(text), 4))


@dataclass(frozen=True)
class Recipient:
    """Public half of an identity: X25519 key (receives files) and Ed25519 key (signs)."""

    x25519: bytes
    ed25519: bytes | None = None

    def __post_init__(self) -> None:
        if len(self.x25519) != X25519_SIZE:
            raise KeyFormatError("X25519 public key must be 32 bytes")
        if self.ed25519 is not None and len(self.ed25519) != 32:
            raise KeyFormatError("Ed25519 public key must be 32 bytes")

    @property
    def key_id(self) -> bytes:
        return key_id(self.x25519)

    @property
    def fingerprint(self) -> str:
        """SHA-256(label || x25519 || ed25519)[:10] as 5 groups of 4 hex digits.

        For a bare PEM recipient (no Ed25519 key) the Ed25519 part is left out.
        """
        return _grouped(sha256(_FINGERPRINT_LABEL + self.x25519 + (self.ed25519 or b""))[:10])

    def to_string(self) -> str:
        """The one-line recipient string "cssfs1..." (needs the Ed25519 key)."""
        if self.ed25519 is None:
            raise KeyFormatError(
                "this recipient came from a PEM key and has no signing key: "
                "it has no cssfs1 recipient string"
            )
        body = self.x25519 + self.ed25519
        raw = body + sha256(_RECIPIENT_LABEL + body)[:_CHECKSUM_SIZE]
        return RECIPIENT_PREFIX + base64.b32encode(raw).decode("ascii").rstrip("=").lower()

    def __str__(self) -> str:
        return self.to_string() if self.ed25519 is not None else f"<X25519 {self.fingerprint}>"


_RECIPIENT_B32_LEN = -(-(X25519_SIZE + 32 + _CHECKSUM_SIZE) * 8 // 5)  # 109


def parse_recipient(text: str) -> Recipient:
    """Parse a "cssfs1..." recipient string strictly (surrounding whitespace is ignored)."""
    text = text.strip()
    if not text.startswith(RECIPIENT_PREFIX):
        raise KeyFormatError("not a cssfs recipient (it must start with 'cssfs1')")
    body = text[len(RECIPIENT_PREFIX) :]
    if len(body) != _RECIPIENT_B32_LEN:
        raise KeyFormatError("cssfs recipient has the wrong length")
    if not _B32_ALPHABET.issuperset(body):
        raise KeyFormatError("cssfs recipient has characters outside lowercase base32")
    padded = body.upper() + "=" * (-len(body) % 8)
    try:
        raw = base64.b32decode(padded)
    except binascii.Error:
        raise KeyFormatError("cssfs recipient is not valid base32") from None
    x, ed, check = raw[:32], raw[32:64], raw[64:]
    if sha256(_RECIPIENT_LABEL + x + ed)[:_CHECKSUM_SIZE] != check:
        raise KeyFormatError("cssfs recipient has a bad checksum (mistyped?)")
    check_x25519_public(x)
    recipient = Recipient(x, ed)
    if recipient.to_string() != text:  # unused trailing bits set: non-canonical
        raise KeyFormatError("cssfs recipient is not canonically encoded")
    return recipient


def recipient_from_pem(data: bytes) -> Recipient:
    """A recipient from an X25519 SubjectPublicKeyInfo PEM (no signing key)."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFormatError("not a PEM public key") from None
    if not isinstance(key, X25519PublicKey):
        raise KeyFormatError("only X25519 keys are supported (this PEM holds another key type)")
    check_x25519_public(key.public_bytes_raw())
    return Recipient(key.public_bytes_raw(), None)


def writer_fingerprint(ed25519_public: bytes, known: Iterable[Recipient] = ()) -> str:
    """How to show the writer of a file, who is known only by an Ed25519 key.

    If a recipient in ``known`` (contacts, your own identity) has this signing key, its
    fingerprint (the one people compare). Otherwise "ed25519:" followed by
    SHA-256(b"cssfs.v1 writer fingerprint" || key)[:10] in 5 groups: visibly not a recipient
    fingerprint, so an unknown writer cannot pass for a contact.
    """
    for recipient in known:
        if recipient.ed25519 == ed25519_public:
            return recipient.fingerprint
    return "ed25519:" + _grouped(sha256(_WRITER_LABEL + ed25519_public)[:10])


class Identity:
    """Secret half: an X25519 private key (receives) and an Ed25519 private key (signs)."""

    __slots__ = ("_ed25519", "_x25519", "recipient")

    def __init__(self, x25519: X25519PrivateKey, ed25519: Ed25519PrivateKey) -> None:
        self._x25519 = x25519
        self._ed25519 = ed25519
        self.recipient = Recipient(
            x25519.public_key().public_bytes_raw(), ed25519.public_key().public_bytes_raw()
        )

    def __repr__(self) -> str:
        return f"Identity(fingerprint={self.recipient.fingerprint})"

    @classmethod
    def generate(cls, rng: Rng | None = None) -> Identity:
        """A new identity from ``rng`` (default os.urandom): 32 bytes X25519, then 32 Ed25519."""
        rng = rng or default_rng
        return cls._from_secret(rng(32) + rng(32))

    @classmethod
    def _from_secret(cls, secret: bytes) -> Identity:
        return cls(
            X25519PrivateKey.from_private_bytes(secret[:32]),
            Ed25519PrivateKey.from_private_bytes(secret[32:64]),
        )

    def _secret(self) -> bytes:
        return self._x25519.private_bytes_raw() + self._ed25519.private_bytes_raw()

    def unwrap(self, ephemeral: bytes, wrapped: bytes) -> bytes | None:
        """The file key in a stanza addressed to this identity, else None."""
        return unwrap_file_key(self._x25519, ephemeral, wrapped)

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (64 bytes)."""
        return self._ed25519.sign(message)

    def to_file(
        self,
        passphrase: bytes | None,
        *,
        scrypt_log_n: int = SCRYPT_LOG_N_DEFAULT,
        rng: Rng | None = None,
    ) -> bytes:
        """The identity file (text, UTF-8); the caller writes it with mode 0600."""
        secret = self._secret()
        if passphrase is None:
            line = f"{IDENTITY_TAG} {base64.b64encode(secret).decode('ascii')}"
        else:
            if not passphrase:
                raise PassphraseError("the passphrase is empty")
            if not SCRYPT_LOG_N_MIN <= scrypt_log_n <= SCRYPT_LOG_N_MAX:
                raise ValueError("keys: scrypt log2 N out of range")
            rng = rng or default_rng
            salt = rng(_SCRYPT_SALT_SIZE)
            nonce = rng(_NONCE_SIZE)
            key = _scrypt(passphrase, salt, scrypt_log_n)
            sealed = AESGCM(key).encrypt(nonce, secret, None)
            blob = salt + bytes([scrypt_log_n]) + nonce + sealed
            line = f"{IDENTITY_SCRYPT_TAG} {base64.b64encode(blob).decode('ascii')}"
        text = f"{IDENTITY_COMMENT}\n{PUBLIC_COMMENT}{self.recipient.to_string()}\n{line}\n"
        return text.encode("utf-8")

    def to_pem(self) -> tuple[bytes, bytes]:
        """(X25519 private key as PKCS8 PEM, X25519 public key as SubjectPublicKeyInfo PEM)."""
        private = self._x25519.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public = self._x25519.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return private, public


def _scrypt(passphrase: bytes, salt: bytes, log_n: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=1 << log_n, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase)


def _strict_b64(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise KeyFormatError("identity file: key is not valid base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise KeyFormatError("identity file: key is not canonical base64")
    return raw


def parse_identity_file(data: bytes, passphrase: Callable[[], bytes] | None) -> Identity:
    """Parse an identity file. ``passphrase`` is called only if the file is protected.

    Blank lines and "#" comment lines are ignored, except that a "# public: " line, if present,
    must match the key. KeyFormatError for a malformed file, PassphraseError for a wrong or
    missing passphrase.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFormatError("identity file is not UTF-8 text") from None
    key_lines: list[str] = []
    public: str | None = None
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line:
            continue
        if line.startswith(PUBLIC_COMMENT.strip()):
            public = line[len(PUBLIC_COMMENT.strip()) :].strip()
        elif not line.startswith("#"):
            key_lines.append(line)
    if len(key_lines) != 1:
        raise KeyFormatError("identity file must hold exactly one key line")
    tag, sep, body = key_lines[0].partition(" ")
    if not sep:
        raise KeyFormatError("identity file: key line has no key")
    if tag == IDENTITY_TAG:
        secret = _strict_b64(body)
        if len(secret) != _SECRET_SIZE:
            raise KeyFormatError("identity file: key has the wrong length")
    elif tag == IDENTITY_SCRYPT_TAG:
        secret = _unseal(_strict_b64(body), passphrase)
    else:
        raise KeyFormatError("not a cssfs identity file (unknown key line)")
    identity = Identity._from_secret(secret)
    if public is not None and public != identity.recipient.to_string():
        raise KeyFormatError("identity file: the '# public:' line does not match the key")
    return identity


def _unseal(blob: bytes, passphrase: Callable[[], bytes] | None) -> bytes:
    expected = _SCRYPT_SALT_SIZE + 1 + _NONCE_SIZE + _SECRET_SIZE + 16
    if len(blob) != expected:
        raise KeyFormatError("identity file: protected key has the wrong length")
    salt = blob[:_SCRYPT_SALT_SIZE]
    log_n = blob[_SCRYPT_SALT_SIZE]
    nonce = blob[_SCRYPT_SALT_SIZE + 1 : _SCRYPT_SALT_SIZE + 1 + _NONCE_SIZE]
    sealed = blob[_SCRYPT_SALT_SIZE + 1 + _NONCE_SIZE :]
    if not SCRYPT_LOG_N_MIN <= log_n <= SCRYPT_LOG_N_MAX:
        raise KeyFormatError(f"identity file: scrypt work factor 2^{log_n} out of range")
    if passphrase is None:
        raise PassphraseError("the identity file is passphrase-protected and no passphrase given")
    key = _scrypt(passphrase(), salt, log_n)
    try:
        return AESGCM(key).decrypt(nonce, sealed, None)
    except InvalidTag:
        raise PassphraseError("wrong passphrase for the identity file") from None


def identity_from_pem(
    private_pem: bytes, signing: Ed25519PrivateKey | None = None, *, rng: Rng | None = None
) -> Identity:
    """An identity from an X25519 PKCS8 PEM; a new Ed25519 key is made if ``signing`` is None."""
    try:
        key = serialization.load_pem_private_key(private_pem, password=None)
    except TypeError:
        raise KeyFormatError("the PEM private key is encrypted; decrypt it first") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFormatError("not a PEM private key") from None
    if not isinstance(key, X25519PrivateKey):
        raise KeyFormatError("only X25519 keys are supported (this PEM holds another key type)")
    if signing is None:
        signing = Ed25519PrivateKey.from_private_bytes((rng or default_rng)(32))
    return Identity(key, signing)
