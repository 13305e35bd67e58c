"""S3Store under faults: moto behind tests.support.faultproxy (errors, resets, stalls, outages).

What must hold: transient failures are retried inside the store and never reach the caller
while the budget lasts (uploads and downloads come out byte-identical); once the budget is spent
the caller gets StoreUnavailableError naming the operation and the object, quickly, and no
partial object ever appears; permanent errors fail at the first answer, without retries.
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio

from cssfs.errors import (
    AccessDeniedError,
    NoSuchBucketError,
    NoSuchObjectError,
    StoreUnavailableError,
)
from cssfs.store import PartSource
from cssfs.store.base import MIN_PART_SIZE
from cssfs.store.retry import RetryPolicy, TransientError, retrying
from cssfs.store.s3 import S3Store

pytestmark = pytest.mark.s3

P = MIN_PART_SIZE
PATIENT = RetryPolicy(attempts=8, budget=60.0, base_delay=0.01, max_delay=0.2)
TINY = RetryPolicy(attempts=4, budget=2.0, base_delay=0.01, max_delay=0.05)


def blob(n: int, seed: int = 0) -> bytes:
    block = random.Random(seed).randbytes(65537)
    return (block * (n // len(block) + 1))[:n]


def via_proxy(proxy: Any, bucket: Any, retry: RetryPolicy = PATIENT, **options: Any) -> S3Store:
    options.setdefault("read_timeout", 1.5)
    return S3Store(
        bucket.bucket,
        endpoint_url=proxy.endpoint_url,
        path_style=True,
        part_size=P,
        retry=retry,
        connect_timeout=1.0,
        seed=1,
        **options,
    )


def direct(bucket: Any) -> S3Store:
    return S3Store(bucket.bucket, endpoint_url=bucket.endpoint, path_style=True, part_size=P)


# -- random faults ----------------------------------------------------------------------------


@pytest.mark.expect_logs("attempt", "abort")  # a run of 4+ failures on one request logs WARNING
async def test_upload_and_download_survive_30_percent_faults(
    fault_proxy: Any, s3_bucket: Any
) -> None:
    fault_proxy.rate = 0.3
    head, rest = blob(4096, 1), blob(2 * P + 4321, 2)

    async def produce() -> AsyncIterator[bytes]:
        for i in range(0, len(rest), 1 << 20):
            yield rest[i : i + (1 << 20)]

    async with via_proxy(fault_proxy, s3_bucket) as store:
        info = await store.put("env", PartSource(len(head), produce(), lambda: head))
        small = await store.put("small", b"tiny", if_none_match=True)
        assert await store.get("env") == head + rest
        for start, end in [(0, 4096), (P - 10, P + 10), (len(rest), None)]:
            assert await store.get("env", start, end) == (head + rest)[start:end]
        assert (await store.head("env")).etag == info.etag
        listing = await store.list()
        assert [(o.key, o.etag) for o in listing.objects] == [
            ("env", info.etag),
            ("small", small.etag),
        ]
        new = await store.replace_head("env", b"N" * 4096, 4096, if_match=info.etag)
        await store.copy("small", "small2")
        await store.delete(["small"])
        injected = sum(fault_proxy.injected.values())
        assert injected > 0 and store.stats.retries > 0
    async with direct(s3_bucket) as check:  # and what landed is exactly that
        assert await check.get("env") == b"N" * 4096 + rest
        assert (await check.head("env")).etag == new.etag
        assert [o.key for o in (await check.list()).objects] == ["env", "small2"]


# -- one fault at a time ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["500", "503", "slowdown", "reset", "drop", "stall"])
async def test_each_transient_fault_is_retried(fault_proxy: Any, s3_bucket: Any, kind: str) -> None:
    async with via_proxy(fault_proxy, s3_bucket, read_timeout=0.5) as store:
        await store.put("k", b"value")
        fault_proxy.inject(kind)
        assert await store.get("k") == b"value"
        fault_proxy.inject(kind)
        await store.put("k", b"value 2")
        assert fault_proxy.injected[kind] == 2
        assert store.stats.retries == 2
    async with direct(s3_bucket) as check:
        assert await check.get("k") == b"value 2"


async def test_lost_answer_to_a_conditional_put(fault_proxy: Any, s3_bucket: Any) -> None:
    # The first attempt lands but its answer is lost; the retry gets 412 from the object it
    # just wrote. The store recognises its own body by ETag and reports success.
    def is_put(method: str, target: str) -> bool:
        return method == "PUT" and "/k" in target

    async with via_proxy(fault_proxy, s3_bucket) as store:
        fault_proxy.inject("drop", match=is_put)
        created = await store.put("k", b"v1", if_none_match=True)
        fault_proxy.inject("drop", match=is_put)
        updated = await store.put("k", b"v2", if_match=created.etag)
        assert fault_proxy.injected["drop"] == 2 and store.stats.retries == 2
        assert await store.get("k") == b"v2"
        assert (await store.head("k")).etag == updated.etag


async def test_errors_exhaust_attempts(fault_proxy: Any, s3_bucket: Any) -> None:
    policy = RetryPolicy(attempts=3, budget=10.0, base_delay=0.01, max_delay=0.02)
    async with via_proxy(fault_proxy, s3_bucket, retry=policy) as store:
        fault_proxy.inject("503", 10)
        fault_proxy.reset_counts()
        with pytest.raises(StoreUnavailableError) as caught:
            await store.get("some/key")
        assert fault_proxy.requests == 3
    message = str(caught.value)
    assert f"GET s3://{s3_bucket.bucket}/some/key" in message and "3 attempts" in message
    assert "\n" not in message


# -- permanent errors -------------------------------------------------------------------------


async def test_permanent_errors_fail_without_retry(fault_proxy: Any, s3_bucket: Any) -> None:
    async with via_proxy(fault_proxy, s3_bucket) as store:
        await store.put("k", b"v")
        fault_proxy.reset_counts()
        fault_proxy.inject("403")
        with pytest.raises(AccessDeniedError) as denied:
            await store.get("k")
        fault_proxy.inject("403")
        with pytest.raises(AccessDeniedError):
            await store.put("k", b"w")
        fault_proxy.inject("nosuchbucket")
        with pytest.raises(NoSuchBucketError):
            await store.list()
        with pytest.raises(NoSuchObjectError):
            await store.get("missing")
        assert fault_proxy.requests == 4 and store.stats.retries == 0
        assert "access denied" in str(denied.value) and "\n" not in str(denied.value)
    fault_proxy.reset_counts()
    missing = S3Store(
        "t-no-such-bucket", endpoint_url=fault_proxy.endpoint_url, path_style=True, retry=PATIENT
    )
    async with missing:
        with pytest.raises(NoSuchBucketError, match="t-no-such-bucket"):
            await missing.put("k", b"v")
        assert fault_proxy.requests == 1 and missing.stats.retries == 0


# -- outages ----------------------------------------------------------------------------------


async def test_outage_longer_than_the_budget(fault_proxy: Any, s3_bucket: Any) -> None:
    async with via_proxy(fault_proxy, s3_bucket, retry=TINY) as store:
        await store.put("k", b"v")
        with fault_proxy.outage():
            ops: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                ("PUT", lambda: store.put("new", b"x")),
                ("GET", lambda: store.get("k")),
                ("HEAD", lambda: store.head("k")),
                ("LIST", lambda: store.list()),
            ]
            for what, op in ops:
                with trio.fail_after(10):  # the budget is 2 s
                    with pytest.raises(StoreUnavailableError, match=what):
                        await op()
        assert store.stats.retries == 4 * (TINY.attempts - 1)
        assert await store.get("k") == b"v"  # and it works again once the store is back
    async with direct(s3_bucket) as check:
        assert [o.key for o in (await check.list()).objects] == ["k"]


@pytest.mark.expect_logs("could not abort")
async def test_outage_during_multipart_upload_leaves_nothing(
    fault_proxy: Any, s3_bucket: Any, _s3_admin: Any
) -> None:
    store = via_proxy(fault_proxy, s3_bucket, retry=TINY)

    async def produce() -> AsyncIterator[bytes]:
        yield blob(P, 1)
        yield blob(P, 2)
        fault_proxy.down()  # the store goes away in the middle of the upload
        yield blob(P, 3)
        yield blob(100, 4)

    with trio.fail_after(20), pytest.raises(StoreUnavailableError):
        await store.put("half", PartSource(0, produce(), lambda: b""))
    fault_proxy.up()
    with pytest.raises(NoSuchObjectError):  # no partial object, ever
        await direct(s3_bucket).head("half")
    # the abort could not reach the store either; aclose() tries again
    assert len(_s3_admin.list_multipart_uploads(Bucket=s3_bucket.bucket).get("Uploads", [])) == 1
    await store.aclose()
    assert _s3_admin.list_multipart_uploads(Bucket=s3_bucket.bucket).get("Uploads", []) == []


def test_fault_proxy_down_refuses_connections(fault_proxy: Any) -> None:
    host, port = "127.0.0.1", int(fault_proxy.endpoint_url.rsplit(":", 1)[1])
    socket.create_connection((host, port), timeout=5).close()
    fault_proxy.down()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=5)
    fault_proxy.up()
    socket.create_connection((host, port), timeout=5).close()


# -- the retry policy itself ------------------------------------------------------------------


async def test_retry_logs_rise_with_failures(caplog: pytest.LogCaptureFixture) -> None:
    policy = RetryPolicy(attempts=6, budget=10.0, base_delay=0.0, max_delay=0.0)
    failures = 5

    async def attempt() -> str:
        nonlocal failures
        if failures:
            failures -= 1
            raise TransientError("HTTP 503 SlowDown")
        return "done"

    with caplog.at_level(logging.DEBUG, logger="cssfs.store.retry"):
        assert await retrying(policy, "GET s3://b/k", attempt, rng=random.Random(0)) == "done"
    levels = [r.levelno for r in caplog.records if r.name == "cssfs.store.retry"]
    assert levels == [logging.DEBUG, logging.INFO, logging.INFO, logging.WARNING, logging.WARNING]
    assert all("GET s3://b/k" in r.getMessage() for r in caplog.records)


def test_backoff_is_full_jitter_under_a_ceiling() -> None:
    policy = RetryPolicy(base_delay=0.25, max_delay=8.0)
    rng = random.Random(42)
    for failures in range(1, 12):
        ceiling = min(8.0, 0.25 * 2 ** (failures - 1))
        delays = [policy.backoff(failures, rng) for _ in range(50)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # spread over the whole interval, not clustered
