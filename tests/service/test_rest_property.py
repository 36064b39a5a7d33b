"""Property: no request to any route makes the REST API fail.

Every route of :func:`service.http.api.routes`, every method (those a route does not take
too), arbitrary path segments, query strings, headers (Range, Content-Range, Content-Type,
Authorization, ...) and bodies, sent by aiohttp's client to the in-process service: never a
5xx (the memory backend has no I/O errors to report), never a traceback or a Python repr,
every error is JSON ``{"error": code, "message": sentence}`` with a documented code, every
JSON body ends with a newline, refused writes write nothing, the read-only disk never
changes, the log line of every refusal names its code, and a normal write and read
round-trip after each request.

Requests are well-formed HTTP with a true Content-Length (or chunked): what aiohttp's HTTP
parser refuses before the application sees it (a lying or malformed Content-Length, control
characters) is tests/reliability/test_http_hostile.py's. ``VBLK_HTTP_EXAMPLES`` raises the
number of examples (default 1000: about 20 s).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator, MutableMapping
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from yarl import URL

from service.http.api import RestApi, routes
from service.http.errors import ErrorCode
from service.model import DiskSpec
from service.security import Tokens
from tests.service.conftest import NbdRig, serving

KiB = 1 << 10
DISK0 = 256 * KiB
RO = 64 * KiB
CANARY = 64 * KiB
RW_TOKEN = "rw-property-0123456789"
RO_TOKEN = "ro-property-0123456789"
TOKENS = Tokens(((RW_TOKEN, "rw"), (RO_TOKEN, "ro")))
EXAMPLES = int(os.environ.get("VBLK_HTTP_EXAMPLES", "1000"))
CODES = {code.code for code in ErrorCode}
METHODS = ["GET", "HEAD", "PUT", "PATCH", "OPTIONS", "POST", "DELETE", "TRACE", "PROPFIND"]
REPR_MARKERS = ("Traceback", 'File "', " object at 0x", "<class ", "Error(", "b'", "\\x", "\\u")
PEER = re.compile(r"127\.0\.0\.1:[0-9]{1,5}")


def templates() -> list[str]:
    """The route table's paths, and a few no route serves."""

    class _Unbound:
        pass

    table = routes(RestApi(_Unbound()))  # type: ignore[arg-type]  # routes() only binds handlers
    return [*sorted({path for _, path, _ in table}), "/", "/v1", "/v1/disks/{name}/nothing", "/v2/{name}"]


# -- strategies ----------------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=24)
ascii_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24)
big = st.integers(min_value=0, max_value=1 << 70)
near = st.integers(min_value=-3, max_value=DISK0 + 3)
# Each of these int() takes, or isdigit() passes, or both: other scripts' digits among them.
tricky_numbers = st.sampled_from(
    ["", "-5", "-0", "+5", " 5", "5 ", "1e3", "0x10", "1_000", "\u0663", "\u00b2", "\uff15", "00012",
     "9" * 40, str(1 << 63), str((1 << 63) - 1), "1.5", "NaN", "inf", "0"]
)  # fmt: skip
number_text = st.one_of(near.map(str), big.map(str), tricky_numbers, text)
booleans = st.sampled_from(["y", "n", "yes", "no", "true", "false", "1", "0", "on", "off", "Y", "maybe", ""])


def segment(kind: str) -> st.SearchStrategy[str]:
    if kind == "name":
        return st.one_of(st.sampled_from(["disk0", "ro", "canary", "nope", "..", "disk0%00"]), text)
    if kind == "lba":
        return number_text
    return text


query_keys = st.one_of(st.sampled_from(["offset", "length", "count", "flush", "context", "size", "x"]), text)
query_values = st.one_of(number_text, booleans, st.sampled_from(["zero", "dirty", "ZERO"]), text)
query_pairs = st.lists(st.tuples(query_keys, st.one_of(st.none(), query_values)), max_size=4)


@st.composite
def range_header(draw: st.DrawFn) -> str:
    first, last = draw(st.one_of(near, big)), draw(st.one_of(near, big))
    header: str = draw(
        st.one_of(
            st.just(f"bytes={first}-{last}"),
            st.just(f"bytes={first}-"),
            st.just(f"bytes=-{last}"),
            st.just(f"bytes={first}-{last},{last}-"),
            st.builds(lambda t: f"bytes={t}", number_text),
            st.builds(lambda u: f"{u}=0-1", text),
            text,
        )
    )
    return header


@st.composite
def content_range_header(draw: st.DrawFn) -> str:
    first, last = draw(st.one_of(near, big)), draw(st.one_of(near, big))
    total = draw(st.one_of(st.just("*"), st.just(str(DISK0)), big.map(str), number_text))
    return draw(
        st.one_of(
            st.just(f"bytes {first}-{last}/{total}"),
            st.builds(lambda a, b: f"bytes {a}-{b}/*", number_text, number_text),
            st.just(f"bytes */{total}"),
            text,
        )
    )


header_values = {
    "Range": range_header(),
    "Content-Range": content_range_header(),
    "Content-Type": st.one_of(
        st.sampled_from(
            ["application/json", "application/octet-stream", "text/plain", "multipart/form-data"]
        ),
        text,
    ),
    "Authorization": st.one_of(
        st.sampled_from(
            [f"Bearer {RW_TOKEN}", f"Bearer {RO_TOKEN}", "Bearer", "Basic eA==", f"bearer  {RW_TOKEN}"]
        ),
        st.builds(lambda t: f"Bearer {t}", text),
        text,
    ),
    "Accept": st.one_of(st.sampled_from(["application/openmetrics-text", "*/*", "text/html"]), ascii_text),
    "Expect": st.sampled_from(["100-continue", "nothing"]),
    "X-Anything": text,
}
headers = st.fixed_dictionaries({}, optional=header_values)


def _json_value() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70), near,
        st.floats(allow_nan=False, allow_infinity=False), text,
    )  # fmt: skip
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=5)


patch_bodies = st.one_of(
    st.fixed_dictionaries(
        {"op": st.one_of(st.sampled_from(["zero", "discard", "flush", "melt"]), _json_value())},
        optional={
            "offset": _json_value(),
            "size": _json_value(),
            "flush": _json_value(),
            "extra": _json_value(),
        },
    ).map(lambda d: json.dumps(d).encode()),
    st.sampled_from(
        [
            b'{"op": "zero", "offset": 0, "size": 1, "size": 2}',
            b'{"op": "zero", "offset": NaN, "size": 1}',
            b'{"op": "flush"',
            b"[" * 5000,
            b'{"op": "zero", "offset": 1' + b"0" * 400 + b', "size": 1}',
            b'\xff\xfe{"op": "flush"}',
            b'{"op": "zero", "offset": 1e3, "size": 1}',
        ]
    ),
)
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=1536),
    st.integers(min_value=1, max_value=4).map(lambda n: bytes([n]) * (512 * n)),
    patch_bodies,
)


@dataclasses.dataclass
class Example:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    chunked: bool
    tokens: bool


@st.composite
def examples(draw: st.DrawFn) -> Example:
    template = draw(st.sampled_from(templates()))
    path = re.sub(r"\{(\w+)\}", lambda m: quote(draw(segment(m.group(1))), safe=""), template)
    pairs = draw(query_pairs)
    query = "&".join(
        quote(k, safe="") if v is None else f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs
    )
    return Example(
        method=draw(st.sampled_from(METHODS)),
        target=f"{path}?{query}" if query else path,
        headers=draw(headers),
        body=draw(bodies),
        chunked=draw(st.booleans()),
        tokens=draw(st.booleans()),
    )


# -- the property --------------------------------------------------------------------------------


@dataclasses.dataclass(repr=False)  # hypothesis prints the arguments of a failing example
class PropertyRig:
    rig: NbdRig
    http: aiohttp.ClientSession
    logs: list[MutableMapping[str, Any]]


@pytest.fixture
async def prop() -> AsyncIterator[PropertyRig]:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with serving(
            DiskSpec(name="disk0", backend="memory", size=DISK0),
            DiskSpec(name="ro", backend="memory", size=RO, read_only=True),
            DiskSpec(name="canary", backend="memory", size=CANARY),
        ) as rig:
            await rig.service.disks["disk0"].bytes.write(0, os.urandom(DISK0))  # zeroing shows
            timeout = aiohttp.ClientTimeout(total=20)
            async with aiohttp.ClientSession(base_url=rig.base_url, timeout=timeout) as http:
                yield PropertyRig(rig, http, logs)


async def _digest(rig: NbdRig, name: str) -> bytes:
    disk = rig.service.disks[name].bytes
    return hashlib.sha256(await disk.read(0, disk.size)).digest()


def _check_text(body: bytes) -> None:
    text = body.decode("utf-8", errors="replace")
    for marker in REPR_MARKERS:
        assert marker not in text, f"{marker!r} in {text[:300]!r}"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(example=examples())
async def test_no_request_makes_the_api_fail(prop: PropertyRig, example: Example) -> None:
    rig, http = prop.rig, prop.http
    rig.service.tokens = TOKENS if example.tokens else None
    writes = example.method in ("PUT", "PATCH")
    before = {name: await _digest(rig, name) for name in ("disk0", "ro")} if writes else {}
    logged = len(prop.logs)

    async def chunks() -> AsyncIterator[bytes]:
        yield example.body

    data: Any = chunks() if example.chunked else example.body
    async with http.request(
        example.method, URL(example.target, encoded=True), headers=example.headers, data=data
    ) as r:
        body = await r.read()
        status, content_type = r.status, r.content_type
        response_headers = r.headers.copy()

    assert status < 500, (status, body[:300])
    if content_type == "application/json" and example.method != "HEAD":
        assert body.endswith(b"\n"), body[-100:]
        document = json.loads(body)
    else:
        document = None
    if status >= 400:
        assert content_type == "application/json", (status, content_type, body[:200])
        if example.method != "HEAD":
            assert isinstance(document, dict) and set(document) == {"error", "message"}, body[:300]
            assert document["error"] in CODES, document
            assert isinstance(document["message"], str) and document["message"], document
            _check_text(body)
        if status == 416:
            assert re.fullmatch(r"bytes \*/[0-9]+", response_headers["Content-Range"])
        if status == 405:
            assert response_headers["Allow"]
        if status == 401:
            assert response_headers["WWW-Authenticate"].startswith("Bearer")
    elif content_type == "application/json":
        _check_text(body)
    if writes and status == 200 and isinstance(document, dict):  # a write took the whole body
        if "written" in document:
            assert document["written"] == len(example.body), (document, len(example.body))
        if "sectors" in document:
            assert document["sectors"] * 512 == len(example.body), (document, len(example.body))
    if writes:
        assert await _digest(rig, "ro") == before["ro"], "the read-only disk changed"
        if status >= 400:
            assert await _digest(rig, "disk0") == before["disk0"], f"a refused {example.method} wrote"

    # The request's canonical log line: the code of a refusal, the peer as host:port.
    lines = [e for e in prop.logs[logged:] if e["event"] == "http_request"]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line["status"] == status
    assert PEER.fullmatch(line["peer"]), line
    if status >= 400:
        assert line["error"] == (document["error"] if isinstance(document, dict) else line["error"])
        assert line["error"] in CODES
    else:
        assert "error" not in line
    assert not [e for e in prop.logs[logged:] if e["event"] == "http_handler_crashed"]

    # The service goes on: a normal write and read round-trip.
    rig.service.tokens = None
    payload = os.urandom(512)
    async with http.put("/v1/disks/canary/sectors/3?flush=n", data=payload) as r:
        assert r.status == 200, await r.text()
    async with http.get("/v1/disks/canary", headers={"Range": "bytes=1536-2047"}) as r:
        assert r.status == 206 and await r.read() == payload
