"""Micro-benchmark of the in-process virtio path: 4 KiB requests through VirtioBlk.

Not a test. Runs reads and writes on the memory backend at several queue depths and prints
requests/s with kicks and interrupts per request. ``python -m bench.virtio_micro --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import uvloop

from device.backends.memory import MemoryBackend
from device.blk import BlkConfig, plug_blk
from device.machine import Machine
from device.memory import GuestMemory
from driver.guest import Guest
from service import logs

BLOCK = 4096


async def run_one(op: str, depth: int, seconds: float, io_mode: str, disk_size: int) -> dict[str, Any]:
    memory = GuestMemory(128 << 20)
    machine = Machine(memory)
    backend = MemoryBackend(disk_size)
    backend.writev(0, [memoryview(bytes([7]) * disk_size)])
    device = plug_blk(machine, backend, BlkConfig(io_mode=io_mode))  # type: ignore[arg-type]
    guest = Guest(machine)
    [disk] = await guest.probe()
    blocks = disk_size // BLOCK
    buffers = [guest.dma.allocate(BLOCK) for _ in range(depth)]
    stop_at = time.perf_counter() + seconds
    done = 0
    before = disk.statistics()
    lapic_before = machine.lapic.statistics.delivered

    async def worker(index: int) -> None:
        nonlocal done
        buffer = buffers[index]
        assert buffer is not None
        block = index * 7919
        call = disk.read_into if op == "read" else disk.write_from
        while time.perf_counter() < stop_at:
            for _ in range(64):
                block = (block * 1103515245 + 12345) % blocks
                await call(block * (BLOCK // 512), buffer)
            done += 64

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(depth)))
    elapsed = time.perf_counter() - started
    after = disk.statistics()
    kicks = after.kicks - before.kicks
    interrupts = after.interrupts - before.interrupts
    result = {
        "op": op,
        "depth": depth,
        "io_mode": io_mode,
        "iops": done / elapsed,
        "kicks_per_request": kicks / done,
        "interrupts_per_request": interrupts / done,
        "msi_per_request": (machine.lapic.statistics.delivered - lapic_before) / done,
    }
    for buffer in buffers:
        if buffer is not None:
            buffer.free()
    await guest.close()
    device.close()
    memory.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3, help="median of this many runs per cell")
    parser.add_argument("--depths", default="1,32,128")
    parser.add_argument("--io-mode", default="inline", choices=("inline", "thread"))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    logs.configure("warning", "console")
    rows = []
    for op in ("read", "write"):
        for depth in (int(d) for d in args.depths.split(",")):
            runs = [
                uvloop.run(run_one(op, depth, args.seconds, args.io_mode, 64 << 20)) for _ in range(args.runs)
            ]
            row = dict(runs[0])
            row["iops"] = statistics.median(r["iops"] for r in runs)
            row["kicks_per_request"] = statistics.median(r["kicks_per_request"] for r in runs)
            row["interrupts_per_request"] = statistics.median(r["interrupts_per_request"] for r in runs)
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'op':6} {'QD':>4} {'mode':7} {'req/s':>10} {'kicks/req':>10} {'irqs/req':>10}")
    for row in rows:
        print(
            f"{row['op']:6} {row['depth']:>4} {row['io_mode']:7} {row['iops']:>10.0f} "
            f"{row['kicks_per_request']:>10.3f} {row['interrupts_per_request']:>10.3f}"
        )


if __name__ == "__main__":
    main()
