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
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from device.blk import BlkConfig, VirtioBlkDevice, plug_blk
from device.block.node import BlockNode
from device.block.sched import batch_thread
from device.block.throttle import LIMIT_KEYS
from device.machine import HotplugError, Machine
from device.memory import GuestMemory
from device.virtio_pci import VirtioPciFunction
from driver.blk import VirtioBlk
from driver.guest import Guest
from driver.pciehp import PciehpError
from driver.transport import TransportError
from service import systemd
from service.addresses import join_host_port
from service.blockio import ByteDisk, StackControl
from service.config import ConfigError, disk_of_table
from service.http.api import build_app
from service.metrics import Metrics, allocator, compiled
from service.model import Disk, DiskError, DiskSpec, ServiceConfig, StartupError, describe_error
from service.nbd.server import NbdServer
from service.nbd.settings import NbdExport, NbdTls
from service.security import SecurityConfigError, Tokens
from service.snapshots import Snapshots
from service.state import Limits, RuntimeState
from service.storage import open_stack
from service.throttling import Throttled, Throttling
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
        self.machine = Machine(self.memory, hotplug_ports=config.hotplug_slots)
        self.guest = Guest(self.machine)
        self.disks: dict[str, Disk] = {}
        self._devices: list[tuple[DiskSpec, VirtioBlkDevice]] = []
        self.hotplugged: dict[str, int] = {}  # disks added at run time: their hot-plug slot
        self._control = asyncio.Lock()  # one disk added or removed at a time
        self.nbd: NbdServer | None = None
        self.nbd_exports: dict[str, NbdExport] = {}  # the NBD server's, live: views come and go
        self.views = Views(self.machine, self.guest, self.disks, self.nbd_exports)
        self.snapshots = Snapshots()
        self.throttling = Throttling()
        self.state = RuntimeState(config.state_dir)  # disks added and changed at run time, kept
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
        state = self.state
        state.load()
        state.forget_missing({spec.name: spec for spec in self.config.disks})
        specs = [state.configured(spec) for spec in self.config.disks]
        for spec in specs:
            if vhost_user_socket(spec.backend) is not None:
                continue  # started below, after the local devices
            node = await self._open(spec)
            blk_config = _blk_config(spec)
            self._devices.append((spec, plug_blk(self.machine, node, blk_config)))
        drivers = await self.guest.probe(ring=self.config.ring)
        for (spec, device), driver in zip(self._devices, drivers, strict=True):
            await self._ready(spec, device, driver)
        for spec, device in self._devices:
            self._throttle(spec, device)
        for spec in specs:
            socket_path = vhost_user_socket(spec.backend)
            if socket_path is None:
                continue
            try:
                await self._ready_remote(spec, await self._connect(spec, socket_path))
            except DiskError as exc:
                raise StartupError("disk_open_failed", exc.message) from exc
        for name, options in state.added():  # hot-plugged again, as they were added
            kept = f"disk {name} (added at run time, kept in {state.path})"
            try:
                await self._add(disk_of_table(options, self.config.disk_template))
            except (ConfigError, DiskError) as exc:
                raise StartupError(
                    "disk_open_failed",
                    f"{kept}: {exc}; remove it from the state file, or restore its storage",
                ) from exc
            log.info("disk_restored", disk=name, path=str(state.path))

    async def _open(self, spec: DiskSpec, *, threaded: bool = False) -> BlockNode:
        """A local disk's block stack, as its spec says (with the layers ``wrap_stack`` adds);
        ``threaded``: opened off the event loop, which goes on serving the other disks."""
        try:
            if spec.backend == "rbd" or threaded:  # connecting to a cluster blocks (up to its timeout)
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
        return node

    async def _ready(self, spec: DiskSpec, device: VirtioBlkDevice, driver: VirtioBlk) -> Disk:
        """A local disk's driver bound: the disk the front ends serve."""
        return await self._serve(
            spec,
            device,
            driver,
            StackControl(device.node, device),
            pci=driver.name,
            block_size=driver.block_size,
            read_only=driver.read_only,
            backend=spec.backend,
            path=str(spec.path) if spec.backend == "file" else None,
            format=spec.format if spec.backend == "file" else None,
        )

    async def _serve(
        self,
        spec: DiskSpec,
        device: VirtioBlkDevice | RemoteDevice,
        driver: VirtioBlk,
        control: StackControl | RemoteControl,
        /,
        **facts: object,  # for the log line (``device`` among them: positional-only above)
    ) -> Disk:
        """A bound driver made a disk: its metrics observer, its serial, its port; logged."""
        driver.observer = self.metrics.virtio_observer(spec.name)
        serial = await driver.get_id()
        disk = self.disks[spec.name] = Disk(
            spec, device, driver, serial, ByteDisk(spec.name, driver, control)
        )
        log.info("disk_ready", disk=spec.name, serial=serial, size=driver.size, **facts)
        return disk

    def _throttle(self, spec: DiskSpec, device: VirtioBlkDevice) -> None:
        if spec.throttle or spec.throttle_group:
            member = self.throttling.attach(spec.name, device, dict(spec.throttle), spec.throttle_group)
            log.info("disk_throttled", disk=spec.name, group=member.group.name, **member.group.limits.keys())

    async def _connect(self, spec: DiskSpec, socket_path: Path) -> VirtioBlk:
        try:
            return await start_vhost_user_driver(
                socket_path,
                self.memory,
                self.guest.dma,
                num_queues=spec.num_queues,
                queue_size=spec.queue_size,
                ring=self.config.ring,
            )
        except (OSError, TransportError) as exc:  # the back end is not there, or says no
            message = f"disk {spec.name}: vhost-user back end at {socket_path}: {describe_error(exc)}"
            raise DiskError("disk_open_failed", message) from exc

    async def _ready_remote(self, spec: DiskSpec, driver: VirtioBlk) -> Disk:
        self.guest.disks.append(driver)  # closed with the guest's own
        return await self._serve(spec, RemoteDevice(), driver, RemoteControl(driver), device=driver.name)

    def _export(self, disk: Disk) -> None:
        """A disk added while NBD is served: exported at once (at start, the server gets them all)."""
        if self.nbd is not None:
            self.nbd_exports[disk.spec.name] = _nbd_export(disk)

    # -- disks at run time ------------------------------------------------------------------------

    async def add_disk(self, spec: DiskSpec, options: dict[str, object] | None = None) -> Disk:
        """Open ``spec``'s storage, hot-plug a virtio-blk function for it into a free PCIe slot
        (the guest's pciehp binds the driver, probing it as at boot), and serve it on every
        front end. :class:`DiskError` says why not; nothing is left behind then. ``options``
        (the keys ``spec`` was made of) are kept in the state file, to add it again at start."""
        async with self._control:
            if self.stopping:
                raise DiskError("unavailable", "vblk is stopping")
            disk = await self._add(spec)
            kept = dict(options if options is not None else {"name": spec.name})
            if spec.backend == "file":  # the state outlives the working directory
                kept["image"] = str(spec.path.absolute())
            self.state.entry(spec.name).added = kept
            await self.state.save()
            return disk

    async def _add(self, spec: DiskSpec) -> Disk:
        if spec.name in self.disks:
            raise DiskError("disk_exists", f"a disk or view is already named {spec.name}")
        self._check_group(spec)
        socket_path = vhost_user_socket(spec.backend)
        if socket_path is not None:
            disk = await self._ready_remote(spec, await self._connect(spec, socket_path))
        else:
            disk = await self._hotplug(spec)
        self._export(disk)
        return disk

    def _check_group(self, spec: DiskSpec) -> None:
        group = spec.throttle_group or spec.name
        current = self.throttling.group_limits(group)
        if spec.throttle and current and current != dict(spec.throttle):
            raise DiskError(
                "disk_refused",
                f"throttle group {group} has other limits ({current}): leave the limits out to join it, "
                "or change the group's with PATCH op throttle",
            )

    async def _hotplug(self, spec: DiskSpec) -> Disk:
        try:
            node = await self._open(spec, threaded=True)
        except StartupError as exc:
            raise DiskError("disk_open_failed", exc.message) from exc
        device = VirtioBlkDevice(self.memory, node, _blk_config(spec))
        try:
            slot = self.machine.hotplug(VirtioPciFunction(device))
        except HotplugError as exc:
            device.close()
            node.close()
            raise DiskError(
                "disk_refused", f"{exc} (vblk has {self.config.hotplug_slots}: --hotplug-slots)"
            ) from exc
        try:
            driver = await asyncio.wait_for(self.guest.hotplug.arrived(slot), HOTPLUG_TIMEOUT)
        except (PciehpError, TimeoutError) as exc:
            await self._pull(slot)
            device.close()
            node.close()
            reason = str(exc) or "the guest did not bind it in time"
            raise DiskError("disk_open_failed", f"disk {spec.name}: hot-plug failed: {reason}") from exc
        self._devices.append((spec, device))
        self.hotplugged[spec.name] = slot
        disk = await self._ready(spec, device, driver)
        self._throttle(spec, device)
        log.info("disk_hotplugged", disk=spec.name, slot=slot, pci=driver.name)
        return disk

    async def remove_disk(self, name: str) -> dict[str, object]:
        """Stop new requests to disk ``name``, let those in flight finish (``drain_timeout``),
        flush, end its NBD connections (ESHUTDOWN), unplug its function and release everything
        it held; other disks go on untouched. What happened, for the answer."""
        async with self._control:
            disk = self.disks.get(name)
            if disk is None:
                raise DiskError("no_such_disk", f"no disk is named {name}: GET /v1/disks lists them")
            if name in self.views.views:
                raise DiskError("disk_refused", f"{name} is a view: DELETE its view route stops it")
            self._refuse_views(name)
            remote = not isinstance(disk.device, VirtioBlkDevice)
            slot = self.hotplugged.get(name)
            if slot is None and not remote:
                raise DiskError(
                    "disk_refused",
                    f"disk {name} was configured at start: it sits on PCI bus 0, which has no hot-plug "
                    "slots (QEMU's pcie.0 neither); take it out of the configuration and restart",
                )
            async with disk.bytes.control_lock:
                self._refuse_committing(name)
                outcome = await self._remove(disk, slot)
            self.state.disks.pop(name, None)
            await self.state.save()
            return outcome

    def _refuse_views(self, name: str) -> None:
        """A disk with point-in-time views keeps its device and its size until they stop."""
        views = self.views.of(name)
        if views:
            names = ", ".join(v.name for v in views)
            raise DiskError("disk_refused", f"disk {name} has views ({names}): stop them first")

    def _refuse_committing(self, name: str) -> None:
        if name in self.snapshots.committing:
            raise DiskError("disk_refused", f"disk {name} is committing its overlay: wait for it")

    async def _remove(self, disk: Disk, slot: int | None) -> dict[str, object]:
        name = disk.spec.name
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout
        # No new request reaches it: it leaves the tables every front end looks it up in.
        self.nbd_exports.pop(name, None)
        del self.disks[name]
        if isinstance(disk.device, VirtioBlkDevice):
            self.throttling.detach(name, disk.device)  # requests held at its gate go on now
        connections = 0
        if self.nbd is not None:
            connections = await self.nbd.close_export(name, max(0.0, deadline - loop.time()))
        driver = disk.driver
        while driver.statistics().requests_inflight and loop.time() < deadline:
            await asyncio.sleep(0.005)
        abandoned = driver.statistics().requests_inflight
        flushed = False
        if not driver.read_only and driver.ready:
            try:
                await asyncio.wait_for(driver.flush(), max(0.05, deadline - loop.time()))
                flushed = True
            except (OSError, TimeoutError) as exc:
                log.warning("disk_remove_flush_failed", disk=name, error=str(exc) or type(exc).__name__)
        surprise = False
        if slot is None:
            await self.guest.unbind(driver)
        else:
            surprise = not await self._unplug(slot)
            self.hotplugged.pop(name, None)
            for index, (spec, device) in enumerate(self._devices):
                if spec.name == name:
                    del self._devices[index]
                    device.close()
                    device.node.close()
                    break
        self.metrics.forget(name)
        self.snapshots.tops.pop(name, None)
        outcome: dict[str, object] = {
            "name": name,
            "nbd_connections_closed": connections,
            "requests_abandoned": abandoned,
            "flushed": flushed,
            "surprise_removal": surprise,
        }
        log.info("disk_removed", disk=name, slot=slot, **outcome)
        return outcome

    async def resize_disk(self, name: str, size: int, *, shrink: bool = False) -> dict[str, object]:
        """Grow (or with ``shrink``, shrink) disk ``name``'s storage to ``size`` bytes between two
        requests, and raise the device's configuration-change interrupt; returns once the driver
        has reread the capacity. NBD clients connected before keep the size they were told."""
        disk = self.disks.get(name)
        if disk is None:
            raise DiskError("no_such_disk", f"no disk is named {name}: GET /v1/disks lists them")
        device = disk.device
        if not isinstance(device, VirtioBlkDevice):
            raise DiskError(
                "unsupported", f"disk {name} is a vhost-user back end's: resize it there (its PATCH route)"
            )
        if name in self.views.views:
            raise DiskError("disk_refused", f"{name} is a view: it keeps the size its disk had")
        async with disk.bytes.control_lock:
            self._refuse_views(name)
            self._refuse_committing(name)
            driver = disk.driver
            old = driver.size
            if driver.read_only:
                raise DiskError("read_only", f"disk {name} is read-only: it cannot be resized")
            if size < old and not shrink:
                raise DiskError(
                    "resize_refused",
                    f"{size} bytes is smaller than the disk ({old} bytes): a shrink loses what lies "
                    'past the new end, so it needs "shrink": true',
                )
            if size != old:
                seen = asyncio.get_running_loop().create_future()

                def reread(capacity: int) -> None:
                    if not seen.done():
                        seen.set_result(capacity)

                driver.capacity_listeners.append(reread)
                try:
                    await device.quiesce()
                    try:
                        device.resize(size)
                    except (OSError, ValueError) as exc:
                        raise DiskError("resize_failed", f"disk {name}: {describe_error(exc)}") from exc
                    finally:
                        device.resume()
                    try:
                        await asyncio.wait_for(seen, HOTPLUG_TIMEOUT)
                    except TimeoutError:
                        log.warning("disk_resize_unseen", disk=name, size=size, timeout=HOTPLUG_TIMEOUT)
                finally:
                    driver.capacity_listeners.remove(reread)
            log.info("disk_resized", disk=name, old_size=old, size=driver.size)
            entry = self.state.entry(name)
            if entry.added is not None:
                entry.added["size"] = size
            else:
                if entry.size is None:
                    entry.base_size = self._configured(name).size
                entry.size = size
            await self.state.save()
            return {"old_size": old, "size": driver.size}

    def _configured(self, name: str) -> DiskSpec:
        return next(spec for spec in self.config.disks if spec.name == name)

    async def throttle_disk(self, name: str, device: Throttled, changes: dict[str, object]) -> dict[str, Any]:
        """PATCH op ``throttle``: the limits of disk ``name``'s group changed (or the disk moved
        to another group), in force at once and kept for every member of the group.
        :class:`~service.throttling.ThrottleError` if the changes are not limits QEMU takes."""
        answer = self.throttling.change(name, device, changes)
        for member in {name, *answer.get("members", ())}:
            self._keep_limits(member, self.throttling.spec_of(member))
        await self.state.save()
        return answer

    def _keep_limits(self, name: str, limits: tuple[Limits, str]) -> None:
        entry = self.state.entry(name)
        if entry.added is not None:
            options = entry.added
            for key in list(options):
                if key.replace("_", "-") in LIMIT_KEYS or key == "group":
                    del options[key]
            keys, group = limits
            options.update(keys)
            if group:
                options["group"] = group
            return
        if entry.limits is None:
            spec = self._configured(name)
            entry.base_limits = (spec.throttle, spec.throttle_group)
        entry.limits = limits

    async def _unplug(self, slot: int) -> bool:
        """The attention button pressed and the guest's release awaited (it unbinds the driver
        and powers the slot off); True, or False when it did not answer in time and the card
        was pulled unannounced."""
        released = self.machine.request_unplug(slot)
        try:
            await asyncio.wait_for(asyncio.shield(released), HOTPLUG_TIMEOUT)
            await asyncio.wait_for(self.guest.hotplug.removed(slot), HOTPLUG_TIMEOUT)
            return True
        except TimeoutError:
            released.cancel()
            await self._pull(slot)
            log.warning("disk_unplug_forced", slot=slot, timeout=HOTPLUG_TIMEOUT)
            return False

    async def _pull(self, slot: int) -> None:
        """The card in ``slot`` (if one is still there) pulled unannounced, and the guest's
        driver given its time to let go of it."""
        if self.machine.hotplug_card(slot) is not None:
            self.machine.surprise_unplug(slot)
        with contextlib.suppress(PciehpError, TimeoutError):
            await asyncio.wait_for(self.guest.hotplug.removed(slot), HOTPLUG_TIMEOUT)

    async def start_front_ends(self, inherited: dict[str, list[socket.socket]] | None = None) -> None:
        """Open the listeners; sockets ``inherited`` from systemd replace their front end's own."""
        inherited = inherited or {}
        nbd_listen = () if "nbd" in inherited else self.config.nbd_listen
        http_listen = () if "http" in inherited else self.config.http_listen
        if nbd_listen or "nbd" in inherited:
            exports = self.nbd_exports
            for disk in self.disks.values():
                exports[disk.spec.name] = _nbd_export(disk)
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
        self.state.close()  # last: another vblk may keep the state directory now
        log.info("stopped")


HOTPLUG_TIMEOUT = 5.0  # seconds the guest has to bind a hot-plugged card, or to release one


def _nbd_export(disk: Disk) -> NbdExport:
    return NbdExport(disk.bytes, f"vblk virtio-blk disk {disk.spec.name}")


def _blk_config(spec: DiskSpec) -> BlkConfig:
    return BlkConfig(
        serial=spec.name[:20],
        num_queues=spec.num_queues,
        queue_size=spec.queue_size,
        read_only=spec.read_only,
        io_mode=spec.io_mode,
    )


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
