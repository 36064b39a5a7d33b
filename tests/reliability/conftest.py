"""Fixtures for reliability tests: a service whose disks can be made to fail on demand."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import AsyncIterator

import pytest

from device.block.faults import FaultLayer, FaultPlan
from device.block.node import BlockNode
from service.app import Service
from service.model import DiskSpec, ServiceConfig
from service.nbd.settings import NbdLimits

MiB = 1 << 20


@dataclasses.dataclass
class FaultRig:
    service: Service
    plan: FaultPlan
    socket: str
    http: str

    def uri(self, export: str = "disk0") -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"

    @property
    def base_url(self) -> str:
        return f"http://{self.http}"


async def make_fault_rig(
    directory: str, *, limits: NbdLimits | None = None, io_mode: str = "inline", queue_size: int = 256
) -> FaultRig:
    plan = FaultPlan()

    def wrap(spec: DiskSpec, backend: BlockNode) -> BlockNode:
        return FaultLayer(backend, plan) if spec.name == "disk0" else backend

    config = ServiceConfig(
        disks=(
            DiskSpec(
                name="disk0",
                backend="memory",
                size=64 * MiB,
                io_mode="thread" if io_mode == "thread" else "inline",
                queue_size=queue_size,
            ),
        ),
        guest_memory=256 * MiB,
        nbd_listen=(f"unix:{directory}/nbd.sock",),
        http_listen=("127.0.0.1:0",),
        nbd_limits=limits or NbdLimits(),
    )
    service = Service(config, wrap_stack=wrap)
    await service.start()
    await service.start_front_ends()
    return FaultRig(service, plan, f"{directory}/nbd.sock", service.http_addresses[0])


@pytest.fixture
async def fault_rig() -> AsyncIterator[FaultRig]:
    directory = tempfile.mkdtemp(prefix="vblk-")
    rig = await make_fault_rig(directory)
    try:
        yield rig
    finally:
        await rig.service.stop()
        shutil.rmtree(directory, ignore_errors=True)
