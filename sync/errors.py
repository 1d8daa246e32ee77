"""Every error the sync layer raises, in one tree.

SyncError                       base of everything raised by ``sync``
├── ProtocolError               a message that is not a valid message of this protocol
│   ├── MalformedMessageError   wrong types, missing fields, bad values
│   ├── UnknownMessageError     a message type this node does not know
│   ├── OversizeMessageError    a field or a count over its limit
│   └── VersionMismatchError    the peer speaks another protocol version
├── TransportError              the request did not complete (cause in ``__cause__``)
│   ├── UnreachableError        no transport could reach any address of the peer
│   └── RequestTimeoutError     no answer in time
├── AccessError                 the peer refused us, or we refused the peer
│   ├── UnauthorizedError       no key with Read or better signed the request
│   ├── StaleRequestError       the signed request is too old (or from the future)
│   ├── ReplayedRequestError    the signed request's nonce was already used
│   ├── AccessPendingError      our access request waits for an admin
│   └── AccessRejectedError     an admin rejected our access request
├── LimitError                  a bound was reached: the request is refused and nothing is stored
│   ├── BusyError               a bound of the whole node (pending access requests, nonces): later
│   └── OverBudgetError         the requester's own bound (its requests, its Unverified entries)
├── PeerError                   the peer answered with an Error we have no class for
├── NotServedError              the peer does not hold (or serve) that database
└── TicketError                 a ticket that cannot be used
"""

from __future__ import annotations


class SyncError(Exception):
    """Base class of every error raised by the ``sync`` package."""


class ProtocolError(SyncError):
    """A message that is not a valid message of this protocol."""

    code = "protocol"


class MalformedMessageError(ProtocolError):
    code = "malformed"


class UnknownMessageError(ProtocolError):
    code = "unknown-message"


class OversizeMessageError(ProtocolError):
    code = "oversize"


class VersionMismatchError(ProtocolError):
    code = "version"


class TransportError(SyncError):
    """The request did not complete; the lower library's error is in ``__cause__``."""

    code = "transport"


class UnreachableError(TransportError):
    code = "unreachable"


class RequestTimeoutError(TransportError):
    code = "timeout"


class AccessError(SyncError):
    code = "access"


class UnauthorizedError(AccessError):
    code = "unauthorized"


class StaleRequestError(AccessError):
    code = "stale"


class ReplayedRequestError(AccessError):
    code = "replayed"


class AccessPendingError(AccessError):
    """Access was asked for and waits for an admin; ``request_id`` is what the admin approves."""

    code = "pending"

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class AccessRejectedError(AccessError):
    code = "rejected"


class LimitError(SyncError):
    """A resource bound was reached; the request was refused whole (nothing was stored)."""

    code = "limit"


class BusyError(LimitError):
    """A bound of the whole node is reached (say, pending access requests); ask again later."""

    code = "busy"


class OverBudgetError(LimitError):
    """The requester is over its own bound (access requests waiting, entries it left Unverified)."""

    code = "over-budget"


class PeerError(SyncError):
    """An ``Error`` answer whose code has no class of its own here."""

    code = "peer"


class NotServedError(SyncError):
    code = "not-served"


class TicketError(SyncError):
    code = "ticket"


ERRORS_BY_CODE: dict[str, type[SyncError]] = {
    cls.code: cls
    for cls in (
        ProtocolError,
        MalformedMessageError,
        UnknownMessageError,
        OversizeMessageError,
        VersionMismatchError,
        UnauthorizedError,
        StaleRequestError,
        ReplayedRequestError,
        AccessPendingError,
        AccessRejectedError,
        LimitError,
        BusyError,
        OverBudgetError,
        NotServedError,
    )
}
