"""The vblk process: builds the machine (RAM, PCI bus, virtio-blk devices), boots the guest
driver, and owns the lifecycle (start, serve until signalled, drain, flush, stop).

Service layer, top of the stack; front ends (NBD, REST, metrics) attach to ``Service.disks``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from pathlib import Path

import structlog

from device.backends import Backend
from device.backends.memory import MemoryBackend
from device.backends.raw import RawFileBackend
from device.blk import BlkConfig, IoMode, VirtioBlkDevice, plug_blk
from device.machine import Machine
from device.memory import GuestMemory
from driver.blk import VirtioBlk
from driver.guest import Guest
from service.nbd.server import NbdExport, NbdServer

log = structlog.get_logger("vblk.service")

MiB = 1 << 20
GiB = 1 << 30


@dataclasses.dataclass(frozen=True, slots=True)
class DiskSpec:
    """One exported disk: where its bytes live and how its virtio-blk device looks."""

    name: str = "disk0"
    backend: str = "file"  # "file" or "memory"
    path: Path = Path("disk.img")
    size: int = 1 * GiB
    read_only: bool = False
    num_queues: int = 1
    queue_size: int = 256
    io_mode: IoMode = "inline"


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceConfig:
    disks: tuple[DiskSpec, ...] = (DiskSpec(),)
    guest_memory: int = 256 * MiB
    nbd_listen: tuple[str, ...] = ("127.0.0.1:10809",)  # host:port, or unix:PATH; empty: no NBD


@dataclasses.dataclass(slots=True)
class Disk:
    """A disk as the front ends see it: its name and the driver to send requests through."""

    spec: DiskSpec
    device: VirtioBlkDevice
    driver: VirtioBlk
    serial: str


def open_backend(spec: DiskSpec) -> Backend:
    if spec.backend == "memory":
        return MemoryBackend(spec.size, read_only=spec.read_only)
    if spec.backend == "file":
        spec.path.parent.mkdir(parents=True, exist_ok=True)
        exists = spec.path.exists()
        return RawFileBackend.open(spec.path, size=None if exists else spec.size, read_only=spec.read_only)
    raise ValueError(f"unknown backend {spec.backend!r}")


class Service:
    """The device model and the guest driver for every configured disk."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.memory = GuestMemory(config.guest_memory)
        self.machine = Machine(self.memory)
        self.guest = Guest(self.machine)
        self.disks: dict[str, Disk] = {}
        self._devices: list[tuple[DiskSpec, VirtioBlkDevice]] = []
        self.nbd: NbdServer | None = None
        self.nbd_addresses: list[str] = []

    async def start(self) -> None:
        for spec in self.config.disks:
            backend = open_backend(spec)
            blk_config = BlkConfig(
                serial=spec.name[:20],
                num_queues=spec.num_queues,
                queue_size=spec.queue_size,
                read_only=spec.read_only,
                io_mode=spec.io_mode,
            )
            self._devices.append((spec, plug_blk(self.machine, backend, blk_config)))
        drivers = await self.guest.probe()
        for (spec, device), driver in zip(self._devices, drivers, strict=True):
            serial = await driver.get_id()
            self.disks[spec.name] = Disk(spec, device, driver, serial)
            log.info(
                "disk_ready",
                disk=spec.name,
                pci=driver.name,
                serial=serial,
                size=driver.size,
                block_size=driver.block_size,
                read_only=driver.read_only,
                backend=spec.backend,
                path=str(spec.path) if spec.backend == "file" else None,
            )

    async def start_front_ends(self) -> None:
        if self.config.nbd_listen:
            exports = {
                name: NbdExport(name, disk.driver, disk.device.backend, f"vblk virtio-blk disk {name}")
                for name, disk in self.disks.items()
            }
            self.nbd = NbdServer(exports)
            for address in self.config.nbd_listen:
                if address.startswith("unix:"):
                    await self.nbd.listen_unix(address[5:])
                    self.nbd_addresses.append(address)
                else:
                    host, _, port = address.rpartition(":")
                    for bound_host, bound_port in await self.nbd.listen_tcp(host.strip("[]"), int(port)):
                        self.nbd_addresses.append(f"{bound_host}:{bound_port}")
            log.info("nbd_listening", addresses=self.nbd_addresses, exports=list(exports))

    async def stop(self) -> None:
        """Stop the front ends, flush every writable disk, reset devices, release backends."""
        if self.nbd is not None:
            await self.nbd.close()
        for disk in self.disks.values():
            if not disk.driver.read_only and disk.driver.ready:
                try:
                    await disk.driver.flush()
                except OSError as exc:
                    log.error("flush_failed", disk=disk.spec.name, error=str(exc))
        await self.guest.close()
        for _spec, device in self._devices:
            device.close()
            device.backend.close()
        self.memory.close()
        log.info("stopped")


async def serve(config: ServiceConfig, stop: asyncio.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM (or ``stop`` is set), then shut down cleanly."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service = Service(config)
    try:
        await service.start()
        await service.start_front_ends()
        log.info("running", pid=os.getpid(), disks=list(service.disks), nbd=service.nbd_addresses)
        await stop.wait()
        log.info("stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await service.stop()
