"""WeCom callback crypto (WXBizMsgCrypt scheme): signature, AES-256-CBC envelope, and the kf notice inside it.

Reference: docs/wecom-kf.md §1.4-1.5 (algorithm), §2 (vectors), §3 (notice), §8 (codes).
Pure: no I/O, no clock. Every refusal is a `CallbackRejected`; nothing else escapes for untrusted input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import struct
from typing import Final
from xml.etree.ElementTree import Element, ParseError

from Crypto.Cipher import AES
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from domain.messages import CallbackNotice

__all__ = [
    "DECODE_BASE64_ERROR",
    "DECRYPT_AES_ERROR",
    "ILLEGAL_BUFFER",
    "MAX_BODY_BYTES",
    "PARSE_XML_ERROR",
    "RECEIVE_ID_ERROR",
    "SIGNATURE_ERROR",
    "CallbackRejected",
    "WeComCrypto",
    "parse_notice",
]

# Library-local codes of Tencent's WXBizMsgCrypt samples (docs/wecom-kf.md §8), kept so logs match their docs.
SIGNATURE_ERROR: Final = -40001
PARSE_XML_ERROR: Final = -40002
RECEIVE_ID_ERROR: Final = -40005
DECRYPT_AES_ERROR: Final = -40007
ILLEGAL_BUFFER: Final = -40008
DECODE_BASE64_ERROR: Final = -40010

# A kf envelope is a few hundred bytes; anything near this is not WeCom.
MAX_BODY_BYTES: Final = 64 * 1024

# WeCom pads to 32 bytes, not AES's 16 (docs/wecom-kf.md §1.5: official vectors have pads of 22 and 30).
_PAD_BLOCK: Final = 32
_RANDOM_LEN: Final = 16
_HEADER_LEN: Final = _RANDOM_LEN + 4
_KEY_CHARS: Final = 43

# The flat documents WeCom sends: `<xml>` holding only simple children whose content is one CDATA section or
# plain text (no markup, no entity references). Read with these patterns instead of a parser (bench/RESULTS.md
# section 5); anything else, including every DTD, goes to defusedxml as before. Only what an XML parser reads
# the same way is taken: no carriage return (XML rewrites CRLF), no character XML forbids, names of ASCII
# letters, digits and "_". Contents are unrolled loops (a run without "]", then a "]" that does not start
# "]]>", ...): one linear pass, no alternation per character.
_BANNED = "\x00-\x08\x0b-\x1f\ud800-\udfff\ufffe\uffff"
_CDATA = rf"<!\[CDATA\[([^\]{_BANNED}]*(?:\](?!\]>)[^\]{_BANNED}]*)*)\]\]>"
_TEXT = rf"([^<&\]{_BANNED}]*(?:\](?!\]>)[^<&\]{_BANNED}]*)*)"
_FLAT_OPEN = re.compile(r"[ \t\n]*<xml>")
_FLAT_CHILD = re.compile(rf"[ \t\n]*<([A-Za-z_][A-Za-z0-9_]*)>(?:{_CDATA}|{_TEXT})</\1>")
_FLAT_CLOSE = re.compile(r"[ \t\n]*</xml>[ \t\n]*")

# Parse errors from expat/ElementTree (ParseError), defusedxml's refusals (ValueError subclasses, as are
# UnicodeErrors from str input), and LookupError for an unknown `encoding=` in the XML declaration.
_XML_ERRORS: Final = (ParseError, DefusedXmlException, ValueError, LookupError)


class CallbackRejected(Exception):
    """A callback we refuse. `reason` is short and log-safe; `code` is the WXBizMsgCrypt code
    (docs/wecom-kf.md §8)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason} ({self.code})"


class WeComCrypto:
    """Verifies, decrypts and (for tests and fake servers) encrypts WeCom callbacks for one app."""

    def __init__(self, *, token: str, encoding_aes_key: str, receive_id: str) -> None:
        # Messages name the rule, never the value: these come from secrets.
        if not token:
            raise ValueError("WeCom token must not be empty")
        if len(encoding_aes_key) != _KEY_CHARS or not (
            encoding_aes_key.isascii() and encoding_aes_key.isalnum()
        ):
            raise ValueError("WeCom EncodingAESKey must be exactly 43 characters from [A-Za-z0-9]")
        key = base64.b64decode(encoding_aes_key + "=")
        if len(key) != 32:  # cannot happen for 43 alphanumerics; kept as the scheme's stated invariant
            raise ValueError("WeCom EncodingAESKey must decode to 32 bytes")
        self._token = token
        self._key = key
        # CBC decryption is ECB decryption XOR the previous ciphertext block (the IV for the first): one ECB
        # cipher for the life of the app instead of a new CBC cipher per callback.
        self._ecb = AES.new(key, AES.MODE_ECB)
        self._iv = key[:16]
        self._receive_id = receive_id.encode("utf-8")

    def signature(self, timestamp: str, nonce: str, encrypted: str) -> str:
        parts = sorted([self._token, timestamp, nonce, encrypted])
        # surrogatepass: untrusted query strings must hash, not raise.
        return hashlib.sha1("".join(parts).encode("utf-8", "surrogatepass")).hexdigest()

    def verify_url(self, *, msg_signature: str, timestamp: str, nonce: str, echostr: str) -> str:
        """GET verification: the plaintext to echo back as the response body."""
        if not self._signature_matches(msg_signature, timestamp, nonce, echostr):
            # Some frameworks decode an unescaped '+' in the query string as a space (docs/wecom-kf.md §1.2
            # note).
            repaired = echostr.replace(" ", "+")
            if repaired == echostr or not self._signature_matches(msg_signature, timestamp, nonce, repaired):
                raise CallbackRejected(SIGNATURE_ERROR, "signature mismatch")
            echostr = repaired
        return self._decrypt(echostr)

    def decrypt_callback(self, *, msg_signature: str, timestamp: str, nonce: str, body: bytes) -> str:
        """POST: the inner XML of a verified envelope."""
        if len(body) > MAX_BODY_BYTES:
            raise CallbackRejected(PARSE_XML_ERROR, "body too large")
        encrypted = _fields(body, what="envelope").get("Encrypt")
        if not encrypted:
            raise CallbackRejected(PARSE_XML_ERROR, "envelope has no Encrypt")
        if not self._signature_matches(msg_signature, timestamp, nonce, encrypted):
            raise CallbackRejected(SIGNATURE_ERROR, "signature mismatch")
        return self._decrypt(encrypted)

    def encrypt(self, plaintext: str, *, random_prefix: bytes | None = None) -> str:
        prefix = os.urandom(_RANDOM_LEN) if random_prefix is None else random_prefix
        if len(prefix) != _RANDOM_LEN:
            raise ValueError(f"random_prefix must be {_RANDOM_LEN} bytes")
        msg = plaintext.encode("utf-8")
        data = prefix + struct.pack(">I", len(msg)) + msg + self._receive_id
        pad = _PAD_BLOCK - len(data) % _PAD_BLOCK
        data += bytes([pad]) * pad
        return base64.b64encode(self._aes_encrypt(data)).decode("ascii")

    def encrypt_callback(
        self, plaintext: str, *, timestamp: str, nonce: str, random_prefix: bytes | None = None
    ) -> tuple[bytes, str]:
        """A POST envelope as WeCom sends it, and its msg_signature: lets tests forge callbacks."""
        encrypted = self.encrypt(plaintext, random_prefix=random_prefix)
        body = (
            f"<xml><ToUserName>{_cdata(self._receive_id.decode('utf-8'))}</ToUserName>"
            f"<Encrypt>{_cdata(encrypted)}</Encrypt><AgentID>{_cdata('')}</AgentID></xml>"
        )
        return body.encode("utf-8"), self.signature(timestamp, nonce, encrypted)

    def _signature_matches(self, msg_signature: str, timestamp: str, nonce: str, encrypted: str) -> bool:
        expected = self.signature(timestamp, nonce, encrypted).encode("ascii")
        # compare_digest raises TypeError on non-ASCII str, so compare bytes.
        return hmac.compare_digest(expected, msg_signature.encode("utf-8", "surrogatepass"))

    # IV is the first 16 bytes of the key, not carried in the message (docs/wecom-kf.md §1.5).
    def _aes_encrypt(self, data: bytes) -> bytes:
        return bytes(AES.new(self._key, AES.MODE_CBC, iv=self._key[:16]).encrypt(data))

    def _aes_decrypt(self, data: bytes) -> bytes:
        blocks = int.from_bytes(self._ecb.decrypt(data), "big")
        chain = int.from_bytes(self._iv + data[:-16], "big")
        return (blocks ^ chain).to_bytes(len(data), "big")

    def _decrypt(self, encrypted: str) -> str:
        try:
            ciphertext = base64.b64decode(encrypted, validate=True)
        except (binascii.Error, ValueError):  # ValueError: non-ASCII str input
            raise CallbackRejected(DECODE_BASE64_ERROR, "bad base64") from None
        if not ciphertext or len(ciphertext) % AES.block_size:
            raise CallbackRejected(DECRYPT_AES_ERROR, "bad ciphertext length")
        data = self._aes_decrypt(ciphertext)

        # Tencent's sample trusts the pad byte; we check it fully (docs/wecom-kf.md §1.5).
        pad = data[-1]
        if not 1 <= pad <= _PAD_BLOCK or pad > len(data) or data[-pad:] != bytes([pad]) * pad:
            raise CallbackRejected(DECRYPT_AES_ERROR, "bad padding")
        data = data[:-pad]

        if len(data) < _HEADER_LEN:
            raise CallbackRejected(ILLEGAL_BUFFER, "plaintext too short")
        (msg_len,) = struct.unpack(">I", data[_RANDOM_LEN:_HEADER_LEN])
        msg_end = _HEADER_LEN + msg_len
        if msg_end > len(data):
            raise CallbackRejected(ILLEGAL_BUFFER, "message length exceeds plaintext")
        if data[msg_end:] != self._receive_id:
            raise CallbackRejected(RECEIVE_ID_ERROR, "receive id mismatch")
        try:
            return data[_HEADER_LEN:msg_end].decode("utf-8")
        except UnicodeDecodeError:
            raise CallbackRejected(ILLEGAL_BUFFER, "message is not UTF-8") from None


def parse_notice(xml: str) -> CallbackNotice:
    """The decrypted callback XML as a notice (docs/wecom-kf.md §3). Unknown events pass through for the
    caller."""
    fields = _fields(xml, what="notice")

    def text(tag: str) -> str:
        return (fields.get(tag) or "").strip()

    event = text("Event") or text("MsgType")
    created = text("CreateTime")
    # Not bare int(): it also takes "1_000", Arabic-Indic digits, and raises past 4300 digits.
    create_time = int(created) if created.isascii() and created.isdigit() and len(created) <= 18 else 0
    return CallbackNotice(
        event=event, token=text("Token"), open_kfid=text("OpenKfId"), create_time=create_time
    )


def _fields(source: str | bytes, *, what: str) -> dict[str, str]:
    """The text of each child of the root, first occurrence of a tag wins (ElementTree's `findtext`)."""
    flat = _flat_fields(source)
    if flat is not None:
        return flat
    fields: dict[str, str] = {}
    for child in _parse_xml(source, what=what):
        if isinstance(child.tag, str):
            fields.setdefault(child.tag, child.text or "")
    return fields


def _flat_fields(source: str | bytes) -> dict[str, str] | None:
    """The children of a flat `<xml>` document as `_fields` reads them, or None for anything else."""
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError:
            return None
    opened = _FLAT_OPEN.match(source)
    if opened is None:
        return None
    fields: dict[str, str] = {}
    at = opened.end()
    while child := _FLAT_CHILD.match(source, at):
        cdata, text = child.group(2, 3)
        fields.setdefault(child.group(1), cdata if cdata is not None else text)
        at = child.end()
    return fields if _FLAT_CLOSE.fullmatch(source, at) else None


def _parse_xml(source: str | bytes, *, what: str) -> Element:
    try:
        # No DTD at all: WeCom never sends one, and it shuts out entity expansion and external entities.
        root: Element = fromstring(source, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except _XML_ERRORS as exc:
        raise CallbackRejected(
            PARSE_XML_ERROR, f"{what} is not acceptable XML ({type(exc).__name__})"
        ) from None
    return root


def _cdata(text: str) -> str:
    return "<![CDATA[" + text.replace("]]>", "]]]]><![CDATA[>") + "]]>"
