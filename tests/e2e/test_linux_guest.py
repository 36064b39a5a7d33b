"""vblk against a real Linux kernel: Debian's kernel boots under QEMU (TCG), formats a vblk disk
with ext4, writes a file, drops its caches, reads the file back; the host then checks the image
with e2fsck and reads the file with debugfs.

Two paths into vblk: the guest kernel's own NBD driver (nbd-client over virtio-net, QEMU user
networking forwarding one address to vblk on loopback), and QEMU's NBD block driver behind a
virtio-blk disk.
"""

from __future__ import annotations

import asyncio
import hashlib

from tests.e2e import linux
from tests.e2e.conftest import GuestKit, RawRig


async def _check_image(rig: RawRig, kit: GuestKit, boot: linux.Boot) -> None:
    await rig.flush()
    fsck = await asyncio.create_subprocess_exec(
        linux.which("e2fsck"),
        "-fn",
        str(rig.image),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    fsck_out, _ = await asyncio.wait_for(fsck.communicate(), 60)
    assert fsck.returncode == 0, (
        f"e2fsck -fn exited {fsck.returncode}:\n{fsck_out.decode()}\n{boot.describe()}"
    )

    debugfs = await asyncio.create_subprocess_exec(
        linux.which("debugfs"),
        "-R",
        f"cat {linux.PAYLOAD_PATH}",
        str(rig.image),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    data, err = await asyncio.wait_for(debugfs.communicate(), 60)
    assert debugfs.returncode == 0, err.decode()
    assert hashlib.sha256(data).hexdigest() == kit.payload_sha256, (
        f"debugfs read {len(data)} bytes with another checksum: {err.decode()}"
    )


def _assert_guest_ok(boot: linux.Boot, kit: GuestKit) -> None:
    assert boot.result() == ["ok", kit.payload_sha256], boot.describe()
    assert boot.returncode == 0, boot.describe()


async def test_guest_nbd_client_over_virtio_net(guest_kit: GuestKit, raw_rig: RawRig) -> None:
    boot = await linux.boot(
        guest_kit.guest,
        serial_log=raw_rig.directory / "serial-nbd.log",
        mode="nbd",
        qemu_args=linux.nbd_forward_args(raw_rig.port),
    )
    print(f"guest boot (nbd-client over virtio-net): {boot.seconds:.1f}s with {boot.kernel.name}")
    _assert_guest_ok(boot, guest_kit)
    await _check_image(raw_rig, guest_kit, boot)


async def test_qemu_nbd_drive_as_guest_virtio_blk(guest_kit: GuestKit, raw_rig: RawRig) -> None:
    boot = await linux.boot(
        guest_kit.guest,
        serial_log=raw_rig.directory / "serial-vda.log",
        mode="vda",
        qemu_args=linux.nbd_drive_args(raw_rig.port),
    )
    print(f"guest boot (QEMU NBD drive as virtio-blk): {boot.seconds:.1f}s with {boot.kernel.name}")
    _assert_guest_ok(boot, guest_kit)
    await _check_image(raw_rig, guest_kit, boot)
