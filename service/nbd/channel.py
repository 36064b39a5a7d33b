"""An NBD connection's bytes: the asyncio protocol that moves them, zero-copy where it can.

Service layer, under :mod:`service.nbd.server` (which schedules requests) and beside the codec
(:mod:`service.nbd.protocol`, which frames them). A WRITE payload is received straight into the
buffer the ring will point at; READ replies leave from the device's buffer; everything written in
one pass of the event loop goes out in one ``writev``; a client waiting at queue depth 1 finds
the loop awake (adaptive busy polling).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final, cast

from service.addresses import format_peer
from service.blockio import IoBuffer, work_queue

_perf_counter: Final = time.perf_counter  # bound once: compiled, ``time.perf_counter`` is a lookup

READ_CHUNK: Final = 256 * 1024
MAX_BUFFERED: Final = 4 * READ_CHUNK  # unparsed bytes before the transport stops reading
WRITE_HIGH_WATER: Final = 1 << 20  # unsent reply bytes before replies wait (plus one reply at most)

_RECEIVE_BUFFER: Final = memoryview(bytearray(READ_CHUNK))
_IOV_MAX: Final = 1024


def _writev(fd: int, chunks: list[bytes | memoryview]) -> list[bytes]:
    """Write ``chunks`` to the non-blocking socket ``fd``; returns copies of what was not sent.

    Errors other than a full socket are left to the transport: it meets them again when it
    writes the rest, and reports them the usual way (connection_lost).
    """
    start = 0
    while start < len(chunks):
        batch = chunks[start : start + _IOV_MAX]
        try:
            sent = os.writev(fd, batch)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = -1
        if sent < 0:
            return [bytes(chunk) for chunk in chunks[start:]]
        for i, chunk in enumerate(batch):
            size = len(chunk)
            if sent < size:
                return [bytes(memoryview(chunk)[sent:]), *(bytes(c) for c in chunks[start + i + 1 :])]
            sent -= size
        start += _IOV_MAX
    return []


@dataclasses.dataclass(slots=True)
class PollCounts:
    """Busy polls for a client's next request: how many found one in time, how many did not."""

    hits: int = 0
    misses: int = 0


class Channel(asyncio.BufferedProtocol):
    """A connection's bytes: framing bytes are buffered, WRITE payloads land in guest memory.

    While a payload destination is armed (:meth:`readinto_exactly`), the transport's
    ``get_buffer`` hands out that memoryview, so the kernel copies the socket data
    straight into the DMA buffer the virtqueue will point at: no intermediate bytes.
    """

    def __init__(
        self,
        handler: Callable[[Channel], Coroutine[Any, Any, None]],
        poll: float = 0.0,
        poll_counts: PollCounts | None = None,
    ) -> None:
        self._handler = handler
        self._poll_max = poll  # the longest window (--nbd-poll-us)
        self._poll_window = poll  # this client's window now: adapts to how fast it asks again
        self._polled_until = 0.0  # when the last poll gave up; 0: none pending
        self._poll_counts = poll_counts if poll_counts is not None else PollCounts()
        self.transport: asyncio.Transport | None = None
        # Shared by every connection of the loop: buffer_updated copies out of it at once.
        self._recv = _RECEIVE_BUFFER
        self._pending = bytearray()  # received, not yet read: handed whole to the reader
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._target: memoryview | None = None
        self._target_pos = 0
        self._paused = False
        self._reading_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._out: list[bytes | memoryview] = []  # written, not yet handed to the transport
        self._out_bytes = 0
        self._owned: list[IoBuffer] = []  # buffers ``_out`` points into, freed once it is sent
        self._fd = -1  # the socket, written directly while the transport holds nothing unsent
        self._tls = False
        self._poll_next = False
        self._flush_scheduled = False
        self.task: asyncio.Task[None] | None = None
        # Made by the loop's protocol factory, so the loop is running; looked up once because
        # get_running_loop() costs a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self._work = work_queue(self._loop)

    # -- protocol callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.task is not None:  # the TLS layer announcing itself after start_tls
            return
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = self.transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            self._fd = sock.fileno()
        self.task = self._loop.create_task(self._handler(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target[self._target_pos :]
        return self._recv

    def buffer_updated(self, nbytes: int) -> None:
        if self._polled_until:
            self._adapt_poll()
        if self._target is not None:
            self._target_pos += nbytes
            if self._target_pos >= len(self._target):
                self._target = None
                self._wake()
            return
        self._pending += self._recv[:nbytes]
        if len(self._pending) > MAX_BUFFERED and self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        # Half-closed: keep the transport open so replies in flight still go out. TLS has no
        # half-close (the peer's close_notify ends the session), and its transport warns on True.
        return not self._tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._out.clear()
        self._out_bytes = 0
        self._fd = -1
        self._free_owned()
        self._eof = True
        self._target = None
        self._wake()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("connection lost"))
        self._drain_waiters.clear()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._out_bytes < WRITE_HIGH_WATER:
            self._release_drain_waiters()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- the connection's side -------------------------------------------------------------

    async def read(self) -> bytearray:
        """The bytes received so far (at least one), or empty at end of stream.

        The buffer is the caller's from then on (the codec adopts it without copying).
        """
        while not self._pending:
            if self._eof:
                return bytearray()
            await self._wait()
        data, self._pending = self._pending, bytearray()
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def readinto_exactly(self, view: memoryview) -> None:
        """Fill ``view`` from the stream (the kernel writes into it directly)."""
        pos = 0
        pending = self._pending
        if pending:  # bytes that arrived before we armed
            pos = min(len(pending), len(view))
            with memoryview(pending) as head:
                view[:pos] = head[:pos]
            del pending[:pos]
        if pos == len(view):
            return
        if self._eof:
            raise asyncio.IncompleteReadError(bytes(view[:pos]), len(view))
        self._target = view
        self._target_pos = pos
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        try:
            while self._target is not None:
                if self._eof:
                    raise asyncio.IncompleteReadError(bytes(view[: self._target_pos]), len(view))
                await self._wait()
        finally:
            self._target = None

    def write(self, data: bytes | memoryview) -> None:
        """Queue ``data``; everything queued in one pass of the event loop leaves in one writev.

        Replies finished together (a batch of completions from one interrupt) then cost one
        system call instead of two each (header and payload). ``data`` may be a view of a DMA
        buffer handed to :meth:`hold`: READ replies go from guest memory to the socket
        without a copy.
        """
        if self.transport is None or self.transport.is_closing():
            return
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._work.defer(self._flush)  # after the completions being handled now

    def write_all(self, chunks: list[bytes | memoryview]) -> None:
        """:meth:`write` each of ``chunks`` (a reply's header, data and further chunks)."""
        if self.transport is None or self.transport.is_closing():
            return
        for chunk in chunks:
            self._out.append(chunk)
            self._out_bytes += len(chunk)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._work.defer(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._out:
            return
        out, self._out, self._out_bytes = self._out, [], 0
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if self._fd >= 0 and not transport.get_write_buffer_size():
                # Nothing queued in the transport: the socket is ours to write, in order. What
                # the kernel does not take now is copied and queued (the views must not outlive
                # their DMA buffers, and the transport would keep them).
                rest = _writev(self._fd, out)
                if rest:
                    transport.writelines(rest)
            elif self._owned:
                transport.writelines([bytes(c) if isinstance(c, memoryview) else c for c in out])
            else:
                transport.writelines(out)
        self._free_owned()
        if not self._paused:
            self._release_drain_waiters()
        if self._poll_next:
            self._poll_next = False
            self._poll()

    def poll_after_flush(self) -> None:
        """After the next flush, wait a moment for the client's next request by polling.

        For a client that waits for each reply before it asks again (queue depth 1): the
        loop does not go to sleep between the reply and the next request, so the request
        finds the process awake. The window adapts per client, as QEMU's adaptive polling
        (``poll-max-ns``) does: a request that arrives soon after a poll gave up doubles
        it (up to the maximum); one that arrives much later halves it, down to no polling
        at all for clients too slow to catch, so they cost the loop nothing.
        """
        if self._poll_max > 0 and self._fd >= 0 and self._target is None:
            self._poll_next = True

    def _poll(self) -> None:
        transport = self.transport
        if self._pending or self._eof or self._waiter is None or transport is None or transport.is_closing():
            return
        window = self._poll_window
        start = _perf_counter()
        if window <= 0:
            self._polled_until = start  # not polling: learn from when the request comes
            return
        fd = self._fd
        deadline = start + window
        while True:
            buffer = self.get_buffer(-1)
            try:
                n = os.readv(fd, [buffer])
            except (BlockingIOError, InterruptedError):
                now = _perf_counter()
                if now < deadline:
                    continue
                self._poll_counts.misses += 1
                self._polled_until = now
                return
            except OSError:
                return  # the transport meets the error too, and reports it
            if n:
                self._poll_counts.hits += 1
                self.buffer_updated(n)
            return  # end of stream: the transport sees it too

    def _adapt_poll(self) -> None:
        """Data came through the event loop after a poll gave up: resize the window."""
        late = _perf_counter() - self._polled_until
        self._polled_until = 0.0
        poll_max = self._poll_max
        if late < poll_max:  # a longer window would have caught it
            self._poll_window = min(poll_max, max(2 * self._poll_window, poll_max / 64))
        else:
            window = self._poll_window / 2
            self._poll_window = window if window >= poll_max / 64 else 0.0

    def hold(self, buffer: IoBuffer) -> None:
        """Free ``buffer`` once what is queued now has left (its views are in the queue)."""
        if self._out and self.transport is not None and not self.transport.is_closing():
            self._owned.append(buffer)
        else:
            buffer.free()

    def _free_owned(self) -> None:
        if self._owned:
            for buffer in self._owned:
                buffer.free()
            self._owned.clear()

    def _release_drain_waiters(self) -> None:
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read."""
        return len(self._pending)

    async def start_tls(self, context: ssl.SSLContext, timeout: float) -> None:
        """Upgrade this connection to TLS as the server; this protocol keeps receiving, decrypted."""
        assert self.transport is not None
        self._flush()  # the STARTTLS reply goes out in the clear, before the handshake
        transport = await self._loop.start_tls(
            self.transport, self, context, server_side=True, ssl_handshake_timeout=timeout
        )
        if transport is None:
            raise ConnectionResetError("connection lost during the TLS handshake")
        self.transport = transport
        self._tls = True
        self._fd = -1  # bytes go through the TLS layer from now on
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    @property
    def tls_version(self) -> str | None:
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        return ssl_object.version() if ssl_object is not None else None

    @property
    def paused(self) -> bool:
        """More unsent data than the high-water mark, in the transport or queued for it."""
        return self._paused or self._out_bytes >= WRITE_HIGH_WATER

    @property
    def closed(self) -> bool:
        return self._eof and (self.transport is None or self.transport.is_closing())

    async def drain(self) -> None:
        # Re-check after every wake-up: resume_writing wakes all waiters, and the first one to
        # write may pause the transport again before the others run.
        if self.closed:
            raise ConnectionResetError("connection lost")
        while self.paused:
            if self.closed:
                raise ConnectionResetError("connection lost")
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def peer(self) -> str:
        """``127.0.0.1:49972``, ``[::1]:49972``; an unnamed unix client by its server's socket."""
        if self.transport is None:
            return "unknown"
        return format_peer(
            self.transport.get_extra_info("peername") or self.transport.get_extra_info("sockname")
        )

    def close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, discarding unsent data (a client that does not read)."""
        if self.transport is not None:
            self.transport.abort()
        self.connection_lost(None)
