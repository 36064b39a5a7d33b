"""virtio-blk request handling, fed by hand-built chains: types, status bytes, used lengths.

The test plays the driver directly on the device (no PCI, no guest driver), so every chain
shape the spec allows or forbids can be written exactly.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Sequence

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from device.blk import BlkConfig
from device.block.memory import MemoryNode
from device.block.node import BlockError, BlockNode, Completion, blocking_call
from device.spec import virtio_blk as vb
from device.spec.virtio import VIRTIO_CONFIG_S_NEEDS_RESET
from device.spec.virtio_blk import RequestType, Status
from tests.device.ring import INDIRECT, WRITE, BlkBench, Desc, link, settle, write_table

SECTOR = 512
DISK = 1 << 20
CAPACITY = DISK // SECTOR


class FailingBackend(MemoryNode):
    """A memory backend whose listed operations fail with EIO; counts flushes."""

    def __init__(self, size: int, fail: Sequence[str] = ()) -> None:
        super().__init__(size)
        self.fail = set(fail)
        self.flushes = 0

    def _maybe_fail(self, op: str) -> None:
        if op in self.fail:
            raise BlockError(errno.EIO, f"injected {op} failure")

    def read_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._maybe_fail("readv")
        super().read_now(offset, buffers)

    def write_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._maybe_fail("writev")
        super().write_now(offset, buffers)

    def flush(self, done: Completion) -> None:
        try:
            self._maybe_fail("flush")
        except BlockError as exc:
            done.complete(exc)
            return
        self.flushes += 1
        done.complete(None)

    def discard(self, offset: int, length: int, done: Completion) -> None:
        try:
            self._maybe_fail("discard")
        except BlockError as exc:
            done.complete(exc)
            return
        super().discard(offset, length, done)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool, done: Completion) -> None:
        try:
            self._maybe_fail("write_zeroes")
        except BlockError as exc:
            done.complete(exc)
            return
        super().write_zeroes(offset, length, may_unmap, done)


def disk_bytes(bench: BlkBench, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    blocking_call(bench.backend.readv, offset, [memoryview(buf)])
    return bytes(buf)


def fill_disk(bench: BlkBench, data: bytes, offset: int = 0) -> None:
    blocking_call(bench.backend.writev, offset, [memoryview(data)])


def started(*, backend: BlockNode | None = None, config: BlkConfig | None = None) -> BlkBench:
    bench = BlkBench(backend=backend, config=config)
    bench.start()
    return bench


def segments_chain(bench: BlkBench, rtype: int, segments: Sequence[tuple[int, int, int]]) -> list[Desc]:
    raw = b"".join(vb.VIRTIO_BLK_DISCARD_WRITE_ZEROES.pack(*s) for s in segments)
    gpa = bench.buffer(max(1, len(raw)))
    bench.memory.write(gpa, raw)
    return link([(bench.header(rtype), 16, 0), (gpa, len(raw), 0), (bench.buffer(1, 0xFF), 1, WRITE)])


# -- the six request types ----------------------------------------------------------------


async def test_in_reads_the_disk_and_used_len_is_data_plus_status() -> None:
    bench = started()
    image = os.urandom(4 * SECTOR)
    fill_disk(bench, image, 3 * SECTOR)
    chain = bench.in_chain(3, 4)
    assert await bench.run(chain) == (Status.OK, 4 * SECTOR + 1)
    assert bench.memory.read(chain[1].addr, 4 * SECTOR) == image


async def test_in_status_byte_may_share_the_last_data_descriptor() -> None:
    bench = started()
    image = os.urandom(2 * SECTOR)
    fill_disk(bench, image)
    data = bench.buffer(SECTOR)
    tail = bench.buffer(SECTOR + 1, 0xFF)
    chain = link([(bench.header(RequestType.IN, 0), 16, 0), (data, SECTOR, WRITE), (tail, SECTOR + 1, WRITE)])
    assert await bench.run(chain) == (Status.OK, 2 * SECTOR + 1)
    assert bench.memory.read(data, SECTOR) + bench.memory.read(tail, SECTOR) == image


async def test_out_writes_the_disk_and_used_len_is_the_status_byte() -> None:
    bench = started()
    data = os.urandom(3 * SECTOR)
    assert await bench.run(bench.out_chain(7, data)) == (Status.OK, 1)
    assert disk_bytes(bench, 7 * SECTOR, len(data)) == data
    assert disk_bytes(bench, 6 * SECTOR, SECTOR) == bytes(SECTOR)


async def test_out_header_and_data_in_one_readable_descriptor() -> None:
    bench = started()
    data = os.urandom(SECTOR)
    gpa = bench.buffer(16 + SECTOR)
    bench.memory.write(gpa, vb.VIRTIO_BLK_OUTHDR.pack(RequestType.OUT, 0, 9) + data)
    chain = link([(gpa, 16 + SECTOR, 0), (bench.buffer(1, 0xFF), 1, WRITE)])
    assert await bench.run(chain) == (Status.OK, 1)
    assert disk_bytes(bench, 9 * SECTOR, SECTOR) == data


async def test_flush_reaches_the_backend() -> None:
    bench = started(backend=FailingBackend(DISK))
    assert isinstance(bench.backend, FailingBackend)
    chain = link([(bench.header(RequestType.FLUSH), 16, 0), (bench.buffer(1, 0xFF), 1, WRITE)])
    assert await bench.run(chain) == (Status.OK, 1)
    assert bench.backend.flushes == 1


async def test_flush_not_negotiated_is_unsupported() -> None:
    bench = BlkBench(backend=FailingBackend(DISK))
    bench.start(
        bench.device.device_features & ~(1 << vb.VIRTIO_BLK_F_FLUSH | 1 << vb.VIRTIO_BLK_F_CONFIG_WCE)
    )
    chain = link([(bench.header(RequestType.FLUSH), 16, 0), (bench.buffer(1, 0xFF), 1, WRITE)])
    assert await bench.run(chain) == (Status.UNSUPP, 1)


@pytest.mark.parametrize(("buffer", "written"), [(20, 20), (32, 20), (8, 8)])
async def test_get_id_writes_the_nul_padded_serial(buffer: int, written: int) -> None:
    bench = started(config=BlkConfig(serial="disk-42", queue_size=16))
    data = bench.buffer(buffer, 0xAA)
    chain = link(
        [(bench.header(RequestType.GET_ID), 16, 0), (data, buffer, WRITE), (bench.buffer(1, 0xFF), 1, WRITE)]
    )
    assert await bench.run(chain) == (Status.OK, written + 1)
    expected = b"disk-42".ljust(20, b"\0")[:written]
    assert bench.memory.read(data, buffer) == expected + b"\xaa" * (buffer - written)


async def test_discard_and_write_zeroes_zero_their_segments() -> None:
    bench = started()
    fill_disk(bench, b"\x5a" * (64 * SECTOR))
    discard = segments_chain(bench, RequestType.DISCARD, [(0, 8, 0), (16, 8, 0)])
    assert await bench.run(discard) == (Status.OK, 1)
    zeroes = segments_chain(
        bench, RequestType.WRITE_ZEROES, [(32, 8, 0), (48, 8, vb.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]
    )
    assert await bench.run(zeroes) == (Status.OK, 1)
    disk = disk_bytes(bench, 0, 64 * SECTOR)
    for start in range(0, 64, 8):
        expected = b"\0" if start in (0, 16, 32, 48) else b"\x5a"
        assert disk[start * SECTOR : (start + 8) * SECTOR] == expected * (8 * SECTOR), start


@pytest.mark.parametrize(
    ("rtype", "segments", "status"),
    [
        (RequestType.DISCARD, [(0, 8, vb.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)], Status.UNSUPP),
        (RequestType.DISCARD, [(0, 8, 0x80)], Status.UNSUPP),
        (RequestType.WRITE_ZEROES, [(0, 8, 0x2)], Status.UNSUPP),
        (RequestType.DISCARD, [(CAPACITY - 4, 8, 0)], Status.IOERR),
        (RequestType.WRITE_ZEROES, [(0, 8, 0), ((1 << 64) - 1, 1, 0)], Status.IOERR),
        (RequestType.DISCARD, [], Status.IOERR),
        (RequestType.DISCARD, [(k, 1, 0) for k in range(33)], Status.IOERR),  # > max_discard_seg
        (RequestType.WRITE_ZEROES, [(0, (1 << 22) + 8, 0)], Status.IOERR),  # > max sectors
    ],
    ids=[
        "discard-unmap",
        "discard-unknown-flag",
        "write-zeroes-unknown-flag",
        "discard-out-of-range",
        "write-zeroes-sector-wraps",
        "discard-no-segment",
        "discard-too-many-segments",
        "write-zeroes-too-many-sectors",
    ],
)
async def test_bad_discard_and_write_zeroes_change_nothing(
    rtype: int, segments: list[tuple[int, int, int]], status: Status
) -> None:
    bench = started()
    fill_disk(bench, b"\x5a" * DISK)
    assert await bench.run(segments_chain(bench, rtype, segments)) == (status, 1)
    assert disk_bytes(bench, 0, DISK) == b"\x5a" * DISK


async def test_segment_payload_not_a_multiple_of_16_is_an_io_error() -> None:
    bench = started()
    raw = vb.VIRTIO_BLK_DISCARD_WRITE_ZEROES.pack(0, 8, 0) + b"\0" * 8
    gpa = bench.buffer(len(raw))
    bench.memory.write(gpa, raw)
    chain = link(
        [(bench.header(RequestType.DISCARD), 16, 0), (gpa, len(raw), 0), (bench.buffer(1, 0xFF), 1, WRITE)]
    )
    assert await bench.run(chain) == (Status.IOERR, 1)


async def test_segments_must_follow_the_block_size() -> None:
    bench = started(config=BlkConfig(blk_size=4096, queue_size=16))
    assert await bench.run(segments_chain(bench, RequestType.DISCARD, [(4, 8, 0)])) == (Status.IOERR, 1)
    assert await bench.run(segments_chain(bench, RequestType.DISCARD, [(8, 8, 0)])) == (Status.OK, 1)


async def test_discard_not_negotiated_is_unsupported() -> None:
    bench = BlkBench()
    bench.start(
        bench.device.device_features & ~(1 << vb.VIRTIO_BLK_F_DISCARD | 1 << vb.VIRTIO_BLK_F_WRITE_ZEROES)
    )
    for rtype in (RequestType.DISCARD, RequestType.WRITE_ZEROES):
        assert await bench.run(segments_chain(bench, rtype, [(0, 8, 0)])) == (Status.UNSUPP, 1)


@pytest.mark.parametrize("rtype", [2, 3, 5, 10, 14, 0x80000000, 0xFFFFFFFF])
async def test_unknown_type_is_unsupported_and_the_device_goes_on(rtype: int) -> None:
    bench = started()
    data = bench.buffer(SECTOR, 0xAA)
    chain = link([(bench.header(rtype), 16, 0), (data, SECTOR, WRITE), (bench.buffer(1, 0xFF), 1, WRITE)])
    assert await bench.run(chain) == (Status.UNSUPP, 1)
    assert bench.memory.read(data, SECTOR) == b"\xaa" * SECTOR
    assert await bench.run(bench.in_chain(0, 1)) == (Status.OK, SECTOR + 1)
    assert not bench.device.status & VIRTIO_CONFIG_S_NEEDS_RESET


# -- errors that are the request's, not the ring's -----------------------------------------


@pytest.mark.parametrize(
    ("sector", "sectors"),
    [(CAPACITY, 1), (CAPACITY - 1, 2), (CAPACITY + 1000, 1), ((1 << 64) - 1, 1), ((1 << 64) - 2, 4)],
)
async def test_out_of_range_read_and_write_are_io_errors(sector: int, sectors: int) -> None:
    bench = started()
    fill_disk(bench, b"\x11" * DISK)
    read = bench.in_chain(sector, sectors)
    assert await bench.run(read) == (Status.IOERR, 1)
    assert await bench.run(bench.out_chain(sector, b"\x22" * (sectors * SECTOR))) == (Status.IOERR, 1)
    assert disk_bytes(bench, 0, DISK) == b"\x11" * DISK
    # The very last sector is in range.
    assert await bench.run(bench.in_chain(CAPACITY - 1, 1)) == (Status.OK, SECTOR + 1)


@pytest.mark.parametrize("length", [1, 511, 513, 1000])
async def test_data_not_a_multiple_of_512_is_an_io_error(length: int) -> None:
    bench = started()
    assert await bench.run(bench.out_chain(0, b"\x22" * length)) == (Status.IOERR, 1)
    data = bench.buffer(length)
    chain = link(
        [(bench.header(RequestType.IN), 16, 0), (data, length, WRITE), (bench.buffer(1, 0xFF), 1, WRITE)]
    )
    assert await bench.run(chain) == (Status.IOERR, 1)
    assert disk_bytes(bench, 0, 2 * SECTOR) == bytes(2 * SECTOR)


@pytest.mark.parametrize("cuts", [[8], [1, 15], [5, 7, 4], [1] * 13])
async def test_header_split_across_descriptors_is_accepted(cuts: list[int]) -> None:
    bench = started()
    data = os.urandom(SECTOR)
    header = vb.VIRTIO_BLK_OUTHDR.pack(RequestType.OUT, 0, 11)
    pieces = []
    pos = 0
    for cut in [*cuts, 16 - sum(cuts)]:
        if cut:
            gpa = bench.buffer(cut)
            bench.memory.write(gpa, header[pos : pos + cut])
            pieces.append((gpa, cut, 0))
            pos += cut
    payload = bench.buffer(SECTOR)
    bench.memory.write(payload, data)
    chain = link([*pieces, (payload, SECTOR, 0), (bench.buffer(1, 0xFF), 1, WRITE)])
    assert await bench.run(chain) == (Status.OK, 1)
    assert disk_bytes(bench, 11 * SECTOR, SECTOR) == data


async def test_read_only_disk_refuses_writes_with_io_error_and_writes_nothing() -> None:
    bench = started(config=BlkConfig(read_only=True, queue_size=16))
    assert bench.device.device_features >> vb.VIRTIO_BLK_F_RO & 1
    fill_disk(bench, b"\x33" * DISK)
    assert await bench.run(bench.out_chain(0, b"\x44" * SECTOR)) == (Status.IOERR, 1)
    for rtype in (RequestType.DISCARD, RequestType.WRITE_ZEROES):
        assert await bench.run(segments_chain(bench, rtype, [(0, 8, 0)])) == (Status.IOERR, 1)
    assert disk_bytes(bench, 0, DISK) == b"\x33" * DISK
    assert await bench.run(bench.in_chain(0, 1)) == (Status.OK, SECTOR + 1)


async def test_read_only_backend_makes_a_read_only_device() -> None:
    bench = started(backend=MemoryNode(DISK, read_only=True))
    assert bench.device.device_features >> vb.VIRTIO_BLK_F_RO & 1
    assert await bench.run(bench.out_chain(0, b"\x44" * SECTOR)) == (Status.IOERR, 1)


_TYPES = {
    "readv": "IN",
    "writev": "OUT",
    "flush": "FLUSH",
    "discard": "DISCARD",
    "write_zeroes": "WRITE_ZEROES",
}


@pytest.mark.parametrize("op", list(_TYPES))
async def test_backend_error_is_an_io_error_not_a_device_error(op: str) -> None:
    bench = started(backend=FailingBackend(DISK, fail=[op]))
    chains = {
        "readv": bench.in_chain(0, 1),
        "writev": bench.out_chain(0, b"\x55" * SECTOR),
        "flush": link([(bench.header(RequestType.FLUSH), 16, 0), (bench.buffer(1, 0xFF), 1, WRITE)]),
        "discard": segments_chain(bench, RequestType.DISCARD, [(0, 8, 0)]),
        "write_zeroes": segments_chain(bench, RequestType.WRITE_ZEROES, [(0, 8, 0)]),
    }
    assert await bench.run(chains[op]) == (Status.IOERR, 1)
    assert not bench.device.status & VIRTIO_CONFIG_S_NEEDS_RESET
    assert bench.device.requests[(RequestType[_TYPES[op]], Status.IOERR)] == 1
    # The next request that does not touch the failing operation succeeds.
    other = "writev" if op == "readv" else "readv"
    assert await bench.run(chains[other], head=4) == (Status.OK, SECTOR + 1 if other == "readv" else 1)


async def test_write_through_write_fails_when_its_flush_fails() -> None:
    """Without FLUSH the device is write-through: a write whose flush fails is not OK."""
    bench = BlkBench(backend=FailingBackend(DISK, fail=["flush"]))
    bench.start(
        bench.device.device_features & ~(1 << vb.VIRTIO_BLK_F_FLUSH | 1 << vb.VIRTIO_BLK_F_CONFIG_WCE)
    )
    assert await bench.run(bench.out_chain(0, b"\x66" * SECTOR)) == (Status.IOERR, 1)


@pytest.mark.parametrize("writeback", [0, 1])
async def test_writeback_byte_decides_whether_a_write_is_flushed(writeback: int) -> None:
    bench = started(backend=FailingBackend(DISK))
    assert isinstance(bench.backend, FailingBackend)
    bench.device.write_config(vb.VIRTIO_BLK_CFG_WRITEBACK, 1, writeback)
    assert bench.device.read_config(vb.VIRTIO_BLK_CFG_WRITEBACK, 1) == writeback
    bench.device.write_config(vb.VIRTIO_BLK_CFG_CAPACITY, 8, 1)  # read-only field
    assert bench.device.read_config(vb.VIRTIO_BLK_CFG_CAPACITY, 8) == CAPACITY
    assert await bench.run(bench.out_chain(0, b"\x01" * SECTOR)) == (Status.OK, 1)
    assert bench.backend.flushes == (0 if writeback else 1)  # write-through flushes each write


async def test_writeback_byte_is_read_only_without_config_wce() -> None:
    bench = BlkBench(backend=FailingBackend(DISK))
    bench.start(bench.device.device_features & ~(1 << vb.VIRTIO_BLK_F_CONFIG_WCE))
    assert isinstance(bench.backend, FailingBackend)
    bench.device.write_config(vb.VIRTIO_BLK_CFG_WRITEBACK, 1, 0)
    assert bench.device.read_config(vb.VIRTIO_BLK_CFG_WRITEBACK, 1) == 1
    assert await bench.run(bench.out_chain(0, b"\x01" * SECTOR)) == (Status.OK, 1)
    assert bench.backend.flushes == 0


async def test_request_of_exactly_queue_size_descriptors_is_served() -> None:
    bench = BlkBench(queue_size=8)
    bench.start()
    image = os.urandom(6 * SECTOR)
    fill_disk(bench, image)
    data = [bench.buffer(SECTOR) for _ in range(6)]
    status = bench.buffer(1, 0xFF)
    chain = link(
        [(bench.header(RequestType.IN, 0), 16, 0), *((d, SECTOR, WRITE) for d in data), (status, 1, WRITE)]
    )
    assert len(chain) == 8
    assert await bench.run(chain) == (Status.OK, 6 * SECTOR + 1)
    assert b"".join(bench.memory.read(d, SECTOR) for d in data) == image


async def test_thread_mode_completes_every_request() -> None:
    bench = started(config=BlkConfig(io_mode="thread", queue_size=16))
    try:
        fill_disk(bench, bytes(range(256)) * 16)
        chains = [bench.in_chain(k, 1) for k in range(4)]
        for k, chain in enumerate(chains):
            bench.ring.write_chain(chain, 3 * k)
        bench.ring.publish(*(3 * k for k in range(4)))
        bench.device.kick(0)
        await settle(lambda: bench.ring.used_idx == 4)
        used = sorted(bench.ring.used(k) for k in range(4))
        assert used == [(3 * k, SECTOR + 1) for k in range(4)]
        for k, chain in enumerate(chains):
            assert bench.memory.read(chain[1].addr, SECTOR) == disk_bytes(bench, k * SECTOR, SECTOR)
            assert bench.memory.read(chain[2].addr, 1) == b"\0"
    finally:
        bench.device.close()


async def test_many_chains_one_kick_one_interrupt_and_indirect_chains() -> None:
    bench = started()
    fill_disk(bench, os.urandom(16 * SECTOR))
    # Two direct chains and two indirect ones, made available together.
    heads = []
    for k in range(4):
        chain = bench.in_chain(k, 1)
        if k % 2:
            table = bench.buffer(16 * len(chain))
            write_table(bench.memory, table, chain)
            bench.ring.write_descs([Desc(table, 16 * len(chain), INDIRECT)], 3 * k)
        else:
            bench.ring.write_chain(chain, 3 * k)
        heads.append((3 * k, chain))
    bench.ring.publish(*(h for h, _ in heads))
    raised = bench.device.stats.interrupts_raised
    bench.device.kick(0)
    await settle(lambda: bench.ring.used_idx == 4)
    assert [bench.ring.used(k) for k in range(4)] == [(h, SECTOR + 1) for h, _ in heads]
    for k, (_, chain) in enumerate(heads):
        assert bench.memory.read(chain[1].addr, SECTOR) == disk_bytes(bench, k * SECTOR, SECTOR)
    assert bench.device.stats.interrupts_raised == raised + 1


# -- properties ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    sector=st.integers(0, CAPACITY - 8),
    sectors=st.integers(1, 8),
    cuts=st.lists(st.integers(1, 8 * SECTOR), max_size=5),
    status_shares=st.booleans(),
    write=st.booleans(),
)
def test_used_len_is_the_bytes_written_whatever_the_segmentation(
    sector: int, sectors: int, cuts: list[int], status_shares: bool, write: bool
) -> None:
    """IN: data bytes + status; OUT: the status byte. Data lands right however it is cut."""
    bench = BlkBench(queue_size=16)
    try:
        bench.start()
        length = sectors * SECTOR
        bounds = sorted({c for c in cuts if c < length} | {0, length})
        pieces = [(bench.buffer(b - a), b - a) for a, b in itertools.pairwise(bounds)]
        image = os.urandom(length)
        flag = 0 if write else WRITE
        if write:
            pos = 0
            for gpa, n in pieces:
                bench.memory.write(gpa, image[pos : pos + n])
                pos += n
        else:
            fill_disk(bench, image, sector * SECTOR)
        descs: list[tuple[int, int, int]] = [
            (bench.header(RequestType.OUT if write else RequestType.IN, sector), 16, 0)
        ]
        descs += [(gpa, n, flag) for gpa, n in pieces]
        if status_shares and not write:
            # The status byte is the last byte of a longer last data buffer.
            gpa, n = pieces[-1]
            tail = bench.buffer(n + 1)
            bench.memory.write(tail, bench.memory.read(gpa, n))
            descs[-1] = (tail, n + 1, WRITE)
            pieces[-1] = (tail, n)
            status_addr = tail + n
        else:
            status_addr = bench.buffer(1, 0xFF)
            descs.append((status_addr, 1, WRITE))
        chain = link(descs)
        bench.ring.write_descs(chain)
        bench.ring.publish(0)
        bench.device.process_queue(bench.device.queues[0])
        assert bench.ring.used(0) == (0, 1 if write else length + 1)
        assert bench.memory.read(status_addr, 1) == bytes([Status.OK])
        if write:
            assert disk_bytes(bench, sector * SECTOR, length) == image
        else:
            assert b"".join(bench.memory.read(gpa, n) for gpa, n in pieces) == image
    finally:
        bench.memory.close()


@settings(max_examples=150, deadline=None)
@given(
    rtype=st.sampled_from([0, 1, 4, 8, 11, 13, 2, 0xFFFFFFFF]),
    sector=st.one_of(st.integers(0, CAPACITY + 2), st.integers(0, (1 << 64) - 1)),
    header_cut=st.integers(0, 16),
    readable=st.lists(st.integers(0, 3 * SECTOR), max_size=3),
    writable=st.lists(st.integers(0, 3 * SECTOR), max_size=3),
    payload=st.binary(max_size=64),
)
@pytest.mark.expect_errors("virtio_device_needs_reset")
def test_any_request_gets_a_status_byte_or_a_device_error(
    rtype: int, sector: int, header_cut: int, readable: list[int], writable: list[int], payload: bytes
) -> None:
    """Well-formed rings with arbitrary requests in them: never an exception, never a write
    outside the chain's writable buffers, and used len never more than those buffers hold."""
    bench = BlkBench(queue_size=16)
    try:
        bench.start()
        header = vb.VIRTIO_BLK_OUTHDR.pack(rtype, 0, sector)
        descs: list[tuple[int, int, int]] = []
        for part in (header[:header_cut], header[header_cut:]):
            if part:
                gpa = bench.buffer(len(part))
                bench.memory.write(gpa, part)
                descs.append((gpa, len(part), 0))
        for n in readable:
            gpa = bench.buffer(n)
            bench.memory.write(gpa, (payload * (n // max(1, len(payload)) + 1))[:n] if payload else bytes(n))
            descs.append((gpa, n, 0))
        for n in writable:
            descs.append((bench.buffer(n, 0xEE), n, WRITE))
        if not descs:
            return
        bench.ring.write_descs(link(descs))
        bench.ring.publish(0)
        snapshot = bench.memory.read(bench.memory.base, bench.memory.size)
        bench.device.process_queue(bench.device.queues[0])  # a well-formed ring: no VirtqueueError
        writable_total = sum(n for _, n, f in descs if f & WRITE)
        header_total = sum(n for _, n, f in descs if not f & WRITE)
        # Only a chain without a 16-byte header or without a status byte breaks the device.
        assert (bench.device.broken_reason is not None) == (writable_total == 0 or header_total < 16)
        if bench.device.broken_reason is not None:
            event("device error")
            assert bench.ring.used_idx == 0
            return
        ident, used_len = bench.ring.used(0)
        assert ident == 0 and 1 <= used_len <= writable_total
        last = [(a, n) for a, n, f in descs if f & WRITE and n][-1]
        status = bench.memory.read(last[0] + last[1] - 1, 1)[0]
        assert status in (Status.OK, Status.IOERR, Status.UNSUPP)
        event(f"type {rtype}: {Status(status).name}")
        # Nothing outside the writable buffers and the used ring changed.
        after = bench.memory.read(bench.memory.base, bench.memory.size)
        base = bench.memory.base
        allowed = sorted((a - base, a - base + n) for a, n, f in descs if f & WRITE)
        allowed.append((bench.ring.used_addr - base, bench.ring.end - base))
        pos = 0
        for start, end in sorted(allowed):
            assert after[pos:start] == snapshot[pos:start]
            pos = max(pos, end)
        assert after[pos:] == snapshot[pos:]
    finally:
        bench.memory.close()
