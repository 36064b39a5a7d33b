"""``vblk disk list|show|add|remove|resize|throttle`` and ``vblk bitmap ...``: a running vblk's
disks and dirty bitmaps, from the shell.

Service layer, a client beside :mod:`service.cli` (which routes ``vblk disk`` and ``vblk bitmap``
here): it talks to
a running vblk's REST API (``--url``, or ``--socket`` for its unix socket; ``--token`` for a
bearer token; each also from ``VBLK_URL``, ``VBLK_SOCKET``, ``VBLK_TOKEN``) and never to its
internals. Disk options are written as ``--disk`` writes them (``name=db,size=8G,iops-total=500``).
Success prints one line (or with ``--json`` the API's answer) and exits 0; a refusal prints one
line, ``vblk disk VERB: error: MESSAGE (CODE)``, and exits 1, as ``virsh`` and ``rbd`` do; a usage
error exits 2. Bitmap names and options are those of the REST routes (:mod:`service.http.bitmaps`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from service.config import ConfigError, parse_disk
from service.values import parse_size

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT = 120.0  # seconds: a remove waits for requests in flight (drain-timeout) and the guest


class DiskCommandError(Exception):
    """A refusal or failure, as the one line the command prints."""


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help=f"the REST API [{DEFAULT_URL}] ($VBLK_URL)")
    parser.add_argument(
        "--socket", default=None, metavar="PATH", help="its unix socket instead ($VBLK_SOCKET)"
    )
    parser.add_argument(
        "--token", default=None, help="bearer token ($VBLK_TOKEN); an admin's to change disks"
    )
    parser.add_argument("--ca-file", type=Path, default=None, help="CA certificate for an https URL")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")


def add_control_parsers(sub: Any) -> None:
    """``vblk disk`` and ``vblk bitmap``, under the ``vblk`` parser's subcommands ``sub``."""
    _add_disk_parser(sub)
    _add_bitmap_parser(sub)


def _add_disk_parser(sub: Any) -> None:
    disk = sub.add_parser(
        "disk",
        help="list, add, remove, resize and throttle a running vblk's disks (its REST API)",
        description="Manage the disks of a running vblk through its REST API.",
    )
    _connection_options(disk)
    verbs = disk.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", help="every disk: name, size, backend, PCI address, state, limits")
    show = verbs.add_parser("show", help="one disk, as JSON")
    show.add_argument("name")
    add = verbs.add_parser("add", help="add a disk live: its options as --disk writes them")
    add.add_argument("spec", help="name=N[,image=P][,size=S][,backend=B][,format=F][,iops-total=N]...")
    remove = verbs.add_parser("remove", help="remove a disk added live (drained, flushed, unplugged)")
    remove.add_argument("name")
    resize = verbs.add_parser("resize", help="grow a disk (or shrink it, with --shrink)")
    resize.add_argument("name")
    resize.add_argument("size", help="the new size: 64M, 20G, or bytes")
    resize.add_argument("--shrink", action="store_true", help="allow a smaller size: data past it is lost")
    throttle = verbs.add_parser("throttle", help="change a disk's I/O limits live (QEMU's names)")
    throttle.add_argument("name")
    throttle.add_argument("limits", help="KEY=VALUE,...: iops-total=500,bps-read=10M,group=G (0 removes one)")


def _add_bitmap_parser(sub: Any) -> None:
    bitmap = sub.add_parser(
        "bitmap",
        help="a running vblk's dirty bitmaps: list, add, remove, clear, enable, disable, merge, checkpoint",
        description="Manage the dirty bitmaps of a running vblk's disks through its REST API.",
    )
    _connection_options(bitmap)
    verbs = bitmap.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="a disk's bitmaps: name, granularity, state, dirty bytes")
    listing.add_argument("disk")
    add = verbs.add_parser("add", help="a new clean bitmap, recording every write from now on")
    checkpoint = verbs.add_parser("checkpoint", help="a new bitmap; every one recording until now stops")
    for parser in (add, checkpoint):
        parser.add_argument("disk")
        parser.add_argument("name")
        parser.add_argument("--granularity", default=None, help="bytes one bit covers (64K, ...)")
        parser.add_argument("--transient", action="store_true", help="not kept in the image")
    add.add_argument("--disabled", action="store_true", help="made not recording")
    for verb, what in (
        ("remove", "remove a bitmap"),
        ("clear", "clear a bitmap"),
        ("enable", "start recording"),
        ("disable", "stop recording"),
    ):
        parser = verbs.add_parser(verb, help=what)
        parser.add_argument("disk")
        parser.add_argument("name")
    merge = verbs.add_parser("merge", help="OR other bitmaps into one")
    merge.add_argument("disk")
    merge.add_argument("name")
    merge.add_argument("sources", nargs="+")


def run_control_command(args: argparse.Namespace) -> int:
    verb = args.verb
    try:
        answer = asyncio.run(_request(args))
    except DiskCommandError as exc:
        print(f"vblk {args.command} {verb}: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.command == "bitmap":
        print(_bitmap_summary(verb, args, answer))
    else:
        print(_summary(verb, args, answer))
    return 0


def _limits(text: str) -> dict[str, object]:
    limits: dict[str, object] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DiskCommandError(f"{item!r} is not KEY=VALUE")
        limits[key] = value  # sizes as "10M" too: the API reads them
    return limits


def _bitmap_call(args: argparse.Namespace) -> tuple[str, str, dict[str, object] | None]:
    verb = args.verb
    base = f"/v1/disks/{_quoted(args.disk)}"
    if verb == "list":
        return "GET", f"{base}/bitmaps", None
    at = f"{base}/bitmaps/{_quoted(args.name)}"
    if verb in ("add", "checkpoint"):
        body: dict[str, object] = {"name" if verb == "add" else "bitmap": args.name}
        if args.granularity is not None:
            try:
                body["granularity"] = parse_size(args.granularity)
            except ValueError as exc:
                raise DiskCommandError(f"granularity {args.granularity!r}: {exc}") from exc
        if args.transient:
            body["persistent"] = False
        if verb == "add":
            if args.disabled:
                body["disabled"] = True
            return "POST", f"{base}/bitmaps", body
        return "POST", f"{base}/checkpoints", body
    if verb == "remove":
        return "DELETE", at, None
    if verb == "merge":
        return "PATCH", at, {"op": "merge", "bitmaps": list(args.sources)}
    return "PATCH", at, {"op": verb}


def _call(args: argparse.Namespace) -> tuple[str, str, dict[str, object] | None]:
    """The method, path and JSON body of the verb."""
    if args.command == "bitmap":
        return _bitmap_call(args)
    verb = args.verb
    if verb == "list":
        return "GET", "/v1/disks", None
    if verb == "show":
        return "GET", f"/v1/disks/{_quoted(args.name)}/info", None
    if verb == "add":
        try:
            options: dict[str, object] = dict(parse_disk(args.spec))
        except (ConfigError, ValueError) as exc:
            raise DiskCommandError(str(exc)) from exc
        return "POST", "/v1/disks", options
    if verb == "remove":
        return "DELETE", f"/v1/disks/{_quoted(args.name)}", None
    if verb == "resize":
        try:
            parse_size(args.size)
        except ValueError as exc:
            raise DiskCommandError(f"size {args.size!r}: {exc}") from exc
        return (
            "PATCH",
            f"/v1/disks/{_quoted(args.name)}",
            {"op": "resize", "size": args.size, "shrink": args.shrink},
        )
    if verb == "throttle":
        return "PATCH", f"/v1/disks/{_quoted(args.name)}", {"op": "throttle", **_limits(args.limits)}
    raise DiskCommandError(f"unknown verb {verb}")


def _quoted(name: str) -> str:
    return quote(name, safe="")


async def _request(args: argparse.Namespace) -> Any:
    method, path, body = _call(args)
    socket_path = args.socket or os.environ.get("VBLK_SOCKET")
    url = (args.url or os.environ.get("VBLK_URL") or DEFAULT_URL).rstrip("/")
    token = args.token or os.environ.get("VBLK_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connector: aiohttp.BaseConnector
    if socket_path:
        connector = aiohttp.UnixConnector(path=socket_path)
        url = "http://vblk"
        where = f"unix:{socket_path}"
    else:
        context = ssl.create_default_context(cafile=str(args.ca_file)) if args.ca_file else None
        connector = aiohttp.TCPConnector(ssl=context if context is not None else True)
        where = url
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session,
            session.request(method, url + path, json=body) as response,
        ):
            text = await response.text()
            status = response.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise DiskCommandError(f"cannot reach vblk at {where}: {exc or type(exc).__name__}") from exc
    try:
        answer = json.loads(text) if text.strip() else None
    except ValueError:
        answer = None
    if status >= 400:
        if isinstance(answer, dict) and "message" in answer:
            raise DiskCommandError(f"{answer['message']} ({answer.get('error', status)})")
        raise DiskCommandError(f"HTTP {status} from {where}")
    return answer


def _size(n: object) -> str:
    if not isinstance(n, int):
        return "-"
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _limits_text(disk: Mapping[str, Any]) -> str:
    throttle = disk.get("throttle")
    if not isinstance(throttle, dict) or not throttle.get("limits"):
        return "-"
    limits = ",".join(f"{k}={v}" for k, v in sorted(throttle["limits"].items()))
    group = throttle.get("group")
    return limits if group == disk.get("name") else f"{limits} (group {group})"


def _summary(verb: str, args: argparse.Namespace, answer: Any) -> str:
    if verb == "list":
        rows = [("NAME", "SIZE", "BACKEND", "PCI", "STATE", "LIMITS")]
        for disk in answer:
            state = ("ready" if disk.get("ready") else "not ready") + (
                ", ro" if disk.get("read_only") else ""
            )
            rows.append(
                (disk["name"], _size(disk.get("size")), str(disk.get("backend")), str(disk.get("pci", "-")),
                 state, _limits_text(disk))
            )  # fmt: skip
        return _table(rows)
    if verb == "show":
        return json.dumps(answer, indent=2)
    if verb == "add":
        return f"added disk {answer['name']}: {_size(answer.get('size'))}, PCI {answer.get('pci')}"
    if verb == "remove":
        extra = ", the card pulled (surprise removal)" if answer.get("surprise_removal") else ""
        abandoned = answer.get("requests_abandoned")
        if abandoned:
            extra += f", {abandoned} requests abandoned"
        closed = answer.get("nbd_connections_closed", 0)
        return f"removed disk {answer['name']}: {closed} NBD connections closed{extra}"
    if verb == "resize":
        resize = answer.get("resize", {})
        return f"resized disk {args.name}: {_size(resize.get('old_size'))} -> {_size(resize.get('size'))}"
    limits = ",".join(f"{k}={v}" for k, v in sorted(answer.get("limits", {}).items())) or "none"
    return f"throttled disk {args.name}: group {answer.get('group')}, limits {limits}"


def _bitmap_summary(verb: str, args: argparse.Namespace, answer: Any) -> str:
    if verb == "list":
        rows = [("NAME", "GRANULARITY", "STATE", "PERSISTENT", "DIRTY")]
        for bitmap in answer.get("bitmaps", []):
            state = (
                "inconsistent"
                if bitmap.get("inconsistent")
                else ("recording" if bitmap.get("recording") else "disabled")
            )
            rows.append(
                (str(bitmap["name"]), _size(bitmap.get("granularity")), state,
                 "yes" if bitmap.get("persistent") else "no", str(bitmap.get("dirty_bytes", "-")))
            )  # fmt: skip
        return _table(rows)
    if verb == "remove":
        return f"removed bitmap {args.name} of disk {args.disk}"
    if verb == "checkpoint":
        stopped = ", ".join(answer.get("disabled", [])) or "none"
        return f"checkpoint {args.name} of disk {args.disk}: stopped recording: {stopped}"
    done = {
        "add": "added",
        "clear": "cleared",
        "enable": "enabled",
        "disable": "disabled",
        "merge": "merged into",
    }
    return f"{done[verb]} bitmap {args.name} of disk {args.disk}"


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )
