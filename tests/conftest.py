"""Shared fixtures: a machine with virtio-blk disks and the guest driver bound to them."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvloop

from device.blk import BlkConfig, VirtioBlkDevice, plug_blk
from device.block.memory import MemoryNode
from device.block.node import BlockNode
from device.machine import Machine
from device.memory import GuestMemory
from driver.blk import VirtioBlk
from driver.guest import Guest
from tests.build import REPO, stale_sources

MiB = 1 << 20
pytest_plugins = ["tests.guard", "pytester"]
#: The virtqueue layout :func:`make_rig`'s driver asks for unless told: a module's ``ring``
#: fixture runs its tests on both.
RING = ["split"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test old compiled code: a module edited since ``make`` compiled it."""
    stale = stale_sources()
    if stale:
        names = ", ".join(str(path.relative_to(REPO)) for path in stale)
        pytest.exit(f"{names} changed since they were compiled: run `make venv`", returncode=2)


@dataclasses.dataclass
class Rig:
    """A booted guest: RAM, machine, one device with its block stack, and the driver for it."""

    memory: GuestMemory
    machine: Machine
    backend: BlockNode
    device: VirtioBlkDevice
    guest: Guest
    disk: VirtioBlk

    async def close(self) -> None:
        await self.guest.close()
        self.device.close()


async def make_rig(
    *,
    disk_size: int = 4 * MiB,
    memory_size: int = 64 * MiB,
    config: BlkConfig | None = None,
    backend: BlockNode | None = None,
    **driver_options: Any,
) -> Rig:
    memory = GuestMemory(memory_size)
    machine = Machine(memory)
    backend = backend if backend is not None else MemoryNode(disk_size)
    device = plug_blk(machine, backend, config or BlkConfig())
    guest = Guest(machine)
    driver_options.setdefault("ring", RING[0])
    [disk] = await guest.probe(**driver_options)
    assert device.packed == (driver_options["ring"] == "packed"), (
        "the ring layout asked for is not the one in use"
    )
    return Rig(memory, machine, backend, device, guest, disk)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Async tests run on uvloop, the loop vblk serves on."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(params=["split", "packed"])
def ring(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test on split rings, then on packed ones (VIRTIO_F_RING_PACKED): modules that want
    both use it (``pytestmark = pytest.mark.usefixtures("ring")``)."""
    RING[0] = request.param
    try:
        yield request.param
    finally:
        RING[0] = "split"


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = await make_rig()
    try:
        yield r
    finally:
        await r.close()
