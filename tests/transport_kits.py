"""Transport kits: how the conformance suite makes nodes on each transport and abuses its wire.

A kit makes a node (an instance with sync running on that transport, serving), and knows
how to send what a well-behaved peer never sends: garbage, an oversize frame, a request
dropped half-way through its answer. The conformance suite (``test_conformance.py``)
runs the same scenarios with every kit.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from dag import Instance
from sync import Address, Sync, SyncConfig, enable_sync, run_inline
from sync.messages import Message, decode_message, encode_message
from transports.memory import SimNetwork


@dataclass
class Node:
    name: str
    instance: Instance
    sync: Sync

    @property
    def address(self) -> Address:
        return self.sync.listen_addresses()[0]


class Kit(Protocol):
    name: str

    async def node(self, stack: AsyncExitStack, label: str, instance: Instance | None = None) -> Node:
        """A serving node on this transport; torn down by ``stack``."""
        ...

    async def send_garbage(self, node: Node) -> str:
        """Send bytes that are no message; return the answer's error code (or how it ended)."""
        ...

    async def send_oversize(self, node: Node) -> str:
        """Send a frame over the size limit; return the error code or how it ended."""
        ...

    async def drop_mid_answer(self, node: Node, request: Message) -> None:
        """Send ``request`` and hang up after the first answer frame."""
        ...


class MemoryKit:
    """The simulated network: no wire, so 'garbage' is bytes fed to the codec."""

    name = "memory"

    def __init__(self) -> None:
        self.network = SimNetwork(0)
        self._count = 0

    async def node(self, stack: AsyncExitStack, label: str, instance: Instance | None = None) -> Node:
        instance = instance or Instance.in_memory()
        sync = await stack.enter_async_context(
            enable_sync(instance, config=SyncConfig(display_name=label), offload=run_inline)
        )
        self._count += 1
        sync.register_transport("memory", self.network.transport(f"{label}-{self._count}"))
        await sync.accept_connections()
        return Node(label, instance, sync)

    async def _raw(self, node: Node, data: bytes) -> str:
        try:
            message = decode_message(data)
        except Exception as exc:  # the codec refuses it before any handler sees it
            return getattr(exc, "code", "closed")
        answers = [a async for a in self.network.request("test", node.address.address, message)]
        return getattr(answers[0], "code", answers[0].TYPE)

    async def send_garbage(self, node: Node) -> str:
        return await self._raw(node, b"\x93\x01\x02garbage")

    async def send_oversize(self, node: Node) -> str:
        too_many = msgpack.packb({"type": "SendEntries", "db": b"", "entries": [b"\xa0"] * 10_001})
        return await self._raw(node, too_many)

    async def drop_mid_answer(self, node: Node, request: Message) -> None:
        stream = self.network.request("test", node.address.address, request)
        async for _answer in stream:
            break
        await stream.aclose()


def roundtrip(message: Message) -> Any:
    return decode_message(encode_message(message))
