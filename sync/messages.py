"""The sync protocol's messages: frozen dataclasses, msgpack on the wire.

Every message is a msgpack map with a ``type`` key and one key per field. Entries travel
as their canonical bytes; database IDs and tips as binary CIDs. Decoding validates once,
where bytes come off the wire: a wrong type, a missing or unknown field, an oversize field
or too many entries raises a :class:`~sync.errors.ProtocolError` subclass, never anything
else, so a handler can always answer with an ``Error``.

    Handshake        -> HandshakeReply | Error
    HandshakeConfirm -> Ack | Error
    SyncTree         -> Bootstrap | Incremental (one or more, ``more`` on all but the last)
                        | BootstrapPending | Error
    SendEntries      -> Count | Ack | Error
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from dag.ids import is_cid

from .errors import (
    MalformedMessageError,
    OversizeMessageError,
    ProtocolError,
    UnknownMessageError,
)

PROTOCOL_VERSION = 1
MAX_ENTRIES_PER_MESSAGE = 10_000
MAX_ENTRY_BYTES = 4 * 1024 * 1024
MAX_TIPS = 1024
MAX_TEXT = 4096
MAX_LIST = 4096
CHALLENGE_BYTES = 32
MAX_ADDRESSES = 64  # addresses one node announces (interfaces x transports, plus relay circuits)
# An address's parts on the wire: a transport name is a short word (tickets allow 32
# characters); no real address (a multiaddr through a relay is ~150) comes near 1,024. They
# keep one Handshake under ~70 KB instead of the ~520 KB that 64 pairs of 4,096 allowed.
MAX_TRANSPORT_NAME = 32
MAX_ADDRESS_TEXT = 1024
# A SyncTree's budget (bytes its answer may take): under 2**62, so sums never overflow a signed
# 64-bit integer on any peer; a relay circuit's whole data limit is far below.
MAX_BUDGET = 2**62
# Fields newer than the protocol's first version: left out of the wire map while at their
# default, because a peer of the first version refuses a message with a field it does not know.
_OMITTED_AT_DEFAULT = frozenset({"budget", "resume_after"})
MAX_HEIGHT = 2**63  # an entry height (dag bounds them below 2**63)


@dataclass(frozen=True, slots=True)
class AuthProof:
    """A signature by ``key`` over the request (see ``sync.proofs``)."""

    key: str
    timestamp_ms: int
    nonce: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class DatabaseOffer:
    db: bytes
    name: str | None
    public: bool


@dataclass(frozen=True, slots=True)
class Handshake:
    TYPE: ClassVar[str] = "Handshake"
    device_key: str
    display_name: str
    version: int
    challenge: bytes
    addresses: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class HandshakeReply:
    TYPE: ClassVar[str] = "HandshakeReply"
    device_key: str
    display_name: str
    version: int
    challenge_signature: bytes
    counter_challenge: bytes
    databases: tuple[DatabaseOffer, ...] = ()
    addresses: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class HandshakeConfirm:
    TYPE: ClassVar[str] = "HandshakeConfirm"
    device_key: str
    counter_challenge: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class SyncTree:
    """Our tips for a database, plus what lets the peer send only what we lack.

    ``common``: tips we believe the peer holds (our cursor from the last sync with it);
    ``have``: a sample of our ancestors, for when ``common`` is empty or stale;
    ``entries``: what we push at once (our entries outside ``common``'s closure);
    ``budget``: the most bytes the whole answer may take on the wire (every frame with its
    4-byte header), because the connection is a relay circuit with a data limit; ``0``
    means no limit. An answer that stops for it ends with a frame marked ``more``; the
    asker stores what came and asks again (over a fresh circuit) for the rest.
    ``resume_after``: the position ``(height, ID)`` of the last entry of a bootstrap the
    asker stored in order before it was cut: the peer may page on from there as a
    bootstrap does, instead of listing everything the asker lacks (see ``sync.resume``).
    """

    TYPE: ClassVar[str] = "SyncTree"
    db: bytes
    tips: tuple[bytes, ...] = ()
    common: tuple[bytes, ...] = ()
    have: tuple[bytes, ...] = ()
    entries: tuple[bytes, ...] = ()
    auth: AuthProof | None = None
    access: str | None = None
    budget: int = 0
    resume_after: tuple[int, bytes] | None = None


@dataclass(frozen=True, slots=True)
class Bootstrap:
    TYPE: ClassVar[str] = "Bootstrap"
    db: bytes
    tips: tuple[bytes, ...]
    entries: tuple[bytes, ...]
    more: bool = False


@dataclass(frozen=True, slots=True)
class Incremental:
    TYPE: ClassVar[str] = "Incremental"
    db: bytes
    tips: tuple[bytes, ...]
    entries: tuple[bytes, ...]
    received: int = 0
    more: bool = False


@dataclass(frozen=True, slots=True)
class BootstrapPending:
    TYPE: ClassVar[str] = "BootstrapPending"
    db: bytes
    request_id: str
    message: str


@dataclass(frozen=True, slots=True)
class SendEntries:
    TYPE: ClassVar[str] = "SendEntries"
    db: bytes
    entries: tuple[bytes, ...]
    auth: AuthProof | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    TYPE: ClassVar[str] = "Ack"


@dataclass(frozen=True, slots=True)
class Count:
    TYPE: ClassVar[str] = "Count"
    received: int
    stored: int
    failed: int = 0


@dataclass(frozen=True, slots=True)
class Error:
    TYPE: ClassVar[str] = "Error"
    code: str
    message: str


Message = (
    Handshake
    | HandshakeReply
    | HandshakeConfirm
    | SyncTree
    | Bootstrap
    | Incremental
    | BootstrapPending
    | SendEntries
    | Ack
    | Count
    | Error
)
MESSAGE_TYPES: dict[str, type[Any]] = {
    cls.TYPE: cls
    for cls in (
        Handshake,
        HandshakeReply,
        HandshakeConfirm,
        SyncTree,
        Bootstrap,
        Incremental,
        BootstrapPending,
        SendEntries,
        Ack,
        Count,
        Error,
    )
}


# ---- field validators -----------------------------------------------------------------


def _fail(field: str, what: str) -> MalformedMessageError:
    return MalformedMessageError(f"field {field!r} {what}")


def _text(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(field, "is not text")
    if len(value) > MAX_TEXT:
        raise OversizeMessageError(f"field {field!r} is over {MAX_TEXT} characters")
    return value


def _optional_text(field: str, value: Any) -> str | None:
    return None if value is None else _text(field, value)


def _int(field: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not -(2**63) <= value < 2**63:
        raise _fail(field, "is not an integer")
    return value


def _budget(field: str, value: Any) -> int:
    count = _int(field, value)
    if not 0 <= count < MAX_BUDGET:
        raise _fail(field, f"is not a byte count from 0 to {MAX_BUDGET}")
    return count


def _position(field: str, value: Any) -> tuple[int, bytes] | None:
    """A bootstrap position ``[height, ID]`` (or nothing)."""
    if value is None:
        return None
    pair = _list(field, value, 2)
    if len(pair) != 2:
        raise _fail(field, "is not a (height, entry ID) pair")
    height = _int(field, pair[0])
    if not 0 <= height < MAX_HEIGHT:
        raise _fail(field, "holds a height that is not from 0 to 2**63")
    return height, _cid(field, pair[1])


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(field, "is not a boolean")
    return value


def _bytes(field: str, value: Any, limit: int = 256) -> bytes:
    if not isinstance(value, bytes):
        raise _fail(field, "is not bytes")
    if len(value) > limit:
        raise OversizeMessageError(f"field {field!r} is over {limit} bytes")
    return value


def _cid(field: str, value: Any) -> bytes:
    if not is_cid(value):
        raise _fail(field, "is not an entry ID")
    return bytes(value)


def _list(field: str, value: Any, limit: int) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise _fail(field, "is not a list")
    if len(value) > limit:
        raise OversizeMessageError(f"field {field!r} has {len(value)} items (limit {limit})")
    return list(value)


def _cids(field: str, value: Any) -> tuple[bytes, ...]:
    return tuple(_cid(field, item) for item in _list(field, value, MAX_TIPS))


def _entries(field: str, value: Any) -> tuple[bytes, ...]:
    items = _list(field, value, MAX_ENTRIES_PER_MESSAGE)
    for item in items:
        if not isinstance(item, bytes):
            raise _fail(field, "holds an entry that is not bytes")
        if len(item) > MAX_ENTRY_BYTES:
            raise OversizeMessageError(f"field {field!r} holds an entry over {MAX_ENTRY_BYTES} bytes")
    return tuple(items)


def _auth(field: str, value: Any) -> AuthProof | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"key", "timestamp_ms", "nonce", "signature"}:
        raise _fail(field, "is not an auth proof")
    return AuthProof(
        _text("auth.key", value["key"]),
        _int("auth.timestamp_ms", value["timestamp_ms"]),
        _bytes("auth.nonce", value["nonce"], 64),
        _bytes("auth.signature", value["signature"], 64),
    )


def _addresses(field: str, value: Any) -> tuple[tuple[str, str], ...]:
    out = []
    for item in _list(field, value, MAX_ADDRESSES):
        pair = _list(field, item, 2)
        if len(pair) != 2:
            raise _fail(field, "holds an address that is not a (transport, address) pair")
        transport, address = _text(field, pair[0]), _text(field, pair[1])
        if len(transport) > MAX_TRANSPORT_NAME or len(address) > MAX_ADDRESS_TEXT:
            raise OversizeMessageError(
                f"field {field!r} holds an address over {MAX_TRANSPORT_NAME}:{MAX_ADDRESS_TEXT} characters"
            )
        out.append((transport, address))
    return tuple(out)


def _offers(field: str, value: Any) -> tuple[DatabaseOffer, ...]:
    out = []
    for item in _list(field, value, MAX_LIST):
        if not isinstance(item, dict) or set(item) != {"db", "name", "public"}:
            raise _fail(field, "holds an offer that is not {db, name, public}")
        out.append(
            DatabaseOffer(_cid("db", item["db"]), _optional_text("name", item["name"]), _bool("public", item["public"]))
        )
    return tuple(out)


_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "device_key": _text,
    "display_name": _text,
    "version": _int,
    "challenge": lambda f, v: _bytes(f, v, 64),
    "counter_challenge": lambda f, v: _bytes(f, v, 64),
    "challenge_signature": lambda f, v: _bytes(f, v, 64),
    "signature": lambda f, v: _bytes(f, v, 64),
    "addresses": _addresses,
    "databases": _offers,
    "db": _cid,
    "tips": _cids,
    "common": _cids,
    "have": _cids,
    "entries": _entries,
    "auth": _auth,
    "access": _optional_text,
    "budget": _budget,
    "resume_after": _position,
    "more": _bool,
    "received": _int,
    "stored": _int,
    "failed": _int,
    "request_id": _text,
    "message": _text,
    "code": _text,
}


# ---- encoding -----------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, AuthProof | DatabaseOffer):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value


def to_wire(message: Message) -> dict[str, Any]:
    """The message as a plain map (what msgpack or JSON carries)."""
    body: dict[str, Any] = {"type": message.TYPE}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if f.name in _OMITTED_AT_DEFAULT and value == f.default:
            continue
        body[f.name] = _plain(value)
    return body


def from_wire(body: Any) -> Message:
    """A message from a plain map; raises a :class:`ProtocolError` subclass."""
    if not isinstance(body, dict):
        raise MalformedMessageError("a message is a map")
    kind = body.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise UnknownMessageError(f"unknown message type {kind!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(body) - set(fields) - {"type"}
    if unknown:
        raise MalformedMessageError(f"{kind} has unknown fields {sorted(unknown)}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in body:
            if f.default is dataclasses.MISSING:
                raise MalformedMessageError(f"{kind} lacks field {name!r}")
            continue
        values[name] = _VALIDATORS[name](name, body[name])
    message: Message = cls(**values)
    return message


def encode_message(message: Message) -> bytes:
    packed: bytes = msgpack.packb(to_wire(message), use_bin_type=True)
    return packed


def decode_message(data: bytes) -> Message:
    """Decode one message from msgpack bytes; raises a :class:`ProtocolError` subclass."""
    try:
        body = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_ENTRY_BYTES,
            max_array_len=MAX_ENTRIES_PER_MESSAGE,
            max_map_len=64,
            max_str_len=MAX_TEXT,
        )
    except ValueError as exc:
        if "exceeds max" in str(exc):
            raise OversizeMessageError(f"message over a limit: {exc}") from None
        raise MalformedMessageError(f"not a msgpack message: {exc}") from None
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
        raise MalformedMessageError(f"not a msgpack message: {exc}") from None
    return from_wire(body)


def error_for(exc: Exception) -> Error:
    """The ``Error`` answer for an exception raised while serving a request."""
    code = getattr(exc, "code", None)
    if isinstance(exc, ProtocolError | Exception) and isinstance(code, str):
        return Error(code, str(exc))
    return Error("internal", "the peer could not serve this request")
