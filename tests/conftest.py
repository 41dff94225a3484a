"""Shared fixtures: async tests run on asyncio (anyio's pytest plugin); fake WeCom/Dify servers; memcached."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings

from tests.support.memcached import MemcachedProcess, start_memcached
from tests.support.stack import Servers, fake_servers

# Hypothesis for every property test: no per-example deadline (the properties here are about results, not
# speed, and on a loaded machine a slow example is not a failure) and no example database in the repo.
settings.register_profile("kf-dify", deadline=None, database=None)
settings.load_profile("kf-dify")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def servers() -> Iterator[Servers]:
    """A fake WeCom and a fake Dify, each served over real HTTP on loopback."""
    with fake_servers() as s:
        yield s


@pytest.fixture
def memcached() -> Iterator[MemcachedProcess]:
    """A private memcached process on a free port."""
    process = start_memcached()
    try:
        yield process
    finally:
        process.stop()
