"""The backup cycle on an RBD disk while fio writes to it: a view is an RBD snapshot read through a
client of its own, checked against ``rbd export`` of that snapshot; the increment comes from the
checkpoint's bitmap, as on a file disk."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from service.model import DiskSpec
from tests.ceph.cluster import Cluster
from tests.ceph.conftest import ceph_options, image_name
from tests.service.conftest import SYSTEM_PYTHON, MiB, run, serving
from tests.service.test_bitmaps import api
from tests.service.test_views import INCREMENT, fio_writer

SIZE = 32 * MiB


async def test_an_rbd_backup_cycle_matches_rbd_export_of_the_snapshots(
    ceph_cluster: Cluster, tmp_path: Path
) -> None:
    image = image_name("backup")
    spec = DiskSpec(
        name="disk0", backend="rbd", rbd_image=image, size=SIZE, create=True, ceph=ceph_options(ceph_cluster)
    )
    async with serving(spec) as rig, aiohttp.ClientSession(base_url=rig.base_url) as http:
        await run("qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {SIZE}", rig.uri("disk0"))
        fio = await fio_writer(rig, 5)
        await asyncio.sleep(0.5)
        v1 = await api(http, "POST", "/v1/disks/disk0/views", {"name": "v1", "checkpoint": "c1"}, 201)
        assert v1["rbd_snapshot"] == "vblk-view-v1" and v1["scratch"] is None
        full1 = tmp_path / "full1.raw"
        await run("nbdcopy", rig.uri("v1"), str(full1))
        exported1 = tmp_path / "export1.raw"
        await asyncio.to_thread(ceph_cluster.rbd, "export", f"rbd/{image}@vblk-view-v1", str(exported1))
        assert full1.read_bytes() == exported1.read_bytes()
        await asyncio.sleep(1.0)
        v2 = await api(http, "POST", "/v1/disks/disk0/views", {"name": "v2", "checkpoint": "c2"}, 201)
        assert v2["bitmap"] == "c1"
        increment = tmp_path / "incremental.raw"
        increment.write_bytes(full1.read_bytes())
        copied = int((await run(SYSTEM_PYTHON, "-c", INCREMENT, rig.uri("v2"), "c1", str(increment))).stdout)
        assert 0 < copied < SIZE
        exported2 = tmp_path / "export2.raw"
        await asyncio.to_thread(ceph_cluster.rbd, "export", f"rbd/{image}@vblk-view-v2", str(exported2))
        assert increment.read_bytes() == exported2.read_bytes()
        assert exported1.read_bytes() != exported2.read_bytes()  # fio wrote between the two
        stdout, stderr = await fio.communicate()
        assert fio.returncode == 0, stderr.decode()
        assert json.loads(stdout[stdout.index(b"{") :])["jobs"][0]["error"] == 0
        for name in ("v1", "v2"):
            await api(http, "DELETE", f"/v1/disks/disk0/views/{name}")
        snaps = json.loads(
            await asyncio.to_thread(ceph_cluster.rbd, "snap", "ls", "--format", "json", f"rbd/{image}")
        )
        assert snaps == []
