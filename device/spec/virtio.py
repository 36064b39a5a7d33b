"""VIRTIO 1.2 core constants: device status, feature bits, split virtqueue layout, event index.

Shared spec constants (oasis-tcs/virtio-spec content.tex, split-ring.tex, virtio-queue.h).
"""

import struct
from typing import Final

# 2.1 Device Status Field.
VIRTIO_CONFIG_S_ACKNOWLEDGE: Final = 1
VIRTIO_CONFIG_S_DRIVER: Final = 2
VIRTIO_CONFIG_S_DRIVER_OK: Final = 4
VIRTIO_CONFIG_S_FEATURES_OK: Final = 8
VIRTIO_CONFIG_S_NEEDS_RESET: Final = 0x40
VIRTIO_CONFIG_S_FAILED: Final = 0x80

# 6 Reserved Feature Bits.
VIRTIO_F_INDIRECT_DESC: Final = 28
VIRTIO_F_EVENT_IDX: Final = 29
VIRTIO_F_VERSION_1: Final = 32
VIRTIO_F_ACCESS_PLATFORM: Final = 33
VIRTIO_F_RING_PACKED: Final = 34
VIRTIO_F_IN_ORDER: Final = 35

# 2.7.5 The Virtqueue Descriptor Table.
VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4
VIRTQ_DESC_SIZE: Final = 16
VIRTQ_DESC: Final = struct.Struct("<QIHH")  # le64 addr, le32 len, le16 flags, le16 next

# 2.7.6 / 2.7.8 flags hints, meaningful only without VIRTIO_F_EVENT_IDX.
VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1
VIRTQ_USED_F_NO_NOTIFY: Final = 1

VIRTQ_USED_ELEM: Final = struct.Struct("<II")  # le32 id, le32 len

# 2.7 Split Virtqueues: alignment and maximum size.
VIRTQ_DESC_ALIGN: Final = 16
VIRTQ_AVAIL_ALIGN: Final = 2
VIRTQ_USED_ALIGN: Final = 4
VIRTQ_MAX_SIZE: Final = 32768
VIRTIO_LEGACY_VRING_ALIGN: Final = 4096  # used ring alignment of the legacy layout

# Chains may carry at most 2^32 bytes (2.7.13.1: "the total length ... exceeds 2^32").
VIRTQ_MAX_CHAIN_BYTES: Final = 1 << 32

# An MSI-X vector value meaning "no vector" (4.1.5.1.2).
VIRTIO_MSI_NO_VECTOR: Final = 0xFFFF


def desc_table_size(num: int) -> int:
    """Bytes of a split descriptor table of ``num`` entries."""
    return 16 * num


def avail_ring_size(num: int) -> int:
    """Bytes of a split available ring: flags, idx, ring[num], used_event."""
    return 6 + 2 * num


def used_ring_size(num: int) -> int:
    """Bytes of a split used ring: flags, idx, ring[num] of 8 bytes, avail_event."""
    return 6 + 8 * num


def _align(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def vring_size(num: int, align: int = VIRTIO_LEGACY_VRING_ALIGN) -> int:
    """Bytes of a legacy contiguous split ring (Linux ``vring_size``): used ring aligned to ``align``."""
    return _align(desc_table_size(num) + 2 * (3 + num), align) + 2 * 3 + 8 * num


def vring_used_offset(num: int, align: int = VIRTIO_LEGACY_VRING_ALIGN) -> int:
    """Offset of the used ring in a legacy contiguous ring (Linux ``vring_init``)."""
    return _align(desc_table_size(num) + avail_ring_size(num), align)


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """``vring_need_event``: notify iff ``event_idx`` lies in ``[old_idx, new_idx)`` modulo 2^16."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def feature_bit(bit: int) -> int:
    """The feature mask of one feature bit number."""
    return 1 << bit
