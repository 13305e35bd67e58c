"""s3: the S3 server the bench talks to, boto3 clients, and the raw-boto3 baselines.

What it knows: how to start tests/support/s3server.py (moto on 127.0.0.1, O(range) ranged GETs)
as a child process, boto3, and the raw S3 figures every cssfs figure is compared with. What it
must not know: cssfs, envelopes, mounts.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchlib.runner import (
    BenchError,
    Cleanup,
    abort_self,
    die_with_parent,
    log,
    stop_process,
)

ACCESS_KEY = "bench"  # dummy credentials: the server is a local moto
SECRET_KEY = "bench-secret"
REGION = "us-east-1"


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment for a child process that should talk to ``endpoint`` (cssfs CLI and mount)."""
    env = dict(os.environ)
    env.update({
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        env.pop(k, None)
    return env


class S3Server:
    """``python -m benchlib.s3bench`` (tests/support/s3server.py + streamed large ranges) as a
    child; its first stdout line is the endpoint."""

    def __init__(self, repo: Path, cleanup: Cleanup, tmpdir: Path | None = None) -> None:
        self.repo = repo
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""
        if not (repo / "tests" / "support" / "s3server.py").exists():
            raise BenchError("tests/support/s3server.py is missing: no O(range) S3 server to use")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(repo), str(repo / "scripts")])
        if tmpdir is not None:
            # moto spools objects over 5 MiB to temp files; on tmpfs, dropping the kernel's
            # caches for a cold read leaves the stand-in for S3 as fast as before, as a
            # remote S3 would be.
            tmpdir.mkdir(parents=True, exist_ok=True)
            env["TMPDIR"] = str(tmpdir)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchlib.s3bench", "--port", "0"], cwd=repo, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent,
        )
        proc = self.proc
        self._stopping = False

        def stop() -> None:
            self._stopping = True
            stop_process(proc)

        cleanup.push("s3 server", stop)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if not line.startswith("http://127.0.0.1:"):
            raise BenchError(f"s3server did not print its endpoint (got {line!r})")
        self.endpoint = line
        threading.Thread(target=self._watch, name="s3-watchdog", daemon=True).start()
        log(f"S3 server (moto, O(range) GETs, large ranges streamed) at {line}, pid {proc.pid}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _watch(self) -> None:
        """If the server dies under us (OOM killer...), stop the run instead of letting the
        daemons retry against nothing."""
        assert self.proc is not None
        code = self.proc.wait()
        if not self._stopping:
            abort_self(f"the S3 server (pid {self.proc.pid}) exited with {code} during the run")


def client(endpoint: str, *, max_pool: int = 16) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY, region_name=REGION,
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=max_pool,
                      retries={"max_attempts": 3, "mode": "standard"}),
    )


def new_bucket(s3: Any, prefix: str = "bench") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def list_all(s3: Any, bucket: str, prefix: str = "") -> list[dict[str, Any]]:
    """Every object under ``prefix``, all pages (ListObjectsV2, 1000 per page)."""
    out: list[dict[str, Any]] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.extend(page.get("Contents", []))
    return out


def empty_bucket(s3: Any, bucket: str, prefix: str = "") -> None:
    keys = [o["Key"] for o in list_all(s3, bucket, prefix)]
    for i in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=bucket,
                          Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]],
                                  "Quiet": True})


# -- baselines ------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def upload_file(s3: Any, path: Path, bucket: str, key: str) -> float:
    """boto3 upload_file (managed transfer: multipart, 10 threads); returns seconds."""
    return timed(lambda: s3.upload_file(str(path), bucket, key))


def download_file(s3: Any, bucket: str, key: str, dest: Path, want_sha: str) -> float:
    """boto3 download_file; verifies the bytes (untimed) and returns the seconds it took."""
    secs = timed(lambda: s3.download_file(bucket, key, str(dest)))
    from benchlib.runner import sha256_file

    if sha256_file(dest) != want_sha:
        raise BenchError(f"boto3 download_file of {key} returned different bytes")
    return secs


def put_object(s3: Any, path: Path, bucket: str, key: str) -> float:
    """One PutObject of the whole file (streamed from disk); returns seconds."""
    with open(path, "rb") as f:
        return timed(lambda: s3.put_object(Bucket=bucket, Key=key, Body=f))


def get_object(s3: Any, bucket: str, key: str, want_sha: str) -> float:
    """One GetObject, body read in 1 MiB pieces and hashed; returns seconds (hash included)."""
    h = hashlib.sha256()

    def go() -> None:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
        while b := body.read(1 << 20):
            h.update(b)

    secs = timed(go)
    if h.hexdigest() != want_sha:
        raise BenchError(f"boto3 get_object of {key} returned different bytes")
    return secs


def small_rates(s3: Any, bucket: str, prefix: str, *, count: int, size: int = 4096,
                threads: int = 8) -> tuple[float, float]:
    """PUT then GET ``count`` objects of ``size`` bytes with ``threads`` threads; ops/s each.

    Every GET is compared with what was PUT.
    """
    blobs = [os.urandom(size) for _ in range(count)]
    keys = [f"{prefix}{i:05d}" for i in range(count)]

    def put(i: int) -> None:
        s3.put_object(Bucket=bucket, Key=keys[i], Body=blobs[i])

    bad: list[int] = []
    lock = threading.Lock()

    def get(i: int) -> None:
        data = s3.get_object(Bucket=bucket, Key=keys[i])["Body"].read()
        if data != blobs[i]:
            with lock:
                bad.append(i)

    with ThreadPoolExecutor(threads) as pool:
        put_s = timed(lambda: list(pool.map(put, range(count))))
        get_s = timed(lambda: list(pool.map(get, range(count))))
    if bad:
        raise BenchError(f"{len(bad)} small objects came back different")
    return count / put_s, count / get_s


def ranged_gets(s3: Any, bucket: str, key: str, size: int, *, count: int, length: int,
                rng: Any) -> list[float]:
    """``count`` single-range GETs of ``length`` bytes at random offsets; seconds each."""
    lat = []
    for _ in range(count):
        off = rng.randrange(0, size - length)
        t0 = time.perf_counter()
        data = s3.get_object(Bucket=bucket, Key=key,
                             Range=f"bytes={off}-{off + length - 1}")["Body"].read()
        lat.append(time.perf_counter() - t0)
        if len(data) != length:
            raise BenchError("ranged GET returned the wrong length")
    return lat


def list_time(s3: Any, bucket: str, prefix: str, expect: int) -> float:
    """Seconds for a paginated LIST of every key under ``prefix`` (checks the count)."""
    box: list[int] = []
    secs = timed(lambda: box.append(len(list_all(s3, bucket, prefix))))
    if box[0] != expect:
        raise BenchError(f"LIST found {box[0]} keys under {prefix!r}, expected {expect}")
    return secs


def put_many(s3: Any, bucket: str, items: dict[str, bytes], threads: int = 8) -> None:
    def put(kv: tuple[str, bytes]) -> None:
        s3.put_object(Bucket=bucket, Key=kv[0], Body=io.BytesIO(kv[1]))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, items.items()))
