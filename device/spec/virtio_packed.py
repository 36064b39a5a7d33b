"""VIRTIO 1.2 packed virtqueue constants: descriptor flags, layout, event suppression.

Shared spec constants (oasis-tcs/virtio-spec packed-ring.tex, "Packed Virtqueues"; Linux's
include/uapi/linux/virtio_ring.h names them).
"""

import struct
from typing import Final

# 2.8.1 Driver and Device Ring Wrap Counters: the AVAIL and USED flags of a descriptor.
VRING_PACKED_DESC_F_AVAIL: Final = 1 << 7
VRING_PACKED_DESC_F_USED: Final = 1 << 15

# 2.8.10 Driver and Device Event Suppression: the flags field.
VRING_PACKED_EVENT_FLAG_ENABLE: Final = 0
VRING_PACKED_EVENT_FLAG_DISABLE: Final = 1
VRING_PACKED_EVENT_FLAG_DESC: Final = 2  # only with VIRTIO_F_EVENT_IDX
VRING_PACKED_EVENT_F_WRAP_CTR: Final = 15  # bit of off_wrap holding the wrap counter

# 2.8.13 struct pvirtq_desc: le64 addr, le32 len, le16 id, le16 flags.
PVIRTQ_DESC: Final = struct.Struct("<QIHH")
PVIRTQ_DESC_SIZE: Final = 16
PVIRTQ_DESC_ALIGN: Final = 16
# struct pvirtq_event_suppress: le16 desc (off_wrap), le16 flags.
PVIRTQ_EVENT: Final = struct.Struct("<HH")
PVIRTQ_EVENT_SIZE: Final = 4
PVIRTQ_EVENT_ALIGN: Final = 4

# 2.8: a packed queue's size need not be a power of two; at most 2^15 (off_wrap's 15 bits).
PVIRTQ_MAX_SIZE: Final = 32768


def desc_ring_size(num: int) -> int:
    """Bytes of a packed descriptor ring of ``num`` descriptors."""
    return PVIRTQ_DESC_SIZE * num


def is_available(flags: int, wrap: int) -> bool:
    """A descriptor is available to the device: AVAIL equals the driver's wrap counter ``wrap``
    and USED differs from it (2.8.1)."""
    return bool(flags & VRING_PACKED_DESC_F_AVAIL) == bool(wrap) and bool(
        flags & VRING_PACKED_DESC_F_USED
    ) != bool(wrap)


def is_used(flags: int, wrap: int) -> bool:
    """A descriptor is used, for the driver: AVAIL and USED both equal its wrap counter ``wrap``."""
    return bool(flags & VRING_PACKED_DESC_F_AVAIL) == bool(wrap) == bool(flags & VRING_PACKED_DESC_F_USED)


def avail_flags(wrap: int) -> int:
    """The AVAIL/USED bits a driver with wrap counter ``wrap`` writes on a descriptor it makes
    available: AVAIL = wrap, USED = !wrap."""
    return VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED


def used_flags(wrap: int) -> int:
    """The AVAIL/USED bits a device with wrap counter ``wrap`` writes on a used descriptor."""
    return VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED if wrap else 0


def off_wrap(offset: int, wrap: int) -> int:
    """An event suppression ``desc`` field: ring offset and wrap counter."""
    return offset | (wrap << VRING_PACKED_EVENT_F_WRAP_CTR)


def packed_need_event(event_off_wrap: int, wrap: int, new: int, old: int, size: int) -> bool:
    """Notify for a batch that moved a side from ring position ``old`` to ``new`` (its wrap counter
    now ``wrap``) when the other side asked for an event at ``event_off_wrap`` (Linux
    ``virtqueue_kick_prepare_packed``, QEMU ``vring_packed_need_event``)."""
    event = event_off_wrap & 0x7FFF
    if wrap != event_off_wrap >> VRING_PACKED_EVENT_F_WRAP_CTR:
        event -= size
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
