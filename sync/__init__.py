"""eidetica's sync: protocol, reconciliation, handler and background engine.

Transport-agnostic: it knows transports only through :class:`sync.transport.Transport`.
"""

from .engine import Sync, SyncConfig, SyncHandle, SyncPeerInfo, SyncStatus, enable_sync
from .errors import (
    AccessError,
    AccessPendingError,
    AccessRejectedError,
    BusyError,
    LimitError,
    MalformedMessageError,
    NotServedError,
    OverBudgetError,
    OversizeMessageError,
    PeerError,
    ProtocolError,
    ReplayedRequestError,
    RequestTimeoutError,
    StaleRequestError,
    SyncError,
    TicketError,
    TransportError,
    UnauthorizedError,
    UnknownMessageError,
    UnreachableError,
    VersionMismatchError,
)
from .handler import SyncHandler, run_inline
from .messages import PROTOCOL_VERSION, decode_message, encode_message
from .state import SyncState
from .ticket import Ticket
from .transport import Address, Handler, RequestContext, Transport

__all__ = [
    "PROTOCOL_VERSION",
    "AccessError",
    "AccessPendingError",
    "AccessRejectedError",
    "Address",
    "BusyError",
    "Handler",
    "LimitError",
    "MalformedMessageError",
    "NotServedError",
    "OverBudgetError",
    "OversizeMessageError",
    "PeerError",
    "ProtocolError",
    "ReplayedRequestError",
    "RequestContext",
    "RequestTimeoutError",
    "StaleRequestError",
    "Sync",
    "SyncConfig",
    "SyncError",
    "SyncHandle",
    "SyncHandler",
    "SyncPeerInfo",
    "SyncState",
    "SyncStatus",
    "Ticket",
    "TicketError",
    "Transport",
    "TransportError",
    "UnauthorizedError",
    "UnknownMessageError",
    "UnreachableError",
    "VersionMismatchError",
    "decode_message",
    "enable_sync",
    "encode_message",
    "run_inline",
]
