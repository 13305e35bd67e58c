"""context: what every suite gets -- sizes for this run, work folders, the cleanup stack, the
report -- and the shared pieces a suite starts lazily (the S3 server, the cssfs identity).

What it knows: the run's options and where things live. What it must not know: any workload.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib.report import MiB, Report
from benchlib.runner import Cleanup, log, make_random_file


@dataclass(frozen=True)
class Sizes:
    big: int            # the sequential file (256 MiB)
    rss: int            # the file for peak-RSS measurements (1 GiB)
    small_count: int    # files in the small-file workload (500)
    small_size: int     # their size (4 KiB)
    list_count: int     # files in the listing folder (2,000)
    random_reads: int   # random 4 KiB reads (200)
    tree_files: int     # files in the rsync tree (200)
    tree_bytes: int     # total bytes of the rsync tree (24 MB)
    perfile_time: float  # seconds to spend per per-file-cost figure


FULL = Sizes(256 * MiB, 1024 * MiB, 500, 4096, 2000, 200, 200, 24_000_000, 0.5)
QUICK = Sizes(16 * MiB, 64 * MiB, 40, 4096, 120, 40, 30, 3_000_000, 0.1)


class Ctx:
    def __init__(self, repo: Path, report: Report, cleanup: Cleanup, *, quick: bool, runs: int,
                 workdir: Path | None, datadir: Path | None) -> None:
        self.repo = repo
        self.report = report
        self.cleanup = cleanup
        self.quick = quick
        self.runs = runs
        self.sizes = QUICK if quick else FULL
        # Plaintext test data lives on tmpfs by default so that the disk is never the
        # bottleneck; work folders (mount points, rclone's cache) on the default tmp.
        shm = Path("/dev/shm")
        base_data = datadir or (shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
        self.data = Path(tempfile.mkdtemp(prefix="cssfs-bench-data-", dir=base_data))
        self.work = Path(tempfile.mkdtemp(prefix="cssfs-bench-", dir=workdir))
        cleanup.push("bench data folder", lambda: shutil.rmtree(self.data, ignore_errors=True))
        cleanup.push("bench work folder", lambda: shutil.rmtree(self.work, ignore_errors=True))
        self.systems: list[str] | None = None  # --systems: a subset for the fs suites
        self.logs = repo / "bench-results" / "logs"  # main sets it under --out
        self._files: dict[tuple[str, int], tuple[Path, str]] = {}
        self._s3: Any = None
        self._cssfs: Any = None

    def keep_log(self, path: Path) -> Path:
        """Copy a daemon's log out of the work folder (which is deleted) into the results."""
        self.logs.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.report.started))
        dest = self.logs / f"{stamp}-{path.name}"
        shutil.copyfile(path, dest)
        return dest

    def data_file(self, name: str, size: int) -> tuple[Path, str]:
        """A random file of ``size`` bytes on the data folder, made once; (path, sha256)."""
        key = (name, size)
        if key not in self._files:
            path = self.data / f"{name}-{size}"
            log(f"making {size / MiB:.0f} MiB of random data")
            self._files[key] = (path, make_random_file(path, size))
        return self._files[key]

    def drop_data_file(self, name: str, size: int) -> None:
        got = self._files.pop((name, size), None)
        if got:
            got[0].unlink(missing_ok=True)

    @property
    def s3(self) -> Any:
        """The S3 server (started on first use)."""
        if self._s3 is None:
            from benchlib.s3 import S3Server

            self._s3 = S3Server(self.repo, self.cleanup, tmpdir=self.data / "moto")
        return self._s3

    @property
    def cssfs(self) -> Any:
        """The cssfs command line with a fresh identity (made on first use)."""
        if self._cssfs is None:
            from benchlib.cssfs_cli import CssfsCli

            self._cssfs = CssfsCli(self.repo, self.work / "cssfs-home")
        return self._cssfs
