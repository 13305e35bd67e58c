"""suite_fs: the filesystem workloads (issues 4 and 7) on cssfs and, for issue 7, on rclone's
crypt mount, alternating run by run, with the limits measured in the same run.

What it knows: the order of the workloads, which figure is compared with which, and the limits
that bound each figure (raw boto3 on the same server, the minimal pyfuse3 memfs, bare
AES-GCM). What it must not know: how a system mounts or signals durability (systems.py), how a
workload checks its bytes (workloads.py).

Per run and per system (systems alternate inside each run, so drift hits all of them alike):
 1. ``cp`` the big file into the mount, clocked until durable in the bucket;
 2. fresh mount + dropped caches: read it (cold), then again (warm); sha256 checked;
 3. N x 4 KiB files: create (open/write/close each) until durable; fresh mount: ``ls -l``
    (cold) and read all back (compared);
 4. (rclone suite) ``rsync -a`` of a nested tree until durable; fresh mount: ``diff -r`` (cold);
    lost (missing/different) and misnamed (names not in the source) files counted;
 5. fresh mount through a byte-counting proxy: 200 random 4 KiB preads in the big file (IOPS,
    p50/p99, bytes the daemon fetched from the server);
then, once per system, a 2,000-file folder in its own bucket: fresh mount, ``ls -l`` cold and
warm. Daemon peak RSS (VmHWM) and CPU seconds per GiB moved through the mount are taken over
all the mounts of a system.
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

from benchlib import limits, s3
from benchlib.context import Ctx
from benchlib.proxy import CountingProxy
from benchlib.report import MB, GiB, MiB, Report
from benchlib.runner import BenchError, log, read_all, sha256_file
from benchlib.systems import CssfsSystem, MemfsSystem, RcloneSystem, System
from benchlib.workloads import (
    cold_start,
    ls_l,
    p50_p99,
    random_reads,
    rsync_in,
    seq_read,
    seq_write,
    small_blobs,
    small_create,
    small_read,
    tree_check,
)

# metric -> (label, unit, higher_is_better, limit keys)
METRICS: dict[str, tuple[str, str, bool, list[str]]] = {
    "write_durable": ("write {big} (cp) until in the bucket", "MB/s", True,
                      ["fs.limit.upload_file", "fs.limit.memfs_write"]),
    "write_close": ("write {big} (cp) until close() returns", "MB/s", True,
                    ["fs.limit.memfs_write"]),
    "read_cold": ("read {big}, cold (fresh mount, caches dropped)", "MB/s", True,
                  ["fs.limit.download_file", "fs.limit.memfs_read"]),
    "read_warm": ("read {big}, warm (just read; kernel page cache)", "MB/s", True,
                  ["fs.limit.memfs_read"]),
    "read_warm_daemon": ("read {big}, warm in the daemon (page cache dropped)", "MB/s", True,
                         ["fs.limit.memfs_read"]),
    "small_create": ("create {n} × 4 KiB files until in the bucket", "files/s", True,
                     ["fs.limit.put4k_8t"]),
    "small_ls": ("`ls -l` of the {n}-file folder, cold", "s", False, ["fs.limit.list_small"]),
    "small_read": ("read back {n} × 4 KiB files (after the cold ls)", "files/s", True,
                   ["fs.limit.get4k_8t"]),
    "rsync_durable": ("`rsync -a` tree ({tree}) until in the bucket", "s", False,
                      ["fs.limit.tree_put"]),
    "rsync_diff": ("`diff -r` of the tree, cold", "s", False, ["fs.limit.tree_get"]),
    "rsync_lost": ("tree files lost or wrong after rsync + remount (of {tree_n})", "count",
                   False, []),
    "rsync_misnamed": ("tree: names not in the source (temp names) after remount", "count",
                       False, []),
    "rand_iops": ("{r} random 4 KiB reads, cold: IOPS", "ops/s", True, ["fs.limit.range_iops"]),
    "rand_p50": ("random 4 KiB read latency p50", "ms", False, ["fs.limit.range_p50"]),
    "rand_p99": ("random 4 KiB read latency p99", "ms", False, ["fs.limit.range_p99"]),
    "rand_fetched": ("bytes fetched from the server for the {r} random reads", "KiB", False,
                     ["fs.limit.rand_ideal"]),
    "rand_self_down": ("bytes down for the {r} random reads, per `cssfs status`", "KiB",
                       False, ["fs.limit.rand_ideal"]),
    "rand_requests": ("store requests for the {r} random reads, per `cssfs status`", "count",
                      False, ["fs.limit.rand_count"]),
    "list_cold": ("`ls -l` of a {l}-file folder, cold", "s", False, ["fs.limit.list_big"]),
    "list_warm": ("`ls -l` of a {l}-file folder, warm", "s", False, ["fs.limit.list_big"]),
    "daemon_rss": ("daemon peak RSS (VmHWM, all mounts)", "MiB", False, []),
    "daemon_cpu": ("daemon CPU seconds per GiB moved through the mount", "s/GiB", False,
                   ["fs.limit.memfs_cpu"]),
    "mount_s": ("mount until ready", "s", False, ["fs.limit.memfs_mount"]),
}


LIMIT_SHORT = {
    "fs.limit.upload_file": "boto3 upload_file", "fs.limit.put_object": "boto3 put_object",
    "fs.limit.download_file": "boto3 download_file", "fs.limit.get_object": "boto3 get_object",
    "fs.limit.put4k_8t": "boto3 PUT ×8 threads", "fs.limit.get4k_8t": "boto3 GET ×8 threads",
    "fs.limit.range_iops": "boto3 ranged GET", "fs.limit.range_p50": "boto3 ranged GET",
    "fs.limit.range_p99": "boto3 ranged GET", "fs.limit.rand_ideal": "bytes asked for",
    "fs.limit.rand_count": "1 GET per read", "fs.limit.list_small": "raw LIST",
    "fs.limit.list_big": "raw LIST", "fs.limit.tree_put": "boto3 PUT ×8 threads",
    "fs.limit.tree_get": "boto3 GET ×8 threads", "fs.limit.memfs_write": "memfs",
    "fs.limit.memfs_read": "memfs", "fs.limit.memfs_cpu": "memfs",
    "fs.limit.memfs_mount": "memfs",
}
CSSFS_ONLY = ("rand_self_down", "rand_requests")  # from `cssfs status`; rclone has no twin


def _size(n: int) -> str:
    return f"{n // GiB} GiB" if n >= GiB else f"{n // MiB} MiB"


class FsSuite:
    def __init__(self, ctx: Ctx, names: list[str], *, with_rsync: bool) -> None:
        self.ctx = ctx
        self.rep: Report = ctx.report
        self.sz = ctx.sizes
        self.names = names            # system names, cssfs first
        self.with_rsync = with_rsync
        self.fmt = {
            "big": _size(self.sz.big), "n": self.sz.small_count, "r": self.sz.random_reads,
            "l": self.sz.list_count, "tree": f"{self.sz.tree_files} files, "
            f"{self.sz.tree_bytes / 1e6:.0f} MB", "tree_n": self.sz.tree_files,
        }

    # -- figures ---------------------------------------------------------------------------

    def fig(self, system: System, metric: str) -> str:
        label, unit, hib, lims = METRICS[metric]
        key = f"fs.{system.name}.{metric}"
        refs = list(lims)
        if system.name == "cssfs" and metric not in CSSFS_ONLY:
            refs += [f"fs.{n}.{metric}" for n in self.names if n != "cssfs"]
        self.rep.figure(key, f"{system.label}: {label.format(**self.fmt)}", unit,
                        higher_is_better=hib, refs=refs, short=system.label)
        return key

    def add(self, system: System, metric: str, value: float) -> None:
        self.rep.add(self.fig(system, metric), value)

    def declare(self, system: System) -> None:
        for metric in METRICS:
            if metric.startswith("rsync") and not self.with_rsync:
                continue
            if metric in CSSFS_ONLY and system.name != "cssfs":
                continue
            self.fig(system, metric)

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> None:
        ctx, sz = self.ctx, self.sz
        big, big_sha = ctx.data_file("plain", sz.big)
        tree_src = ctx.data / "tree"
        tree = []
        if self.with_rsync:
            from benchlib.workloads import make_tree

            tree = make_tree(tree_src, sz.tree_files, sz.tree_bytes)

        systems: list[System] = []
        for name in self.names:
            systems.append(self.make_system(name))
        for s in systems:
            self.declare(s)
        self.limits(big, big_sha, tree_src, tree)

        for i in range(ctx.runs):
            for s in systems:
                log(f"run {i + 1}/{ctx.runs}: {s.label}")
                try:
                    self.session(s, i, big, big_sha, tree_src, tree)
                except BenchError as exc:
                    self.rep.error(f"{s.label}, run {i + 1}: {exc}")
                finally:
                    s.stop()
                self.forget_big(s)

        for s in systems:
            log(f"{self.sz.list_count}-file folder: {s.label}")
            try:
                self.listing(s)
            except BenchError as exc:
                self.rep.error(f"{s.label}, listing: {exc}")

        for s in systems:
            if s.bytes_moved:
                self.add(s, "daemon_cpu", s.cpu_s / (s.bytes_moved / GiB))
            if s.peak_rss_kib:
                self.add(s, "daemon_rss", s.peak_rss_kib / 1024)

    def forget_big(self, s: System) -> None:
        """Delete the run's big object (unmounted): the server keeps objects in memory."""
        want = s.stored_size(self.sz.big)
        keys = [o["Key"] for o in s3.list_all(s.s3, s.bucket) if int(o["Size"]) == want]
        for k in keys:
            s.s3.delete_object(Bucket=s.bucket, Key=k)

    def make_system(self, name: str, bucket: str | None = None) -> System:
        if name == "cssfs":
            return CssfsSystem(self.ctx, bucket)
        if name.startswith("rclone_"):
            return RcloneSystem(self.ctx, name.split("_", 1)[1], bucket)
        raise ValueError(name)

    def session(self, s: System, i: int, big: Path, big_sha: str, tree_src: Path,
                tree: list[tuple[str, int]]) -> None:
        sz = self.sz
        m = s.start()
        self.add(s, "mount_s", m.mount_s)
        # 1. sequential write until durable
        name = f"big-{i}"
        w = seq_write(s, big, name)
        self.add(s, "write_durable", sz.big / w.durable_s / MB)
        self.add(s, "write_close", sz.big / w.close_s / MB)
        # 2. cold + warm read
        mnt = cold_start(s)
        cold, warm, warm_daemon = seq_read(s, mnt / name, big_sha)
        self.add(s, "read_cold", sz.big / cold / MB)
        self.add(s, "read_warm", sz.big / warm / MB)
        self.add(s, "read_warm_daemon", sz.big / warm_daemon / MB)
        # 3. small files
        blobs = small_blobs(sz.small_count, sz.small_size, seed=1000 + i)
        folder = f"small-{i}"
        secs = small_create(s, folder, blobs)
        self.add(s, "small_create", sz.small_count / secs)
        mnt = cold_start(s)
        self.add(s, "small_ls", ls_l(mnt / folder, sz.small_count))
        self.add(s, "small_read", sz.small_count / small_read(s, folder, blobs))
        # 4. rsync
        if self.with_rsync:
            r = rsync_in(s, tree_src, f"tree-{i}", tree)
            if r.note:
                self.rep.note(f"{s.label}, run {i + 1}, rsync: {r.note}")
            if r.durable_ok:
                self.add(s, "rsync_durable", r.durable_s)
            mnt = cold_start(s)
            check = tree_check(tree_src, mnt / f"tree-{i}")
            s.moved(2 * sz.tree_bytes)  # diff -r, then the unclocked check
            self.add(s, "rsync_diff", check.diff_s)
            self.add(s, "rsync_lost", len(check.lost))
            self.add(s, "rsync_misnamed", len(check.misnamed))
            if check.lost or check.misnamed:
                self.rep.note(f"{s.label}, run {i + 1}: {len(check.lost)} tree files lost "
                              f"or different (e.g. {check.lost[:2]}), {len(check.misnamed)} "
                              f"misnamed (e.g. {check.misnamed[:2]})")
        # 5. random reads through the counting proxy
        u = urlparse(self.ctx.s3.endpoint)
        proxy = CountingProxy(u.hostname or "127.0.0.1", u.port or 80)
        try:
            mnt = cold_start(s, endpoint=proxy.endpoint)
            (mnt / name).stat()
            proxy.reset()  # count from here: what the reads cost, not the mount's own probes
            st0 = s.status() if isinstance(s, CssfsSystem) else None
            lat, total = random_reads(s, mnt / name, big, sz.random_reads, seed=77 + i)
            fetched = proxy.down
            st1 = s.status() if isinstance(s, CssfsSystem) else None
        finally:
            s.stop()
            proxy.close()
        if st0 and st1:
            # cssfs's own account (`cssfs status`): payload bytes and requests to the store
            self.add(s, "rand_self_down", (st1["bytes_down"] - st0["bytes_down"]) / 1024)
            reqs = {k: v - st0["store_requests"].get(k, 0)
                    for k, v in st1["store_requests"].items()}
            self.add(s, "rand_requests", sum(reqs.values()))
            if i == 0:
                self.rep.note(f"cssfs store requests for the {sz.random_reads} random reads "
                              f"(run 1, from `cssfs status`): {reqs}")
        p50, p99 = p50_p99(lat)
        self.add(s, "rand_iops", sz.random_reads / total)
        self.add(s, "rand_p50", p50 * 1000)
        self.add(s, "rand_p99", p99 * 1000)
        self.add(s, "rand_fetched", fetched / 1024)

    def listing(self, main: System) -> None:
        """The big folder lives in a bucket of its own, so other checks never list it."""
        sz = self.sz
        s = self.make_system(main.name)
        try:
            s.start()
            blobs = [bytes([i % 251]) * 64 for i in range(sz.list_count)]
            small_create(s, "many", blobs)
            for _ in range(self.ctx.runs):
                mnt = cold_start(s)
                self.add(main, "list_cold", ls_l(mnt / "many", sz.list_count))
                self.add(main, "list_warm", ls_l(mnt / "many", sz.list_count))
        finally:
            s.stop()
            # Peak RSS counts; CPU does not: 2,000 tiny files would swamp "CPU per GiB".
            main.peak_rss_kib = max(main.peak_rss_kib, s.peak_rss_kib)

    # -- limits ------------------------------------------------------------------------------

    def limits(self, big: Path, big_sha: str, tree_src: Path, tree: list[tuple[str, int]]) -> None:
        ctx, rep, sz = self.ctx, self.rep, self.sz
        bsz = _size(sz.big)
        c = s3.client(ctx.s3.endpoint)
        bucket = s3.new_bucket(c, "raw")
        F = rep.figure
        F("fs.limit.upload_file", f"limit: boto3 upload_file {bsz}", "MB/s",
          higher_is_better=True)
        F("fs.limit.put_object", f"limit: boto3 put_object {bsz} (one PUT)", "MB/s",
          higher_is_better=True)
        F("fs.limit.download_file", f"limit: boto3 download_file {bsz}", "MB/s",
          higher_is_better=True)
        F("fs.limit.get_object", f"limit: boto3 get_object {bsz} (one GET)", "MB/s",
          higher_is_better=True)
        F("fs.limit.put4k_8t", "limit: boto3 4 KiB PUT, 8 threads", "ops/s",
          higher_is_better=True)
        F("fs.limit.get4k_8t", "limit: boto3 4 KiB GET, 8 threads", "ops/s",
          higher_is_better=True)
        F("fs.limit.put4k_1t", "limit: boto3 4 KiB PUT, 1 thread", "ops/s",
          higher_is_better=True)
        F("fs.limit.get4k_1t", "limit: boto3 4 KiB GET, 1 thread", "ops/s",
          higher_is_better=True)
        F("fs.limit.range_iops", f"limit: boto3 4 KiB ranged GET in {bsz} object, serial",
          "ops/s", higher_is_better=True)
        F("fs.limit.range_p50", "limit: boto3 4 KiB ranged GET p50", "ms",
          higher_is_better=False)
        F("fs.limit.range_p99", "limit: boto3 4 KiB ranged GET p99", "ms",
          higher_is_better=False)
        F("fs.limit.rand_ideal", f"limit: {sz.random_reads} × 4 KiB (bytes asked for)", "KiB",
          higher_is_better=False)
        F("fs.limit.rand_count", f"limit: {sz.random_reads} reads = 1 GET each", "count",
          higher_is_better=False)
        F("fs.limit.list_small", f"limit: paginated LIST of {sz.small_count} keys", "s",
          higher_is_better=False)
        F("fs.limit.list_big", f"limit: paginated LIST of {sz.list_count} keys", "s",
          higher_is_better=False)
        F("fs.limit.aesgcm_sha", f"limit: bare AES-256-GCM + SHA-256 per chunk, {bsz}", "MB/s",
          higher_is_better=True)
        if self.with_rsync:
            F("fs.limit.tree_put", "limit: boto3 PUT of the tree's files, 8 threads", "s",
              higher_is_better=False)
            F("fs.limit.tree_get", "limit: boto3 GET of the tree's files, 8 threads", "s",
              higher_is_better=False)
        F("fs.limit.memfs_write", f"limit: minimal pyfuse3 memfs, write {bsz} (cp)", "MB/s",
          higher_is_better=True)
        F("fs.limit.memfs_read", f"limit: minimal pyfuse3 memfs, read {bsz}", "MB/s",
          higher_is_better=True)
        F("fs.limit.memfs_cpu", "limit: memfs daemon CPU seconds per GiB moved", "s/GiB",
          higher_is_better=False)
        F("fs.limit.memfs_mount", "limit: memfs mount until ready", "s",
          higher_is_better=False)

        for key, short in LIMIT_SHORT.items():
            if key in rep.figures:
                rep.figures[key].short = short

        with open(big, "rb") as f:
            data = memoryview(f.read())
        log("limits: raw boto3, memfs, AES-GCM")
        for i in range(ctx.runs):
            rep.add("fs.limit.aesgcm_sha", sz.big / limits.aesgcm_seal(data, with_sha256=True)
                    / MB)
            key = f"big-{i}"
            rep.add("fs.limit.upload_file", sz.big / s3.upload_file(c, big, bucket, key) / MB)
            rep.add("fs.limit.put_object",
                    sz.big / s3.put_object(c, big, bucket, key + "-put") / MB)
            dest = ctx.data / "raw-download"
            rep.add("fs.limit.download_file",
                    sz.big / s3.download_file(c, bucket, key, dest, big_sha) / MB)
            dest.unlink()
            rep.add("fs.limit.get_object", sz.big / s3.get_object(c, bucket, key, big_sha) / MB)
            put8, get8 = s3.small_rates(c, bucket, f"small8-{i}/", count=sz.small_count)
            rep.add("fs.limit.put4k_8t", put8)
            rep.add("fs.limit.get4k_8t", get8)
            put1, get1 = s3.small_rates(c, bucket, f"small1-{i}/",
                                        count=max(20, sz.small_count // 5), threads=1)
            rep.add("fs.limit.put4k_1t", put1)
            rep.add("fs.limit.get4k_1t", get1)
            lat = s3.ranged_gets(c, bucket, key, sz.big, count=sz.random_reads, length=4096,
                                 rng=random.Random(5 + i))
            rep.add("fs.limit.range_iops", len(lat) / sum(lat))
            p50, p99 = p50_p99(lat)
            rep.add("fs.limit.range_p50", p50 * 1000)
            rep.add("fs.limit.range_p99", p99 * 1000)
            rep.add("fs.limit.list_small", s3.list_time(c, bucket, f"small8-{i}/",
                                                        sz.small_count))
            if self.with_rsync:
                items = {f"tree-{i}/{rel}": (tree_src / rel).read_bytes() for rel, _ in tree}
                rep.add("fs.limit.tree_put", s3.timed(partial(s3.put_many, c, bucket, items)))
                rep.add("fs.limit.tree_get", s3.timed(partial(_get_many, c, bucket, items)))
        rep.add("fs.limit.rand_ideal", sz.random_reads * 4)
        rep.add("fs.limit.rand_count", sz.random_reads)
        del data
        many = {f"many/f{i:05d}": b"x" * 64 for i in range(sz.list_count)}
        s3.put_many(c, bucket, many)
        for _ in range(ctx.runs):
            rep.add("fs.limit.list_big", s3.list_time(c, bucket, "many/", sz.list_count))
        s3.empty_bucket(c, bucket)

        # the minimal pyfuse3 fs
        try:
            self.memfs_limits(big, big_sha)
        except BenchError as exc:
            rep.error(f"memfs limits: {exc}")

    def memfs_limits(self, big: Path, big_sha: str) -> None:
        ctx, rep, sz = self.ctx, self.rep, self.sz
        memfs = MemfsSystem(self.ctx, big)
        try:
            for i in range(ctx.runs):
                mnt = cold_start(memfs)
                rep.add("fs.limit.memfs_mount", memfs.mount.mount_s if memfs.mount else 0)
                t = s3.timed(partial(read_all, mnt / "data"))
                rep.add("fs.limit.memfs_read", sz.big / t / MB)
                if sha256_file(mnt / "data") != big_sha:
                    raise BenchError("memfs served different bytes")
                w = seq_write(memfs, big, f"w{i}")
                rep.add("fs.limit.memfs_write", sz.big / w.close_s / MB)
                if sha256_file(mnt / f"w{i}") != big_sha:
                    raise BenchError("memfs wrote different bytes")
                (mnt / f"w{i}").unlink()
                memfs.moved(3 * sz.big)  # write check, timed read, read check
        finally:
            memfs.stop()
        rep.add("fs.limit.memfs_cpu", memfs.cpu_s / (memfs.bytes_moved / GiB))


def _get_many(c: object, bucket: str, items: dict[str, bytes]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def get(kv: tuple[str, bytes]) -> None:
        body = c.get_object(Bucket=bucket, Key=kv[0])["Body"].read()  # type: ignore[attr-defined]
        if body != kv[1]:
            raise BenchError(f"raw GET of {kv[0]} returned different bytes")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(get, items.items()))


def _pick(ctx: Ctx, default: list[str]) -> list[str]:
    if not ctx.systems:
        return default
    unknown = set(ctx.systems) - set(default)
    if unknown:
        raise BenchError(f"--systems: {sorted(unknown)} not in this suite ({default})")
    return [n for n in default if n in ctx.systems]


def run_mount(ctx: Ctx) -> None:
    FsSuite(ctx, _pick(ctx, ["cssfs"]), with_rsync=False).run()


def run_rclone(ctx: Ctx) -> None:
    FsSuite(ctx, _pick(ctx, ["cssfs", "rclone_writes", "rclone_full"]), with_rsync=True).run()
