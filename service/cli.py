"""The ``vblk`` command line: ``serve``, ``create-image`` and ``info``.

Service layer entry point (console script ``vblk``). Every ``serve`` setting can also come
from a TOML file (``--config``) or a ``VBLK_*`` environment variable; see :mod:`service.config`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import uvloop

from device.backends.raw import RawFileBackend
from service import logs
from service.app import serve
from service.config import SETTINGS, ConfigError, from_sources, parse_disk, parse_size

_EPILOG = """\
Every serve option is also a TOML key in --config (nbd-listen = ["127.0.0.1:10809"]) and an
environment variable (VBLK_NBD_LISTEN=127.0.0.1:10809); flags beat the environment, which
beats the file. Disks in TOML: [[disk]] tables with the --disk keys. Examples:
  vblk serve                                   # 1 GiB sparse disk.img on 127.0.0.1:10809 and :8080
  vblk serve --disk name=db,image=db.img,size=8G --disk name=iso,image=a.iso,read-only
  nbdinfo nbd://127.0.0.1/      curl -r 0-511 http://127.0.0.1:8080/v1/disks/disk0 | xxd
"""


def _argument_type(convert: Callable[[str], object]) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vblk",
        description="vblk: a virtio-blk device model and driver, exported over NBD, REST and Prometheus.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "serve",
        help="serve disks over NBD and HTTP",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file [$VBLK_CONFIG]")
    for setting in SETTINGS:
        flag = "--" + setting.name
        default_text = "" if setting.default in (None, [], False) else f" [{setting.default}]"
        help_text = f"{setting.help}{default_text} (${setting.env})"
        if setting.convert is bool or setting.name == "read-only":
            run.add_argument(flag, action="store_const", const=True, default=None, help=help_text)
        elif setting.name == "disk":
            run.add_argument(
                flag,
                type=_argument_type(parse_disk),
                action="append",
                metavar=setting.metavar,
                help=f"{setting.help}; repeatable; replaces --name/--image/--size (${setting.env})",
            )
        elif setting.name in ("nbd-listen", "http-listen"):
            run.add_argument(flag, action="append", metavar=setting.metavar, help=help_text + "; repeatable")
        else:
            run.add_argument(flag, metavar=setting.metavar, default=None, help=help_text)
    create = sub.add_parser("create-image", help="create a sparse raw image")
    create.add_argument("path", type=Path)
    create.add_argument("--size", type=_argument_type(parse_size), required=True, help="512, 64M, 1G, ...")
    info = sub.add_parser("info", help="size and allocation of a raw image")
    info.add_argument("path", type=Path)
    return parser


def _create_image(path: Path, size: int) -> int:
    if size <= 0 or size % 512:
        print(f"vblk: size must be a positive multiple of 512, not {size}", file=sys.stderr)
        return 2
    if path.exists():
        print(f"vblk: {path} exists; not overwriting it", file=sys.stderr)
        return 1
    RawFileBackend.open(path, size=size).close()
    print(json.dumps({"path": str(path), "size": size}))
    return 0


def _info(path: Path) -> int:
    try:
        backend = RawFileBackend.open(path, size=None, read_only=True)
    except OSError as exc:
        print(f"vblk: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        extents = backend.extents(0, backend.size) if backend.size else []
        allocated = sum(e.length for e in extents if not e.hole)
        print(
            json.dumps(
                {
                    "path": str(path),
                    "size": backend.size,
                    "allocated": allocated,
                    "on_disk": os.stat(path).st_blocks * 512,
                    "extents": len(extents),
                }
            )
        )
    finally:
        backend.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "create-image":
        return _create_image(args.path, args.size)
    if args.command == "info":
        return _info(args.path)
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        config, values = from_sources(flags, config_file=args.config)
    except ConfigError as exc:
        parser.error(str(exc))
    logs.configure(values["log-level"], values["log-format"])
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
