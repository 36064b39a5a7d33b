"""The REST sector API with real clients: aiohttp's client, curl, and nbdkit's curl plugin."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import re
import resource
import tempfile
from collections.abc import AsyncIterator

import aiohttp
import pytest
import structlog
from structlog.testing import capture_logs

from service.http.api import RestApi, routes
from service.http.errors import ErrorCode
from service.http.openapi import openapi_document
from service.http.params import declared_query
from tests.service.conftest import MiB, NbdRig, run

DISK0 = 64 * MiB
RO = 1 * MiB


@pytest.fixture
async def http(nbd_rig: NbdRig) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=nbd_rig.base_url) as session:
        yield session


async def _error(response: aiohttp.ClientResponse, status: int, code: str | None = None) -> dict[str, str]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    assert (await response.read()).endswith(b"\n")
    body = await response.json()
    assert set(body) == {"error", "message"} and body["message"]
    if code is not None:
        assert body["error"] == code
    return dict(body)


async def test_list_and_info(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/disks") as r:
        disks = {d["name"]: d for d in await r.json()}
    assert set(disks) == {"disk0", "ro"}
    assert disks["disk0"]["size"] == DISK0 and disks["disk0"]["read_only"] is False
    assert disks["ro"]["read_only"] is True and "ro" in disks["ro"]["features"]
    assert {"flush", "discard", "write_zeroes"} <= set(disks["disk0"]["features"])
    assert disks["disk0"]["sector_size"] == 512
    async with http.get("/v1/disks/disk0/info") as r:
        assert await r.json() == disks["disk0"]
    async with http.get("/v1/disks/nope/info") as r:
        await _error(r, 404, "no_such_disk")
    async with http.get("/v1/disks/..%2F..%2Fetc%2Fpasswd") as r:
        await _error(r, 404)


async def test_put_then_ranged_gets(http: aiohttp.ClientSession) -> None:
    data = os.urandom(3 * MiB + 123)
    offset = 1000  # unaligned on both ends
    headers = {"Content-Range": f"bytes {offset}-{offset + len(data) - 1}/*"}
    async with http.put("/v1/disks/disk0", data=data, headers=headers) as r:
        assert r.status == 200, await r.text()
        assert await r.json() == {"offset": offset, "written": len(data), "flushed": True}
    expected = bytes(offset) + data
    cases = {
        f"bytes=0-{len(expected) - 1}": (0, len(expected)),
        "bytes=999-1500": (999, 1501),
        f"bytes={DISK0 - 10}-": (DISK0 - 10, DISK0),
        "bytes=-7": (DISK0 - 7, DISK0),
        f"bytes={DISK0 - 5}-{DISK0 + 100}": (DISK0 - 5, DISK0),  # clamped
    }
    for header, (lo, hi) in cases.items():
        async with http.get("/v1/disks/disk0", headers={"Range": header}) as r:
            assert r.status == 206, header
            assert r.headers["Content-Range"] == f"bytes {lo}-{hi - 1}/{DISK0}"
            assert r.headers["Accept-Ranges"] == "bytes"
            assert int(r.headers["Content-Length"]) == hi - lo
            body = await r.read()
        want = expected[lo:hi] if hi <= len(expected) else bytes(hi - lo)
        assert body == want, header
    # ?offset= writes too; flush=n is accepted
    async with http.put("/v1/disks/disk0?offset=512&flush=n", data=b"\x77" * 512) as r:
        assert (await r.json())["flushed"] is False
    async with http.get("/v1/disks/disk0/sectors/1") as r:
        assert await r.read() == b"\x77" * 512


async def test_bad_ranges_are_416_and_nothing_breaks(http: aiohttp.ClientSession) -> None:
    for header in (
        f"bytes={DISK0}-",
        "bytes=5-2",
        "bytes=0-1,5-6",
        "bytes=abc",
        "bytes=-0",
        "bytes",
        "x" * 300,
    ):
        async with http.get("/v1/disks/disk0", headers={"Range": header}) as r:
            await _error(r, 416, "range_not_satisfiable")
            assert r.headers["Content-Range"] == f"bytes */{DISK0}"
    async with http.get("/v1/disks/ro", headers={"Range": "items=0-1"}) as r:  # other unit: ignored
        assert r.status == 200 and len(await r.read()) == RO
    async with http.head("/v1/disks/disk0") as r:
        assert r.status == 200 and int(r.headers["Content-Length"]) == DISK0
        assert r.headers["Accept-Ranges"] == "bytes" and await r.read() == b""


async def test_put_errors_write_nothing(http: aiohttp.ClientSession, nbd_rig: NbdRig) -> None:
    disk = nbd_rig.service.disks["disk0"].bytes
    await disk.write(0, b"\xaa" * 4096)

    async def unchanged() -> None:
        assert await disk.read(0, 4096) == b"\xaa" * 4096

    cases = [
        ({"Content-Range": "bytes 0-99/*"}, b"x" * 50, 400, "length_mismatch"),
        ({"Content-Range": "bytes 0-99"}, b"x" * 100, 400, "bad_content_range"),
        ({"Content-Range": "bytes 9-0/*"}, b"x" * 10, 400, "bad_content_range"),
        ({"Content-Range": f"bytes {DISK0 - 10}-{DISK0 + 9}/*"}, b"x" * 20, 416, "range_not_satisfiable"),
        ({"Content-Range": "bytes 0-9/12345"}, b"x" * 10, 400, "bad_content_range"),
    ]
    for headers, body, status, code in cases:
        async with http.put("/v1/disks/disk0", data=body, headers=headers) as r:
            await _error(r, status, code)
        await unchanged()
    async with http.put("/v1/disks/disk0?offset=-1", data=b"x") as r:
        await _error(r, 400)
    async with http.put("/v1/disks/disk0?flush=maybe", data=b"x") as r:
        await _error(r, 400)
    async with http.put("/v1/disks/ro", data=b"x" * 512) as r:
        await _error(r, 403, "read_only")

    async def chunked() -> AsyncIterator[bytes]:
        yield b"x" * 10

    async with http.put("/v1/disks/disk0", data=chunked()) as r:
        await _error(r, 411, "length_required")
    await unchanged()

    async def longer() -> AsyncIterator[bytes]:
        yield b"x" * 10
        yield b"y" * 10

    async with http.put("/v1/disks/disk0", data=longer(), headers={"Content-Range": "bytes 0-9/*"}) as r:
        error = await _error(r, 400, "length_mismatch")  # chunked: only the body's end says how long
        assert error["message"] == "the body is longer than the 10 bytes of Content-Range"
    await unchanged()
    # A body that ends early (the client half-closes): nothing of it is written; the answer, if
    # the client still reads one, is 400.
    host, port = nbd_rig.http.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"PUT /v1/disks/disk0 HTTP/1.1\r\nHost: x\r\nContent-Range: bytes 0-999/*\r\n"
        b"Content-Length: 1000\r\nConnection: close\r\n\r\n" + b"z" * 600
    )
    writer.write_eof()
    reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert reply == b"" or (reply.startswith(b"HTTP/1.1 400") and b'"short_body"' in reply), reply[:200]
    await unchanged()
    async with http.get("/v1/disks/disk0/sectors/0?count=8") as r:  # the service goes on
        assert await r.read() == b"\xaa" * 4096


async def test_patch_zero_discard_flush_and_extents(http: aiohttp.ClientSession) -> None:
    async with http.put("/v1/disks/disk0?offset=0", data=b"\x11" * (2 * MiB)) as r:
        assert r.status == 200
    async with http.patch("/v1/disks/disk0", json={"op": "zero", "offset": 100, "size": 1000}) as r:
        assert r.status == 200 and (await r.json())["op"] == "zero"
    async with http.get("/v1/disks/disk0", headers={"Range": "bytes=0-2047"}) as r:
        assert await r.read() == b"\x11" * 100 + bytes(1000) + b"\x11" * 948
    async with http.patch(
        "/v1/disks/disk0", json={"op": "discard", "offset": MiB, "size": MiB, "flush": True}
    ) as r:
        assert r.status == 200
    async with http.patch("/v1/disks/disk0", json={"op": "flush"}) as r:
        assert r.status == 200
    async with http.get("/v1/disks/disk0/extents") as r:
        extents = await r.json()
    assert extents[0]["start"] == 0 and sum(e["length"] for e in extents) == DISK0
    for a, b in itertools.pairwise(extents):
        assert a["start"] + a["length"] == b["start"]
    hole_at_1m = [e for e in extents if e["start"] <= MiB < e["start"] + e["length"]]
    assert hole_at_1m[0]["hole"] and hole_at_1m[0]["zero"]
    assert not extents[0]["hole"]
    async with http.get(f"/v1/disks/disk0/extents?offset={MiB}&length=4096") as r:
        assert await r.json() == [{"start": MiB, "length": 4096, "zero": True, "hole": True}]
    bad = [
        (b"not json", 400, "bad_json"),
        (json.dumps([1]).encode(), 400, "bad_json"),
        (json.dumps({"op": "melt"}).encode(), 400, "bad_op"),
        (json.dumps({"op": "zero", "offset": -1, "size": 1}).encode(), 400, "bad_field"),
        (json.dumps({"op": "zero", "offset": 0, "size": True}).encode(), 400, "bad_field"),
        (json.dumps({"op": "zero", "offset": DISK0, "size": 1}).encode(), 416, "range_not_satisfiable"),
        (json.dumps({"op": "zero", "offset": 0, "size": 1, "flush": "yes"}).encode(), 400, "bad_field"),
        (b"{" + b" " * 70000 + b"}", 413, "payload_too_large"),
    ]
    for body, status, code in bad:
        async with http.patch("/v1/disks/disk0", data=body) as r:
            await _error(r, status, code)
    async with http.patch("/v1/disks/ro", json={"op": "flush"}) as r:
        await _error(r, 403, "read_only")
    async with http.get(f"/v1/disks/disk0/extents?offset={DISK0}") as r:
        await _error(r, 416)


async def test_sectors(http: aiohttp.ClientSession) -> None:
    data = os.urandom(4 * 512)
    async with http.put("/v1/disks/disk0/sectors/10", data=data) as r:
        assert await r.json() == {"lba": 10, "sectors": 4, "flushed": True}
    async with http.get("/v1/disks/disk0/sectors/10?count=4") as r:
        assert r.content_type == "application/octet-stream" and await r.read() == data
    async with http.get("/v1/disks/disk0/sectors/11") as r:
        assert await r.read() == data[512:1024]
    last = DISK0 // 512 - 1
    async with http.get(f"/v1/disks/disk0/sectors/{last}?count=2") as r:
        await _error(r, 416)
    async with http.get(f"/v1/disks/disk0/sectors/{last + 1}") as r:
        await _error(r, 416)
    async with http.get("/v1/disks/disk0/sectors/x") as r:
        await _error(r, 400)
    async with http.get("/v1/disks/disk0/sectors/0?count=0") as r:
        await _error(r, 400)
    async with http.put("/v1/disks/disk0/sectors/0", data=b"x" * 100) as r:
        await _error(r, 400, "bad_length")
    async with http.put(f"/v1/disks/disk0/sectors/{last}", data=b"x" * 1024) as r:
        await _error(r, 416)
    async with http.put("/v1/disks/ro/sectors/0", data=b"x" * 512) as r:
        await _error(r, 403)


async def test_options_health_openapi_and_unknown_routes(
    http: aiohttp.ClientSession, nbd_rig: NbdRig
) -> None:
    async with http.options("/v1/disks/disk0") as r:
        assert set(r.headers["Allow"].split(", ")) == {"GET", "HEAD", "PUT", "PATCH", "OPTIONS"}
        assert "zero" in (await r.json())["features"]
    async with http.options("/v1/disks/ro") as r:
        assert set(r.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}
    async with http.get("/healthz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"
    async with http.get("/readyz") as r:
        assert r.status == 200 and (await r.json())["disks"] == {"disk0": True, "ro": True}
    async with http.post("/v1/disks/disk0") as r:
        body = await _error(r, 405, "method_not_allowed")
        assert "PUT" in r.headers["Allow"] and body["message"].startswith("this route takes only ")
    async with http.get("/v2/nothing") as r:
        await _error(r, 404, "not_found")
    # The OpenAPI document describes exactly the routes the application serves.
    async with http.get("/openapi.json") as r:
        document = await r.json()
    assert document["openapi"].startswith("3.")
    served: set[tuple[str, str]] = set()
    assert nbd_rig.service.http is not None
    for route in nbd_rig.service.http.app.router.routes():
        info = route.resource.canonical if route.resource is not None else ""
        served.add((route.method.lower(), info))
    described = {
        (method, path)
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "head", "put", "patch", "options", "post", "delete")
    }
    assert described == served


async def test_curl_prints_sector_zero_and_streams_big_gets(nbd_rig: NbdRig) -> None:
    disk = nbd_rig.service.disks["disk0"].bytes
    await disk.write(0, bytes(range(256)) * 2)
    out = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-f",
        "-r",
        "0-511",
        f"{nbd_rig.base_url}/v1/disks/disk0",
        stdout=asyncio.subprocess.PIPE,
    )
    raw, _ = await out.communicate()
    assert raw == bytes(range(256)) * 2
    # 404 from curl -f is an error exit, and the JSON explains it.
    missing = await run("curl", "-sS", f"{nbd_rig.base_url}/v1/disks/nope", check=False)
    assert json.loads(missing.stdout)["error"] == "no_such_disk"
    # A whole-disk GET streams: the server's memory does not grow with the disk.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        await run("curl", "-sS", "-f", "-o", f"{tmp}/all", f"{nbd_rig.base_url}/v1/disks/disk0", timeout=120)
        assert os.path.getsize(f"{tmp}/all") == DISK0
        with open(f"{tmp}/all", "rb") as f:
            assert f.read(512) == bytes(range(256)) * 2
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 24 * 1024, f"RSS grew by {grown_kib} KiB for a {DISK0 >> 20} MiB GET"
    # curl PUT with Content-Range, then read it back
    with tempfile.NamedTemporaryFile() as f:
        payload = os.urandom(100_000)
        f.write(payload)
        f.flush()
        await run(
            "curl", "-sS", "-f", "-X", "PUT", "-H", "Content-Range: bytes 5000-104999/*",
            "--data-binary", f"@{f.name}", f"{nbd_rig.base_url}/v1/disks/disk0",
        )  # fmt: skip
    assert await disk.read(5000, 100_000) == payload


async def test_nbdkit_curl_plugin_reads_the_disk_over_rest(nbd_rig: NbdRig) -> None:
    """nbdkit's curl plugin (HEAD, then ranged GETs) turns the REST API back into NBD."""
    pattern = os.urandom(RO)
    with tempfile.TemporaryDirectory(prefix="vblk-") as tmp:
        sock = f"{tmp}/curl.sock"
        nbdkit = await asyncio.create_subprocess_exec(
            "nbdkit", "-f", "-r", "-U", sock, "curl", f"{nbd_rig.base_url}/v1/disks/disk0",
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            await nbd_rig.service.disks["disk0"].bytes.write(0, pattern)
            for _ in range(100):
                if os.path.exists(sock):
                    break
                await asyncio.sleep(0.05)
            info = json.loads((await run("nbdinfo", "--json", f"nbd+unix:///?socket={sock}")).stdout)
            assert info["exports"][0]["export-size"] == DISK0
            await run("nbdcopy", f"nbd+unix:///?socket={sock}", f"{tmp}/copy.img", timeout=120)
            with open(f"{tmp}/copy.img", "rb") as f:
                copied = f.read()
            whole = await nbd_rig.service.disks["disk0"].bytes.read(0, DISK0)
            assert hashlib.sha256(copied).digest() == hashlib.sha256(whole).digest()
            assert copied[:RO] == pattern
        finally:
            nbdkit.terminate()
            await nbdkit.wait()


async def test_numbers_are_strict_and_never_a_500(http: aiohttp.ClientSession, nbd_rig: NbdRig) -> None:
    """A negative LBA used to reach the driver (struct.error, 500); "²" passed isdigit()."""
    disk = nbd_rig.service.disks["disk0"].bytes
    await disk.write(0, b"\x42" * 4096)
    for lba in ("-5", "-0", "+5", "%205", "1e3", "0x10", "1_0", "%D9%A3", "%C2%B2", "1.5", "9" * 30):
        async with http.get(f"/v1/disks/disk0/sectors/{lba}") as r:
            body = await _error(r, 400, "bad_parameter")
            assert body["message"].startswith("lba must be "), body
        async with http.put(f"/v1/disks/disk0/sectors/{lba}", data=b"x" * 512) as r:
            await _error(r, 400, "bad_parameter")
    for query in ("count=-1", "count=%C2%B2", "count=0x1", "count=65537", f"count={1 << 64}"):
        async with http.get(f"/v1/disks/disk0/sectors/0?{query}") as r:
            await _error(r, 400, "bad_parameter")
    for query in ("offset=-1", "offset=%D9%A3", "offset=+0", "offset=1e3", "flush=maybe", "flush="):
        async with http.put(f"/v1/disks/disk0?{query}", data=b"x") as r:
            await _error(r, 400, "bad_parameter")
    # A typo or a repeated parameter is refused, not ignored: this would have written at 0.
    for query in ("ofset=4096", "offset=0&offset=4096", "flush=n&flush=y"):
        async with http.put(f"/v1/disks/disk0?{query}", data=b"x" * 512) as r:
            await _error(r, 400, "bad_parameter")
    async with http.get(f"/v1/disks/disk0/sectors/{1 << 62}") as r:
        body = await _error(r, 416, "range_not_satisfiable")
        assert body["message"] == f"sector {1 << 62} is past the end of the disk ({DISK0 // 512} sectors)"
    assert await disk.read(0, 4096) == b"\x42" * 4096


async def test_range_messages_say_what_is_wrong(http: aiohttp.ClientSession) -> None:
    past = f"range starts at 2000000000, past the end of the disk ({DISK0} bytes)"
    cases = {
        "bytes=2000000000-": past,
        "bytes=2000000000-3000000000": past,
        "bytes=5-2": "range 5-2 ends before it starts",
        "bytes=0-1,5-6": "several ranges in one request are not supported: ask for one",
        "bytes=-0": "the suffix range bytes=-0 asks for no bytes",
        "bytes=\u0663-": "the byte range is malformed: want bytes=first-last, bytes=first- or bytes=-suffix",
        "bytes": "the Range header is malformed: want bytes=first-last, bytes=first- or bytes=-suffix",
    }
    for header, message in cases.items():
        async with http.get("/v1/disks/disk0", headers={"Range": header}) as r:
            body = await _error(r, 416, "range_not_satisfiable")
            assert body["message"] == message, header
            assert r.headers["Content-Range"] == f"bytes */{DISK0}"
    async with http.get("/v1/disks/disk0", headers={"Range": "bytes=0-3,"}) as r:  # an empty element
        assert r.status == 206 and r.headers["Content-Range"] == f"bytes 0-3/{DISK0}"
    async with http.put(
        "/v1/disks/disk0", data=b"x" * 10, headers={"Content-Range": f"bytes {DISK0}-{DISK0 + 9}/*"}
    ) as r:
        body = await _error(r, 416, "range_not_satisfiable")
        assert body["message"] == f"the write starts at {DISK0}, past the end of the disk ({DISK0} bytes)"
    async with http.patch("/v1/disks/disk0", json={"op": "zero", "offset": DISK0 - 1, "size": 2}) as r:
        body = await _error(r, 416, "range_not_satisfiable")
        assert (
            body["message"]
            == f"the zero of 2 bytes at {DISK0 - 1} runs past the end of the disk ({DISK0} bytes)"
        )
    async with http.get(f"/v1/disks/disk0/extents?offset={DISK0}") as r:
        body = await _error(r, 416, "range_not_satisfiable")
        assert body["message"] == f"offset {DISK0} is past the end of the disk ({DISK0} bytes)"


async def test_every_json_body_ends_with_a_newline(http: aiohttp.ClientSession) -> None:
    requests = [
        ("GET", "/v1/disks", None),
        ("GET", "/v1/disks/disk0/info", None),
        ("GET", "/v1/disks/disk0/extents", None),
        ("OPTIONS", "/v1/disks/disk0", None),
        ("GET", "/openapi.json", None),
        ("GET", "/healthz", None),
        ("GET", "/readyz", None),
        ("GET", "/ui/state.json", None),
        ("GET", "/v1/disks/disk0/rings", None),
        ("PUT", "/v1/disks/disk0/sectors/0", b"x" * 512),
        ("PATCH", "/v1/disks/disk0", json.dumps({"op": "flush"}).encode()),
        ("GET", "/v1/disks/nope", None),
        ("DELETE", "/v1/disks/disk0", None),
        ("GET", "/v1/disks/disk0/extents?context=dirty", None),
    ]
    for method, path, data in requests:
        async with http.request(method, path, data=data) as r:
            assert r.content_type == "application/json", (method, path)
            body = await r.read()
            assert body.endswith(b"\n") and not body.endswith(b"\n\n"), (method, path, body[-40:])
            json.loads(body)


async def test_options_and_extents_as_imageio_expects(http: aiohttp.ClientSession) -> None:
    async with http.options("/v1/disks/disk0") as r:
        options = await r.json()
    assert {"extents", "zero", "flush"} <= set(options["features"])
    assert options["max_readers"] == options["max_writers"] == 8
    assert "unix_socket" not in options  # no unix socket is served here
    async with http.get("/v1/disks/disk0/extents?context=zero") as r:
        assert r.status == 200 and sum(e["length"] for e in await r.json()) == DISK0
    async with http.get("/v1/disks/disk0/extents?context=dirty") as r:
        body = await _error(r, 404, "no_dirty_tracking")
        assert "context=dirty" in body["message"]
    async with http.get("/v1/disks/disk0/extents?context=bitmap") as r:
        await _error(r, 400, "bad_parameter")


async def test_expect_100_continue_and_other_expectations(http: aiohttp.ClientSession) -> None:
    async with http.put("/v1/disks/disk0/sectors/4", data=b"\x07" * 1024, expect100=True) as r:
        assert r.status == 200, await r.text()
    async with http.get("/v1/disks/disk0/sectors/4?count=2") as r:
        assert await r.read() == b"\x07" * 1024
    for path in ("/v1/disks/disk0/sectors/4", "/no/such/route"):
        async with http.get(path, headers={"Expect": "tea"}) as r:
            body = await _error(r, 417, "expectation_failed")
            assert body["message"] == "only Expect: 100-continue is understood"


async def test_log_lines_name_the_error_and_the_peer(http: aiohttp.ClientSession) -> None:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with http.get("/v1/disks/disk0/sectors/-5") as r:
            assert r.status == 400
        async with http.get("/v1/disks/nope") as r:
            assert r.status == 404
        async with http.post("/v1/disks/disk0") as r:
            assert r.status == 405
        async with http.get("/v1/disks/disk0/sectors/0") as r:
            assert r.status == 200
    lines = [e for e in logs if e["event"] == "http_request"]
    assert [(e["status"], e.get("error")) for e in lines] == [
        (400, "bad_parameter"),
        (404, "no_such_disk"),
        (405, "method_not_allowed"),
        (200, None),
    ]
    assert all(re.fullmatch(r"127\.0\.0\.1:[0-9]+", e["peer"]) for e in lines), lines
    assert {"method", "route", "status", "bytes_out", "seconds"} <= set(lines[0])


def test_openapi_lists_the_query_parameters_and_error_codes_the_handlers_take() -> None:
    """Each handler's declared query parameters (the middleware refuses others) are the ones
    the OpenAPI document describes; the Error schema names every code."""
    document = openapi_document()

    class _Unbound:
        pass

    for method, path, handler in routes(RestApi(_Unbound())):  # type: ignore[arg-type]
        item = document["paths"][path]
        parameters = [*item.get("parameters", []), *item[method.lower()].get("parameters", [])]
        described = {p["name"] for p in parameters if p["in"] == "query"}
        declared = declared_query(handler)
        if path.startswith("/v1/"):
            assert declared == frozenset(described), (method, path)
        else:
            assert declared is None and not described, (method, path)
    codes = document["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
    assert codes == [code.code for code in ErrorCode] and len(set(codes)) == len(codes)
