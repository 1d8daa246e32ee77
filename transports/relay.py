"""Circuit relay v2 for the libp2p transport: the relay service, reservations, relayed dials.

A node behind NAT cannot be dialled, but it can dial out. It keeps a connection to a public
relay and holds a *reservation* there; a peer then reaches it at
``<relay address>/p2p-circuit/p2p/<its id>``: the peer asks the relay to CONNECT (HOP
protocol), the relay opens a STOP stream to the reserved node, and from then on the relay
copies bytes between the two streams. The two ends run Noise and Yamux over that pipe, so
the relay sees only ciphertext.

What py-libp2p 0.8.1 gets wrong here, and what this module does instead:

* Its relay data path (``CircuitV2Protocol._handle_connect``) keys live circuits by peer
  ID, so when one circuit of a peer ends it closes whichever circuit of that peer was
  stored last (a redial after a drop kills the new circuit); it treats Yamux's end of
  stream as an unexpected error (retries, sleeps and an error line per closed circuit);
  it checks the duration limit only when bytes arrive; and ``data=0`` means "nothing may
  pass" instead of "no limit". :class:`RelayService` keeps its reservation handling
  (``_handle_reserve``, vouchers, refresh) and replaces the rest: one HOP message per
  stream, and a splice with per-circuit state, a real deadline, a shared byte budget and
  half-closes passed through.
* Its client dials make a reservation on *every* relayed dial (using up the relay's
  reservation slots with nodes that only dial) and try peerstore addresses first;
  ``host.connect`` drops ``/p2p-circuit`` addresses altogether. :func:`dial_through_relay`
  sends one CONNECT and upgrades the stream itself.
* It never reads the ``Limit`` a relay grants. Standard relays (js-libp2p's, go-libp2p's)
  grant 128 KiB and 2 minutes per circuit and reset it past either. Here the limit is read
  from the reservation answer, the STOP message and the CONNECT answer, and every relayed
  connection counts the bytes that cross it (:class:`CircuitMeter`), so sync can size its
  answers to what the circuit has left (``Libp2pTransport.request_budget``).
* ``RelayDiscovery`` looks at connected peers only every 300 s, and its refresher renews
  only 30 s before expiry and never notices a restarted relay. :class:`RelayClient`
  reserves at once, renews at half the reservation's life, and re-reserves as soon as the
  connection to the relay drops.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Limit, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as PbPeerId
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.resources import RelayLimits as Libp2pRelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from multiaddr.exceptions import Error as MultiaddrError

from sync.transport import TaskStatus

from .addresses import dial_failure
from .circuits import CircuitLimit, CircuitMeter, CircuitMeters, MeteredConnection, is_relayed, split_circuit_address
from .errors import RelayError, closing_quietly, libp2p_errors, quietly

log = logging.getLogger(__name__)

HOP_PROTOCOL = TProtocol("/libp2p/circuit/relay/0.2.0/hop")
STOP_PROTOCOL = TProtocol("/libp2p/circuit/relay/0.2.0/stop")

CONTROL_TIMEOUT_S = 10.0  # one HOP or STOP exchange: a round trip to the relay (and on to the target)
UPGRADE_TIMEOUT_S = 15.0  # Noise and Yamux over a circuit: two more round trips through the relay
SPLICE_CHUNK = 64 * 1024  # bytes per read when copying between the two legs of a circuit
CLOSE_TIMEOUT_S = 2.0  # closing a stream that may already be dead
RENEW_FRACTION = 0.5  # renew a reservation halfway through its life: one failed renewal still leaves time
MIN_RENEW_S = 1.0  # never renew more often than this, whatever the relay grants
WATCH_INTERVAL_S = 0.5  # how often the client checks that it is still connected to each relay
RETRY_MIN_S = 0.5  # first wait before reserving again after a failure (a restarting relay is back soon)
RETRY_MAX_S = 1.0  # longest wait between reservation attempts while a relay is down: a restarted relay is back
# within seconds and sync through it must resume within as much (one connection attempt a second is cheap)
PROTECT_TAG = "eidetica-relay"  # the swarm's pruner never closes the connection to a relay we reserve on


@dataclass(frozen=True, kw_only=True, slots=True)
class RelayLimits:
    """What a relay grants. The defaults let one circuit carry a whole bootstrap of a large
    database and hours of sync on commit; ``0`` means no limit.

    A circuit that reaches a limit is reset by the relay: the exchange on it fails and the
    sync engine retries over a fresh circuit.
    """

    reservation_ttl_s: int = 3600  # clients renew at half-life, so a reservation never lapses while they live
    max_reservations: int = 256
    max_circuits_per_peer: int = 16  # concurrent circuits towards one reserved node
    circuit_duration_s: int = 24 * 3600
    circuit_bytes: int = 64 * 1024**3


DEFAULT_RELAY_LIMITS = RelayLimits()


def _status_name(code: int) -> str:
    try:
        return StatusCode(code).name
    except ValueError:
        return str(code)


def _limit(limits: RelayLimits) -> Limit:
    """The limits as the protocol carries them: an absent field means unlimited."""
    limit = Limit()
    if limits.circuit_duration_s:
        limit.duration = limits.circuit_duration_s
    if limits.circuit_bytes:
        limit.data = limits.circuit_bytes
    return limit


async def _close(stream: INetStream | None, *, reset: bool = False) -> None:
    """Close (or reset) a stream that may already be gone; never raises, never blocks long."""
    if stream is None:
        return
    with closing_quietly("closing a relay stream", CLOSE_TIMEOUT_S):
        if reset:
            await stream.reset()
        else:
            await stream.close()


# ---- the relay (HOP) side ------------------------------------------------------------------


class _CircuitEnded(Exception):
    """One leg of a circuit broke or a limit was reached: both legs are reset."""


class RelayService(CircuitV2Protocol):
    """Circuit relay v2, HOP side: reservations (py-libp2p's own handling) and circuits (ours).

    Invariants:
    1. A circuit is counted against its target from CONNECT until both legs are closed.
    2. Every stream this handler touches is closed or reset before it returns.
    3. Nothing escapes the handler (an exception in a stream handler takes the host down).
    """

    def __init__(self, host: IHost, limits: RelayLimits = DEFAULT_RELAY_LIMITS) -> None:
        super().__init__(
            host,
            limits=Libp2pRelayLimits(
                duration=limits.circuit_duration_s,
                data=limits.circuit_bytes,
                max_circuit_conns=limits.max_circuits_per_peer,
                max_reservations=limits.max_reservations,
                reservation_ttl=limits.reservation_ttl_s,
            ),
            allow_hop=True,
        )
        self.relay_limits = limits
        self._circuits: dict[PeerID, int] = {}
        self.circuits_opened = 0
        self.circuits_cut = 0  # reset because they reached a limit

    def start(self) -> None:
        self.host.set_stream_handler(HOP_PROTOCOL, self.handle_hop)

    def stop(self) -> None:
        with quietly("removing the HOP handler"):
            self.host.remove_stream_handler(HOP_PROTOCOL)

    def reservations(self) -> dict[str, float]:
        """Peer ID -> expiry (unix time) of every live reservation."""
        now = time.time()
        return {
            str(peer): float(r.expires_at)
            for peer, r in self.resource_manager._reservations.items()
            if r.expires_at > now
        }

    def active_circuits(self) -> int:
        return sum(self._circuits.values())

    async def handle_hop(self, stream: INetStream) -> None:
        """One HOP request per stream: RESERVE or CONNECT."""
        peer = stream.muxed_conn.peer_id
        try:
            if is_relayed(stream.muxed_conn):
                # The spec: no reservations or circuits over a circuit.
                await self._status(stream, StatusCode.PERMISSION_DENIED)
                return
            with trio.fail_after(CONTROL_TIMEOUT_S):
                message = await read_delimited_msg(stream, HopMessage)
            if message.type == HopMessage.RESERVE:
                await self._handle_reserve(stream, message)  # py-libp2p's: limits, vouchers, refresh
            elif message.type == HopMessage.CONNECT:
                await self._connect(stream, message)
            else:
                await self._status(stream, StatusCode.UNEXPECTED_MESSAGE)
        except trio.TooSlowError:
            log.info("relay: %s sent no HOP message in %g s", peer, CONTROL_TIMEOUT_S)
        except Exception as exc:  # see invariant 3
            log.info("relay: HOP stream from %s ended: %s: %s", peer, type(exc).__name__, exc)
        finally:
            await _close(stream)

    async def _status(self, stream: INetStream, code: StatusCode, *, limit: Limit | None = None) -> None:
        message = HopMessage(type=HopMessage.STATUS, status=to_proto_status(code))
        if limit is not None:
            message.limit.CopyFrom(limit)
        with trio.fail_after(CONTROL_TIMEOUT_S):
            await write_delimited_msg(stream, message)

    async def _connect(self, stream: INetStream, message: Any) -> None:
        source = stream.muxed_conn.peer_id
        try:
            target = PeerID(message.peer.id)
        except (TypeError, ValueError):
            await self._status(stream, StatusCode.MALFORMED_MESSAGE)
            return
        if self.resource_manager.get_reservation(target) is None:
            await self._status(stream, StatusCode.NO_RESERVATION)
            return
        limit_per_peer = self.relay_limits.max_circuits_per_peer
        if limit_per_peer and self._circuits.get(target, 0) >= limit_per_peer:
            await self._status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED)
            return
        self._circuits[target] = self._circuits.get(target, 0) + 1
        target_stream: INetStream | None = None
        try:
            try:
                with trio.fail_after(CONTROL_TIMEOUT_S):
                    target_stream = await self.host.new_stream(target, [STOP_PROTOCOL])
                    connect = StopMessage(type=StopMessage.CONNECT, peer=PbPeerId(id=source.to_bytes()))
                    connect.limit.CopyFrom(_limit(self.relay_limits))
                    await write_delimited_msg(target_stream, connect)
                    answer = await read_delimited_msg(target_stream, StopMessage)
            except Exception as exc:  # any library failure at the target is the same answer to the source
                log.info("relay: circuit %s -> %s failed at the target: %r", source, target, exc)
                await self._status(stream, StatusCode.CONNECTION_FAILED)
                return
            if int(answer.status) != StatusCode.OK:
                log.info("relay: %s refused a circuit from %s: %s", target, source, _status_name(answer.status))
                await self._status(stream, StatusCode.CONNECTION_FAILED)
                return
            await self._status(stream, StatusCode.OK, limit=_limit(self.relay_limits))
            self.circuits_opened += 1
            log.debug("relay: circuit %s -> %s open", source, target)
            await self._splice(stream, target_stream)
            log.debug("relay: circuit %s -> %s closed", source, target)
        finally:
            self._circuits[target] -= 1
            if not self._circuits[target]:
                del self._circuits[target]
            await _close(target_stream, reset=True)

    def enforced_circuit_bytes(self) -> int | None:
        """The bytes after which a circuit is reset (None: never): what is advertised. Kept
        apart so that a relay enforcing less than it advertises can be staged (tests)."""
        return self.relay_limits.circuit_bytes or None

    async def _splice(self, left: INetStream, right: INetStream) -> None:
        """Copy both ways until both sides have closed, a leg breaks, or a limit is reached."""
        budget = self.enforced_circuit_bytes()
        remaining = [budget]  # shared by both directions: the data limit is per circuit
        broken: list[str] = []
        cut = False

        async def pump(source: INetStream, sink: INetStream, scope: trio.CancelScope) -> None:
            nonlocal cut
            try:
                while True:
                    try:
                        data = await source.read(SPLICE_CHUNK)
                    except EOFError:  # py-libp2p signals end of stream by raising, never with b""
                        data = b""
                    if not data:
                        await sink.close()  # pass the half-close on; the other direction goes on
                        return
                    if remaining[0] is not None:
                        remaining[0] -= len(data)
                        if remaining[0] < 0:
                            raise _CircuitEnded(f"data limit of {budget} bytes reached")
                    await sink.write(data)
            except _CircuitEnded as exc:
                cut = True
                broken.append(str(exc))
                scope.cancel()
            except Exception as exc:  # a broken leg (any library error) resets both; logged below
                broken.append(f"{type(exc).__name__}: {exc}")
                scope.cancel()

        duration = self.relay_limits.circuit_duration_s
        with trio.move_on_after(duration if duration else float("inf")) as deadline:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, left, right, nursery.cancel_scope)
                nursery.start_soon(pump, right, left, nursery.cancel_scope)
        if deadline.cancelled_caught:
            cut = True
            broken.append(f"duration limit of {duration} s reached")
        if cut:
            self.circuits_cut += 1
        if broken:
            log.info("relay: circuit reset: %s", "; ".join(broken))
            await _close(left, reset=True)
            await _close(right, reset=True)


# ---- the client side: reservations, the STOP handler, relayed dials ------------------------

ReservationState = Literal["pending", "reserved", "failed"]


@dataclass(frozen=True, slots=True)
class ReservationStatus:
    """One configured relay as this node sees it."""

    relay: str  # the configured multiaddr
    state: ReservationState
    expires_at: float | None = None  # unix time
    renewals: int = 0  # successful reservations after the first (renewals and re-reservations)
    error: str | None = None
    limit: CircuitLimit | None = None  # what the relay grants each circuit (None: no limit)


@dataclass
class _Relay:
    address: multiaddr.Multiaddr
    info: PeerInfo
    state: ReservationState = "pending"
    expires_at: float | None = None
    reservations: int = 0
    error: str | None = None
    wake: trio.Event | None = None
    limit: CircuitLimit | None = None

    def status(self) -> ReservationStatus:
        return ReservationStatus(
            str(self.address), self.state, self.expires_at, max(0, self.reservations - 1), self.error, self.limit
        )


def _evict_failed(host: IHost, peer: PeerID) -> None:
    """Forget py-libp2p's 60 s "recently failed" mark: a restarted relay must be reachable at once."""
    cache = getattr(host.get_network(), "_negative_peer_cache", None)
    if cache is not None:
        cache.evict(str(peer))


def _connected(host: IHost, peer: PeerID) -> bool:
    return any(not c.is_closed for c in host.get_network().get_connections(peer))


async def dial_exactly(host: IHost, peer: PeerInfo) -> None:
    """Connect to ``peer`` at the addresses given (not the peerstore's), unless connected.

    ``host.connect`` dials one address the swarm picks from everything the peerstore holds
    for the peer, including what the peer advertised about itself in identify: a relay
    listening on ``0.0.0.0`` advertised that, and a node dialling it reached itself. Here
    the configured or ticket address is the one dialled. Identify is still started on the
    new connection (py-libp2p's ``connect`` does that): it tells us the address our NAT
    gives us, which hole punching needs.
    """
    if _connected(host, peer.peer_id):
        return
    _evict_failed(host, peer.peer_id)
    network: Any = host.get_network()
    errors: list[str] = []
    for address in peer.addrs:
        try:
            await network.dial_addr(address, peer.peer_id)
        except Exception as exc:  # any library failure: try the next address; all are in the error
            errors.append(f"{address}: {dial_failure(exc)}")
            continue
        schedule_identify = getattr(host, "_schedule_identify", None)
        if callable(schedule_identify):
            schedule_identify(peer.peer_id, reason="connect")
        return
    raise RelayError(f"cannot connect to {peer.peer_id}: " + ("; ".join(errors) or "no address"))


def _relay_errors(what: str, timeout_s: float) -> contextlib.AbstractContextManager[None]:
    """Any failure of an exchange with a relay is a RelayError: the address is unreachable."""
    return libp2p_errors(what, timeout_s, error=RelayError, timeout=RelayError)


async def _stop_status(stream: INetStream, code: StatusCode) -> None:
    await write_delimited_msg(stream, StopMessage(type=StopMessage.STATUS, status=to_proto_status(code)))


async def reserve(host: IHost, relay: PeerInfo) -> tuple[float, CircuitLimit | None]:
    """Reserve a slot on ``relay``; returns when it expires (unix time) and the limit its
    circuits will have. Raises RelayError."""
    _evict_failed(host, relay.peer_id)
    stream: INetStream | None = None
    try:
        with _relay_errors(f"relay {relay.peer_id}: reserving", CONTROL_TIMEOUT_S):
            await dial_exactly(host, relay)
            stream = await host.new_stream(relay.peer_id, [HOP_PROTOCOL])
            await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
            answer = await read_delimited_msg(stream, HopMessage)
    finally:
        await _close(stream)
    if int(answer.status) != StatusCode.OK:
        raise RelayError(f"relay {relay.peer_id} refused the reservation: {_status_name(answer.status)}")
    expires = float(answer.reservation.expire) if answer.HasField("reservation") else 0.0
    if expires <= time.time():
        raise RelayError(f"relay {relay.peer_id} granted a reservation that has already expired")
    return expires, CircuitLimit.read(answer)


async def dial_through_relay(
    host: IHost, address: multiaddr.Multiaddr, meters: CircuitMeters | None = None
) -> CircuitMeter:
    """Open a relayed connection to the target of a ``/p2p-circuit`` address.

    The new connection is registered in the swarm like any other, so ``host.new_stream``
    to the target uses it; its meter (the limit from the relay's answer) goes in ``meters``.
    Raises RelayError (the relay's status is in the message).
    """
    relay, target = split_circuit_address(address)
    _evict_failed(host, relay.peer_id)
    stream: INetStream | None = None
    upgraded = False
    what = f"relay {relay.peer_id}: circuit to {target}"
    try:
        with _relay_errors(what, CONTROL_TIMEOUT_S):
            await dial_exactly(host, relay)
            stream = await host.new_stream(relay.peer_id, [HOP_PROTOCOL])
            await write_delimited_msg(stream, HopMessage(type=HopMessage.CONNECT, peer=PbPeerId(id=target.to_bytes())))
            answer = await read_delimited_msg(stream, HopMessage)
        if int(answer.status) != StatusCode.OK:
            raise RelayError(f"relay {relay.peer_id} refused a circuit to {target}: {_status_name(answer.status)}")
        meter = CircuitMeter(CircuitLimit.read(answer), address)
        raw = MeteredConnection(
            stream, meter, initiator=True, connection_type=ConnectionType.RELAYED, addresses=[address]
        )
        with _relay_errors(f"{what}: upgrading", UPGRADE_TIMEOUT_S):
            connection = await host.upgrade_outbound_connection(raw, target)
        # Marked relayed in the swarm's table too (py-libp2p leaves it "direct").
        cast(Any, connection).set_transport_info([address], ConnectionType.RELAYED)
        if meters is not None:
            meters.add(connection.muxed_conn, meter)
        upgraded = True
    finally:
        if not upgraded:
            await _close(stream, reset=True)
    return meter


class RelayClient:
    """Holds a reservation on every configured relay and accepts circuits from them.

    Each relay has one task: reserve, then wait until half the reservation's life has
    passed or the connection to the relay drops (a restarted relay has forgotten us), then
    reserve again; failures are retried after 0.5 s doubling to 1 s.
    """

    def __init__(
        self,
        host: IHost,
        relays: Sequence[str],
        *,
        on_inbound_circuit: Callable[[PeerID], None] | None = None,
        meters: CircuitMeters | None = None,
    ) -> None:
        self._host = host
        self._meters = meters
        self._relays: list[_Relay] = []
        for text in relays:
            address = multiaddr.Multiaddr(text)
            try:
                info = info_from_p2p_addr(address)
            except (ValueError, MultiaddrError) as exc:
                raise ValueError(f"a relay address needs its /p2p/<peer id>: {text!r}") from exc
            self._relays.append(_Relay(address, info))
        self._on_inbound_circuit = on_inbound_circuit
        self.circuits_accepted = 0

    @property
    def relay_peers(self) -> set[PeerID]:
        return {r.info.peer_id for r in self._relays}

    def circuit_addresses(self) -> list[str]:
        """Where peers reach this node through each relay (reserved or still trying: a lapsed
        reservation is renewed within seconds, and an address handed out stays useful)."""
        own = self._host.get_id()
        return [f"{r.address}/p2p-circuit/p2p/{own}" for r in self._relays]

    def status(self) -> tuple[ReservationStatus, ...]:
        return tuple(r.status() for r in self._relays)

    async def wait_reserved(self) -> None:
        """Until every relay has been tried once (reserved or failed)."""
        while any(r.state == "pending" for r in self._relays):
            await trio.sleep(0.05)

    def renew_now(self) -> None:
        """Renew every reservation at once (tests; after a network change)."""
        for relay in self._relays:
            if relay.wake is not None:
                relay.wake.set()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._host.set_stream_handler(STOP_PROTOCOL, self._on_stop)
        try:
            async with trio.open_nursery() as nursery:
                for relay in self._relays:
                    nursery.start_soon(self._keep, relay)
                task_status.started()
        finally:
            with quietly("removing the STOP handler"):
                self._host.remove_stream_handler(STOP_PROTOCOL)

    async def _keep(self, relay: _Relay) -> None:
        retry = RETRY_MIN_S
        network: Any = self._host.get_network()
        while True:
            try:
                relay.expires_at, relay.limit = await reserve(self._host, relay.info)
            except RelayError as exc:
                relay.state, relay.error = "failed", str(exc)
                log.info("reservation on %s failed (next try in %g s): %s", relay.address, retry, exc)
                await trio.sleep(retry)
                retry = min(retry * 2, RETRY_MAX_S)
                continue
            if relay.state != "reserved":
                log.info("reserved a slot on relay %s", relay.address)
            relay.state, relay.error, retry = "reserved", None, RETRY_MIN_S
            relay.reservations += 1
            with quietly(f"protecting the connection to relay {relay.address}"):
                network.protect(relay.info.peer_id, PROTECT_TAG)
            renew_in = max(MIN_RENEW_S, (relay.expires_at - time.time()) * RENEW_FRACTION)
            relay.wake = trio.Event()
            with trio.move_on_after(renew_in):
                while _connected(self._host, relay.info.peer_id) and not relay.wake.is_set():
                    with trio.move_on_after(WATCH_INTERVAL_S):
                        await relay.wake.wait()
            if not _connected(self._host, relay.info.peer_id):
                log.info("lost the connection to relay %s: reserving again", relay.address)
                relay.state = "pending"

    async def _on_stop(self, stream: INetStream) -> None:
        """A relay opens a circuit to us: accept it if it is one of ours, then upgrade it."""
        relay = stream.muxed_conn.peer_id
        upgraded = False
        try:
            if relay not in self.relay_peers:
                await _stop_status(stream, StatusCode.PERMISSION_DENIED)
                return
            with trio.fail_after(CONTROL_TIMEOUT_S):
                message = await read_delimited_msg(stream, StopMessage)
                if message.type != StopMessage.CONNECT:
                    await _stop_status(stream, StatusCode.UNEXPECTED_MESSAGE)
                    return
                source = PeerID(message.peer.id)
                await _stop_status(stream, StatusCode.OK)
            relay_address = next(str(r.address) for r in self._relays if r.info.peer_id == relay)
            circuit = multiaddr.Multiaddr(f"{relay_address}/p2p-circuit/p2p/{source}")
            meter = CircuitMeter(CircuitLimit.read(message))
            raw = MeteredConnection(
                stream, meter, initiator=False, connection_type=ConnectionType.RELAYED, addresses=[circuit]
            )
            with trio.fail_after(UPGRADE_TIMEOUT_S):
                muxed = await self._host.upgrade_inbound_connection(raw, circuit)
            if self._meters is not None:
                self._meters.add(muxed, meter)
            for connection in self._host.get_network().get_connections(muxed.peer_id):
                if getattr(connection, "muxed_conn", None) is muxed:
                    cast(Any, connection).set_transport_info([circuit], ConnectionType.RELAYED)
            upgraded = True
            self.circuits_accepted += 1
            log.debug("accepted a circuit from %s through %s", muxed.peer_id, relay)
            if self._on_inbound_circuit is not None:
                self._on_inbound_circuit(muxed.peer_id)
        except Exception as exc:  # a stream handler must never raise
            log.info("circuit through %s refused or failed: %s: %s", relay, type(exc).__name__, exc)
        finally:
            if not upgraded:
                await _close(stream, reset=True)
