from __future__ import annotations

import pytest

from domain.commands import CommandKind, CommandSet


@pytest.mark.parametrize(
    "text",
    ["重置", "reset", "RESET", " Reset ", "重新开始", "清空对话", "#reset", "/reset", "ｒｅｓｅｔ", "重置。"],
)
def test_reset_words_are_recognised_whatever_the_case_and_space(text: str) -> None:
    command = CommandSet.of().parse(text)
    assert command is not None and command.kind is CommandKind.RESET


@pytest.mark.parametrize("text", ["reset my password", "请帮我重置密码", "", "   ", "hello"])
def test_questions_that_mention_a_command_word_are_not_commands(text: str) -> None:
    assert CommandSet.of().parse(text) is None


def test_reset_words_are_configurable() -> None:
    commands = CommandSet.of(reset=["新对话", "Start Over"])
    assert commands.parse("start over") is not None
    assert commands.parse("重置") is None


def test_handoff_words_when_configured() -> None:
    commands = CommandSet.of(handoff=["转人工", "人工"])
    command = commands.parse(" 转人工 ")
    assert command is not None and command.kind is CommandKind.HANDOFF
