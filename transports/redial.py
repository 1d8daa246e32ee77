"""Reopening relayed connections this node dialled, after they drop.

A node that reached a peer through its relay keeps that connection open, and it is the
peer's only way back to us: a peer behind NAT cannot dial us, and the sync engine never
dials a node that only reads from it (``sync/reach.py``), so its writes reach us over the
connection we hold. A relay that restarts resets every circuit, and nothing would open a
new one before our next periodic sync (minutes). When a relayed connection we dialled
drops together with our connection to its relay (an outage, not a circuit the relay cut
at a limit or the peer closed), :class:`CircuitKeeper` redials the circuit address that
worked, every ``FAST_S`` for the first ``FAST_FOR_S`` of an outage
(a restarting relay is back within seconds), then every ``SLOW_S``, and gives up after
``KEEP_S`` (the peer itself may be gone). It keeps at most ``MAX_KEPT`` peers.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID as PeerID

from .circuits import CircuitMeters, split_circuit_address
from .errors import RelayError
from .libp2p_status import peer_connection
from .relay import dial_through_relay

log = logging.getLogger(__name__)

WATCH_S = 0.25  # how often lost connections are looked for
FAST_S = 0.5  # redial interval early in an outage
FAST_FOR_S = 15.0
SLOW_S = 2.0  # redial interval after that
KEEP_S = 60.0  # an outage this long: the peer is forgotten (the engine's next sync dials again)
REDIAL_TIMEOUT_S = 3.0  # one redial (a relay that does not answer)
MAX_KEPT = 64  # peers whose circuits are kept; the oldest is dropped past this


class CircuitKeeper:
    """Keeps the relayed connections this node dialled open across drops (see the module docstring)."""

    def __init__(self, host: IHost, dial_locks: dict[PeerID, trio.Lock], meters: CircuitMeters | None = None) -> None:
        self._host = host
        self._dial_locks = dial_locks  # the transport's: one dial per peer at a time
        self._meters = meters  # the transport's: a reopened circuit's limit is tracked like any
        self._circuits: OrderedDict[PeerID, multiaddr.Multiaddr] = OrderedDict()
        self._lost: dict[PeerID, tuple[float, float]] = {}  # peer -> (lost at, next redial at)

    def dialled(self, peer: PeerID, address: multiaddr.Multiaddr) -> None:
        """We opened a relayed connection to ``peer`` at ``address``: keep it."""
        self._circuits.pop(peer, None)
        self._circuits[peer] = address
        self._lost.pop(peer, None)
        while len(self._circuits) > MAX_KEPT:
            oldest, _ = self._circuits.popitem(last=False)
            self._lost.pop(oldest, None)

    async def run(self) -> None:
        while True:
            await trio.sleep(WATCH_S)
            for peer, address in list(self._circuits.items()):
                await self._check(peer, address)

    async def _check(self, peer: PeerID, address: multiaddr.Multiaddr) -> None:
        now = trio.current_time()
        if peer_connection(self._host, peer) is not None:
            self._lost.pop(peer, None)
            return
        lost_at, due = self._lost.get(peer, (now, now))
        if peer not in self._lost:
            if peer_connection(self._host, split_circuit_address(address)[0].peer_id) is not None:
                # The relay is still there: it cut the circuit (a limit) or the peer closed it.
                # Not an outage; the engine dials again when it needs the peer.
                self._circuits.pop(peer, None)
                return
            log.info("the relayed connection to %s dropped with its relay: redialling %s", peer, address)
        if now - lost_at > KEEP_S:
            log.info("%s unreachable through %s for %g s: no longer redialled", peer, address, KEEP_S)
            self._circuits.pop(peer, None)
            self._lost.pop(peer, None)
            return
        self._lost[peer] = (lost_at, due)
        if now < due:
            return
        interval = FAST_S if now - lost_at < FAST_FOR_S else SLOW_S
        self._lost[peer] = (lost_at, now + interval)
        error: Any = None
        with trio.move_on_after(REDIAL_TIMEOUT_S) as scope:
            try:
                async with self._dial_locks.setdefault(peer, trio.Lock()):
                    if peer_connection(self._host, peer) is None:
                        await dial_through_relay(self._host, address, self._meters)
            except RelayError as exc:  # the relay is not back yet, or the peer has no reservation
                error = exc
        if error is None and not scope.cancelled_caught:
            log.info("relayed connection to %s open again (%.1f s after it dropped)", peer, now - lost_at)
            self._lost.pop(peer, None)
