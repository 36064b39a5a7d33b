"""The ring snapshot behind /ui: true to the driver, the device and ring memory, and read-only;
its counters show what a workload did between two snapshots, even when no snapshot catches it."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from device.blk import BlkConfig
from device.block.memory import MemoryNode
from device.spec.virtio import VIRTIO_F_INDIRECT_DESC, avail_ring_size, desc_table_size, used_ring_size
from driver.blk import BlkIOError
from driver.virtqueue import DriverVirtqueue
from service.model import DiskSpec
from service.rings import queue_snapshot
from tests.conftest import Rig, make_rig
from tests.deploy.conftest import tool
from tests.service.conftest import MiB, NbdRig, serving

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
    check_activity(snap)
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


def batches(histogram: dict[str, list[Any]]) -> dict[tuple[int, int], int]:
    """A batch histogram of the snapshot as {(smallest, largest size): batches}."""
    return {(lo, hi): n for (lo, hi), n in zip(histogram["sizes"], histogram["batches"], strict=True)}


def check_activity(snap: dict[str, Any]) -> None:
    """The counters agree with each other and with the ring indices."""
    a = snap["activity"]
    d = snap["driver"]
    assert len(a["chains_by_head"]) == snap["size"]
    assert sum(a["chains_by_head"]) == a["chains_published"]
    # Published and used, unwrapped: avail.idx and how far the driver reaped the used ring.
    assert a["chains_published"] & 0xFFFF == snap["avail"]["idx"]
    assert a["chains_used"] & 0xFFFF == d["last_used_idx"] and a["chains_used"] == d["completed"]
    assert a["chains_published"] - a["chains_used"] == snap["counts"]["in_flight"]
    assert a["peak_in_flight"] >= snap["counts"]["in_flight"]
    assert a["indirect_chains"] <= a["chains_published"]
    for name in ("kick_batches", "device_batches", "interrupt_batches"):
        sizes = a[name]["sizes"]
        assert sizes[:4] == [[0, 0], [1, 1], [2, 3], [4, 7]]
        assert all(hi + 1 == 2 * lo for lo, hi in sizes[1:]) and sizes[-1][1] >= snap["size"]
    # Every kick decision is one batch; every interrupt reaped one (perhaps empty) batch.
    kicks = batches(a["kick_batches"])
    assert sum(kicks.values()) == d["kicks"] + d["kicks_suppressed"]
    assert kicks[(0, 0)] == batches(a["device_batches"])[(0, 0)] == 0
    reaps = batches(a["interrupt_batches"])
    assert sum(reaps.values()) == d["interrupts"]
    assert sum(lo * n for (lo, _), n in reaps.items()) <= a["chains_used"]
    assert a["chains_used"] <= sum(hi * n for (_, hi), n in reaps.items())
    for name in ("kick_batches", "device_batches"):
        assert sum(lo * n for (lo, _), n in batches(a[name]).items()) <= a["chains_published"]


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
        a = snap["activity"]
        assert a["chains_by_head"] == [1] + [0] * 15 and a["chains_published"] == a["chains_used"] == 1
        assert a["indirect_chains"] == 1  # header, data, status: one ring descriptor
        assert batches(a["kick_batches"])[(1, 1)] == batches(a["interrupt_batches"])[(1, 1)] == 1
        assert a["peak_in_flight"] == 1
        assert snapshot(rig)["activity"]["peak_in_flight"] == 0  # since the previous snapshot
    finally:
        await rig.close()


async def test_counters_show_batches_heads_and_the_peak_nobody_saw_in_flight() -> None:
    """Inline I/O: no snapshot between loop passes sees a chain in flight; the counters saw them."""
    rig = await make_rig(config=BlkConfig(queue_size=16))
    try:
        await asyncio.gather(*(rig.disk.read(8 * i, READ) for i in range(4)))
        mid = snapshot(rig)
        assert mid["counts"]["in_flight"] == 0 and mid["activity"]["peak_in_flight"] == 4
        await rig.disk.read(0, READ)
        await rig.disk.read(0, READ)
        snap = snapshot(rig)
        check_invariants(snap, rig.disk.queues[0])
        a = snap["activity"]
        # Four chains published together, on heads 0..3; reaped in order, they went back on the
        # free list last first: the two reads after them both took head 3.
        assert a["chains_by_head"] == [1, 1, 1, 3] + [0] * 12
        assert a["chains_published"] == a["chains_used"] == a["indirect_chains"] == 6
        for name in ("kick_batches", "device_batches", "interrupt_batches"):
            assert {k: n for k, n in batches(a[name]).items() if n} == {(1, 1): 2, (4, 7): 1}, name
        assert batches(a["kick_batches"]).keys() == {(0, 0), (1, 1), (2, 3), (4, 7), (8, 15), (16, 31)}
        assert a["peak_in_flight"] == 1  # only the lone reads since the previous snapshot
        assert snap["counts"]["in_flight"] == 0
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
        # Chains are counted by their head; none went through an indirect table.
        by_head = snap["activity"]["chains_by_head"]
        assert [h for h, n in enumerate(by_head) if n] == [0, 3, 6, 9] and sum(by_head) == 4
        assert snap["activity"]["indirect_chains"] == 0
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
        assert snap["activity"]["peak_in_flight"] == 5
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


async def test_fio_on_a_raw_file_shows_in_the_counters_not_in_flight(tmp_path: Path) -> None:
    """The default disk (a raw file, inline I/O) under fio over NBD: each request completes in
    the loop pass that starts it, so snapshots find (almost) nothing in flight; the counters
    between two snapshots account for every request, the batches and the heads it used."""
    disk = DiskSpec(
        name="disk0", backend="file", path=tmp_path / "disk0.img", size=64 * MiB, io_mode="inline"
    )
    async with serving(disk) as rig, aiohttp.ClientSession(rig.base_url) as http:

        async def rings() -> dict[str, Any]:
            async with http.get("/v1/disks/disk0/rings") as r:
                assert r.status == 200
                queue: dict[str, Any] = (await r.json())["queues"][0]
            check_activity(queue)
            return queue

        before = await rings()
        fio = await asyncio.create_subprocess_exec(
            tool("fio"),
            "--name=rings",
            "--ioengine=nbd",
            f"--uri={rig.uri()}",
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--io_size=16M",
            "--output-format=json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        output = asyncio.get_running_loop().create_task(fio.communicate())
        during = []
        while not output.done():
            await asyncio.sleep(0.05)
            during.append(await rings())
        out, err = await output
        assert fio.returncode == 0, err.decode(errors="replace")
        after = await rings()

    [job] = json.loads(out[out.index(b"{") :])["jobs"]
    ios = job["read"]["total_ios"] + job["write"]["total_ios"]
    assert ios == 16 * MiB // 4096 and job["error"] == 0
    a0, a1 = before["activity"], after["activity"]
    published = a1["chains_published"] - a0["chains_published"]
    assert published >= ios  # and the odd flush
    assert a1["chains_used"] - a0["chains_used"] == published  # all returned: nothing in flight now
    assert (after["avail"]["idx"] - before["avail"]["idx"]) & 0xFFFF == published & 0xFFFF
    assert a1["indirect_chains"] - a0["indirect_chains"] == published  # one ring descriptor each
    # The heads: the chains spread over the descriptors fio's queue depth needs (no more, as
    # the free list hands back the descriptors just returned), and nothing else was touched.
    used = [n1 - n0 for n0, n1 in zip(a0["chains_by_head"], a1["chains_by_head"], strict=True)]
    assert sum(used) == published
    heads = [h for h, n in enumerate(used) if n]
    assert 2 <= len(heads) <= 16 + 1
    # Batches: fio keeps 16 requests in flight, the NBD server starts what one read of the
    # socket brings, and they share a kick, a device pass and an interrupt.
    for name in ("kick_batches", "device_batches", "interrupt_batches"):
        counted = {
            size: n1 - n0
            for size, n0, n1 in zip(
                map(tuple, a1[name]["sizes"]), a0[name]["batches"], a1[name]["batches"], strict=True
            )
        }
        assert sum(lo * n for (lo, _), n in counted.items()) <= published
        assert published <= sum(hi * n for (_, hi), n in counted.items())
        assert sum(n for (lo, _), n in counted.items() if lo >= 2) > 0, (name, counted)
    kicks = after["driver"]["kicks"] + after["driver"]["kicks_suppressed"]
    assert kicks - before["driver"]["kicks"] - before["driver"]["kicks_suppressed"] < published / 2
    # The peak a snapshot reports is what happened since the previous one: several chains in
    # flight at once, where the snapshot itself (nearly) never sees any.
    assert len(during) >= 3
    peaks = [s["activity"]["peak_in_flight"] for s in during]
    assert max(peaks) >= 2 and max(peaks) <= 16 + 1
    assert sum(s["counts"]["in_flight"] for s in during) < sum(peaks)
    assert after["activity"]["peak_in_flight"] <= max(peaks)
