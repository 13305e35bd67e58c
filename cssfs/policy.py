"""policy: folder recipient policies and signed records, and who the reader trusts.

What it knows: the canonical text encoding of a folder's recipient policy (docs/SHARING.md),
how a policy is signed and verified, where the policy of a folder is stored (the object key
``<folder>/.cssfs-policy``), which folders a key inherits from, the names cssfs keeps for itself
(``.cssfs-*``), and the trust rule: a signed record is followed only if its signature verifies
and its signer is the reader or one of the reader's contacts. What it must not know: stores,
trio, FUSE, config files. Everything here is a pure function over bytes and keys.

The bucket is untrusted: a policy found there is only a claim. ``check_policy`` says whether to
follow it; the caller (cssfs.sharing) reports the ones it must not follow and falls back to the
parent folder's policy.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cssfs.errors import FormatError, KeyFormatError, SignatureError, UntrustedWriterError
from cssfs.keys import Identity, Recipient, parse_recipient, writer_fingerprint

INTERNAL_PREFIX = ".cssfs-"
POLICY_NAME = ".cssfs-policy"
POLICY_MAGIC = "cssfs-policy v1"
POLICY_LABEL = b"cssfs.v1 folder policy\x00"
MAX_RECORD_SIZE = 256 * 1024
MAX_ENTRIES = 4096
MAX_VERSION = (1 << 63) - 1
SIGNATURE_SIZE = 64

GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DECIMAL = re.compile(r"[1-9][0-9]{0,18}|0")
_X25519_ENTRY = re.compile(r"x25519:[0-9a-f]{64}")
# Characters a folder keeps as they are; everything else is %XX (uppercase hex) of its UTF-8.
_FOLDER_SAFE = "/-._~"


# -- names ----------------------------------------------------------------------------------


def is_internal(key: str) -> bool:
    """True for keys cssfs keeps for itself (any path component starting with ``.cssfs-``).

    The mount hides them; share/unshare/access skip them.
    """
    return any(part.startswith(INTERNAL_PREFIX) for part in key.split("/"))


def check_folder(folder: str) -> str:
    """``folder`` as a key prefix: "" for the root, else components joined by "/", no leading
    or trailing slash, no empty, ".", ".." or ``.cssfs-*`` component. ValueError otherwise."""
    if folder == "":
        return folder
    parts = folder.split("/")
    if any(p in ("", ".", "..") or p.startswith(INTERNAL_PREFIX) for p in parts):
        raise ValueError(f"policy: bad folder name ({len(folder)} characters)")
    if "\x00" in folder or "\n" in folder:
        raise ValueError("policy: folder name holds a NUL or newline")
    return folder


def policy_key(folder: str) -> str:
    """The object key of the policy of ``folder`` ("" is the root)."""
    check_folder(folder)
    return f"{folder}/{POLICY_NAME}" if folder else POLICY_NAME


def folder_of(key: str) -> str:
    """The folder holding object ``key`` ("" for a key at the root)."""
    return key.rpartition("/")[0]


def folder_chain(folder: str) -> list[str]:
    """``folder`` and its ancestors, nearest first: "a/b" -> ["a/b", "a", ""]."""
    chain = [folder]
    while folder:
        folder = folder.rpartition("/")[0]
        chain.append(folder)
    return chain


def is_within(key: str, folder: str) -> bool:
    """True if ``key`` lies under ``folder`` (every key lies under the root "")."""
    return folder == "" or key == folder or key.startswith(folder + "/")


def _encode_folder(folder: str) -> str:
    return "/" + urllib.parse.quote(folder, safe=_FOLDER_SAFE, encoding="utf-8", errors="strict")


def _decode_folder(text: str) -> str:
    if not text.startswith("/"):
        raise FormatError("policy: folder must start with '/'")
    try:
        folder = urllib.parse.unquote(text[1:], encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise FormatError("policy: folder is not UTF-8") from None
    try:
        check_folder(folder)
    except ValueError as exc:
        raise FormatError(str(exc)) from None
    if _encode_folder(folder) != text:
        raise FormatError("policy: folder is not canonically encoded")
    return folder


# -- recipient entries ----------------------------------------------------------------------


def recipient_entry(recipient: Recipient) -> str:
    """How a recipient is written in a policy: its ``cssfs1...`` string, or ``x25519:<hex>``
    for a bare PEM recipient that has no signing key."""
    if recipient.ed25519 is None:
        return "x25519:" + recipient.x25519.hex()
    return recipient.to_string()


def parse_recipient_entry(text: str) -> Recipient:
    """Inverse of recipient_entry; KeyFormatError when malformed."""
    if text.startswith("x25519:"):
        if not _X25519_ENTRY.fullmatch(text):
            raise KeyFormatError("policy: bad x25519: recipient entry")
        return Recipient(bytes.fromhex(text[7:]), None)
    return parse_recipient(text)


def _canonical_recipients(recipients: Iterable[Recipient]) -> tuple[Recipient, ...]:
    by_key: dict[bytes, Recipient] = {}
    for r in recipients:
        known = by_key.get(r.x25519)
        if known is None or (known.ed25519 is None and r.ed25519 is not None):
            by_key[r.x25519] = r
    return tuple(sorted(by_key.values(), key=recipient_entry))


def check_group_name(name: str) -> str:
    if not GROUP_NAME.fullmatch(name):
        raise ValueError(
            "bad group name: 1-64 letters, digits, '.', '_' or '-', starting with a letter/digit"
        )
    return name


# -- signed line records --------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _strict_b64(text: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise FormatError(f"{what}: signature is not valid base64") from None
    if len(raw) != size or b64(raw) != text:
        raise FormatError(f"{what}: signature is not {size} bytes of canonical base64")
    return raw


def encode_lines(lines: Sequence[tuple[str, str]]) -> bytes:
    """``name value`` lines joined by LF, with a final LF (the signed body of a record)."""
    return "".join(f"{name} {value}\n" for name, value in lines).encode("utf-8")


def decode_signed(data: bytes, magic: str, what: str) -> tuple[list[tuple[str, str]], bytes, bytes]:
    """Split a signed record into (fields after the magic line, body, signature).

    The record is UTF-8, LF-terminated lines, the first exactly ``magic``, each other line
    ``name value`` (one space, no other whitespace around), the last ``signature <base64>``.
    ``body`` is every byte before the signature line: what the signature covers (after a
    label). FormatError on anything else.
    """
    if len(data) > MAX_RECORD_SIZE:
        raise FormatError(f"{what} is larger than {MAX_RECORD_SIZE} bytes")
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise FormatError(f"{what} is not UTF-8") from None
    if not text.endswith("\n"):
        raise FormatError(f"{what} does not end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 2 or lines[0] != magic:
        raise FormatError(f"not a {what} (bad first line)")
    if len(lines) > MAX_ENTRIES + 8:
        raise FormatError(f"{what} has too many lines")
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(" ")
        if not sep or not name or not value or value != value.strip() or " " in value:
            raise FormatError(f"{what}: malformed line")
        if any(c in line for c in "\r\t\x00\x0b\x0c"):
            raise FormatError(f"{what}: control character in a line")
        fields.append((name, value))
    name, value = fields[-1]
    if name != "signature":
        raise FormatError(f"{what}: the last line must be the signature")
    signature = _strict_b64(value, SIGNATURE_SIZE, what)
    body = data[: len(data) - len(f"signature {value}\n".encode())]
    return fields[:-1], body, signature


def verify_ed25519(public: bytes, signature: bytes, message: bytes, what: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise SignatureError(f"the signature of the {what} does not verify") from None


def parse_decimal(text: str, what: str, *, low: int = 0) -> int:
    if not _DECIMAL.fullmatch(text):
        raise FormatError(f"{what}: not a canonical decimal number")
    value = int(text)
    if not low <= value <= MAX_VERSION:
        raise FormatError(f"{what}: number out of range")
    return value


class FieldReader:
    """Reads the fields of a record in their one allowed order (helper of the parsers)."""

    def __init__(self, fields: list[tuple[str, str]], what: str) -> None:
        self._fields = fields
        self._pos = 0
        self.what = what

    def one(self, name: str) -> str:
        if self._pos >= len(self._fields) or self._fields[self._pos][0] != name:
            raise FormatError(f"{self.what}: expected a '{name}' line")
        value = self._fields[self._pos][1]
        self._pos += 1
        return value

    def many(self, name: str) -> list[str]:
        values = []
        while self._pos < len(self._fields) and self._fields[self._pos][0] == name:
            values.append(self._fields[self._pos][1])
            self._pos += 1
        if len(values) > MAX_ENTRIES:
            raise FormatError(f"{self.what}: too many '{name}' lines")
        return values

    def end(self) -> None:
        if self._pos != len(self._fields):
            raise FormatError(f"{self.what}: unexpected '{self._fields[self._pos][0]}' line")


def parse_setter(text: str, what: str) -> Recipient:
    try:
        return parse_recipient(text)
    except KeyFormatError as exc:
        raise KeyFormatError(f"{what}: setter: {exc}") from None


# -- the policy -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """Who may read what is written under ``folder`` (and its sub-folders without their own).

    ``recipients`` and ``groups`` are sorted and free of duplicates, so one policy has exactly
    one encoding; ``version`` grows by one with every change of the folder's policy.
    """

    folder: str
    version: int
    setter: Recipient
    recipients: tuple[Recipient, ...]
    groups: tuple[str, ...]
    signature: bytes

    def __repr__(self) -> str:
        return (
            f"Policy(folder_len={len(self.folder)}, version={self.version}, "
            f"recipients={len(self.recipients)}, groups={len(self.groups)})"
        )

    @property
    def key(self) -> str:
        return policy_key(self.folder)

    def body(self) -> bytes:
        """The signed part of the encoding: every line before ``signature``."""
        lines = [
            ("folder", _encode_folder(self.folder)),
            ("version", str(self.version)),
            ("setter", self.setter.to_string()),
            *(("recipient", recipient_entry(r)) for r in self.recipients),
            *(("group", g) for g in self.groups),
        ]
        return (POLICY_MAGIC + "\n").encode() + encode_lines(lines)

    def to_bytes(self) -> bytes:
        return self.body() + f"signature {b64(self.signature)}\n".encode()

    def verify(self) -> None:
        """SignatureError unless the setter signed exactly this policy."""
        assert self.setter.ed25519 is not None  # parse_recipient always gives one
        verify_ed25519(self.setter.ed25519, self.signature, POLICY_LABEL + self.body(), "policy")

    @property
    def key_ids(self) -> frozenset[bytes]:
        return frozenset(r.key_id for r in self.recipients)

    def with_changes(
        self,
        identity: Identity,
        *,
        add: Iterable[Recipient] = (),
        remove: Iterable[bytes] = (),
        add_groups: Iterable[str] = (),
        remove_groups: Iterable[str] = (),
        version: int | None = None,
    ) -> Policy:
        """A new policy for the same folder, one version up, signed by ``identity``.
        ``remove`` holds key ids."""
        removed = set(remove)
        recipients = [r for r in self.recipients if r.key_id not in removed]
        recipients.extend(r for r in add if r.key_id not in removed)
        gone = set(remove_groups)
        groups = [g for g in self.groups if g not in gone]
        groups.extend(g for g in add_groups if g not in gone)
        return make_policy(
            identity, self.folder, self.version + 1 if version is None else version,
            recipients, groups,
        )


def make_policy(
    identity: Identity,
    folder: str,
    version: int,
    recipients: Iterable[Recipient],
    groups: Iterable[str] = (),
) -> Policy:
    """A policy for ``folder`` signed by ``identity`` (who becomes its setter)."""
    check_folder(folder)
    if not 1 <= version <= MAX_VERSION:
        raise ValueError("policy: version out of range")
    rs = _canonical_recipients(recipients)
    gs = tuple(sorted({check_group_name(g) for g in groups}))
    if len(rs) > MAX_ENTRIES or len(gs) > MAX_ENTRIES:
        raise ValueError("policy: too many entries")
    unsigned = Policy(folder, version, identity.recipient, rs, gs, bytes(SIGNATURE_SIZE))
    signature = identity.sign(POLICY_LABEL + unsigned.body())
    return Policy(folder, version, identity.recipient, rs, gs, signature)


def parse_policy(data: bytes) -> Policy:
    """Parse a policy object strictly: exactly the encoding ``Policy.to_bytes`` produces.

    Only FormatError (and its subclass KeyFormatError) is raised; the signature is not checked
    here (``Policy.verify``, ``check_policy``).
    """
    what = "folder policy"
    fields, body, signature = decode_signed(data, POLICY_MAGIC, what)
    r = FieldReader(fields, what)
    folder = _decode_folder(r.one("folder"))
    version = parse_decimal(r.one("version"), what, low=1)
    setter = parse_setter(r.one("setter"), what)
    recipients = tuple(parse_recipient_entry(v) for v in r.many("recipient"))
    groups = tuple(r.many("group"))
    r.end()
    for g in groups:
        if not GROUP_NAME.fullmatch(g):
            raise FormatError(f"{what}: bad group name")
    if recipients != _canonical_recipients(recipients):
        raise FormatError(f"{what}: recipients are not sorted and unique")
    if groups != tuple(sorted(set(groups))):
        raise FormatError(f"{what}: groups are not sorted and unique")
    policy = Policy(folder, version, setter, recipients, groups, signature)
    if policy.body() != body:  # belt and braces: one policy, one encoding
        raise FormatError(f"{what} is not canonically encoded")
    return policy


# -- trust ----------------------------------------------------------------------------------


class ContactLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def recipient(self) -> Recipient: ...


@dataclass(frozen=True)
class Trust:
    """Whom the reader trusts: their own recipients (identity, groups) and their contacts.

    Nothing found in the bucket is ever added here: only what the user put in their contacts.
    """

    own: tuple[Recipient, ...]
    contacts: tuple[tuple[str, Recipient], ...] = ()

    @classmethod
    def of(cls, own: Recipient | Iterable[Recipient], contacts: Iterable[ContactLike] = ()
           ) -> Trust:
        mine = (own,) if isinstance(own, Recipient) else tuple(own)
        return cls(mine, tuple((c.name, c.recipient) for c in contacts))

    def is_trusted(self, ed25519: bytes) -> bool:
        """True if ``ed25519`` is the reader's own signing key or a contact's."""
        return any(r.ed25519 == ed25519 for r in self.own) or any(
            r.ed25519 == ed25519 for _, r in self.contacts
        )

    def signer_name(self, ed25519: bytes) -> str | None:
        """"me" for the reader's own key, a contact's name, else None."""
        if any(r.ed25519 == ed25519 for r in self.own):
            return "me"
        return next((n for n, r in self.contacts if r.ed25519 == ed25519), None)

    def describe_signer(self, ed25519: bytes) -> str:
        """A name if known, else the writer fingerprint ("ed25519:..."): for logs and xattrs."""
        name = self.signer_name(ed25519)
        if name is not None:
            return name
        known = [*self.own, *(r for _, r in self.contacts)]
        return writer_fingerprint(ed25519, known)

    def name_for_key_id(self, key_id: bytes) -> str | None:
        if any(r.key_id == key_id for r in self.own):
            return "me"
        return next((n for n, r in self.contacts if r.key_id == key_id), None)

    def recipient_for_key_id(self, key_id: bytes) -> Recipient | None:
        for r in self.own:
            if r.key_id == key_id:
                return r
        return next((r for _, r in self.contacts if r.key_id == key_id), None)


def check_trusted_writer(writer_ed25519: bytes, trust: Trust) -> None:
    """For ``--trusted-writers-only``: UntrustedWriterError unless the file's writer is the
    reader or a contact. (The signature itself is checked by envelope.open_header.)"""
    if not trust.is_trusted(writer_ed25519):
        raise UntrustedWriterError(
            f"the file's writer {trust.describe_signer(writer_ed25519)} is not in your contacts"
        )


@dataclass(frozen=True)
class Verdict:
    """What to do with a policy object: follow ``policy``, or not (``problem`` says why)."""

    policy: Policy | None
    problem: str | None

    @property
    def followed(self) -> bool:
        return self.policy is not None and self.problem is None


def check_policy(data: bytes, folder: str, trust: Trust, *, min_version: int = 0) -> Verdict:
    """Decide whether the policy object found for ``folder`` is followed.

    Followed only if it parses, names ``folder`` itself (a policy copied from another folder
    is refused), its signature verifies, its setter is trusted, and its version is at least
    ``min_version`` (the highest this reader has seen: a rolled-back policy is refused).
    """
    try:
        policy = parse_policy(data)
    except FormatError as exc:
        return Verdict(None, f"malformed ({exc})")
    if policy.folder != folder:
        return Verdict(policy, "it names another folder (copied or moved)")
    try:
        policy.verify()
    except SignatureError:
        return Verdict(policy, "its signature does not verify (tampered)")
    assert policy.setter.ed25519 is not None
    if not trust.is_trusted(policy.setter.ed25519):
        return Verdict(
            policy,
            f"it was set by {policy.setter.fingerprint}, who is not you or one of your contacts",
        )
    if policy.version < min_version:
        return Verdict(
            policy, f"version {policy.version} is older than version {min_version} seen before"
        )
    return Verdict(policy, None)
