"""Everything the libp2p transport does about reachability, in one piece: it answers others
(our dial-back, AutoNAT v1), watches what peers tell it (observed addresses, fresh inbound
connections), and keeps its own verdict (:class:`~transports.reachability.ReachabilityMonitor`).

The transport hands it the few things only it knows (whom to ask, its addresses, its
reservations); see :mod:`transports.reachability` for how the verdict is reached.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from libp2p.abc import IHost
from libp2p.peer.id import ID as PeerID
from libp2p.utils.address_validation import expand_wildcard_address

from .autonat import AutoNATServer, InboundWatch, ask_autonat
from .circuits import is_circuit_address
from .libp2p_status import connected_peers, directly_connected
from .observed import ObservedAddresses, attach
from .reachability import RECHECK_S, DialbackOutcome, DialbackServer, ReachabilityMonitor, dialback_outcome
from .relay import RelayClient

SERVICES = ("dialback", "autonat")


class ReachabilityService:
    """The servers, the watchers and the monitor of one host.

    Args:
        host: the node's host.
        fresh_host: makes a throwaway host with a new key (every dial-back uses one).
        relay_client: the node's reservations (asked first; the inference needs a working one).
        own_addresses: the direct addresses we advertise (sent in requests).
        serving: whether the node is listening (nothing is local before).
        recheck_s: how often the monitor checks again once a verdict stands.
        services: which of :data:`SERVICES` this node answers for others.
    """

    def __init__(
        self,
        host: IHost,
        fresh_host: Callable[[], IHost],
        relay_client: RelayClient | None,
        *,
        own_addresses: Callable[[], list[str]],
        serving: Callable[[], bool],
        recheck_s: float = RECHECK_S,
        services: Collection[str] = SERVICES,
    ) -> None:
        unknown = set(services) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown reachability services {sorted(unknown)}; known: {', '.join(SERVICES)}")
        self._host = host
        self._serving = serving
        self._relay_client = relay_client
        self._services = frozenset(services)
        self.observed = ObservedAddresses()
        attach(host, self.observed)  # identify's observed_addr of every direct connection
        self.dialback = DialbackServer(host, fresh_host)
        self._autonat = AutoNATServer(host, self.dialback)
        self._inbound = InboundWatch()  # AutoNAT's "OK" counts only with a fresh inbound connection
        self._inbound.attach(host)
        self.monitor = ReachabilityMonitor(
            candidates=self._candidates,
            own_addresses=own_addresses,
            askers=(
                ("dialback", lambda peer, addrs: dialback_outcome(host, peer, addrs)),
                ("autonat", lambda peer, addrs: ask_autonat(host, peer, addrs, self._inbound)),
            ),
            observed=self.observed,
            reserved=self._reserved,
            local_addresses=self._local_addresses,
            recheck_s=recheck_s,
        )

    def start(self) -> None:
        """Answer the configured protocols (while the node listens)."""
        if "dialback" in self._services:
            self.dialback.start()
        if "autonat" in self._services:
            self._autonat.start()

    def stop(self) -> None:
        self.dialback.stop()
        self._autonat.stop()

    def verdict_sources(self) -> tuple[DialbackOutcome, ...]:
        return tuple(self.monitor.verdicts.values())

    def status_fields(self) -> dict[str, Any]:
        """The reachability part of ``Libp2pStatus``: the verdict, where it came from, what
        peers observed, and what this node found when it dialled others back."""
        last = self.monitor.last
        return {
            "reachability": self.monitor.reachability,
            "reachability_checked_by": last.peer if last else None,
            "reachability_source": last.source if last else None,
            "reachability_sources": self.verdict_sources(),
            "reachability_checks": self.monitor.attempts,
            "observed_addresses": self.observed.snapshot(),
            "dialbacks": tuple(self.dialback.outcomes.values()),
        }

    def _candidates(self) -> list[PeerID]:
        """Peers to ask: our relays, then anyone we hold a direct connection to."""
        relays = self._relay_client.relay_peers if self._relay_client is not None else set()
        ordered = [p for p in relays if directly_connected(self._host, p)]
        ordered += [p for p in connected_peers(self._host) if p not in relays and directly_connected(self._host, p)]
        return ordered

    def _reserved(self) -> list[str]:
        states = self._relay_client.status() if self._relay_client is not None else ()
        return [r.relay for r in states if r.state == "reserved"]

    def _local_addresses(self) -> list[str]:
        """What our listeners hold, wildcards expanded (what we advertise may include what
        peers observed, which says nothing about a NAT in between)."""
        if not self._serving():
            return []
        host: Any = self._host
        local: list[str] = []
        for address in host.get_transport_addrs():
            local += [str(a) for a in expand_wildcard_address(address) if not is_circuit_address(a)]
        return local


__all__ = ["SERVICES", "ReachabilityService"]
