"""The DMA allocator: buddy blocks plus per-size lists of recently freed small blocks, and
guest RAM given back to the host when the allocator is idle."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from device.memory import GuestMemory
from driver.dma import TRIM_IDLE, DmaAllocator, DmaBuffer

REGION = 1 << 20


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("alloc"), st.integers(min_value=1, max_value=REGION // 2)),
            st.tuples(st.just("free"), st.integers(min_value=0, max_value=10_000)),
        ),
        max_size=120,
    )
)
def test_blocks_never_overlap_and_everything_comes_back(ops: list[tuple[str, int]]) -> None:
    memory = GuestMemory(2 * REGION, memfd=False)
    dma = DmaAllocator(memory, start=memory.base, size=REGION)
    live: list[DmaBuffer] = []
    for op, n in ops:
        if op == "alloc":
            buffer = dma.allocate(n)
            if buffer is None:
                # Refused only when no free block is big enough, quick lists merged back in.
                assert all(not dma._quick[o] for o in range(len(dma._quick)))
                continue
            assert buffer.size == n and buffer.gpa % 512 == 0
            live.append(buffer)
        elif live:
            live.pop(n % len(live)).free()
        spans = sorted((b.gpa, b.gpa + (1 << b._order)) for b in live)
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
        assert all(memory.base <= s and e <= memory.base + REGION for s, e in spans)
        assert dma.free_bytes == REGION - sum(e - s for s, e in spans)
    for buffer in live:
        buffer.free()
    assert dma.free_bytes == REGION
    whole = dma.allocate(REGION)  # the small blocks kept for reuse merge back into one
    assert whole is not None and whole.gpa == memory.base


def test_a_freed_small_block_is_reused_first() -> None:
    memory = GuestMemory(REGION, memfd=False)
    dma = DmaAllocator(memory)
    first = dma.allocate(4096)
    assert first is not None
    gpa = first.gpa
    first.free()
    again = dma.allocate(4000)
    assert again is not None and again.gpa == gpa


def _shmem_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1])
    raise AssertionError("no RssShmem in /proc/self/status")


def test_trim_gives_free_pages_back_and_keeps_blocks_in_use() -> None:
    memory = GuestMemory(32 << 20)  # a shared memfd, as the service's guest RAM is
    try:
        dma = DmaAllocator(memory)
        kept = dma.allocate(4096)
        assert kept is not None
        kept.view[:] = b"k" * 4096
        burst = [dma.allocate(1 << 20) for _ in range(16)]
        before = _shmem_kib()
        for buffer in burst:
            assert buffer is not None
            buffer.view[:] = b"\xaa" * (1 << 20)  # touch every page, as a READ's data does
        touched = _shmem_kib()
        assert touched - before >= 15 << 10
        gpas = [b.gpa for b in burst if b is not None]
        for buffer in burst:
            assert buffer is not None
            buffer.free()
        returned = dma.trim()
        assert returned >= 16 << 20 and dma.trimmed_bytes == returned
        assert touched - _shmem_kib() >= 15 << 10  # the burst's pages are the host's again
        assert bytes(kept.view) == b"k" * 4096  # a block in use keeps its data
        assert all(memory.read(gpa, 4096) == bytes(4096) for gpa in gpas)  # freed: reads zeroes
        again = dma.allocate(1 << 20)
        assert again is not None
        again.view[:8] = b"reusable"
        assert memory.read(again.gpa, 8) == b"reusable"
    finally:
        memory.close()


async def test_an_idle_allocator_trims_by_itself() -> None:
    memory = GuestMemory(16 << 20)
    try:
        dma = DmaAllocator(memory)
        buffer = dma.allocate(4 << 20)
        assert buffer is not None
        buffer.view[:] = b"\x01" * (4 << 20)
        buffer.free()
        assert dma.trimmed_bytes == 0  # not at once: a busy service reuses its buffers
        deadline = asyncio.get_running_loop().time() + 10 * TRIM_IDLE
        while dma.trimmed_bytes == 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        assert dma.trimmed_bytes >= 4 << 20
        assert memory.read(buffer.gpa, 16) == bytes(16)
        dma.close()
    finally:
        memory.close()


async def test_a_busy_allocator_does_not_trim() -> None:
    memory = GuestMemory(16 << 20)
    try:
        dma = DmaAllocator(memory)
        loop = asyncio.get_running_loop()
        end = loop.time() + 3 * TRIM_IDLE
        while loop.time() < end:  # a steady stream of requests, each freed before the next
            buffer = dma.allocate(1 << 20)
            assert buffer is not None
            buffer.view[:4] = b"busy"
            buffer.free()
            await asyncio.sleep(0.05)
        assert dma.trimmed_bytes == 0
        dma.close()
    finally:
        memory.close()
