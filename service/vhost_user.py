"""``vblk vhost-user``: serve the virtio-blk device model to QEMU over a vhost-user socket.

Service layer, beside :mod:`service.app`. The guest is a real VM: QEMU connects with
``-chardev socket,path=SOCK -device vhost-user-blk-pci,chardev=...`` and its guest's own
virtio-blk driver reaches the disk through :mod:`device.vhost_user`. With ``http`` the disk also
gets a control surface (:mod:`service.vhost_user_control`): its description, and a resize the
guest is told of.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from pathlib import Path

import structlog

from device.blk import BlkConfig, IoMode
from device.vhost_user import DEFAULT_QUEUE_SIZE, VhostUserBlk, VhostUserServer
from service.model import DiskSpec, describe_error
from service.security import SecurityConfigError
from service.storage import open_stack
from service.throttling import Throttling
from service.vhost_user_control import ControlListener

log = structlog.get_logger("vblk.service.vhost_user")


@dataclasses.dataclass(frozen=True, slots=True)
class VhostUserConfig:
    socket: Path
    disk: DiskSpec = dataclasses.field(default_factory=lambda: DiskSpec(queue_size=DEFAULT_QUEUE_SIZE))
    serial: str = "vblk"
    once: bool = False  # exit after the first front end disconnects
    http: str | None = None  # the control surface's address, unix:PATH or HOST:PORT; None: none
    tokens_file: Path | None = None  # bearer tokens the control surface asks for


def blk_config(config: VhostUserConfig) -> BlkConfig:
    spec = config.disk
    return BlkConfig(
        serial=config.serial,
        num_queues=spec.num_queues,
        queue_size=spec.queue_size,
        read_only=spec.read_only,
        io_mode=spec.io_mode,
        transitional=True,
    )


async def serve_vhost_user(
    config: VhostUserConfig, stop: asyncio.Event | None = None, io_mode: IoMode | None = None
) -> int:
    """Serve until SIGINT/SIGTERM (or ``stop``, or the first disconnect with ``once``)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    spec = config.disk if io_mode is None else dataclasses.replace(config.disk, io_mode=io_mode)
    try:
        node = open_stack(spec)
    except (OSError, ValueError) as exc:  # BlockError included: its message is a sentence
        code = exc.errno if isinstance(exc, OSError) else None
        log.error("disk_open_failed", error=describe_error(exc), errno=code)
        _unwatch(loop, signals)
        return 1
    blk = VhostUserBlk(node, blk_config(dataclasses.replace(config, disk=spec)))
    throttling = Throttling()
    if spec.throttle:
        throttling.attach(spec.name, blk.device, dict(spec.throttle), spec.throttle_group)
    server = VhostUserServer(config.socket, blk)
    if config.once:
        server.on_session_end = stop.set
    control: ControlListener | None = None
    try:
        try:
            await server.start()
        except OSError as failed:
            log.error(
                "listen_failed",
                error=f"vhost-user cannot listen on {config.socket}: {failed.strerror or failed}",
            )
            return 1
        if config.http is not None:
            try:
                control = ControlListener(
                    config.http,
                    name=spec.name,
                    spec=spec,
                    blk=blk,
                    socket=config.socket,
                    tokens_file=config.tokens_file,
                )
            except SecurityConfigError as bad:
                log.error("startup_failed", error=str(bad))
                return 1
            try:
                await control.start()
            except (OSError, ValueError) as failed:
                code = failed.errno if isinstance(failed, OSError) else None
                reason = os.strerror(code) if code is not None and code > 0 else str(failed)
                log.error("listen_failed", error=f"HTTP cannot listen on {config.http}: {reason}")
                return 1
        log.info(
            "running",
            pid=os.getpid(),
            socket=str(config.socket),
            disk=spec.name,
            size=node.size,
            image=str(spec.path) if spec.backend == "file" else None,
            queues=spec.num_queues,
            queue_size=spec.queue_size,
            throttle=dict(spec.throttle),
            http=control.addresses if control is not None else [],
        )
        await stop.wait()
        log.info("stopping")
    finally:
        if control is not None:
            await control.close()
        await server.close()
        await blk.disconnect()
        throttling.close()
        blk.close()
        node.close()
        _unwatch(loop, signals)
    return 0


def _unwatch(loop: asyncio.AbstractEventLoop, signals: tuple[signal.Signals, ...]) -> None:
    for sig in signals:
        loop.remove_signal_handler(sig)
