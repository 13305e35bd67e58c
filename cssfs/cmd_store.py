"""cmd_store: the cloud workflow at the command line -- put, get, ls, rm, cat.

What it knows: store locations as people type them (``s3://bucket/path``, a folder path), local
files and standard streams, how a listing is shown, the progress bar. What it must not know: the
envelope format (cssfs.encstore's), how stores talk to S3 (cssfs.store's), FUSE.

Locations. ``s3://bucket/a/b`` is the object ``a/b`` of the bucket ``bucket`` (the store is the
whole bucket, so an object's binding is its key in the bucket, the same key a mount of any
prefix of the bucket computes). ``memory://name/a/b`` likewise (tests). A local store folder is
the nearest enclosing folder holding ``.cssfs-tmp`` (which the folder store creates at its first
write); a ``//`` in the path marks the store root explicitly (``/srv/bucket//a/b``); otherwise
the deepest existing folder on the path is the store and the rest of the path the key (so the
first ``put`` into a new sub-folder of a store folder makes that folder the store).

Commands run on trio (imported in the handlers only, so ``cssfs keygen`` needs neither trio nor
boto3). Errors become ``CliError``s that name the object; the encstore's WARNING log line about a
tampered object is held back (the one error line says it) unless ``--debug`` is given.
``get`` writes to a temporary file beside DEST and renames it only after every chunk verified.
``get`` and ``cat`` open a file with our own identity first and load the keys of our groups
(a LIST and a GET per group) only if that fails, so the usual ``get`` makes no group requests.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from cssfs import config
from cssfs.cli import (
    CliError,
    ExitCode,
    about,
    add_store_options,
    load_identity,
    startup,
    store_options,
)
from cssfs.errors import (
    CssfsError,
    FormatError,
    NoIdentityMatchError,
    NoSuchObjectError,
    first_error,
)
from cssfs.progress import Progress

if TYPE_CHECKING:
    from cssfs.cli import Subparsers
    from cssfs.encstore import EncryptedStore, Entry, HeaderInfo
    from cssfs.keys import Identity, Recipient
    from cssfs.store.base import Listing, ObjectStore

log = logging.getLogger(__name__)

T = TypeVar("T")
STDIO = "-"
LOCAL_MARKER = ".cssfs-tmp"  # created by the folder store at its first write (store.local)
INTERNAL_PREFIX = ".cssfs-"  # cssfs's own objects (folder policies, groups): hidden, not writable


def register(commands: Subparsers) -> None:
    p = commands.add_parser(
        "put", help="encrypt files and upload them to a store",
        description="Encrypt FILE(s) for you, the recipients and the people the destination "
        "folder is shared with, and upload them. DEST is STORE_URL/PATH: s3://bucket/path, or a "
        "path in a store folder. A DEST ending in '/' (or several FILEs) is a folder the files "
        "go into under their own names; with -R a folder goes in under its own name, or, alone "
        "and to a DEST not ending in '/', becomes DEST. FILE '-' is stdin.",
    )
    p.add_argument("files", metavar="FILE", nargs="+")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("-r", "--recipient", metavar="RECIPIENT", action="append", default=[],
                   help="a contact name, a cssfs1... recipient string, or a public key file "
                   "(recipient_public_key.pem); repeatable")
    p.add_argument("-R", "--recursive", action="store_true", help="upload folders recursively")
    add_store_options(p)
    p.set_defaults(func=_put)

    p = commands.add_parser(
        "get", help="download and decrypt one file",
        description="Download STORE_URL/PATH, verify and decrypt it into DEST (default: its "
        "name in the current folder; '-' is stdout). DEST appears only once every byte has "
        "been verified; on failure nothing is left behind.",
    )
    p.add_argument("source", metavar="STORE_URL/PATH")
    p.add_argument("dest", metavar="DEST", nargs="?")
    add_store_options(p)
    p.set_defaults(func=_get)

    p = commands.add_parser(
        "cat", help="decrypt files from a store to stdout",
        description="Download, verify and decrypt each STORE_URL/PATH to stdout, in order.",
    )
    p.add_argument("sources", metavar="STORE_URL/PATH", nargs="+")
    add_store_options(p)
    p.set_defaults(func=_cat)

    p = commands.add_parser(
        "ls", help="list a store folder",
        description="List the files and folders under STORE_URL[/PREFIX] with one LIST. With "
        "-l also the plaintext size, modification time, writer and whether you can read each "
        "file (from the headers only, never the contents).",
    )
    p.add_argument("location", metavar="STORE_URL[/PREFIX]")
    p.add_argument("-l", "--long", action="store_true", help="sizes, times, writers, access")
    p.add_argument("-a", "--all", action="store_true",
                   help="also cssfs's own objects (.cssfs-* : folder policies, groups)")
    add_store_options(p)
    p.set_defaults(func=_ls)

    p = commands.add_parser(
        "rm", help="delete files from a store",
        description="Delete each STORE_URL/PATH; with -r, folders and everything below them.",
    )
    p.add_argument("targets", metavar="STORE_URL/PATH", nargs="+")
    p.add_argument("-r", "--recursive", action="store_true", help="delete folders recursively")
    add_store_options(p)
    p.set_defaults(func=_rm)


# -- locations --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """A place in a store as typed: the store's URL and the key (or prefix) inside it."""

    text: str
    store_url: str
    key: str

    @property
    def is_folder(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    def where(self, key: str) -> str:
        """How object ``key`` of this store is named in messages (as the user wrote the store)."""
        if self.key and self.text.endswith(self.key):
            return self.text[: len(self.text) - len(self.key)] + key
        return self.text.rstrip("/") + "/" + key


def parse_location(text: str) -> Location:
    """``text`` split into the store URL and the key inside it (see the module docstring)."""
    if not text:
        raise CliError("empty store location", ExitCode.USAGE)
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if sep and scheme in ("s3", "memory"):
        bucket, _, key = rest.partition("/")
        if not bucket and scheme == "s3":
            raise CliError(f"{text}: no bucket name", ExitCode.USAGE)
        return Location(text, f"{scheme}://{bucket}", key)
    if sep and scheme == "file":
        if not rest.startswith("/"):
            raise CliError(f"{text}: a file URL is file:///absolute/path", ExitCode.USAGE)
        return _local_location(text, rest)
    if sep:
        return Location(text, text, "")  # open_store explains the unknown scheme
    if "/" not in text and not text.startswith((".", "~")):
        return Location(text, text, "")  # a bare bucket name
    return _local_location(text, os.path.expanduser(text))


def _local_location(text: str, path: str) -> Location:
    if "//" in path.rstrip("/"):
        base, _, rest = path.partition("//")
        return Location(text, base or "/", rest)
    absolute = Path(os.path.abspath(path))
    candidates = [absolute, *absolute.parents]
    root = next((f for f in candidates if (f / LOCAL_MARKER).is_dir()), None)
    if root is None:
        root = next(f for f in candidates if f.is_dir())
    key = absolute.relative_to(root).as_posix()
    key = "" if key == "." else key + ("/" if path.endswith("/") else "")
    return Location(text, str(root), key)


# -- running ----------------------------------------------------------------------------------


def _open_store(loc: Location, args: argparse.Namespace) -> ObjectStore:
    with startup():  # botocore's imports and models
        from cssfs.store.url import open_store

        return open_store(loc.store_url, **store_options(args))


@contextlib.contextmanager
def _quiet_encstore(args: argparse.Namespace) -> Iterator[None]:
    """Hold back encstore's tamper WARNINGs: at the CLI the one error line says it."""
    logger = logging.getLogger("cssfs.encstore")
    debugging = args.debug or any(
        m == "cssfs.encstore" or "cssfs.encstore".startswith(m + ".") for m in args.debug_module
    )
    saved = logger.level
    if not debugging:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(saved)


def _run(args: argparse.Namespace, fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn`` under trio; a nursery's ExceptionGroup is reported as its first error."""
    with startup():
        import trio

    with _quiet_encstore(args):
        try:
            return trio.run(fn)
        except BaseExceptionGroup as group:
            raise first_error(group) from None


@contextlib.asynccontextmanager
async def _opened(loc: Location, args: argparse.Namespace) -> AsyncIterator[ObjectStore]:
    import trio

    store = _open_store(loc, args)
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


async def _encrypted(
    store: ObjectStore, identity: Identity, extra: Sequence[Recipient] = ()
) -> EncryptedStore:
    """An EncryptedStore as the mount would build it: files are opened with our identity and
    the keys of our groups, and a new file is encrypted for its folder's recipient policy (as
    `cssfs share` set it) plus ``extra`` (the -r recipients)."""
    from cssfs.encstore import EncryptedStore
    from cssfs.policy import Trust
    from cssfs.sharing import Sharing

    trust = Trust.of(identity.recipient, config.Contacts.load())
    sharing = await Sharing.load(store, identity, trust)

    async def recipients_for(key: str) -> list[Recipient]:
        return [*await sharing.resolve_recipients(key), *extra]

    return EncryptedStore(
        store, identity, extra,
        identities=[g.identity for g in sharing.group_identities],
        recipients_for=recipients_for,
    )


async def _reading(
    store: ObjectStore, identity: Identity, read: Callable[[EncryptedStore], Awaitable[T]]
) -> T:
    """``read(es)`` with an EncryptedStore that opens files with our own identity first; only
    a file not encrypted for it loads the keys of our groups (a LIST and a GET per group, as
    ``_encrypted`` does) and is tried again with them. Most files are for us: a ``get`` then
    costs no group requests. ``read`` must fail with NoIdentityMatchError before it writes."""
    with startup():
        from cssfs.encstore import EncryptedStore

    es = EncryptedStore(store, identity)
    try:
        return await read(es)
    except NoIdentityMatchError:
        from cssfs.groups import Groups
        from cssfs.policy import Trust

        trust = Trust.of(identity.recipient, config.Contacts.load())
        groups = await Groups(store, identity, trust).load_identities()
        if not groups:
            raise
        es.set_identities([g.identity for g in groups])
    return await read(es)


# -- put --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """One file to upload: a local path (or "-" for stdin) and the object key."""

    source: str
    key: str


def plan_uploads(sources: Sequence[str], dest: Location, recursive: bool) -> list[Upload]:
    """Which file goes to which key, like ``cp``: into the folder DEST when it ends in '/', is
    the store root or several sources are given; a folder (with -R) goes in under its own name
    then, or becomes DEST itself when it is the only source and DEST names no folder."""
    into_folder = dest.is_folder or len(sources) > 1
    prefix = dest.key if dest.is_folder else dest.key + "/"
    plan: list[Upload] = []
    for src in sources:
        if src == STDIO:
            if into_folder:
                raise CliError("stdin ('-') needs an object name, not a folder", ExitCode.USAGE)
            plan.append(Upload(src, dest.key))
            continue
        if not os.path.isdir(src):
            os.stat(src)  # FileNotFoundError names the file
            plan.append(Upload(src, prefix + Path(src).name if into_folder else dest.key))
            continue
        if not recursive:
            raise CliError(f"{src}: is a folder (use -R)", ExitCode.USAGE)
        base = Path(src)
        top = prefix + Path(os.path.abspath(src)).name + "/" if into_folder else prefix
        for root, dirs, files in os.walk(base):
            dirs.sort()
            for name in sorted(files):
                path = Path(root) / name
                if path.is_file():
                    plan.append(Upload(str(path), top + path.relative_to(base).as_posix()))
    for item in plan:
        if not item.key or item.key.endswith("/") or "//" in item.key:
            raise CliError(f"{item.source}: no object name to upload to", ExitCode.USAGE)
        if _internal(item.key):
            raise CliError(f"{item.key}: names starting with {INTERNAL_PREFIX} are cssfs's own",
                           ExitCode.USAGE)
    return plan


def _internal(key: str) -> bool:
    return any(part.startswith(INTERNAL_PREFIX) for part in key.split("/"))


def _put(args: argparse.Namespace) -> None:
    dest = parse_location(args.dest)
    plan = plan_uploads(args.files, dest, args.recursive)
    identity = load_identity(args)
    book = config.Contacts.load()
    recipients = [config.resolve_recipient(text, book) for text in args.recipient]

    async def work() -> None:
        async with _opened(dest, args) as store:
            es = await _encrypted(store, identity, recipients)
            for item in plan:
                await _put_one(es, item, dest.where(item.key))

    _run(args, work)


async def _put_one(es: EncryptedStore, item: Upload, where: str) -> None:
    import trio

    try:
        if item.source == STDIO:
            with Progress(None, where, sys.stderr) as progress:
                await es.put(item.key, sys.stdin.buffer, progress=progress)
            return
        f = await trio.to_thread.run_sync(open, item.source, "rb")
        try:
            st = os.fstat(f.fileno())
            with Progress(st.st_size, where, sys.stderr) as progress:
                await es.put(
                    item.key, f, mtime_ns=st.st_mtime_ns, mode=stat.S_IMODE(st.st_mode),
                    progress=progress,
                )
        finally:
            f.close()
    except CssfsError as exc:
        raise about(where, exc) from None


# -- get and cat ------------------------------------------------------------------------------


def _object_key(loc: Location) -> str:
    if loc.is_folder:
        raise CliError(f"{loc.text}: names a folder, not a file", ExitCode.USAGE)
    return loc.key


def _get(args: argparse.Namespace) -> None:
    loc = parse_location(args.source)
    key = _object_key(loc)
    name = key.rsplit("/", 1)[-1]
    dest_text = args.dest if args.dest is not None else name
    if dest_text == STDIO:
        identity = load_identity(args)
        _run(args, lambda: _cat_all(args, [loc], identity))
        return
    dest = Path(dest_text)
    if dest.is_dir():
        dest = dest / name
    if not dest.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(dest.parent))
    identity = load_identity(args)

    async def one(es: EncryptedStore) -> None:
        obj = await es.store.head(key)
        with _atomic_output(dest) as f, Progress(
            _plain_size_or_none(obj.size), str(dest), sys.stderr
        ) as progress:
            info = await es.get_to(key, f, progress=progress, etag=obj.etag, cipher_size=obj.size)
            _apply_metadata(f, info)

    async def work() -> None:
        async with _opened(loc, args) as store:
            try:
                await _reading(store, identity, one)
            except CssfsError as exc:
                raise about(loc.where(key), exc) from None

    _run(args, work)


def _plain_size_or_none(cipher_size: int) -> int | None:
    from cssfs.envelope import plain_size

    try:
        return plain_size(cipher_size)
    except CssfsError:
        return None


def _apply_metadata(f: BinaryIO, info: HeaderInfo) -> None:
    """The writer's permission bits and modification time, as ``cp -p`` keeps them."""
    with contextlib.suppress(OSError):
        os.fchmod(f.fileno(), info.mode & 0o777 & ~_umask())
    if info.mtime_ns:
        with contextlib.suppress(OSError):
            os.utime(f.fileno(), ns=(time.time_ns(), info.mtime_ns))


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic_output(dest: Path) -> Iterator[BinaryIO]:
    """A temporary file beside ``dest`` (mode 0600), renamed over it only if the block
    succeeds; removed on any failure, so DEST is never left half written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.cssfs-", dir=dest.parent)
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


async def _cat_all(args: argparse.Namespace, locs: Sequence[Location], identity: Identity
                   ) -> None:
    out = sys.stdout.buffer
    for loc in locs:
        key = _object_key(loc)
        async with _opened(loc, args) as store:
            try:
                await _reading(store, identity, lambda es: es.get_to(key, out))  # noqa: B023
            except CssfsError as exc:
                raise about(loc.where(key), exc) from None


def _cat(args: argparse.Namespace) -> None:
    locs = [parse_location(text) for text in args.sources]
    for loc in locs:
        _object_key(loc)
    identity = load_identity(args)
    _run(args, lambda: _cat_all(args, locs, identity))


# -- ls ---------------------------------------------------------------------------------------


def _ls(args: argparse.Namespace) -> None:
    loc = parse_location(args.location)
    identity = load_identity(args) if args.long else None
    book = config.Contacts.load() if args.long else None

    async def work() -> list[str]:
        async with _opened(loc, args) as store:
            entries, base = await _listing(store, loc)
            if not args.all:
                entries = [e for e in entries if not _internal(e.key[len(base) :])]
            if identity is None or book is None:
                return [e.key[len(base) :] for e in entries]
            infos = await (await _encrypted(store, identity)).headers(entries)
            return [_long_line(e, infos.get(e.key), base, identity, book) for e in entries]

    for line in _run(args, work):
        print(line)


async def _listing(store: ObjectStore, loc: Location) -> tuple[list[Entry], str]:
    """The entries to show and the prefix to strip from their keys: the folder's contents, or
    the one file the location names."""
    from cssfs.encstore import entries_from_listing

    def contents(listing: Listing, base: str) -> list[Entry]:
        # The folder's own marker object ("a/", zero bytes) is the folder, not an entry in it.
        return [e for e in entries_from_listing(listing) if e.key != base]

    key = loc.key
    if loc.is_folder:
        return contents(await store.list(key, "/"), key), key
    listing = await store.list(key + "/", "/")
    if listing.objects or listing.prefixes:
        return contents(listing, key + "/"), key + "/"
    parent = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
    exact = [e for e in entries_from_listing(await store.list(key, "/")) if e.key == key]
    if not exact:
        raise CliError(f"{loc.text}: no such file or folder", ExitCode.NOT_FOUND)
    return exact, parent


def _long_line(
    entry: Entry,
    info: HeaderInfo | CssfsError | None,
    base: str,
    identity: Identity,
    book: config.Contacts,
) -> str:
    """``mode size mtime writer access name``; access is yes, no (not shared with you),
    damaged (does not authenticate), bad-signature, or foreign (not a cssfs envelope)."""
    name = entry.key[len(base) :]
    if entry.is_dir:
        return _row("d---------", "-", "-", "-", "-", name)
    if info is None or isinstance(info, CssfsError):
        size = "-" if entry.plain_size is None else str(entry.plain_size)
        what = "foreign" if info is None or isinstance(info, FormatError) else "error"
        return _row("----------", size, "-", "-", what, name)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.mtime_ns / 1e9))
    if info.writer == identity.recipient.ed25519:
        writer = "you"
    else:
        writer = book.name_for_signing_key(info.writer) or info.writer_fingerprint
    if info.signature != "valid":
        access = "bad-signature"
    elif info.readable:
        access = "yes"
    elif info.not_for_us:
        access = "no"
    else:
        access = "damaged"
    mode = stat.filemode(stat.S_IFREG | info.mode)
    return _row(mode, str(info.plain_size), when, writer, access, name)


def _row(mode: str, size: str, when: str, writer: str, access: str, name: str) -> str:
    return f"{mode:10} {size:>12} {when:16} {writer:24} {access:7} {name}"


# -- rm ---------------------------------------------------------------------------------------


def _rm(args: argparse.Namespace) -> None:
    locs = [parse_location(text) for text in args.targets]
    for loc in locs:
        if loc.is_folder and not args.recursive:
            raise CliError(f"{loc.text}: is a folder (use -r)", ExitCode.USAGE)

    async def remove(store: ObjectStore, loc: Location) -> None:
        keys: list[str] = []
        if not loc.is_folder:
            with contextlib.suppress(NoSuchObjectError):
                keys.append((await store.head(loc.key)).key)
        below = loc.key if loc.is_folder else loc.key + "/"
        under = (await store.list(below)).objects if (args.recursive or not keys) else []
        if under and not args.recursive:
            raise CliError(f"{loc.text}: is a folder (use -r)", ExitCode.USAGE)
        keys += [o.key for o in under]
        if not keys and not loc.is_folder:
            raise CliError(f"{loc.text}: no such file or folder", ExitCode.NOT_FOUND)
        await store.delete(keys)

    async def work() -> None:
        for loc in locs:
            async with _opened(loc, args) as store:
                await remove(store, loc)

    _run(args, work)
