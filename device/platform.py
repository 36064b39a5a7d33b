"""The platform interface: everything a guest driver may touch, and nothing more.

This is the boundary between :mod:`driver` and the device model: PCI configuration space,
physical MMIO, guest RAM and MSI delivery, expressed as Protocols. The device package
implements them (:mod:`device.machine`); the driver only ever sees these types. Both sides
also share the machinery of the one event loop they run on (its deferred-work queue, memory
barriers, native counters).
"""

from __future__ import annotations

import asyncio
import collections
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Final, Protocol, final

InterruptHandler = Callable[[], None]


class GuestMemoryError(Exception):
    """A guest-physical access fell outside guest RAM."""


class GuestRam(Protocol):
    """Guest RAM as the driver sees it: one region of ``size`` bytes at guest-physical ``base``."""

    @property
    def base(self) -> int: ...

    @property
    def size(self) -> int: ...

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable zero-copy view of ``[gpa, gpa+length)``; raises GuestMemoryError outside RAM."""
        ...

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...

    def discard(self, gpa: int, length: int) -> None:
        """Give the pages of ``[gpa, gpa+length)`` (page aligned) back to the host; they read as
        zeroes when next touched (as a balloon's free page reporting lets the host drop them)."""
        ...


class InterruptController(Protocol):
    """The MSI target (a local APIC): drivers allocate vectors and get the message to program."""

    def allocate_vector(self, handler: InterruptHandler) -> tuple[int, int]:
        """Reserve a vector for ``handler``; returns the MSI (address, data) that raises it."""
        ...

    def free_vector(self, data: int) -> None:
        """Release a vector obtained from :meth:`allocate_vector`."""
        ...


class Platform(Protocol):
    """What a kernel has: PCI config access, physical MMIO, RAM and an interrupt controller."""

    @property
    def memory(self) -> GuestRam: ...

    @property
    def interrupts(self) -> InterruptController: ...

    def pci_config_read(self, device: int, function: int, offset: int, size: int, bus: int = 0) -> int:
        """Read 1, 2 or 4 bytes of a function's configuration space (all ones if absent).

        ``bus`` 0 is the root bus; another number reaches the function through the bridge
        whose secondary bus it is (a configuration cycle no bridge claims reads all ones).
        """
        ...

    def pci_config_write(
        self, device: int, function: int, offset: int, size: int, value: int, bus: int = 0
    ) -> None: ...

    def mmio_read(self, address: int, size: int) -> int:
        """Read 1, 2, 4 or 8 bytes at a physical address inside a decoded BAR (all ones if none)."""
        ...

    def mmio_write(self, address: int, size: int, value: int) -> None: ...


_FENCE: Final = threading.Lock()
_SWAP: Final = sys.byteorder != "little"


def store_u16(buffer: memoryview, offset: int, value: int) -> None:
    """Store a little-endian 16-bit ring field with a single 2-byte write (Linux WRITE_ONCE).

    For fields another CPU may read at any moment (ring indices, event indices, flags).
    ``struct.pack_into`` will not do: it clears the destination before it writes the value,
    so a concurrent reader can see 0 in between (an index that jumps back to 0, which a
    driver or device takes for a corrupted ring). A memoryview cast to ``H`` stores with one
    2-byte memcpy: one instruction, single-copy atomic when aligned (x86; virtio ring fields
    are naturally aligned). Loads need nothing: ``struct``'s little-endian ``H`` reads with a
    single 2-byte memcpy on little-endian hosts.
    """
    store_u16_word(buffer[offset : offset + 2].cast("H"), 0, value)


def store_u16_word(words: memoryview, offset: int, value: int) -> None:
    """:func:`store_u16` through a view already cast to ``H`` (``offset`` in bytes, even).

    For a ring its owner stores to on every request: no view is made per store.
    """
    if _SWAP:
        value = ((value & 0xFF) << 8) | (value >> 8)
    words[offset >> 1] = value


def memory_barrier() -> None:
    """A full memory barrier (Linux ``mb()``): every store before it is visible to other CPUs
    before any load after it is performed.

    Needed only when another process shares the rings (vhost-user), and only between a
    store and a later load (event index and notification-flag handshakes); x86 (TSO)
    already keeps loads in order, stores in order, and stores after earlier loads.
    Python has no fence primitive, but an uncontended ``Lock.acquire``/``release`` is a
    glibc ``sem_trywait``/``sem_post`` pair: two LOCK-prefixed read-modify-writes, each a
    full barrier on x86 (Intel SDM vol. 3A, 9.2.2: loads and stores are not reordered with
    locked instructions), and sequentially consistent atomics on other architectures.
    """
    _FENCE.acquire()
    _FENCE.release()


@final
class Tally:
    """One counter of a table of counters: a native attribute, so counting allocates nothing
    (a ``list[int]`` would box every new value)."""

    def __init__(self) -> None:
        self.count = 0


class WorkQueue:
    """Deferred work of one event loop: the bottom halves of the machine, run in one pass.

    :meth:`defer` never runs the work on the caller's stack (a device raising an interrupt
    never runs driver code inline); it queues it, and a single handle on the loop runs the
    queue until it is empty, work queued meanwhile included. So a chain of deferred steps
    (a batched kick, the device processing its queue, the MSI, the driver's completion
    handler, a reply leaving) takes one pass of the event loop instead of one per step, and
    every pass costs a poll system call and the loop's own bookkeeping.
    """

    __slots__ = ("_loop", "_queue", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: collections.deque[tuple[Callable[..., object], tuple[object, ...]]] = collections.deque()
        self._scheduled = False

    def defer(self, work: Callable[..., object], *args: object) -> None:
        self._queue.append((work, args))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        queue = self._queue
        try:
            while queue:
                work, args = queue.popleft()
                try:
                    work(*args)
                except Exception as exc:  # one broken step must not starve the others
                    self._loop.call_exception_handler(
                        {"message": f"exception in deferred work {work!r}", "exception": exc}
                    )
        finally:
            self._scheduled = False
            if queue:  # left by a BaseException: run the rest on the next pass
                self._scheduled = True
                self._loop.call_soon(self._run)


_work_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WorkQueue] = weakref.WeakKeyDictionary()


def work_queue(loop: asyncio.AbstractEventLoop) -> WorkQueue:
    """The deferred-work queue of ``loop`` (one per loop, shared by devices, drivers and front ends)."""
    queue = _work_queues.get(loop)
    if queue is None:
        queue = _work_queues[loop] = WorkQueue(loop)
    return queue


class RunningLoop:
    """The running event loop and its work queue, looked up once per loop.

    ``asyncio.get_running_loop()`` costs a ``getpid()`` system call in CPython 3.11; objects
    on the data path keep one of these instead of asking on every request.
    """

    __slots__ = ("_loop", "_work")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._work: WorkQueue | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
            self._work = None
        return loop

    def work(self) -> WorkQueue:
        work = self._work
        if work is None or self._loop is None or self._loop.is_closed():
            work = self._work = work_queue(self.loop())
        return work
