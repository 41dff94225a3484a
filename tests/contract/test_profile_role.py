"""The ProfileStore role (application/ports.py), run against every store: in-process, Memcached (one
server and two), the failover wrapper over a healthy Memcached, and the failover wrapper whose Memcached is
down."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import anyio
import pytest

from adapters.outbound.memcached_store import MemcachedStateStore
from adapters.outbound.memory_store import MemoryStateStore
from application.failover_store import FailoverStateStore
from application.ports import ProfileStore, StateStore
from domain.customer import CustomerProfile, EntryContext
from domain.messages import CustomerRef

pytestmark = pytest.mark.anyio

KF = "wkKF0001"
ALICE = CustomerRef(KF, "wmAlice")
BOB = CustomerRef(KF, "wmBob")
SHARED = frozenset({"memcached", "memcached-2", "failover"})
PROFILE_TTL_S = 2.0
PROFILE = CustomerProfile(
    nickname="张三",
    gender=2,
    unionid="oUnion-1",
    entry=EntryContext(scene="product", scene_param="商品页?id=42", channels_nickname="好物", at=5.0),
    fetched_at=1_700_000_000.0,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _memcached(servers: list[tuple[str, int]], prefix: str, timeout: float = 2) -> MemcachedStateStore:
    return MemcachedStateStore(
        servers=servers,
        prefix=prefix,
        connect_timeout=timeout,
        timeout=timeout,
        profile_ttl_s=PROFILE_TTL_S,
    )


def _memory(clock: FakeClock) -> MemoryStateStore:
    return MemoryStateStore(clock=clock, profile_ttl_s=PROFILE_TTL_S)


def _open(request: pytest.FixtureRequest, backend: str, prefix: str, clock: FakeClock) -> StateStore:
    if backend == "memory":
        return _memory(clock)
    if backend in ("memcached", "failover"):
        shared = _memcached([request.getfixturevalue("memcached_server").server], prefix)
        if backend == "memcached":
            return shared
        return FailoverStateStore(shared, _memory(clock), retry_interval_s=3600)
    if backend == "memcached-2":
        return _memcached([s.server for s in request.getfixturevalue("memcached_pair")], prefix)
    down = _memcached([request.getfixturevalue("unreachable_memcached")], prefix, timeout=1)
    return FailoverStateStore(down, _memory(clock), retry_interval_s=3600)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(
    params=[
        "memory",
        pytest.param("memcached", marks=pytest.mark.memcached),
        pytest.param("memcached-2", marks=pytest.mark.memcached),
        pytest.param("failover", marks=pytest.mark.memcached),
        "failover-primary-down",
    ]
)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(
    request: pytest.FixtureRequest, backend: str, key_prefix: str, clock: FakeClock
) -> AsyncIterator[StateStore]:
    opened = _open(request, backend, key_prefix, clock)
    try:
        yield opened
    finally:
        if isinstance(opened, MemcachedStateStore | FailoverStateStore):
            try:
                if backend in SHARED:
                    await opened.clear()
            finally:
                await opened.aclose()


@pytest.fixture
async def twin(
    request: pytest.FixtureRequest, store: StateStore, backend: str, key_prefix: str, clock: FakeClock
) -> AsyncIterator[StateStore]:
    """Another instance of the same service: the store itself where nothing is shared."""
    if backend not in SHARED:
        yield store
        return
    opened = _open(request, backend, key_prefix, clock)
    try:
        yield opened
    finally:
        assert isinstance(opened, MemcachedStateStore | FailoverStateStore)
        await opened.aclose()


class TestProfileStore:
    async def test_a_stored_profile_is_read_back_whole(self, store: ProfileStore) -> None:
        await store.put_profile(ALICE, PROFILE)

        assert await store.get_profile(ALICE) == PROFILE

    async def test_an_unknown_customer_has_no_profile(self, store: ProfileStore) -> None:
        assert await store.get_profile(ALICE) is None

    async def test_profiles_are_per_customer_and_per_kf_account(self, store: ProfileStore) -> None:
        other_kf = CustomerRef("wkKF0002", ALICE.external_userid)
        await store.put_profile(ALICE, PROFILE)
        await store.put_profile(BOB, CustomerProfile(nickname="李四"))

        assert (await store.get_profile(BOB)) == CustomerProfile(nickname="李四")
        assert await store.get_profile(other_kf) is None

    async def test_the_newest_write_wins(self, store: ProfileStore) -> None:
        await store.put_profile(ALICE, PROFILE)
        await store.put_profile(ALICE, CustomerProfile(nickname="新名字"))

        assert await store.get_profile(ALICE) == CustomerProfile(nickname="新名字")

    async def test_every_instance_sees_it(self, store: ProfileStore, twin: ProfileStore) -> None:
        await store.put_profile(ALICE, PROFILE)

        assert await twin.get_profile(ALICE) == PROFILE

    async def test_a_profile_without_entry_context_stays_without(self, store: ProfileStore) -> None:
        await store.put_profile(ALICE, CustomerProfile(nickname="王五", gender=1))

        found = await store.get_profile(ALICE)
        assert found is not None and found.entry is None and found.gender_text == "男"

    async def test_a_profile_expires_after_the_profile_ttl(
        self, store: ProfileStore, backend: str, clock: FakeClock
    ) -> None:
        await store.put_profile(ALICE, PROFILE)
        clock.now += PROFILE_TTL_S + 0.001
        if backend in SHARED:  # memcached expires in real time, whole seconds
            await anyio.sleep(math.ceil(PROFILE_TTL_S) + 1.1)

        assert await store.get_profile(ALICE) is None

    async def test_clear_forgets_profiles(self, store: StateStore) -> None:
        await store.put_profile(ALICE, PROFILE)
        await store.clear()

        assert await store.get_profile(ALICE) is None
