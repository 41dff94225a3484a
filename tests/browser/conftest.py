"""The operator console in a real headless Chromium (Debian's `chromium` package), driven by Playwright.

No browser download: Playwright's Python package drives the system's Chromium. Without Chromium (or without
the playwright package) these tests skip on a developer's machine and FAIL in CI (`CI=true`), where
scripts/test.sh installs both.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from domain.messages import CustomerRef
from tests.support.service_process import ServiceProcess, service_config, signed_callback, wait_for
from tests.support.stack import ADMIN_TOKEN, KF, Servers, fake_servers

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/lib/chromium/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    configured = os.environ.get("KF_CHROMIUM")
    for candidate in (configured, *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser tests need {reason} in CI (scripts/test.sh installs it)", pytrace=False)
    pytest.skip(f"{reason} not available: browser tests skipped (scripts/test.sh installs it)")


# Module scope, not session: sync Playwright runs an event loop on this thread while it is open, and the
# asyncio tests of the other modules need the thread to themselves.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    if executable is None:
        _unavailable("Debian's chromium package")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright Python package")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


class Service:
    """The service as a process, its fake WeCom and Dify, and the means to talk to it like WeCom does."""

    def __init__(self, process: ServiceProcess, servers: Servers) -> None:
        self.process = process
        self.servers = servers
        self.url = process.url

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def status(self) -> dict[str, Any]:
        return dict(self.admin("GET", "/status").json())

    def customer_says(self, customer: str, text: str) -> None:
        """A customer's message, its callback, and the wait until the bot has replied."""
        world = self.servers.wecom.world
        ref = CustomerRef(KF, customer)
        before = len(world.texts_sent_to(ref))
        world.add_customer_text(KF, customer, text)
        params, body = signed_callback(self.servers.wecom.corp_id, KF)
        assert httpx.post(self.url + "/webhook", params=params, content=body, timeout=10).status_code == 200
        wait_for(lambda: len(world.texts_sent_to(ref)) > before, what=f"the bot answering {customer}")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with fake_servers() as servers:
        config = service_config(tmp_path_factory.mktemp("console") / "config.ini", servers)
        process = ServiceProcess(config).start()
        try:
            yield Service(process, servers)
        finally:
            process.stop()
