"""Hole punching (DCUtR): upgrade a relayed connection to a direct one where the NATs allow.

The spec (libp2p/specs relay/DCUtR.md): once the relayed connection is up and identify has
run on it, the peer that *accepted* it checks the other's identify addresses (a direct dial
when they may be reachable), then opens ``/libp2p/dcutr``, sends CONNECT with its observed
addresses and times the round trip; the dialler answers with its own CONNECT; the
acceptor sends SYNC and dials after half the round trip, the dialler dials on receiving
SYNC (a TCP simultaneous open through both NATs).

py-libp2p supplies the dials a punch needs (from the listen port, upgraded with the roles
a simultaneous open needs: ``dial_addr_as_responder``) and ``DCUtRProtocol``'s address
helpers; this module drives the rest, because the library's own driving
* starts from *both* ends towards every relayed peer every 2 s, and only ever from a timer,
  not once identify has told either side anything (its first CONNECT then carried
  whatever addresses happened to be known);
* dials the peer's known addresses first with a 10 s timeout (0.2 s punches became 10.2 s);
* waits out 5 s in every round of dials even when a NAT has reset them all at once;
* reports nothing, swallows every reason a punch failed, and closes the relayed connection
  60 s after a punch on a timer, whether or not the direct one works.

Here the accepting end starts one attempt per accepted circuit, after identify has run on
it and an observed address of our own is known (each wait bounded); the other end answers.
Every attempt, on both ends, is recorded with its start, duration, outcome and, when it
fails, why (:class:`HolePunchResult`); running attempts are visible too. Once a direct
connection to a peer exists (by a punch or any other path) and a ping over it has come
back, the relayed connection is closed as soon as its streams are done (at most
``relay_grace_s`` later), giving the relay its circuit back. When punching fails the
relayed connection stays and sync goes on over it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.io.utils import read_exactly
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerstore import PeerStoreError
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol, _local_tcp_listen_addrs, read_dcutr_msg
from libp2p.relay.circuit_v2.pb.dcutr_pb2 import HolePunch
from libp2p.relay.circuit_v2.utils import write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service
from multiaddr.exceptions import Error as MultiaddrError

from sync.transport import TaskStatus

from .circuits import is_circuit_address, is_relayed
from .errors import quietly

log = logging.getLogger(__name__)

IDENTIFY_WAIT_S = 3.0  # before starting: identify on the relayed connection, and an observed address of ours
UNILATERAL_TIMEOUT_S = 2.0  # a plain dial to the peer's identify addresses before punching (public peers)
DIAL_TIMEOUT_S = 5.0  # one punch dial
ROUNDS = 3  # of simultaneous dials (the spec lets the initiator retry twice)
ROUND_TIMEOUT_S = 5.0
ROUND_PAUSE_S = 2.0  # after a round: the peer's dial may still land; then the next round
EXCHANGE_TIMEOUT_S = 10.0  # one CONNECT or SYNC message over the relay
PUNCH_TIMEOUT_S = 45.0  # a whole attempt: the waits, step 0, the exchange, three rounds
RETRY_AFTER_FAILURE_S = 30.0  # a new circuit from a peer we just failed with starts no new attempt sooner
RELAY_GRACE_S = 30.0  # the longest streams on the relayed connection may run on once direct works
PROOF_TIMEOUT_S = 5.0  # the ping over a new direct connection that shows it carries traffic
SWEEP_INTERVAL_S = 0.5  # how often peers holding a direct and a relayed connection are looked for
REQUEST_BUFFER = 64  # inbound circuits waiting for a punch; more are dropped (they stay relayed)
HISTORY = 64  # attempts kept for the status, and peers whose latest attempt is kept
CLOSE_TIMEOUT_S = 2.0  # closing a connection whose other end may be gone
MAX_REASONS = 8  # addresses whose dial errors a failed attempt's reason names
POLL_S = 0.05
FIRST_ATTEMPT_WAIT_S = IDENTIFY_WAIT_S + 1.0  # for the accepting end's first attempt to begin (see wait_quiet)
REOPEN_PAUSE_S = 0.2  # before the one retry of the DCUtR stream: a spent circuit's replacement is being dialled

Role = Literal["initiator", "responder"]
Outcome = Literal["direct", "dialled", "failed"]


@dataclass(frozen=True, slots=True)
class HolePunchResult:
    """One hole-punching attempt with one peer, as one end saw it."""

    peer: str
    role: Role  # initiator: we accepted the relayed connection and started DCUtR
    succeeded: bool  # a direct connection to the peer exists afterwards
    duration_s: float
    at: float  # unix time the attempt ended
    error: str | None = None  # why it failed; None exactly when it succeeded
    started_at: float = 0.0  # unix time the attempt started
    outcome: Outcome = "failed"  # direct: punched; dialled: a plain dial reached the peer first


@dataclass(frozen=True, slots=True)
class RunningPunch:
    """An attempt under way (``status().hole_punches_running``)."""

    peer: str
    role: Role
    started_at: float  # unix time


class PunchFailed(Exception):
    """An attempt failed; the message is the reason recorded."""


def _is_public(address: Any) -> bool:
    """A direct IP address of global scope (what a peer behind another NAT may reach)."""
    if is_circuit_address(address):
        return False
    for protocol in ("ip4", "ip6"):
        with contextlib.suppress(MultiaddrError, ValueError):  # no such part, or not an IP
            return ipaddress.ip_address(address.value_for_protocol(protocol)).is_global
    return False


def _reason(exc: BaseException) -> str:
    """The innermost cause of a library error, as one line (py-libp2p wraps them twice)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return " ".join(f"{type(exc).__name__}: {exc}".split())


class _Dcutr(DCUtRProtocol):
    """py-libp2p's DCUtR, driven as the module docstring says, failing with reasons."""

    def __init__(self, host: IHost, answer: Callable[[INetStream], Awaitable[None]]) -> None:
        super().__init__(host, read_timeout=int(EXCHANGE_TIMEOUT_S), dial_timeout=int(DIAL_TIMEOUT_S))
        self.answer = answer  # HolePuncher.answer: the responder's side of an attempt
        self._dial_errors: dict[PeerID, dict[str, str]] = {}  # per attempt: address -> its last dial's failure

    async def _auto_drive_loop(self) -> None:
        await trio.sleep_forever()  # attempts are started by HolePuncher.request

    def _schedule_relay_close(self, peer_id: PeerID) -> None:
        """The puncher closes relayed connections once the direct one carried traffic."""

    async def _handle_dcutr_stream(self, stream: INetStream) -> None:
        try:
            await self.answer(stream)
        except Exception as exc:  # a stream handler must never raise
            log.info("DCUtR stream from %s ended: %s", stream.muxed_conn.peer_id, _reason(exc))

    async def wait_identified(self, peer: PeerID) -> None:
        """Until identify has run with ``peer`` and we know an address the relay saw us at
        (what goes into CONNECT); each bounded, the attempt goes on with what is known."""
        started = trio.current_time()
        with trio.move_on_after(IDENTIFY_WAIT_S):
            while not self._identified(peer) or not self._observed():
                await trio.sleep(POLL_S)
        log.info(
            "hole punching with %s: starting after %.2f s (identify %s, observed address %s)",
            peer,
            trio.current_time() - started,
            "done" if self._identified(peer) else "not done",
            "known" if self._observed() else "unknown",
        )

    def _identified(self, peer: PeerID) -> bool:
        try:
            return bool(self.host.get_peerstore().get_protocols(peer))
        except PeerStoreError:
            return False

    def _observed(self) -> bool:
        manager = getattr(self.host, "_observed_addr_manager", None)
        if manager is None:
            return True  # address discovery is off: nothing to wait for
        return any(not is_circuit_address(a) for a in manager.addrs(min_observers=1))

    def check_speaks_dcutr(self, peer: PeerID) -> None:
        if self._identified(peer) and DCUTR_PROTOCOL not in self.host.get_peerstore().get_protocols(peer):
            raise PunchFailed(f"the peer does not offer {DCUTR_PROTOCOL} (identify)")

    async def _try_unilateral_upgrade(self, peer_id: PeerID) -> bool:
        """Spec step 0: dial the peer's identify addresses that are public; a private one
        behind another NAT would only cost the dial timeout (a peer on our own LAN is reached
        by the punch's dials, which include them)."""
        try:
            addresses = [a for a in self.host.get_peerstore().addrs(peer_id) if _is_public(a)]
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

    async def _dial_peer(
        self, peer_id: PeerID, addr: Any, source: tuple[str, int] | None = None, as_responder: bool = False
    ) -> None:
        """The library's dial, keeping why it failed (the library only logs it)."""
        network: Any = self.host.get_network()
        try:
            known = list(self.host.get_peerstore().addrs(peer_id))
        except PeerStoreError:
            known = []
        try:
            with trio.fail_after(DIAL_TIMEOUT_S):
                if as_responder:
                    await network.dial_addr_as_responder(addr, peer_id, source)
                else:
                    await network.dial_addr(addr, peer_id, source)
        except trio.TooSlowError:
            self._dial_failed(peer_id, addr, f"no answer in {DIAL_TIMEOUT_S:g} s")
            return
        except Exception as exc:  # any library failure is this dial's outcome, kept for the attempt's reason
            self._dial_failed(peer_id, addr, _reason(exc))
            if "mismatch" in str(exc).lower() and known:  # the swarm cleared the peer's addresses
                self.host.get_peerstore().add_addrs(peer_id, known, 600)
            return
        if await self._verify_direct_connection(peer_id):
            self._direct_connections.add(peer_id)

    def _dial_failed(self, peer: PeerID, address: Any, reason: str) -> None:
        errors = self._dial_errors.get(peer)
        key = str(address).split("/p2p/")[0]
        if errors is not None and (len(errors) < MAX_REASONS or key in errors):
            errors[key] = reason

    async def _perform_hole_punch(self, peer_id: PeerID, addrs: list[Any], as_responder: bool = False) -> bool:
        """Rounds of simultaneous dials (py-libp2p's: three, 5 s each, from the listen port),
        except that a round ends once every dial to an address the peer's CONNECT named has
        failed, followed by up to ``ROUND_PAUSE_S`` for a connection the peer's own dial made:
        a NAT that resets unsolicited SYNs fails them at once, and the library waited out 5 s
        per round anyway (21 s per failed attempt, now ~6 s). The peer's other known
        addresses (identify: a peer on our own LAN) are dialled alongside, but never hold
        a round open (a private address behind another NAT only times out)."""
        named = [a for a in addrs if not is_circuit_address(a)]
        known = {str(a) for a in named}
        try:
            extra = [a for a in self.host.get_peerstore().addrs(peer_id) if str(a) not in known]
        except PeerStoreError:  # nothing else known
            extra = []
        extra = [a for a in extra if not is_circuit_address(a)]
        listen = _local_tcp_listen_addrs(self.host)
        source = (listen[0][1], listen[0][2]) if listen else None
        for _ in range(ROUNDS):
            with trio.move_on_after(ROUND_TIMEOUT_S):
                await self._round(peer_id, named, extra, source, as_responder)
            with trio.move_on_after(ROUND_PAUSE_S):
                while not await self._verify_direct_connection(peer_id):
                    await trio.sleep(POLL_S * 2)
            if await self._verify_direct_connection(peer_id):
                return True
        return False

    async def _round(
        self, peer: PeerID, named: list[Any], extra: list[Any], source: tuple[str, int] | None, as_responder: bool
    ) -> None:
        """One round: dial everything at once; over when connected or every ``named`` dial ended."""
        pending = len(named)
        async with trio.open_nursery() as nursery:

            async def dial(address: Any, counted: bool) -> None:
                nonlocal pending
                await self._dial_peer(peer, address, source, as_responder)
                pending -= counted
                if not pending or await self._verify_direct_connection(peer):
                    nursery.cancel_scope.cancel()

            for address in named:
                nursery.start_soon(dial, address, True)
            for address in extra:
                nursery.start_soon(dial, address, False)

    async def punch(self, peer: PeerID, addresses: list[Any], *, as_responder: bool) -> None:
        """The simultaneous dials; raises PunchFailed naming each address dialled with its
        last dial's error."""
        self._dial_errors[peer] = {}
        try:
            if not await self._perform_hole_punch(peer, addresses, as_responder=as_responder):
                errors = self._dial_errors[peer]
                detail = "; ".join(f"{a}: {e}" for a, e in errors.items()) or "no dial completed"
                raise PunchFailed(f"no direct connection after {ROUNDS} rounds of simultaneous dials: {detail}")
        finally:
            self._dial_errors.pop(peer, None)

    async def exchange_as_initiator(self, peer: PeerID) -> tuple[list[Any], float]:
        """CONNECT both ways and our SYNC over the relayed connection; the peer's addresses and the RTT."""
        stream = await self._open_exchange(peer)
        try:
            sent = time.monotonic()
            await self._send(stream, HolePunch.CONNECT, await self._get_observed_addrs())
            answer = await self._receive(stream, HolePunch.CONNECT, "CONNECT")
            rtt = time.monotonic() - sent
            await self._send(stream, HolePunch.SYNC, [])
            return self._peer_addresses(peer, answer), rtt
        finally:
            with quietly("closing a DCUtR stream"), trio.move_on_after(CLOSE_TIMEOUT_S):
                await stream.close()

    async def _open_exchange(self, peer: PeerID) -> INetStream:
        """The DCUtR stream, on whichever relayed connection to ``peer`` is live now. Over a
        relay with limited circuits the one the attempt began on may be spent and replaced
        while identify is awaited (each lasts ~0.5 s during a bulk transfer): one retry
        takes the circuit that replaced it."""
        try:
            return await self.host.new_stream(peer, [DCUTR_PROTOCOL])
        except Exception as exc:  # any library failure: retried once, below
            log.debug("opening %s to %s failed (%s): retrying on a live connection", DCUTR_PROTOCOL, peer, exc)
        await trio.sleep(REOPEN_PAUSE_S)
        try:
            return await self.host.new_stream(peer, [DCUTR_PROTOCOL])
        except Exception as exc:  # any library failure: the peer cannot be asked, which is the reason
            raise PunchFailed(f"opening {DCUTR_PROTOCOL}: {_reason(exc)}") from exc

    async def exchange_as_responder(self, stream: INetStream) -> list[Any]:
        """The peer's CONNECT, our CONNECT, the peer's SYNC; the peer's addresses."""
        peer = stream.muxed_conn.peer_id
        connect = await self._receive(stream, HolePunch.CONNECT, "CONNECT")
        with trio.move_on_after(IDENTIFY_WAIT_S):  # our own observed address goes into the answer
            while not self._observed():
                await trio.sleep(POLL_S)
        await self._send(stream, HolePunch.CONNECT, await self._get_observed_addrs())
        await self._receive(stream, HolePunch.SYNC, "SYNC")
        return self._peer_addresses(peer, connect)

    def _peer_addresses(self, peer: PeerID, message: Any) -> list[Any]:
        addresses = [a for a in self._decode_observed_addrs(list(message.ObsAddrs)) if not is_circuit_address(a)]
        if not addresses:
            raise PunchFailed("the peer's CONNECT named no direct address")
        self.host.get_peerstore().add_addrs(peer, addresses, 600)
        return addresses

    async def _send(self, stream: INetStream, kind: Any, addresses: list[bytes]) -> None:
        message = HolePunch(type=kind)
        message.ObsAddrs.extend(addresses)
        try:
            with trio.fail_after(EXCHANGE_TIMEOUT_S):
                await write_delimited_msg(stream, message)
        except trio.TooSlowError:
            raise PunchFailed(f"sending {HolePunch.Type.Name(kind)} took over {EXCHANGE_TIMEOUT_S:g} s") from None
        except Exception as exc:  # the relayed stream broke: that is the reason
            raise PunchFailed(f"sending {HolePunch.Type.Name(kind)}: {_reason(exc)}") from exc

    async def _receive(self, stream: INetStream, kind: Any, name: str) -> Any:
        try:
            with trio.fail_after(EXCHANGE_TIMEOUT_S):
                message = await read_dcutr_msg(stream, HolePunch)
        except trio.TooSlowError:
            raise PunchFailed(f"the peer sent no {name} in {EXCHANGE_TIMEOUT_S:g} s") from None
        except Exception as exc:  # a broken stream or a malformed message: the peer's failure, recorded
            raise PunchFailed(f"reading the peer's {name}: {_reason(exc)}") from exc
        if message.type != kind:
            raise PunchFailed(f"the peer sent {HolePunch.Type.Name(message.type)} where {name} was due")
        return message


class HolePuncher:
    """Runs DCUtR, keeps every attempt's outcome, and retires relayed connections."""

    def __init__(self, host: IHost, *, relay_grace_s: float = RELAY_GRACE_S) -> None:
        self._host = host
        self.relay_grace_s = relay_grace_s
        self._service = _Dcutr(host, self.answer)
        self._requests_in, self._requests_out = trio.open_memory_channel[PeerID](REQUEST_BUFFER)
        self.results: OrderedDict[str, HolePunchResult] = OrderedDict()  # the latest attempt per peer
        self.history: deque[HolePunchResult] = deque(maxlen=HISTORY)
        self._running: dict[tuple[PeerID, Role], tuple[RunningPunch, trio.Event]] = {}
        self._retiring: set[PeerID] = set()
        self._awaited: OrderedDict[PeerID, None] = OrderedDict()  # peers whose first attempt was waited for

    def running(self) -> tuple[RunningPunch, ...]:
        return tuple(entry for entry, _ in self._running.values())

    def status_fields(self) -> dict[str, Any]:
        """The transport status's hole-punching fields (``Libp2pStatus``)."""
        return {
            "hole_punches": tuple(self.results.values()),
            "hole_punches_running": self.running(),
            "hole_punch_history": tuple(self.history),
        }

    def record(self, result: HolePunchResult) -> None:
        self.results.pop(result.peer, None)
        self.results[result.peer] = result
        while len(self.results) > HISTORY:
            self.results.popitem(last=False)
        self.history.append(result)
        if result.succeeded:
            what = (result.peer, result.role, result.outcome, result.duration_s)
            log.info("hole punching with %s (%s): %s in %.2f s", *what)
        else:
            log.info(
                "hole punching with %s (%s): failed after %.2f s, staying on the relay: %s",
                *(result.peer, result.role, result.duration_s, result.error),
            )

    @contextlib.asynccontextmanager
    async def _attempt(self, peer: PeerID, role: Role) -> AsyncIterator[dict[str, Any]]:
        """Times one attempt and records it; the body sets ``outcome`` or raises with the reason."""
        started, started_at = time.monotonic(), time.time()
        entry = RunningPunch(str(peer), role, started_at)
        self._running[(peer, role)] = (entry, trio.Event())
        state: dict[str, Any] = {"outcome": "failed", "error": None}
        try:
            yield state
        except PunchFailed as exc:
            state["error"] = str(exc)
        except trio.TooSlowError:
            state["error"] = f"no result in {PUNCH_TIMEOUT_S:g} s"
        except Exception as exc:  # any library failure is this attempt's outcome: recorded and logged
            state["error"] = _reason(exc)
        finally:
            _, done = self._running.pop((peer, role))
            done.set()
        succeeded = state["error"] is None and state["outcome"] != "failed"
        error = None if succeeded else state["error"] or "no direct connection"
        outcome: Outcome = state["outcome"] if succeeded else "failed"
        self.record(
            HolePunchResult(
                str(peer), role, succeeded, time.monotonic() - started, time.time(), error, started_at, outcome
            )
        )

    def request(self, peer: PeerID) -> None:
        """Start an attempt towards ``peer`` (called when we accept a relayed connection from it)."""
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._requests_in.send_nowait(peer)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self._service), trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_twins, nursery)
            task_status.started()
            async for peer in self._requests_out:
                if (peer, "initiator") in self._running or self._failed_recently(peer):
                    continue
                nursery.start_soon(self._initiate, peer)

    def _failed_recently(self, peer: PeerID) -> bool:
        last = self.results.get(str(peer))
        return last is not None and not last.succeeded and time.time() - last.at < RETRY_AFTER_FAILURE_S

    async def _initiate(self, peer: PeerID) -> None:
        """The accepting end's attempt (spec steps 1-6)."""
        service = self._service
        async with self._attempt(peer, "initiator") as state:
            with trio.fail_after(PUNCH_TIMEOUT_S):
                await service.wait_identified(peer)
                service.check_speaks_dcutr(peer)
                if await service._try_unilateral_upgrade(peer):
                    state["outcome"] = "dialled"
                    return
                addresses, rtt = await service.exchange_as_initiator(peer)
                await trio.sleep(min(rtt / 2, 2.0))
                await service.punch(peer, addresses, as_responder=True)
                state["outcome"] = "direct"

    async def answer(self, stream: INetStream) -> None:
        """The other end: answer the peer's CONNECT and SYNC, then dial."""
        peer = stream.muxed_conn.peer_id
        service = self._service
        try:
            if await service._have_direct_connection(peer):
                return  # nothing to punch: not an attempt
            async with self._attempt(peer, "responder") as state:
                with trio.fail_after(PUNCH_TIMEOUT_S):
                    addresses = await service.exchange_as_responder(stream)
                    await service.punch(peer, addresses, as_responder=False)
                    state["outcome"] = "direct"
        finally:
            with quietly("closing a DCUtR stream"), trio.move_on_after(CLOSE_TIMEOUT_S):
                await stream.close()

    async def _watch_twins(self, nursery: trio.Nursery) -> None:
        """Retire the relayed connections of every peer that also has a direct one, however it came."""
        network: Any = self._host.get_network()
        while True:
            await trio.sleep(SWEEP_INTERVAL_S)
            for peer in list(network.connections):
                if peer in self._retiring:
                    continue
                connections = [c for c in network.get_connections(peer) if not c.is_closed]
                if any(is_relayed(c) for c in connections) and any(not is_relayed(c) for c in connections):
                    self._retiring.add(peer)
                    nursery.start_soon(self._retire_relayed, peer)

    async def _retire_relayed(self, peer: PeerID) -> None:
        """Close ``peer``'s relayed connections once a ping over the direct one came back and
        their streams are done (or ``relay_grace_s`` passed); keep them if the direct one fails."""
        network: Any = self._host.get_network()
        try:
            direct = next((c for c in network.get_connections(peer) if not c.is_closed and not is_relayed(c)), None)
            if direct is None or not await _ping(direct):
                log.info("the direct connection to %s carried no ping: keeping the relayed one", peer)
                return
            with trio.move_on_after(self.relay_grace_s):
                while any(c.get_streams() for c in network.get_connections(peer) if is_relayed(c)):
                    await trio.sleep(POLL_S * 4)
            for connection in [c for c in network.get_connections(peer) if is_relayed(c) and not c.is_closed]:
                log.info("closing the relayed connection to %s: the direct one carries traffic", peer)
                with trio.move_on_after(CLOSE_TIMEOUT_S), quietly(f"closing the relayed connection to {peer}"):
                    await connection.close()
        finally:
            self._retiring.discard(peer)

    async def wait_quiet(self, peer: PeerID, timeout_s: float) -> None:
        """Returns once no attempt towards ``peer`` is running, or after ``timeout_s``.

        The first time for a peer with no attempt yet, it first waits up to
        ``FIRST_ATTEMPT_WAIT_S`` for one to begin: the end that accepted the circuit starts
        only after identify, and bulk started meanwhile over a limited circuit would churn
        circuits under the punch's own exchange. Once per peer (at most ``HISTORY`` remembered),
        so a peer that never punches costs that wait once, not on every request.
        """
        with trio.move_on_after(timeout_s):
            if str(peer) not in self.results and peer not in self._awaited:
                self._awaited[peer] = None
                while len(self._awaited) > HISTORY:
                    self._awaited.popitem(last=False)
                with trio.move_on_after(FIRST_ATTEMPT_WAIT_S):
                    while not self._attempting(peer) and str(peer) not in self.results:
                        await trio.sleep(POLL_S)
            while running := [done for (p, _), (_, done) in self._running.items() if p == peer]:
                await running[0].wait()

    def _attempting(self, peer: PeerID) -> bool:
        return any(p == peer for p, _ in self._running)


async def _ping(connection: Any) -> bool:
    """One ``/ipfs/ping/1.0.0`` round trip on exactly this connection (not the peer's best one)."""
    stream: INetStream | None = None
    try:
        with trio.fail_after(PROOF_TIMEOUT_S):
            stream = await connection.new_stream()
            await MultiselectClient().select_one_of([TProtocol(PING_PROTOCOL)], MultiselectCommunicator(stream))
            payload = secrets.token_bytes(32)
            await stream.write(payload)
            return bool(await read_exactly(stream, 32) == payload)
    except Exception as exc:  # any failure means the connection is not shown to work; the caller logs it
        log.debug("ping over the direct connection failed: %s", _reason(exc))
        return False
    finally:
        if stream is not None:
            with quietly("closing a ping stream"), trio.move_on_after(CLOSE_TIMEOUT_S):
                await stream.close()
