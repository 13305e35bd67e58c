"""Real FUSE mounts of an S3 bucket (moto's server over HTTP on 127.0.0.1).

The daemon finds the endpoint in ``AWS_ENDPOINT_URL_S3``, as a user's environment would give
it. The bucket is read raw with boto3: it must hold only ciphertext. Another client (an
EncryptedStore in this process, another identity or the same one) changes the bucket behind the
mount's back; its changes must show after the listing TTL.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from cssfs.envelope import CHUNK_SIZE, HEADER_SIZE, parse_header
from tests.support.mounting import (
    MiB,
    Mount,
    cmp_trees,
    fuse_test_marker,
    make_identity,
    make_tree,
    mounted,
    run,
    write_pattern,
)

pytestmark = [*fuse_test_marker(), pytest.mark.s3]

CANARY = b"CANARY-s3-mount-2c9d: this must never reach the bucket\n"
LIST_TTL = 1.0


class World:
    def __init__(self, tmp: Path, endpoint: str, bucket: str) -> None:
        import boto3

        self.tmp = tmp
        self.endpoint = endpoint
        self.bucket = bucket
        self.s3 = boto3.client("s3", endpoint_url=endpoint)
        self.identity_path = tmp / "identity"
        self.identity = make_identity(self.identity_path)
        self.src = tmp / "src"
        self.src.mkdir()

    def objects(self) -> dict[str, bytes]:
        out = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for item in page.get("Contents", ()):
                body = self.s3.get_object(Bucket=self.bucket, Key=item["Key"])["Body"]
                out[item["Key"]] = body.read()
        return out

    def other_client(self, work: Any, identity: Any = None) -> Any:
        """Run ``work(encstore)`` as another client of the bucket."""
        from cssfs.encstore import EncryptedStore
        from cssfs.keys import Identity
        from cssfs.store.url import open_store

        async def main() -> Any:
            store = open_store(f"s3://{self.bucket}", endpoint_url=self.endpoint,
                               path_style=True)
            try:
                return await work(EncryptedStore(store, identity or Identity.generate()))
            finally:
                await store.aclose()

        return trio.run(main)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, s3_server: Any) -> Iterator[World]:
    bucket = f"t-mount-{uuid.uuid4().hex[:12]}"
    w = World(tmp_path_factory.mktemp("mount-s3"), s3_server.endpoint_url, bucket)
    w.s3.create_bucket(Bucket=bucket)
    yield w


@pytest.fixture(scope="module")
def mnt(world: World) -> Iterator[Mount]:
    env = {"AWS_ENDPOINT_URL_S3": world.endpoint}
    with mounted(f"s3://{world.bucket}", world.tmp / "mnt", world.identity_path,
                 args=["--cache-size", "32M", "--list-ttl", str(LIST_TTL)], env=env) as m:
        yield m


def test_copy_tree_compare_remount_compare(world: World, mnt: Mount) -> None:
    src = world.src / "tree"
    make_tree(src, {"empty": 0, "one": 1, "a/chunk-1": CHUNK_SIZE - 1, "a/chunk": CHUNK_SIZE,
                    "a/b/chunk+1": CHUNK_SIZE + 1, "a/b/five-mib": 5 * MiB})
    (src / "canary.txt").write_bytes(CANARY * 50)
    run("cp", "-r", src, mnt.path("tree"))
    cmp_trees(src, mnt.path("tree"))
    mnt.sync()
    objects = world.objects()
    assert "tree/a/b/five-mib" in objects
    assert not any(CANARY[:20] in data for data in objects.values())
    for key, data in objects.items():  # only envelopes (and empty folder markers)
        if key.endswith("/"):
            assert data == b""
        elif ".cssfs-" not in key:
            parse_header(data[:HEADER_SIZE])
    mnt.remount()
    cmp_trees(src, mnt.path("tree"))
    assert mnt.status()["store_requests"]["get"] > 0


def test_rsync_twice_and_folder_rename(world: World, mnt: Mount) -> None:
    src = world.src / "rs"
    make_tree(src, {"x": 5, "d/y": 80_000, "d/e/z": 0})
    run("rsync", "-a", f"{src}/", f"{mnt.path('rs')}/")
    second = run("rsync", "-a", "--stats", f"{src}/", f"{mnt.path('rs')}/")
    assert "Number of regular files transferred: 0" in second.stdout
    mnt.sync()
    run("mv", mnt.path("rs"), mnt.path("rs-moved"))  # server-side, object by object
    cmp_trees(src, mnt.path("rs-moved"))
    mnt.sync()
    keys = set(world.objects())
    assert not any(k.startswith("rs/") for k in keys)
    assert "rs-moved/d/y" in keys
    third = run("rsync", "-a", "--stats", f"{src}/", f"{mnt.path('rs-moved')}/")
    assert "Number of regular files transferred: 0" in third.stdout


def test_small_read_in_100_mib(world: World, mnt: Mount) -> None:
    src = world.src / "hundred"
    write_pattern(src, 100 * MiB, seed=5)
    run("dd", f"if={src}", f"of={mnt.path('hundred')}", "bs=1M", "status=none")
    mnt.sync()
    offset = 70 * MiB + 12345
    with open(src, "rb") as f:
        f.seek(offset)
        expected = f.read(4096)
    before = mnt.status()
    fd = os.open(mnt.path("hundred"), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        assert os.pread(fd, 4096, offset) == expected
    finally:
        os.close(fd)
    after = mnt.status()
    table = (100 * MiB // CHUNK_SIZE) * 32 + 64
    down = after["bytes_down"] - before["bytes_down"]
    assert down <= HEADER_SIZE + table + 2 * (CHUNK_SIZE + 16), down


def test_other_clients_changes_show_after_the_ttl(world: World, mnt: Mount) -> None:
    mnt.path("shared").mkdir()
    assert os.listdir(mnt.path("shared")) == []

    async def write(encstore: Any) -> None:
        await encstore.put("shared/from-other", b"hello from the other client")

    from cssfs.keys import parse_identity_file

    me = parse_identity_file(world.identity_path.read_bytes(), None)  # me, on another machine
    world.other_client(write, identity=me)
    deadline = time.monotonic() + 10 * LIST_TTL
    while "from-other" not in os.listdir(mnt.path("shared")):
        assert time.monotonic() < deadline, "another client's file never showed up"
        time.sleep(LIST_TTL / 4)  # waiting for the TTL to pass is the point here
    assert mnt.path("shared/from-other").read_bytes() == b"hello from the other client"


def test_not_for_us_and_tampered(world: World, mnt: Mount) -> None:
    mnt.allow(r"WARNING .*(bad/tampered|chunk)")
    mnt.path("bad").mkdir()

    async def theirs(encstore: Any) -> None:
        await encstore.put("bad/theirs", CANARY)

    world.other_client(theirs)
    src = world.src / "tampered"
    write_pattern(src, 3 * CHUNK_SIZE, seed=3)
    run("cp", src, mnt.path("bad/tampered"))
    mnt.sync()
    raw = bytearray(world.s3.get_object(Bucket=world.bucket, Key="bad/tampered")["Body"].read())
    raw[HEADER_SIZE + 2 * (CHUNK_SIZE + 16) + 7] ^= 0x80  # inside chunk 2
    world.s3.put_object(Bucket=world.bucket, Key="bad/tampered", Body=bytes(raw))
    mnt.remount()  # forget the version we wrote
    assert sorted(os.listdir(mnt.path("bad"))) == ["tampered", "theirs"]
    with pytest.raises(PermissionError):
        mnt.path("bad/theirs").read_bytes()
    with pytest.raises(OSError) as err:
        mnt.path("bad/tampered").read_bytes()
    assert err.value.errno == errno.EIO
    with open(mnt.path("bad/tampered"), "rb") as f:
        assert f.read(CHUNK_SIZE) == src.read_bytes()[:CHUNK_SIZE]
    assert "bad/tampered" in mnt.stderr()


def test_store_outage_loses_no_closed_file(world: World, fault_proxy: Any, tmp_path: Path
                                           ) -> None:
    """Closing works while the store is down (the journal holds the file); sync says it
    failed; a stop that gives up waiting keeps the file journaled; the next mount uploads it."""
    import signal

    bucket = f"t-outage-{uuid.uuid4().hex[:8]}"
    world.s3.create_bucket(Bucket=bucket)
    args = ["--endpoint-url", fault_proxy.endpoint_url, "--path-style", "--list-ttl", "600"]
    state = tmp_path / "state"
    with mounted(f"s3://{bucket}", tmp_path / "mnt", world.identity_path, args=args,
                 state_home=state) as m:
        m.allow(r"WARNING|ERROR|retry|unreachable|failing|journal")
        m.path("before").write_bytes(b"uploaded before the outage")
        m.sync()
        assert sorted(os.listdir(m.mountpoint)) == ["before"]  # the listing is cached now
        with fault_proxy.outage():
            m.path("during").write_bytes(b"closed while the store was down")
            assert m.path("during").read_bytes() == b"closed while the store was down"
            failed = m.run_cli("sync", os.fspath(m.mountpoint))
            assert failed.returncode == 50, failed.stderr
            assert failed.stderr.count("\n") == 1
            assert m.proc is not None
            m.proc.send_signal(signal.SIGTERM)  # upload first...
            m.proc.send_signal(signal.SIGINT)  # ...no: stop now, keep it journaled
            assert m.proc.wait(60) == 0
            m.proc = None
            assert "stay in the journal" in m.stderr()
        keys = {o["Key"] for o in world.s3.list_objects_v2(Bucket=bucket).get("Contents", ())}
        assert keys - {".cssfs-attrs"} == {"before"}  # the root's mtime record may be there
        m.kill()  # the dead mount's leftovers, if the daemon could not unmount
        m.start()  # replays the journal
        assert m.path("during").read_bytes() == b"closed while the store was down"
        m.sync()
    body = world.s3.get_object(Bucket=bucket, Key="during")["Body"].read()
    assert b"closed while the store was down" not in body
