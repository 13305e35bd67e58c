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
from tests.support.procs import end_process

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
    """A running ``cssfs mount --foreground`` daemon and where it is mounted.

    ``remount()`` stops it cleanly and starts it again with the same store, state and options
    (a cold cache; the journal and everything else on disk are kept).
    """

    store: str
    mountpoint: Path
    identity_path: Path
    args: list[str]
    work: Path
    env: dict[str, str]
    allowed: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def runtime_dir(self) -> Path:
        return self.work / "run"

    @property
    def stderr_path(self) -> Path:
        return self.work / f"stderr-{self.runs}"

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
            [sys.executable, "-m", "cssfs", *args], env=self.env, capture_output=True,
            text=True, timeout=timeout, check=False, cwd=REPO,
        )

    def start(self) -> None:
        """Spawn the daemon and wait for its READY=1 (AssertionError with its stderr if not)."""
        assert self.proc is None
        self.runs += 1
        notify_path = self.work / "notify"
        notify_path.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "cssfs", "-i", os.fspath(self.identity_path), "mount",
                "--foreground", *self.args, self.store, os.fspath(self.mountpoint)]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(os.fspath(notify_path))
            with open(self.stderr_path, "wb") as err:
                self.proc = subprocess.Popen(
                    argv, env={**self.env, "NOTIFY_SOCKET": os.fspath(notify_path)},
                    stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=REPO,
                )
            try:
                _wait_ready(self.proc, sock, self.stderr_path)
            except BaseException:
                self.kill()
                raise

    def stop(self) -> None:
        """``fusermount3 -u``; the daemon must then exit 0 with nothing unexpected on stderr."""
        proc = self.proc
        assert proc is not None
        try:
            result = subprocess.run(["fusermount3", "-u", os.fspath(self.mountpoint)],
                                    capture_output=True, text=True, check=False)
            assert result.returncode == 0, f"fusermount3 -u: {result.stderr}"
            code = proc.wait(EXIT_TIMEOUT)
            assert code == 0, f"daemon exited {code}:\n{self.stderr()}"
            extra = self.unexpected_stderr()
            assert not extra, "daemon stderr:\n" + "\n".join(extra)
        except BaseException:
            self.kill()
            raise
        self.proc = None

    def kill(self) -> None:
        """The failure path: lazy unmount, terminate, kill."""
        proc, self.proc = self.proc, None
        force_unmount(self.mountpoint)
        if proc is not None:
            end_process(proc)
        force_unmount(self.mountpoint)

    def remount(self) -> None:
        self.stop()
        self.start()


def _wait_ready(proc: subprocess.Popen[bytes], sock: socket.socket, stderr_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    pidfd = os.pidfd_open(proc.pid)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"mount not ready in {READY_TIMEOUT} s:\n"
                                     + stderr_path.read_text(errors="replace"))
            readable, _, _ = select.select([sock.fileno(), pidfd], [], [], left)
            if sock.fileno() in readable:
                message = sock.recv(65536).decode()
                if "READY=1" in message.splitlines():
                    return
            elif pidfd in readable:
                code = proc.wait()
                raise AssertionError(f"mount exited with {code} before READY=1:\n"
                                     + stderr_path.read_text(errors="replace"))
    finally:
        os.close(pidfd)


def force_unmount(mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", os.fspath(mountpoint)], capture_output=True,
                   check=False)


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
    """Mount ``store`` at ``mountpoint`` for the ``with`` body; checks a clean exit afterwards.

    The daemon gets its own XDG folders in a short temporary folder (unix socket paths are
    limited), unless ``env`` sets them; ``state_home`` keeps the journal somewhere else.
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cssfs-t-", dir="/tmp"))
    (work / "run").mkdir(mode=0o700)
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.update({
        "CSSFS_STRICT": "1",
        "XDG_RUNTIME_DIR": os.fspath(work / "run"),
        "XDG_STATE_HOME": os.fspath(state_home or work / "state"),
        "XDG_CONFIG_HOME": os.fspath(work / "config"),
        "PYTHONPATH": os.pathsep.join(filter(None, [os.fspath(REPO),
                                                    os.environ.get("PYTHONPATH")])),
    })
    full_env.pop("NOTIFY_SOCKET", None)
    mount = Mount(store, mountpoint, identity_path, list(args), work, full_env)
    try:
        mount.start()
        try:
            yield mount
        except BaseException:
            mount.kill()
            raise
        if mount.proc is not None:
            mount.stop()
    finally:
        if mount.proc is not None:
            mount.kill()
        shutil.rmtree(work, ignore_errors=True)


# -- test data ------------------------------------------------------------------------------------

MiB = 1024 * 1024


def write_pattern(path: Path, size: int, seed: int = 0) -> None:
    """``size`` bytes from a seeded generator, fast for large files: a random 1 MiB block
    repeated, each copy stamped with its index (so no two MiB of a file are equal)."""
    import random

    rng = random.Random(seed)
    block = bytearray(rng.randbytes(min(size, MiB)))
    with open(path, "wb") as f:
        done = 0
        index = 0
        while done < size:
            n = min(MiB, size - done)
            block[:8] = index.to_bytes(8, "little")[: min(8, n)] + bytes(max(0, 8 - n))
            f.write(memoryview(block)[:n])
            done += n
            index += 1


def make_tree(root: Path, sizes: dict[str, int]) -> None:
    """Files (relative paths -> sizes) under ``root``, each with its own seed."""
    for seed, (rel, size) in enumerate(sorted(sizes.items())):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_pattern(path, size, seed)


def cmp_files(a: Path, b: Path) -> None:
    result = subprocess.run(["cmp", os.fspath(a), os.fspath(b)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def cmp_trees(src: Path, dst: Path) -> None:
    """Same names everywhere and ``cmp`` equal files."""
    src_names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*"))
    dst_names = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*"))
    assert src_names == dst_names
    for rel in src_names:
        if (src / rel).is_file():
            cmp_files(src / rel, dst / rel)


def run(*argv: str | os.PathLike[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a normal tool; its output; fail the test if it fails."""
    result = subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True,
                            check=False, **kwargs)
    assert result.returncode == 0, f"{argv}: {result.returncode}\n{result.stdout}{result.stderr}"
    return result


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size of process ``pid`` (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")
