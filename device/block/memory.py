"""The memory node: a sparse in-RAM disk for tests and benchmarks.

Block layer, a storage node. Blocking (done when the call returns). Data lives in fixed-size
chunks; a missing chunk is a hole that reads as zeroes, so a large disk costs nothing until
written.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from device.block.node import BlockError, BlockingNode, Capabilities, Extent, check_access

CHUNK = 64 * 1024


class MemoryNode(BlockingNode):
    """A disk of ``size`` bytes held in memory (lost when the process exits)."""

    kind = "memory"

    def __init__(self, size: int, read_only: bool = False) -> None:
        if size < 0 or size % 512:
            raise ValueError("size must be a non-negative multiple of 512")
        super().__init__(size, read_only)
        self._chunks: dict[int, bytearray] = {}
        self._lock = threading.Lock()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(read_only=self._read_only)  # zeroing memory is cheaper than a copy

    def describe(self) -> dict[str, Any]:
        return {"node": self.kind, "size": self._size, "read_only": self._read_only}

    def _check(self, offset: int, length: int, write: bool) -> None:
        check_access("memory disk", self._size, self._read_only, offset, length, write)

    def _spans(self, offset: int, buffers: Sequence[memoryview]) -> Iterator[tuple[memoryview, int, int]]:
        """The pieces of ``buffers`` laid from ``offset`` on: (piece, chunk index, offset within)."""
        for buf in buffers:
            pos = 0
            n = buf.nbytes
            while pos < n:
                index, within = divmod(offset, CHUNK)
                take = min(n - pos, CHUNK - within)
                yield buf[pos : pos + take], index, within
                pos += take
                offset += take

    def read_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._check(offset, sum(b.nbytes for b in buffers), False)
        chunks = self._chunks
        for piece, index, within in self._spans(offset, buffers):
            chunk = chunks.get(index)
            if chunk is None:
                piece[:] = bytes(piece.nbytes)
            else:
                piece[:] = chunk[within : within + piece.nbytes]

    def write_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._check(offset, sum(b.nbytes for b in buffers), True)
        with self._lock:
            chunks = self._chunks
            for piece, index, within in self._spans(offset, buffers):
                chunk = chunks.get(index)
                if chunk is None:
                    chunk = chunks[index] = bytearray(CHUNK)
                chunk[within : within + piece.nbytes] = piece

    def _zero(self, offset: int, length: int) -> None:
        with self._lock:
            end = offset + length
            while offset < end:
                index, within = divmod(offset, CHUNK)
                take = min(end - offset, CHUNK - within)
                if take == CHUNK:
                    self._chunks.pop(index, None)
                else:
                    chunk = self._chunks.get(index)
                    if chunk is not None:
                        chunk[within : within + take] = bytes(take)
                offset += take

    def zero_now(self, offset: int, length: int, may_unmap: bool) -> None:
        self._check(offset, length, True)
        self._zero(offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        self._check(offset, length, False)
        out: list[Extent] = []
        end = offset + length
        pos = offset
        while pos < end:
            index, within = divmod(pos, CHUNK)
            take = min(end - pos, CHUNK - within)
            hole = index not in self._chunks
            if out and out[-1].hole == hole:
                last = out[-1]
                out[-1] = Extent(last.offset, last.length + take, hole, hole)
            else:
                out.append(Extent(pos, take, hole, hole))
            pos += take
        return out

    def resize(self, new_size: int) -> None:
        if new_size < 0 or new_size % 512:
            raise ValueError("size must be a non-negative multiple of 512")
        if self._read_only:
            raise BlockError(errno.EROFS, "memory disk is read-only")
        with self._lock:
            if new_size < self._size:
                last = new_size // CHUNK
                for index in [i for i in self._chunks if i > last or (i == last and new_size % CHUNK == 0)]:
                    del self._chunks[index]
                if new_size % CHUNK and last in self._chunks:
                    within = new_size % CHUNK
                    self._chunks[last][within:] = bytes(CHUNK - within)
            self._size = new_size

    def advise_willneed(self, offset: int, length: int) -> None:
        """Memory is always resident."""

    def close(self) -> None:
        self._chunks.clear()
