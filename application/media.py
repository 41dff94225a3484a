"""Customers' images, files and voice become Dify questions; images in Dify's answers go back as images.

Inbound (docs/dify.md, docs/wecom-kf.md):
- image → `media/get` → Dify `/files/upload` → a question with the image and `texts.image_query`;
- file → the same as a `document` (or image/custom) when the app's File Upload settings accept its type;
- voice (AMR) → ffmpeg → Dify `/audio-to-text` → the transcript, answered as if the customer had typed it.
Each step checks both sides' limits first, and every failure tells the customer what happened (configurable
texts) and logs why. Nothing here raises into the use case.

Outbound: an answer's image files are downloaded from Dify, uploaded with `media/upload` and sent as image
messages within the reply quota; other files (and images that cannot be sent) become links in one text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence

from application.app_parameters import AppParametersCache
from application.errors import AudioConversionError, ChatEngineError, MediaTooLarge, WeComError
from application.log_context import handling
from application.media_port import PreparedQuestion
from application.options import BotOptions, ReplyTexts
from application.ports import AudioConverter, Clock, KfChannel
from application.reply_session import ReplySession
from application.routing import KfRoute, Routing
from application.telemetry import Telemetry
from domain.chat import Answer, AnswerFile, AppParameters, Attachment
from domain.media import (
    WECOM_INCOMING_CAPS,
    WECOM_UPLOAD_CAPS,
    WECOM_UPLOAD_IMAGE_TYPES,
    MediaBlob,
    UploadPolicy,
    bare_type,
    dify_size_limit,
    extension_for_type,
    extension_of,
    image_type,
    join_names,
    megabytes,
    safe_filename,
    sniff_type,
    type_for_extension,
)
from domain.messages import InboundMessage, Kind

log = logging.getLogger("kfdify.media")

MEDIA = "media"  # latency series: preparing one image, file or voice message
# media/get errcode for an unknown or expired media_id (3 days, docs/wecom-kf.md).
MEDIA_EXPIRED = 40007
# After /parameters failed, ask again this soon rather than after the full TTL.
PARAMETERS_RETRY_S = 30.0
# An answer rarely needs more image messages than this; the rest become links.
MAX_ANSWER_IMAGES = 4
# Voice conversions (ffmpeg) and transcriptions running at once in this instance, whatever the traffic.
VOICE_CONCURRENCY = 4


class _Declined(Exception):
    """The message cannot become (part of) a question: `reply` tells the customer why."""

    def __init__(self, reply: str, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


class MediaSupport:
    """Implements `MediaPreparer` and `ImagePairing` (both in media_port.py).

    `voice_concurrency`: voice messages converted and transcribed at once; the others wait their turn, so a
    flood of voice messages cannot start unbounded ffmpeg processes and paid transcriptions."""

    def __init__(
        self,
        *,
        channel: KfChannel,
        routing: Routing,
        converter: AudioConverter,
        clock: Clock,
        options: BotOptions,
        telemetry: Telemetry,
        voice_concurrency: int = VOICE_CONCURRENCY,
    ) -> None:
        self._channel = channel
        self._routing = routing
        self._converter = converter
        self._voice_slots = asyncio.Semaphore(max(voice_concurrency, 1))
        self._clock = clock
        self._options = options
        self._telemetry = telemetry
        self._app_parameters = AppParametersCache(
            ttl_s=options.app_parameters_ttl_s, failure_retry_s=PARAMETERS_RETRY_S, clock=clock.now
        )

    # --- MediaPreparer: customers' media in -----------------------------------------------------------------

    async def prepare(self, message: InboundMessage, route: KfRoute) -> PreparedQuestion:
        """An image, file or voice message as a question, or the reply that says why it cannot be one."""
        kind = message.kind
        if kind not in (Kind.IMAGE, Kind.FILE, Kind.VOICE):
            return PreparedQuestion(reply=route.texts.unsupported)
        self._telemetry.count_labelled("media_received", kind.value)
        started = time.monotonic()
        try:
            if kind is Kind.VOICE:
                transcript = await self._transcribe(message, route)
                return PreparedQuestion(query=transcript, as_text=True)
            attachment = await self._attachment(message, route)
            query = route.texts.image_query if kind is Kind.IMAGE else route.texts.file_query
            return PreparedQuestion(query=query, files=(attachment,))
        except _Declined as declined:
            self._telemetry.count_labelled("media_declined", declined.reason)
            return PreparedQuestion(reply=declined.reply)
        except Exception:
            # A bug must not leave the customer without an answer: say it failed, and log it loudly.
            log.exception("preparing %s failed unexpectedly", kind.value)
            self._telemetry.count_labelled("media_declined", "internal_error")
            failed = route.texts.voice_failed if kind is Kind.VOICE else route.texts.media_failed
            return PreparedQuestion(reply=failed)
        finally:
            self._telemetry.observe(MEDIA, time.monotonic() - started)

    async def attach(
        self,
        prepared: PreparedQuestion,
        attached: Sequence[InboundMessage],
        route: KfRoute,
        replies: ReplySession,
    ) -> PreparedQuestion:
        """The customer's text plus the images (or files) sent just before it, as one question. A medium that
        fails is told to the customer and left out: the text is still answered."""
        files = list(prepared.files)
        for message in attached:
            if message.kind not in (Kind.IMAGE, Kind.FILE):
                continue
            self._telemetry.count_labelled("media_received", message.kind.value)
            started = time.monotonic()
            # The attached medium's own msgid on its log lines (the question is the text's).
            with handling(message):
                try:
                    files.append(await self._attachment(message, route))
                except _Declined as declined:
                    self._telemetry.count_labelled("media_declined", declined.reason)
                    await replies.send(declined.reply)
                except Exception:
                    log.exception("attaching %s failed unexpectedly", message.kind.value)
                    self._telemetry.count_labelled("media_declined", "internal_error")
                    await replies.send(route.texts.media_failed)
                finally:
                    self._telemetry.observe(MEDIA, time.monotonic() - started)
        return dataclasses.replace(prepared, files=tuple(files))

    # --- ImagePairing: whether an image should wait for the text that may follow it ------------------------

    async def awaits_text(self, message: InboundMessage) -> bool:
        if message.kind is not Kind.IMAGE or self._options.image_text_window_s <= 0:
            return False
        try:
            parameters = await self._parameters(self._routing.for_kf(message.open_kfid))
        except _Declined:
            return False
        return UploadPolicy.of(parameters.file_upload).images

    # --- answers' files out ---------------------------------------------------------------------------------

    def reserved_slots(self, answer: Answer) -> int:
        """Reply messages to keep free for the answer's files: one per image (up to 4), one for links."""
        images = sum(1 for f in answer.files if f.kind == "image")
        links = images > MAX_ANSWER_IMAGES or any(f.kind != "image" for f in answer.files)
        return min(images, MAX_ANSWER_IMAGES) + (1 if links else 0)

    async def deliver(self, answer: Answer, route: KfRoute, replies: ReplySession) -> None:
        """Send the answer's images as image messages and the other files as links, within the quota."""
        if not answer.files:
            return
        images = [f for f in answer.files if f.kind == "image"]
        links = [f.url for f in answer.files if f.kind != "image"]
        overflow = len(images) > MAX_ANSWER_IMAGES
        sent_images = 0
        for file in images:
            if replies.human_owns_session:
                return
            # Keep one message for the links whenever there will be any.
            room = replies.remaining - (1 if links or overflow else 0)
            if room > 0 and sent_images < MAX_ANSWER_IMAGES and await self._send_image(file, route, replies):
                sent_images += 1
            else:
                links.append(file.url)
        if not links or replies.human_owns_session:
            return
        if replies.remaining <= 0:
            log.info("answer files not sent: no reply left in the quota (%d links)", len(links))
            return
        await replies.send_answer("\n".join([route.texts.answer_files, *links]), route.texts)

    async def _send_image(self, file: AnswerFile, route: KfRoute, replies: ReplySession) -> bool:
        try:
            return await self._try_send_image(file, route, replies)
        except Exception:
            log.exception("sending an answer image failed unexpectedly: sent as a link")
            return False

    async def _try_send_image(self, file: AnswerFile, route: KfRoute, replies: ReplySession) -> bool:
        cap = WECOM_UPLOAD_CAPS["image"]
        try:
            blob = await route.engine.fetch_file(file.url, max_bytes=cap)
        except MediaTooLarge:
            log.warning("answer image larger than WeCom's %d bytes: sent as a link", cap)
            return False
        except ChatEngineError as exc:
            log.warning(
                "answer image download failed code=%s status=%s: sent as a link", exc.code, exc.status
            )
            return False
        content_type = image_type(blob)
        if content_type not in WECOM_UPLOAD_IMAGE_TYPES:
            log.info("answer image is %s, not JPG/PNG: sent as a link", content_type or blob.content_type)
            return False
        extension = extension_for_type(content_type)
        name = safe_filename(_stem(blob.filename), fallback="image", extension=extension)
        try:
            media_id = await self._channel.upload_media("image", name, content_type, blob.data)
        except WeComError as exc:
            log.warning("answer image upload failed errcode=%s %s: sent as a link", exc.errcode, exc.errmsg)
            return False
        return await replies.send_image(media_id)

    # --- inbound steps --------------------------------------------------------------------------------------

    async def _attachment(self, message: InboundMessage, route: KfRoute) -> Attachment:
        """Download an image or file from WeCom and upload it to the route's Dify app."""
        texts = route.texts
        parameters = await self._parameters(route)
        policy = UploadPolicy.of(parameters.file_upload)
        image = message.kind is Kind.IMAGE
        if (image and not policy.images) or (not image and not policy.accepts_files):
            log.info("%s not taken: the Dify app's file upload does not accept it", message.kind.value)
            raise _Declined(texts.unsupported, "not_enabled")
        # The cap the download may not pass: what WeCom delivers at most, and what Dify takes for any type
        # the app accepts. The type-specific Dify limit is checked once the type is known.
        kinds = ["image"] if image else sorted(policy.types | ({"custom"} if policy.extensions else set()))
        dify_cap = max(_dify_limit(k, parameters) for k in kinds)
        cap = min(WECOM_INCOMING_CAPS["image" if image else "file"], dify_cap)
        blob = await self._download(message, texts, cap)

        if image:
            content_type = image_type(blob)
            if not content_type:
                self._warn(message, "image download is not an image", blob.content_type)
                raise _Declined(texts.media_failed, "not_an_image")
            extension = extension_for_type(content_type)
            name = safe_filename(_stem(blob.filename), fallback=message.media_id, extension=extension)
        else:
            name = safe_filename(blob.filename, fallback=message.media_id)
            extension = extension_of(name)
            if not extension:
                extension = extension_for_type(sniff_type(blob.data) or blob.content_type)
                name = safe_filename(name, fallback=message.media_id, extension=extension)
            content_type = type_for_extension(extension) or bare_type(blob.content_type)
            content_type = content_type or "application/octet-stream"
        kind = policy.kind_for(extension)
        if kind is None:
            log.info("file %r not accepted by the Dify app", name)
            accepted = join_names(policy.accepted_names()) or "文字"
            raise _Declined(texts.file_type_not_accepted.replace("{accepted}", accepted), "type_not_accepted")
        limit = min(cap, _dify_limit(kind, parameters))
        if blob.size > limit:
            self._warn(message, f"{blob.size} bytes over Dify's limit", str(limit))
            raise _Declined(_too_large(texts, limit), "too_large")

        try:
            uploaded = await route.engine.upload_file(
                message.customer.dify_user(), name, content_type, blob.data
            )
        except ChatEngineError as exc:
            self._warn(message, "dify upload failed", f"code={exc.code} status={exc.status} {exc.message}")
            if exc.code in ("file_too_large", "http_413"):
                raise _Declined(_too_large(texts, limit), "too_large") from None
            if exc.code in ("unsupported_file_type", "http_415"):
                accepted = join_names(policy.accepted_names()) or "文字"
                reply = texts.file_type_not_accepted.replace("{accepted}", accepted)
                raise _Declined(reply, "type_not_accepted") from None
            raise _Declined(texts.media_failed, "upload_failed") from None
        log.info(
            "%s uploaded to dify name=%r bytes=%d as=%s",
            message.kind.value,
            name,
            blob.size,
            kind,
        )
        return Attachment(kind=kind, upload_file_id=uploaded.id)

    async def _transcribe(self, message: InboundMessage, route: KfRoute) -> str:
        texts = route.texts
        parameters = await self._parameters(route, texts.voice_failed)
        converter = self._converter
        if not parameters.speech_to_text or not converter.available:
            log.info(
                "voice not taken (speech to text %s, converter %s)",
                "on" if parameters.speech_to_text else "off",
                "ready" if converter.available else "missing",
            )
            raise _Declined(texts.unsupported, "not_enabled")
        blob = await self._download(message, texts, WECOM_INCOMING_CAPS["voice"])
        async with self._voice_slots:
            transcript = await self._speech_to_text(message, route, blob)
        if not transcript:
            self._warn(message, "speech to text heard nothing", "")
            raise _Declined(texts.voice_failed, "empty_transcript")
        log.info("voice transcribed chars=%d", len(transcript))
        return transcript

    async def _speech_to_text(self, message: InboundMessage, route: KfRoute, blob: MediaBlob) -> str:
        """Convert and transcribe (holding one of the voice slots)."""
        texts = route.texts
        try:
            speech = await self._converter.to_speech(blob)
        except AudioConversionError as exc:
            self._warn(message, "voice conversion failed", str(exc))
            raise _Declined(texts.voice_failed, "conversion_failed") from None
        try:
            transcript = await route.engine.transcribe(
                message.customer.dify_user(), speech.data, speech.content_type
            )
        except ChatEngineError as exc:
            self._warn(message, "speech to text failed", f"code={exc.code} status={exc.status} {exc.message}")
            if exc.code in ("speech_to_text_disabled", "provider_not_support_speech_to_text"):
                self._app_parameters.invalidate(route)  # the app changed: read it again
                raise _Declined(texts.unsupported, "not_enabled") from None
            raise _Declined(texts.voice_failed, "transcription_failed") from None
        return transcript.strip()

    async def _download(self, message: InboundMessage, texts: ReplyTexts, cap: int) -> MediaBlob:
        if not message.media_id:
            self._warn(message, "message has no media_id", "")
            raise _Declined(texts.media_failed, "no_media_id")
        try:
            blob = await self._channel.download_media(message.media_id, max_bytes=cap)
        except MediaTooLarge as exc:
            self._warn(message, "media too large", f"limit={cap} size={exc.size}")
            raise _Declined(_too_large(texts, cap), "too_large") from None
        except WeComError as exc:
            self._telemetry.count_labelled("wecom_errors", str(exc.errcode))
            self._warn(message, "media download failed", f"errcode={exc.errcode} {exc.errmsg}")
            if exc.errcode == MEDIA_EXPIRED:
                raise _Declined(texts.media_expired, "expired") from None
            raise _Declined(texts.media_failed, "download_failed") from None
        if blob.size == 0:
            self._warn(message, "media download was empty", "")
            raise _Declined(texts.media_failed, "empty")
        return blob

    async def _parameters(self, route: KfRoute, failed_reply: str = "") -> AppParameters:
        """The route's /parameters, reused for `app_parameters_ttl_s` (file upload and speech settings)."""
        try:
            return await self._app_parameters.get(route)
        except ChatEngineError as exc:
            log.warning(
                "reading the Dify app's parameters failed route=%s code=%s status=%s: media not handled",
                route.name,
                exc.code,
                exc.status,
            )
            raise _Declined(failed_reply or route.texts.media_failed, "parameters_unavailable") from None

    @staticmethod
    def _warn(message: InboundMessage, what: str, detail: str) -> None:
        log.warning("%s: %s %s", message.kind.value, what, detail)


def _dify_limit(kind: str, parameters: AppParameters) -> int:
    return dify_size_limit(
        kind,
        file_mb=parameters.file_size_limit_mb,
        image_mb=parameters.image_file_size_limit_mb,
        audio_mb=parameters.audio_file_size_limit_mb,
    )


def _too_large(texts: ReplyTexts, limit_bytes: int) -> str:
    return texts.too_large.replace("{limit}", megabytes(limit_bytes))


def _stem(filename: str) -> str:
    """The name without its extension (the bytes decide an image's real extension)."""
    return filename.rsplit(".", 1)[0] if extension_of(filename) else filename
