"""Running virtio-blk requests against a disk's block stack: one executor, three strategies.

Device layer, between :mod:`device.blk` (which pops and parses requests and publishes their
completions) and the block layer (:mod:`device.block`). Every request becomes an
:class:`Execution` that walks its steps (a write, then a flush when the device is write-through;
one operation per discard or write-zeroes segment) through the stack's top node. The strategy
follows the stack: ``inline`` (blocking nodes, on the event loop), ``thread`` (blocking nodes in
worker threads, completions handed back to the loop) or ``async`` (nodes that complete later on
the loop, as RBD does). Whatever the strategy, a finished request comes back to the device
through one routine, :meth:`ExecutionOwner.executed`, on the loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
from collections.abc import Callable
from typing import Final, Literal, Protocol

import structlog

from device.blk_request import BlkRequest
from device.block.node import BlockError, BlockNode
from device.block.throttle import ThrottleMember
from device.memory import GuestMemory
from device.spec import virtio_blk as vb
from device.spec.virtio_blk import (
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from device.virtqueue import DeviceVirtqueue

log = structlog.get_logger("vblk.device.blk")

SECTOR: Final = vb.VIRTIO_BLK_SECTOR_SIZE
IoMode = Literal["inline", "thread"]
Strategy = Literal["inline", "thread", "async"]


class ExecutionOwner(Protocol):
    """Who is told when a request has run (the device), always on the event loop thread."""

    def executed(self, execution: Execution, error: BaseException | None) -> None: ...


class Execution:
    """One request on its way through the stack: the :class:`~device.block.node.Completion` of
    each step it starts. ``queue``, ``head`` and ``epoch`` are the device's, for the answer."""

    def __init__(
        self, executor: Executor, request: BlkRequest, queue: DeviceVirtqueue, head: int, epoch: int
    ) -> None:
        self.executor = executor
        self.request = request
        self.queue = queue
        self.head = head
        self.epoch = epoch
        self.stage = 0  # steps completed
        self.threaded = False  # started in a worker thread: finish by the loop
        self.finished = False

    def start(self) -> None:
        self._step()

    def admitted(self) -> None:
        """Through the throttle gate: run, unless the device was reset while it waited."""
        if self.epoch != self.executor.epoch:
            self.refused()
        else:
            self.executor.run(self)

    def refused(self) -> None:
        """Never started (the device was reset while it waited at the gate): end it unrun."""
        self.complete(BlockError(errno.ECANCELED, "the device was reset before the request started"))

    def start_threaded(self) -> None:
        self.threaded = True
        self._step()

    def _step(self) -> None:
        executor = self.executor
        node = executor.node
        request = self.request
        rtype = request.type
        stage = self.stage
        try:
            if rtype == VIRTIO_BLK_T_IN:
                node.readv(request.sector * SECTOR, executor.views(request), self)
            elif rtype == VIRTIO_BLK_T_OUT:
                if stage == 0:
                    node.writev(request.sector * SECTOR, executor.views(request), self)
                else:
                    node.flush(self)
            elif rtype == VIRTIO_BLK_T_FLUSH:
                node.flush(self)
            elif stage < len(request.segments):
                sector, num_sectors, flags = request.segments[stage]
                if rtype == VIRTIO_BLK_T_DISCARD:
                    node.discard(sector * SECTOR, num_sectors * SECTOR, self)
                else:
                    unmap = bool(flags & vb.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) and executor.may_unmap
                    node.write_zeroes(sector * SECTOR, num_sectors * SECTOR, unmap, self)
            else:
                node.flush(self)
        except Exception as bug:  # a node must not raise: report it as a failed request
            self.complete(bug)

    def _steps(self) -> int:
        request = self.request
        rtype = request.type
        flush = 1 if self.executor.writethrough else 0
        if rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_FLUSH):
            return 1
        if rtype == VIRTIO_BLK_T_OUT:
            return 1 + flush
        return len(request.segments) + flush

    def complete(self, error: BaseException | None) -> None:
        if self.finished:
            return  # told twice (a node that both completed and raised): the first answer stands
        if error is None:
            self.stage += 1
            if self.stage < self._steps() and self.epoch == self.executor.epoch:
                self._step()
                return
        self.finished = True
        executor = self.executor
        if self.threaded:
            executor.post(self, error)
        else:
            executor.owner.executed(self, error)


class Executor:
    """Starts each request's :class:`Execution` the way the stack wants to be driven."""

    def __init__(
        self,
        owner: ExecutionOwner,
        node: BlockNode,
        memory: GuestMemory,
        io_mode: IoMode,
        io_threads: int,
        loop_of: Callable[[], asyncio.AbstractEventLoop],
    ) -> None:
        self.owner = owner
        self.node = node
        self.memory = memory
        blocking = node.capabilities.blocking
        self.strategy: Strategy = "async" if not blocking else ("thread" if io_mode == "thread" else "inline")
        self._io_threads = io_threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop_of = loop_of
        self.loop: asyncio.AbstractEventLoop | None = None  # set while requests may run threaded
        self.writethrough = False
        self.may_unmap = True
        self.epoch = 0  # the owner's, mirrored: a later step of a request reset meanwhile is not started
        self.gate: ThrottleMember | None = None  # I/O limits: requests pass it before the stack

    def views(self, request: BlkRequest) -> list[memoryview]:
        view = self.memory.view
        return [view(addr, length) for addr, length in request.data]

    def start(self) -> None:
        """The device is running: worker threads for the ``thread`` strategy (on the loop they
        hand their requests back to)."""
        if self.strategy == "thread" and self._pool is None:
            self.loop = self._loop_of()
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._io_threads, thread_name_prefix="vblk-io"
            )

    def post(self, execution: Execution, error: BaseException | None) -> None:
        """From a worker thread: hand a finished request to the owner, on the loop."""
        loop = self.loop
        if loop is None:
            raise RuntimeError("the executor was not started")
        loop.call_soon_threadsafe(self.owner.executed, execution, error)

    def submit(self, execution: Execution) -> None:
        """Start a request, through the throttle gate when the disk has limits (flushes are free)."""
        gate = self.gate
        if gate is not None:
            request = execution.request
            rtype = request.type
            if rtype == VIRTIO_BLK_T_IN:
                gate.admit(False, request.data_len, execution)
                return
            if rtype == VIRTIO_BLK_T_OUT:
                gate.admit(True, request.data_len, execution)
                return
            if rtype != VIRTIO_BLK_T_FLUSH:
                nbytes = sum(segment[1] for segment in request.segments) * SECTOR
                gate.admit(True, nbytes, execution)
                return
        self.run(execution)

    def run(self, execution: Execution) -> None:
        """Start a request now, in the strategy's way."""
        pool = self._pool
        if pool is None:
            execution.start()
        else:
            pool.submit(execution.start_threaded)

    def close(self) -> None:
        """Wait for the worker threads (their requests finished or were abandoned)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def log_io_error(request: BlkRequest, exc: BaseException) -> None:
    """A request failed: an I/O error is the storage's (a warning); anything else is a bug."""
    if isinstance(exc, OSError):
        log.warning(
            "virtio_blk_io_error",
            type=request.type,
            sector=request.sector,
            errno=exc.errno,
            error=exc.strerror or str(exc),
        )
    else:
        log.error("virtio_blk_execute_failed", type=request.type, error=repr(exc))
