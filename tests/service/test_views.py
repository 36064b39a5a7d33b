"""Point-in-time views and incremental backup with real tools while fio keeps writing: checkpoints
with views, full copies by nbdcopy, increments read by libnbd from the dirty bitmap and by
ovirt-imageio's client (incremental=True), compared with qemu-img; and the views' refusals."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from ovirt_imageio import client  # type: ignore[import-untyped]

from device.blk import IoMode
from service.model import DiskSpec
from tests.service.conftest import SYSTEM_PYTHON, MiB, NbdRig, run, serving
from tests.service.test_bitmaps import api

SIZE = 32 * MiB

# Copies the dirty extents of one bitmap of a view into an existing full copy (what a backup
# tool does): block status of qemu:dirty-bitmap:NAME, then pread/pwrite of each dirty extent.
INCREMENT = r"""
import nbd, sys
uri, bitmap, path = sys.argv[1:4]
h = nbd.NBD()
h.add_meta_context("qemu:dirty-bitmap:" + bitmap)
h.connect_uri(uri)
size = h.get_size()
dirty = []
offset = 0
while offset < size:
    found = []
    def cb(ctx, start, entries, err):
        found.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(min(size - offset, 1 << 30), offset, cb)
    for length, flags in found:
        length = min(length, size - offset)
        if flags & 1:
            dirty.append((offset, length))
        offset += length
copied = 0
with open(path, "r+b") as out:
    for start, length in dirty:
        out.seek(start)
        out.write(h.pread(length, start))
        copied += length
print(copied)
"""


async def fio_writer(rig: NbdRig, seconds: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "fio", "--name=live", "--ioengine=nbd", f"--uri={rig.uri('disk0')}", "--rw=randwrite", "--bs=4k",
        f"--size={SIZE}", "--iodepth=8", "--time_based", f"--runtime={seconds}", "--rate_iops=200",
        "--output-format=json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def full_copy(rig: NbdRig, export: str, path: Path) -> None:
    await run("nbdcopy", rig.uri(export), str(path))


@pytest.mark.parametrize("io_mode", ["inline", "thread"])
async def test_a_backup_cycle_while_fio_writes_to_the_disk(tmp_path: Path, io_mode: IoMode) -> None:
    image = tmp_path / "disk.img"
    async with serving(DiskSpec(name="disk0", path=image, size=SIZE, io_mode=io_mode)) as rig:
        await run("qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {SIZE}", rig.uri("disk0"))
        fio = await fio_writer(rig, 5)
        async with aiohttp.ClientSession(base_url=rig.base_url) as http:
            await asyncio.sleep(0.5)
            v1 = await api(http, "POST", "/v1/disks/disk0/views", {"name": "v1", "checkpoint": "c1"}, 201)
            assert (v1["name"], v1["disk"], v1["size"], v1["broken"]) == ("v1", "disk0", SIZE, None)
            full1 = tmp_path / "full1.raw"
            await full_copy(rig, "v1", full1)
            await asyncio.sleep(1.0)  # fio goes on writing
            v2 = await api(http, "POST", "/v1/disks/disk0/views", {"name": "v2", "checkpoint": "c2"}, 201)
            assert v2["bitmap"] == "c1"  # the bitmap the checkpoint froze: what changed from v1 to v2
            bitmaps = (await api(http, "GET", "/v1/disks/disk0/bitmaps"))["bitmaps"]
            assert {b["name"]: b["recording"] for b in bitmaps} == {"c1": False, "c2": True}
            increment = tmp_path / "incremental.raw"
            increment.write_bytes(full1.read_bytes())
            out = await run(SYSTEM_PYTHON, "-c", INCREMENT, rig.uri("v2"), "c1", str(increment))
            copied = int(out.stdout)
            assert 0 < copied < SIZE  # an increment, not the whole disk
            full2 = tmp_path / "full2.raw"
            await full_copy(rig, "v2", full2)
            await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(increment), str(full2))
            assert full1.read_bytes() != full2.read_bytes()  # fio wrote between the checkpoints
            # the first view still shows the disk as it was at the first checkpoint
            again = tmp_path / "full1-again.raw"
            await full_copy(rig, "v1", again)
            assert again.read_bytes() == full1.read_bytes()
            views = (await api(http, "GET", "/v1/disks/disk0/views"))["views"]
            assert [v["name"] for v in views] == ["v1", "v2"]
            assert views[0]["scratch_bytes"] > 0  # fio's writes made v1 keep old data
            scratch = [Path(v["scratch"]) for v in views]
            assert all(p.exists() and p.parent == tmp_path for p in scratch)
            metrics = (await run("curl", "-sf", f"{rig.base_url}/metrics")).stdout
            assert 'vblk_view_scratch_bytes{disk="disk0",view="v1"}' in metrics
            stdout, stderr = await fio.communicate()
            assert fio.returncode == 0, stderr
            job = json.loads(stdout[stdout.index(b"{") :])["jobs"][0]
            assert job["error"] == 0 and job["write"]["io_bytes"] > 0
            # the disk moved on after the second view
            now = tmp_path / "now.raw"
            await full_copy(rig, "disk0", now)
            assert now.read_bytes() != full2.read_bytes()
            for name in ("v1", "v2"):
                removed = await api(http, "DELETE", f"/v1/disks/disk0/views/{name}")
                assert removed["removed"] == name
            assert not any(p.exists() for p in scratch)
            assert [d["name"] for d in await api(http, "GET", "/v1/disks")] == ["disk0"]
            listed = await run("nbdinfo", "--list", "--json", rig.uri("disk0"))
            assert [e["export-name"] for e in json.loads(listed.stdout)["exports"]] == ["disk0"]


async def test_ovirt_imageio_downloads_a_full_and_an_incremental_backup(tmp_path: Path) -> None:
    """The imageio client from PyPI against vblk's REST API: a full download of one view, then an
    incremental one of the next (only the dirty extents), rebased onto the full one."""
    async with serving(DiskSpec(name="disk0", backend="memory", size=SIZE)) as rig:
        await run(
            "qemu-io", "-f", "raw", "-c", "write -P 1 0 8M", "-c", "write -P 2 16M 4M", rig.uri("disk0")
        )
        async with aiohttp.ClientSession(base_url=rig.base_url) as http:
            await api(http, "POST", "/v1/disks/disk0/views", {"name": "full", "checkpoint": "b1"}, 201)
            await run(
                "qemu-io", "-f", "raw", "-c", "write -P 3 1M 64k", "-c", "write -P 4 20M 1M", rig.uri("disk0")
            )
            await api(http, "POST", "/v1/disks/disk0/views", {"name": "inc", "checkpoint": "b2"}, 201)
            await run("qemu-io", "-f", "raw", "-c", "write -P 5 2M 64k", rig.uri("disk0"))  # after: not in it
            full = tmp_path / "full.qcow2"
            await asyncio.to_thread(
                client.download, f"{rig.base_url}/v1/disks/full", str(full), None, secure=False
            )
            inc = tmp_path / "inc.qcow2"
            await asyncio.to_thread(
                client.download, f"{rig.base_url}/v1/disks/inc", str(inc), None,
                secure=False, incremental=True, backing_file=str(full), backing_format="qcow2",
            )  # fmt: skip
            # the increment holds only what changed between the views
            mapped = json.loads((await run("qemu-img", "map", "--output=json", str(inc))).stdout)
            own = [(e["start"], e["length"]) for e in mapped if e["depth"] == 0 and e["data"]]
            assert own and sum(n for _, n in own) <= 2 * MiB, own
            expected = tmp_path / "inc.raw"
            await run("nbdcopy", rig.uri("inc"), str(expected))
            await run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(inc), str(expected))


async def test_view_refusals(nbd_rig: NbdRig, tmp_path: Path) -> None:
    async with aiohttp.ClientSession(base_url=nbd_rig.base_url) as http:
        await api(http, "POST", "/v1/disks/disk0/views", {"name": "v"}, 201)
        refusals: list[tuple[str, str, Any, int, str]] = [
            ("POST", "/v1/disks/disk0/views", {"name": "v"}, 409, "view_exists"),
            ("POST", "/v1/disks/disk0/views", {"name": "ro"}, 409, "view_exists"),  # a disk's name
            ("POST", "/v1/disks/disk0/views", {"name": "a b"}, 400, "bad_field"),
            ("POST", "/v1/disks/disk0/views", {"name": "w", "bitmap": "nope"}, 404, "no_such_bitmap"),
            ("POST", "/v1/disks/disk0/views", {"name": "w", "colour": 1}, 400, "bad_field"),
            ("POST", "/v1/disks/v/views", {"name": "w"}, 403, "read_only"),  # a view is read-only
            ("POST", "/v1/disks/nope/views", {"name": "w"}, 404, "no_such_disk"),
            ("DELETE", "/v1/disks/disk0/views/nope", None, 404, "no_such_view"),
            ("DELETE", "/v1/disks/ro/views/v", None, 403, "read_only"),
            ("PUT", "/v1/disks/v/sectors/0", None, 403, "read_only"),
        ]
        for method, path, body, status, code in refusals:
            if method == "PUT":
                async with http.put(path, data=b"\0" * 512) as r:
                    assert (r.status, (await r.json())["error"]) == (status, code)
                continue
            answer = await api(http, method, path, body, status)
            assert answer["error"] == code, (method, path, answer)
        # a view whose checkpoint is refused is not made, and the recording bitmaps go on recording
        await api(http, "POST", "/v1/disks/disk0/bitmaps", {"name": "b0"}, 201)
        answer = await api(http, "POST", "/v1/disks/disk0/views", {"name": "w", "checkpoint": "b0"}, 409)
        assert answer["error"] == "bitmap_exists"
        assert [v["name"] for v in (await api(http, "GET", "/v1/disks/disk0/views"))["views"]] == ["v"]
        assert (await api(http, "GET", "/v1/disks/disk0/bitmaps/b0"))["recording"] is True
        # writes to a view over NBD: refused, the view unchanged
        refused = await run("qemu-io", "-f", "raw", "-c", "write 0 4k", nbd_rig.uri("v"), check=False)
        assert refused.returncode != 0
        # resizing a disk with a view is refused (the view keeps the size it had)
        info = await api(http, "GET", "/v1/disks/v/info")
        assert info["read_only"] is True and info["stack"][0]["node"] == "view"
        await api(http, "DELETE", "/v1/disks/disk0/views/v")
        assert "v" not in [d["name"] for d in await api(http, "GET", "/v1/disks")]


async def test_a_full_scratch_breaks_the_view_not_the_disk(tmp_path: Path) -> None:
    async with serving(DiskSpec(name="disk0", backend="memory", size=SIZE)) as rig:
        await run("qemu-io", "-f", "raw", "-c", f"write -P 1 0 {SIZE}", rig.uri("disk0"))
        async with aiohttp.ClientSession(base_url=rig.base_url) as http:
            await api(http, "POST", "/v1/disks/disk0/views", {"name": "v", "scratch_limit": 256 * 1024}, 201)
            # 1 MiB of writes over old data: the view can keep 256 KiB of it
            await run("qemu-io", "-f", "raw", "-c", "write -P 2 0 1M", rig.uri("disk0"))
            views = (await api(http, "GET", "/v1/disks/disk0/views"))["views"]
            assert views[0]["broken"] and views[0]["scratch_bytes"] <= 256 * 1024
            read = await run("qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", rig.uri("v"), check=False)
            assert read.returncode != 0 or "error" in read.stdout.lower()
            data = await run("qemu-io", "-f", "raw", "-c", "read -P 2 0 1M", rig.uri("disk0"))
            assert "Pattern verification failed" not in data.stdout
            await api(http, "DELETE", "/v1/disks/disk0/views/v")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".scratch")]
