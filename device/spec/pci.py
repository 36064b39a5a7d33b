"""PCI Local Bus and PCI Express constants: type-0 and type-1 configuration headers, capability
ids, MSI-X layout, the PCI Express capability (link and slot registers for native hot-plug).

Shared spec constants (PCI Local Bus Specification 3.0, PCI-to-PCI Bridge Architecture
Specification 1.2, PCI Express Base Specification 4.0 section 7.5.3), named as Linux's
include/uapi/linux/pci_regs.h names them.
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
PCI_HEADER_TYPE_MASK: Final = 0x7F
PCI_HEADER_TYPE_NORMAL: Final = 0
PCI_HEADER_TYPE_BRIDGE: Final = 1
PCI_HEADER_TYPE_MFD: Final = 0x80  # multi-function device
PCI_BASE_ADDRESS_0: Final = 0x10
PCI_SUBSYSTEM_VENDOR_ID: Final = 0x2C
PCI_SUBSYSTEM_ID: Final = 0x2E
PCI_CAPABILITY_LIST: Final = 0x34
PCI_INTERRUPT_LINE: Final = 0x3C
PCI_INTERRUPT_PIN: Final = 0x3D

# Type 1 (PCI-to-PCI bridge) configuration header offsets (Bridge spec 1.2 section 3.2).
PCI_PRIMARY_BUS: Final = 0x18
PCI_SECONDARY_BUS: Final = 0x19
PCI_SUBORDINATE_BUS: Final = 0x1A
PCI_SEC_LATENCY_TIMER: Final = 0x1B
PCI_IO_BASE: Final = 0x1C
PCI_IO_LIMIT: Final = 0x1D
PCI_SEC_STATUS: Final = 0x1E
PCI_MEMORY_BASE: Final = 0x20
PCI_MEMORY_LIMIT: Final = 0x22
PCI_MEMORY_RANGE_MASK: Final = 0xFFF0  # address bits 31:20 in register bits 15:4
PCI_MEMORY_RANGE_SHIFT: Final = 16  # register << 16 is the address (1 MiB granularity)
PCI_MEMORY_WINDOW_GRANULARITY: Final = 1 << 20
PCI_PREF_MEMORY_BASE: Final = 0x24
PCI_PREF_MEMORY_LIMIT: Final = 0x26
PCI_PREF_BASE_UPPER32: Final = 0x28
PCI_PREF_LIMIT_UPPER32: Final = 0x2C
PCI_IO_BASE_UPPER16: Final = 0x30
PCI_IO_LIMIT_UPPER16: Final = 0x32
PCI_ROM_ADDRESS1: Final = 0x38
PCI_BRIDGE_CONTROL: Final = 0x3E
PCI_BRIDGE_CTL_SERR: Final = 0x02
PCI_BRIDGE_CTL_BUS_RESET: Final = 0x40  # secondary bus reset
PCI_BRIDGE_NUM_BARS: Final = 2

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
PCI_CLASS_BRIDGE_PCI: Final = 0x0604  # PCI-to-PCI bridge (a PCI Express root port is one)

# Vendor and device ids of QEMU's generic PCI Express root port (hw/pci-bridge/gen_pcie_root_port.c).
PCI_VENDOR_ID_REDHAT: Final = 0x1B36
PCI_DEVICE_ID_REDHAT_PCIE_RP: Final = 0x000C

# Capability ids.
PCI_CAP_ID_MSI: Final = 0x05
PCI_CAP_ID_VNDR: Final = 0x09
PCI_CAP_ID_EXP: Final = 0x10  # PCI Express
PCI_CAP_ID_MSIX: Final = 0x11

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

# PCI Express Capability structure (PCIe Base 4.0 section 7.5.3), offsets within it.
PCI_EXP_FLAGS: Final = 0x02  # PCI Express Capabilities register
PCI_EXP_FLAGS_VERS: Final = 0x000F  # capability version
PCI_EXP_FLAGS_TYPE: Final = 0x00F0  # device/port type
PCI_EXP_FLAGS_TYPE_SHIFT: Final = 4
PCI_EXP_FLAGS_SLOT: Final = 0x0100  # Slot Implemented
PCI_EXP_FLAGS_IRQ: Final = 0x3E00  # Interrupt Message Number
PCI_EXP_FLAGS_IRQ_SHIFT: Final = 9
PCI_EXP_TYPE_ENDPOINT: Final = 0x0
PCI_EXP_TYPE_ROOT_PORT: Final = 0x4
PCI_EXP_TYPE_DOWNSTREAM: Final = 0x6
PCI_EXP_DEVCAP: Final = 0x04
PCI_EXP_DEVCAP_RBER: Final = 0x00008000  # Role-Based Error Reporting
PCI_EXP_DEVCTL: Final = 0x08
PCI_EXP_DEVSTA: Final = 0x0A
PCI_EXP_LNKCAP: Final = 0x0C
PCI_EXP_LNKCAP_SLS: Final = 0x0000000F  # Max Link Speed
PCI_EXP_LNKCAP_SLS_2_5GB: Final = 0x1
PCI_EXP_LNKCAP_MLW: Final = 0x000003F0  # Maximum Link Width
PCI_EXP_LNKCAP_MLW_SHIFT: Final = 4
PCI_EXP_LNKCAP_DLLLARC: Final = 0x00100000  # Data Link Layer Link Active Reporting Capable
PCI_EXP_LNKCAP_PN: Final = 0xFF000000  # Port Number
PCI_EXP_LNKCAP_PN_SHIFT: Final = 24
PCI_EXP_LNKCTL: Final = 0x10
PCI_EXP_LNKCTL_LD: Final = 0x0010  # Link Disable
PCI_EXP_LNKSTA: Final = 0x12
PCI_EXP_LNKSTA_CLS: Final = 0x000F  # Current Link Speed
PCI_EXP_LNKSTA_NLW: Final = 0x03F0  # Negotiated Link Width
PCI_EXP_LNKSTA_NLW_SHIFT: Final = 4
PCI_EXP_LNKSTA_LT: Final = 0x0800  # Link Training
PCI_EXP_LNKSTA_DLLLA: Final = 0x2000  # Data Link Layer Link Active
PCI_EXP_SLTCAP: Final = 0x14  # Slot Capabilities
PCI_EXP_SLTCAP_ABP: Final = 0x00000001  # Attention Button Present
PCI_EXP_SLTCAP_PCP: Final = 0x00000002  # Power Controller Present
PCI_EXP_SLTCAP_MRLSP: Final = 0x00000004  # MRL Sensor Present
PCI_EXP_SLTCAP_AIP: Final = 0x00000008  # Attention Indicator Present
PCI_EXP_SLTCAP_PIP: Final = 0x00000010  # Power Indicator Present
PCI_EXP_SLTCAP_HPS: Final = 0x00000020  # Hot-Plug Surprise
PCI_EXP_SLTCAP_HPC: Final = 0x00000040  # Hot-Plug Capable
PCI_EXP_SLTCAP_SPLV: Final = 0x00007F80  # Slot Power Limit Value
PCI_EXP_SLTCAP_SPLS: Final = 0x00018000  # Slot Power Limit Scale
PCI_EXP_SLTCAP_EIP: Final = 0x00020000  # Electromechanical Interlock Present
PCI_EXP_SLTCAP_NCCS: Final = 0x00040000  # No Command Completed Support
PCI_EXP_SLTCAP_PSN: Final = 0xFFF80000  # Physical Slot Number
PCI_EXP_SLTCAP_PSN_SHIFT: Final = 19
PCI_EXP_SLTCTL: Final = 0x18  # Slot Control
PCI_EXP_SLTCTL_ABPE: Final = 0x0001  # Attention Button Pressed Enable
PCI_EXP_SLTCTL_PFDE: Final = 0x0002  # Power Fault Detected Enable
PCI_EXP_SLTCTL_MRLSCE: Final = 0x0004  # MRL Sensor Changed Enable
PCI_EXP_SLTCTL_PDCE: Final = 0x0008  # Presence Detect Changed Enable
PCI_EXP_SLTCTL_CCIE: Final = 0x0010  # Command Completed Interrupt Enable
PCI_EXP_SLTCTL_HPIE: Final = 0x0020  # Hot-Plug Interrupt Enable
PCI_EXP_SLTCTL_AIC: Final = 0x00C0  # Attention Indicator Control
PCI_EXP_SLTCTL_ATTN_IND_ON: Final = 0x0040
PCI_EXP_SLTCTL_ATTN_IND_BLINK: Final = 0x0080
PCI_EXP_SLTCTL_ATTN_IND_OFF: Final = 0x00C0
PCI_EXP_SLTCTL_PIC: Final = 0x0300  # Power Indicator Control
PCI_EXP_SLTCTL_PWR_IND_ON: Final = 0x0100
PCI_EXP_SLTCTL_PWR_IND_BLINK: Final = 0x0200
PCI_EXP_SLTCTL_PWR_IND_OFF: Final = 0x0300
PCI_EXP_SLTCTL_PCC: Final = 0x0400  # Power Controller Control
PCI_EXP_SLTCTL_PWR_ON: Final = 0x0000  # the value of PCC that turns power on
PCI_EXP_SLTCTL_PWR_OFF: Final = 0x0400
PCI_EXP_SLTCTL_EIC: Final = 0x0800  # Electromechanical Interlock Control
PCI_EXP_SLTCTL_DLLSCE: Final = 0x1000  # Data Link Layer State Changed Enable
PCI_EXP_SLTSTA: Final = 0x1A  # Slot Status
PCI_EXP_SLTSTA_ABP: Final = 0x0001  # Attention Button Pressed
PCI_EXP_SLTSTA_PFD: Final = 0x0002  # Power Fault Detected
PCI_EXP_SLTSTA_MRLSC: Final = 0x0004  # MRL Sensor Changed
PCI_EXP_SLTSTA_PDC: Final = 0x0008  # Presence Detect Changed
PCI_EXP_SLTSTA_CC: Final = 0x0010  # Command Completed
PCI_EXP_SLTSTA_MRLSS: Final = 0x0020  # MRL Sensor State
PCI_EXP_SLTSTA_PDS: Final = 0x0040  # Presence Detect State
PCI_EXP_SLTSTA_EIS: Final = 0x0080  # Electromechanical Interlock Status
PCI_EXP_SLTSTA_DLLSC: Final = 0x0100  # Data Link Layer State Changed
PCI_EXP_RTCTL: Final = 0x1C  # Root Control
PCI_EXP_RTCAP: Final = 0x1E  # Root Capabilities
PCI_EXP_RTSTA: Final = 0x20  # Root Status
PCI_EXP_DEVCAP2: Final = 0x24
PCI_EXP_DEVCTL2: Final = 0x28
PCI_EXP_LNKCAP2: Final = 0x2C
PCI_EXP_LNKCTL2: Final = 0x30
PCI_EXP_LNKSTA2: Final = 0x32
PCI_EXP_SLTCAP2: Final = 0x34
PCI_EXP_SLTCTL2: Final = 0x38
PCI_EXP_SLTSTA2: Final = 0x3A
PCI_CAP_EXP_RC_ENDPOINT_SIZEOF_V2: Final = 0x2C  # an integrated endpoint's v2 structure ends here
PCI_CAP_EXP_ENDPOINT_SIZEOF_V2: Final = 0x3C  # the whole v2 structure (a port with a slot)
