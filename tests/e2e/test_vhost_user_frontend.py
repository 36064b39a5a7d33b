"""vblk's driver as a vhost-user front end: VirtioBlk against QEMU's own virtio-blk device.

``qemu-storage-daemon --export type=vhost-user-blk`` (QEMU's block layer and its
libvhost-user virtio-blk implementation) serves a raw image; vblk's driver shares its guest
RAM as a memfd, sets up the rings and runs a random concurrent workload of reads, writes
(some larger than a request may be), flushes, discards, write-zeroes and GET_ID against a
model of the disk, then the image file is compared with the model. The same workload runs
against vblk's own back end (``vblk vhost-user``), both sides in separate processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from device.memory import GuestMemory
from device.spec.virtio import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_PACKED
from driver.blk import BlkIOError, VirtioBlk
from driver.dma import DmaAllocator
from driver.vhost_user import VhostUserTransport
from service.app import Service
from service.config import from_sources
from service.model import DiskSpec, ServiceConfig
from tests.e2e import linux
from tests.service.conftest import run

MiB = 1 << 20
SECTOR = 512
DISK_SIZE = 16 * MiB
REGION = 64  # sectors: each op of a batch gets its own region, so the model stays exact
ALL = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class Variant:
    back_end: str  # "qsd" (qemu-storage-daemon) or "vblk" (vblk vhost-user)
    queues: int = 1
    queue_size: int = 128
    features_mask: int = ALL
    io_mode: str = "inline"  # vblk's back end: "thread" completes requests out of order
    ring: str = "split"  # the driver asks for packed rings (qemu-storage-daemon offers none)


VARIANTS = {
    "qsd": Variant("qsd"),
    "qsd-no-event-idx": Variant("qsd", features_mask=ALL & ~(1 << VIRTIO_F_EVENT_IDX)),
    "qsd-no-indirect-ring-of-8": Variant(
        "qsd", queue_size=8, features_mask=ALL & ~(1 << VIRTIO_F_INDIRECT_DESC)
    ),
    "qsd-two-queues": Variant("qsd", queues=2),
    "vblk-two-queues": Variant("vblk", queues=2),
    "vblk-thread-io": Variant("vblk", io_mode="thread"),
    "vblk-packed": Variant("vblk", ring="packed"),
    "vblk-packed-two-queues-thread-io": Variant("vblk", ring="packed", queues=2, io_mode="thread"),
    "qsd-asked-for-packed": Variant("qsd", ring="packed"),
}
BATCHES = int(os.environ.get("VBLK_E2E_BATCHES", "150"))  # raise for a longer memory-ordering run


async def _wait_for_socket(path: Path, proc: asyncio.subprocess.Process, log: Path) -> None:
    for _ in range(1000):
        if path.is_socket():
            return
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path} never appeared:\n{log.read_text(errors='replace')}")


async def spawn_back_end(
    variant: Variant, image: Path, directory: Path, extra: Sequence[str] = (), log: Path | None = None
) -> tuple[asyncio.subprocess.Process, Path, Path]:
    """A vhost-user-blk back end process serving ``image``, listening: (process, socket, log).
    ``extra``: more arguments for it; ``log``: its output (default: appended to one per kind)."""
    socket_path = directory / "vu.sock"
    log = log or directory / f"{variant.back_end}.log"
    if variant.back_end == "qsd":
        argv = [
            linux.which("qemu-storage-daemon"),
            "--blockdev",
            f"driver=file,node-name=f0,filename={image},discard=unmap",
            "--blockdev",
            "driver=raw,node-name=d0,file=f0,discard=unmap",
            "--export",
            "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,"
            f"addr.path={socket_path},writable=on,num-queues={variant.queues}",
        ]
    else:
        argv = [
            sys.executable,
            "-m",
            "service.cli",
            "vhost-user",
            "--socket",
            str(socket_path),
            "--image",
            str(image),
            "--queues",
            str(variant.queues),
            "--serial",
            "vblk-backend",
            "--io-mode",
            variant.io_mode,
            "--log-format",
            "json",
        ]
    argv.extend(extra)
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=asyncio.subprocess.STDOUT)
    try:
        await _wait_for_socket(socket_path, proc, log)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return proc, socket_path, log


async def terminate(procs: Sequence[asyncio.subprocess.Process]) -> None:
    """SIGTERM whichever of ``procs`` still run, and wait for them."""
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


@contextlib.asynccontextmanager
async def back_end(
    variant: Variant, image: Path, directory: Path, extra: Sequence[str] = ()
) -> AsyncIterator[Path]:
    """A vhost-user-blk back end process serving ``image``; yields its socket."""
    proc, socket_path, log = await spawn_back_end(variant, image, directory, extra)
    try:
        yield socket_path
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, log.read_text(errors="replace")


class Model:
    """The disk as it must read: bytes, and the sectors a discard left undefined."""

    def __init__(self, sectors: int) -> None:
        self.data = bytearray(sectors * SECTOR)
        self.unknown: set[int] = set()

    def set(self, sector: int, data: bytes) -> None:
        self.data[sector * SECTOR : sector * SECTOR + len(data)] = data
        self.unknown.difference_update(range(sector, sector + len(data) // SECTOR))

    def check(self, sector: int, got: bytes) -> None:
        for i in range(len(got) // SECTOR):
            if sector + i in self.unknown:
                continue
            lo = (sector + i) * SECTOR
            assert got[i * SECTOR : (i + 1) * SECTOR] == self.data[lo : lo + SECTOR], f"sector {sector + i}"


async def run_workload(
    blk: VirtioBlk, model: Model, *, seed: int, batches: int, expected_id: str
) -> dict[str, int]:
    """Random batches of concurrent operations, one per region; checks every read."""
    rng = random.Random(seed)
    sectors = len(model.data) // SECTOR
    regions = sectors // REGION
    counts: dict[str, int] = {}
    ops = ["read", "read", "write", "write", "discard", "zero", "zero_unmap", "flush", "get_id"]
    for _ in range(batches):
        coros: list[Coroutine[Any, Any, Any]] = []
        checks: list[tuple[int, bytes | None]] = []
        for region in rng.sample(range(regions), rng.randint(1, 32)):
            op = rng.choice(ops)
            counts[op] = counts.get(op, 0) + 1
            first = region * REGION + rng.randrange(REGION)
            count = rng.randint(1, region * REGION + REGION - first)
            if op == "read":
                coros.append(blk.read(first, count * SECTOR))
                checks.append((first, None))
                continue
            checks.append((-1, None))
            if op == "write":
                data = rng.randbytes(count * SECTOR)
                coros.append(blk.write(first, data))
                model.set(first, data)
            elif op == "discard":
                coros.append(blk.discard(first, count))
                model.unknown.update(range(first, first + count))  # may or may not read as zeroes
            elif op in ("zero", "zero_unmap"):
                coros.append(blk.write_zeroes(first, count, unmap=op == "zero_unmap"))
                model.set(first, bytes(count * SECTOR))
            elif op == "flush":
                coros.append(blk.flush())
            else:
                coros.append(_expect_id(blk, expected_id))
        snapshot = Model(0)
        snapshot.data, snapshot.unknown = bytearray(model.data), set(model.unknown)
        results = await asyncio.gather(*coros)
        for (sector, _), result in zip(checks, results, strict=True):
            if sector >= 0:
                snapshot.check(sector, result)
    return counts


async def _expect_id(blk: VirtioBlk, expected: str) -> None:
    assert await blk.get_id() == expected


@pytest.mark.parametrize("name", list(VARIANTS))
async def test_virtio_blk_workload_over_vhost_user(name: str) -> None:
    variant = VARIANTS[name]
    directory = Path(tempfile.mkdtemp(prefix="vblk-fe-"))
    image = directory / "disk.raw"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    memory = GuestMemory(64 * MiB)
    model = Model(DISK_SIZE // SECTOR)
    try:
        async with back_end(variant, image, directory) as socket_path:
            transport = VhostUserTransport(socket_path, memory, queue_size=variant.queue_size)
            blk = VirtioBlk(
                transport, DmaAllocator(memory), features_mask=variant.features_mask, ring=variant.ring
            )
            await blk.start()
            try:
                assert blk.capacity == DISK_SIZE // SECTOR
                # vblk's back end offers packed rings, qemu-storage-daemon none (the driver falls back).
                packed = variant.ring == "packed" and variant.back_end == "vblk"
                assert blk.has_feature(VIRTIO_F_RING_PACKED) == packed
                assert len(blk.queues) == variant.queues
                assert blk.has_feature(VIRTIO_F_EVENT_IDX) == bool(
                    variant.features_mask >> VIRTIO_F_EVENT_IDX & 1
                )
                expected_id = "vhost_user_blk" if variant.back_end == "qsd" else "vblk-backend"
                assert await blk.get_id() == expected_id
                # One transfer bigger than a request may carry: split into several requests.
                big = os.urandom(3 * MiB)
                await blk.write(2048, big)
                model.set(2048, big)
                model.check(2048, await blk.read(2048, len(big)))
                with pytest.raises(BlkIOError):  # past the end: the device says IOERR, and goes on
                    await blk.read(DISK_SIZE // SECTOR, SECTOR)
                counts = await run_workload(
                    blk, model, seed=len(name), batches=BATCHES, expected_id=expected_id
                )
                model.check(0, await blk.read(0, DISK_SIZE))
                await blk.flush()
                stats = blk.statistics()
                print(
                    f"{name}: {sum(stats.requests.values())} requests {counts}, {stats.kicks} kicks "
                    f"({stats.kicks_suppressed} suppressed), {stats.interrupts} interrupts"
                )
                assert stats.resets == 0 and stats.requests_inflight == 0
                assert all(q.free_descriptors == q.size for q in stats.queues)
                if variant.queues > 1:
                    assert all(q.completed for q in stats.queues), stats.queues
            finally:
                await blk.close()
        model.check(0, image.read_bytes())  # what the back end wrote to the image file
    finally:
        memory.close()
        shutil.rmtree(directory, ignore_errors=True)


async def test_vblk_serve_exports_qemu_device_over_nbd_and_rest() -> None:
    """``vblk serve --backend vhost-user:SOCK``: QEMU's device behind vblk's NBD and REST."""
    config, _ = from_sources({"backend": "vhost-user:/run/qsd.sock", "nbd_listen": ["none"]}, environ={})
    assert config.disks[0].backend == "vhost-user:/run/qsd.sock"

    directory = Path(tempfile.mkdtemp(prefix="vblk-fe-"))
    image = directory / "disk.raw"
    content = os.urandom(8 * MiB)
    image.write_bytes(content)
    nbd_socket = directory / "nbd.sock"
    try:
        async with back_end(Variant("qsd"), image, directory) as socket_path:
            spec = DiskSpec(name="qsd", backend=f"vhost-user:{socket_path}")
            service = Service(
                ServiceConfig(
                    disks=(spec,),
                    guest_memory=64 * MiB,
                    nbd_listen=(f"unix:{nbd_socket}",),
                    http_listen=("127.0.0.1:0",),
                )
            )
            await service.start()
            try:
                await service.start_front_ends()
                disk = service.disks["qsd"]
                assert disk.serial == "vhost_user_blk" and disk.driver.size == len(content)
                uri = f"nbd+unix:///qsd?socket={nbd_socket}"
                copy = directory / "copy.raw"
                await run(linux.which("qemu-img"), "convert", "-f", "raw", "-O", "raw", uri, str(copy))
                assert copy.read_bytes() == content
                await run(linux.which("qemu-io"), "-f", "raw", "-c", "write -P 0xab 1M 64k", uri)
                base = f"http://{service.http_addresses[0]}"
                async with aiohttp.ClientSession() as http:
                    url = f"{base}/v1/disks/qsd"
                    async with http.get(url, headers={"Range": "bytes=1048576-1049087"}) as response:
                        assert response.status == 206
                        assert await response.read() == b"\xab" * 512
                    async with http.put(
                        url, data=b"\xcd" * 4096, headers={"Content-Range": "bytes 0-4095/*"}
                    ) as response:
                        assert response.status < 300, await response.text()
                    async with http.get(f"{url}/extents") as response:
                        assert response.status == 200
            finally:
                await service.stop()
        data = image.read_bytes()  # written by QEMU's block layer, on the daemon's side
        assert data[:4096] == b"\xcd" * 4096
        assert data[MiB : MiB + 64 * 1024] == b"\xab" * 64 * 1024
        assert data[4096:MiB] == content[4096:MiB]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.expect_errors("vhost_user_back_end_gone")
async def test_the_driver_waits_out_a_back_end_restart() -> None:
    """qemu-storage-daemon killed and started again: the driver sees the socket close, resets,
    reconnects when it can, and a request submitted meanwhile completes afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="vblk-fe-"))
    image = directory / "disk.raw"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    memory = GuestMemory(64 * MiB)
    variant = Variant("qsd")
    procs: list[asyncio.subprocess.Process] = []
    try:
        proc, socket_path, _log = await spawn_back_end(variant, image, directory)
        procs.append(proc)
        blk = VirtioBlk(VhostUserTransport(socket_path, memory), DmaAllocator(memory))
        await blk.start()
        try:
            data = os.urandom(64 * 1024)
            await blk.write(100, data)
            proc.kill()
            await proc.wait()
            for _ in range(500):  # the driver notices the closed socket and starts over
                if not blk.ready:
                    break
                await asyncio.sleep(0.01)
            assert not blk.ready
            pending = asyncio.ensure_future(blk.read(100, len(data)))
            await asyncio.sleep(0.3)  # a few failed reconnects
            assert not pending.done()
            proc, _socket, _log = await spawn_back_end(variant, image, directory)
            procs.append(proc)
            assert await asyncio.wait_for(pending, 20) == data
            assert blk.ready and blk.statistics().resets == 1
            await blk.write(0, data)  # and the new session carries on
            assert await blk.read(0, len(data)) == data
        finally:
            await blk.close()
    finally:
        await terminate(procs)
        memory.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.expect_errors("vhost_user_back_end_gone")
@pytest.mark.parametrize("name", ["qsd", "vblk-packed"])
async def test_fio_verify_over_nbd_sees_latency_not_errors_while_the_back_end_restarts(name: str) -> None:
    """``vblk serve --backend vhost-user:SOCK`` under ``fio --ioengine=nbd --verify``, while its
    back end (qemu-storage-daemon; vblk's own, on packed rings) is SIGKILLed and started again
    three times: the requests in flight at each kill go again once it is back, and fio finishes
    with every block verified."""
    directory = Path(tempfile.mkdtemp(prefix="vblk-fe-"))
    image = directory / "disk.raw"
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    nbd_socket = directory / "nbd.sock"
    variant = VARIANTS[name]
    procs: list[asyncio.subprocess.Process] = []
    try:
        proc, socket_path, _log = await spawn_back_end(variant, image, directory)
        procs.append(proc)
        spec = DiskSpec(name="qsd", backend=f"vhost-user:{socket_path}")
        service = Service(
            ServiceConfig(
                disks=(spec,),
                guest_memory=64 * MiB,
                nbd_listen=(f"unix:{nbd_socket}",),
                http_listen=(),
                ring=variant.ring,
            )
        )
        await service.start()
        try:
            await service.start_front_ends()
            blk = service.disks["qsd"].driver
            fio = asyncio.ensure_future(
                run(
                    linux.which("fio"), "--name=verify", "--ioengine=nbd",
                    f"--uri=nbd+unix:///qsd?socket={nbd_socket}", "--rw=randwrite", "--bs=4k",
                    "--size=48M", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1",
                    "--do_verify=1", "--output-format=json",
                    timeout=300,
                )
            )  # fmt: skip
            for _ in range(3):
                await _wait_until(lambda: blk.statistics().requests_inflight > 0, "fio's requests", 30)
                await asyncio.sleep(0.2)
                assert not fio.done(), (await fio).stdout
                proc.kill()
                await proc.wait()
                await _wait_until(lambda: not blk.ready, "the driver to see the daemon gone")
                await asyncio.sleep(0.2)  # requests wait meanwhile
                proc, _socket, _log = await spawn_back_end(variant, image, directory)
                procs.append(proc)
                await _wait_until(lambda: blk.ready, "the driver to reconnect", 30)
            result = await fio
            job = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
            assert job["error"] == 0, job
            assert job["write"]["io_bytes"] == 48 * MiB and job["read"]["io_bytes"] == 48 * MiB, job
            stats = blk.statistics()
            assert stats.resets == 3 and stats.resubmitted > 0, stats
            assert not [key for key in stats.requests if key[1] != "ok"], stats.requests
            assert blk.has_feature(VIRTIO_F_RING_PACKED) == (variant.ring == "packed")
            print(f"{name}: fio verify across 3 back-end restarts, {stats.resubmitted} requests resubmitted")
        finally:
            await service.stop()
    finally:
        await terminate(procs)
        shutil.rmtree(directory, ignore_errors=True)


async def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


async def _curl_json(http_socket: Path, method: str, path: str, body: object | None = None) -> Any:
    """``curl --unix-socket``, the answer's JSON and status (``{"status": ..., "body": ...}``)."""
    data = ["-H", "Content-Type: application/json", "-d", json.dumps(body)] if body is not None else []
    out = await run(
        linux.which("curl"), "-sS", "--max-time", "30", "--unix-socket", str(http_socket), "-X", method,
        *data, "-w", "\n%{http_code}", f"http://vblk{path}",
    )  # fmt: skip
    text, _, status = out.stdout.rpartition("\n")
    return {"status": int(status), "body": json.loads(text)}


async def test_a_resize_on_vblk_s_back_end_reaches_vblk_serve_on_the_back_end_channel() -> None:
    """``vblk vhost-user --http`` resized with curl while ``vblk serve --disk
    backend=vhost-user:SOCK`` drives its device: the back end tells vblk's driver on the
    back-end channel (asking for an answer: REPLY_ACK is negotiated), the driver rereads the
    config and tells its capacity listeners, then answers; REST and new NBD connections see
    the new size, and the new sectors take writes."""
    directory = Path(tempfile.mkdtemp(prefix="vblk-fe-"))
    image = directory / "disk.raw"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    nbd_socket = directory / "nbd.sock"
    http_socket = directory / "ctl.sock"
    grown = 2 * DISK_SIZE
    try:
        async with back_end(
            Variant("vblk"), image, directory, ["--http", f"unix:{http_socket}"]
        ) as socket_path:
            spec = DiskSpec(name="vu", backend=f"vhost-user:{socket_path}")
            service = Service(
                ServiceConfig(
                    disks=(spec,),
                    guest_memory=64 * MiB,
                    nbd_listen=(f"unix:{nbd_socket}",),
                    http_listen=("127.0.0.1:0",),
                )
            )
            await service.start()
            try:
                await service.start_front_ends()
                driver = service.disks["vu"].driver
                seen: list[int] = []
                driver.capacity_listeners.append(seen.append)
                before = await _curl_json(http_socket, "GET", "/v1/disks/disk0")
                assert before["body"]["size"] == DISK_SIZE and before["body"]["vhost_user"]["backend_channel"]
                refused = await _curl_json(
                    http_socket, "PATCH", "/v1/disks/disk0", {"op": "resize", "size": "8M"}
                )
                assert refused["status"] == 409 and refused["body"]["error"] == "resize_refused", refused
                answer = await _curl_json(
                    http_socket, "PATCH", "/v1/disks/disk0", {"op": "resize", "size": f"{grown >> 20}M"}
                )
                assert answer["status"] == 200, answer
                assert answer["body"]["size"] == grown
                assert answer["body"]["resize"]["notice"] == "acknowledged", (
                    answer
                )  # answered, after GET_CONFIG
                assert seen == [grown // SECTOR] and driver.size == grown  # before the answer came back
                base = f"http://{service.http_addresses[0]}"
                async with aiohttp.ClientSession() as http, http.get(f"{base}/v1/disks/vu/info") as response:
                    assert (await response.json())["size"] == grown
                uri = f"nbd+unix:///vu?socket={nbd_socket}"
                info = await run(linux.which("qemu-img"), "info", "--output=json", "-f", "raw", uri)
                assert json.loads(info.stdout)["virtual-size"] == grown  # a new NBD connection
                tail = f"{grown - 64 * 1024}"
                await run(linux.which("qemu-io"), "-f", "raw", "-c", f"write -P 0x77 {tail} 64k", uri)
            finally:
                await service.stop()
        data = image.read_bytes()
        assert len(data) == grown and data[grown - 64 * 1024 :] == b"\x77" * 64 * 1024
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _qmp(path: Path, *commands: dict[str, Any]) -> list[dict[str, Any]]:
    """QMP's answers to ``commands`` (after qmp_capabilities), events skipped."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        await asyncio.wait_for(reader.readline(), 10)  # the greeting
        answers = []
        for command in ({"execute": "qmp_capabilities"}, *commands):
            writer.write(json.dumps(command).encode() + b"\n")
            await writer.drain()
            while True:
                message = json.loads(await asyncio.wait_for(reader.readline(), 10))
                if "return" in message or "error" in message:
                    answers.append(message)
                    break
        return answers[1:]
    finally:
        writer.close()
        await writer.wait_closed()


async def test_qemu_storage_daemon_block_resize_and_the_back_end_channel() -> None:
    """qemu-storage-daemon's export takes vblk's back-end channel (libvhost-user acknowledges
    SET_BACKEND_REQ_FD). Whether a QMP ``block_resize`` is told on it depends on the version:
    the export sends BACKEND_CONFIG_CHANGE_MSG from QEMU 8.1 on (vu_blk_exp_resize, 2023);
    7.2 (Debian 12's) resizes the image and tells no one, so the driver keeps the old size."""
    directory = Path(tempfile.mkdtemp(prefix="vblk-fe-"))
    image = directory / "disk.raw"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    qmp_socket = directory / "qmp.sock"
    qsd = linux.which("qemu-storage-daemon")
    version = await run(qsd, "--version")
    major, minor = (int(n) for n in re.findall(r"version (\d+)\.(\d+)", version.stdout)[0])
    tells = (major, minor) >= (8, 1)
    monitor = ["--chardev", f"socket,path={qmp_socket},server=on,wait=off,id=m0", "--monitor", "chardev=m0"]
    memory = GuestMemory(64 * MiB)
    try:
        async with back_end(Variant("qsd"), image, directory, monitor) as socket_path:
            transport = VhostUserTransport(socket_path, memory)
            blk = VirtioBlk(transport, DmaAllocator(memory))
            seen: list[int] = []
            blk.capacity_listeners.append(seen.append)
            await blk.start()
            try:
                assert transport.backend_channel  # negotiated, and acknowledged by libvhost-user
                [answer] = await _qmp(
                    qmp_socket,
                    {"execute": "block_resize", "arguments": {"node-name": "d0", "size": 2 * DISK_SIZE}},
                )
                assert answer == {"return": {}}, answer
                assert image.stat().st_size == 2 * DISK_SIZE
                if tells:
                    await _wait_until(
                        lambda: seen == [2 * DISK_SIZE // SECTOR], "the driver to see the new size"
                    )
                else:
                    await asyncio.sleep(1)
                    assert transport.config_changes == 0 and seen == [] and blk.size == DISK_SIZE
                await blk.write(0, b"\x01" * SECTOR)  # and the device goes on serving
            finally:
                await blk.close()
    finally:
        memory.close()
        shutil.rmtree(directory, ignore_errors=True)


async def test_a_vhost_user_disk_added_and_removed_live(tmp_path: Path) -> None:
    """POST /v1/disks with ``backend=vhost-user:SOCK`` connects to a running back end (vblk's own
    ``vhost-user``) as at start; DELETE lets it go, and the back end takes the next front end."""
    image = tmp_path / "vu.raw"
    image.write_bytes(b"\0" * (8 * MiB))
    nbd_socket = tmp_path / "nbd.sock"
    async with back_end(Variant("vblk"), image, tmp_path) as socket_path:
        service = Service(
            ServiceConfig(
                disks=(DiskSpec(name="disk0", backend="memory", size=4 * MiB),),
                guest_memory=64 * MiB,
                nbd_listen=(f"unix:{nbd_socket}",),
                http_listen=("127.0.0.1:0",),
            )
        )
        await service.start()
        try:
            await service.start_front_ends()
            base = f"http://{service.http_addresses[0]}/v1/disks"
            async with aiohttp.ClientSession() as http:
                for pattern in (0x11, 0x22):  # twice: the back end is free again after a removal
                    body = {"name": "vu", "backend": f"vhost-user:{socket_path}"}
                    async with http.post(base, json=body) as response:
                        assert response.status == 201, await response.text()
                        assert (await response.json())["serial"] == "vblk-backend"
                    uri = f"nbd+unix:///vu?socket={nbd_socket}"
                    await run(linux.which("qemu-io"), "-f", "raw", "-c", f"write -P {pattern} 0 64k", uri)
                    driver = service.disks["vu"].driver
                    async with http.delete(f"{base}/vu") as response:
                        assert response.status == 200, await response.text()
                        outcome = await response.json()
                    assert outcome["flushed"] is True and outcome["surprise_removal"] is False
                    assert "vu" not in service.disks and driver not in service.guest.disks
                    assert image.read_bytes()[:4] == bytes([pattern]) * 4
        finally:
            await service.stop()
