"""What a libp2p host's tables say about its peers, and the libp2p transport's status snapshot.

Only the transports know py-libp2p: the node asks :meth:`Libp2pTransport.status
<transports.libp2p.Libp2pTransport.status>` and gets these dataclasses, never the host.
A peer counts as connected while one of its connections is open; it is reached
*directly* if any of them is direct, else *relayed* (a direct connection that hole
punching made stands beside the relayed one until the relay's grace period ends).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from libp2p.abc import IHost
from libp2p.peer.id import ID as PeerID
from multiaddr.exceptions import Error as MultiaddrError

from dag.keys import pubkey_to_text
from sync.transport import ConnectionKind, PeerConnection

from .circuits import is_relayed, split_circuit_address
from .holepunch import HolePunchResult, RunningPunch
from .observed import ObservedAddress
from .reachability import DialbackOutcome, Reachability, Source
from .relay import RelayService, ReservationStatus


@dataclass(frozen=True, slots=True)
class RelayServiceStatus:
    """The relay this node offers (``relay_service=True``)."""

    reservations: dict[str, float]  # peer ID -> expiry (unix time)
    active_circuits: int
    circuits_opened: int
    circuits_cut: int  # reset by the relay at a data or duration limit


def relay_service_status(service: RelayService | None) -> RelayServiceStatus | None:
    """What the relay this node offers holds now (None when it offers none)."""
    if service is None:
        return None
    return RelayServiceStatus(
        service.reservations(), service.active_circuits(), service.circuits_opened, service.circuits_cut
    )


@dataclass(frozen=True, slots=True)
class Libp2pStatus:
    """A snapshot of the transport's view of the network (see ``Libp2pTransport.status``)."""

    peer_id: str
    serving: bool
    reachability: Reachability
    reachability_checked_by: str | None  # the peer whose dial-back decided it (inference: the relay)
    reachability_source: Source | None  # "dialback", "autonat" or "inference"; None while unknown
    reachability_sources: tuple[DialbackOutcome, ...]  # the latest verdict of each source
    reachability_checks: int  # checks made since start (they back off while nobody can answer)
    observed_addresses: tuple[ObservedAddress, ...]  # where peers (identify) see this node
    listen_addresses: tuple[str, ...]
    reservations: tuple[ReservationStatus, ...]
    peers: tuple[PeerConnection, ...]
    hole_punches: tuple[HolePunchResult, ...]  # the latest attempt per peer
    relay_service: RelayServiceStatus | None
    dialbacks: tuple[DialbackOutcome, ...]  # what this node found dialling others back
    hole_punches_running: tuple[RunningPunch, ...] = ()  # attempts under way
    hole_punch_history: tuple[HolePunchResult, ...] = ()  # the last attempts, oldest first (bounded)


def peer_pubkey(peer: PeerID) -> str | None:
    """The device key (``ed25519:...``) a peer ID names, when it names an Ed25519 key.

    py-libp2p's ``extract_public_key`` already answers None for a hashed (non-inline) key.
    """
    key = peer.extract_public_key()
    return pubkey_to_text(key.to_bytes()) if key is not None else None


def _relay_of(connection: Any) -> str | None:
    """The relay's peer ID of a relayed connection, if its address says (it names the circuit)."""
    addresses = connection.get_transport_addresses()
    if not addresses:
        return None
    try:
        return str(split_circuit_address(addresses[0])[0].peer_id)
    except (ValueError, MultiaddrError):  # an address without the relay's /p2p/<ID>
        return None


def peer_connection(host: IHost, peer: PeerID) -> PeerConnection | None:
    """How ``host`` is connected to ``peer`` right now; None if no connection is open."""
    network: Any = host.get_network()
    connections = [c for c in network.get_connections(peer) if not c.is_closed]
    if not connections:
        return None
    relayed = [c for c in connections if is_relayed(c)]
    all_relayed = len(relayed) == len(connections)
    kind: ConnectionKind = "relayed" if all_relayed else "direct"
    relay = _relay_of(relayed[0]) if all_relayed else None
    return PeerConnection(str(peer), peer_pubkey(peer), kind, relay, len(connections))


def connected_peers(host: IHost) -> list[PeerID]:
    """Every peer ``host`` has a connection entry for (some may be closing)."""
    network: Any = host.get_network()
    return list(network.connections)


def peer_connections(host: IHost) -> tuple[PeerConnection, ...]:
    """How each connected peer is reached."""
    return tuple(c for peer in connected_peers(host) if (c := peer_connection(host, peer)) is not None)


def directly_connected(host: IHost, peer: PeerID) -> bool:
    """Whether an open connection to ``peer`` runs without a relay."""
    network: Any = host.get_network()
    return any(not c.is_closed and not is_relayed(c) for c in network.get_connections(peer))


__all__ = [
    "Libp2pStatus",
    "RelayServiceStatus",
    "relay_service_status",
    "connected_peers",
    "directly_connected",
    "peer_connection",
    "peer_connections",
    "peer_pubkey",
]
