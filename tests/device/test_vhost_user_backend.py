"""vblk's vhost-user back end without QEMU: the shared-region guest memory, and a scripted
front end replaying QEMU 7.2's message sequence (realize, two start/stop cycles, EOF) with
real memfds, eventfds and split rings written by hand."""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import mmap
import os
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from device.blk import BlkConfig
from device.block.memory import MemoryNode
from device.platform import GuestMemoryError
from device.spec import vhost_user as vu
from device.spec import virtio_blk as vb
from device.spec.virtio import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTQ_DESC,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    avail_ring_size,
    desc_table_size,
    vring_used_offset,
)
from device.vhost_user.inflight import InflightMessage, queue_area_size
from device.vhost_user.protocol import VhostUserBlk
from device.vhost_user.regions import RegionMemory
from device.vhost_user.server import VhostUserServer, recv_message

PAGE = mmap.PAGESIZE
MiB = 1 << 20
UVA = 0x7F00_0000_0000  # the front end's virtual address of its first region (any value works)


def memfd(size: int) -> int:
    fd = os.memfd_create("vblk-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


# ------------------------------------------------------------------------------ RegionMemory


def test_region_memory_maps_regions_at_their_guest_physical_addresses() -> None:
    low, high = memfd(2 * MiB), memfd(3 * MiB)
    memory = RegionMemory()
    try:
        os.pwrite(low, b"low", 0x1000)
        os.pwrite(high, b"high", MiB + 0x10)  # the second region starts 1 MiB into its fd
        regions = [
            vu.MemoryRegion(0x1000_0000, 2 * MiB, UVA, 0),
            vu.MemoryRegion(0x1040_0000, 2 * MiB, UVA + 0x100_0000, MiB),
        ]
        memory.map_table(regions, [low, high])
        assert memory.base == 0x1000_0000 and memory.end == 0x1060_0000 and memory.sparse
        assert memory.read(0x1000_1000, 3) == b"low"
        assert memory.read(0x1040_0010, 4) == b"high"
        memory.write(0x1040_0020, b"shared")
        assert os.pread(high, 6, MiB + 0x20) == b"shared"  # MAP_SHARED: the front end sees it
        # The hole between the regions, and ranges straddling it, are not guest RAM.
        assert not memory.contains(0x1020_0000, 1)
        assert not memory.contains(0x101F_FFFF, 2)
        with pytest.raises(GuestMemoryError):
            memory.view(0x1030_0000, 16)
        assert memory.contains(0x1000_0000, 2 * MiB) and not memory.contains(0x1000_0000, 2 * MiB + 1)
        assert memory.uva_to_gpa(UVA + 0x100_0010, 8) == 0x1040_0010
        with pytest.raises(GuestMemoryError):
            memory.uva_to_gpa(UVA + 2 * MiB - 4, 8)  # runs off the end of its region
        # A new table replaces the mapping in place.
        memory.map_table([vu.MemoryRegion(0, 2 * MiB, UVA, 0)], [low])
        assert (memory.base, memory.end, memory.sparse, memory.generation) == (0, 2 * MiB, False, 2)
        assert memory.read(0x1000, 3) == b"low"
    finally:
        memory.close()
        os.close(low)
        os.close(high)


def test_adjacent_regions_are_one_span() -> None:
    fd = memfd(4 * MiB)
    memory = RegionMemory()
    try:
        memory.map_table(
            [vu.MemoryRegion(2 * MiB, 2 * MiB, UVA + 2 * MiB, 2 * MiB), vu.MemoryRegion(0, 2 * MiB, UVA, 0)],
            [fd, fd],
        )
        assert not memory.sparse and memory.contains(MiB, 2 * MiB)  # straddles the two regions
    finally:
        memory.close()
        os.close(fd)


@pytest.mark.parametrize(
    "regions",
    [
        [vu.MemoryRegion(0, 4 * MiB, UVA, 0)],  # past the end of the 2 MiB fd: would SIGBUS
        [vu.MemoryRegion(0x800, MiB, UVA, 0)],  # not page aligned
        [vu.MemoryRegion(0, MiB, UVA, 0x10)],
        [vu.MemoryRegion(0, 0, UVA, 0)],
        [vu.MemoryRegion(0, MiB, UVA, 0), vu.MemoryRegion(MiB // 2, MiB, UVA + MiB, MiB)],  # overlap
        [vu.MemoryRegion(0, MiB, UVA, 0), vu.MemoryRegion(1 << 60, MiB, UVA + MiB, MiB)],  # huge span
    ],
)
def test_bad_memory_tables_are_refused(regions: list[vu.MemoryRegion]) -> None:
    fd = memfd(2 * MiB)
    memory = RegionMemory()
    try:
        with pytest.raises(GuestMemoryError):
            memory.map_table(regions, [fd] * len(regions))
        assert not memory.mapped
    finally:
        memory.close()
        os.close(fd)


# --------------------------------------------------------------------- a scripted front end


class FrontEnd:
    """Just enough of QEMU's side: send messages with fds, read replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = vu.MessageParser()

    def send(
        self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *, need_reply: bool = False
    ) -> None:
        data = vu.encode_message(request, payload, need_reply=need_reply)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        assert self.sock.sendmsg([data], ancillary) == len(data)

    async def reply(self, request: int) -> bytes:
        msg = await asyncio.wait_for(recv_message(self.sock, self.parser), 5)
        assert msg is not None and msg.request == request and msg.is_reply, msg
        return msg.payload

    async def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        self.send(request, payload, fds)
        return await self.reply(request)

    async def acked(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        self.send(request, payload, fds, need_reply=True)
        return vu.decode_u64(await self.reply(request))


class Ring:
    """A split ring of 8 entries written by hand in guest memory (no EVENT_IDX, no indirect)."""

    SIZE = 8

    def __init__(self, memory: mmap.mmap, gpa_base: int, ring_gpa: int, *, legacy: bool = False) -> None:
        self.mem = memory
        self.gpa_base = gpa_base  # guest-physical address of byte 0 of ``memory``
        self.desc = ring_gpa
        self.avail = ring_gpa + desc_table_size(self.SIZE)
        self.used = (self.avail + avail_ring_size(self.SIZE) + 3) & ~3
        if legacy:  # one block, the used ring on the next 4 KiB boundary (vring_init)
            self.used = ring_gpa + vring_used_offset(self.SIZE)
        self.avail_idx = 0
        self.last_used = 0

    def _off(self, gpa: int) -> int:
        return gpa - self.gpa_base

    def submit(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Chain ``(gpa, length, writable)`` buffers from descriptor 0; returns the head."""
        for i, (gpa, length, writable) in enumerate(buffers):
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (
                VIRTQ_DESC_F_NEXT if i + 1 < len(buffers) else 0
            )
            VIRTQ_DESC.pack_into(self.mem, self._off(self.desc) + 16 * i, gpa, length, flags, i + 1)
        slot = self.avail_idx % self.SIZE
        struct.pack_into("<H", self.mem, self._off(self.avail) + 4 + 2 * slot, 0)
        self.avail_idx += 1
        struct.pack_into("<H", self.mem, self._off(self.avail) + 2, self.avail_idx)
        return 0

    def used_entries(self) -> list[tuple[int, int]]:
        idx = struct.unpack_from("<H", self.mem, self._off(self.used) + 2)[0]
        out = []
        while self.last_used != idx:
            slot = self.last_used % self.SIZE
            out.append(struct.unpack_from("<II", self.mem, self._off(self.used) + 4 + 8 * slot))
            self.last_used += 1
        return out


async def readable(fd: int, timeout: float = 5) -> int:
    """Wait for an eventfd to fire; its counter."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _wake, waiter)
    try:
        await asyncio.wait_for(waiter, timeout)
    finally:
        loop.remove_reader(fd)
    return os.eventfd_read(fd)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


@contextlib.asynccontextmanager
async def served(backend: MemoryNode) -> AsyncIterator[tuple[VhostUserBlk, VhostUserServer, Path]]:
    directory = Path(tempfile.mkdtemp(prefix="vblk-vu-"))
    blk = VhostUserBlk(backend, BlkConfig(queue_size=128, serial="vblk-test"))
    server = VhostUserServer(directory / "vu.sock", blk)
    await server.start()
    try:
        yield blk, server, directory / "vu.sock"
    finally:
        await server.close()
        blk.close()
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


async def connect(path: Path) -> FrontEnd:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, str(path))
    return FrontEnd(sock)


FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES | 1 << vb.VIRTIO_BLK_F_FLUSH


async def start_ring(fe: FrontEnd, ring: Ring, uva_of: int, kick: int, call: int) -> None:
    """SET_VRING_NUM/BASE/ADDR/CALL/KICK then ENABLE, as QEMU's vhost_virtqueue_start does."""
    fe.send(vu.Request.SET_VRING_NUM, vu.VringState(0, Ring.SIZE).encode())
    fe.send(vu.Request.SET_VRING_BASE, vu.VringState(0, 0).encode())
    addr = vu.VringAddr(0, 0, ring.desc + uva_of, ring.used + uva_of, ring.avail + uva_of, ring.used)
    fe.send(vu.Request.SET_VRING_ADDR, addr.encode())
    fe.send(vu.Request.SET_VRING_CALL, vu.VringFile(0).encode(), [call])
    fe.send(vu.Request.SET_VRING_KICK, vu.VringFile(0).encode(), [kick])
    assert await fe.acked(vu.Request.SET_VRING_ENABLE, vu.VringState(0, 1).encode()) == 0


@pytest.mark.expect_errors("virtio_device_needs_reset")
async def test_qemu_message_sequence_two_cycles_and_requests() -> None:
    backend = MemoryNode(4 * MiB)
    kick, call, err = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3))
    ram_fd = memfd(4 * MiB)
    ram = mmap.mmap(ram_fd, 4 * MiB)
    try:
        async with served(backend) as (blk, server, path):
            fe = await connect(path)
            # -- realize -------------------------------------------------------------------------
            offered = vu.decode_u64(await fe.call(vu.Request.GET_FEATURES))
            assert offered >> vu.VHOST_USER_F_PROTOCOL_FEATURES & 1
            assert offered >> VIRTIO_F_VERSION_1 & 1 and offered >> VIRTIO_F_EVENT_IDX & 1
            protocol = vu.decode_u64(await fe.call(vu.Request.GET_PROTOCOL_FEATURES))
            wanted = vu.protocol_mask(
                vu.ProtocolFeature.MQ, vu.ProtocolFeature.REPLY_ACK, vu.ProtocolFeature.CONFIG
            )
            assert protocol & wanted == wanted
            fe.send(vu.Request.SET_PROTOCOL_FEATURES, vu.encode_u64(wanted))
            assert vu.decode_u64(await fe.call(vu.Request.GET_QUEUE_NUM)) == 1
            fe.send(vu.Request.SET_OWNER)
            fe.send(vu.Request.SET_VRING_CALL, vu.VringFile(0).encode(), [call])
            fe.send(vu.Request.SET_VRING_ERR, vu.VringFile(0).encode(), [err])
            reply = await fe.call(vu.Request.GET_CONFIG, vu.ConfigSpace(0, 57, 0, bytes(57)).encode())
            assert len(reply) == 12 + 57  # exactly what was asked for
            config = vu.ConfigSpace.decode(reply)
            assert struct.unpack_from("<Q", config.data)[0] == 4 * MiB // 512  # capacity
            # A request the back end does not know gets a failed ack, and the session goes on.
            assert await fe.acked(vu.Request.SET_LOG_BASE, vu.encode_u64(0)) != 0

            # -- first start: one region at GPA 0 -----------------------------------------------
            fe.send(vu.Request.SET_FEATURES, vu.encode_u64(FEATURES))
            table = vu.encode_memory_table([vu.MemoryRegion(0, 4 * MiB, UVA, 0)])
            assert await fe.acked(vu.Request.SET_MEM_TABLE, table, [ram_fd]) == 0
            ring = Ring(ram, 0, 0x10000)
            await start_ring(fe, ring, UVA, kick, call)
            ram[0x20000 : 0x20000 + 512] = b"w" * 512
            vb.VIRTIO_BLK_OUTHDR.pack_into(ram, 0x30000, vb.RequestType.OUT, 0, 3)
            ram[0x30010] = 0xFF
            ring.submit([(0x30000, 16, False), (0x20000, 512, False), (0x30010, 1, True)])
            os.eventfd_write(kick, 1)
            await readable(call)
            assert ring.used_entries() == [(0, 1)] and ram[0x30010] == 0  # status OK, 1 byte written
            assert backend.extents(3 * 512, 512)[0].hole is False
            vb.VIRTIO_BLK_OUTHDR.pack_into(ram, 0x30000, vb.RequestType.IN, 0, 3)
            ring.submit([(0x30000, 16, False), (0x28000, 512, True), (0x30010, 1, True)])
            os.eventfd_write(kick, 1)
            await readable(call)
            assert ring.used_entries() == [(0, 513)] and ram[0x28000 : 0x28000 + 512] == b"w" * 512
            # Moving a running ring is refused, and the refused address is forgotten.
            running = blk.rings[0].addr
            moved = vu.VringAddr(0, 0, UVA + 0x50000, UVA + 0x51000, UVA + 0x52000, 0x51000)
            assert await fe.acked(vu.Request.SET_VRING_ADDR, moved.encode()) != 0
            assert blk.rings[0].addr == running
            fe.send(vu.Request.SET_VRING_ENABLE, vu.VringState(0, 0).encode())
            base = vu.VringState.decode(
                await fe.call(vu.Request.GET_VRING_BASE, vu.VringState(0, 0).encode())
            )
            assert base == vu.VringState(0, 2)
            assert not blk.device.driver_ok  # every ring stopped: the device is reset

            # -- second start: two regions with a hole, the ring in the upper one ----------------
            fe.send(vu.Request.SET_FEATURES, vu.encode_u64(FEATURES))
            regions = [
                vu.MemoryRegion(0, MiB, UVA, 0),
                vu.MemoryRegion(0x100_0000, 2 * MiB, UVA + 2 * MiB, 2 * MiB),
            ]
            table = vu.encode_memory_table(regions)
            assert await fe.acked(vu.Request.SET_MEM_TABLE, table, [ram_fd, ram_fd]) == 0
            # GPA 0x100_0000 + x lives at fd offset 2 MiB + x.
            ring = Ring(ram, 0x100_0000 - 2 * MiB, 0x100_0000)
            await start_ring(fe, ring, UVA + 2 * MiB - 0x100_0000, kick, call)
            vb.VIRTIO_BLK_OUTHDR.pack_into(ram, 2 * MiB + 0x30000, vb.RequestType.IN, 0, 3)
            ring.submit([(0x103_0000, 16, False), (0x102_0000, 512, True), (0x103_0010, 1, True)])
            os.eventfd_write(kick, 1)
            await readable(call)
            assert ring.used_entries() == [(0, 513)]
            assert ram[2 * MiB + 0x20000 : 2 * MiB + 0x20000 + 512] == b"w" * 512
            # A buffer in the hole between the regions: the device stops and says so on the error fd.
            ring.submit([(0x103_0000, 16, False), (0x80_0000, 512, True), (0x103_0010, 1, True)])
            os.eventfd_write(kick, 1)
            await readable(err)
            assert blk.device.broken_reason is not None and "outside guest RAM" in blk.device.broken_reason
            base = vu.VringState.decode(
                await fe.call(vu.Request.GET_VRING_BASE, vu.VringState(0, 0).encode())
            )
            assert base.num == 2
            assert [s.base for s in blk.starts] == [0, 0] and len(blk.starts) == 2

            # -- QEMU exits ----------------------------------------------------------------------
            fe.sock.close()
            for _ in range(500):
                if server.sessions_done:
                    break
                await asyncio.sleep(0.01)
            assert server.sessions_done == 1 and not blk.memory.mapped
            assert blk.messages["GET_CONFIG"] == 1 and blk.messages["SET_MEM_TABLE"] == 2
    finally:
        ram.close()
        for fd in (kick, call, err, ram_fd):
            os.close(fd)


@pytest.mark.expect_errors("vhost_user_protocol_error")
async def test_a_broken_connection_does_not_stop_the_server() -> None:
    async with served(MemoryNode(MiB)) as (blk, _server, path):
        fe = await connect(path)
        fe.sock.send(struct.pack("=III", vu.Request.GET_FEATURES, 0x2, 0))  # version 2
        assert await asyncio.get_running_loop().sock_recv(fe.sock, 16) == b""  # closed on us
        fe.sock.close()
        fe = await connect(path)
        assert vu.decode_u64(await fe.call(vu.Request.GET_FEATURES)) >> VIRTIO_F_VERSION_1 & 1
        fe.send(vu.Request.SET_VRING_NUM, vu.VringState(7, 8).encode())  # no such ring
        assert await asyncio.get_running_loop().sock_recv(fe.sock, 16) == b""
        fe.sock.close()
        assert blk.connections == 2


async def test_a_legacy_driver_without_version_1() -> None:
    """What QEMU sends for a guest on the legacy interface of a transitional device."""
    backend = MemoryNode(MiB)
    kick, call = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2))
    ram_fd = memfd(MiB)
    ram = mmap.mmap(ram_fd, MiB)
    try:
        async with served(backend) as (blk, _server, path):
            fe = await connect(path)
            fe.send(vu.Request.SET_PROTOCOL_FEATURES, vu.encode_u64(1 << vu.ProtocolFeature.REPLY_ACK))
            legacy = 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES | 1 << vb.VIRTIO_BLK_F_FLUSH
            fe.send(vu.Request.SET_FEATURES, vu.encode_u64(legacy))
            table = vu.encode_memory_table([vu.MemoryRegion(0, MiB, UVA, 0)])
            assert await fe.acked(vu.Request.SET_MEM_TABLE, table, [ram_fd]) == 0
            ring = Ring(ram, 0, 0x10000, legacy=True)
            await start_ring(fe, ring, UVA, kick, call)
            [start] = blk.starts
            assert start.legacy and start.legacy_layout and blk.device.legacy
            vb.VIRTIO_BLK_OUTHDR.pack_into(ram, 0x30000, vb.RequestType.GET_ID, 0, 0)
            ring.submit([(0x30000, 16, False), (0x20000, 20, True), (0x30010, 1, True)])
            os.eventfd_write(kick, 1)
            await readable(call)
            assert ring.used_entries() == [(0, 21)] and ram[0x30010] == 0
            assert ram[0x20000 : 0x20000 + 9] == b"vblk-test"
            fe.sock.close()
    finally:
        ram.close()
        for fd in (kick, call, ram_fd):
            os.close(fd)


async def test_the_inflight_region_comes_with_its_fd_and_records_each_request() -> None:
    """GET_INFLIGHT_FD answers with a sealed memfd; SET_INFLIGHT_FD maps one; the split area then
    holds each request while it is in flight (libvhost-user's layout). Refusals leave the
    session going: a region too small for the rings, one asked for without the protocol feature."""
    backend = MemoryNode(4 * MiB)
    kick, call = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2))
    ram_fd = memfd(4 * MiB)
    ram = mmap.mmap(ram_fd, 4 * MiB)
    received: list[int] = []
    try:
        async with served(backend) as (blk, _server, path):
            fe = await connect(path)
            vu.decode_u64(await fe.call(vu.Request.GET_FEATURES))
            # Not negotiated yet: "no buffer" (mmap_size 0) and no fd.
            fe.send(
                vu.Request.SET_PROTOCOL_FEATURES,
                vu.encode_u64(vu.protocol_mask(vu.ProtocolFeature.REPLY_ACK)),
            )
            ask = InflightMessage(0, 0, 1, Ring.SIZE).encode()
            fe.send(vu.Request.GET_INFLIGHT_FD, ask)
            msg = await asyncio.wait_for(recv_message(fe.sock, fe.parser), 5)
            assert msg is not None and msg.is_reply and not msg.fds
            assert InflightMessage.decode(msg.payload, "reply").mmap_size == 0

            wanted = vu.protocol_mask(vu.ProtocolFeature.REPLY_ACK, vu.ProtocolFeature.INFLIGHT_SHMFD)
            fe.send(vu.Request.SET_PROTOCOL_FEATURES, vu.encode_u64(wanted))
            fe.send(vu.Request.SET_FEATURES, vu.encode_u64(FEATURES))
            fe.send(vu.Request.GET_INFLIGHT_FD, ask)
            msg = await asyncio.wait_for(recv_message(fe.sock, fe.parser), 5)
            assert msg is not None and msg.is_reply and len(msg.fds) == 1, msg
            received.extend(msg.fds)
            reply = InflightMessage.decode(msg.payload, "reply")
            assert reply == InflightMessage(queue_area_size(Ring.SIZE), 0, 1, Ring.SIZE)
            seals = fcntl.fcntl(received[0], fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
            # Too small for the rings it is for: refused, and the session goes on.
            small = InflightMessage(64, 0, 1, Ring.SIZE).encode()
            assert await fe.acked(vu.Request.SET_INFLIGHT_FD, small, [received[0]]) != 0
            assert await fe.acked(vu.Request.SET_INFLIGHT_FD, reply.encode(), [received[0]]) == 0
            region = mmap.mmap(received[0], reply.mmap_size)
            try:
                table = vu.encode_memory_table([vu.MemoryRegion(0, 4 * MiB, UVA, 0)])
                assert await fe.acked(vu.Request.SET_MEM_TABLE, table, [ram_fd]) == 0
                ring = Ring(ram, 0, 0x10000)
                await start_ring(fe, ring, UVA, kick, call)
                features, version, desc_num, _batch_head, used_idx = struct.unpack_from("<QHHHH", region, 0)
                assert (features, version, desc_num, used_idx) == (0, 1, Ring.SIZE, 0)  # initialised
                vb.VIRTIO_BLK_OUTHDR.pack_into(ram, 0x30000, vb.RequestType.IN, 0, 0)
                ring.submit([(0x30000, 16, False), (0x28000, 512, True), (0x30010, 1, True)])
                os.eventfd_write(kick, 1)
                await readable(call)
                assert ring.used_entries() == [(0, 513)]
                inflight, _next, counter = struct.unpack_from("<B5xHQ", region, 16)  # head 0
                assert (inflight, counter) == (0, 1)  # taken once, completed
                assert struct.unpack_from("<H", region, 14)[0] == 1  # the region's copy of used->idx
                assert blk.starts[-1].recovery is not None and blk.starts[-1].recovery.fresh
            finally:
                region.close()
            fe.sock.close()
    finally:
        ram.close()
        for fd in (kick, call, ram_fd, *received):
            os.close(fd)
