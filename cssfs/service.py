"""service: how a mount daemon talks to the outside -- the service manager and the CLI.

What it knows: the ``$NOTIFY_SOCKET`` environment variable and the datagrams systemd expects
(``READY=1``, ``STATUS=...``, ``STOPPING=1``, ``WATCHDOG=1``), and the daemon's *control
socket*: where it lives for a mount point and its one-line JSON protocol. What it must not know:
FUSE, stores, crypto, trio (the client side here is plain blocking sockets, so ``cssfs status``
loads nothing heavy; mount.py serves the other end).

sd_notify: without ``$NOTIFY_SOCKET`` every call is a no-op, so the daemon behaves the same under
systemd, under ``cssfs mount`` (whose parent process owns a notify socket to learn when the mount
is usable) and in a terminal. A path starting with ``@`` names a Linux abstract socket.

Control socket: ``$XDG_RUNTIME_DIR/cssfs/mount-<hash of the mount point>.sock`` (mode 0600 in
a 0700 folder). A client connects, sends one JSON object and a newline -- ``{"cmd": "status"}``,
``{"cmd": "sync"}`` (answer only once nothing is pending) -- and reads one JSON object line: the
result, with ``"ok": true``, or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from cssfs.errors import ConfigError, CssfsError

log = logging.getLogger(__name__)

NOTIFY_ENV = "NOTIFY_SOCKET"


def socket_address(path: str) -> str | bytes:
    """The ``connect``/``sendto`` address for a ``$NOTIFY_SOCKET`` value (``@`` = abstract)."""
    if path.startswith("@"):
        return b"\0" + os.fsencode(path[1:])
    return path


def notify(message: str, *, env: dict[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to the service manager; False if there is none.

    Failures to deliver are logged at debug level and reported as False: a service manager that
    went away must not take the mount down with it. The send never blocks (the caller may be
    the mount's trio thread): a receiver whose queue is full, one that never reads, makes this
    message lost, not the mount stuck.
    """
    path = (os.environ if env is None else env).get(NOTIFY_ENV)
    if not path:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(socket_address(path))
            sock.send(message.encode("utf-8", "replace"), socket.MSG_DONTWAIT)
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", path, exc)
        return False
    return True


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """How often to send ``WATCHDOG=1`` (half of ``$WATCHDOG_USEC``), or None if systemd asked
    for no watchdog or asked another process (``$WATCHDOG_PID``)."""
    environ = os.environ if env is None else env
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2_000_000


def status(text: str) -> bool:
    """Shorthand for ``notify("STATUS=" + text)``; newlines are flattened to keep one line."""
    return notify("STATUS=" + " ".join(text.splitlines()))


# -- the control socket -------------------------------------------------------------------------

SOCKET_PREFIX = "mount-"
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the terminating NUL
MAX_MESSAGE = 1 << 20


class ControlError(CssfsError):
    """The mount daemon could not be reached, or answered with an error."""


def runtime_dir() -> Path:
    """Where control sockets live (``config.runtime_dir()``)."""
    from cssfs import config

    return config.runtime_dir()


def control_path(mountpoint: str | os.PathLike[str], runtime: Path | None = None) -> Path:
    """The control socket of the daemon serving ``mountpoint`` (resolved to an absolute path),
    in ``runtime`` (default: ``runtime_dir()``)."""
    # Resolve symlinks in the parents only: a stat of the mount point itself would go to the
    # daemon, which may be the thing that hangs.
    absolute = os.path.abspath(os.fspath(mountpoint))
    real = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:20]
    path = (runtime_dir() if runtime is None else runtime) / f"{SOCKET_PREFIX}{digest}.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"control socket path {path} is too long for a unix socket; "
            "set XDG_RUNTIME_DIR to a shorter folder"
        )
    return path


def control_sockets() -> list[Path]:
    """Every control socket in the runtime folder (``cssfs status`` without a mount point)."""
    try:
        return sorted(runtime_dir().glob(f"{SOCKET_PREFIX}*.sock"))
    except OSError:
        return []


def request(path: Path, command: str, *, timeout: float | None = 10.0,
            **arguments: Any) -> dict[str, Any]:
    """Send ``command`` to the daemon at ``path``; its answer (ControlError if it failed).

    ``timeout`` bounds connecting and each read; None waits as long as the daemon needs (sync).
    """
    message = json.dumps({"cmd": command, **arguments}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
            sock.sendall(message)
            data = b""
            while not data.endswith(b"\n"):
                more = sock.recv(65536)
                if not more:
                    break
                data += more
                if len(data) > MAX_MESSAGE:
                    raise ControlError(f"{path}: answer too long")
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ControlError(f"no cssfs daemon listens on {path}") from exc
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from exc
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError(f"{path}: the daemon closed the connection without an answer") from None
    if not isinstance(answer, dict):
        raise ControlError(f"{path}: malformed answer")
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error") or "the daemon reported an error"))
    return answer
