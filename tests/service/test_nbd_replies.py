"""NBD reply framing against proto.md, without sockets: hypothesis properties over service.nbd.replies.

A small reference decoder reads the bytes the codec produces the way a client would, and the
properties check what proto.md asks of them: simple replies without structured replies; with
them, READ chunks that cover the request exactly, in order, without overlap, DONE only on the
last, one data chunk with DF; BLOCK_STATUS one chunk per context, extents merged and capped,
one for REQ_ONE; error chunks only where structured replies apply.
"""

from __future__ import annotations

import dataclasses
import itertools
import struct

from hypothesis import given
from hypothesis import strategies as st

from service.nbd import protocol as p
from service.nbd import replies as r
from service.nbd.constants import ChunkType, Command, CommandFlag, Errno

SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
DONE = 1


@dataclasses.dataclass
class Chunk:
    flags: int
    type: int
    cookie: int
    payload: bytes


def decode_simple(wire: bytes, data_len: int) -> tuple[int, int, bytes]:
    magic, error, cookie = struct.unpack_from(">IIQ", wire)
    assert magic == SIMPLE_MAGIC
    rest = wire[16:]
    assert len(rest) == (data_len if error == 0 else 0)
    return error, cookie, rest


def decode_structured(wire: bytes) -> list[Chunk]:
    chunks = []
    pos = 0
    while pos < len(wire):
        magic, flags, chunk_type, cookie, length = struct.unpack_from(">IHHQI", wire, pos)
        assert magic == STRUCTURED_MAGIC
        pos += 20
        chunks.append(Chunk(flags, chunk_type, cookie, wire[pos : pos + length]))
        pos += length
    assert pos == len(wire)
    assert chunks and all(c.flags & DONE == 0 for c in chunks[:-1]) and chunks[-1].flags & DONE
    return chunks


def join(chunks: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


@st.composite
def reads(draw: st.DrawFn) -> tuple[int, int, bytes, list[tuple[int, int, bool]]]:
    """A READ at ``offset``: its data and an allocation map of contiguous runs over it."""
    cookie = draw(st.integers(0, 2**64 - 1))
    offset = draw(st.integers(0, 2**40)) * 512
    sizes = draw(st.lists(st.integers(1, 4096), min_size=1, max_size=12))
    runs = []
    data = bytearray()
    pos = offset
    for size in sizes:
        hole = draw(st.booleans())
        runs.append((pos, size, hole))
        data += bytes(size) if hole else draw(st.binary(min_size=size, max_size=size))
        pos += size
    return cookie, offset, bytes(data), runs


@given(reads())
def test_a_read_without_structured_replies_is_one_simple_reply_then_the_data(
    read: tuple[int, int, bytes, list[tuple[int, int, bool]]],
) -> None:
    cookie, offset, data, runs = read
    out = r.read_reply(cookie, offset, False, memoryview(data), runs)
    assert decode_simple(join(out), len(data)) == (0, cookie, data)
    assert not r.wants_holes(False, 0, 1 << 20)


@given(reads())
def test_a_sparse_read_covers_the_request_in_order_with_holes_where_the_map_says(
    read: tuple[int, int, bytes, list[tuple[int, int, bool]]],
) -> None:
    cookie, offset, data, runs = read
    view = memoryview(data)
    out = r.read_reply(cookie, offset, True, view, runs)
    chunks = decode_structured(join(out))
    assert all(c.cookie == cookie for c in chunks)
    rebuilt = bytearray()
    position = offset
    previous = None
    for chunk in chunks:
        if chunk.type == ChunkType.OFFSET_DATA:
            (at,) = struct.unpack_from(">Q", chunk.payload)
            body = chunk.payload[8:]
        else:
            assert chunk.type == ChunkType.OFFSET_HOLE and len(chunk.payload) == 12
            at, hole_length = struct.unpack(">QI", chunk.payload)
            body = bytes(hole_length)
        assert at == position and body  # in order, no gap, no overlap, never empty
        assert chunk.type != previous  # runs of one kind are merged
        previous = chunk.type
        rebuilt += body
        position += len(body)
    assert bytes(rebuilt) == data and position == offset + len(data)
    holes_expected = any(hole for _, _, hole in runs)
    assert any(c.type == ChunkType.OFFSET_HOLE for c in chunks) == holes_expected
    # The data goes out as views of the caller's buffer, not copies.
    assert all(isinstance(c, bytes) or c.obj is data for c in out)


@given(reads(), st.integers(1, 512))
def test_a_map_that_does_not_cover_the_read_sends_the_data_whole(
    read: tuple[int, int, bytes, list[tuple[int, int, bool]]], cut: int
) -> None:
    cookie, offset, data, runs = read
    short = [*runs[:-1], (runs[-1][0], max(0, runs[-1][1] - cut), runs[-1][2])]
    shifted = [(o + 512, n, h) for o, n, h in runs]
    for bad in (short, shifted):
        [chunk] = decode_structured(join(r.read_reply(cookie, offset, True, data, bad)))
        assert chunk.type == ChunkType.OFFSET_DATA and chunk.payload == struct.pack(">Q", offset) + data


@given(flags=st.integers(0, 0xFFFF), length=st.integers(0, 1 << 25), structured=st.booleans())
def test_holes_are_asked_for_only_where_a_sparse_reply_is_allowed(
    flags: int, length: int, structured: bool
) -> None:
    wanted = r.wants_holes(structured, flags, length)
    assert wanted == (structured and length >= r.SPARSE_READ_MIN and not flags & CommandFlag.DF)


extents = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 3)), max_size=40)


@given(
    cookie=st.integers(0, 2**64 - 1),
    length=st.integers(1, 1 << 30),
    req_one=st.booleans(),
    contexts=st.dictionaries(st.integers(1, 2**32 - 1), extents, min_size=1, max_size=3),
)
def test_block_status_is_one_merged_chunk_per_context_then_done(
    cookie: int, length: int, req_one: bool, contexts: dict[int, list[tuple[int, int]]]
) -> None:
    flags = CommandFlag.REQ_ONE if req_one else 0
    chunks = decode_structured(join(r.block_status_reply(cookie, length, flags, list(contexts.items()))))
    assert chunks[-1].type == ChunkType.NONE and chunks[-1].payload == b""
    assert [c.type for c in chunks[:-1]] == [ChunkType.BLOCK_STATUS] * len(contexts)
    for chunk, (context_id, given_extents) in zip(chunks, contexts.items(), strict=False):
        (got_id,) = struct.unpack_from(">I", chunk.payload)
        assert got_id == context_id
        body = chunk.payload[4:]
        assert len(body) % 8 == 0
        pairs = [struct.unpack_from(">II", body, i) for i in range(0, len(body), 8)]
        assert pairs and all(n > 0 for n, _ in pairs)
        assert all(a[1] != b[1] for a, b in itertools.pairwise(pairs))  # merged
        assert len(pairs) <= r.MAX_EXTENTS
        nonempty = [(n, f) for n, f in given_extents if n]
        if req_one:
            assert len(pairs) == 1 and pairs[0][0] <= length
            assert pairs[0][1] == (nonempty[0][1] if nonempty else 0)
        elif nonempty:
            assert sum(n for n, _ in pairs) == sum(n for n, _ in nonempty)
        else:
            assert pairs == [(length, 0)]


@given(
    cookie=st.integers(0, 2**64 - 1),
    command=st.sampled_from(list(Command)),
    structured=st.booleans(),
    error=st.sampled_from(list(Errno)),
    message=st.text(max_size=5000),
)
def test_errors_are_chunks_only_where_structured_replies_apply(
    cookie: int, command: Command, structured: bool, error: Errno, message: str
) -> None:
    wire = r.error_reply(cookie, command, structured, error, message)
    ok = r.ok_reply(cookie, command, structured)
    if structured and command in (Command.READ, Command.BLOCK_STATUS):
        [chunk] = decode_structured(wire)
        assert chunk.type == ChunkType.ERROR and chunk.cookie == cookie
        code, text_length = struct.unpack_from(">IH", chunk.payload)
        assert code == error and text_length == len(chunk.payload) - 6 <= 4096
        assert message.encode().startswith(chunk.payload[6:])
        [done] = decode_structured(ok)
        assert done.type == ChunkType.NONE
    else:
        assert decode_simple(wire, 0) == (error, cookie, b"")
        assert decode_simple(ok, 0) == (0, cookie, b"")


@given(
    cookie=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**63 - 1),
    data_len=st.integers(0, 2**32 - 9),
    done=st.booleans(),
    error=st.integers(0, 2**32 - 1),
)
def test_reply_headers_have_the_layout_of_proto_md(
    cookie: int, offset: int, data_len: int, done: bool, error: int
) -> None:
    # Simple reply: magic, error, cookie. Structured OFFSET_DATA chunk: magic, flags, type,
    # cookie, length (offset + data), then the offset.
    assert r.encode_simple_reply(cookie, error) == struct.pack(">IIQ", SIMPLE_MAGIC, error, cookie)
    header = r.encode_offset_data(cookie, offset, data_len, done=done)
    assert header == struct.pack(">IHHQIQ", STRUCTURED_MAGIC, int(done), 1, cookie, 8 + data_len, offset)
    assert header == r.encode_chunk(cookie, ChunkType.OFFSET_DATA, 8 + data_len, done=done) + struct.pack(
        ">Q", offset
    )


def test_the_connection_replies_as_negotiated() -> None:
    """ServerConnection's reply_* follow what the client negotiated (structured or not)."""
    for structured in (False, True):
        conn = p.ServerConnection(catalog=_Catalog())
        conn.structured_replies = structured
        read = p.Request(5, Command.READ, 0, 4096, 512)
        out = join(conn.reply_read(read, memoryview(bytes(512))))
        if structured:
            [chunk] = decode_structured(out)
            assert chunk.type == ChunkType.OFFSET_DATA
        else:
            assert decode_simple(out, 512) == (0, 5, bytes(512))
        assert conn.wants_holes(p.Request(5, Command.READ, 0, 0, 1 << 20)) == structured


class _Catalog:
    def lookup(self, name: str) -> p.Export | None:
        return None

    def exports(self) -> list[p.Export]:
        return []
