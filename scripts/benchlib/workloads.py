"""workloads: what the fs suites do through a mount -- each one checks what it wrote or read
before it returns a number.

What it knows: POSIX file I/O on a mounted folder, cp/ls/rsync/diff, the ``System`` interface
(fresh mount, durable). What it must not know: which system it runs on, the report.

Cold means: the previous mount is gone, kernel caches are dropped (when root), and the daemon
is freshly started (rclone: with an empty cache folder). Warm means: the same mount, right
after a complete read of the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchlib.runner import BenchError, drop_caches, percentile, read_all, sha256_file
from benchlib.systems import System, snapshot


def cold_start(system: System, *, endpoint: str | None = None) -> Path:
    """Stop the current mount, drop caches, mount again; returns the mount point."""
    system.stop()
    drop_caches()
    return system.start(endpoint=endpoint).mountpoint


def _snapshot(system: System) -> dict[str, tuple[int, str]]:
    return snapshot(system.s3, system.bucket) if hasattr(system, "s3") else {}


# -- 1. sequential write until durable ----------------------------------------------------


@dataclass
class WriteResult:
    close_s: float     # cp returned (the data is staged)
    durable_s: float   # cp + wait until in the bucket


def seq_write(system: System, src: Path, name: str) -> WriteResult:
    mnt = system.mount
    assert mnt is not None
    dst = mnt.mountpoint / name
    size = src.stat().st_size
    before = _snapshot(system)
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    t_close = time.perf_counter() - t0
    wait_s = system.durable([dst], before, [size])
    system.moved(size)
    if dst.stat().st_size != size:
        raise BenchError(f"{system.label}: {name} has size {dst.stat().st_size}, wrote {size}")
    return WriteResult(t_close, t_close + wait_s)


# -- 2. sequential read, cold and warm ----------------------------------------------------


def seq_read(system: System, path: Path, sha: str) -> tuple[float, float, float]:
    """(cold, warm, warm without page cache) seconds for reading ``path``.

    Verified by sha256 (unclocked) after the cold read. The third read follows a drop of the
    kernel's caches on the same mount: what the daemon serves from its own memory, through
    FUSE -- the figure to hold against the minimal pyfuse3 fs.
    """
    size = path.stat().st_size
    t0 = time.perf_counter()
    n = read_all(path)
    cold = time.perf_counter() - t0
    if n != size:
        raise BenchError(f"{system.label}: read {n} bytes of {size}")
    if sha256_file(path) != sha:
        raise BenchError(f"{system.label}: {path.name} read back different bytes")
    t0 = time.perf_counter()
    read_all(path)
    warm = time.perf_counter() - t0
    drop_caches()
    t0 = time.perf_counter()
    read_all(path)
    warm_daemon = time.perf_counter() - t0
    system.moved(4 * size)
    return cold, warm, warm_daemon


# -- 3. many small files ------------------------------------------------------------------


def small_blobs(count: int, size: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(count)]


def small_create(system: System, folder: str, blobs: list[bytes]) -> float:
    """Create len(blobs) files in a new folder, each open/write/close, until durable; seconds."""
    mnt = system.mount
    assert mnt is not None
    d = mnt.mountpoint / folder
    before = _snapshot(system)
    paths = [d / f"f{i:05d}.bin" for i in range(len(blobs))]
    t0 = time.perf_counter()
    d.mkdir()
    for p, b in zip(paths, blobs, strict=True):
        with open(p, "wb") as f:
            f.write(b)
    created = time.perf_counter() - t0
    wait_s = system.durable(paths, before, [len(b) for b in blobs])
    system.moved(sum(map(len, blobs)))
    return created + wait_s


def ls_l(folder: Path, expect: int) -> float:
    """Seconds for `ls -l folder` (output counted: one line per entry plus "total")."""
    t0 = time.perf_counter()
    r = subprocess.run(["ls", "-l", str(folder)], capture_output=True, check=True)
    secs = time.perf_counter() - t0
    lines = [ln for ln in r.stdout.decode(errors="replace").splitlines()
             if not ln.startswith("total")]
    if len(lines) != expect:
        raise BenchError(f"ls -l {folder.name} listed {len(lines)} entries, expected {expect}")
    return secs


def small_read(system: System, folder: str, blobs: list[bytes]) -> float:
    """Read every file back (open/read/close); compared with what was written; seconds."""
    mnt = system.mount
    assert mnt is not None
    d = mnt.mountpoint / folder
    got: list[bytes] = []
    t0 = time.perf_counter()
    for i in range(len(blobs)):
        with open(d / f"f{i:05d}.bin", "rb") as f:
            got.append(f.read())
    secs = time.perf_counter() - t0
    bad = sum(1 for a, b in zip(got, blobs, strict=True) if a != b)
    if bad:
        raise BenchError(f"{system.label}: {bad} small files read back different")
    system.moved(sum(map(len, blobs)))
    return secs


# -- 4. rsync a tree ----------------------------------------------------------------------


def make_tree(root: Path, files: int, total: int, seed: int = 7) -> list[tuple[str, int]]:
    """A nested tree of ``files`` random files summing to ``total`` bytes; (relpath, size).

    Sizes follow a log-uniform spread from 100 B to ~1.5 MB, scaled to the total; folders are
    three levels deep with a few files at every level.
    """
    rng = random.Random(seed)
    raw = [10 ** rng.uniform(2, 6.2) for _ in range(files)]
    scale = total / sum(raw)
    sizes = [max(1, int(s * scale)) for s in raw]
    sizes[-1] += total - sum(sizes)
    out = []
    for i, size in enumerate(sizes):
        depth = i % 4
        parts = [f"d{(i // 7) % 5}", f"e{(i // 3) % 4}", f"g{i % 3}"][:depth]
        rel = Path(*parts, f"file-{i:04d}.dat") if parts else Path(f"file-{i:04d}.dat")
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(size))
        out.append((str(rel), size))
    return out


@dataclass
class RsyncResult:
    rsync_rc: int
    durable_s: float
    durable_ok: bool
    note: str = ""


def rsync_in(system: System, src: Path, folder: str, tree: list[tuple[str, int]]) -> RsyncResult:
    mnt = system.mount
    assert mnt is not None
    dst = mnt.mountpoint / folder
    before = _snapshot(system)
    t0 = time.perf_counter()
    r = subprocess.run(["rsync", "-a", f"{src}/", f"{dst}/"], capture_output=True)
    t_rsync = time.perf_counter() - t0
    paths = [dst / rel for rel, _ in tree]
    ok, note = True, ""
    try:
        wait_s = system.durable([p for p in paths if p.exists()], before,
                                [n for _, n in tree])
    except BenchError as exc:
        ok, note, wait_s = False, str(exc), float("nan")
    system.moved(sum(n for _, n in tree))
    if r.returncode != 0:
        note = (note + " " if note else "") + (
            f"rsync exit {r.returncode}: "
            + " | ".join(r.stderr.decode(errors="replace").strip().splitlines()[-2:]))
    return RsyncResult(r.returncode, t_rsync + wait_s, ok, note)


@dataclass
class TreeCheck:
    diff_s: float
    lost: list[str] = field(default_factory=list)       # missing or different content
    misnamed: list[str] = field(default_factory=list)   # names that are not in the source


def _walk(root: Path) -> Iterator[str]:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            yield os.path.relpath(os.path.join(dirpath, f), root)


def tree_check(src: Path, dst: Path) -> TreeCheck:
    """Time `diff -r src dst`, then count lost and misnamed files (unclocked)."""
    t0 = time.perf_counter()
    subprocess.run(["diff", "-r", "-q", str(src), str(dst)], capture_output=True)
    secs = time.perf_counter() - t0
    want = set(_walk(src))
    have = set(_walk(dst)) if dst.is_dir() else set()
    check = TreeCheck(secs)
    for rel in sorted(want):
        if rel not in have or _digest(src / rel) != _digest(dst / rel):
            check.lost.append(rel)
    check.misnamed = sorted(have - want)
    return check


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# -- 5. random 4 KiB reads ----------------------------------------------------------------


def random_reads(system: System, path: Path, src: Path, count: int, *, block: int = 4096,
                 seed: int = 1) -> tuple[list[float], float]:
    """``count`` preads of ``block`` bytes at random aligned offsets; (latencies s, total s).

    The file is opened with POSIX_FADV_RANDOM, as random-access programs do, so the kernel
    asks for the block and not a read-ahead window. Each block is compared (unclocked) with
    the same block of ``src``.
    """
    size = path.stat().st_size
    rng = random.Random(seed)
    offsets = [rng.randrange(0, size // block) * block for _ in range(count)]
    lat: list[float] = []
    fd = os.open(path, os.O_RDONLY)
    ref = os.open(src, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        t_all = 0.0
        for off in offsets:
            t0 = time.perf_counter()
            data = os.pread(fd, block, off)
            el = time.perf_counter() - t0
            t_all += el
            lat.append(el)
            if data != os.pread(ref, block, off):
                raise BenchError(f"{system.label}: random read at {off} returned wrong bytes")
    finally:
        os.close(fd)
        os.close(ref)
    system.moved(count * block)
    return lat, t_all


def p50_p99(lat: list[float]) -> tuple[float, float]:
    return percentile(lat, 50), percentile(lat, 99)
