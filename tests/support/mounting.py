"""Real FUSE mounts for tests: spawn ``cssfs mount --foreground``, wait for READY=1, tear down.

The daemon runs as ``[sys.executable, "-m", "cssfs", "-i", IDENTITY, "mount", "--foreground",
...]`` with ``CSSFS_STRICT=1`` (an internal error tears the mount down instead of being mapped to
EIO), its own ``XDG_STATE_HOME`` (journal) and ``XDG_RUNTIME_DIR`` (control socket), and a
``NOTIFY_SOCKET`` this helper owns: readiness is the daemon's ``READY=1`` datagram -- never a
sleep -- and a daemon that exits first fails the test at once with its stderr.

Teardown: after a clean run ``fusermount3 -u``, then the daemon must exit 0 with an empty stderr
(expected warnings can be allowed by pattern); otherwise ``fusermount3 -u -z``, terminate, kill.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cssfs import service

READY_TIMEOUT = 60.0
EXIT_TIMEOUT = 120.0
REPO = Path(__file__).resolve().parents[2]


def fuse_available() -> tuple[bool, str]:
    if not os.path.exists("/dev/fuse"):
        return False, "no /dev/fuse"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return False, "/dev/fuse is not usable"
    if shutil.which("fusermount3") is None:
        return False, "no fusermount3"
    return True, ""


def fuse_test_marker() -> list[pytest.MarkDecorator]:
    """``pytestmark`` for real-mount test modules: marked ``fuse``, skipped without FUSE."""
    ok, why = fuse_available()
    return [pytest.mark.fuse, pytest.mark.skipif(not ok, reason=why)]


def make_identity(path: Path) -> Any:
    """A fresh unprotected identity written to ``path``; the Identity."""
    from cssfs.keys import Identity

    identity = Identity.generate()
    path.write_bytes(identity.to_file(None))
    os.chmod(path, 0o600)
    return identity


@dataclass
class Mount:
    """A running ``cssfs mount --foreground`` daemon and where it is mounted."""

    proc: subprocess.Popen[bytes]
    mountpoint: Path
    stderr_path: Path
    runtime_dir: Path
    env: dict[str, str]
    allowed: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)

    def control(self, command: str, timeout: float | None = 60.0) -> dict[str, Any]:
        path = service.control_path(self.mountpoint, self.runtime_dir / "cssfs")
        return service.request(path, command, timeout=timeout)

    def status(self) -> dict[str, Any]:
        return self.control("status")

    def sync(self) -> None:
        self.control("sync", timeout=None)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def allow(self, pattern: str) -> None:
        """Allow stderr lines matching ``pattern`` (regex) at teardown."""
        self.allowed.append(pattern)

    def unexpected_stderr(self) -> list[str]:
        return [
            line
            for line in self.stderr().splitlines()
            if line.strip() and not any(re.search(p, line) for p in self.allowed)
        ]

    def run_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``python -m cssfs ARGS`` with this mount's environment."""
        return subprocess.run(
            [sys.executable, "-m", "cssfs", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=REPO,
        )


def _wait_ready(proc: subprocess.Popen[bytes], sock: socket.socket, stderr_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    pidfd = os.pidfd_open(proc.pid)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"mount not ready in {READY_TIMEOUT} s:\n"
                    + stderr_path.read_text(errors="replace")
                )
            readable, _, _ = select.select([sock.fileno(), pidfd], [], [], left)
            if sock.fileno() in readable:
                message = sock.recv(65536).decode()
                if "READY=1" in message.splitlines():
                    return
            elif pidfd in readable:
                code = proc.wait()
                raise AssertionError(
                    f"mount exited with {code} before READY=1:\n"
                    + stderr_path.read_text(errors="replace")
                )
    finally:
        os.close(pidfd)


def force_unmount(mountpoint: Path) -> None:
    subprocess.run(
        ["fusermount3", "-u", "-z", os.fspath(mountpoint)], capture_output=True, check=False
    )


@contextlib.contextmanager
def mounted(
    store: str,
    mountpoint: Path,
    identity_path: Path,
    *,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    state_home: Path | None = None,
) -> Iterator[Mount]:
    """Mount ``store`` at ``mountpoint`` for the ``with`` body; checks a clean exit afterwards."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cssfs-t-", dir="/tmp"))  # short: unix socket paths
    runtime = work / "run"
    runtime.mkdir(mode=0o700)
    stderr_path = work / "stderr"
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.update(
        {
            "CSSFS_STRICT": "1",
            "XDG_RUNTIME_DIR": os.fspath(runtime),
            "XDG_STATE_HOME": os.fspath(state_home or work / "state"),
            "XDG_CONFIG_HOME": os.fspath(work / "config"),
            "PYTHONPATH": os.pathsep.join(
                filter(None, [os.fspath(REPO), os.environ.get("PYTHONPATH")])
            ),
        }
    )
    full_env.pop("NOTIFY_SOCKET", None)
    argv = [
        sys.executable,
        "-m",
        "cssfs",
        "-i",
        os.fspath(identity_path),
        "mount",
        "--foreground",
        *args,
        store,
        os.fspath(mountpoint),
    ]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = work / "notify"
    sock.bind(os.fspath(notify_path))
    proc: subprocess.Popen[bytes] | None = None
    clean = False
    try:
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                argv,
                env={**full_env, "NOTIFY_SOCKET": os.fspath(notify_path)},
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=REPO,
            )
        _wait_ready(proc, sock, stderr_path)
        mount = Mount(proc, mountpoint, stderr_path, runtime, full_env)
        yield mount
        clean = True
    finally:
        sock.close()
        if proc is not None:
            if clean:
                try:
                    result = subprocess.run(
                        ["fusermount3", "-u", os.fspath(mountpoint)],
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    assert result.returncode == 0, f"fusermount3 -u: {result.stderr}"
                    code = proc.wait(EXIT_TIMEOUT)
                    assert code == 0, f"daemon exited {code}:\n{stderr_path.read_text()}"
                    extra = mount.unexpected_stderr()
                    assert not extra, "daemon stderr:\n" + "\n".join(extra)
                except BaseException:
                    clean = False
                    raise
                finally:
                    if not clean:
                        _kill(proc, mountpoint)
            else:
                _kill(proc, mountpoint)
        shutil.rmtree(work, ignore_errors=True)


def _kill(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    force_unmount(mountpoint)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    force_unmount(mountpoint)
