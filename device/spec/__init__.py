"""Constants and layouts from the specifications (PCI, VIRTIO 1.2, virtio-blk).

Shared by the device model and the guest driver: nothing here implements behaviour.
"""
