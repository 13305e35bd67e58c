"""StagedFile: boundary table, a bytearray model, copy-on-write, truncate, encrypted spill."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cssfs.crypto import CHUNK_SIZE as CS
from cssfs.staging import StagedFile, StagingBudget, StagingError

CANARY = b"CANARY-plaintext-7f3a-must-never-reach-disk!"
BIG = 1 << 30


class BytesBase:
    """A base file held in memory, counting the reads it serves (which chunks were fetched)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return self.data[offset : offset + size]

    def chunks_read(self) -> set[int]:
        out: set[int] = set()
        for off, n in self.reads:
            out.update(range(off // CS, (off + max(n, 1) - 1) // CS + 1))
        return out


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


async def contents(f: StagedFile) -> bytes:
    whole = await f.read(0, f.size + 10)
    parts = [c async for c in f.chunks()]
    assert b"".join(parts) == whole
    assert all(len(p) == CS for p in parts[:-1])
    assert len(parts) == -(-f.size // CS)
    return whole


SIZES = [0, 1, CS - 1, CS, CS + 1, 2 * CS + 500]
STEPS = [1, 1000, CS - 1, CS, CS + 1, 3 * CS]


# step 1 only up to CS + 1 bytes; the all-spilled variant (budget 0) with steps of 1000+
TABLE = [
    (size, step, budget)
    for budget in (BIG, 0)
    for step in STEPS
    for size in SIZES
    if not (step == 1 and size > CS + 1) and not (step < 1000 and budget == 0 and size > 1)
]


@pytest.mark.parametrize(("size", "step", "budget_bytes"), TABLE)
async def test_boundary_table(tmp_path: Path, size: int, step: int, budget_bytes: int) -> None:
    budget = StagingBudget(tmp_path, budget_bytes)
    data = pattern(size)
    f = StagedFile(budget)
    assert f.dirty
    for off in range(0, size, step):
        assert await f.write(off, data[off : off + step]) == len(data[off : off + step])
    assert f.size == size
    assert await contents(f) == data
    # every read window across the chunk edges
    for off in {0, 1, CS - 1, CS, CS + 1, size - 1, size}:
        if 0 <= off <= size:
            assert await f.read(off, 3) == data[off : off + 3]
    if budget_bytes == 0 and size:
        assert f.spilled_chunks == -(-size // CS)
        assert f.memory_bytes == 0
    await f.aclose()
    assert budget.used == 0


@pytest.mark.parametrize("size", SIZES)
async def test_append_over_base(tmp_path: Path, size: int) -> None:
    base = BytesBase(pattern(size, 3))
    f = StagedFile(StagingBudget(tmp_path), base)
    assert not f.dirty
    await f.write(size, b"tail")
    assert await contents(f) == base.data + b"tail"
    await f.aclose()


async def test_sparse_extension_is_zeros(tmp_path: Path) -> None:
    f = StagedFile(StagingBudget(tmp_path))
    await f.write(0, b"ab")
    await f.write(3 * CS + 5, b"z")
    want = b"ab" + bytes(3 * CS + 3) + b"z"
    assert f.size == len(want)
    assert await contents(f) == want
    assert f.memory_bytes == 2 + 6  # the hole holds no memory


async def test_copy_on_write_reads_only_what_it_needs(tmp_path: Path) -> None:
    base = BytesBase(pattern(4 * CS + 100, 9))
    f = StagedFile(StagingBudget(tmp_path), base)
    await f.write(CS + 10, b"xyz")  # partial write: chunk 1 is fetched
    assert base.chunks_read() == {1}
    await f.write(2 * CS, b"Q" * CS)  # a whole chunk: nothing fetched
    await f.write(4 * CS, b"R" * 200)  # covers all the last chunk holds (and grows it)
    assert base.chunks_read() == {1}
    near = base.data[CS + 8 : CS + 10] + b"xyz" + base.data[CS + 13 : CS + 14]
    assert await f.read(CS + 8, 6) == near
    assert base.chunks_read() == {1}  # a dirty chunk is read from memory
    want = bytearray(base.data)
    want[CS + 10 : CS + 13] = b"xyz"
    want[2 * CS : 3 * CS] = b"Q" * CS
    want[4 * CS :] = b"R" * 200
    assert await contents(f) == want
    assert base.chunks_read() == {0, 1, 3}  # sealing fetched the clean ones, once each
    await f.aclose()


async def test_truncate_shrink_then_grow_never_resurrects_base(tmp_path: Path) -> None:
    base = BytesBase(pattern(3 * CS, 1))
    f = StagedFile(StagingBudget(tmp_path), base)
    await f.truncate(CS + 7)
    assert f.dirty and f.size == CS + 7
    await f.truncate(3 * CS)
    assert await contents(f) == base.data[: CS + 7] + bytes(2 * CS - 7)
    # a dirty chunk cut and regrown
    await f.write(10, b"hello world")
    await f.truncate(15)
    await f.truncate(40)
    assert await contents(f) == base.data[:10] + b"hello" + bytes(25)
    await f.truncate(0)
    assert await contents(f) == b""
    await f.write(5, b"x")
    assert await contents(f) == bytes(5) + b"x"
    await f.aclose()


async def test_truncate_to_same_size_is_a_change(tmp_path: Path) -> None:
    f = StagedFile(StagingBudget(tmp_path), BytesBase(b""))
    assert not f.dirty
    await f.truncate(0)  # open(O_TRUNC) of an empty file still writes it back
    assert f.dirty


@given(
    base_size=st.one_of(st.none(), st.integers(0, 3 * CS + 50)),
    budget_bytes=st.sampled_from([0, 100, CS + 1, BIG]),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("w"), st.integers(0, 3 * CS + 200), st.integers(1, 2 * CS + 3),
                      st.integers(0, 255)),
            st.tuples(st.just("t"), st.integers(0, 3 * CS + 200)),
            st.tuples(st.just("r"), st.integers(0, 3 * CS + 200), st.integers(0, 2 * CS)),
        ),
        max_size=12,
    ),
)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
async def test_random_ops_match_a_bytearray(
    tmp_path: Path, base_size: int | None, budget_bytes: int, ops: list[Any]
) -> None:
    budget = StagingBudget(tmp_path, budget_bytes)
    base = None if base_size is None else BytesBase(pattern(base_size, 5))
    model = bytearray(base.data if base else b"")
    f = StagedFile(budget, base)
    try:
        for op in ops:
            if op[0] == "w":
                _, off, n, byte = op
                data = bytes([byte]) * n
                await f.write(off, data)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off : off + n] = data
            elif op[0] == "t":
                size = op[1]
                await f.truncate(size)
                del model[size:]
                model.extend(bytes(size - len(model)))
            else:
                _, off, n = op
                assert await f.read(off, n) == bytes(model[off : off + n])
            assert f.size == len(model)
            assert budget.used <= budget.max_bytes
        assert await contents(f) == bytes(model)
    finally:
        await f.aclose()
    assert budget.used == 0


def _fd_bytes(fd: int) -> bytes:
    with open(f"/proc/self/fd/{fd}", "rb") as fh:
        return fh.read()


async def test_spill_is_encrypted_and_leaves_nothing(tmp_path: Path) -> None:
    spill_dir = tmp_path / "spill"
    budget = StagingBudget(spill_dir, CS)  # one chunk in memory, the rest spills
    data = (CANARY * (5 * CS // len(CANARY) + 1))[: 5 * CS + 123]
    f = StagedFile(budget)
    for off in range(0, len(data), 10_000):
        await f.write(off, data[off : off + 10_000])
    assert f.spilled_chunks >= 4
    assert budget.used <= CS and budget.spilled_chunks >= 4
    assert list(spill_dir.iterdir()) == []  # anonymous file: no name on disk
    spill = f._spill
    assert spill is not None
    raw = _fd_bytes(spill.fileno())
    assert len(raw) > 4 * CS
    assert CANARY not in raw and CANARY[:16] not in raw
    assert await contents(f) == data
    await f.aclose()
    assert budget.used == 0
    assert list(spill_dir.iterdir()) == []


async def test_spill_budget_is_shared_between_files(tmp_path: Path) -> None:
    budget = StagingBudget(tmp_path, 2 * CS)
    a, b = StagedFile(budget), StagedFile(budget)
    await a.write(0, b"a" * (2 * CS))
    assert budget.used == 2 * CS
    await b.write(0, b"b" * CS)  # no room: b spills its own chunk, a keeps its memory
    assert b.spilled_chunks == 1 and a.spilled_chunks == 0
    await a.aclose()
    await b.write(CS, b"c" * 10)  # memory is free again
    assert b.memory_bytes == 10
    assert await b.read(CS - 1, 3) == b"bcc"
    await b.aclose()
    assert budget.used == 0


async def test_tampered_spill_is_detected(tmp_path: Path) -> None:
    f = StagedFile(StagingBudget(tmp_path, 0))
    await f.write(0, CANARY * 100)
    spill = f._spill
    assert spill is not None
    raw = bytearray(os.pread(spill.fileno(), 64, 0))
    raw[30] ^= 1
    os.pwrite(spill.fileno(), bytes(raw), 0)
    with pytest.raises(StagingError, match="chunk 0"):
        await f.read(0, 10)
    await f.aclose()
    with pytest.raises(StagingError):
        await f.read(0, 1)


async def test_spilled_chunk_comes_back_to_memory(tmp_path: Path) -> None:
    budget = StagingBudget(tmp_path, CS)
    f = StagedFile(budget)
    await f.write(0, b"x" * CS)
    await f.write(CS, b"y" * CS)  # chunk 0 (least recent) spills to make room
    assert f.spilled_chunks == 1 and f.memory_bytes == CS
    await f.write(5, b"Z")  # chunk 0 is written again: it is now the recent one
    assert await f.read(0, 7) == b"xxxxxZx"
    assert await f.read(CS - 1, 2) == b"xy"
    await f.aclose()

