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
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from device.blk import BlkConfig
from device.block.file import FileNode
from device.spec.virtio import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
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
