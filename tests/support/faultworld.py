"""Scaffolding shared by the mount-level fault and durability tests.

A ``World`` is one moto bucket reached through the fault proxy, one identity and a folder of
source files; it can list the bucket's user-visible keys and decrypt everything in it directly
(no mount), so a test can compare what it wrote with what the bucket really holds.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tests.support.mounting import make_identity


def is_own_object(key: str) -> bool:
    """cssfs's own objects (folder policies, attrs records...): hidden by the mount."""
    return key.rpartition("/")[2].startswith(".cssfs-")


class World:
    """One bucket, one identity, a fault proxy in front of moto and a folder of sources."""

    def __init__(self, tmp: Path, bucket: Any, proxy: Any, *, cache_size: str = "16M") -> None:
        import boto3

        self.tmp = tmp
        self.endpoint = bucket.endpoint
        self.bucket = bucket.bucket
        self.proxy = proxy
        self.cache_size = cache_size
        self.s3 = boto3.client("s3", endpoint_url=bucket.endpoint)
        self.identity_path = tmp / "identity"
        self.identity = make_identity(self.identity_path)
        self.src = tmp / "src"
        self.src.mkdir()

    def args(self, *extra: str) -> list[str]:
        """`cssfs mount` options: the store through the proxy, listings cached long."""
        return ["--endpoint-url", self.proxy.endpoint_url, "--path-style", "--list-ttl", "600",
                "--cache-size", self.cache_size, *extra]

    def keys(self) -> set[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return {item["Key"] for page in pages for item in page.get("Contents", ())
                if not is_own_object(item["Key"])}

    def plaintext(self, identity: Any = None) -> dict[str, bytes]:
        """Every file in the bucket, decrypted here with ``identity`` (default: ours)."""
        from cssfs.encstore import EncryptedStore
        from cssfs.store.url import open_store

        async def main() -> dict[str, bytes]:
            store = open_store(f"s3://{self.bucket}", endpoint_url=self.endpoint,
                               path_style=True)
            async with store:
                enc = EncryptedStore(store, identity or self.identity)
                out = {}
                for entry in await enc.list("", delimiter=None):
                    if entry.is_dir or entry.key.endswith("/") or ".cssfs-" in entry.key:
                        continue  # folders, markers, cssfs's bookkeeping (mtime records)
                    buf = io.BytesIO()
                    await enc.get_to(entry.key, buf)
                    out[entry.key] = buf.getvalue()
                return out

        return trio.run(main)


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """Poll ``condition`` until it returns something true (a state with no event to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"not reached in {timeout} s: {what}"
        time.sleep(0.05)
