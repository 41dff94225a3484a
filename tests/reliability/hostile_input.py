"""Shared by the hostile-input tests: the fuzz budget, an in-process app over fakes, forged callbacks.

KF_FUZZ_EXAMPLES sets every property test's example count (e.g. KF_FUZZ_EXAMPLES=5000 for a long local run);
without it each test uses its own small default, about 300 examples in all, so CI stays fast.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from Crypto.Cipher import AES
from hypothesis import HealthCheck, settings
from starlette.types import ASGIApp, Message

from adapters.inbound.wecom_crypto import WeComCrypto
from adapters.outbound.fake_wecom import KfWorld
from adapters.outbound.memory_store import MemoryStateStore
from bootstrap import Application
from tests.support.containers import AES_KEY, CORP_ID, TOKEN, fake_application, unit_settings

KF = "wkReliability01"
AES_KEY_BYTES = base64.b64decode(AES_KEY + "=")
CRYPTO = WeComCrypto(token=TOKEN, encoding_aes_key=AES_KEY, receive_id=CORP_ID)


def fuzz(default_examples: int) -> settings:
    """Hypothesis settings for one property test: KF_FUZZ_EXAMPLES wins over the test's default.

    The app under test is built once per test (a function-scoped fixture) and shared by its examples on
    purpose: that is the health check suppressed here. database=None: no example database in the repo.
    """
    env = os.environ.get("KF_FUZZ_EXAMPLES", "").strip()
    return settings(
        max_examples=int(env) if env else default_examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def notice_xml(open_kfid: str = KF, *, token: str = "ENCTOKEN", event: str = "kf_msg_or_event") -> str:
    return (
        f"<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><CreateTime>{int(time.time())}</CreateTime>"
        f"<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[{event}]]></Event>"
        f"<Token><![CDATA[{token}]]></Token><OpenKfId><![CDATA[{open_kfid}]]></OpenKfId></xml>"
    )


def sign(encrypted: str, *, timestamp: str = "1700000000", nonce: str = "42") -> dict[str, str]:
    """Query parameters that sign `encrypted` correctly, whatever it holds."""
    return {
        "msg_signature": CRYPTO.signature(timestamp, nonce, encrypted),
        "timestamp": timestamp,
        "nonce": nonce,
    }


def envelope(encrypted: str) -> bytes:
    return (
        f"<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><Encrypt><![CDATA[{encrypted}]]></Encrypt>"
        "<AgentID><![CDATA[]]></AgentID></xml>"
    ).encode("utf-8", "surrogatepass")


def signed_callback(
    plaintext: str, *, timestamp: str = "1700000000", nonce: str = "42"
) -> tuple[dict[str, str], bytes]:
    """A correctly signed and encrypted callback carrying `plaintext`, whatever it is."""
    body, signature = CRYPTO.encrypt_callback(plaintext, timestamp=timestamp, nonce=nonce)
    return {"msg_signature": signature, "timestamp": timestamp, "nonce": nonce}, body


def encrypt_layout(
    msg: bytes,
    *,
    msg_len: int | None = None,
    receive_id: bytes = CORP_ID.encode(),
    pad: int | None = None,
    random_prefix: bytes = b"0123456789abcdef",
) -> str:
    """Base64 AES ciphertext of an arbitrary plaintext layout: the length field and receive id may lie, the
    padding may be wrong (`pad` = the pad byte value used, with the right count unless it does not fit)."""
    data = random_prefix + struct.pack(">I", len(msg) if msg_len is None else msg_len) + msg + receive_id
    count = 32 - len(data) % 32
    value = count if pad is None else pad
    data += bytes([value % 256]) * count
    return base64.b64encode(
        AES.new(AES_KEY_BYTES, AES.MODE_CBC, iv=AES_KEY_BYTES[:16]).encrypt(data)
    ).decode()


@dataclass
class InProcess:
    """The real Starlette app over in-memory fakes, called through httpx.ASGITransport."""

    container: Application
    client: httpx.AsyncClient

    @property
    def world(self) -> KfWorld:
        world: KfWorld = self.container.adapters.world()
        return world

    @property
    def store(self) -> MemoryStateStore:
        store: MemoryStateStore = self.container.adapters.store()
        return store

    @property
    def pulls(self) -> int:
        """sync_msg calls so far: work a callback started."""
        return len(self.world.sync_requests)

    def counter(self, name: str) -> int:
        return int(self.container.telemetry().counters.get(name, 0))

    async def settle(self, timeout: float = 10.0) -> None:
        # Let tasks a request just spawned start, then wait for every pull and drain to end.
        await asyncio.sleep(0)
        await asyncio.wait_for(self.container.dispatcher().idle(), timeout)


@contextlib.asynccontextmanager
async def in_process(*, body_timeout_s: float | None = None, **overrides: Any) -> AsyncIterator[InProcess]:
    container = fake_application(unit_settings(**overrides))
    if body_timeout_s is not None:
        container.webhook.add_kwargs(body_timeout_s=body_timeout_s)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=container.app()), base_url="http://kf.test")
    await container.lifecycle().start()  # what the app's lifespan does: until then callbacks get 503
    try:
        yield InProcess(container, client)
    finally:
        await client.aclose()
        await container.lifecycle().stop()


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


Receive = Callable[[], Awaitable[Message]]


async def call_asgi(
    app: ASGIApp,
    *,
    method: str = "POST",
    path: str = "/webhook",
    query: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    receive: Receive | None = None,
) -> RawResponse:
    """One request straight into the ASGI app: the query string is raw bytes (no client normalises it),
    and `receive` may deliver the body however slowly a test likes."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"kf.test"), *headers],
        "client": ("203.0.113.9", 50000),
        "server": ("kf.test", 80),
    }
    answered = asyncio.Event()
    sent_body = False

    async def whole_body() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    status = 0
    response_headers: dict[str, str] = {}
    chunks: list[bytes] = []

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            response_headers.update({k.decode("latin-1"): v.decode("latin-1") for k, v in message["headers"]})
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                answered.set()

    await app(scope, receive or whole_body, send)
    return RawResponse(status, response_headers, b"".join(chunks))
