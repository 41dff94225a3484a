"""Run the service as a real process (`python bootstrap.py --config ...`), as an operator does."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from adapters.inbound.wecom_crypto import WeComCrypto
from tests.support.http_server import free_port
from tests.support.memcached import MemcachedProcess
from tests.support.stack import ADMIN_TOKEN, AES_KEY, TOKEN, Servers, notice_xml

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# The service's exit status when it cannot bind its port (adapters/inbound/server.py).
CANNOT_LISTEN = 3
PORT_ATTEMPTS = 5


class ServiceProcess:
    def __init__(self, config: Path, *, port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.config = config
        self._own_port = port is None
        self._extra_env = env or {}
        self._use_port(port or free_port())
        self.proc: subprocess.Popen[bytes] | None = None

    def _use_port(self, port: int) -> None:
        self.port = port
        self.log_path = self.config.with_suffix(f".{self.port}.log")
        self._env = {**os.environ, "SERVER_PORT": str(port), "SERVER_HOST": "127.0.0.1", **self._extra_env}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        """Start and wait until /healthz answers. A port picked here (free_port) may be taken by someone
        else before the service binds it: the service then exits with CANNOT_LISTEN and starts again on
        another port."""
        for _ in range(PORT_ATTEMPTS - 1):
            try:
                return self._start_once(timeout)
            except _PortTaken:
                self._use_port(free_port())
        return self._start_once(timeout)

    def _start_once(self, timeout: float) -> ServiceProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bootstrap.py"), "--config", str(self.config)],
            cwd=ROOT,
            env=self._env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                if self._own_port and self.proc.returncode == CANNOT_LISTEN:
                    raise _PortTaken(self.port)
                raise RuntimeError(f"service exited early with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"service did not come up:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def logs(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""


class _PortTaken(Exception):
    """The port picked for the service was taken before it could listen."""


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout} s")


def service_config(
    path: Path,
    servers: Servers,
    *,
    memcached: MemcachedProcess | None = None,
    prefix: str = "kfdify",
    bot: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """A config.ini that points the service at the fake servers (and a memcached, when given)."""
    sections: dict[str, dict[str, Any]] = {
        "CONFIG": {
            "CORP_ID": servers.wecom.corp_id,
            "CORP_SECRET": servers.wecom.corp_secret,
            "TOKEN": TOKEN,
            "ENCODING_AES_KEY": AES_KEY,
            "DIFY_API_BASE": servers.dify_url,
            "DIFY_API_KEY": servers.dify.api_key,
            "WECOM_API_BASE": servers.wecom_url,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            **(config or {}),
        },
        "BOT": {"INTERIM_AFTER": 0, **(bot or {})},
    }
    if memcached is not None:
        host, port = memcached.server
        sections["MEMCACHE"] = {
            "host": host,
            "port": port,
            "connect_timeout": 1,
            "timeout": 1,
            "prefix": prefix,
        }
    return write_config(path, sections)


def signed_callback(corp_id: str, open_kfid: str, token: str = "") -> tuple[dict[str, str], bytes]:
    """Query parameters and body of a fresh kf_msg_or_event callback, signed and encrypted like WeCom's."""
    crypto = WeComCrypto(token=TOKEN, encoding_aes_key=AES_KEY, receive_id=corp_id)
    timestamp, nonce = str(int(time.time())), secrets.token_hex(4)
    body, signature = crypto.encrypt_callback(
        notice_xml(corp_id, open_kfid, token=token or f"T{nonce}"), timestamp=timestamp, nonce=nonce
    )
    return {"msg_signature": signature, "timestamp": timestamp, "nonce": nonce}, body
