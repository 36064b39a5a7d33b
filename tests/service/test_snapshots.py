"""External snapshots and commit of a live disk while fio --verify writes through both: no error,
every acknowledged write where it should be; qemu-img checks the chain and compares the images."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from service.model import DiskSpec
from tests.service.conftest import MiB, NbdRig, run, serving
from tests.service.test_bitmaps import api

SIZE = 16 * MiB


async def fio_verify(rig: NbdRig, export: str) -> asyncio.subprocess.Process:
    """Random 4 KiB writes at a steady rate for a few seconds, then a read of every one (crc32c)."""
    return await asyncio.create_subprocess_exec(
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={rig.uri(export)}", "--rw=randwrite", "--bs=4k",
        f"--size={SIZE}", "--io_size=12M", "--iodepth=8", "--rate_iops=1500", "--verify=crc32c",
        "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_a_snapshot_and_a_commit_while_fio_verifies(fmt: str, tmp_path: Path) -> None:
    image = tmp_path / f"disk.{fmt}"
    if fmt == "qcow2":
        await run("qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE))
    spec = DiskSpec(name="d", path=image, size=SIZE, format=fmt)
    async with serving(spec) as rig, aiohttp.ClientSession(base_url=rig.base_url) as http:
        await run("qemu-io", "-f", "raw", "-c", f"write -P 0x11 0 {SIZE}", rig.uri("d"))
        fio = await fio_verify(rig, "d")
        await asyncio.sleep(1.5)
        taken = await api(http, "POST", "/v1/disks/d/snapshot", {"overlay": "d-top.qcow2"}, 201)
        overlay = tmp_path / "d-top.qcow2"
        assert taken["top"] == {"path": str(overlay), "format": "qcow2"}
        assert taken["base"] == {"path": str(image), "format": fmt}
        stack = (await api(http, "GET", "/v1/disks/d/info"))["stack"]
        assert [n["node"] for n in stack][:2] == ["dirty", "qcow2"]
        base_at_snapshot = image.read_bytes() if fmt == "raw" else None
        await asyncio.sleep(1.5)  # fio writes into the overlay
        if base_at_snapshot is not None:
            assert image.read_bytes() == base_at_snapshot  # the base does not change under the overlay
        committed = await api(http, "POST", "/v1/disks/d/commit", {}, 200)
        assert committed["top"] == {"path": str(image), "format": fmt}
        assert committed["copied"] > 0
        stdout, stderr = await fio.communicate()
        assert fio.returncode == 0, stderr.decode()
        job = json.loads(stdout[stdout.index(b"{") :])["jobs"][0]
        assert job["error"] == 0 and job["write"]["io_bytes"] == 12 * MiB and job["read"]["io_bytes"] > 0
        served = tmp_path / "served.raw"
        await run("nbdcopy", rig.uri("d"), str(served))
        stack = (await api(http, "GET", "/v1/disks/d/info"))["stack"]
        assert [n["node"] for n in stack][1] == ("qcow2" if fmt == "qcow2" else "file")
    # after the clean stop: the base alone holds every write (the overlay is no longer needed)
    await run("qemu-img", "compare", "-f", "raw", "-F", fmt, str(served), str(image))
    if fmt == "qcow2":
        check = json.loads((await run("qemu-img", "check", "--output=json", str(image))).stdout)
        assert check.get("corruptions", 0) == 0, check


async def test_snapshot_refusals(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    async with (
        serving(
            DiskSpec(name="d", path=image, size=SIZE),
            DiskSpec(name="m", backend="memory", size=SIZE),
            DiskSpec(name="ro", path=image.with_name("ro.img"), size=SIZE),
        ) as rig,
        aiohttp.ClientSession(base_url=rig.base_url) as http,
    ):
        image.with_name("taken.qcow2").write_bytes(b"")
        refusals = [
            ("/v1/disks/m/snapshot", {"overlay": "x.qcow2"}, 409, "snapshot_refused"),  # memory
            ("/v1/disks/d/snapshot", {"overlay": "../x.qcow2"}, 400, "bad_field"),
            ("/v1/disks/d/snapshot", {"overlay": ".hidden"}, 400, "bad_field"),
            ("/v1/disks/d/snapshot", {"overlay": "taken.qcow2"}, 409, "snapshot_exists"),
            ("/v1/disks/d/snapshot", {}, 400, "bad_field"),
            ("/v1/disks/d/commit", {}, 409, "snapshot_refused"),  # nothing beneath a raw image
            ("/v1/disks/nope/commit", {}, 404, "no_such_disk"),
        ]
        for path, body, status, code in refusals:
            answer = await api(http, "POST", path, body, status)
            assert answer["error"] == code, (path, body, answer)
        await api(http, "POST", "/v1/disks/d/views", {"name": "v"}, 201)
        answer = await api(http, "POST", "/v1/disks/d/snapshot", {"overlay": "y.qcow2"}, 409)
        assert answer["error"] == "snapshot_refused" and "views" in answer["message"]
        await api(http, "DELETE", "/v1/disks/d/views/v")
        # a snapshot, a second one on top, and two commits back down: the chain comes and goes
        await api(http, "POST", "/v1/disks/d/snapshot", {"overlay": "s1.qcow2"}, 201)
        await run("qemu-io", "-f", "raw", "-c", "write -P 0x21 0 64k", rig.uri("d"))
        await api(http, "POST", "/v1/disks/d/snapshot", {"overlay": "s2.qcow2"}, 201)
        await run("qemu-io", "-f", "raw", "-c", "write -P 0x22 1M 64k", rig.uri("d"))
        depth = json.loads(
            (await run("nbdinfo", "--map=qemu:allocation-depth", "--json", rig.uri("d"))).stdout
        )
        assert {e["type"] for e in depth} >= {1, 2, 3}  # s2, s1, the raw base
        first = await api(http, "POST", "/v1/disks/d/commit", {}, 200)
        assert first["top"]["path"].endswith("s1.qcow2") and first["copied"] == 64 * 1024
        second = await api(http, "POST", "/v1/disks/d/commit", {}, 200)
        assert second["top"] == {"path": str(image), "format": "raw"} and second["copied"] == 128 * 1024
        await run(
            "qemu-io", "-f", "raw", "-c", "read -P 0x21 0 64k", "-c", "read -P 0x22 1M 64k", rig.uri("d")
        )
    data = image.read_bytes()
    assert data[:65536] == b"\x21" * 65536 and data[MiB : MiB + 65536] == b"\x22" * 65536
