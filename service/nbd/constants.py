"""NBD protocol constants (NetworkBlockDevice/nbd doc/proto.md): magics, options, replies,
transmission flags, commands, command flags, structured reply chunks and wire error codes.

Service layer, shared by the NBD codec and server. All integers are big-endian on the wire.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
NBD_OPT_REPLY_MAGIC: Final = 0x0003E889045565A9
NBD_REQUEST_MAGIC: Final = 0x25609513
NBD_SIMPLE_REPLY_MAGIC: Final = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# Handshake flags (server) and client flags.
NBD_FLAG_FIXED_NEWSTYLE: Final = 1 << 0
NBD_FLAG_NO_ZEROES: Final = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
NBD_FLAG_C_NO_ZEROES: Final = 1 << 1

# Wire layouts.
GREETING: Final = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS: Final = struct.Struct(">I")
OPTION_HEADER: Final = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY: Final = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")  # size, transmission flags (+124 zeroes)
REQUEST: Final = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY: Final = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY: Final = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length

MAX_STRING: Final = 4096  # names, descriptions, queries (proto.md: "at most 4096 bytes")
MIN_BLOCK_SIZE: Final = 1
PREFERRED_BLOCK_SIZE: Final = 4096
MAX_PAYLOAD: Final = 32 << 20


class Option(enum.IntEnum):
    """NBD_OPT_*: option haggling requests."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Reply(enum.IntEnum):
    """NBD_REP_*: option reply types; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    #: The option is unknown or not supported.
    ERR_UNSUP = _ERR | 1
    #: Forbidden by server policy.
    ERR_POLICY = _ERR | 2
    #: Syntactically or semantically invalid.
    ERR_INVALID = _ERR | 3
    #: Not supported on this platform.
    ERR_PLATFORM = _ERR | 4
    #: TLS is required first.
    ERR_TLS_REQD = _ERR | 5
    #: The export does not exist.
    ERR_UNKNOWN = _ERR | 6
    #: The server is shutting down.
    ERR_SHUTDOWN = _ERR | 7
    #: Block size negotiation is required.
    ERR_BLOCK_SIZE_REQD = _ERR | 8
    #: The request or its reply would be too large.
    ERR_TOO_BIG = _ERR | 9


class Info(enum.IntEnum):
    """NBD_INFO_*: items of NBD_REP_INFO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(enum.IntFlag):
    """NBD_FLAG_*: per-export transmission flags."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


# NBD_CMD_* and NBD_CMD_FLAG_* as plain literal ints as well as enums: compiled code inlines a
# Final literal and compares it as a machine word, where an enum member is an object.
NBD_CMD_READ: Final = 0
NBD_CMD_WRITE: Final = 1
NBD_CMD_DISC: Final = 2
NBD_CMD_FLUSH: Final = 3
NBD_CMD_TRIM: Final = 4
NBD_CMD_CACHE: Final = 5
NBD_CMD_WRITE_ZEROES: Final = 6
NBD_CMD_BLOCK_STATUS: Final = 7
NBD_CMD_FLAG_FUA: Final = 1
NBD_CMD_FLAG_NO_HOLE: Final = 2
NBD_CMD_FLAG_DF: Final = 4
NBD_CMD_FLAG_REQ_ONE: Final = 8
NBD_CMD_FLAG_FAST_ZERO: Final = 16


class Command(enum.IntEnum):
    """NBD_CMD_*: transmission-phase request types."""

    READ = NBD_CMD_READ
    WRITE = NBD_CMD_WRITE
    DISC = NBD_CMD_DISC
    FLUSH = NBD_CMD_FLUSH
    TRIM = NBD_CMD_TRIM
    CACHE = NBD_CMD_CACHE
    WRITE_ZEROES = NBD_CMD_WRITE_ZEROES
    BLOCK_STATUS = NBD_CMD_BLOCK_STATUS


class CommandFlag(enum.IntFlag):
    """NBD_CMD_FLAG_*: request flags."""

    FUA = NBD_CMD_FLAG_FUA
    NO_HOLE = NBD_CMD_FLAG_NO_HOLE
    DF = NBD_CMD_FLAG_DF
    REQ_ONE = NBD_CMD_FLAG_REQ_ONE
    FAST_ZERO = NBD_CMD_FLAG_FAST_ZERO


class ChunkType(enum.IntEnum):
    """NBD_REPLY_TYPE_*: structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


NBD_REPLY_FLAG_DONE: Final = 1 << 0

# base:allocation extent flags.
NBD_STATE_HOLE: Final = 1 << 0
NBD_STATE_ZERO: Final = 1 << 1
BASE_ALLOCATION: Final = "base:allocation"
#: QEMU's context: how deep in the backing chain each extent is allocated (0: nowhere, 1: the
#: image itself, 2 and more: a backing file), as ``qemu-nbd -A`` exports it.
QEMU_ALLOCATION_DEPTH: Final = "qemu:allocation-depth"
#: ``qemu:dirty-bitmap:NAME``: bit 0 of an extent's flags is set where bitmap NAME is dirty.
QEMU_DIRTY_BITMAP: Final = "qemu:dirty-bitmap:"
NBD_STATE_DIRTY: Final = 1 << 0


class Errno(enum.IntEnum):
    """NBD wire error values (proto.md "Error values"); not the host's errno numbers."""

    #: Operation not permitted (write to a read-only export).
    EPERM = 1
    #: Input/output error.
    EIO = 5
    #: Cannot allocate memory.
    ENOMEM = 12
    #: Invalid argument (bad range, flag or command).
    EINVAL = 22
    #: No space left on device (write past the end).
    ENOSPC = 28
    #: Value too large (oversized request, DF read that cannot be one chunk).
    EOVERFLOW = 75
    #: Operation not supported (FAST_ZERO that would be slow).
    ENOTSUP = 95
    #: The server is shutting down.
    ESHUTDOWN = 108
