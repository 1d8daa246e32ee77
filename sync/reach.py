"""Whom the engine may dial, and at which addresses: the rule that keeps a node from being aimed.

A peer's announced addresses are its own claims. The engine dials only peers the local
side chose (it connected to them, joined from them, registered or related them, or an
admin named their key in a database's settings); a peer that only read from us is a
*served* relationship, reached only over a connection it holds open to us.

Addresses go stale: a peer's Docker bridge goes away, its DHCP lease changes, a relay
moves. So the stored list is refreshed from every handshake, ours or the peer's (the
address that answered, then what the peer announces now, then the known ones it no longer
announces); an address that failed within ``RETRY_FAILING_MS`` is tried after the others
(so a stale one costs a dial every few minutes, not every exchange); and an address is
dropped from the record once it has failed ``DROP_AFTER_FAILURES`` times in a row over at
least ``DROP_AFTER_MS`` *and* there is a reason to think it is the address, not the peer:
another address of that peer worked since, or the peer's latest handshake left it out.
Failure counts live in memory only (bounded, ``MAX_TRACKED_FAILURES``): a failed dial
writes nothing; the peer's record is written only when its list really changes.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from dag import Instance

from .errors import SyncError
from .state import MAX_PEER_ADDRESSES, Relationship, SyncState
from .transport import Address, LiveConnections, Transport

log = logging.getLogger(__name__)

# Three failed dials in a row over eight minutes (tried again at most every four): a peer
# that restarts, or a network that blinks for a minute, loses no address; an address that
# moved, or a bridge that is gone, goes.
DROP_AFTER_FAILURES = 3
DROP_AFTER_MS = 8 * 60 * 1000
RETRY_FAILING_MS = 4 * 60 * 1000
# (peer, address) failure streaks held in memory, least recently failed out first: each
# is ~200 bytes, and only addresses of peers this node dials (its own choice) get one.
MAX_TRACKED_FAILURES = 4_096


@dataclass(slots=True)
class _Streak:
    """Consecutive failures of one address of one peer, since when."""

    count: int
    since_ms: int
    last_ms: int


def _wall_ms() -> int:
    return int(time.time() * 1000)


class Reach:
    """Addresses for exchanges; the transports (by name) are the engine's, read here."""

    def __init__(
        self,
        instance: Instance,
        state: SyncState,
        transports: Mapping[str, Transport],
        *,
        now_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self._instance = instance
        self._state = state
        self._transports = transports
        self._now_ms = now_ms
        self.peers_by_address: dict[Address, str] = {}  # where a handshake in this run met a peer
        self._failures: OrderedDict[tuple[str, Address], _Streak] = OrderedDict()

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
        usable = [a for a in addresses if a.transport in self._transports]
        return sorted(usable, key=lambda a: self._failed_lately(peer, a))  # stable: stored order otherwise

    # ---- keeping the stored list current --------------------------------------------

    def _failed_lately(self, peer: str, address: Address) -> bool:
        """Whether ``address`` failed within ``RETRY_FAILING_MS``: then it is tried last."""
        streak = self._failures.get((peer, address))
        return streak is not None and self._now_ms() - streak.last_ms < RETRY_FAILING_MS

    def _due(self, peer: str, address: Address) -> bool:
        """Whether ``address`` has failed often and long enough to be dropped, given a reason."""
        streak = self._failures.get((peer, address))
        return (
            streak is not None
            and streak.count >= DROP_AFTER_FAILURES
            and self._now_ms() - streak.since_ms >= DROP_AFTER_MS
        )

    def failed(self, peer: str, address: Address) -> None:
        """An exchange could not use ``address`` (a transport failure): one more in its streak."""
        key, now = (peer, address), self._now_ms()
        streak = self._failures.pop(key, None) or _Streak(0, now, now)
        streak.count += 1
        streak.last_ms = now
        self._failures[key] = streak
        while len(self._failures) > MAX_TRACKED_FAILURES:
            self._failures.popitem(last=False)

    def connected_over(self, peer: str) -> set[str]:
        """The transports holding a connection to ``peer`` now: over those, any address of the
        peer "works" (the connection is reused whatever the address names), so an exchange
        there says nothing about the address it was asked for."""
        return {a.transport for a in self.live_addresses(peer)}

    def worked(self, peer: str, address: Address, *, dialled: bool = True) -> None:
        """``address`` carried an exchange: if it was really ``dialled``, its streak ends; and
        the peer's addresses that are due are dropped (the peer answering is the reason to
        think that they, not the peer, are gone)."""
        if dialled:
            self._failures.pop((peer, address), None)
        if not self._failures:  # the usual case: nothing is failing, nothing to read
            return
        record = self._state.peer(peer)
        if record is None:
            return
        kept = [a for a in record.addresses if a == address or not self._due(peer, a)]
        if len(kept) != len(record.addresses):
            self._write(peer, kept, dropped=[a for a in record.addresses if a not in kept])

    def refreshed(self, peer: str, reached: Address | None, announced: Sequence[Address]) -> list[Address]:
        """The peer's address list after a handshake in which it announced ``announced``
        (``reached``: where we dialled it; None when it came to us): those first, then known
        addresses it left out unless they are due (its leaving them out is the reason). At
        most ``MAX_PEER_ADDRESSES``."""
        if reached is not None:
            self._failures.pop((peer, reached), None)
        record = self._state.peer(peer)
        fresh = list(dict.fromkeys([*([reached] if reached is not None else []), *announced]))
        old = [a for a in (record.addresses if record else ()) if a not in fresh]
        dropped = [a for a in old if self._due(peer, a)]
        if dropped:
            log.info("peer %s: dropping %s (failing, and no longer announced)", peer, ", ".join(map(str, dropped)))
        for address in dropped:
            self._failures.pop((peer, address), None)
        return (fresh + [a for a in old if a not in dropped])[:MAX_PEER_ADDRESSES]

    def _write(self, peer: str, addresses: list[Address], *, dropped: list[Address]) -> None:
        log.info(
            "peer %s: dropping %s (failed %d times in a row over %d min while another address works)",
            peer,
            ", ".join(map(str, dropped)),
            DROP_AFTER_FAILURES,
            DROP_AFTER_MS // 60_000,
        )
        for address in dropped:
            self._failures.pop((peer, address), None)
        self._state.upsert_peer(peer, addresses=addresses, replace_addresses=True)


__all__ = ["Reach"]
