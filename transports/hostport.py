"""``host:port`` addresses, as the HTTP transport and the node's own TCP listeners take them.

One parser for every ``host:port`` a user or a peer writes (``--http-bind``, ``--metrics-bind``,
an HTTP peer's address), so they all accept and refuse the same texts: a name or an IPv4
address, or an IPv6 address in brackets, then a port.
"""

from __future__ import annotations

import re
from typing import Final

_ADDRESS: Final = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})):(?P<port>[0-9]{1,5})$")


def parse_host_port(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> ``(host without brackets, port)``; ValueError if not."""
    match = _ADDRESS.match(address)
    if match is None:
        raise ValueError(f"{address!r} is not host:port")
    port = int(match["port"])
    if not 0 <= port <= 65535:
        raise ValueError(f"{address!r} has no valid port")
    return match["host"].strip("[]"), port


def join_host_port(host: str, port: int) -> str:
    """The inverse: an IPv6 host gets its brackets back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = ["join_host_port", "parse_host_port"]
