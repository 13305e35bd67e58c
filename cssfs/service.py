"""service: talk to the service manager (systemd's sd_notify protocol), nothing else.

What it knows: the ``$NOTIFY_SOCKET`` environment variable and the datagram it expects
(``READY=1``, ``STATUS=...``, ``STOPPING=1``, ``WATCHDOG=1``, newline-separated ``KEY=value``
assignments). What it must not know: FUSE, stores, crypto. Without ``$NOTIFY_SOCKET`` every call
is a no-op, so the daemon behaves the same under systemd, under ``cssfs mount`` (whose parent
process owns a notify socket to learn when the mount is usable) and in a terminal.

A socket path starting with ``@`` names a Linux abstract socket (the ``@`` becomes a NUL byte),
as systemd documents.
"""

from __future__ import annotations

import logging
import os
import socket

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
    went away must not take the mount down with it.
    """
    path = (os.environ if env is None else env).get(NOTIFY_ENV)
    if not path:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(socket_address(path))
            sock.sendall(message.encode("utf-8", "replace"))
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", path, exc)
        return False
    return True


def status(text: str) -> bool:
    """Shorthand for ``notify("STATUS=" + text)``; newlines are flattened to keep one line."""
    return notify("STATUS=" + " ".join(text.splitlines()))
