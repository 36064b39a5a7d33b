"""A transitional device serves legacy drivers (no VIRTIO_F_VERSION_1) instead of refusing them."""

from __future__ import annotations

import pytest

from device.blk import BlkConfig, VirtioBlkDevice
from device.block.memory import MemoryNode
from device.memory import GuestMemory
from device.spec import virtio_blk as vb
from device.spec.virtio import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
)

MiB = 1 << 20
LEGACY = 1 << vb.VIRTIO_BLK_F_FLUSH | 1 << vb.VIRTIO_BLK_F_BLK_SIZE  # a legacy driver's 32 bits
S = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER


def negotiate(device: VirtioBlkDevice, features: int) -> bool:
    device.reset()
    device.set_driver_features(0, features & 0xFFFFFFFF)
    device.set_driver_features(1, features >> 32)
    device.set_status(S)
    device.set_status(S | VIRTIO_CONFIG_S_FEATURES_OK)
    return bool(device.status & VIRTIO_CONFIG_S_FEATURES_OK)


@pytest.fixture
def memory() -> GuestMemory:
    return GuestMemory(MiB)


def test_a_modern_only_device_refuses_legacy_drivers(memory: GuestMemory) -> None:
    device = VirtioBlkDevice(memory, MemoryNode(MiB), BlkConfig())
    assert not negotiate(device, LEGACY)
    assert negotiate(device, LEGACY | 1 << VIRTIO_F_VERSION_1) and not device.legacy


@pytest.mark.expect_errors("virtio_device_needs_reset")
def test_a_transitional_device_follows_the_legacy_rules(memory: GuestMemory) -> None:
    device = VirtioBlkDevice(memory, MemoryNode(MiB), BlkConfig(transitional=True))
    assert device.device_features >> VIRTIO_F_VERSION_1 & 1  # offered all the same
    assert negotiate(device, LEGACY) and device.legacy
    device.set_status(S | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK)
    assert device.driver_ok
    device.device_error("a broken ring")
    # Legacy devices have no DEVICE_NEEDS_RESET: the device just stops.
    assert not device.status & VIRTIO_CONFIG_S_NEEDS_RESET and not device.driver_ok
    assert negotiate(device, LEGACY | 1 << VIRTIO_F_VERSION_1) and not device.legacy  # modern again
    assert not negotiate(device, LEGACY | 1 << 31)  # still only offered features
