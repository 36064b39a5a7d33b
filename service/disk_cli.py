"""``vblk disk list|show|add|remove|resize|throttle``: a running vblk's disks, from the shell.

Service layer, a client beside :mod:`service.cli` (which routes ``vblk disk`` here): it talks to
a running vblk's REST API (``--url``, or ``--socket`` for its unix socket; ``--token`` for a
bearer token; each also from ``VBLK_URL``, ``VBLK_SOCKET``, ``VBLK_TOKEN``) and never to its
internals. Disk options are written as ``--disk`` writes them (``name=db,size=8G,iops-total=500``).
Success prints one line (or with ``--json`` the API's answer) and exits 0; a refusal prints one
line, ``vblk disk VERB: error: MESSAGE (CODE)``, and exits 1, as ``virsh`` and ``rbd`` do; a usage
error exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from collections.abc import Mapping
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


def add_disk_parser(sub: Any) -> None:
    disk = sub.add_parser(
        "disk",
        help="list, add, remove, resize and throttle a running vblk's disks (its REST API)",
        description="Manage the disks of a running vblk through its REST API.",
    )
    disk.add_argument("--url", default=None, help=f"the REST API [{DEFAULT_URL}] ($VBLK_URL)")
    disk.add_argument("--socket", default=None, metavar="PATH", help="its unix socket instead ($VBLK_SOCKET)")
    disk.add_argument("--token", default=None, help="bearer token: an admin's to change disks ($VBLK_TOKEN)")
    disk.add_argument("--ca-file", type=Path, default=None, help="CA certificate for an https URL")
    disk.add_argument("--json", action="store_true", help="print the API's JSON answer")
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


def run_disk_command(args: argparse.Namespace) -> int:
    verb = args.verb
    try:
        answer = asyncio.run(_request(args))
    except DiskCommandError as exc:
        print(f"vblk disk {verb}: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
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


def _call(args: argparse.Namespace) -> tuple[str, str, dict[str, object] | None]:
    """The method, path and JSON body of the verb."""
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
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
        )
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
