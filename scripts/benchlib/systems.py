"""systems: the filesystems under test behind one small interface -- mount it fresh, wait until
what was written is durable in the bucket, say what size an object of N plaintext bytes has.

What it knows: how to run ``cssfs mount`` (via benchlib/cssfs_cli.py), ``rclone mount`` of a crypt
remote over an S3 remote, and benchlib/memfs.py; how each one signals "uploaded". What it must
not know: the workloads, timing, the report.

Durability, the rule every write figure uses -- the clock stops when the system says the data is
in the bucket, and then (unclocked) the bucket is listed and must hold a new object of the
expected stored size for every file written:
- cssfs: ``cssfs sync MNT`` returns (documented: after sync the data is in the bucket). If the
  command does not exist, ``fsync()`` of every written file (same guarantee, per file).
- rclone: it has no sync command. With ``--vfs-write-back 0s`` uploads start at close; we poll
  ``rclone rc vfs/stats`` (``diskCache.uploadsInProgress`` and ``uploadsQueued`` both 0) every
  20 ms. When it says idle we list the bucket; if the objects are not all there yet we keep
  polling (the clock runs on) and stop the clock at the next idle report after which the bucket
  check passes. Objects rclone never uploads (rclone 1.60 loses some renamed files) end the
  wait after ``DURABLE_TIMEOUT`` s of idleness: the run is reported as not durable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchlib.context import Ctx
from benchlib.mounts import Mount
from benchlib.runner import BenchError, free_port, log
from benchlib.s3 import ACCESS_KEY, REGION, SECRET_KEY, client, list_all, new_bucket, s3_env

DURABLE_TIMEOUT = 30.0
POLL_S = 0.02

Listing = dict[str, tuple[int, str]]  # key -> (size, etag)


def snapshot(s3: Any, bucket: str) -> Listing:
    return {o["Key"]: (int(o["Size"]), o["ETag"]) for o in list_all(s3, bucket)}


def new_objects(before: Listing, after: Listing) -> Counter[int]:
    """Sizes of the objects that are new or changed since ``before``."""
    return Counter(size for key, (size, etag) in after.items() if before.get(key) != (size, etag))


class System:
    """One filesystem under test, with its own bucket."""

    name = "?"
    label = "?"

    def __init__(self, ctx: Ctx, bucket: str | None = None) -> None:
        self.ctx = ctx
        self.s3 = client(ctx.s3.endpoint)
        self.bucket = bucket or new_bucket(self.s3, self.name.replace("_", "-"))
        self.mount: Mount | None = None
        self.n_mounts = 0
        # accounting for daemon CPU per GiB and peak RSS over the whole suite
        self.cpu_s = 0.0
        self.bytes_moved = 0
        self.peak_rss_kib = 0

    # -- to implement --------------------------------------------------------------------

    def stored_size(self, plain: int) -> int:
        raise NotImplementedError

    def _argv_env(self, mnt: Path, endpoint: str) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def _wait_uploaded(self, mount: Mount, paths: Sequence[Path],
                       check: Callable[[], bool]) -> float:
        """Block until ``paths`` are durable; return the clocked seconds of the wait."""
        raise NotImplementedError

    # -- common --------------------------------------------------------------------------

    def start(self, *, endpoint: str | None = None) -> Mount:
        """A fresh mount (the previous one, if any, is stopped first)."""
        self.stop()
        self.n_mounts += 1
        mnt = self.ctx.work / f"mnt-{self.bucket}"
        argv, env = self._argv_env(mnt, endpoint or self.ctx.s3.endpoint)
        self.mount = Mount(self.label, argv, mnt, self.ctx.cleanup, env=env,
                           log_path=self.ctx.work / f"{self.name}-{self.n_mounts}.log")
        return self.mount

    def stop(self) -> None:
        m, self.mount = self.mount, None
        if m is None:
            return
        try:
            s = m.sample()
            self.cpu_s += s.cpu_s - m.start_sample.cpu_s
            self.peak_rss_kib = max(self.peak_rss_kib, s.hwm_kib)
            log(f"{self.label} mount {self.n_mounts}: peak RSS {s.hwm_kib / 1024:.0f} MiB, "
                f"{s.cpu_s - m.start_sample.cpu_s:.2f} s of CPU")
        except OSError:
            pass
        code = m.stop()
        if code not in (0, None):
            kept = self.ctx.keep_log(m.log_path)
            self.ctx.report.error(f"{self.label} exited with {code} at unmount: {m.tail(2)} "
                                  f"(log: {kept})")
        self._after_stop()

    def _after_stop(self) -> None:
        pass

    def moved(self, n: int) -> None:
        self.bytes_moved += n

    def durable(self, paths: Sequence[Path], before: Listing, sizes: Sequence[int]) -> float:
        """Wait until every path is in the bucket; return the clocked seconds.

        ``sizes`` are the plaintext sizes written; the bucket must gain at least one new object
        of the matching stored size for each. BenchError if it does not.
        """
        assert self.mount is not None
        want = Counter(self.stored_size(n) for n in sizes)

        def check() -> bool:
            got = new_objects(before, snapshot(self.s3, self.bucket))
            return all(got[s] >= k for s, k in want.items())

        return self._wait_uploaded(self.mount, paths, check)


class CssfsSystem(System):
    name = "cssfs"
    label = "cssfs"

    def __init__(self, ctx: Ctx, bucket: str | None = None, extra: Sequence[str] = ()) -> None:
        super().__init__(ctx, bucket)
        self.cli = ctx.cssfs
        self.extra = list(extra)
        self.has_sync = self.cli.has_command("sync")
        self.has_status = self.cli.has_command("status")
        if not self.has_sync:
            ctx.report.note("cssfs has no `sync` command: durability is fsync() of every file")

    def stored_size(self, plain: int) -> int:
        from cssfs import envelope

        return envelope.envelope_size(plain)

    def _argv_env(self, mnt: Path, endpoint: str) -> tuple[list[str], dict[str, str]]:
        # --debug-module cssfs.cli: only the CLI's own debug lines, i.e. the traceback of an
        # internal error, land in the daemon's log (kept in bench-results/logs/ on failure).
        argv = self.cli.argv("mount", f"s3://{self.bucket}", str(mnt), "--foreground",
                             "--endpoint-url", endpoint, "--path-style",
                             "--debug-module", "cssfs.cli", *self.extra)
        return argv, self.cli.env(s3_env(endpoint))

    def _wait_uploaded(self, mount: Mount, paths: Sequence[Path],
                       check: Callable[[], bool]) -> float:
        t0 = time.perf_counter()
        if self.has_sync:
            r = subprocess.run(self.cli.argv("sync", str(mount.mountpoint)), env=self.cli.env(),
                               capture_output=True, stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                raise BenchError(f"cssfs sync failed: {r.stderr.decode(errors='replace')[-300:]}")
        else:
            for p in paths:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        secs = time.perf_counter() - t0
        if not check():
            raise BenchError("cssfs said the data was uploaded but the bucket does not hold it")
        return secs

    def status(self) -> dict[str, Any] | None:
        """`cssfs status MNT` (one JSON line) if the command exists, else None."""
        if not self.has_status or self.mount is None:
            return None
        r = subprocess.run(self.cli.argv("status", str(self.mount.mountpoint)),
                           env=self.cli.env(), capture_output=True, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            return None
        try:
            data: dict[str, Any] = json.loads(r.stdout)
            return data
        except ValueError:
            return None


def crypt_size(plain: int) -> int:
    """Size of an rclone crypt object: 32-byte header, 64 KiB blocks with a 16-byte tag each."""
    return 32 + plain + 16 * (-(-plain // 65536))


class RcloneSystem(System):
    """``rclone mount`` of crypt(s3) with a VFS cache mode; --vfs-write-back 0s."""

    def __init__(self, ctx: Ctx, mode: str, bucket: str | None = None) -> None:
        self.name = f"rclone_{mode}"
        self.label = f"rclone {mode}"
        self.mode = mode
        super().__init__(ctx, bucket)
        self.dir = ctx.work / f"{self.name}-{self.bucket}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.password = _obscure("bench-crypt-password")
        self.password2 = _obscure("bench-crypt-salt")
        self.rc_port = 0
        self.cache_dir: Path | None = None

    def stored_size(self, plain: int) -> int:
        return crypt_size(plain)

    def _argv_env(self, mnt: Path, endpoint: str) -> tuple[list[str], dict[str, str]]:
        conf = self.dir / f"rclone-{self.n_mounts}.conf"
        conf.write_text(
            "[benchs3]\n"
            "type = s3\nprovider = Other\nenv_auth = false\n"
            f"access_key_id = {ACCESS_KEY}\nsecret_access_key = {SECRET_KEY}\n"
            f"region = {REGION}\nendpoint = {endpoint}\nforce_path_style = true\n\n"
            "[benchcrypt]\n"
            f"type = crypt\nremote = benchs3:{self.bucket}\n"
            "filename_encryption = standard\ndirectory_name_encryption = true\n"
            f"password = {self.password}\npassword2 = {self.password2}\n"
        )
        conf.chmod(0o600)
        self.cache_dir = self.dir / f"cache-{self.n_mounts}"
        self.rc_port = free_port()
        argv = [
            "rclone", "mount", "benchcrypt:", str(mnt), "--config", str(conf),
            "--vfs-cache-mode", self.mode, "--vfs-write-back", "0s",
            "--cache-dir", str(self.cache_dir),
            "--rc", "--rc-addr", f"127.0.0.1:{self.rc_port}", "--rc-no-auth",
            "--log-level", "NOTICE",
        ]
        env = s3_env(endpoint)
        env.pop("AWS_ENDPOINT_URL", None)
        # rclone's AWS SDK refuses a custom CA bundle with its own HTTP transport; the endpoint
        # is plain http on 127.0.0.1, so no CA is involved.
        env.pop("AWS_CA_BUNDLE", None)
        env["RCLONE_CONFIG"] = str(conf)
        return argv, env

    def _after_stop(self) -> None:
        if self.cache_dir is not None:
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    def rc(self, command: str, **params: Any) -> dict[str, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.rc_port}/{command}", data=json.dumps(params).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def _idle(self) -> bool:
        stats = self.rc("vfs/stats")
        dc = stats.get("diskCache") or {}
        return int(dc.get("uploadsInProgress", 0)) == 0 and int(dc.get("uploadsQueued", 0)) == 0

    def _wait_uploaded(self, mount: Mount, paths: Sequence[Path],
                       check: Callable[[], bool]) -> float:
        t0 = time.perf_counter()
        idle_since: float | None = None
        while True:
            if self._idle():
                t_idle = time.perf_counter()
                if check():  # unclocked: the clock stopped at t_idle
                    return t_idle - t0
                idle_since = idle_since or t_idle
                if time.perf_counter() - idle_since > DURABLE_TIMEOUT:
                    raise BenchError(f"{self.label}: idle for {DURABLE_TIMEOUT:.0f}s but the "
                                     "bucket does not hold every file written")
            else:
                idle_since = None
            time.sleep(POLL_S)


def _obscure(text: str) -> str:
    r = subprocess.run(["rclone", "obscure", "-"], input=text.encode(), capture_output=True,
                       check=True)
    return r.stdout.decode().strip()


class MemfsSystem(System):
    """benchlib/memfs.py: the Python FUSE ceiling. No bucket; durable means closed."""

    name = "memfs"
    label = "minimal pyfuse3 memfs"

    def __init__(self, ctx: Ctx, source: Path) -> None:  # no super(): it has no bucket
        self.ctx = ctx
        self.source = source
        self.mount = None
        self.n_mounts = 0
        self.cpu_s = 0.0
        self.bytes_moved = 0
        self.peak_rss_kib = 0

    def stored_size(self, plain: int) -> int:
        return plain

    def _argv_env(self, mnt: Path, endpoint: str) -> tuple[list[str], dict[str, str]]:
        here = Path(__file__).resolve().parent
        return [sys.executable, str(here / "memfs.py"), str(mnt), "--source",
                str(self.source)], dict(os.environ)

    def start(self, *, endpoint: str | None = None) -> Mount:
        self.stop()
        self.n_mounts += 1
        mnt = self.ctx.work / "mnt-memfs"
        argv, env = self._argv_env(mnt, "")
        self.mount = Mount(self.label, argv, mnt, self.ctx.cleanup, env=env,
                           log_path=self.ctx.work / f"memfs-{self.n_mounts}.log")
        return self.mount

    def durable(self, paths: Sequence[Path], before: Listing, sizes: Sequence[int]) -> float:
        return 0.0


def log_system(s: System) -> None:
    log(f"{s.label}: bucket {getattr(s, 'bucket', '-')}")
