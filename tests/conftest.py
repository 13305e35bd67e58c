"""Shared fixtures: the moto S3 server, buckets, the parametrized ``store``, log hygiene.

Environment. At import (before any test) the AWS variables are pinned to dummy values
(``AWS_ACCESS_KEY_ID=testing``, ``AWS_DEFAULT_REGION=us-east-1``, config and credential files
pointed at nothing, no ``AWS_PROFILE``/``AWS_ENDPOINT_URL*``), so no test can reach real AWS with
someone's credentials. Subprocesses inherit this.

Fixtures.
- ``s3_server`` (session): a :class:`tests.support.s3server.S3Server` (moto over HTTP on
  127.0.0.1, port chosen at run time, O(range) ranged GETs); ``.endpoint_url``.
- ``s3_bucket``: a fresh bucket ``t-<uuid>`` on it, yielded as ``S3Bucket(endpoint, bucket)``
  (a named tuple); emptied and deleted afterwards.
- ``store_kind``: "memory", "local", "s3" (the s3 one is marked ``s3``).
- ``store_factory`` (async): ``make(**options)`` builds another store of that kind over the same
  bucket / folder / memory bucket (two clients of one bucket, other part sizes...); S3 stores
  use path-style addressing and 5 MiB parts unless told otherwise. All are closed afterwards.
- ``store`` (async): ``store_factory()`` once: the store every store-level test runs against.
- ``fault_proxy``: a :class:`tests.support.faultproxy.FaultProxy` in front of ``s3_server``,
  injecting nothing until the test sets ``rate`` or calls ``inject``; stopped afterwards.

Log hygiene (STYLE.md, after pytest_checklogs): an autouse fixture fails a test on any record
at WARNING or above from a ``cssfs`` logger, unless the test expects logs: it is marked
``@pytest.mark.expect_logs`` (optionally with regexes every such record must match), or it
requests ``caplog`` (then it checks its logs itself).
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from cssfs.store.base import MIN_PART_SIZE, ObjectStore

# The CLI tests' fixtures ``env`` (a private HOME) and ``run`` (cssfs in-process); a module
# that defines its own ``env`` or ``run`` fixture overrides them.
pytest_plugins = ["tests.support.clirun"]

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/cssfs-tests/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/cssfs-tests/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
for _name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_name, None)
os.environ.update(_AWS_ENV)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "expect_logs(*patterns): the test may log WARNING+ from cssfs (matching the regexes, "
        "if given)",
    )


# -- log hygiene ------------------------------------------------------------------------------


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def _log_hygiene(request: pytest.FixtureRequest) -> Iterator[None]:
    marker = request.node.get_closest_marker("expect_logs")
    if "caplog" in request.fixturenames or (marker is not None and not marker.args):
        yield
        return
    patterns = [re.compile(p) for p in marker.args] if marker is not None else []
    collector = _Collector()
    logger = logging.getLogger("cssfs")
    logger.addHandler(collector)
    try:
        yield
    finally:
        logger.removeHandler(collector)
    unexpected = [
        r for r in collector.records if not any(p.search(r.getMessage()) for p in patterns)
    ]
    if unexpected:
        lines = "\n".join(f"  {r.levelname} {r.name}: {r.getMessage()}" for r in unexpected)
        pytest.fail(
            f"unexpected cssfs log records at WARNING+ (mark the test expect_logs if intended):"
            f"\n{lines}",
            pytrace=False,
        )


# -- S3 ---------------------------------------------------------------------------------------


class S3Bucket(NamedTuple):
    endpoint: str
    bucket: str


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Any]:
    from tests.support.s3server import S3Server

    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _s3_admin(s3_server: Any) -> Any:
    """A plain boto3 client on the test server, for fixtures (bucket setup and cleanup)."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_server.endpoint_url)


@pytest.fixture
def s3_bucket(s3_server: Any, _s3_admin: Any) -> Iterator[S3Bucket]:
    bucket = f"t-{uuid.uuid4().hex}"
    _s3_admin.create_bucket(Bucket=bucket)
    try:
        yield S3Bucket(s3_server.endpoint_url, bucket)
    finally:
        _empty_and_delete(_s3_admin, bucket)


def _empty_and_delete(client: Any, bucket: str) -> None:
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", ())]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", ())
        for upload in uploads:
            client.abort_multipart_upload(
                Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
        client.delete_bucket(Bucket=bucket)
    except client.exceptions.NoSuchBucket:
        pass


@pytest.fixture
def fault_proxy(s3_server: Any) -> Iterator[Any]:
    from tests.support.faultproxy import FaultProxy

    proxy = FaultProxy(s3_server.endpoint_url).start()
    try:
        yield proxy
    finally:
        proxy.stop()


# -- the parametrized store -------------------------------------------------------------------


@pytest.fixture(params=["memory", "local", pytest.param("s3", marks=pytest.mark.s3)])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def _store_target(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """Where the stores of this test live: a memory bucket, a folder, or an S3 bucket."""
    if store_kind == "memory":
        from cssfs.store.memory import MemoryBucket

        return MemoryBucket()
    if store_kind == "local":
        root = tmp_path / "store"
        root.mkdir()
        return root
    return request.getfixturevalue("s3_bucket")


@pytest.fixture
async def store_factory(
    store_kind: str, _store_target: Any
) -> AsyncIterator[Callable[..., ObjectStore]]:
    made: list[ObjectStore] = []

    def make(**options: Any) -> ObjectStore:
        store: ObjectStore
        if store_kind == "memory":
            from cssfs.store.memory import MemoryStore

            store = MemoryStore(bucket=_store_target, **options)
        elif store_kind == "local":
            from cssfs.store.local import LocalStore

            store = LocalStore(_store_target, **options)
        else:
            from cssfs.store.s3 import S3Store

            options.setdefault("part_size", MIN_PART_SIZE)
            options.setdefault("path_style", True)
            store = S3Store(_store_target.bucket, endpoint_url=_store_target.endpoint, **options)
        made.append(store)
        return store

    try:
        yield make
    finally:
        for store in made:
            await store.aclose()


@pytest.fixture
async def store(store_factory: Callable[..., ObjectStore]) -> ObjectStore:
    return store_factory()
