"""Faults inside: a failing backend and a corrupted ring, seen through NBD, REST and metrics."""

from __future__ import annotations

import asyncio
import errno
import shutil
import struct
import tempfile

import aiohttp
from structlog.testing import capture_logs

from service.nbd.constants import Command
from tests.nbdclient import WireClient
from tests.reliability.conftest import FaultRig, MiB, make_fault_rig
from tests.service.conftest import nbdsh
from tests.service.test_metrics import scrape, value

BLOCK = 4096


async def read_block(client: WireClient, cookie: int, offset: int) -> tuple[int, bytes]:
    client.request(Command.READ, cookie, offset, BLOCK)
    got, error, data = await client.simple_reply(BLOCK)
    assert got == cookie
    return error, data


async def write_block(client: WireClient, cookie: int, offset: int, data: bytes) -> int:
    client.request(Command.WRITE, cookie, offset, len(data), payload=data)
    got, error, _ = await client.simple_reply()
    assert got == cookie
    return error


async def test_backend_faults_become_eio_and_500_and_heal(fault_rig: FaultRig) -> None:
    plan = fault_rig.plan
    client = await WireClient.connect(fault_rig.socket)
    await client.go()
    http = aiohttp.ClientSession(base_url=fault_rig.base_url)
    try:
        assert await write_block(client, 1, 0, b"\x42" * BLOCK) == 0
        before, _ = await scrape(fault_rig)  # type: ignore[arg-type]

        # EIO on reads of the first 64 KiB only.
        plan.read_errno, plan.region = errno.EIO, (0, 65536)
        assert (await read_block(client, 2, 0))[0] == errno.EIO
        assert await read_block(client, 3, MiB) == (0, bytes(BLOCK))  # outside: fine
        async with http.get("/v1/disks/disk0", headers={"Range": "bytes=0-4095"}) as r:
            assert r.status == 500 and (await r.json())["error"] == "io_error"
        # A real client sees EIO too.
        result = await nbdsh(
            fault_rig.uri(),
            "h = nbd.NBD(); h.connect_uri(uri)\n"
            "try:\n    h.pread(512, 0)\nexcept nbd.Error as e:\n    print(e.errno)\n",
        )
        assert result.stdout.strip() == "EIO"  # libnbd names the errno

        # EIO and ENOSPC on writes: the virtio-blk status byte carries only IOERR, so both
        # surface as EIO at NBD and as a 500 at REST, and nothing is acknowledged.
        plan.clear()
        for code in (errno.EIO, errno.ENOSPC):
            plan.write_errno = code
            assert await write_block(client, 4, 0, b"\x99" * BLOCK) == errno.EIO
            async with http.put("/v1/disks/disk0?offset=0", data=b"\x99" * BLOCK) as r:
                assert r.status == 500 and (await r.json())["error"] == "io_error"
            async with http.patch("/v1/disks/disk0", json={"op": "zero", "offset": 0, "size": 512}) as r:
                assert r.status == 500
        plan.clear()
        assert await read_block(client, 5, 0) == (0, b"\x42" * BLOCK)  # nothing was written

        # A failing fdatasync fails FLUSH; it is never reported as success.
        plan.flush_errno = errno.EIO
        client.request(Command.FLUSH, 6, 0, 0)
        assert (await client.simple_reply())[1] == errno.EIO
        async with http.patch("/v1/disks/disk0", json={"op": "flush"}) as r:
            assert r.status == 500
        async with http.put("/v1/disks/disk0?offset=8192&flush=y", data=b"\x07" * 512) as r:
            assert r.status == 500  # written, but not durable: not a success
        async with http.put("/v1/disks/disk0?offset=8192&flush=n", data=b"\x07" * 512) as r:
            assert r.status == 200

        # Healed: the next requests succeed.
        plan.clear()
        client.request(Command.FLUSH, 7, 0, 0)
        assert (await client.simple_reply())[1] == 0
        assert await write_block(client, 8, 0, b"\x43" * BLOCK) == 0
        assert await read_block(client, 9, 0) == (0, b"\x43" * BLOCK)
        async with http.patch("/v1/disks/disk0", json={"op": "flush"}) as r:
            assert r.status == 200
        after, _ = await scrape(fault_rig)  # type: ignore[arg-type]
        disk = {"disk": "disk0"}
        ops = {"r": "read", "w": "write", "f": "flush", "z": "write_zeroes"}
        ioerr = {
            key: value(after, "vblk_requests_total", op=op, status="ioerr", **disk)
            - value(before, "vblk_requests_total", op=op, status="ioerr", **disk)
            for key, op in ops.items()
        }
        assert ioerr == {"r": 3, "w": 4, "f": 3, "z": 2}
        assert plan.injected == 3 + 4 + 2 + 3
    finally:
        client.close()
        await http.close()


async def test_slow_backend_does_not_stall_the_service() -> None:
    directory = tempfile.mkdtemp(prefix="vblk-")
    rig = await make_fault_rig(directory, io_mode="thread")
    try:
        rig.plan.delay = 1.0
        client = await WireClient.connect(rig.socket)
        await client.go()
        slow = asyncio.ensure_future(read_block(client, 1, 0))
        await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as http, http.get(f"{rig.base_url}/healthz") as r:
            assert r.status == 200
        assert not slow.done(), "the read should still be in the slow backend"
        assert await slow == (0, bytes(BLOCK))
        client.close()
    finally:
        rig.plan.clear()
        await rig.service.stop()
        shutil.rmtree(directory, ignore_errors=True)


async def test_ring_corruption_under_load_resets_once_and_no_client_sees_an_error() -> None:
    directory = tempfile.mkdtemp(prefix="vblk-")
    rig = await make_fault_rig(directory, io_mode="thread")
    rig.plan.delay = 0.02  # keep requests in flight
    driver = rig.service.disks["disk0"].driver
    client = await WireClient.connect(rig.socket)
    await client.go()
    try:
        before, _ = await scrape(rig)  # type: ignore[arg-type]
        for cookie in range(100):
            client.request(Command.READ, cookie, cookie * BLOCK, BLOCK)
        for _ in range(200):
            if driver.statistics().inflight >= 50:
                break
            await asyncio.sleep(0.005)
        assert driver.statistics().inflight >= 50
        with capture_logs() as logs:
            # A driver bug: an available-ring entry naming a descriptor beyond the table.
            queue = driver.queues[0]
            idx = queue._avail_idx
            slot = queue.avail_addr + 4 + 2 * (idx % queue.size)
            queue.memory.write(slot, struct.pack("<H", queue.size + 3))
            queue.memory.write(queue.avail_addr + 2, struct.pack("<H", (idx + 1) & 0xFFFF))
            queue._notify()
            replies = {}
            for _ in range(100):
                cookie, error, _ = await asyncio.wait_for(client.simple_reply(BLOCK), 20)
                replies[cookie] = error
        assert set(replies) == set(range(100))
        assert set(replies.values()) == {0}  # the reads the reset caught went again
        assert driver.statistics().resubmitted > 0
        events = [entry["event"] for entry in logs]
        assert events.count("virtio_device_needs_reset") == 1
        assert events.count("virtio_blk_reset") == 1
        # The service goes on: the same connection, a new one, and REST.
        rig.plan.clear()
        assert await read_block(client, 1000, 0) == (0, bytes(BLOCK))
        other = await WireClient.connect(rig.socket)
        await other.go()
        assert await write_block(other, 1, 0, b"\x01" * BLOCK) == 0
        other.close()
        after, _ = await scrape(rig)  # type: ignore[arg-type]
        assert (
            value(after, "vblk_device_resets_total", disk="disk0")
            - value(before, "vblk_device_resets_total", disk="disk0")
            == 1
        )
        assert (
            value(after, "vblk_device_needs_reset_total", disk="disk0")
            - value(before, "vblk_device_needs_reset_total", disk="disk0")
            == 1
        )
        assert value(after, "vblk_disk_ready", disk="disk0") == 1
        assert value(after, "vblk_device_resubmitted_total", disk="disk0") == driver.statistics().resubmitted
        stats = driver.statistics()
        assert stats.inflight == 0 and stats.queues[0].free_descriptors == stats.queues[0].size
    finally:
        client.close()
        rig.plan.clear()
        await rig.service.stop()
        shutil.rmtree(directory, ignore_errors=True)
