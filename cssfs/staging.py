"""staging: the contents of a file that is open for writing, until its last close.

What it knows: 64 KiB chunks, a memory budget shared by every open file of one mount, a spill
file in the mount's state directory, and a *base* (anything with ``size`` and an async
``read(offset, size)``: an EncryptedFile from the store, a pending file of the journal) that
the file started from. What it must not know: stores, envelopes, FUSE, object keys, the journal.
fs.py owns one StagedFile per open-for-write inode; at the last close the journal seals
``chunks()``/``read()`` into an envelope (docs/WRITES.md).

Copy-on-write at chunk granularity. Each chunk index ``i`` (plaintext ``[i*CS, (i+1)*CS)``) is
in exactly one of three places:

* *clean*: never written. Its bytes below ``base_limit`` come from the base, read lazily (by a
  read, by a partial write of the chunk, or when sealing); bytes at or above ``base_limit`` are
  zeros. ``base_limit`` starts at the base's size and only shrinks (truncate), so bytes cut
  off by a truncate never come back when the file grows again.
* *in memory*: a ``bytearray`` holding the chunk from its start; bytes past its length (up to
  the file size) are zeros. Its length counts against the shared :class:`StagingBudget`.
* *spilled*: the same bytes, sealed into a slot of this file's spill file (below).

Invariants (every method below runs under the file's lock, so a read or write that awaits the
base cannot interleave with another write of the same file):

* a chunk buffer never extends past the file size; chunks wholly past the size do not exist;
* ``budget.used`` is the sum of the lengths of the in-memory buffers of every open file.

Spilling. When a write needs memory the budget does not have, the file first moves its own
least recently written chunks to disk, then, if that is not enough, the chunk being written.
The spill file is an anonymous temporary file (``O_TMPFILE`` where available, otherwise
unlinked at once) in the budget's ``spill_dir``, so nothing is left behind by a crash -- open
files need not survive one; the journal makes *closed* files durable. Each slot holds
``nonce(12) || AES-256-GCM(chunk) (len + 16)``, under a random 256-bit key made for this
file and held only in memory, with associated data ``chunk index || length || generation``.
Plaintext never touches the disk.

Sinking. A new file written from its start (cp, rsync, an editor saving) may be given a *sink*
(the journal's envelope under construction, ``attach_sink``): once SINK_BATCH_CHUNKS chunks
before the last one are complete, they leave memory and are handed to the sink in order, which
seals them straight into the envelope the close will commit -- no spilling, no second pass at
close. Chunks ``[0, sunk)`` then live in the sink and are read back from it (``get``). The
first write into them, a truncate below them, or a hole stops the sinking for good: the sink
is *detached* (never finished) and the sunk chunks become clean chunks read from it, like a
base's.

Why a random 96-bit nonce per sealed chunk is safe here: a key lives as long as one open file
and is never stored or reused, and a slot is rewritten in place whenever its chunk spills
again, so counters would have to be kept per key anyway; with random nonces, q seals under one
key collide with probability below q^2 / 2^97. We stop at ``MAX_SEALS_PER_KEY`` = 2^32 (the
NIST SP 800-38D limit for random IVs, i.e. 256 TiB spilled by one open file), which keeps that
below 2^-33. The generation in the associated data (a counter kept in memory) means an old
slot content cannot be replayed into the file, and the chunk index means slots cannot be
swapped, by anyone who can write the state directory while the file is open.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cssfs.crypto import CHUNK_SIZE
from cssfs.errors import CssfsError

log = logging.getLogger(__name__)

#: Default memory for dirty chunks of all open files of one mount.
DEFAULT_MEMORY_BYTES = 64 * 1024 * 1024

NONCE_SIZE = 12
TAG_SIZE = 16
SLOT_SIZE = NONCE_SIZE + CHUNK_SIZE + TAG_SIZE
MAX_SEALS_PER_KEY = 1 << 32
_AD = struct.Struct(">QIQ")  # chunk index, plaintext length, generation


class PlainFile(Protocol):
    """What a StagedFile can start from: a size and verified plaintext reads."""

    @property
    def size(self) -> int: ...

    async def read(self, offset: int, size: int) -> bytes: ...


class ChunkSink(Protocol):
    """Where a file written from its start puts its finished chunks (journal.py's envelope
    under construction). ``put`` gets full chunks (never the last one), in order, each once;
    False or an error means it took none and will take no more. ``get`` reads one back.
    ``live`` is False once it takes no more (detached, or finished by a commit)."""

    @property
    def live(self) -> bool: ...

    async def put(self, first: int, chunks: list[bytes]) -> bool: ...

    async def get(self, index: int) -> bytes: ...

    def detach(self) -> None: ...

    def close(self) -> None: ...


#: Chunks handed to a sink at once (1 MiB: one thread hop to seal them).
SINK_BATCH_CHUNKS = 16


class StagingError(CssfsError):
    """The staging of an open file failed (its spill file did not authenticate, or it is
    closed). The mount maps it to EIO."""


class StagingBudget:
    """Memory shared by the dirty chunks of every open file of one mount, and where they spill.

    Synchronous: trio runs one task at a time, so reserve/release need no lock.
    """

    def __init__(self, spill_dir: str | os.PathLike[str], max_bytes: int = DEFAULT_MEMORY_BYTES
                 ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.spill_dir = Path(spill_dir)
        self.max_bytes = max_bytes
        self.used = 0
        self.peak = 0
        self.spilled_chunks = 0  # chunks written to spill files so far (all files)

    def __repr__(self) -> str:
        return f"StagingBudget(used={self.used}, max_bytes={self.max_bytes})"

    def try_reserve(self, n: int) -> bool:
        """Take ``n`` bytes if they fit; False (and nothing taken) otherwise."""
        if n < 0:
            raise ValueError("negative reservation")
        if self.used + n > self.max_bytes:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    def release(self, n: int) -> None:
        """Give back ``n`` bytes taken with :meth:`try_reserve`."""
        if n < 0 or n > self.used:
            raise ValueError("staging: internal error: releasing more than reserved")
        self.used -= n


class _SpillFile:
    """Fixed-size slots of sealed chunks in an anonymous temporary file (see module doc)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # O_TMPFILE on Linux, else created and unlinked at once: no name, nothing left behind.
        self._file = tempfile.TemporaryFile(dir=directory, buffering=0)  # noqa: SIM115
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))
        self._free: list[int] = []
        self._slots = 0
        self._seals = 0

    def __repr__(self) -> str:
        return f"_SpillFile(slots={self._slots})"

    def fileno(self) -> int:
        return self._file.fileno()

    def allocate(self) -> int:
        if self._free:
            return self._free.pop()
        self._slots += 1
        return self._slots - 1

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def write(self, slot: int, index: int, data: bytes | bytearray, generation: int) -> None:
        if self._seals >= MAX_SEALS_PER_KEY:
            raise StagingError("an open file was spilled too often for one key; close it")
        self._seals += 1
        nonce = os.urandom(NONCE_SIZE)
        sealed = self._aead.encrypt(nonce, bytes(data), _AD.pack(index, len(data), generation))
        blob = nonce + sealed
        written = os.pwrite(self._file.fileno(), blob, slot * SLOT_SIZE)
        if written != len(blob):
            raise OSError("short write to the staging spill file")

    def read(self, slot: int, index: int, length: int, generation: int) -> bytearray:
        want = NONCE_SIZE + length + TAG_SIZE
        blob = os.pread(self._file.fileno(), want, slot * SLOT_SIZE)
        if len(blob) != want:
            raise StagingError(f"spill file of an open file is truncated (chunk {index})")
        try:
            plain = self._aead.decrypt(
                blob[:NONCE_SIZE], blob[NONCE_SIZE:], _AD.pack(index, length, generation)
            )
        except InvalidTag:
            raise StagingError(
                f"spill file of an open file does not authenticate (chunk {index})"
            ) from None
        return bytearray(plain)

    def close(self) -> None:
        self._file.close()


class StagedFile:
    """The contents of one file open for writing (see the module docstring).

    ``base``: the version the file was opened over (None for a new or O_TRUNC'd file).
    ``dirty`` starts True for a new file (it must be written even if empty) and False over a
    base; any write or truncate makes it True.
    """

    def __init__(self, budget: StagingBudget, base: PlainFile | None = None) -> None:
        self._budget = budget
        self._base = base
        self._size = base.size if base is not None else 0
        self._base_limit = self._size
        self._dirty = base is None
        self._mem: OrderedDict[int, bytearray] = OrderedDict()  # LRU: least recent first
        self._spilled: dict[int, tuple[int, int, int]] = {}  # index -> (slot, length, gen)
        self._spill: _SpillFile | None = None
        self._generation = 0
        self._lock = trio.Lock()
        self._closed = False
        self._sink: ChunkSink | None = None
        self._sunk = 0  # chunks [0, _sunk) are in the sink
        self._sink_limit = 0  # sunk bytes at or above this read as zeros (a truncate cut them)

    def __repr__(self) -> str:
        return (
            f"StagedFile(size={self._size}, dirty={self._dirty}, in_memory={len(self._mem)}, "
            f"spilled={len(self._spilled)})"
        )

    @property
    def size(self) -> int:
        """Plaintext size in bytes."""
        return self._size

    @property
    def dirty(self) -> bool:
        """Whether the file must be written back at its last close."""
        return self._dirty

    @property
    def memory_bytes(self) -> int:
        """Bytes of this file's chunks held in memory now."""
        return sum(len(b) for b in self._mem.values())

    @property
    def spilled_chunks(self) -> int:
        """Chunks of this file currently in its spill file."""
        return len(self._spilled)

    @property
    def sealed_prefix(self) -> tuple[ChunkSink, int] | None:
        """(sink, n) while the sink still holds exactly chunks [0, n) of the file and takes
        more; the file's other chunks are read as usual."""
        if self._sink is None or not self._sink.live or self._closed:
            return None
        return self._sink, self._sunk

    def attach_sink(self, sink: ChunkSink) -> None:
        """Hand finished chunks of this new, empty file to ``sink`` (see the module doc)."""
        if self._base is not None or self._size or self._sink is not None:
            sink.close()
            return
        self._sink = sink

    # -- public API ----------------------------------------------------------------------

    async def read(self, offset: int, size: int) -> bytes:
        """Plaintext bytes [offset, offset + size), clipped at the end of the file."""
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        async with self._lock:
            self._check_open()
            return await self._read(offset, size)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``offset`` (a hole past the end reads as zeros); its length."""
        if offset < 0:
            raise ValueError("negative offset")
        view = memoryview(data).cast("B")
        if not len(view):
            return 0
        async with self._lock:
            self._check_open()
            end = offset + len(view)
            first, last = offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE
            if first < self._sunk:
                self._detach_sink()  # rewriting what the sink holds: no longer sequential
            for i in range(first, last + 1):
                start = i * CHUNK_SIZE
                lo = max(offset, start) - start
                hi = min(end, start + CHUNK_SIZE) - start
                piece = view[start + lo - offset : start + hi - offset]
                current = self._extent(i)
                if lo == 0 and hi >= current:
                    buf = bytearray(piece)  # covers all the chunk holds: no need to read it
                else:
                    buf = await self._take(i)
                    if len(buf) < lo:
                        buf.extend(bytes(lo - len(buf)))
                    buf[lo:hi] = piece
                self._put(i, buf)
            self._size = max(self._size, end)
            self._dirty = True
            if self._sink is not None and self._sink.live:
                await self._feed_sink()
            return len(view)

    async def truncate(self, size: int) -> None:
        """Set the size: shrinking drops bytes for good, growing adds zeros."""
        if size < 0:
            raise ValueError("negative size")
        async with self._lock:
            self._check_open()
            if size < self._size:
                if size < self._sunk * CHUNK_SIZE:
                    self._detach_sink()
                    self._sink_limit = min(self._sink_limit, size)
                for i in [i for i in (*self._mem, *self._spilled) if i * CHUNK_SIZE >= size]:
                    self._drop(i)
                i, keep = divmod(size, CHUNK_SIZE)
                if keep and (i in self._mem or i in self._spilled):
                    buf = await self._take(i)
                    if len(buf) > keep:
                        del buf[keep:]
                    self._put(i, buf)
                self._base_limit = min(self._base_limit, size)
            self._size = size
            self._dirty = True

    async def chunks(self) -> AsyncIterator[bytes]:
        """The final plaintext in order, one chunk (64 KiB, the last shorter) at a time.

        A 0-byte file yields nothing. Writers must not run while this is consumed.
        """
        offset = 0
        while offset < self._size:
            data = await self.read(offset, CHUNK_SIZE)
            if not data:
                break
            yield data
            offset += len(data)

    async def aclose(self) -> None:
        """Free the memory and the spill file. Idempotent; the file is unusable afterwards."""
        async with self._lock:
            self._close()

    def close(self) -> None:
        """Synchronous :meth:`aclose` (for cleanup paths that cannot await)."""
        self._close()

    # -- internals -----------------------------------------------------------------------

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for buf in self._mem.values():
            self._budget.release(len(buf))
        self._mem.clear()
        self._spilled.clear()
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        self._base = None

    def _check_open(self) -> None:
        if self._closed:
            raise StagingError("staged file used after close")

    def _extent(self, i: int) -> int:
        """How many bytes chunk ``i`` spans inside the current file size."""
        start = i * CHUNK_SIZE
        return max(0, min(CHUNK_SIZE, self._size - start))

    def _detach_sink(self) -> None:
        if self._sink is not None and self._sink.live:
            self._sink.detach()

    async def _feed_sink(self) -> None:
        """Hand the full chunks before the last one to the sink, a batch at a time; stop
        sinking at a hole (a sparse file) or when the sink fails (its chunks stay here)."""
        assert self._sink is not None
        last = (self._size - 1) // CHUNK_SIZE
        while last - self._sunk >= SINK_BATCH_CHUNKS:
            first = self._sunk
            indexes = range(first, first + SINK_BATCH_CHUNKS)
            if any(i not in self._mem and i not in self._spilled for i in indexes):
                self._detach_sink()  # a hole: zeros are not worth sealing now
                return
            taken = [await self._take(i) for i in indexes]
            for i in indexes:
                self._drop(i)
            ok = False
            try:
                ok = await self._sink.put(first, [bytes(b) for b in taken])
            except (OSError, CssfsError) as exc:
                log.debug("staging: the sink failed (%s); keeping the chunks", exc)
            finally:
                if not ok:
                    self._detach_sink()
                    for i, buf in zip(indexes, taken, strict=True):
                        self._put(i, buf)
            if not ok:
                return
            self._sunk += SINK_BATCH_CHUNKS
            self._sink_limit = self._sunk * CHUNK_SIZE

    async def _sink_bytes(self, offset: int, end: int) -> bytes:
        """Sunk bytes [offset, min(end, sink_limit)), read back from the sink."""
        assert self._sink is not None
        stop = min(end, self._sink_limit)
        out = bytearray()
        pos = offset
        while pos < stop:
            i = pos // CHUNK_SIZE
            chunk = await self._sink.get(i)
            out += chunk[pos - i * CHUNK_SIZE : min(stop, (i + 1) * CHUNK_SIZE) - i * CHUNK_SIZE]
            pos = (i + 1) * CHUNK_SIZE
        return bytes(out)

    async def _base_bytes(self, offset: int, end: int) -> bytes:
        """Base bytes [offset, min(end, base_limit)): what a clean region holds before zeros
        (for a file that had a sink: what the sink holds, below the sink limit)."""
        if self._sink is not None:
            return await self._sink_bytes(offset, end)
        stop = min(end, self._base_limit)
        if self._base is None or stop <= offset:
            return b""
        data = await self._base.read(offset, stop - offset)
        if len(data) != stop - offset:
            raise StagingError(
                f"base file returned {len(data)} of {stop - offset} bytes at offset {offset}"
            )
        return data

    async def _take(self, i: int) -> bytearray:
        """Chunk ``i``'s bytes as a buffer the caller may change and must hand to _put."""
        buf = self._mem.pop(i, None)
        if buf is not None:  # the caller owns it until _put: give its memory back meanwhile
            self._budget.release(len(buf))
            return buf
        spilled = self._spilled.get(i)
        if spilled is not None:
            slot, length, gen = spilled
            assert self._spill is not None
            return self._spill.read(slot, i, length, gen)
        start = i * CHUNK_SIZE
        return bytearray(await self._base_bytes(start, start + CHUNK_SIZE))

    def _put(self, i: int, buf: bytearray) -> None:
        """Keep chunk ``i`` = ``buf``: in memory if the budget allows, else in the spill file."""
        old = self._mem.pop(i, None)
        held = len(old) if old is not None else 0
        need = len(buf)
        if need <= held:
            self._budget.release(held - need)
            self._keep_in_memory(i, buf)
            return
        extra = need - held
        while not self._budget.try_reserve(extra):
            if not self._mem:
                if held:
                    self._budget.release(held)
                self._write_spill(i, buf)
                return
            victim, vbuf = self._mem.popitem(last=False)  # least recently written first
            self._budget.release(len(vbuf))
            self._write_spill(victim, vbuf)
        self._keep_in_memory(i, buf)

    def _keep_in_memory(self, i: int, buf: bytearray) -> None:
        self._mem[i] = buf
        spilled = self._spilled.pop(i, None)
        if spilled is not None:
            assert self._spill is not None
            self._spill.free(spilled[0])

    def _write_spill(self, i: int, buf: bytearray) -> None:
        if self._spill is None:
            self._spill = _SpillFile(self._budget.spill_dir)
            log.debug("open file spills to disk (budget %d bytes)", self._budget.max_bytes)
        spilled = self._spilled.get(i)
        slot = spilled[0] if spilled is not None else self._spill.allocate()
        self._generation += 1
        self._spill.write(slot, i, buf, self._generation)
        self._spilled[i] = (slot, len(buf), self._generation)
        self._budget.spilled_chunks += 1

    def _drop(self, i: int) -> None:
        buf = self._mem.pop(i, None)
        if buf is not None:
            self._budget.release(len(buf))
        spilled = self._spilled.pop(i, None)
        if spilled is not None:
            assert self._spill is not None
            self._spill.free(spilled[0])

    async def _read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self._size)
        if end <= offset:
            return b""
        out = bytearray()
        pending: list[int] = []  # a run of clean bytes [pending[0], pending[1]) not read yet

        async def flush_clean() -> None:
            if pending:
                lo, hi = pending
                data = await self._base_bytes(lo, hi)
                out.extend(data)
                out.extend(bytes(hi - lo - len(data)))
                pending.clear()

        for i in range(offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE + 1):
            start = i * CHUNK_SIZE
            lo, hi = max(offset, start), min(end, start + CHUNK_SIZE)
            if i in self._mem or i in self._spilled:
                await flush_clean()
                if i in self._mem:
                    buf = self._mem[i]
                else:
                    slot, length, gen = self._spilled[i]
                    assert self._spill is not None
                    buf = self._spill.read(slot, i, length, gen)
                piece = buf[lo - start : hi - start]
                out.extend(piece)
                out.extend(bytes(hi - lo - len(piece)))
            elif pending and pending[1] == lo:
                pending[1] = hi
            else:
                await flush_clean()
                pending[:] = [lo, hi]
        await flush_clean()
        return bytes(out)
