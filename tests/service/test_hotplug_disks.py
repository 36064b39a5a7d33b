"""Disks added, removed and resized at run time, proven with real clients.

``POST /v1/disks`` hot-plugs a virtio-blk function into a PCIe slot of the running machine (the
guest's pciehp binds the driver as at boot) and exports it; ``DELETE /v1/disks/{name}`` drains,
flushes, ends its NBD connections and unplugs it; ``PATCH`` op ``resize`` changes its capacity
through a configuration-change interrupt. curl, nbdinfo, qemu-io, qemu-img and fio are the
clients; the other disks' clients never see an error.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
from pathlib import Path
from typing import Any

import aiohttp

from service.model import DiskSpec, SecurityConfig
from service.nbd.constants import Command, Errno
from tests.nbdclient import WireClient
from tests.service.conftest import MiB, NbdRig, run, serving


def start_disk() -> DiskSpec:
    return DiskSpec(name="disk0", backend="memory", size=64 * MiB)


async def curl(rig: NbdRig, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
    argv = ["curl", "-sS", "-X", method, "-w", "\n%{http_code}", f"{rig.base_url}{path}"]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    out = (await run(*argv)).stdout
    text, _, status = out.rpartition("\n")
    return int(status), json.loads(text) if text.strip() else None


async def exports(rig: NbdRig) -> list[str]:
    listing = json.loads((await run("nbdinfo", "--json", "--list", rig.uri(""))).stdout)
    return sorted(export["export-name"] for export in listing["exports"])


async def test_curl_adds_memory_file_and_qcow2_disks_and_removes_them(tmp_path: Path) -> None:
    qcow2 = tmp_path / "q.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "32M")
    async with serving(start_disk()) as rig:
        bodies: list[dict[str, Any]] = [
            {"name": "mem", "backend": "memory", "size": "16M"},
            {"name": "raw", "backend": "file", "image": str(tmp_path / "raw.img"), "size": 8 * MiB},
            {"name": "q", "image": str(qcow2), "format": "qcow2"},
        ]
        for body in bodies:
            status, answer = await curl(rig, "POST", "/v1/disks", body)
            assert status == 201, answer
            assert answer["name"] == body["name"] and answer["ready"] is True
        sizes = {"mem": 16 * MiB, "raw": 8 * MiB, "q": 32 * MiB}
        assert await exports(rig) == ["disk0", "mem", "q", "raw"]
        for name, size in sizes.items():
            info = json.loads((await run("nbdinfo", "--json", rig.uri(name))).stdout)
            assert info["exports"][0]["export-size"] == size
            await run(
                "qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k",
                "-c", "read -P 0 0 64k", rig.uri(name),
            )  # fmt: skip
        # REST and the metrics see them too.
        status, listed = await curl(rig, "GET", "/v1/disks")
        assert sorted(disk["name"] for disk in listed) == ["disk0", "mem", "q", "raw"]
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"{rig.base_url}/v1/disks/q", headers={"Range": "bytes=1048576-1048579"}
            ) as r:
                assert (r.status, await r.read()) == (206, b"\x5a" * 4)
            async with session.get(f"{rig.base_url}/metrics") as r:
                text = await r.text()
        assert 'disk="q"' in text and 'disk="mem"' in text
        pci = {disk["name"]: disk["pci"] for disk in listed}
        assert pci["q"] != pci["mem"] and pci["q"].split(":")[1] != "00"  # behind a root port, not bus 0
        for name in sizes:
            status, outcome = await curl(rig, "DELETE", f"/v1/disks/{name}")
            assert status == 200, outcome
            assert outcome["name"] == name and outcome["flushed"] is True
            assert outcome["surprise_removal"] is False and outcome["requests_abandoned"] == 0
        assert await exports(rig) == ["disk0"]
        async with aiohttp.ClientSession() as session, session.get(f"{rig.base_url}/metrics") as r:
            text = await r.text()
        for name in sizes:
            assert f'disk="{name}"' not in text.replace('disk="disk0"', "")
        status, answer = await curl(rig, "GET", "/v1/disks/q/info")
        assert (status, answer["error"]) == (404, "no_such_disk")
    # The data was flushed and the images closed cleanly.
    await run("qemu-img", "check", "-q", str(qcow2))
    mapped = (await run("qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1M 64k", str(qcow2))).stdout
    assert "read 65536/65536" in mapped
    assert (tmp_path / "raw.img").read_bytes()[1 * MiB : 1 * MiB + 4] == b"\x5a" * 4


async def test_a_removed_disk_ends_its_nbd_connections_with_eshutdown() -> None:
    async with serving(start_disk()) as rig, aiohttp.ClientSession() as session:
        body = {"name": "hot", "backend": "memory", "size": "4M"}
        async with session.post(f"{rig.base_url}/v1/disks", json=body) as r:
            assert r.status == 201
        client = await WireClient.connect(rig)
        await client.go("hot")
        other = await WireClient.connect(rig)
        await other.go("disk0")
        client.request(Command.READ, 1, 0, 512)
        assert (await client.simple_reply(512))[:2] == (1, 0)
        async with session.delete(f"{rig.base_url}/v1/disks/hot") as r:
            assert r.status == 200
            outcome = await r.json()
        assert outcome["nbd_connections_closed"] == 1
        client.request(Command.READ, 2, 0, 512)
        reply = await asyncio.wait_for(_reply_or_closed(client), 10)
        assert reply in ((2, Errno.ESHUTDOWN), None)
        assert await asyncio.wait_for(client.closed(), 10)
        other.request(Command.READ, 3, 0, 512)  # the other export's connection goes on
        assert (await other.simple_reply(512))[:2] == (3, 0)
        other.close()


async def _reply_or_closed(client: WireClient) -> tuple[int, int] | None:
    try:
        handle, error, _ = await client.simple_reply()
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return handle, error


async def test_removing_a_disk_fio_writes_to_ends_fio_and_no_other_client_sees_an_error(
    tmp_path: Path,
) -> None:
    async with serving(start_disk()) as rig, aiohttp.ClientSession() as session:
        for name in ("hot", "spare"):
            async with session.post(
                f"{rig.base_url}/v1/disks", json={"name": name, "backend": "memory", "size": "32M"}
            ) as r:
                assert r.status == 201, await r.text()
        verify = asyncio.create_task(
            run(
                "fio",
                "--name=steady",
                "--ioengine=nbd",
                f"--uri={rig.uri('disk0')}",
                "--rw=randwrite",
                "--bs=4k",
                "--size=16M",
                "--iodepth=8",
                "--verify=crc32c",
                "--do_verify=1",
                "--loops=3",
                f"--output={tmp_path / 'steady.txt'}",
                timeout=180,
            )
        )
        victim = await asyncio.create_subprocess_exec(
            "fio", "--name=victim", "--ioengine=nbd", f"--uri={rig.uri('hot')}", "--rw=randwrite",
            "--bs=4k", "--size=32M", "--iodepth=16", "--time_based", "--runtime=60",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await _wait_for_writes(rig, "hot")
        async with session.delete(f"{rig.base_url}/v1/disks/hot") as r:
            assert r.status == 200, await r.text()
            outcome = await r.json()
        assert outcome["nbd_connections_closed"] == 1
        _, err = await asyncio.wait_for(victim.communicate(), 30)  # fio ends: nothing hangs
        assert victim.returncode != 0, err
        # Adds and removes go on under the verifying fio of disk0.
        for cycle in range(3):
            async with session.post(
                f"{rig.base_url}/v1/disks", json={"name": f"c{cycle}", "backend": "memory", "size": "4M"}
            ) as r:
                assert r.status == 201
            async with session.delete(f"{rig.base_url}/v1/disks/c{cycle}") as r:
                assert r.status == 200
        async with session.delete(f"{rig.base_url}/v1/disks/spare") as r:
            assert r.status == 200
        await verify  # exits 0: every block it wrote read back as written
        report = (tmp_path / "steady.txt").read_text()
        assert "err= 0" in report
        assert sorted(rig.service.disks) == ["disk0"]


async def _wait_for_writes(rig: NbdRig, name: str) -> None:
    driver = rig.service.disks[name].driver
    for _ in range(500):
        if driver.statistics().bytes_written > 1 * MiB:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("fio never wrote to the disk")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


async def test_a_hundred_add_remove_cycles_give_back_everything(tmp_path: Path) -> None:
    async with serving(start_disk()) as rig, aiohttp.ClientSession() as session:
        service = rig.service
        machine = service.machine

        def state() -> tuple[int, ...]:
            return (
                _open_fds(),
                machine.lapic.vectors_in_use,
                service.guest.dma.free_bytes,
                len(service._devices),
                machine_cards(rig),
                len(asyncio.all_tasks()),
            )

        async def cycle(n: int) -> None:
            body = {"name": "hot", "image": str(tmp_path / "hot.img"), "size": "4M", "queues": 2}
            async with session.post(f"{rig.base_url}/v1/disks", json=body) as r:
                assert r.status == 201, await r.text()
            put = f"{rig.base_url}/v1/disks/hot/sectors/{n % 64}"
            async with session.put(put, data=bytes([n & 0xFF]) * 512) as r:
                assert r.status == 200
            async with session.delete(f"{rig.base_url}/v1/disks/hot") as r:
                assert r.status == 200

        await cycle(0)  # the first one warms caches and pools
        gc.collect()
        baseline, rss = state(), _rss()
        for n in range(1, 101):
            await cycle(n)
        gc.collect()
        assert state() == baseline
        assert _rss() - rss < 32 * MiB
        stats = service.guest.hotplug.slots
        assert sum(slot.statistics.bound for slot in stats.values()) == 101
        assert sum(slot.statistics.surprise_removals for slot in stats.values()) == 0
        data = (tmp_path / "hot.img").read_bytes()
        assert data[100 % 64 * 512 : 100 % 64 * 512 + 512] == bytes([100]) * 512


async def test_bad_requests_are_refused_with_the_right_code_and_nothing_changes(tmp_path: Path) -> None:
    async with serving(start_disk()) as rig, aiohttp.ClientSession() as session:
        url = f"{rig.base_url}/v1/disks"
        garbage = tmp_path / "garbage.qcow2"
        garbage.write_bytes(b"QFI\xfb" + b"\xff" * 4092)  # qcow2's magic, then nonsense
        cases: list[tuple[object, int, str]] = [
            ({"backend": "memory"}, 400, "bad_field"),
            ({"name": "x", "backend": "memory", "size": [1]}, 400, "bad_field"),
            ({"name": "x", "backend": "memory", "size": None}, 400, "bad_field"),
            ({"name": "x", "backend": "tape"}, 400, "bad_field"),
            ({"name": "x", "nonsense": 1}, 400, "bad_field"),
            ({"name": "../x", "backend": "memory"}, 400, "bad_field"),
            ({"name": "x", "backend": "memory", "size": 1000}, 400, "bad_field"),
            ({"name": "disk0", "backend": "memory"}, 409, "disk_exists"),
            (
                {"name": "x", "image": str(garbage), "format": "qcow2"},
                409,
                "disk_open_failed",
            ),
        ]
        for body, status, code in cases:
            async with session.post(url, json=body) as r:
                answer = await r.json()
                assert (r.status, answer["error"]) == (status, code), (body, answer)
        async with session.post(url, data=b"{nope", headers={"Content-Type": "application/json"}) as r:
            assert (r.status, (await r.json())["error"]) == (400, "bad_json")
        async with session.delete(f"{url}/disk0") as r:  # configured at start: bus 0
            assert (r.status, (await r.json())["error"]) == (409, "disk_refused")
        async with session.delete(f"{url}/nope") as r:
            assert (r.status, (await r.json())["error"]) == (404, "no_such_disk")
        assert sorted(rig.service.disks) == ["disk0"] and not rig.service.hotplugged
        assert machine_cards(rig) == 0
        await run("qemu-io", "-f", "raw", "-c", "write -P 3 0 4k", "-c", "read -P 3 0 4k", rig.uri())


def machine_cards(rig: NbdRig) -> int:
    return sum(port.card is not None for port in rig.service.machine.root_ports)


async def test_slots_run_out_with_a_clear_error_and_come_back() -> None:
    async with serving(start_disk()) as rig, aiohttp.ClientSession() as session:
        slots = rig.service.config.hotplug_slots
        url = f"{rig.base_url}/v1/disks"
        for n in range(slots):
            async with session.post(url, json={"name": f"h{n}", "backend": "memory", "size": "1M"}) as r:
                assert r.status == 201
        async with session.post(url, json={"name": "more", "backend": "memory", "size": "1M"}) as r:
            answer = await r.json()
            assert (r.status, answer["error"]) == (409, "disk_refused")
            assert "--hotplug-slots" in answer["message"]
        async with session.delete(f"{url}/h3") as r:
            assert r.status == 200
        async with session.post(url, json={"name": "more", "backend": "memory", "size": "1M"}) as r:
            assert r.status == 201
        assert machine_cards(rig) == slots
        assert await exports(rig) == sorted(["disk0", "more", *(f"h{n}" for n in range(slots) if n != 3)])


async def test_only_an_admin_token_manages_disks(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    admin, writer = "admin-0123456789abcdef", "rw-0123456789abcdef"
    tokens.write_text(f"admin {admin}\nrw {writer}\n")
    async with serving(start_disk(), security=SecurityConfig(tokens_file=tokens)) as rig:
        url = f"{rig.base_url}/v1/disks"
        body = {"name": "hot", "backend": "memory", "size": "1M"}
        as_writer = aiohttp.ClientSession(headers={"Authorization": f"Bearer {writer}"})
        as_admin = aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"})
        async with as_writer, as_admin, aiohttp.ClientSession() as anyone:
            async with as_writer.post(url, json=body) as r:
                assert (r.status, (await r.json())["error"]) == (403, "admin_required")
            async with anyone.post(url, json=body) as r:
                assert (r.status, (await r.json())["error"]) == (401, "unauthorized")
            assert "hot" not in rig.service.disks
            async with as_admin.post(url, json=body) as r:
                assert r.status == 201
            async with as_writer.delete(f"{url}/hot") as r:
                assert (r.status, (await r.json())["error"]) == (403, "admin_required")
            async with as_writer.patch(f"{url}/hot", json={"op": "resize", "size": "2M"}) as r:
                assert (r.status, (await r.json())["error"]) == (403, "admin_required")
            async with as_admin.patch(f"{url}/hot", json={"op": "resize", "size": "2M"}) as r:
                assert r.status == 200
            async with as_admin.delete(f"{url}/hot") as r:
                assert r.status == 200


async def test_resize_grows_the_disk_live_while_qemu_io_writes(tmp_path: Path) -> None:
    image = tmp_path / "g.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M")
    async with (
        serving(start_disk(), DiskSpec(name="g", path=image, format="qcow2", size=16 * MiB)) as rig,
        aiohttp.ClientSession() as session,
    ):
        writer = asyncio.create_task(
            run(
                "qemu-io",
                "-f",
                "raw",
                *(arg for n in range(64) for arg in ("-c", f"write -P 9 {n * 64}k 64k")),
                rig.uri("g"),
            )
        )
        url = f"{rig.base_url}/v1/disks/g"
        async with session.patch(url, json={"op": "resize", "size": "64M"}) as r:
            answer = await r.json()
            assert r.status == 200, answer
        assert answer["size"] == 64 * MiB and answer["resize"] == {"old_size": 16 * MiB, "size": 64 * MiB}
        await writer
        assert rig.service.disks["g"].driver.size == 64 * MiB
        info = json.loads((await run("nbdinfo", "--json", rig.uri("g"))).stdout)  # a new connection
        assert info["exports"][0]["export-size"] == 64 * MiB
        await run(
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "read -P 9 0 4M",
            "-c",
            "write -P 4 60M 1M",
            "-c",
            "read -P 4 60M 1M",
            rig.uri("g"),
        )
        async with session.patch(url, json={"op": "resize", "size": "32M"}) as r:
            assert (r.status, (await r.json())["error"]) == (409, "resize_refused")
        async with session.patch(url, json={"op": "resize", "size": "32M", "shrink": True}) as r:
            assert r.status == 200
        async with session.patch(url, json={"op": "resize", "size": 1000}) as r:
            assert (r.status, (await r.json())["error"]) == (400, "bad_field")
        async with session.patch(
            f"{rig.base_url}/v1/disks/disk0", json={"op": "resize", "size": "128M"}
        ) as r:
            assert r.status == 200  # a start-time disk resizes too: no unplug needed
    await run("qemu-img", "check", "-q", str(image))
    info = json.loads((await run("qemu-img", "info", "--output=json", str(image))).stdout)
    assert info["virtual-size"] == 32 * MiB
