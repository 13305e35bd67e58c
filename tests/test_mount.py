"""Real FUSE mounts over a local-folder store, used with normal tools (cp, cmp, rsync, mv, dd...).

One mount serves most steps (mounting costs a second); it is remounted where a cold cache is
the point. The store folder is read directly to check that only ciphertext lands there and to
plant foreign, not-for-us and tampered objects. Large files only where they are the point:
100 MiB for the cost of a small read, 1 GiB (with a small cache) for the daemon's memory.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from cssfs.envelope import CHUNK_SIZE, HEADER_SIZE
from tests.support.mounting import (
    MiB,
    Mount,
    cmp_files,
    cmp_trees,
    fuse_test_marker,
    make_identity,
    make_tree,
    mounted,
    run,
    vm_hwm_kib,
    write_pattern,
)

pytestmark = fuse_test_marker()

CANARY = b"CANARY-mount-plaintext-b7e1: never in the store\n"
TREE = {
    "empty": 0,
    "one": 1,
    "chunk-minus-1": CHUNK_SIZE - 1,
    "chunk": CHUNK_SIZE,
    "sub/chunk-plus-1": CHUNK_SIZE + 1,
    "sub/deeper/five-mib": 5 * MiB,
    "sub/deeper/small.txt": 100,
}


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = tmp / "store"
        self.store.mkdir()
        self.identity_path = tmp / "identity"
        self.identity = make_identity(self.identity_path)
        self.src = tmp / "src"
        self.src.mkdir()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return Env(tmp_path_factory.mktemp("mount"))


@pytest.fixture(scope="module")
def mnt(env: Env) -> Iterator[Mount]:
    # A long listing TTL, so "a cached re-read makes no store request" can count every request;
    # steps that plant objects behind the mount's back use folders it has not listed yet.
    with mounted(os.fspath(env.store), env.tmp / "mnt", env.identity_path,
                 args=["--cache-size", "64M", "--list-ttl", "30"]) as m:
        yield m


def _store_files(env: Env) -> dict[str, bytes]:
    out = {}
    for path in env.store.rglob("*"):
        if path.is_file() and ".cssfs-tmp" not in path.parts:
            out[path.relative_to(env.store).as_posix()] = path.read_bytes()
    return out


def _requests(m: Mount) -> dict[str, int]:
    return dict(m.status()["store_requests"])


# -- copying, comparing, remounting ---------------------------------------------------------------


def test_copy_tree_compare_remount_compare(env: Env, mnt: Mount) -> None:
    src = env.src / "tree"
    make_tree(src, TREE)
    (src / "canary.txt").write_bytes(CANARY * 100)
    run("cp", "-r", src, mnt.path("tree"))
    cmp_trees(src, mnt.path("tree"))
    # ls -l and du show exact plaintext sizes
    listing = run("ls", "-l", mnt.path("tree")).stdout
    sizes = {line.split()[-1]: int(line.split()[4]) for line in listing.splitlines()[1:]}
    assert sizes["chunk-minus-1"] == CHUNK_SIZE - 1
    assert sizes["empty"] == 0
    du = run("du", "-sb", mnt.path("tree")).stdout.split()[0]
    assert int(du) == sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) + sum(
        mnt.path("tree", p.relative_to(src)).stat().st_size
        for p in src.rglob("*") if p.is_dir()) + mnt.path("tree").stat().st_size
    found = run("find", mnt.path("tree"), "-type", "f").stdout.split()
    assert sorted(Path(f).relative_to(mnt.path("tree")).as_posix() for f in found) == sorted(
        [*TREE, "canary.txt"])
    mnt.sync()
    files = _store_files(env)
    assert "tree/sub/deeper/five-mib" in files
    assert not any(CANARY[:20] in data for data in files.values())
    mnt.remount()  # cold cache
    assert mnt.status()["cache"]["hits"] == 0
    cmp_trees(src, mnt.path("tree"))
    assert mnt.status()["store_requests"]["get"] > 0


def test_cached_reread_makes_no_store_request(env: Env, mnt: Mount) -> None:
    write_pattern(env.src / "reread", 3 * MiB + 5, seed=7)
    run("cp", env.src / "reread", mnt.path("reread"))
    mnt.sync()
    cmp_files(env.src / "reread", mnt.path("reread"))  # fills the chunk cache
    cmp_files(env.src / "reread", mnt.path("reread"))
    before = _requests(mnt)
    cmp_files(env.src / "reread", mnt.path("reread"))
    assert _requests(mnt) == before


def test_small_read_in_100_mib_fetches_at_most_two_chunks(env: Env, mnt: Mount) -> None:
    src = env.src / "hundred"
    write_pattern(src, 100 * MiB, seed=100)
    run("cp", src, mnt.path("hundred"))
    mnt.sync()
    expected = src.read_bytes()
    offset = 50 * MiB + 1000
    before = mnt.status()
    fd = os.open(mnt.path("hundred"), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead
        assert os.pread(fd, 4096, offset) == expected[offset : offset + 4096]
    finally:
        os.close(fd)
    after = mnt.status()
    table = (100 * MiB // CHUNK_SIZE) * 32 + 64  # the chunk table, with room for its framing
    down = after["bytes_down"] - before["bytes_down"]
    assert down <= HEADER_SIZE + table + 2 * (CHUNK_SIZE + 16), down
    # a second reader of the same range is served by the chunk cache
    fd = os.open(mnt.path("hundred"), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        assert os.pread(fd, 4096, offset) == expected[offset : offset + 4096]
    finally:
        os.close(fd)
    assert mnt.status()["bytes_down"] == after["bytes_down"]
    # tail -c and dd skip= read the ends and the middle
    tail_bytes = subprocess.run(["tail", "-c", "1000", mnt.path("hundred")], capture_output=True,
                                check=True).stdout
    assert tail_bytes == expected[-1000:]
    dd = subprocess.run(["dd", f"if={mnt.path('hundred')}", "bs=4096", "skip=2000", "count=3",
                         "status=none"], capture_output=True, check=True).stdout
    assert dd == expected[2000 * 4096 : 2003 * 4096]


def test_two_readers_at_once(env: Env, mnt: Mount) -> None:
    src = env.src / "two"
    write_pattern(src, 7 * MiB + 3, seed=2)
    run("cp", src, mnt.path("two"))
    mnt.remount()
    procs = [subprocess.Popen(["cat", mnt.path("two")], stdout=subprocess.PIPE)
             for _ in range(2)]
    outputs: list[bytes] = [b"", b""]

    def drain(i: int) -> None:
        assert procs[i].stdout is not None
        outputs[i] = procs[i].stdout.read()

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        assert p.wait() == 0
    data = src.read_bytes()
    assert outputs == [data, data]


# -- changing the tree ----------------------------------------------------------------------------


def test_mkdir_mv_rm_rmdir_and_folder_rename(env: Env, mnt: Mount) -> None:
    run("mkdir", "-p", mnt.path("ops/a/b/c"))
    (mnt.path("ops/a/b/c/f.txt")).write_bytes(b"f")
    (mnt.path("ops/a/g.txt")).write_bytes(b"g")
    run("mv", mnt.path("ops/a/g.txt"), mnt.path("ops/a/b/h.txt"))
    assert not mnt.path("ops/a/g.txt").exists()
    assert mnt.path("ops/a/b/h.txt").read_bytes() == b"g"
    mnt.sync()
    run("mv", mnt.path("ops/a"), mnt.path("ops/renamed"))  # a folder: object by object
    assert sorted(os.listdir(mnt.path("ops"))) == ["renamed"]
    assert mnt.path("ops/renamed/b/c/f.txt").read_bytes() == b"f"
    assert mnt.path("ops/renamed/b/h.txt").read_bytes() == b"g"
    with pytest.raises(OSError) as err:
        os.rmdir(mnt.path("ops/renamed/b/c"))
    assert err.value.errno == errno.ENOTEMPTY
    os.unlink(mnt.path("ops/renamed/b/c/f.txt"))
    os.rmdir(mnt.path("ops/renamed/b/c"))
    run("mkdir", "-p", mnt.path("ops/renamed/empty"))
    mnt.sync()
    files = _store_files(env)
    assert not any(k.startswith("ops/a/") for k in files)
    assert "ops/renamed/b/h.txt" in files
    run("rm", "-r", mnt.path("ops"))
    assert not mnt.path("ops").exists()
    mnt.sync()
    assert not any(k.startswith("ops/") for k in _store_files(env))
    assert not (env.store / "ops").exists() or not any((env.store / "ops").rglob("*"))


def test_rsync_twice_transfers_nothing_the_second_time(env: Env, mnt: Mount) -> None:
    src = env.src / "rs"
    make_tree(src, {"a": 10, "b/c": 70_000, "b/d": 0, "e/f/g": 123_456})
    os.utime(src / "a", ns=(1_000_000_000_123_456_789, 1_000_000_000_123_456_789))
    run("rsync", "-a", f"{src}/", f"{mnt.path('rs')}/")
    cmp_trees(src, mnt.path("rs"))
    assert mnt.path("rs/a").stat().st_mtime_ns == 1_000_000_000_123_456_789
    second = run("rsync", "-a", "--stats", "--itemize-changes", f"{src}/", f"{mnt.path('rs')}/")
    assert "Number of regular files transferred: 0" in second.stdout
    # Folders keep no times of their own (docs/MOUNT.md): only folder lines may show up.
    changed = [ln for ln in second.stdout.splitlines() if ln[:2] in (">f", "<f", "cf", "cd")]
    assert changed == []
    mnt.sync()
    mnt.remount()  # the times come from the headers in the store now
    third = run("rsync", "-a", "--stats", f"{src}/", f"{mnt.path('rs')}/")
    assert "Number of regular files transferred: 0" in third.stdout


def test_python_seek_read_append_truncate(env: Env, mnt: Mount) -> None:
    path = mnt.path("py.bin")
    data = bytearray(os.urandom(300_000))
    path.write_bytes(data)
    with open(path, "r+b") as f:
        f.seek(70_000)
        assert f.read(10) == data[70_000:70_010]
        f.seek(100_000)
        f.write(b"X" * 10)
        data[100_000:100_010] = b"X" * 10
    with open(path, "ab") as f:
        f.write(b"tail")
    data += b"tail"
    os.truncate(path, 200_000)
    del data[200_000:]
    with open(path, "r+b") as f:
        f.truncate(150_000)
        del data[150_000:]
        f.seek(0, os.SEEK_END)
        f.write(b"end")
        data += b"end"
    assert path.read_bytes() == data
    with open(path, "w") as f:  # O_TRUNC
        f.write("short")
    assert path.read_bytes() == b"short"
    mnt.sync()
    assert path.read_bytes() == b"short"


def test_extended_attributes(env: Env, mnt: Mount) -> None:
    path = mnt.path("x.txt")
    path.write_bytes(b"attrs")
    mnt.sync()
    out = run("getfattr", "-d", "-m", "user.cssfs", path).stdout
    assert "user.cssfs.signature=\"valid\"" in out
    assert "user.cssfs.writer=" in out
    assert env.identity.recipient.key_id.hex() in os.getxattr(
        path, "user.cssfs.recipients").decode()
    assert os.getxattr(path, "user.cssfs.writer").decode() == env.identity.recipient.fingerprint


# -- what cannot be read --------------------------------------------------------------------------


def _put_envelope_for_someone_else(env: Env, key: str, data: bytes) -> None:
    from cssfs.encstore import EncryptedStore
    from cssfs.keys import Identity
    from cssfs.store.local import LocalStore

    async def main() -> None:
        store = LocalStore(env.store)
        try:
            await EncryptedStore(store, Identity.generate()).put(key, data)
        finally:
            await store.aclose()

    trio.run(main)


def test_not_for_us_foreign_and_tampered(env: Env, mnt: Mount) -> None:
    mnt.allow(r"WARNING .*(alien/tampered|chunk)")
    mnt.path("alien").mkdir()  # this mount now believes it empty for its listing TTL
    src = env.src / "tampered"
    write_pattern(src, 3 * CHUNK_SIZE, seed=9)
    run("cp", src, mnt.path("tampered"))
    mnt.sync()
    run("mv", mnt.path("tampered"), mnt.path("alien/tampered"))
    mnt.sync()
    _put_envelope_for_someone_else(env, "alien/theirs", CANARY)
    (env.store / "alien" / "raw.bin").write_bytes(b"not an envelope")
    obj = env.store / "alien" / "tampered"
    raw = bytearray(obj.read_bytes())
    raw[HEADER_SIZE + CHUNK_SIZE + 16 + 100] ^= 0x01  # inside chunk 1
    obj.write_bytes(raw)

    # What another client put there is seen by a mount that lists the folder afresh.
    with mounted(os.fspath(env.store), env.tmp / "mnt-fresh", env.identity_path) as fresh:
        fresh.allow(r"WARNING .*(alien/tampered|chunk)")
        names = sorted(os.listdir(fresh.path("alien")))
        assert names == ["raw.bin", "tampered", "theirs"]
        assert fresh.path("alien/theirs").stat().st_size == len(CANARY)
        with pytest.raises(PermissionError):
            fresh.path("alien/theirs").read_bytes()
        assert fresh.path("alien/raw.bin").stat().st_size == len(b"not an envelope")
        with pytest.raises(PermissionError):
            fresh.path("alien/raw.bin").read_bytes()
        with pytest.raises(OSError) as err:
            fresh.path("alien/tampered").read_bytes()
        assert err.value.errno == errno.EIO
        with open(fresh.path("alien/tampered"), "rb") as f:  # chunk 0 is still fine
            assert f.read(1000) == src.read_bytes()[:1000]
        assert "alien/tampered" in fresh.stderr()  # one log line names the object
        assert CANARY.decode() not in fresh.stderr()


# -- the daemon's life ----------------------------------------------------------------------------


def test_memory_while_copying_1_gib(env: Env) -> None:
    store = env.tmp / "store-big"
    store.mkdir()
    cache_mib = 16
    with mounted(os.fspath(store), env.tmp / "mnt-big", env.identity_path,
                 args=["--cache-size", f"{cache_mib}M"]) as m:
        run("dd", "if=/dev/zero", f"of={m.path('gig')}", "bs=1M", "count=1024", "status=none")
        m.sync()
        assert m.path("gig").stat().st_size == 1024 * MiB
        fd = os.open(m.path("gig"), os.O_RDONLY)
        try:
            assert os.pread(fd, 100, 700 * MiB) == bytes(100)
        finally:
            os.close(fd)
        peak_mib = vm_hwm_kib(m.pid) / 1024
        assert peak_mib < cache_mib + 128, peak_mib


def _gone(pid: int) -> bool:
    """The process has exited (a zombie counts: whoever adopted it may not have reaped it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def test_cli_detach_status_sync_umount(env: Env, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    runtime = Path(tempfile.mkdtemp(prefix="cssfs-t-", dir="/tmp"))  # short socket paths
    cli_env = {**os.environ, "XDG_RUNTIME_DIR": os.fspath(runtime),
               "XDG_STATE_HOME": os.fspath(tmp_path / "state"),
               "XDG_CONFIG_HOME": os.fspath(tmp_path / "config"), "CSSFS_STRICT": "1"}
    cli_env.pop("NOTIFY_SOCKET", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cssfs", *args], env=cli_env,
                              capture_output=True, text=True, timeout=120, check=False)

    result = cli("-i", os.fspath(env.identity_path), "mount", os.fspath(store),
                 os.fspath(mountpoint))
    try:
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert os.path.ismount(mountpoint)
        (mountpoint / "f").write_bytes(b"detached")
        status = cli("status", os.fspath(mountpoint))
        assert status.returncode == 0, status.stderr
        info = json.loads(status.stdout)
        assert info["mountpoint"] == os.fspath(mountpoint)
        pid = info["pid"]
        assert cli("sync", os.fspath(mountpoint)).returncode == 0
        assert cli("status").stdout.count("\n") == 1
        again = cli("-i", os.fspath(env.identity_path), "mount", os.fspath(store),
                    os.fspath(mountpoint))
        assert again.returncode != 0
        assert "already a mount point" in again.stderr
        done = cli("umount", os.fspath(mountpoint))
        assert done.returncode == 0, done.stderr
        assert not os.path.ismount(mountpoint)
        assert _gone(pid)
        assert (store / "f").is_file()
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", os.fspath(mountpoint)], check=False)
    bad = cli("-i", os.fspath(env.identity_path), "mount", os.fspath(tmp_path / "nowhere"),
              os.fspath(mountpoint))
    assert bad.returncode != 0
    assert bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr


def test_unmount_and_sigterm_upload_pending_files_first(env: Env, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    with mounted(os.fspath(store), tmp_path / "mnt", env.identity_path) as m:
        m.path("by-unmount").write_bytes(b"pending at unmount")
        m.stop()  # fusermount3 -u at once: the daemon uploads before it exits
        assert (store / "by-unmount").is_file()
        m.start()
        m.path("by-sigterm").write_bytes(b"pending at SIGTERM")
        assert m.proc is not None
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(60) == 0
        assert not os.path.ismount(m.mountpoint)
        m.proc = None
        assert (store / "by-sigterm").is_file()
        assert m.unexpected_stderr() == []


def test_closed_file_survives_kill_9(env: Env, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    state = tmp_path / "state"
    with mounted(os.fspath(store), tmp_path / "mnt", env.identity_path,
                 state_home=state) as m:
        m.path("durable").write_bytes(b"closed, then kill -9")
        assert m.proc is not None
        m.proc.kill()
        m.proc.wait()
        m.kill()  # lazy unmount of the dead mount
        m.start()  # the journal replays
        assert m.path("durable").read_bytes() == b"closed, then kill -9"
        m.sync()
        assert (store / "durable").is_file()


def test_one_daemon_per_store_and_journal(env: Env, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    state = tmp_path / "state"
    with mounted(os.fspath(store), tmp_path / "mnt", env.identity_path, state_home=state) as m:
        (tmp_path / "mnt2").mkdir()
        second = m.run_cli("-i", os.fspath(env.identity_path), "mount", "--foreground",
                           os.fspath(store), os.fspath(tmp_path / "mnt2"))
        assert second.returncode == 22, second.stderr
        assert "already mounted by another cssfs daemon" in second.stderr
        assert second.stderr.count("\n") == 1
        assert not os.path.ismount(tmp_path / "mnt2")


def test_read_only_mount(env: Env, mnt: Mount, tmp_path: Path) -> None:
    mnt.path("ro-visible.txt").write_bytes(b"written before")
    mnt.sync()
    with mounted(os.fspath(env.store), tmp_path / "ro", env.identity_path,
                 args=["--read-only"]) as ro:
        assert ro.path("ro-visible.txt").read_bytes() == b"written before"
        with pytest.raises(OSError) as err:
            ro.path("new.txt").write_bytes(b"x")
        assert err.value.errno == errno.EROFS
        with pytest.raises(OSError) as err:
            ro.path("sub").mkdir()
        assert err.value.errno == errno.EROFS
        options = next(line.split()[3] for line in Path("/proc/self/mounts").read_text()
                       .splitlines() if line.split()[1] == os.fspath(ro.mountpoint))
        assert "ro" in options.split(",")
