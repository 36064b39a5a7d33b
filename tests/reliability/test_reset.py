"""A device reset with slow requests in flight does not stop the other disks.

One disk's storage answers after a second (a layer that completes later on the loop, as a remote
store does); its device is reset while reads are in flight. The reset completes when they end,
and meanwhile the event loop keeps serving: the other disk's I/O goes on at its usual speed and
the loop never stalls. Afterwards the slow disk serves again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence

from device.blk import VirtioBlkDevice
from device.block.node import BlockNode, Capabilities, Completion, Layer, Outcome
from service.app import Service
from service.model import DiskSpec, ServiceConfig

MiB = 1 << 20
SLOW = 1.0  # seconds the slow disk takes to answer a read


class SlowReads(Layer):
    """Reads complete ``delay`` seconds after they started (on the loop: a non-blocking node)."""

    kind = "slow-reads"

    def __init__(self, inner: BlockNode, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay
        self.started = 0

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(self.inner.capabilities, blocking=False)

    def readv(self, offset: int, buffers: Sequence[memoryview], done: Completion) -> None:
        self.started += 1
        outcome = Outcome()
        self.inner.readv(offset, buffers, outcome)
        asyncio.get_running_loop().call_later(self.delay, done.complete, outcome.error)


async def test_a_reset_waits_for_slow_requests_while_other_disks_go_on() -> None:
    layers: dict[str, SlowReads] = {}

    def wrap(spec: DiskSpec, node: BlockNode) -> BlockNode:
        if spec.name != "slow":
            return node
        layers[spec.name] = SlowReads(node, SLOW)
        return layers[spec.name]

    config = ServiceConfig(
        disks=(
            DiskSpec(name="slow", backend="memory", size=8 * MiB),
            DiskSpec(name="fast", backend="memory", size=8 * MiB),
        ),
        guest_memory=64 * MiB,
        nbd_listen=(),
    )
    service = Service(config, wrap_stack=wrap)
    await service.start()
    try:
        slow, fast = service.disks["slow"], service.disks["fast"]
        device = slow.device
        assert isinstance(device, VirtioBlkDevice)
        await fast.bytes.write(0, b"f" * 4096)
        reads = [asyncio.ensure_future(slow.bytes.read(i * 4096, 4096)) for i in range(8)]
        while layers["slow"].started < 8:
            await asyncio.sleep(0.005)
        # Reset the slow disk's device, as recovery from a broken ring would.
        slow.driver._start_recovery("test: reset with requests in flight")
        assert device.resetting or device.busy
        # While its reset waits, the loop serves: the fast disk's I/O, a heartbeat.
        started = time.monotonic()
        beats: list[float] = []
        for _ in range(40):
            before = time.monotonic()
            assert await fast.bytes.read(0, 4096) == b"f" * 4096
            await asyncio.sleep(0.005)
            beats.append(time.monotonic() - before)
        assert time.monotonic() - started < SLOW  # all of that inside the slow disk's second
        assert max(beats) < 0.2, beats
        assert not slow.driver.ready  # still resetting: its reads are in flight
        # The reads in flight go again once the device is back (the driver reset it under them):
        # their callers see the time it took, not an error.
        outcomes = await asyncio.gather(*reads)
        assert outcomes == [bytes(4096)] * 8
        assert time.monotonic() - started >= SLOW * 0.5
        assert slow.driver.statistics().resubmitted == 8
        # Then the device is back and serves (slowly, as its storage does).
        for _ in range(200):
            if slow.driver.ready:
                break
            await asyncio.sleep(0.01)
        assert slow.driver.ready and not device.resetting
        assert await slow.bytes.read(0, 4096) == bytes(4096)
        assert device.stats.resets >= 2  # at start-up, and this one
    finally:
        await service.stop()
