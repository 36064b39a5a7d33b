"""The composition root: builds the machine (RAM, PCI bus, virtio-blk devices), boots the guest
driver, wires the front ends, and owns the lifecycle (start, serve until signalled, drain, stop).

Service layer, top of the stack: it only builds and wires (what is served is :mod:`service.model`,
how storage opens is :mod:`service.storage`); nothing imports it but the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import stat
from collections.abc import AsyncIterator, Callable

import structlog
from aiohttp import web

from device.blk import BlkConfig, VirtioBlkDevice, plug_blk
from device.block.node import BlockNode
from device.block.sched import batch_thread
from device.machine import Machine
from device.memory import GuestMemory
from driver.guest import Guest
from driver.transport import TransportError
from service import systemd
from service.addresses import join_host_port
from service.blockio import ByteDisk, StackControl
from service.http.api import build_app
from service.metrics import Metrics, allocator, compiled
from service.model import Disk, DiskSpec, ServiceConfig, StartupError, describe_error
from service.nbd.server import NbdServer
from service.nbd.settings import NbdExport, NbdTls
from service.security import SecurityConfigError, Tokens
from service.snapshots import Snapshots
from service.storage import open_stack
from service.throttling import Throttling
from service.vhost_user_disk import (
    RemoteControl,
    RemoteDevice,
    start_vhost_user_driver,
    vhost_user_socket,
)
from service.views import Views

log = structlog.get_logger("vblk.service")


class Service:
    """The device model and the guest driver for every configured disk."""

    def __init__(
        self, config: ServiceConfig, *, wrap_stack: Callable[[DiskSpec, BlockNode], BlockNode] | None = None
    ) -> None:
        """``wrap_stack`` may put layers over each disk's stack (fault injection, tracing)."""
        self.config = config
        self._wrap_stack = wrap_stack
        self.memory = GuestMemory(config.guest_memory)
        self.machine = Machine(self.memory)
        self.guest = Guest(self.machine)
        self.disks: dict[str, Disk] = {}
        self._devices: list[tuple[DiskSpec, VirtioBlkDevice]] = []
        self.nbd: NbdServer | None = None
        self.nbd_exports: dict[str, NbdExport] = {}  # the NBD server's, live: views come and go
        self.views = Views(self.machine, self.guest, self.disks, self.nbd_exports)
        self.snapshots = Snapshots()
        self.throttling = Throttling()
        self.nbd_addresses: list[str] = []
        self.http: web.AppRunner | None = None
        self.http_addresses: list[str] = []
        self._unix_sockets: list[tuple[str, int]] = []  # (path, inode) of the ones bound here
        self.stopping = False
        self.metrics = Metrics(lambda: self.disks, self._nbd_counts, lambda: self.throttling)
        security = config.security
        self.ssl_context = security.context()
        self.tokens = Tokens.load(security.tokens_file) if security.tokens_file is not None else None
        # With an RBD disk the event loop thread runs SCHED_BATCH (device.block.rbd.batch_thread):
        # it and librbd's threads hand every request back and forth, and as batch threads none of
        # them preempts another on wake-up, so each takes what has queued up. This switches it back.
        self._restore_sched: Callable[[], None] | None = None

    def _nbd_counts(self) -> tuple[int, int, int, int, int]:
        nbd = self.nbd
        if nbd is None:
            return 0, 0, 0, 0, 0
        return nbd.connections, nbd.connections_total, nbd.refused_total, nbd.polls.hits, nbd.polls.misses

    async def start(self) -> None:
        for spec in self.config.disks:
            if vhost_user_socket(spec.backend) is not None:
                continue  # started below, after the local devices
            try:
                if spec.backend == "rbd":  # connecting to a cluster blocks (up to its timeout)
                    node = await asyncio.to_thread(open_stack, spec)
                else:
                    node = open_stack(spec)
            except (OSError, ValueError) as exc:  # BlockError included: a sentence already
                message = f"disk {spec.name}: {describe_error(exc)}"
                code = exc.errno if isinstance(exc, OSError) else None
                raise StartupError("disk_open_failed", message, code) from exc
            if spec.backend == "rbd" and self._restore_sched is None:
                self._restore_sched = batch_thread()
                if self._restore_sched is not None:
                    log.info("event_loop_sched_batch", reason="rbd disk")
            if self._wrap_stack is not None:
                node = self._wrap_stack(spec, node)
            blk_config = BlkConfig(
                serial=spec.name[:20],
                num_queues=spec.num_queues,
                queue_size=spec.queue_size,
                read_only=spec.read_only,
                io_mode=spec.io_mode,
            )
            self._devices.append((spec, plug_blk(self.machine, node, blk_config)))
        drivers = await self.guest.probe()
        for (spec, device), driver in zip(self._devices, drivers, strict=True):
            driver.observer = self.metrics.virtio_observer(spec.name)
            serial = await driver.get_id()
            byte_disk = ByteDisk(spec.name, driver, StackControl(device.node, device))
            self.disks[spec.name] = Disk(spec, device, driver, serial, byte_disk)
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
                format=spec.format if spec.backend == "file" else None,
            )
        for spec, device in self._devices:
            if spec.throttle or spec.throttle_group:
                member = self.throttling.attach(spec.name, device, dict(spec.throttle), spec.throttle_group)
                log.info(
                    "disk_throttled", disk=spec.name, group=member.group.name, **member.group.limits.keys()
                )
        for spec in self.config.disks:
            socket_path = vhost_user_socket(spec.backend)
            if socket_path is None:
                continue
            try:
                driver = await start_vhost_user_driver(
                    socket_path,
                    self.memory,
                    self.guest.dma,
                    num_queues=spec.num_queues,
                    queue_size=spec.queue_size,
                )
            except (OSError, TransportError) as exc:  # the back end is not there, or says no
                message = f"disk {spec.name}: vhost-user back end at {socket_path}: {describe_error(exc)}"
                raise StartupError("disk_open_failed", message) from exc
            self.guest.disks.append(driver)  # closed with the guest's own
            driver.observer = self.metrics.virtio_observer(spec.name)
            serial = await driver.get_id()
            byte_disk = ByteDisk(spec.name, driver, RemoteControl(driver))
            self.disks[spec.name] = Disk(spec, RemoteDevice(), driver, serial, byte_disk)
            log.info("disk_ready", disk=spec.name, device=driver.name, serial=serial, size=driver.size)

    async def start_front_ends(self, inherited: dict[str, list[socket.socket]] | None = None) -> None:
        """Open the listeners; sockets ``inherited`` from systemd replace their front end's own."""
        inherited = inherited or {}
        nbd_listen = () if "nbd" in inherited else self.config.nbd_listen
        http_listen = () if "http" in inherited else self.config.http_listen
        if nbd_listen or "nbd" in inherited:
            exports = self.nbd_exports
            exports.update(
                (name, NbdExport(disk.bytes, f"vblk virtio-blk disk {name}"))
                for name, disk in self.disks.items()
            )
            metrics = self.metrics
            self.nbd = NbdServer(
                exports,
                on_request=metrics.frontend_observer("nbd"),
                limits=self.config.nbd_limits,
                tls=(
                    NbdTls(self.config.security.tls, self.ssl_context)
                    if self.config.security.tls != "off" and self.ssl_context is not None
                    else None
                ),
            )
            for sock in inherited.get("nbd", []):
                await self.nbd.listen_socket(sock)
                self.nbd_addresses.append(systemd.describe(sock))
            for address in nbd_listen:
                async with _listening("NBD", address):
                    if address.startswith("unix:"):
                        await self.nbd.listen_unix(address[5:])
                        self._bound_unix(address[5:])
                        self.nbd_addresses.append(address)
                    else:
                        host, port = _split_address(address)
                        for bound_host, bound_port in await self.nbd.listen_tcp(host, port):
                            self.nbd_addresses.append(join_host_port(bound_host, bound_port))
            log.info("nbd_listening", addresses=self.nbd_addresses, exports=list(exports))
        if http_listen or "http" in inherited:
            self.http = web.AppRunner(
                build_app(self), access_log=None, shutdown_timeout=self.config.drain_timeout
            )
            await self.http.setup()
            https = self.ssl_context if self.config.security.http_tls else None
            for sock in inherited.get("http", []):
                await web.SockSite(self.http, sock, ssl_context=https).start()
                if sock.family == socket.AF_UNIX:
                    self.http_addresses.append(systemd.describe(sock))
            for address in http_listen:
                site: web.BaseSite
                if address.startswith("unix:"):
                    site = web.UnixSite(self.http, address[5:], ssl_context=https)
                else:
                    host, port = _split_address(address)
                    site = web.TCPSite(self.http, host, port, reuse_address=True, ssl_context=https)
                async with _listening("HTTP", address):
                    await site.start()
                if address.startswith("unix:"):
                    self._bound_unix(address[5:])
                    self.http_addresses.append(address)
            for name in self.http.addresses:
                if isinstance(name, tuple):
                    self.http_addresses.append(join_host_port(name[0], name[1]))
            log.info("http_listening", addresses=self.http_addresses)
        security = self.config.security
        for front_end, addresses, protected in (
            ("nbd", self.nbd_addresses, security.tls == "require"),
            ("http", self.http_addresses, security.http_tls or security.tokens_file is not None),
        ):
            for address in addresses:
                host = address.rpartition(":")[0].strip("[]")
                if address.startswith("unix:") or host in ("127.0.0.1", "::1", "localhost") or protected:
                    continue
                log.warning(
                    "listening_beyond_loopback_unprotected",
                    front_end=front_end,
                    address=address,
                    hint="anyone who can reach it can read and write the disks: use TLS or tokens",
                )

    def _bound_unix(self, path: str) -> None:
        """A unix socket this process made: removed at stop, if it is still the one it made."""
        self._unix_sockets.append((path, os.stat(path).st_ino))

    def _remove_unix_sockets(self) -> None:
        for path, inode in self._unix_sockets:
            with contextlib.suppress(OSError):
                status = os.stat(path)
                if stat.S_ISSOCK(status.st_mode) and status.st_ino == inode:
                    os.unlink(path)
        self._unix_sockets.clear()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), flush every disk, release all."""
        self.stopping = True
        timeout = self.config.drain_timeout
        if self.nbd is not None:
            await self.nbd.close(timeout)
        if self.http is not None:
            await self.http.cleanup()
        self._remove_unix_sockets()
        await self.views.stop_all()
        for disk in self.disks.values():
            if not disk.driver.read_only and disk.driver.ready:
                try:
                    await asyncio.wait_for(disk.driver.flush(), timeout)
                except (OSError, TimeoutError) as exc:
                    log.error("flush_failed", disk=disk.spec.name, error=str(exc) or type(exc).__name__)
            stats = disk.driver.statistics()
            # Every descriptor should be back: anything else is a request lost on the way out.
            log.info(
                "disk_stopped",
                disk=disk.spec.name,
                requests_inflight=stats.requests_inflight,
                free_descriptors=[q.free_descriptors for q in stats.queues],
                queue_sizes=[q.size for q in stats.queues],
            )
        self.throttling.close()
        await self.guest.close()
        for _spec, device in self._devices:
            device.close()
            device.node.close()
        self.memory.close()
        if self._restore_sched is not None:
            self._restore_sched()
            self._restore_sched = None
        log.info("stopped")


@contextlib.asynccontextmanager
async def _listening(front_end: str, address: str) -> AsyncIterator[None]:
    """A listener that cannot be opened is a :class:`StartupError` naming it."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if isinstance(exc, socket.gaierror):  # a host name that does not resolve
            reason = f"{exc.strerror}"
        elif isinstance(exc, OSError) and exc.errno is not None and exc.errno > 0:
            reason = os.strerror(exc.errno)  # uvloop's own text repeats the address as a tuple
        else:
            reason = describe_error(exc)
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            reason += (
                " (a stale socket file? remove it)" if address.startswith("unix:") else " (another server?)"
            )
        raise StartupError("listen_failed", f"{front_end} cannot listen on {address}: {reason}") from exc


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(config: ServiceConfig, stop: asyncio.Event | None = None) -> int:
    """Run until SIGINT/SIGTERM (or ``stop`` is set), then shut down cleanly; the exit status.

    The first signal stops accepting, lets requests in flight finish (``drain_timeout``),
    flushes every disk and returns 0. A second signal exits at once.
    """
    stop = stop or asyncio.Event()
    try:
        inherited = systemd.inherited_sockets()
    except systemd.SocketActivationError as exc:
        log.error("socket_activation_failed", error=str(exc))
        return 2
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            log.warning("second_signal_exit_now", signal=signum.name)
            os._exit(128 + signum)
        log.info("signal", signal=signum.name)
        stop.set()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        service = Service(config)
    except (OSError, ValueError, SecurityConfigError) as exc:  # guest RAM, certificates, tokens
        log.error("startup_failed", error=describe_error(exc))
        return 1
    try:
        async with asyncio.TaskGroup() as group:
            try:
                await service.start()
                await service.start_front_ends(inherited)
            except StartupError as exc:  # one line: what could not start, and why
                log.error(exc.event, error=exc.message, errno=exc.errno)
                return 1
            log.info(
                "running",
                pid=os.getpid(),
                disks=list(service.disks),
                nbd=service.nbd_addresses,
                http=service.http_addresses,
                compiled=compiled(),
                malloc=allocator(),
            )
            systemd.notify(f"READY=1\nSTATUS=serving {len(service.disks)} disk(s)")
            group.create_task(stop.wait(), name="vblk-until-signalled")
        log.info("stopping")
    finally:
        systemd.notify("STOPPING=1")
        await service.stop()
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0
