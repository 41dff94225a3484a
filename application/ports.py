"""The ports the use cases need, in domain words. Adapters implement them structurally (no inheritance)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from domain.chat import Answer, AppInfo, AppParameters, Question
from domain.conversation import Conversation
from domain.customer import CustomerBatch, CustomerProfile
from domain.dedupe import DedupeKey
from domain.media import MediaBlob, UploadedFile
from domain.messages import CustomerRef, InboundMessage, SyncPage


class Clock(Protocol):
    def now(self) -> float:
        """Unix seconds."""
        ...


# --- State ----------------------------------------------------------------------------------------------
#
# The state the service keeps between messages, split by who needs it and in their words. Each use case asks
# only for the roles it uses; the three stores (in-process, Memcached, failover) implement every role in one
# class, and the contract suite (tests/contract/test_state_store.py) runs each role's tests against each.


class ConversationStore(Protocol):
    """The answering side: "which Dify conversation is this customer in?" One per kf account and customer,
    forgotten after the configured idle time; the operator looks it up and resets it (admin)."""

    async def get_conversation(self, customer: CustomerRef) -> Conversation | None: ...

    async def put_conversation(self, customer: CustomerRef, conversation: Conversation) -> None:
        """Store it; it expires by itself after the configured idle time."""
        ...

    async def delete_conversation(self, customer: CustomerRef) -> bool:
        """True when there was one."""
        ...


class MessageState(StrEnum):
    NEW = "new"  # nobody handled it and nobody holds a live lease on it
    BUSY = "busy"  # an instance holds a live lease on it
    DONE = "done"  # handled; the mark outlives WeCom's three-day history


class MessageLedger(Protocol):
    """The drain and the pull: "has this customer message been answered, or is someone answering it now?"
    Each msgid is handled exactly once across all instances, also after a restart, a re-pull of the history or
    an operator's clear()."""

    async def begin(self, key: DedupeKey, *, owner: str, lease_s: float) -> bool:
        """Atomically claim the message for `owner`. True exactly once while the message is not DONE and
        no other live lease exists. A lease whose holder died expires after `lease_s`."""
        ...

    async def renew(self, key: DedupeKey, *, owner: str, lease_s: float) -> bool:
        """Extend `owner`'s lease. False when `owner` no longer holds it."""
        ...

    async def finish(self, key: DedupeKey) -> None:
        """Mark the message DONE (whoever holds the lease)."""
        ...

    async def release(self, key: DedupeKey, *, owner: str) -> None:
        """Give the lease back without finishing (shutdown): another instance may take it at once."""
        ...

    async def state(self, key: DedupeKey) -> MessageState: ...

    async def states(self, keys: Sequence[DedupeKey]) -> list[MessageState]:
        """`state()` of each key, in order, read in one go (a pulled page checks all its messages at once)."""
        ...


class Inbox(Protocol):
    """Between the pull and the drain: "what did this customer say that nobody answered yet?" Survives a
    crash so nothing pulled is lost; the recovery pass asks which customers still wait."""

    async def record(self, messages: Sequence[InboundMessage]) -> None:
        """Add messages (idempotent per msgid), keeping each customer's messages in send order."""
        ...

    async def pending(self, customer: CustomerRef) -> list[InboundMessage]:
        """The customer's unhandled messages, oldest first."""
        ...

    async def remove(self, customer: CustomerRef, msgid: str) -> list[InboundMessage]:
        """Take the message out of the customer's inbox (harmless when it is not there). Returns what is still
        pending for the customer, oldest first, as `pending()` would right after the removal."""
        ...

    async def customers_with_pending(
        self, open_kfid: str, *, unread: Collection[CustomerRef] = ()
    ) -> list[CustomerRef]:
        """Every customer of the kf account with pending messages. A
        customer in `unread` (the caller will not take them now: drained here already, or busy elsewhere)
        may be listed without their inbox being looked at, so possibly with nothing pending any more: a
        scan during a burst need not read the inboxes it would skip anyway."""
        ...


class CursorStore(Protocol):
    """The pull: "where did we stop reading this kf account's messages?" (the `kf/sync_msg` cursor). Without
    one, the next pull starts at the beginning of WeCom's three-day history."""

    async def get_cursor(self, open_kfid: str) -> str | None: ...

    async def set_cursor(self, open_kfid: str, cursor: str) -> None: ...


class PullCoordination(Protocol):
    """The dispatcher: "is someone already pulling this kf account, and did a callback come in since?" One
    pull per kf account at a time across all instances, and no pull request ever lost."""

    async def acquire_pull(self, open_kfid: str, *, owner: str, lease_s: float) -> bool:
        """Atomically take the kf account's pull lease. Expires by itself after `lease_s`."""
        ...

    async def renew_pull(self, open_kfid: str, *, owner: str, lease_s: float) -> bool: ...

    async def release_pull(self, open_kfid: str, *, owner: str) -> None:
        """Release only if `owner` still holds it."""
        ...

    async def request_pull(self, open_kfid: str, token: str = "") -> None:
        """Note that new data is waiting (bumps a counter) and remember the newest callback token."""
        ...

    async def pull_requests(self, open_kfid: str) -> tuple[int, str]:
        """(request counter, newest callback token or "")."""
        ...


class KfRegistry(Protocol):
    """The dispatcher and the operator: "which kf accounts has this service heard of?" (the recovery pass
    walks them; the admin looks customers up in them)."""

    async def remember_kf(self, open_kfid: str) -> None: ...

    async def known_kfs(self) -> list[str]: ...


class StoreAdmin(Protocol):
    """The operator and the health checks: which store, does it answer, start over."""

    @property
    def backend(self) -> str:
        """ "memory" or "memcached"."""
        ...

    async def ping(self) -> bool:
        """True when the store answers now."""
        ...

    async def clear(self) -> None:
        """Start this service over (only this namespace): forget its conversations, inboxes, cursors, pull
        requests and known kf accounts.

        What keeps each message answered at most once stays: DONE marks, message leases and pull leases. The
        next pull of a kf account then starts without cursor, at the beginning of WeCom's history: messages
        answered before the clear read DONE and are neither asked nor answered again; messages pulled but not
        yet answered (their inbox was forgotten) come back with that history and are answered, within the
        history guard (MAX_MESSAGE_AGE); messages arriving afterwards are answered as usual."""
        ...


class MessageHandling(Protocol):
    """The drain's steps around one message, which a store may take in fewer round trips than the separate
    calls."""

    async def claim(self, message: InboundMessage, *, owner: str, lease_s: float) -> bool:
        """`begin()` for the message. A store may read the customer's conversation along with it: a
        `get_conversation()` for that customer within a second may answer with that read, taken after every
        earlier message of the customer was completed (so after their conversation updates), unless this
        store wrote or deleted the conversation since."""
        ...

    async def complete(self, message: InboundMessage) -> list[InboundMessage]:
        """`finish()` the message, then `remove()` it from its customer's inbox, in that order (a crash in
        between leaves a DONE message in the inbox, which the next drain drops). Returns what is still pending
        for the customer, like `remove()`. A store may do both in fewer round trips than the two calls."""
        ...


class CustomerCounters(Protocol):
    """The rate limiter: "how many messages of this customer did the service answer in this window?" One count
    per customer and counter name for all instances, so N instances count like one. A counter expires by
    itself `ttl_s` after it was created (increments do not extend it)."""

    async def increment(self, customer: CustomerRef, counter: str, *, ttl_s: float) -> int:
        """Atomically add one (creating the counter at 0 first) and return the new count."""
        ...

    async def decrement(self, customer: CustomerRef, counter: str) -> None:
        """Take one back (a refused message does not count); never below zero, harmless when absent."""
        ...

    async def counts(self, customer: CustomerRef, counters: Sequence[str]) -> list[int]:
        """The current value of each counter, in order, read in one go (0 when absent or expired)."""
        ...


class CustomerNotes(Protocol):
    """What the instances tell each other about a customer for a while, by topic: who owns their kf session,
    whether they refuse our messages, whether they were told they write too often. A note expires by itself
    after its `ttl_s`; values are short strings the writer encodes."""

    async def put_note(self, customer: CustomerRef, topic: str, value: str, *, ttl_s: float) -> None:
        """Write (or overwrite) the note."""
        ...

    async def add_note(self, customer: CustomerRef, topic: str, value: str, *, ttl_s: float) -> bool:
        """Write the note only when there is none: True for exactly one writer across all instances."""
        ...

    async def get_notes(self, customer: CustomerRef, topics: Sequence[str]) -> dict[str, str]:
        """The customer's live notes among `topics` (absent ones left out), read in one go."""
        ...

    async def delete_note(self, customer: CustomerRef, topic: str) -> None:
        """Forget the note (harmless when absent)."""
        ...


class ProfileStore(Protocol):
    """Customer context: "who is this customer and where did they come from?"
    (application/customer_profile.py). Shared by every instance, so WeCom is asked about a customer at most
    once a day; each profile is forgotten a day after it was last written (and by `clear()`)."""

    async def get_profile(self, customer: CustomerRef) -> CustomerProfile | None: ...

    async def put_profile(self, customer: CustomerRef, profile: CustomerProfile) -> None:
        """Store it; it expires by itself a day (the store's profile TTL) later."""
        ...


class StateStore(
    ConversationStore,
    MessageLedger,
    Inbox,
    MessageHandling,
    CursorStore,
    PullCoordination,
    KfRegistry,
    StoreAdmin,
    CustomerCounters,
    CustomerNotes,
    ProfileStore,
    Protocol,
):
    """Every role at once: what one store class provides (in-process, Memcached, failover), and what code
    needs that wraps or wires a whole store. A use case asks for the roles it uses instead."""


# --- Dify ------------------------------------------------------------------------------------------------


class AnswerProgress(Protocol):
    """What the caller hears while an answer is on its way (both calls are quick and never raise)."""

    def accepted(self) -> None:
        """The app took the request (Dify answered 200): the answer is being produced. Called at most once,
        before any `streamed()`."""
        ...

    def streamed(self, text: str) -> None:
        """The whole answer text so far (raw: Markdown, reasoning blocks and markers still in it), each time
        it changed. It may shrink or change entirely when output moderation replaces the answer."""
        ...


class ChatEngine(Protocol):
    async def ask(self, question: Question, progress: AnswerProgress | None = None) -> Answer:
        """Ask the AI app. Raises ConversationGone when the conversation id is unusable, ChatEngineError
        otherwise (with Dify's code and whether a retry may help). `progress` hears when the app took the
        request and the text as it streams."""
        ...

    async def info(self) -> AppInfo: ...

    async def parameters(self) -> AppParameters: ...

    async def upload_file(self, user: str, filename: str, content_type: str, data: bytes) -> UploadedFile:
        """`POST /files/upload` for `user` (the same user that will ask about it). `filename` carries a real
        extension (it decides Dify's size category and file type). Raises ChatEngineError: `file_too_large`
        (413), `unsupported_file_type` (415), `invalid_param`, ..."""
        ...

    async def transcribe(self, user: str, audio: bytes, content_type: str) -> str:
        """`POST /audio-to-text`: the words spoken in `audio`. `content_type` must be one Dify accepts
        (audio/mp3, audio/wav, ...). Raises ChatEngineError (`speech_to_text_disabled`,
        `unsupported_audio_type`, `audio_too_large`, model errors)."""
        ...

    async def fetch_file(self, url: str, *, max_bytes: int) -> MediaBlob:
        """Download a file an answer points at (Answer.files). Raises MediaTooLarge past `max_bytes` (without
        reading further), ChatEngineError otherwise."""
        ...

    @property
    def streams_answers(self) -> bool:
        """True when `ask` hears the answer as it is written (streaming mode), so `progress.streamed` comes
        before the answer is complete; False when the whole text arrives at once (blocking mode)."""
        ...

    async def suggested(self, user: str, message_id: str) -> list[str]:
        """`GET /messages/{message_id}/suggested`: the questions the app suggests after that answer (for the
        same `user`). Raises ChatEngineError (e.g. when the app has the feature off)."""
        ...

    async def give_feedback(self, message_id: str, *, user: str, rating: str, content: str) -> None:
        """`POST /messages/{message_id}/feedbacks`: rate one answer ("like" | "dislike") with a note the
        operator reads in Dify's logs. Raises ChatEngineError."""
        ...

    async def name_conversation(self, conversation_id: str, *, user: str, name: str) -> None:
        """`POST /conversations/{id}/name` with `auto_generate: false`: how Dify's logs list the
        conversation. Raises ChatEngineError."""
        ...


# --- WeCom kf --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceState:
    state: int
    servicer_userid: str = ""


class KfChannel(Protocol):
    """The WeCom kf API: read messages, answer customers, manage sessions. Raises WeComError."""

    async def sync_messages(
        self, open_kfid: str, *, cursor: str | None, token: str | None, limit: int = 1000
    ) -> SyncPage: ...

    async def send_text(self, customer: CustomerRef, text: str, *, msgid: str) -> str:
        """Send a text (≤2048 bytes); returns WeCom's msgid."""
        ...

    async def get_service_state(self, customer: CustomerRef) -> ServiceState: ...

    async def transfer_service_state(
        self, customer: CustomerRef, *, state: int, servicer_userid: str = ""
    ) -> str:
        """Move the session; returns the msg_code WeCom hands back ("" when none)."""
        ...

    async def send_on_event(
        self, code: str, text: str, *, msgid: str, menu: Sequence[tuple[str, str]] = ()
    ) -> str:
        """`kf/send_msg_on_event` with a single-use code: a text, or a msgmenu of (id, content) click items
        headed by `text` when `menu` is given."""
        ...

    async def check_access(self) -> None:
        """Fetch an access token now (raises WeComError on a bad corp id/secret, untrusted IP, ...)."""
        ...

    async def download_media(self, media_id: str, *, max_bytes: int) -> MediaBlob:
        """`media/get`: a customer's image, voice or file. Raises MediaTooLarge past `max_bytes` (the download
        stops there), WeComError otherwise (40007: unknown or expired, media lives 3 days)."""
        ...

    async def upload_media(self, kind: str, filename: str, content_type: str, data: bytes) -> str:
        """`media/upload` (kind: image | voice | video | file); returns the media_id (valid 3 days)."""
        ...

    async def send_image(self, customer: CustomerRef, media_id: str, *, msgid: str) -> str:
        """Send an image message (a media_id from `upload_media`); returns WeCom's msgid."""
        ...

    async def send_menu(
        self, customer: CustomerRef, head: str, items: Sequence[tuple[str, str]], *, msgid: str
    ) -> str:
        """Send a `msgmenu` of (id, content) click items headed by `head` (≤10 items, content ≤128 bytes,
        head ≤1024 bytes: docs/wecom-kf.md §6.3); a tapped item comes back as a text with its `menu_id`.
        Returns WeCom's msgid."""
        ...


class CustomerDirectory(Protocol):
    """WeCom's customer profiles (`kf/customer/batchget`, docs/wecom-kf.md §11). Raises WeComError (48002:
    the app lacks the customer-info permission)."""

    async def get_customers(self, external_userids: Sequence[str], *, with_context: bool) -> CustomerBatch:
        """At most 100 ids a call. `with_context`: include each customer's entry context (WeCom knows it for
        customers active in the last 48 h)."""
        ...


class AudioConverter(Protocol):
    """Turns voice messages (WeCom AMR) into audio speech-to-text models take."""

    @property
    def available(self) -> bool:
        """False when there is no way to convert (no ffmpeg): voice is then not supported."""
        ...

    async def to_speech(self, audio: MediaBlob) -> MediaBlob:
        """16 kHz mono WAV (or MP3) with a content type Dify accepts. Raises AudioConversionError."""
        ...
