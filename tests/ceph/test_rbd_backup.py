"""The backup cycle on an RBD disk while fio writes to it: a view is an RBD snapshot read through a
client of its own, checked against ``rbd export`` of that snapshot; the increment comes from the
checkpoint's bitmap, as on a file disk."""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path

import aiohttp

from service.model import DiskSpec
from tests.ceph.cluster import Cluster
from tests.ceph.conftest import ceph_options, image_name
from tests.service.conftest import SYSTEM_PYTHON, MiB, run, serving
from tests.service.test_bitmaps import api, chunks_of, dirty_chunks, nbdinfo_map
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
        names = await _snapshots(ceph_cluster, image)
        assert names == ["vblk-bitmap-c1", "vblk-bitmap-c1.end", "vblk-bitmap-c2"]  # the views' are gone


async def test_an_rbd_disks_persistent_bitmaps_are_snapshots_and_outlive_a_restart(
    ceph_cluster: Cluster,
) -> None:
    image = image_name("bitmaps")
    spec = DiskSpec(
        name="disk0", backend="rbd", rbd_image=image, size=SIZE, create=True, ceph=ceph_options(ceph_cluster)
    )
    snaps = functools.partial(_snapshots, ceph_cluster, image)
    async with serving(spec) as rig, aiohttp.ClientSession(base_url=rig.base_url) as http:
        made = await api(http, "POST", "/v1/disks/disk0/bitmaps", {"name": "b0"}, 201)
        assert made["persistent"] is True
        listed = await api(http, "GET", "/v1/disks/disk0/bitmaps")
        assert listed["persistence"]["where"].startswith("RBD image rbd/")
        assert await snaps() == ["vblk-bitmap-b0"]
        await run("qemu-io", "-f", "raw", "-c", "write -P 1 1M 4k", "-c", "write -z 8M 64k", rig.uri("disk0"))
        await api(http, "POST", "/v1/disks/disk0/checkpoints", {"bitmap": "c1"}, 201)
        assert await snaps() == ["vblk-bitmap-b0", "vblk-bitmap-b0.end", "vblk-bitmap-c1"]
        await run("qemu-io", "-f", "raw", "-c", "write -P 2 20M 4k", rig.uri("disk0"))
        refused = await api(
            http, "PATCH", "/v1/disks/disk0/bitmaps/c1", {"op": "merge", "bitmaps": ["b0"]}, 409
        )
        assert refused["error"] == "bitmap_refused"
        before = {n: dirty_chunks(await nbdinfo_map(rig, f"qemu:dirty-bitmap:{n}")) for n in ("b0", "c1")}
    assert before == {"b0": {16, 128}, "c1": {320}}
    # restarted: the bits come back from librbd's diff between the snapshots (never inconsistent)
    async with serving(spec) as rig, aiohttp.ClientSession(base_url=rig.base_url) as http:
        bitmaps = (await api(http, "GET", "/v1/disks/disk0/bitmaps"))["bitmaps"]
        states = {b["name"]: (b["recording"], b["persistent"], b["inconsistent"]) for b in bitmaps}
        assert states == {"b0": (False, True, False), "c1": (True, True, False)}
        after = {n: dirty_chunks(await nbdinfo_map(rig, f"qemu:dirty-bitmap:{n}")) for n in ("b0", "c1")}
        # what librbd's diff says changed (it may round out within an object: more, never less)
        for name, until in (("b0", f"rbd/{image}@vblk-bitmap-b0.end"), ("c1", f"rbd/{image}")):
            out = await asyncio.to_thread(
                ceph_cluster.rbd, "diff", "--format", "json", "--from-snap", f"vblk-bitmap-{name}", until
            )
            theirs = chunks_of([(e["offset"], e["length"]) for e in json.loads(out)])
            assert after[name] == theirs and after[name] >= before[name], (name, after[name], theirs)
        await api(http, "PATCH", "/v1/disks/disk0/bitmaps/c1", {"op": "clear"})
        assert dirty_chunks(await nbdinfo_map(rig, "qemu:dirty-bitmap:c1")) == set()
        await api(http, "DELETE", "/v1/disks/disk0/bitmaps/b0")
        assert await snaps() == ["vblk-bitmap-c1.c"]
        await api(http, "DELETE", "/v1/disks/disk0/bitmaps/c1")
        assert await snaps() == []


async def _snapshots(cluster: Cluster, image: str) -> list[str]:
    out = await asyncio.to_thread(cluster.rbd, "snap", "ls", "--format", "json", f"rbd/{image}")
    return sorted(s["name"] for s in json.loads(out))
