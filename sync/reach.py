"""Whom the engine may dial, and at which addresses: the rule that keeps a node from being aimed.

A peer's announced addresses are its own claims. The engine dials only peers the local
side chose (it connected to them, joined from them, registered or related them, or an
admin named their key in a database's settings); a peer that only read from us is a
*served* relationship, reached only over a connection it holds open to us.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from dag import Instance

from .errors import SyncError
from .state import Relationship, SyncState
from .transport import Address, LiveConnections, Transport

log = logging.getLogger(__name__)


class Reach:
    """Addresses for exchanges; the transports (by name) are the engine's, read here."""

    def __init__(self, instance: Instance, state: SyncState, transports: Mapping[str, Transport]) -> None:
        self._instance = instance
        self._state = state
        self._transports = transports
        self.peers_by_address: dict[Address, str] = {}  # where a handshake in this run met a peer

    def dialled(self, relation: Relationship) -> bool:
        """Whether the engine initiates exchanges for this relationship.

        Yes for one the local side made (connect, join, register, relate). A served one (the
        peer read from us) only once an admin named the peer's key in that database's
        settings (say, by approving its access request): that is the local side's choice too.
        """
        if not relation.served:
            return True
        try:
            grant = self._instance.open_database(relation.db).settings().auth().keys.get(relation.peer)
            return grant is not None and grant.active  # named by an admin; a global grant names no one
        except Exception:  # unreadable settings (any dag error, a missing store): no reason to dial
            log.debug("settings of %s unreadable; %s is not dialled", relation.db, relation.peer)
            return False

    def live_addresses(self, peer: str) -> list[Address]:
        """Addresses that reach ``peer`` over a connection it holds open to us (no dial)."""
        found = []
        for name, transport in self._transports.items():
            if isinstance(transport, LiveConnections):
                address = transport.live_address(peer)
                if address is not None:
                    found.append(Address(name, address))
        return found

    def reachable(self, relation: Relationship) -> bool:
        """Whether a push to the relationship's peer can go anywhere now."""
        return self.dialled(relation) or bool(self.live_addresses(relation.peer))

    def addresses_for(self, peer: str, relation: Relationship | None) -> list[Address] | SyncError:
        """Where an exchange with ``peer`` may go, or why it must not be dialled at all."""
        if relation is not None and not self.dialled(relation):
            # A peer that only read from us: its addresses are its own claims, so they are
            # never dialled (that would let anyone aim this node at any host). Only a
            # connection it holds open to us carries the exchange; else it syncs itself.
            live = self.live_addresses(peer)
            if not live:
                return SyncError(
                    f"peer {peer} only reads {relation.db} from this node and holds no connection to it;"
                    " it is not dialled (it syncs itself)"
                )
            return live
        record = self._state.peer(peer)
        addresses = list(record.addresses) if record else []
        addresses += [a for a, key in self.peers_by_address.items() if key == peer and a not in addresses]
        return [a for a in addresses if a.transport in self._transports]


__all__ = ["Reach"]
