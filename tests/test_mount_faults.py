"""A real mount of a moto bucket behind a fault-injecting proxy (tests.support.faultproxy).

What must hold (issue "Nothing lost", Faults): under refusals, resets, 503s, lost answers and
stalls a write workload completes byte-identical once the faults stop; while the store is away,
cached files stay readable, uncached reads fail with EIO after a bounded wait (never hang),
and closing files keeps working (the journal holds them; a folder's recipients are added before
the upload); ``cssfs status`` shows the upload queue, failures and their reasons, the cache and
the traffic, and ``cssfs sync`` returns only once nothing is pending. Every test is guarded by a
pytest-timeout: a hang fails it.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cssfs.envelope import CHUNK_SIZE, envelope_size
from tests.support.faultworld import World as FaultWorld
from tests.support.faultworld import wait_for
from tests.support.mounting import (
    REPO,
    MiB,
    Mount,
    cmp_files,
    cmp_trees,
    fuse_test_marker,
    make_tree,
    mounted,
    run,
    write_pattern,
)

pytestmark = [*fuse_test_marker(), pytest.mark.s3]

NOISE = r"WARNING|ERROR|retry|unreachable|failing|journal|attempt"
#: How long an uncached read may take to fail while the store refuses connections: the store's
#: retry budget (6 attempts, jittered back-off of at most 8 s in all) plus slack for a busy box.
UNCACHED_READ_BOUND_S = 30.0


class World(FaultWorld):
    def mount(self, *extra: str, name: str = "mnt") -> Any:
        return mounted(f"s3://{self.bucket}", self.tmp / name, self.identity_path,
                       args=self.args(*extra), state_home=self.tmp / f"state-{name}")


@pytest.fixture
def world(tmp_path: Path, s3_bucket: Any, fault_proxy: Any) -> World:
    return World(tmp_path, s3_bucket, fault_proxy, cache_size="32M")


def _put_of(key: str) -> Callable[[str, str], bool]:
    def match(method: str, target: str) -> bool:
        return method == "PUT" and target.partition("?")[0].endswith("/" + key)

    return match


def cli_status(m: Mount) -> dict[str, Any]:
    done = m.run_cli("status", os.fspath(m.mountpoint))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    status: dict[str, Any] = json.loads(done.stdout)
    return status


@pytest.mark.timeout(150)
def test_write_workload_through_random_faults_is_byte_identical(world: World) -> None:
    """cp -r of a tree (one file big enough for a multipart upload) while 20% of requests fail
    (every fault kind, stalls included); a cached file is read meanwhile. Once the faults stop,
    sync; the mount, a cold remount and the bucket all hold exactly the tree."""
    src = world.src / "tree"
    make_tree(src, {"empty": 0, "one": 1, "a/chunk-1": CHUNK_SIZE - 1, "a/chunk": CHUNK_SIZE,
                    "a/b/chunk+1": CHUNK_SIZE + 1, "a/b/c/nine-mib": 9 * MiB,
                    **{f"many/{i:02d}": 1000 * i for i in range(24)}})
    cached = world.src / "cached"
    write_pattern(cached, 3 * CHUNK_SIZE + 5, seed=42)
    with world.mount() as m:
        m.allow(NOISE)
        run("cp", cached, m.path("cached"))
        m.sync()
        cmp_files(cached, m.path("cached"))  # now in the chunk cache
        world.proxy.stall_seconds = 1.0
        # Every kind at least once, each on the upload of its own file (the journal retries
        # an upload for as long as it takes; a synchronous request such as mkdir's fails once
        # the store's six attempts are spent)...
        for i, kind in enumerate(("500", "503", "slowdown", "reset", "stall", "drop")):
            world.proxy.inject(kind, match=_put_of(f"tree/many/{i:02d}"))
        world.proxy.rate = 0.2  # ...and a fifth of all requests at random
        copy = subprocess.Popen(["cp", "-r", os.fspath(src), os.fspath(m.path("tree"))],
                                stderr=subprocess.PIPE, text=True)
        try:
            while copy.poll() is None:
                cmp_files(cached, m.path("cached"))
        finally:
            _, err = copy.communicate(timeout=120)
        assert copy.returncode == 0, err
        cmp_trees(src, m.path("tree"))
        # the uploads run into the faults too; the store's retries see most of them through
        while m.status()["journal"]["pending"] and world.proxy.requests < 150:
            cmp_files(cached, m.path("cached"))
        world.proxy.rate = 0.0
        m.sync()
        status = m.status()["journal"]
        assert status["pending"] == 0 and status["failures"] == {}
        assert status["conflicts"] == 0, status["conflict_copies"]
        injected = dict(world.proxy.injected)
        m.remount()  # a cold cache: everything comes from the bucket
        cmp_trees(src, m.path("tree"))
    stored = world.plaintext()
    want = {f"tree/{p.relative_to(src).as_posix()}": p.read_bytes()
            for p in src.rglob("*") if p.is_file()}
    assert stored == {**want, "cached": cached.read_bytes()}
    # The six forced faults plus at least two of the random ones (~40 requests at 20%).
    assert sum(injected.values()) >= 8, injected
    assert set(injected) == {"500", "503", "slowdown", "reset", "stall", "drop"}, injected


@pytest.mark.timeout(150)
def test_outage_cached_reads_work_uncached_fail_fast_and_closes_are_kept(world: World,
                                                                         tmp_path: Path) -> None:
    """The store refuses connections: a file read before reads again; one never read fails
    with EIO within a bound (and so does one never even looked at); closing new files works,
    and once the store is back they are uploaded -- encrypted for the mount's --recipient too,
    although the folder's recipients could not be looked up when they were closed."""
    from cssfs.keys import Identity

    other = Identity.generate()
    # "cached" sorts after the others: opening a folder's first file opens the next ones ahead
    # (fs.FOLDER_READAHEAD_FIRST), which would leave "seen" and "unseen" cached too.
    seen, unseen, cached = world.src / "seen", world.src / "unseen", world.src / "was-read"
    for seed, path in enumerate((seen, unseen, cached)):
        write_pattern(path, 5 * CHUNK_SIZE + 3, seed=seed)
    with world.mount("--recipient", other.recipient.to_string()) as m:
        m.allow(NOISE)
        m.path("d").mkdir()
        for path in (seen, unseen, cached):
            run("cp", path, m.path("d", path.name))
        m.sync()
        m.remount()  # a cold chunk cache
        assert sorted(os.listdir(m.path("d"))) == ["seen", "unseen", "was-read"]
        cmp_files(cached, m.path("d/was-read"))
        assert m.path("d/seen").stat().st_size == seen.stat().st_size  # header read, no chunk
        with world.proxy.outage():
            started = time.monotonic()
            cmp_files(cached, m.path("d/was-read"))
            assert time.monotonic() - started < 5.0
            errors: dict[str, tuple[float, OSError | None]] = {}

            def read(name: str) -> None:
                started = time.monotonic()
                try:
                    m.path("d", name).read_bytes()
                except OSError as exc:
                    errors[name] = (time.monotonic() - started, exc)
                else:
                    errors[name] = (time.monotonic() - started, None)

            readers = [threading.Thread(target=read, args=(n,)) for n in ("seen", "unseen")]
            for t in readers:
                t.start()
            for i in range(3):
                m.path(f"d/during-{i}").write_bytes(b"closed during the outage %d" % i)
            assert m.path("d/during-1").read_bytes() == b"closed during the outage 1"
            names = sorted(os.listdir(m.path("d")))
            assert names[:3] == ["during-0", "during-1", "during-2"] and "was-read" in names
            for t in readers:
                t.join(UNCACHED_READ_BOUND_S)
            for name in ("seen", "unseen"):
                took, exc = errors[name]
                assert exc is not None and exc.errno == errno.EIO, (name, exc)
                assert took < UNCACHED_READ_BOUND_S, name
        m.sync()
        cmp_files(seen, m.path("d/seen"))
    theirs = world.plaintext(other)
    for i in range(3):
        assert theirs[f"d/during-{i}"] == b"closed during the outage %d" % i


@pytest.mark.timeout(150)
def test_status_fields_and_sync_waits_for_uploads_in_flight(world: World) -> None:
    """``cssfs status`` while uploads are held: pending count and bytes; while one stalls: in
    flight, with ``cssfs sync`` still waiting; while the store refuses: the failure and its
    reason. Afterwards: the cache's size and hit rate, bytes up and down."""
    sizes = {"s1": 10_000, "s2": CHUNK_SIZE + 1, "s3": 200_000}
    for seed, (name, size) in enumerate(sizes.items()):
        write_pattern(world.src / name, size, seed)
    with world.mount() as m:
        m.allow(NOISE)
        first = cli_status(m)
        assert first["mountpoint"] == os.fspath(m.mountpoint)
        assert first["journal"]["pending"] == 0 and first["journal"]["in_flight"] == 0
        assert first["bytes_up"] == 0
        os.listdir(m.mountpoint)  # cached: creating a file needs no LIST

        # held: the store refuses connections
        with world.proxy.outage():
            for name in sizes:
                run("cp", world.src / name, m.path(name))
            held = cli_status(m)["journal"]
            assert held["pending"] == len(sizes)
            assert held["pending_bytes"] == sum(sizes.values())
            failing = wait_for(lambda: m.status()["journal"]["failures"],
                               what="a failure in status")
            assert set(failing) <= set(sizes)
            assert all("StoreUnavailableError" in why for why in failing.values()), failing

        # The store is back: the held files land. (Not under the stalls below: an upload
        # attempt that began in the outage may still be spending its retries, and one that
        # gives up makes `cssfs sync` report it -- as it should.)
        m.sync()
        assert set(sizes) <= world.keys()

        # in flight: every PUT stalls for a while before the store answers
        world.proxy.stall_seconds = 3.0
        world.proxy.inject("stall", count=len(sizes), match=lambda method, _: method == "PUT")
        for name in sizes:
            run("cp", world.src / name, m.path(name + ".again"))
        sync = subprocess.Popen([sys.executable, "-m", "cssfs", "sync", os.fspath(m.mountpoint)],
                                env=m.env, cwd=REPO, stderr=subprocess.PIPE, text=True)
        try:
            flying = wait_for(lambda: m.status()["journal"]["in_flight"] > 0,
                              what="an upload in flight")
            assert flying
            assert sync.poll() is None, "sync returned while an upload was in flight"
        finally:
            _, err = sync.communicate(timeout=120)
        assert sync.returncode == 0, err
        done = cli_status(m)
        assert done["journal"]["pending"] == 0 and done["journal"]["in_flight"] == 0
        assert done["journal"]["failures"] == {}
        assert {name + ".again" for name in sizes} <= world.keys()
        assert done["bytes_up"] >= 2 * sum(envelope_size(n) for n in sizes.values())

        m.remount()
        want = (world.src / "s3").read_bytes()
        for _ in range(2):
            with open(m.path("s3"), "rb") as f:
                assert f.read() == want
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # not the kernel's
        after = cli_status(m)
        cache = after["cache"]
        assert 0 < cache["bytes"] <= cache["max_bytes"] == 32 * MiB
        assert cache["hits"] > 0 and cache["misses"] > 0
        assert 0 < cache["hit_rate"] < 1
        assert after["bytes_down"] >= sizes["s3"]
