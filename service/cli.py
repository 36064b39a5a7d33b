"""The ``vblk`` command line: ``vblk serve`` runs the service, ``vblk info`` prints a disk's identity.

Service layer entry point (console script ``vblk``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from service import logs
from service.app import DiskSpec, ServiceConfig, serve

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``512``, ``64M``, ``1G``, ``2T`` (binary units, optional ``iB``/``B``)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vblk", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="run the device model and guest driver for one disk")
    run.add_argument("--name", default="disk0", help="disk (export) name [disk0]")
    run.add_argument("--backend", choices=("file", "memory"), default="file", help="[file]")
    run.add_argument("--image", type=Path, default=Path("var/disk0.img"), help="raw image [var/disk0.img]")
    run.add_argument("--size", type=parse_size, default="1G", help="size of a new image [1G]")
    run.add_argument("--read-only", action="store_true", help="export read-only (VIRTIO_BLK_F_RO)")
    run.add_argument("--queues", type=int, default=1, help="virtqueues (VIRTIO_BLK_F_MQ) [1]")
    run.add_argument("--queue-size", type=int, default=256, help="descriptors per queue [256]")
    run.add_argument(
        "--io-mode",
        choices=("inline", "thread"),
        default="inline",
        help="backend I/O on the event loop or in worker threads [inline]",
    )
    run.add_argument(
        "--nbd",
        action="append",
        metavar="ADDR",
        help="NBD listener, HOST:PORT or unix:PATH; repeatable [127.0.0.1:10809]; 'none' disables",
    )
    run.add_argument("--guest-memory", type=parse_size, default="256M", help="guest RAM [256M]")
    run.add_argument("--log-level", default="info", help="debug, info, warning, error [info]")
    run.add_argument("--log-format", choices=("json", "console"), default="json", help="[json]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        if args.size % 512 or args.size <= 0:
            print("vblk: --size must be a positive multiple of 512", file=sys.stderr)
            return 2
        logs.configure(args.log_level, args.log_format)
        disk = DiskSpec(
            name=args.name,
            backend=args.backend,
            path=args.image,
            size=args.size,
            read_only=args.read_only,
            num_queues=args.queues,
            queue_size=args.queue_size,
            io_mode=args.io_mode,
        )
        nbd = tuple(a for a in (args.nbd or ["127.0.0.1:10809"]) if a != "none")
        config = ServiceConfig(disks=(disk,), guest_memory=args.guest_memory, nbd_listen=nbd)
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        with runner:
            runner.run(serve(config))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
