"""What every connection of an NBD server shares: its exports, its limits, TLS, and its state.

Service layer, NBD front end, under :mod:`service.nbd.server` (which owns one) and
:mod:`service.nbd.connection` (which reads it for every request).
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Mapping, Sequence
from typing import Final

from service.blockio import ByteDisk
from service.latency import FrontendObserver
from service.nbd import protocol as p
from service.nbd.constants import BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH, QEMU_DIRTY_BITMAP


@dataclasses.dataclass(frozen=True, slots=True)
class NbdTls:
    """TLS for NBD (NBD_OPT_STARTTLS): ``on`` offers it, ``require`` refuses everything else first."""

    mode: p.TlsMode
    context: ssl.SSLContext
    handshake_timeout: float = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class NbdLimits:
    """What one client may hold of the server; every limit protects the others."""

    max_connections: int = 4096  # beyond: the connection is closed at once, before the greeting
    negotiation_timeout: float = 30.0  # seconds from accept to the end of the option haggling
    idle_timeout: float = 600.0  # seconds without a request while nothing is in flight; 0: never
    send_timeout: float = 60.0  # seconds a reply may wait for a client that does not read
    max_inflight: int = 128  # requests per connection before the server stops reading more
    max_inflight_bytes: int = 64 << 20  # READ and WRITE payload bytes per connection in flight
    # Microseconds of busy polling for the next request after answering a client that has
    # nothing left in flight (QEMU's poll-max-ns): a queue-depth-1 client finds the server
    # awake instead of paying a wake-up per request. 0: never poll.
    poll_us: float = 50.0


_PLAIN_CONTEXTS: Final = (BASE_ALLOCATION,)
_CHAIN_CONTEXTS: Final = (BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH)


@dataclasses.dataclass(slots=True)
class NbdExport:
    """One disk as NBD sees it: byte-addressed I/O through its virtqueues, and a description."""

    disk: ByteDisk
    description: str = ""
    _described: p.Export | None = dataclasses.field(default=None, repr=False)
    _generation: int = dataclasses.field(default=0, repr=False)

    @property
    def name(self) -> str:
        return self.disk.name

    def describe(self) -> p.Export:
        """The export as the codec sees it; rebuilt only when the disk's size or its set of
        bitmaps changes."""
        disk = self.disk
        cached = self._described
        dirty = disk.dirty
        generation = dirty.generation if dirty is not None else 0
        if cached is not None and cached.size == disk.size and self._generation == generation:
            return cached
        contexts: tuple[str, ...] = _CHAIN_CONTEXTS if disk.has_chain else _PLAIN_CONTEXTS
        if dirty is not None:
            contexts += tuple(
                QEMU_DIRTY_BITMAP + bitmap.name
                for bitmap in dirty.bitmaps.values()
                if not bitmap.inconsistent
            )
        self._generation = generation
        self._described = described = p.Export(
            name=self.name,
            size=disk.size,
            description=self.description,
            read_only=disk.read_only,
            meta_contexts=contexts,
        )
        return described


class Catalog:
    def __init__(self, exports: Mapping[str, NbdExport], default: str | None) -> None:
        self._exports = exports
        self._default = default

    def lookup(self, name: str) -> p.Export | None:
        export = self._exports.get(name or (self._default or ""))
        return export.describe() if export is not None else None

    def exports(self) -> Sequence[p.Export]:
        return [export.describe() for export in self._exports.values()]


class ServerState:
    """The server as each of its connections sees it (read on every request: a plain object)."""

    def __init__(
        self,
        exports: Mapping[str, NbdExport],
        default_export: str | None,
        limits: NbdLimits,
        tls: NbdTls | None,
        on_request: FrontendObserver | None,
    ) -> None:
        self.exports = exports
        self.catalog = Catalog(exports, default_export)
        self.limits = limits
        self.tls = tls
        self.on_request = on_request
        self.closing = False  # new requests are answered ESHUTDOWN
