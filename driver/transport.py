"""What a virtio device driver needs from its transport, whichever it is.

Driver layer, between VirtioBlk and the buses: :class:`driver.virtio_pci.PciTransport`
(registers of a virtio-pci function on the platform) and
:class:`driver.vhost_user.VhostUserTransport` (messages to a vhost-user back end, rings in
memory shared with it) both implement :class:`VirtioTransport`. The sequence VirtioBlk
follows is VIRTIO 1.2 3.1.1 either way: reset, ACKNOWLEDGE, DRIVER, features,
FEATURES_OK, configuration, queues, DRIVER_OK.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from device.platform import InterruptHandler


class TransportError(Exception):
    """The device does not look usable through this transport, or refused a setting."""


class VirtioTransport(Protocol):
    """One virtio device as its driver reaches it."""

    @property
    def name(self) -> str:
        """For logs: the PCI address, or the vhost-user socket."""
        ...

    @property
    def shared_with_other_cpus(self) -> bool:
        """The device runs concurrently on other CPUs (the rings need memory barriers)."""
        ...

    async def open(self) -> None:
        """Make the device reachable (enable the PCI function, connect the socket)."""
        ...

    async def reset(self) -> None:
        """Reset the device; when this returns it no longer touches the rings or buffers.

        Waits (without blocking the loop) for the device to finish what it had in flight.
        """
        ...

    async def reconnect(self) -> None:
        """Reach the device again if it went away (a vhost-user back end that restarted);
        nothing to do for a device that cannot go away."""
        ...

    @property
    def status(self) -> int: ...

    def add_status(self, bits: int) -> None: ...

    def device_features(self) -> int: ...

    def set_driver_features(self, features: int) -> None: ...

    def features_ok(self) -> bool:
        """Set FEATURES_OK; False means the device refused the feature set."""
        ...

    def read_device_config(self, length: int) -> bytes:
        """The first ``length`` bytes of the device-specific configuration, consistent."""
        ...

    def write_device_config(self, offset: int, size: int, value: int) -> None: ...

    def enable_config_interrupt(self, handler: InterruptHandler) -> None:
        """Call ``handler`` on a configuration change (or when the device needs a reset)."""
        ...

    def queue_max_size(self, index: int) -> int:
        """The largest size queue ``index`` may have; 0 if it does not exist."""
        ...

    def setup_queue(
        self, index: int, size: int, desc: int, avail: int, used: int, handler: InterruptHandler
    ) -> Callable[[], None]:
        """Program a queue's rings (guest-physical addresses) and its interrupt handler;
        returns the function that notifies the device of new buffers."""
        ...

    def release_interrupts(self) -> None:
        """After :meth:`reset`: free every interrupt the queues and config had."""
        ...

    def close(self) -> None: ...
