"""A raw HTTP/1.1 client connection for tests that misbehave on purpose (trickle, flood, stop halfway).

Why not asyncio.open_connection: with its streams, a failed write (the server already answered and closed,
so our next write meets EPIPE or a reset) closes the transport and makes every later read raise, even
when the server's answer is already in our socket buffer. The answer is then lost to the test at random,
depending on whether the read or the failing write ran first. Here writing and reading are independent
(`loop.sock_sendall` / `loop.sock_recv` on one socket): a write error is the writer's alone, and the reader
gets every byte the kernel holds before it learns of a reset.
"""

from __future__ import annotations

import asyncio
import socket
from contextlib import suppress


async def open_raw(host: str, port: int) -> tuple[RawReader, RawWriter]:
    """Connect to host:port; (reader, writer) with the few methods of asyncio's streams the tests use."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return RawReader(sock), RawWriter(sock)


class RawReader:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._eof = False

    async def _fill(self) -> bool:
        """Read what the kernel has (waiting for some); False at EOF. A reset raises ConnectionResetError,
        but only once everything received before it was read."""
        if self._eof:
            return False
        data = await asyncio.get_running_loop().sock_recv(self._sock, 64 * 1024)
        if not data:
            self._eof = True
            return False
        self._buffer += data
        return True

    async def readline(self) -> bytes:
        """Up to and including b"\\n"; what is left (maybe b"") at EOF."""
        while (end := self._buffer.find(b"\n")) < 0:
            if not await self._fill():
                line, self._buffer = bytes(self._buffer), bytearray()
                return line
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return line

    async def readexactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if not await self._fill():
                raise asyncio.IncompleteReadError(bytes(self._buffer), n)
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def read(self) -> bytes:
        """Everything until EOF."""
        while await self._fill():
            pass
        data, self._buffer = bytes(self._buffer), bytearray()
        return data

    def peek_nowait(self) -> bytes:
        """What has arrived so far (buffered or in the kernel), without waiting or consuming it."""
        with suppress(BlockingIOError, InterruptedError, ConnectionError):
            waiting = self._sock.recv(64 * 1024, socket.MSG_PEEK)
            return bytes(self._buffer) + waiting
        return bytes(self._buffer)


class RawWriter:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._pending = bytearray()
        self._error: OSError | None = None

    def write(self, data: bytes) -> None:
        """Send what the socket takes now; drain() sends the rest. Never raises (as asyncio's streams):
        a connection error is raised by the next drain()."""
        self._pending += data
        if self._error is not None:
            return
        try:
            sent = self._sock.send(self._pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._error = exc
            return
        del self._pending[:sent]

    async def drain(self) -> None:
        """Send what is left; raises ConnectionError (EPIPE, reset) when the server is gone."""
        if self._error is not None:
            raise self._error
        data, self._pending = bytes(self._pending), bytearray()
        if data:
            await asyncio.get_running_loop().sock_sendall(self._sock, data)

    def close(self) -> None:
        self._sock.close()

    async def wait_closed(self) -> None:
        return None
