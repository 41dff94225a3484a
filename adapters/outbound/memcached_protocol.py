"""Memcached's text protocol as the client (memcached_client.py) speaks it: keys, requests, and parsers that
read replies from a connection's buffer. Parsers take the bytes received so far and answer (result, bytes
used), or None while the reply is incomplete; anything unexpected raises `StoreUnavailable` (whose message
never holds a key or a value)."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from typing import NamedTuple, TypeVar

from application.errors import StoreUnavailable

T = TypeVar("T")
Parser = Callable[[bytearray], "tuple[T, int] | None"]  # (result, bytes used), or None: reply incomplete
Found = dict[bytes, tuple[bytes, bytes | None]]  # key → (value, cas token or None)

_KEY = re.compile(r"[!-~]{1,250}")  # printable ASCII without space: memcached's rules, at most 250 bytes
_MAX_LINE = 1024  # longer than any reply line the commands used here can get
_ERROR_LINES = (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")


class StoreCommand(NamedTuple):
    """One command for `store_many`: verb "set", "add" or "cas" (with the token `gets` answered)."""

    verb: str
    key: str
    value: bytes
    expire: int = 0
    cas: bytes | int | None = None


def encode_key(key: str) -> bytes:
    if not _KEY.fullmatch(key):
        raise StoreUnavailable("invalid memcached key (empty, too long, or whitespace/control characters)")
    return key.encode("ascii")


def _line(buffer: bytearray, start: int = 0) -> tuple[bytes, int] | None:
    """The reply line at `start` without its CRLF, and where the next one starts; None while incomplete."""
    end = buffer.find(b"\r\n", start)
    if end < 0:
        if len(buffer) - start > _MAX_LINE:
            raise StoreUnavailable("memcached sent an unexpected reply")
        return None
    return bytes(buffer[start:end]), end + 2


def _unexpected(line: bytes) -> StoreUnavailable:
    kind = line.split(b" ", 1)[0]
    if kind in _ERROR_LINES:  # the server's text is left out: it may quote what we sent
        return StoreUnavailable(f"memcached refused the command ({kind.decode()})")
    return StoreUnavailable("memcached sent an unexpected reply")


def _one_line(convert: Callable[[bytes], T]) -> Parser[T]:
    """A parser for a one-line reply, which `convert` turns into the result (or raises)."""

    def parse(buffer: bytearray) -> tuple[T, int] | None:
        read = _line(buffer)
        return None if read is None else (convert(read[0]), read[1])

    return parse


def _status(replies: dict[bytes, T]) -> Parser[T]:
    def convert(line: bytes) -> T:
        if line not in replies:
            raise _unexpected(line)
        return replies[line]

    return _one_line(convert)


def _counter(line: bytes) -> int | None:
    if line == b"NOT_FOUND":
        return None
    if not line.isdigit():
        raise _unexpected(line)
    return int(line)


def _version(line: bytes) -> str:
    if not line.startswith(b"VERSION "):
        raise _unexpected(line)
    return line[8:].decode("ascii", "replace")


STORE_REPLIES: dict[bytes, bool | None] = {b"STORED": True, b"NOT_STORED": False}
CAS_REPLIES: dict[bytes, bool | None] = {b"STORED": True, b"EXISTS": False, b"NOT_FOUND": None}
STORE: Parser[bool] = _status({b"STORED": True, b"NOT_STORED": False})
CAS: Parser[bool | None] = _status({b"STORED": True, b"EXISTS": False, b"NOT_FOUND": None})
DELETE: Parser[bool] = _status({b"DELETED": True, b"NOT_FOUND": False})
INCR: Parser[int | None] = _one_line(_counter)
VERSION: Parser[str] = _one_line(_version)


_STORE_VERBS = {"set": b"set", "add": b"add", "cas": b"cas"}


def store_request(command: StoreCommand) -> bytes:
    verb = _STORE_VERBS.get(command.verb)
    if verb is None:
        raise ValueError(f"store_many takes set, add and cas, not {command.verb!r}")
    if not isinstance(command.value, bytes):
        raise StoreUnavailable("memcached values must be bytes")
    extra = b""
    if verb == b"cas":
        token = str(command.cas).encode() if isinstance(command.cas, int) else command.cas
        if not token or not token.isdigit():
            raise StoreUnavailable("invalid cas token")
        extra = b" " + token
    header = b"%b %b 0 %d %d%b\r\n" % (
        verb,
        encode_key(command.key),
        command.expire,
        len(command.value),
        extra,
    )
    return b"".join((header, command.value, b"\r\n"))


def _parse_statuses(
    replies: Sequence[dict[bytes, bool | None]], buffer: bytearray
) -> tuple[list[bool | None], int] | None:
    """One status line per pipelined command, in order; an error line or an unexpected one raises."""
    results: list[bool | None] = []
    position = 0
    for table in replies:
        read = _line(buffer, position)
        if read is None:
            return None
        line, position = read
        if line not in table:
            raise _unexpected(line)
        results.append(table[line])
    return results, position


def parse_statuses_then_values(
    replies: Sequence[dict[bytes, bool | None]], wanted: Collection[bytes] | None, buffer: bytearray
) -> tuple[tuple[list[bool | None], Found], int] | None:
    """The status lines of pipelined store commands, then (when keys were asked for) one `get`'s values."""
    statuses = _parse_statuses(replies, buffer)
    if statuses is None:
        return None
    results, used = statuses
    if wanted is None:
        return (results, {}), used
    values = parse_values(False, wanted, buffer[used:])
    if values is None:
        return None
    found, more = values
    return (results, found), used + more


def parse_values(with_cas: bool, wanted: Collection[bytes], buffer: bytearray) -> tuple[Found, int] | None:
    """`VALUE <key> <flags> <bytes> [<cas>]` + data blocks up to `END`; only keys that were asked for."""
    found: Found = {}
    position = 0
    while (read := _line(buffer, position)) is not None:
        line, position = read
        if line == b"END":
            return found, position
        parts = line.split(b" ")
        if (
            len(parts) != (5 if with_cas else 4)
            or parts[0] != b"VALUE"
            or parts[1] not in wanted
            or not parts[3].isdigit()
            or (with_cas and not parts[4].isdigit())
        ):
            raise _unexpected(line)
        end = position + int(parts[3])
        if len(buffer) < end + 2:
            return None
        if buffer[end : end + 2] != b"\r\n":
            raise StoreUnavailable("memcached sent an unexpected reply")
        found[parts[1]] = (bytes(buffer[position:end]), parts[4] if with_cas else None)
        position = end + 2
    return None
