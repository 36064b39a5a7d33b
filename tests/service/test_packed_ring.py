"""``--ring packed``: the disks' virtqueues are packed ones (VIRTIO_F_RING_PACKED), and real
clients see the same disk: fio verifies what it wrote over NBD, qemu-img compares a copy, the REST
API and the ring view say which layout each queue uses, and a disk hot-plugged later gets packed
rings too."""

from __future__ import annotations

import json
import os
from pathlib import Path

import aiohttp

from device.packed_virtqueue import PackedDeviceVirtqueue
from driver.packed_virtqueue import PackedDriverVirtqueue
from service.model import DiskSpec
from tests.service.conftest import MiB, run, serving


async def test_nbd_and_rest_clients_on_packed_rings(tmp_path: Path) -> None:
    disks = (
        DiskSpec(name="disk0", backend="memory", size=32 * MiB, num_queues=2),
        DiskSpec(name="small", backend="memory", size=4 * MiB, queue_size=8),
    )
    async with serving(*disks, ring="packed") as rig, aiohttp.ClientSession() as http:
        service = rig.service
        for disk in service.disks.values():
            assert all(isinstance(q, PackedDriverVirtqueue) for q in disk.driver.queues)
            assert all(isinstance(q, PackedDeviceVirtqueue) for q in disk.device.queues)
        out = await run(
            "fio", "--name=v", "--ioengine=nbd", f"--uri={rig.uri('disk0')}", "--rw=randwrite", "--bs=4k",
            "--size=16M", "--iodepth=32", "--numjobs=1", "--verify=crc32c", "--do_verify=1",
            "--output-format=json", timeout=180,
        )  # fmt: skip
        assert json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]["error"] == 0
        # A queue of 8 descriptors: 64 KiB writes at depth 16 wrap it again and again.
        await run(
            "fio", "--name=w", "--ioengine=nbd", f"--uri={rig.uri('small')}", "--rw=randwrite", "--bs=64k",
            "--size=4M", "--iodepth=16", "--verify=md5", "--do_verify=1", timeout=180,
        )  # fmt: skip
        image = tmp_path / "in.img"
        image.write_bytes(os.urandom(4 * MiB))
        await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), rig.uri("small"))
        await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), rig.uri("small"))
        async with http.get(f"{rig.base_url}/v1/disks/disk0/info") as r:
            assert (await r.json())["ring"] == "packed"
        async with http.get(f"{rig.base_url}/v1/disks/disk0/rings") as r:
            rings = await r.json()
        assert [q["ring"] for q in rings["queues"]] == ["packed", "packed"]
        assert all(q["driver"]["completed"] > 0 for q in rings["queues"])
        assert all(set(q["descriptors"]) <= {".", "h", "i", "c"} for q in rings["queues"])
        # A disk added at run time binds with the same driver options.
        async with http.post(
            f"{rig.base_url}/v1/disks", json={"name": "hot", "backend": "memory", "size": "4M"}
        ) as r:
            assert r.status == 201
            assert (await r.json())["ring"] == "packed"
        await run("qemu-io", "-f", "raw", "-c", "write -P 7 0 1M", "-c", "read -P 7 0 1M", rig.uri("hot"))


async def test_the_default_stays_split() -> None:
    async with serving(DiskSpec(name="disk0", backend="memory", size=4 * MiB)) as rig:
        disk = rig.service.disks["disk0"]
        assert disk.bytes.info()["ring"] == "split"
        assert not any(isinstance(q, PackedDeviceVirtqueue) for q in disk.device.queues)
