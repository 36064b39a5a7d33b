"""The vhost-user message codec (sans-I/O): layouts from docs/interop/vhost-user.rst, round
trips of every payload, and reassembly of messages from any chunking of the stream."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device.spec import vhost_user as vu

u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)


def test_wire_layouts() -> None:
    assert vu.HEADER_SIZE == 12
    assert vu.VRING_STATE.size == 8
    assert vu.VRING_ADDR.size == 40
    assert vu.MEMORY_REGION.size == 32
    assert vu.CONFIG_HEADER.size == 12
    # A request has flags 0x1, a reply 0x5, a request wanting an ack 0x9.
    assert struct.unpack("=III", vu.encode_message(vu.Request.GET_FEATURES)) == (1, 0x1, 0)
    assert struct.unpack_from("=III", vu.encode_reply(1, vu.encode_u64(7))) == (1, 0x5, 8)
    need = vu.encode_message(vu.Request.SET_MEM_TABLE, b"", need_reply=True)
    assert struct.unpack("=III", need) == (5, 0x9, 0)


def test_vring_addr_puts_used_before_avail() -> None:
    raw = vu.VringAddr(index=1, flags=0, desc=0x1000, used=0x3000, avail=0x2000, log=0).encode()
    assert struct.unpack("=IIQQQQ", raw) == (1, 0, 0x1000, 0x3000, 0x2000, 0)


def test_message_ids_and_protocol_bits_match_the_spec() -> None:
    ids = {r.name: int(r) for r in vu.Request}
    assert (ids["GET_CONFIG"], ids["GET_VRING_BASE"], ids["SET_VRING_ENABLE"], ids["GET_QUEUE_NUM"]) == (
        24,
        11,
        18,
        17,
    )
    bits = {f.name: int(f) for f in vu.ProtocolFeature}
    assert (bits["CONFIG"], bits["REPLY_ACK"], bits["MQ"]) == (9, 3, 0)
    assert vu.VHOST_USER_F_PROTOCOL_FEATURES == 30


@given(index=u32, num=u32)
def test_vring_state_round_trip(index: int, num: int) -> None:
    state = vu.VringState(index, num)
    assert vu.VringState.decode(state.encode()) == state


@given(index=u32, flags=u32, desc=u64, used=u64, avail=u64, log=u64)
def test_vring_addr_round_trip(index: int, flags: int, desc: int, used: int, avail: int, log: int) -> None:
    addr = vu.VringAddr(index, flags, desc, used, avail, log)
    assert vu.VringAddr.decode(addr.encode()) == addr


@given(index=st.integers(0, 255), nofd=st.booleans())
def test_vring_file_round_trip(index: int, nofd: bool) -> None:
    file = vu.VringFile(index, nofd)
    assert vu.VringFile.decode(file.encode()) == file


def test_vring_file_rejects_unknown_bits() -> None:
    with pytest.raises(vu.VhostUserProtocolError):
        vu.VringFile.decode(vu.encode_u64(0x200))


regions = st.builds(vu.MemoryRegion, u64, u64, u64, u64)


@given(table=st.lists(regions, min_size=1, max_size=8))
def test_memory_table_round_trip(table: list[vu.MemoryRegion]) -> None:
    assert vu.decode_memory_table(vu.encode_memory_table(table)) == table


@given(region=regions)
def test_single_region_round_trip(region: vu.MemoryRegion) -> None:
    assert vu.decode_single_region(vu.encode_single_region(region)) == region


def test_memory_table_sized_for_eight_slots_is_accepted() -> None:
    region = vu.MemoryRegion(0, 1 << 28, 0x7F00_0000_0000, 0)
    payload = vu.MEMORY_HEADER.pack(1, 0) + region.encode() + bytes(7 * vu.MEMORY_REGION.size)
    assert vu.decode_memory_table(payload) == [region]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        vu.MEMORY_HEADER.pack(0, 0),
        vu.MEMORY_HEADER.pack(9, 0) + bytes(9 * 32),
        vu.MEMORY_HEADER.pack(2, 0) + bytes(32),  # says two, carries one
        vu.MEMORY_HEADER.pack(1, 0) + bytes(33),
    ],
)
def test_bad_memory_tables_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(vu.VhostUserProtocolError):
        vu.decode_memory_table(payload)


@given(offset=st.integers(0, 255), data=st.binary(max_size=256), flags=st.integers(0, 1))
def test_config_space_round_trip(offset: int, data: bytes, flags: int) -> None:
    config = vu.ConfigSpace(offset, len(data), flags, data)
    assert vu.ConfigSpace.decode(config.encode()) == config


def test_config_space_size_must_match_its_data() -> None:
    with pytest.raises(vu.VhostUserProtocolError):
        vu.ConfigSpace.decode(vu.CONFIG_HEADER.pack(0, 57, 0) + bytes(56))
    with pytest.raises(vu.VhostUserProtocolError):
        vu.ConfigSpace.decode(vu.CONFIG_HEADER.pack(0, 300, 0) + bytes(300))
    # The reply to QEMU 7.2's GET_CONFIG: 12 bytes of header + 57 of config.
    assert len(vu.ConfigSpace(0, 57, 0, bytes(96)).encode()) == 12 + 57


@pytest.mark.parametrize("layout", ["u64", "state", "addr"])
def test_wrong_payload_sizes_are_protocol_errors(layout: str) -> None:
    with pytest.raises(vu.VhostUserProtocolError):
        if layout == "u64":
            vu.decode_u64(bytes(4))
        elif layout == "state":
            vu.VringState.decode(bytes(12))
        else:
            vu.VringAddr.decode(bytes(39))


def test_headers_with_a_wrong_version_or_oversized_payload_are_refused() -> None:
    with pytest.raises(vu.VhostUserProtocolError):
        vu.decode_header(struct.pack("=III", 1, 0x2, 0))
    with pytest.raises(vu.VhostUserProtocolError):
        vu.decode_header(struct.pack("=III", 1, 0x1, vu.VHOST_USER_MAX_PAYLOAD + 1))
    with pytest.raises(vu.VhostUserProtocolError):
        vu.decode_header(b"\x01\x00")


messages = st.lists(
    st.tuples(
        st.integers(1, 40),
        st.binary(max_size=300),
        st.booleans(),
        st.lists(st.integers(3, 1000), max_size=8),
    ),
    min_size=1,
    max_size=6,
)


@given(msgs=messages, cuts=st.lists(st.integers(1, 64), min_size=1, max_size=50))
def test_parser_reassembles_any_chunking_and_keeps_fds_with_their_message(
    msgs: list[tuple[int, bytes, bool, list[int]]], cuts: list[int]
) -> None:
    """Reading at most ``needed()`` bytes at a time (as the socket layer does) with each
    message's fds arriving with its first byte, every message comes out whole with its fds."""
    parser = vu.MessageParser()
    out: list[vu.Message] = []
    for i, (request, payload, need_reply, fds) in enumerate(msgs):
        wire = vu.encode_message(request, payload, need_reply=need_reply)
        pos = 0
        first = True
        while pos < len(wire):
            size = min(cuts[(i + pos) % len(cuts)], parser.needed())
            assert size > 0
            out += parser.feed(wire[pos : pos + size], fds if first else ())
            first = False
            pos += size
        assert parser.idle
    assert [(m.request, m.payload, m.need_reply, list(m.fds)) for m in out] == msgs
    assert all(not m.is_reply for m in out)


def test_parser_returns_several_messages_from_one_chunk() -> None:
    wire = vu.encode_message(1) + vu.encode_message(2, vu.encode_u64(5)) + vu.encode_message(3)[:4]
    parser = vu.MessageParser()
    got = parser.feed(wire)
    assert [m.request for m in got] == [1, 2]
    assert not parser.idle and parser.needed() == 8


def test_feature_names_for_logs() -> None:
    mask = vu.protocol_mask(vu.ProtocolFeature.MQ, vu.ProtocolFeature.CONFIG, 40)
    assert vu.feature_names(mask) == ["MQ", "CONFIG", "40"]
