"""The ring snapshot behind /ui: true to the driver, the device and ring memory, and read-only."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Sequence
from typing import Any

import aiohttp

from device.blk import BlkConfig
from device.block.memory import MemoryNode
from device.spec.virtio import VIRTIO_F_INDIRECT_DESC, avail_ring_size, desc_table_size, used_ring_size
from driver.blk import BlkIOError
from driver.virtqueue import DriverVirtqueue
from service.http.ui import queue_snapshot
from tests.conftest import Rig, make_rig
from tests.service.conftest import NbdRig

READ = 4096


def snapshot(rig: Rig, index: int = 0) -> dict[str, Any]:
    by_vector = rig.device.stats.interrupts_by_vector
    device_queue = rig.device.queues[index]
    counts = by_vector.get(device_queue.msix_vector, [0, 0])
    return queue_snapshot(rig.disk.queues[index], device_queue, (counts[0], counts[1]))


def ring_memory(queue: DriverVirtqueue) -> bytes:
    m = queue.memory
    return (
        m.read(queue.desc_addr, desc_table_size(queue.size))
        + m.read(queue.avail_addr, avail_ring_size(queue.size))
        + m.read(queue.used_addr, used_ring_size(queue.size))
    )


def check_invariants(snap: dict[str, Any], queue: DriverVirtqueue) -> None:
    """What must hold of any snapshot, whatever the moment it was taken."""
    size = snap["size"]
    cells = snap["descriptors"]
    assert len(cells) == size
    counts = snap["counts"]
    assert cells.count(".") == counts["free"] == snap["driver"]["num_free"] == queue.num_free
    assert cells.count("h") + cells.count("i") == counts["in_flight"] == len(queue.chains_in_flight())
    assert cells.count("c") == counts["chained"]
    assert cells.count("i") == counts["indirect"]
    # The free list and the chains partition the descriptor table.
    free = queue.free_list()
    in_chains = [i for _, chain in queue.chains_in_flight() for i in chain]
    assert sorted(free + in_chains) == list(range(size))
    assert all(cells[i] == "." for i in free)
    # The driver publishes avail.idx with every chain: its copy and the ring agree.
    assert snap["avail"]["idx"] == snap["driver"]["avail_idx"]
    # Every chain in flight is in exactly one place: avail ring, device, used ring.
    stages = [c["stage"] for c in snap["chains"]]
    assert "unknown" not in stages
    if counts["in_flight"] <= len(snap["chains"]):
        d = snap["device"]
        assert stages.count("avail") == (snap["avail"]["idx"] - d["last_avail_idx"]) & 0xFFFF
        assert stages.count("device") == d["in_flight"]
        assert stages.count("used") == (d["used_idx"] - snap["driver"]["last_used_idx"]) & 0xFFFF
    for chain in snap["chains"]:
        roles = [d["role"] for d in chain["descriptors"]]
        request = chain["request"]
        assert request is not None and roles[0] == "header"
        assert chain["descriptors"][0]["len"] == 16 and "W" not in chain["descriptors"][0]["flags"]
        if request["op"] == "flush":
            assert roles == ["header", "status"]
        else:
            assert roles[-1] == "status" and set(roles[1:-1]) == {"data"}
            data_flags = {d["flags"] for d in chain["descriptors"][1:-1]}
            writable = {"W" in f.split("|") for f in data_flags}
            assert writable == {request["op"] == "read"}  # the device writes only what is read
        assert chain["descriptors"][-1]["len"] == 1 and "W" in chain["descriptors"][-1]["flags"]
        assert cells[chain["head"]] == ("i" if chain["indirect"] else "h")
        if not chain["indirect"]:
            assert chain["ring_descriptors"] == len(roles)
            assert all(cells[d["index"]] == "c" for d in chain["descriptors"][1:])


async def stages_until_idle(rig: Rig, limit: int = 200) -> list[str]:
    """Each loop iteration's stage of the chains in flight (deduplicated), until none are."""
    seen: list[str] = []
    for _ in range(limit):
        await asyncio.sleep(0)
        snap = snapshot(rig)
        check_invariants(snap, rig.disk.queues[0])
        stages = sorted({c["stage"] for c in snap["chains"]})
        if not stages:
            return seen
        label = "+".join(stages)
        if not seen or seen[-1] != label:
            seen.append(label)
    raise AssertionError(f"still in flight after {limit} iterations: {seen}")


async def test_an_idle_ring_is_all_free_and_in_step() -> None:
    rig = await make_rig(config=BlkConfig(queue_size=16))
    try:
        await rig.disk.read(0, READ)
        snap = snapshot(rig)
        check_invariants(snap, rig.disk.queues[0])
        assert snap["descriptors"] == "." * 16 and snap["chains"] == []
        d, dev = snap["driver"], snap["device"]
        assert snap["avail"]["idx"] == dev["last_avail_idx"] == snap["used"]["idx"] == dev["used_idx"]
        assert d["last_used_idx"] == snap["used"]["idx"] == 1
        # EVENT_IDX: the driver asked for an interrupt after the next completion, the device
        # for a kick after the next buffer.
        assert snap["event_idx"] and snap["avail"]["used_event"] == 1 and snap["used"]["avail_event"] == 1
        assert snap["used"]["recent"] == [{"idx": 0, "slot": 0, "id": 0, "len": READ + 1}]
        assert snap["avail"]["recent"] == [{"idx": 0, "slot": 0, "head": 0}]
        assert d["kicks"] == 1 and dev["interrupts"] == 1
    finally:
        await rig.close()


async def test_three_descriptor_chains_go_avail_then_used() -> None:
    """Without indirect descriptors each read is header, data, status in the ring itself."""
    rig = await make_rig(config=BlkConfig(queue_size=16), features_mask=~(1 << VIRTIO_F_INDIRECT_DESC))
    try:
        reads = [asyncio.create_task(rig.disk.read(8 * i, READ)) for i in range(4)]
        await asyncio.sleep(0)  # every read published, the kick not yet sent
        snap = snapshot(rig)
        check_invariants(snap, rig.disk.queues[0])
        assert snap["descriptors"] == "hcc" * 4 + "...."
        assert [c["stage"] for c in snap["chains"]] == ["avail"] * 4
        first = snap["chains"][0]
        assert [d["role"] for d in first["descriptors"]] == ["header", "data", "status"]
        assert [d["flags"] for d in first["descriptors"]] == ["N", "N|W", "W"]
        assert [d["index"] for d in first["descriptors"]] == [0, 1, 2]
        assert [d["next"] for d in first["descriptors"][:2]] == [1, 2]
        assert first["request"] == {
            "type": "IN",
            "op": "read",
            "sector": 0,
            "ioprio": 0,
            "bytes": READ,
            "status": 255,  # not written by the device yet
        }
        assert [c["request"]["sector"] for c in snap["chains"]] == [0, 8, 16, 24]
        assert snap["avail"]["idx"] - snap["device"]["last_avail_idx"] == 4
        # Inline I/O: the kick, the device serving the whole batch, the interrupt and the driver
        # reaping it are deferred work run in one pass of the loop: after that pass, nothing is
        # in flight (no pass sees the chains used but not yet reaped).
        assert await stages_until_idle(rig) == []
        await asyncio.gather(*reads)
        snap = snapshot(rig)
        assert snap["descriptors"] == "." * 16
        assert [(e["id"], e["len"]) for e in snap["used"]["recent"][-4:]] == [
            (i * 3, READ + 1) for i in range(4)
        ]
    finally:
        await rig.close()


class GatedBackend(MemoryNode):
    """Reads wait for the test to open the gate (they run in the device's worker threads)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = threading.Event()

    def read_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.gate.wait(10)
        super().read_now(offset, buffers)


async def test_chains_held_by_the_device_then_returned() -> None:
    backend = GatedBackend(4 << 20)
    rig = await make_rig(config=BlkConfig(queue_size=16, io_mode="thread", io_threads=2), backend=backend)
    try:
        reads = [asyncio.create_task(rig.disk.read(8 * i, READ)) for i in range(5)]
        for _ in range(100):
            await asyncio.sleep(0)
            snap = snapshot(rig)
            check_invariants(snap, rig.disk.queues[0])
            if [c["stage"] for c in snap["chains"]] == ["device"] * 5:
                break
        else:
            raise AssertionError(f"the device never held every chain: {snap['chains']}")
        assert snap["device"]["in_flight"] == 5 and snap["device"]["last_avail_idx"] == snap["avail"]["idx"]
        assert snap["descriptors"].count("i") == 5  # indirect: one ring descriptor per request
        assert all(len(c["descriptors"]) == 3 and c["ring_descriptors"] == 1 for c in snap["chains"])
        assert all(c["request"]["status"] == 255 for c in snap["chains"])
        memory_before = ring_memory(rig.disk.queues[0])
        for _ in range(3):  # looking changes nothing
            snapshot(rig)
        assert ring_memory(rig.disk.queues[0]) == memory_before
        backend.gate.set()
        seen = await stages_until_idle(rig, limit=10_000)
        assert seen[0] == "device" and "used" in "+".join(seen)
        await asyncio.gather(*reads)
    finally:
        backend.gate.set()
        await rig.close()


async def test_invariants_hold_at_every_moment_of_a_mixed_workload() -> None:
    rig = await make_rig(config=BlkConfig(queue_size=16, io_mode="thread"), disk_size=4 << 20)
    rng = random.Random(7)
    sectors = rig.disk.capacity

    async def one(i: int) -> None:
        kind = rng.choice(["read", "write", "big", "flush", "bad"])
        sector = rng.randrange(0, sectors - 256)
        if kind == "read":
            await rig.disk.read(sector, 512 * rng.randint(1, 16))
        elif kind == "write":
            await rig.disk.write(sector, bytes([i & 0xFF]) * 512 * rng.randint(1, 16))
        elif kind == "big":
            await rig.disk.read(sector, 128 * 1024)
        elif kind == "flush":
            await rig.disk.flush()
        else:
            try:
                await rig.disk.read(sectors, 512)  # past the end: IOERR, still a chain
            except BlkIOError:
                pass

    try:
        workload = asyncio.gather(*(one(i) for i in range(300)))
        snapshots = 0
        while not workload.done():
            await asyncio.sleep(0)
            check_invariants(snapshot(rig), rig.disk.queues[0])
            snapshots += 1
        await workload
        assert snapshots > 20
        assert snapshot(rig)["descriptors"] == "." * 16
    finally:
        await rig.close()


async def test_rings_over_http(nbd_rig: NbdRig) -> None:
    async with aiohttp.ClientSession(nbd_rig.base_url) as http:
        async with http.put("/v1/disks/disk0/sectors/8", data=b"\1" * 4096) as r:
            assert r.status == 200
        async with http.get("/v1/disks/disk0/rings") as r:
            assert r.status == 200
            disk = await r.json()
        assert disk["name"] == "disk0" and disk["ready"] is True
        [queue] = disk["queues"]
        assert queue["size"] == 256 and len(queue["descriptors"]) == 256
        assert disk["requests"]["completed"] >= 2 and disk["bytes"]["written"] >= 4096
        assert disk["latency"]["count"] >= 2 and disk["latency"]["buckets"][-1][0] == "+Inf"
        async with http.get("/v1/disks/nope/rings") as r:
            assert r.status == 404 and (await r.json())["error"] == "no_such_disk"
        async with http.get("/ui/state.json") as r:
            assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
            state = await r.json()
        assert [d["name"] for d in state["disks"]] == ["disk0", "ro"]
        async with http.get("/ui") as r:
            assert r.status == 200 and r.content_type == "text/html"
            page = await r.text()
    # Self-contained: the page loads nothing from anywhere but vblk itself.
    assert "/ui/state.json" in page
    for needle in ('src="http', "src='http", 'href="http', "@import", "//cdn", "https://"):
        assert needle not in page
