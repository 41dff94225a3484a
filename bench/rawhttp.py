"""A minimal HTTP/1.1 keep-alive client on raw asyncio streams, and pre-built signed WeCom callbacks.

Much lighter than httpx per request, so the load generator measures the server, not itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from adapters.inbound.wecom_crypto import WeComCrypto
from bench.common import AES_KEY, CORP_ID, HOST, TOKEN


class RawConnection:
    """One keep-alive connection; one request at a time. Reconnects if the server closed it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> RawConnection:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def request(self, data: bytes, *, retry: bool = True) -> tuple[int, bytes]:
        """Send one request, read its answer. A kept-alive connection the server closed meanwhile (uvicorn
        drops idle ones after 5 s) is reopened and the request sent once more when `retry`."""
        if self._writer is None or self._writer.is_closing():
            await self.connect()
        try:
            return await self._exchange(data)
        except (asyncio.IncompleteReadError, ConnectionError):
            await self.close()
            if not retry:
                raise
            await self.connect()
            return await self._exchange(data)

    async def _exchange(self, data: bytes) -> tuple[int, bytes]:
        assert self._reader is not None and self._writer is not None
        self._writer.write(data)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        length = 0
        at = lower.find(b"\r\ncontent-length:")
        if at >= 0:
            end = lower.index(b"\r\n", at + 2)
            length = int(lower[at + 17 : end])
        elif b"transfer-encoding: chunked" in lower:
            raise RuntimeError("chunked responses are not supported by the bench client")
        body = await self._reader.readexactly(length) if length else b""
        if b"\r\nconnection: close" in lower:
            await self.close()
        return status, body

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
            self._writer = None


def crypto() -> WeComCrypto:
    return WeComCrypto(token=TOKEN, encoding_aes_key=AES_KEY, receive_id=CORP_ID)


def notice_xml(open_kfid: str, token: str, create_time: int) -> str:
    """The decrypted kf callback (as tests.support.stack.notice_xml builds it)."""
    return (
        f"<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><CreateTime>{create_time}</CreateTime>"
        "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[kf_msg_or_event]]></Event>"
        f"<Token><![CDATA[{token}]]></Token><OpenKfId><![CDATA[{open_kfid}]]></OpenKfId></xml>"
    )


def callback_request(c: WeComCrypto, *, port: int, open_kfid: str, nonce: str, token: str) -> bytes:
    """A complete `POST /webhook` request as WeCom sends it: signed query string, encrypted XML body."""
    now = int(time.time())
    timestamp = str(now)
    body, signature = c.encrypt_callback(notice_xml(open_kfid, token, now), timestamp=timestamp, nonce=nonce)
    head = (
        f"POST /webhook?msg_signature={signature}&timestamp={timestamp}&nonce={nonce} HTTP/1.1\r\n"
        f"Host: {HOST}:{port}\r\nUser-Agent: Mozilla/4.0\r\nContent-Type: text/xml\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def callback_pool(port: int, size: int, open_kfids: Sequence[str], seed: str = "n") -> list[bytes]:
    """`size` distinct valid callbacks (distinct nonce, token and ciphertext), spread over `open_kfids`."""
    c = crypto()
    return [
        callback_request(
            c, port=port, open_kfid=open_kfids[i % len(open_kfids)], nonce=f"{seed}{i}", token=f"ENC{seed}{i}"
        )
        for i in range(size)
    ]
