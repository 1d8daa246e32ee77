"""What the transports can tell about connections: who is connected, directly or relayed.

Sync's transport interface says nothing about connections (HTTP has none to speak of),
so this reads what a transport offers, duck-typed: a libp2p transport's host lists its
live connections, and a transport with a ``status()`` (the reachability and relay API
that the libp2p transport is growing) has it passed through as it is. A transport
without either simply reports nothing here; nothing breaks when an API appears or goes.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import Any

log = logging.getLogger(__name__)

RELAY_MARK = "p2p-circuit"


def peer_id_of(pubkey: str) -> str | None:
    """The libp2p peer ID a device key names (``12D3Koo...``), or None if it is not one."""
    try:
        from libp2p.crypto.ed25519 import Ed25519PublicKey
        from libp2p.peer.id import ID

        from dag.keys import pubkey_from_text

        return str(ID.from_pubkey(Ed25519PublicKey.from_bytes(pubkey_from_text(pubkey))))
    except Exception:  # not an Ed25519 device key, or libp2p missing: no peer ID
        return None


def libp2p_connections(transport: Any) -> dict[str, str]:
    """peer ID -> ``"direct"`` or ``"relayed"`` for every live connection of a libp2p host."""
    host = getattr(transport, "host", None)
    if host is None:
        return {}
    out: dict[str, str] = {}
    try:
        network = host.get_network()
        for peer_id, connections in network.get_connections_map().items():
            kinds = set()
            for connection in connections:
                addresses = [str(a) for a in connection.get_transport_addresses()]
                kinds.add("relayed" if any(RELAY_MARK in a for a in addresses) else "direct")
            if kinds:
                out[str(peer_id)] = "direct" if "direct" in kinds else "relayed"
    except Exception as exc:  # a status view must never take the node down
        log.debug("cannot read libp2p connections: %s", exc)
    return out


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


def transport_status(transport: Any) -> dict[str, Any] | None:
    """The transport's own status report (reachability, relays ...), if it has one."""
    for attribute in ("status", "reachability"):
        member = getattr(transport, attribute, None)
        if member is None:
            continue
        try:
            value = member() if callable(member) else member
        except Exception as exc:
            log.debug("transport %s() failed: %s", attribute, exc)
            continue
        report = plain(value)
        return report if isinstance(report, dict) else {attribute: report}
    return None


__all__ = ["libp2p_connections", "peer_id_of", "plain", "transport_status"]
