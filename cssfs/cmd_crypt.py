"""cmd_crypt: encrypt, decrypt and inspect single envelope files (no store, no mount).

What it knows: files and standard streams, how output is written atomically, and how an
envelope's header is shown to a person. The format and its checks are cssfs.envelope's, the
keys cssfs.keys', the contacts cssfs.config's. It must not know stores, FUSE or trio.

Output files are written to ``OUT.tmp-XXXXXX`` in OUT's directory and renamed over OUT only
after the whole input has been processed and verified; on any failure the temporary file is
removed and OUT is left as it was. For decrypt that temporary file holds plaintext, but only on
the filesystem the user chose for the plaintext, with mode 0600. Decrypting to stdout releases
each chunk once it authenticates; a later failure still makes the exit status non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from cssfs import config, envelope, envstream
from cssfs.cli import CliError, ExitCode, about, load_identity
from cssfs.errors import CssfsError, FormatError, NoIdentityMatchError, SignatureError
from cssfs.keys import Identity, Recipient, writer_fingerprint

if TYPE_CHECKING:
    from cssfs.cli import Subparsers

STDIO = "-"


def register(commands: Subparsers) -> None:
    p = commands.add_parser(
        "encrypt", help="encrypt a file for recipients",
        description="Encrypt IN (default: stdin) into one cssfs envelope written to OUT "
        "(default: stdout). You are always a recipient, and you sign the file.",
    )
    p.add_argument("-r", "--recipient", metavar="RECIPIENT", action="append", default=[],
                   help="a contact name, a cssfs1... recipient string, or a public key file "
                   "(recipient_public_key.pem); repeatable")
    p.add_argument("input", metavar="IN", nargs="?", default=STDIO)
    p.add_argument("output", metavar="OUT", nargs="?", default=STDIO)
    p.set_defaults(func=_encrypt)

    p = commands.add_parser(
        "decrypt", help="decrypt a file with your identity",
        description="Decrypt the envelope IN (default: stdin) to OUT (default: stdout).",
    )
    p.add_argument("input", metavar="IN", nargs="?", default=STDIO)
    p.add_argument("output", metavar="OUT", nargs="?", default=STDIO)
    p.set_defaults(func=_decrypt)

    p = commands.add_parser(
        "inspect", help="show an envelope's header without decrypting it",
        description="Show the format, size, recipients, writer and signature of an envelope, "
        "and whether your identity can open it, without decrypting the payload. Exits non-zero "
        "if the header is malformed, does not authenticate or its signature does not verify.",
    )
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=_inspect)


# -- files ------------------------------------------------------------------------------------


def _name(path: str) -> str:
    return "<stdin>" if path == STDIO else path


@contextlib.contextmanager
def _input(path: str) -> Iterator[BinaryIO]:
    if path == STDIO:
        yield sys.stdin.buffer
    else:
        with open(path, "rb") as f:
            yield f


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _output(path: str, *, mode: int) -> Iterator[BinaryIO]:
    """OUT, or stdout for ``-``: written to a temporary file beside OUT, renamed at the end."""
    if path == STDIO:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    directory = target.parent
    if not directory.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such directory", str(directory))
    fd, tmp = tempfile.mkstemp(prefix=f"{target.name}.tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w+b") as f:
            os.fchmod(f.fileno(), mode)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _not_a_terminal(path: str) -> None:
    if path == STDIO and sys.stdout.isatty():
        raise CliError("refusing to write an encrypted file to a terminal: give OUT or "
                       "redirect stdout", ExitCode.USAGE)


# -- commands ---------------------------------------------------------------------------------


# Both open IN first, so a mistyped name fails before any passphrase prompt.


def _encrypt(args: argparse.Namespace) -> None:
    _not_a_terminal(args.output)
    with _input(args.input) as src:
        identity = load_identity(args)
        book = config.Contacts.load()
        recipients = [config.resolve_recipient(text, book) for text in args.recipient]
        with _output(args.output, mode=0o666 & ~_umask()) as dst:
            try:
                envstream.encrypt_stream(src, dst, identity, recipients)
            except CssfsError as exc:
                raise about(_name(args.input), exc) from None


def _decrypt(args: argparse.Namespace) -> None:
    with _input(args.input) as src:
        identity = load_identity(args)
        with _output(args.output, mode=0o600) as dst:
            try:
                envstream.decrypt_stream(src, dst, identity)
            except CssfsError as exc:
                raise about(_name(args.input), exc) from None


def _optional_identity(args: argparse.Namespace) -> Identity | None:
    """The user's identity, or None if there is none; other failures propagate."""
    path = config.identity_path(args.identity)
    if not path.exists() and args.identity is None:
        return None
    return load_identity(args)


def _check(check: Callable[[], None]) -> CssfsError | None:
    try:
        check()
    except CssfsError as exc:
        return exc
    return None


def _decryptable(header: envelope.Header, identity: Identity | None
                 ) -> tuple[str, CssfsError | None]:
    """What ``inspect`` says about opening the header, and the failure to report, if any."""
    if identity is None:
        return "unknown (no identity)", None
    try:
        envelope.open_header(header, identity)
    except NoIdentityMatchError:
        return "no (not encrypted for you)", None  # a fact, not a failure
    except SignatureError:
        return "no (the writer's signature does not verify)", None  # the signature check reports it
    except CssfsError as exc:
        return f"no ({exc})", exc
    return "yes", None


def _recipient_names(header: envelope.Header, me: Recipient | None, book: config.Contacts
                     ) -> str:
    names = []
    unknown = 0
    for key_id in header.key_ids:
        if me is not None and key_id == me.key_id:
            names.append("you")
        elif (name := book.name_for_key_id(key_id)) is not None:
            names.append(name)
        else:
            unknown += 1
    if unknown:
        names.append(f"{unknown} unknown")
    return f"{len(header.stanzas)}: {', '.join(names)}"


def _writer(header: envelope.Header, me: Recipient | None, book: config.Contacts) -> str:
    known = [c.recipient for c in book] + ([me] if me is not None else [])
    fingerprint = writer_fingerprint(header.writer, known)
    if me is not None and header.writer == me.ed25519:
        return f"{fingerprint} (you)"
    name = book.name_for_signing_key(header.writer)
    return f"{fingerprint} ({name})" if name is not None else f"{fingerprint} (not a contact)"


def _inspect(args: argparse.Namespace) -> None:
    path = args.file
    with open(path, "rb") as f:
        head = f.read(envelope.HEADER_SIZE)
        object_size = f.seek(0, io.SEEK_END)
    try:
        if len(head) < envelope.HEADER_SIZE:
            raise FormatError(f"too short to be a cssfs envelope ({len(head)} bytes)")
        header = envelope.parse_header(head)
    except CssfsError as exc:
        raise about(path, exc) from None

    identity = _optional_identity(args)
    me = identity.recipient if identity is not None else None
    book = config.Contacts.load()

    # The checks decrypt makes, in its order; the first failure sets the exit status.
    decryptable, auth_problem = _decryptable(header, identity)
    signature_problem = _check(lambda: envelope.verify_signature(header))
    size_problem = _check(lambda: envelope.check_envelope_size(header.plain_size, object_size))

    size_note = f" (does not match the header: {size_problem})" if size_problem else ""
    rows = [
        ("format", f"cssfs envelope v{header.version}, {header.chunk_size // 1024} KiB chunks"),
        ("size", f"{header.plain_size} bytes{size_note}"),
        ("envelope", f"{object_size} bytes"),
        ("recipients", _recipient_names(header, me, book)),
        ("writer", _writer(header, me, book)),
        ("signature", "INVALID" if signature_problem else "valid"),
        ("decryptable", decryptable),
    ]
    width = max(len(key) for key, _ in rows) + 1
    for key, value in rows:
        print(f"{key + ':':<{width}} {value}")
    for problem in (auth_problem, signature_problem, size_problem):
        if problem is not None:
            raise about(path, problem)
