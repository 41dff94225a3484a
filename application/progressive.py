"""Progressive replies: a long answer's parts go out while Dify is still writing the rest.

The customer otherwise waits for the last word before reading the first. As the answer streams
(`AnswerProgress.streamed`), the text up to a paragraph boundary nothing later can change
(domain/progressive_text.py: never reasoning, never a handoff marker, never half a code fence) is rendered
for WeChat and kept; as soon as what is kept holds a full part (`take_full_part`: a natural boundary near
2048 bytes, with more text after it), that part is sent. The rest follows when Dify finishes
(`remainder`), split as any answer is.

Never when the app moderates its output (a `message_replace` may still replace everything), never in blocking
mode (the whole text arrives at once), and within the customer message's quota: a part is taken only while
the messages left after it are at least `keep_free` (the rest of the text, and a file, a refusal notice or a
failure text). Once a part was sent the answer is committed: asking Dify again would make the customer read
a different answer after the first one (application/ask_dify.py does not retry then).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

from application.app_parameters import AppParametersCache
from application.errors import ChatEngineError
from application.options import BotOptions
from application.ports import AnswerProgress
from application.reply_session import ReplySession
from application.routing import KfRoute
from application.telemetry import Telemetry
from domain.handoff import marker_start, take_handoff_marker
from domain.progressive_text import shown_until
from domain.replies import TEXT_LIMIT_BYTES, take_full_part, utf8_len

log = logging.getLogger("kfdify.answer")

# Messages kept free while parts go out early: one for the rest of the answer, one for what may follow it
# (the answer's files, a refused handoff's notice, a failure text when Dify breaks off).
KEEP_FREE = 2
# Raw answer text looked at: past this, five messages are full anyway (the rest is cut at the end).
MAX_PROGRESSIVE_CHARS = 6 * TEXT_LIMIT_BYTES
# After Dify could not tell its parameters, ask again after this long (meanwhile answers go out whole).
PARAMETERS_RETRY_S = 30.0
# The most rendering for WeChat makes a text grow, in UTF-8 bytes (a thematic break `---` becomes a line of
# dashes, five times its bytes; tests/unit/adapters/test_wechat_text_properties.py holds the renderer to it).
# Until the raw text not yet shown could fill a part even grown this much, no part can go out: the stream is
# not scanned or rendered piece by piece, and a short answer is rendered once, whole, at the end.
RENDER_GROWTH = 6


class ProgressiveReplies:
    """An AnswerProgress that sends an answer's full parts as they are written (one customer message)."""

    def __init__(
        self,
        *,
        replies: ReplySession,
        render: Callable[[str], str],
        markers: tuple[str, ...],
        telemetry: Telemetry,
        allowed: Callable[[], Awaitable[bool]] | None = None,
        keep_free: int = KEEP_FREE,
    ) -> None:
        """`allowed`: whether this app may answer progressively (asked once, when the answer streams)."""
        self._replies = replies
        self._render = render
        self._markers = markers
        self._telemetry = telemetry
        self._allowed = allowed
        self._keep_free = max(keep_free, 1)
        self._latest = ""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._stopped = False  # no more parts: quota reached, a send failed, the answer changed
        self._reset()
        # A part went out (or is going out): the customer may be reading this answer.
        self.committed = False
        self.sent = 0
        self.diverged = False

    def _reset(self) -> None:
        self._shown = ""  # raw text rendered so far (a prefix of the answer, ending at a boundary)
        self._pending = ""  # rendered, not sent yet

    # --- AnswerProgress ---------------------------------------------------------------------------------

    def accepted(self) -> None:
        if not self.committed:  # a new attempt: what an earlier one streamed does not count
            self._reset()
            self._latest = ""

    def streamed(self, text: str) -> None:
        if self._closed or self._stopped:
            return
        self._latest = text
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    # --- the answering side -----------------------------------------------------------------------------

    async def settle(self) -> None:
        """The answer is complete (or failed): no more parts; returns once a part on its way was sent."""
        self._closed = True
        self._wake.set()
        if self._task is None:
            return
        if not self.committed:  # nothing on its way (maybe still reading the app's parameters): stop now
            self._task.cancel()
        await asyncio.wait({self._task})  # its outcome is its own; a cancellation of ours still ends us
        if not self._task.cancelled() and self._task.exception() is not None:
            log.warning("progressive replies stopped: %r", self._task.exception())

    def abandon(self) -> None:
        """The answer was abandoned (shutdown): stop at once."""
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def remainder(self, answer_text: str) -> str:
        """What is left to send of the complete answer, rendered; handoff markers removed."""
        if self.diverged or not answer_text.startswith(self._shown):
            # The answer changed after parts went out (a replacement): the customer gets the final one whole.
            log.warning("answer changed after %d parts were sent early: sending it whole", self.sent)
            marked = take_handoff_marker(answer_text, self._markers)
            return self._render(marked.text) if marked.text.strip() else ""
        marked = take_handoff_marker(answer_text[len(self._shown) :], self._markers)
        rest = self._render(marked.text).strip() if marked.text.strip() else ""
        return "\n\n".join(p for p in (self._pending.strip(), rest) if p)

    # --- the worker -------------------------------------------------------------------------------------

    async def _run(self) -> None:
        if self._allowed is not None and not await self._allowed():
            self._stopped = True
            return
        while not self._closed and not self._stopped:
            await self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            await self._advance(self._latest)

    async def _advance(self, text: str) -> None:
        if not text.startswith(self._shown):
            if self.committed:  # replaced after parts went out: the end sends the final answer
                self.diverged = self._stopped = True
                return
            self._reset()
        text = text[:MAX_PROGRESSIVE_CHARS]
        unshown = utf8_len(text[len(self._shown) :])
        if utf8_len(self._pending) + RENDER_GROWTH * unshown <= TEXT_LIMIT_BYTES:
            return  # not a part's worth yet, however it renders
        boundary = shown_until(text, len(self._shown), self._markers)
        if boundary is not None:
            piece = text[len(self._shown) : boundary]
            rendered = self._render(piece).strip() if piece.strip() else ""
            self._pending = "\n\n".join(p for p in (self._pending.strip(), rendered) if p)
            self._shown = text[:boundary]
        while not self._closed and not self._stopped:
            taken = take_full_part(self._pending) or self._part_before(text[len(self._shown) :])
            if taken is None:
                return
            if self._replies.remaining - 1 < self._keep_free or self._replies.human_owns_session:
                self._stopped = True
                return
            part, rest = taken
            self.committed = True
            if not await self._replies.send(part.strip()):
                self._stopped = True  # the part stays pending: the end sends it with the rest
                return
            self._pending = rest
            self.sent += 1
            self._telemetry.count("parts_sent_progressively")
            log.info("answer part %d sent while dify writes the rest", self.sent)

    def _part_before(self, tail: str) -> tuple[str, str] | None:
        """A full part that is all of what is kept, when the text still being written (`tail`, not yet
        past a boundary) shows that more than a part follows: the paragraph boundary at the end of what is
        kept is then the part's end, and the customer need not wait for the next boundary."""
        pending = self._pending.strip()
        if not pending or not tail.strip() or "<" in tail or marker_start(tail, self._markers) is not None:
            return None
        # Markup shrinks when rendered: count the raw tail at four fifths.
        if utf8_len(pending) + utf8_len(tail.strip()) * 4 // 5 <= TEXT_LIMIT_BYTES:
            return None
        taken = take_full_part(f"{pending}\n\n{tail.strip()}")
        if taken is None or len(taken[0]) > len(pending) or not pending.startswith(taken[0]):
            return None
        return taken[0], pending[len(taken[0]) :]


class ProgressiveAnswers:
    """Decides per answer whether its parts may go out early, and makes the AnswerProgress that sends them."""

    def __init__(
        self,
        *,
        parameters: AppParametersCache,
        render: Callable[[str], str],
        options: BotOptions,
        telemetry: Telemetry,
    ) -> None:
        self._parameters = parameters
        self._render = render
        self._options = options
        self._telemetry = telemetry

    def start(self, route: KfRoute, replies: ReplySession) -> ProgressiveReplies | None:
        """The progress for one answer, or None when its parts cannot go out early (blocking mode)."""
        if not route.engine.streams_answers:
            return None
        return ProgressiveReplies(
            replies=replies,
            render=self._render,
            markers=self._options.handoff_markers,
            telemetry=self._telemetry,
            allowed=functools.partial(self._allowed, route),
        )

    async def _allowed(self, route: KfRoute) -> bool:
        """Only when the app's output moderation is off: a `message_replace` may replace everything
        (docs/dify.md). Unknown (Dify cannot tell) counts as on."""
        try:
            parameters = await self._parameters.get(route)
        except ChatEngineError as exc:
            log.info("app parameters unknown (%s): answer sent whole", exc.code)
            return False
        return not parameters.moderation_enabled


def progress_committed(progress: AnswerProgress | None) -> bool:
    """True when part of the answer already went out to the customer (no transparent retry then)."""
    return isinstance(progress, ProgressiveReplies) and progress.committed
