"""runner: process plumbing for the bench -- cleanup on any exit, measured child processes,
/proc readings of a daemon, data files, cache dropping.

What it knows: POSIX processes, /proc, signals, files. What it must not know: cssfs, S3,
which suite is running.

Everything the bench starts is registered with a ``Cleanup`` the moment it exists; the
``Cleanup`` runs its callbacks in reverse order on normal exit, on an exception and on
SIGINT/SIGTERM/SIGHUP (the handlers raise ``Interrupted`` so every ``finally`` runs too).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class Interrupted(BaseException):
    """Raised from a signal handler so that try/finally blocks unwind."""


# Why the bench interrupted itself (a watchdog sets it before signalling its own process).
interrupt_reason: list[str] = []
# Set once a stop signal arrived: cleanups then wait briefly instead of for a clean finish.
aborting: list[bool] = []


def abort_self(reason: str) -> None:
    """From any thread: stop the run the way Ctrl-C would, with ``reason`` in the report."""
    interrupt_reason.append(reason)
    log(f"aborting: {reason}")
    os.kill(os.getpid(), signal.SIGTERM)


class BenchError(Exception):
    """A workload failed its own check (wrong bytes, missing object, a command failed)."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Cleanup:
    """A LIFO of cleanup callbacks that also runs when the process is signalled."""

    def __init__(self) -> None:
        self._stack: list[tuple[str, Callable[[], None]]] = []
        self._old: dict[int, object] = {}

    def __enter__(self) -> Cleanup:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Ignore further signals while unwinding; the cleanup below must finish.
        for sig in self._old:
            signal.signal(sig, signal.SIG_IGN)
        aborting.append(True)
        raise Interrupted(f"signal {signal.Signals(signum).name}")

    def push(self, what: str, fn: Callable[[], None]) -> Callable[[], None]:
        """Register ``fn``; returns a callable that runs it now and forgets it (idempotent)."""
        entry = (what, fn)
        self._stack.append(entry)

        def run_now() -> None:
            if entry in self._stack:
                self._stack.remove(entry)
                fn()

        return run_now

    def close(self) -> None:
        while self._stack:
            what, fn = self._stack.pop()
            try:
                fn()
            except BaseException as exc:  # cleanup must go on
                log(f"cleanup of {what} failed: {exc!r}")

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            for sig, old in self._old.items():
                signal.signal(sig, old)  # type: ignore[arg-type]


# -- processes ------------------------------------------------------------------------------


@dataclass
class CmdResult:
    argv: list[str]
    returncode: int
    wall_s: float
    maxrss_kib: int           # peak RSS of the child (and its waited-for descendants)
    cpu_s: float              # user + system
    stdout: bytes
    stderr: bytes


GNU_TIME = "/usr/bin/time"


def run_measured(
    argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
    stdin: int | None = subprocess.DEVNULL, check: bool = True, timeout: float = 1800,
) -> CmdResult:
    """Run ``argv`` to completion; its wall time, peak RSS and CPU seconds.

    Peak RSS comes from GNU time (``%M``), which forks the command from its own small process:
    Linux carries the RSS a process had when it was fork()ed into the ``ru_maxrss`` of what it
    exec()s, so a command forked straight from this (large) Python process would report our
    RSS if that is higher than its own. Without /usr/bin/time, wait4()'s rusage is used and
    the figure is an upper bound.
    """
    out_f = tempfile.TemporaryFile()  # noqa: SIM115 - closed below
    err_f = tempfile.TemporaryFile()  # noqa: SIM115
    time_out = None
    full = list(argv)
    if os.access(GNU_TIME, os.X_OK):
        fd, time_out = tempfile.mkstemp(prefix="bench-time-")
        os.close(fd)
        full = [GNU_TIME, "-f", "%M %U %S", "-o", time_out, "--", *full]
    t0 = time.perf_counter()
    # Own process group: on a timeout or an interrupt, GNU time *and* the command go.
    proc = subprocess.Popen(full, env=env, cwd=cwd, stdin=stdin, stdout=out_f,
                            stderr=err_f, start_new_session=True)

    def kill_group() -> None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)

    # A blocking wait4 still lets our signal handlers run (PEP 475) and raise Interrupted.
    killer = threading.Timer(timeout, kill_group)
    killer.start()
    try:
        _pid, status, ru = os.wait4(proc.pid, 0)
    except BaseException:
        kill_group()
        with contextlib.suppress(OSError):
            os.waitpid(proc.pid, 0)
        if time_out is not None:
            with contextlib.suppress(OSError):
                os.unlink(time_out)
        raise
    finally:
        killer.cancel()
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out_f.seek(0)
    err_f.seek(0)
    maxrss, cpu = ru.ru_maxrss, ru.ru_utime + ru.ru_stime
    if time_out is not None:
        try:
            fields = Path(time_out).read_text().split()
            # GNU time writes "Command exited with non-zero status N" first on failure.
            maxrss, cpu = int(fields[-3]), float(fields[-2]) + float(fields[-1])
        except (OSError, ValueError, IndexError):
            pass
        finally:
            os.unlink(time_out)
    res = CmdResult(list(argv), proc.returncode, wall, maxrss, cpu, out_f.read(), err_f.read())
    out_f.close()
    err_f.close()
    if check and res.returncode != 0:
        tail = res.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"{' '.join(argv[:4])} ... exited {res.returncode}: {' | '.join(tail)}")
    return res


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if the bench dies without cleaning up (SIGKILL),
    so no S3 server or FUSE daemon outlives it (daemons unmount themselves on SIGTERM)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def stop_process(proc: subprocess.Popen[bytes], *, grace: float = 10) -> None:
    """SIGTERM, wait ``grace`` s, then SIGKILL. Only this process, by pid."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass
class ProcSample:
    hwm_kib: int      # VmHWM: peak RSS since start (or since reset_peak)
    rss_kib: int
    cpu_s: float      # utime + stime
    io_rchar: int
    io_wchar: int


def proc_sample(pid: int) -> ProcSample:
    """Peak/current RSS, CPU seconds and I/O counters of ``pid`` from /proc."""
    hwm = rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime/stime are fields 14/15.
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    rchar = wchar = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                rchar = int(line.split()[1])
            elif line.startswith("wchar:"):
                wchar = int(line.split()[1])
    return ProcSample(hwm, rss, cpu, rchar, wchar)


def reset_peak(pid: int) -> bool:
    """Reset VmHWM of ``pid`` to its current RSS (root: /proc/pid/clear_refs = 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def drop_caches() -> bool:
    """sync; echo 3 > /proc/sys/vm/drop_caches. False if not permitted (not root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


# -- files and ports ------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for tools that need a number)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_random_file(path: Path, size: int, *, piece: int = 8 << 20) -> str:
    """Write ``size`` random (incompressible) bytes to ``path``; returns their sha256 hex."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            b = os.urandom(min(piece, left))
            h.update(b)
            f.write(b)
            left -= len(b)
    return h.hexdigest()


def sha256_file(path: Path | str, *, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(bufsize)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def read_all(path: Path | str, *, bufsize: int = 1 << 20) -> int:
    """Read ``path`` sequentially and discard it (what `dd bs=1M of=/dev/null` does)."""
    total = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(bufsize)
        while n := f.readinto(buf):
            total += n
    return total


def rmtree_quiet(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    """``with timer() as t: ...`` then ``t[0]`` is the elapsed seconds."""
    box: list[float] = []
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - t0)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        raise ValueError("percentile of nothing")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]
