"""The NBD protocol, server side, without I/O: bytes in, events out; replies in, bytes out.

Service layer, under :mod:`service.nbd.server` (which only schedules work and moves bytes).
Fixed newstyle negotiation is handled entirely here; transmission requests come out as
:class:`Request` events, and the ``reply_*`` methods turn each outcome into the buffers to send
(the rules are in :mod:`service.nbd.replies`). Errors are typed: a :class:`RemoteProtocolError`
means the client broke framing and the connection must close.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Final, Literal, Protocol

from service.nbd import replies
from service.nbd.constants import (
    BASE_ALLOCATION,
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
    GREETING,
    IHAVEOPT,
    MAX_PAYLOAD,
    MAX_STRING,
    MIN_BLOCK_SIZE,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_OPT_REPLY_MAGIC,
    NBD_REQUEST_MAGIC,
    NBDMAGIC,
    OPTION_HEADER,
    OPTION_REPLY,
    PREFERRED_BLOCK_SIZE,
    QEMU_ALLOCATION_DEPTH,
    REQUEST,
    Command,
    CommandFlag,
    Errno,
    Info,
    Option,
    Reply,
    TransmissionFlag,
)

MAX_OPTIONS: Final = 256  # options per connection before we give up on the client
MAX_OPTION_LENGTH: Final = 64 * 1024  # enough for INFO/GO and meta-context queries
BASE_ALLOCATION_ID: Final = 1
ALLOCATION_DEPTH_ID: Final = 2
FIRST_BITMAP_ID: Final = 3
#: The meta contexts every export answers by a fixed id (bitmaps' ids follow, per selection).
CONTEXT_IDS: Final[dict[str, int]] = {
    BASE_ALLOCATION: BASE_ALLOCATION_ID,
    QEMU_ALLOCATION_DEPTH: ALLOCATION_DEPTH_ID,
}


class RemoteProtocolError(Exception):
    """The client broke the protocol's framing: the connection must be closed."""


class LocalProtocolError(Exception):
    """The server side misused this codec (a bug in the caller)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Export:
    """What a client may learn about one export."""

    name: str
    size: int
    description: str = ""
    read_only: bool = False
    min_block_size: int = MIN_BLOCK_SIZE
    preferred_block_size: int = PREFERRED_BLOCK_SIZE
    max_block_size: int = MAX_PAYLOAD
    multi_conn: bool = True
    rotational: bool = False
    #: The meta contexts it offers (``qemu:allocation-depth`` for a disk with a backing chain).
    meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,)

    def transmission_flags(self, structured: bool) -> int:
        flags = (
            TransmissionFlag.HAS_FLAGS
            | TransmissionFlag.SEND_FLUSH
            | TransmissionFlag.SEND_FUA
            | TransmissionFlag.SEND_CACHE
        )
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            flags |= (
                TransmissionFlag.SEND_TRIM
                | TransmissionFlag.SEND_WRITE_ZEROES
                | TransmissionFlag.SEND_FAST_ZERO
            )
        if self.multi_conn:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        if self.rotational:
            flags |= TransmissionFlag.ROTATIONAL
        if structured:
            flags |= TransmissionFlag.SEND_DF
        return int(flags)


class Catalog(Protocol):
    """The exports a server offers; the empty name selects the default export."""

    def lookup(self, name: str) -> Export | None: ...

    def exports(self) -> Sequence[Export]: ...


# -- events ------------------------------------------------------------------------------------


class _NeedData(enum.Enum):
    NEED_DATA = "need data"


NEED_DATA: Final = _NeedData.NEED_DATA


@dataclasses.dataclass(frozen=True, slots=True)
class Negotiated:
    """Option haggling finished: transmission on ``export`` starts."""

    export: Export
    structured_replies: bool
    meta_contexts: dict[int, str]


@dataclasses.dataclass(frozen=True, slots=True)
class Aborted:
    """The client ended negotiation (NBD_OPT_ABORT) or asked for an export it cannot have."""

    reason: str


# One per request: not frozen, and __init__ written out (init=False) so that it is compiled
# with this module (a dataclass's generated methods run interpreted).
@dataclasses.dataclass(slots=True, init=False)
class Request:
    """One transmission request. For WRITE, ``length`` payload bytes follow: take or skip them."""

    cookie: int
    command: int
    flags: int
    offset: int
    length: int

    def __init__(self, cookie: int, command: int, flags: int, offset: int, length: int) -> None:
        self.cookie = cookie
        self.command = command
        self.flags = flags
        self.offset = offset
        self.length = length


@dataclasses.dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC: finish what is in flight, send nothing more, close."""


@dataclasses.dataclass(frozen=True, slots=True)
class StartTls:
    """NBD_OPT_STARTTLS was acknowledged: upgrade the stream to TLS, then :meth:`tls_started`."""


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """An option answered with an error reply (the client may go on with others)."""

    option: int
    reply: int
    message: str


Event = Negotiated | Aborted | Request | Disconnect | StartTls
TlsMode = Literal["off", "on", "require"]


class State(enum.Enum):
    CLIENT_FLAGS = "client flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


_STR_LEN: Final = struct.Struct(">I")
# Typed with what it returns (struct says Any), so compiled code uses the fields as integers.
_REQUEST_UNPACK: Final[Callable[[bytearray, int], tuple[int, int, int, int, int, int]]] = REQUEST.unpack_from
_REQUEST_SIZE: Final = REQUEST.size
_U16: Final = struct.Struct(">H")
_INFO_EXPORT: Final = struct.Struct(">HQH")
_INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")


class ServerConnection:
    """One client connection, server side, from greeting to disconnect."""

    def __init__(self, catalog: Catalog, *, shutting_down: bool = False, tls: TlsMode = "off") -> None:
        self.catalog = catalog
        self.tls = tls
        self.tls_active = False
        self.state = State.CLIENT_FLAGS
        self.no_zeroes = False
        self.structured_replies = False
        self.meta_contexts: dict[int, str] = {}
        self._meta_export: str | None = None  # the export the contexts were chosen for
        self.export: Export | None = None
        self.options_seen = 0
        self.shutting_down = shutting_down
        self._in = bytearray()
        self._out = bytearray()
        self._skip = 0  # payload bytes of a rejected WRITE still to discard
        self._payload_pending = 0  # payload bytes the I/O layer must take before parsing on
        self._refusals: list[Refusal] = []

    # -- bytes in, bytes out ----------------------------------------------------------------

    @staticmethod
    def greeting() -> bytes:
        return GREETING.pack(NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed received bytes; a ``bytearray`` may be adopted as the buffer (no copy), so the
        caller must not use it afterwards."""
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        if not self._in and type(data) is bytearray:
            self._in = data
        else:
            self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed (payload bytes included)."""
        return len(self._in)

    def take_payload(self, dest: memoryview) -> int:
        """Move already-received payload bytes into ``dest``; returns how many (maybe all).

        The I/O layer reads the remaining ``len(dest) - n`` bytes from the socket itself
        (straight into guest memory) and then calls :meth:`payload_done`.
        """
        n = min(len(dest), len(self._in), self._payload_pending)
        with memoryview(self._in) as received:
            dest[:n] = received[:n]
        del self._in[:n]
        self._payload_pending -= n
        return n

    def payload_done(self, received: int) -> None:
        """The I/O layer read ``received`` payload bytes from the socket itself."""
        if received > self._payload_pending:
            raise LocalProtocolError("more payload taken than the request carried")
        self._payload_pending -= received

    def skip_payload(self, length: int) -> None:
        """Discard ``length`` payload bytes of a rejected WRITE (framing survives)."""
        n = min(length, len(self._in))
        del self._in[:n]
        self._payload_pending = max(0, self._payload_pending - length)
        self._skip += length - n

    @property
    def skipping(self) -> int:
        return self._skip

    # -- replies -----------------------------------------------------------------------------

    def reply_ok(self, request: Request) -> bytes:
        """``request`` succeeded and returns nothing (every command but READ and BLOCK_STATUS)."""
        return replies.ok_reply(request.cookie, request.command, self.structured_replies)

    def reply_error(self, request: Request, error: int, message: str) -> bytes:
        """``request`` failed with NBD errno ``error``; ``message`` goes to structured clients."""
        return replies.error_reply(request.cookie, request.command, self.structured_replies, error, message)

    def wants_holes(self, request: Request) -> bool:
        """Would :meth:`reply_read` of this READ use the allocation map (so it is worth asking)?"""
        return replies.wants_holes(self.structured_replies, request.flags, request.length)

    def reply_read(
        self, request: Request, data: replies.Chunk, holes: Sequence[tuple[int, int, bool]] | None = None
    ) -> list[replies.Chunk]:
        """A READ's data (passed through as it is), with its holes if :meth:`wants_holes`."""
        return replies.read_reply(request.cookie, request.offset, self.structured_replies, data, holes)

    def reply_block_status(
        self, request: Request, answers: Sequence[tuple[int, Iterable[tuple[int, int]]]]
    ) -> list[replies.Chunk]:
        """BLOCK_STATUS: ``(context id, (length, flags) extents)`` for each selected context."""
        return replies.block_status_reply(request.cookie, request.length, request.flags, answers)

    # -- events ----------------------------------------------------------------------------

    def next_event(self) -> Event | _NeedData:
        if self._payload_pending:
            raise LocalProtocolError("WRITE payload not taken or skipped")
        while True:
            if self.state is State.CLIENT_FLAGS:
                if len(self._in) < CLIENT_FLAGS.size:
                    return NEED_DATA
                (flags,) = CLIENT_FLAGS.unpack_from(self._in)
                del self._in[: CLIENT_FLAGS.size]
                if flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
                    self.state = State.CLOSED
                    raise RemoteProtocolError(f"unknown client flags {flags:#x}")
                self.no_zeroes = bool(flags & NBD_FLAG_C_NO_ZEROES)
                self.state = State.OPTIONS
                continue
            if self.state is State.OPTIONS:
                event = self._next_option()
                if event is None:
                    continue
                return event
            if self.state is State.TRANSMISSION:
                return self._next_request()
            return NEED_DATA

    def _next_request(self) -> Request | Disconnect | _NeedData:
        if len(self._in) < _REQUEST_SIZE:
            return NEED_DATA
        magic, flags, command, cookie, offset, length = _REQUEST_UNPACK(self._in, 0)
        if magic != NBD_REQUEST_MAGIC:
            self.state = State.CLOSED
            raise RemoteProtocolError(f"bad request magic {magic:#x}")
        del self._in[:_REQUEST_SIZE]
        if command == NBD_CMD_DISC:
            self.state = State.CLOSED
            return Disconnect()
        if command == NBD_CMD_WRITE:
            self._payload_pending = length
        return Request(cookie, command, flags, offset, length)

    # -- option haggling --------------------------------------------------------------------

    def _next_option(self) -> Event | _NeedData | None:
        if len(self._in) < OPTION_HEADER.size:
            return NEED_DATA
        magic, option, length = OPTION_HEADER.unpack_from(self._in)
        if magic != IHAVEOPT:
            self.state = State.CLOSED
            raise RemoteProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_LENGTH:
            self.state = State.CLOSED
            raise RemoteProtocolError(f"option {option} of {length} bytes is too long")
        if len(self._in) < OPTION_HEADER.size + length:
            return NEED_DATA
        data = bytes(self._in[OPTION_HEADER.size : OPTION_HEADER.size + length])
        del self._in[: OPTION_HEADER.size + length]
        self.options_seen += 1
        if self.options_seen > MAX_OPTIONS:
            self.state = State.CLOSED
            raise RemoteProtocolError(f"more than {MAX_OPTIONS} options")
        return self._handle_option(option, data)

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out += OPTION_REPLY.pack(NBD_OPT_REPLY_MAGIC, option, reply, len(data))
        self._out += data

    def _error(self, option: int, reply: Reply, message: str) -> None:
        self._reply(option, reply, message.encode())
        self._refusals.append(Refusal(option, int(reply), message))

    def refusals(self) -> list[Refusal]:
        """The options refused since the last call, for the I/O layer's log."""
        refused, self._refusals = self._refusals, []
        return refused

    def tls_started(self) -> None:
        """The I/O layer finished the TLS handshake: options go on, encrypted."""
        self.tls_active = True

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        if self.shutting_down and option not in (Option.ABORT,):
            if option == Option.EXPORT_NAME:
                self.state = State.CLOSED
                return Aborted("server shutting down")
            self._error(option, Reply.ERR_SHUTDOWN, "server is shutting down")
            return None
        if self.tls == "require" and not self.tls_active and option not in (Option.STARTTLS, Option.ABORT):
            if option == Option.EXPORT_NAME:
                self.state = State.CLOSED
                return Aborted("TLS is required and the client asked for an export without it")
            self._error(option, Reply.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
            return None
        if option == Option.EXPORT_NAME:
            return self._export_name(data)
        if option == Option.ABORT:
            self._reply(option, Reply.ACK)
            self.state = State.CLOSED
            return Aborted("client sent NBD_OPT_ABORT")
        if option == Option.LIST:
            if data:
                self._error(option, Reply.ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            for export in self.catalog.exports():
                name = export.name.encode()
                self._reply(
                    option, Reply.SERVER, _STR_LEN.pack(len(name)) + name + export.description.encode()
                )
            self._reply(option, Reply.ACK)
            return None
        if option in (Option.INFO, Option.GO):
            return self._info_go(option, data)
        if option == Option.STRUCTURED_REPLY:
            if data:
                self._error(option, Reply.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            elif self.structured_replies:
                self._error(option, Reply.ERR_INVALID, "structured replies already negotiated")
            else:
                self.structured_replies = True
                self._reply(option, Reply.ACK)
            return None
        if option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
            self._meta_context(option, data)
            return None
        if option == Option.STARTTLS:
            return self._starttls(data)
        self._error(option, Reply.ERR_UNSUP, f"option {option} is not supported")
        return None

    def _starttls(self, data: bytes) -> Event | None:
        option = Option.STARTTLS
        if self.tls == "off":
            self._error(option, Reply.ERR_POLICY, "TLS is not enabled on this server")
        elif self.tls_active:
            self._error(option, Reply.ERR_INVALID, "TLS is already active")
        elif data:
            self._error(option, Reply.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        elif self._in:
            # The client must wait for the handshake; bytes sent before it cannot be trusted.
            self.state = State.CLOSED
            raise RemoteProtocolError("data sent after NBD_OPT_STARTTLS before the TLS handshake")
        else:
            self._reply(option, Reply.ACK)
            # Nothing negotiated in the clear survives the upgrade (proto.md, STARTTLS).
            self.structured_replies = False
            self.meta_contexts = {}
            return StartTls()
        return None

    def _export_name(self, data: bytes) -> Event:
        name = _decode_string(data)
        export = self.catalog.lookup(name) if name is not None else None
        if export is None:
            # NBD_OPT_EXPORT_NAME cannot answer an error: the server closes the connection.
            self.state = State.CLOSED
            return Aborted(f"unknown export {name!r}")
        self._out += EXPORT_NAME_REPLY.pack(export.size, export.transmission_flags(self.structured_replies))
        if not self.no_zeroes:
            self._out += bytes(124)
        return self._start(export)

    def _start(self, export: Export) -> Negotiated:
        self.export = export
        self.state = State.TRANSMISSION
        if self._meta_export != export.name:
            self.meta_contexts = {}  # chosen for another export: they do not carry over
        return Negotiated(export, self.structured_replies, dict(self.meta_contexts))

    def _info_go(self, option: int, data: bytes) -> Event | None:
        parsed = _parse_info_request(data)
        if parsed is None:
            self._error(option, Reply.ERR_INVALID, "malformed NBD_OPT_INFO/GO request")
            return None
        name, requests = parsed
        export = self.catalog.lookup(name)
        if export is None:
            self._error(option, Reply.ERR_UNKNOWN, f"no export named {name!r}")
            return None
        flags = export.transmission_flags(self.structured_replies)
        self._reply(option, Reply.INFO, _INFO_EXPORT.pack(Info.EXPORT, export.size, flags))
        if Info.NAME in requests:
            self._reply(option, Reply.INFO, _U16.pack(Info.NAME) + export.name.encode())
        if Info.DESCRIPTION in requests and export.description:
            self._reply(option, Reply.INFO, _U16.pack(Info.DESCRIPTION) + export.description.encode())
        # Always advertise block sizes: they are advisory at minimum 1.
        self._reply(
            option,
            Reply.INFO,
            _INFO_BLOCK_SIZE.pack(
                Info.BLOCK_SIZE,
                export.min_block_size,
                export.preferred_block_size,
                export.max_block_size,
            ),
        )
        self._reply(option, Reply.ACK)
        if option == Option.GO:
            return self._start(export)
        return None

    def _meta_context(self, option: int, data: bytes) -> None:
        parsed = _parse_meta_context_request(data)
        if parsed is None:
            self._error(option, Reply.ERR_INVALID, "malformed meta context request")
            return
        name, queries = parsed
        if option == Option.SET_META_CONTEXT and not self.structured_replies:
            self._error(option, Reply.ERR_INVALID, "structured replies must be negotiated first")
            return
        if self.catalog.lookup(name) is None:
            self._error(option, Reply.ERR_UNKNOWN, f"no export named {name!r}")
            return
        offered = self.catalog.lookup(name)
        assert offered is not None
        if option == Option.LIST_META_CONTEXT:
            matched = [
                c for c in offered.meta_contexts if not queries or any(_matches(q, c) for q in queries)
            ]
        else:
            matched = [c for c in offered.meta_contexts if c in queries]
            self.meta_contexts = {context_id(c, i): c for i, c in enumerate(matched)}
            self._meta_export = offered.name
        ids = {name: i for i, name in self.meta_contexts.items()} if option == Option.SET_META_CONTEXT else {}
        for context in matched:
            # A LIST reply's id is reserved (proto.md): 0 but for the fixed ones, as before.
            number = ids.get(context, CONTEXT_IDS.get(context, 0))
            self._reply(option, Reply.META_CONTEXT, _STR_LEN.pack(number) + context.encode())
        self._reply(option, Reply.ACK)


def context_id(context: str, index: int) -> int:
    """The id a SET selection answers ``context`` by: fixed for the base and allocation-depth
    contexts, and past them, by position, for the dirty bitmaps (their names come and go)."""
    fixed = CONTEXT_IDS.get(context)
    return fixed if fixed is not None else FIRST_BITMAP_ID + index


def _matches(query: str, context: str) -> bool:
    """A LIST query names a context, or a whole namespace (``base:``, ``qemu:``)."""
    return query == context or (query.endswith(":") and context.startswith(query))


def _decode_string(raw: bytes) -> str | None:
    if len(raw) > MAX_STRING or b"\0" in raw:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def _parse_info_request(data: bytes) -> tuple[str, set[int]] | None:
    if len(data) < 4:
        return None
    (name_len,) = _STR_LEN.unpack_from(data)
    if 4 + name_len + 2 > len(data):
        return None
    name = _decode_string(data[4 : 4 + name_len])
    if name is None:
        return None
    (count,) = _U16.unpack_from(data, 4 + name_len)
    rest = data[4 + name_len + 2 :]
    if len(rest) != 2 * count:
        return None
    return name, {_U16.unpack_from(rest, 2 * i)[0] for i in range(count)}


def _parse_meta_context_request(data: bytes) -> tuple[str, list[str]] | None:
    if len(data) < 8:
        return None
    (name_len,) = _STR_LEN.unpack_from(data)
    if 4 + name_len + 4 > len(data):
        return None
    name = _decode_string(data[4 : 4 + name_len])
    if name is None:
        return None
    (count,) = _STR_LEN.unpack_from(data, 4 + name_len)
    pos = 4 + name_len + 4
    queries: list[str] = []
    for _ in range(count):
        if pos + 4 > len(data):
            return None
        (qlen,) = _STR_LEN.unpack_from(data, pos)
        pos += 4
        if pos + qlen > len(data):
            return None
        query = _decode_string(data[pos : pos + qlen])
        if query is None:
            return None
        queries.append(query)
        pos += qlen
    if pos != len(data):
        return None
    return name, queries


# -- request validation -------------------------------------------------------------------------

_ALLOWED_FLAGS: Final[dict[int, int]] = {
    int(command): int(flags)
    for command, flags in {
        Command.READ: CommandFlag.FUA | CommandFlag.DF,
        Command.WRITE: CommandFlag.FUA,
        Command.FLUSH: CommandFlag.FUA,
        Command.TRIM: CommandFlag.FUA,
        Command.CACHE: CommandFlag.FUA,
        Command.WRITE_ZEROES: CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
        Command.BLOCK_STATUS: CommandFlag.FUA | CommandFlag.REQ_ONE,
    }.items()
}


def validate(
    request: Request, export: Export, *, structured: bool, meta_contexts: dict[int, str]
) -> Errno | None:
    """The NBD error for a request that must be refused before touching the disk, or None.

    Mirrors nbdkit, qemu-nbd and nbd-server: out-of-range WRITE/WRITE_ZEROES → ENOSPC,
    out-of-range READ/TRIM/BLOCK_STATUS/CACHE → EINVAL, writes to a read-only export → EPERM.
    """
    command = request.command
    allowed = _ALLOWED_FLAGS.get(command)
    if allowed is None:
        return Errno.EINVAL
    if request.flags & ~allowed:
        return Errno.EINVAL
    if request.flags & NBD_CMD_FLAG_DF and not structured:
        return Errno.EINVAL
    is_write = command in (NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES)
    if is_write and export.read_only:
        return Errno.EPERM
    if command == NBD_CMD_FLUSH:
        return None if request.offset == 0 and request.length == 0 else Errno.EINVAL
    if request.length == 0:
        return Errno.EINVAL
    if command in (NBD_CMD_READ, NBD_CMD_WRITE) and request.length > export.max_block_size:
        # proto.md keeps EOVERFLOW for a DF read that cannot go in one chunk; a payload over the
        # advertised maximum is the client's error: EINVAL, as nbdkit and qemu-nbd answer.
        return Errno.EOVERFLOW if request.flags & NBD_CMD_FLAG_DF else Errno.EINVAL
    if request.offset + request.length > export.size:
        return Errno.ENOSPC if command in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES) else Errno.EINVAL
    if command == NBD_CMD_BLOCK_STATUS and not meta_contexts:
        return Errno.EINVAL
    return None
