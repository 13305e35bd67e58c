"""mounts: start a FUSE daemon in the foreground, wait until it is mounted, stop it for sure.

What it knows: NOTIFY_SOCKET readiness (systemd's sd_notify protocol, which cssfs, rclone and
benchlib/memfs.py all speak), /proc/self/mountinfo, fusermount3. What it must not know: what the
daemon does -- the argv comes from the suite (benchlib/cssfs_cli.py, benchlib/rclone.py).

Stopping: ``fusermount3 -u MNT`` (a clean unmount: cssfs flushes, rclone finishes uploads),
wait for the daemon to exit; if either fails, ``fusermount3 -u -z MNT``, then SIGTERM, then
SIGKILL -- only the pid we started.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib.runner import (
    BenchError,
    Cleanup,
    ProcSample,
    aborting,
    die_with_parent,
    log,
    proc_sample,
    stop_process,
)


def is_mounted(path: Path) -> bool:
    """True if ``path`` is a mount point (read from /proc/self/mountinfo, never stat()ed)."""
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if mp == target:
                    return True
    except OSError:
        pass
    return False


def fusermount_u(path: Path, *, lazy: bool = False) -> bool:
    argv = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(path)]
    r = subprocess.run(argv, capture_output=True, timeout=120)
    return r.returncode == 0


class Mount:
    """A FUSE daemon running in the foreground, mounted at ``mountpoint``."""

    def __init__(self, name: str, argv: list[str], mountpoint: Path, cleanup: Cleanup, *,
                 env: dict[str, str] | None = None, cwd: Path | None = None,
                 log_path: Path, ready_timeout: float = 60) -> None:
        self.name = name
        self.mountpoint = mountpoint
        mountpoint.mkdir(parents=True, exist_ok=True)
        if is_mounted(mountpoint):
            raise BenchError(f"{mountpoint} is already a mount point")
        sockdir = Path(tempfile.mkdtemp(prefix="bench-notify-"))
        sock_path = sockdir / "notify"
        self.log_path = log_path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(sock_path))
        env = dict(env if env is not None else os.environ)
        env["NOTIFY_SOCKET"] = str(sock_path)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.t_start = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=die_with_parent)
        self._stopped = False
        self._forget = cleanup.push(f"mount {name} at {mountpoint}", self._stop)
        try:
            self._wait_ready(ready_timeout)
        finally:
            self._sock.close()
            with contextlib.suppress(OSError):
                sock_path.unlink()
                sockdir.rmdir()
        self.mount_s = time.perf_counter() - self.t_start
        self.start_sample = proc_sample(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self._sock], [], [], 0.05)
            if r:
                msg = self._sock.recv(4096)
                if b"READY=1" in msg.split(b"\n"):
                    if not is_mounted(self.mountpoint):
                        raise BenchError(f"{self.name} said READY=1 but nothing is mounted")
                    return
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode} before "
                                 f"it was ready: {self.tail()}")
        raise BenchError(f"{self.name} not ready after {timeout:.0f}s: {self.tail()}")

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def sample(self) -> ProcSample:
        return proc_sample(self.proc.pid)

    def stop(self) -> int | None:
        """Unmount cleanly and return the daemon's exit code (None if it had to be killed)."""
        self._forget()  # runs _stop now and unregisters it
        return self.proc.returncode

    def _stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            clean = is_mounted(self.mountpoint) and fusermount_u(self.mountpoint)
            if clean:
                # A clean unmount: the daemon finishes its work (cssfs flushes) and exits --
                # unless the run is being aborted (the server may be gone): then briefly.
                wait_s = 15 if aborting else 300
                try:
                    self.proc.wait(wait_s)
                except subprocess.TimeoutExpired:
                    log(f"{self.name} did not exit within {wait_s} s of its unmount")
            if self.proc.poll() is None or is_mounted(self.mountpoint):
                # Not mounted yet (interrupted while starting), busy, or hung.
                if is_mounted(self.mountpoint):
                    log(f"{self.name}: clean unmount failed, lazy unmount")
                    fusermount_u(self.mountpoint, lazy=True)
                stop_process(self.proc)
                if is_mounted(self.mountpoint):
                    fusermount_u(self.mountpoint, lazy=True)
        finally:
            self._log.close()
