"""The block layer's one interface: a node that reads, writes, flushes, discards and zeroes bytes.

Device layer, under :mod:`device.blk` (whose executor runs every virtio-blk request through the
top node of a disk's stack). A stack is nodes wrapping nodes, as QEMU's block graph and nbdkit's
filters are: storage nodes at the bottom (:mod:`device.block.file`, :mod:`device.block.memory`,
:mod:`device.block.rbd`), layers above (:mod:`device.block.faults`) that pass through what they do
not change. Completion is by callback: a node starts an operation and calls its
:class:`Completion` when the operation is done, at once (a file read by ``preadv``) or later on the
event loop (an RBD request), so a layer above RBD does not make it synchronous and a layer above a
file adds no thread hop. Capabilities are a frozen record, asked once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from mypy_extensions import mypyc_attr


@mypyc_attr(native_class=False)  # an OSError: compiled code cannot subclass it natively
class BlockError(OSError):
    """A block operation failed; ``errno`` says why (EIO, ENOSPC, EROFS, EINVAL, ...)."""


def check_access(what: object, size: int, read_only: bool, offset: int, length: int, write: bool) -> None:
    """Refuse a write to a read-only node (EROFS) or a range outside ``[0, size)`` (EINVAL).

    ``what`` names the node in the message (its path, its image, ...).
    """
    if write and read_only:
        raise BlockError(errno.EROFS, f"{what} is read-only")
    if offset < 0 or length < 0 or offset + length > size:
        raise BlockError(errno.EINVAL, f"range [{offset}, +{length}) outside {what}")


@dataclasses.dataclass(frozen=True, slots=True)
class Extent:
    """One run of the allocation map: ``length`` bytes at ``offset``.

    ``hole`` means unallocated (reads as zeroes); ``zero`` means known to read as zeroes.
    A hole is always zero.
    """

    offset: int
    length: int
    hole: bool
    zero: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Capabilities:
    """What a node can do, asked once (nbdkit's ``can_*``); a layer passes on its inner node's."""

    read_only: bool = False
    #: Deallocating ranges does something (else discard is accepted and does nothing).
    discard: bool = True
    #: Zeroes that stay allocated cost no more than metadata (not a full write, as RBD's write-same).
    fast_zero: bool = True
    #: A hint that a range will be read soon does something (the page cache warms).
    cache: bool = False
    #: The allocation map is known (else every byte is reported as data).
    extents: bool = True
    #: Operations block the calling thread until done (file, memory): they may run in worker
    #: threads. False: they complete later, on the event loop, and must start on it (RBD).
    blocking: bool = True


class Completion(Protocol):
    """Told once when an operation ends: ``None`` on success, or the exception it failed with."""

    def complete(self, error: BaseException | None) -> None: ...


class BlockNode(Protocol):
    """One node of a disk's stack. Offsets and lengths are in bytes.

    The data plane (``readv`` ... ``write_zeroes``) never raises: every outcome, failures too, goes
    to ``done``, exactly once. Callers have checked ranges against ``size``; a node still never
    touches bytes outside ``[0, size)`` and fails such a request with :class:`BlockError`. A
    blocking node may be called from a worker thread (one mutating call at a time per range); a
    non-blocking one on the event loop thread only. The control plane is called on the loop.
    """

    @property
    def kind(self) -> str:
        """What the node is: ``file``, ``memory``, ``rbd``, ``faults``..."""
        ...

    @property
    def size(self) -> int:
        """Current size in bytes (a multiple of 512)."""
        ...

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def inner(self) -> BlockNode | None:
        """The node this one wraps; None for a storage node (the bottom of the stack)."""
        ...

    def readv(self, offset: int, buffers: Sequence[memoryview], done: Completion) -> None:
        """Fill ``buffers`` in order from ``offset``."""
        ...

    def writev(self, offset: int, buffers: Sequence[memoryview], done: Completion) -> None:
        """Write ``buffers`` in order at ``offset``, completely."""
        ...

    def flush(self, done: Completion) -> None:
        """Make every completed write durable; fails if an earlier write may not be."""
        ...

    def discard(self, offset: int, length: int, done: Completion) -> None:
        """Deallocate a range; afterwards it reads as zeroes."""
        ...

    def write_zeroes(self, offset: int, length: int, may_unmap: bool, done: Completion) -> None:
        """Make a range read as zeroes; deallocate it if ``may_unmap`` and possible."""
        ...

    # -- control plane ----------------------------------------------------------------------------

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The allocation map of ``[offset, offset+length)``, contiguous and in order."""
        ...

    def advise_willneed(self, offset: int, length: int) -> None:
        """Hint that a range will be read soon (posix_fadvise WILLNEED)."""
        ...

    def resize(self, new_size: int) -> None:
        """Grow or shrink to ``new_size`` bytes (a multiple of 512)."""
        ...

    def describe(self) -> dict[str, Any]:
        """This node alone, for people: ``{"node": kind, ...}`` (path, image, options)."""
        ...

    def counters(self) -> Mapping[str, int]:
        """This node's own counters, for metrics (none for most)."""
        ...

    def close(self) -> None:
        """Release the node and what it wraps (idempotent)."""
        ...


def stack(node: BlockNode) -> list[BlockNode]:
    """A stack from its top node down to its storage node."""
    nodes = [node]
    inner = node.inner
    while inner is not None:
        nodes.append(inner)
        inner = inner.inner
    return nodes


def describe_stack(node: BlockNode) -> list[dict[str, Any]]:
    """Every node of a stack, top first, as :meth:`BlockNode.describe` tells it."""
    return [n.describe() for n in stack(node)]


@mypyc_attr(allow_interpreted_subclasses=True)
class StorageNode:
    """What every storage node shares: a size, whether it refuses writes, no inner node."""

    def __init__(self, size: int, read_only: bool) -> None:
        self._size = size
        self._read_only = read_only

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def inner(self) -> BlockNode | None:
        return None

    def counters(self) -> Mapping[str, int]:
        return {}


def as_block_error(failed: OSError) -> OSError:
    """``failed`` as a :class:`BlockError`: itself if it is one, else one with its errno, caused
    by it. (Typed ``OSError``: compiled, a return type of ``BlockError`` would be checked as an
    exact type, and refuse its subclasses.)"""
    if issubclass(type(failed), BlockError):
        return failed
    error = BlockError(failed.errno or errno.EIO, failed.strerror or str(failed))
    error.__cause__ = failed
    return error


@mypyc_attr(allow_interpreted_subclasses=True)
class BlockingNode(StorageNode):
    """A storage node whose operations are done when the call returns (a file, memory).

    Subclasses implement the plain calls (:meth:`read_now` and its siblings, raising
    :class:`BlockError`); the completion-style calls of the interface run them and tell
    ``done`` at once, so the executor runs such a node inline or in a worker thread.
    """

    def readv(self, offset: int, buffers: Sequence[memoryview], done: Completion) -> None:
        error: BaseException | None = None
        try:
            self.read_now(offset, buffers)
        except OSError as failed:
            error = as_block_error(failed)
        done.complete(error)

    def writev(self, offset: int, buffers: Sequence[memoryview], done: Completion) -> None:
        error: BaseException | None = None
        try:
            self.write_now(offset, buffers)
        except OSError as failed:
            error = as_block_error(failed)
        done.complete(error)

    def flush(self, done: Completion) -> None:
        error: BaseException | None = None
        try:
            self.flush_now()
        except OSError as failed:
            error = as_block_error(failed)
        done.complete(error)

    def discard(self, offset: int, length: int, done: Completion) -> None:
        error: BaseException | None = None
        try:
            self.discard_now(offset, length)
        except OSError as failed:
            error = as_block_error(failed)
        done.complete(error)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool, done: Completion) -> None:
        error: BaseException | None = None
        try:
            self.zero_now(offset, length, may_unmap)
        except OSError as failed:
            error = as_block_error(failed)
        done.complete(error)

    def read_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` with the bytes from ``offset`` on."""
        raise NotImplementedError

    def write_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Write ``buffers`` at ``offset``, completely."""
        raise NotImplementedError

    def flush_now(self) -> None:
        """Make what was written durable (nothing to do unless the node caches)."""

    def discard_now(self, offset: int, length: int) -> None:
        """Deallocate the range where the node can; it reads as zeroes afterwards."""
        self.zero_now(offset, length, True)

    def zero_now(self, offset: int, length: int, may_unmap: bool) -> None:
        """Make the range read as zeroes (deallocated where ``may_unmap`` and the node can)."""
        raise NotImplementedError


@mypyc_attr(allow_interpreted_subclasses=True)
class Layer:
    """A node that wraps another and passes through everything it does not change.

    Subclasses override the operations they act on and call the inner node for the rest.
    """

    kind = "layer"

    def __init__(self, inner: BlockNode) -> None:
        self._inner = inner

    @property
    def inner(self) -> BlockNode:
        return self._inner

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def capabilities(self) -> Capabilities:
        return self._inner.capabilities

    def readv(self, offset: int, buffers: Sequence[memoryview], done: Completion) -> None:
        self._inner.readv(offset, buffers, done)

    def writev(self, offset: int, buffers: Sequence[memoryview], done: Completion) -> None:
        self._inner.writev(offset, buffers, done)

    def flush(self, done: Completion) -> None:
        self._inner.flush(done)

    def discard(self, offset: int, length: int, done: Completion) -> None:
        self._inner.discard(offset, length, done)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool, done: Completion) -> None:
        self._inner.write_zeroes(offset, length, may_unmap, done)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self._inner.extents(offset, length)

    def advise_willneed(self, offset: int, length: int) -> None:
        self._inner.advise_willneed(offset, length)

    def resize(self, new_size: int) -> None:
        self._inner.resize(new_size)

    def describe(self) -> dict[str, Any]:
        return {"node": self.kind}

    def counters(self) -> Mapping[str, int]:
        return {}

    def close(self) -> None:
        self._inner.close()


class Outcome:
    """A :class:`Completion` that keeps what it was told: for callers that wait for the result."""

    def __init__(self) -> None:
        self.done = False
        self.error: BaseException | None = None

    def complete(self, error: BaseException | None) -> None:
        self.done = True
        self.error = error

    def result(self) -> None:
        """Raise what the operation failed with (it must have completed)."""
        if not self.done:
            raise BlockError(errno.EAGAIN, "the operation has not completed (a non-blocking node?)")
        if self.error is not None:
            raise self.error


def blocking_call(start: Any, *args: Any) -> None:
    """Run one operation of a blocking node to its end, here: ``blocking_call(node.readv, 0, bufs)``.

    For the control paths and tools that want a plain call (``vblk info``, tests); a non-blocking
    node's operation has not completed when its start returns, which raises EAGAIN.
    """
    outcome = Outcome()
    start(*args, outcome)
    outcome.result()


class _FutureCompletion:
    """A :class:`Completion` that resolves a future of the running loop (told on the loop)."""

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future

    def complete(self, error: BaseException | None) -> None:
        if self.future.done():
            return
        if error is None:
            self.future.set_result(None)
        else:
            self.future.set_exception(error)


async def awaited(start: Any, *args: Any) -> None:
    """Run one operation of any node and wait for it: ``await awaited(node.flush)``.

    A blocking node's operation runs here, on the loop; a non-blocking one's completes later.
    """
    done = _FutureCompletion(asyncio.get_running_loop().create_future())
    start(*args, done)
    await done.future
