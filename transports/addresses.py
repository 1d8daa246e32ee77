"""Which of a node's addresses a peer can dial, so which ones it advertises.

A node listening on ``0.0.0.0`` is reachable, in principle, at every address of every
interface. In practice some of them reach nobody else: loopback and link-local addresses
mean "this machine" and "this link" to whoever dials them (a peer that dials our
``127.0.0.1`` reaches *itself*), and the addresses of container and VM bridges
(``docker0``'s ``172.17.0.1``, a compose network's ``br-1a2b3c4d5e6f``, libvirt's
``virbr0``) are private to this host, exist only while their bridge does, and on another
machine name some other host of that machine's own bridge. Peers store what we advertise
and dial it for as long as they keep it, so an address that only works here costs them a
failed dial (or a Noise handshake with a stranger) every time.

The rule (:func:`advertise`), in order:

1. Announced addresses (``--announce``) first, exactly as given: the operator knows what
   the machine cannot see (a forwarded port, a DNS name, an address on a bridge that
   really is the way in).
2. Listen addresses, wildcards expanded over the machine's interfaces (``0.0.0.0`` to
   each IPv4 address, ``::`` to each IPv6 one), each kept only if it is in scope:
   not loopback, not link-local, not unspecified, and not on a bridge interface.
3. Observed addresses (where peers say they see us, confirmed by at least two observer
   groups: :mod:`transports.observed`), in scope by the same rule: behind a NAT these are
   the NAT's outside address, after the listen addresses (a peer on our LAN wants those).
4. If none of those gave anything: the loopback addresses (a node that listens on ``127.0.0.1``
   only, as in tests, is reachable there and nowhere else); failing that, the listen
   addresses as they are, since the operator chose them.

A peer on this same machine loses nothing by 2: it reaches the machine's other addresses
as well as loopback.

A bridge interface is recognised by its name (:data:`BRIDGE_PATTERNS`), the only mark a
bridge leaves that works without privileges: Docker's ``docker0`` and ``br-`` followed by
12 hex digits (a user-defined network; a hand-made ``br-lan`` or ``br0`` is a real LAN
and stays), the container ends ``veth*``, CNI's ``cni*``, Podman's ``podman*``,
libvirt's ``virbr*``, LXC/LXD/Incus ``lxcbr*``/``lxdbr*``/``incusbr*``, Kubernetes
overlays (``cali*``, ``flannel*``, ``cilium_*``, ``kube-bridge``, ``weave``) and VirtualBox
and VMware host-only nets (``vboxnet*``, ``vmnet*``). Inside a container the container's own
interface is ``eth0``, so a node in a container still advertises its address on the
container network.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import multiaddr
import psutil  # type: ignore[import-untyped]  # no stubs; one call, typed through Interface
from multiaddr.exceptions import Error as MultiaddrError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Scope = Literal["global", "loopback", "link-local", "unspecified", "bridge"]

BRIDGE_PATTERNS = re.compile(
    r"^(docker\d*|br-[0-9a-f]{12}|veth.*|cni.*|podman.*|virbr.*|lxcbr.*|lxdbr.*|incusbr.*"
    r"|cali.*|flannel.*|cilium_.*|kube-bridge|weave|vboxnet.*|vmnet.*)$"
)
MAX_INTERFACE_ADDRESSES = 256  # a machine with more is not advertised past it (identify, tickets)


class AnnounceError(ValueError):
    """An announce address that names another peer (dialers would reach someone else)."""


@dataclass(frozen=True, slots=True)
class Interface:
    """One address of one interface."""

    name: str
    address: IPAddress


def is_bridge_interface(name: str) -> bool:
    return BRIDGE_PATTERNS.match(name) is not None


def interfaces() -> list[Interface]:
    """This machine's interface addresses, every one of each interface (secondary ones too).

    Read afresh on every call (0.1-0.7 ms here): a bridge that goes away must leave what is
    advertised at once, not when a cache expires. ``psutil`` is what py-libp2p's own
    wildcard expansion reads (through ``multiaddr``), so it is there wherever libp2p is.
    """
    found: list[Interface] = []
    for name, entries in psutil.net_if_addrs().items():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    found.append(Interface(str(name), ipaddress.ip_address(str(entry.address).split("%")[0])))
                except ValueError:  # not an address we understand: nothing to advertise
                    continue
    return found[:MAX_INTERFACE_ADDRESSES]


def scope_of(address: IPAddress, bridges: set[IPAddress]) -> Scope:
    """Where ``address`` means what it means here (only ``global``, which includes private LAN
    ranges, means the same to a peer elsewhere)."""
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address in bridges:
        return "bridge"
    return "global"


def ip_of(address: multiaddr.Multiaddr) -> IPAddress | None:
    """The ``/ip4`` or ``/ip6`` host of a multiaddr; None for ``/dns...`` and the like."""
    for protocol in ("ip4", "ip6"):
        try:
            return ipaddress.ip_address(address.value_for_protocol(protocol))
        except (MultiaddrError, ValueError):  # no such part
            continue
    return None


def _expand(address: multiaddr.Multiaddr, found: Sequence[Interface]) -> list[multiaddr.Multiaddr]:
    """A wildcard listen address as one address per interface address of its family."""
    host = ip_of(address)
    if host is None or not host.is_unspecified:
        return [address]
    family = f"ip{host.version}"
    prefix = f"/{family}/{address.value_for_protocol(family)}"
    text = str(address)
    if not text.startswith(prefix):  # the wildcard is not the first part: nothing to expand
        return [address]
    tail = text[len(prefix) :]
    return [multiaddr.Multiaddr(f"/{family}/{i.address}{tail}") for i in found if i.address.version == host.version]


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and the members of exception groups (bounded)."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 32:
        current = todo.pop(0)
        if current in seen:
            continue
        seen.append(current)
        todo += list(getattr(current, "exceptions", ())) + [e for e in (current.__cause__, current.__context__) if e]
    return seen


def dial_failure(exc: BaseException) -> str:
    """What went wrong dialling an address, in the words a user needs: py-libp2p wraps the
    cause in three or four layers ("SwarmException: fail to open connection"), and which
    one it was (refused, nobody there, a stranger answering) is what says whether the
    address is stale."""
    chain = _chain(exc)
    for error in chain:
        name = type(error).__name__
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        if "Mismatch" in name:  # PeerIDMismatchesPubkey: a node lives there, not that one
            return "another node answers at this address (peer ID mismatch)"
        if isinstance(error, TimeoutError) or name == "TooSlowError":
            return "no answer (timed out)"
        if "msg_bytes" in str(error):  # multistream-select read something else (an HTTP server, a proxy)
            return "something that is not a libp2p node answers at this address"
        if isinstance(error, OSError) and error.errno is not None:
            return error.strerror or str(error)
    innermost = chain[-1]
    return f"{type(exc).__name__}: {' '.join(str(innermost).split())[:300]}"


def advertise(
    listen: Iterable[multiaddr.Multiaddr],
    found: Sequence[Interface],
    announce: Sequence[multiaddr.Multiaddr] = (),
    observed: Sequence[multiaddr.Multiaddr] = (),
) -> list[multiaddr.Multiaddr]:
    """What to tell peers, by the rule in the module docstring: a pure function of the
    listen addresses, the machine's interface addresses, the announced addresses and the
    observed ones (confirmed by peers; in scope, after the listen addresses)."""
    bridges = {i.address for i in found if is_bridge_interface(i.name)}
    concrete: list[multiaddr.Multiaddr] = []
    for address in listen:
        concrete += [a for a in _expand(address, found) if a not in concrete]
    out = list(dict.fromkeys(announce))
    scopes = [(a, scope_of(host, bridges) if (host := ip_of(a)) is not None else "global") for a in concrete]
    out += [a for a, scope in scopes if scope == "global" and a not in out]
    seen = [a for a in observed if (host := ip_of(a)) is not None and scope_of(host, bridges) == "global"]
    out += [a for a in seen if a not in out]
    if out:
        return out
    loopback = [a for a, scope in scopes if scope == "loopback"]
    return loopback or concrete


def own_address(address: multiaddr.Multiaddr, own_id: str) -> multiaddr.Multiaddr:
    """``address`` ending in ``/p2p/<own_id>`` (added if it names no peer at its end);
    ``AnnounceError`` if it ends naming another peer, which would send dialers elsewhere."""
    names = [p.name for p in address.protocols()]
    if names and names[-1] == "p2p":
        named = str(address).rsplit("/p2p/", 1)[1]
        if named != own_id:
            raise AnnounceError(f"announce address {address} names peer {named}, not this node ({own_id})")
        return address
    return address.encapsulate(multiaddr.Multiaddr(f"/p2p/{own_id}"))


class Advertiser:
    """One libp2p host's addresses for peers: its ``addrs_factory`` (identify, reservations,
    ``get_addrs``) and the order of the transport's ``listen_addresses`` (tickets, handshakes).

    ``announce`` is kept exactly as given, with ``/p2p/<own_id>`` added where missing. A
    ``/p2p-circuit`` one is left out of the factory: py-libp2p's ``get_addrs`` cuts every
    address at its first ``/p2p/``, which would turn a circuit into the relay's own address.
    """

    def __init__(self, announce: Sequence[str], own_id: str) -> None:
        self.announced = [own_address(multiaddr.Multiaddr(a), own_id) for a in announce]
        self._identified = [a for a in self.announced if "p2p-circuit" not in [p.name for p in a.protocols()]]
        self._listening: Callable[[], list[multiaddr.Multiaddr]] | None = None
        self._observed: Callable[[], list[str]] = list

    def attach(self, listening: Callable[[], list[multiaddr.Multiaddr]], observed: Callable[[], list[str]]) -> None:
        """Where the listeners' own addresses and the confirmed observed ones come from, once
        the host and its observed-address table exist (the host calls the factory earlier)."""
        self._listening, self._observed = listening, observed

    def __call__(self, candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        """The factory. It reads the listeners, not ``candidates``: those also hold py-libp2p's
        own pick of observed addresses, which takes any peer's word for them."""
        listening = self._listening() if self._listening is not None else candidates
        observed = [multiaddr.Multiaddr(a) for a in self._observed()]
        return advertise(listening, interfaces(), self._identified, observed)

    def ordered(self, direct: Sequence[str], circuits: Sequence[str], *, circuits_first: bool) -> list[str]:
        """Announced addresses, then direct ones and circuits in the order the transport's
        reachability asks for (the engine tries a peer's addresses in order)."""
        announced = [str(a) for a in self.announced]
        rest = [*circuits, *direct] if circuits_first else [*direct, *circuits]
        return announced + [a for a in dict.fromkeys(rest) if a not in announced]


__all__ = [
    "BRIDGE_PATTERNS",
    "AnnounceError",
    "dial_failure",
    "Interface",
    "advertise",
    "interfaces",
    "ip_of",
    "is_bridge_interface",
    "scope_of",
]
