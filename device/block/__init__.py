"""The block layer: stacks of nodes under the virtio-blk device (storage at the bottom, layers above)."""
