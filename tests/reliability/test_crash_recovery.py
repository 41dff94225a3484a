"""An instance killed with SIGKILL at any point loses no message; each is answered exactly once at WeCom.

Two service processes share one Memcached. One is killed mid-pull, mid-Dify, or between Dify and
send_msg; the survivor (through its recovery pass or the next callback) answers what was left.
"""

from __future__ import annotations

import secrets
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.support.dify_server import Fault
from tests.support.memcached import MemcachedProcess
from tests.support.service_process import ServiceProcess, service_config, signed_callback, wait_for
from tests.support.stack import KF, Servers

pytestmark = [pytest.mark.memcached, pytest.mark.slow]


def replies(servers: Servers, customer: str) -> list[str]:
    return [s.text for s in servers.wecom.world.sent if s.customer.external_userid == customer]


def callback(service: ServiceProcess, corp_id: str) -> None:
    params, body = signed_callback(corp_id, KF)
    assert httpx.post(service.url + "/webhook", params=params, content=body, timeout=5).status_code == 200


@pytest.mark.parametrize("moment", ["during_pull", "during_dify", "between_dify_and_send"])
def test_a_killed_instance_loses_no_message_and_none_is_answered_twice(
    tmp_path: Path, servers: Servers, memcached: MemcachedProcess, moment: str
) -> None:
    # Short leases and frequent recovery passes so that the test sees the takeover in seconds.
    config = service_config(
        tmp_path / "config.ini",
        servers,
        memcached=memcached,
        prefix=f"crash{secrets.token_hex(3)}",
        bot={"RECOVERY_INTERVAL": 1, "MESSAGE_LEASE": 2, "PULL_LEASE": 2},
    )
    victim = ServiceProcess(config).start()
    survivor = ServiceProcess(config).start()
    try:
        # Make the survivor know the kf account, as it would after any earlier callback.
        servers.wecom.world.add_customer_text(KF, "wmWarm", "warm up")
        callback(survivor, servers.wecom.corp_id)
        wait_for(lambda: replies(servers, "wmWarm") == ["答：warm up"], what="warm-up reply")

        if moment == "during_pull":
            servers.wecom.delay_next("kf/sync_msg", 3.0)
        elif moment == "during_dify":
            servers.dify.inject(Fault(delay=3.0))
        else:
            servers.wecom.delay_next("kf/send_msg", 3.0)
        for i in range(3):
            servers.wecom.world.add_customer_text(KF, "wmCrash", f"问题{i}")
        servers.wecom.world.add_customer_text(KF, "wmOther", "别的客户")
        callback(victim, servers.wecom.corp_id)
        time.sleep(1.0)  # the victim is now inside the slow call
        victim.stop(signal.SIGKILL)

        wait_for(
            lambda: len(replies(servers, "wmCrash")) == 3 and len(replies(servers, "wmOther")) == 1,
            40,
            what="every message answered",
        )
        time.sleep(3.0)  # any second answer would arrive by now
        assert replies(servers, "wmCrash") == ["答：问题0", "答：问题1", "答：问题2"]
        assert replies(servers, "wmOther") == ["答：别的客户"]
    finally:
        victim.stop(signal.SIGKILL)
        survivor.stop()
    survivor_log = survivor.logs()
    assert "Traceback" not in survivor_log
    # The survivor took over: it asked Dify itself for a message the victim had pulled.
    # (The kf account and customer are the log line's context, shown next to the correlation id.)
    asked = [line for line in survivor_log.splitlines() if "asking dify" in line]
    assert any(f"kf={KF} customer={c} " in line for line in asked for c in ("wmCrash", "wmOther"))
