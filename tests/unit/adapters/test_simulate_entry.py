"""`bootstrap.py simulate --scene/--scene-param/--nickname`: try how the app behaves for a given entry."""

from __future__ import annotations

import io

import bootstrap
from adapters.inbound.cli_simulate import run_parts
from adapters.inbound.command_line import parse_args
from tests.support.dify_server import FakeDifyServer
from tests.support.http_server import serve
from tests.support.simulation import simulation_settings

FORM = [
    {"text-input": {"variable": "nickname", "label": "昵称", "required": False}},
    {"paragraph": {"variable": "scene_param", "label": "来源", "required": False}},
    {"text-input": {"variable": "scene", "label": "场景", "required": False}},
]


def test_the_simulated_customer_comes_from_the_given_entry() -> None:
    dify = FakeDifyServer(user_input_form=FORM)
    with serve(dify.app) as url:
        settings = simulation_settings(url, dify.api_key, interim_after_s=0.0)
        args = parse_args(
            ["simulate", "--scene", "product", "--scene-param", "商品页 A-42", "--nickname", "小李"]
        )
        parts = bootstrap.build_simulation(
            settings, scene=args.scene, scene_param=args.scene_param, nickname=args.nickname
        )
        out = io.StringIO()
        code = run_parts(
            parts,
            stdin=io.StringIO("你好\n/quit\n"),
            stdout=out,
            entry_note=bootstrap.entry_note(args.scene, args.scene_param, args.nickname),
        )
    assert code == 0
    (request,) = dify.chat_requests()
    assert request.json["inputs"] == {"nickname": "小李", "scene_param": "商品页 A-42", "scene": "product"}
    assert "scene_param=商品页 A-42" in out.getvalue() and "nickname=小李" in out.getvalue()
