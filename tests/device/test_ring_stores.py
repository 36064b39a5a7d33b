"""Ring fields another CPU reads concurrently are stored whole (device.platform.store_u16).

``struct.pack_into`` clears its destination before writing, so another process reading an
index while it is rewritten can see 0: that is what this test would catch for store_u16,
with one process rewriting a shared 16-bit field and this one reading it the way the
virtqueues do.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

from device.platform import memory_barrier, store_u16

_U16 = struct.Struct("<H")


def test_store_u16_writes_little_endian_in_place() -> None:
    buf = memoryview(bytearray(8))
    store_u16(buf, 2, 0x1234)
    store_u16(buf, 6, 0xFFFF)
    assert bytes(buf) == b"\x00\x00\x34\x12\x00\x00\xff\xff"
    memory_barrier()  # callable, no effect on data


def test_a_concurrent_reader_never_sees_a_torn_or_cleared_index() -> None:
    fd = os.memfd_create("vblk-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, mmap.PAGESIZE)
    shared = mmap.mmap(fd, mmap.PAGESIZE)
    view = memoryview(shared)
    try:
        store_u16(view, 2, 0x00FF)
        pid = os.fork()
        if pid == 0:  # the writer: 0x00FF <-> 0x0100 (a cleared or torn value is 0 or 0x01FF)
            try:
                deadline = time.monotonic() + 0.6
                while time.monotonic() < deadline:
                    for _ in range(2000):
                        store_u16(view, 2, 0x0100)
                        store_u16(view, 2, 0x00FF)
            finally:
                os._exit(0)
        seen: dict[int, int] = {}
        deadline = time.monotonic() + 0.5
        unpack = _U16.unpack_from
        while time.monotonic() < deadline:
            for _ in range(2000):
                value = unpack(shared, 2)[0]
                seen[value] = seen.get(value, 0) + 1
        os.waitpid(pid, 0)
        assert set(seen) <= {0x00FF, 0x0100}, {hex(k): n for k, n in seen.items()}
        assert seen.get(0x0100) and seen.get(0x00FF)  # the writer really ran meanwhile
    finally:
        view.release()
        shared.close()
        os.close(fd)
