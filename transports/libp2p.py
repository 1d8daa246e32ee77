"""The libp2p transport: ``/eidetica/sync/1.0.0`` streams over TCP, Noise and Yamux (py-libp2p).

One request per stream: the asker writes one frame, the server writes answer frames and
closes. A frame is a 4-byte big-endian length and a msgpack message; a length over the
limit (default 16 MiB) ends the stream with an error. The host's identity is the node's
Ed25519 device key, so a peer ID names a device.

What this module does about py-libp2p's traps (see the project's notes):
* only Noise is offered (a default host also accepts plaintext, TLS and secio);
* every exception in the stream handler is caught (one escaping takes the host down);
* ``max_connections_per_peer=1`` avoids the 250 ms parallel-dial head start, and the
  auto-connector's targets are zeroed so it never redials the peerstore by itself;
* a listening port is checked with a plain ``bind()`` first (its listeners set
  SO_REUSEPORT, so a second process would silently share the port);
* a peer's "recently failed" mark is cleared before each dial, so a peer that came back
  is reachable at once instead of after 60 s;
* the host is closed explicitly when the transport stops (leaving ``run`` does not close
  the listeners).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncGenerator
from typing import Any

import multiaddr
import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from dag import SigningKey
from dag.keys import pubkey_to_text
from sync.errors import (
    OversizeMessageError,
    ProtocolError,
    RequestTimeoutError,
    SyncError,
    TransportError,
    UnreachableError,
)
from sync.messages import Error, Message, decode_message, encode_message
from sync.transport import Handler, RequestContext, TaskStatus

log = logging.getLogger(__name__)

PROTOCOL_ID = TProtocol("/eidetica/sync/1.0.0")
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
HEADER = 4
CONNECT_TIMEOUT_S = 10.0  # a dial that takes longer is a dead or unreachable peer
REQUEST_FRAME_TIMEOUT_S = 30.0  # between a stream opening and its request frame arriving
ANSWER_FRAME_TIMEOUT_S = 60.0  # between two answer frames (a big batch is being verified)
READ_CHUNK = 1 << 20


class FrameTooLarge(OversizeMessageError):
    pass


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


async def write_frame(stream: INetStream, payload: bytes) -> None:
    await stream.write(len(payload).to_bytes(HEADER, "big") + payload)


def peer_pubkey(peer: PeerID) -> str | None:
    """The device key (``ed25519:...``) a peer ID names, when it names an Ed25519 key."""
    try:
        key = peer.extract_public_key()
    except Exception:  # not an inline key
        return None
    return pubkey_to_text(key.to_bytes()) if key is not None else None


async def _no_auto_connect() -> None:
    return None


def _check_port_free(address: multiaddr.Multiaddr) -> None:
    try:
        port = int(address.value_for_protocol("tcp"))
        host = address.value_for_protocol("ip4")
    except Exception:
        return
    if port == 0:
        return
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind((host, port))
    except OSError as exc:
        raise TransportError(f"cannot listen on {address}: port {port} is in use ({exc.strerror})") from exc
    finally:
        probe.close()


class Libp2pTransport:
    """Sync over libp2p. ``run`` (started by ``Sync.register_transport``) keeps the host up;
    ``serve`` (``accept_connections``) adds the listeners."""

    def __init__(
        self,
        key: SigningKey,
        *,
        listen: list[str] | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        answer_timeout_s: float = ANSWER_FRAME_TIMEOUT_S,
    ) -> None:
        self._key_pair = create_new_key_pair(key.seed)
        self._listen = [multiaddr.Multiaddr(a) for a in (listen or ["/ip4/127.0.0.1/tcp/4001"])]
        self.max_frame_bytes = max_frame_bytes
        self._connect_timeout_s = connect_timeout_s
        self._answer_timeout_s = answer_timeout_s
        self._host: IHost = self._new_host()
        self._ready = trio.Event()
        self._stopped = False
        self._serving = False
        self._handler: Handler | None = None

    def _new_host(self) -> IHost:
        security = {
            NOISE_PROTOCOL_ID: NoiseTransport(self._key_pair, noise_privkey=create_x25519_key_pair().private_key)
        }
        config = ConnectionConfig(
            max_connections_per_peer=1,
            min_connections=0,
            low_watermark=0,
            dial_timeout=self._connect_timeout_s,
        )
        host = new_host(
            key_pair=self._key_pair,
            sec_opt=security,
            muxer_opt=create_yamux_muxer_option(),
            connection_config=config,
        )
        # The auto-connector aims at (low + high watermark) / 2 connections and redials
        # every peer in the peerstore to get there; the sync engine dials on demand instead.
        connector = getattr(host.get_network(), "auto_connector", None)
        if connector is not None:
            connector.maybe_connect = _no_auto_connect
        return host

    @property
    def host(self) -> IHost:
        return self._host

    @property
    def peer_id(self) -> str:
        return str(self._host.get_id())

    # ---- lifecycle --------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the host's network service up (needed to dial, even without listening)."""
        try:
            async with self._host.run([]):
                self._ready.set()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._stopped = True
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self._host.close()

    async def _wait_ready(self) -> None:
        if self._stopped:
            raise TransportError("the libp2p transport has stopped")
        with trio.fail_after(self._connect_timeout_s):
            await self._ready.wait()

    async def serve(self, handler: Handler, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._wait_ready()
        for address in self._listen:
            _check_port_free(address)
        self._handler = handler
        self._host.set_stream_handler(PROTOCOL_ID, self._on_stream)
        network: Any = self._host.get_network()
        if not await network.listen(*self._listen):
            raise TransportError(f"libp2p could not listen on {', '.join(map(str, self._listen))}")
        self._serving = True
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self._serving = False
            for listener in list(getattr(network, "listeners", {}).values()):
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await listener.close()

    def listen_addresses(self) -> list[str]:
        if not self._serving:
            return []
        return [str(a) for a in self._host.get_addrs()]

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
            with trio.CancelScope(shield=True), trio.move_on_after(2), contextlib.suppress(Exception):
                await stream.close()  # already broken or not, nothing is left to tell the peer

    # ---- asking -------------------------------------------------------------------------

    async def _open(self, address: str) -> INetStream:
        await self._wait_ready()
        try:
            target = multiaddr.Multiaddr(address)
            info = info_from_p2p_addr(target)
        except Exception as exc:
            raise UnreachableError(f"not a libp2p address with a /p2p/ peer ID: {address!r}") from exc
        network: Any = self._host.get_network()
        cache = getattr(network, "_negative_peer_cache", None)
        if cache is not None:
            cache.evict(str(info.peer_id))  # a peer that failed once may be back now
        try:
            with trio.fail_after(self._connect_timeout_s):
                await self._host.connect(info)
                return await self._host.new_stream(info.peer_id, [PROTOCOL_ID])
        except trio.TooSlowError as exc:
            raise RequestTimeoutError(f"p2p:{address}: no connection in {self._connect_timeout_s:g} s") from exc
        except Exception as exc:
            raise UnreachableError(f"p2p:{address}: {type(exc).__name__}: {exc}") from exc

    async def request(self, address: str, message: Message) -> AsyncGenerator[Message, None]:
        stream = await self._open(address)
        try:
            try:
                await write_frame(stream, encode_message(message))
            except Exception as exc:
                raise TransportError(f"p2p:{address}: sending failed: {exc}") from exc
            while True:
                try:
                    with trio.fail_after(self._answer_timeout_s):
                        payload = await read_frame(stream, self.max_frame_bytes)
                except trio.TooSlowError as exc:
                    raise RequestTimeoutError(f"p2p:{address}: no answer in {self._answer_timeout_s:g} s") from exc
                except SyncError:
                    raise
                except Exception as exc:
                    raise TransportError(f"p2p:{address}: connection broke mid-answer: {exc}") from exc
                if payload is None:
                    return
                yield decode_message(payload)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2), contextlib.suppress(Exception):
                await stream.reset()  # the stream is gone either way
