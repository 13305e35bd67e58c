"""cmd_share: the sharing commands -- share, unshare, access, group create|add|remove|list.

What it knows: how these commands read their arguments (a store URL or a path inside a cssfs
mount, people as contact names / recipient strings / key files / ``group:NAME``), how a mount's
store is found (``/proc/mounts``, ``fsname=cssfs:<url>``), and what they print. The work is
cssfs.sharing's and cssfs.groups'; recipients and contacts are cssfs.config's. It imports trio
and the stores inside the handlers only, like every command module. It must not know FUSE.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from cssfs.cli import CliError, ExitCode, add_store_options, load_identity, store_options
from cssfs.errors import ConfigError, first_error

if TYPE_CHECKING:
    from cssfs.cli import Subparsers
    from cssfs.config import Contacts
    from cssfs.keys import Identity, Recipient
    from cssfs.policy import Trust
    from cssfs.sharing import AccessReport, ShareReport
    from cssfs.store.base import ObjectStore

T = TypeVar("T")

GROUP_PREFIX = "group:"
MOUNTS = "/proc/mounts"
FSNAME_PREFIX = "cssfs:"


def register(commands: Subparsers) -> None:
    where = (
        "PATH is a folder inside a cssfs mount, or a store URL (s3://bucket/prefix, "
        "file:///path, a bare bucket name) meaning the root of that store; with --store URL, "
        "PATH is a folder inside that store."
    )
    people = (
        "WHO is a contact name, a cssfs1... recipient string, a public key file, or "
        "group:NAME (a group of this store)."
    )
    p = commands.add_parser(
        "share", help="let people read a folder",
        description="Add people to a folder's recipient policy (new files there are encrypted "
        "for them too) and give them every existing file under it that you can read: only "
        "each file's 4 KiB header is rewritten, the payload stays. Run it again to finish an "
        f"interrupted share. {where} {people}",
    )
    _path_args(p)
    p.add_argument("who", nargs="+", metavar="WHO")
    p.set_defaults(func=_share)

    p = commands.add_parser(
        "unshare", help="stop people reading a folder",
        description="Remove people from a folder's recipient policy and re-encrypt, under a "
        "fresh file key, every file under it that was encrypted for them; you become the "
        "writer of those files. What they downloaded before stays theirs. Run it again to "
        f"finish an interrupted unshare. {where} {people}",
    )
    _path_args(p)
    p.add_argument("who", nargs="+", metavar="WHO")
    p.set_defaults(func=_unshare)

    p = commands.add_parser(
        "access", help="who can read a folder",
        description="Show the recipient policy that applies to a folder (and any that is not "
        "followed, with why) and, for every file under it, its writer and who can read it, "
        f"named from your contacts. {where}",
    )
    _path_args(p)
    p.set_defaults(func=_access)

    p = commands.add_parser(
        "group", help="groups: many people behind one key",
        description="A group is an identity whose private key is given to each member in "
        "the store. Share a folder with group:NAME and its headers hold one stanza for the "
        "whole group. Removing a member rotates the group key. The store is --store URL, or "
        "the cssfs mount the current directory is in.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("create", help="create a group (you are a member)")
    _store_arg(a)
    a.add_argument("name", metavar="NAME")
    a.add_argument("members", nargs="*", metavar="MEMBER")
    a.set_defaults(func=_group_create)
    a = actions.add_parser("add", help="give members the group's keys")
    _store_arg(a)
    a.add_argument("name", metavar="NAME")
    a.add_argument("members", nargs="+", metavar="MEMBER")
    a.set_defaults(func=_group_add)
    a = actions.add_parser("remove", help="remove members: the group key is rotated")
    _store_arg(a)
    a.add_argument("name", metavar="NAME")
    a.add_argument("members", nargs="+", metavar="MEMBER")
    a.set_defaults(func=_group_remove)
    a = actions.add_parser("list", help="groups in the store, and their members if you are one")
    _store_arg(a)
    a.set_defaults(func=_group_list)


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="URL",
                   help="the store (as given to `cssfs mount`), or a path inside a cssfs mount")
    add_store_options(p)


def _path_args(p: argparse.ArgumentParser) -> None:
    _store_arg(p)
    p.add_argument("path", metavar="PATH")


# -- where: store URL and folder ----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    url: str  # the store, as `cssfs mount` was given it
    folder: str  # key prefix inside it, "" for its root


def _unescape_mounts(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo (octal).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cssfs_mounts(mounts_file: str = MOUNTS) -> list[tuple[str, str]]:
    """(mount point, store URL) of every cssfs mount in ``mounts_file``."""
    found = []
    try:
        with open(mounts_file, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 3:
            continue
        device, point = _unescape_mounts(fields[0]), _unescape_mounts(fields[1])
        if device.startswith(FSNAME_PREFIX) and fields[2].startswith("fuse"):
            found.append((point, device[len(FSNAME_PREFIX) :]))
    return found


def mount_target(path: str, mounts_file: str = MOUNTS) -> Target | None:
    """The store and folder of ``path`` if it lies inside a cssfs mount (deepest mount wins)."""
    real = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for point, url in cssfs_mounts(mounts_file):
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > len(best[0])):
            best = (point, url)
    if best is None:
        return None
    rel = os.path.relpath(real, best[0])
    folder = "" if rel == "." else rel.replace(os.sep, "/")
    return Target(best[1], folder)


def _looks_like_url(text: str) -> bool:
    return "://" in text


def resolve_target(path: str, store: str | None, mounts_file: str = MOUNTS) -> Target:
    """Where PATH (and --store) point: see the commands' help."""
    if store is not None:
        inside = None if _looks_like_url(store) else mount_target(store, mounts_file)
        if inside is None:
            return Target(store, _clean_folder(path))
        return Target(inside.url, _clean_folder(f"{inside.folder}/{path}"))
    target = None if _looks_like_url(path) else mount_target(path, mounts_file)
    if target is None:
        return Target(path, "")  # a store URL, bucket name or local store folder
    if not os.path.isdir(path):
        raise CliError(f"{path} is not a folder: sharing applies to folders", ExitCode.CONFIG)
    return target


def _clean_folder(path: str) -> str:
    from cssfs.policy import check_folder

    folder = path.strip("/")
    try:
        return check_folder(folder)
    except ValueError as exc:
        raise CliError(str(exc), ExitCode.CONFIG) from None


def _group_store(args: argparse.Namespace) -> str:
    if args.store is not None:
        return resolve_target("", args.store).url
    target = mount_target(os.getcwd())
    if target is None:
        raise CliError("which store? give --store URL, or run this inside a cssfs mount",
                       ExitCode.CONFIG)
    return target.url


# -- people -------------------------------------------------------------------------------------


def _split_people(who: list[str], contacts: Contacts) -> tuple[list[Recipient], list[str]]:
    from cssfs import config
    from cssfs.policy import check_group_name

    recipients: list[Recipient] = []
    groups: list[str] = []
    for text in who:
        if text.startswith(GROUP_PREFIX):
            name = text[len(GROUP_PREFIX) :]
            try:
                groups.append(check_group_name(name))
            except ValueError as exc:
                raise CliError(f"{text}: {exc}", ExitCode.CONFIG) from None
        else:
            recipients.append(config.resolve_recipient(text, contacts))
    return recipients, groups


def _trust(identity: Identity, contacts: Contacts) -> Trust:
    from cssfs.policy import Trust

    return Trust.of(identity.recipient, contacts)


def _run(url: str, args: argparse.Namespace, work: Callable[[ObjectStore], Awaitable[T]]) -> T:
    import trio

    from cssfs.store.url import open_store

    async def main() -> T:
        store = open_store(url, **store_options(args))
        try:
            return await work(store)
        finally:
            await store.aclose()

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:  # a nursery's failure: report its error as itself
        raise first_error(group) from None


# -- share / unshare / access -------------------------------------------------------------------


def _progress_fn(label: str) -> tuple[Callable[[object], None], Callable[[], None]]:
    from cssfs.progress import Progress

    bar: list[Progress] = []

    def update(p: object) -> None:
        from cssfs.sharing import ShareProgress

        assert isinstance(p, ShareProgress)
        if not bar:
            bar.append(Progress(p.bytes_total, label, sys.stderr))
        bar[0].update(p.bytes_done - bar[0].done)

    def close() -> None:
        if bar:
            bar[0].close()

    return update, close


def _change(args: argparse.Namespace, *, remove: bool) -> int:
    from cssfs import config
    from cssfs.sharing import Sharing

    target = resolve_target(args.path, args.store)
    identity = load_identity(args)
    contacts = config.Contacts.load()
    recipients, groups = _split_people(args.who, contacts)
    trust = _trust(identity, contacts)
    update, close = _progress_fn("unshare" if remove else "share")

    async def work(store: ObjectStore) -> ShareReport:
        sharing = await Sharing.load(store, identity, trust)
        try:
            if remove:
                return await sharing.unshare(target.folder, recipients, groups, progress=update)
            return await sharing.share(target.folder, recipients, groups, progress=update)
        finally:
            close()

    report = _run(target.url, args, work)
    where = target.folder or "/"
    verb = "re-encrypted" if remove else "shared"
    print(f"{where}: {len(report.changed)} file(s) {verb}, {len(report.already)} already done, "
          f"{len(report.not_readable)} not encrypted for you (left alone), "
          f"{len(report.failed)} failed" + (
              f", {len(report.foreign)} not cssfs files (left alone)" if report.foreign else ""))
    for key, why in sorted(report.policies_skipped.items()):
        print(f"policy {key} is not followed and was left alone: {why}")
    for key, ids in sorted(report.dropped.items()):
        print(f"{key}: lost {len(ids)} recipient(s) with unknown keys: {', '.join(ids)}")
    if report.failed:
        raise CliError(f"{len(report.failed)} file(s) could not be changed (see above); "
                       "run the command again to retry them", ExitCode.ERROR)
    return ExitCode.OK


def _share(args: argparse.Namespace) -> int:
    return _change(args, remove=False)


def _unshare(args: argparse.Namespace) -> int:
    return _change(args, remove=True)


def _access(args: argparse.Namespace) -> None:
    from cssfs import config
    from cssfs.sharing import Sharing

    target = resolve_target(args.path, args.store)
    identity = load_identity(args)
    contacts = config.Contacts.load()
    trust = _trust(identity, contacts)

    async def work(store: ObjectStore) -> AccessReport:
        return await (await Sharing.load(store, identity, trust)).access(target.folder)

    _print_access(_run(target.url, args, work))


def _print_access(report: AccessReport) -> None:
    print(f"folder: {report.folder or '/'}")
    if report.applies is None or report.applies.policy is None:
        print("policy: none followed here: new files are for their writer (and the "
              "writer's --recipient defaults) only")
    else:
        p = report.applies.policy
        print(f"policy: {report.applies.key} (version {p.version}), new files are for:")
        for reader in report.readers:
            print(f"  {reader.label()}")
    for status in report.policies:
        if not status.followed:
            print(f"not followed: {status.key}: {status.problem}")
    for f in report.files:
        if f.signature in ("not an envelope", "deleted"):
            print(f"{f.key}: {f.signature}")
            continue
        mark = "" if f.readable else "  [not for you]"
        print(f"{f.key}: written by {f.writer} ({f.signature}){mark}")
        for reader in f.readers:
            print(f"  {reader.label()}")


# -- groups ----------------------------------------------------------------------------------


def _group(args: argparse.Namespace, work: Callable[[ObjectStore, Identity, Contacts], Awaitable[T]]
           ) -> T:
    from cssfs import config

    url = _group_store(args)
    identity = load_identity(args)
    contacts = config.Contacts.load()
    return _run(url, args, lambda store: work(store, identity, contacts))


def _members(who: list[str], contacts: Contacts) -> list[Recipient]:
    recipients, groups = _split_people(who, contacts)
    if groups:
        raise CliError("a group cannot be a member of a group", ExitCode.CONFIG)
    return recipients


def _group_create(args: argparse.Namespace) -> None:
    from cssfs.groups import Groups
    from cssfs.policy import check_group_name

    try:
        name = check_group_name(args.name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    async def work(store: ObjectStore, identity: Identity, contacts: Contacts) -> None:
        members = _members(args.members, contacts)
        record = await Groups(store, identity, _trust(identity, contacts)).create(name, members)
        print(f"group:{name} created, {len(members) + 1} member(s); recipient "
              f"{record.recipient.fingerprint}")

    _group(args, work)


def _group_add(args: argparse.Namespace) -> None:
    from cssfs.groups import Groups

    async def work(store: ObjectStore, identity: Identity, contacts: Contacts) -> None:
        members = _members(args.members, contacts)
        n = await Groups(store, identity, _trust(identity, contacts)).add(args.name, members)
        print(f"group:{args.name}: {n} new member(s)")

    _group(args, work)


def _group_remove(args: argparse.Namespace) -> None:
    from cssfs.groups import Groups

    async def work(store: ObjectStore, identity: Identity, contacts: Contacts) -> None:
        members = _members(args.members, contacts)
        record = await Groups(store, identity, _trust(identity, contacts)).remove(
            args.name, [m.key_id for m in members]
        )
        print(f"group:{args.name}: key rotated to generation {record.generation}; files "
              "written for the group before stay readable with the old key by whoever kept "
              "it -- run `cssfs unshare` on them to rekey")

    _group(args, work)


def _group_list(args: argparse.Namespace) -> None:
    from cssfs.groups import Groups

    async def work(store: ObjectStore, identity: Identity, contacts: Contacts) -> None:
        trust: Trust = _trust(identity, contacts)
        for info in await Groups(store, identity, trust).infos():
            if info.record is None:
                print(f"group:{info.name}  NOT TRUSTED: {info.problem}")
                continue
            setter = trust.describe_signer(info.record.setter.ed25519 or b"")
            status = "a member" if info.member else "not a member"
            print(f"group:{info.name}  {info.record.recipient.fingerprint}  generation "
                  f"{info.record.generation}, set by {setter}, you are {status}")
            for m in info.members or ():
                name = trust.name_for_key_id(m.key_id) or "unknown"
                print(f"  {name} ({m.fingerprint})")

    _group(args, work)


