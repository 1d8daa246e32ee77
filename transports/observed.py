"""Addresses peers say they see this node at (identify's ``observed_addr``), bounded and expiring.

Every identify answer carries the address the answering peer sees our connection come from.
A NAT shows up there: peers see the NAT's outside address, not ours. One peer's word is
cheap (keys cost nothing, and a peer may lie), so an address counts as *confirmed* only once
``min_observers`` distinct observers reported it, and observers are grouped by their own IP
(an IPv6 observer by its /56), so many keys on one machine count once. Reports expire: a
laptop that moved must not keep advertising the last network's address.

Who uses it:

* :mod:`transports.reachability` infers "private" when a relay reservation works and no
  peer has seen us at one of our own (non-loopback) addresses (:meth:`ObservedAddresses.seen_at`).
* The address advertiser takes :meth:`ObservedAddresses.confirmed` (scope filtering is its
  business: this table keeps what peers said, loopback included).

Fed by :func:`attach`, which hooks py-libp2p's identify handling (the host parses the
identify answer itself and hands the observation to its own observed-address manager; we
listen at that call, which runs only for direct connections: the host skips relayed ones).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import multiaddr
from libp2p.abc import IHost
from multiaddr.exceptions import Error as MultiaddrError

log = logging.getLogger(__name__)

MIN_OBSERVERS = 2  # distinct observer groups before an address counts as confirmed
OBSERVATION_TTL_S = 1800.0  # a report older than this is forgotten (networks change)
MAX_ADDRESSES = 32  # observed addresses kept; the least recently reported goes first
MAX_OBSERVERS_PER_ADDRESS = 16  # observer groups kept per address (only min_observers matter)
_TRANSPORTS = ("tcp", "udp")


@dataclass(frozen=True, slots=True)
class ObservedAddress:
    """One address peers reported, as :meth:`ObservedAddresses.snapshot` shows it."""

    address: str  # ``/ip4/<ip>/tcp/<port>`` (the "thin waist": IP and transport only)
    observers: int  # distinct observer groups whose report has not expired
    last_seen: float  # unix time of the newest report


def observer_group(ip: str) -> str:
    """The key observers are counted by: the IPv4 address, or an IPv6 address's /56."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network(f"{ip}/56", strict=False).network_address)
    return str(address)


def thin_waist(observed: str) -> str | None:
    """``/ip4|ip6/<ip>/tcp|udp/<port>`` of a reported address; None for anything else
    (circuit addresses, DNS names, garbage: a peer's report is not to be trusted)."""
    if "/p2p-circuit" in observed:
        return None
    try:
        address = multiaddr.Multiaddr(observed)
        names = [p.name for p in address.protocols()]
        if len(names) < 2 or names[0] not in ("ip4", "ip6") or names[1] not in _TRANSPORTS:
            return None
        ip = str(ipaddress.ip_address(address.value_for_protocol(names[0])))
        port = int(address.value_for_protocol(names[1]))
    except (ValueError, MultiaddrError):
        return None
    return f"/{names[0]}/{ip}/{names[1]}/{port}"


def address_ip(address: str) -> str | None:
    """The IP of an ``/ip4`` or ``/ip6`` multiaddr, normalised; None if it has none."""
    try:
        parsed = multiaddr.Multiaddr(address)
        for family in ("ip4", "ip6"):
            if family in [p.name for p in parsed.protocols()]:
                return str(ipaddress.ip_address(parsed.value_for_protocol(family)))
    except (ValueError, MultiaddrError):
        return None
    return None


class ObservedAddresses:
    """What peers report seeing us at: at most ``max_addresses`` addresses, each with at most
    :data:`MAX_OBSERVERS_PER_ADDRESS` observer groups, every report expiring after ``ttl_s``."""

    def __init__(
        self,
        *,
        min_observers: int = MIN_OBSERVERS,
        ttl_s: float = OBSERVATION_TTL_S,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.min_observers = min_observers
        self._ttl_s = ttl_s
        self._max_addresses = max_addresses
        self._clock = clock
        self._seen: dict[str, dict[str, float]] = {}  # address -> observer group -> last report
        self.reports = 0  # reports accepted since start (a counter, not a history)

    def record(self, observed: str, *, observer_ip: str | None, observer: str = "") -> bool:
        """One peer's report; False if it was not an address we keep. ``observer_ip`` is
        where the report came from (grouped), ``observer`` (the peer ID) stands in without it."""
        address = thin_waist(observed)
        group = observer_group(observer_ip) if observer_ip else observer
        if address is None or not group:
            return False
        now = self._clock()
        self._expire(now)
        observers = self._seen.get(address)
        if observers is None:
            if len(self._seen) >= self._max_addresses:
                oldest = min(self._seen, key=lambda a: max(self._seen[a].values()))
                del self._seen[oldest]
            observers = self._seen[address] = {}
        if group not in observers and len(observers) >= MAX_OBSERVERS_PER_ADDRESS:
            del observers[min(observers, key=observers.__getitem__)]
        observers[group] = now
        self.reports += 1
        return True

    def _expire(self, now: float) -> None:
        for address in list(self._seen):
            observers = {g: t for g, t in self._seen[address].items() if now - t < self._ttl_s}
            if observers:
                self._seen[address] = observers
            else:
                del self._seen[address]

    def snapshot(self) -> tuple[ObservedAddress, ...]:
        """Every unexpired address, most observers first."""
        self._expire(self._clock())
        rows = [ObservedAddress(a, len(o), max(o.values())) for a, o in self._seen.items()]
        return tuple(sorted(rows, key=lambda r: (-r.observers, -r.last_seen)))

    def confirmed(self, min_observers: int | None = None) -> list[str]:
        """Addresses at least ``min_observers`` (default: the table's) observer groups reported."""
        needed = self.min_observers if min_observers is None else min_observers
        return [r.address for r in self.snapshot() if r.observers >= needed]

    def seen_at(self, own_addresses: list[str]) -> list[str]:
        """Reported addresses whose IP is one of ours and not loopback: peers reach us
        without a NAT in between (one report is enough: it only withholds "private")."""
        own = {ip for a in own_addresses if (ip := address_ip(a)) is not None}
        return [
            r.address
            for r in self.snapshot()
            if (ip := address_ip(r.address)) in own and ip is not None and not ipaddress.ip_address(ip).is_loopback
        ]


def _remote_ip(connection: Any) -> str | None:
    """The IP a swarm connection's other end has, if the connection layer knows it."""
    muxed = getattr(connection, "muxed_conn", None)
    get_remote = getattr(muxed, "get_remote_address", None)
    try:
        remote = get_remote() if callable(get_remote) else None
    except OSError:  # the socket is already gone
        return None
    return str(remote[0]) if isinstance(remote, tuple) and remote else None


def attach(host: IHost, table: ObservedAddresses) -> bool:
    """Feed ``table`` from every identify answer ``host`` reads; False if the host keeps no
    observed addresses (built with ``disable_identify_address_discovery``).

    py-libp2p 0.8.1 passes each direct connection's ``observed_addr`` to its manager's
    ``record_observation(conn, observed, local_addrs)``; we see it first, then let the
    manager have it as before (it feeds the host's own ``get_addrs``).
    """
    manager = getattr(host, "_observed_addr_manager", None)
    original = getattr(manager, "record_observation", None)
    if manager is None or not callable(original):
        return False

    def record_observation(connection: Any, observed: Any, local_addrs: Any) -> Any:
        peer = getattr(getattr(connection, "muxed_conn", None), "peer_id", None)
        table.record(str(observed), observer_ip=_remote_ip(connection), observer=str(peer or ""))
        return original(connection, observed, local_addrs)

    manager.record_observation = record_observation
    return True


__all__ = [
    "MIN_OBSERVERS",
    "ObservedAddress",
    "ObservedAddresses",
    "address_ip",
    "attach",
    "observer_group",
    "thin_waist",
]
