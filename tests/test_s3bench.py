"""The bench's S3 server (scripts/benchlib/s3bench.py): a completed multipart object is its parts.

The server answers CompleteMultipartUpload by chaining the parts' buffers instead of copying them.
These tests run it as the bench does (a child process, first stdout line the endpoint) and check
that a multipart object reads back exactly like the same bytes put with ``put_object``, that the
ETag, checksum and errors are moto's, and -- by counting the server's open part files, not by
timing -- that the parts live exactly as long as the object (copies and versions included).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import boto3
import botocore.config
import botocore.exceptions
import pytest

from tests.support.procs import end_process

pytestmark = pytest.mark.s3

MiB = 1024 * 1024
PART = 5 * MiB  # moto's minimum part size; parts this big are spooled to a temp file
REPO = Path(__file__).resolve().parents[1]
DATA = random.Random(20240613).randbytes(2 * PART + MiB + 3)
SIZES = [PART, PART, MiB + 3]  # three parts: the last one smaller, and kept in memory


class BenchServer(NamedTuple):
    endpoint: str
    pid: int
    tmpdir: Path

    def part_files(self) -> int:
        """The server's open temp files (spooled object and part buffers)."""
        fd_dir = Path(f"/proc/{self.pid}/fd")
        n = 0
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except FileNotFoundError:  # closed while we looked
                continue
            n += target.startswith(str(self.tmpdir))
        return n


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BenchServer]:
    tmpdir = tmp_path_factory.mktemp("s3bench")
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'scripts'}", TMPDIR=str(tmpdir))
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchlib.s3bench", "--port", "0"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:"), endpoint
        yield BenchServer(endpoint, proc.pid, tmpdir)
    finally:
        end_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module")
def client(server: BenchServer) -> Iterator[Any]:
    config = botocore.config.Config(
        retries={"mode": "standard", "total_max_attempts": 1},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    c = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=config,
    )
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def bucket(client: Any) -> str:
    name = f"t-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    return name


def _split(data: bytes, sizes: list[int]) -> list[bytes]:
    parts, off = [], 0
    for n in sizes:
        parts.append(data[off : off + n])
        off += n
    assert off == len(data)
    return parts


def _upload(
    client: Any, bucket: str, key: str, parts: list[bytes], **create: Any
) -> tuple[str, list[dict[str, Any]]]:
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, **create)["UploadId"]
    done = []
    for i, body in enumerate(parts, 1):
        extra = (
            {"ChecksumAlgorithm": create["ChecksumAlgorithm"]}
            if "ChecksumAlgorithm" in create
            else {}
        )
        r = client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=i, Body=body, **extra
        )
        done.append({"PartNumber": i, "ETag": r["ETag"]})
    return upload_id, done


def _complete(client: Any, bucket: str, key: str, upload_id: str, parts: list[Any]) -> Any:
    return client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
    )


def _multipart(client: Any, bucket: str, key: str, **create: Any) -> Any:
    upload_id, parts = _upload(client, bucket, key, _split(DATA, SIZES), **create)
    return _complete(client, bucket, key, upload_id, parts)


def _multipart_etag(parts: list[bytes]) -> str:
    md5s = b"".join(hashlib.md5(p).digest() for p in parts)
    return f'"{hashlib.md5(md5s).hexdigest()}-{len(parts)}"'


def _error_code(call: Callable[[], Any]) -> str:
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        call()
    return str(exc.value.response["Error"]["Code"])


def _answer(client: Any, bucket: str, key: str, range_: str | None) -> tuple[Any, ...]:
    kwargs = {"Range": range_} if range_ else {}
    try:
        r = client.get_object(Bucket=bucket, Key=key, **kwargs)
    except botocore.exceptions.ClientError as exc:
        return ("error", exc.response["Error"]["Code"])
    return (
        r["ResponseMetadata"]["HTTPStatusCode"],
        r.get("ContentRange"),
        r["ContentLength"],
        r["Body"].read(),
    )


def test_reads_match_put_object(client: Any, bucket: str) -> None:
    client.put_object(Bucket=bucket, Key="single", Body=DATA)
    _multipart(client, bucket, "multi")
    n = len(DATA)
    ranges = [
        None,  # whole object
        "bytes=0-0",
        f"bytes={PART - 1}-{PART}",  # the two bytes either side of the first boundary
        f"bytes={PART - 10}-{2 * PART + 10}",  # all three parts
        f"bytes={PART - 100}-{PART + 3 * MiB}",  # > 1 MiB: the streamed path, across a boundary
        f"bytes={2 * PART}-",  # exactly the last part
        f"bytes={2 * PART - 1}-",
        "bytes=-100",
        f"bytes=1-{n - 2}",
        f"bytes={n - 1}-{n + 100}",  # runs past the end
        f"bytes={n}-",  # unsatisfiable
    ]
    for range_ in ranges:
        want = _answer(client, bucket, "single", range_)
        got = _answer(client, bucket, "multi", range_)
        assert got == want, range_
    assert _answer(client, bucket, "multi", None)[3] == DATA


def test_head_etag_metadata_and_tags(client: Any, bucket: str) -> None:
    create = {"Metadata": {"colour": "blue"}, "ContentType": "application/x-test", "Tagging": "k=v"}
    upload_id, parts = _upload(client, bucket, "multi", _split(DATA, SIZES), **create)
    done = _complete(client, bucket, "multi", upload_id, parts)
    etag = _multipart_etag(_split(DATA, SIZES))
    assert done["ETag"] == etag
    head = client.head_object(Bucket=bucket, Key="multi")
    assert (head["ContentLength"], head["ETag"]) == (len(DATA), etag)
    assert head["Metadata"] == {"colour": "blue"}
    assert head["ContentType"] == "application/x-test"
    tags = client.get_object_tagging(Bucket=bucket, Key="multi")["TagSet"]
    assert tags == [{"Key": "k", "Value": "v"}]
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    # Completing the same upload again answers with the object it made (moto is idempotent).
    assert _complete(client, bucket, "multi", upload_id, parts)["ETag"] == etag
    assert client.get_object(Bucket=bucket, Key="multi")["Body"].read() == DATA


def _checksums(client: Any, bucket: str, key: str) -> dict[str, Any]:
    """What a client can see of an object's checksum, ETag and parts."""
    head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    get = client.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED", Range="bytes=0-0")
    seen: dict[str, Any] = {
        "head": {k: v for k, v in head.items() if k.startswith(("Checksum", "ETag"))},
        "get": {k: v for k, v in get.items() if k.startswith(("Checksum", "ETag"))},
    }
    try:
        attrs = client.get_object_attributes(
            Bucket=bucket, Key=key, ObjectAttributes=["ETag", "Checksum", "ObjectSize"]
        )
        seen["attributes"] = {k: v for k, v in attrs.items() if k != "ResponseMetadata"}
        seen["attributes"].pop("LastModified", None)
    except botocore.exceptions.ClientError as exc:
        seen["attributes"] = exc.response["Error"]["Code"]
    return seen


@pytest.mark.parametrize("algorithm", [None, "CRC32", "SHA256"])
def test_checksums_match_stock_moto(
    client: Any, bucket: str, s3_bucket: Any, algorithm: str | None
) -> None:
    """The same upload on the test server (stock moto completion) and on the bench server."""
    create = {"ChecksumAlgorithm": algorithm} if algorithm else {}
    stock = boto3.client("s3", endpoint_url=s3_bucket.endpoint, config=client.meta.config)
    try:
        _multipart(stock, s3_bucket.bucket, "multi", **create)
        want = _checksums(stock, s3_bucket.bucket, "multi")
    finally:
        stock.close()
    _multipart(client, bucket, "multi", **create)
    assert _checksums(client, bucket, "multi") == want
    if algorithm == "CRC32":  # moto's COMPOSITE CRC32: the CRC32 of the parts' CRC32s
        crcs = b"".join(binascii.crc32(p).to_bytes(4, "big") for p in _split(DATA, SIZES))
        assert (
            want["head"]["ChecksumCRC32"]
            == base64.b64encode(binascii.crc32(crcs).to_bytes(4, "big")).decode()
        )
    # A copy reads the source's checksum (computed from the parts on first use) and bytes.
    client.copy_object(Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": "multi"})
    assert client.get_object(Bucket=bucket, Key="copy")["Body"].read() == DATA


def test_copy_and_upload_part_copy(client: Any, bucket: str) -> None:
    _multipart(client, bucket, "multi")
    source = {"Bucket": bucket, "Key": "multi"}
    client.copy_object(Bucket=bucket, Key="copy", CopySource=source)
    assert client.get_object(Bucket=bucket, Key="copy")["Body"].read() == DATA

    first = (PART - 1000, 2 * PART - 1001)  # 5 MiB across the first boundary
    last = (2 * PART - 10, 2 * PART + 9)  # 20 bytes across the second
    upload_id = client.create_multipart_upload(Bucket=bucket, Key="assembled")["UploadId"]
    parts = []
    for i, (a, b) in enumerate([first, last], 1):
        r = client.upload_part_copy(
            Bucket=bucket,
            Key="assembled",
            UploadId=upload_id,
            PartNumber=i,
            CopySource=source,
            CopySourceRange=f"bytes={a}-{b}",
        )
        parts.append({"PartNumber": i, "ETag": r["CopyPartResult"]["ETag"]})
    _complete(client, bucket, "assembled", upload_id, parts)
    want = DATA[first[0] : first[1] + 1] + DATA[last[0] : last[1] + 1]
    assert client.get_object(Bucket=bucket, Key="assembled")["Body"].read() == want

    # The copy shares the source's upload in moto; deleting it must not close the source's parts.
    client.delete_object(Bucket=bucket, Key="copy")
    assert client.get_object(Bucket=bucket, Key="multi")["Body"].read() == DATA


def test_parts_live_as_long_as_the_object(client: Any, bucket: str, server: BenchServer) -> None:
    base = server.part_files()
    _multipart(client, bucket, "multi")
    held = server.part_files()
    assert held >= base + 2  # the two 5 MiB parts, spooled to files, and nothing released

    client.put_object(Bucket=bucket, Key="multi", Body=b"new")  # overwrite: parts released
    assert server.part_files() == base
    assert client.get_object(Bucket=bucket, Key="multi")["Body"].read() == b"new"

    _multipart(client, bucket, "multi")
    client.copy_object(Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": "multi"})
    with_copy = server.part_files()
    client.delete_object(Bucket=bucket, Key="copy")  # the copy's own buffer only
    assert server.part_files() == with_copy - 1
    assert client.get_object(Bucket=bucket, Key="multi")["Body"].read() == DATA
    client.delete_object(Bucket=bucket, Key="multi")  # delete: parts released
    assert server.part_files() == base
    assert _error_code(lambda: client.head_object(Bucket=bucket, Key="multi")) == "404"


def test_versions_keep_their_parts(client: Any, bucket: str, server: BenchServer) -> None:
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    base = server.part_files()
    v1 = _multipart(client, bucket, "multi")["VersionId"]
    v2 = client.put_object(Bucket=bucket, Key="multi", Body=b"second")["VersionId"]
    assert client.get_object(Bucket=bucket, Key="multi")["Body"].read() == b"second"
    old = client.get_object(
        Bucket=bucket, Key="multi", VersionId=v1, Range=f"bytes={PART - 5}-{PART + 4}"
    )
    assert old["Body"].read() == DATA[PART - 5 : PART + 5]
    versions = client.list_object_versions(Bucket=bucket)["Versions"]
    assert {(v["VersionId"], v["Size"]) for v in versions} == {(v1, len(DATA)), (v2, 6)}
    assert client.get_object(Bucket=bucket, Key="multi", VersionId=v1)["Body"].read() == DATA
    # ListObjectVersions deep-copies every version and moto keeps the copies (stock moto too):
    # count from here. Deleting the version releases its two spooled parts.
    held = server.part_files()
    assert held >= base + 2
    client.delete_object(Bucket=bucket, Key="multi", VersionId=v1)
    assert server.part_files() == held - 2
    client.delete_object(Bucket=bucket, Key="multi", VersionId=v2)


def test_completion_errors_are_moto_s(client: Any, bucket: str, server: BenchServer) -> None:
    parts = _split(DATA, SIZES)
    upload_id, done = _upload(client, bucket, "multi", parts)
    wrong = [dict(done[0], ETag='"' + "0" * 32 + '"'), *done[1:]]
    assert (
        _error_code(lambda: _complete(client, bucket, "multi", upload_id, wrong)) == "InvalidPart"
    )
    missing = [*done, {"PartNumber": 4, "ETag": done[0]["ETag"]}]
    assert (
        _error_code(lambda: _complete(client, bucket, "multi", upload_id, missing)) == "InvalidPart"
    )
    assert _error_code(lambda: _complete(client, bucket, "multi", upload_id, [])) == "MalformedXML"
    # The upload survives a refused completion, as in stock moto, and then completes.
    _complete(client, bucket, "multi", upload_id, done)
    assert client.get_object(Bucket=bucket, Key="multi")["Body"].read() == DATA

    base = server.part_files()
    small = [DATA[:MiB], DATA[MiB : MiB + PART]]  # a non-last part under 5 MiB
    upload_id, done = _upload(client, bucket, "small", small)
    assert (
        _error_code(lambda: _complete(client, bucket, "small", upload_id, done)) == "EntityTooSmall"
    )
    assert _error_code(lambda: client.head_object(Bucket=bucket, Key="small")) == "404"
    client.abort_multipart_upload(Bucket=bucket, Key="small", UploadId=upload_id)
    assert server.part_files() == base
