"""Fixtures for the end-to-end tests: a bootable Linux guest (built once per session) and an
in-process vblk service exporting a raw image file over NBD on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from service.app import Service
from service.model import DiskSpec, ServiceConfig
from tests.e2e import linux

MiB = 1 << 20
DISK_SIZE = 64 * MiB
PAYLOAD_SIZE = 8 * MiB


@dataclasses.dataclass(frozen=True)
class GuestKit:
    guest: linux.Guest
    payload_sha256: str
    directory: Path


@pytest.fixture(scope="session")
def guest_kit() -> Iterator[GuestKit]:
    """Kernel image and initramfs, built once; a missing tool fails here (never a skip)."""
    linux.check_host_tools()
    directory = Path(tempfile.mkdtemp(prefix="vblk-e2e-"))
    try:
        kernel = linux.find_kernel()
        payload = os.urandom(PAYLOAD_SIZE)
        initrd = directory / "initramfs.cpio"
        initrd.write_bytes(linux.build_initramfs(kernel, payload))
        image = linux.prepare_kernel_image(kernel, directory)
        yield GuestKit(
            linux.Guest(image, kernel.bzimage, initrd), hashlib.sha256(payload).hexdigest(), directory
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclasses.dataclass
class RawRig:
    service: Service
    image: Path
    port: int
    directory: Path

    async def flush(self) -> None:
        await self.service.disks["disk0"].driver.flush()


@pytest.fixture
async def raw_rig() -> AsyncIterator[RawRig]:
    directory = Path(tempfile.mkdtemp(prefix="vblk-e2e-"))
    image = directory / "disk0.img"
    config = ServiceConfig(
        disks=(DiskSpec(name="disk0", backend="file", path=image, size=DISK_SIZE),),
        guest_memory=128 * MiB,
        nbd_listen=("127.0.0.1:0",),
    )
    service = Service(config)
    await service.start()
    await service.start_front_ends()
    port = int(service.nbd_addresses[0].rsplit(":", 1)[1])
    try:
        yield RawRig(service, image, port, directory)
    finally:
        await service.stop()
        shutil.rmtree(directory, ignore_errors=True)
