"""Circuit relay, reservations, dial-back reachability and hole punching, on loopback.

Three real libp2p hosts per test: R offers the relay; A holds a reservation on R; B reaches
A only through A's ``/p2p-circuit`` address. On loopback everyone could dial everyone, so
hole punching is off where a test needs the connection to stay relayed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import multiaddr
import pytest
import trio
from libp2p.peer.id import ID as PeerID

from dag import Instance, Permission, SigningKey
from sync import Address, Sync, SyncConfig, UnreachableError, enable_sync
from sync.messages import Message
from sync.ticket import Ticket
from sync.transport import RequestContext, TaskStatus
from tests.waiting import until
from transports.libp2p import Libp2pTransport
from transports.reachability import ask_dialback
from transports.relay import DEFAULT_RELAY_LIMITS, RelayLimits

TIMEOUT_S = 30


@dataclass
class Node:
    instance: Instance
    sync: Sync
    transport: Libp2pTransport

    @property
    def circuit(self) -> Address:
        """This node's address through its relay (the only way B is told to reach it)."""
        [address] = [a for a in self.transport.listen_addresses() if "/p2p-circuit" in a]
        return Address("p2p", address)


async def _no_requests(_message: Message, _context: RequestContext) -> AsyncIterator[Message]:
    return
    yield  # a relay-only node serves no sync requests


@asynccontextmanager
async def relay_node(
    key: SigningKey, *, port: int = 0, limits: RelayLimits = DEFAULT_RELAY_LIMITS
) -> AsyncIterator[Libp2pTransport]:
    """A node that only relays (no sync), on ``port``."""
    relay = Libp2pTransport(
        key, listen=[f"/ip4/127.0.0.1/tcp/{port}"], relay_service=True, relay_limits=limits, hole_punching=False
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        await nursery.start(relay.serve, _no_requests)
        yield relay
        nursery.cancel_scope.cancel()


async def sync_node(
    stack: AsyncExitStack, name: str, *, relays: list[str] | None = None, hole_punching: bool = False
) -> Node:
    instance = Instance.in_memory()
    sync = await stack.enter_async_context(enable_sync(instance, config=SyncConfig(display_name=name)))
    transport = Libp2pTransport(
        instance.device_key, listen=["/ip4/127.0.0.1/tcp/0"], relays=relays or [], hole_punching=hole_punching
    )
    sync.register_transport("p2p", transport)
    await sync.accept_connections()
    return Node(instance, sync, transport)


def _shared_db(node: Node, entries: int = 1) -> str:
    db = node.instance.create_database(name="shared")
    with db.transaction() as txn:
        txn.settings().set_global(Permission.write(10))
    for i in range(entries):
        with db.transaction() as txn:
            txn.doc("notes").set(f"k{i % 50}", f"{i}:" + "x" * 300)
    return db.id


def _port(address: str) -> int:
    return int(multiaddr.Multiaddr(address).value_for_protocol("tcp"))


async def test_sync_over_a_relayed_connection() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            relay = await stack.enter_async_context(relay_node(SigningKey.generate()))
            a = await sync_node(stack, "a", relays=relay.listen_addresses())
            b = await sync_node(stack, "b")
            [reservation] = a.transport.status().reservations
            assert reservation.state == "reserved"
            assert a.transport.peer_id in relay.status().relay_service.reservations  # type: ignore[union-attr]

            # A's circuit address is in its tickets; B is given only that one, and bootstraps.
            db_id = _shared_db(a, entries=2000)
            assert a.circuit in a.sync.create_ticket(db_id).addresses
            joined = await b.sync.join(Ticket(db_id, (a.circuit,)))
            assert len(joined) == len(a.instance.open_database(db_id))
            assert b.transport.connection_kind(a.transport.peer_id) == "relayed"
            assert a.transport.connection_kind(b.transport.peer_id) == "relayed"
            peer = next(p for p in b.transport.status().peers if p.peer_id == a.transport.peer_id)
            assert peer.relay == relay.peer_id and peer.device == a.instance.device_id
            service = relay.status().relay_service
            assert service is not None and service.active_circuits == 1 and service.circuits_opened == 1
            record = b.sync.state.peer(a.instance.device_id)  # A's handshake carried it too
            assert record is not None and a.circuit in record.addresses

            # Incremental, both ways, in one exchange.
            b.sync.state.relate(db_id, a.instance.device_id, on_commit=False)
            a.sync.state.relate(db_id, b.instance.device_id, on_commit=False)
            with a.instance.open_database(db_id).transaction() as txn:
                txn.doc("notes").set("from_a", 1)
            with joined.transaction() as txn:
                txn.doc("notes").set("from_b", 2)
            await b.sync.sync_now(a.instance.device_id, db_id)
            assert a.instance.open_database(db_id).tips() == joined.tips()
            assert a.instance.open_database(db_id).doc("notes").get("from_b") == 2

            # Sync on commit, both ways, over the same circuit.
            b.sync.state.relate(db_id, a.instance.device_id, on_commit=True)
            a.sync.state.relate(db_id, b.instance.device_id, on_commit=True)
            with a.instance.open_database(db_id).transaction() as txn:
                txn.doc("notes").set("live", "a")
            await until(lambda: joined.doc("notes").get("live") == "a", "a's write on b")
            with joined.transaction() as txn:
                txn.doc("notes").set("live", "b")
            await until(lambda: a.instance.open_database(db_id).doc("notes").get("live") == "b", "b's write on a")
            assert b.transport.connection_kind(a.transport.peer_id) == "relayed"
            assert relay.status().relay_service.circuits_opened == 1  # type: ignore[union-attr]


async def test_circuit_to_a_node_without_reservation_is_refused() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            relay = await stack.enter_async_context(relay_node(SigningKey.generate()))
            a = await sync_node(stack, "a")  # no relays: nothing reserved
            b = await sync_node(stack, "b")
            circuit = f"{relay.listen_addresses()[0]}/p2p-circuit/p2p/{a.transport.peer_id}"
            with pytest.raises(UnreachableError, match="NO_RESERVATION"):
                await b.sync.connect(Address("p2p", circuit))


async def test_a_circuits_data_limit_is_honoured_and_the_bootstrap_spans_several_circuits() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            limits = RelayLimits(circuit_bytes=256 * 1024)
            relay = await stack.enter_async_context(relay_node(SigningKey.generate(), limits=limits))
            a = await sync_node(stack, "a", relays=relay.listen_addresses())
            b = await sync_node(stack, "b")
            [reservation] = a.transport.status().reservations
            assert reservation.limit is not None and reservation.limit.data == 256 * 1024  # advertised, and read
            db_id = _shared_db(a, entries=2000)  # ~0.9 MB of entries: over the limit
            joined = await b.sync.join(Ticket(db_id, (a.circuit,)))
            service = relay.status().relay_service
            # Each answer was sized to what its circuit had left, and the next one went on
            # over a fresh circuit from what was stored: the relay never had to cut one.
            assert service is not None and service.circuits_cut == 0 and service.circuits_opened >= 4
            assert len(joined) == len(a.instance.open_database(db_id))
            assert b.transport.connection_kind(a.transport.peer_id) == "relayed"


async def test_reservations_are_renewed_before_they_expire() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            relay = await stack.enter_async_context(
                relay_node(SigningKey.generate(), limits=RelayLimits(reservation_ttl_s=2))
            )
            a = await sync_node(stack, "a", relays=relay.listen_addresses())
            [first] = a.transport.status().reservations
            assert first.state == "reserved" and first.expires_at is not None
            await until(lambda: a.transport.status().reservations[0].renewals >= 3, "three renewals", poll_s=0.1)
            [renewed] = a.transport.status().reservations
            assert renewed.state == "reserved"
            assert renewed.expires_at is not None and renewed.expires_at > first.expires_at
            # Three lifetimes later the relay still holds it, and A is still reachable through it.
            assert a.transport.peer_id in relay.status().relay_service.reservations  # type: ignore[union-attr]
            b = await sync_node(stack, "b")
            hello = await b.sync.connect(a.circuit)
            assert hello.pubkey == a.instance.device_id


class RestartableRelay:
    """A relay-only node in a task of its own, so that it can stop and start again on its port."""

    def __init__(self, key: SigningKey) -> None:
        self.key = key
        self.port = 0
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()

    async def start(self, nursery: trio.Nursery) -> Libp2pTransport:
        self._scope, self._stopped = trio.CancelScope(), trio.Event()

        async def run(*, task_status: TaskStatus[Libp2pTransport]) -> None:
            try:
                with self._scope:
                    async with relay_node(self.key, port=self.port) as relay:
                        self.port = _port(relay.listen_addresses()[0])
                        task_status.started(relay)
                        await trio.sleep_forever()
            finally:
                self._stopped.set()

        relay: Libp2pTransport = await nursery.start(run)
        return relay

    async def stop(self) -> None:
        self._scope.cancel()
        await self._stopped.wait()  # its host is closed: the port is free again


async def test_reserves_again_after_the_relay_restarts() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as relays, AsyncExitStack() as stack:
            relay = RestartableRelay(SigningKey.generate())
            relay_address = (await relay.start(relays)).listen_addresses()[0]
            a = await sync_node(stack, "a", relays=[relay_address])
            b = await sync_node(stack, "b")
            db_id = _shared_db(a)
            joined = await b.sync.join(Ticket(db_id, (a.circuit,)))
            assert b.transport.connection_kind(a.transport.peer_id) == "relayed"

            await relay.stop()  # A notices, and the circuit is gone
            await until(lambda: a.transport.status().reservations[0].state != "reserved", "a losing its reservation")
            await until(
                lambda: b.transport.connection_kind(a.transport.peer_id) is None, "b's relayed connection closing"
            )

            restarted = await relay.start(relays)  # same key, same port
            assert restarted.listen_addresses()[0] == relay_address
            await until(lambda: a.transport.status().reservations[0].state == "reserved", "a reserving again")
            [reservation] = a.transport.status().reservations
            assert reservation.renewals >= 1
            assert a.transport.peer_id in restarted.status().relay_service.reservations  # type: ignore[union-attr]
            with joined.transaction() as txn:  # sync on commit reaches A through a new circuit
                txn.doc("notes").set("after_restart", True)
            await until(
                lambda: a.instance.open_database(db_id).doc("notes").get("after_restart") is True,
                "the write after the relay's restart",
            )
            assert b.transport.connection_kind(a.transport.peer_id) == "relayed"
            relays.cancel_scope.cancel()


async def test_hole_punching_upgrades_a_relayed_connection_and_reports_it() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            relay = await stack.enter_async_context(relay_node(SigningKey.generate()))
            a = await sync_node(stack, "a", relays=relay.listen_addresses(), hole_punching=True)
            b = await sync_node(stack, "b", hole_punching=True)
            for node in (a, b):
                assert node.transport.hole_puncher is not None
                node.transport.hole_puncher.relay_grace_s = 0.5  # then the relayed twin is closed
            db_id = _shared_db(a)
            await b.sync.join(Ticket(db_id, (a.circuit,)))
            # A accepted the relayed connection, so A starts DCUtR; B answers.
            b_peer = b.transport.peer_id
            await until(lambda: any(h.peer == b_peer for h in a.transport.status().hole_punches), "a hole punch with b")
            [punch] = [h for h in a.transport.status().hole_punches if h.peer == b_peer]
            assert punch.role == "initiator" and punch.error is None
            assert punch.succeeded and 0 < punch.duration_s < 10  # loopback: nothing stops a direct dial
            assert a.transport.connection_kind(b_peer) == "direct"
            await until(lambda: b.transport.connection_kind(a.transport.peer_id) == "direct", "a direct connection")
            a.sync.state.relate(db_id, b.instance.device_id)  # a pushes to b: its choice (b only read)
            with a.instance.open_database(db_id).transaction() as txn:
                txn.doc("notes").set("direct", True)
            await until(
                lambda: b.instance.open_database(db_id).doc("notes").get("direct") is True,
                "a write over the direct connection",
            )
            # The relayed connection is closed after the grace period, and the relay's circuit with it.
            await until(lambda: relay.status().relay_service.active_circuits == 0, "no circuit left on the relay")  # type: ignore[union-attr]
            peer = next(p for p in b.transport.status().peers if p.peer_id == a.transport.peer_id)
            assert peer.kind == "direct" and peer.connections == 1


async def test_reachability_comes_from_a_dial_back_on_a_fresh_connection() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            relay = await stack.enter_async_context(relay_node(SigningKey.generate()))
            a = await sync_node(stack, "a", relays=relay.listen_addresses())
            await until(lambda: a.transport.status().reachability != "unknown", "a's reachability")
            status = a.transport.status()
            assert status.reachability == "public" and status.reachability_checked_by == relay.peer_id
            [seen] = [d for d in relay.status().dialbacks if d.peer == a.transport.peer_id]
            assert seen.reachability == "public" and seen.address is not None

            # AutoNAT v1's false "public": A is connected to R already, but nothing listens at
            # the port it names. A dial-back that reused the connection would succeed; ours fails.
            await trio.sleep(2.1)  # the server's per-peer rate limit
            relay_peer = PeerID.from_base58(relay.peer_id)
            answer = await ask_dialback(a.transport.host, relay_peer, ["/ip4/127.0.0.1/tcp/1"])
            assert answer["status"] == "unreachable", answer
            [seen] = [d for d in relay.status().dialbacks if d.peer == a.transport.peer_id]
            assert seen.reachability == "private"
