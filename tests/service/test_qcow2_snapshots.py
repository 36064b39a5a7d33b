"""Internal qcow2 snapshots: listed as qemu-img lists them, one served read-only as ``qemu-nbd -l``
serves it (compared with ``qemu-img convert -l``), and the refusals of a bad name or a writable disk."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import aiohttp
import pytest

from device.block.node import BlockError
from device.block.qcow2 import Qcow2Node
from service.app import Service
from service.config import ConfigError, disks_of, parse_disk, resolve
from service.model import DiskSpec, ServiceConfig, StartupError
from tests.service.conftest import MiB, run, serving
from tests.service.test_bitmaps import api


async def image_with_snapshots(tmp_path: Path) -> Path:
    image = tmp_path / "s.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M")
    await run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 7 6M 64k", str(image))
    await run("qemu-img", "snapshot", "-c", "first", str(image))
    await run("qemu-io", "-f", "qcow2", "-c", "write -P 2 0 512k", "-c", "write -z 6M 64k", str(image))
    await run("qemu-img", "resize", "-q", str(image), "12M")
    await run("qemu-img", "snapshot", "-c", "second", str(image))
    await run("qemu-io", "-f", "qcow2", "-c", "write -P 3 256k 64k", str(image))
    return image


async def test_an_internal_snapshot_is_served_as_qemu_nbd_serves_it(tmp_path: Path) -> None:
    image = await image_with_snapshots(tmp_path)
    info = json.loads((await run("qemu-img", "info", "--output=json", str(image))).stdout)
    for wanted in ("first", "2"):  # by name, and by id
        expected = tmp_path / f"expected-{wanted}.raw"
        await run("qemu-img", "convert", "-l", f"snapshot.{'name' if wanted == 'first' else 'id'}={wanted}",
                  "-O", "raw", str(image), str(expected))  # fmt: skip
        spec = DiskSpec(name="s", path=image, format="qcow2", read_only=True, snapshot=wanted)
        async with serving(spec) as rig, aiohttp.ClientSession(base_url=rig.base_url) as http:
            served = tmp_path / f"served-{wanted}.raw"
            await run("nbdcopy", rig.uri("s"), str(served))
            assert served.stat().st_size == 12 * MiB  # the image's size now, as qemu-nbd -l serves it
            assert served.read_bytes() == expected.read_bytes()
            listed = await api(http, "GET", "/v1/disks/s/snapshots")
            assert listed["serving"] == wanted
            stack = (await api(http, "GET", "/v1/disks/s/info"))["stack"]
            assert stack[1]["node"] == "qcow2" and stack[1]["snapshot"] == wanted
    # the listing says what qemu-img says
    plain = DiskSpec(name="s", path=image, format="qcow2", read_only=True)
    async with serving(plain) as rig, aiohttp.ClientSession(base_url=rig.base_url) as http:
        listed = await api(http, "GET", "/v1/disks/s/snapshots")
    assert listed["serving"] is None
    theirs = [
        (s["id"], s["name"], s["date-sec"], s["date-nsec"], s["vm-clock-nsec"], s["vm-state-size"])
        for s in info["snapshots"]
    ]
    ours = [
        (s["id"], s["name"], s["date_sec"], s["date_nsec"], s["vm_clock_nsec"], s["vm_state_size"])
        for s in listed["internal"]
    ]
    assert ours == theirs
    assert [s["disk_size"] for s in listed["internal"]] == [8 * MiB, 12 * MiB]


async def test_a_snapshot_that_is_not_there_is_a_clear_start_up_error(tmp_path: Path) -> None:
    image = await image_with_snapshots(tmp_path)
    spec = DiskSpec(name="s", path=image, format="qcow2", read_only=True, snapshot="nope")
    service = Service(ServiceConfig(disks=(spec,), nbd_listen=()))
    with pytest.raises(StartupError) as failed:
        await service.start()
    await service.stop()
    assert "no internal snapshot 'nope'" in str(failed.value) and "first, second" in str(failed.value)


def disk(text: str) -> tuple[DiskSpec, ...]:
    return disks_of(resolve({"disk": [parse_disk(text)]}, {}, {}))


def test_a_snapshot_is_served_read_only_and_only_from_qcow2() -> None:
    with pytest.raises(ConfigError, match="read-only"):
        disk("name=s,image=s.qcow2,format=qcow2,snapshot=first")
    with pytest.raises(ConfigError, match="qcow2 disk's option"):
        disk("name=s,image=s.img,read-only,snapshot=first")
    (spec,) = disk("name=s,image=s.qcow2,format=qcow2,read-only,snapshot=first")
    assert spec.snapshot == "first" and spec.read_only


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        (60, struct.pack(">I", 70000), "internal snapshots (at most"),
        (64, struct.pack(">Q", 4096 + 8), "not a cluster inside the file"),
        (64, struct.pack(">Q", 1 << 40), "not a cluster inside the file"),
    ],
)
async def test_a_damaged_snapshot_table_is_refused_at_open(
    tmp_path: Path, field: int, value: bytes, why: str
) -> None:
    image = await image_with_snapshots(tmp_path)
    data = bytearray(image.read_bytes())
    data[field : field + len(value)] = value
    image.write_bytes(data)
    with pytest.raises(BlockError, match=re.escape(why)):
        Qcow2Node.open(image, snapshot="first")
    node = Qcow2Node.open(image)  # the image itself is still served (read-only), as QEMU serves it
    try:
        assert node.snapshots == [] and node.size == 12 * MiB
    finally:
        node.close()


async def test_a_snapshot_entry_pointing_outside_the_file_is_refused(tmp_path: Path) -> None:
    image = await image_with_snapshots(tmp_path)
    data = bytearray(image.read_bytes())
    table = struct.unpack_from(">Q", data, 64)[0]
    struct.pack_into(">Q", data, table, len(data) + (1 << 20))  # the first entry's L1 table offset
    image.write_bytes(data)
    with pytest.raises(BlockError, match="outside the file"):
        Qcow2Node.open(image, snapshot="first")
