"""The libp2p transport: ``/eidetica/sync/1.0.0`` streams over TCP, Noise and Yamux (py-libp2p).

One request per stream: the asker writes one frame, the server writes answer frames and
closes. A frame is a 4-byte big-endian length and a msgpack message; a length over the
limit (default 16 MiB) ends the stream with an error. The host's identity is the node's
Ed25519 device key, so a peer ID names a device.

What this module does about py-libp2p 0.8.1's traps:
* only Noise is offered (a default host also accepts plaintext, TLS and secio);
* every exception in the stream handler is caught (one escaping takes the host down);
* ``max_connections_per_peer=1`` avoids the 250 ms parallel-dial head start, and the
  auto-connector's targets are zeroed so it never redials the peerstore by itself;
* a listening port is first bound by a probe socket of our own, without SO_REUSEPORT
  (py-libp2p's listeners set it, so a second process would silently share the port);
* a peer's "recently failed" mark is cleared before each dial, so a peer that came back
  is reachable at once instead of after 60 s;
* a dial goes to exactly the address asked for (``host.connect`` dials whichever one
  address of the peerstore it ranks best, which may be one a peer advertised badly), and
  wildcard listen addresses are advertised expanded (see ``advertised_addresses``);
* the host is closed explicitly when the transport stops (leaving ``run`` does not close
  the listeners);
* a request stream on a direct connection is negotiated lazily (multistream-select's
  "V1Lazy", as rust-libp2p does for one protocol): the multistream header, the protocol and the request frame go
  out in one write, and the listener's two echoes are checked before the answer is read.
  The bytes on the wire are the ones ``host.new_stream`` sends; its two round trips of
  waiting are gone (3 of the 7 ms a live write took to reach a peer on loopback).

Behind NAT (see :mod:`transports.relay`, :mod:`transports.reachability`,
:mod:`transports.holepunch`): a node can offer circuit relay v2 (``relay_service=True``);
a node given ``relays`` reserves a slot on each and advertises its ``/p2p-circuit``
addresses; ``/p2p-circuit`` addresses are dialled through the relay (``host.connect``
drops them); reachability comes from a real dial-back on a fresh connection; DCUtR
upgrades relayed connections to direct ones where the NATs allow. ``status()`` tells
which of all that is the case right now (:mod:`transports.libp2p_status`).

Every failure of py-libp2p on the asking side becomes a sync error in one place,
:func:`transports.errors.libp2p_errors`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncGenerator, Callable, Collection, Sequence
from typing import Any

import multiaddr
import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.utils import read_exactly
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.utils.varint import decode_uvarint_from_stream, encode_delim
from multiaddr.exceptions import Error as MultiaddrError

from dag import SigningKey
from sync.errors import ProtocolError, TransportError, UnreachableError
from sync.messages import Error, Message, decode_message, encode_message
from sync.transport import ConnectionKind, Handler, RequestContext, TaskStatus

from .addresses import Advertiser, advertise, interfaces
from .circuits import CircuitMeters, is_circuit_address, split_circuit_address
from .errors import FrameTooLarge, closing_quietly, libp2p_errors
from .holepunch import HolePuncher
from .libp2p_status import (
    Libp2pStatus,
    connected_peers,
    peer_connection,
    peer_connections,
    peer_pubkey,
    relay_service_status,
)
from .observed import ObservedAddresses
from .reachability import RECHECK_S, ReachabilityMonitor
from .reachability_service import SERVICES, ReachabilityService
from .redial import CircuitKeeper
from .relay import (
    DEFAULT_RELAY_LIMITS,
    RelayClient,
    RelayLimits,
    RelayService,
    dial_exactly,
    dial_through_relay,
)

log = logging.getLogger(__name__)

# Importing py-libp2p turns propagation off on its "libp2p" logger and gives it no handler
# (``libp2p.utils.logging.setup_logging``): its warnings then bypass the application's logging
# and reach stderr bare, multi-line blocks included, through ``logging.lastResort``. Route them
# through the application's handlers (levels stay the application's to set), unless
# ``LIBP2P_DEBUG`` gave it handlers of its own.
if not logging.getLogger("libp2p").handlers:
    logging.getLogger("libp2p").propagate = True

PROTOCOL_ID = TProtocol("/eidetica/sync/1.0.0")
MULTISTREAM_ID = "/multistream/1.0.0"
MAX_NEGOTIATION_BYTES = 1024
_LAZY_PROPOSAL = encode_delim(MULTISTREAM_ID.encode()) + encode_delim(PROTOCOL_ID.encode())
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
HEADER = 4
CONNECT_TIMEOUT_S = 10.0  # a dial that takes longer is a dead or unreachable peer
REQUEST_FRAME_TIMEOUT_S = 30.0  # between a stream opening and its request frame arriving
ANSWER_FRAME_TIMEOUT_S = 60.0  # between two answer frames (a big batch is being verified)
READ_CHUNK = 1 << 20
# serve() waits this long for the first reservations, so that addresses handed out right after
# accept_connections() already reach the node through its relays; a relay that is down costs no more.
INITIAL_RESERVATION_WAIT_S = 5.0


async def _read_exactly(stream: INetStream, size: int) -> bytes:
    """``size`` bytes; raises ``EOFError`` if the stream ends first (py-libp2p raises StreamEOF)."""
    parts: list[bytes] = []
    remaining = size
    while remaining:
        chunk = await stream.read(min(remaining, READ_CHUNK))
        if not chunk:
            raise EOFError("stream ended inside a frame")
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


async def read_frame(stream: INetStream, limit: int) -> bytes | None:
    """The next frame's payload, or None at a clean end of stream."""
    try:
        header = await stream.read(HEADER)
    except EOFError:
        return None
    if not header:
        return None
    if len(header) < HEADER:
        header += await _read_exactly(stream, HEADER - len(header))
    size = int.from_bytes(header, "big")
    if size > limit:
        raise FrameTooLarge(f"frame of {size} bytes is over the {limit}-byte limit")
    return await _read_exactly(stream, size)


async def _negotiated(stream: INetStream) -> str:
    """One multistream-select message from the listener (a varint length, text, newline).

    Capped: the length is the peer's to choose, and a protocol name is short.
    """
    # py-libp2p's own readers (as multistream-select uses them): its bounded one takes an
    # empty read for the end of the stream, which a Yamux stream can return mid-message.
    size = await decode_uvarint_from_stream(stream)
    if size > MAX_NEGOTIATION_BYTES:
        raise ValueError(f"multistream-select message of {size} bytes")
    message = await read_exactly(stream, size)
    if not message.endswith(b"\n"):
        raise ValueError("multistream-select message without its newline")
    return message[:-1].decode("utf-8", "replace")


async def write_frame(stream: INetStream, payload: bytes) -> None:
    await stream.write(len(payload).to_bytes(HEADER, "big") + payload)


async def _no_auto_connect() -> None:
    return None


def _ip4(address: multiaddr.Multiaddr) -> str | None:
    """The address's IPv4 host, None if it has none (``/ip6/...``, ``/dns4/...``)."""
    try:
        return str(address.value_for_protocol("ip4"))
    except MultiaddrError:  # ProtocolLookupError: no /ip4 part
        return None


def advertised_addresses(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """What a host with nothing to announce tells peers (identify, reservations, ``get_addrs``):
    listen addresses expanded and filtered by scope (:mod:`transports.addresses`).

    py-libp2p advertises a ``0.0.0.0`` listen address as it is; a peer that dials it reaches
    *itself* (connecting to 0.0.0.0 means this machine), fails the Noise handshake with "peer
    ID mismatch", and the swarm then clears every address it had for the peer. Loopback,
    link-local and container-bridge addresses mislead peers elsewhere the same way.
    """
    return advertise(candidates, interfaces())


def new_noise_host(
    key_pair: Any,
    *,
    dial_timeout_s: float,
    retries: bool = True,
    addrs_factory: Callable[[list[multiaddr.Multiaddr]], list[multiaddr.Multiaddr]] = advertised_addresses,
) -> IHost:
    """A host that offers Noise only (a default host also accepts plaintext), with Yamux,
    one connection per peer and no auto-connector, advertising what ``addrs_factory`` says."""
    security = {NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)}
    config = ConnectionConfig(
        max_connections_per_peer=1,
        min_connections=0,
        low_watermark=0,
        dial_timeout=dial_timeout_s,
    )
    host = new_host(
        key_pair=key_pair,
        sec_opt=security,
        muxer_opt=create_yamux_muxer_option(),
        connection_config=config,
        addrs_factory=addrs_factory,
    )
    network: Any = host.get_network()
    # The auto-connector aims at (low + high watermark) / 2 connections and redials
    # every peer in the peerstore to get there; the sync engine dials on demand instead.
    connector = getattr(network, "auto_connector", None)
    if connector is not None:
        connector.maybe_connect = _no_auto_connect
    if not retries:
        network.retry_config = RetryConfig(max_retries=0)
    return host


def _check_port_free(address: multiaddr.Multiaddr) -> None:
    host = _ip4(address)
    try:
        port = int(address.value_for_protocol("tcp"))
    except MultiaddrError:  # not TCP: nothing of ours to probe
        return
    if host is None or port == 0:
        return
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # SO_REUSEADDR: connections of a previous run left in TIME_WAIT must not block a restart
    # (a relay that restarts on its port); a live listener on the port still makes bind() fail.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
    except OSError as exc:
        raise TransportError(f"cannot listen on {address}: port {port} is in use ({exc.strerror})") from exc
    finally:
        probe.close()


class Libp2pTransport:
    """Sync over libp2p. ``run`` (started by ``Sync.register_transport``) keeps the host up;
    ``serve`` (``accept_connections``) adds the listeners.

    Args:
        key: the device key; the host's identity.
        listen: multiaddrs to listen on (``0.0.0.0`` is advertised as each interface's address,
            loopback only when there is no other).
        relay_service: offer circuit relay v2 to other nodes, with ``relay_limits``.
        relays: multiaddrs (with ``/p2p/<id>``) of relays to reserve a slot on; their
            ``/p2p-circuit`` addresses are advertised (first, once the node knows it is private).
        hole_punching: answer and start DCUtR to turn relayed connections into direct ones.
        reachability_recheck_s: how often the node asks a peer to dial it back again.
        announce: multiaddrs advertised first, exactly as given (``/p2p/<our ID>`` added when
            missing; one naming another peer is an ``AnnounceError``), whatever scope they
            are in: a forwarded port, a DNS name, another relay's circuit (``Advertiser``).
        reachability_services: the reachability protocols this node answers for others
            (``"dialback"``: ours; ``"autonat"``: AutoNAT v1); both dial back from a fresh host.
    """

    def __init__(
        self,
        key: SigningKey,
        *,
        listen: list[str] | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        answer_timeout_s: float = ANSWER_FRAME_TIMEOUT_S,
        relay_service: bool = False,
        relay_limits: RelayLimits = DEFAULT_RELAY_LIMITS,
        relays: Sequence[str] = (),
        hole_punching: bool = True,
        reachability_recheck_s: float = RECHECK_S,
        announce: Sequence[str] = (),
        reachability_services: Collection[str] = SERVICES,
    ) -> None:
        self._key_pair = create_new_key_pair(key.seed)
        self._listen = [multiaddr.Multiaddr(a) for a in (listen or ["/ip4/127.0.0.1/tcp/4001"])]
        self._advertiser = Advertiser(announce, str(PeerID.from_pubkey(self._key_pair.public_key)))
        self.max_frame_bytes = max_frame_bytes
        self._connect_timeout_s = connect_timeout_s
        self._answer_timeout_s = answer_timeout_s
        self._host: IHost = new_noise_host(
            self._key_pair, dial_timeout_s=connect_timeout_s, addrs_factory=self._advertiser
        )
        self._ready = trio.Event()
        self._stopped = False
        self._serving = False
        self._handler: Handler | None = None
        self._relay_service = RelayService(self._host, relay_limits) if relay_service else None
        self._meters = CircuitMeters()  # what each relayed connection has left of its relay's limit
        on_circuit, meters = self._on_inbound_circuit, self._meters
        self._relay_client = (
            RelayClient(self._host, relays, on_inbound_circuit=on_circuit, meters=meters) if relays else None
        )
        self._puncher = HolePuncher(self._host) if hole_punching else None
        self._reach = ReachabilityService(
            self._host, self._fresh_host, self._relay_client, own_addresses=self._direct_addresses,
            serving=lambda: self._serving, recheck_s=reachability_recheck_s, services=reachability_services,
        )  # fmt: skip
        self._dialback, self._reachability = self._reach.dialback, self._reach.monitor
        self._advertiser.attach(self._host.get_transport_addrs, self._reach.observed.confirmed)
        self._dial_locks: dict[PeerID, trio.Lock] = {}
        self._circuit_keeper = CircuitKeeper(self._host, self._dial_locks, self._meters)

    def _fresh_host(self) -> IHost:
        """A throwaway host with a new identity, for dial-backs: it cannot reuse a connection."""
        key_pair = create_new_key_pair(os.urandom(32))
        return new_noise_host(key_pair, dial_timeout_s=self._connect_timeout_s, retries=False)

    @property
    def host(self) -> IHost:
        return self._host

    @property
    def peer_id(self) -> str:
        return str(self._host.get_id())

    @property
    def relay_client(self) -> RelayClient | None:
        return self._relay_client

    @property
    def reachability(self) -> ReachabilityMonitor:
        return self._reachability

    @property
    def observed_addresses(self) -> ObservedAddresses:
        """Where peers (identify) say they see this node; see :mod:`transports.observed`."""
        return self._reach.observed

    @property
    def hole_puncher(self) -> HolePuncher | None:
        return self._puncher

    # ---- lifecycle --------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the host's network service up (needed to dial, even without listening), and
        hole punching, which both ends of a relayed connection take part in."""
        entered = False
        try:
            async with self._host.run([]), trio.open_nursery() as nursery:
                entered = True
                if self._puncher is not None:
                    await nursery.start(self._puncher.run)
                nursery.start_soon(self._circuit_keeper.run)
                nursery.start_soon(self._meters.run)
                self._ready.set()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._stopped = True
            if entered:  # a host whose service never started refuses close() (LifecycleError)
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await self._host.close()

    async def _wait_ready(self) -> None:
        if self._stopped:
            raise TransportError("the libp2p transport has stopped")
        with trio.fail_after(self._connect_timeout_s):
            await self._ready.wait()

    async def serve(self, handler: Handler, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen; while listening also serve dial-backs, the relay (if offered), hold the
        reservations on our relays and keep reachability current."""
        await self._wait_ready()
        for address in self._listen:
            _check_port_free(address)
        self._handler = handler
        self._host.set_stream_handler(PROTOCOL_ID, self._on_stream)
        network: Any = self._host.get_network()
        if not await network.listen(*self._listen):
            raise TransportError(f"libp2p could not listen on {', '.join(map(str, self._listen))}")
        self._serving = True
        try:
            async with trio.open_nursery() as nursery:
                self._reach.start()
                if self._relay_service is not None:
                    self._relay_service.start()
                if self._relay_client is not None:
                    await nursery.start(self._relay_client.run)
                    with trio.move_on_after(INITIAL_RESERVATION_WAIT_S):
                        await self._relay_client.wait_reserved()
                nursery.start_soon(self._reachability.run)
                task_status.started()
        finally:
            self._serving = False
            self._reach.stop()
            if self._relay_service is not None:
                self._relay_service.stop()
            for listener in list(getattr(network, "listeners", {}).values()):
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await listener.close()

    def _direct_addresses(self) -> list[str]:
        if not self._serving:
            return []
        return [str(a) for a in self._host.get_addrs() if not is_circuit_address(a)]

    def listen_addresses(self) -> list[str]:
        """Announced addresses, then ``/p2p-circuit`` ones until a dial-back shows peers can
        dial us (a dead private address first costs a joiner its whole connect timeout,
        docs/nat.md), then direct ones; direct before circuits once the node is public."""
        if not self._serving:
            return []
        circuits = self._relay_client.circuit_addresses() if self._relay_client is not None else []
        circuits_first = self._reachability.reachability != "public"
        return self._advertiser.ordered(self._direct_addresses(), circuits, circuits_first=circuits_first)

    # ---- status -------------------------------------------------------------------------

    def live_address(self, pubkey: str) -> str | None:
        """``/p2p/<peer ID>`` when ``pubkey``'s peer holds a connection to us: a request to
        it rides that connection and never dials (``_open`` refuses to)."""
        for peer in connected_peers(self._host):
            if peer_pubkey(peer) == pubkey and peer_connection(self._host, peer) is not None:
                return f"/p2p/{peer}"
        return None

    def connection_kind(self, peer_id: str) -> ConnectionKind | None:
        """``direct`` or ``relayed`` for a connected peer, None if not connected."""
        connection = peer_connection(self._host, PeerID.from_base58(peer_id))
        return connection.kind if connection is not None else None

    def status(self) -> Libp2pStatus:
        """Reachability, reservations, how each connected peer is reached, hole punching."""
        return Libp2pStatus(
            peer_id=self.peer_id,
            serving=self._serving,
            **self._reach.status_fields(),
            listen_addresses=tuple(self.listen_addresses()),
            reservations=self._relay_client.status() if self._relay_client is not None else (),
            peers=peer_connections(self._host),
            **(self._puncher.status_fields() if self._puncher is not None else {"hole_punches": ()}),
            relay_service=relay_service_status(self._relay_service),
        )

    def _on_inbound_circuit(self, peer: PeerID) -> None:
        """We accepted a relayed connection: the accepting end starts DCUtR (the spec's choice)."""
        if self._puncher is not None:
            self._puncher.request(peer)

    # ---- serving ----------------------------------------------------------------------

    async def _on_stream(self, stream: INetStream) -> None:
        """One request; anything that goes wrong ends this stream only, never the host."""
        peer = stream.muxed_conn.peer_id
        context = RequestContext("p2p", peer=peer_pubkey(peer), remote=str(peer))
        try:
            try:
                with trio.fail_after(REQUEST_FRAME_TIMEOUT_S):
                    payload = await read_frame(stream, self.max_frame_bytes)
                if payload is None:
                    return
                message = decode_message(payload)
            except ProtocolError as exc:
                await write_frame(stream, encode_message(Error(exc.code, str(exc))))
                return
            assert self._handler is not None
            async for answer in self._handler(message, context):
                await write_frame(stream, encode_message(answer))
        except trio.TooSlowError:
            log.info("p2p request from %s timed out", peer)
        except Exception as exc:  # one stream must never take the host down (see the docstring)
            log.info("p2p stream from %s ended: %s: %s", peer, type(exc).__name__, exc)
        finally:
            with closing_quietly("closing a p2p stream", 2):
                await stream.close()  # already broken or not, nothing is left to tell the peer

    # ---- asking -------------------------------------------------------------------------

    async def _open(self, address: str) -> tuple[INetStream, bool]:
        """A stream to the peer at ``address``, reusing any connection to that peer, and
        whether its protocol negotiation is still to be sent (lazily, with the request).

        ``/p2p-circuit`` addresses are dialled through their relay (``host.connect`` drops
        them); one relayed dial per peer at a time, so concurrent requests share a circuit.
        Over a relayed connection the stream is negotiated the usual way, round trips and
        all: sent lazily there, it broke hole punching on loopback (the tests' DCUtR went
        from 0 of 6 failures to 6 of 6), and a relayed exchange is slow anyway.
        """
        await self._wait_ready()
        target, info, peer, live_only = _parse_target(address)
        if live_only and peer_connection(self._host, peer) is None:
            raise UnreachableError(f"p2p:{address}: no open connection to that peer (it is not dialled)")
        with libp2p_errors(f"p2p:{address}: connecting", self._connect_timeout_s, error=UnreachableError):
            await _connect(self._host, self._dial_locks, self._meters, address, target, info, peer, live_only)
            if info is None and not live_only:  # a circuit address: reopened if its relay drops
                self._circuit_keeper.dialled(peer, target)
            connection = peer_connection(self._host, peer)
            if connection is not None and connection.kind == "relayed":
                return await self._host.new_stream(peer, [PROTOCOL_ID]), False
            # A raw stream: the request carries its own (lazy) protocol negotiation.
            stream: INetStream = await self._host.get_network().new_stream(peer)
            stream.set_protocol(PROTOCOL_ID)
            return stream, True

    async def request_budget(self, address: str, *, fresh: bool = False) -> int | None:
        """See ``BudgetedTransport``: here ``CircuitMeters.budget`` (spent circuits replaced)."""
        await self._wait_ready()
        target, info, peer, live_only = _parse_target(address)

        async def connect(circuit: multiaddr.Multiaddr | None) -> None:
            where, to, via = address, target, info
            if circuit is not None and not live_only:  # a spent circuit we dialled: the same way again
                where, to, via = str(circuit), circuit, None
            with libp2p_errors(f"p2p:{where}: connecting", self._connect_timeout_s, error=UnreachableError):
                await _connect(self._host, self._dial_locks, self._meters, where, to, via, peer, live_only)

        wait = self._puncher.wait_quiet if self._puncher is not None else None
        return await self._meters.budget(self._host, peer, connect, wait, fresh=fresh and not live_only)

    async def _confirm_protocol(self, stream: INetStream, address: str) -> None:
        """Check the listener's answers to a lazily sent protocol proposal."""
        with libp2p_errors(f"p2p:{address}: protocol negotiation", self._answer_timeout_s):
            answers = (await _negotiated(stream), await _negotiated(stream))
        if answers != (MULTISTREAM_ID, PROTOCOL_ID):
            raise UnreachableError(f"p2p:{address}: the peer does not speak {PROTOCOL_ID} (it answered {answers})")

    async def request(self, address: str, message: Message) -> AsyncGenerator[Message, None]:
        stream, lazy = await self._open(address)
        try:
            payload = encode_message(message)
            with libp2p_errors(f"p2p:{address}: sending", None):
                await stream.write((_LAZY_PROPOSAL if lazy else b"") + len(payload).to_bytes(HEADER, "big") + payload)
            if lazy:
                await self._confirm_protocol(stream, address)
            while True:
                with libp2p_errors(f"p2p:{address}: waiting for an answer", self._answer_timeout_s):
                    frame = await read_frame(stream, self.max_frame_bytes)
                if frame is None:
                    return
                yield decode_message(frame)
        finally:
            with closing_quietly("resetting a p2p stream", 2):
                await stream.reset()  # the stream is gone either way


async def _connect(
    host: IHost,
    locks: dict[PeerID, trio.Lock],
    meters: CircuitMeters,
    address: str,
    target: multiaddr.Multiaddr,
    info: PeerInfo | None,
    peer: PeerID,
    live_only: bool,
) -> None:
    """Connect to ``peer`` unless connected: dial the address, or through the relay it names
    (one dial per peer at a time, so concurrent requests share a circuit)."""
    if peer_connection(host, peer) is None:
        async with locks.setdefault(peer, trio.Lock()):
            if info is not None:
                await dial_exactly(host, info)
            elif live_only:  # the connection closed meanwhile: still never dial
                raise UnreachableError(f"p2p:{address}: the connection to that peer closed")
            elif peer_connection(host, peer) is None:
                await dial_through_relay(host, target, meters)


def _parse_target(address: str) -> tuple[multiaddr.Multiaddr, PeerInfo | None, PeerID, bool]:
    """``address`` as (multiaddr, where to dial or None, the peer, whether it is ``/p2p/<ID>``
    alone: a peer reached over an open connection only, see ``live_address``)."""
    try:
        target = multiaddr.Multiaddr(address)
        if is_circuit_address(target):
            return target, None, split_circuit_address(target)[1], False
        if [protocol.name for protocol in target.protocols()] == ["p2p"]:
            return target, None, PeerID.from_base58(target.value_for_protocol("p2p")), True
        info = info_from_p2p_addr(target)
        return target, info, info.peer_id, False
    except (ValueError, MultiaddrError) as exc:  # InvalidAddrError, base58 and multiaddr parse errors
        raise UnreachableError(f"not a libp2p address with a /p2p/ peer ID: {address!r}") from exc
