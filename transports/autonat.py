"""AutoNAT v1 (``/libp2p/autonat/1.0.0``): answered by our rules, asked of any libp2p peer.

The wire format is the standard one (protobuf ``Message{type, dial{peer{id, addrs}},
dialResponse{status, statusText, addr}}``, varint length prefix), so js-libp2p and
go-libp2p nodes that serve AutoNAT answer us, and their clients get answers from us.

**Serving.** py-libp2p's ``AutoNATService`` "dials back" with ``host.connect``: the asker is
connected already, so the swarm hands back that connection, nothing is dialled, and every
asker hears "OK" (a false "public"). :class:`AutoNATServer` answers through
:meth:`DialbackServer.verdict <transports.reachability.DialbackServer.verdict>` instead:
a fresh host with a new key dials the ports named at the IP the request came from only,
under the same per-peer rate limit and the same two concurrent dial-backs as our own
dial-back protocol.

**Asking.** A server may be py-libp2p's (or any that reuses the connection), so an "OK"
counts only if a *fresh* direct inbound connection reached us from the server's IP while
the request was open (:class:`InboundWatch`); go's server dials from a separate host with
its own key, js's forces a new connection, ours uses a fresh host: all three show up. An
"OK" without one is recorded as no verdict. ``E_DIAL_ERROR`` (the server tried and failed)
means "private"; ``E_DIAL_REFUSED`` and the rest mean no verdict.

**AutoNAT v2** (``/libp2p/autonat/2/dial-request`` and ``.../dial-back``: per-address checks
with a nonce sent back over the dial-back connection) is not offered: py-libp2p 0.8.1 ships
neither its protocols nor its messages, so it would be a second protocol implementation of
our own with no library peer to check it against. v1 with the fresh-connection rule gives
the same answer for the addresses we advertise.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, cast

import multiaddr
import trio
from google.protobuf.message import DecodeError
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.custom_types import TProtocol
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID as PeerID
from libp2p.rcmgr.metrics import Direction
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited
from multiaddr.exceptions import Error as MultiaddrError

from .circuits import is_relayed
from .errors import closing_quietly, quietly
from .observed import address_ip
from .reachability import (
    CLOSE_TIMEOUT_S,
    READ_TIMEOUT_S,
    REQUEST_TIMEOUT_S,
    DialbackOutcome,
    DialbackServer,
    Reachability,
    open_quietly,
)

log = logging.getLogger(__name__)

AUTONAT_PROTOCOL = TProtocol("/libp2p/autonat/1.0.0")
MAX_MESSAGE_BYTES = 8192  # a peer ID and a few dozen addresses (go and js send all of theirs)
MAX_ADDRESSES = 32  # addresses read from one request (only MAX_TARGETS ports are dialled)
MAX_STATUS_TEXT = 256  # characters of error sent back, or kept from a server's answer
FRESH_GRACE_S = 1.0  # after an "OK", how long the dial-back's connection may take to register here
INBOUND_KEPT = 32  # recent inbound connections remembered for the fresh-connection rule


class InboundWatch(INotifee):
    """Remembers when the last few direct inbound connections arrived, and from which IP."""

    def __init__(self) -> None:
        self._seen: deque[tuple[float, str | None]] = deque(maxlen=INBOUND_KEPT)

    def attach(self, host: IHost) -> None:
        host.get_network().register_notifee(self)

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        muxed: Any = getattr(conn, "muxed_conn", conn)
        if getattr(conn, "direction", None) != Direction.INBOUND or is_relayed(muxed):
            return  # a circuit through the relay comes from the relay's IP too: not a dial-back
        remote = None
        with quietly("reading an inbound connection's address"):
            address = muxed.get_remote_address()
            remote = str(address[0]) if address else None
        self._seen.append((trio.current_time(), remote))

    def arrived_since(self, since: float, ip: str | None) -> bool:
        """Whether a direct inbound connection from ``ip`` (any, if None) arrived after ``since``."""
        return any(at >= since and (ip is None or remote == ip) for at, remote in self._seen)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        return None

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None


def _response(status: Any, text: str | None = None, address: str | None = None) -> Message:
    message = Message(type=Message.DIAL_RESPONSE)
    message.dialResponse.status = status
    if text:
        message.dialResponse.statusText = text[:MAX_STATUS_TEXT]
    if address:
        message.dialResponse.addr = multiaddr.Multiaddr(address).to_bytes()
    return message


def _addresses(raw: Any) -> list[str]:
    """The request's addresses as text; undecodable ones are skipped (a peer's claim)."""
    out: list[str] = []
    for data in list(raw)[:MAX_ADDRESSES]:
        try:
            out.append(str(multiaddr.Multiaddr(bytes(data))))
        except (ValueError, MultiaddrError):
            continue
    return out


class AutoNATServer:
    """Answers AutoNAT v1 DIAL requests with a dial-back from a fresh host (``dialer``)."""

    def __init__(self, host: IHost, dialer: DialbackServer) -> None:
        self._host = host
        self._dialer = dialer

    def start(self) -> None:
        self._host.set_stream_handler(AUTONAT_PROTOCOL, self.handle)

    def stop(self) -> None:
        with quietly("removing the AutoNAT handler"):
            self._host.remove_stream_handler(AUTONAT_PROTOCOL)

    async def handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            with trio.fail_after(READ_TIMEOUT_S):
                data = await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE_BYTES)
            answer = await self._answer(stream, peer, data)
            await stream.write(encode_varint_prefixed(answer.SerializeToString()))
        except Exception as exc:  # a stream handler must never raise; debug: strangers ask, keys are free
            log.debug("AutoNAT request from %s ended: %s: %s", peer, type(exc).__name__, exc)
        finally:
            with closing_quietly("closing an AutoNAT stream", CLOSE_TIMEOUT_S):
                await stream.close()

    async def _answer(self, stream: INetStream, peer: PeerID, data: bytes) -> Message:
        request = Message()
        try:
            request.ParseFromString(data)
        except DecodeError:
            return _response(Message.E_BAD_REQUEST, "not an AutoNAT message")
        if request.type != Message.DIAL or not request.HasField("dial"):
            return _response(Message.E_BAD_REQUEST, "expected a DIAL")
        if request.dial.peer.HasField("id") and request.dial.peer.id != peer.to_bytes():
            return _response(Message.E_BAD_REQUEST, "the peer ID is not the asker's")
        status, address, error = await self._dialer.verdict(stream, _addresses(request.dial.peer.addrs), "autonat")
        if status == "reachable":
            return _response(Message.OK, address=address)
        if status == "unreachable":
            return _response(Message.E_DIAL_ERROR, error)
        return _response(Message.E_DIAL_REFUSED, error)


def _remote_ip(host: IHost, peer: PeerID) -> str | None:
    """The IP of our direct connection to ``peer`` (where its dial-back will come from)."""
    for connection in host.get_network().get_connections(peer):
        muxed: Any = getattr(connection, "muxed_conn", None)
        if muxed is None or connection.is_closed or is_relayed(connection):
            continue
        with quietly("reading a connection's address"):
            remote = muxed.get_remote_address()
            if remote:
                return str(remote[0])
    return None


def _request(host: IHost, addresses: list[str]) -> bytes:
    request = Message(type=Message.DIAL)
    request.dial.peer.id = host.get_id().to_bytes()
    for text in addresses:  # without their /p2p/<us>: the peer ID travels in its own field
        request.dial.peer.addrs.append(multiaddr.Multiaddr(text.partition("/p2p/")[0]).to_bytes())
    return encode_varint_prefixed(request.SerializeToString())


async def ask_autonat(host: IHost, peer: PeerID, addresses: list[str], watch: InboundWatch) -> DialbackOutcome:
    """Ask ``peer`` for an AutoNAT v1 dial-back to ``addresses``; "public" only with a fresh
    inbound connection seen from its IP (raises :class:`~transports.reachability.ProtocolMissing`
    if it does not serve AutoNAT, and on no answer)."""
    server_ip = _remote_ip(host, peer)
    started = trio.current_time()
    stream: INetStream | None = None
    try:
        with trio.fail_after(REQUEST_TIMEOUT_S):
            stream = await open_quietly(host, peer, AUTONAT_PROTOCOL)
            await stream.write(_request(host, addresses))
            data = await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE_BYTES)
    finally:
        if stream is not None:
            with closing_quietly("closing an AutoNAT stream", CLOSE_TIMEOUT_S):
                await stream.close()
    reachability, address, error = await _judge(data, watch, started, server_ip)
    return DialbackOutcome(str(peer), reachability, address, error, time.time(), "autonat")


async def _judge(
    data: bytes, watch: InboundWatch, started: float, server_ip: str | None
) -> tuple[Reachability, str | None, str | None]:
    """A server's answer as (reachability, address, error): "OK" is "public" only if a fresh
    inbound connection from the server's IP arrived since ``started``."""
    answer = Message()
    answer.ParseFromString(data)  # a DecodeError is "no answer", like a closed stream
    if answer.type != Message.DIAL_RESPONSE or not answer.HasField("dialResponse"):
        return "unknown", None, "not a DIAL_RESPONSE"
    response = answer.dialResponse
    text = response.statusText[:MAX_STATUS_TEXT] or None
    if response.status == Message.E_DIAL_ERROR:
        return "private", None, text or "the server's dial failed"
    if response.status != Message.OK:
        return "unknown", None, f"{_status_name(int(response.status))}: {text}"
    address = _address_text(response.addr) if response.HasField("addr") else None
    if await _fresh_dialback(watch, started, server_ip):
        return "public", address, None
    return "unknown", address, "OK without a fresh inbound connection (the server reused ours): not trusted"


async def _fresh_dialback(watch: InboundWatch, started: float, server_ip: str | None) -> bool:
    with trio.move_on_after(FRESH_GRACE_S):
        while not watch.arrived_since(started, server_ip):
            await trio.sleep(0.02)
        return True
    return False


def _status_name(status: int) -> str:
    try:
        return Message.ResponseStatus.Name(cast(Any, status))
    except ValueError:  # a status this version of the spec does not name
        return str(status)


def _address_text(raw: bytes) -> str | None:
    try:
        text = str(multiaddr.Multiaddr(bytes(raw)))
    except (ValueError, MultiaddrError):
        return None
    return text if address_ip(text) is not None else None


__all__ = ["AUTONAT_PROTOCOL", "AutoNATServer", "InboundWatch", "ask_autonat"]
