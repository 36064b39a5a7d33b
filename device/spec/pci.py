"""PCI Local Bus constants: type-0 configuration header, capability ids, MSI-X layout.

Shared spec constants (PCI Local Bus Specification 3.0, PCI Express Base Specification).
"""

from typing import Final

# Type 0 configuration space header offsets.
PCI_VENDOR_ID: Final = 0x00
PCI_DEVICE_ID: Final = 0x02
PCI_COMMAND: Final = 0x04
PCI_STATUS: Final = 0x06
PCI_REVISION_ID: Final = 0x08
PCI_CLASS_PROG: Final = 0x09
PCI_CLASS_DEVICE: Final = 0x0A  # subclass @0x0a, base class @0x0b
PCI_HEADER_TYPE: Final = 0x0E
PCI_BASE_ADDRESS_0: Final = 0x10
PCI_SUBSYSTEM_VENDOR_ID: Final = 0x2C
PCI_SUBSYSTEM_ID: Final = 0x2E
PCI_CAPABILITY_LIST: Final = 0x34
PCI_INTERRUPT_LINE: Final = 0x3C
PCI_INTERRUPT_PIN: Final = 0x3D

PCI_CONFIG_SPACE_SIZE: Final = 256
PCI_NUM_BARS: Final = 6
PCI_VENDOR_ID_INVALID: Final = 0xFFFF  # what a read of an empty slot returns

# Command register bits.
PCI_COMMAND_MEMORY: Final = 0x2
PCI_COMMAND_MASTER: Final = 0x4
PCI_COMMAND_INTX_DISABLE: Final = 0x400

# Status register bits.
PCI_STATUS_CAP_LIST: Final = 0x10

# BAR low bits.
PCI_BASE_ADDRESS_SPACE_IO: Final = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_64: Final = 0x4
PCI_BASE_ADDRESS_MEM_PREFETCH: Final = 0x8
PCI_BASE_ADDRESS_MEM_MASK: Final = ~0xF

# Class codes.
PCI_CLASS_STORAGE_SCSI: Final = 0x0100  # base 0x01 mass storage, subclass 0x00 (what QEMU uses)

# Capability ids.
PCI_CAP_ID_MSIX: Final = 0x11
PCI_CAP_ID_VNDR: Final = 0x09

# MSI-X capability (PCI 3.0 section 6.8.2).
PCI_MSIX_FLAGS: Final = 2  # message control, offset within the capability
PCI_MSIX_FLAGS_QSIZE: Final = 0x07FF  # table size - 1
PCI_MSIX_FLAGS_MASKALL: Final = 0x4000
PCI_MSIX_FLAGS_ENABLE: Final = 0x8000
PCI_MSIX_TABLE: Final = 4  # table offset | BIR
PCI_MSIX_PBA: Final = 8  # PBA offset | BIR
PCI_MSIX_BIR_MASK: Final = 0x7
PCI_MSIX_CAP_SIZE: Final = 12

PCI_MSIX_ENTRY_SIZE: Final = 16
PCI_MSIX_ENTRY_LOWER_ADDR: Final = 0
PCI_MSIX_ENTRY_UPPER_ADDR: Final = 4
PCI_MSIX_ENTRY_DATA: Final = 8
PCI_MSIX_ENTRY_VECTOR_CTRL: Final = 12
PCI_MSIX_ENTRY_CTRL_MASKBIT: Final = 0x1

# x86 MSI message address window (the local APIC's).
MSI_ADDRESS_BASE: Final = 0xFEE0_0000
