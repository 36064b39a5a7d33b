"""The sans-I/O NBD codec alone: negotiation, request parsing, replies, and fuzzed input."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from service.nbd import protocol as p
from service.nbd.constants import (
    IHAVEOPT,
    NBD_REQUEST_MAGIC,
    Command,
    CommandFlag,
    Errno,
    Info,
    Option,
    Reply,
    TransmissionFlag,
)

EXPORT = p.Export(name="disk0", size=1 << 20, description="test disk")


class OneExport:
    def lookup(self, name: str) -> p.Export | None:
        return EXPORT if name in ("", "disk0") else None

    def exports(self) -> Sequence[p.Export]:
        return [EXPORT]


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def replies(out: bytes) -> list[tuple[int, int, bytes]]:
    result = []
    while out:
        _magic, opt, reply, length = struct.unpack_from(">QIII", out)
        result.append((opt, reply, out[20 : 20 + length]))
        out = out[20 + length :]
    return result


def negotiated() -> p.ServerConnection:
    conn = p.ServerConnection(OneExport())
    conn.receive_data(struct.pack(">I", 3) + option(Option.GO, struct.pack(">I", 0) + struct.pack(">H", 0)))
    event = conn.next_event()
    assert isinstance(event, p.Negotiated)
    conn.data_to_send()
    return conn


def test_go_replies_info_export_block_size_then_ack() -> None:
    conn = p.ServerConnection(OneExport())
    conn.receive_data(struct.pack(">I", 3))
    assert conn.next_event() is p.NEED_DATA
    name = b"disk0"
    conn.receive_data(
        option(Option.GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, Info.NAME))
    )
    event = conn.next_event()
    assert isinstance(event, p.Negotiated) and event.export is EXPORT
    got = replies(conn.data_to_send())
    assert [r[1] for r in got] == [Reply.INFO, Reply.INFO, Reply.INFO, Reply.ACK]
    info_type, size, flags = struct.unpack(">HQH", got[0][2])
    assert (info_type, size) == (Info.EXPORT, 1 << 20)
    assert flags & TransmissionFlag.CAN_MULTI_CONN and flags & TransmissionFlag.SEND_FLUSH
    assert not flags & TransmissionFlag.SEND_DF  # only with structured replies
    assert got[1][2] == struct.pack(">H", Info.NAME) + b"disk0"
    assert struct.unpack(">HIII", got[2][2]) == (Info.BLOCK_SIZE, 1, 4096, 32 << 20)


def test_option_arrives_byte_by_byte() -> None:
    conn = p.ServerConnection(OneExport())
    data = struct.pack(">I", 1) + option(Option.STRUCTURED_REPLY) + option(Option.ABORT)
    events = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        event = conn.next_event()
        if event is not p.NEED_DATA:
            events.append(event)
    assert len(events) == 1 and isinstance(events[0], p.Aborted)
    assert [r[1] for r in replies(conn.data_to_send())] == [Reply.ACK, Reply.ACK]
    assert conn.structured_replies


def test_set_meta_context_needs_structured_replies() -> None:
    conn = p.ServerConnection(OneExport())
    query = b"base:allocation"
    body = struct.pack(">I", 5) + b"disk0" + struct.pack(">I", 1) + struct.pack(">I", len(query)) + query
    conn.receive_data(struct.pack(">I", 1) + option(Option.SET_META_CONTEXT, body))
    assert conn.next_event() is p.NEED_DATA
    assert replies(conn.data_to_send())[0][1] == Reply.ERR_INVALID
    conn.receive_data(option(Option.STRUCTURED_REPLY) + option(Option.SET_META_CONTEXT, body))
    assert conn.next_event() is p.NEED_DATA
    got = replies(conn.data_to_send())
    assert [r[1] for r in got] == [Reply.ACK, Reply.META_CONTEXT, Reply.ACK]
    assert got[1][2] == struct.pack(">I", 1) + query
    assert conn.meta_contexts == {1: "base:allocation"}


class TwoExports:
    """A plain disk and one with a backing chain (it offers qemu:allocation-depth too)."""

    plain = p.Export(name="plain", size=1 << 20)
    chain = p.Export(name="chain", size=1 << 20, meta_contexts=("base:allocation", "qemu:allocation-depth"))

    def lookup(self, name: str) -> p.Export | None:
        return {"plain": self.plain, "chain": self.chain}.get(name)

    def exports(self) -> Sequence[p.Export]:
        return [self.plain, self.chain]


def _contexts(export: str, *queries: str) -> bytes:
    body = struct.pack(">I", len(export)) + export.encode() + struct.pack(">I", len(queries))
    return body + b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries)


def test_meta_contexts_are_listed_by_namespace_and_set_per_export() -> None:
    conn = p.ServerConnection(TwoExports())
    conn.receive_data(struct.pack(">I", 1) + option(Option.STRUCTURED_REPLY))
    assert conn.next_event() is p.NEED_DATA
    conn.data_to_send()

    def ask(opt: int, export: str, *queries: str) -> list[bytes]:
        conn.receive_data(option(opt, _contexts(export, *queries)))
        assert conn.next_event() is p.NEED_DATA
        got = replies(conn.data_to_send())
        assert got[-1][1] == Reply.ACK
        return [r[2] for r in got if r[1] == Reply.META_CONTEXT]

    depth = struct.pack(">I", 2) + b"qemu:allocation-depth"
    base = struct.pack(">I", 1) + b"base:allocation"
    assert ask(Option.LIST_META_CONTEXT, "chain") == [base, depth]
    assert ask(Option.LIST_META_CONTEXT, "chain", "qemu:") == [depth]
    assert ask(Option.LIST_META_CONTEXT, "chain", "base:") == [base]
    assert ask(Option.LIST_META_CONTEXT, "plain", "qemu:") == []
    assert ask(Option.LIST_META_CONTEXT, "plain") == [base]
    assert ask(Option.SET_META_CONTEXT, "plain", "qemu:allocation-depth") == []
    assert ask(Option.SET_META_CONTEXT, "chain", "qemu:allocation-depth", "base:allocation") == [base, depth]
    assert conn.meta_contexts == {1: "base:allocation", 2: "qemu:allocation-depth"}
    # Chosen for "chain": going to "plain" keeps none of them.
    conn.receive_data(option(Option.GO, struct.pack(">I", 5) + b"plain" + struct.pack(">H", 0)))
    event = conn.next_event()
    assert isinstance(event, p.Negotiated) and event.meta_contexts == {}


def test_requests_and_write_payload_accounting() -> None:
    conn = negotiated()
    payload = b"\xaa" * 1024
    conn.receive_data(
        struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 1, Command.WRITE, 7, 512, 1024) + payload[:100]
    )
    event = conn.next_event()
    assert event == p.Request(7, Command.WRITE, 1, 512, 1024)
    dest = bytearray(1024)
    taken = conn.take_payload(memoryview(dest))
    assert taken == 100 and dest[:100] == payload[:100]
    conn.payload_done(924)
    assert conn.next_event() is p.NEED_DATA


def test_skipped_payload_never_parses_as_requests() -> None:
    conn = negotiated()
    fake = struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, Command.DISC, 1, 0, 0)
    conn.receive_data(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, Command.WRITE, 1, 0, 56) + fake[:10])
    event = conn.next_event()
    assert isinstance(event, p.Request)
    conn.skip_payload(56)
    conn.receive_data(fake[10:] + fake)  # 18 + 28 more payload bytes, then 10 real ones
    assert conn.next_event() is p.NEED_DATA
    conn.receive_data(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, Command.FLUSH, 9, 0, 0))
    assert conn.next_event() == p.Request(9, Command.FLUSH, 0, 0, 0)


def test_validate_rules() -> None:
    size = EXPORT.size

    def check(cmd: int, offset: int, length: int, flags: int = 0, **kw: object) -> Errno | None:
        export = kw.get("export", EXPORT)
        assert isinstance(export, p.Export)
        return p.validate(
            p.Request(1, cmd, flags, offset, length),
            export,
            structured=bool(kw.get("structured", False)),
            meta_contexts={1: "base:allocation"} if kw.get("meta") else {},
        )

    assert check(Command.WRITE, size, 512) == Errno.ENOSPC
    assert check(Command.WRITE_ZEROES, size - 512, 1024) == Errno.ENOSPC
    assert check(Command.READ, size, 512) == Errno.EINVAL
    assert check(Command.TRIM, size - 1, 2) == Errno.EINVAL
    assert check(Command.BLOCK_STATUS, 0, 512, meta=True) is None
    assert check(Command.BLOCK_STATUS, size, 512, meta=True) == Errno.EINVAL
    assert check(Command.READ, 0, 0) == Errno.EINVAL
    assert check(Command.READ, 0, (32 << 20) + 1) == Errno.EINVAL  # over the maximum payload
    assert check(Command.READ, 0, (32 << 20) + 1, CommandFlag.DF, structured=True) == Errno.EOVERFLOW
    assert check(Command.WRITE, 0, (32 << 20) + 1) == Errno.EINVAL
    assert check(Command.READ, 0, 512, CommandFlag.DF) == Errno.EINVAL
    assert check(Command.READ, 0, 512, CommandFlag.DF, structured=True) is None
    assert check(Command.FLUSH, 0, 0, CommandFlag.NO_HOLE) == Errno.EINVAL
    assert check(99, 0, 512) == Errno.EINVAL
    ro = p.Export(name="ro", size=size, read_only=True)
    assert check(Command.WRITE, 0, 512, export=ro) == Errno.EPERM
    assert check(Command.READ, 0, 512, export=ro) is None


@settings(max_examples=400, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=30), handshake=st.booleans())
def test_fuzzed_input_yields_events_or_a_protocol_error(chunks: list[bytes], handshake: bool) -> None:
    conn = negotiated() if handshake else p.ServerConnection(OneExport())
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            for _ in range(100):
                event = conn.next_event()
                if event is p.NEED_DATA or isinstance(event, p.Aborted | p.Disconnect):
                    break
                if isinstance(event, p.Request) and event.command == Command.WRITE:
                    conn.skip_payload(event.length)
            conn.data_to_send()
    except p.RemoteProtocolError:
        assert conn.state is p.State.CLOSED


@settings(max_examples=200, deadline=None)
@given(
    opts=st.lists(
        st.tuples(st.integers(0, 12), st.binary(max_size=40)),
        max_size=12,
    )
)
def test_fuzzed_options_always_answered(opts: list[tuple[int, bytes]]) -> None:
    """Every option gets at least one reply (or ends negotiation): the client never hangs."""
    conn = p.ServerConnection(OneExport())
    conn.receive_data(struct.pack(">I", 3))
    for opt, data in opts:
        conn.receive_data(option(opt, data))
        event = conn.next_event()
        out = conn.data_to_send()
        if isinstance(event, p.Negotiated | p.Aborted) or conn.state is p.State.CLOSED:
            return
        assert event is p.NEED_DATA
        got = replies(out)
        assert got and all(r[0] == opt for r in got)
        assert got[-1][1] == Reply.ACK or got[-1][1] & (1 << 31)


@settings(max_examples=200, deadline=None)
@given(
    writes=st.lists(st.binary(min_size=1, max_size=600), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=6000), max_size=12),
    adopt=st.booleans(),
)
def test_requests_and_payloads_survive_any_split_whether_fed_as_bytes_or_adopted(
    writes: list[bytes], cuts: list[int], adopt: bool
) -> None:
    stream = b"".join(
        struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, Command.WRITE, i, 512 * i, len(w)) + w
        for i, w in enumerate(writes)
    )
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    conn = negotiated()
    got: list[tuple[int, bytes]] = []
    current: tuple[int, bytearray, int] | None = None  # cookie, payload, still missing
    for piece in pieces:
        conn.receive_data(bytearray(piece) if adopt else piece)  # an adopted buffer is not reused
        while True:
            if current is not None:
                cookie, payload, missing = current
                dest = memoryview(payload)[len(payload) - missing :]
                missing -= conn.take_payload(dest)
                current = (cookie, payload, missing)
                if missing:
                    break
                got.append((cookie, bytes(payload)))
                current = None
            event = conn.next_event()
            if event is p.NEED_DATA:
                break
            assert isinstance(event, p.Request)
            current = (event.cookie, bytearray(event.length), event.length)
    assert got == list(enumerate(writes))
