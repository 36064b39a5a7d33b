"""Micro-benchmark of the in-process virtio path: 4 KiB requests through VirtioBlk, memory backend.

Not a test: requests/s, kicks and interrupts per request at several queue depths; ``--rev REV`` runs
it against a build of another revision too (bench/revisions.py), each in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

from device.blk import BlkConfig, plug_blk
from device.machine import Machine
from device.memory import GuestMemory
from driver.guest import Guest
from service import logs

BLOCK = 4096


def memory_disk(size: int, data: bytes) -> Any:
    """A memory disk holding ``data``, as this revision spells it (``--rev`` runs this file
    against older ones: before the block layer, ``device.backends.memory.MemoryBackend``)."""
    try:
        node = importlib.import_module("device.block.memory").MemoryNode(size)
        node.write_now(0, [memoryview(data)])
    except ImportError:
        node = importlib.import_module("device.backends.memory").MemoryBackend(size)
        node.writev(0, [memoryview(data)])
    return node


async def run_one(
    op: str, depth: int, seconds: float, io_mode: str, disk_size: int, ring: str = "split"
) -> dict[str, Any]:
    memory = GuestMemory(128 << 20)
    machine = Machine(memory)
    backend = memory_disk(disk_size, bytes([7]) * disk_size)
    device = plug_blk(machine, backend, BlkConfig(io_mode=io_mode))  # type: ignore[arg-type]
    guest = Guest(machine)
    # (only a packed run names the ring: --rev runs this file against trees that predate it)
    [disk] = await guest.probe(**({} if ring == "split" else {"ring": ring}))
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
        "ring": ring,
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


ROW_FIGURES = ("iops", "kicks_per_request", "interrupts_per_request")


def median_rows(runs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (op, depth, io_mode) of the first run, each figure the median over ``runs``."""
    rows = []
    for index, first in enumerate(runs[0]):
        row = dict(first)
        for key in ROW_FIGURES:
            row[key] = statistics.median(run[index][key] for run in runs)
        rows.append(row)
    return rows


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every cell in this process, each the median of ``--runs`` runs."""
    logs.configure("warning", "console")
    rows = []
    rings = args.rings.split(",")
    for op in ("read", "write"):
        for depth in (int(d) for d in args.depths.split(",")):
            runs = [  # the layouts in turn within each run: the machine's noise hits both alike
                [uvloop.run(run_one(op, depth, args.seconds, args.io_mode, 64 << 20, ring)) for ring in rings]
                for _ in range(args.runs)
            ]
            rows += median_rows(runs)
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = f"{'op':6} {'QD':>4} {'mode':7} {'ring':6} {'req/s':>10} {'kicks/req':>10} {'irqs/req':>10}"
    lines = [f"{head} {'vs split':>8}"]
    split = {(r["op"], r["depth"]): r["iops"] for r in rows if r.get("ring", "split") == "split"}
    for row in rows:
        base = split.get((row["op"], row["depth"]))
        ratio = f"{row['iops'] / base:>7.2f}x" if base and row.get("ring") != "split" else ""
        lines.append(
            f"{row['op']:6} {row['depth']:>4} {row['io_mode']:7} {row.get('ring', 'split'):6} "
            f"{row['iops']:>10.0f} {row['kicks_per_request']:>10.3f} {row['interrupts_per_request']:>10.3f} "
            f"{ratio:>8}"
        )
    return "\n".join(lines) + "\n"


def compare(args: argparse.Namespace) -> str:
    """``--rev``: this tree and a build of REV, each run in its own process from its own venv.

    The same benchmark (this file) runs against each tree's device and driver, one run at a time,
    the two taking turns (who goes first alternates), so drift reaches both; medians of ``--runs``.
    """
    # Imported here only: a child run (this file by path, in another tree) imports no bench module.
    from bench.common import REPO, REVISIONS_DIR, log  # noqa: PLC0415
    from bench.revisions import (  # noqa: PLC0415
        RevisionCache,
        RevisionError,
        clean_environment,
        resolve_revision,
    )

    try:
        build = RevisionCache(args.revisions_dir or REVISIONS_DIR).build(resolve_revision(args.rev))
    except RevisionError as exc:
        raise SystemExit(str(exc)) from None
    label = build.revision.label
    sides = {"vblk": (sys.executable, REPO), label: (str(build.python), build.directory)}
    child = [
        str(Path(__file__).resolve()), "--json", "--runs", "1", "--seconds", f"{args.seconds:g}",
        "--depths", args.depths, "--io-mode", args.io_mode,
    ]  # fmt: skip
    runs: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in sides}
    for index in range(args.runs):
        order = list(sides) if index % 2 == 0 else list(sides)[::-1]
        for name in order:
            python, root = sides[name]
            log(f"run {index + 1}/{args.runs}: {name} ({root})")
            env = {**clean_environment(), "PYTHONPATH": str(root)}
            done = subprocess.run(
                [python, *child], cwd=root, env=env, capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise SystemExit(f"{name}: the micro-benchmark failed ({done.returncode}):\n{done.stderr}")
            runs[name].append(json.loads(done.stdout))
    mine, theirs = (median_rows(runs[name]) for name in sides)
    if args.json:
        rows = [
            {"op": a["op"], "depth": a["depth"], "io_mode": a["io_mode"], "vblk": a, label: b,
             "ratio": a["iops"] / b["iops"] if b["iops"] else None}
            for a, b in zip(mine, theirs, strict=True)
        ]  # fmt: skip
        revision = {"spec": build.revision.spec, "sha": build.revision.sha, "label": label}
        return json.dumps({"revision": revision, "runs": args.runs, "rows": rows}, indent=2) + "\n"
    width = max(len(label), 10)
    lines = [
        f"vblk (the working tree) against {label} ({build.revision.spec}, {build.directory}): "
        f"medians of {args.runs} run(s) of {args.seconds:g} s per cell, each side in its own process.",
        f"ratio: vblk ÷ {label} (above 1x: the working tree does more requests per second); "
        f"kicks and interrupts per request: vblk/{label}.",
        "",
        f"{'op':6} {'QD':>4} {'mode':7} {'vblk req/s':>12} {label + ' req/s':>{width + 6}} {'ratio':>7} "
        f"{'kicks/req':>15} {'irqs/req':>15}",
    ]
    for a, b in zip(mine, theirs, strict=True):
        shown = f"{a['iops'] / b['iops']:.2f}x" if b["iops"] else "n/a"
        kicks = f"{a['kicks_per_request']:.3f}/{b['kicks_per_request']:.3f}"
        irqs = f"{a['interrupts_per_request']:.3f}/{b['interrupts_per_request']:.3f}"
        lines.append(
            f"{a['op']:6} {a['depth']:>4} {a['io_mode']:7} {a['iops']:>12.0f} {b['iops']:>{width + 6}.0f} "
            f"{shown:>7} {kicks:>15} {irqs:>15}"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3, help="median of this many runs per cell")
    parser.add_argument("--depths", default="1,32,128")
    parser.add_argument("--io-mode", default="inline", choices=("inline", "thread"))
    parser.add_argument(
        "--rings",
        default="split",
        help="virtqueue layouts, in turn in each run: split, packed or split,packed",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--rev",
        metavar="REV",
        help="also run it against a build of this git revision (a commit, HEAD~3, a tag, a branch)",
    )
    parser.add_argument(
        "--revisions-dir",
        type=Path,
        default=None,
        help="where builds of revisions are kept and reused [bench/.revisions]",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not args.rings or set(args.rings.split(",")) - {"split", "packed"}:
        parser.error("--rings takes split, packed or split,packed")
    if args.rev and args.rings != "split":
        parser.error("--rev compares split rings only (older trees have no packed ones)")
    if args.rev:
        sys.stdout.write(compare(args))
        return 0
    rows = measure(args)
    sys.stdout.write(json.dumps(rows, indent=2) + "\n" if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
