"""The test S3 server (tests/support/s3server.py): O(range) ranged GETs, identical answers, CLI.

Cost is proven by counting the bytes moto reads out of its object buffers, not by timing: a
4 KiB ranged GET of a 64 MiB object must read 4 KiB (stock moto reads 64 MiB).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import pytest

from tests.support.s3server import COUNTERS, stock_ranges

pytestmark = pytest.mark.s3

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]
_VOLATILE = {"date", "x-amz-request-id", "x-amzn-requestid", "x-amz-id-2", "last-modified"}


@pytest.fixture
def client(s3_bucket: Any) -> Iterator[Any]:
    config = botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 1})
    c = boto3.client("s3", endpoint_url=s3_bucket.endpoint, config=config)
    try:
        yield c
    finally:
        c.close()


def test_ranged_get_reads_only_the_range(client: Any, s3_bucket: Any) -> None:
    size = 64 * MiB
    client.put_object(Bucket=s3_bucket.bucket, Key="big", Body=random.randbytes(size))
    COUNTERS.reset()
    got = client.get_object(Bucket=s3_bucket.bucket, Key="big", Range="bytes=1000-5095")
    assert len(got["Body"].read()) == 4096
    assert (COUNTERS.whole_bytes, COUNTERS.range_bytes, COUNTERS.range_reads) == (0, 4096, 1)
    with stock_ranges():  # what stock moto does for the same request
        COUNTERS.reset()
        client.get_object(Bucket=s3_bucket.bucket, Key="big", Range="bytes=1000-5095")[
            "Body"
        ].read()
        assert COUNTERS.whole_bytes == size
    COUNTERS.reset()
    assert len(client.get_object(Bucket=s3_bucket.bucket, Key="big")["Body"].read()) == size
    assert COUNTERS.whole_bytes == size and COUNTERS.range_bytes == 0


def _answer(client: Any, bucket: str, key: str, range_: str | None, method: str) -> Any:
    params: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if range_ is not None:
        params["Range"] = range_
    try:
        if method == "head":
            response = client.head_object(**params)
            body = b""
        else:
            response = client.get_object(**params)
            body = response["Body"].read()
    except botocore.exceptions.ClientError as exc:
        response, body = exc.response, b""
    meta = response["ResponseMetadata"]
    headers = {k: v for k, v in meta["HTTPHeaders"].items() if k not in _VOLATILE}
    error = response.get("Error", {}).get("Code")
    return meta["HTTPStatusCode"], headers, body, error


RANGES = [
    None,
    "",
    "bytes=0-0",
    "bytes=0-99",
    "bytes=100-",
    "bytes=999-999",
    "bytes=990-5000",
    "bytes=-100",
    "bytes=-5000",
    "bytes=-0",
    "bytes=1000-",
    "bytes=1000-1001",
    "bytes=5-2",
    "bytes=0-1,5-6",
    "bytes=abc",
    "items=0-5",
]


def test_answers_are_identical_to_stock_moto(client: Any, s3_bucket: Any) -> None:
    data = os.urandom(1000)
    client.put_object(Bucket=s3_bucket.bucket, Key="k", Body=data)
    client.put_object(Bucket=s3_bucket.bucket, Key="empty", Body=b"")
    for key in ("k", "empty"):
        for range_ in RANGES:
            for method in ("get", "head"):
                fast = _answer(client, s3_bucket.bucket, key, range_, method)
                with stock_ranges():
                    stock = _answer(client, s3_bucket.bucket, key, range_, method)
                assert fast == stock, (key, range_, method)
    status, headers, body, _ = _answer(client, s3_bucket.bucket, "k", "bytes=10-19", "get")
    assert (status, body, headers["content-range"]) == (206, data[10:20], "bytes 10-19/1000")


def test_upload_part_copy_reads_only_the_source_range(client: Any, s3_bucket: Any) -> None:
    bucket = s3_bucket.bucket
    data = os.urandom(8 * MiB)
    client.put_object(Bucket=bucket, Key="src", Body=data)
    upload = client.create_multipart_upload(Bucket=bucket, Key="dst")["UploadId"]
    part1 = os.urandom(5 * MiB)
    p1 = client.upload_part(Bucket=bucket, Key="dst", UploadId=upload, PartNumber=1, Body=part1)
    COUNTERS.reset()
    p2 = client.upload_part_copy(
        Bucket=bucket,
        Key="dst",
        UploadId=upload,
        PartNumber=2,
        CopySource={"Bucket": bucket, "Key": "src"},
        CopySourceRange=f"bytes={3 * MiB}-{8 * MiB - 1}",
    )
    assert (COUNTERS.whole_bytes, COUNTERS.range_bytes) == (0, 5 * MiB)
    client.complete_multipart_upload(
        Bucket=bucket,
        Key="dst",
        UploadId=upload,
        MultipartUpload={
            "Parts": [
                {"PartNumber": 1, "ETag": p1["ETag"]},
                {"PartNumber": 2, "ETag": p2["CopyPartResult"]["ETag"]},
            ]
        },
    )
    assert client.get_object(Bucket=bucket, Key="dst")["Body"].read() == part1 + data[3 * MiB :]


def test_cli_prints_the_endpoint_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.s3server", "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:")
        c = boto3.client("s3", endpoint_url=endpoint)
        c.create_bucket(Bucket="cli-bucket")
        c.put_object(Bucket="cli-bucket", Key="k", Body=b"v")
        assert c.get_object(Bucket="cli-bucket", Key="k", Range="bytes=0-0")["Body"].read() == b"v"
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert proc.stderr is not None and proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
