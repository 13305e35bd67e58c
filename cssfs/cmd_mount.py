"""cmd_mount: ``cssfs mount``, ``umount``, ``sync`` and ``status`` -- the mount's command line.

What it knows: the options of these commands, how a mount detaches (it re-executes itself with
``--foreground`` in a new session and waits on a notify socket it owns until the daemon reports
READY=1, or fails with the daemon's error), and the control socket protocol (service.py). What
it must not know: how the mount works inside. trio and pyfuse3 are imported inside the
handlers only (cli.py's rule: ``cssfs keygen`` must work without libfuse).

The daemon's log (stderr) goes to ``$XDG_STATE_HOME/cssfs/logs/mount-<hash>.log`` when it runs
detached; in the foreground (and under systemd) it goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cssfs import config, service
from cssfs.cli import (
    CliError,
    ExitCode,
    Subparsers,
    add_store_options,
    load_identity,
    store_option_args,
    store_options,
)
from cssfs.errors import ConfigError, CssfsError, first_error

DEFAULT_CACHE_SIZE = "256M"
DEFAULT_LIST_TTL = 2.0
READY_TIMEOUT = 120.0  # seconds a detaching `cssfs mount` waits for the daemon
EXIT_TIMEOUT = 600.0  # seconds `cssfs umount` waits for the daemon to finish its uploads
_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(i?b?)", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"256M"`` -> 268435456 (K, M, G, T are powers of 1024; a bare number is bytes)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 0, 64M, 1G)")
    number, unit, _ = match.groups()
    exponent = "bkmgt".index((unit or "b").lower())
    return int(number) * (1 << (10 * exponent))


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def register(commands: Subparsers) -> None:
    p = commands.add_parser(
        "mount", help="mount a store as a folder",
        description="Mount STORE (s3://BUCKET[/PREFIX], BUCKET[/PREFIX], or a local folder "
        "path / file:///PATH) at MOUNTPOINT. Files written there are encrypted for you and the "
        "--recipient people before they leave this machine. Without --foreground the command "
        "returns once the mount is usable and the daemon runs on in the background.",
    )
    p.add_argument("store", metavar="STORE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground (systemd, debugging); log to stderr")
    p.add_argument("--cache-size", metavar="SIZE", type=parse_size,
                   default=parse_size(DEFAULT_CACHE_SIZE),
                   help=f"memory for decrypted chunks (default {DEFAULT_CACHE_SIZE}; 0: none)")
    p.add_argument("--read-only", action="store_true", help="mount read-only")
    p.add_argument("-o", dest="options", metavar="OPT[,OPT]", action="append", default=[],
                   help="FUSE mount options, e.g. allow_other (repeatable)")
    p.add_argument("-r", "--recipient", dest="recipients", metavar="R", action="append",
                   default=[], help="also encrypt new files for R: a contact name, a cssfs1... "
                   "recipient string or a public key file (repeatable)")
    p.add_argument("--list-ttl", metavar="SECONDS", type=_nonnegative_float,
                   default=DEFAULT_LIST_TTL,
                   help="how long a folder listing is reused; other clients' changes show "
                   f"after at most this long (default {DEFAULT_LIST_TTL:g})")
    p.add_argument("--trusted-writers-only", action="store_true",
                   help="refuse to open files (EACCES) whose writer is not you or one of your "
                   "contacts; the contacts book is re-read when it changes")
    add_store_options(p)
    p.set_defaults(func=_mount)

    p = commands.add_parser(
        "umount", aliases=["unmount"], help="upload pending files, then unmount",
        description="Wait until the daemon has uploaded every pending file, unmount MOUNTPOINT "
        "(fusermount3 -u) and wait for the daemon to exit.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-z", "--lazy", action="store_true",
                   help="lazy unmount: detach now even if files are still open")
    p.set_defaults(func=_umount)

    p = commands.add_parser(
        "sync", help="wait until a mount has uploaded every closed file",
        description="Return when nothing written through MOUNTPOINT is waiting to be uploaded.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=_sync)

    p = commands.add_parser(
        "status", help="show a mount's uploads, cache and traffic",
        description="Print one JSON line per mount (or for MOUNTPOINT): pending uploads, "
        "failures, cache use and hit rate, store requests and bytes up/down.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    p.set_defaults(func=_status)


# -- mount --------------------------------------------------------------------------------------


def _fuse_options(values: list[str]) -> tuple[str, ...]:
    return tuple(o.strip() for v in values for o in v.split(",") if o.strip())


def is_mounted(path: str) -> bool:
    """Whether ``path`` is in the mount table -- also a dead FUSE mount, which os.path.ismount
    cannot stat ("Transport endpoint is not connected")."""
    target = os.path.abspath(path)
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return os.path.ismount(target)
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 1 and _unescape(fields[1]) == target:
            return True
    return False


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    if is_mounted(mountpoint):
        raise CliError(f"{mountpoint} is already a mount point (a dead cssfs mount is removed "
                       "with `cssfs umount`)", ExitCode.MOUNT)
    if not os.path.isdir(mountpoint):
        raise CliError(f"mount point {mountpoint} is not a folder", ExitCode.MOUNT)
    if shutil.which("fusermount3") is None:
        raise CliError("fusermount3 not found: install fuse3", ExitCode.MOUNT)
    if args.foreground:
        return _mount_foreground(args, mountpoint)
    return _mount_detached(args, mountpoint)


def _mount_foreground(args: argparse.Namespace, mountpoint: str) -> int:
    try:
        identity = load_identity(args)
        contacts = config.Contacts.load() if args.recipients else None
        recipients = tuple(config.resolve_recipient(r, contacts) for r in args.recipients)
        import trio

        from cssfs import mount

        cfg = mount.MountConfig(
            store_url=args.store,
            mountpoint=mountpoint,
            cache_size=args.cache_size,
            read_only=args.read_only,
            options=_fuse_options(args.options),
            list_ttl=args.list_ttl,
            recipients=recipients,
            store_options=store_options(args),
            trusted_writers_only=args.trusted_writers_only,
        )
        try:
            trio.run(mount.serve, cfg, identity)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
    except (CssfsError, OSError, RuntimeError) as exc:
        message = _message(exc)
        service.notify(f"STATUS=error: {message}")
        if isinstance(exc, CliError):
            raise
        raise CliError(message, _code(exc)) from None
    return 0


def _message(exc: BaseException) -> str:
    from cssfs.cli import describe

    if isinstance(exc, RuntimeError) and "fuse" in str(exc).lower():
        return f"could not mount: {exc} (is /dev/fuse usable?)"
    return " ".join(describe(exc).splitlines())


def _code(exc: BaseException) -> ExitCode:
    from cssfs.cli import exit_code_for

    if isinstance(exc, RuntimeError):
        return ExitCode.MOUNT
    return exit_code_for(exc)


def _log_path(mountpoint: str) -> Path:
    digest = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]
    return config.state_dir() / "logs" / f"mount-{digest}.log"


@contextlib.contextmanager
def _notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in a private temporary folder, for the child's sd_notify messages."""
    folder = tempfile.mkdtemp(prefix="cssfs-notify-")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def _mount_detached(args: argparse.Namespace, mountpoint: str) -> int:
    """Start ``cssfs mount --foreground`` in a new session; return once it reports READY=1."""
    identity_path = config.identity_path(args.identity).absolute()
    # Ask for the passphrase here, on the user's terminal, and hand it to the daemon on a pipe:
    # the daemon has no terminal, and a passphrase never goes on a command line.
    source = config.passphrase_source(identity_path, args.passphrase_file)
    asked: list[bytes] = []

    def capture() -> bytes:
        value = source()
        asked.append(value)
        return value

    config.load_identity(identity_path, capture)
    for r in args.recipients:
        config.resolve_recipient(r)

    argv = [sys.executable, "-m", "cssfs", "-i", os.fspath(identity_path)]
    pass_fds: tuple[int, ...] = ()
    if asked:
        read_fd, write_fd = os.pipe()
        os.write(write_fd, asked[0])
        os.close(write_fd)
        pass_fds = (read_fd,)
        argv += ["--passphrase-file", f"/dev/fd/{read_fd}"]
    if args.debug:
        argv.append("--debug")
    for module in args.debug_module:
        argv += ["--debug-module", module]
    argv += ["mount", "--foreground", "--cache-size", str(args.cache_size),
             "--list-ttl", repr(args.list_ttl)]
    if args.read_only:
        argv.append("--read-only")
    if args.trusted_writers_only:
        argv.append("--trusted-writers-only")
    for option in _fuse_options(args.options):
        argv += ["-o", option]
    for r in args.recipients:
        argv += ["--recipient", r]
    argv += store_option_args(args)
    argv += ["--", args.store, mountpoint]

    log_path = _log_path(mountpoint)
    config.ensure_private_dir(log_path.parent)
    with _notify_socket() as (sock, notify_path), open(log_path, "ab") as log_file:
        os.chmod(log_path, 0o600)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path)
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env,
                pass_fds=pass_fds, start_new_session=True, close_fds=True,
            )
        finally:
            for fd in pass_fds:
                os.close(fd)
        return _await_ready(proc, sock, log_path)


def _await_ready(proc: subprocess.Popen[bytes], sock: socket.socket, log_path: Path) -> int:
    status = ""
    deadline = time.monotonic() + READY_TIMEOUT
    pidfd = os.pidfd_open(proc.pid)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.terminate()
                raise CliError(f"the mount did not become ready in {READY_TIMEOUT:.0f} s; "
                               f"see {log_path}", ExitCode.MOUNT)
            readable, _, _ = select.select([sock.fileno(), pidfd], [], [], left)
            if sock.fileno() in readable:
                message = sock.recv(65536).decode("utf-8", "replace")
                for line in message.splitlines():
                    if line == "READY=1":
                        return 0
                    if line.startswith("STATUS="):
                        status = line[len("STATUS="):]
            if pidfd in readable:
                code = proc.wait()
                # A READY=1 sent just before exiting would still be queued: drain first.
                with contextlib.suppress(BlockingIOError):
                    while True:
                        message = sock.recv(65536, socket.MSG_DONTWAIT).decode("utf-8", "replace")
                        for line in message.splitlines():
                            if line.startswith("STATUS="):
                                status = line[len("STATUS="):]
                error = status.removeprefix("error: ") if status.startswith("error: ") else ""
                if not error:
                    error = _last_line(log_path) or f"the mount daemon exited with status {code}"
                raise CliError(error.removeprefix("cssfs: error: "), _exit_code(code))
    finally:
        os.close(pidfd)


def _exit_code(code: int) -> ExitCode:
    try:
        return ExitCode(code) if code > 0 else ExitCode.MOUNT
    except ValueError:
        return ExitCode.MOUNT


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


# -- umount, sync, status -------------------------------------------------------------------------


def _control(mountpoint: str) -> Path:
    try:
        return service.control_path(mountpoint)
    except ConfigError as exc:
        raise CliError(str(exc), ExitCode.CONFIG) from None


def _umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    control = _control(mountpoint)
    pid: int | None = None
    wait = True
    try:
        pid = int(service.request(control, "ping")["pid"])
    except service.ControlError as exc:
        if not is_mounted(mountpoint):
            raise CliError(f"{mountpoint} is not mounted", ExitCode.MOUNT) from None
        print(f"cssfs: warning: {exc}; unmounting without waiting for uploads", file=sys.stderr)
    if pid is not None:
        try:
            service.request(control, "sync", timeout=None)
        except service.ControlError as exc:
            # The files are safe in the journal; the daemon keeps trying after the unmount.
            print(f"cssfs: warning: uploads are failing ({exc}); the daemon (pid {pid}) keeps "
                  "retrying after the unmount: see `cssfs status`", file=sys.stderr)
            wait = False
    command = ["fusermount3", "-u", *(["-z"] if args.lazy else []), mountpoint]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = " ".join(result.stderr.split()) or f"fusermount3 exited {result.returncode}"
        raise CliError(f"could not unmount {mountpoint}: {detail}", ExitCode.MOUNT)
    if pid is not None and wait and not _wait_exit(pid, EXIT_TIMEOUT):
        raise CliError(f"unmounted, but the daemon (pid {pid}) is still uploading; "
                       f"`cssfs status` shows its progress", ExitCode.MOUNT)
    return 0


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` (not our child) exits; False on timeout."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


def _sync(args: argparse.Namespace) -> int:
    try:
        service.request(_control(args.mountpoint), "sync", timeout=None)
    except service.ControlError as exc:
        raise CliError(str(exc), ExitCode.MOUNT) from None
    return 0


def _status(args: argparse.Namespace) -> int:
    if args.mountpoint:
        paths = [_control(os.path.abspath(args.mountpoint))]
    else:
        paths = service.control_sockets()
    for path in paths:
        try:
            answer = service.request(path, "status")
        except service.ControlError as exc:
            if args.mountpoint:
                raise CliError(str(exc), ExitCode.MOUNT) from None
            continue
        answer.pop("ok", None)
        print(json.dumps(answer, sort_keys=True))
    return 0
