"""The libp2p kit for the conformance suite: real hosts on loopback, raw streams for abuse."""

from __future__ import annotations

from contextlib import AsyncExitStack

import multiaddr
from libp2p.peer.peerinfo import info_from_p2p_addr

from dag import Instance
from sync import SyncConfig, enable_sync
from sync.messages import Message, decode_message, encode_message
from tests.transport_kits import Node
from transports.libp2p import PROTOCOL_ID, Libp2pTransport, read_frame, write_frame

SMALL_LIMIT = 5 * 1024 * 1024  # above the 4 MiB answer frames; an oversize header alone is refused


class Libp2pKit:
    name = "p2p"

    def __init__(self) -> None:
        self._probe: Libp2pTransport | None = None

    async def node(self, stack: AsyncExitStack, label: str, instance: Instance | None = None) -> Node:
        instance = instance or Instance.in_memory()
        sync = await stack.enter_async_context(enable_sync(instance, config=SyncConfig(display_name=label)))
        transport = Libp2pTransport(instance.device_key, listen=["/ip4/127.0.0.1/tcp/0"], max_frame_bytes=SMALL_LIMIT)
        sync.register_transport("p2p", transport)
        await sync.accept_connections()
        if self._probe is None:
            # A bare transport (no Sync) used to open raw streams; it lives on the first node's nursery.
            probe_instance = Instance.in_memory()
            sync_for_probe = await stack.enter_async_context(enable_sync(probe_instance))
            self._probe = Libp2pTransport(probe_instance.device_key, listen=["/ip4/127.0.0.1/tcp/0"])
            sync_for_probe.register_transport("p2p", self._probe)
        return Node(label, instance, sync)

    async def _stream(self, node: Node):  # type: ignore[no-untyped-def]
        assert self._probe is not None
        await self._probe._wait_ready()
        info = info_from_p2p_addr(multiaddr.Multiaddr(node.address.address))
        await self._probe.host.connect(info)
        return await self._probe.host.new_stream(info.peer_id, [PROTOCOL_ID])

    async def _answer_code(self, stream) -> str:  # type: ignore[no-untyped-def]
        try:
            payload = await read_frame(stream, 16 * 1024 * 1024)
        except Exception:
            return "closed"
        if payload is None:
            return "closed"
        return getattr(decode_message(payload), "code", "closed")

    async def send_garbage(self, node: Node) -> str:
        stream = await self._stream(node)
        await write_frame(stream, b"\x93\x01\x02garbage")
        return await self._answer_code(stream)

    async def send_oversize(self, node: Node) -> str:
        stream = await self._stream(node)
        await stream.write((SMALL_LIMIT + 1).to_bytes(4, "big") + b"\x00" * 1024)
        return await self._answer_code(stream)

    async def drop_mid_answer(self, node: Node, request: Message) -> None:
        stream = await self._stream(node)
        await write_frame(stream, encode_message(request))
        await read_frame(stream, 16 * 1024 * 1024)
        await stream.reset()
