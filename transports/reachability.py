"""Reachability: can peers dial this node? Learned from a real dial-back on a fresh connection.

py-libp2p's AutoNAT v1 answers "public" for a node behind NAT: its server "dials back" with
the host that already holds a connection to the asker, so the swarm hands back that
connection and nothing is dialled. Our protocol, ``/eidetica/dialback/1.0.0``:

1. The asker opens a stream to a peer it is directly connected to (its relays first) and
   sends ``{"addrs": [its direct listen addresses]}`` (msgpack, varint length prefix).
2. The server builds the targets: each address's TCP port at the IP it observes the asker
   at (so it never dials a third party, and a NAT with a forwarded port counts as public).
   It dials them from a **new host with a new key**, which has no connection to reuse, and
   the Noise handshake proves that the asker's peer ID answered.
3. It answers ``{"status": "reachable" | "unreachable" | "refused", "address", "error"}``.

One answer decides: reachable means "public", unreachable means "private". "refused"
(rate limit, a relayed connection, no TCP address) lets the asker try another peer; if no
one answers, the node stays "unknown". Servers remember what they found about each asker,
so a relay can tell who among its clients is behind NAT.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgpack
import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID as PeerID
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited
from multiaddr.exceptions import Error as MultiaddrError

from sync.transport import TaskStatus

from .errors import closing_quietly, quietly
from .relay import is_circuit_address, is_relayed

log = logging.getLogger(__name__)

DIALBACK_PROTOCOL = TProtocol("/eidetica/dialback/1.0.0")

Reachability = Literal["public", "private", "unknown"]

MAX_MESSAGE_BYTES = 4096  # a few addresses; anything bigger is not ours
MAX_TARGETS = 4  # addresses dialled back per request, so one request cannot make us dial a list
DIAL_TIMEOUT_S = 5.0  # per target: a NAT that drops the SYN costs this much, so keep it short
REQUEST_TIMEOUT_S = 30.0  # the asker waits for the whole answer: up to MAX_TARGETS dials plus set-up
READ_TIMEOUT_S = 10.0  # the request itself is one small frame
CLOSE_TIMEOUT_S = 2.0  # closing a stream whose other end may be gone
HOST_CLOSE_TIMEOUT_S = 5.0  # closing the throwaway host (its listeners and connections)
MIN_INTERVAL_PER_PEER_S = 2.0  # a peer asking again sooner than this is refused, not served
RATE_TABLE_SIZE = 1024  # peers remembered for the rate limit before old entries are dropped
CONCURRENT_DIALBACKS = 2  # each one starts a host of its own (~2 MiB, a few ms)
# After a successful dial the fresh host stays up this long: the dialled node identifies every
# inbound connection, and a host gone mid-identify makes py-libp2p log an error there.
LINGER_S = 0.5
RECHECK_S = 600.0  # how often a node checks again (networks change under laptops)
RETRY_S = 2.0  # while no peer has answered, look for one this often
CANDIDATES_PER_CHECK = 3  # peers asked per check before giving up as "unknown"


@dataclass(frozen=True, slots=True)
class DialbackOutcome:
    """What one dial-back found: the asker (seen from the server) or this node (seen from the asker)."""

    peer: str  # the asker (server side) or the server that answered (asker side)
    reachability: Reachability
    address: str | None = None  # the address that answered
    error: str | None = None
    at: float = 0.0  # unix time


def _encode(payload: dict[str, Any]) -> bytes:
    return encode_varint_prefixed(msgpack.packb(payload))


async def _read(stream: INetStream) -> dict[str, Any]:
    data = await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE_BYTES)
    message = msgpack.unpackb(data)
    if not isinstance(message, dict):
        raise ValueError("a dial-back message is a map")
    return message


def _observed_ip(stream: INetStream) -> str | None:
    try:
        remote = stream.get_remote_address()  # None when the connection layer does not know it
    except OSError:  # the socket is already gone (getpeername)
        return None
    return str(remote[0]) if remote else None


def dialback_targets(addresses: list[str], observed_ip: str) -> list[multiaddr.Multiaddr]:
    """The asker's TCP ports at the IP we see it at (never anyone else's IP), de-duplicated."""
    targets: list[multiaddr.Multiaddr] = []
    for text in addresses:
        if is_circuit_address(text):
            continue
        try:
            port = int(multiaddr.Multiaddr(text).value_for_protocol("tcp"))
        except (ValueError, MultiaddrError):  # the asker's own claim: not a TCP multiaddr, skipped
            continue
        family = "ip6" if ":" in observed_ip else "ip4"
        target = multiaddr.Multiaddr(f"/{family}/{observed_ip}/tcp/{port}")
        if target not in targets:
            targets.append(target)
    return targets[:MAX_TARGETS]


class DialbackServer:
    """Answers dial-back requests, dialling from a fresh host each time.

    ``fresh_host`` makes a host with a new random identity and no connections; the server
    runs it for one request and closes it.
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
            answer = await self._answer(stream, peer, request)
            await stream.write(_encode(answer))
        except Exception as exc:  # a stream handler must never raise
            log.info("dial-back for %s ended: %s: %s", peer, type(exc).__name__, exc)
        finally:
            with closing_quietly("closing a dial-back stream", CLOSE_TIMEOUT_S):
                await stream.close()

    async def _answer(self, stream: INetStream, peer: PeerID, request: dict[str, Any]) -> dict[str, Any]:
        now = trio.current_time()
        if now - self._last_request.get(peer, -MIN_INTERVAL_PER_PEER_S) < MIN_INTERVAL_PER_PEER_S:
            return {"status": "refused", "error": "asked too often"}
        if len(self._last_request) > RATE_TABLE_SIZE:  # forget peers that asked long enough ago
            self._last_request = {p: t for p, t in self._last_request.items() if now - t < MIN_INTERVAL_PER_PEER_S}
        self._last_request[peer] = now
        if is_relayed(stream.muxed_conn):
            return {"status": "refused", "error": "ask over a direct connection"}
        observed = _observed_ip(stream)
        addresses = request.get("addrs")
        if observed is None or not isinstance(addresses, list):
            return {"status": "refused", "error": "no observed address or no addresses"}
        targets = dialback_targets([str(a) for a in addresses], observed)
        if not targets:
            return {"status": "refused", "error": "no TCP address to dial"}
        async with self._limiter:
            address, error = await self._dial_back(peer, targets)
        outcome = DialbackOutcome(str(peer), "public" if address else "private", address, error, time.time())
        self.outcomes[str(peer)] = outcome
        log.info("dial-back to %s: %s (%s)", peer, outcome.reachability, address or error)
        if address:
            return {"status": "reachable", "address": address}
        return {"status": "unreachable", "error": error}

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
                            await network.dial_addr(target, peer)
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


async def ask_dialback(host: IHost, peer: PeerID, addresses: list[str]) -> dict[str, Any]:
    """Ask ``peer`` to dial us back at ``addresses``; its answer (raises on no answer)."""
    stream: INetStream | None = None
    try:
        with trio.fail_after(REQUEST_TIMEOUT_S):
            stream = await host.new_stream(peer, [DIALBACK_PROTOCOL])
            await stream.write(_encode({"addrs": addresses}))
            return await _read(stream)
    finally:
        if stream is not None:
            with closing_quietly("closing a dial-back stream", CLOSE_TIMEOUT_S):
                await stream.close()


class ReachabilityMonitor:
    """Keeps ``reachability`` current by asking directly connected peers to dial back.

    Args:
        host: the node's host.
        candidates: peers to ask, best first (the configured relays, then other peers we
            hold a direct connection to).
        own_addresses: this node's direct listen addresses (empty while not listening).
        recheck_s: how often to check again once known.
    """

    def __init__(
        self,
        host: IHost,
        *,
        candidates: Callable[[], list[PeerID]],
        own_addresses: Callable[[], list[str]],
        recheck_s: float = RECHECK_S,
    ) -> None:
        self._host = host
        self._candidates = candidates
        self._own_addresses = own_addresses
        self._recheck_s = recheck_s
        self.reachability: Reachability = "unknown"
        self.last: DialbackOutcome | None = None
        self.checks = 0
        self._wake = trio.Event()
        self.changed = trio.Event()  # set (and replaced) whenever a check finishes

    def recheck_now(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            outcome = await self.check()
            wait = self._recheck_s if outcome is not None else RETRY_S
            with trio.move_on_after(wait):
                await self._wake.wait()
            self._wake = trio.Event()

    async def check(self) -> DialbackOutcome | None:
        """Ask candidates in turn until one gives a verdict; None if none did."""
        addresses = [a for a in self._own_addresses() if not is_circuit_address(a)]
        if not addresses:
            return None
        for peer in self._candidates()[:CANDIDATES_PER_CHECK]:
            try:
                answer = await ask_dialback(self._host, peer, addresses)
            except Exception as exc:  # any library failure: ask the next candidate
                log.debug("dial-back request to %s failed: %s: %s", peer, type(exc).__name__, exc)
                continue
            status = answer.get("status")
            if status not in ("reachable", "unreachable"):
                log.debug("%s declined to dial back: %s", peer, answer.get("error"))
                continue
            reachability: Reachability = "public" if status == "reachable" else "private"
            address = answer.get("address")
            error = answer.get("error")
            outcome = DialbackOutcome(
                str(peer),
                reachability,
                str(address) if address else None,
                str(error) if error else None,
                time.time(),
            )
            if reachability != self.reachability:
                log.info("reachability: %s (dial-back by %s)", reachability, peer)
            self.reachability, self.last = reachability, outcome
            self.checks += 1
            self.changed.set()
            self.changed = trio.Event()
            return outcome
        return None
