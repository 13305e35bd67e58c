"""Nothing lost: a closed file survives kill -9 of the daemon, a full journal disk and a damaged
journal entry -- on real mounts of a moto bucket, driven with normal tools (cp, cmp).

The daemon reaches moto through tests.support.faultproxy, so a test can hold every upload (the
proxy refuses connections) or make them fail at random (503s, resets, answers lost after the
object landed) while files are being closed. "Lost" is checked twice: through the next mount
(the journal replayed before READY=1) and in the bucket itself, decrypted here after ``cssfs
sync`` -- the bucket must then hold exactly the files written, byte for byte, and no conflict
copy (an upload that landed before the kill is recognised as ours, not as another writer's).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cssfs.envelope import CHUNK_SIZE
from tests.support.faultworld import World, wait_for
from tests.support.mounting import (
    Mount,
    cmp_files,
    fuse_test_marker,
    make_identity,
    mounted,
    run,
    write_pattern,
)

pytestmark = [*fuse_test_marker(), pytest.mark.s3]

# The daemon logs its failed upload attempts and the replayed journal: expected here.
NOISE = r"WARNING|ERROR|retry|unreachable|failing|journal|attempt"


@pytest.fixture
def world(tmp_path: Path, s3_bucket: Any, fault_proxy: Any) -> World:
    return World(tmp_path, s3_bucket, fault_proxy, cache_size="16M")


def kill_9(m: Mount) -> None:
    """SIGKILL the daemon, then remove its dead mount (lazily, as a user would)."""
    assert m.proc is not None
    m.proc.send_signal(signal.SIGKILL)
    assert m.proc.wait(30) == -signal.SIGKILL
    m.kill()


def journal_dir(state_home: Path) -> Path:
    [found] = list((state_home / "cssfs" / "stores").glob("*/journal"))
    return found


def entries(journal: Path) -> list[str]:
    return sorted(p.stem for p in journal.glob("*.json"))


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


# -- kill -9 --------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_kill_9_while_uploads_are_held_loses_no_closed_file(world: World) -> None:
    """The store refuses every connection while N files are copied in and closed; kill -9;
    the next mount (store back) shows all N byte-identical and uploads them."""
    sizes = {"empty": 0, "one": 1, "chunk-1": CHUNK_SIZE - 1, "chunk+1": CHUNK_SIZE + 1,
             "d/mib": 1024 * 1024 + 7, "d/e/small.txt": 100}
    for seed, (name, size) in enumerate(sizes.items()):
        (world.src / name).parent.mkdir(parents=True, exist_ok=True)
        write_pattern(world.src / name, size, seed)
    state = world.tmp / "state"
    with mounted(f"s3://{world.bucket}", world.tmp / "mnt", world.identity_path,
                 args=world.args(), state_home=state) as m:
        m.allow(NOISE)
        run("mkdir", "-p", m.path("d/e"))  # a folder marker is written at once, not journaled
        os.listdir(m.path("d/e"))  # the listings are cached: creating a file needs no LIST
        with world.proxy.outage():
            for name in sizes:
                run("cp", world.src / name, m.path(name))
            status = m.status()["journal"]
            assert status["pending"] == len(sizes)
            assert status["pending_bytes"] == sum(sizes.values())
            kill_9(m)
        assert world.keys() == {"d/", "d/e/"}  # only the folder markers had reached it
        assert len(entries(journal_dir(state))) == len(sizes)
        m.start()  # replays the journal before READY=1
        for name in sizes:
            cmp_files(world.src / name, m.path(name))
        m.sync()
        assert m.status()["journal"]["pending"] == 0
        assert entries(journal_dir(state)) == []
    stored = world.plaintext()
    assert stored == {name: (world.src / name).read_bytes() for name in sizes}


@pytest.mark.timeout(180)
def test_kill_9_at_random_points_across_50_writes(world: World) -> None:
    """50 writes (new files and overwrites, cp of random sizes) while the store fails 15%
    of requests at random -- 503s, resets, answers lost after the object landed -- so uploads
    are queued, settling, retrying or in flight when the daemon is killed right after a close,
    at four random points. After each kill the next mount must show every file as last
    written; at the end the bucket holds exactly those files and no conflict copy."""
    rng = random.Random(6)
    names = ["a", "b.txt", "c.bin", "d/x", "d/y.txt", "d/e/z", "d/e/w.dat", "f/g"]
    kill_after = set(rng.sample(range(4, 49), 4))
    model: dict[str, bytes] = {}
    world.proxy.kinds = {"503": 1.0, "slowdown": 1.0, "reset": 1.0, "drop": 2.0}
    state = world.tmp / "state"
    kills = 0
    with mounted(f"s3://{world.bucket}", world.tmp / "mnt", world.identity_path,
                 args=world.args(), state_home=state) as m:
        m.allow(NOISE)
        run("mkdir", "-p", m.path("d/e"), m.path("f"))
        # Reads go through the same faults: a rate low enough that no request runs out of the
        # store's six attempts (0.15**6 per request), high enough for dozens of faults.
        world.proxy.rate = 0.15
        for i in range(50):
            name = rng.choice(names)
            size = rng.choice([0, 1, 100, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1,
                               rng.randrange(300_000)])
            data = rng.randbytes(size)
            src = world.src / f"w{i}"
            src.write_bytes(data)
            run("cp", src, m.path(name))  # cp has closed the file when it returns
            model[name] = data
            if i in kill_after:
                pending = m.status()["journal"]["pending"]
                kill_9(m)
                kills += 1
                m.start()
                shown = tree(m.mountpoint)
                assert shown.keys() == model.keys(), f"after write {i} ({pending} pending)"
                for key, want in model.items():
                    assert shown[key] == want, f"{key} differs after the kill at write {i}"
        assert kills == 4
        world.proxy.rate = 0.0
        m.sync()
        status = m.status()["journal"]
        assert status["pending"] == 0
        assert status["conflicts"] == 0, status["conflict_copies"]
    assert world.plaintext() == model  # exactly: no conflict copy, no stale version
    assert world.proxy.injected["drop"] > 0, world.proxy.injected  # lost answers did happen


@pytest.mark.timeout(120)
def test_a_damaged_journal_entry_is_set_aside_and_the_rest_uploaded(world: World) -> None:
    """kill -9 with three files journaled, one entry damaged on disk: the next mount logs it
    once, moves it to journal/broken/, and still serves and uploads the other two."""
    state = world.tmp / "state"
    with mounted(f"s3://{world.bucket}", world.tmp / "mnt", world.identity_path,
                 args=world.args(), state_home=state) as m:
        m.allow(NOISE)
        os.listdir(m.mountpoint)
        with world.proxy.outage():
            for name in ("first", "second", "third"):
                m.path(name).write_bytes(name.encode() * 1000)
            kill_9(m)
        journal = journal_dir(state)
        _, second, _ = entries(journal)
        envelope = journal / f"{second}.env"
        raw = bytearray(envelope.read_bytes())
        raw[100] ^= 0x01  # inside the header: its MAC no longer verifies
        envelope.write_bytes(bytes(raw))
        m.start()
        log = m.stderr()
        assert f"journal: entry {second} is damaged" in log
        assert "moved to" in log and "broken" in log
        assert sorted(p.name for p in (journal / "broken").iterdir()) == [
            f"{second}.env", f"{second}.json"]
        assert m.status()["journal"]["broken"] == 1
        assert m.path("first").read_bytes() == b"first" * 1000
        assert m.path("third").read_bytes() == b"third" * 1000
        m.sync()
    assert world.plaintext() == {"first": b"first" * 1000, "third": b"third" * 1000}


# -- a full journal disk -------------------------------------------------------------------------


@pytest.fixture
def tiny_state(tmp_path: Path) -> Iterator[Path]:
    """XDG_STATE_HOME on a 1 MiB tmpfs (root only)."""
    where = tmp_path / "tiny-state"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs",
                           os.fspath(where)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", os.fspath(where)], capture_output=True, check=False)


@pytest.mark.timeout(120)
def test_full_journal_disk_fails_the_close_and_keeps_the_rest(world: World,
                                                              tiny_state: Path) -> None:
    """The journal's disk fills up: the close of the file that does not fit fails (ENOSPC),
    the mount stays up, the files journaled before are still uploaded, and a later small file
    works again."""
    src = world.src / "big"
    write_pattern(src, 3 * 1024 * 1024, seed=9)  # three times the journal's disk
    with mounted(f"s3://{world.bucket}", world.tmp / "mnt", world.identity_path,
                 args=world.args(), state_home=tiny_state) as m:
        m.allow(NOISE)
        os.listdir(m.mountpoint)
        with world.proxy.outage():  # hold the uploads: the small files stay journaled
            for i in range(3):
                m.path(f"small-{i}").write_bytes(b"small %d\n" % i * 100)
            failed = subprocess.run(["cp", src, m.path("big")], capture_output=True, text=True,
                                    check=False)
            assert failed.returncode != 0
            assert "No space left on device" in failed.stderr, failed.stderr
            assert m.status()["journal"]["pending"] == 3
            assert m.path("small-1").read_bytes() == b"small 1\n" * 100
        # The kernel's release (after close returned) commits the still-dirty file once more
        # and fails the same way (logged like the close); until then the disk may still be full.
        wait_for(lambda: m.stderr().count("No space left on device") >= 2)
        assert not [p for p in tiny_state.rglob("*") if p.name.endswith(".tmp")]
        m.path("after").write_bytes(b"there is room again")
        m.sync()
        assert os.path.ismount(m.mountpoint)
    stored = world.plaintext()
    assert {k: v for k, v in stored.items() if k != "big"} == {
        **{f"small-{i}": b"small %d\n" % i * 100 for i in range(3)},
        "after": b"there is room again"}
    assert "big" not in stored or stored["big"] != src.read_bytes()



# -- two writers ----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_two_mounts_writing_one_file_keep_both_versions(world: World) -> None:
    """Two mounts of one bucket (own journals, own identities, each encrypting for the other).
    The same file changed on both from one base -- one mount's upload held until the other's
    landed -- and a new file created on both at the same moment: every version survives, the
    losing one as a conflict copy, and ``cssfs status`` and the log say so."""
    a_id = world.identity
    b_path = world.tmp / "identity-b"
    b_id = make_identity(b_path)
    direct = ["--endpoint-url", world.endpoint, "--path-style", "--list-ttl", "600"]
    with mounted(f"s3://{world.bucket}", world.tmp / "a", world.identity_path,
                 args=[*world.args(), "-r", b_id.recipient.to_string()],
                 state_home=world.tmp / "state-a") as a:
        a.allow(NOISE)
        a.path("doc.txt").write_bytes(b"base")
        a.sync()
        with mounted(f"s3://{world.bucket}", world.tmp / "b", b_path,
                     args=[*direct, "-r", a_id.recipient.to_string()],
                     state_home=world.tmp / "state-b") as b:
            b.allow(NOISE)
            assert b.path("doc.txt").read_bytes() == b"base"
            with world.proxy.outage():  # a's upload waits until b's has landed
                a.path("doc.txt").write_bytes(b"edited on a")
                b.path("doc.txt").write_bytes(b"edited on b")
                b.sync()
            a.sync()

            barrier = threading.Barrier(2)

            def create(m: Mount, text: bytes) -> None:
                barrier.wait()
                m.path("new.txt").write_bytes(text)

            writers = [threading.Thread(target=create, args=(m, b"new from " + n))
                       for m, n in ((a, b"a"), (b, b"b"))]
            for t in writers:
                t.start()
            for t in writers:
                t.join()
            a.sync()
            b.sync()
            statuses = {"a": a.status()["journal"], "b": b.status()["journal"]}
            logs = a.stderr() + b.stderr()

    copies = {m: s["conflict_copies"] for m, s in statuses.items()}
    assert statuses["a"]["conflicts"] + statuses["b"]["conflicts"] == 2, copies
    doc_copy = [c for _, c in copies["a"] if c.startswith("doc.")]
    assert len(doc_copy) == 1 and ["doc.txt", doc_copy[0]] in copies["a"]
    assert re.fullmatch(r"doc\.conflict-\d{8}-\d{6}-[0-9a-f]{4}\.txt", doc_copy[0])
    [(new_key, new_copy)] = [c for s in copies.values() for c in s if c[0] == "new.txt"]
    for key, copy in (("doc.txt", doc_copy[0]), (new_key, new_copy)):
        assert f"{key} was changed by another writer; keeping ours as {copy}" in logs
    for identity in (a_id, b_id):  # both versions of each, readable by both writers
        stored = world.plaintext(identity)
        assert stored["doc.txt"] == b"edited on b"
        assert stored[doc_copy[0]] == b"edited on a"
        assert {stored["new.txt"], stored[new_copy]} == {b"new from a", b"new from b"}
        assert len(stored) == 4
