"""The model: what vblk serves, as configured (disk specs, the service's settings) and as running (disks).

Service layer, the bottom of the top floor: the configuration (:mod:`service.config`) builds these,
the composition root (:mod:`service.app`) wires them, and the front ends read them. It imports no
front end and nothing imports it back in a circle.
"""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

from device.blk import IoMode, VirtioBlkDevice
from device.block.node import BlockError
from device.block.qcow2 import DEFAULT_L2_CACHE
from device.block.rbd import DEFAULT_CACHE
from driver.blk import VirtioBlk
from service.blockio import ByteDisk
from service.nbd.protocol import TlsMode
from service.nbd.settings import NbdLimits
from service.security import SecurityConfigError, server_context
from service.vhost_user_disk import RemoteDevice

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_IMAGE_SIZE = 1 * GiB


class StartupError(Exception):
    """vblk cannot start as configured: an event name and one sentence saying what and why."""

    def __init__(self, event: str, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.event = event
        self.message = message
        self.errno = errno  # of the OSError behind it, if one was


def describe_error(exc: BaseException) -> str:
    """An exception as the end of a sentence: its text without errno numbers or tracebacks."""
    if isinstance(exc, OSError):
        text = exc.strerror or str(exc)
        if exc.filename is not None and not isinstance(exc, BlockError):
            return f"{exc.filename}: {text}"
        return text
    return str(exc) or type(exc).__name__


@dataclasses.dataclass(frozen=True, slots=True)
class CephOptions:
    """How vblk reaches a Ceph cluster, for ``backend="rbd"`` disks."""

    conf: str | None = None  # ceph.conf; None: librados's search ($CEPH_CONF, /etc/ceph/ceph.conf)
    client_id: str = "admin"  # cephx user client.<id>
    keyring: str | None = None  # None: the keyring ceph.conf names
    timeout: float = 30.0  # seconds for connecting and for every mon and OSD operation
    take_over: bool = False  # break a dead owner's exclusive lock (blocklisting it) and serve


@dataclasses.dataclass(frozen=True, slots=True)
class DiskSpec:
    """One exported disk: where its bytes live and how its virtio-blk device looks."""

    name: str = "disk0"
    backend: str = "file"  # "file", "memory", or "vhost-user:SOCKET" (that back end's device)
    path: Path = Path("disk.img")
    size: int = DEFAULT_IMAGE_SIZE  # a new image's (and a memory disk's); an existing image keeps its own...
    size_explicit: bool = False  # ...unless the user named a size: then it must match,
    grow: bool = False  # or, with grow, a smaller image grows to it (never shrinks)
    read_only: bool = False
    force_share: bool = False  # backend "file", read-only: share the image with its writers (QEMU's)
    num_queues: int = 1
    queue_size: int = 256
    io_mode: IoMode = "inline"
    pool: str = "rbd"  # backend "rbd": the pool and image (default: the disk's name)
    rbd_image: str = ""
    create: bool = False  # backend "rbd": create a missing image with ``size``
    cache: str = DEFAULT_CACHE  # backend "rbd": librbd's cache, "none" or "writeback"
    format: str = "raw"  # backend "file": the image's format, "raw" or "qcow2", never guessed
    l2_cache_size: int = DEFAULT_L2_CACHE  # format qcow2: the most bytes of L2 tables cached
    snapshot: str | None = None  # format qcow2, read-only: serve this internal snapshot (id or name)
    fault: str = ""  # a fault layer over the storage (FaultPlan.parse: "read=eio+count=3"); "": none
    throttle: tuple[tuple[str, int], ...] = ()  # I/O limits by their keys (iops-total, ...); (): none
    throttle_group: str = ""  # the throttle group it shares limits in ("": its own, named as the disk)
    ceph: CephOptions = dataclasses.field(default_factory=CephOptions)


@dataclasses.dataclass(frozen=True, slots=True)
class SecurityConfig:
    """TLS for NBD and HTTP, and bearer tokens for the REST API."""

    tls: TlsMode = "off"  # NBD STARTTLS: off, on (offered) or require
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_verify_client: bool = False
    http_tls: bool = False  # HTTPS on the HTTP listeners, with the same certificate
    tokens_file: Path | None = None  # "rw TOKEN" / "ro TOKEN" lines; none: the API is open
    public_paths: tuple[str, ...] = ("/healthz", "/readyz", "/metrics")  # open even with tokens

    def context(self) -> ssl.SSLContext | None:
        if self.tls == "off" and not self.http_tls:
            return None
        if self.tls_cert is None or self.tls_key is None:
            raise SecurityConfigError("TLS needs tls-cert and tls-key")
        return server_context(self.tls_cert, self.tls_key, self.tls_ca, self.tls_verify_client)


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceConfig:
    disks: tuple[DiskSpec, ...] = (DiskSpec(),)
    disk_template: DiskSpec = DiskSpec()  # what a disk added at run time gets unless it says otherwise
    hotplug_slots: int = 8  # PCIe root ports with a hot-plug slot each, for disks added at run time
    state_dir: Path | None = None  # where run-time changes are kept (service.state); None: not kept
    ring: str = "split"  # the virtqueue layout the guest driver asks for: "split" or "packed"
    guest_memory: int = 256 * MiB
    nbd_listen: tuple[str, ...] = ("127.0.0.1:10809",)  # host:port, or unix:PATH; empty: no NBD
    # host:port, or unix:PATH; empty: no HTTP (the CLI's default is 127.0.0.1:8080, see service.config)
    http_listen: tuple[str, ...] = ()
    drain_timeout: float = 10.0  # seconds in-flight requests get to finish on stop
    nbd_limits: NbdLimits = dataclasses.field(default_factory=NbdLimits)
    security: SecurityConfig = dataclasses.field(default_factory=SecurityConfig)


@dataclasses.dataclass(slots=True)
class Disk:
    """A disk as the front ends see it: its name and the driver to send requests through."""

    spec: DiskSpec
    device: VirtioBlkDevice | RemoteDevice
    driver: VirtioBlk
    serial: str
    bytes: ByteDisk


class DiskError(Exception):
    """A disk cannot be added, removed or resized as asked: a kind (the REST error code:
    ``disk_exists``, ``no_such_disk``, ``disk_refused``, ``disk_open_failed``, ``resize_refused``,
    ``resize_failed``, ``read_only``, ``unsupported``, ``unavailable``) and a sentence."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
