"""mount: the composition root of a mount daemon -- wiring, lifetime, signals, control socket.

What it knows: how the pieces fit (store -> EncryptedStore + ChunkCache -> Journal + staging ->
Operations -> pyfuse3), the order they start and stop in, the mount options, the service
manager (service.notify) and the control socket the CLI talks to. What it must not know: how any
piece works inside. It runs on trio, under one AsyncExitStack and one nursery.

Lifetime (docs/MOUNT.md):

1. open the store and check it answers (a bad URL, missing bucket or bad credentials fail here,
   before anything is mounted); load the folder policies' machinery (cssfs.sharing: a new file
   is encrypted for its folder's recipients, group keys we hold open files shared with a
   group -- loaded again when a file does not open, so a group key given or rotated while
   mounted counts; the contacts book is re-read whenever it changes, for the policies' trust
   rule, the xattrs and ``--trusted-writers-only``); replay the journal (closed files of an
   earlier run that were not uploaded yet are queued again), then ``pyfuse3.init``;
2. bind the control socket, send ``READY=1`` to ``$NOTIFY_SOCKET``: the mount is usable;
3. serve requests (``pyfuse3.main``) while the journal uploads in the background; ``STATUS=``
   reports the upload queue whenever it changes;
4. SIGTERM/SIGINT: upload everything pending while still serving, then ``pyfuse3.terminate``; a
   second signal terminates at once (what is pending stays in the journal for the next mount).
   An unmount by the kernel (``fusermount3 -u``, ``umount``) ends ``pyfuse3.main`` too;
5. after the main loop: ``pyfuse3.close()`` (which unmounts if the kernel has not: nothing
   serves the mount any more, and one left behind would hang whoever touches it while the store
   is away), commit files still open, upload everything pending -- retrying while the store is
   unreachable -- then ``STOPPING=1``: nothing closed is lost, and the daemon exits only when the
   bucket has every file (or a second signal gave up). On an error
   ``pyfuse3.close(unmount=False)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import functools
import gc
import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from cssfs import config, service
from cssfs.cache import ChunkCache
from cssfs.encstore import (
    OPEN_CACHE_ENTRIES,
    WHOLE_OBJECT_BYTES,
    EncryptedStore,
    Entry,
    entries_from_listing,
)
from cssfs.errors import ConfigError, CssfsError, StoreUnavailableError
from cssfs.folderattrs import FolderAttrs
from cssfs.fs import Operations, Reader
from cssfs.journal import Journal
from cssfs.keys import Identity, Recipient, writer_fingerprint
from cssfs.policy import Trust, check_trusted_writer, policy_key
from cssfs.sharing import Sharing
from cssfs.staging import StagedFile, StagingBudget
from cssfs.store.url import open_store

log = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 256 * 1024 * 1024
DEFAULT_LIST_TTL = 2.0
MAX_RETRY_PAUSE_S = 60.0
#: How often the upload queue is reported to the service manager (STATUS=), when it changed.
STATUS_INTERVAL_S = 1.0
#: The kernel read-ahead of the mount (its backing device's read_ahead_kb, set once the kernel
#: applied our INIT answer, when we may: root). A sequential reader's FUSE reads then arrive as
#: requests of up to 1 MiB (the most libfuse negotiates) instead of the default 128 KiB: 1/8 of
#: the trips through pyfuse3 and trio. 1 MiB measured best here (2 and 4 MiB were slower: the
#: kernel then waits on more requests at once, each needing a whole ranged GET).
READ_AHEAD_KB = 1024
#: glibc malloc arenas (per-thread heaps; the default allows 8 per core): every worker thread
#: that decrypts or reads a body may otherwise get an arena of its own, each keeping freed
#: memory. A fixed mmap threshold was tried too: less RSS but 20% more CPU (page faults on
#: every multi-MiB body).
MALLOC_ARENAS = 2
#: Parts of one multipart upload in flight on an S3 store (each an 8 MiB buffer, plus part 1,
#: which waits for the header): the mount's uploads are a daemon's memory, where the store's
#: default (4, for ``cssfs put``) made a 256 MiB cp peak at 115 MiB RSS; 2 peaks at 98 MiB and
#: wrote as fast here. The store option ``concurrency``, if given, wins.
UPLOAD_CONCURRENCY = 2
#: How long a thread holding the GIL runs before one waiting for it gets it (sys.setswitchinterval;
#: Python's default is 5 ms). The trio thread answers FUSE requests and wakes up after every
#: worker-thread hop, while up to four uploads run botocore's Python code in worker threads:
#: with 5 ms it waited up to that long for the GIL at every wake-up (a 4 KiB close measured
#: ~8 ms, of which ~3 ms work).
GIL_SWITCH_S = 0.0005


def _policy_seen(sharing: Sharing, path: str, entries: list[Entry], started: float) -> None:
    """A listing of folder ``path`` tells sharing whether the folder has a policy object."""
    key = policy_key(path)
    sharing.note_listing(path, next((e.etag for e in entries if e.key == key), None), started)


@dataclass(frozen=True)
class MountConfig:
    """Everything a mount needs besides the identity (built by cmd_mount from the CLI)."""

    store_url: str
    mountpoint: str
    cache_size: int = DEFAULT_CACHE_SIZE
    read_only: bool = False
    options: tuple[str, ...] = ()  # extra FUSE -o options, e.g. allow_other
    list_ttl: float = DEFAULT_LIST_TTL
    recipients: tuple[Recipient, ...] = ()
    store_options: dict[str, Any] = field(default_factory=dict)
    state_dir: Path | None = None  # default: config.state_dir()/stores/<hash of the store URL>
    staging_bytes: int | None = None
    trusted_writers_only: bool = False  # files written by strangers do not open (EACCES)


def fuse_options(cfg: MountConfig) -> set[str]:
    """The FUSE mount options: pyfuse3's defaults, our names, ro, and the user's -o options."""
    options = set(pyfuse3.default_options) | {f"fsname=cssfs:{cfg.store_url}", "subtype=cssfs"}
    if cfg.read_only:
        options.add("ro")
    options.update(o for o in cfg.options if o)
    if os.environ.get("FUSEDEBUG") == "1":  # libfuse's request trace on stderr (debugging)
        options.add("debug")
    return options


def tune_malloc() -> bool:
    """Bound glibc's arenas (MALLOC_ARENAS): a long-running daemon's memory then follows what
    it holds more closely. Best effort; False if this is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_arena_max = -8  # <malloc.h>
    ok = bool(mallopt(m_arena_max, MALLOC_ARENAS))
    log.debug("malloc: at most %d arenas: %s", MALLOC_ARENAS, "set" if ok else "refused")
    return ok


def bound_uploads(store: object, options: dict[str, Any]) -> None:
    """At most UPLOAD_CONCURRENCY parts of one upload in flight, on a store that uploads parts
    in parallel (S3: its ``concurrency``), unless the store options set it."""
    if "concurrency" not in options and isinstance(getattr(store, "concurrency", None), int):
        store.concurrency = min(store.concurrency, UPLOAD_CONCURRENCY)  # type: ignore[attr-defined]


def release_startup_memory() -> bool:
    """Collect garbage and give the heap's free pages back to the system (glibc malloc_trim),
    once the daemon has started: starting (botocore parses its endpoint and service JSON, the
    first listing) leaves megabytes freed but resident, which would count in every later peak.
    Best effort; False if this is not glibc."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        malloc_trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return False
    return bool(malloc_trim(0))


def mount_device(mountpoint: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The ``major:minor`` of the file system mounted at ``mountpoint`` (the last mount there),
    read from ``mountinfo`` -- not by stat(2), which on our own mount would wait for us."""
    found = None
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split(" ")
                if len(fields) > 4 and _unescape(fields[4]) == mountpoint:
                    found = fields[2]
    except OSError:
        return None
    return found


def _unescape(field_text: str) -> str:
    """A mountinfo path field: space, tab, newline and backslash come as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field_text = field_text.replace(code, chr(int(code[1:], 8)))
    return field_text


def raise_read_ahead(mountpoint: str, kb: int = READ_AHEAD_KB, sysfs: str = "/sys/class/bdi"
                     ) -> bool:
    """Set the kernel read-ahead of the mount at ``mountpoint`` to ``kb`` KiB (if it is lower):
    a sequential reader's FUSE reads then come as large requests. Best effort (root may; others
    get the kernel's default), logged at debug."""
    device = mount_device(mountpoint)
    if device is None:
        log.debug("read-ahead: no mount found at %s", mountpoint)
        return False
    path = os.path.join(sysfs, device, "read_ahead_kb")
    try:
        with open(path, "r+", encoding="ascii") as f:
            if int(f.read().strip() or 0) >= kb:
                return True
            f.seek(0)
            f.write(f"{kb}\n")
    except (OSError, ValueError) as exc:
        log.debug("read-ahead: %s not set (%s)", path, exc)
        return False
    log.debug("read-ahead of %s: %d KiB", device, kb)
    return True


def store_state_dir(store_url: str) -> Path:
    """The journal and spill folder of one store URL (two mounts of one store share it)."""
    digest = hashlib.sha256(store_url.encode()).hexdigest()[:16]
    return config.state_dir() / "stores" / digest


class Daemon:
    """One running mount: its parts, for the control socket and the shutdown sequence."""

    def __init__(self, cfg: MountConfig, ops: Operations, journal: Journal, cache: ChunkCache,
                 encstore: EncryptedStore) -> None:
        self.cfg = cfg
        self.ops = ops
        self.journal = journal
        self.cache = cache
        self.encstore = encstore
        self.started = time.time()
        self.serving = False  # pyfuse3.main is running (terminate() is allowed)
        self.stopping = False  # a signal or an unmount: uploading what is pending, then exit
        self.signals = 0
        self.abandoned = False  # a second signal: stop waiting for uploads
        self._flush_scopes: set[trio.CancelScope] = set()

    async def flush_all(self, *, until_done: bool = False) -> None:
        """Commit open files and wait until nothing is pending, unless abandoned.

        ``until_done``: while the store is unreachable, keep retrying (with a growing pause)
        instead of raising; other errors (access denied, a damaged journal entry) raise.
        """
        pause = 1.0
        while not self.abandoned:
            with trio.CancelScope() as scope:
                self._flush_scopes.add(scope)
                try:
                    await self.ops.commit_all()
                    await self.journal.flush()
                    await self.flush_attrs()
                    return
                except StoreUnavailableError as exc:
                    if not until_done:
                        raise
                    log.warning("uploads are failing (%s); retrying in %.0f s (a second "
                                "SIGTERM/SIGINT stops waiting; files stay in the journal)",
                                exc, pause)
                    await trio.sleep(pause)
                    pause = min(pause * 2, MAX_RETRY_PAUSE_S)
                finally:
                    self._flush_scopes.discard(scope)

    async def flush_attrs(self) -> None:
        """Write the folders' attrs records this mount has notes for (hints: never raises)."""
        if self.ops.folder_attrs is not None:
            await self.ops.folder_attrs.flush()

    def status_line(self) -> str:
        """The one-line STATUS= for the service manager: the upload queue, as rclone does."""
        stats = self.journal.stats()
        if stats.pending or stats.deleting:
            files = "file" if stats.pending == 1 else "files"
            text = (f"{stats.pending} {files} waiting for upload ({stats.pending_bytes} bytes), "
                    f"{stats.in_flight} in flight")
            if stats.deleting:
                text += f", {stats.deleting} deletes waiting"
        else:
            text = f"serving {self.encstore.store.url} at {self.cfg.mountpoint}"
            if self.stopping:
                text = "all files uploaded"
        if stats.failures:
            reasons = sorted(set(stats.failures.values()))
            reason = ("store unreachable" if any(r.startswith("StoreUnavailableError")
                                                  for r in reasons) else reasons[0])
            text += f"; {len(stats.failures)} failing ({reason})"
        if stats.conflicts:
            text += f"; {stats.conflicts} conflict copies"
        if stats.broken:
            text += f"; {stats.broken} damaged journal entries set aside"
        return f"stopping: {text}" if self.stopping else text

    def abandon(self) -> None:
        self.abandoned = True
        for scope in self._flush_scopes:
            scope.cancel()

    def status(self) -> dict[str, Any]:
        """What ``cssfs status`` shows: uploads, cache and store traffic, as plain JSON data."""
        store = self.encstore.store
        stats = store.stats
        cache = self.cache.stats
        lookups = cache.hits + cache.misses
        return {
            "ok": True,
            "pid": os.getpid(),
            "mountpoint": self.cfg.mountpoint,
            "store": store.url,
            "read_only": self.cfg.read_only or self.ops.failsafe,
            "uptime_s": round(time.time() - self.started, 1),
            "journal": _plain(self.journal.stats()),
            "open_files": self.ops.open_handles(),
            "cache": {
                "max_bytes": self.cache.max_bytes,
                "bytes": cache.bytes,
                "probation_bytes": cache.probation_bytes,  # a sequential stream's, briefly
                "chunks": cache.entries,
                "hits": cache.hits,
                "misses": cache.misses,
                "hit_rate": round(cache.hits / lookups, 4) if lookups else None,
            },
            "store_requests": dict(stats.requests),
            "bytes_up": stats.bytes_sent,
            "bytes_down": stats.bytes_received,
            "lists": self.ops.listings.lists,
        }

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("cmd")
        if command == "status":
            return self.status()
        if command == "sync":
            await self.journal.flush()
            await self.flush_attrs()
            return {"ok": True, "pid": os.getpid()}
        if command == "ping":
            return {"ok": True, "pid": os.getpid()}
        return {"ok": False, "error": f"unknown command {command!r}"}


def _plain(value: Any) -> Any:
    """A stats object as JSON data (dataclasses and mappings; anything else as str)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class ContactsTrust:
    """The reader's Trust (own identity + contacts book), the book re-read when it changes.

    Called on every open under ``--trusted-writers-only`` and every xattr read, so it costs one
    stat(2) unless the file changed (mtime, size or inode: an atomic rewrite is a new inode). A
    book that no longer parses is reported once and the contacts read before are kept.
    """

    def __init__(self, own: Recipient, path: Path | None = None) -> None:
        self.own = own
        self.path = config.contacts_path() if path is None else path
        self._stamp: tuple[int, int, int] | bool | None = False  # False: never read
        self._trust = Trust.of(own)

    def __call__(self) -> Trust:
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        except OSError:
            return self._trust
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._trust = Trust.of(self.own, config.Contacts.load(self.path))
            except ConfigError as exc:
                log.warning("contacts book: %s; the contacts read before still count", exc)
        return self._trust

    def writer_name(self, ed25519: bytes) -> str:
        """A writer as ``user.cssfs.writer`` shows it: a contact's name, else a fingerprint
        (your own files show yours, as ``cssfs whoami`` prints it)."""
        now = self()
        name = now.signer_name(ed25519)
        if name and name != "me":
            return name
        return writer_fingerprint(ed25519, (*now.own, *(r for _, r in now.contacts)))


class GroupRefresher:
    """Loads the group keys we hold again, when a file does not open for any key we have.

    At most once per ``min_interval`` seconds (the policy TTL); concurrent callers share one
    reload, and a caller that waited for someone else's reload that found new keys is told so.
    New keys go to the EncryptedStore (``set_identities``).
    """

    def __init__(self, sharing: Sharing, encstore: EncryptedStore, min_interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sharing = sharing
        self.encstore = encstore
        self.min_interval = min_interval
        self._clock = clock
        self._lock = trio.Lock()
        self._last: float | None = None
        self.changes = 0

    async def __call__(self) -> bool:
        seen = self.changes
        async with self._lock:
            if self.changes != seen:
                return True
            now = self._clock()
            if self._last is not None and now - self._last < self.min_interval:
                return False
            self._last = now
            if not await self.sharing.reload_groups():
                return False
            self.encstore.set_identities([g.identity for g in self.sharing.group_identities])
            self.changes += 1
            log.info("group keys loaded again: %d key(s) of %d group(s)",
                     len(self.sharing.group_identities),
                     len({g.name for g in self.sharing.group_identities}))
            return True


# -- the control socket -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _control_listener(path: Path) -> AsyncIterator[trio.SocketListener]:
    """A listening unix socket at ``path`` (a stale one from a dead daemon is replaced)."""
    config.ensure_private_dir(path.parent)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        try:
            await sock.bind(os.fspath(path))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            if await trio.to_thread.run_sync(_answers, path):
                raise ConfigError(f"another cssfs daemon already listens on {path}") from None
            _remove(path)
            await sock.bind(os.fspath(path))
        os.chmod(path, 0o600)
        sock.listen(16)
        yield trio.SocketListener(sock)
    finally:
        sock.close()
        _remove(path)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _answers(path: Path) -> bool:
    try:
        service.request(path, "ping", timeout=2.0)
    except CssfsError:
        return False
    return True


async def _serve_control(daemon: Daemon, listener: trio.SocketListener) -> None:
    async def one(stream: trio.abc.Stream) -> None:
        async with stream:
            data = b""
            while not data.endswith(b"\n") and len(data) < service.MAX_MESSAGE:
                more = await stream.receive_some(65536)
                if not more:
                    return
                data += more
            try:
                request = json.loads(data)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except ValueError:
                answer: dict[str, Any] = {"ok": False, "error": "malformed request"}
            else:
                try:
                    answer = await daemon.handle(request)
                except CssfsError as exc:
                    answer = {"ok": False, "error": str(exc)}
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(json.dumps(answer).encode() + b"\n")

    await trio.serve_listeners(one, [listener])


# -- signals ------------------------------------------------------------------------------------


async def _watch_signals(daemon: Daemon, nursery: trio.Nursery) -> None:
    """First SIGTERM/SIGINT: upload what is pending while still serving, then stop serving.
    A second one: stop at once, abandoning the upload wait (the journal keeps the files)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            daemon.signals += 1
            if daemon.signals == 1:
                log.info("signal %d: uploading pending files, then unmounting", signum)
                daemon.stopping = True  # STOPPING=1 once the uploads are done (serve)
                service.status(daemon.status_line())
                if daemon.serving:
                    nursery.start_soon(_flush_then_terminate, daemon)
                continue
            log.warning("second signal (%d): stopping now; pending uploads stay in the journal "
                        "and resume at the next mount", signum)
            daemon.abandon()
            if daemon.serving:
                daemon.serving = False
                pyfuse3.terminate()


async def _flush_then_terminate(daemon: Daemon) -> None:
    try:
        await daemon.flush_all()
    except CssfsError as exc:  # the final flush after the main loop tries again
        log.warning("uploading before unmounting: %s", exc)
    if daemon.serving:
        daemon.serving = False
        pyfuse3.terminate()


async def _report_status(daemon: Daemon, last: str) -> None:
    """Tell the service manager about the upload queue (STATUS=) whenever it changed from
    ``last``."""
    while True:
        line = daemon.status_line()
        if line != last:
            service.status(line)
            last = line
        await trio.sleep(STATUS_INTERVAL_S)


async def _watchdog(interval: float) -> None:
    """systemd's WatchdogSec=: the loop is alive as long as this keeps running."""
    while True:
        service.notify("WATCHDOG=1")
        await trio.sleep(interval)


# -- the daemon ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive(state_dir: Path, url: str) -> Iterator[None]:
    """Hold the state folder's lock: one daemon per journal (flock; released at exit, even by
    a crash)."""
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{url} is already mounted by another cssfs daemon of this user "
                f"(its journal {state_dir} is in use)"
            ) from None
        yield
    finally:
        os.close(fd)


def check_mountpoint(path: str) -> str:
    """``path`` made absolute; ConfigError unless it is a folder that is not mounted yet."""
    mountpoint = os.path.abspath(path)
    if not os.path.isdir(mountpoint):
        raise ConfigError(f"mount point {mountpoint} is not a folder")
    if os.path.ismount(mountpoint):
        raise ConfigError(f"{mountpoint} is already a mount point")
    return mountpoint


async def serve(cfg: MountConfig, identity: Identity) -> None:
    """Mount, serve until unmounted or signalled, upload everything, unmount. See the module doc."""
    mountpoint = check_mountpoint(cfg.mountpoint)
    cfg = dataclasses.replace(cfg, mountpoint=mountpoint)
    tune_malloc()
    sys.setswitchinterval(GIL_SWITCH_S)
    control = service.control_path(mountpoint)

    async with AsyncExitStack() as stack:
        store = open_store(cfg.store_url, **cfg.store_options)
        stack.push_async_callback(store.aclose)
        bound_uploads(store, cfg.store_options)
        state_dir = cfg.state_dir or store_state_dir(store.url)
        config.ensure_private_dir(state_dir)
        stack.enter_context(_exclusive(state_dir, store.url))
        # Fail now, not in the first request (bucket, credentials); the listing is kept for the
        # first lookups (on the listing cache's clock, time.monotonic).
        listed_at = time.monotonic()
        root = await store.list("", "/")
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)  # runs first: stop background tasks
        cache = ChunkCache(cfg.cache_size)

        trust = ContactsTrust(identity.recipient)  # contacts added while mounted count

        sharing = await Sharing.load(store, identity, trust, default_recipients=cfg.recipients,
                                     ttl=cfg.list_ttl)  # policies are as fresh as listings
        encstore = EncryptedStore(
            store, identity, cfg.recipients, cache=cache, nursery=nursery,
            whole_object_bytes=WHOLE_OBJECT_BYTES, open_cache_entries=OPEN_CACHE_ENTRIES,
            identities=[g.identity for g in sharing.group_identities],
            recipients_for=sharing.resolve_recipients,
        )
        journal = Journal(state_dir, encstore)
        replayed = await journal.replay()
        if replayed:
            log.info("journal: %d file(s) from an earlier run queued for upload", replayed)
        budget = StagingBudget(state_dir, **(
            {} if cfg.staging_bytes is None else {"max_bytes": cfg.staging_bytes}))

        async def new_staged(base: Reader | None) -> StagedFile:
            return StagedFile(budget, base)

        def check_writer(ed25519: bytes) -> None:
            check_trusted_writer(ed25519, trust())

        folder_attrs = FolderAttrs(store, identity,
                                   is_trusted=lambda ed25519: trust().is_trusted(ed25519))

        ops = Operations(
            encstore, journal, new_staged, name_writer=trust.writer_name,
            is_trusted=lambda ed25519: trust().is_trusted(ed25519),
            check_writer=check_writer if cfg.trusted_writers_only else None,
            refresh_keys=GroupRefresher(sharing, encstore, cfg.list_ttl),
            folder_attrs=folder_attrs, on_new_folder=sharing.note_new_folder,
            on_listed=functools.partial(_policy_seen, sharing),
            list_ttl=cfg.list_ttl, read_only=cfg.read_only, nursery=nursery,
        )
        await ops.prime_listing("", entries_from_listing(root), listed_at)
        daemon = Daemon(cfg, ops, journal, cache, encstore)
        nursery.start_soon(journal.run)
        nursery.start_soon(folder_attrs.run)
        listener = await stack.enter_async_context(_control_listener(control))


        async def read_ahead() -> None:  # after INIT: the kernel sets read-ahead when it applies it
            await trio.to_thread.run_sync(raise_read_ahead, mountpoint)

        ops.after_init = read_ahead
        release_startup_memory()
        pyfuse3.init(ops, mountpoint, fuse_options(cfg))
        try:
            nursery.start_soon(_serve_control, daemon, listener)
            nursery.start_soon(_watch_signals, daemon, nursery)
            interval = service.watchdog_interval()
            if interval is not None:
                nursery.start_soon(_watchdog, interval)
            daemon.serving = True
            ready = daemon.status_line()
            service.notify(f"READY=1\nSTATUS={ready}")
            if os.environ.get(service.NOTIFY_ENV):
                nursery.start_soon(_report_status, daemon, ready)
            log.info("mounted %s at %s", store.url, mountpoint)
            await pyfuse3.main()
        except BaseException:
            daemon.serving = False
            pyfuse3.close(unmount=False)
            raise
        daemon.serving = False
        daemon.stopping = True
        # Nothing serves the mount any more: unmount it before the uploads below, which may
        # retry for as long as the store is away -- a mount left behind would hang everyone
        # who touches it. (After a signal the uploads ran while serving; after an unmount by
        # the kernel it is gone already.)
        pyfuse3.close(unmount=True)
        try:
            await daemon.flush_all(until_done=True)
        finally:
            left = journal.stats().pending
            if left:
                log.warning("%d file(s) not uploaded yet stay in the journal %s and are "
                            "uploaded at the next mount of %s", left, journal.directory,
                            store.url)
                service.status(f"stopped: {left} file(s) not uploaded yet stay in the journal "
                               "for the next mount")
            service.notify("STOPPING=1")  # only now: the files closed are in the store
        log.info("unmounted %s", mountpoint)
