"""The whole service, for end-to-end tests: the real Starlette app and real adapters, talking HTTP to fake
WeCom and Dify servers. Callbacks are signed and encrypted exactly as WeCom does."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from adapters.inbound.config_file import MemcacheSettings, Settings
from adapters.inbound.wecom_crypto import WeComCrypto
from tests.support.dify_server import FakeDifyServer
from tests.support.http_server import serve
from tests.support.wecom_server import FakeWeComServer

# Official vector A credentials (docs/wecom-kf.md, callback crypto): any valid pair would do.
TOKEN = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo"
AES_KEY = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"
ADMIN_TOKEN = "admin-secret-token-for-tests"
KF = "wkTESTKF0001"


def notice_xml(
    corp_id: str, open_kfid: str, token: str = "ENCTOKEN0001", create_time: int | None = None
) -> str:
    ts = create_time or int(time.time())
    return (
        f"<xml><ToUserName><![CDATA[{corp_id}]]></ToUserName><CreateTime>{ts}</CreateTime>"
        "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[kf_msg_or_event]]></Event>"
        f"<Token><![CDATA[{token}]]></Token><OpenKfId><![CDATA[{open_kfid}]]></OpenKfId></xml>"
    )


@dataclasses.dataclass
class Servers:
    wecom: FakeWeComServer
    dify: FakeDifyServer
    wecom_url: str
    dify_url: str


@contextlib.contextmanager
def extra_dify(**dify_kwargs: Any) -> Iterator[tuple[FakeDifyServer, str]]:
    """Another Dify app on its own port (a second kf account's app): (server, its /v1 base URL)."""
    dify = FakeDifyServer(ping_interval=0.2, **dify_kwargs)
    with serve(dify.app) as dify_url:
        yield dify, dify_url + "/v1"


@contextlib.contextmanager
def fake_servers(**dify_kwargs: Any) -> Iterator[Servers]:
    wecom = FakeWeComServer()
    dify = FakeDifyServer(ping_interval=0.2, **dify_kwargs)
    with serve(wecom.app) as wecom_url, serve(dify.app) as dify_url:
        yield Servers(wecom, dify, wecom_url, dify_url + "/v1")


def make_settings(servers: Servers, **overrides: Any) -> Settings:
    base = Settings(
        corp_id=servers.wecom.corp_id,
        corp_secret=servers.wecom.corp_secret,
        token=TOKEN,
        encoding_aes_key=AES_KEY,
        dify_api_base=servers.dify_url,
        dify_api_key=servers.dify.api_key,
        wecom_api_base=servers.wecom_url,
        admin_token=ADMIN_TOKEN,
        dify_idle_timeout_s=5.0,
        dify_total_timeout_s=20.0,
        recovery_interval_s=0.0,
        shutdown_grace_s=5.0,
        # Tests that want the interim text (default 5 s) turn it on themselves.
        interim_after_s=0.0,
    )
    return dataclasses.replace(base, **overrides)


def memcache_settings(address: str, prefix: str) -> MemcacheSettings:
    host, _, port = address.rpartition(":")
    return MemcacheSettings(servers=((host, int(port)),), connect_timeout=1.0, timeout=1.0, prefix=prefix)


class Stack:
    """A running service instance (in this event loop) plus the means to poke it like WeCom does."""

    def __init__(self, settings: Settings, servers: Servers) -> None:
        import bootstrap

        self.settings = settings
        self.servers = servers
        self.container = bootstrap.build_container(settings)
        self.app = self.container.app()
        self.crypto = WeComCrypto(
            token=settings.token, encoding_aes_key=settings.encoding_aes_key, receive_id=settings.corp_id
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://kf-dify.test"
        )
        self._nonce = 1000

    @property
    def wecom(self) -> FakeWeComServer:
        return self.servers.wecom

    @property
    def dify(self) -> FakeDifyServer:
        return self.servers.dify

    async def callback(
        self,
        open_kfid: str = KF,
        *,
        token: str = "ENCTOKEN0001",
        body: bytes | None = None,
        signature: str | None = None,
    ) -> httpx.Response:
        self._nonce += 1
        timestamp, nonce = str(int(time.time())), str(self._nonce)
        xml = notice_xml(self.settings.corp_id, open_kfid, token)
        envelope, sig = self.crypto.encrypt_callback(xml, timestamp=timestamp, nonce=nonce)
        params = {"msg_signature": signature or sig, "timestamp": timestamp, "nonce": nonce}
        return await self.client.post(
            "/webhook", params=params, content=body if body is not None else envelope
        )

    async def settle(self, timeout: float = 20.0) -> None:
        """Wait until every pull and reply the callbacks caused has finished."""
        import asyncio

        await asyncio.wait_for(self.container.dispatcher().idle(), timeout)
        # Welcomes run beside the pulls (they must not hold them up): wait for those too.
        await asyncio.wait_for(self.container.observer().idle(), timeout)

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def replies_to(self, external_userid: str) -> list[str]:
        return [s.text for s in self.wecom.world.sent if s.customer.external_userid == external_userid]

    async def start(self) -> None:
        await self.container.lifecycle().start()

    async def stop(self) -> None:
        await self.container.lifecycle().stop()
        await self.client.aclose()


@contextlib.asynccontextmanager
async def running(settings: Settings, servers: Servers) -> AsyncIterator[Stack]:
    stack = Stack(settings, servers)
    await stack.start()
    try:
        yield stack
    finally:
        await stack.stop()
