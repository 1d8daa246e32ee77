"""Turning a wildcard HTTP bind address into addresses a peer can dial.

A node listening on ``0.0.0.0`` is reachable at each of its interfaces' addresses, but
the wildcard itself means nothing to a peer: a ticket must carry the real ones. The HTTP
transport advertises what it is told, so the node tells it these; the libp2p transport
expands its own multiaddrs (``transports.libp2p.advertised_addresses``).
"""

from __future__ import annotations

WILDCARD_V4 = "0.0.0.0"


def local_ipv4_addresses() -> list[str]:
    """This host's IPv4 addresses a peer elsewhere can use, by the libp2p transport's scope
    rule (no loopback, link-local or container-bridge addresses; loopback when there is
    nothing else: :mod:`transports.addresses`); ``["127.0.0.1"]`` if none can be read."""
    import multiaddr

    from transports.addresses import advertise, interfaces, ip_of

    found = [str(ip_of(a)) for a in advertise([multiaddr.Multiaddr(f"/ip4/{WILDCARD_V4}/tcp/1")], interfaces())]
    return [a for a in found if a != WILDCARD_V4] or ["127.0.0.1"]


def is_wildcard_host(host: str) -> bool:
    return host in ("", WILDCARD_V4, "::", "[::]")


__all__ = ["is_wildcard_host", "local_ipv4_addresses"]
