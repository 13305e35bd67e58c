"""config: where cssfs keeps its files, how an identity is loaded, and the contacts book.

What it knows: the XDG base directories, the identity file path and where its passphrase comes
from (a file, ``$CSSFS_PASSPHRASE_FILE``, a systemd credential, a terminal prompt), and the
contacts book ``$XDG_CONFIG_HOME/cssfs/contacts`` (``name recipient`` lines). What it must not
know: argparse, stores, FUSE, trio. It has no crypto of its own: keys are parsed and serialised
by cssfs.keys. Errors are ConfigError (or the KeyFormatError/PassphraseError keys raises); no
message ever holds a passphrase or key material.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cssfs.errors import ConfigError, KeyFormatError
from cssfs.keys import Identity, Recipient, parse_identity_file, parse_recipient, recipient_from_pem

log = logging.getLogger(__name__)

APP = "cssfs"
IDENTITY_ENV = "CSSFS_IDENTITY"
PASSPHRASE_FILE_ENV = "CSSFS_PASSPHRASE_FILE"
CREDENTIAL_NAME = "cssfs-passphrase"  # systemd LoadCredential=cssfs-passphrase:...
RECIPIENT_PREFIX = "cssfs1"
PEM_FIELD_PREFIX = "x25519:"  # contacts made from a PEM public key (see recipient_field)
CONTACT_NAME = re.compile(r"[A-Za-z0-9._-]+")
MAX_SMALL_FILE = 64 * 1024

PassphraseSource = Callable[[], bytes]


# -- XDG paths --------------------------------------------------------------------------------


def _xdg(variable: str, fallback: Path) -> Path:
    # The XDG spec says relative values are invalid and must be ignored.
    value = os.environ.get(variable, "")
    return Path(value) if os.path.isabs(value) else fallback


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/cssfs`` (default ``~/.config/cssfs``): identity and contacts."""
    return _xdg("XDG_CONFIG_HOME", Path.home() / ".config") / APP


def state_dir() -> Path:
    """``$XDG_STATE_HOME/cssfs`` (default ``~/.local/state/cssfs``): durable daemon state."""
    return _xdg("XDG_STATE_HOME", Path.home() / ".local" / "state") / APP


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cssfs`` (default ``~/.cache/cssfs``): data that may be thrown away."""
    return _xdg("XDG_CACHE_HOME", Path.home() / ".cache") / APP


def runtime_dir() -> Path:
    """``$XDG_RUNTIME_DIR/cssfs``: sockets and pid files; falls back to ``state_dir()/run``.

    The fallback stays under the user's own home rather than a shared /tmp name another user
    could create first.
    """
    value = os.environ.get("XDG_RUNTIME_DIR", "")
    return Path(value) / APP if os.path.isabs(value) else state_dir() / "run"


def default_identity_path() -> Path:
    return config_dir() / "identity"


def identity_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The identity file: ``explicit`` (``-i``), else ``$CSSFS_IDENTITY``, else the default."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(IDENTITY_ENV, "")
    return Path(from_env) if from_env else default_identity_path()


def contacts_path() -> Path:
    return config_dir() / "contacts"


# -- private files ----------------------------------------------------------------------------


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` and missing parents with mode 0700 (existing directories are left alone)."""
    missing = []
    for parent in (path, *path.parents):
        if parent.is_dir():
            break
        missing.append(parent)
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass
        else:
            os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, then rename.

    Readers see the old file or the new one, never a part. The parent directories are created
    with mode 0700. With ``overwrite=False`` an existing ``path`` is never replaced
    (FileExistsError), even by a concurrent writer: the temporary file is hard-linked into place.
    """
    ensure_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _link_new(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)  # fails with FileExistsError, atomically, if path exists
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links (vfat, some FUSE): check, then rename
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is done
    finally:
        os.close(fd)


# -- passphrases ------------------------------------------------------------------------------


def passphrase_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """Where a passphrase comes from without a prompt, in order: ``explicit``
    (``--passphrase-file``), ``$CSSFS_PASSPHRASE_FILE``, ``$CREDENTIALS_DIRECTORY/cssfs-passphrase``
    (systemd ``LoadCredential=``); None if none applies."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(PASSPHRASE_FILE_ENV, "")
    if from_env:
        return Path(from_env)
    credentials = os.environ.get("CREDENTIALS_DIRECTORY", "")
    if credentials:
        candidate = Path(credentials) / CREDENTIAL_NAME
        if candidate.is_file():
            return candidate
    return None


def read_passphrase_file(path: Path) -> bytes:
    """The passphrase in ``path``: its bytes without one trailing newline; one line, not empty."""
    with open(path, "rb") as f:
        data = f.read(MAX_SMALL_FILE + 1)
    if len(data) > MAX_SMALL_FILE:
        raise ConfigError(f"passphrase file {path} is larger than {MAX_SMALL_FILE} bytes")
    if data.endswith(b"\n"):
        data = data[:-1]
        if data.endswith(b"\r"):
            data = data[:-1]
    if not data:
        raise ConfigError(f"passphrase file {path} is empty")
    if b"\n" in data:
        raise ConfigError(f"passphrase file {path} has more than one line")
    return data


def stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def passphrase_source(identity: Path, explicit: str | os.PathLike[str] | None = None
                      ) -> PassphraseSource:
    """A callable giving the passphrase of ``identity`` when (and only when) it is needed.

    It reads the passphrase file (see ``passphrase_file``), else prompts on the terminal when
    stdin is one, else raises ConfigError saying how to supply it. The answer is read once.
    """
    source = passphrase_file(explicit)
    cached: list[bytes] = []

    def get() -> bytes:
        if not cached:
            if source is not None:
                cached.append(read_passphrase_file(source))
            elif stdin_is_tty():
                cached.append(getpass.getpass(f"Passphrase for {identity}: ").encode())
            else:
                raise ConfigError(
                    f"identity {identity} is passphrase-protected: give --passphrase-file FILE, "
                    f"set {PASSPHRASE_FILE_ENV}, or run on a terminal"
                )
        return cached[0]

    return get


def new_passphrase(explicit: str | os.PathLike[str] | None, *, no_passphrase: bool
                   ) -> bytes | None:
    """The passphrase for a new identity (keygen, import), or None for an unprotected one.

    ``--no-passphrase`` wins; then a passphrase file (as ``passphrase_file``); then, on a
    terminal, a prompt asked twice (an empty answer means no passphrase). Without a terminal the
    identity is not protected, like ``ssh-keygen -N ''`` in a script.
    """
    if no_passphrase:
        return None
    source = passphrase_file(explicit)
    if source is not None:
        return read_passphrase_file(source)
    if not stdin_is_tty():
        return None
    first = getpass.getpass("Passphrase for the new identity (empty for none): ").encode()
    if not first:
        return None
    if getpass.getpass("Same passphrase again: ").encode() != first:
        raise ConfigError("the two passphrases differ; nothing was written")
    return first


# -- identity ---------------------------------------------------------------------------------


def load_identity(path: Path, passphrase: PassphraseSource | None) -> Identity:
    """Read and parse the identity file at ``path`` (KeyFormatError, PassphraseError).

    A missing file is a ConfigError that says how to create one.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(
            f"no identity at {path}: create one with `cssfs keygen` or give -i FILE"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"identity {path} is a directory, not an identity file") from None
    try:
        return parse_identity_file(data, passphrase)
    except KeyFormatError as exc:
        raise KeyFormatError(f"identity {path}: {exc}") from None


# -- contacts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contact:
    name: str
    recipient: Recipient


def check_contact_name(name: str) -> str:
    if not CONTACT_NAME.fullmatch(name):
        raise ConfigError(f"bad contact name {name!r}: use letters, digits, '.', '_' and '-'")
    return name


class Contacts:
    """The contacts book: name -> recipient, trusted because the user put it there.

    The file is text, one ``name recipient`` per line; blank lines and ``#`` comments are kept
    as they are when the book is rewritten (atomically, mode 0600).
    """

    HEADER = "# cssfs contacts: one 'name recipient' per line; see `cssfs contacts --help`."

    def __init__(self, path: Path, lines: list[str], contacts: list[Contact]) -> None:
        self.path = path
        self._lines = lines  # the file's lines, comments included, without newlines
        self._contacts = contacts

    @classmethod
    def load(cls, path: Path | None = None) -> Contacts:
        """Parse the book at ``path`` (default ``contacts_path()``); a missing file is empty."""
        path = contacts_path() if path is None else path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path, [cls.HEADER], [])
        except UnicodeDecodeError:
            raise ConfigError(f"contacts file {path} is not UTF-8 text") from None
        lines = text.splitlines()
        contacts: list[Contact] = []
        seen: set[str] = set()
        for number, line in enumerate(lines, 1):
            contact = _parse_contact_line(line, f"{path}:{number}")
            if contact is None:
                continue
            if contact.name in seen:
                raise ConfigError(f"{path}:{number}: contact {contact.name!r} is listed twice")
            seen.add(contact.name)
            contacts.append(contact)
        return cls(path, lines, contacts)

    def __iter__(self) -> Iterator[Contact]:
        return iter(self._contacts)

    def __len__(self) -> int:
        return len(self._contacts)

    def get(self, name: str) -> Contact | None:
        return next((c for c in self._contacts if c.name == name), None)

    def name_for_signing_key(self, ed25519: bytes) -> str | None:
        """The name of the contact whose signing key is ``ed25519`` (a file's writer)."""
        return next((c.name for c in self._contacts if c.recipient.ed25519 == ed25519), None)

    def name_for_key_id(self, key_id: bytes) -> str | None:
        """The name of the contact whose stanza hint is ``key_id`` (a file's recipient)."""
        return next((c.name for c in self._contacts if c.recipient.key_id == key_id), None)

    def add(self, name: str, recipient: Recipient) -> None:
        check_contact_name(name)
        if self.get(name) is not None:
            raise ConfigError(f"contact {name!r} exists already; remove it first")
        self._lines.append(f"{name} {recipient_field(recipient)}")
        self._contacts.append(Contact(name, recipient))

    def remove(self, name: str) -> Contact:
        contact = self.get(name)
        if contact is None:
            raise ConfigError(f"no contact named {name!r} in {self.path}")
        self._lines = [line for line in self._lines if _contact_name_of(line) != name]
        self._contacts.remove(contact)
        return contact

    def save(self) -> None:
        text = "".join(line + "\n" for line in self._lines)
        write_atomic(self.path, text.encode("utf-8"), mode=0o600)


def _contact_name_of(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    return stripped.split(maxsplit=1)[0]


def _parse_contact_line(line: str, where: str) -> Contact | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    fields = stripped.split()
    if len(fields) != 2:
        raise ConfigError(f"{where}: expected 'name recipient', got {len(fields)} fields")
    name, text = fields
    if not CONTACT_NAME.fullmatch(name):
        raise ConfigError(f"{where}: bad contact name {name!r}")
    try:
        return Contact(name, parse_recipient_field(text))
    except KeyFormatError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def recipient_field(recipient: Recipient) -> str:
    """How a contact's recipient is written in the book: its ``cssfs1...`` string, or, for a
    bare X25519 key from a PEM file (no signing key, so no recipient string), ``x25519:<hex>``."""
    if recipient.ed25519 is None:
        return PEM_FIELD_PREFIX + recipient.x25519.hex()
    return recipient.to_string()


def parse_recipient_field(text: str) -> Recipient:
    """The inverse of ``recipient_field``, strict (lowercase hex of exactly 32 bytes)."""
    if text.startswith(PEM_FIELD_PREFIX):
        body = text[len(PEM_FIELD_PREFIX) :]
        if not re.fullmatch(r"[0-9a-f]{64}", body):
            raise KeyFormatError("an x25519: key must be 64 lowercase hex digits")
        return Recipient(bytes.fromhex(body), None)
    return parse_recipient(text)


# -- recipients -------------------------------------------------------------------------------


def recipient_from_file(path: Path) -> Recipient:
    """A recipient from a file: a PEM public key (recipient_public_key.pem) or a cssfs1 line."""
    with open(path, "rb") as f:
        data = f.read(MAX_SMALL_FILE + 1)
    if b"PRIVATE KEY-----" in data:
        raise KeyFormatError(
            f"{path} is a private key: give the public one (recipient_public_key.pem)"
        )
    try:
        if b"-----BEGIN" in data:
            return recipient_from_pem(data)
        text = data.decode("ascii").strip()
        if text.startswith(RECIPIENT_PREFIX) and "\n" not in text:
            return parse_recipient(text)
    except KeyFormatError as exc:
        raise KeyFormatError(f"{path}: {exc}") from None
    except UnicodeDecodeError:
        pass
    raise KeyFormatError(f"{path} holds neither a PEM public key nor a cssfs1 recipient string")


def parse_recipient_arg(text: str) -> Recipient:
    """``text`` as a ``cssfs1...`` string or the path of a public key file (not a contact)."""
    if text.startswith(RECIPIENT_PREFIX):
        return parse_recipient(text)
    path = Path(text)
    if path.is_file():
        return recipient_from_file(path)
    raise ConfigError(
        f"{text!r} is neither a cssfs1... recipient string nor a public key file"
    )


def resolve_recipient(text: str, contacts: Contacts | None = None) -> Recipient:
    """``text`` as a recipient: a contact name, a ``cssfs1...`` string, or a public key file --
    tried in that order. ConfigError when it is none of them."""
    book = Contacts.load() if contacts is None else contacts
    contact = book.get(text)
    if contact is not None:
        return contact.recipient
    if text.startswith(RECIPIENT_PREFIX) or Path(text).is_file():
        return parse_recipient_arg(text)
    raise ConfigError(
        f"unknown recipient {text!r}: not a contact, a cssfs1... recipient string, "
        "or a public key file"
    )
