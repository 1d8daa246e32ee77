"""A simulated network for tests: in-process, deterministic from a seed.

Nodes attach a :class:`MemoryTransport` under a name (their address). Every message is
encoded and decoded with the real codec (so its bytes are counted), and the network can
partition and heal, drop, duplicate, delay and so reorder messages, all drawn from one
seeded ``random.Random``. Run it under ``trio.testing.MockClock(autojump_threshold=0)``
and seeded schedules run fast and never sleep for real.
"""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import trio

from sync.errors import RequestTimeoutError, TransportError, UnreachableError
from sync.messages import Message, decode_message, encode_message
from sync.transport import Handler, RequestContext, TaskStatus

DROP_TIMEOUT_S = 5.0  # how long a dropped request takes to be noticed


@dataclass
class NetworkStats:
    requests: int = 0
    messages: int = 0
    bytes: int = 0
    dropped: int = 0
    duplicated: int = 0

    def reset(self) -> None:
        self.requests = self.messages = self.bytes = self.dropped = self.duplicated = 0


class SimNetwork:
    """The wire between memory transports, and the faults on it."""

    def __init__(
        self,
        seed: int = 0,
        *,
        drop: float = 0.0,
        duplicate: float = 0.0,
        min_delay_s: float = 0.0,
        max_delay_s: float = 0.0,
    ) -> None:
        self.random = random.Random(seed)
        self.drop = drop
        self.duplicate = duplicate
        self.min_delay_s = min_delay_s
        self.max_delay_s = max_delay_s
        self.stats = NetworkStats()
        self._nodes: dict[str, Handler] = {}
        self._groups: dict[str, int] | None = None

    def transport(self, name: str) -> MemoryTransport:
        return MemoryTransport(self, name)

    def partition(self, *groups: list[str]) -> None:
        """Only nodes in the same group reach each other (unlisted nodes are isolated)."""
        self._groups = {name: index for index, group in enumerate(groups) for name in group}

    def heal(self) -> None:
        self._groups = None

    def reachable(self, source: str, target: str) -> bool:
        if target not in self._nodes:
            return False
        if self._groups is None:
            return True
        return source in self._groups and self._groups.get(source) == self._groups.get(target)

    async def _carry(self, message: Message) -> Message:
        """One message across the wire: delay, byte count, real codec."""
        if self.max_delay_s > 0:
            await trio.sleep(self.random.uniform(self.min_delay_s, self.max_delay_s))
        data = encode_message(message)
        self.stats.messages += 1
        self.stats.bytes += len(data)
        return decode_message(data)

    def _dropped(self) -> bool:
        if self.drop > 0 and self.random.random() < self.drop:
            self.stats.dropped += 1
            return True
        return False

    async def request(self, source: str, target: str, message: Message) -> AsyncGenerator[Message, None]:
        if not self.reachable(source, target):
            raise UnreachableError(f"memory:{target} is not reachable from {source}")
        self.stats.requests += 1
        if self._dropped():
            await trio.sleep(DROP_TIMEOUT_S)
            raise RequestTimeoutError(f"request to memory:{target} was lost")
        delivered = await self._carry(message)
        handler = self._nodes[target]
        context = RequestContext("memory", remote=source)
        if self.duplicate > 0 and self.random.random() < self.duplicate:
            self.stats.duplicated += 1
            async for _ in handler(delivered, context):  # the duplicate's answers are lost
                pass
        async for answer in handler(delivered, context):
            if not self.reachable(source, target):
                raise TransportError(f"connection to memory:{target} broke mid-answer")
            if self._dropped():
                await trio.sleep(DROP_TIMEOUT_S)
                raise RequestTimeoutError(f"answer from memory:{target} was lost")
            yield await self._carry(answer)


class MemoryTransport:
    """One node's attachment to a :class:`SimNetwork`; its address is its name."""

    def __init__(self, network: SimNetwork, name: str) -> None:
        self._network = network
        self.name = name
        self._serving = False

    def request(self, address: str, message: Message) -> AsyncGenerator[Message, None]:
        return self._network.request(self.name, address, message)

    async def serve(self, handler: Handler, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._network._nodes[self.name] = handler
        self._serving = True
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._serving = False
            self._network._nodes.pop(self.name, None)

    def listen_addresses(self) -> list[str]:
        return [self.name] if self._serving else []
