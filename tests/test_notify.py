"""The daemon and its service manager: sd_notify messages on a NOTIFY_SOCKET this test owns.

What systemd's ``Type=notify`` is promised (issue "Nothing lost", docs/MOUNT.md): ``READY=1``
only once the mount answers and the journal of an earlier run is replayed; ``STATUS=`` lines
that report the upload queue while there is one; ``WATCHDOG=1`` when ``$WATCHDOG_USEC`` asks
for it; and ``STOPPING=1`` only once the files pending at the stop have reached the store. With
the store unreachable at the stop the daemon unmounts (nothing hangs on the mount point), says
so, keeps the journal, and -- given up on with a second signal -- leaves it for the next mount.

The daemon runs as ``cssfs mount --foreground`` against moto behind tests.support.faultproxy;
the datagrams are read as they arrive, and every check made "at the moment" a message arrives
is made before the next one is read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cssfs.cmd_mount import is_mounted
from tests.support.mounting import REPO, Mount, fuse_test_marker, make_identity

pytestmark = [*fuse_test_marker(), pytest.mark.s3]

NOISE = r"WARNING|ERROR|retry|unreachable|failing|journal|attempt|signal"


class Notify:
    """A datagram socket standing in for systemd's notify socket; ``messages`` keeps every
    line received, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(os.fspath(path))
        self.messages: list[str] = []

    def close(self) -> None:
        self.sock.close()

    def drain(self) -> list[str]:
        """Read what has arrived so far (the sender has exited, say); every line so far."""
        while True:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT).decode()
            except (BlockingIOError, TimeoutError):  # nothing more (TimeoutError: timeout mode)
                return self.messages
            self.messages.extend(data.splitlines())

    def until(self, accept: Callable[[str], bool], proc: subprocess.Popen[bytes] | None,
              timeout: float = 60.0) -> str:
        """Read lines until one is accepted (returned at once, before reading more); fail if
        ``proc`` exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no such message in {timeout} s; got {self.messages}"
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(65536).decode()
            except TimeoutError:
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"daemon exited {proc.returncode}; got {self.messages}"
                                         ) from None
                continue
            for line in data.splitlines():
                self.messages.append(line)
                if accept(line):
                    return line


def _own(key: str) -> bool:
    """cssfs's own objects (folder policies, attrs records...): hidden by the mount."""
    return key.rpartition("/")[2].startswith(".cssfs-")


class World:
    def __init__(self, tmp: Path, bucket: Any, proxy: Any) -> None:
        import boto3

        self.tmp = tmp
        self.bucket = bucket.bucket
        self.proxy = proxy
        self.s3 = boto3.client("s3", endpoint_url=bucket.endpoint)
        self.identity_path = tmp / "identity"
        make_identity(self.identity_path)
        self.work = Path(tempfile.mkdtemp(prefix="cssfs-t-", dir="/tmp"))  # short socket paths
        (self.work / "run").mkdir(mode=0o700)
        self.env = {
            **os.environ, "CSSFS_STRICT": "1",
            "XDG_RUNTIME_DIR": os.fspath(self.work / "run"),
            "XDG_STATE_HOME": os.fspath(tmp / "state"),
            "XDG_CONFIG_HOME": os.fspath(tmp / "config"),
            "PYTHONPATH": os.pathsep.join(filter(None, [os.fspath(REPO),
                                                        os.environ.get("PYTHONPATH")])),
        }
        self.env.pop("NOTIFY_SOCKET", None)
        self.mount = Mount(f"s3://{self.bucket}", tmp / "mnt", self.identity_path,
                           ["--endpoint-url", proxy.endpoint_url, "--path-style",
                            "--list-ttl", "600"], self.work, self.env)
        self.mount.mountpoint.mkdir()

    def keys(self) -> set[str]:
        listed = self.s3.list_objects_v2(Bucket=self.bucket).get("Contents", ())
        return {o["Key"] for o in listed if not _own(o["Key"])}

    def journal_entries(self) -> list[Path]:
        return sorted((self.tmp / "state").glob("cssfs/stores/*/journal/*.json"))

    @contextlib.contextmanager
    def daemon(self, **env: str) -> Iterator[tuple[Mount, Notify]]:
        """Start the daemon with NOTIFY_SOCKET pointing at a Notify; don't wait for anything.
        Afterwards it must have exited (else it is killed and its mount removed)."""
        m = self.mount
        m.runs += 1
        notify_path = self.work / "notify"
        notify_path.unlink(missing_ok=True)
        notify = Notify(notify_path)
        argv = [sys.executable, "-m", "cssfs", "-i", os.fspath(m.identity_path), "mount",
                "--foreground", *m.args, m.store, os.fspath(m.mountpoint)]
        try:
            with open(m.stderr_path, "wb") as err:
                m.proc = subprocess.Popen(
                    argv, env={**self.env, **env, "NOTIFY_SOCKET": os.fspath(notify_path)},
                    stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=REPO)
            yield m, notify
            assert m.proc is None or m.proc.poll() is not None, "the daemon is still running"
        finally:
            notify.close()
            m.kill()


@pytest.fixture
def world(tmp_path: Path, s3_bucket: Any, fault_proxy: Any) -> Iterator[World]:
    w = World(tmp_path, s3_bucket, fault_proxy)
    try:
        yield w
    finally:
        shutil.rmtree(w.work, ignore_errors=True)


def responsive(path: Path, timeout: float = 10.0) -> bool:
    """Whether a stat of ``path`` returns within ``timeout`` (a dead FUSE daemon blocks it)."""
    done = threading.Event()

    def stat() -> None:
        with contextlib.suppress(OSError):
            os.stat(path)
        done.set()

    threading.Thread(target=stat, daemon=True).start()
    return done.wait(timeout)


def exited(m: Mount, timeout: float = 60.0) -> int:
    assert m.proc is not None
    code = m.proc.wait(timeout)
    m.proc = None
    return code


# -- tests ----------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_ready_comes_once_the_mount_answers_with_the_journal_replayed(world: World) -> None:
    """READY=1: at that moment the mount point is mounted and answers, and files left in the
    journal by a killed daemon are already there (queued for upload). WATCHDOG=1 pings when
    $WATCHDOG_USEC asks for them."""
    with world.daemon() as (m, notify):
        notify.until(lambda line: line == "READY=1", m.proc)
        assert os.path.ismount(m.mountpoint)
        m.path("x").mkdir()
        os.listdir(m.path("x"))  # cached: creating files needs no LIST while the store is away
        with world.proxy.outage():
            for name in ("one", "two"):
                m.path("x", name).write_bytes(name.encode())
            assert m.proc is not None
            m.proc.kill()  # SIGKILL: the two files stay in the journal
            exited(m)
    assert len(world.journal_entries()) == 2
    with world.daemon(WATCHDOG_USEC="400000") as (m, notify):
        notify.until(lambda line: line == "READY=1", m.proc)
        # checked before another message is read: the mount answers, the journal is replayed
        assert os.path.ismount(m.mountpoint)
        assert sorted(os.listdir(m.path("x"))) == ["one", "two"]
        assert m.path("x", "two").read_bytes() == b"two"
        assert m.status()["journal"]["pending"] in (1, 2, 0)  # queued, maybe landing already
        assert not any(line.startswith("STOPPING") for line in notify.messages)
        notify.until(lambda line: line == "WATCHDOG=1", m.proc, timeout=10)
        m.sync()
        assert {"x/one", "x/two"} <= world.keys()
        m.stop()


@pytest.mark.timeout(120)
def test_status_reports_the_queue_and_stopping_follows_the_last_upload(world: World) -> None:
    """STATUS= says how many files wait for upload while the store is away. SIGTERM while it
    is still away: the daemon says uploads are failing, unmounts (nothing hangs on the mount
    point) and keeps trying; STOPPING=1 comes only when the store is back and every pending
    file is in the bucket; then the daemon exits 0."""
    with world.daemon() as (m, notify):
        notify.until(lambda line: line == "READY=1", m.proc)
        m.allow(NOISE)
        os.listdir(m.mountpoint)
        with world.proxy.outage():
            for i in range(3):
                m.path(f"f{i}").write_bytes(b"pending %d" % i)
            queue = notify.until(lambda line: line.startswith("STATUS=3 files waiting"), m.proc)
            assert "store unreachable" in notify.until(
                lambda line: line.startswith("STATUS=") and "failing" in line, m.proc)
            assert m.proc is not None
            m.proc.send_signal(signal.SIGTERM)
            notify.until(lambda line: line.startswith("STATUS=stopping"), m.proc)
            deadline = time.monotonic() + 60
            while is_mounted(os.fspath(m.mountpoint)):  # unmounted once the upload failed
                assert time.monotonic() < deadline and m.proc.poll() is None
                time.sleep(0.05)
            assert "uploading before unmounting: " in m.stderr()  # logged before the unmount
            assert responsive(m.mountpoint)
            assert m.proc.poll() is None  # still trying
            assert "STOPPING=1" not in notify.messages
            assert world.keys() == set()
        notify.until(lambda line: line == "STOPPING=1", m.proc)
        assert {"f0", "f1", "f2"} <= world.keys()  # checked at the moment STOPPING=1 came
        assert exited(m) == 0
        assert world.journal_entries() == []
        assert queue


@pytest.mark.timeout(120)
def test_umount_with_the_store_away_keeps_the_journal_for_the_next_mount(world: World) -> None:
    """``cssfs umount`` while the store is away: it unmounts and says uploads are failing; the
    daemon keeps trying and still answers ``cssfs status``. Given up on (two signals), it
    exits 0, says what stays journaled, deletes nothing; the next mount, with the store back,
    uploads everything."""
    with world.daemon() as (m, notify):
        notify.until(lambda line: line == "READY=1", m.proc)
        m.allow(NOISE)
        m.path("before").write_bytes(b"uploaded before the outage")
        m.sync()
        with world.proxy.outage():
            for i in range(2):
                m.path(f"g{i}").write_bytes(b"kept %d" % i)
            done = m.run_cli("umount", os.fspath(m.mountpoint))
            assert done.returncode == 0, done.stderr
            assert "uploads are failing" in done.stderr and done.stderr.count("\n") == 1
            assert not is_mounted(os.fspath(m.mountpoint))
            status = m.status()["journal"]
            assert status["pending"] == 2
            assert m.proc is not None and m.proc.poll() is None
            m.proc.send_signal(signal.SIGTERM)
            m.proc.send_signal(signal.SIGINT)  # a second signal: stop waiting (trio would
            # merge two SIGTERMs sent at once into one)
            assert exited(m) == 0
            assert "2 file(s) not uploaded yet stay in the journal" in m.stderr()
            said = notify.drain()
            assert said[-1] == "STOPPING=1"
            assert "stay in the journal" in said[-2] and said[-2].startswith("STATUS=stopped")
        assert world.keys() == {"before"}
        assert len(world.journal_entries()) == 2
    with world.daemon() as (m, notify):
        notify.until(lambda line: line == "READY=1", m.proc)
        m.sync()
        assert world.keys() == {"before", "g0", "g1"}
        assert m.path("g1").read_bytes() == b"kept 1"
        m.stop()
    assert world.journal_entries() == []
