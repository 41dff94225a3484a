"""Recognising the commands a customer can type: reset the conversation, ask for a human."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_RESET_WORDS: tuple[str, ...] = ("重置", "reset", "重新开始", "清空对话")
DEFAULT_HANDOFF_WORDS: tuple[str, ...] = ("转人工", "人工客服", "人工")

# Customers of other bots learned "#reset" and "/reset"; a leading sigil is accepted for every word.
_SIGILS = "#/＃"
# Trailing punctuation a customer may add ("重置。", "reset!") does not change the command.
_TRAILING = "。.!！?？~～ "


class CommandKind(StrEnum):
    RESET = "reset"
    HANDOFF = "handoff"


@dataclass(frozen=True, slots=True)
class Command:
    kind: CommandKind


def normalise(text: str) -> str:
    """Compare commands the way a person reads them: width, case and surrounding space ignored."""
    folded = unicodedata.normalize("NFKC", text).strip().casefold()
    folded = folded.lstrip(_SIGILS).strip()
    return folded.rstrip(_TRAILING).strip()


@dataclass(frozen=True, slots=True)
class CommandSet:
    """The words that are commands. The whole message must be the word; "reset my password" is a question."""

    reset_words: frozenset[str]
    handoff_words: frozenset[str]

    @classmethod
    def of(cls, *, reset: Iterable[str] = DEFAULT_RESET_WORDS, handoff: Iterable[str] = ()) -> CommandSet:
        return cls(
            reset_words=frozenset(w for w in (normalise(x) for x in reset) if w),
            handoff_words=frozenset(w for w in (normalise(x) for x in handoff) if w),
        )

    def parse(self, text: str) -> Command | None:
        word = normalise(text)
        if not word:
            return None
        if word in self.reset_words:
            return Command(CommandKind.RESET)
        if word in self.handoff_words:
            return Command(CommandKind.HANDOFF)
        return None
