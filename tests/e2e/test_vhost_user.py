"""vblk's virtio-blk device model as a vhost-user back end for QEMU, under Linux's own driver.

Also the legacy interface: a transitional device (``vhost-user-blk-pci-transitional``)
driven by a Linux booted with ``virtio_pci.force_legacy=1``, which does not negotiate
VIRTIO_F_VERSION_1 and lays its rings out the legacy way.

Debian's kernel boots under QEMU (TCG) with ``-device vhost-user-blk-pci`` whose back end is
vblk: the guest's RAM is a shared memfd that vblk maps, its virtio_blk driver puts requests
in rings vblk's device model pops, kicks and interrupts are eventfds. SeaBIOS starts and
stops the device once before Linux does. The guest formats /dev/vda with ext4, writes a file,
drops its caches, reads it back, runs e2fsck, and then hammers a scratch area with four
processes of small O_DIRECT writes and reads (``VBLK_E2E_STRESS`` rounds, default 2); the
host checks the image with e2fsck and debugfs.

Run with ``VBLK_E2E_STRESS=200`` (or in a loop) for the event-index memory-ordering proof.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from device.blk import BlkConfig
from device.block.file import FileNode
from device.spec.virtio import VIRTIO_F_EVENT_IDX, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1
from device.spec.virtio_blk import RequestType, Status
from device.vhost_user import VhostUserBlk, VhostUserServer
from tests.e2e import linux
from tests.e2e.conftest import DISK_SIZE, GuestKit

STRESS_ROUNDS = int(os.environ.get("VBLK_E2E_STRESS", "2"))
QEMU_CONFIG_LEN = 57  # QEMU 7.2 asks for virtio_blk_config up to write_zeroes_may_unmap


@dataclasses.dataclass
class VhostRig:
    blk: VhostUserBlk
    server: VhostUserServer
    image: Path
    socket: Path
    directory: Path

    async def session_done(self, timeout: float = 10) -> None:
        """Wait until the back end has seen QEMU go away (and flushed)."""
        for _ in range(int(timeout / 0.01)):
            if self.server.sessions_done:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the vhost-user session did not end after QEMU exited")


@contextlib.asynccontextmanager
async def vhost_backend(*, queues: int = 1) -> AsyncIterator[VhostRig]:
    """vblk's back end in this process, on a raw image in a fresh directory."""
    directory = Path(tempfile.mkdtemp(prefix="vblk-vu-"))
    image = directory / "disk.img"
    backend = FileNode.open(image, size=DISK_SIZE)
    blk = VhostUserBlk(backend, BlkConfig(queue_size=128, num_queues=queues, serial="vblk-e2e"))
    server = VhostUserServer(directory / "vu.sock", blk)
    await server.start()
    try:
        yield VhostRig(blk, server, image, directory / "vu.sock", directory)
    finally:
        await server.close()
        await blk.disconnect()
        blk.close()
        backend.close()
        shutil.rmtree(directory, ignore_errors=True)


def _assert_guest_ok(boot: linux.Boot, kit: GuestKit) -> str:
    assert boot.result() == ["ok", kit.payload_sha256], boot.describe()
    assert boot.returncode == 0, boot.describe()
    if STRESS_ROUNDS:
        assert f"stress: {STRESS_ROUNDS} rounds" in boot.serial, boot.describe()
    features = linux.virtio_features(boot)
    assert features is not None, boot.describe()
    return features


def _assert_requests_clean(rig: VhostRig, boot: linux.Boot) -> None:
    device = rig.blk.device
    assert device.stats.needs_reset == 0, boot.describe()
    statuses = {status for (_rtype, status) in device.requests}
    assert statuses == {Status.OK}, f"{device.requests}\n{boot.describe()}"
    by_type = {rtype for (rtype, _status) in device.requests}
    assert {RequestType.IN, RequestType.OUT, RequestType.FLUSH} <= by_type, device.requests


async def test_linux_virtio_blk_on_vblk_vhost_user_back_end(guest_kit: GuestKit) -> None:
    async with vhost_backend() as rig:
        boot = await linux.boot(
            guest_kit.guest,
            serial_log=rig.directory / "serial.log",
            mode="vda",
            qemu_args=linux.vhost_user_blk_args(rig.socket),
            append=f"vblk.stress={STRESS_ROUNDS}",
        )
        print(f"guest boot (vblk vhost-user back end): {boot.seconds:.1f}s with {boot.kernel.name}")
        features = _assert_guest_ok(boot, guest_kit)
        assert features[VIRTIO_F_VERSION_1] == "1", features
        assert features[VIRTIO_F_EVENT_IDX] == "1", features  # notification suppression in use
        await rig.session_done()

        blk = rig.blk
        # QEMU asked for the config once, at realize, with its own length (and took the reply).
        assert blk.config_reads == [(0, QEMU_CONFIG_LEN)]
        # Two start/stop cycles: SeaBIOS, then Linux (which negotiates more, EVENT_IDX too).
        assert len(blk.starts) == 2, blk.starts
        firmware, kernel = blk.starts
        assert firmware.features != kernel.features
        assert kernel.features >> VIRTIO_F_EVENT_IDX & 1 and kernel.features >> VIRTIO_F_VERSION_1 & 1
        assert not kernel.legacy
        assert blk.rings[0].started is False  # stopped by GET_VRING_BASE, then disconnected
        _assert_requests_clean(rig, boot)
        await linux.check_ext4_image(rig.image, guest_kit.payload_sha256, boot.describe())


@pytest.mark.parametrize(
    ("queues", "event_idx"),
    [(1, True), (2, True), (1, False), (2, False)],
    ids=["1q", "2q", "1q-no-event-idx", "2q-no-event-idx"],
)
async def test_linux_on_packed_rings_of_vblk_vhost_user_back_end(
    guest_kit: GuestKit, queues: int, event_idx: bool
) -> None:
    """``packed=on``: Linux's virtio_blk on packed virtqueues served by vblk's back end."""
    async with vhost_backend(queues=queues) as rig:
        boot = await linux.boot(
            guest_kit.guest,
            serial_log=rig.directory / "serial.log",
            mode="vda",
            qemu_args=linux.vhost_user_blk_args(rig.socket, queues=queues, packed=True, event_idx=event_idx),
            append=f"vblk.stress={STRESS_ROUNDS}",
            smp=queues,
        )
        print(f"guest boot (packed rings, {queues} queues, event_idx={event_idx}): {boot.seconds:.1f}s")
        features = _assert_guest_ok(boot, guest_kit)
        assert features[VIRTIO_F_RING_PACKED] == "1", features
        assert features[VIRTIO_F_EVENT_IDX] == ("1" if event_idx else "0"), features
        await rig.session_done()
        kernel = [start for start in rig.blk.starts if start.features >> VIRTIO_F_VERSION_1 & 1]
        assert {start.index for start in kernel if start.packed} == set(range(queues)), rig.blk.starts
        _assert_requests_clean(rig, boot)
        await linux.check_ext4_image(rig.image, guest_kit.payload_sha256, boot.describe())


async def test_vblk_vhost_user_command_two_queues(guest_kit: GuestKit, tmp_path: Path) -> None:
    """``vblk vhost-user`` as QEMU's back end, two queues used by a two-vCPU guest."""
    directory = Path(tempfile.mkdtemp(prefix="vblk-vu-"))  # short: unix socket paths are limited
    socket_path = directory / "vu.sock"
    image = tmp_path / "disk.img"
    log_path = tmp_path / "vblk.log"
    try:
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "service.cli",
                "vhost-user",
                "--socket",
                str(socket_path),
                "--image",
                str(image),
                "--size",
                str(DISK_SIZE),
                "--queues",
                "2",
                "--once",
                "--log-format",
                "json",
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
            )
        try:
            for _ in range(500):
                if socket_path.is_socket() or proc.returncode is not None:
                    break
                await asyncio.sleep(0.01)
            assert socket_path.is_socket(), f"vblk vhost-user did not listen:\n{log_path.read_text()}"
            boot = await linux.boot(
                guest_kit.guest,
                serial_log=tmp_path / "serial.log",
                mode="vda",
                qemu_args=linux.vhost_user_blk_args(socket_path, queues=2),
                append=f"vblk.stress={STRESS_ROUNDS}",
                smp=2,
            )
            print(f"guest boot (vblk vhost-user command, 2 queues, 2 vCPUs): {boot.seconds:.1f}s")
            _assert_guest_ok(boot, guest_kit)
            returncode = await asyncio.wait_for(proc.wait(), 30)  # --once: exits after QEMU
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        output = log_path.read_text()
        assert returncode == 0, output
        events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        started = [e for e in events if e["event"] == "vhost_user_ring_started"]
        stopped = [e for e in events if e["event"] == "vhost_user_ring_stopped"]
        assert {e["ring"] for e in started} == {0, 1}, output
        assert not [e for e in events if e["level"] in ("error", "critical")], output
        print("requests per ring:", {e["ring"]: e["base"] for e in stopped})
        await linux.check_ext4_image(image, guest_kit.payload_sha256, boot.describe())
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_legacy_linux_driver_on_transitional_device(guest_kit: GuestKit) -> None:
    async with vhost_backend() as rig:
        boot = await linux.boot(
            guest_kit.guest,
            serial_log=rig.directory / "serial.log",
            mode="vda",
            qemu_args=linux.vhost_user_blk_args(rig.socket, device="vhost-user-blk-pci-transitional"),
            append=f"virtio_pci.force_legacy=1 vblk.stress={STRESS_ROUNDS}",
        )
        print(f"guest boot (legacy virtio-pci, transitional vblk device): {boot.seconds:.1f}s")
        features = _assert_guest_ok(boot, guest_kit)
        assert features[VIRTIO_F_VERSION_1] == "0", features  # Linux drove the legacy interface
        await rig.session_done()

        firmware, kernel = rig.blk.starts
        assert not firmware.legacy  # SeaBIOS takes the modern interface when there is one
        assert kernel.legacy and not kernel.features >> VIRTIO_F_VERSION_1 & 1
        # One page-aligned block: descriptors, the available ring right after, the used ring
        # on the next 4 KiB boundary (legacy vring_init).
        assert kernel.legacy_layout, kernel
        assert kernel.desc % 4096 == 0 and kernel.used - kernel.desc == 4096  # 128 entries
        _assert_requests_clean(rig, boot)
        await linux.check_ext4_image(rig.image, guest_kit.payload_sha256, boot.describe())


async def _control(http_socket: Path, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
    """curl on the control surface's unix socket: the status and the JSON answer."""
    data = ["-H", "Content-Type: application/json", "-d", json.dumps(body)] if body is not None else []
    proc = await asyncio.create_subprocess_exec(
        linux.which("curl"), "-sS", "--max-time", "30", "--unix-socket", str(http_socket), "-X", method,
        *data, "-w", "\n%{http_code}", f"http://vblk{path}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"curl exited {proc.returncode}: {err.decode()}"
    text, _, status = out.decode().rpartition("\n")
    return int(status), json.loads(text)


async def _serial_line(boot: asyncio.Future[linux.Boot], serial_log: Path, mark: str, timeout: float) -> str:
    """The first line of the guest's console that starts with ``mark``, once it is there."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if serial_log.exists():
            for raw in serial_log.read_text(errors="replace").splitlines():
                line = raw.strip("\r\n\0 ")
                if line.startswith(mark):
                    return line
        if boot.done():
            raise AssertionError(f"the guest ended before {mark!r}:\n{boot.result().describe()}")
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {mark!r} on the console after {timeout:g} s")


async def test_linux_grows_its_mounted_ext4_online_when_vblk_is_resized(
    guest_kit: GuestKit, tmp_path: Path
) -> None:
    """``vblk vhost-user --http`` resized with curl while the guest has ext4 mounted and writes:
    vblk tells QEMU on the back-end channel, QEMU rereads the config (GET_CONFIG) and answers,
    the guest's /sys/block/vda/size changes, resize2fs grows the mounted file system online and
    df shows it; the writes that ran all along read back, and the host's e2fsck is clean."""
    directory = Path(tempfile.mkdtemp(prefix="vblk-vu-"))  # short: unix socket paths are limited
    socket_path, http_socket = directory / "vu.sock", directory / "ctl.sock"
    image = tmp_path / "disk.img"
    log_path = tmp_path / "vblk.log"
    grown = 2 * DISK_SIZE
    try:
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "service.cli", "vhost-user", "--socket", str(socket_path),
                "--image", str(image), "--size", str(DISK_SIZE), "--http", f"unix:{http_socket}",
                "--once", "--log-format", "json",
                stdout=log_file, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        try:
            for _ in range(500):
                if http_socket.is_socket() or proc.returncode is not None:
                    break
                await asyncio.sleep(0.01)
            assert http_socket.is_socket(), f"vblk vhost-user did not listen:\n{log_path.read_text()}"
            serial_log = tmp_path / "serial.log"
            booting = asyncio.ensure_future(
                linux.boot(
                    guest_kit.guest,
                    serial_log=serial_log,
                    mode="resize",
                    qemu_args=linux.vhost_user_blk_args(socket_path),
                )
            )
            try:
                ready = await _serial_line(booting, serial_log, linux.RESIZE_READY, 90)
                assert ready.endswith(f"sectors {DISK_SIZE // 512}"), ready
                status, before = await _control(http_socket, "GET", "/v1/disks/disk0")
                assert status == 200 and before["size"] == DISK_SIZE and before["ready"], before
                assert before["vhost_user"]["backend_channel"], before  # QEMU took BACKEND_REQ
                status, answer = await _control(
                    http_socket, "PATCH", "/v1/disks/disk0", {"op": "resize", "size": f"{grown >> 20}M"}
                )
                assert status == 200 and answer["size"] == grown, answer
                # QEMU answered the notice, after its GET_CONFIG on the main socket.
                assert answer["resize"]["notice"] == "acknowledged", answer
                boot = await booting
            finally:
                if not booting.done():
                    booting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await booting
            print(f"guest boot (resize online): {boot.seconds:.1f}s")
            assert boot.result() == ["ok", guest_kit.payload_sha256], boot.describe()
            [line] = [
                raw.strip("\r\n\0 ") for raw in boot.serial.splitlines() if "vblk-e2e: resize sectors" in raw
            ]
            fields = line.split()
            before_sectors, after_sectors = int(fields[3]), int(fields[4])
            df_before, df_after = int(fields[6]), int(fields[7])
            ready_rounds, grown_rounds, rounds = int(fields[9]), int(fields[10]), int(fields[11])
            print(f"guest: {line}")
            assert (before_sectors, after_sectors) == (DISK_SIZE // 512, grown // 512), line
            assert df_after > 1.9 * df_before, line  # the mounted file system grew with the disk
            assert grown_rounds > ready_rounds and rounds >= grown_rounds, line  # writes went on meanwhile
            returncode = await asyncio.wait_for(proc.wait(), 30)  # --once: exits after QEMU
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        output = log_path.read_text()
        assert returncode == 0, output
        events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        assert not [e for e in events if e["level"] in ("error", "critical")], output
        [call] = [e for e in events if e["event"] == "control_call"]
        assert (call["op"], call["old_size"], call["size"], call["notice"]) == (
            "resize",
            DISK_SIZE,
            grown,
            "acknowledged",
        )
        assert call["token"] == "none" and isinstance(call["pid"], int)  # who asked
        assert image.stat().st_size == grown
        await linux.check_ext4_image(image, guest_kit.payload_sha256, boot.describe())
        dump = await asyncio.create_subprocess_exec(
            linux.which("dumpe2fs"),
            "-h",
            str(image),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        header, _ = await asyncio.wait_for(dump.communicate(), 60)
        facts = dict(re.findall(r"^([A-Za-z ]+):\s+(\S+)", header.decode(), re.MULTILINE))
        assert int(facts["Block count"]) * int(facts["Block size"]) == grown, facts
    finally:
        shutil.rmtree(directory, ignore_errors=True)
