"""What a relay circuit may still carry: the limit a relay grants, a meter per relayed
connection, and the budget sync is given for the next request.

Relays with the standard limits (js-libp2p's and go-libp2p's defaults: 128 KiB and 2
minutes per circuit) reset a circuit at its limit, and py-libp2p then drops what the
connection had buffered. So each relayed connection counts the bytes that cross it (what
the relay counts), sync asks before each request how much the answer may take
(:meth:`CircuitMeters.budget`), and a circuit with too little left is closed and replaced
before the next request rather than cut under it. The relay protocol itself (service,
reservations, dials) is ``transports/relay.py``; these are its budget half, and the address
helpers both halves and the rest of the transport use.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, StopMessage

from .errors import closing_quietly

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 2.0  # closing a circuit that may already be dead
# A Limit.duration above a day is read as milliseconds: the spec says seconds, js-libp2p sends
# milliseconds (its 2-minute default arrives as 120,000), go-libp2p sends 120, our relay 86,400.
MAX_DURATION_S = 24 * 3600
# A circuit with less than this left is spent: the transport closes it before the next request
# rather than squeezing an answer into it (a fresh circuit costs ~3 round trips through the relay).
SPENT_BYTES = 16 * 1024
SPENT_FRACTION = 0.125  # ... or less than this share of what it was granted
SPENT_S = 10.0  # ... or less time than this: a request needs a few round trips
# What a circuit's bytes carry beyond sync's frames, kept out of the budget sync is given:
# Noise (18 B per message of <= 64 KiB), Yamux (12 B per frame, window updates), stream
# negotiation, and identify, ping and DCUtR sharing the circuit (measured: see docs/nat.md).
MARGIN_BYTES = 6 * 1024
MARGIN_FRACTION = 0.02
# Before bulk goes over a limited circuit, a hole punch towards that peer (starting or running)
# gets this long to bring a direct connection: the accepting end waits up to 3 s for identify,
# a punch through NATs that allow it then takes ~0.3-2 s, one through resetting NATs fails in ~6-8 s.
DIRECT_WAIT_S = 8.0
CLOSING_BUFFER = 64  # spent circuits waiting for the background closer; past it they close inline
# A circuit cut short had carried at least the bytes we counted (more were in flight and lost):
# later circuits to that peer are budgeted to this share of them.
CUT_CAP_FRACTION = 0.75
CUT_MIN_SHARE = 0.125  # a circuit that ended with less of its limit used is not taken for a cut at a hidden limit
CAP_TTL_S = 600.0  # a learned cap is forgotten after this long (the relay may have changed)
MAX_TRACKED_PEERS = 1024  # peers whose last circuit and cap are remembered (least recent dropped)
MAX_UNLIMITED = 2**62


def is_circuit_address(address: multiaddr.Multiaddr | str) -> bool:
    return "/p2p-circuit" in str(address)


def split_circuit_address(address: multiaddr.Multiaddr) -> tuple[PeerInfo, PeerID]:
    """``<relay>/p2p/<relay id>/p2p-circuit/p2p/<target>`` -> (relay's PeerInfo, target's peer ID)."""
    text = str(address)
    relay_part, sep, target_part = text.partition("/p2p-circuit")
    if not sep or not target_part.startswith("/p2p/"):
        raise ValueError(f"not a circuit address ending in /p2p/<target>: {text}")
    target = PeerID.from_base58(target_part.removeprefix("/p2p/").split("/")[0])
    relay = info_from_p2p_addr(multiaddr.Multiaddr(relay_part))
    return relay, target


def is_relayed(connection: Any) -> bool:
    """Whether a swarm or muxed connection runs over a relay circuit.

    Its type says so when it was set (we set it on every circuit); else a circuit address does.
    """
    try:
        if connection.get_connection_type() == ConnectionType.RELAYED:
            return True
        return any(is_circuit_address(a) for a in connection.get_transport_addresses() or [])
    except (AttributeError, NotImplementedError):  # a connection layer that keeps neither
        return False


@dataclass(frozen=True, slots=True)
class CircuitLimit:
    """What a relay grants one circuit; None means no limit on that count."""

    data: int | None  # bytes, both directions together
    duration_s: float | None

    @classmethod
    def read(cls, message: HopMessage | StopMessage) -> CircuitLimit | None:
        """The limit a HOP or STOP message carries (None: it carries none, the circuit is unlimited).

        ``0`` is read as "no limit" too (py-libp2p's relay sends explicit zeros for that).
        A duration over ``MAX_DURATION_S`` is taken to be milliseconds (js-libp2p's unit).
        """
        if not message.HasField("limit"):
            return None
        limit = message.limit
        data = int(limit.data) if limit.HasField("data") and limit.data else None
        duration: float | None = None
        if limit.HasField("duration") and limit.duration:
            duration = float(limit.duration)
            if duration > MAX_DURATION_S:
                duration /= 1000
        return None if data is None and duration is None else cls(data, duration)


class CircuitMeter:
    """The bytes that crossed one relayed connection (both directions) against its limit.

    Counted at the raw connection under Noise and Yamux, so it sees what the relay counts.
    """

    def __init__(self, limit: CircuitLimit | None, dialled: multiaddr.Multiaddr | None = None) -> None:
        self.limit = limit
        self.dialled = dialled  # the /p2p-circuit address we dialled it at (None: we accepted it)
        self.opened = time.monotonic()
        self.bytes = 0
        self.closed_by_us = False  # else a circuit that ended short of its limit was cut

    def cut_short(self) -> bool:
        """Whether this circuit (now ended) looks cut by a relay enforcing less than it
        advertised: it ended without our closing it, before its time, after carrying a good
        share of its data limit but not all (a relay that goes away cuts at any point; a
        share of ``CUT_MIN_SHARE`` keeps that from capping a generous relay's circuits)."""
        if self.closed_by_us or self.limit is None or self.limit.data is None:
            return False
        seconds = self.remaining_s()
        carried = self.limit.data * CUT_MIN_SHARE <= self.bytes < self.limit.data - SPENT_BYTES
        return carried and (seconds is None or seconds > 0)

    def remaining_bytes(self) -> int | None:
        if self.limit is None or self.limit.data is None:
            return None
        return max(0, self.limit.data - self.bytes)

    def remaining_s(self) -> float | None:
        if self.limit is None or self.limit.duration_s is None:
            return None
        return max(0.0, self.limit.duration_s - (time.monotonic() - self.opened))

    def spent(self) -> bool:
        """Whether so little is left that the next request should go over a fresh circuit."""
        left, seconds = self.remaining_bytes(), self.remaining_s()
        if seconds is not None and seconds < SPENT_S:
            return True
        if left is None or self.limit is None or self.limit.data is None:
            return False
        return left < max(SPENT_BYTES, self.limit.data * SPENT_FRACTION)


class MeteredConnection(RawConnection):
    """A raw connection over a circuit stream that counts what crosses it."""

    def __init__(self, stream: INetStream, meter: CircuitMeter, **kwargs: Any) -> None:
        super().__init__(stream, **kwargs)
        self.meter = meter

    async def write(self, data: bytes) -> None:
        self.meter.bytes += len(data)
        await super().write(data)

    async def read(self, n: int | None = None) -> bytes:
        data = await super().read(n)
        self.meter.bytes += len(data)
        return data


class CircuitMeters:
    """The meter of every live relayed connection, by its muxed connection (weakly: a
    closed connection's meter goes with it, so this never outgrows the open connections).

    A relay may cut circuits before the limit it advertised. When a peer's circuit ended
    short of its limit without our closing it, the bytes it had carried become that peer's
    *cap* (``CUT_CAP_FRACTION`` of them, at least ``SPENT_BYTES * 2``): later circuits to it
    are budgeted to the cap. The last meter and the cap are kept for ``MAX_TRACKED_PEERS``.
    """

    def __init__(self) -> None:
        self._meters: weakref.WeakKeyDictionary[Any, CircuitMeter] = weakref.WeakKeyDictionary()
        self._last: OrderedDict[PeerID, CircuitMeter] = OrderedDict()
        self._caps: OrderedDict[PeerID, tuple[int, float]] = OrderedDict()  # cap, when learned
        self._closing_in, self._closing_out = trio.open_memory_channel[Any](CLOSING_BUFFER)

    async def run(self) -> None:
        """Close spent circuits in the background: py-libp2p's close of a connection takes
        ~0.2 s (Yamux sleeps 0.1 s in it), and the next request need not wait for that."""
        async with trio.open_nursery() as nursery:
            async for connection in self._closing_out:
                nursery.start_soon(self._close, connection)

    @staticmethod
    async def _close(connection: Any) -> None:
        with closing_quietly("closing a spent circuit", CLOSE_TIMEOUT_S):
            await connection.close()

    def add(self, muxed: Any, meter: CircuitMeter) -> None:
        self._meters[muxed] = meter

    def of(self, connection: Any) -> CircuitMeter | None:
        """The meter of a swarm or muxed connection, if it is a metered circuit."""
        return self._meters.get(getattr(connection, "muxed_conn", connection))

    def limiting(self, host: IHost, peer: PeerID) -> CircuitMeter | None:
        """The meter of the limited circuit a new stream to ``peer`` would take; None when a
        direct connection exists (the swarm prefers it) or no open connection is limited."""
        connections = [c for c in host.get_network().get_connections(peer) if not c.is_closed]
        if any(not is_relayed(c) for c in connections):
            return None
        meters = [m for m in map(self.of, connections) if m is not None and m.limit is not None]
        return meters[0] if meters else None

    async def budget(
        self,
        host: IHost,
        peer: PeerID,
        connect: Callable[[multiaddr.Multiaddr | None], Awaitable[None]],
        wait_direct: Callable[[PeerID, float], Awaitable[None]] | None,
        *,
        fresh: bool,
    ) -> int | None:
        """Bytes of sync frames the next request to ``peer`` and its answer may take (None:
        no limit), the circuit's remaining bytes less ``MARGIN_BYTES`` and ``MARGIN_FRACTION``.

        Before bulk goes over a limited circuit, a hole punch running towards the peer gets
        ``DIRECT_WAIT_S`` (``wait_direct``) to bring a direct connection, which then carries
        it. A spent circuit (``CircuitMeter.spent``), or any when ``fresh``, is closed and
        ``connect`` opens a new one (the limit of a circuit is known once the relay answered),
        given the spent one's circuit address if we dialled it: a request to another address
        of the peer that only rode the circuit (a direct one, perhaps never reachable) must not
        turn into a dial of that address when the circuit is replaced.
        """
        meter = self.limiting(host, peer)
        if meter is not None and wait_direct is not None:
            await wait_direct(peer, DIRECT_WAIT_S)
            meter = self.limiting(host, peer)
        again: multiaddr.Multiaddr | None = None
        if meter is not None and (fresh or meter.spent() or self._left(peer, meter) < SPENT_BYTES):
            again = meter.dialled
            await self.close_circuits(host, peer)
            meter = None
        if meter is None:
            await connect(again)
            meter = self.limiting(host, peer)
        self._track(peer, meter)
        if meter is None or meter.limit is None or meter.limit.data is None:
            return None
        left = self._left(peer, meter)
        return max(0, left - MARGIN_BYTES - int(left * MARGIN_FRACTION))

    def _left(self, peer: PeerID, meter: CircuitMeter) -> int:
        """What the circuit has left, within the peer's cap if its circuits were cut before."""
        left = meter.remaining_bytes()
        cap, learned = self._caps.get(peer, (None, 0.0))
        if cap is not None and time.monotonic() - learned < CAP_TTL_S:
            left = min(cap - meter.bytes, left if left is not None else cap)
        return max(0, left) if left is not None else MAX_UNLIMITED

    def _track(self, peer: PeerID, meter: CircuitMeter | None) -> None:
        """Learn a cap from the peer's previous circuit if it was cut short; remember this one."""
        last = self._last.get(peer)
        if last is not None and last is not meter and last.cut_short():
            cap = max(2 * SPENT_BYTES, int(last.bytes * CUT_CAP_FRACTION))
            self._caps[peer] = (cap, time.monotonic())
            self._caps.move_to_end(peer)
            log.info("a circuit to %s was cut after %d bytes: later ones are budgeted to %d", peer, last.bytes, cap)
        if meter is None:
            self._last.pop(peer, None)
        else:
            self._last[peer] = meter
            self._last.move_to_end(peer)
        for table in (self._last, self._caps):
            while len(table) > MAX_TRACKED_PEERS:
                table.popitem(last=False)

    async def close_circuits(self, host: IHost, peer: PeerID) -> None:
        """Close every metered circuit to ``peer`` (spent: the next request opens a new one).

        Returns once each counts as closed (the first thing a close does), so a dial that
        follows opens a new circuit; the rest of the close goes on in ``run`` if it runs.
        """
        for connection in list(host.get_network().get_connections(peer)):
            meter = self.of(connection)
            if meter is None or connection.is_closed:
                continue
            meter.closed_by_us = True
            try:
                self._closing_in.send_nowait(connection)
            except trio.WouldBlock:  # a backlog of closes (or run() is not running): close it here
                await self._close(connection)
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                while not connection.is_closed:
                    await trio.sleep(0)
            if not connection.is_closed:  # the background closer did not get to it: do it here
                await self._close(connection)


__all__ = [
    "CircuitLimit",
    "CircuitMeter",
    "CircuitMeters",
    "MeteredConnection",
    "is_circuit_address",
    "is_relayed",
    "split_circuit_address",
]
