"""Relays with the standard limits (128 KiB, 2 minutes per circuit), on loopback.

R relays with limits like js-libp2p's and go-libp2p's defaults; A is reserved on R; B
reaches A only through A's ``/p2p-circuit`` address and bootstraps a database far larger
than one circuit. Hole punching is off: on loopback it would always succeed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from dag import Permission, SigningKey
from sync import SyncError
from sync.ticket import Ticket
from tests.test_relay import Node, _no_requests, sync_node
from transports.libp2p import Libp2pTransport
from transports.relay import CircuitLimit, RelayLimits, RelayService

STANDARD = RelayLimits(circuit_bytes=128 * 1024, circuit_duration_s=120)
TIMEOUT_S = 240


class CuttingRelay(RelayService):
    """Advertises its limits but resets every circuit after ``cut_bytes`` (a relay that lies)."""

    cut_bytes = 80 * 1024

    def enforced_circuit_bytes(self) -> int | None:
        return self.cut_bytes


@asynccontextmanager
async def limited_relay(limits: RelayLimits, *, cutting: bool = False) -> AsyncIterator[Libp2pTransport]:
    relay = Libp2pTransport(
        SigningKey.generate(),
        listen=["/ip4/127.0.0.1/tcp/0"],
        relay_service=True,
        relay_limits=limits,
        hole_punching=False,
    )
    if cutting:
        relay._relay_service = CuttingRelay(relay.host, limits)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        await nursery.start(relay.serve, _no_requests)
        yield relay
        nursery.cancel_scope.cancel()


def _big_db(node: Node, *, entries: int, value_bytes: int) -> str:
    db = node.instance.create_database(name="big")
    with db.transaction() as txn:
        txn.settings().set_global(Permission.write(10))
    filler = "x" * value_bytes
    for i in range(entries):
        with db.transaction() as txn:
            txn.doc("notes").set(f"k{i}", f"{i}:{filler}")
    return db.id


def _circuits(relay: Libp2pTransport) -> tuple[int, int]:
    service = relay.status().relay_service
    assert service is not None
    return service.circuits_opened, service.circuits_cut


async def _bootstrap(limits: RelayLimits, *, entries: int, value_bytes: int, cutting: bool = False) -> dict[str, float]:
    """B joins A's database through the relay only; what it took."""
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(limited_relay(limits, cutting=cutting))
        a = await sync_node(stack, "a", relays=relay.listen_addresses())
        b = await sync_node(stack, "b")
        [reservation] = a.transport.status().reservations
        assert reservation.limit == CircuitLimit(limits.circuit_bytes, float(limits.circuit_duration_s))
        db_id = _big_db(a, entries=entries, value_bytes=value_bytes)
        served = a.instance.open_database(db_id)
        started = time.monotonic()
        joined = await b.sync.join(Ticket(db_id, (a.circuit,)))
        elapsed = time.monotonic() - started
        assert len(joined) == len(served)
        assert sorted(joined.tip_cids()) == sorted(served.tip_cids())
        # It all went through the relay: B never had a direct connection to A.
        assert b.transport.connection_kind(a.transport.peer_id) == "relayed"
        opened, cut = _circuits(relay)
        return {"seconds": elapsed, "circuits": opened, "cut": cut, "entries": len(served)}


@pytest.mark.slow
async def test_a_20_mb_database_bootstraps_through_a_relay_with_standard_limits() -> None:
    with trio.fail_after(TIMEOUT_S):
        standard = await _bootstrap(STANDARD, entries=5_000, value_bytes=4_000)
        generous = await _bootstrap(RelayLimits(), entries=5_000, value_bytes=4_000)
    print(f"\n20 MB through a standard relay: {standard}; through a generous one: {generous}")
    assert standard["entries"] == generous["entries"] == 5_002
    assert standard["cut"] == 0  # the budget kept every answer inside its circuit
    assert standard["circuits"] >= 20 * 1024 * 1024 // STANDARD.circuit_bytes
    assert generous["circuits"] == 1


@pytest.mark.slow
async def test_a_relay_that_cuts_before_its_advertised_limit_still_gets_everything_through() -> None:
    with trio.fail_after(TIMEOUT_S):
        outcome = await _bootstrap(STANDARD, entries=600, value_bytes=4_000, cutting=True)
    assert outcome["entries"] == 602
    assert outcome["cut"] > 0  # the relay did cut; the frames before each cut were kept


async def test_an_entry_larger_than_a_circuit_gets_a_clear_error() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            relay = await stack.enter_async_context(limited_relay(STANDARD))
            a = await sync_node(stack, "a", relays=relay.listen_addresses())
            b = await sync_node(stack, "b")
            db_id = _big_db(a, entries=1, value_bytes=200 * 1024)
            with pytest.raises(SyncError, match="needs a direct connection") as raised:
                await b.sync.join(Ticket(db_id, (a.circuit,)))
            assert "\n" not in str(raised.value)
