"""No secret ever leaves the service: not in its logs (DEBUG, text and JSON), not in any HTTP answer.

A real service process is pushed through the paths where secrets could slip out: valid callbacks, forged
ones, a Dify 401 whose message quotes the API key, WeCom rejecting the corp secret (40001) and revoking
access tokens (40014) with messages that quote them, a WeCom 502, a Dify that is down, admin calls with
wrong tokens, /status, /metrics. Then the combined logs and every response (headers and body) are searched
for each configured secret and every access token the fake WeCom issued.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from adapters.inbound.wecom_crypto import WeComCrypto
from adapters.outbound.wecom_paths import GETTOKEN, SYNC_MSG
from tests.support.dify_server import Fault
from tests.support.http_server import free_port
from tests.support.service_process import ServiceProcess, write_config
from tests.support.stack import ADMIN_TOKEN, AES_KEY, KF, TOKEN, Servers, fake_servers, notice_xml

pytestmark = pytest.mark.slow

DOWN_KF = "wkDifyIsDown01"
DOWN_KEY = "app-secret-key-of-a-dify-that-is-down"
JSON_KEYS = {"ts", "level", "logger", "request_id", "message"}


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


GUESSER = "127.0.0.2"


@dataclass
class Client:
    """Talks to the service like WeCom and an operator do, and keeps every answer."""

    url: str
    crypto: WeComCrypto
    answers: list[str] = field(default_factory=list)
    _nonce: int = 0

    def request(self, method: str, path: str, *, source: str = "", **kwargs: object) -> httpx.Response:
        if source:  # from another loopback address (an address with failed admin calls is locked out)
            with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=10) as other:
                response = other.request(method, self.url + path, **kwargs)  # type: ignore[arg-type]
        else:
            response = httpx.request(method, self.url + path, timeout=10, **kwargs)  # type: ignore[arg-type]
        self.answers.append(f"{method} {path} -> {response.status_code}\n{response.headers}\n{response.text}")
        return response

    def callback(self, open_kfid: str = KF, *, signature: str | None = None) -> httpx.Response:
        self._nonce += 1
        timestamp, nonce = str(int(time.time())), str(self._nonce)
        body, sig = self.crypto.encrypt_callback(
            notice_xml(self.crypto_corp, open_kfid), timestamp=timestamp, nonce=nonce
        )
        params = {"msg_signature": signature or sig, "timestamp": timestamp, "nonce": nonce}
        return self.request("POST", "/webhook", params=params, content=body)

    crypto_corp: str = ""


def replies(servers: Servers, customer: str) -> list[str]:
    return [s.text for s in servers.wecom.world.sent if s.customer.external_userid == customer]


def exercise(client: Client, servers: Servers) -> None:
    wecom, dify = servers.wecom, servers.dify
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    wecom.world.add_customer_text(KF, "wmLeak1", "你好")
    assert client.callback().status_code == 200
    wait_for(lambda: replies(servers, "wmLeak1") == ["答：你好"], "the first answer")

    # Every access token issued so far is revoked (40014), with a message quoting it.
    wecom.revoke_tokens(40014)
    wecom.world.add_customer_text(KF, "wmLeak1", "第二个问题")
    assert client.callback().status_code == 200
    wait_for(lambda: len(replies(servers, "wmLeak1")) == 2, "the answer after 40014")
    assert len(wecom.issued_tokens) >= 2

    # Dify answers 401, its message quoting the key.
    dify.inject(
        Fault(status=401, body={"code": "unauthorized", "message": f"bad key {dify.api_key}", "status": 401})
    )
    wecom.world.add_customer_text(KF, "wmLeak2", "Dify 401")
    assert client.callback().status_code == 200
    wait_for(lambda: len(replies(servers, "wmLeak2")) == 1, "the fallback after Dify 401")

    # WeCom's gateway fails (HTML 502) on sync_msg; the next callback pulls again.
    wecom.fail_next_http(SYNC_MSG, 502)
    wecom.world.add_customer_text(KF, "wmLeak3", "502")
    assert client.callback().status_code == 200
    wait_for(lambda: any(c.errcode is None for c in wecom.calls_to(SYNC_MSG)), "the 502")
    time.sleep(0.2)
    assert client.callback().status_code == 200
    wait_for(lambda: len(replies(servers, "wmLeak3")) == 1, "the answer after the 502")

    # A kf account whose Dify is down (nothing listens): the customer gets the fallback.
    wecom.world.add_customer_text(DOWN_KF, "wmLeak4", "有人吗")
    assert client.callback(DOWN_KF).status_code == 200
    wait_for(lambda: len(replies(servers, "wmLeak4")) == 1, "the fallback while Dify is down")

    # Forged and broken callbacks, URL verification right and wrong.
    assert client.callback(signature="0" * 40).status_code == 403
    for body in (b"", b"<xml><Encrypt>AAAA</Encrypt></xml>", b"<!DOCTYPE x [<!ENTITY a 'b'>]><xml/>"):
        assert client.request(
            "POST", "/webhook?msg_signature=a&timestamp=1&nonce=2", content=body
        ).status_code in (
            400,
            403,
        )
    echostr = client.crypto.encrypt("1234567890")
    signature = client.crypto.signature("1700000000", "9", echostr)
    query = {"msg_signature": signature, "timestamp": "1700000000", "nonce": "9", "echostr": echostr}
    assert client.request("GET", "/webhook", params=query).text == "1234567890"
    assert client.request("GET", "/webhook", params={**query, "msg_signature": "1" * 40}).status_code == 403

    # Admin calls with wrong tokens, then the right one.
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": ADMIN_TOKEN},
    ):
        for method, path in (
            ("GET", "/status"),
            ("POST", "/clear"),
            ("GET", "/get_conversation?user_id=wmLeak1"),
        ):
            # 429 once the address has failed too often (adapters/inbound/auth_throttle.py).
            assert client.request(method, path, headers=headers, source=GUESSER).status_code in (401, 429)
    assert client.request("POST", "/reset_conversation", json={"user_id": "wmLeak1"}).status_code == 401

    # Last, as the adapter then stops asking for 30 s: tokens revoked (40014), and the refresh is refused
    # (40001) with a message quoting the corp secret.
    wecom.revoke_tokens(40014)
    wecom.world.fail_next(GETTOKEN, 40001, errmsg=f"invalid credential, corpsecret={wecom.corp_secret}")
    wecom.world.add_customer_text(KF, "wmLeak5", "40001")
    assert client.callback().status_code == 200
    wait_for(lambda: any(c.errcode == 40001 for c in wecom.calls_to(GETTOKEN)), "the refused gettoken")
    time.sleep(0.3)

    # What the operator reads afterwards.
    status = client.request("GET", "/status", headers=admin)
    assert status.status_code == 200 and status.json()["counters"]["callbacks"] > 0
    assert (
        client.request("GET", "/get_conversation", params={"user_id": "wmLeak1"}, headers=admin).status_code
        == 200
    )
    for path in ("/metrics", "/healthz", "/readyz", "/openapi.json", "/nope"):
        client.request("GET", path)


@pytest.fixture
def servers() -> Iterator[Servers]:
    with fake_servers() as s:
        yield s


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_no_secret_in_logs_or_answers(servers: Servers, tmp_path: Path, log_format: str) -> None:
    config = write_config(
        tmp_path / "config.ini",
        {
            "CONFIG": {
                "CORP_ID": servers.wecom.corp_id,
                "CORP_SECRET": servers.wecom.corp_secret,
                "TOKEN": TOKEN,
                "ENCODING_AES_KEY": AES_KEY,
                "DIFY_API_BASE": servers.dify_url,
                "DIFY_API_KEY": servers.dify.api_key,
                "WECOM_API_BASE": servers.wecom_url,
                "ADMIN_TOKEN": ADMIN_TOKEN,
                "LOG_LEVEL": "DEBUG",
                "LOG_FORMAT": log_format,
            },
            "BOT": {
                "DIFY_RETRIES": "0",
                "DIFY_CONNECT_TIMEOUT": "2",
                "INTERIM_AFTER": "0",
                "RECOVERY_INTERVAL": "0",
            },
            f"KF:{DOWN_KF}": {
                "DIFY_API_BASE": f"http://127.0.0.1:{free_port()}/v1",
                "DIFY_API_KEY": DOWN_KEY,
            },
        },
    )
    service = ServiceProcess(config).start()
    client = Client(
        service.url,
        WeComCrypto(token=TOKEN, encoding_aes_key=AES_KEY, receive_id=servers.wecom.corp_id),
        crypto_corp=servers.wecom.corp_id,
    )
    try:
        exercise(client, servers)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- service log (tail) ---\n{service.logs()[-6000:]}") from None
    finally:
        service.stop()
    logs = service.logs()
    answers = "\n".join(client.answers)

    secrets = {
        "CORP_SECRET": servers.wecom.corp_secret,
        "TOKEN": TOKEN,
        "ENCODING_AES_KEY": AES_KEY,
        "DIFY_API_KEY": servers.dify.api_key,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "the down route's DIFY_API_KEY": DOWN_KEY,
    }
    secrets.update({f"access token #{i}": t for i, t in enumerate(servers.wecom.issued_tokens)})
    assert len(servers.wecom.issued_tokens) >= 2
    for name, secret in secrets.items():
        assert secret not in logs, f"{name} in the logs"
        assert secret not in answers, f"{name} in an HTTP answer"

    # The paths above really ran (the greps were not vacuous) ...
    for expected in ("40001", "40014", "webhook POST rejected with 403", "admin request refused"):
        assert expected in logs, expected
    assert "***" in logs  # ... and the quoted secrets were masked, not merely absent
    assert any(line for line in logs.splitlines() if "DEBUG" in line)

    if log_format == "json":
        lines = [line for line in logs.splitlines() if line.strip()]
        assert lines
        for line in lines:
            record = json.loads(line)  # every line is one JSON object: no stray print, no bare traceback
            assert isinstance(record, dict) and JSON_KEYS <= set(record), line
            assert record["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
        assert any(json.loads(line)["request_id"].startswith("cb-") for line in lines)
