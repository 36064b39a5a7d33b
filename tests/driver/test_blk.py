"""VirtioBlk end to end over the device model: the article's experiment, batching, recovery; every
test on split and on packed virtqueues."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Sequence

import pytest

from device.blk import BlkConfig
from device.block.memory import MemoryNode
from device.block.node import blocking_call
from device.packed_virtqueue import PackedDeviceVirtqueue
from device.spec import virtio_blk as vb
from device.spec.virtio import VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC
from driver.blk import BlkIOError, BlkResetError, BlkUnsupportedError
from driver.blk_info import RESUBMIT_LIMIT
from tests.conftest import MiB, Rig, make_rig

SECTOR = 512
pytestmark = pytest.mark.usefixtures("ring")


async def test_article_read_sector_one_twice_by_interrupt(rig: Rig) -> None:
    image = os.urandom(SECTOR)
    blocking_call(rig.backend.writev, SECTOR, [memoryview(image)])
    buffer = rig.guest.dma.allocate(SECTOR)
    assert buffer is not None
    before = rig.disk.statistics().interrupts
    delivered_before = rig.machine.lapic.statistics.delivered
    for expected_interrupts in (1, 2):
        buffer.view[:] = b"\x12" * SECTOR
        # No polling anywhere: if used_event were not updated after draining, the second
        # completion would raise no interrupt and this would time out.
        await asyncio.wait_for(rig.disk.read_into(1, buffer), timeout=2)
        assert bytes(buffer.view) == image
        assert rig.disk.statistics().interrupts - before == expected_interrupts
        assert rig.machine.lapic.statistics.delivered - delivered_before == expected_interrupts
    buffer.free()


async def test_write_read_flush_get_id_discard_write_zeroes(rig: Rig) -> None:
    data = os.urandom(8 * SECTOR)
    await rig.disk.write(16, data)
    assert await rig.disk.read(16, len(data)) == data
    await rig.disk.flush()
    assert await rig.disk.get_id() == "vblk"
    await rig.disk.discard(16, 2)
    await rig.disk.write_zeroes(18, 2, unmap=True)
    await rig.disk.write_zeroes(20, 1)
    got = await rig.disk.read(16, len(data))
    assert got == bytes(5 * SECTOR) + data[5 * SECTOR :]
    stats = rig.disk.statistics()
    assert stats.requests[("write", "ok")] == 1
    assert stats.requests[("discard", "ok")] == 1
    assert stats.bytes_written == len(data)


async def test_out_of_range_read_is_an_io_error_and_the_disk_goes_on(rig: Rig) -> None:
    with pytest.raises(BlkIOError) as info:
        await rig.disk.read(rig.disk.capacity, SECTOR)
    assert info.value.errno == errno.EIO
    with pytest.raises(BlkIOError):
        await rig.disk.write(rig.disk.capacity - 1, bytes(2 * SECTOR))
    assert await rig.disk.read(0, SECTOR) == bytes(SECTOR)
    assert rig.disk.statistics().requests[("read", "ioerr")] == 1


async def test_sixty_four_requests_cost_few_kicks_and_interrupts(rig: Rig) -> None:
    stats0 = rig.disk.statistics()
    await asyncio.gather(*(rig.disk.read(i * 8, 4096) for i in range(64)))
    stats = rig.disk.statistics()
    kicks = stats.kicks - stats0.kicks
    interrupts = stats.interrupts - stats0.interrupts
    assert stats.requests[("read", "ok")] == 64
    assert 1 <= kicks <= 4
    assert 1 <= interrupts <= 4


async def test_without_event_idx_batching_still_works() -> None:
    rig = await make_rig(features_mask=~(1 << VIRTIO_F_EVENT_IDX))
    try:
        assert not rig.disk.has_feature(VIRTIO_F_EVENT_IDX)
        assert not rig.device.has_feature(VIRTIO_F_EVENT_IDX)
        await asyncio.gather(*(rig.disk.read(i, SECTOR) for i in range(64)))
        stats = rig.disk.statistics()
        assert stats.kicks <= 4 and stats.interrupts <= 4
        for _ in range(3):  # sequential requests each complete by interrupt
            await asyncio.wait_for(rig.disk.read(0, SECTOR), 2)
    finally:
        await rig.close()


async def test_driver_refusing_features_gets_a_device_without_them() -> None:
    mask = ~(1 << VIRTIO_F_INDIRECT_DESC | 1 << vb.VIRTIO_BLK_F_DISCARD | 1 << vb.VIRTIO_BLK_F_FLUSH)
    rig = await make_rig(features_mask=mask, queue_size=16)
    try:
        assert not rig.device.has_feature(VIRTIO_F_INDIRECT_DESC)
        assert rig.disk.queues[0].indirect_max == 0
        # Direct chains: 16 descriptors hold at most five 3-descriptor requests at once.
        data = os.urandom(4096)
        await asyncio.gather(*(rig.disk.write(i * 8, data) for i in range(20)))
        assert await rig.disk.read(8 * 19, 4096) == data
        with pytest.raises(BlkUnsupportedError):
            await rig.disk.discard(0, 8)
        # Without FLUSH the device is write-through and flush() is a no-op.
        assert rig.device._executor.writethrough
        await rig.disk.flush()
        assert ("flush", "ok") not in rig.disk.statistics().requests
    finally:
        await rig.close()


async def test_backpressure_many_more_requests_than_descriptors() -> None:
    rig = await make_rig(queue_size=8, config=BlkConfig(queue_size=8))
    try:
        payloads = [os.urandom(SECTOR) for _ in range(300)]
        await asyncio.gather(*(rig.disk.write(i, p) for i, p in enumerate(payloads)))
        got = await asyncio.gather(*(rig.disk.read(i, SECTOR) for i in range(300)))
        assert got == payloads
        assert rig.disk.statistics().queues[0].free_descriptors == 8
    finally:
        await rig.close()


async def test_large_requests_split_by_size_max_and_seg_max() -> None:
    config = BlkConfig(size_max=4096, seg_max=4, queue_size=16)
    rig = await make_rig(config=config, disk_size=8 * MiB)
    try:
        assert rig.disk.geometry is not None
        assert (rig.disk.geometry.size_max, rig.disk.geometry.seg_max) == (4096, 4)
        data = os.urandom(1 * MiB + 3 * SECTOR)
        await rig.disk.write(7, data)
        assert await rig.disk.read(7, len(data)) == data
        writes = rig.disk.statistics().requests[("write", "ok")]
        assert writes == -(-len(data) // (4 * 4096))  # 16 KiB per request
    finally:
        await rig.close()


async def test_multiqueue_spreads_requests() -> None:
    rig = await make_rig(config=BlkConfig(num_queues=4))
    try:
        assert len(rig.disk.queues) == 4
        await asyncio.gather(*(rig.disk.write(i, bytes([i]) * SECTOR) for i in range(64)))
        stats = rig.disk.statistics()
        assert all(q.completed >= 8 for q in stats.queues)
        for i in (0, 33, 63):
            assert await rig.disk.read(i, SECTOR) == bytes([i]) * SECTOR
    finally:
        await rig.close()


async def test_thread_io_mode() -> None:
    rig = await make_rig(config=BlkConfig(io_mode="thread", io_threads=2))
    try:
        data = [os.urandom(4096) for _ in range(50)]
        await asyncio.gather(*(rig.disk.write(i * 8, d) for i, d in enumerate(data)))
        assert await asyncio.gather(*(rig.disk.read(i * 8, 4096) for i in range(50))) == data
    finally:
        await rig.close()


@pytest.mark.expect_errors("virtio_device_needs_reset")
async def test_a_device_reset_resubmits_the_requests_in_flight_and_recovers() -> None:
    rig = await make_rig(config=BlkConfig(io_mode="thread"))
    try:
        pattern = bytes(range(256)) * 2
        for i in range(100):
            await rig.disk.write(i, pattern[i:] + pattern[:i])
        tasks = [asyncio.create_task(rig.disk.read(i, SECTOR)) for i in range(100)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # published and kicked; the device is working on them
        assert rig.disk.statistics().requests_inflight == 100
        rig.device.device_error("injected ring corruption")
        assert rig.device.status & VIRTIO_CONFIG_S_NEEDS_RESET
        results = await asyncio.gather(*tasks)  # none fails: the reset ones went again
        assert results == [pattern[i:] + pattern[:i] for i in range(100)]
        stats = rig.disk.statistics()
        assert stats.resets == 1 and stats.resubmitted > 0, stats
        assert stats.requests[("read", "ok")] == 100 and ("read", "reset") not in stats.requests
        await rig.disk.write(3, b"\x07" * SECTOR)
        assert await rig.disk.read(3, SECTOR) == b"\x07" * SECTOR
        assert rig.device.stats.needs_reset == 1
        assert rig.disk.statistics().queues[0].free_descriptors == rig.disk.queues[0].size
    finally:
        await rig.close()


class SlowMemoryNode(MemoryNode):
    """Reads take a while (in the I/O thread): a request stays in flight long enough to be reset."""

    def read_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        time.sleep(0.02)
        super().read_now(offset, buffers)


@pytest.mark.expect_errors("virtio_device_needs_reset")
async def test_a_request_reset_again_and_again_fails_after_the_resubmit_limit() -> None:
    rig = await make_rig(config=BlkConfig(io_mode="thread"), backend=SlowMemoryNode(4 * MiB))
    try:
        task = asyncio.create_task(rig.disk.read(0, SECTOR))
        resets = 0
        while not task.done() and resets <= RESUBMIT_LIMIT + 1:
            for _ in range(500):  # until the request is on a ring of a ready device
                if rig.disk.ready and rig.disk.statistics().queues[0].inflight:
                    break
                await asyncio.sleep(0.001)
            if task.done():
                break
            rig.device.device_error("injected ring corruption")
            resets += 1
            await asyncio.sleep(0)
        with pytest.raises(BlkResetError) as failed:
            await task
        assert failed.value.errno == errno.EIO
        assert resets == RESUBMIT_LIMIT + 1  # the first try and RESUBMIT_LIMIT more
        assert rig.disk.statistics().resubmitted == RESUBMIT_LIMIT
        for _ in range(500):
            if rig.disk.ready:
                break
            await asyncio.sleep(0.01)
        assert await rig.disk.read(0, SECTOR) == bytes(SECTOR)  # and the disk goes on
    finally:
        await rig.close()


async def test_closing_the_driver_fails_the_requests_in_flight() -> None:
    rig = await make_rig(config=BlkConfig(io_mode="thread"))
    outcomes: list[BaseException | None] = []
    buffer = rig.guest.dma.allocate(SECTOR)
    assert buffer is not None
    tasks = [asyncio.create_task(rig.disk.read(i, SECTOR)) for i in range(20)]
    assert rig.disk.start_io(vb.RequestType.IN, 0, buffer, SECTOR, outcomes.append)
    await asyncio.sleep(0)
    await rig.close()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, bytes | BlkResetError) for r in results)
    assert [r for r in results if isinstance(r, BlkResetError)], "closed with none in flight"
    assert all(type(r) is BlkResetError for r in results if isinstance(r, BaseException))  # not resubmitted
    assert len(outcomes) == 1 and (outcomes[0] is None or type(outcomes[0]) is BlkResetError)


async def test_resize_raises_config_interrupt_and_capacity_follows(rig: Rig) -> None:
    seen: list[int] = []
    rig.disk.capacity_listeners.append(seen.append)
    rig.device.resize(8 * MiB)
    for _ in range(10):
        await asyncio.sleep(0)
    assert rig.disk.capacity == 8 * MiB // SECTOR
    assert seen == [8 * MiB // SECTOR]
    await rig.disk.write(8 * MiB // SECTOR - 1, b"\x01" * SECTOR)


async def test_sixteen_bit_indices_wrap() -> None:
    """More than 2^16 requests through a tiny ring: avail and used indices wrap."""
    rig = await make_rig(queue_size=4, config=BlkConfig(queue_size=4))
    try:
        pattern = bytes(range(256)) * 2
        await rig.disk.write(1, pattern)
        total = 0

        async def worker() -> None:
            nonlocal total
            for _ in range(66_000 // 4):
                assert await rig.disk.read(1, SECTOR) == pattern
                total += 1

        await asyncio.gather(*(worker() for _ in range(4)))
        device_queue = rig.device.queues[0]
        assert total == 66_000
        if rig.device.packed:  # one ring descriptor each (indirect): 66,001 laps of a quarter
            assert isinstance(device_queue, PackedDeviceVirtqueue)
            assert (device_queue.last_avail_idx, device_queue.avail_wrap) == (
                66_001 % 4,
                1 ^ (66_001 // 4 & 1),
            )
            assert (device_queue.used_idx, device_queue.used_wrap) == (66_001 % 4, 1 ^ (66_001 // 4 & 1))
        else:  # 66,000 reads + 1 write, modulo 2^16.
            assert device_queue.last_avail_idx == (66_001) & 0xFFFF
            assert device_queue.used_idx == (66_001) & 0xFFFF
    finally:
        await rig.close()


# -- start_io: requests answered by callback, no task ----------------------------------------


async def test_start_io_reads_and_writes_through_callbacks(rig: Rig) -> None:
    data = os.urandom(4096)
    outcomes: list[BaseException | None] = []
    done = asyncio.Event()

    def told(error: BaseException | None) -> None:
        outcomes.append(error)
        done.set()

    out = rig.guest.dma.allocate(4096)
    back = rig.guest.dma.allocate(4096)
    assert out is not None and back is not None
    out.view[:] = data
    assert rig.disk.start_io(vb.RequestType.OUT, 8, out, 4096, told)
    await asyncio.wait_for(done.wait(), 2)
    done.clear()
    assert rig.disk.start_io(vb.RequestType.IN, 8, back, 4096, told)
    await asyncio.wait_for(done.wait(), 2)
    assert outcomes == [None, None]
    assert bytes(back.view) == data
    stats = rig.disk.statistics()
    assert stats.requests[("write", "ok")] == 1 and stats.requests[("read", "ok")] == 1
    assert stats.bytes_read == stats.bytes_written == 4096
    assert stats.requests_inflight == 0
    out.free()
    back.free()


async def test_start_io_error_reaches_the_callback_and_the_buffer_stays_pinned_until_then(rig: Rig) -> None:
    buffer = rig.guest.dma.allocate(SECTOR)
    assert buffer is not None
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    assert rig.disk.start_io(vb.RequestType.IN, rig.disk.capacity, buffer, SECTOR, outcome.set_result)
    buffer.free()  # a caller that gives up: the device still owns the buffer
    assert not buffer.freed
    error = await asyncio.wait_for(outcome, 2)
    assert isinstance(error, BlkIOError) and error.errno == errno.EIO
    assert buffer.freed  # released when the device handed the chain back
    assert rig.disk.statistics().requests[("read", "ioerr")] == 1


async def test_start_io_declines_what_would_wait_and_the_awaitable_path_does_it() -> None:
    rig = await make_rig(
        config=BlkConfig(queue_size=8, size_max=4096), features_mask=~(1 << VIRTIO_F_INDIRECT_DESC)
    )
    try:
        big = rig.guest.dma.allocate(8192)
        assert big is not None
        assert not rig.disk.start_io(vb.RequestType.IN, 0, big, 8192, lambda e: None)  # needs splitting
        finished: list[BaseException | None] = []
        buffers = [rig.guest.dma.allocate(SECTOR) for _ in range(3)]
        started = [
            rig.disk.start_io(vb.RequestType.IN, i, b, SECTOR, finished.append)
            for i, b in enumerate(buffers)
            if b
        ]
        # Three descriptors a chain without indirect tables: two chains fill a ring of eight.
        assert started == [True, True, False]
        assert rig.disk.statistics().requests_inflight == 2
        await rig.disk.read_into(0, big, 8192)  # the awaitable path waits for room and splits
        assert finished == [None, None]
        big.free()
    finally:
        await rig.close()


@pytest.mark.expect_errors("virtio_device_needs_reset")
async def test_start_io_during_a_reset_is_resubmitted_and_tells_the_callback_once() -> None:
    rig = await make_rig(config=BlkConfig(io_mode="thread"))
    try:
        outcomes: list[BaseException | None] = []
        buffers = [rig.guest.dma.allocate(SECTOR) for _ in range(20)]
        for i in range(20):
            await rig.disk.write(i, bytes([i + 1]) * SECTOR)
        for i, buffer in enumerate(buffers):
            assert buffer is not None
            assert rig.disk.start_io(vb.RequestType.IN, i, buffer, SECTOR, outcomes.append)
        await asyncio.sleep(0)
        rig.device.device_error("injected ring corruption")
        for _ in range(200):
            if len(outcomes) == 20:
                break
            await asyncio.sleep(0.01)
        assert outcomes == [None] * 20  # each told exactly once, and ok: the reset ones went again
        assert rig.disk.statistics().resubmitted > 0
        for i, buffer in enumerate(buffers):
            assert buffer is not None and bytes(buffer.view[:SECTOR]) == bytes([i + 1]) * SECTOR
        await rig.disk.write(3, b"\x07" * SECTOR)  # recovered
        assert await rig.disk.read(3, SECTOR) == b"\x07" * SECTOR
        assert rig.disk.statistics().requests_inflight == 0
    finally:
        await rig.close()
