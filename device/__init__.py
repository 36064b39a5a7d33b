"""vblk's hardware: guest memory, a PCI bus, virtio-pci functions and virtio-blk devices.

The bottom of the stack. The guest driver (package ``driver``) reaches this package only
through the platform interface in :mod:`device.platform` and the spec constants in
:mod:`device.spec`; everything else here is device implementation.
"""
