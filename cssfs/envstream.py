"""envstream: one whole envelope from a file object to another -- ``cssfs encrypt``/``decrypt``.

What it knows: envelope.py's writer and opener (spans of chunks, the geometry), file objects,
and a small pool of worker threads. What it must not know: stores, FUSE, trio, config, the CLI.

Why threads. Per byte the work is AES-256-GCM and SHA-256 (the chunk table, which is what lets
the writer's signature cover the payload -- DESIGN.md), and SHA-256 is several times slower than
AES-GCM on this kind of CPU. Both run in `cryptography` code that releases the GIL, so the
stream is cut into spans of SPAN_CHUNKS chunks: worker threads seal (or check and open) span k
while the calling thread reads span k+1 and writes out span k-1. The output is the same as a
one-chunk-at-a-time loop's, byte for byte, and so is what is released when: spans are finished
in order, and a chunk's plaintext is written only after it matched its table entry (when the
table comes first) and its GCM tag. A bad chunk stops the stream: every chunk before it has
been written, nothing after it.

Memory: (depth + 2) lanes of about 2 MiB each, whatever the file size. A stream that fits in
one span is done on the calling thread, with no pool (group records, small files).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import BinaryIO

from cssfs.crypto import HASH_SIZE, Rng, sha256_hasher
from cssfs.envelope import (
    CHUNK_SIZE,
    HEADER_SIZE,
    TAG_SIZE,
    UNBOUND,
    EnvelopeWriter,
    OpenedEnvelope,
    OpenSpan,
    SealSpan,
    check_envelope_size,
    chunk_count,
    chunk_range,
    open_header,
    read_full,
    table_range,
)
from cssfs.errors import FormatError, PayloadError, TrailingDataError, TruncatedError
from cssfs.keys import Identity, Recipient

__all__ = ["SPAN_CHUNKS", "decrypt_stream", "default_workers", "encrypt_stream"]

#: Chunks per span: one worker-thread job (1 MiB of plaintext).
SPAN_CHUNKS = 16
SPAN_BYTES = SPAN_CHUNKS * CHUNK_SIZE
SEALED_SPAN_BYTES = SPAN_BYTES + SPAN_CHUNKS * TAG_SIZE
#: Most worker threads a stream uses, however many CPUs there are.
MAX_WORKERS = 4
#: Chunk-table entries read at a time when decrypting (64 KiB of table per 128 MiB of data).
TABLE_WINDOW = 2048

Hashes = list[bytes]


def default_workers() -> int:
    """Worker threads for a stream: one per usable CPU up to MAX_WORKERS; 0 (everything on
    the calling thread) on a single CPU, where threads would only add switching."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return 0 if cpus < 2 else min(MAX_WORKERS, cpus)


class _Pipeline:
    """Span jobs run on worker threads, at most ``depth`` in flight, finished in order.

    ``submit(run, done)`` starts ``run()`` (a span job) and, once every earlier job is finished,
    calls ``done(run's result)`` on the calling thread. With no workers, or ``inline``, the job
    runs on the calling thread at once.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.depth = workers + 1
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Future[Hashes], Callable[[Hashes], None]]] = deque()

    def __enter__(self) -> _Pipeline:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            self.drain()
        for future, _ in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:  # running jobs write into our buffers: let them end
            self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(
        self, run: Callable[[], Hashes], done: Callable[[Hashes], None], *, inline: bool = False
    ) -> None:
        if inline or self.workers == 0:
            self.drain()
            done(run())
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="cssfs-span")
        self._pending.append((self._pool.submit(run), done))
        while len(self._pending) > self.depth:
            self._finish_one()

    def drain(self) -> None:
        while self._pending:
            self._finish_one()

    def _finish_one(self) -> None:
        future, done = self._pending.popleft()
        done(future.result())


def _seekable(f: BinaryIO) -> bool:
    try:
        if not f.seekable():
            return False
        f.tell()
    except (OSError, AttributeError, ValueError):
        return False
    return True


def _lanes(count: int, in_size: int, out_size: int) -> list[tuple[memoryview, memoryview]]:
    return [(memoryview(bytearray(in_size)), memoryview(bytearray(out_size)))
            for _ in range(count)]


# -- encrypt ----------------------------------------------------------------------------------


def encrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    identity: Identity,
    recipients: Sequence[Recipient],
    *,
    binding: bytes = UNBOUND,
    mtime_ns: int = 0,
    mode: int = 0o644,
    rng: Rng | None = None,
    workers: int | None = None,
) -> None:
    """Encrypt all of ``src`` into one envelope written to ``dst``, in bounded memory.

    The header is built last: on a seekable ``dst`` a 4096-byte hole is written first and
    filled at the end; otherwise the ciphertext (never plaintext) is spooled to a temporary
    file and copied out after the header. ``workers``: threads for the bulk crypto (default
    :func:`default_workers`; 0 = all on this thread).
    """
    writer = EnvelopeWriter(
        identity, recipients, binding=binding, mtime_ns=mtime_ns, mode=mode, rng=rng
    )
    seekable = _seekable(dst)
    body: BinaryIO
    if seekable:
        start = dst.tell()
        dst.write(bytes(HEADER_SIZE))
        body = dst
    else:
        body = tempfile.TemporaryFile()  # noqa: SIM115 -- closed below
    try:
        with _Pipeline(default_workers() if workers is None else workers) as pipe:
            _seal_spans(src, body, writer, pipe)
        header, table = writer.finish()
        body.write(table)
        if seekable:
            end = dst.tell()
            dst.seek(start)
            dst.write(header)
            dst.seek(end)
        else:
            dst.write(header)
            body.seek(0)
            shutil.copyfileobj(body, dst, SPAN_BYTES)
    finally:
        if body is not dst:
            body.close()
    dst.flush()


def _seal_spans(src: BinaryIO, body: BinaryIO, writer: EnvelopeWriter, pipe: _Pipeline) -> None:
    # depth + 2 lanes: the spans in flight, the one just read and the one being read. Lanes are
    # reused in order, so the lane read next always belongs to a span already finished.
    lanes = _lanes(pipe.depth + 2, SPAN_BYTES, SEALED_SPAN_BYTES)
    k = 0
    plain, sealed = lanes[0]
    n = read_full(src, plain)
    while True:
        next_plain, next_sealed = lanes[(k + 1) % len(lanes)]
        # One span of read-ahead: a full span is the last only if nothing follows it.
        next_n = read_full(src, next_plain) if n == SPAN_BYTES else 0
        last = next_n == 0
        out = sealed[: n + TAG_SIZE * chunk_count(n)]
        span = writer.seal_span(plain[:n], out, last=last)

        def done(hashes: Hashes, span: SealSpan = span, out: memoryview = out) -> None:
            writer.record_span(span, hashes)
            body.write(out)

        pipe.submit(span.run, done, inline=k == 0 and last)
        if last:
            return
        plain, sealed, n, k = next_plain, next_sealed, next_n, k + 1


# -- decrypt ----------------------------------------------------------------------------------


def decrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    identity: Identity,
    *,
    binding: bytes | None = None,
    workers: int | None = None,
) -> None:
    """Decrypt one envelope from ``src`` to ``dst``, in bounded memory whatever its size.

    No chunk's plaintext is written before its GCM tag verifies. On a seekable ``src`` the
    size and the chunk table are checked first, so every chunk is also checked against the
    writer's signature before release. On a pipe the table comes after the payload: chunks are
    released once their tag verifies and the table is compared at the end, so content forged by
    a co-recipient (who knows the file key) is detected only then -- PayloadError, after some
    output. The cloud, which lacks the file key, cannot forge any chunk.
    """
    seekable = _seekable(src)
    start = src.tell() if seekable else 0
    header_bytes = bytearray(HEADER_SIZE)
    got = read_full(src, memoryview(header_bytes))
    if got != HEADER_SIZE:
        raise FormatError(f"too short to be a cssfs envelope ({got} bytes)")
    opened = open_header(bytes(header_bytes), identity, binding=binding)
    with _Pipeline(default_workers() if workers is None else workers) as pipe:
        if seekable:
            _decrypt_seekable(src, dst, opened, start, pipe)
        else:
            _decrypt_sequential(src, dst, opened, pipe)
    dst.flush()


def _read_exact(src: BinaryIO, length: int) -> bytearray:
    buf = bytearray(length)
    if read_full(src, memoryview(buf)) != length:
        raise TruncatedError("envelope is truncated")
    return buf


def _hash_region(src: BinaryIO, length: int) -> bytes:
    """SHA-256 of the next ``length`` bytes of ``src``, read in bounded pieces."""
    hasher = sha256_hasher()
    buf = bytearray(min(length, TABLE_WINDOW * HASH_SIZE))
    left = length
    while left:
        view = memoryview(buf)[: min(left, len(buf))]
        if read_full(src, view) != len(view):
            raise TruncatedError("envelope is truncated in the chunk table")
        hasher.update(view)
        left -= len(view)
    return hasher.finalize()


def _read_span(
    src: BinaryIO, lane: tuple[memoryview, memoryview], first: int, stop: int, size: int
) -> tuple[memoryview, memoryview]:
    """Chunks [first, stop) read into the lane: (their ciphertext, room for their plaintext)."""
    ct_start = chunk_range(first, size)[0]
    last_off, last_len = chunk_range(stop - 1, size)
    ct_len = last_off + last_len - ct_start
    ct = lane[0][:ct_len]
    got = read_full(src, ct)
    if got != ct_len:
        raise TruncatedError(
            f"envelope is truncated in chunk {first + got // (CHUNK_SIZE + TAG_SIZE)}"
        )
    return ct, lane[1][: ct_len - TAG_SIZE * (stop - first)]


def _release(dst: BinaryIO, job: OpenSpan) -> None:
    """Write what a finished span verified; then raise its failure, if it had one."""
    dst.write(job.out[: job.verified])
    if job.failure is not None:
        raise job.failure


def _decrypt_seekable(
    src: BinaryIO, dst: BinaryIO, opened: OpenedEnvelope, start: int, pipe: _Pipeline
) -> None:
    header = opened.header
    size, count = header.plain_size, opened.chunk_count
    table_offset, table_length = table_range(size)
    end = src.seek(0, io.SEEK_END)
    check_envelope_size(size, end - start)
    # Pass 1: the table must match the signed hash before anything is released.
    src.seek(start + table_offset)
    if _hash_region(src, table_length) != header.table_hash:
        raise PayloadError("chunk table does not match the writer's signature")
    # Pass 2: spans, each chunk checked against its table entry; the table is read a window at
    # a time (memory stays flat) and hashed again, in case the file changed between passes.
    lanes = _lanes(pipe.depth + 2, SEALED_SPAN_BYTES, SPAN_BYTES)
    recheck = sha256_hasher()
    k = 0
    for base in range(0, count, TABLE_WINDOW):
        n = min(TABLE_WINDOW, count - base)
        src.seek(start + table_offset + HASH_SIZE * base)
        window = memoryview(_read_exact(src, HASH_SIZE * n))
        recheck.update(window)
        src.seek(start + chunk_range(base, size)[0])
        for first in range(base, base + n, SPAN_CHUNKS):
            stop = min(first + SPAN_CHUNKS, base + n)
            ct, pt = _read_span(src, lanes[k % len(lanes)], first, stop, size)
            k += 1
            expected = window[HASH_SIZE * (first - base) : HASH_SIZE * (stop - base)]
            job = opened.open_span(first, ct, pt, expected)

            def done(_: Hashes, job: OpenSpan = job) -> None:
                _release(dst, job)

            pipe.submit(job.run, done, inline=count <= SPAN_CHUNKS)
    pipe.drain()
    if recheck.finalize() != header.table_hash:
        raise PayloadError("the envelope changed while it was being read")


def _decrypt_sequential(
    src: BinaryIO, dst: BinaryIO, opened: OpenedEnvelope, pipe: _Pipeline
) -> None:
    header = opened.header
    size, count = header.plain_size, opened.chunk_count
    _, table_length = table_range(size)
    lanes = _lanes(pipe.depth + 2, SEALED_SPAN_BYTES, SPAN_BYTES)
    # SHA-256 over the hashes of the chunks as read: equals the table hash iff they are the
    # chunks the writer listed -- no need to keep the hashes themselves.
    payload_digest = sha256_hasher()
    for k, first in enumerate(range(0, count, SPAN_CHUNKS)):
        stop = min(first + SPAN_CHUNKS, count)
        ct, pt = _read_span(src, lanes[k % len(lanes)], first, stop, size)
        job = opened.open_span(first, ct, pt, None)

        def done(hashes: Hashes, job: OpenSpan = job) -> None:
            for digest in hashes:
                payload_digest.update(digest)
            _release(dst, job)

        pipe.submit(job.run, done, inline=count <= SPAN_CHUNKS)
    pipe.drain()
    table_digest = _hash_region(src, table_length)
    if src.read(1):
        raise TrailingDataError("trailing data after the envelope")
    if table_digest != header.table_hash:
        raise PayloadError("chunk table does not match the writer's signature")
    if payload_digest.finalize() != header.table_hash:
        raise PayloadError("payload does not match the writer's signature")
