"""mount.py's best-effort tuning: finding the mount's device in mountinfo, raising its kernel
read-ahead, bounding malloc arenas. Pure unit tests over stand-in files (no mount, no root)."""

from __future__ import annotations

from pathlib import Path

from cssfs import mount
from cssfs.store import open_store

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
98 27 0:40 / /tmp/a\\040b rw,nosuid,nodev,relatime - fuse.cssfs cssfs:s3://x rw,user_id=0
99 27 0:41 / /tmp/mnt rw,nosuid,nodev,relatime - fuse.cssfs cssfs:s3://y rw,user_id=0
100 99 0:42 / /tmp/mnt rw,nosuid,nodev,relatime - fuse.cssfs cssfs:s3://z rw,user_id=0
"""


def test_mount_device_reads_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert mount.mount_device("/tmp/a b", str(info)) == "0:40"  # octal escapes undone
    assert mount.mount_device("/tmp/mnt", str(info)) == "0:42"  # the last mount there
    assert mount.mount_device("/elsewhere", str(info)) is None
    assert mount.mount_device("/tmp/mnt", str(tmp_path / "missing")) is None


def test_raise_read_ahead_only_raises(tmp_path: Path, monkeypatch) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    real = mount.mount_device
    monkeypatch.setattr(mount, "mount_device", lambda mp: real(mp, str(info)))
    bdi = tmp_path / "bdi"
    (bdi / "0:41").mkdir(parents=True)
    (bdi / "0:42").mkdir(parents=True)
    (bdi / "0:42" / "read_ahead_kb").write_text("128\n")
    assert mount.raise_read_ahead("/tmp/mnt", 1024, str(bdi))
    assert (bdi / "0:42" / "read_ahead_kb").read_text().strip() == "1024"
    (bdi / "0:42" / "read_ahead_kb").write_text("8192\n")  # set higher by the admin: kept
    assert mount.raise_read_ahead("/tmp/mnt", 1024, str(bdi))
    assert (bdi / "0:42" / "read_ahead_kb").read_text().strip() == "8192"
    assert not mount.raise_read_ahead("/tmp/a b", 1024, str(bdi))  # no such device: quiet
    assert not mount.raise_read_ahead("/nowhere", 1024, str(bdi))


def test_tune_malloc_is_harmless() -> None:
    assert mount.tune_malloc() in (True, False)


def test_a_mount_bounds_the_parts_of_an_upload_in_flight(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    url, endpoint = "s3://bucket", "http://127.0.0.1:9"  # no request is made
    s3 = open_store(url, endpoint_url=endpoint, region="us-east-1")
    assert s3.concurrency > mount.UPLOAD_CONCURRENCY  # type: ignore[attr-defined]
    mount.bound_uploads(s3, {})
    assert s3.concurrency == mount.UPLOAD_CONCURRENCY  # type: ignore[attr-defined]
    chosen = open_store(url, endpoint_url=endpoint, region="us-east-1", concurrency=8)
    mount.bound_uploads(chosen, {"concurrency": 8})  # the store option wins
    assert chosen.concurrency == 8  # type: ignore[attr-defined]
    local = open_store(str(tmp_path))
    mount.bound_uploads(local, {})  # nothing to bound
    assert not hasattr(local, "concurrency")


def test_release_startup_memory_is_harmless() -> None:
    assert mount.release_startup_memory() in (True, False)
