"""What the transports say about their connections, as the control API shows it.

Sync's transport interface says nothing about connections (HTTP has none to speak of), so
a transport that knows them offers a status snapshot
(:class:`~sync.transport.ReportingTransport`): its connected peers, each direct or
relayed, and whatever else it tracks (libp2p: reachability, relays, hole punching). This
module only assembles those snapshots; reading a library's connection tables is the
transport's business. A transport without a snapshot reports nothing here.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Iterable
from typing import Any

from sync.transport import ConnectionKind, ReportingTransport, Transport, TransportStatus

log = logging.getLogger(__name__)


def plain(value: Any) -> Any:
    """``value`` as JSON-able data (dataclasses, enums, sets and objects with ``__dict__`` too)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return plain(value.value) if isinstance(value.value, str | int) else value.name.lower()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def snapshot(transport: Transport) -> TransportStatus | None:
    """The transport's status snapshot, if it offers one."""
    if not isinstance(transport, ReportingTransport):
        return None
    try:
        return transport.status()
    except Exception as exc:  # a status view must never fail a control command; the node runs on
        log.debug("transport status() failed: %s: %s", type(exc).__name__, exc)
        return None


def transport_status(transport: Transport) -> dict[str, Any] | None:
    """The transport's status snapshot as JSON-able data (``status --json`` shows it as is)."""
    status = snapshot(transport)
    if status is None:
        return None
    report = plain(status)
    return report if isinstance(report, dict) else {"status": report}


def connections(transports: Iterable[Transport]) -> dict[str, ConnectionKind]:
    """device key -> ``"direct"`` or ``"relayed"`` for every peer a transport is connected to
    (a later transport's word wins for a peer connected over several)."""
    out: dict[str, ConnectionKind] = {}
    for transport in transports:
        status = snapshot(transport)
        for peer in status.peers if status is not None else ():
            if peer.device:
                out[peer.device] = peer.kind
    return out


__all__ = ["connections", "plain", "snapshot", "transport_status"]
