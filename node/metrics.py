"""What the node counts, and how it is shown to Prometheus.

The sync engine and the transports keep no counters of their own, so the node wraps
each transport it registers in a :class:`CountingTransport`: every message through it,
asked or served, adds to the node's :class:`Metrics` (messages by type, wire bytes,
sync exchanges and their outcome). Gauges (peers, databases, entries) are read from the
node's state at scrape time by a collector, so they are never stale and cost nothing
between scrapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any, cast

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sync.errors import SyncError
from sync.messages import (
    Bootstrap,
    BootstrapPending,
    Error,
    Incremental,
    Message,
    SendEntries,
    SyncTree,
    encode_message,
)
from sync.transport import (
    BackgroundTransport,
    ClosingTransport,
    Handler,
    LiveConnections,
    RequestContext,
    TaskStatus,
    Transport,
    request_budget,
)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_EXCHANGES = (SyncTree, SendEntries)


def _bin_overhead(size: int) -> int:
    return 2 if size < 1 << 8 else 3 if size < 1 << 16 else 5


def _array_overhead(count: int) -> int:
    return 1 if count < 16 else 3 if count < 1 << 16 else 5


def wire_size(message: Message) -> int:
    """The message's msgpack size, without encoding its entries a second time.

    Entries are most of the bytes and are already bytes: their encoded size is their
    length plus a bin header, so only the rest of the message is encoded to measure it.
    """
    entries = getattr(message, "entries", ())
    if not entries:
        return len(encode_message(message))
    rest = len(encode_message(dataclasses.replace(cast(Any, message), entries=())))
    return (
        rest - _array_overhead(0) + _array_overhead(len(entries)) + sum(len(e) + _bin_overhead(len(e)) for e in entries)
    )


class Metrics:
    """The node's counters. Updated from the trio thread; read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.messages: Counter[tuple[str, str, str]] = Counter()  # (transport, direction, type)
        self.bytes: Counter[tuple[str, str]] = Counter()  # (transport, direction)
        self.exchanges: Counter[tuple[str, str]] = Counter()  # (role, outcome)
        self.errors: Counter[tuple[str, str]] = Counter()  # (role, code)

    def message(self, transport: str, direction: str, message: Message) -> None:
        try:
            size = wire_size(message)
        except (ValueError, TypeError):  # unencodable text (a lone surrogate): counting never fails a request
            size = 0
        with self._lock:
            self.messages[(transport, direction, message.TYPE)] += 1
            self.bytes[(transport, direction)] += size

    def exchange(self, role: str, outcome: str, code: str | None = None) -> None:
        with self._lock:
            self.exchanges[(role, outcome)] += 1
            if outcome == "error":
                self.errors[(role, code or "unknown")] += 1

    def totals(self) -> dict[str, int]:
        """Sums for people (the TUI's throughput, ``info``)."""
        with self._lock:
            return {
                "bytes_sent": sum(v for (_t, d), v in self.bytes.items() if d == "sent"),
                "bytes_received": sum(v for (_t, d), v in self.bytes.items() if d == "received"),
                "messages_sent": sum(v for (_t, d, _k), v in self.messages.items() if d == "sent"),
                "messages_received": sum(v for (_t, d, _k), v in self.messages.items() if d == "received"),
                "syncs": sum(v for (_r, o), v in self.exchanges.items() if o != "error"),
                "errors": sum(self.errors.values()),
            }

    def copy(self) -> tuple[dict[Any, int], ...]:
        with self._lock:
            return dict(self.messages), dict(self.bytes), dict(self.exchanges), dict(self.errors)


def _outcome(answer: Message) -> tuple[str, str | None] | None:
    """What an answer says about its exchange (None: it says nothing yet)."""
    if isinstance(answer, Error):
        return "error", answer.code
    if isinstance(answer, BootstrapPending):
        return "pending", None
    if isinstance(answer, Bootstrap | Incremental) and answer.more:
        return None
    return "ok", None


class CountingTransport:
    """A transport that counts what passes through ``inner`` (see the module docstring).

    ``inner`` stays reachable for status (``.inner``). The optional protocols sync asks of a
    transport pass through to it: running (:class:`CountingBackgroundTransport`), open
    connections, closing, and the byte budget of a limited connection (a relay circuit).
    """

    def __init__(self, name: str, inner: Transport, metrics: Metrics) -> None:
        self.name = name
        self.inner = inner
        self.metrics = metrics

    def live_address(self, pubkey: str) -> str | None:
        """The inner transport's open connection to ``pubkey``, if it keeps connections (None: none)."""
        return self.inner.live_address(pubkey) if isinstance(self.inner, LiveConnections) else None

    def listen_addresses(self) -> list[str]:
        return self.inner.listen_addresses()

    async def request_budget(self, address: str, *, fresh: bool = False) -> int | None:
        """The inner transport's budget (None: it has no limit). Without this, sync took a
        daemon's libp2p for unlimited and sent whole answers into 128 KiB relay circuits."""
        return await request_budget(self.inner, address, fresh=fresh)

    async def request(self, address: str, message: Message) -> AsyncGenerator[Message, None]:
        self.metrics.message(self.name, "sent", message)
        outcome: tuple[str, str | None] | None = None
        try:
            async with contextlib.aclosing(self.inner.request(address, message)) as answers:
                async for answer in answers:
                    self.metrics.message(self.name, "received", answer)
                    outcome = _outcome(answer)
                    yield answer
        except SyncError as exc:
            outcome = ("error", getattr(exc, "code", "sync"))
            raise
        finally:
            if isinstance(message, _EXCHANGES) and outcome is not None:
                self.metrics.exchange("asked", *outcome)

    async def serve(self, handler: Handler, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async def counted(message: Message, context: RequestContext) -> AsyncIterator[Message]:
            self.metrics.message(self.name, "received", message)
            outcome: tuple[str, str | None] | None = None
            try:
                async with contextlib.aclosing(handler(message, context)) as answers:  # type: ignore[type-var]
                    async for answer in answers:
                        self.metrics.message(self.name, "sent", answer)
                        outcome = _outcome(answer)
                        yield answer
            finally:
                if isinstance(message, _EXCHANGES) and outcome is not None:
                    self.metrics.exchange("served", *outcome)

        await self.inner.serve(counted, task_status=task_status)

    async def aclose(self) -> None:
        if isinstance(self.inner, ClosingTransport):
            await self.inner.aclose()


class CountingBackgroundTransport(CountingTransport):
    """The same, for a transport whose ``run`` must be started by sync (libp2p's host)."""

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert isinstance(self.inner, BackgroundTransport)
        await self.inner.run(task_status=task_status)


def counting(name: str, inner: Transport, metrics: Metrics) -> CountingTransport:
    """Wrap ``inner``, keeping it a :class:`BackgroundTransport` if it is one."""
    cls = CountingBackgroundTransport if isinstance(inner, BackgroundTransport) else CountingTransport
    return cls(name, inner, metrics)


class NodeCollector(Collector):
    """Prometheus view of the counters plus gauges read at scrape time from ``gauges()``."""

    def __init__(self, metrics: Metrics, gauges: Callable[[], dict[str, Any]]) -> None:
        self._metrics = metrics
        self._gauges = gauges

    def collect(self) -> Iterator[Any]:
        messages, sizes, exchanges, errors = self._metrics.copy()
        family = CounterMetricFamily(
            "eidetica_sync_messages",
            "Sync messages by transport, direction and type",
            labels=["transport", "direction", "type"],
        )
        for (transport, direction, kind), value in sorted(messages.items()):
            family.add_metric([transport, direction, kind], value)
        yield family
        family = CounterMetricFamily(
            "eidetica_sync_bytes", "Sync message bytes (msgpack, before framing)", labels=["transport", "direction"]
        )
        for (transport, direction), value in sorted(sizes.items()):
            family.add_metric([transport, direction], value)
        yield family
        family = CounterMetricFamily(
            "eidetica_syncs", "Sync exchanges (SyncTree, SendEntries) by role and outcome", labels=["role", "outcome"]
        )
        for (role, outcome), value in sorted(exchanges.items()):
            family.add_metric([role, outcome], value)
        yield family
        family = CounterMetricFamily(
            "eidetica_sync_errors", "Failed sync exchanges by role and error", labels=["role", "code"]
        )
        for (role, code), value in sorted(errors.items()):
            family.add_metric([role, code], value)
        yield family

        state = self._gauges()
        yield GaugeMetricFamily("eidetica_peers", "Peers this node knows", value=state["peers"])
        yield GaugeMetricFamily("eidetica_peers_connected", "Peers with a live connection", value=state["connected"])
        yield GaugeMetricFamily("eidetica_databases", "Databases held (not counting _sync)", value=state["databases"])
        entries = GaugeMetricFamily("eidetica_entries", "Entries held, by verification status", labels=["status"])
        for status, value in sorted(state["entries"].items()):
            entries.add_metric([status], value)
        yield entries
        yield GaugeMetricFamily(
            "eidetica_relationships", "(database, peer) pairs kept in sync", value=state["relationships"]
        )
        yield GaugeMetricFamily(
            "eidetica_access_requests_pending", "Access requests waiting for an admin", value=state["pending"]
        )
        yield GaugeMetricFamily(
            "eidetica_uptime_seconds", "Seconds since the node started", value=time.time() - self._metrics.started
        )


def render(metrics: Metrics, gauges: Callable[[], dict[str, Any]]) -> bytes:
    """The Prometheus text exposition of the node."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(metrics, gauges))
    return generate_latest(registry)


__all__ = ["PROMETHEUS_CONTENT_TYPE", "CountingTransport", "Metrics", "counting", "render", "wire_size"]
