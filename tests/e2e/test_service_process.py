"""`python bootstrap.py --config config.ini` serves: verification, a callback answered, a clean stop."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from adapters.inbound.wecom_crypto import WeComCrypto
from tests.support.service_process import ServiceProcess, wait_for, write_config
from tests.support.stack import ADMIN_TOKEN, AES_KEY, KF, TOKEN, fake_servers, notice_xml

pytestmark = pytest.mark.slow


def test_the_service_process_answers_a_callback_and_stops_cleanly(tmp_path: Path) -> None:
    with fake_servers() as servers:
        config = write_config(
            tmp_path / "config.ini",
            {
                "CONFIG": {
                    "CORP_ID": servers.wecom.corp_id,
                    "AGENT_ID": "1000002",
                    "CORP_SECRET": servers.wecom.corp_secret,
                    "TOKEN": TOKEN,
                    "ENCODING_AES_KEY": AES_KEY,
                    "DIFY_API_BASE": servers.dify_url,
                    "DIFY_API_KEY": servers.dify.api_key,
                    "WECOM_API_BASE": servers.wecom_url,
                    "ADMIN_TOKEN": ADMIN_TOKEN,
                    "LOG_LEVEL": "DEBUG",
                },
            },
        )
        service = ServiceProcess(config).start()
        try:
            crypto = WeComCrypto(token=TOKEN, encoding_aes_key=AES_KEY, receive_id=servers.wecom.corp_id)
            echostr = crypto.encrypt("4444555566667777")
            sig = crypto.signature("1700000000", "42", echostr)
            verify = httpx.get(
                service.url + "/webhook",
                params={"msg_signature": sig, "timestamp": "1700000000", "nonce": "42", "echostr": echostr},
            )
            assert verify.status_code == 200 and verify.text == "4444555566667777"

            servers.wecom.world.add_customer_text(KF, "wmProc", "你好")
            body, sig = crypto.encrypt_callback(
                notice_xml(servers.wecom.corp_id, KF), timestamp="1700000001", nonce="43"
            )
            resp = httpx.post(
                service.url + "/webhook",
                params={"msg_signature": sig, "timestamp": "1700000001", "nonce": "43"},
                content=body,
            )
            assert resp.status_code == 200
            wait_for(lambda: len(servers.wecom.world.sent) == 1)
            assert servers.wecom.world.sent[0].text == "答：你好"

            status = httpx.get(service.url + "/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert status.status_code == 200 and status.json()["counters"]["answered"] == 1
        finally:
            code = service.stop(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so supervisors see a normal SIGTERM exit.
        assert code in (0, -signal.SIGTERM)
        logs = service.logs()
        assert "stopped" in logs
        # The lifespan ran on the pipeline's loop and ended normally (not "appears unsupported").
        assert "Application startup complete" in logs and "Application shutdown complete" in logs
        assert "lifespan" not in logs
        assert "callback received" in logs and "reply sent" in logs
        for secret in (servers.wecom.corp_secret, TOKEN, AES_KEY, servers.dify.api_key, ADMIN_TOKEN):
            assert secret not in logs
        for token in servers.wecom.issued_tokens:
            assert token not in logs
        assert "Traceback" not in logs


def test_bad_configuration_stops_the_process_with_one_clear_message(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config.ini", {"CONFIG": {"CORP_ID": "ww1", "ENCODING_AES_KEY": "short"}}
    )
    service = ServiceProcess(config)
    with pytest.raises(RuntimeError) as excinfo:
        service.start(timeout=10)
    message = str(excinfo.value)
    assert "ENCODING_AES_KEY" in message and "CORP_SECRET" in message and "DIFY_API_KEY" in message
    assert "Traceback" not in message


def test_ctrl_c_stops_the_service_gracefully_without_a_traceback(tmp_path: Path) -> None:
    with fake_servers() as servers:
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
                },
            },
        )
        service = ServiceProcess(config).start()
        code = service.stop(signal.SIGINT)

        assert code == 0
        logs = service.logs()
        assert "stopped" in logs
        assert "Traceback" not in logs and "KeyboardInterrupt" not in logs
        assert "lifespan" not in logs  # not "ASGI 'lifespan' protocol appears unsupported" at the end
