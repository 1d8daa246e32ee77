"""Reachability: can peers dial this node? Learned from dial-backs on fresh connections, with
an inference when no peer can dial back.

Three sources, each asked of (or read from) peers we are directly connected to, relays first:

* **our dial-back**, ``/eidetica/dialback/1.0.0`` (below); every node of ours answers it;
* **AutoNAT v1**, ``/libp2p/autonat/1.0.0`` (:mod:`transports.autonat`), which js and go
  relays serve when configured to; its "OK" counts only if a fresh inbound connection
  arrived while the request was open (py-libp2p's server "dials back" over the connection
  the asker already holds: a false "public");
* **inference**: a relay reservation works and no peer reports seeing us at one of our own
  addresses (:mod:`transports.observed`): a NAT stands between us and everyone, so we are
  "private" even when nobody can dial back.

:func:`combine` turns their latest verdicts into one: a dial-back (ours or AutoNAT's) is a
test, so the newest test wins; the inference stands only while no test has answered.

Our protocol:

1. The asker opens a stream to a peer it is directly connected to and sends
   ``{"addrs": [its direct listen addresses]}`` (msgpack, varint length prefix).
2. The server builds the targets: each address's TCP port at the IP it observes the asker
   at (so it never dials a third party, and a NAT with a forwarded port counts as public).
   It dials them from a **new host with a new key**, which has no connection to reuse, and
   the Noise handshake proves that the asker's peer ID answered.
3. It answers ``{"status": "reachable" | "unreachable" | "refused", "address", "error"}``.

"refused" (rate limit, a relayed connection, no TCP address) lets the asker try another
peer. Servers remember what they found about each asker (bounded), so a relay can tell who
among its clients is behind NAT. A peer that lacks a protocol is skipped at debug level
(:func:`open_quietly`: py-libp2p's ``new_stream`` logs a seven-line ERROR block for it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import msgpack
import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerstore import PeerStoreError
from libp2p.protocol_muxer.exceptions import ProtocolNotSupportedError
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited
from multiaddr.exceptions import Error as MultiaddrError

from sync.transport import TaskStatus

from .circuits import is_circuit_address, is_relayed
from .errors import closing_quietly, quietly
from .observed import ObservedAddresses

log = logging.getLogger(__name__)

DIALBACK_PROTOCOL = TProtocol("/eidetica/dialback/1.0.0")

Reachability = Literal["public", "private", "unknown"]
Source = Literal["dialback", "autonat", "inference"]
Verdict = Literal["reachable", "unreachable", "refused"]

MAX_MESSAGE_BYTES = 4096  # a few addresses; anything bigger is not ours
MAX_TARGETS = 4  # addresses dialled back per request, so one request cannot make us dial a list
DIAL_TIMEOUT_S = 5.0  # per target: a NAT that drops the SYN costs this much, so keep it short
REQUEST_TIMEOUT_S = 30.0  # the asker waits for the whole answer: up to MAX_TARGETS dials plus set-up
READ_TIMEOUT_S = 10.0  # the request itself is one small frame
CLOSE_TIMEOUT_S = 2.0  # closing a stream whose other end may be gone
HOST_CLOSE_TIMEOUT_S = 5.0  # closing the throwaway host (its listeners and connections)
MIN_INTERVAL_PER_PEER_S = 2.0  # a peer asking again sooner than this is refused, not served
RATE_TABLE_SIZE = 1024  # peers remembered for the rate limit before old entries are dropped
OUTCOMES_KEPT = 256  # askers whose dial-back result a server keeps for its status
CONCURRENT_DIALBACKS = 2  # each one starts a host of its own (~2 MiB, a few ms)
WAITING_DIALBACKS = 16  # requests queued for those two; more are refused ("busy"), not held
# After a successful dial the fresh host stays up this long: the dialled node identifies every
# inbound connection, and a host gone mid-identify makes py-libp2p log an error there.
LINGER_S = 0.5
RECHECK_S = 600.0  # how often a node checks again once known (networks change under laptops)
RETRY_MIN_S = 1.0  # first wait while no source has a verdict; doubles up to the recheck interval
CANDIDATES_PER_CHECK = 3  # peers asked per check before giving up for this round


@dataclass(frozen=True, slots=True)
class DialbackOutcome:
    """What one source found: about the asker (server side) or about this node (asker side)."""

    peer: str  # the asker (server side), or the peer that answered / the relay we infer from
    reachability: Reachability
    address: str | None = None  # the address that answered
    error: str | None = None
    at: float = 0.0  # unix time
    source: Source = "dialback"


class ProtocolMissing(Exception):
    """The peer does not speak the protocol (its identify said so, or multistream-select did)."""


async def open_quietly(host: IHost, peer: PeerID, protocol: TProtocol) -> INetStream:
    """A stream to ``peer`` speaking ``protocol``, or :class:`ProtocolMissing`.

    ``host.new_stream`` logs a multi-line ERROR block for every peer that lacks the protocol
    (a js or go relay lacks ours): this negotiates the same way without it, and skips the
    round trip when identify already listed the peer's protocols.
    """
    try:
        known = host.get_peerstore().get_protocols(peer)
    except PeerStoreError:  # not identified yet: ask multistream-select
        known = []
    if known and protocol not in known:
        raise ProtocolMissing(f"{peer} does not list {protocol}")
    stream = await host.get_network().new_stream(peer)
    opened = False
    try:
        communicator = MultiselectCommunicator(stream)
        client = MultiselectClient()
        await client.handshake(communicator)
        await client.try_select(communicator, protocol)
        stream.set_protocol(protocol)
        opened = True
        return stream
    except ProtocolNotSupportedError as exc:
        raise ProtocolMissing(f"{peer} does not speak {protocol}") from exc
    finally:
        if not opened:
            with closing_quietly("resetting a refused stream", CLOSE_TIMEOUT_S):
                await stream.reset()


def _encode(payload: dict[str, Any]) -> bytes:
    return encode_varint_prefixed(msgpack.packb(payload))


async def _read(stream: INetStream) -> dict[str, Any]:
    data = await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE_BYTES)
    message = msgpack.unpackb(data)
    if not isinstance(message, dict):
        raise ValueError("a dial-back message is a map")
    return message


def observed_ip(stream: INetStream) -> str | None:
    """The IP the stream's connection comes from, None when the connection layer does not know."""
    try:
        remote = stream.get_remote_address()
    except OSError:  # the socket is already gone (getpeername)
        return None
    return str(remote[0]) if remote else None


def dialback_targets(addresses: list[str], observed: str) -> list[multiaddr.Multiaddr]:
    """The asker's TCP ports at the IP we see it at (never anyone else's IP), de-duplicated."""
    targets: list[multiaddr.Multiaddr] = []
    for text in addresses:
        if is_circuit_address(text):
            continue
        try:
            port = int(multiaddr.Multiaddr(text).value_for_protocol("tcp"))
        except (ValueError, MultiaddrError):  # the asker's own claim: not a TCP multiaddr, skipped
            continue
        family = "ip6" if ":" in observed else "ip4"
        target = multiaddr.Multiaddr(f"/{family}/{observed}/tcp/{port}")
        if target not in targets:
            targets.append(target)
    return targets[:MAX_TARGETS]


class DialbackServer:
    """Answers dial-back requests (ours, and AutoNAT's through :meth:`verdict`), dialling
    from a fresh host each time.

    ``fresh_host`` makes a host with a new random identity and no connections; the server
    runs it for one request and closes it. Both protocols share the per-peer rate limit and
    the two concurrent dial-backs.
    """

    def __init__(self, host: IHost, fresh_host: Callable[[], IHost]) -> None:
        self._host = host
        self._fresh_host = fresh_host
        self._limiter = trio.CapacityLimiter(CONCURRENT_DIALBACKS)
        self._last_request: dict[PeerID, float] = {}
        self.outcomes: dict[str, DialbackOutcome] = {}

    def start(self) -> None:
        self._host.set_stream_handler(DIALBACK_PROTOCOL, self.handle)

    def stop(self) -> None:
        with quietly("removing the dial-back handler"):
            self._host.remove_stream_handler(DIALBACK_PROTOCOL)

    async def handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            with trio.fail_after(READ_TIMEOUT_S):
                request = await _read(stream)
            addresses = request.get("addrs")
            if not isinstance(addresses, list):
                answer: dict[str, Any] = {"status": "refused", "error": "no addresses"}
            else:
                status, address, error = await self.verdict(stream, [str(a) for a in addresses], "dialback")
                answer = {"status": status, "address": address, "error": error}
            await stream.write(_encode({k: v for k, v in answer.items() if v is not None}))
        except Exception as exc:  # a stream handler must never raise
            log.info("dial-back for %s ended: %s: %s", peer, type(exc).__name__, exc)
        finally:
            with closing_quietly("closing a dial-back stream", CLOSE_TIMEOUT_S):
                await stream.close()

    def _rate_limited(self, peer: PeerID) -> bool:
        now = trio.current_time()
        if now - self._last_request.get(peer, -MIN_INTERVAL_PER_PEER_S) < MIN_INTERVAL_PER_PEER_S:
            return True
        if len(self._last_request) > RATE_TABLE_SIZE:  # forget peers that asked long enough ago
            self._last_request = {p: t for p, t in self._last_request.items() if now - t < MIN_INTERVAL_PER_PEER_S}
        self._last_request[peer] = now
        return False

    async def verdict(
        self, stream: INetStream, addresses: list[str], source: Source
    ) -> tuple[Verdict, str | None, str | None]:
        """Dial the asker of ``stream`` back at ``addresses`` (ports only: the IP is the one the
        request came from); (verdict, address that answered, error)."""
        peer = stream.muxed_conn.peer_id
        if self._rate_limited(peer):
            return "refused", None, "asked too often"
        if is_relayed(stream.muxed_conn):
            return "refused", None, "ask over a direct connection"
        observed = observed_ip(stream)
        if observed is None:
            return "refused", None, "no observed address"
        targets = dialback_targets(addresses, observed)
        if not targets:
            return "refused", None, "no TCP address to dial"
        if self._limiter.statistics().tasks_waiting >= WAITING_DIALBACKS:  # keys are free: bound the queue
            return "refused", None, "busy"
        async with self._limiter:
            address, error = await self._dial_back(peer, targets)
        outcome = DialbackOutcome(str(peer), "public" if address else "private", address, error, time.time(), source)
        self.outcomes.pop(str(peer), None)
        self.outcomes[str(peer)] = outcome
        while len(self.outcomes) > OUTCOMES_KEPT:  # oldest first (insertion order)
            del self.outcomes[next(iter(self.outcomes))]
        log.debug("%s dial-back to %s: %s (%s)", source, peer, outcome.reachability, address or error)
        return ("reachable", address, None) if address else ("unreachable", None, error)

    async def _dial_back(self, peer: PeerID, targets: list[multiaddr.Multiaddr]) -> tuple[str | None, str | None]:
        """Dial each target from a new host; the first that completes the Noise handshake wins."""
        host = self._fresh_host()
        errors: list[str] = []
        try:
            async with host.run([]):
                network: Any = host.get_network()
                for target in targets:
                    try:
                        with trio.fail_after(DIAL_TIMEOUT_S):
                            await _dial_quietly(network, target, peer)
                        await trio.sleep(LINGER_S)
                        return str(target), None
                    except trio.TooSlowError:
                        errors.append(f"{target}: no answer in {DIAL_TIMEOUT_S:g} s")
                    except Exception as exc:  # any library failure: the next target; all go in the answer
                        errors.append(f"{target}: {type(exc).__name__}: {exc}")
        finally:
            with closing_quietly("closing a dial-back host", HOST_CLOSE_TIMEOUT_S):
                await host.close()
        return None, "; ".join(errors)


async def _dial_quietly(network: Any, target: multiaddr.Multiaddr, peer: PeerID) -> None:
    """``network.dial_addr`` without py-libp2p's ERROR line for a refused port (a NAT that
    answers with a reset, or a port nothing listens on, is the normal "private" answer)."""
    family = "ip6" if "/ip6/" in str(target) else "ip4"
    tcp = await trio.open_tcp_stream(str(target.value_for_protocol(family)), int(target.value_for_protocol("tcp")))
    raw = RawConnection(TrioTCPStream(tcp), True)
    try:
        await network.upgrade_outbound_raw_conn(raw, peer)
    except BaseException:
        with closing_quietly("closing a failed dial-back connection", CLOSE_TIMEOUT_S):
            await raw.close()
        raise


async def ask_dialback(host: IHost, peer: PeerID, addresses: list[str]) -> dict[str, Any]:
    """Ask ``peer`` to dial us back at ``addresses``; its answer (raises on no answer,
    :class:`ProtocolMissing` if it does not serve our dial-back)."""
    stream: INetStream | None = None
    try:
        with trio.fail_after(REQUEST_TIMEOUT_S):
            stream = await open_quietly(host, peer, DIALBACK_PROTOCOL)
            await stream.write(_encode({"addrs": addresses}))
            return await _read(stream)
    finally:
        if stream is not None:
            with closing_quietly("closing a dial-back stream", CLOSE_TIMEOUT_S):
                await stream.close()


async def dialback_outcome(host: IHost, peer: PeerID, addresses: list[str]) -> DialbackOutcome:
    """Our dial-back as a source: "unknown" when the peer declined (refused)."""
    answer = await ask_dialback(host, peer, addresses)
    status = answer.get("status")
    reachability: Reachability = (
        "public" if status == "reachable" else "private" if status == "unreachable" else "unknown"
    )
    address, error = answer.get("address"), answer.get("error")
    if reachability == "unknown":
        error = f"declined: {error or status}"
    return DialbackOutcome(
        str(peer), reachability, str(address) if address else None, str(error) if error else None, time.time()
    )


Asker = Callable[[PeerID, list[str]], Awaitable[DialbackOutcome]]


def combine(verdicts: dict[Source, DialbackOutcome]) -> DialbackOutcome | None:
    """The verdict that stands: the newest dial-back test (ours or AutoNAT's), else the
    inference, else none ("unknown")."""
    tested = [o for s, o in verdicts.items() if s != "inference" and o.reachability != "unknown"]
    if tested:
        return max(tested, key=lambda o: o.at)
    return verdicts.get("inference")


def _describe(outcome: DialbackOutcome) -> str:
    if outcome.source == "inference":
        return f"inferred: a reservation on {outcome.peer} works and no peer sees us at our own address"
    name = "our dial-back" if outcome.source == "dialback" else "AutoNAT"
    return f"{name} by {outcome.peer}" + (f" reached {outcome.address}" if outcome.address else "")


class ReachabilityMonitor:
    """Keeps ``reachability`` current: asks directly connected peers (each source in turn),
    infers from the relays and observed addresses, and combines what it has.

    Args:
        candidates: peers to ask, best first (the configured relays, then other peers we
            hold a direct connection to).
        own_addresses: this node's direct listen addresses (empty while not listening).
        askers: the dial-back sources, in the order each peer is asked (ours first: it
            says "refused" when it cannot help, AutoNAT peers often just refuse private IPs).
        observed: where peers see us (for the inference; None: no inference).
        local_addresses: the addresses our listeners hold (wildcards expanded), for the
            inference: the advertised ones may include what peers observed, which says
            nothing about a NAT. Default: ``own_addresses``.
        reserved: the relays we hold a working reservation on.
        recheck_s: how often to check again once a verdict stands.
        retry_min_s: the first wait while nothing stands; it doubles up to ``recheck_s``.
    """

    def __init__(
        self,
        *,
        candidates: Callable[[], list[PeerID]],
        own_addresses: Callable[[], list[str]],
        askers: Sequence[tuple[Source, Asker]],
        observed: ObservedAddresses | None = None,
        reserved: Callable[[], list[str]] = list,
        local_addresses: Callable[[], list[str]] | None = None,
        recheck_s: float = RECHECK_S,
        retry_min_s: float = RETRY_MIN_S,
    ) -> None:
        self._candidates = candidates
        self._own_addresses = own_addresses
        self._askers = tuple(askers)
        self._observed = observed
        self._reserved = reserved
        self._local_addresses = local_addresses or own_addresses
        self._recheck_s = recheck_s
        self._retry_min_s = min(retry_min_s, recheck_s)
        self.reachability: Reachability = "unknown"
        self.last: DialbackOutcome | None = None  # the verdict that stands
        self.verdicts: dict[Source, DialbackOutcome] = {}  # the latest verdict of each source
        self.checks = 0  # checks that ended with a verdict standing
        self.attempts = 0  # checks started
        self._wake = trio.Event()
        self.changed = trio.Event()  # set (and replaced) whenever a check finishes

    def recheck_now(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        retry = self._retry_min_s
        while True:
            standing = await self.check()
            if standing is not None:
                wait, retry = self._recheck_s, self._retry_min_s
            else:  # nobody could answer: back off, so a network of strangers is not asked every 2 s
                wait, retry = retry, min(retry * 2, self._recheck_s)
            with trio.move_on_after(wait):
                await self._wake.wait()
            self._wake = trio.Event()

    async def check(self) -> DialbackOutcome | None:
        """One round: ask candidates until a source gives a verdict, infer, combine; the
        verdict that stands (None: "unknown")."""
        self.attempts += 1
        addresses = [a for a in self._own_addresses() if not is_circuit_address(a)]
        if addresses:
            outcome = await self._ask(addresses)
            if outcome is not None:
                self.verdicts[outcome.source] = outcome
        self._infer()
        standing = combine(self.verdicts)
        reachability: Reachability = standing.reachability if standing is not None else "unknown"
        if reachability != self.reachability:  # the one INFO line per change
            log.info("reachability: %s (%s)", reachability, _describe(standing) if standing else "no verdict")
        self.reachability, self.last = reachability, standing
        self.checks += standing is not None
        self.changed.set()
        self.changed = trio.Event()
        return standing

    async def _ask(self, addresses: list[str]) -> DialbackOutcome | None:
        for peer in self._candidates()[:CANDIDATES_PER_CHECK]:
            for source, ask in self._askers:
                try:
                    outcome = await ask(peer, addresses)
                except ProtocolMissing as exc:
                    log.debug("%s: skipping %s: %s", source, peer, exc)
                    continue
                except Exception as exc:  # any library failure: the next source or candidate
                    log.debug("%s request to %s failed: %s: %s", source, peer, type(exc).__name__, exc)
                    continue
                if outcome.reachability != "unknown":
                    return replace(outcome, source=source)
                log.debug("%s by %s: no verdict: %s", source, peer, outcome.error)
        return None

    def _infer(self) -> None:
        """ "private" while a reservation works and no peer sees us at our own address; a peer
        that does withdraws it (a relay going down for a moment does not)."""
        if self._observed is None:
            return
        if self._observed.seen_at(self._local_addresses()):
            self.verdicts.pop("inference", None)
            return
        reserved = self._reserved()
        if reserved and self._observed.reports and "inference" not in self.verdicts:
            self.verdicts["inference"] = DialbackOutcome(reserved[0], "private", None, None, time.time(), "inference")
