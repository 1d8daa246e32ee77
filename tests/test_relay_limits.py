"""Relays with the standard limits (128 KiB, 2 minutes per circuit), on loopback.

R relays with limits like js-libp2p's and go-libp2p's defaults; A is reserved on R; B
reaches A only through A's ``/p2p-circuit`` address and bootstraps a database far larger
than one circuit. Hole punching is off: on loopback it would always succeed.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Limit, StopMessage

from dag import Instance, Permission, SigningKey
from node.metrics import Metrics, counting
from sync import SyncConfig, SyncError, TransportError, UnreachableError, enable_sync
from sync.handler import SyncHandler, run_inline
from sync.messages import Error, Message, SyncTree
from sync.peer import AnswerCut, sync_database
from sync.state import SyncState
from sync.ticket import Ticket
from sync.transport import Address, Handler, RequestContext, TaskStatus
from tests.test_relay import Node, _no_requests, sync_node
from tests.waiting import until
from transports.circuits import CircuitLimit
from transports.libp2p import Libp2pTransport
from transports.relay import RelayLimits, RelayService

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


@asynccontextmanager
async def dead_end() -> AsyncIterator[tuple[int, list[int]]]:
    """A TCP port that takes each connection and closes it at once (no libp2p behind it): an
    address a peer announces but nobody can use. Yields the port and a count of the dials."""
    dials = [0]

    async def refuse(stream: trio.SocketStream) -> None:
        dials[0] += 1
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(functools.partial(trio.serve_tcp, refuse, 0, host="127.0.0.1"))
        yield listener.socket.getsockname()[1], dials
        nursery.cancel_scope.cancel()


async def test_a_bootstrap_over_a_direct_address_riding_a_circuit_continues_over_circuits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A advertises [a direct address nobody can use, its circuit], as a node behind NAT
    does before it knows; B is wired as the daemon wires it (the metrics wrapper) and holds
    a circuit to A when it joins, so the join's exchange goes to the direct address and
    rides the circuit. Each spent circuit is replaced through the relay: the direct address
    is never dialled, and everything arrives within the standard limits, no circuit cut."""
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            relay = await stack.enter_async_context(limited_relay(STANDARD))
            port, dials = await stack.enter_async_context(dead_end())
            a = await sync_node(stack, "a", relays=relay.listen_addresses())
            direct, circuit = f"/ip4/127.0.0.1/tcp/{port}/p2p/{a.transport.peer_id}", a.circuit
            monkeypatch.setattr(a.transport, "listen_addresses", lambda: [direct, circuit.address])
            instance = Instance.in_memory()
            sync = await stack.enter_async_context(enable_sync(instance, config=SyncConfig(display_name="b")))
            transport = Libp2pTransport(instance.device_key, listen=["/ip4/127.0.0.1/tcp/0"], hole_punching=False)
            sync.register_transport("p2p", counting("p2p", transport, Metrics()))
            await sync.accept_connections()
            db_id = _big_db(a, entries=250, value_bytes=4_000)  # ~1 MB: 8 circuits or more
            ticket = a.sync.create_ticket(db_id)
            assert [x.address for x in ticket.addresses] == [direct, circuit.address]
            await sync.connect(circuit)  # B already holds a circuit to A
            joined = await sync.join(ticket)
            served = a.instance.open_database(db_id)
            assert len(joined) == len(served) == 252
            assert sorted(joined.tip_cids()) == sorted(served.tip_cids())
            assert sync.sync_status(db_id, a.instance.device_key.pubkey).last_error is None
            assert dials == [0]  # the way the spent circuits were reached, never the direct address
            opened, cut = _circuits(relay)
            assert opened >= 1024 * 1024 // STANDARD.circuit_bytes and cut == 0


async def test_an_entry_larger_than_a_circuit_gets_a_clear_error() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            relay = await stack.enter_async_context(limited_relay(STANDARD))
            a = await sync_node(stack, "a", relays=relay.listen_addresses())
            b = await sync_node(stack, "b")
            db_id = _big_db(a, entries=1, value_bytes=200 * 1024)
            with pytest.raises(SyncError, match="needs a direct connection") as raised:
                await b.sync.join(Ticket(db_id, (a.circuit,)))
            [head, line] = str(raised.value).splitlines()  # one line per address tried
            assert head == "join failed: 1 address tried:" and line.endswith("it needs a direct connection to the peer")


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (Limit(duration=120, data=131072), CircuitLimit(131072, 120.0)),  # go-libp2p: seconds, as the spec says
        (Limit(duration=120_000, data=131072), CircuitLimit(131072, 120.0)),  # js-libp2p: milliseconds
        (Limit(duration=86_400, data=64 * 1024**3), CircuitLimit(64 * 1024**3, 86_400.0)),  # our relay: a day
        (Limit(duration=0, data=0), None),  # py-libp2p's explicit zeros: no limit
        (Limit(data=4096), CircuitLimit(4096, None)),
        (None, None),  # no Limit at all: an unlimited circuit
    ],
)
def test_the_limit_a_relay_grants_is_read_from_hop_and_stop_messages(
    limit: Limit | None, expected: CircuitLimit | None
) -> None:
    hop = HopMessage(type=HopMessage.STATUS)
    stop = StopMessage(type=StopMessage.CONNECT)
    if limit is not None:
        hop.limit.CopyFrom(limit)
        stop.limit.CopyFrom(limit)
    assert CircuitLimit.read(hop) == CircuitLimit.read(stop) == expected


async def test_both_ends_of_a_circuit_know_what_it_has_left() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            relay = await stack.enter_async_context(limited_relay(STANDARD))
            a = await sync_node(stack, "a", relays=relay.listen_addresses())
            b = await sync_node(stack, "b")
            db_id = _big_db(a, entries=3, value_bytes=100)
            await b.sync.join(Ticket(db_id, (a.circuit,)))
            # B read the limit from the relay's CONNECT answer, A from the STOP message; both
            # counted what the handshake and the bootstrap took.
            from_b = await b.transport.request_budget(a.circuit.address)
            from_a = await a.transport.request_budget(f"/p2p/{b.transport.peer_id}")
            for left in (from_b, from_a):
                assert left is not None and 64 * 1024 < left < STANDARD.circuit_bytes - 4096
            assert await b.transport.request_budget(relay.listen_addresses()[0]) is None  # a direct connection


class CutAfter:
    """A transport that hands a real handler's answers over and breaks after ``frames`` of them."""

    def __init__(self, handler: Handler, frames: int) -> None:
        self._handler = handler
        self._frames = frames

    async def request(self, address: str, message: Message) -> AsyncGenerator[Message, None]:
        sent = 0
        async for answer in self._handler(message, RequestContext("cut", remote=address)):
            if sent == self._frames:
                raise TransportError(f"{address}: connection reset")
            yield answer
            sent += 1

    async def serve(self, handler: Handler, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError("this transport only asks")

    def listen_addresses(self) -> list[str]:
        return []


async def test_every_frame_that_arrived_before_a_cut_is_stored() -> None:
    server, client = Instance.in_memory(), Instance.in_memory()
    db = server.create_database(name="big")
    with db.transaction() as txn:
        txn.settings().set_global(Permission.write(10))
    for i in range(3_000):
        with db.transaction() as txn:
            txn.doc("notes").set(f"k{i}", "x" * 100)
    handler = SyncHandler(
        server, SyncState.open(server), display_name="s", now_ms=lambda: 0, addresses=list, offload=run_inline
    )
    with pytest.raises(AnswerCut, match="connection reset") as raised:
        await sync_database(
            instance=client,
            transport=CutAfter(handler.handle, frames=3),
            address="server",
            peer_key=server.device_key.pubkey,
            db_id=db.id,
            common=(),
            access=None,
            now_ms=lambda: 0,
            offload=run_inline,
        )
    # Bootstrap frames of 250, 500 and 1,000 entries came before the cut; all are stored
    # (the last two were still queued for verification when the transport broke).
    assert raised.value.result.received == 1_750
    assert len(client.open_database(db.id)) == 1_750


class CutThenGone(CutAfter):
    """The first request breaks after ``frames`` answer frames; every later one cannot
    connect (a circuit cut, and then no address of the peer works)."""

    def __init__(self, handler: Handler, frames: int) -> None:
        super().__init__(handler, frames)
        self.asked = 0

    async def request(self, address: str, message: Message) -> AsyncGenerator[Message, None]:
        self.asked += 1
        if self.asked > 1:
            raise UnreachableError(f"{address}: cannot connect")
        async for answer in super().request(address, message):
            yield answer


async def test_what_an_exchange_moved_before_every_address_failed_is_kept_and_counted() -> None:
    server, client = Instance.in_memory(), Instance.in_memory()
    db = server.create_database(name="big")
    with db.transaction() as txn:
        txn.settings().set_global(Permission.write(10))
    for i in range(3_000):
        with db.transaction() as txn:
            txn.doc("notes").set(f"k{i}", "x" * 100)
    handler = SyncHandler(
        server,
        SyncState.open(server),
        display_name="s",
        now_ms=lambda: int(time.time() * 1000),
        addresses=list,
        offload=run_inline,
    )
    transport = CutThenGone(handler.handle, frames=3)
    peer = server.device_key.pubkey
    async with enable_sync(client, config=SyncConfig(display_name="c")) as sync:
        sync.register_transport("cut", transport)
        sync.state.upsert_peer(peer, addresses=[Address("cut", "first"), Address("cut", "second")])
        sync.state.ensure_related(db.id, peer)
        with pytest.raises(TransportError, match="second: cannot connect"):
            await sync.sync_now(peer, db.id)
        # After the cut, two rounds over the first address that moved nothing (the second
        # would have had a fresh circuit), then the second address; the 1,750 entries before
        # the cut are stored and counted, and the cursor did not move (a cut is no common ground).
        assert transport.asked == 4
        assert len(client.open_database(db.id)) == 1_750
        last = sync.state.history()[-1]
        assert last["received"] == 1_750 and "second: cannot connect" in last["error"]
        assert sync.state.cursor(db.id, peer).common == ()


async def test_the_rounds_move_to_a_direct_connection_once_hole_punching_makes_one() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            relay = await stack.enter_async_context(limited_relay(STANDARD))
            a = await sync_node(stack, "a", relays=relay.listen_addresses(), hole_punching=True)
            b = await sync_node(stack, "b", hole_punching=True)
            db_id = _big_db(a, entries=500, value_bytes=4_000)  # 2 MB: 17 circuits' worth
            joined = await b.sync.join(Ticket(db_id, (a.circuit,)))
            assert len(joined) == len(a.instance.open_database(db_id))
            # A started DCUtR once identify had run on the circuit (on loopback it waits out
            # IDENTIFY_WAIT_S: py-libp2p ignores loopback observations) while B held its bulk
            # back for it (HolePuncher.wait_quiet); the punch succeeded and the rounds'
            # streams took the direct connection: few circuits, not the 17 the data needs.
            await until(lambda: any(h.succeeded for h in a.transport.status().hole_punches), "a's punch recorded")
            assert b.transport.connection_kind(a.transport.peer_id) == "direct"
            opened, cut = _circuits(relay)
            assert opened < 5 and cut == 0, (opened, cut)


class OlderPeer:
    """A limited connection to a peer from before ``SyncTree.budget``: it refuses the field
    the way its decoder does (``unknown fields``), and answers everything else."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.refused = 0

    async def request_budget(self, address: str, *, fresh: bool = False) -> int | None:
        return 100_000

    async def request(self, address: str, message: Message) -> AsyncGenerator[Message, None]:
        if isinstance(message, SyncTree) and message.budget:
            self.refused += 1
            yield Error("malformed", "SyncTree has unknown fields ['budget']")
            return
        async for answer in self._handler(message, RequestContext("old", remote=address)):
            yield answer

    async def serve(self, handler: Handler, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError("this transport only asks")

    def listen_addresses(self) -> list[str]:
        return []


async def test_a_peer_that_predates_the_budget_field_is_asked_without_it() -> None:
    server, client = Instance.in_memory(), Instance.in_memory()
    db = server.create_database(name="small")
    with db.transaction() as txn:
        txn.settings().set_global(Permission.write(10))
        txn.doc("notes").set("k", "v")
    handler = SyncHandler(
        server, SyncState.open(server), display_name="s", now_ms=lambda: 0, addresses=list, offload=run_inline
    )
    older = OlderPeer(handler.handle)
    result = await sync_database(
        instance=client,
        transport=older,
        address="older",
        peer_key=server.device_key.pubkey,
        db_id=db.id,
        common=(),
        access=None,
        now_ms=lambda: 0,
        offload=run_inline,
    )
    assert older.refused == 1 and not result.stopped
    assert len(client.open_database(db.id)) == len(db)
