"""The port between answering a message and handling its media (implemented by application/media.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from application.reply_session import ReplySession
from application.routing import KfRoute
from domain.chat import Answer, Attachment
from domain.messages import InboundMessage


@dataclass(frozen=True, slots=True)
class PreparedQuestion:
    """What a non-text message becomes: a question for Dify (text + uploaded files), or a reply to send."""

    query: str = ""
    files: tuple[Attachment, ...] = ()
    reply: str = ""
    # The query is what the customer said (a voice transcript): answer it exactly as if typed.
    as_text: bool = False


class MediaPreparer(Protocol):
    """Turns images, voice and files into something Dify can answer, and sends an answer's files."""

    async def prepare(self, message: InboundMessage, route: KfRoute) -> PreparedQuestion:
        """An image, file or voice message as a question, or the reply that says why it cannot be one."""
        ...

    async def attach(
        self,
        prepared: PreparedQuestion,
        attached: Sequence[InboundMessage],
        route: KfRoute,
        replies: ReplySession,
    ) -> PreparedQuestion:
        """The text's question plus the images sent just before it (failures are told, not raised)."""
        ...

    def reserved_slots(self, answer: Answer) -> int:
        """Reply messages the answer's files will need after its text."""
        ...

    async def deliver(self, answer: Answer, route: KfRoute, replies: ReplySession) -> None:
        """Send the answer's files (images as images, the rest as links) within the remaining quota."""
        ...


class ImagePairing(Protocol):
    """Decides whether an image should wait for a text to ask about it (the drain asks, media.py answers)."""

    async def awaits_text(self, message: InboundMessage) -> bool:
        """True when `message` is an image the AI app can take."""
        ...
