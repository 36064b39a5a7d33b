"""One NBD connection, from greeting to close: negotiation, then the scheduling of every request.

Service layer, NBD front end, under :mod:`service.nbd.server` (which accepts connections). It
schedules work and hands bytes on: the bytes move through :mod:`service.nbd.channel`,
negotiation, framing and replies are the codec's (:mod:`service.nbd.protocol`,
:mod:`service.nbd.replies`), and every data request goes to the disk port
(:class:`service.blockio.ByteDisk`). Requests are pipelined and replies go out as they complete:
a READ or aligned WRITE starts on the ring straight from the parser and is answered from its
completion callback; the other requests (and any that would have to wait) each run in a task.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import itertools
import ssl
import time
from typing import Final

import structlog
from mypy_extensions import mypyc_attr

from service.blockio import Bitmap, BitmapError, ByteDisk, ErrorKind, IoBuffer, error_kind
from service.nbd import protocol as p
from service.nbd.channel import Channel
from service.nbd.constants import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_STATE_DIRTY,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    QEMU_DIRTY_BITMAP,
    Command,
    Errno,
    Option,
    Reply,
)
from service.nbd.settings import NbdExport, ServerState

log = structlog.get_logger("vblk.nbd")
_connection_ids: Final = itertools.count(1)
_perf_counter: Final = time.perf_counter  # bound once: compiled, ``time.perf_counter`` is a lookup
# Plain ints and a name table: IntFlag/IntEnum calls cost microseconds per request.
_COMMAND_NAMES: Final = {int(c): c.name.lower() for c in Command}
_OPTION_NAMES: Final = {int(o): f"NBD_OPT_{o.name}" for o in Option}
_REPLY_NAMES: Final = {int(r): f"NBD_REP_{r.name}" for r in Reply}


# Refusals a client brought on itself by asking for what is not there (or not allowed): worth a
# warning. Unsupported options are routine probing (libnbd asks for extended headers): debug.
_NOTEWORTHY_REFUSALS: Final = frozenset(
    {int(Reply.ERR_UNKNOWN), int(Reply.ERR_TLS_REQD), int(Reply.ERR_POLICY)}
)


def _log_refusal(refusal: p.Refusal) -> None:
    option = _OPTION_NAMES.get(refusal.option, str(refusal.option))
    reply = _REPLY_NAMES.get(refusal.reply, str(refusal.reply))
    if refusal.reply in _NOTEWORTHY_REFUSALS:
        log.warning("nbd_option_refused", option=option, reply=reply, message=refusal.message)
    elif refusal.reply == Reply.ERR_UNSUP:
        log.debug("nbd_option_refused", option=option, reply=reply, message=refusal.message)
    else:
        log.info("nbd_option_refused", option=option, reply=reply, message=refusal.message)


# The port's failure kinds as NBD errno values (proto.md: ENOSPC, EPERM, ENOTSUP, EIO...).
_ERRNO_OF: Final = {
    ErrorKind.READ_ONLY: Errno.EPERM,
    ErrorKind.UNSUPPORTED: Errno.ENOTSUP,
    ErrorKind.NO_SPACE: Errno.ENOSPC,
    ErrorKind.UNAVAILABLE: Errno.EIO,
    ErrorKind.IO: Errno.EIO,
}


def _errno_of(exc: BaseException) -> Errno:
    return _ERRNO_OF[error_kind(exc)]


class _ByteBudget:
    """A counting semaphore over bytes, first come first served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.available = limit
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def try_acquire(self, amount: int) -> int:
        """:meth:`acquire` without waiting: the amount held, or -1 if it would have to wait."""
        amount = min(amount, self.limit)
        if not self._waiters and self.available >= amount:
            self.available -= amount
            return amount
        return -1

    async def acquire(self, amount: int) -> int:
        amount = min(amount, self.limit)  # one request may always run alone
        if not self._waiters and self.available >= amount:
            self.available -= amount
            return amount
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((amount, future))
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(amount)  # granted as we were cancelled: hand it back
            else:
                self._waiters.remove((amount, future))
            raise
        return amount

    def release(self, amount: int) -> None:
        self.available += amount
        while self._waiters and self._waiters[0][0] <= self.available:
            wanted, future = self._waiters.popleft()
            if not future.done():
                self.available -= wanted
                future.set_result(None)


class _IdleError(Exception):
    """The client sent nothing for ``idle_timeout`` seconds with nothing in flight."""


@mypyc_attr(native_class=False)
class _SendTimeoutError(ConnectionError):
    """The client did not read its replies for ``send_timeout`` seconds."""


class Connection:
    """One client connection of a server (its :class:`ServerState`), over its channel."""

    def __init__(self, server: ServerState, channel: Channel) -> None:
        self.server = server
        self.channel = channel
        self.codec = p.ServerConnection(
            server.catalog, shutting_down=server.closing, tls=server.tls.mode if server.tls else "off"
        )
        self.peer = channel.peer()
        self.tasks: set[asyncio.Task[None]] = set()
        self.limits = server.limits
        # Requests read and not yet answered (tasks and callback requests alike), and a future
        # the transmission loop (or the end of the connection) waits on for one to finish.
        self.inflight = 0
        self._finished: asyncio.Future[None] | None = None
        self.budget = _ByteBudget(self.limits.max_inflight_bytes)
        self.export: NbdExport | None = None
        self.structured = False
        self.meta_contexts: dict[int, str] = {}
        self.pinned: dict[int, Bitmap] = {}  # the bitmaps of the chosen dirty-bitmap contexts
        self._closing = False
        self.id = next(_connection_ids)
        self._last_active = 0.0
        self._idle_expired = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self.requests: collections.Counter[str] = collections.Counter()  # the task path's
        self._fast_reads = 0  # READs and WRITEs the fast path started (not in ``requests``)
        self._fast_writes = 0
        self.errors = 0
        self.bytes_read = 0
        self.bytes_written = 0

    def shutdown(self) -> None:
        self._closing = True
        self.codec.shutting_down = True
        self.channel.eof_received()

    async def run(self) -> None:
        # Every log line of this connection (and of its request tasks) carries these.
        structlog.contextvars.bind_contextvars(nbd_conn=self.id, peer=self.peer)
        started = time.monotonic()
        reason = "disconnect"
        try:
            self.channel.write(self.codec.greeting())
            if await asyncio.wait_for(self._negotiate(), self.limits.negotiation_timeout):
                self._arm_idle_watchdog()
                await self._transmission()
        except p.RemoteProtocolError as protocol_error:
            reason = "protocol_error"
            log.warning("nbd_protocol_error", error=str(protocol_error))
        except TimeoutError:
            reason = "negotiation_timeout"
        except _IdleError:
            reason = "idle_timeout"
        except _SendTimeoutError:
            reason = "send_timeout"
            log.warning("nbd_send_timeout", timeout=self.limits.send_timeout)
        except (ConnectionError, asyncio.IncompleteReadError) as lost:
            reason = "connection_lost"
            log.debug("nbd_connection_lost", error=repr(lost))
        finally:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            while self.inflight:  # callback requests end when the driver answers or resets
                await self._wait_finished()
            self.channel.close()
            by_command = self.requests + collections.Counter(read=self._fast_reads, write=self._fast_writes)
            log.info(
                "nbd_connection",
                export=self.export.name if self.export is not None else None,
                reason=reason,
                seconds=round(time.monotonic() - started, 6),
                requests=sum(by_command.values()),
                by_command=dict(by_command),
                errors=self.errors,
                bytes_read=self.bytes_read,
                bytes_written=self.bytes_written,
            )

    async def _fill(self) -> bool:
        data = await self.channel.read()
        if not data:
            return False
        self.codec.receive_data(data)
        return True

    async def _fill_or_idle(self) -> bool:
        """Wait for more requests; a client with nothing in flight may idle only so long.

        One watchdog timer per connection checks for idleness (no per-read wait_for, which
        would cost a task and a timer for every request at queue depth 1).
        """
        self._last_active = self.channel.loop.time()
        if self._idle_expired:
            raise _IdleError
        filled = await self._fill()
        if self._idle_expired and not filled:
            raise _IdleError
        return filled

    def _arm_idle_watchdog(self) -> None:
        idle = self.limits.idle_timeout
        if idle > 0:
            loop = self.channel.loop
            self._last_active = loop.time()
            self._idle_timer = loop.call_later(idle, self._idle_check)

    def _idle_check(self) -> None:
        loop = self.channel.loop
        idle = self.limits.idle_timeout
        quiet = loop.time() - self._last_active
        if self.inflight or quiet < idle:
            self._idle_timer = loop.call_later(
                max(idle - quiet, 0.05) if not self.inflight else idle, self._idle_check
            )
            return
        self._idle_expired = True
        self.channel.eof_received()  # wakes the reader: the transmission loop ends

    async def _send_credit(self) -> None:
        """Wait until the client has read enough of our replies (bounded by ``send_timeout``).

        Every reply waits here first, so unsent data stays under the transport's high-water
        mark plus one reply, however many requests a client that never reads has in flight.
        """
        channel = self.channel
        if not channel.paused:  # the common case, and no await: the caller writes right after
            if channel.closed:
                raise ConnectionResetError("connection lost")
            return
        loop = channel.loop
        deadline = loop.time() + self.limits.send_timeout
        # The check and the caller's write happen in one step of the loop, so another reply
        # woken by the same resume_writing cannot slip in between.
        while channel.paused:
            try:
                await asyncio.wait_for(channel.drain(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                channel.abort()
                raise _SendTimeoutError from None

    async def _negotiate(self) -> bool:
        codec = self.codec
        while True:
            event = codec.next_event()
            for refusal in codec.refusals():
                _log_refusal(refusal)
            out = codec.data_to_send()
            if out:
                self.channel.write(out)
                await self._send_credit()
            if event is p.NEED_DATA:
                if not await self._fill():
                    return False
                continue
            if isinstance(event, p.Aborted):
                log.info("nbd_negotiation_ended", reason=event.reason)
                return False
            if isinstance(event, p.StartTls):
                assert self.server.tls is not None
                if self.channel.buffered:
                    raise p.RemoteProtocolError("data sent after NBD_OPT_STARTTLS before the TLS handshake")
                try:
                    await self.channel.start_tls(self.server.tls.context, self.server.tls.handshake_timeout)
                except (ssl.SSLError, OSError, TimeoutError) as exc:
                    log.warning("nbd_tls_handshake_failed", error=str(exc) or type(exc).__name__)
                    raise ConnectionResetError("TLS handshake failed") from exc
                self.codec.tls_started()
                log.info("nbd_tls", version=self.channel.tls_version)
                continue
            if isinstance(event, p.Negotiated):
                self.export = self.server.exports.get(event.export.name)
                self.structured = event.structured_replies
                self.meta_contexts = event.meta_contexts
                self._pin_bitmaps()
                structlog.contextvars.bind_contextvars(export=event.export.name)
                log.info(
                    "nbd_negotiated",
                    export=event.export.name,
                    structured_replies=self.structured,
                    meta_contexts=list(self.meta_contexts.values()),
                )
                return self.export is not None
            raise p.RemoteProtocolError(f"unexpected event during negotiation: {event!r}")

    async def _transmission(self) -> None:
        codec = self.codec
        export = self.export
        assert export is not None
        while True:
            if self.channel.closed:  # cut (send timeout): what is still buffered goes unanswered
                return
            event = codec.next_event()
            if event is p.NEED_DATA:
                if not await self._fill_or_idle():
                    return
                continue
            if isinstance(event, p.Disconnect):
                return
            if not isinstance(event, p.Request):
                raise p.RemoteProtocolError(f"unexpected event {event!r}")
            if self._closing or self.server.closing:
                if event.command == Command.WRITE:
                    codec.skip_payload(event.length)
                self._send_error(event, Errno.ESHUTDOWN, "server is shutting down")
                await self._send_credit()
                continue
            description = export.describe()
            error = p.validate(
                event, description, structured=self.structured, meta_contexts=self.meta_contexts
            )
            if error is not None:
                if event.command == Command.WRITE:
                    codec.skip_payload(event.length)
                self._send_error(event, error, f"request refused: {error.name}")
                await self._send_credit()
                continue
            command = event.command
            while self.inflight >= self.limits.max_inflight:
                await self._wait_finished()
            self.inflight += 1
            held = 0
            payload: IoBuffer | None = None
            try:
                if command in (NBD_CMD_READ, NBD_CMD_WRITE):
                    held = self.budget.try_acquire(event.length)
                    if held < 0:
                        held = 0
                        held = await self.budget.acquire(event.length)
                if command == NBD_CMD_WRITE:
                    payload = self._take_payload(event, export)
                    if payload is None:
                        payload = await self._receive_payload(event)
            except BaseException:
                self._finish(held)
                raise
            # The common requests start straight on the ring and answer from the interrupt.
            if command == NBD_CMD_READ:
                if self._start_read(event, export, held):
                    continue
            elif command == NBD_CMD_WRITE and not event.flags & NBD_CMD_FLAG_FUA:
                assert payload is not None
                if self._start_write(event, export, payload, held):
                    continue
            task = self.channel.loop.create_task(self._execute(event, export, payload))
            self.tasks.add(task)
            task.add_done_callback(functools.partial(self._task_done, held))

    def _finish(self, held: int) -> None:
        """A request is answered (or abandoned): its slot and payload bytes are free again."""
        self.budget.release(held)
        self.inflight -= 1
        finished = self._finished
        if finished is not None and not finished.done():
            finished.set_result(None)

    async def _wait_finished(self) -> None:
        self._finished = finished = self.channel.loop.create_future()
        try:
            await finished
        finally:
            self._finished = None

    def _task_done(self, held: int, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._finish(held)
        if not task.cancelled() and task.exception() is not None:
            log.error("nbd_request_crashed", error=repr(task.exception()))

    # -- the fast path: no task, answered from the completion ---------------------------------

    def _start_read(self, request: p.Request, export: NbdExport, held: int) -> bool:
        """Start a READ on the ring now; False if it would have to wait (then a task does it)."""
        offset, length = request.offset, request.length
        disk = export.disk
        buffer = disk.try_buffer(offset, length)
        if buffer is None:
            return False
        done = functools.partial(self._read_done, request, export, buffer, held, _perf_counter())
        if not disk.start_read(offset, length, buffer, done):
            buffer.free()
            return False
        self._fast_reads += 1
        return True

    def _read_done(
        self,
        request: p.Request,
        export: NbdExport,
        buffer: IoBuffer,
        held: int,
        started: float,
        error: BaseException | None,
    ) -> None:
        view = None if error is not None else ByteDisk.view_of(buffer, request.offset, request.length)
        self._answer(request, export, "read", started, held, error, view, buffer)

    def _start_write(self, request: p.Request, export: NbdExport, payload: IoBuffer, held: int) -> bool:
        """Start an aligned WRITE (no FUA) on the ring now; False if it is unaligned (the edges
        need the port's read-modify-write) or would have to wait."""
        done = functools.partial(self._write_done, request, export, payload, held, _perf_counter())
        if not export.disk.start_write(request.offset, request.length, payload, done):
            return False
        self._fast_writes += 1
        return True

    def _write_done(
        self,
        request: p.Request,
        export: NbdExport,
        payload: IoBuffer,
        held: int,
        started: float,
        error: BaseException | None,
    ) -> None:
        payload.free()
        if error is None:
            self.bytes_written += request.length
        self._answer(request, export, "write", started, held, error, None, None)

    def _observe(self, export: NbdExport, name: str, started: float) -> None:
        """Feed the front end's latency histogram with a request that started at ``started``."""
        on_request = self.server.on_request
        if on_request is not None:
            on_request.observe(export.name, name, _perf_counter() - started)

    def _answer(
        self,
        request: p.Request,
        export: NbdExport,
        name: str,
        started: float,
        held: int,
        error: BaseException | None,
        data: memoryview | None,
        buffer: IoBuffer | None,
    ) -> None:
        """Reply to a fast-path request from its completion (``buffer`` is freed once sent)."""
        self._observe(export, name, started)
        failure: tuple[Errno, str] | None = None
        if error is not None:
            log.warning("nbd_request_failed", command=name, offset=request.offset, error=str(error))
            failure = (_errno_of(error), str(error))
        channel = self.channel
        if channel.paused or channel.closed:  # rare: wait for the client in a task
            task = channel.loop.create_task(self._answer_later(request, export, failure, data, buffer))
            self.tasks.add(task)
            task.add_done_callback(functools.partial(self._task_done, held))
            return
        self._reply(request, export, failure, data, buffer)
        self._finish(held)
        if not self.inflight:
            channel.poll_after_flush()

    async def _answer_later(
        self,
        request: p.Request,
        export: NbdExport,
        failure: tuple[Errno, str] | None,
        data: memoryview | None,
        buffer: IoBuffer | None,
    ) -> None:
        try:
            await self._send_credit()
        except ConnectionError:
            if buffer is not None:
                buffer.free()
            return
        self._reply(request, export, failure, data, buffer)

    def _reply(
        self,
        request: p.Request,
        export: NbdExport,
        failure: tuple[Errno, str] | None,
        data: memoryview | bytes | None,
        buffer: IoBuffer | None,
    ) -> None:
        """The whole reply at once, never a half-sent success; ``buffer`` backs ``data``."""
        if failure is not None:
            self._send_error(request, *failure)
        elif data is not None:
            self._send_read(request, export, data)
        elif request.command == NBD_CMD_BLOCK_STATUS:
            self._block_status(request, export)
        else:
            self.channel.write(self.codec.reply_ok(request))
        if buffer is not None:
            self.channel.hold(buffer)

    def _take_payload(self, request: p.Request, export: NbdExport) -> IoBuffer | None:
        """:meth:`_receive_payload` without waiting, when the whole payload is already here."""
        length = request.length
        if self.codec.buffered < length:
            return None
        buffer = export.disk.try_buffer(request.offset, length)
        if buffer is None:
            return None
        with ByteDisk.view_of(buffer, request.offset, length) as view:
            self.codec.take_payload(view)
        return buffer

    async def _receive_payload(self, request: p.Request) -> IoBuffer:
        """Read a WRITE payload into a DMA buffer laid out for the aligned sector range."""
        assert self.export is not None
        buffer = await self.export.disk.allocate_for(request.offset, request.length)
        view = ByteDisk.view_of(buffer, request.offset, request.length)
        taken = self.codec.take_payload(view)
        if taken < request.length:
            try:
                await self.channel.readinto_exactly(view[taken:])
            except BaseException:
                view.release()
                buffer.free()
                raise
            self.codec.payload_done(request.length - taken)
        view.release()
        return buffer

    # -- replies ------------------------------------------------------------------------------

    def _send_error(self, request: p.Request, error: Errno, message: str) -> None:
        self.errors += 1
        self.channel.write(self.codec.reply_error(request, error, message))

    # -- execution ----------------------------------------------------------------------------

    async def _execute(self, request: p.Request, export: NbdExport, payload: IoBuffer | None) -> None:
        started = _perf_counter()  # uvloop's loop.time() advances once per pass, in ms
        name = _COMMAND_NAMES.get(request.command, "unknown")
        self.requests[name] += 1
        data: bytes | None = None
        error: tuple[Errno, str] | None = None
        try:
            command = request.command
            if command == Command.READ:
                data = await export.disk.read(request.offset, request.length)
            elif command == Command.WRITE:
                assert payload is not None
                await self._write(request, export, payload)
            elif command == Command.FLUSH:
                await export.disk.flush()
            elif command == Command.TRIM:
                await self._trim(request, export)
            elif command == Command.WRITE_ZEROES:
                await self._write_zeroes(request, export)
            elif command == Command.CACHE:
                export.disk.cache(request.offset, request.length)
        except OSError as exc:  # the driver's BlkError (an OSError), the port's
            log.warning("nbd_request_failed", command=name, offset=request.offset, error=str(exc))
            error = (_errno_of(exc), str(exc))
        finally:
            if payload is not None:
                payload.free()
        self._observe(export, name, started)
        try:
            await self._send_credit()
        except ConnectionError:
            return
        self._reply(request, export, error, data, None)

    def _send_read(self, request: p.Request, export: NbdExport, data: bytes | memoryview) -> None:
        # ``data`` is a copy, or a view of a DMA buffer the channel holds until it is sent.
        codec = self.codec
        holes: list[tuple[int, int, bool]] | None = None
        if codec.wants_holes(request):
            extents = export.disk.extents(request.offset, request.length)
            holes = [(e.offset, e.length, e.hole) for e in extents]
        self.channel.write_all(codec.reply_read(request, data, holes))
        self.bytes_read += request.length

    async def _write(self, request: p.Request, export: NbdExport, buffer: IoBuffer) -> None:
        fua = bool(request.flags & NBD_CMD_FLAG_FUA)
        await export.disk.write_buffer(request.offset, request.length, buffer, fua=fua)
        self.bytes_written += request.length

    async def _trim(self, request: p.Request, export: NbdExport) -> None:
        fua = bool(request.flags & NBD_CMD_FLAG_FUA)
        await export.disk.discard(request.offset, request.length, fua=fua)

    async def _write_zeroes(self, request: p.Request, export: NbdExport) -> None:
        unmap = not request.flags & NBD_CMD_FLAG_NO_HOLE
        fua = bool(request.flags & NBD_CMD_FLAG_FUA)
        if request.flags & NBD_CMD_FLAG_FAST_ZERO and not unmap:
            # Allocated zeroes may cost a write (RBD's write-same): then FAST_ZERO fails at once
            # with ENOTSUP, touching nothing, as the NBD spec asks.
            await export.disk.zero_if_fast(request.offset, request.length, fua=fua)
            return
        await export.disk.zero(request.offset, request.length, unmap=unmap, fua=fua)

    def _pin_bitmaps(self) -> None:
        """The bitmaps the client chose, as they are now (a later one of the same name is not it)."""
        export = self.export
        dirty = export.disk.dirty if export is not None else None
        self.pinned = {}
        if dirty is None:
            return
        for context_id, context in self.meta_contexts.items():
            if context_id >= p.FIRST_BITMAP_ID:
                bitmap = dirty.bitmaps.get(context[len(QEMU_DIRTY_BITMAP) :])
                if bitmap is not None:
                    self.pinned[context_id] = bitmap

    def _block_status(self, request: p.Request, export: NbdExport) -> None:
        try:
            answers = self._status_of(request, export)
        except OSError as failed:  # a bitmap removed since chosen, a map that cannot be read
            log.warning("nbd_block_status_failed", offset=request.offset, error=str(failed))
            code = Errno.EINVAL if issubclass(type(failed), BitmapError) else _errno_of(failed)
            self._send_error(request, code, str(failed))
            return
        self.channel.write_all(self.codec.reply_block_status(request, answers))

    def _status_of(self, request: p.Request, export: NbdExport) -> list[tuple[int, list[tuple[int, int]]]]:
        extents = export.disk.extents(request.offset, request.length)
        allocation = [
            (e.length, (NBD_STATE_HOLE if e.hole else 0) | (NBD_STATE_ZERO if e.zero else 0)) for e in extents
        ]
        answers: list[tuple[int, list[tuple[int, int]]]] = []
        for context_id, context in self.meta_contexts.items():
            if context_id == p.ALLOCATION_DEPTH_ID:
                runs = export.disk.allocation_depth(request.offset, request.length)
                answers.append((context_id, [(length, depth) for _, length, depth in runs]))
            elif context_id >= p.FIRST_BITMAP_ID:
                answers.append((context_id, self._dirty_runs(export, context_id, context, request)))
            else:
                answers.append((context_id, allocation))
        return answers

    def _dirty_runs(
        self, export: NbdExport, context_id: int, context: str, request: p.Request
    ) -> list[tuple[int, int]]:
        """``qemu:dirty-bitmap:NAME``'s extents: flags 1 where dirty, 0 where clean. The bitmap is
        the one the client chose: removed since (even if another took its name), it is EINVAL."""
        dirty = export.disk.dirty
        name = context[len(QEMU_DIRTY_BITMAP) :]
        chosen = self.pinned.get(context_id)
        if dirty is None or chosen is None or dirty.bitmaps.get(name) is not chosen:
            raise BitmapError(errno.ENOENT, f"bitmap {name!r} was removed since it was chosen")
        with dirty.lock:
            runs = chosen.runs(request.offset, request.length)
        return [(length, NBD_STATE_DIRTY if is_dirty else 0) for _, length, is_dirty in runs]
