"""The HTTP kit for the conformance suite: real servers on loopback, a bare httpx client for abuse.

The abuse goes through plain httpx, not ``HttpTransport.request``, so the server is
tested against what any HTTP client can send, not only against our own client.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack, aclosing
from typing import cast

import httpx

from dag import Instance
from sync import SyncConfig, enable_sync
from sync.messages import Error, Message, decode_message, encode_message
from tests.transport_kits import Node
from transports.http import API_PATH, HttpTransport
from transports.http_codec import CONTENT_MSGPACK, FrameReader

# Above the handler's 4 MiB answer frames (so a multi-frame bootstrap still fits), small
# enough that the oversize case costs a few milliseconds on loopback.
SMALL_LIMIT = 5 * 1024 * 1024
# Every abusive request is one round trip on loopback; this only bounds a broken server.
ABUSE_TIMEOUT_S = 10.0


def _url(node: Node) -> str:
    return f"http://{node.address.address}{API_PATH}"


class HttpKit:
    name = "http"

    async def node(self, stack: AsyncExitStack, label: str, instance: Instance | None = None) -> Node:
        instance = instance or Instance.in_memory()
        transport = HttpTransport(bind="127.0.0.1:0", max_frame_bytes=SMALL_LIMIT)
        stack.push_async_callback(transport.aclose)  # after sync has stopped (the stack unwinds backwards)
        sync = await stack.enter_async_context(enable_sync(instance, config=SyncConfig(display_name=label)))
        sync.register_transport("http", transport)
        await sync.accept_connections()
        return Node(label, instance, sync)

    async def _post(self, node: Node, body: bytes) -> str:
        """POST ``body`` as msgpack; the Error code the server answered with, or how it ended."""
        async with httpx.AsyncClient(timeout=ABUSE_TIMEOUT_S, trust_env=False) as client:
            try:
                response = await client.post(_url(node), content=body, headers={"content-type": CONTENT_MSGPACK})
            except httpx.TransportError:
                return "closed"
        try:
            answer = decode_message(response.content)
        except Exception:
            return str(response.status_code)
        return answer.code if isinstance(answer, Error) else str(response.status_code)

    async def send_garbage(self, node: Node) -> str:
        return await self._post(node, b"\x93\x01\x02garbage")

    async def send_oversize(self, node: Node) -> str:
        return await self._post(node, b"\x00" * (SMALL_LIMIT + 1))

    async def drop_mid_answer(self, node: Node, request: Message) -> None:
        async with (
            httpx.AsyncClient(timeout=ABUSE_TIMEOUT_S, trust_env=False) as client,
            client.stream(
                "POST", _url(node), content=encode_message(request), headers={"content-type": CONTENT_MSGPACK}
            ) as response,
        ):
            reader = FrameReader(SMALL_LIMIT)
            async with aclosing(cast(AsyncGenerator[bytes, None], response.aiter_bytes())) as chunks:
                async for chunk in chunks:
                    if reader.feed(chunk):
                        break  # leaving the block mid-body closes the connection
