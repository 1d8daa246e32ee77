"""What sync needs of a transport: send a request, get answers; serve requests.

Transports know nothing of databases: they carry :mod:`sync.messages` between nodes. The
engine routes each request to the transport registered under the address's transport
name. A handler answers with an async iterator of messages, so that a large answer can
be streamed in several frames.

Beyond :class:`Transport`, a transport may offer more, each an optional protocol checked
with ``isinstance`` (never by probing attributes): a service to run
(:class:`BackgroundTransport`), open connections to answer on (:class:`LiveConnections`),
something to close (:class:`ClosingTransport`), a status snapshot
(:class:`ReportingTransport`) and a byte budget per connection (:class:`BudgetedTransport`:
a relayed circuit with a limit, which sync sizes its answers to). The snapshot's per-peer
part, :class:`PeerConnection`, is defined here so that a node can tell direct from relayed peers without knowing which
library the transport is built on.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import trio

if TYPE_CHECKING:
    # py-libp2p depends on trio-typing, whose trio-stubs shadow trio's own (newer) inline
    # types for mypy and lack trio.TaskStatus; its TaskStatus is the same protocol.
    from trio_typing import TaskStatus as TaskStatus
else:
    TaskStatus = trio.TaskStatus

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

    def request(self, address: str, message: Message) -> AsyncGenerator[Message, None]:
        """Send ``message`` to ``address``; yield the answers until the last one."""
        ...

    async def serve(self, handler: Handler, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept requests until cancelled; call ``task_status.started()`` once listening."""
        ...

    def listen_addresses(self) -> list[str]:
        """Addresses peers can reach this node at (empty until serving)."""
        ...


@runtime_checkable
class BackgroundTransport(Transport, Protocol):
    """A transport that needs a service running even to dial out (libp2p's host does).

    ``Sync.register_transport`` starts ``run`` in the engine's nursery; ``request`` and
    ``serve`` wait until it is ready.
    """

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...


@runtime_checkable
class LiveConnections(Protocol):
    """A transport that keeps connections open (libp2p): it can reach a peer over the very
    connection that peer opened to us, without dialling anything.

    That is how a node pushes to a peer that only read from it: the peer's announced
    addresses are its own claims and are never dialled (docs/security.md), but answering
    on a connection it holds open aims this node at no one else.
    """

    def live_address(self, pubkey: str) -> str | None:
        """An address that reaches ``pubkey`` over an open connection only (None: none is open)."""
        ...


@runtime_checkable
class ClosingTransport(Protocol):
    """A transport holding something beyond its tasks (an HTTP client's pooled
    connections) that its owner closes once it is done with it."""

    async def aclose(self) -> None: ...


@runtime_checkable
class BudgetedTransport(Protocol):
    """A transport whose connections may carry only so many bytes (a circuit through a relay
    with standard limits): sync asks before each request and sizes what it asks for.

    A transport without this method has no such limit (HTTP, memory).
    """

    async def request_budget(self, address: str, *, fresh: bool = False) -> int | None:
        """Bytes the next request to ``address`` and its whole answer may use on the connection
        it will take (None: no limit). May connect. ``fresh``: open a new connection first
        if the current one is limited (the transport also does so itself when one is spent)."""
        ...


async def request_budget(transport: Transport, address: str, *, fresh: bool = False) -> int | None:
    """What ``transport`` allows the next request to ``address`` (None: no limit)."""
    if isinstance(transport, BudgetedTransport):
        return await transport.request_budget(address, fresh=fresh)
    return None


ConnectionKind = Literal["direct", "relayed"]


@dataclass(frozen=True, slots=True)
class PeerConnection:
    """How this node is connected to one peer right now."""

    peer_id: str  # the transport's own name for the peer
    device: str | None  # the device key (``ed25519:...``) the peer ID names, when it names one
    kind: ConnectionKind  # direct if any connection to the peer is direct
    relay: str | None  # the relay's peer ID, while relayed
    connections: int


class TransportStatus(Protocol):
    """What every transport's status snapshot has: the peers it is connected to.

    A snapshot is a (frozen) dataclass; the rest of it (reachability, relays ...) is the
    transport's own, and a node shows it as data without reading it.
    """

    @property
    def peers(self) -> tuple[PeerConnection, ...]: ...


@runtime_checkable
class ReportingTransport(Protocol):
    """A transport that can say how it is connected right now (libp2p)."""

    def status(self) -> TransportStatus: ...
