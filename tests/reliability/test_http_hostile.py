"""Hostile HTTP: oversized headers and request lines, garbage, lying lengths, odd methods and
names. Each gets a 4xx, nothing is written, and the service goes on answering."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from tests.reliability.conftest import FaultRig


async def raw(rig: FaultRig, request: bytes) -> bytes:
    host, port = rig.http.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


def status(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1."), reply[:100]
    return int(reply.split(b" ", 2)[1])


async def test_hostile_requests_get_4xx_and_write_nothing(fault_rig: FaultRig) -> None:
    disk = fault_rig.service.disks["disk0"].bytes
    await disk.write(0, b"\x33" * 4096)
    cases = [
        b"GET /v1/disks/disk0 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        b"PUT /v1/disks/disk0 HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"PUT /v1/disks/disk0 HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"BREW /v1/disks/disk0 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"GET /v1/disks/..%2f..%2fetc%2fshadow HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/disks/disk0%00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PUT /v1/disks/disk0?offset=99999999999999999999999 HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 1\r\n\r\nx",
        b"PUT /v1/disks/disk0 HTTP/1.1\r\nHost: x\r\nContent-Range: bytes 0-99/*\r\n"
        b"Content-Length: 150\r\n\r\n" + b"z" * 150,
        b"GET /v1/disks/disk0 HTTP/1.1\r\nHost: x\r\nRange: bytes=" + b"1-2," * 3000 + b"\r\n\r\n",
    ]
    for request in cases:
        reply = await raw(fault_rig, request)
        code = status(reply)
        assert 400 <= code < 500, (request[:60], reply[:200])
    assert await disk.read(0, 4096) == b"\x33" * 4096
    async with aiohttp.ClientSession() as http, http.get(f"{fault_rig.base_url}/healthz") as r:
        assert r.status == 200


def body_of(reply: bytes) -> bytes:
    return reply.partition(b"\r\n\r\n")[2]


async def test_hostile_values_get_a_json_4xx_and_write_nothing(fault_rig: FaultRig) -> None:
    """Past the HTTP parser every refusal is JSON, a stable code and a sentence: values that
    int(), isdigit(), json.loads() or struct.pack() would have taken, or crashed on."""
    disk = fault_rig.service.disks["disk0"].bytes
    await disk.write(0, b"\x33" * 4096)
    put = b"PUT /v1/disks/disk0/sectors/%s HTTP/1.1\r\nHost: x\r\nContent-Length: 512\r\n\r\n" + b"y" * 512

    def patch(body: bytes) -> bytes:
        return b"PATCH /v1/disks/disk0 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )

    cases = {
        b"GET /v1/disks/disk0/sectors/-5 HTTP/1.1\r\nHost: x\r\n\r\n": (400, b"bad_parameter"),
        put % b"-5": (400, b"bad_parameter"),
        put % b"%D9%A3": (400, b"bad_parameter"),  # Arabic-Indic three
        b"GET /v1/disks/disk0/sectors/0?count=%C2%B2 HTTP/1.1\r\nHost: x\r\n\r\n": (400, b"bad_parameter"),
        b"GET /v1/disks/disk0/sectors/99999999999999999999 HTTP/1.1\r\nHost: x\r\n\r\n": (
            400,
            b"bad_parameter",
        ),
        b"GET /v1/disks/disk0/sectors/9223372036854775807 HTTP/1.1\r\nHost: x\r\n\r\n": (
            416,
            b"range_not_satisfiable",
        ),
        b"GET /v1/disks/disk0 HTTP/1.1\r\nHost: x\r\nRange: bytes=\xd9\xa3-\r\n\r\n": (
            416,
            b"range_not_satisfiable",
        ),
        b"PUT /v1/disks/disk0?offset=1e3 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx": (
            400,
            b"bad_parameter",
        ),
        b"PUT /v1/disks/disk0?ofset=4096 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx": (
            400,
            b"bad_parameter",
        ),
        patch(b"[" * 60000): (400, b"bad_json"),  # Python's parser recursed into a 500
        patch(b'{"op": "zero", "offset": 0, "size": 1' + b"0" * 5000 + b"}"): (400, b"bad_field"),
        patch(b'{"op": "zero", "offset": NaN, "size": 1}'): (400, b"bad_json"),
        patch(b'{"op": "zero", "offset": 0, "size": 1, "op": "flush"}'): (400, b"bad_json"),
        b"GET /v1/disks/disk0/extents?context=dirty HTTP/1.1\r\nHost: x\r\n\r\n": (404, b"no_dirty_tracking"),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: tea\r\n\r\n": (417, b"expectation_failed"),
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\nExpect: tea\r\n\r\n": (417, b"expectation_failed"),
    }
    for request, (code, error) in cases.items():
        reply = await raw(fault_rig, request)
        assert status(reply) == code, (request[:80], reply[:300])
        assert b"Content-Type: application/json" in reply.partition(b"\r\n\r\n")[0], reply[:300]
        body = json.loads(body_of(reply))
        assert body["error"] == error.decode() and body["message"], body
        assert body_of(reply).endswith(b"\n")
    assert await disk.read(0, 4096) == b"\x33" * 4096
    async with aiohttp.ClientSession() as http, http.get(f"{fault_rig.base_url}/healthz") as r:
        assert r.status == 200
