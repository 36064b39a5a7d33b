"""The ``vblk`` command line: ``serve``, ``create-image`` (raw or qcow2), ``info``, ``vhost-user`` and
``disk`` and ``bitmap`` (a running vblk's disks and bitmaps, :mod:`service.control_cli`).

Service layer entry point (console script ``vblk``). Every ``serve`` setting can also come
from a TOML file (``--config``) or a ``VBLK_*`` environment variable; see :mod:`service.config`.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes.util
import errno
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import uvloop

from device.block.file import FileNode
from device.block.qcow2 import Qcow2Node, create_image
from device.block.qcow2_header import DEFAULT_CLUSTER_BITS
from service import logs
from service.app import serve
from service.config import (
    SETTINGS,
    ConfigError,
    check_force_share,
    check_queues,
    check_size,
    from_sources,
    parse_bool,
    parse_disk,
    vhost_user_throttle,
)
from service.control_cli import add_control_parsers, run_control_command
from service.model import DEFAULT_IMAGE_SIZE, DiskSpec, ServiceConfig
from service.security import SecurityConfigError, Tokens
from service.values import DISK_NAME, parse_size
from service.vhost_user import VhostUserConfig, serve_vhost_user

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


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (the usage itself is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        shown = setting.shown_default
        default_text = f" [{shown}]" if shown else ""
        help_text = f"{setting.help}{default_text} (${setting.env})"
        if setting.convert is parse_bool:
            run.add_argument(flag, action="store_const", const=True, default=None, help=help_text)
        elif setting.name == "disk":
            run.add_argument(
                flag,
                type=_argument_type(parse_disk),
                action="append",
                metavar=setting.metavar,
                help=f"{setting.help}; repeatable; replaces --name and --image, the other disk flags "
                f"are its defaults (${setting.env})",
            )
        elif setting.name in ("nbd-listen", "http-listen"):
            run.add_argument(flag, action="append", metavar=setting.metavar, help=help_text + "; repeatable")
        else:
            run.add_argument(flag, metavar=setting.metavar, default=None, help=help_text)
    create = sub.add_parser("create-image", help="create a sparse raw image, or an empty qcow2 one")
    create.add_argument("path", type=Path)
    create.add_argument("--size", type=_argument_type(parse_size), required=True, help="512, 64M, 1G, ...")
    create.add_argument("--format", choices=("raw", "qcow2"), default="raw", help="the image's format")
    create.add_argument(
        "--cluster-size", type=_argument_type(parse_size), default=None, help="qcow2: 512 to 2M, default 64K"
    )
    create.add_argument("--backing", default=None, metavar="FILE", help="qcow2: the backing file, as stored")
    create.add_argument(
        "--backing-format", choices=("raw", "qcow2"), default=None, help="qcow2: the backing file's format"
    )
    info = sub.add_parser("info", help="size and allocation of an image (raw, or qcow2 with --format)")
    info.add_argument("path", type=Path)
    info.add_argument(
        "--format", choices=("raw", "qcow2"), default="raw", help="the image's format (never guessed)"
    )
    _add_vhost_user_parser(sub)
    add_control_parsers(sub)
    return parser


def _add_vhost_user_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    vhost = sub.add_parser(
        "vhost-user",
        help="serve the virtio-blk device to QEMU as a vhost-user back end",
        description="Serve vblk's virtio-blk device model on a vhost-user socket. QEMU connects with "
        "-object memory-backend-memfd,id=mem,size=RAM,share=on -numa node,memdev=mem "
        "-chardev socket,id=c0,path=SOCK -device vhost-user-blk-pci,chardev=c0,num-queues=N",
    )
    vhost.add_argument("--socket", type=Path, required=True, metavar="PATH", help="unix socket to listen on")
    vhost.add_argument("--image", type=Path, default=Path("disk.img"), metavar="PATH", help="raw image file")
    vhost.add_argument(
        "--size",
        type=_argument_type(parse_size),
        default=None,
        help="size of a new image [1G]; an existing image must have it, if given",
    )
    vhost.add_argument("--grow", action="store_true", help="grow an existing image smaller than --size")
    vhost.add_argument("--backend", choices=("file", "memory"), default="file", help="storage backend")
    vhost.add_argument("--read-only", action="store_true", help="export read-only (VIRTIO_BLK_F_RO)")
    vhost.add_argument(
        "--force-share",
        action="store_true",
        help="with --read-only: share the image with its writers (QEMU's force-share image locks)",
    )
    vhost.add_argument("--queues", type=int, default=1, metavar="N", help="virtqueues (QEMU num-queues) [1]")
    vhost.add_argument(
        "--queue-size",
        type=int,
        default=128,
        metavar="N",
        help="descriptors per ring (QEMU queue-size) [128]",
    )
    vhost.add_argument("--io-mode", choices=("inline", "thread"), default="inline")
    vhost.add_argument("--serial", default="vblk", help="the disk's serial (VIRTIO_BLK_T_GET_ID)")
    vhost.add_argument(
        "--throttle",
        default=None,
        metavar="LIMITS",
        help="I/O limits, QEMU's keys: iops-total=N,bps-write=N,... (K, M, G: binary units) [none]",
    )
    vhost.add_argument("--once", action="store_true", help="exit when the first front end disconnects")
    vhost.add_argument(
        "--http",
        default=None,
        metavar="ADDR",
        help="serve the control surface (GET /v1/disks, PATCH /v1/disks/NAME resize) on unix:PATH or "
        "HOST:PORT [none]",
    )
    vhost.add_argument("--name", default="disk0", help="the disk's name in the control surface [disk0]")
    vhost.add_argument(
        "--tokens-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="bearer tokens the control surface asks for",
    )
    vhost.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    vhost.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    vhost.add_argument(
        "--log-file",
        default=os.environ.get("VBLK_LOG_FILE") or None,
        metavar="FILE",
        help="also append every log line, as JSON, to FILE ($VBLK_LOG_FILE)",
    )


def _vhost_user(args: argparse.Namespace) -> int:
    try:
        if args.size is not None:
            check_size("vhost-user", args.size)
        check_queues("vhost-user", args.queues, args.queue_size)
        if args.force_share:
            check_force_share("vhost-user", args.backend, args.read_only)
        if not DISK_NAME.fullmatch(args.name):
            raise ConfigError(
                f"disk name {args.name!r}: use 1-64 of A-Z a-z 0-9 . _ - (not starting with . _ -)"
            )
        if args.http is not None and not args.http.startswith("unix:"):
            host, sep, port = args.http.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ConfigError(f"--http {args.http!r}: want unix:PATH or HOST:PORT")
        if args.tokens_file is not None:
            if args.http is None:
                raise ConfigError("--tokens-file is for the control surface: give --http too")
            Tokens.load(args.tokens_file)  # a bad file is a usage error, as for serve
        throttle = vhost_user_throttle(args.throttle)
    except (ConfigError, SecurityConfigError) as exc:
        print(f"vblk: {exc}", file=sys.stderr)
        return 2
    disk = DiskSpec(
        throttle=throttle,
        name=args.name,
        backend=args.backend,
        path=args.image,
        size=args.size if args.size is not None else DEFAULT_IMAGE_SIZE,
        size_explicit=args.size is not None,
        grow=args.grow,
        read_only=args.read_only,
        force_share=args.force_share,
        num_queues=args.queues,
        queue_size=args.queue_size,
        io_mode=args.io_mode,
    )
    config = VhostUserConfig(
        socket=args.socket,
        disk=disk,
        serial=args.serial,
        once=args.once,
        http=args.http,
        tokens_file=args.tokens_file,
    )
    logs.configure(args.log_level, args.log_format, log_file=args.log_file)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve_vhost_user(config))


def _create_image(args: argparse.Namespace) -> int:
    path: Path = args.path
    size: int = args.size
    try:
        check_size(str(path), size)
        if args.format == "raw" and (args.cluster_size or args.backing or args.backing_format):
            raise ConfigError("--cluster-size, --backing and --backing-format are for --format qcow2")
        if (args.backing is None) != (args.backing_format is None):
            raise ConfigError("--backing needs --backing-format (raw or qcow2): vblk never guesses a format")
    except ConfigError as exc:
        print(f"vblk: {exc}", file=sys.stderr)
        return 2
    if path.exists():
        print(f"vblk: {path} exists; not overwriting it", file=sys.stderr)
        return 1
    if args.format == "raw":
        FileNode.open(path, size=size).close()
        print(json.dumps({"path": str(path), "format": "raw", "size": size}))
        return 0
    try:
        if args.backing is not None:
            _check_backing(path, args.backing, args.backing_format)
        create_image(
            path,
            size,
            cluster_size=args.cluster_size or DEFAULT_CLUSTER_SIZE,
            backing=args.backing,
            backing_format=args.backing_format,
        )
        Qcow2Node.open(path, force_share=True).close()  # the chain opens
    except ValueError as bad:
        print(f"vblk: {path}: {bad}", file=sys.stderr)
        return 2
    except OSError as failed:
        if path.exists():
            path.unlink()
        print(f"vblk: {failed.strerror or failed}", file=sys.stderr)
        return 1
    facts: dict[str, object] = {"path": str(path), "format": "qcow2", "size": size}
    facts["cluster_size"] = args.cluster_size or DEFAULT_CLUSTER_SIZE
    if args.backing is not None:
        facts["backing"] = {"path": args.backing, "format": args.backing_format}
    print(json.dumps(facts))
    return 0


def _check_backing(path: Path, backing: str, backing_format: str) -> None:
    """The backing file exists where the new image will look for it."""
    target = Path(backing) if os.path.isabs(backing) else path.parent / backing
    if not target.is_file():
        raise FileNotFoundError(errno.ENOENT, f"backing file {target} does not exist", str(target))


def _info(path: Path, image_format: str = "raw") -> int:
    """An image's size and allocation as JSON; a qcow2 image's virtual size, its allocation in
    the whole chain (data, zero clusters excluded), its format's facts and backing chain."""
    backend: FileNode | Qcow2Node
    try:  # shares the image with its writers, like qemu-img info -U: a look, not a disk
        if image_format == "qcow2":
            backend = Qcow2Node.open(path, force_share=True)
        else:
            backend = FileNode.open(path, size=None, read_only=True, force_share=True)
    except OSError as exc:
        print(f"vblk: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        extents = backend.extents(0, backend.size) if backend.size else []
        allocated = sum(e.length for e in extents if not e.hole)
        facts: dict[str, object] = {
            "path": str(path),
            "format": image_format,
            "size": backend.size,
            "allocated": allocated,
            "on_disk": os.stat(path).st_blocks * 512,
            "extents": len(extents),
        }
        if isinstance(backend, Qcow2Node):
            described = backend.describe()
            keys = ("version", "cluster_size", "refcount_bits", "dirty", "backing")
            facts.update({key: described[key] for key in keys})
        print(json.dumps(facts))
    except OSError as exc:  # a damaged table
        print(f"vblk: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        backend.close()
    return 0


DEFAULT_CLUSTER_SIZE = 1 << DEFAULT_CLUSTER_BITS

TCMALLOC = "tcmalloc_minimal"


def _preload_tcmalloc(config: ServiceConfig, choice: str) -> None:
    """With an RBD disk, start this process over with tcmalloc preloaded (if installed).

    librbd allocates and frees several buffers of a few KiB per request, on its own threads and
    on the event loop's; glibc's malloc serves those from its bins, consolidating on the way,
    while tcmalloc keeps them in per-thread caches (QEMU builds with ``--enable-tcmalloc`` for the
    same reason, and Ceph's daemons link it). On the 2-CPU machine: 4 KiB QD32 reads through an
    RBD disk 20.9k -> 22.1k IOPS at 38.5 -> 34.8 us of vblk CPU per request. Not when
    ``LD_PRELOAD`` names an allocator already (tcmalloc after this exec, jemalloc...), nor with
    ``--malloc system``. ``os.execv`` keeps the pid, the open descriptors (systemd's sockets)
    and the environment.
    """
    if not any(disk.backend == "rbd" for disk in config.disks):
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if choice != "auto" or "malloc" in preload:
        return
    library = ctypes.util.find_library(TCMALLOC)
    if library is None:
        return  # not installed (libtcmalloc-minimal4): glibc's malloc then
    os.environ["LD_PRELOAD"] = f"{library} {preload}".strip()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "create-image":
        return _create_image(args)
    if args.command == "info":
        return _info(args.path, args.format)
    if args.command == "vhost-user":
        return _vhost_user(args)
    if args.command in ("disk", "bitmap"):
        return run_control_command(args)
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        config, values = from_sources(flags, config_file=args.config)
    except ConfigError as exc:
        print(f"vblk serve: error: {exc}", file=sys.stderr)
        return 2
    if argv is None:  # the process's own command line, which an exec can repeat
        _preload_tcmalloc(config, values["malloc"])
    logs.configure(values["log-level"], values["log-format"], log_file=values["log-file"])
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
