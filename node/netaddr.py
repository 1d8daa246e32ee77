"""Turning a wildcard HTTP bind address into addresses a peer can dial.

A node listening on ``0.0.0.0`` is reachable at each of its interfaces' addresses, but
the wildcard itself means nothing to a peer: a ticket must carry the real ones. The HTTP
transport advertises what it is told, so the node tells it these; the libp2p transport
expands its own multiaddrs (``transports.libp2p.advertised_addresses``).
"""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address
WILDCARD_V4 = "0.0.0.0"


def local_ipv4_addresses() -> list[str]:
    """This host's IPv4 addresses, non-loopback first; ``["127.0.0.1"]`` if none can be read."""
    found: list[str] = []
    try:
        names = [name for _index, name in socket.if_nameindex()]
    except OSError:
        names = []
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for name in names:
            request = struct.pack("256s", name.encode()[:15])
            try:
                answer = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on this interface
            address = socket.inet_ntoa(answer[20:24])
            if address not in found:
                found.append(address)
    finally:
        probe.close()
    if "127.0.0.1" not in found:
        found.append("127.0.0.1")
    return sorted(found, key=lambda a: a.startswith("127."))


def is_wildcard_host(host: str) -> bool:
    return host in ("", WILDCARD_V4, "::", "[::]")


__all__ = ["is_wildcard_host", "local_ipv4_addresses"]
