"""The block layer alone: layers over a memory node, and how the device drives each kind of stack.

A layer passes through what it does not change, asynchronous completion included (a layer over a
node that completes later does not make it synchronous); the fault layer fails what its plan says
and heals; the device picks its executor's strategy from the stack (inline, thread, async) and
never calls a non-blocking node from a worker thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import threading
from collections.abc import Sequence

import pytest

from device.blk import BlkConfig
from device.block.faults import FaultLayer, FaultPlan
from device.block.memory import MemoryNode
from device.block.node import (
    BlockError,
    Capabilities,
    Completion,
    Extent,
    Layer,
    Outcome,
    awaited,
    blocking_call,
    describe_stack,
)
from tests.conftest import make_rig

MiB = 1 << 20
SECTOR = 512


class LaterLayer(Layer):
    """Completes every operation of its inner node on a later pass of the event loop, as RBD does;
    remembers the threads it was called on."""

    kind = "later"

    def __init__(self, inner: MemoryNode) -> None:
        super().__init__(inner)
        self.threads: set[str] = set()
        self.loop = asyncio.get_running_loop()

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(self.inner.capabilities, blocking=False)

    def _later(self, outcome: Outcome, done: Completion) -> None:
        self.threads.add(threading.current_thread().name)
        self.loop.call_soon(done.complete, outcome.error)

    def readv(self, offset: int, buffers: Sequence[memoryview], done: Completion) -> None:
        outcome = Outcome()
        self.inner.readv(offset, buffers, outcome)
        self._later(outcome, done)

    def writev(self, offset: int, buffers: Sequence[memoryview], done: Completion) -> None:
        outcome = Outcome()
        self.inner.writev(offset, buffers, outcome)
        self._later(outcome, done)

    def flush(self, done: Completion) -> None:
        outcome = Outcome()
        self.inner.flush(outcome)
        self._later(outcome, done)


def test_the_fault_layer_fails_what_its_plan_says_and_passes_the_rest_through() -> None:
    memory = MemoryNode(MiB)
    plan = FaultPlan(read_errno=errno.EIO, region=(4096, 8192), remaining=2)
    layer = FaultLayer(memory, plan)
    blocking_call(layer.writev, 0, [memoryview(b"\xaa" * 16384)])
    blocking_call(layer.readv, 0, [memoryview(bytearray(4096))])  # outside the region: no fault
    for _ in range(2):
        with pytest.raises(BlockError) as failed:
            blocking_call(layer.readv, 4096, [memoryview(bytearray(512))])
        assert failed.value.errno == errno.EIO and "injected" in str(failed.value)
    buffer = bytearray(512)
    blocking_call(layer.readv, 4096, [memoryview(buffer)])  # healed after two faults
    assert buffer == b"\xaa" * 512 and plan.injected == 2
    plan.write_errno = errno.ENOSPC
    plan.remaining = None
    plan.region = None
    for operation, args in ((layer.writev, (0, [memoryview(b"x")])), (layer.discard, (0, SECTOR))):
        with pytest.raises(BlockError) as refused:
            blocking_call(operation, *args)
        assert refused.value.errno == errno.ENOSPC
    plan.clear()
    blocking_call(layer.write_zeroes, 0, SECTOR, True)
    # The control plane goes straight through.
    assert layer.extents(0, MiB) == memory.extents(0, MiB)
    assert layer.extents(0, SECTOR) == [Extent(0, SECTOR, hole=False, zero=False)]
    layer.resize(2 * MiB)
    assert memory.size == layer.size == 2 * MiB
    assert layer.capabilities == memory.capabilities
    assert [n["node"] for n in describe_stack(layer)] == ["faults", "memory"]
    assert layer.counters() == {"faults_injected": 4}
    layer.close()


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("read=eio", FaultPlan(read_errno=errno.EIO)),
        (
            "write=enospc+flush=eio+count=3",
            FaultPlan(write_errno=errno.ENOSPC, flush_errno=errno.EIO, remaining=3),
        ),
        ("delay=0.25", FaultPlan(delay=0.25)),
    ],
)
def test_a_fault_plan_as_the_command_line_writes_it(text: str, want: FaultPlan) -> None:
    assert FaultPlan.parse(text) == want


@pytest.mark.parametrize(
    "text", ["read", "read=ebadness", "delay=-1", "delay=100", "count=x", "colour=red", ""]
)
def test_a_fault_plan_that_makes_no_sense_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        FaultPlan.parse(text)


async def test_a_layer_over_a_node_that_completes_later_stays_asynchronous() -> None:
    later = LaterLayer(MemoryNode(MiB))
    stack = FaultLayer(later, FaultPlan())
    assert not stack.capabilities.blocking  # the layer says what is under it
    outcome = Outcome()
    stack.writev(0, [memoryview(b"y" * SECTOR)], outcome)
    assert not outcome.done  # not made synchronous on the way up
    await asyncio.sleep(0)
    assert outcome.done and outcome.error is None
    with pytest.raises(BlockError):
        outcome2 = Outcome()
        stack.readv(0, [memoryview(bytearray(SECTOR))], outcome2)
        outcome2.result()  # still in flight: EAGAIN
    await awaited(stack.flush)


@pytest.mark.parametrize(("io_mode", "want"), [("inline", "inline"), ("thread", "thread")])
async def test_the_device_runs_a_blocking_stack_inline_or_in_threads(io_mode: str, want: str) -> None:
    rig = await make_rig(config=BlkConfig(io_mode=io_mode))  # type: ignore[arg-type]
    try:
        assert rig.device.strategy == want
        data = bytes(range(256)) * 16
        await rig.disk.write(8, data)
        assert await rig.disk.read(8, len(data)) == data
        await rig.disk.flush()
        await rig.disk.discard(0, 8)
        await rig.disk.write_zeroes(16, 8, unmap=True)
        assert await rig.disk.read(0, 4096) == bytes(4096)
    finally:
        await rig.close()


async def test_a_non_blocking_stack_runs_on_the_loop_even_with_io_mode_thread() -> None:
    later = LaterLayer(MemoryNode(4 * MiB))
    rig = await make_rig(config=BlkConfig(io_mode="thread"), backend=later)
    try:
        assert rig.device.strategy == "async"
        await asyncio.gather(*(rig.disk.write(i * 8, bytes([i]) * 4096) for i in range(32)))
        for i in range(32):
            assert await rig.disk.read(i * 8, 4096) == bytes([i]) * 4096
        assert later.threads == {threading.current_thread().name}  # never a worker thread
    finally:
        await rig.close()
