"""A minimal hand-rolled asyncio NBD client for tests: speaks the protocol, or breaks it."""

from __future__ import annotations

import asyncio
import struct
from typing import Protocol

from service.nbd.constants import (
    IHAVEOPT,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_OPT_REPLY_MAGIC,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBDMAGIC,
    Option,
    Reply,
)


class HasSocket(Protocol):
    @property
    def socket(self) -> str: ...


class WireClient:
    """A minimal hand-rolled NBD client that can also misbehave."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, rig: HasSocket | str) -> WireClient:
        """Connect to a unix socket (a path, or a rig's ``socket``) and finish the greeting."""
        path = rig if isinstance(rig, str) else rig.socket
        reader, writer = await asyncio.open_unix_connection(path)
        client = cls(reader, writer)
        magic, opt, _flags = struct.unpack(">QQH", await reader.readexactly(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        writer.write(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))
        return client

    def option(self, option: int, data: bytes = b"") -> None:
        self.writer.write(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    async def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply, length = struct.unpack(">QIII", await self.reader.readexactly(20))
        assert magic == NBD_OPT_REPLY_MAGIC
        return option, reply, await self.reader.readexactly(length)

    async def go(self, name: str = "disk0") -> None:
        raw = name.encode()
        self.option(Option.GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        while True:
            _, reply, _ = await self.option_reply()
            if reply == Reply.ACK:
                return
            assert reply == Reply.INFO, hex(reply)

    def request(
        self, command: int, cookie: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
    ) -> None:
        self.writer.write(
            struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, command, cookie, offset, length) + payload
        )

    async def simple_reply(self, data_len: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = struct.unpack(">IIQ", await self.reader.readexactly(16))
        assert magic == NBD_SIMPLE_REPLY_MAGIC
        data = await self.reader.readexactly(data_len) if error == 0 and data_len else b""
        return cookie, error, data

    async def closed(self) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), 5) == b""
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()
