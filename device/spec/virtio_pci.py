"""Virtio over PCI (VIRTIO 1.2 section 4.1): ids, vendor capability types, register offsets.

Shared spec constants (transport-pci.tex; Linux include/uapi/linux/virtio_pci.h).
"""

import struct
from typing import Final

PCI_VENDOR_ID_REDHAT_QUMRANET: Final = 0x1AF4
VIRTIO_PCI_MODERN_DEVICE_ID_BASE: Final = 0x1040  # + virtio device id
VIRTIO_PCI_SUBSYSTEM_ID: Final = 0x1100  # modern devices SHOULD use >= 0x40
VIRTIO_ID_BLOCK: Final = 2

# 4.1.4 Virtio Structure PCI Capabilities: cfg_type values.
VIRTIO_PCI_CAP_COMMON_CFG: Final = 1
VIRTIO_PCI_CAP_NOTIFY_CFG: Final = 2
VIRTIO_PCI_CAP_ISR_CFG: Final = 3
VIRTIO_PCI_CAP_DEVICE_CFG: Final = 4
VIRTIO_PCI_CAP_PCI_CFG: Final = 5

# struct virtio_pci_cap: cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2], offset, length
VIRTIO_PCI_CAP: Final = struct.Struct("<BBBBBBxxII")
VIRTIO_PCI_CAP_LEN: Final = 16
VIRTIO_PCI_NOTIFY_CAP_LEN: Final = 20  # + le32 notify_off_multiplier
VIRTIO_PCI_CFG_CAP_LEN: Final = 20  # + u8 pci_cfg_data[4]

# Offsets of fields inside a virtio_pci_cap.
VIRTIO_PCI_CAP_CFG_TYPE: Final = 3
VIRTIO_PCI_CAP_BAR: Final = 4
VIRTIO_PCI_CAP_OFFSET: Final = 8
VIRTIO_PCI_CAP_LENGTH: Final = 12
VIRTIO_PCI_NOTIFY_CAP_MULT: Final = 16
VIRTIO_PCI_CFG_CAP_DATA: Final = 16

# 4.1.4.3 struct virtio_pci_common_cfg.
VIRTIO_PCI_COMMON_DFSELECT: Final = 0
VIRTIO_PCI_COMMON_DF: Final = 4
VIRTIO_PCI_COMMON_GFSELECT: Final = 8
VIRTIO_PCI_COMMON_GF: Final = 12
VIRTIO_PCI_COMMON_MSIX: Final = 16
VIRTIO_PCI_COMMON_NUMQ: Final = 18
VIRTIO_PCI_COMMON_STATUS: Final = 20
VIRTIO_PCI_COMMON_CFGGENERATION: Final = 21
VIRTIO_PCI_COMMON_Q_SELECT: Final = 22
VIRTIO_PCI_COMMON_Q_SIZE: Final = 24
VIRTIO_PCI_COMMON_Q_MSIX: Final = 26
VIRTIO_PCI_COMMON_Q_ENABLE: Final = 28
VIRTIO_PCI_COMMON_Q_NOFF: Final = 30
VIRTIO_PCI_COMMON_Q_DESCLO: Final = 32
VIRTIO_PCI_COMMON_Q_DESCHI: Final = 36
VIRTIO_PCI_COMMON_Q_AVAILLO: Final = 40
VIRTIO_PCI_COMMON_Q_AVAILHI: Final = 44
VIRTIO_PCI_COMMON_Q_USEDLO: Final = 48
VIRTIO_PCI_COMMON_Q_USEDHI: Final = 52
VIRTIO_PCI_COMMON_CFG_SIZE: Final = 56

# 4.1.4.5 ISR status bits.
VIRTIO_PCI_ISR_QUEUE: Final = 0x1
VIRTIO_PCI_ISR_CONFIG: Final = 0x2
