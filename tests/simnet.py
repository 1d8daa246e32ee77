"""Helpers for tests on the simulated network: nodes with sync on a shared SimNetwork."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from dag import Database, Instance
from sync import Sync, SyncConfig, enable_sync, run_inline
from transports.memory import SimNetwork

EPOCH_MS = 1_700_000_000_000


def sim_now_ms() -> int:
    """Wall-clock milliseconds that follow trio's (mock) clock."""
    return EPOCH_MS + int(trio.current_time() * 1000)


@dataclass
class Node:
    name: str
    instance: Instance
    sync: Sync

    def db(self, db_id: str) -> Database:
        return self.instance.open_database(db_id)


@asynccontextmanager
async def sim_node(
    network: SimNetwork, name: str, instance: Instance | None = None, **config: Any
) -> AsyncIterator[Node]:
    instance = instance or Instance.in_memory()
    async with enable_sync(
        instance, config=SyncConfig(display_name=name, **config), now_ms=sim_now_ms, offload=run_inline
    ) as sync:
        sync.register_transport("memory", network.transport(name))
        await sync.accept_connections()
        yield Node(name, instance, sync)


@asynccontextmanager
async def sim_nodes(network: SimNetwork, count: int, **config: Any) -> AsyncIterator[list[Node]]:
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(sim_node(network, f"n{i}", **config)) for i in range(count)]
        yield nodes


def snapshot(db: Database) -> dict[str, Any]:
    """Everything that must be equal on converged replicas."""
    stores = {}
    for name, kind in db.store_types().items():
        stores[name] = db.doc(name).to_dict() if kind == "docstore:v0" else db.table(name).rows()
    return {"tips": db.tips(), "settings": db.settings().to_dict(), "stores": stores}
