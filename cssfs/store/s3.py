"""store.s3: an ObjectStore on S3, or any S3-compatible endpoint, through botocore (boto3's core).

Knows: boto3/botocore, the S3 API and its error codes. Must not know: crypto, envelopes, FUSE.

Threads. Every boto3 call runs in ``trio.to_thread.run_sync`` behind one ``CapacityLimiter``
sized like botocore's connection pool (``max_connections``), so the trio loop never blocks and no
thread ever waits for a pooled connection.

Failures. botocore's own retries are off (one attempt per call); :mod:`cssfs.store.retry` retries
transient failures here and nowhere else: 5xx, SlowDown/throttling, 429, connection resets and
refusals, timeouts, truncated bodies. Permanent ones fail at once with the specific error and a
one-line message: NoSuchKey -> ``NoSuchObjectError``, NoSuchBucket -> ``NoSuchBucketError``,
AccessDenied/403/bad credentials -> ``AccessDeniedError``, 412 -> ``PreconditionFailedError``.

Uploads. A body up to ``part_size`` is one PutObject; a larger one, a file object or a
:class:`~cssfs.store.base.PartSource` becomes a multipart upload whose parts go up in parallel,
with at most ``concurrency`` parts in memory (plus part 1 of a PartSource, which is uploaded
last). A multipart upload that fails is aborted: no partial object ever appears. Conditions go on
PutObject / CompleteMultipartUpload (``If-Match``, ``If-None-Match: *``); before a conditional
multipart upload a HEAD checks the condition too, so an upload that is bound to fail is not sent
(and servers that ignore If-Match on CompleteMultipartUpload, such as moto, still get it mostly
right). If a conditional request is retried after its first attempt succeeded but the answer was
lost, the retry gets 412; the store then checks whether the object's ETag is the one its own body
would have (MD5, or MD5 of part MD5s) and, if so, reports success.

Payload signing is off (``UNSIGNED-PAYLOAD``, what botocore already sends over HTTPS when a
checksum goes with the body). Over plain HTTP botocore would otherwise hash every body with
SHA-256 for the request signature -- a second pass over all the data, which buys nothing here:
the CRC32 checksums still catch damage in transit, and what cssfs stores is authenticated end to
end (envelopes are GCM-sealed and signed; a changed object fails when it is read).

Upload markers. Every multipart upload this store starts is marked by an empty object
``<prefix>.cssfs-uploads/<upload_marker_name>``, put alongside its first parts (a failure to put
it is logged at DEBUG and does not stop the upload). S3 lists incomplete uploads with neither
metadata nor tags, so the marker is how ``cssfs fsck`` tells an upload cssfs started (and may
abort when it is stale) from another tool's (which it must leave alone). Markers of finished
uploads are deleted in one batch at the next multipart upload or at ``aclose()``; one left by a
crash is garbage ``cssfs fsck --repair`` removes. ``list_uploads`` looks for an upload's marker
below every folder above its key, so a store on a shorter prefix finds it too.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import email.utils
import hashlib
import http.client
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import botocore.config
import botocore.exceptions
import botocore.response
import botocore.session
import botocore.utils
import trio

from cssfs import __version__
from cssfs.errors import (
    AccessDeniedError,
    ConfigError,
    NoSuchBucketError,
    NoSuchObjectError,
    PreconditionFailedError,
    StoreError,
)
from cssfs.store.base import (
    DEFAULT_CONCURRENCY,
    DEFAULT_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    UPLOAD_MARKERS,
    Body,
    Listing,
    ObjectInfo,
    PartReader,
    PartSource,
    StoreBase,
    UploadInfo,
    as_part_source,
    batched,
    check_range,
    check_replace_head,
    upload_marker_name,
)
from cssfs.store.retry import DEFAULT_RETRY, RetryPolicy, TransientError, retrying
from cssfs.store.s3data import use_lean_loader

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

__all__ = ["DEFAULT_MAX_CONNECTIONS", "MAX_COPY_PART_SIZE", "S3Store"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_CONNECTIONS = 10
MAX_COPY_PART_SIZE = 5 * 1024**3  # S3: the largest part, and the largest CopyObject source
DEFAULT_COPY_PART_SIZE = 1024**3  # UploadPartCopy ranges of replace_head, copied in parallel
_ABORT_RETRY = RetryPolicy(attempts=3, budget=5.0, base_delay=0.1, max_delay=1.0)
_READ_PIECE = 1024 * 1024  # get_into reads a body this much at a time (portable path)
_ABORT_SECONDS = 15  # at most this long in an abort, even while the caller is cancelled

_TRANSIENT_CODES = frozenset(
    {
        "BadDigest",
        "ConditionalRequestConflict",
        "IncompleteBody",
        "InternalError",
        "OperationAborted",
        "RequestLimitExceeded",
        "RequestTimeout",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
    }
)
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "ExpiredToken",
        "Forbidden",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
    }
)


class _InvalidRange(StoreError):
    """The range starts at or after the end of the object (HTTP 416)."""


_Job = Callable[[], Awaitable[str]]  # uploads or copies one part; its ETag
_Start = Callable[[int, _Job, bool], None]  # (part number, job, holds a memory token)


@dataclass(frozen=True)
class _Upload:
    key: str  # relative key
    full_key: str
    upload_id: str


def _is_marker(key: str) -> bool:
    """A key in an upload-marker folder (at any depth: a store on a longer prefix puts its
    markers below it). Listings never show them, as a folder store never shows its temp files."""
    folder = UPLOAD_MARKERS.rstrip("/")
    return key.startswith(UPLOAD_MARKERS) or f"/{folder}/" in key or key == folder


def _etag(raw: str) -> str:
    return raw.strip('"')


def _quoted(etag: str) -> str:
    return '"' + etag.strip('"') + '"'


def _md5(data: bytes | bytearray) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _multipart_etag(part_etags: dict[int, str]) -> str:
    """The ETag S3 gives a completed multipart upload: MD5 of the part MD5s, dash, count."""
    digests = b"".join(bytes.fromhex(_etag(part_etags[n])) for n in sorted(part_etags))
    return f"{_md5(digests)}-{len(part_etags)}"


def _server_time(response: dict[str, Any]) -> float:
    """The server's clock from the Date header of a response (PUT answers carry no mtime)."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if date:
        with contextlib.suppress(TypeError, ValueError):
            return email.utils.parsedate_to_datetime(date).timestamp()
    return time.time()


def _parse_timestamp(value: Any) -> datetime.datetime:
    """botocore's timestamp parser for the two forms S3 sends, without dateutil: ISO 8601 with
    a zone (a LIST's ``LastModified``) and the HTTP date (a GET's or HEAD's ``Last-Modified``).
    dateutil takes ~0.1 ms a value: a few ms of every 1,000-object LIST page, and of every
    request's CPU a few percent; anything else still goes to botocore's own parser."""
    if isinstance(value, str):
        with contextlib.suppress(TypeError, ValueError):
            parsed = (
                email.utils.parsedate_to_datetime(value)
                if value.endswith("GMT")
                else datetime.datetime.fromisoformat(value)
            )
            if parsed.tzinfo is not None:
                return parsed
    stamp: datetime.datetime = botocore.utils.parse_timestamp(value)
    return stamp


def _read_body_into(body: Any, buf: memoryview) -> int:
    """Read a GET's body into ``buf`` (until it is full or the body ends); the bytes read.

    botocore's ``StreamingBody.readinto`` goes through urllib3 2's, which reads a new bytes
    object and copies it (and http.client's ``read(n)`` copies once more): three copies of every
    byte and fresh pages for each piece -- at 1 GiB, a large part of ``cssfs get``'s CPU. So when
    the body is, as it is with botocore's urllib3 transport, a urllib3 response over an
    http.client one, the socket's bytes are read straight into ``buf`` by http.client (which
    still does the HTTP framing: Content-Length, chunked encoding), and the connection is given
    back to the pool once a body of known length is read to its end, as urllib3 does itself
    (a body cut short closes it; the caller sees the short count). botocore asks
    for bodies undecoded (no Content-Encoding is undone), so the bytes are the same. A body
    botocore validates against a checksum header (``StreamingChecksumBody``: S3 sends those
    for whole objects, not for ranges), another transport or a stubbed body takes the portable
    path, in 1 MiB pieces, so nothing botocore checks goes unchecked.
    """
    raw: Any = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if (
        type(body) is botocore.response.StreamingBody  # not a checksum-validating subclass
        and isinstance(fp, http.client.HTTPResponse)
        and callable(getattr(raw, "release_conn", None))
    ):
        n = 0
        while n < len(buf):
            with buf[n:] as rest:
                got = fp.readinto(rest)
            if not got:
                break
            n += got
        if fp.isclosed() and fp.length == 0 and not fp.will_close:
            raw.release_conn()  # the whole body was read: the connection is reusable
        return n
    n = 0
    while n < len(buf):
        with buf[n : n + _READ_PIECE] as piece:
            got = body.readinto(piece)
        if not got:
            break
        n += got
    return n


class S3Store(StoreBase):
    """An ObjectStore over ``bucket``, keys relative to ``prefix``.

    Credentials come from boto3's standard chain (environment, shared files, ``profile``,
    instance roles). ``endpoint_url`` (else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, which
    boto3 reads itself) points at another S3 implementation; ``path_style`` forces path-style
    (True) or virtual-hosted (False) addressing, None lets botocore choose.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        path_style: bool | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        retry: RetryPolicy = DEFAULT_RETRY,
        connect_timeout: float = 5.0,
        read_timeout: float = 20.0,
        list_page_size: int = 1000,
        min_part_size: int = MIN_PART_SIZE,
        copy_part_size: int = DEFAULT_COPY_PART_SIZE,
        seed: int | None = None,
    ) -> None:
        if not bucket:
            raise ConfigError("an S3 store needs a bucket name")
        if part_size < min_part_size:
            raise ConfigError(f"part size {part_size} is below the S3 minimum of {min_part_size}")
        if not min_part_size <= copy_part_size <= MAX_COPY_PART_SIZE:
            raise ConfigError(f"copy part size {copy_part_size} is outside S3's part limits")
        if concurrency < 1 or max_connections < 1 or not 1 <= list_page_size <= 1000:
            raise ConfigError("concurrency, max_connections and list_page_size must be positive")
        path = prefix.strip("/")
        super().__init__(f"s3://{bucket}" + (f"/{path}" if path else ""), prefix, part_size)
        self.bucket = bucket
        self.concurrency = concurrency
        self.min_part_size = min_part_size
        self.copy_part_size = copy_part_size
        self.list_page_size = list_page_size
        self.retry = retry
        self._rng = random.Random(seed)
        self._limiter = trio.CapacityLimiter(max_connections)
        self._bucket_seen = False
        self._orphans: set[_Upload] = set()
        self._finished_markers: list[str] = []  # full keys of markers to delete (batched)
        addressing: Literal["auto", "path", "virtual"] = (
            "auto" if path_style is None else "path" if path_style else "virtual"
        )
        config = botocore.config.Config(
            max_pool_connections=max_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "total_max_attempts": 1},  # ours are the only retries
            s3={"addressing_style": addressing, "payload_signing_enabled": False},
            user_agent_extra=f"cssfs/{__version__}",
        )
        # A botocore session, not boto3's: the same credential chain, profiles and endpoint
        # settings, without boto3's import and its client hooks (s3transfer): ~50 ms less at
        # every command's start.
        session = botocore.session.Session(profile=profile)
        use_lean_loader(session)  # ~4 MiB less held for the client's life (store.s3data)
        session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=_parse_timestamp
        )
        try:
            client = session.create_client(
                "s3", region_name=region, endpoint_url=endpoint_url, config=config
            )
        except botocore.exceptions.ProfileNotFound:
            raise ConfigError(f"AWS profile {profile!r} not found") from None
        except ValueError as exc:  # a malformed endpoint URL
            raise ConfigError(f"bad S3 endpoint {endpoint_url!r}: {exc}") from None
        self._client: S3Client = cast("S3Client", client)
        self.endpoint_url: str = self._client.meta.endpoint_url

    # -- calling boto3 ---------------------------------------------------------------------------

    async def _call(
        self,
        kind: str,
        where: str,
        fn: Callable[[], T],
        *,
        sent: int = 0,
        check: Callable[[T], None] | None = None,
        policy: RetryPolicy | None = None,
    ) -> T:
        """Run ``fn`` in a worker thread, retrying transient failures; errors as store errors."""
        what = f"{kind.upper()} {where}"

        async def attempt() -> T:
            self.stats.count(kind, sent=sent)
            try:
                result = await trio.to_thread.run_sync(fn, limiter=self._limiter)
            except Exception as exc:
                mapped = self._translate(exc, what)
                if mapped is None:
                    raise
                raise mapped from exc
            self._bucket_seen = True
            if check is not None:
                check(result)
            return result

        def count_retry() -> None:
            self.stats.retries += 1

        return await retrying(
            policy or self.retry, what, attempt, rng=self._rng, on_retry=count_retry
        )

    def _translate(self, exc: Exception, what: str) -> Exception | None:
        """A botocore failure as TransientError or a store error; None if it is not one."""
        if isinstance(exc, botocore.exceptions.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            message = str(error.get("Message", "")).split("\n", 1)[0]
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            detail = f"{code}: {message}" if message else code
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return TransientError(f"HTTP {status} {code}")
            if code == "NoSuchBucket":
                return NoSuchBucketError(f"{what}: bucket {self.bucket!r} does not exist")
            if code in ("NoSuchKey", "NoSuchUpload") or status == 404:
                return NoSuchObjectError(f"{what}: no such object ({code or status})")
            if code in _DENIED_CODES or status == 403:
                return AccessDeniedError(f"{what}: access denied ({detail})")
            if code == "PreconditionFailed" or status == 412:
                return PreconditionFailedError(f"{what}: precondition failed")
            if code == "InvalidRange" or status == 416:
                return _InvalidRange(f"{what}: range not satisfiable")
            return StoreError(f"{what}: {detail} (HTTP {status})")
        if isinstance(exc, botocore.exceptions.SSLError):
            return StoreError(f"{what}: TLS error ({exc})")
        if isinstance(
            exc,
            botocore.exceptions.HTTPClientError  # connection reset/closed, read timeouts
            | botocore.exceptions.ConnectionError  # refused, connect timeouts
            | botocore.exceptions.ResponseStreamingError
            | botocore.exceptions.IncompleteReadError
            | ConnectionError
            | TimeoutError,
        ):
            return TransientError(type(exc).__name__)
        if isinstance(
            exc,
            botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError,
        ):
            return AccessDeniedError(f"{what}: no usable AWS credentials ({exc})")
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            return StoreError(f"{what}: {exc}")
        return None

    async def _check_bucket(self) -> None:
        """A 404 on HEAD does not say whether the key or the bucket is missing: ask once."""
        if self._bucket_seen:
            return
        try:
            await self._call("head", self.url, lambda: self._client.head_bucket(Bucket=self.bucket))
        except NoSuchObjectError:
            raise NoSuchBucketError(f"{self.url}: bucket {self.bucket!r} does not exist") from None

    # -- reading ---------------------------------------------------------------------------------

    async def list(self, prefix: str = "", delimiter: str | None = None) -> Listing:
        n = len(self.prefix)
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self.prefix + prefix,
            "MaxKeys": self.list_page_size,
        }
        if delimiter:
            params["Delimiter"] = delimiter
        while True:
            page: Any = await self._call(
                "list", self.where(prefix), partial(self._client.list_objects_v2, **params)
            )
            for item in page.get("Contents", ()):
                key = item["Key"][n:]
                if key and not _is_marker(key):
                    mtime = item["LastModified"].timestamp()
                    objects.append(ObjectInfo(key, item["Size"], _etag(item["ETag"]), mtime))
            prefixes.extend(
                p["Prefix"][n:]
                for p in page.get("CommonPrefixes", ())
                if not _is_marker(p["Prefix"][n:])
            )
            if not page.get("IsTruncated"):
                break
            params["ContinuationToken"] = page["NextContinuationToken"]
        objects.sort(key=lambda i: i.key)
        return Listing(objects, sorted(prefixes))

    async def head(self, key: str) -> ObjectInfo:
        full = self.full_key(key)
        try:
            response: Any = await self._call(
                "head",
                self.where(key),
                lambda: self._client.head_object(Bucket=self.bucket, Key=full),
            )
        except NoSuchObjectError:
            await self._check_bucket()
            raise
        return ObjectInfo(
            key,
            response["ContentLength"],
            _etag(response["ETag"]),
            response["LastModified"].timestamp(),
        )

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        return await self._get(key, start, end)

    async def _get(
        self, key: str, start: int = 0, end: int | None = None, *, if_match: str | None = None
    ) -> bytes:
        check_range(start, end)
        full = self.full_key(key)
        if end is not None and end <= start:
            await self.head(key)  # an empty range of an object that must exist
            return b""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if start or end is not None:
            params["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        if if_match is not None:
            params["IfMatch"] = _quoted(if_match)

        def fetch() -> bytes:
            response: Any = self._client.get_object(**params)
            with contextlib.closing(response["Body"]) as body:
                data: bytes = body.read()
            if len(data) != response.get("ContentLength", len(data)):
                raise botocore.exceptions.IncompleteReadError(
                    actual_bytes=len(data), expected_bytes=response["ContentLength"]
                )
            return data

        try:
            data = await self._call("get", self.where(key), fetch)
        except _InvalidRange:
            return b""  # the range starts at or after the end: like a slice, nothing
        self.stats.bytes_received += len(data)
        return data

    async def get_into(self, key: str, start: int, buf: memoryview) -> int:
        check_range(start, None)
        if not len(buf):
            await self.head(key)  # an empty range of an object that must exist
            return 0
        full = self.full_key(key)
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": full,
            "Range": f"bytes={start}-{start + len(buf) - 1}",
        }

        def fetch() -> int:
            response: Any = self._client.get_object(**params)
            with contextlib.closing(response["Body"]) as body:
                n = _read_body_into(body, buf)
            expected = response.get("ContentLength", n)
            if n != expected:
                raise botocore.exceptions.IncompleteReadError(
                    actual_bytes=n, expected_bytes=expected
                )
            return n

        try:
            n = await self._call("get", self.where(key), fetch)
        except _InvalidRange:
            return 0  # the range starts at or after the end: like a slice, nothing
        self.stats.bytes_received += n
        return n

    # -- writing ---------------------------------------------------------------------------------

    async def put(
        self, key: str, body: Body, *, if_match: str | None = None, if_none_match: bool = False
    ) -> ObjectInfo:
        self.full_key(key)  # checks the key
        if isinstance(body, bytes | bytearray | memoryview) and len(body) <= self.part_size:
            return await self._put_single(key, bytes(body), if_match, if_none_match)
        source = as_part_source(body, self.part_size)
        if source.head_size >= self.min_part_size:
            raise ValueError(f"PartSource.head_size must be below {self.min_part_size}")
        return await self._put_parts(key, source, if_match, if_none_match)

    async def _put_single(
        self, key: str, data: bytes | bytearray, if_match: str | None, if_none_match: bool
    ) -> ObjectInfo:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self.full_key(key), "Body": data}
        if if_match is not None:
            params["IfMatch"] = _quoted(if_match)
        if if_none_match:
            params["IfNoneMatch"] = "*"
        calls = 0

        def send() -> Any:
            nonlocal calls
            calls += 1
            return self._client.put_object(**params)

        try:
            response = await self._call("put", self.where(key), send, sent=len(data))
        except PreconditionFailedError:
            if calls > 1 and (landed := await self._landed(key, _md5(data))) is not None:
                return landed
            raise
        return ObjectInfo(key, len(data), _etag(response["ETag"]), _server_time(response))

    async def _landed(self, key: str, etag: str) -> ObjectInfo | None:
        """After a retried conditional write failed: did an earlier attempt store our body?"""
        try:
            info = await self.head(key)
        except NoSuchObjectError:
            return None
        if info.etag != etag:
            return None
        log.debug("%s: an earlier attempt of the write succeeded", self.where(key))
        return info

    async def _precheck(self, key: str, if_match: str | None, if_none_match: bool) -> None:
        """Check a condition before sending a multipart body that it would reject."""
        try:
            info = await self.head(key)
        except NoSuchObjectError:
            if if_match is not None:
                raise
            return
        if if_none_match:
            raise PreconditionFailedError(f"PUT {self.where(key)}: precondition failed, it exists")
        if if_match is not None and info.etag != if_match.strip('"'):
            raise PreconditionFailedError(f"PUT {self.where(key)}: precondition failed")

    async def _put_parts(
        self, key: str, source: PartSource, if_match: str | None, if_none_match: bool
    ) -> ObjectInfo:
        size = self.part_size
        head_size = source.head_size
        # Part buffers are bytearrays, reused once their part is up: botocore sends a bytearray
        # body with one sendall() and checksums it in place (a bytes body becomes a BytesIO,
        # read 16 KiB at a time), and reuse keeps the allocator from growing the heap.
        tokens = trio.Semaphore(self.concurrency)  # one per part buffer in use, but part 1's
        free: builtins.list[bytearray] = []
        async with contextlib.aclosing(source.pieces()) as pieces:
            reader = PartReader(pieces)
            part1 = bytearray(size)
            with memoryview(part1) as view, view[head_size:] as tail:
                got1 = await reader.readinto(tail)
            await tokens.acquire()
            second = bytearray()
            got2 = 0
            if got1 == size - head_size:
                second = bytearray(size)
                with memoryview(second) as view:
                    got2 = await reader.readinto(view)
            if not got2:  # it all fits in one part: a plain PUT
                tokens.release()
                part1[:head_size] = await source.read_head()
                del part1[head_size + got1 :]
                return await self._put_single(key, part1, if_match, if_none_match)
            if if_match is not None or if_none_match:
                await self._precheck(key, if_match, if_none_match)
            upload = await self._create_upload(key, checksum=True)
            try:
                sizes: dict[int, int] = {}
                checksums: dict[int, str] = {}

                def part(number: int, data: bytearray) -> _Job:
                    async def job() -> str:
                        etag = await self._upload_part(upload, number, data, checksums)
                        if len(data) == size:
                            free.append(data)  # before its token is released (see run())
                        return etag

                    return job

                async def produce(start: _Start) -> None:
                    start(0, partial(self._mark, upload), False)
                    number, data, got = 2, second, got2
                    while got:
                        if number > MAX_PARTS:
                            raise StoreError(
                                f"PUT {self.where(key)}: more than {MAX_PARTS} parts of "
                                f"{size} bytes; use a larger part size"
                            )
                        del data[got:]  # the last part may be short
                        start(number, part(number, data), True)
                        sizes[number] = got
                        await tokens.acquire()
                        data = free.pop() if free else bytearray(size)
                        with memoryview(data) as view:
                            got = await reader.readinto(view)
                        if not got:
                            tokens.release()
                        number += 1
                    part1[:head_size] = await source.read_head()
                    sizes[1] = len(part1)
                    start(1, part(1, part1), False)

                etags = await self._send_parts(produce, tokens)
                size_total = sum(sizes.values())
                return await self._complete(
                    upload, etags, size_total, if_match, if_none_match, checksums
                )
            except BaseException:
                await self._abort(upload)
                raise

    async def _send_parts(
        self, produce: Callable[[_Start], Awaitable[None]], tokens: trio.Semaphore
    ) -> dict[int, str]:
        """Run the part jobs ``produce`` hands over, in parallel; their ETags by part number
        (a job numbered 0 runs too but is not a part: the upload marker).

        ``produce(start)`` calls ``start(number, job, holds_token)`` for each part; a job that
        holds a token releases it when it is done. The first failure (of a job or of ``produce``)
        cancels the rest and is raised as itself, not as an exception group.
        """
        etags: dict[int, str] = {}
        failures: list[BaseException] = []
        async with trio.open_nursery() as nursery:

            async def run(number: int, job: _Job, holds_token: bool) -> None:
                try:
                    etag = await job()
                    if number:  # job 0 is not a part (the upload marker)
                        etags[number] = etag
                except Exception as exc:
                    failures.append(exc)
                    nursery.cancel_scope.cancel()
                finally:
                    if holds_token:
                        tokens.release()

            def start(number: int, job: _Job, holds_token: bool) -> None:
                nursery.start_soon(run, number, job, holds_token)

            try:
                await produce(start)
            except Exception as exc:
                failures.append(exc)
                nursery.cancel_scope.cancel()
        if failures:
            raise failures[0]
        return etags

    async def _create_upload(self, key: str, *, checksum: bool = False) -> _Upload:
        """Start a multipart upload. ``checksum``: its parts carry CRC32s (as boto3's
        upload_file sends them), so the server keeps a composite checksum built from the part
        checksums instead of checksumming the whole object again at the complete."""
        full = self.full_key(key)
        extra: dict[str, Any] = {"ChecksumAlgorithm": "CRC32"} if checksum else {}
        response = await self._call(
            "create_multipart",
            self.where(key),
            partial(self._client.create_multipart_upload, Bucket=self.bucket, Key=full, **extra),
        )
        return _Upload(key, full, response["UploadId"])

    async def _upload_part(
        self,
        upload: _Upload,
        number: int,
        data: bytes | bytearray,
        checksums: dict[int, str] | None = None,
    ) -> str:
        """Upload one part; its ETag. With ``checksums`` (an upload created with
        ``checksum=True``) the part carries a CRC32, which is recorded there for the complete."""
        # botocore takes a bytearray body as it is (its type stubs say bytes only)
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": upload.full_key,
            "UploadId": upload.upload_id,
            "PartNumber": number,
            "Body": data,
        }
        if checksums is not None:
            params["ChecksumAlgorithm"] = "CRC32"
        response: Any = await self._call(
            "upload_part",
            f"{self.where(upload.key)} part {number}",
            partial(self._client.upload_part, **params),
            sent=len(data),
        )
        if checksums is not None and response.get("ChecksumCRC32"):
            checksums[number] = response["ChecksumCRC32"]
        return str(response["ETag"])

    async def _complete(
        self,
        upload: _Upload,
        etags: dict[int, str],
        size: int,
        if_match: str | None,
        if_none_match: bool,
        checksums: dict[int, str] | None = None,
    ) -> ObjectInfo:
        parts: builtins.list[dict[str, Any]] = []
        for n in sorted(etags):
            part: dict[str, Any] = {"PartNumber": n, "ETag": etags[n]}
            if checksums and n in checksums:
                part["ChecksumCRC32"] = checksums[n]
            parts.append(part)
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": upload.full_key,
            "UploadId": upload.upload_id,
            "MultipartUpload": {"Parts": parts},
        }
        if if_match is not None:
            params["IfMatch"] = _quoted(if_match)
        if if_none_match:
            params["IfNoneMatch"] = "*"
        calls = 0

        def send() -> Any:
            nonlocal calls
            calls += 1
            return self._client.complete_multipart_upload(**params)

        try:
            response = await self._call("complete_multipart", self.where(upload.key), send)
        except (PreconditionFailedError, NoSuchObjectError):
            # A retry after a lost answer finds the upload gone (or the object already ours).
            if calls > 1:
                landed = await self._landed(upload.key, _multipart_etag(etags))
                if landed is not None:
                    self._finished_markers.append(self._marker_key(upload))
                    return landed
            raise
        self._finished_markers.append(self._marker_key(upload))
        return ObjectInfo(upload.key, size, _etag(response["ETag"]), _server_time(response))

    async def _abort(self, upload: _Upload) -> None:
        """Abort a failed multipart upload; if that fails too, try again at aclose().

        Shielded from cancellation (it runs while a cancelled upload unwinds) but bounded in
        time, so a cancelled caller is never held for long."""
        self._orphans.add(upload)  # until the abort is known to have worked
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _ABORT_SECONDS
            try:
                await self._call(
                    "abort_multipart",
                    self.where(upload.key),
                    lambda: self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload.full_key, UploadId=upload.upload_id
                    ),
                    policy=_ABORT_RETRY,
                )
            except NoSuchObjectError:
                self._orphans.discard(upload)  # already gone (completed or aborted)
                self._finished_markers.append(self._marker_key(upload))
            except StoreError as exc:
                log.warning(
                    "%s: could not abort a failed multipart upload (%s); will retry at close",
                    self.where(upload.key),
                    exc,
                )
            else:
                self._orphans.discard(upload)
                self._finished_markers.append(self._marker_key(upload))
        if scope.cancelled_caught:
            log.warning(
                "%s: could not abort a failed multipart upload in %d s; will retry at close",
                self.where(upload.key),
                _ABORT_SECONDS,
            )

    # -- upload markers and unfinished uploads ---------------------------------------------------

    def _marker_key(self, upload: _Upload) -> str:
        """The full key of the marker this store puts for ``upload``."""
        return self.prefix + UPLOAD_MARKERS + upload_marker_name(upload.full_key, upload.upload_id)

    def _marker_candidates(self, full_key: str, upload_id: str) -> builtins.list[str]:
        """Where a marker of this upload may be: below this store's prefix first, then below
        every other folder above the key (a store on another prefix may have started it)."""
        name = UPLOAD_MARKERS + upload_marker_name(full_key, upload_id)
        folders = [""] + [full_key[: i + 1] for i, c in enumerate(full_key) if c == "/"]
        return [self.prefix + name] + [f + name for f in folders if f != self.prefix]

    async def _mark(self, upload: _Upload) -> str:
        """Put the marker of ``upload``, then delete those of finished uploads. Never fails:
        an unmarked upload is only one fsck will not dare abort."""
        marker = self._marker_key(upload)
        try:
            await self._call(
                "upload_marker",
                self.where(upload.key),
                lambda: self._client.put_object(Bucket=self.bucket, Key=marker, Body=b""),
                policy=_ABORT_RETRY,
            )
        except StoreError as exc:
            log.debug("%s: could not mark the multipart upload (%s)", self.where(upload.key), exc)
        await self._delete_markers()
        return ""

    async def _delete_markers(self, extra: Sequence[str] = ()) -> None:
        """Delete the markers of finished uploads (and ``extra`` full keys); never fails."""
        keys, self._finished_markers = [*self._finished_markers, *extra], []
        for batch in batched(keys):
            objects: list[ObjectIdentifierTypeDef] = [{"Key": key} for key in batch]
            try:
                await self._call(
                    "upload_marker",
                    f"{self.url} upload markers",
                    partial(
                        self._client.delete_objects,
                        Bucket=self.bucket,
                        Delete={"Objects": objects, "Quiet": True},
                    ),
                    policy=_ABORT_RETRY,
                )
            except StoreError as exc:
                log.debug(
                    "%s: could not delete %d upload marker(s) (%s)", self.url, len(batch), exc
                )

    async def list_uploads(self, prefix: str = "") -> builtins.list[UploadInfo]:
        n = len(self.prefix)
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        found: builtins.list[tuple[str, str, float]] = []
        while True:
            page: Any = await self._call(
                "list_uploads",
                self.where(prefix),
                partial(self._client.list_multipart_uploads, **params),
            )
            for item in page.get("Uploads", ()):
                if item["Key"][n:]:
                    found.append((item["Key"], item["UploadId"], item["Initiated"].timestamp()))
            if not page.get("IsTruncated"):
                break
            params["KeyMarker"] = page.get("NextKeyMarker", "")
            params["UploadIdMarker"] = page.get("NextUploadIdMarker", "")
        infos: builtins.list[UploadInfo] = []
        limiter = trio.CapacityLimiter(DEFAULT_CONCURRENCY)

        async def one(full_key: str, upload_id: str, initiated: float) -> None:
            async with limiter:
                info = await self._upload_info(full_key, upload_id, initiated)
            if info is not None:
                infos.append(info)

        async with trio.open_nursery() as nursery:
            for item in found:
                nursery.start_soon(one, *item)
        if UPLOAD_MARKERS.startswith(prefix):
            live = {upload_marker_name(full, upload_id) for full, upload_id, _ in found}
            infos += await self._stale_markers(live)
        infos.sort(key=lambda u: (u.key, u.initiated, u.upload_id))
        return infos

    async def _stale_markers(self, live: set[str]) -> builtins.list[UploadInfo]:
        """The markers in this store's marker folder whose upload is not in ``live`` (it
        finished, or was aborted, before the marker was deleted), as uploads with no id."""
        folder = self.prefix + UPLOAD_MARKERS
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": folder}
        stale: builtins.list[UploadInfo] = []
        while True:
            page: Any = await self._call(
                "list", f"{self.url} upload markers",
                partial(self._client.list_objects_v2, **params),
            )
            for item in page.get("Contents", ()):
                name = item["Key"][len(folder) :]
                if name and "/" not in name and name not in live:
                    mtime = item["LastModified"].timestamp()
                    key = UPLOAD_MARKERS + name
                    stale.append(UploadInfo(key, "", mtime, mtime, item["Size"], 0, True))
            if not page.get("IsTruncated"):
                break
            params["ContinuationToken"] = page["NextContinuationToken"]
        return stale

    async def _upload_info(
        self, full_key: str, upload_id: str, initiated: float
    ) -> UploadInfo | None:
        """The parts and the marker of one upload; None if it finished meanwhile."""
        key = full_key[len(self.prefix) :]
        marked: float | None = None
        for marker in self._marker_candidates(full_key, upload_id):
            try:
                head: Any = await self._call(
                    "head",
                    f"{self.url} upload marker",
                    partial(self._client.head_object, Bucket=self.bucket, Key=marker),
                )
            except (NoSuchObjectError, AccessDeniedError):
                continue
            marked = head["LastModified"].timestamp()
            break
        # The marker is put just after the upload was created: its time is the creation time
        # on servers whose Initiated is not (moto's is a constant).
        started = initiated if marked is None else max(initiated, marked)
        size = parts = 0
        last = started
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": full_key, "UploadId": upload_id}
        while True:
            try:
                page: Any = await self._call(
                    "list_parts",
                    self.where(key),
                    partial(self._client.list_parts, **params),
                )
            except NoSuchObjectError:
                return None  # completed or aborted since the listing
            for part in page.get("Parts", ()):
                size += part["Size"]
                parts += 1
                last = max(last, part["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                break
            params["PartNumberMarker"] = page["NextPartNumberMarker"]
        return UploadInfo(key, upload_id, started, last, size, parts, marked is not None)

    async def abort_upload(self, key: str, upload_id: str) -> None:
        full = self.full_key(key)
        if not upload_id:  # a stale marker (see list_uploads)
            if not _is_marker(key):
                raise ValueError(f"{self.where(key)}: no upload id, and not an upload marker")
            await self._call(
                "upload_marker", self.where(key),
                lambda: self._client.delete_object(Bucket=self.bucket, Key=full),
            )
            return
        with contextlib.suppress(NoSuchObjectError):  # already gone
            await self._call(
                "abort_multipart",
                self.where(key),
                lambda: self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id
                ),
            )
        await self._delete_markers(self._marker_candidates(full, upload_id))

    # -- copy, replace_head, delete --------------------------------------------------------------

    async def copy(self, src: str, dst: str) -> ObjectInfo:
        info = await self.head(src)
        if info.size > MAX_COPY_PART_SIZE:
            raise StoreError(f"COPY {self.where(src)}: objects over 5 GiB cannot be copied")
        src_full, dst_full = self.full_key(src), self.full_key(dst)
        response: Any = await self._call(
            "copy",
            f"{self.where(src)} to {self.where(dst)}",
            lambda: self._client.copy_object(
                Bucket=self.bucket,
                Key=dst_full,
                CopySource={"Bucket": self.bucket, "Key": src_full},
                CopySourceIfMatch=_quoted(info.etag),
            ),
        )
        result = response["CopyObjectResult"]
        return ObjectInfo(dst, info.size, _etag(result["ETag"]), result["LastModified"].timestamp())

    async def replace_head(
        self, key: str, new_head: bytes, old_head_len: int, *, if_match: str | None = None
    ) -> ObjectInfo:
        info = await self.head(key)
        expected = check_replace_head(info, old_head_len, if_match, self.where(key))
        new_head = bytes(new_head)
        new_size = len(new_head) + info.size - old_head_len
        if new_size <= self.part_size:  # small: read the rest, write it all back
            rest = await self._get(key, old_head_len, if_match=expected)
            return await self._put_single(key, new_head + rest, expected, False)
        # Large: part 1 = new head + rest bytes up to the minimum part size, fetched; the other
        # parts are server-side copies of the old object, pinned to the version we checked.
        fill = max(0, self.min_part_size - len(new_head))
        first = new_head + await self._get(
            key, old_head_len, old_head_len + fill, if_match=expected
        )
        copy_start = old_head_len + fill
        ranges = [
            (offset, min(offset + self.copy_part_size, info.size))
            for offset in range(copy_start, info.size, self.copy_part_size)
        ]
        upload = await self._create_upload(key)
        tokens = trio.Semaphore(self.concurrency)

        async def produce(start: _Start) -> None:
            start(0, partial(self._mark, upload), False)
            start(1, partial(self._upload_part, upload, 1, first), False)
            for number, (a, b) in enumerate(ranges, start=2):
                await tokens.acquire()
                start(number, partial(self._copy_part, upload, number, a, b, expected), True)

        try:
            etags = await self._send_parts(produce, tokens)
            return await self._complete(upload, etags, new_size, expected, False)
        except BaseException:
            await self._abort(upload)
            raise

    async def _copy_part(self, upload: _Upload, number: int, a: int, b: int, etag: str) -> str:
        response: Any = await self._call(
            "upload_part_copy",
            f"{self.where(upload.key)} part {number}",
            lambda: self._client.upload_part_copy(
                Bucket=self.bucket,
                Key=upload.full_key,
                UploadId=upload.upload_id,
                PartNumber=number,
                CopySource={"Bucket": self.bucket, "Key": upload.full_key},
                CopySourceRange=f"bytes={a}-{b - 1}",
                CopySourceIfMatch=_quoted(etag),
            ),
        )
        return str(response["CopyPartResult"]["ETag"])

    async def delete(self, keys: Sequence[str]) -> None:
        for batch in batched(keys):
            objects: list[ObjectIdentifierTypeDef] = [{"Key": self.full_key(key)} for key in batch]
            where = f"{self.where(batch[0])} and {len(batch) - 1} more"

            def check(response: Any, where: str = where) -> None:
                for error in response.get("Errors", ()):
                    code = error.get("Code", "")
                    if code == "NoSuchKey":
                        continue
                    if code in _TRANSIENT_CODES:
                        raise TransientError(f"{code} for {error.get('Key')}")
                    if code in _DENIED_CODES:
                        raise AccessDeniedError(f"DELETE {where}: access denied ({code})")
                    raise StoreError(f"DELETE {where}: {code} for {error.get('Key')}")

            await self._call(
                "delete",
                where,
                partial(
                    self._client.delete_objects,
                    Bucket=self.bucket,
                    Delete={"Objects": objects, "Quiet": True},
                ),
                check=check,
            )

    async def aclose(self) -> None:
        for upload in list(self._orphans):
            with contextlib.suppress(StoreError):
                await self._abort(upload)
        if self._finished_markers:
            await self._delete_markers()
        await trio.to_thread.run_sync(self._client.close)
