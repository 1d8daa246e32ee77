"""The HTTP transport's wire formats: length-prefixed msgpack frames, and JSON.

Two request formats, chosen by the request's ``Content-Type``:

* msgpack (``application/msgpack``): the body is one message; the answer is a stream of
  frames, each a 4-byte big-endian length then the msgpack message
  (``application/x-eidetica-frames``). This is what nodes speak to each other.
* JSON (``application/json``): for people and scripts. The body is one message as a JSON
  object; the answer is NDJSON, one message per line (``application/x-ndjson``). Bytes
  travel as standard base64 strings (padded, canonical); which fields are bytes is
  spelled out below for every field of every message type, so a field added to
  :mod:`sync.messages` without a JSON mapping fails loudly instead of travelling wrong.

Decoding is as strict as :func:`sync.messages.decode_message`: anything wrong raises a
:class:`~sync.errors.ProtocolError` subclass, so the server can always answer with an
``Error``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import json
import re
from typing import Any, Final

from dag.crdt.doc import MAX_VALUE_DEPTH
from sync.errors import MalformedMessageError, OversizeMessageError
from sync.messages import MESSAGE_TYPES, Message, decode_message, encode_message, from_wire, to_wire

FRAME_HEADER_BYTES: Final = 4
MAX_FRAME_LENGTH: Final = 2**32 - 1  # what a 4-byte length can say

CONTENT_MSGPACK: Final = "application/msgpack"
CONTENT_JSON: Final = "application/json"
CONTENT_FRAMES: Final = "application/x-eidetica-frames"
CONTENT_NDJSON: Final = "application/x-ndjson"


class WireFormat(enum.Enum):
    """How a request is written and how its answer comes back."""

    MSGPACK = "msgpack"
    JSON = "json"

    @property
    def request_type(self) -> str:
        """Content type of a single message (a request body, or an error answer's body)."""
        return CONTENT_MSGPACK if self is WireFormat.MSGPACK else CONTENT_JSON

    @property
    def stream_type(self) -> str:
        """Content type of a streamed answer."""
        return CONTENT_FRAMES if self is WireFormat.MSGPACK else CONTENT_NDJSON

    def encode(self, message: Message) -> bytes:
        """One message, unframed (a request body or an error answer's body)."""
        return encode_message(message) if self is WireFormat.MSGPACK else encode_json(message)

    def decode(self, data: bytes) -> Message:
        """One unframed message; raises a :class:`~sync.errors.ProtocolError` subclass."""
        return decode_message(data) if self is WireFormat.MSGPACK else decode_json(data)

    def encode_answer(self, message: Message) -> bytes:
        """One message of a streamed answer: a frame, or an NDJSON line."""
        if self is WireFormat.MSGPACK:
            return encode_frame(encode_message(message))
        return encode_json(message) + b"\n"


_MEDIA_TYPES: Final = {
    CONTENT_MSGPACK: WireFormat.MSGPACK,
    "application/x-msgpack": WireFormat.MSGPACK,
    "application/vnd.msgpack": WireFormat.MSGPACK,
    CONTENT_JSON: WireFormat.JSON,
}


def format_for(content_type: str | None) -> WireFormat | None:
    """The request format a ``Content-Type`` header names (parameters ignored), if any."""
    if not content_type:
        return None
    media = content_type.split(";", 1)[0].strip().lower()
    return _MEDIA_TYPES.get(media)


# ---- frames -------------------------------------------------------------------------


def encode_frame(data: bytes) -> bytes:
    """A frame: 4-byte big-endian length, then ``data``.

    One bytes object, not two writes: the server sends each frame as one body chunk, so
    a frame costs one chunk header and one send, never a tiny write of its own.
    """
    if len(data) > MAX_FRAME_LENGTH:
        raise OversizeMessageError(f"a frame of {len(data)} bytes cannot be framed")
    return len(data).to_bytes(FRAME_HEADER_BYTES, "big") + data


class FrameReader:
    """Splits a byte stream into frames, incrementally, as chunks arrive.

    Holds at most one frame plus one chunk: a frame's length is checked as soon as its
    header is in, so an oversize frame is refused before its body is buffered.
    """

    def __init__(self, max_frame_bytes: int) -> None:
        self._max = max_frame_bytes
        self._buffer = bytearray()
        self._need = FRAME_HEADER_BYTES  # bytes the next step waits for (header, or header + body)

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add ``chunk``; return the frames it completed (raises ``OversizeMessageError``)."""
        self._buffer += chunk
        if len(self._buffer) < self._need:
            return []  # mid-frame: no scan, so a large frame costs one append per chunk
        frames: list[bytes] = []
        offset = 0
        buffer = self._buffer
        while len(buffer) - offset >= FRAME_HEADER_BYTES:
            length = int.from_bytes(buffer[offset : offset + FRAME_HEADER_BYTES], "big")
            if length > self._max:
                raise OversizeMessageError(f"a frame of {length} bytes is over the limit of {self._max}")
            end = offset + FRAME_HEADER_BYTES + length
            if len(buffer) < end:
                break
            frames.append(bytes(buffer[offset + FRAME_HEADER_BYTES : end]))
            offset = end
        if offset:
            del buffer[:offset]
        if len(buffer) >= FRAME_HEADER_BYTES:
            self._need = FRAME_HEADER_BYTES + int.from_bytes(buffer[:FRAME_HEADER_BYTES], "big")
        else:
            self._need = FRAME_HEADER_BYTES
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (non-zero at the end of a stream = cut mid-frame)."""
        return len(self._buffer)


# ---- JSON ---------------------------------------------------------------------------


class _Kind(enum.Enum):
    PLAIN = "plain"  # JSON carries it as is (text, integers, booleans, null, lists of text pairs)
    BYTES = "bytes"  # base64 string
    BYTES_LIST = "bytes-list"  # list of base64 strings
    AUTH = "auth"  # {key, timestamp_ms, nonce: base64, signature: base64} or null
    OFFERS = "offers"  # list of {db: base64, name, public}
    POSITION = "position"  # [height, base64 entry ID] or null


# Every field of every message type, by name (a field name means the same in every type).
FIELD_KINDS: Final[dict[str, _Kind]] = {
    "device_key": _Kind.PLAIN,
    "display_name": _Kind.PLAIN,
    "version": _Kind.PLAIN,
    "challenge": _Kind.BYTES,
    "addresses": _Kind.PLAIN,
    "challenge_signature": _Kind.BYTES,
    "counter_challenge": _Kind.BYTES,
    "databases": _Kind.OFFERS,
    "signature": _Kind.BYTES,
    "db": _Kind.BYTES,
    "tips": _Kind.BYTES_LIST,
    "common": _Kind.BYTES_LIST,
    "have": _Kind.BYTES_LIST,
    "entries": _Kind.BYTES_LIST,
    "auth": _Kind.AUTH,
    "access": _Kind.PLAIN,
    "budget": _Kind.PLAIN,
    "resume_after": _Kind.POSITION,
    "more": _Kind.PLAIN,
    "received": _Kind.PLAIN,
    "request_id": _Kind.PLAIN,
    "message": _Kind.PLAIN,
    "stored": _Kind.PLAIN,
    "failed": _Kind.PLAIN,
    "code": _Kind.PLAIN,
}
_AUTH_BYTES: Final = ("nonce", "signature")


def unmapped_fields() -> set[str]:
    """Message fields with no JSON mapping (empty, or the JSON format is out of date)."""
    names = {f.name for cls in MESSAGE_TYPES.values() for f in dataclasses.fields(cls)}
    return names - set(FIELD_KINDS)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _unb64(field: str, value: Any) -> bytes:
    """Strict base64: standard alphabet, padded, canonical (re-encodes to the same text)."""
    if not isinstance(value, str):
        raise MalformedMessageError(f"field {field!r} is not a base64 string")
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedMessageError(f"field {field!r} is not valid base64") from None
    if _b64(decoded) != value:
        raise MalformedMessageError(f"field {field!r} is not canonical base64")
    return decoded


def _to_json_field(name: str, value: Any) -> Any:
    kind = FIELD_KINDS.get(name)
    if kind is None:
        raise TypeError(f"field {name!r} has no JSON mapping (add it to FIELD_KINDS)")
    if kind is _Kind.BYTES:
        return _b64(value)
    if kind is _Kind.BYTES_LIST:
        return [_b64(item) for item in value]
    if kind is _Kind.AUTH:
        if value is None:
            return None
        return {k: _b64(v) if k in _AUTH_BYTES else v for k, v in value.items()}
    if kind is _Kind.OFFERS:
        return [{**offer, "db": _b64(offer["db"])} for offer in value]
    if kind is _Kind.POSITION:
        return None if value is None else [value[0], _b64(value[1])]
    return value


def _from_json_field(name: str, value: Any) -> Any:
    kind = FIELD_KINDS.get(name)
    if kind is None or kind is _Kind.PLAIN:
        return value  # from_wire refuses unknown fields and checks plain ones
    if kind is _Kind.BYTES:
        return _unb64(name, value)
    if kind is _Kind.BYTES_LIST:
        if not isinstance(value, list):
            raise MalformedMessageError(f"field {name!r} is not a list")
        return [_unb64(name, item) for item in value]
    if kind is _Kind.AUTH:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise MalformedMessageError(f"field {name!r} is not an auth proof")
        return {k: _unb64(f"{name}.{k}", v) if k in _AUTH_BYTES else v for k, v in value.items()}
    if kind is _Kind.POSITION:
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != 2:
            raise MalformedMessageError(f"field {name!r} is not a [height, entry ID] pair")
        return [value[0], _unb64(name, value[1])]
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise MalformedMessageError(f"field {name!r} is not a list of offers")
    return [{**offer, "db": _unb64(f"{name}.db", offer["db"])} if "db" in offer else offer for offer in value]


def to_json(message: Message) -> dict[str, Any]:
    """The message as a JSON-ready map (bytes as base64)."""
    return {name: value if name == "type" else _to_json_field(name, value) for name, value in to_wire(message).items()}


def from_json(body: Any) -> Message:
    """A message from a parsed JSON map; raises a :class:`~sync.errors.ProtocolError` subclass."""
    if not isinstance(body, dict):
        raise MalformedMessageError("a message is a JSON object")
    return from_wire({name: value if name == "type" else _from_json_field(name, value) for name, value in body.items()})


def encode_json(message: Message) -> bytes:
    return json.dumps(to_json(message), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class JsonInputError(ValueError):
    """JSON input that is refused; the message is one line saying what is wrong and where."""


# Any surrogate left in a parsed string is a lone one: Python joins escaped pairs.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_constant(name: str) -> Any:
    raise JsonInputError(f"invalid JSON: {name} is not a JSON value")


def parse_json(data: bytes | str, *, max_depth: int = MAX_VALUE_DEPTH) -> Any:
    """Parse JSON input from a peer or a user; raises :class:`JsonInputError` with one clear line.

    Stricter than :func:`json.loads` where the rest of the node would fail later, far
    from the cause: text must be UTF-8, ``NaN``/``Infinity`` are refused, a string may
    not hold a lone surrogate (``"\\ud800"`` parses, then cannot be encoded to UTF-8,
    msgpack or CBOR), and arrays and objects nest at most ``max_depth`` levels (the
    database's own limit for values, :data:`dag.crdt.doc.MAX_VALUE_DEPTH`).
    """
    if isinstance(data, bytes | bytearray):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonInputError(
                f"invalid JSON: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
            ) from None
    try:
        value = json.loads(data, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise JsonInputError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except JsonInputError:
        raise
    except RecursionError:  # the C parser's own stack guard, far past max_depth
        raise JsonInputError(f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # an integer too long to convert, for one
        raise JsonInputError(f"invalid JSON: {' '.join(str(exc).split())}") from None
    _check_parsed(value, max_depth)
    return value


def _check_parsed(value: Any, max_depth: int) -> None:
    """Depth and lone surrogates, walked without recursion (so depth cannot blow the stack)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict | list):
            if depth > max_depth:
                raise JsonInputError(f"JSON nested deeper than {max_depth} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_text(key)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


def _check_text(text: str) -> None:
    if text.isascii():
        return
    match = _SURROGATE.search(text)
    if match is not None:
        raise JsonInputError(
            f"invalid JSON: a string holds a lone surrogate \\u{ord(match.group()):04x} (not valid Unicode)"
        )


def decode_json(data: bytes) -> Message:
    """Decode one message from JSON bytes; raises a :class:`~sync.errors.ProtocolError` subclass."""
    try:
        body = parse_json(data)
    except JsonInputError as exc:
        raise MalformedMessageError(str(exc)) from None
    return from_json(body)
