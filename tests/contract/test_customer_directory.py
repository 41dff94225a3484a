"""The `CustomerDirectory` contract (`kf/customer/batchget`, docs/wecom-kf.md §11): the in-memory fake and
the real adapter over HTTP against the WeCom emulator answer alike."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import quote

import pytest

from adapters.outbound.fake_wecom import FakeKfChannel, KfWorld
from adapters.outbound.wecom_api import WeComKfChannel
from adapters.outbound.wecom_paths import CUSTOMER_BATCHGET
from application.errors import WeComError
from application.ports import CustomerDirectory
from domain.customer import CustomerProfile, EntryContext
from tests.support.http_server import serve
from tests.support.wecom_server import FakeWeComServer

pytestmark = pytest.mark.anyio

KF = "wkKF000001"
T0 = 1_750_000_000.0


class ManualClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Directory:
    port: CustomerDirectory
    world: KfWorld
    clock: ManualClock


@pytest.fixture(scope="module")
def served_wecom() -> Iterator[tuple[FakeWeComServer, str]]:
    server = FakeWeComServer()
    with serve(server.app) as base_url:
        yield server, base_url


@pytest.fixture(params=["fake", "emulated"])
async def directory(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[Directory]:
    clock = ManualClock()
    world = KfWorld(clock=clock)
    if request.param == "fake":
        yield Directory(FakeKfChannel(world), world, clock)
        return
    server, base_url = request.getfixturevalue("served_wecom")
    server.reset(world)
    channel = WeComKfChannel(
        corp_id=server.corp_id, corp_secret=server.corp_secret, api_base=base_url, timeout=5
    )
    try:
        yield Directory(channel, world, clock)
    finally:
        await channel.aclose()


class TestBatchget:
    async def test_profiles_come_back_by_external_userid(self, directory: Directory) -> None:
        directory.world.add_customer_profile("wmA", nickname="张三", gender=1, unionid="oU-A")
        directory.world.add_customer_profile("wmB", nickname="Lily", gender=2)

        batch = await directory.port.get_customers(["wmA", "wmB"], with_context=False)

        assert batch.profiles == {
            "wmA": CustomerProfile(nickname="张三", gender=1, unionid="oU-A"),
            "wmB": CustomerProfile(nickname="Lily", gender=2),
        }
        assert batch.invalid == ()

    async def test_unknown_customers_are_listed_as_invalid(self, directory: Directory) -> None:
        directory.world.add_customer_profile("wmA", nickname="张三")

        batch = await directory.port.get_customers(["wmA", "wmNobody"], with_context=True)

        assert set(batch.profiles) == {"wmA"}
        assert batch.invalid == ("wmNobody",)

    async def test_the_entry_context_comes_decoded_for_recently_active_customers(
        self, directory: Directory
    ) -> None:
        world = directory.world
        world.add_customer_profile("wmA", nickname="张三")
        world.add_enter_session(
            KF,
            "wmA",
            scene="product",
            scene_param=quote("商品页?id=42"),
            welcome=False,
            wechat_channels={"nickname": "好物视频号", "scene": 1},
        )

        with_context = await directory.port.get_customers(["wmA"], with_context=True)
        without = await directory.port.get_customers(["wmA"], with_context=False)

        entry = with_context.profiles["wmA"].entry
        assert entry is not None
        assert (entry.scene, entry.scene_param, entry.channels_nickname, entry.channels_scene) == (
            "product",
            "商品页?id=42",
            "好物视频号",
            1,
        )
        assert without.profiles["wmA"].entry is None

    async def test_no_context_after_48_hours(self, directory: Directory) -> None:
        directory.world.add_customer_profile("wmA", nickname="张三")
        directory.world.add_enter_session(KF, "wmA", scene="ad", welcome=False)
        directory.clock.now += 48 * 3600 + 1

        batch = await directory.port.get_customers(["wmA"], with_context=True)

        assert batch.profiles["wmA"].entry is None

    async def test_no_unionid_without_a_bound_open_platform(self, directory: Directory) -> None:
        directory.world.add_customer_profile("wmA", nickname="张三", unionid="oU-A")
        directory.world.unionid_bound = False

        batch = await directory.port.get_customers(["wmA"], with_context=False)

        assert batch.profiles["wmA"].unionid == ""

    async def test_a_customer_who_wrote_is_known_even_unseeded(self, directory: Directory) -> None:
        directory.world.add_customer_text(KF, "wmC", "你好")

        batch = await directory.port.get_customers(["wmC"], with_context=True)

        assert "wmC" in batch.profiles and batch.profiles["wmC"].nickname

    async def test_missing_permission_is_48002(self, directory: Directory) -> None:
        directory.world.add_customer_profile("wmA", nickname="张三")
        directory.world.forbidden_apis.add(CUSTOMER_BATCHGET)

        with pytest.raises(WeComError) as raised:
            await directory.port.get_customers(["wmA"], with_context=True)

        assert raised.value.errcode == 48002

    async def test_an_injected_errcode_surfaces(self, directory: Directory) -> None:
        directory.world.fail_next(CUSTOMER_BATCHGET, 40096, errmsg="invalid external_userid")

        with pytest.raises(WeComError) as raised:
            await directory.port.get_customers(["wmA"], with_context=False)

        assert raised.value.errcode == 40096

    async def test_hostile_fields_are_cleaned_and_bounded(self, directory: Directory) -> None:
        directory.world.add_customer_profile("wmA", nickname="坏\x00人\n" + "名" * 200, gender=7)
        directory.world.add_enter_session(KF, "wmA", scene_param=quote("页" * 100), welcome=False)

        profile = (await directory.port.get_customers(["wmA"], with_context=True)).profiles["wmA"]

        assert "\x00" not in profile.nickname and "\n" not in profile.nickname
        assert len(profile.nickname.encode()) <= 128
        assert profile.gender == 0 and profile.gender_text == "未知"
        assert isinstance(profile.entry, EntryContext) and len(profile.entry.scene_param.encode()) <= 128
