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


_DISK_KEYS = {"name", "image", "size", "backend", "read-only", "queues", "queue-size", "io-mode"}


def parse_disk(text: str) -> dict[str, str]:
    """``name=db,image=db.img,size=4G,read-only`` → a dict of disk options."""
    options: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if key not in _DISK_KEYS:
            raise argparse.ArgumentTypeError(f"unknown disk option {key!r} (known: {sorted(_DISK_KEYS)})")
        if not sep and key != "read-only":
            raise argparse.ArgumentTypeError(f"disk option {key!r} needs a value")
        options[key] = value if sep else "true"
    if "name" not in options:
        raise argparse.ArgumentTypeError("a --disk needs name=")
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vblk", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="serve disks over NBD through the virtio-blk device model")
    run.add_argument("--name", default="disk0", help="disk (export) name [disk0]")
    run.add_argument("--backend", choices=("file", "memory"), default="file", help="[file]")
    run.add_argument("--image", type=Path, default=Path("disk.img"), help="raw image [disk.img]")
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
        "--disk",
        type=parse_disk,
        action="append",
        metavar="SPEC",
        help="a disk, name=N[,image=P][,size=S][,backend=file|memory][,read-only][,queues=Q]"
        "[,queue-size=Q][,io-mode=M]; repeatable; replaces --name/--image/--size",
    )
    run.add_argument(
        "--nbd-listen",
        action="append",
        metavar="HOST:PORT",
        help="NBD TCP listener; repeatable [127.0.0.1:10809]; 'none' disables TCP",
    )
    run.add_argument("--nbd-socket", metavar="PATH", help="also listen for NBD on a unix socket")
    run.add_argument("--guest-memory", type=parse_size, default="256M", help="guest RAM [256M]")
    run.add_argument("--log-level", default="info", help="debug, info, warning, error [info]")
    run.add_argument("--log-format", choices=("json", "console"), default="json", help="[json]")
    return parser


def _disks(args: argparse.Namespace) -> tuple[DiskSpec, ...]:
    defaults = {
        "backend": args.backend,
        "size": args.size,
        "read_only": args.read_only,
        "num_queues": args.queues,
        "queue_size": args.queue_size,
        "io_mode": args.io_mode,
    }
    if not args.disk:
        return (DiskSpec(name=args.name, path=args.image, **defaults),)
    disks = []
    for options in args.disk:
        name = options["name"]
        spec = dict(defaults)
        spec["path"] = Path(options.get("image", f"{name}.img"))
        if "size" in options:
            spec["size"] = parse_size(options["size"])
        if "backend" in options:
            spec["backend"] = options["backend"]
        if "read-only" in options:
            spec["read_only"] = options["read-only"].lower() in ("1", "true", "yes", "on")
        if "queues" in options:
            spec["num_queues"] = int(options["queues"])
        if "queue-size" in options:
            spec["queue_size"] = int(options["queue-size"])
        if "io-mode" in options:
            spec["io_mode"] = options["io-mode"]
        disks.append(DiskSpec(name=name, **spec))
    names = [d.name for d in disks]
    if len(set(names)) != len(names):
        raise ValueError(f"disk names must be unique: {names}")
    return tuple(disks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        return 2
    try:
        disks = _disks(args)
        for disk in disks:
            if disk.size <= 0 or disk.size % 512:
                raise ValueError(f"disk {disk.name}: size must be a positive multiple of 512")
            if disk.backend not in ("file", "memory"):
                raise ValueError(f"disk {disk.name}: backend must be file or memory")
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    logs.configure(args.log_level, args.log_format)
    listen = [a for a in (args.nbd_listen or ["127.0.0.1:10809"]) if a != "none"]
    if args.nbd_socket:
        listen.append(f"unix:{args.nbd_socket}")
    config = ServiceConfig(disks=disks, guest_memory=args.guest_memory, nbd_listen=tuple(listen))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
