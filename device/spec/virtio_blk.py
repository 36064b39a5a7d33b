"""virtio-blk (VIRTIO 1.2 section 5.2): feature bits, config layout, request types and status.

Shared spec constants (device-types/blk/description.tex; Linux include/uapi/linux/virtio_blk.h).
"""

import enum
import struct
from typing import Final

# 5.2.3 Feature bits.
VIRTIO_BLK_F_SIZE_MAX: Final = 1
VIRTIO_BLK_F_SEG_MAX: Final = 2
VIRTIO_BLK_F_GEOMETRY: Final = 4
VIRTIO_BLK_F_RO: Final = 5
VIRTIO_BLK_F_BLK_SIZE: Final = 6
VIRTIO_BLK_F_FLUSH: Final = 9
VIRTIO_BLK_F_TOPOLOGY: Final = 10
VIRTIO_BLK_F_CONFIG_WCE: Final = 11
VIRTIO_BLK_F_MQ: Final = 12
VIRTIO_BLK_F_DISCARD: Final = 13
VIRTIO_BLK_F_WRITE_ZEROES: Final = 14

VIRTIO_BLK_SECTOR_SIZE: Final = 512  # capacity and sector numbers are always in 512-byte units
VIRTIO_BLK_ID_BYTES: Final = 20

# 5.2.4 struct virtio_blk_config offsets.
VIRTIO_BLK_CFG_CAPACITY: Final = 0  # le64
VIRTIO_BLK_CFG_SIZE_MAX: Final = 8  # le32
VIRTIO_BLK_CFG_SEG_MAX: Final = 12  # le32
VIRTIO_BLK_CFG_GEOMETRY: Final = 16  # le16 cylinders, u8 heads, u8 sectors
VIRTIO_BLK_CFG_BLK_SIZE: Final = 20  # le32
VIRTIO_BLK_CFG_TOPOLOGY: Final = 24  # u8 physical_block_exp, u8 alignment_offset, le16 min_io, le32 opt_io
VIRTIO_BLK_CFG_WRITEBACK: Final = 32  # u8
VIRTIO_BLK_CFG_NUM_QUEUES: Final = 34  # le16
VIRTIO_BLK_CFG_MAX_DISCARD_SECTORS: Final = 36
VIRTIO_BLK_CFG_MAX_DISCARD_SEG: Final = 40
VIRTIO_BLK_CFG_DISCARD_SECTOR_ALIGNMENT: Final = 44
VIRTIO_BLK_CFG_MAX_WRITE_ZEROES_SECTORS: Final = 48
VIRTIO_BLK_CFG_MAX_WRITE_ZEROES_SEG: Final = 52
VIRTIO_BLK_CFG_WRITE_ZEROES_MAY_UNMAP: Final = 56  # u8
VIRTIO_BLK_CONFIG_SIZE: Final = 96

# struct virtio_blk_config up to write_zeroes_may_unmap (then 3 unused bytes and later fields).
VIRTIO_BLK_CONFIG: Final = struct.Struct("<QIIHBBIBBHIBxHIIIIIB")

# 5.2.6 struct virtio_blk_req header: le32 type, le32 reserved (ioprio), le64 sector.
VIRTIO_BLK_OUTHDR: Final = struct.Struct("<IIQ")
VIRTIO_BLK_OUTHDR_SIZE: Final = 16

# struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags.
VIRTIO_BLK_DISCARD_WRITE_ZEROES: Final = struct.Struct("<QII")
VIRTIO_BLK_DISCARD_WRITE_ZEROES_SIZE: Final = 16
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: Final = 0x1


# 5.2.6 request types and status values, as the spec names them. Plain int constants: compiled
# code (setup.py) inlines them; the IntEnums below are the same values with names for display.
VIRTIO_BLK_T_IN: Final = 0
VIRTIO_BLK_T_OUT: Final = 1
VIRTIO_BLK_T_FLUSH: Final = 4
VIRTIO_BLK_T_GET_ID: Final = 8
VIRTIO_BLK_T_DISCARD: Final = 11
VIRTIO_BLK_T_WRITE_ZEROES: Final = 13
VIRTIO_BLK_S_OK: Final = 0
VIRTIO_BLK_S_IOERR: Final = 1
VIRTIO_BLK_S_UNSUPP: Final = 2


class RequestType(enum.IntEnum):
    """virtio-blk request types (5.2.6)."""

    #: Read from the device into writable data buffers.
    IN = VIRTIO_BLK_T_IN
    #: Write readable data buffers to the device.
    OUT = VIRTIO_BLK_T_OUT
    #: Make every completed write durable.
    FLUSH = VIRTIO_BLK_T_FLUSH
    #: Return the device id string (20 bytes, NUL padded).
    GET_ID = VIRTIO_BLK_T_GET_ID
    #: Deallocate the listed ranges.
    DISCARD = VIRTIO_BLK_T_DISCARD
    #: Make the listed ranges read as zeroes.
    WRITE_ZEROES = VIRTIO_BLK_T_WRITE_ZEROES


class Status(enum.IntEnum):
    """virtio-blk request status byte (5.2.6)."""

    #: The request completed.
    OK = VIRTIO_BLK_S_OK
    #: The request failed: out of range, misaligned, read-only device or backend error.
    IOERR = VIRTIO_BLK_S_IOERR
    #: The request type or a flag of it is not supported or not negotiated.
    UNSUPP = VIRTIO_BLK_S_UNSUPP
