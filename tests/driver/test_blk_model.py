"""A hypothesis state machine: random concurrent I/O through VirtioBlk against a bytearray model.

Small rings make the ring positions wrap constantly; every feature combination of
EVENT_IDX and INDIRECT_DESC runs, and both device I/O modes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from device.blk import BlkConfig
from device.spec.virtio import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC
from tests.conftest import Rig, make_rig

SECTOR = 512
REGIONS = 8
REGION_SECTORS = 8
DISK_SECTORS = REGIONS * REGION_SECTORS

op_strategy = st.tuples(
    st.sampled_from(["read", "write", "discard", "zero", "zero_unmap", "flush"]),
    st.integers(0, REGION_SECTORS - 1),  # first sector within the region
    st.integers(1, REGION_SECTORS),  # sectors
    st.integers(0, 255),  # fill byte seed
)


class BlkModel(RuleBasedStateMachine):
    features_mask: int = (1 << 64) - 1
    queue_size: int = 4
    io_mode: Any = "inline"
    ring: str = "split"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.model = bytearray(DISK_SECTORS * SECTOR)
        self.rig: Rig | None = None

    @initialize()
    def boot(self) -> None:
        config = BlkConfig(queue_size=self.queue_size, io_mode=self.io_mode, size_max=1024)
        self.rig = self.loop.run_until_complete(
            make_rig(
                disk_size=DISK_SECTORS * SECTOR,
                config=config,
                features_mask=self.features_mask,
                ring=self.ring,
            )
        )
        assert self.rig.device.packed == (self.ring == "packed")

    @rule(
        ops=st.lists(op_strategy, min_size=1, max_size=REGIONS),
        regions=st.permutations(range(REGIONS)),
    )
    def batch(self, ops: list[tuple[str, int, int, int]], regions: list[int]) -> None:
        """Up to eight operations at once, each on its own region (so the model is exact)."""
        assert self.rig is not None
        disk = self.rig.disk
        expectations: list[bytes | None] = []

        async def run() -> list[Any]:
            coros: list[Coroutine[Any, Any, Any]] = []
            for (op, first, wanted, seed), region in zip(ops, regions, strict=False):
                start = region * REGION_SECTORS + first
                count = min(wanted, REGION_SECTORS - first)
                lo, hi = start * SECTOR, (start + count) * SECTOR
                if op == "read":
                    coros.append(disk.read(start, hi - lo))
                    expectations.append(bytes(self.model[lo:hi]))
                    continue
                if op == "write":
                    data = bytes((seed + i) & 0xFF for i in range(hi - lo))
                    coros.append(disk.write(start, data))
                    self.model[lo:hi] = data
                elif op == "discard":
                    coros.append(disk.discard(start, count))
                    self.model[lo:hi] = bytes(hi - lo)
                elif op in ("zero", "zero_unmap"):
                    coros.append(disk.write_zeroes(start, count, unmap=op == "zero_unmap"))
                    self.model[lo:hi] = bytes(hi - lo)
                else:
                    coros.append(disk.flush())
                expectations.append(None)
            return await asyncio.gather(*coros)

        results = self.loop.run_until_complete(run())
        for result, expected in zip(results, expectations, strict=True):
            if expected is not None:
                assert result == expected

    @rule()
    def read_everything(self) -> None:
        assert self.rig is not None
        got = self.loop.run_until_complete(self.rig.disk.read(0, DISK_SECTORS * SECTOR))
        assert got == bytes(self.model)

    @invariant()
    def no_descriptor_leaks(self) -> None:
        if self.rig is None:
            return
        for queue in self.rig.disk.statistics().queues:
            assert queue.inflight == 0
            assert queue.free_descriptors == queue.size
        assert self.rig.device.inflight == 0

    def teardown(self) -> None:
        if self.rig is not None:
            self.loop.run_until_complete(self.rig.close())
        self.loop.close()


def _machine(name: str, **attrs: Any) -> type[BlkModel]:
    cls = type(name, (BlkModel,), attrs)
    configured: type[BlkModel] = settings(max_examples=15, stateful_step_count=12, deadline=None)(cls)
    return configured


ALL = (1 << 64) - 1
NO_EVENT_IDX = ALL & ~(1 << VIRTIO_F_EVENT_IDX)
NO_INDIRECT = ALL & ~(1 << VIRTIO_F_INDIRECT_DESC)
NEITHER = NO_EVENT_IDX & NO_INDIRECT

TestAllFeatures = _machine("AllFeatures", queue_size=4).TestCase
TestNoEventIdx = _machine("NoEventIdx", features_mask=NO_EVENT_IDX, queue_size=4).TestCase
TestNoIndirect = _machine("NoIndirect", features_mask=NO_INDIRECT, queue_size=8).TestCase
TestNeither = _machine("Neither", features_mask=NEITHER, queue_size=8).TestCase
TestThreadMode = _machine("ThreadMode", queue_size=4, io_mode="thread").TestCase
# The same random workloads on packed virtqueues (a queue size that is a power of two: the
# driver takes the device's).
TestPackedAllFeatures = _machine("PackedAllFeatures", queue_size=4, ring="packed").TestCase
TestPackedNoEventIdx = _machine(
    "PackedNoEventIdx", features_mask=NO_EVENT_IDX, queue_size=4, ring="packed"
).TestCase
TestPackedNeither = _machine("PackedNeither", features_mask=NEITHER, queue_size=8, ring="packed").TestCase
TestPackedThreadMode = _machine("PackedThreadMode", queue_size=4, io_mode="thread", ring="packed").TestCase
