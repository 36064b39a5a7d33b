"""vblk's virtio-blk device model as a vhost-user back end (QEMU docs/interop/vhost-user.rst).

Device layer, beside :mod:`device.virtio_pci`: another transport for the same
:class:`device.blk.VirtioBlkDevice`, the same device-side virtqueues and the same request
execution. Here the guest is a real one: QEMU (the front end) shares the guest's RAM as
memfd regions received with SCM_RIGHTS, which :class:`~device.vhost_user.regions.RegionMemory`
maps and translates through the memory table; guest kicks arrive on eventfds and interrupts
leave on eventfds.

From the socket in: :mod:`~device.vhost_user.server` (the unix socket, fd passing, one session
at a time), :mod:`~device.vhost_user.protocol` (a session's messages: features, memory table,
ring setup, start and stop), :mod:`~device.vhost_user.rings` (the virtqueues on shared rings,
and the memory-ordering argument), :mod:`~device.vhost_user.regions` (the shared guest RAM).
"""

from device.vhost_user.protocol import DEFAULT_QUEUE_SIZE, VhostUserBlk
from device.vhost_user.server import VhostUserServer

__all__ = ["DEFAULT_QUEUE_SIZE", "VhostUserBlk", "VhostUserServer"]
