"""What sync needs of a transport: send a request, get answers; serve requests.

Transports know nothing of databases: they carry :mod:`sync.messages` between nodes. The
engine routes each request to the transport registered under the address's transport
name. A handler answers with an async iterator of messages, so that a large answer can
be streamed in several frames.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from .messages import Message


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """Where a peer listens: ``(transport name, transport-specific address)``."""

    transport: str
    address: str

    def __str__(self) -> str:
        return f"{self.transport}:{self.address}"


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What the transport knows of the requester (``peer`` when it is authenticated)."""

    transport: str
    peer: str | None = None
    remote: str | None = None


Handler = Callable[[Message, RequestContext], AsyncIterator[Message]]


class Transport(Protocol):
    """One way to reach peers. ``request`` raises :class:`~sync.errors.TransportError`."""

    def request(self, address: str, message: Message) -> AsyncIterator[Message]:
        """Send ``message`` to ``address``; yield the answers until the last one."""
        ...

    async def serve(self, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept requests until cancelled; call ``task_status.started()`` once listening."""
        ...

    def listen_addresses(self) -> list[str]:
        """Addresses peers can reach this node at (empty until serving)."""
        ...
