"""The NBD server byte by byte: hostile framing, pipelining, draining, shutdown."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import tempfile

import pytest

from device.block.faults import FaultLayer, FaultPlan
from service import app, model
from service.nbd.constants import (
    NBD_REQUEST_MAGIC,
    Command,
    Errno,
    Option,
    Reply,
)
from tests.nbdclient import WireClient
from tests.service.conftest import MiB, NbdRig, run


async def test_unknown_option_keeps_sync_then_go_works(nbd_rig: NbdRig) -> None:
    client = await WireClient.connect(nbd_rig)
    client.option(99, b"junk data")
    option, reply, message = await client.option_reply()
    assert (option, reply) == (99, Reply.ERR_UNSUP)
    assert message
    client.option(Option.STARTTLS)
    assert (await client.option_reply())[1] == Reply.ERR_POLICY
    client.option(Option.LIST, b"x")
    assert (await client.option_reply())[1] == Reply.ERR_INVALID
    client.option(Option.INFO, struct.pack(">I", 7) + b"missing" + struct.pack(">H", 0))
    assert (await client.option_reply())[1] == Reply.ERR_UNKNOWN
    query = b"base:allocation"
    meta = struct.pack(">I", 5) + b"disk0" + struct.pack(">II", 1, len(query)) + query
    client.option(Option.SET_META_CONTEXT, meta)  # before structured replies: refused
    assert (await client.option_reply())[1] == Reply.ERR_INVALID
    await client.go()
    client.request(Command.READ, 1, 0, 512)
    assert await client.simple_reply(512) == (1, 0, bytes(512))
    client.close()


async def test_pipelined_requests_are_matched_by_cookie(nbd_rig: NbdRig) -> None:
    client = await WireClient.connect(nbd_rig)
    await client.go()
    blobs = {cookie: os.urandom(4096) for cookie in range(100, 164)}
    for cookie, blob in blobs.items():
        client.request(Command.WRITE, cookie, (cookie - 100) * 4096, 4096, payload=blob)
    replies = {(await client.simple_reply())[0:2] for _ in blobs}
    assert replies == {(cookie, 0) for cookie in blobs}
    for cookie in blobs:
        client.request(Command.READ, cookie + 1000, (cookie - 100) * 4096, 4096)
    got = {}
    for _ in blobs:
        cookie, error, data = await client.simple_reply(4096)
        assert error == 0
        got[cookie - 1000] = data
    assert got == blobs
    client.close()


async def test_rejected_write_payload_is_drained(nbd_rig: NbdRig) -> None:
    client = await WireClient.connect(nbd_rig)
    await client.go()
    size = 64 * MiB
    # Out of range, then oversized (> 32 MiB): both payloads must be skipped, not parsed.
    client.request(Command.WRITE, 1, size - 512, 4096, payload=b"\x25" * 4096)
    client.request(
        Command.WRITE, 2, 0, 33 * MiB, payload=struct.pack(">I", NBD_REQUEST_MAGIC) * (33 * MiB // 4)
    )
    client.request(Command.WRITE, 3, 0, 512, flags=1 << 9, payload=b"\x77" * 512)  # unknown flag
    client.request(Command.READ, 4, 0, 512)
    assert await client.simple_reply() == (1, Errno.ENOSPC, b"")
    assert await client.simple_reply() == (2, Errno.EINVAL, b"")
    assert await client.simple_reply() == (3, Errno.EINVAL, b"")
    assert await client.simple_reply(512) == (4, 0, bytes(512))
    client.close()


async def test_unknown_command_and_zero_length(nbd_rig: NbdRig) -> None:
    client = await WireClient.connect(nbd_rig)
    await client.go()
    client.request(42, 1, 0, 512)
    client.request(Command.READ, 2, 0, 0)
    client.request(Command.TRIM, 3, 64 * MiB, 512)
    client.request(Command.BLOCK_STATUS, 4, 0, 512)  # no meta context selected
    client.request(Command.READ, 5, 0, 512)
    assert await client.simple_reply() == (1, Errno.EINVAL, b"")
    assert await client.simple_reply() == (2, Errno.EINVAL, b"")
    assert await client.simple_reply() == (3, Errno.EINVAL, b"")
    assert await client.simple_reply() == (4, Errno.EINVAL, b"")
    assert (await client.simple_reply(512))[:2] == (5, 0)
    client.close()


async def test_bad_magic_closes_only_that_connection(nbd_rig: NbdRig) -> None:
    good = await WireClient.connect(nbd_rig)
    await good.go()
    bad = await WireClient.connect(nbd_rig)
    await bad.go()
    bad.writer.write(struct.pack(">IHHQQI", 0xDEADBEEF, 0, Command.READ, 1, 0, 512))
    assert await bad.closed()
    truncated = await WireClient.connect(nbd_rig)
    await truncated.go()
    truncated.writer.write(
        struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, Command.WRITE, 9, 0, 4096) + b"\x01" * 100
    )
    truncated.writer.close()  # hangs up mid-payload
    bad_option = await WireClient.connect(nbd_rig)
    bad_option.writer.write(struct.pack(">QII", 0x1234, Option.GO, 0))
    assert await bad_option.closed()
    await asyncio.sleep(0.05)
    good.request(Command.WRITE, 7, 4096, 512, payload=b"\x09" * 512)
    assert await good.simple_reply() == (7, 0, b"")
    good.request(Command.READ, 8, 4096, 512)
    assert await good.simple_reply(512) == (8, 0, b"\x09" * 512)
    assert nbd_rig.service.nbd is not None
    for _ in range(50):
        if nbd_rig.service.nbd.connections == 1:
            break
        await asyncio.sleep(0.02)
    assert nbd_rig.service.nbd.connections == 1
    good.close()


async def test_unknown_client_flags_and_export_name_fallback(nbd_rig: NbdRig) -> None:
    reader, writer = await asyncio.open_unix_connection(nbd_rig.socket)
    await reader.readexactly(18)
    writer.write(struct.pack(">I", 1 << 7))
    assert await reader.read(1) == b""
    writer.close()
    client = await WireClient.connect(nbd_rig)
    client.option(Option.EXPORT_NAME, b"disk0")
    size, flags = struct.unpack(">QH", await client.reader.readexactly(10))  # NO_ZEROES: no padding
    assert size == 64 * MiB and flags & 1
    client.request(Command.READ, 1, 0, 512)
    assert (await client.simple_reply(512))[:2] == (1, 0)
    client.request(Command.DISC, 2, 0, 0)
    assert await client.closed()
    unknown = await WireClient.connect(nbd_rig)
    unknown.option(Option.EXPORT_NAME, b"nope")
    assert await unknown.closed()


async def test_shutdown_answers_eshutdown(nbd_rig: NbdRig) -> None:
    client = await WireClient.connect(nbd_rig)
    await client.go()
    assert nbd_rig.service.nbd is not None
    nbd_rig.service.nbd.state.closing = True
    client.request(Command.WRITE, 1, 0, 512, payload=b"\x01" * 512)
    client.request(Command.READ, 2, 0, 512)
    assert await client.simple_reply() == (1, Errno.ESHUTDOWN, b"")
    assert await client.simple_reply() == (2, Errno.ESHUTDOWN, b"")
    nbd_rig.service.nbd.state.closing = False
    client.close()


async def test_device_io_error_is_eio_and_the_connection_goes_on() -> None:
    bad_region = FaultPlan(read_errno=errno.EIO, region=(1 * MiB, 4 * MiB))  # a bad stretch of media
    with tempfile.TemporaryDirectory(prefix="vblk-") as tmp:
        config = model.ServiceConfig(
            disks=(model.DiskSpec(name="disk0", backend="memory", size=4 * MiB),),
            guest_memory=64 * MiB,
            nbd_listen=(f"unix:{tmp}/s",),
        )
        service = app.Service(config, wrap_stack=lambda spec, backend: FaultLayer(backend, bad_region))
        await service.start()
        await service.start_front_ends()
        try:
            rig = NbdRig(service, f"{tmp}/s", 0)
            client = await WireClient.connect(rig)
            await client.go()
            client.request(Command.READ, 1, 2 * MiB, 4096)
            assert await client.simple_reply() == (1, Errno.EIO, b"")
            client.request(Command.READ, 2, 0, 4096)
            assert await client.simple_reply(4096) == (2, 0, bytes(4096))
            stats = service.disks["disk0"].driver.statistics()
            assert stats.requests[("read", "ioerr")] == 1
            client.close()
        finally:
            await service.stop()


async def test_a_read_over_the_maximum_payload_is_einval(nbd_rig: NbdRig) -> None:
    """EOVERFLOW is for a DF read that cannot go in one chunk (proto.md); an oversized READ
    without DF is the client's error, and the connection goes on."""
    client = await WireClient.connect(nbd_rig)
    await client.go()
    client.request(Command.READ, 1, 0, (32 << 20) + 512)
    assert await client.simple_reply() == (1, Errno.EINVAL, b"")
    client.request(Command.READ, 2, 0, 512)
    assert await client.simple_reply(512) == (2, 0, bytes(512))
    client.close()


async def test_an_unknown_export_is_logged_with_the_name_asked_for(
    nbd_rig: NbdRig, caplog: pytest.LogCaptureFixture
) -> None:
    result = await run("nbdinfo", nbd_rig.uri("no-such-disk"), check=False)
    assert result.returncode != 0
    refused = [
        r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg["event"] == "nbd_option_refused"
    ]
    assert refused, [r.getMessage() for r in caplog.records]
    assert refused[0]["reply"] == "NBD_REP_ERR_UNKNOWN" and "'no-such-disk'" in refused[0]["message"]
    assert refused[0]["option"] in ("NBD_OPT_GO", "NBD_OPT_INFO")
    assert refused[0]["level"] == "warning"


async def test_nbd_log_lines_write_the_peer_as_host_port(
    nbd_rig: NbdRig, caplog: pytest.LogCaptureFixture
) -> None:
    await run("nbdinfo", nbd_rig.tcp_uri())
    await run("nbdinfo", nbd_rig.uri())
    peers = [
        r.msg["peer"]
        for r in caplog.records
        if isinstance(r.msg, dict) and r.msg["event"] == "nbd_connection"
    ]
    assert len(peers) == 2, peers
    host, _, port = peers[0].rpartition(":")
    assert host == "127.0.0.1" and port.isdigit() and int(port) > 0
    assert peers[1] == f"unix:{nbd_rig.socket}"  # an unnamed unix client: which socket it came in by
