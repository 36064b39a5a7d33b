"""vblk's guest driver: PCI enumeration, the virtio-pci transport, split virtqueues, VirtioBlk.

Sits above the device model and sees it only through :mod:`device.platform` (PCI config
space, MMIO, guest memory, MSI-X delivery) and the constants of :mod:`device.spec`.
"""
