"""cmd_keys: the commands about keys -- keygen, whoami, export, import, contacts.

What it knows: how those commands read their arguments and what they print. Keys are made and
encoded by cssfs.keys; files, passphrases and the contacts book are cssfs.config's. It must not
know envelopes, stores or FUSE. A successful command writes only to stdout.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cssfs import config
from cssfs.cli import CliError, ExitCode, about, load_identity
from cssfs.errors import KeyFormatError
from cssfs.keys import Identity, Recipient, identity_from_pem

if TYPE_CHECKING:
    from cssfs.cli import Subparsers

PEM_PRIVATE = "recipient_private_key.pem"
PEM_PUBLIC = "recipient_public_key.pem"


def register(commands: Subparsers) -> None:
    p = commands.add_parser(
        "keygen", help="create your identity",
        description="Create a new identity (X25519 to receive files, Ed25519 to sign them) and "
        "print its recipient string, which you give to the people who share with you. The "
        "passphrase comes from --passphrase-file, else a prompt on a terminal; without a "
        "terminal the identity is not passphrase-protected.",
    )
    _new_identity_options(p)
    p.set_defaults(func=_keygen)

    p = commands.add_parser(
        "whoami", help="print your recipient string and fingerprint",
        description="Print your recipient string (give it to people who share with you) and "
        "its fingerprint (compare it with them over another channel).",
    )
    p.set_defaults(func=_whoami)

    p = commands.add_parser(
        "export", help="print your recipient string, or write PEM files",
        description=f"Print your recipient string, or with --pem write {PEM_PRIVATE} (mode "
        f"0600, NOT passphrase-protected) and {PEM_PUBLIC}: the X25519 key pair of the "
        "original CloudSecureShare workflow.",
    )
    p.add_argument("--pem", action="store_true", help="write the X25519 key pair as PEM files")
    p.add_argument("-d", "--dir", metavar="DIR", default=".",
                   help="directory for the PEM files (default: the current one)")
    p.add_argument("--force", action="store_true", help="replace existing PEM files")
    p.set_defaults(func=_export)

    p = commands.add_parser(
        "import", help="make an identity from a PEM private key",
        description=f"Make an identity from an X25519 PEM private key ({PEM_PRIVATE} of the "
        "original workflow). A PEM file holds no signing key, so a new Ed25519 key is "
        "generated: the recipient string differs from any made before, the X25519 key (what "
        "files are encrypted to) does not.",
    )
    p.add_argument("--pem", metavar="FILE", required=True, help="the X25519 PEM private key")
    _new_identity_options(p)
    p.set_defaults(func=_import)

    p = commands.add_parser(
        "contacts", help="the people you share with",
        description="The contacts book ($XDG_CONFIG_HOME/cssfs/contacts): names for "
        "recipients. Names work wherever a recipient is expected (-r NAME), and name the "
        "writers and recipients of files. Only keys you add here are trusted.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("add", help="add a contact",
                           description="Add NAME for RECIPIENT: a cssfs1... recipient string, "
                           "or a file holding one or a PEM public key.")
    a.add_argument("name", metavar="NAME", help="letters, digits, '.', '_' and '-'")
    a.add_argument("recipient", metavar="RECIPIENT")
    a.set_defaults(func=_contacts_add)
    a = actions.add_parser("list", help="list contacts: name, fingerprint, recipient")
    a.set_defaults(func=_contacts_list)
    a = actions.add_parser("rm", help="remove a contact")
    a.add_argument("name", metavar="NAME")
    a.set_defaults(func=_contacts_rm)


def _new_identity_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", metavar="FILE",
                   help="where to write the identity (default: the -i path)")
    p.add_argument("--force", action="store_true", help="replace an existing identity file")
    p.add_argument("--no-passphrase", action="store_true",
                   help="do not protect the identity with a passphrase")


def _print_recipient(recipient: Recipient) -> None:
    print(recipient.to_string())
    print(f"fingerprint: {recipient.fingerprint}")


def _identity_output(args: argparse.Namespace) -> Path:
    path = Path(args.output) if args.output else config.identity_path(args.identity)
    if path.exists() and not args.force:
        raise _exists(path)
    return path


def _exists(path: Path) -> CliError:
    return CliError(
        f"{path} exists already; use --force to replace it (files encrypted only for the old "
        "identity can then no longer be decrypted)",
        ExitCode.CONFIG,
    )


def _save_identity(identity: Identity, path: Path, args: argparse.Namespace) -> None:
    passphrase = config.new_passphrase(args.passphrase_file, no_passphrase=args.no_passphrase)
    try:
        config.write_atomic(path, identity.to_file(passphrase), mode=0o600,
                            overwrite=args.force)
    except FileExistsError:
        raise _exists(path) from None


def _keygen(args: argparse.Namespace) -> None:
    path = _identity_output(args)
    identity = Identity.generate()
    _save_identity(identity, path, args)
    _print_recipient(identity.recipient)


def _whoami(args: argparse.Namespace) -> None:
    _print_recipient(load_identity(args).recipient)


def _export(args: argparse.Namespace) -> None:
    identity = load_identity(args)
    if not args.pem:
        print(identity.recipient.to_string())
        return
    directory = Path(args.dir)
    private, public = identity.to_pem()
    targets = ((directory / PEM_PRIVATE, private, 0o600), (directory / PEM_PUBLIC, public, 0o644))
    if not args.force:
        for path, _, _ in targets:
            if path.exists():
                raise CliError(f"{path} exists already; use --force to replace it",
                               ExitCode.CONFIG)
    for path, data, mode in targets:
        config.write_atomic(path, data, mode=mode, overwrite=True)
        print(f"wrote {path}")


def _import(args: argparse.Namespace) -> None:
    pem = Path(args.pem)
    path = _identity_output(args)
    with open(pem, "rb") as f:
        data = f.read(config.MAX_SMALL_FILE + 1)
    try:
        identity = identity_from_pem(data)
    except KeyFormatError as exc:
        raise about(str(pem), exc) from None
    _save_identity(identity, path, args)
    print(f"note: a PEM key has no signing key, so a new Ed25519 signing key was generated; "
          f"the identity is in {path}")
    _print_recipient(identity.recipient)


def _contacts_add(args: argparse.Namespace) -> None:
    book = config.Contacts.load()
    recipient = config.parse_recipient_arg(args.recipient)
    book.add(args.name, recipient)
    book.save()
    print(f"{args.name}  {recipient.fingerprint}")


def _contacts_list(args: argparse.Namespace) -> None:
    book = config.Contacts.load()
    rows = [(c.name, c.recipient.fingerprint, config.recipient_field(c.recipient)) for c in book]
    width = max((len(name) for name, _, _ in rows), default=0)
    for name, fingerprint, text in rows:
        print(f"{name:<{width}}  {fingerprint}  {text}")


def _contacts_rm(args: argparse.Namespace) -> None:
    book = config.Contacts.load()
    book.remove(args.name)
    book.save()
