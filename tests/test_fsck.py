"""cssfs fsck: a clean store, then every kind of trouble, on a store folder and on moto S3.

The CLI runs in-process (``cli.main`` runs its own trio loop, so these tests are synchronous and
set the store up with ``trio.run``). Damage is done through the store itself (get, change, put),
so the same scenario runs on both stores: a flipped byte in a chunk, a truncated object, two
objects swapped, a plaintext object, files for someone else (one of them truncated), a conflict
copy, interrupted uploads (S3: a cssfs multipart upload, another tool's, a stale marker; folder:
an old and a fresh temp file). fsck must report each, exit 17, and change nothing; --repair
must remove only cssfs's idle leftovers. The table-window path, the recheck of an object that
changed mid-check and the checks without a key run against cssfs.fsck.Fsck on a memory store.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from cssfs import cli
from cssfs.cli import ExitCode
from cssfs.encstore import EncryptedStore
from cssfs.envelope import CHUNK_SIZE, HEADER_SIZE, chunk_range, table_range
from cssfs.envstream import encrypt_stream
from cssfs.fsck import Fsck, conflict_original
from cssfs.journal import conflict_name
from cssfs.keys import Identity
from cssfs.store.base import MIN_PART_SIZE, ObjectStore
from cssfs.store.local import TMP_DIR, LocalStore
from cssfs.store.memory import MemoryStore

CANARY = b"CANARY-fsck-91c4: plaintext that must never be printed\n"
T = TypeVar("T")


@dataclass
class Target:
    kind: str
    url: str
    options: list[str]
    make: Callable[[], ObjectStore]
    raw: Any = None  # S3: a boto3 client on the bucket
    bucket: str = ""


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "local":
        root = tmp_path / "store"
        root.mkdir()
        return Target("local", str(root), [], lambda: LocalStore(root))
    import boto3

    from cssfs.store.s3 import S3Store

    s3 = request.getfixturevalue("s3_bucket")
    return Target(
        "s3", f"s3://{s3.bucket}", ["--endpoint-url", s3.endpoint, "--path-style"],
        lambda: S3Store(s3.bucket, endpoint_url=s3.endpoint, path_style=True,
                        part_size=MIN_PART_SIZE),
        boto3.client("s3", endpoint_url=s3.endpoint), s3.bucket,
    )


@dataclass
class People:
    me: Identity
    other: Identity


@pytest.fixture
def people(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[People]:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".state"))
    for name in ("CSSFS_PASSPHRASE_FILE", "CREDENTIALS_DIRECTORY", "JOURNAL_STREAM"):
        monkeypatch.delenv(name, raising=False)
    me = Identity.generate()
    path = tmp_path / "me.id"
    path.write_bytes(me.to_file(None))
    path.chmod(0o600)
    monkeypatch.setenv("CSSFS_IDENTITY", str(path))
    yield People(me, Identity.generate())


def on(target: Target, fn: Callable[[ObjectStore], Awaitable[T]]) -> T:
    """Run ``fn(store)`` with a fresh store of the target, in its own trio loop."""

    async def main() -> T:
        store = target.make()
        try:
            return await fn(store)
        finally:
            await store.aclose()

    return trio.run(main)


@dataclass
class Run:
    code: int
    out: str
    err: str

    def problems(self) -> dict[str, dict[str, str]]:
        """``kind -> {key: reason}`` from the problem lines."""
        found: dict[str, dict[str, str]] = {}
        for line in self.out.splitlines():
            if line.startswith(("  ", "fsck of ")):
                continue
            kind, key, reason = line.split(": ", 2)
            found.setdefault(kind, {})[key] = reason
        return found

    def summary(self) -> dict[str, str]:
        return dict(
            line.strip().split(":", 1) for line in self.out.splitlines() if line.startswith("  ")
        )


@pytest.fixture
def fsck(capsys: pytest.CaptureFixture[str], people: People, target: Target
         ) -> Callable[..., Run]:
    def run(*options: str) -> Run:
        code = cli.main(["fsck", target.url, *target.options, *options])
        captured = capsys.readouterr()
        result = Run(int(code), captured.out, captured.err)
        assert CANARY.decode().strip() not in result.out + result.err
        assert "Traceback" not in result.err
        return result

    return run


def data(n: int, seed: int) -> bytes:
    block = CANARY + bytes([seed]) * 61
    return (block * (n // len(block) + 1))[:n]


THREE_CHUNKS = 2 * CHUNK_SIZE + 1000


async def put_good(store: ObjectStore, people: People) -> None:
    """Intact files of both kinds, a folder marker and a policy object."""
    mine = EncryptedStore(store, people.me)
    await mine.put("docs/one.txt", CANARY)
    await mine.put("docs/three.bin", data(THREE_CHUNKS, 1))
    await mine.put("empty.txt", b"")
    await mine.put("report.txt", data(500, 2))
    await mine.put(conflict_name("report.txt", _when(), "ab12"), data(600, 3))
    await EncryptedStore(store, people.other).put("theirs.txt", CANARY)
    await store.put("docs/", b"")
    await store.put("docs/.cssfs-policy", b"cssfs-policy v1\nnot checked by fsck\n")


def _when() -> Any:
    from datetime import UTC, datetime

    return datetime(2024, 1, 31, 23, 59, 59, tzinfo=UTC)


async def put_damage(store: ObjectStore, people: People) -> None:
    """The good files, then one of each kind of trouble."""
    await put_good(store, people)
    mine = EncryptedStore(store, people.me)
    theirs = EncryptedStore(store, people.other)
    await mine.put("flip.bin", data(THREE_CHUNKS, 4))
    await mine.put("cut.bin", data(THREE_CHUNKS, 5))
    await mine.put("a.txt", data(100, 6))
    await mine.put("b.txt", data(200, 7))
    await theirs.put("theirs-cut.bin", data(THREE_CHUNKS, 8))
    await store.put("notes.txt", CANARY)  # never encrypted
    # A flipped byte inside chunk 1.
    raw = bytearray(await store.get("flip.bin"))
    raw[chunk_range(1, THREE_CHUNKS)[0] + 100] ^= 0x01
    await store.put("flip.bin", bytes(raw))
    # Truncated: the end of the last chunk and the chunk table are gone.
    for key in ("cut.bin", "theirs-cut.bin"):
        raw = bytearray(await store.get(key))
        await store.put(key, bytes(raw[:-1000]))
    # Swapped.
    a, b = await store.get("a.txt"), await store.get("b.txt")
    await store.put("a.txt", b)
    await store.put("b.txt", a)


def leftovers(target: Target) -> None:
    """Interrupted uploads: one cssfs started and one it did not (S3); an old and a fresh
    temp file (folder store)."""
    if target.kind == "local":
        tmp = Path(target.url) / TMP_DIR
        tmp.mkdir(exist_ok=True)
        old, fresh = tmp / "00112233aabbccdd.tmp", tmp / "ffeeddcc33221100.tmp"
        old.write_bytes(b"\0" * 5000)
        fresh.write_bytes(b"\0" * 7000)
        long_ago = time.time() - 3 * 3600
        os.utime(old, (long_ago, long_ago))
        return

    async def interrupted(store: ObjectStore) -> None:
        # What a cssfs process killed in the middle of a multipart put leaves: the upload,
        # its marker and some parts (part 1, the envelope header, is always uploaded last).
        from cssfs.store.s3 import S3Store

        assert isinstance(store, S3Store)
        upload = await store._create_upload("big/upload.bin")
        await store._mark(upload)
        await store._upload_part(upload, 2, b"\0" * 4096)
        await store._upload_part(upload, 3, b"\0" * 4096)

    on(target, interrupted)
    raw = target.raw
    other = raw.create_multipart_upload(Bucket=target.bucket, Key="other-tool.bin")
    raw.upload_part(Bucket=target.bucket, Key="other-tool.bin", UploadId=other["UploadId"],
                    PartNumber=1, Body=b"x" * 1000)
    # A marker whose upload is gone (a crash between completing an upload and deleting it).
    raw.put_object(Bucket=target.bucket, Key=".cssfs-uploads/" + "0" * 32, Body=b"")


async def snapshot(store: ObjectStore) -> tuple[list[tuple[str, str, int]], list[str]]:
    listing = await store.list()
    uploads = await store.list_uploads()
    return (
        [(o.key, o.etag, o.size) for o in listing.objects],
        sorted(f"{u.key} {u.upload_id}" for u in uploads),
    )


# -- the CLI on both stores -----------------------------------------------------------------


def test_clean_store(target: Target, people: People, fsck: Callable[..., Run]) -> None:
    on(target, lambda store: put_good(store, people))
    result = fsck()
    assert (result.code, result.err) == (ExitCode.OK, ""), result
    problems = result.problems()
    assert problems.pop("unreadable") == {"theirs.txt": "not encrypted for you"}
    assert problems.pop("conflict") == {
        "report.conflict-20240131-235959-ab12.txt": "conflict copy of report.txt"
    }
    assert problems == {}
    summary = result.summary()
    assert summary["objects checked"].strip() == "8"
    assert summary["ok"].strip() == "5"  # one.txt, three.bin, empty.txt, report + its copy
    assert summary["damaged"].strip() == "0"
    assert summary["not readable by you"].strip() == "1"
    assert summary["folder markers"].strip() == "1"
    assert summary["cssfs bookkeeping"].strip() == "1"
    verified = int(summary["bytes verified"].split("(")[1].split()[0])
    assert verified > THREE_CHUNKS


def test_every_kind_of_trouble(target: Target, people: People, fsck: Callable[..., Run]) -> None:
    on(target, lambda store: put_damage(store, people))
    leftovers(target)
    before = on(target, snapshot)
    result = fsck()
    assert result.code == ExitCode.DAMAGED, result
    assert result.err == "cssfs: error: 5 object(s) damaged (listed above)\n"
    problems = result.problems()
    damaged = problems.pop("damaged")
    assert set(damaged) == {"flip.bin", "cut.bin", "a.txt", "b.txt", "theirs-cut.bin"}
    assert damaged["flip.bin"] == "chunk 1 does not match the chunk table"
    assert "truncated" in damaged["cut.bin"]
    assert "truncated" in damaged["theirs-cut.bin"]  # checked without the key
    assert "another object (b.txt)" in damaged["a.txt"]
    assert "another object (a.txt)" in damaged["b.txt"]
    assert problems.pop("unreadable") == {"theirs.txt": "not encrypted for you"}
    assert problems.pop("foreign") == {
        "notes.txt": "not a cssfs envelope (no cssfs envelope magic)"
    }
    assert set(problems.pop("conflict")) == {"report.conflict-20240131-235959-ab12.txt"}
    left = problems.pop("leftover")
    assert problems == {}
    if target.kind == "local":
        assert set(left) == {f"{TMP_DIR}/00112233aabbccdd.tmp", f"{TMP_DIR}/ffeeddcc33221100.tmp"}
        assert left[f"{TMP_DIR}/00112233aabbccdd.tmp"].endswith("--repair removes it")
        assert "may still be running" in left[f"{TMP_DIR}/ffeeddcc33221100.tmp"]
    else:
        assert set(left) == {"big/upload.bin", "other-tool.bin", ".cssfs-uploads/" + "0" * 32}
        assert "multipart upload by cssfs, 8.0 KiB" in left["big/upload.bin"]
        assert "by another tool" in left["other-tool.bin"]
        assert left["other-tool.bin"].endswith("left alone")
    assert result.summary()["damaged"].strip() == "5"
    order = ["damaged", "error", "unreadable", "foreign", "gone", "conflict", "leftover"]
    kinds = [line.split(":")[0] for line in result.out.splitlines()
             if not line.startswith(("  ", "fsck of "))]
    assert kinds == sorted(kinds, key=order.index)
    # Nothing changed.
    assert on(target, snapshot) == before


def test_repair_removes_only_cssfs_garbage(
    target: Target, people: People, fsck: Callable[..., Run]
) -> None:
    on(target, lambda store: put_damage(store, people))
    leftovers(target)
    objects, uploads = on(target, snapshot)
    # S3 markers are fresh (moto's own Initiated is a constant): --older-than 0 makes them due.
    age = ["--older-than", "0"] if target.kind == "s3" else []
    result = fsck("--repair", *age)
    assert result.code == ExitCode.DAMAGED, result  # damage is reported, never "repaired"
    left = result.problems()["leftover"]
    after_objects, after_uploads = on(target, snapshot)
    assert after_objects == objects  # no object touched: damaged, foreign, copies all stay
    if target.kind == "local":
        assert left[f"{TMP_DIR}/00112233aabbccdd.tmp"].endswith(": removed")
        assert "left alone" in left[f"{TMP_DIR}/ffeeddcc33221100.tmp"]
        assert after_uploads == [u for u in uploads if "00112233aabbccdd" not in u]
    else:
        assert left["big/upload.bin"].endswith(": removed")
        assert left[".cssfs-uploads/" + "0" * 32].endswith(": removed")
        assert left["other-tool.bin"].endswith("left alone")
        assert [u.split()[0] for u in after_uploads] == ["other-tool.bin"]
        assert after_uploads == [u for u in uploads if u.startswith("other-tool.bin ")]
        markers = target.raw.list_objects_v2(Bucket=target.bucket, Prefix=".cssfs-uploads/")
        assert markers.get("KeyCount", 0) == 0  # the aborted upload's marker went with it
    assert result.summary()["upload leftovers"].strip().endswith("removed)")


def test_fsck_of_a_missing_folder_and_bad_options(
    tmp_path: Path, people: People, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["fsck", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == ExitCode.NOT_FOUND
    assert err.startswith("cssfs: error: ") and len(err.splitlines()) == 1
    assert cli.main(["fsck", str(tmp_path), "--older-than", "-1"]) == ExitCode.USAGE
    assert "minutes must be 0 or more" in capsys.readouterr().err


# -- cssfs.fsck on a memory store -----------------------------------------------------------


async def test_table_windows_and_payload_checks() -> None:
    me = Identity.generate()
    store = MemoryStore()
    mine = EncryptedStore(store, me)
    five = 4 * CHUNK_SIZE + 123
    for key in ("good.bin", "chunk3.bin", "table.bin", "trailing.bin"):
        await mine.put(key, data(five, 9))

    async def change(key: str, fn: Callable[[bytearray], bytes]) -> None:
        await store.put(key, fn(bytearray(await store.get(key))))

    def flip(at: int) -> Callable[[bytearray], bytes]:
        def do(raw: bytearray) -> bytes:
            raw[at] ^= 0x80
            return bytes(raw)
        return do

    await change("chunk3.bin", flip(chunk_range(3, five)[0] + 5))
    await change("table.bin", flip(table_range(five)[0] + 40))
    await change("trailing.bin", lambda raw: bytes(raw) + b"\0" * 48)
    seen: list[int] = []
    report = await Fsck(
        store, [me], table_window=2, progress=lambda total: seen.append, objects_at_once=2
    ).run()
    damaged = {f.key: f.reason for f in report.damaged}
    assert damaged == {
        "chunk3.bin": "chunk 3 does not match the chunk table",
        "table.bin": "chunk table does not match the writer's signature",
        "trailing.bin": "48 bytes of trailing data after envelope",
    }
    assert report.ok == 1
    assert report.bytes_verified >= HEADER_SIZE + five
    size = (await store.head("good.bin")).size
    assert sum(seen) == 3 * size + size + 48  # every object's bytes, damaged or not


async def test_checks_without_the_key() -> None:
    """A file for someone else: signature, binding and size are still checked."""
    me, other = Identity.generate(), Identity.generate()
    store = MemoryStore()
    theirs = EncryptedStore(store, other)
    for key in ("fine.txt", "badsig.txt", "moved.txt", "x.txt"):
        await theirs.put(key, data(3000, 10))
    raw = bytearray(await store.get("badsig.txt"))
    raw[178 + 88 + 32 + 10] ^= 0x01  # in the signature of a one-stanza header (FORMAT.md)
    await store.put("badsig.txt", bytes(raw))
    await store.put("moved.txt", await store.get("x.txt"))
    await store.delete(["x.txt"])
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(CANARY), out, me, [])  # `cssfs encrypt` output: bound to nothing
    await store.put("copied-in.enc", out.getvalue())
    report = await Fsck(store, [me]).run()
    damaged = {f.key: f.reason for f in report.damaged}
    assert set(damaged) == {"badsig.txt", "moved.txt", "copied-in.enc"}
    assert damaged["badsig.txt"] == "the writer's signature does not verify"
    assert "another object" in damaged["moved.txt"]
    assert "bound to no object" in damaged["copied-in.enc"]
    assert [f.key for f in report.of("unreadable")] == ["fine.txt"]


class SwappingStore(MemoryStore):
    """A memory store where another client replaces ``key`` right after fsck read its header."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.replacement: bytes | None = None

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        got = await super().get(key, start, end)
        if key == self.key and start == 0 and self.replacement is not None:
            replacement, self.replacement = self.replacement, None
            await self.put(key, replacement)
        return got


async def test_an_object_replaced_mid_check_is_checked_again() -> None:
    me = Identity.generate()
    store = SwappingStore("moving.bin")
    mine = EncryptedStore(store, me)
    await mine.put("moving.bin", data(THREE_CHUNKS, 11))
    newer = await store.get("moving.bin")
    await mine.put("moving.bin", data(THREE_CHUNKS, 12))
    store.replacement = newer
    report = await Fsck(store, [me]).run()
    assert report.damaged == [] and report.ok == 1


def test_conflict_names_match_the_journal() -> None:
    when = _when()
    for key, original in [
        ("dir/report.txt", "dir/report.txt"),
        ("notes", "notes"),
        (".bashrc", ".bashrc"),
        ("a/b.tar.gz", "a/b.tar.gz"),
    ]:
        for n in (0, 2):
            assert conflict_original(conflict_name(key, when, "0f9e", n)) == original
    assert conflict_original("dir/report.txt") is None
    assert conflict_original("conflict-20240131-235959-ab12") is None
