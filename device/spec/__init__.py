"""The specifications, as code: constants and layouts of PCI, VIRTIO 1.2 and virtio-blk, and the
sans-I/O vhost-user message codec.

Shared by the device model and the guest driver: pure definitions and codecs, no device state.
"""
