"""Real memcached servers for the contract suite: started once per session, isolated per test by prefix."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest

from tests.support.memcached import MemcachedProcess, start_memcached


@pytest.fixture(scope="session")
def memcached_server() -> Iterator[MemcachedProcess]:
    server = start_memcached()
    try:
        yield server
    finally:
        server.kill()  # nothing in it needs to survive, and SIGTERM takes memcached about a second


@pytest.fixture(scope="session")
def memcached_pair() -> Iterator[tuple[MemcachedProcess, MemcachedProcess]]:
    """Two servers, for consistent hashing across nodes (HashClient)."""
    first = start_memcached()
    try:
        second = start_memcached()
        try:
            yield first, second
        finally:
            second.kill()
    finally:
        first.kill()


@pytest.fixture
def key_prefix() -> str:
    """A fresh namespace per test, so tests sharing a server never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="session")
def unreachable_memcached() -> Iterator[tuple[str, int]]:
    """An address where no memcached answers: a bound socket that never listens, so connecting is refused
    at once and nobody else can take the port while the session runs."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()
    finally:
        holder.close()
