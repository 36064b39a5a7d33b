"""vhost-user (QEMU docs/interop/vhost-user.rst): message ids, flags, feature bits and a
sans-I/O codec for the messages a virtio-blk front end and back end exchange.

Shared protocol definitions: the back end (:mod:`device.vhost_user`) and the front end
(:mod:`driver.vhost_user`) both use them; nothing here touches a socket. Every number is
in the machine's native byte order (the protocol says so); vblk only runs where that is
little-endian, like the virtio rings themselves.

A message is a 12-byte header ``{u32 request, u32 flags, u32 size}`` followed by ``size``
bytes of payload; file descriptors travel as SCM_RIGHTS ancillary data of the same
``sendmsg``. :class:`MessageParser` reassembles messages from any chunking of the byte
stream and says how many bytes to read next, so an I/O layer that reads exactly that
many never lets two messages share one ``recvmsg`` (which keeps each message's fds its own).
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Iterator, Sequence
from typing import Final

# Header flags.
VHOST_USER_VERSION: Final = 0x1
VHOST_USER_VERSION_MASK: Final = 0x3
VHOST_USER_REPLY_MASK: Final = 0x4
VHOST_USER_NEED_REPLY_MASK: Final = 0x8

# Feature bit 30 of GET_FEATURES: the back end speaks GET/SET_PROTOCOL_FEATURES. Unused by
# virtio itself, so guests never see it.
VHOST_USER_F_PROTOCOL_FEATURES: Final = 30
VHOST_F_LOG_ALL: Final = 26  # the front end logs dirty pages (live migration)

# The u64 of SET_VRING_KICK/CALL/ERR: bits 0-7 the ring index, bit 8 "no fd attached".
VHOST_USER_VRING_IDX_MASK: Final = 0xFF
VHOST_USER_VRING_NOFD_MASK: Final = 0x100

VHOST_VRING_F_LOG: Final = 0  # bit of vhost_vring_addr.flags

VHOST_USER_MAX_FDS: Final = 8  # fds per message (and memory regions per SET_MEM_TABLE)
VHOST_USER_MAX_CONFIG_SIZE: Final = 256
VHOST_USER_MAX_PAYLOAD: Final = 4096  # bigger than any message vblk understands

HEADER: Final = struct.Struct("=III")  # request, flags, size
HEADER_SIZE: Final = HEADER.size
U64: Final = struct.Struct("=Q")
VRING_STATE: Final = struct.Struct("=II")  # index, num
VRING_ADDR: Final = struct.Struct("=IIQQQQ")  # index, flags, desc, used, avail, log
MEMORY_HEADER: Final = struct.Struct("=II")  # nregions, padding
MEMORY_REGION: Final = struct.Struct("=QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
CONFIG_HEADER: Final = struct.Struct("=III")  # offset, size, flags

# VhostUserConfig.flags.
VHOST_SET_CONFIG_TYPE_FRONTEND: Final = 0
VHOST_SET_CONFIG_TYPE_MIGRATION: Final = 1


class Request(enum.IntEnum):
    """Front-end message types (the ids in the ``request`` field)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # the back-end channel's socket (one fd, no payload)
    SET_SLAVE_REQ_FD = 21  # its name before QEMU 8.1 (same id)
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    """Bits of GET/SET_PROTOCOL_FEATURES."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5  # the back-end channel (SET_BACKEND_REQ_FD, :class:`BackendRequest`)
    SLAVE_REQ = 5  # its name before QEMU 8.1 (same bit)
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    SLAVE_SEND_FD = 10  # its name before QEMU 8.1
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


class BackendRequest(enum.IntEnum):
    """Back-end message types: what the back end sends on the back-end channel (the socket the
    front end handed over with SET_BACKEND_REQ_FD), ids of their own. Before QEMU 8.1 these were
    ``VHOST_USER_SLAVE_*``; the ids are the same."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2  # no payload: the device's config space changed, GET_CONFIG it again
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


def backend_request_name(request: int) -> str:
    try:
        return BackendRequest(request).name
    except ValueError:
        return f"back-end request {request}"


# Requests the back end always answers (besides the u64 ack of REPLY_ACK).
REPLY_REQUESTS: Final = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_VRING_BASE,
        Request.GET_QUEUE_NUM,
        Request.GET_CONFIG,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
        Request.GET_INFLIGHT_FD,
    }
)


def protocol_mask(*bits: int) -> int:
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    return mask


class VhostUserProtocolError(Exception):
    """A message that breaks the protocol: the connection cannot go on."""


# ----------------------------------------------------------------------------------- messages


class _Flagged:
    """What a header's flags say (the field is the dataclass's)."""

    __slots__ = ()
    flags: int

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_REPLY_MASK)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)


@dataclasses.dataclass(frozen=True, slots=True)
class Header(_Flagged):
    request: int
    flags: int
    size: int


@dataclasses.dataclass(frozen=True, slots=True)
class Message(_Flagged):
    """One message as received: header fields, payload and the fds that came with it."""

    request: int
    flags: int
    payload: bytes
    fds: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"request {self.request}"


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """The header in the first 12 bytes; rejects a wrong version or an oversized payload."""
    if len(data) < HEADER_SIZE:
        raise VhostUserProtocolError(f"header of {len(data)} bytes, need {HEADER_SIZE}")
    request, flags, size = HEADER.unpack_from(data)
    if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
        raise VhostUserProtocolError(f"unsupported vhost-user version {flags & VHOST_USER_VERSION_MASK}")
    if size > VHOST_USER_MAX_PAYLOAD:
        raise VhostUserProtocolError(f"payload of {size} bytes exceeds {VHOST_USER_MAX_PAYLOAD}")
    return Header(request, flags, size)


def encode_message(
    request: int, payload: bytes = b"", *, reply: bool = False, need_reply: bool = False
) -> bytes:
    """Header + payload of a message (fds go separately, as ancillary data)."""
    if len(payload) > VHOST_USER_MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {VHOST_USER_MAX_PAYLOAD}")
    flags = VHOST_USER_VERSION
    if reply:
        flags |= VHOST_USER_REPLY_MASK
    if need_reply:
        flags |= VHOST_USER_NEED_REPLY_MASK
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes = b"") -> bytes:
    return encode_message(request, payload, reply=True)


class MessageParser:
    """Reassembles messages from stream chunks; fds belong to the message being received.

    Read at most :meth:`needed` bytes at a time (that is what keeps fds unambiguous):
    then a chunk never spans two messages.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._header: Header | None = None
        self._fds: list[int] = []

    def needed(self) -> int:
        """Bytes missing from the header being received, or from its payload."""
        if self._header is None:
            return HEADER_SIZE - len(self._buffer)
        return self._header.size - len(self._buffer)

    @property
    def idle(self) -> bool:
        """Between messages (no partial message, no unclaimed fds)."""
        return self._header is None and not self._buffer and not self._fds

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> list[Message]:
        """Complete messages in ``data``; raises VhostUserProtocolError on a bad header."""
        self._fds.extend(fds)
        messages: list[Message] = []
        view = memoryview(data)
        while True:
            if self._header is None:
                take = min(HEADER_SIZE - len(self._buffer), len(view))
                self._buffer += view[:take]
                view = view[take:]
                if len(self._buffer) < HEADER_SIZE:
                    break
                self._header = decode_header(self._buffer)
                self._buffer.clear()
            take = min(self._header.size - len(self._buffer), len(view))
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) < self._header.size:
                break
            header = self._header
            messages.append(Message(header.request, header.flags, bytes(self._buffer), tuple(self._fds)))
            self._header = None
            self._buffer.clear()
            self._fds = []
            if not view:
                break
        return messages

    def take_fds(self) -> list[int]:
        """Fds received for a message that never completed (for the caller to close)."""
        fds, self._fds = self._fds, []
        return fds


# ------------------------------------------------------------------------------------- payloads


def _exact(payload: bytes, layout: struct.Struct, what: str) -> tuple[int, ...]:
    if len(payload) != layout.size:
        raise VhostUserProtocolError(f"{what}: payload of {len(payload)} bytes, need {layout.size}")
    return layout.unpack(payload)


def encode_u64(value: int) -> bytes:
    return U64.pack(value)


def decode_u64(payload: bytes, what: str = "u64") -> int:
    (value,) = _exact(payload, U64, what)
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class VringState:
    """SET_VRING_NUM/BASE, GET_VRING_BASE, SET_VRING_ENABLE: ``{u32 index, u32 num}``."""

    index: int
    num: int

    def encode(self) -> bytes:
        return VRING_STATE.pack(self.index, self.num)

    @classmethod
    def decode(cls, payload: bytes) -> VringState:
        index, num = _exact(payload, VRING_STATE, "vring state")
        return cls(index, num)


@dataclasses.dataclass(frozen=True, slots=True)
class VringAddr:
    """SET_VRING_ADDR: ring addresses in the front end's user virtual address space.

    Note the order on the wire: descriptor table, used ring, available ring, log.
    """

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int = 0

    def encode(self) -> bytes:
        return VRING_ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)

    @classmethod
    def decode(cls, payload: bytes) -> VringAddr:
        index, flags, desc, used, avail, log = _exact(payload, VRING_ADDR, "vring address")
        return cls(index, flags, desc, used, avail, log)


@dataclasses.dataclass(frozen=True, slots=True)
class VringFile:
    """SET_VRING_KICK/CALL/ERR: the ring index, and whether no fd came with the message."""

    index: int
    nofd: bool = False

    def encode(self) -> bytes:
        return U64.pack(self.index | (VHOST_USER_VRING_NOFD_MASK if self.nofd else 0))

    @classmethod
    def decode(cls, payload: bytes) -> VringFile:
        value = decode_u64(payload, "vring file")
        if value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
            raise VhostUserProtocolError(f"vring file: unknown bits in {value:#x}")
        return cls(value & VHOST_USER_VRING_IDX_MASK, bool(value & VHOST_USER_VRING_NOFD_MASK))


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryRegion:
    """A region of guest RAM: its guest-physical and front-end virtual address, and where it
    starts in the fd that comes with it."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    @property
    def gpa_end(self) -> int:
        return self.guest_phys_addr + self.memory_size

    @property
    def uva_end(self) -> int:
        return self.userspace_addr + self.memory_size

    def encode(self) -> bytes:
        return MEMORY_REGION.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )


def encode_memory_table(regions: Sequence[MemoryRegion]) -> bytes:
    """SET_MEM_TABLE: ``{u32 nregions, u32 padding}`` then the regions (one fd each)."""
    if not 1 <= len(regions) <= VHOST_USER_MAX_FDS:
        raise ValueError(f"a memory table has 1..{VHOST_USER_MAX_FDS} regions")
    return MEMORY_HEADER.pack(len(regions), 0) + b"".join(r.encode() for r in regions)


def decode_memory_table(payload: bytes) -> list[MemoryRegion]:
    """The regions of SET_MEM_TABLE. QEMU sends only the regions in use; a payload sized for
    all eight slots is accepted too."""
    if len(payload) < MEMORY_HEADER.size:
        raise VhostUserProtocolError(f"memory table: payload of {len(payload)} bytes")
    count, _padding = MEMORY_HEADER.unpack_from(payload)
    if not 1 <= count <= VHOST_USER_MAX_FDS:
        raise VhostUserProtocolError(f"memory table of {count} regions (1..{VHOST_USER_MAX_FDS})")
    room = (len(payload) - MEMORY_HEADER.size) // MEMORY_REGION.size
    if (len(payload) - MEMORY_HEADER.size) % MEMORY_REGION.size or room < count:
        raise VhostUserProtocolError(
            f"memory table: {len(payload)} bytes do not hold {count} regions of {MEMORY_REGION.size}"
        )
    return [
        MemoryRegion(*MEMORY_REGION.unpack_from(payload, MEMORY_HEADER.size + i * MEMORY_REGION.size))
        for i in range(count)
    ]


def encode_single_region(region: MemoryRegion) -> bytes:
    """ADD_MEM_REG / REM_MEM_REG: ``u64 padding`` then one region."""
    return U64.pack(0) + region.encode()


def decode_single_region(payload: bytes) -> MemoryRegion:
    if len(payload) != U64.size + MEMORY_REGION.size:
        raise VhostUserProtocolError(f"single memory region: payload of {len(payload)} bytes")
    return MemoryRegion(*MEMORY_REGION.unpack_from(payload, U64.size))


@dataclasses.dataclass(frozen=True, slots=True)
class ConfigSpace:
    """GET_CONFIG / SET_CONFIG: ``{u32 offset, u32 size, u32 flags}`` then ``size`` bytes."""

    offset: int
    size: int
    flags: int = VHOST_SET_CONFIG_TYPE_FRONTEND
    data: bytes = b""

    def encode(self) -> bytes:
        data = self.data.ljust(self.size, b"\0")[: self.size]
        return CONFIG_HEADER.pack(self.offset, self.size, self.flags) + data

    @classmethod
    def decode(cls, payload: bytes) -> ConfigSpace:
        if len(payload) < CONFIG_HEADER.size:
            raise VhostUserProtocolError(f"config space: payload of {len(payload)} bytes")
        offset, size, flags = CONFIG_HEADER.unpack_from(payload)
        if size > VHOST_USER_MAX_CONFIG_SIZE:
            raise VhostUserProtocolError(f"config space of {size} bytes (max {VHOST_USER_MAX_CONFIG_SIZE})")
        data = payload[CONFIG_HEADER.size :]
        if len(data) != size:
            raise VhostUserProtocolError(f"config space: {len(data)} bytes of data for size {size}")
        return cls(offset, size, flags, data)


def feature_names(features: int, names: type[enum.IntEnum] = ProtocolFeature) -> list[str]:
    """The names of the set bits (unknown bits as numbers), for logs."""
    out = []
    for bit in _bits(features):
        try:
            out.append(names(bit).name)
        except ValueError:
            out.append(str(bit))
    return out


def _bits(value: int) -> Iterator[int]:
    bit = 0
    while value:
        if value & 1:
            yield bit
        value >>= 1
        bit += 1
