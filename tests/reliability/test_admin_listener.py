"""`[SERVER] ADMIN_PORT`: the operator endpoints leave the public port for a second listener, in one process.

The real service process: the public port answers only /webhook, /healthz and /readyz; the admin listener
(127.0.0.1) the admin API, /metrics (with the token) and /openapi.json, not /webhook. One SIGTERM stops both.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from adapters.inbound.config_file import ConfigError, load_settings
from tests.support.http_server import free_port
from tests.support.service_process import ServiceProcess, service_config, signed_callback
from tests.support.stack import ADMIN_TOKEN, KF, fake_servers

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.mark.slow
def test_admin_endpoints_and_metrics_only_on_the_admin_listener(tmp_path: Path) -> None:
    admin_port = free_port()
    with fake_servers() as servers:
        config = service_config(tmp_path / "config.ini", servers)
        with config.open("a", encoding="utf-8") as f:
            f.write(f"\n[SERVER]\nADMIN_PORT = {admin_port}\n")
        service = ServiceProcess(config).start()
        admin_url = f"http://127.0.0.1:{admin_port}"
        try:
            with httpx.Client(base_url=service.url, timeout=5) as public:
                assert public.get("/healthz").status_code == 200
                assert public.get("/readyz").status_code == 200
                query, body = signed_callback(servers.wecom.corp_id, KF)
                assert public.post("/webhook", params=query, content=body).status_code == 200
                for path in ("/status", "/get_conversation?user_id=wm1", "/metrics", "/openapi.json"):
                    response = public.get(path, headers=ADMIN)
                    assert response.status_code == 404 and response.json() == {"error": "not found"}, path
                for path in ("/clear", "/reset_conversation"):
                    assert public.post(path, headers=ADMIN, json={"user_id": "wm1"}).status_code == 404
            with httpx.Client(base_url=admin_url, timeout=5) as admin:
                status = admin.get("/status", headers=ADMIN)
                assert status.status_code == 200 and status.json()["counters"]["callbacks"] >= 1
                assert admin.get("/metrics").status_code == 401
                metrics = admin.get("/metrics", headers=ADMIN)
                assert metrics.status_code == 200 and "kfdify_callbacks_total" in metrics.text
                assert admin.get("/openapi.json").status_code == 200
                assert admin.get("/healthz").status_code == 200
                assert admin.post("/webhook", params=query, content=body).status_code == 404
        finally:
            service.stop()
        logs = service.logs()
        assert f"listening on http://127.0.0.1:{admin_port} (admin and /metrics)" in logs, logs
        assert "Traceback" not in logs
        assert "Finished server process" in logs  # one graceful shutdown for both listeners


def test_the_admin_port_must_differ_from_the_main_port(tmp_path: Path) -> None:
    environ = {
        "CORP_ID": "ww1",
        "CORP_SECRET": "s",
        "TOKEN": "t",
        "ENCODING_AES_KEY": "a" * 43,
        "DIFY_API_BASE": "http://127.0.0.1/v1",
        "DIFY_API_KEY": "app-1",
        "SERVER_PORT": "8000",
    }
    config = tmp_path / "config.ini"
    config.write_text("[SERVER]\nHOST = 0.0.0.0\n", encoding="utf-8")
    settings = load_settings(str(config), {**environ, "SERVER_ADMIN_PORT": "9000"})
    assert (settings.admin_host, settings.admin_port) == ("127.0.0.1", 9000)
    assert load_settings(str(config), environ).admin_port is None
    with pytest.raises(ConfigError, match="ADMIN_PORT"):
        load_settings(str(config), {**environ, "SERVER_ADMIN_PORT": "8000"})
