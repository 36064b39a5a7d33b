"""Ring layout formulas and the event-index rule from the VIRTIO spec."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from device.spec.virtio import (
    avail_ring_size,
    desc_table_size,
    need_event,
    used_ring_size,
    vring_size,
    vring_used_offset,
)
from device.spec.virtio_blk import VIRTIO_BLK_CFG_WRITE_ZEROES_MAY_UNMAP, VIRTIO_BLK_CONFIG


def test_legacy_vring_size_matches_the_article() -> None:
    # vring_size(num, 4096) = ALIGN(16*num + 2*(3+num), 4096) + 2*3 + 8*num
    assert vring_size(128, 4096) == 4096 + 6 + 1024
    assert vring_size(256, 4096) == 8192 + 6 + 2048
    assert vring_size(512, 4096) == 12288 + 6 + 4096
    assert vring_used_offset(256, 4096) == 8192


def test_modern_split_layout_sizes() -> None:
    for num in (1, 2, 8, 256, 32768):
        assert desc_table_size(num) == 16 * num
        assert avail_ring_size(num) == 6 + 2 * num
        assert used_ring_size(num) == 6 + 8 * num


def test_virtio_blk_config_struct_offsets() -> None:
    # 57 bytes up to write_zeroes_may_unmap @56, inside the 96-byte structure.
    assert VIRTIO_BLK_CONFIG.size == VIRTIO_BLK_CFG_WRITE_ZEROES_MAY_UNMAP + 1


def test_need_event_examples() -> None:
    assert need_event(0, 1, 0)  # used_event 0: notify after the first buffer
    assert not need_event(0, 2, 1)
    assert need_event(0, 1, 0xFFFF)  # ... and again when the index wraps back past 0
    assert need_event(5, 10, 0)
    assert not need_event(10, 10, 0)


@given(
    old=st.integers(0, 0xFFFF),
    added=st.integers(0, 0x7FFF),
    event=st.integers(0, 0xFFFF),
)
def test_need_event_is_event_in_the_published_window(old: int, added: int, event: int) -> None:
    """Notify iff event_idx is one of old, old+1, ..., new-1 (mod 2^16)."""
    new = (old + added) & 0xFFFF
    window = {(old + k) & 0xFFFF for k in range(added)}
    assert need_event(event, new, old) == (event in window)
