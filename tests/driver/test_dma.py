"""The DMA allocator: buddy blocks plus per-size lists of recently freed small blocks."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from device.memory import GuestMemory
from driver.dma import DmaAllocator, DmaBuffer

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
