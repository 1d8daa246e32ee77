"""Hole punching (DCUtR): upgrade a relayed connection to a direct one where the NATs allow.

py-libp2p's ``DCUtRProtocol`` does the exchange (CONNECT with observed addresses, SYNC,
simultaneous TCP dials from the listen port, three rounds) and closes the relayed
connection 60 s after a direct one verifies. What this module changes:

* Its auto-drive loop makes *both* ends start sessions towards every relayed peer every
  2 s. Here only the end that accepted the relayed connection starts one, once, as the
  spec says; the other end answers through the protocol handler.
* Before punching it first dials the peer's known direct addresses (spec step 0) with its
  10 s dial timeout, so when those are private addresses behind another NAT every attempt
  costs 10 s before the punch even starts (measured: 0.2 s upgrades became 10.2 s). Here
  step 0 is bounded by ``UNILATERAL_TIMEOUT_S`` and stops at the first direct connection.
* It reports nothing. :class:`HolePuncher` times every attempt on both ends and keeps the
  outcome per peer, for the transport's status.
* It closes the relayed connection after a success only on the path that punched (not
  when step 0's plain dial succeeded). :class:`HolePuncher` closes it on both ends, on every
  path, ``RELAY_GRACE_S`` after the direct connection appeared (new streams already prefer
  the direct one), so the relay's circuit slot is given back.

When punching fails the relayed connection stays, and sync goes on over it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerstore import PeerStoreError
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.tools.anyio_service import background_trio_service

from sync.transport import TaskStatus

from .errors import quietly
from .relay import is_circuit_address, is_relayed

log = logging.getLogger(__name__)

UNILATERAL_TIMEOUT_S = 2.0  # a plain dial to the peer's known addresses before punching (public peers)
DIAL_TIMEOUT_S = 5.0  # one punch dial; rounds are bounded by py-libp2p at 5 s each
PUNCH_TIMEOUT_S = 45.0  # a whole attempt: step 0, the exchange over the relay, three rounds
RELAY_GRACE_S = 60.0  # streams already on the relayed connection get this long to finish once direct exists
SWEEP_INTERVAL_S = 1.0  # how often relayed connections that have a direct twin are looked for
REQUEST_BUFFER = 64  # inbound circuits waiting for a punch; more are dropped (they stay relayed)
HISTORY = 64  # attempts kept for the status
CLOSE_TIMEOUT_S = 2.0  # closing a connection whose other end may be gone

Role = Literal["initiator", "responder"]


@dataclass(frozen=True, slots=True)
class HolePunchResult:
    """One hole-punching attempt with one peer."""

    peer: str
    role: Role  # initiator: we accepted the relayed connection and started DCUtR
    succeeded: bool  # a direct connection to the peer exists afterwards
    duration_s: float
    at: float  # unix time the attempt ended
    error: str | None = None


class _Dcutr(DCUtRProtocol):
    """py-libp2p's DCUtR with the changes the module docstring lists."""

    def __init__(self, host: IHost, puncher: HolePuncher) -> None:
        super().__init__(host, dial_timeout=int(DIAL_TIMEOUT_S))
        self._puncher = puncher

    async def _auto_drive_loop(self) -> None:
        await trio.sleep_forever()  # attempts are started by HolePuncher.request

    async def _try_unilateral_upgrade(self, peer_id: PeerID) -> bool:
        try:
            addresses = [a for a in self.host.get_peerstore().addrs(peer_id) if not is_circuit_address(a)]
        except PeerStoreError:  # no address known for the peer (or they expired)
            return False
        if not addresses:
            return False
        with trio.move_on_after(UNILATERAL_TIMEOUT_S):
            async with trio.open_nursery() as nursery:

                async def dial(address: Any) -> None:
                    await self._dial_peer(peer_id, address)
                    if await self._verify_direct_connection(peer_id):
                        nursery.cancel_scope.cancel()

                for address in addresses:
                    nursery.start_soon(dial, address)
        return bool(await self._verify_direct_connection(peer_id))

    async def _handle_dcutr_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        started = time.monotonic()
        error: str | None = None
        try:
            try:
                await super()._handle_dcutr_stream(stream)  # catches its own errors
            except Exception as exc:  # whatever escapes it is this attempt's outcome, kept in its result
                error = f"{type(exc).__name__}: {exc}"
            succeeded = bool(await self._verify_direct_connection(peer))
            self._puncher.record(peer, "responder", succeeded, time.monotonic() - started, error)
        except Exception as exc:  # a stream handler must never raise
            log.info("DCUtR stream from %s ended: %s: %s", peer, type(exc).__name__, exc)


class HolePuncher:
    """Runs DCUtR and keeps the outcome of every attempt."""

    def __init__(self, host: IHost, *, relay_grace_s: float = RELAY_GRACE_S) -> None:
        self._host = host
        self.relay_grace_s = relay_grace_s
        self._service = _Dcutr(host, self)
        self._direct_since: dict[PeerID, float] = {}
        self._requests_in, self._requests_out = trio.open_memory_channel[PeerID](REQUEST_BUFFER)
        self.results: dict[str, HolePunchResult] = {}  # the latest attempt per peer
        self.history: deque[HolePunchResult] = deque(maxlen=HISTORY)
        self._running: set[PeerID] = set()

    def record(self, peer: PeerID, role: Role, succeeded: bool, duration_s: float, error: str | None) -> None:
        result = HolePunchResult(str(peer), role, succeeded, duration_s, time.time(), error)
        if succeeded:
            self._direct_since.setdefault(peer, trio.current_time())
        self.results[str(peer)] = result
        self.history.append(result)
        log.info(
            "hole punching with %s (%s): %s in %.2f s",
            peer,
            role,
            "direct connection" if succeeded else "failed, staying on the relay",
            duration_s,
        )

    def request(self, peer: PeerID) -> None:
        """Start an attempt towards ``peer`` (called when we accept a relayed connection from it)."""
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._requests_in.send_nowait(peer)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self._service), trio.open_nursery() as nursery:
            nursery.start_soon(self._close_relayed_twins)
            task_status.started()
            async for peer in self._requests_out:
                if peer not in self._running:
                    self._running.add(peer)
                    nursery.start_soon(self._punch, peer)

    async def _punch(self, peer: PeerID) -> None:
        started = time.monotonic()
        error: str | None = None
        succeeded = False
        try:
            with trio.fail_after(PUNCH_TIMEOUT_S):
                succeeded = bool(await self._service.initiate_hole_punch(peer))
        except trio.TooSlowError:
            error = f"no result in {PUNCH_TIMEOUT_S:g} s"
        except Exception as exc:  # any library failure is this attempt's outcome: recorded and logged
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self._running.discard(peer)
        self.record(peer, "initiator", succeeded, time.monotonic() - started, error)

    async def _close_relayed_twins(self) -> None:
        """Close a peer's relayed connections once a direct one has lived ``relay_grace_s``."""
        network: Any = self._host.get_network()
        while True:
            await trio.sleep(SWEEP_INTERVAL_S)
            now = trio.current_time()
            for peer, since in list(self._direct_since.items()):
                connections = [c for c in network.get_connections(peer) if not c.is_closed]
                if not any(not is_relayed(c) for c in connections):
                    del self._direct_since[peer]  # the direct connection is gone: keep the relay
                    continue
                if now - since < self.relay_grace_s:
                    continue
                del self._direct_since[peer]
                for connection in connections:
                    if is_relayed(connection):
                        log.info("closing the relayed connection to %s: a direct one is up", peer)
                        with trio.move_on_after(CLOSE_TIMEOUT_S), quietly(f"closing the relayed connection to {peer}"):
                            await connection.close()

    async def wait_quiet(self, peer: PeerID, timeout_s: float) -> None:
        """Until no attempt we started towards ``peer`` runs, at most ``timeout_s``: bulk about
        to cross a limited circuit waits briefly for the direct connection a punch may bring."""
        with trio.move_on_after(timeout_s):
            while peer in self._running:
                await trio.sleep(0.05)
