"""Every error the sync layer raises, in one tree.

SyncError                       base of everything raised by ``sync``
├── ProtocolError               a message that is not a valid message of this protocol
│   ├── MalformedMessageError   wrong types, missing fields, bad values
│   ├── UnknownMessageError     a message type this node does not know
│   ├── OversizeMessageError    a field or a count over its limit
│   └── VersionMismatchError    the peer speaks another protocol version
├── TransportError              the request did not complete (cause in ``__cause__``)
│   ├── UnreachableError        no transport could reach any address of the peer
│   │   └── AddressesFailedError    several addresses tried, each failed (``attempts``: each one's error)
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

from collections.abc import Sequence


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


class AddressesFailedError(UnreachableError):
    """Every address tried failed. Its text names each with its own error, one line each,
    so a user sees that (say) the direct address was refused *and* the circuit was cut,
    not only whichever failed last; ``one_line`` is the same for logs and history rows."""

    def __init__(self, what: str, attempts: Sequence[tuple[str, str]]) -> None:
        self.what = what
        self.attempts = tuple(attempts)
        count = len(self.attempts)
        self.head = f"{what}: {count} address{'' if count == 1 else 'es'} tried"
        super().__init__("\n".join([self.head + ":", *(f"  {a}: {e}" for a, e in self.attempts)]))

    @property
    def one_line(self) -> str:
        return self.head + ": " + "; ".join(f"{a}: {e}" for a, e in self.attempts)


def attempt_error(address: str, exc: BaseException) -> str:
    """One address's error without the address repeated (transports name it in their text)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    for prefix in (f"{address}: ", f"{address.partition(':')[2]}: "):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


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
