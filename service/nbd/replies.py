"""NBD transmission replies, without I/O: what goes on the wire for a request's outcome.

Service layer, the reply half of the NBD codec (:class:`service.nbd.protocol.ServerConnection`
calls it; :mod:`service.nbd.server` only sends what comes back). The rules of proto.md live
here: simple or structured replies, DF (one data chunk), sparse READ replies (OFFSET_HOLE for
unallocated runs), BLOCK_STATUS extents merged, capped and cut to one for REQ_ONE, error chunks.
Data is passed through untouched (a view of the buffer the device read into goes straight out).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Final

from service.nbd.constants import (
    MAX_STRING,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_READ,
    NBD_REPLY_FLAG_DONE,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    SIMPLE_REPLY,
    STRUCTURED_REPLY,
    ChunkType,
)

#: Structured READs at least this long report unallocated runs as holes instead of zeroes.
SPARSE_READ_MIN: Final = 64 * 1024
#: Extents per BLOCK_STATUS chunk at most (proto.md allows 2^20; clients take far fewer).
MAX_EXTENTS: Final = 1 << 16

Chunk = bytes | memoryview

# -- headers ----------------------------------------------------------------------------------------

# Bound once (Final): compiled, ``SIMPLE_REPLY.pack`` would be a global and a method lookup.
_pack_simple_reply: Final = SIMPLE_REPLY.pack


def encode_simple_reply(cookie: int, error: int = 0) -> bytes:
    """A simple reply header; a successful READ's data follows it."""
    return _pack_simple_reply(NBD_SIMPLE_REPLY_MAGIC, error, cookie)


def encode_chunk(cookie: int, chunk_type: int, length: int, *, done: bool) -> bytes:
    return STRUCTURED_REPLY.pack(
        NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE if done else 0, chunk_type, cookie, length
    )


_HOLE: Final = struct.Struct(">QI")
_ERROR: Final = struct.Struct(">IH")
_EXTENT: Final = struct.Struct(">II")
_CONTEXT_ID: Final = struct.Struct(">I")

# A READ reply's chunk header and offset in one pack (STRUCTURED_REPLY's fields, then the offset):
# it is built for every structured READ.
_pack_offset_data: Final = struct.Struct(STRUCTURED_REPLY.format + "Q").pack
_OFFSET_DATA: Final = int(ChunkType.OFFSET_DATA)


def encode_offset_data(cookie: int, offset: int, data_len: int, *, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk; ``data_len`` data bytes follow it."""
    flags = NBD_REPLY_FLAG_DONE if done else 0
    return _pack_offset_data(NBD_STRUCTURED_REPLY_MAGIC, flags, _OFFSET_DATA, cookie, 8 + data_len, offset)


def encode_offset_hole(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    return encode_chunk(cookie, ChunkType.OFFSET_HOLE, _HOLE.size, done=done) + _HOLE.pack(offset, length)


def encode_error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    text = message.encode()[:MAX_STRING]
    body = _ERROR.pack(error, len(text)) + text
    return encode_chunk(cookie, ChunkType.ERROR, len(body), done=True) + body


def encode_done(cookie: int) -> bytes:
    return encode_chunk(cookie, ChunkType.NONE, 0, done=True)


def encode_block_status(
    cookie: int, context_id: int, extents: Iterable[tuple[int, int]], *, done: bool
) -> bytes:
    body = bytearray(_CONTEXT_ID.pack(context_id))
    for length, flags in extents:
        body += _EXTENT.pack(length, flags)
    return encode_chunk(cookie, ChunkType.BLOCK_STATUS, len(body), done=done) + bytes(body)


# -- the rules ------------------------------------------------------------------------------------


def _structured_command(command: int) -> bool:
    """Commands whose replies are structured once structured replies are negotiated."""
    return command in (NBD_CMD_READ, NBD_CMD_BLOCK_STATUS)


def error_reply(cookie: int, command: int, structured: bool, error: int, message: str) -> bytes:
    """A failed request: an error chunk (READ, BLOCK_STATUS, structured) or a simple reply."""
    if structured and _structured_command(command):
        return encode_error_chunk(cookie, error, message)
    return encode_simple_reply(cookie, error)


def ok_reply(cookie: int, command: int, structured: bool) -> bytes:
    """A request done, with nothing to return."""
    if structured and _structured_command(command):
        return encode_done(cookie)
    return encode_simple_reply(cookie)


def wants_holes(structured: bool, flags: int, length: int) -> bool:
    """Whether a READ's reply would say where the holes are (so the caller looks them up)."""
    return structured and length >= SPARSE_READ_MIN and not flags & NBD_CMD_FLAG_DF


def read_reply(
    cookie: int,
    offset: int,
    structured: bool,
    data: Chunk,
    holes: Sequence[tuple[int, int, bool]] | None = None,
) -> list[Chunk]:
    """A successful READ of ``data`` at ``offset``.

    ``holes``: the allocation map of the range as ``(offset, length, hole)`` runs, contiguous and
    in order, when :func:`wants_holes` said so; runs that do not cover the range exactly are
    ignored (the data goes out whole). Without structured replies: a simple reply, then the data.
    """
    length = len(data)
    if not structured:
        return [encode_simple_reply(cookie), data]
    if holes is None or not any(hole for _, _, hole in holes):
        return [encode_offset_data(cookie, offset, length, done=True), data]
    runs: list[tuple[int, int, bool]] = []
    covered = 0
    for run_offset, run_length, hole in holes:
        if runs and runs[-1][2] == hole:
            runs[-1] = (runs[-1][0], runs[-1][1] + run_length, hole)
        else:
            runs.append((run_offset, run_length, hole))
        covered += run_length
    if covered != length or runs[0][0] != offset:
        return [encode_offset_data(cookie, offset, length, done=True), data]
    view = data if isinstance(data, memoryview) else memoryview(data)
    out: list[Chunk] = []
    last = len(runs) - 1
    for i, (run_offset, run_length, hole) in enumerate(runs):
        if hole:
            out.append(encode_offset_hole(cookie, run_offset, run_length, done=i == last))
        else:
            rel = run_offset - offset
            out.append(encode_offset_data(cookie, run_offset, run_length, done=i == last))
            out.append(view[rel : rel + run_length])
    return out


def merge_extents(extents: Iterable[tuple[int, int]], length: int, flags: int) -> list[tuple[int, int]]:
    """``(length, flags)`` extents as BLOCK_STATUS sends them: neighbours with equal flags merged,
    at most :data:`MAX_EXTENTS`, exactly one no longer than ``length`` with REQ_ONE in ``flags``;
    an empty answer is one extent of ``length`` with no flags (always true)."""
    pairs: list[tuple[int, int]] = []
    for extent_length, extent_flags in extents:
        if not extent_length:
            continue
        if pairs and pairs[-1][1] == extent_flags:
            pairs[-1] = (pairs[-1][0] + extent_length, extent_flags)
        elif len(pairs) < MAX_EXTENTS:
            pairs.append((extent_length, extent_flags))
        else:
            break
    if not pairs:
        pairs = [(length, 0)]
    if flags & NBD_CMD_FLAG_REQ_ONE:
        pairs = [(min(pairs[0][0], length), pairs[0][1])]
    return pairs


def block_status_reply(
    cookie: int, length: int, flags: int, contexts: Sequence[tuple[int, Iterable[tuple[int, int]]]]
) -> list[Chunk]:
    """A BLOCK_STATUS answer: one chunk per selected context ``(id, extents)``, then DONE."""
    out: list[Chunk] = [
        encode_block_status(cookie, context_id, merge_extents(extents, length, flags), done=False)
        for context_id, extents in contexts
    ]
    out.append(encode_done(cookie))
    return out
