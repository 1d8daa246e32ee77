"""Attacks on the sync layer, each driven through a real node over HTTP on loopback.

One test per defect of the security sweep (handshake floods, dial reflection, access-request
floods, a database whose settings cannot be read, replay after a restart, malformed entries
answered ``internal``, Unverified entries from one peer): each failed on the code before the
fix. Attackers are bare ``HttpTransport`` clients (or raw ``sync.peer`` calls through one),
so the node sees exactly what any peer could send.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from dag import Database, Instance, Permission, SigningKey
from dag.database import Database as DatabaseClass
from dag.ids import cid_of
from sync import Address, Sync, SyncConfig, enable_sync
from sync.handler import (
    MAX_PENDING_HANDSHAKE_BYTES,
    MAX_PENDING_HANDSHAKES,
    MAX_PENDING_HANDSHAKES_PER_SOURCE,
    PendingHandshakes,
)
from sync.messages import (
    MAX_ADDRESS_TEXT,
    MAX_ADDRESSES,
    Bootstrap,
    BootstrapPending,
    Error,
    Handshake,
    HandshakeReply,
    Message,
    SendEntries,
    SyncTree,
)
from sync.peer import handshake
from sync.proofs import make_proof
from sync.state import MAX_PEER_ADDRESSES, MAX_PENDING_REQUESTS_PER_KEY, PENDING_REQUEST_TTL_MS
from tests.forge import forge
from tests.waiting import until
from transports.http import HttpTransport

TIMEOUT_S = 60
pytestmark = pytest.mark.slow


class Clock:
    """Wall-clock milliseconds that a test can move forward (the node and the attacker share it)."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def __call__(self) -> int:
        return int(time.time() * 1000) + self.offset_ms


@dataclass
class HttpNode:
    instance: Instance
    sync: Sync
    address: Address


@asynccontextmanager
async def http_node(instance: Instance, clock: Callable[[], int], label: str = "node") -> AsyncIterator[HttpNode]:
    """A node serving sync over HTTP on 127.0.0.1, on ``clock``."""
    transport = HttpTransport(bind="127.0.0.1:0")
    async with AsyncExitStack() as stack:
        stack.push_async_callback(transport.aclose)
        sync = await stack.enter_async_context(
            enable_sync(instance, config=SyncConfig(display_name=label, request_timeout_s=5), now_ms=clock)
        )
        sync.register_transport("http", transport)
        await sync.accept_connections()
        yield HttpNode(instance, sync, sync.listen_addresses()[0])


@asynccontextmanager
async def attacker() -> AsyncIterator[HttpTransport]:
    """A bare HTTP client (keep-alive: its requests come over one connection)."""
    client = HttpTransport(bind="127.0.0.1:0")
    try:
        yield client
    finally:
        await client.aclose()


async def ask(client: HttpTransport, node: HttpNode, message: Message) -> list[Message]:
    async with aclosing(client.request(node.address.address, message)) as answers:
        return [answer async for answer in answers]


def public_db(instance: Instance, grant: Permission | None = None, name: str = "shared") -> Database:
    db = instance.create_database(name=name)
    with db.transaction() as txn:
        if grant is not None:
            txn.settings().set_global(grant)
        txn.doc("notes").set("title", "hello")
    return db


def big_hello(key: SigningKey, target: tuple[str, str] | None = None) -> Handshake:
    """A Handshake as large as the protocol lets it be (64 addresses of 1,024 characters)."""
    addresses = [("http", f"127.0.0.1:{i}/" + "x" * (MAX_ADDRESS_TEXT - 20)) for i in range(MAX_ADDRESSES)]
    if target is not None:
        addresses[0] = target
    return Handshake(key.pubkey, "n" * 4000, 1, b"c" * 32, tuple(addresses))


def handshakes_alive() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Handshake)


# ---- 4: handshake floods ---------------------------------------------------------------


async def test_handshake_flood_is_bounded_and_lets_go_after_expiry() -> None:
    clock = Clock()
    with trio.fail_after(TIMEOUT_S):
        async with http_node(Instance.in_memory(), clock) as node, attacker() as client:
            before = handshakes_alive()
            flood = MAX_PENDING_HANDSHAKES + 100
            async with trio.open_nursery() as nursery:
                for start in range(0, flood, flood // 8):

                    async def one_connection(start: int = start) -> None:
                        async with attacker() as own:  # one keep-alive connection each
                            for _ in range(start, min(start + flood // 8, flood)):
                                [reply] = await ask(own, node, big_hello(SigningKey.generate()))
                                assert isinstance(reply, HandshakeReply)

                    nursery.start_soon(one_connection)
            pending = node.sync.handler.pending
            # Bounded per source (8 clients, each on a connection or two, at most 8 per
            # connection) and in bytes; nothing of the 66 KB messages is kept, only trimmed hellos.
            assert len(pending) <= 2 * 8 * MAX_PENDING_HANDSHAKES_PER_SOURCE
            assert pending.bytes <= len(pending) * 10_000 <= MAX_PENDING_HANDSHAKE_BYTES
            assert handshakes_alive() - before < 10
            # A legitimate peer still gets through mid-flood.
            hello = await handshake(client, node.address.address, SigningKey.generate(), "ok", [])
            assert hello.pubkey == node.instance.device_id
            clock.offset_ms += 61_000  # past the challenge lifetime: housekeeping lets all go
            node.sync.handler.expire()
            assert len(pending) == 0 and pending.bytes == 0


def test_pending_handshakes_bounded_in_total_and_bytes() -> None:
    from sync.handler import Hello

    pending = PendingHandshakes(max_total=100, max_per_source=8, max_bytes=50_000)
    hello = Hello.trimmed(big_hello(SigningKey.generate()))
    for i in range(1_000):
        pending.add(i.to_bytes(4, "big"), f"source{i}", hello, now_ms=i)
        assert len(pending) <= 100 and pending.bytes <= 50_000
    assert pending.take((999).to_bytes(4, "big"), now_ms=1_000) == hello  # the newest survive
    assert pending.take((0).to_bytes(4, "big"), now_ms=1_000) is None  # the oldest went first


async def test_completed_handshakes_write_nothing_persistent() -> None:
    clock = Clock()
    with trio.fail_after(TIMEOUT_S):
        async with http_node(Instance.in_memory(), clock) as node, attacker() as client:
            state = node.sync.state
            entries_before = len(state.db)
            for _ in range(30):
                key = SigningKey.generate()
                big = [Address("http", f"10.0.0.{i}:1/" + "x" * 900) for i in range(MAX_ADDRESSES)]
                await handshake(client, node.address.address, key, "stranger" * 100, big)
            assert node.sync.peers() == []
            assert len(state.db) == entries_before  # not one entry written to _sync
            assert state.relationships() == []


# ---- 6: dial reflection ----------------------------------------------------------------


async def test_a_strangers_announced_address_is_never_dialled() -> None:
    clock = Clock()
    dials = 0

    async def trap(stream: trio.SocketStream) -> None:
        nonlocal dials
        dials += 1
        await stream.aclose()

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            [listener] = await nursery.start(functools.partial(trio.serve_tcp, trap, 0, host="127.0.0.1"))
            victim = f"127.0.0.1:{listener.socket.getsockname()[1]}"
            async with http_node(Instance.in_memory(), clock) as node, attacker() as client:
                db = public_db(node.instance, Permission.read())
                for _ in range(20):
                    key = SigningKey.generate()
                    addresses = [Address("http", victim), *(Address("http", f"{victim}/{i}") for i in range(20))]
                    await handshake(client, node.address.address, key, "stranger", addresses)
                    proof = make_proof(key, node.instance.device_id, db.root_cid, (), clock())
                    read = SyncTree(db.root_cid, auth=proof)
                    answers = await ask(client, node, read)
                    assert isinstance(answers[-1], Bootstrap)  # a stranger may read a public database
                with db.transaction() as txn:  # one local write: it must not reach the strangers
                    txn.doc("notes").set("k", "v")
                await node.sync.flush()
                await trio.sleep(3)  # the first retries would come at 2 s
                relations = node.sync.state.relationships()
                assert len(relations) == 20 and all(r.served for r in relations)
                assert all(len(p.addresses) <= MAX_PEER_ADDRESSES for p in node.sync.peers())
                assert all(r["error"] is None for r in node.sync.state.history())  # no failed dial, ever
                with pytest.raises(Exception, match="only reads"):
                    await node.sync.sync_now(relations[0].peer, db.id)
            nursery.cancel_scope.cancel()
    assert dials == 0


# ---- 7: access-request floods ------------------------------------------------------------


async def test_access_request_flood_is_bounded_indexed_and_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    import sync.state

    monkeypatch.setattr(sync.state, "MAX_PENDING_REQUESTS", 40)  # the bound's mechanism, at test size
    clock = Clock()
    with trio.fail_after(TIMEOUT_S):
        async with http_node(Instance.in_memory(), clock) as node, attacker() as client:
            db = public_db(node.instance)  # auth configured (the node's key), no global grant
            state = node.sync.state
            scans = 0
            original = state.access_requests

            def counted(status: str | None = None) -> Any:
                nonlocal scans
                scans += 1
                return original(status)

            monkeypatch.setattr(state, "access_requests", counted)

            async def request(key: SigningKey, permission: str = "read") -> Message:
                proof = make_proof(key, node.instance.device_id, db.root_cid, (), clock())
                [answer] = await ask(client, node, SyncTree(db.root_cid, auth=proof, access=permission))
                return answer

            answers = [await request(SigningKey.generate()) for _ in range(60)]
            assert sum(isinstance(a, BootstrapPending) for a in answers) == 40
            assert {a.code for a in answers if isinstance(a, Error)} == {"busy"}
            assert len(original("pending")) == 40
            assert scans <= 1  # built once, then looked up: no scan per request
            # Per key: a few permissions at most, then a clear refusal.
            clock.offset_ms += PENDING_REQUEST_TTL_MS + 1  # ... after the flood's requests expired
            one = SigningKey.generate()
            asked = [await request(one, f"write:{i}") for i in range(1, 8)]
            assert sum(isinstance(a, BootstrapPending) for a in asked) == MAX_PENDING_REQUESTS_PER_KEY
            assert {a.code for a in asked if isinstance(a, Error)} == {"over-budget"}
            assert len(original("pending")) == MAX_PENDING_REQUESTS_PER_KEY  # the 40 old ones are gone
            assert node.sync.peers() == []  # refused requesters are not recorded as peers


# ---- 9: a database whose settings cannot be read ------------------------------------------


async def test_handshake_survives_a_database_whose_settings_cannot_be_read(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # dag now refuses values deeper than 64 levels, so the depth-600 value of the sweep can
    # no longer be stored; the sync guarantee is tested with a database whose settings read raises.
    clock = Clock()
    with trio.fail_after(TIMEOUT_S):
        async with http_node(Instance.in_memory(), clock) as node, attacker() as client:
            good = public_db(node.instance, Permission.read(), name="good")
            bad = public_db(node.instance, Permission.read(), name="bad")
            original = DatabaseClass.settings

            def settings(self: DatabaseClass) -> Any:
                if self.id == bad.id:
                    raise RecursionError("maximum recursion depth exceeded")
                return original(self)

            monkeypatch.setattr(DatabaseClass, "settings", settings)
            caplog.set_level(logging.WARNING, logger="sync.handler")
            for _ in range(3):
                [reply] = await ask(client, node, Handshake(SigningKey.generate().pubkey, "x", 1, b"c" * 32))
                assert isinstance(reply, HandshakeReply), reply
                offers = {o.db: o for o in reply.databases}
                assert offers[good.root_cid].public and offers[good.root_cid].name == "good"
                assert not offers[bad.root_cid].public and offers[bad.root_cid].name is None
            assert sum(bad.id in r.getMessage() for r in caplog.records) == 1  # logged once
            async with http_node(Instance.in_memory(), clock, "joiner") as joiner:
                joined = await joiner.sync.join(node.sync.create_ticket(good.id))
                assert joined.doc("notes").get("title") == "hello"


# ---- 10: replay after a restart ------------------------------------------------------------


async def test_a_read_refused_as_replay_is_still_refused_after_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    reader = SigningKey.generate()
    with trio.fail_after(TIMEOUT_S):
        instance = Instance.open(tmp_path / "node")
        async with http_node(instance, clock) as node, attacker() as client:
            db = public_db(node.instance)
            with db.transaction() as txn:
                txn.settings().add_key(reader.pubkey, Permission.read())
            request = SyncTree(db.root_cid, auth=make_proof(reader, node.instance.device_id, db.root_cid, (), clock()))
            assert isinstance((await ask(client, node, request))[-1], Bootstrap)
            [again] = await ask(client, node, request)
            assert isinstance(again, Error) and again.code == "replayed"
        instance.close()
        await trio.sleep(0.01)  # the restarted node starts after the proof was signed
        instance = Instance.open(tmp_path / "node")
        try:
            async with http_node(instance, clock) as node, attacker() as client:
                [replayed] = await ask(client, node, request)
                assert isinstance(replayed, Error) and replayed.code == "stale", replayed
                proof = make_proof(reader, node.instance.device_id, db.root_cid, (), clock())
                fresh = SyncTree(db.root_cid, auth=proof)
                assert isinstance((await ask(client, node, fresh))[-1], Bootstrap)  # a new proof is served
        finally:
            instance.close()


# ---- 14: malformed entries get the dag's codes, not "internal" ----------------------------


async def test_malformed_entries_are_answered_with_their_dag_codes() -> None:
    clock = Clock()
    key = SigningKey.generate()
    with trio.fail_after(TIMEOUT_S):
        async with http_node(Instance.in_memory(), clock) as node, attacker() as client:
            db = public_db(node.instance, Permission.write(10))
            other = public_db(node.instance, Permission.write(10), name="other")
            foreign = forge(other, key, {"notes": {"y": 2}})
            many_parents = sorted(cid_of(str(i).encode()) for i in range(10_000))
            oversize = forge(db, key, {"notes": {"y": 2}}, parents=many_parents, height=5)

            async def push(raw: bytes) -> str:
                proof = make_proof(key, node.instance.device_id, db.root_cid, (), clock())
                [answer] = await ask(client, node, SendEntries(db.root_cid, (raw,), proof))
                assert isinstance(answer, Error), answer
                return answer.code

            assert await push(foreign.raw) == "bad-entry-garbage"  # another tree's entry
            assert await push(oversize.raw) == "bad-entry-oversize"  # 10K parents
            tips = tuple(db.tip_cids())
            proof = make_proof(key, node.instance.device_id, db.root_cid, tips, clock())
            [answer] = await ask(client, node, SyncTree(db.root_cid, tips=tips, entries=(foreign.raw,), auth=proof))
            assert isinstance(answer, Error) and answer.code == "bad-entry-garbage"


# ---- 8: what one peer can leave stored Unverified -------------------------------------------


async def test_one_peer_cannot_store_unverified_entries_past_its_budget() -> None:
    clock = Clock()
    key = SigningKey.generate()
    with trio.fail_after(TIMEOUT_S):
        async with http_node(Instance.in_memory(), clock) as node, attacker() as client:
            db = public_db(node.instance, Permission.write(10))
            # The attacker's copy: 121 commits, of which it sends all but the first, so
            # every one it sends waits Unverified for a parent that never comes.
            source = Instance.in_memory(key)
            source.put_remote_entries([raw for _cid, _height, raw in db.entries_page(None, 100)])
            copy = source.open_database(db.id)
            for i in range(121):
                with copy.transaction() as txn:
                    txn.doc("notes").set(f"k{i}", i)
            raws = copy.raws(copy.missing_from(sorted(db.tip_cids())))
            first, rest = raws[0], raws[1:]
            node.sync.budget.max_entries = 50  # the bound's mechanism at test size

            async def push(batch: list[bytes]) -> Message:
                proof = make_proof(key, node.instance.device_id, db.root_cid, (), clock())
                [answer] = await ask(client, node, SendEntries(db.root_cid, tuple(batch), proof))
                return answer

            answers = [await push(rest[i : i + 20]) for i in range(0, 60, 20)]
            assert [a.TYPE for a in answers] == ["Count", "Count", "Error"]
            refused = answers[2]
            assert isinstance(refused, Error) and refused.code == "over-budget"
            assert "send their parents first" in refused.message
            assert node.sync.budget.held(key.pubkey)[0] == 40
            # The missing parent arrives: what waited settles, and the budget frees up.
            assert (await push([first])).TYPE == "Count"
            assert node.sync.budget.held(key.pubkey)[0] == 40  # charged until the next check settles it
            for i in range(40, len(rest), 20):
                assert (await push(rest[i : i + 20])).TYPE == "Count"
            assert db.doc("notes").get("k120") == 120
            assert node.sync.budget.held(key.pubkey)[0] == 0


async def test_a_reader_an_admin_approved_is_pushed_to() -> None:
    """Served relationships stay useful: once an admin names the reader's key, commits reach it."""
    clock = Clock()
    with trio.fail_after(TIMEOUT_S):
        async with http_node(Instance.in_memory(), clock, "a") as a, http_node(Instance.in_memory(), clock, "b") as b:
            db = public_db(a.instance)  # private: readers need an approved key
            ticket = a.sync.create_ticket(db.id)
            with pytest.raises(Exception, match="waits for an admin"):
                await b.sync.join(ticket, access="read")
            [request] = a.sync.access_requests("pending")
            a.sync.approve_request(request.request_id)
            await b.sync.join(ticket, access="read")
            [relation] = a.sync.state.relationships(db.id)
            assert relation.served and relation.peer == b.instance.device_id
            with db.transaction() as txn:
                txn.doc("notes").set("live", True)
            await until(lambda: b.instance.open_database(db.id).doc("notes").get("live") is True, "the push to b")


async def test_readers_recorded_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import sync.state

    monkeypatch.setattr(sync.state, "MAX_SERVED_PEERS", 5)  # the bound's mechanism, at test size
    clock = Clock()
    with trio.fail_after(TIMEOUT_S):
        async with http_node(Instance.in_memory(), clock) as node, attacker() as client:
            db = public_db(node.instance, Permission.read())
            for _ in range(8):
                key = SigningKey.generate()
                proof = make_proof(key, node.instance.device_id, db.root_cid, (), clock())
                answers = await ask(client, node, SyncTree(db.root_cid, auth=proof))
                assert isinstance(answers[-1], Bootstrap)  # every reader is served ...
            assert len(node.sync.state.relationships()) == 5  # ... the first five are recorded
            assert len(node.sync.peers()) == 5


def test_a_full_replay_guard_refuses_rather_than_forgets() -> None:
    from sync import BusyError
    from sync.proofs import ReplayGuard

    server, db, now = SigningKey.generate(), cid_of(b"db"), 1_700_000_000_000
    guard = ReplayGuard(capacity=3, started_ms=now - 1)
    proofs = [make_proof(SigningKey.generate(), server.pubkey, db, (), now) for _ in range(4)]
    for proof in proofs[:3]:
        guard.check(proof, server.pubkey, db, (), now)
    with pytest.raises(BusyError):
        guard.check(proofs[3], server.pubkey, db, (), now)
    early = make_proof(SigningKey.generate(), server.pubkey, db, (), now - 2)
    with pytest.raises(Exception, match="predates this node's start"):
        ReplayGuard(started_ms=now - 1).check(early, server.pubkey, db, (), now)


async def test_a_libp2p_reader_gets_live_pushes_over_its_own_connection_only() -> None:
    """A node that joined a public database over libp2p holds its connection open: the
    sharer pushes over it (no dial). Once that connection is gone it is not dialled."""
    from tests.kit_libp2p import Libp2pKit

    kit = Libp2pKit()
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            a = await kit.node(stack, "a")
            b = await kit.node(stack, "b")
            db = a.instance.create_database(name="public")
            with db.transaction() as txn:
                txn.settings().set_global(Permission.write(10))
            await b.sync.join(a.sync.create_ticket(db.id))
            [relation] = [r for r in a.sync.state.relationships(db.id) if r.peer == b.instance.device_id]
            assert relation.served  # b only read: never dialled at its announced addresses
            with db.transaction() as txn:
                txn.doc("notes").set("live", True)
            await until(lambda: b.instance.open_database(db.id).doc("notes").get("live") is True, "the push to b")
            transport = a.sync._transports["p2p"]
            assert transport.live_address(b.instance.device_id) is not None  # type: ignore[attr-defined]
            assert transport.live_address(SigningKey.generate().pubkey) is None  # type: ignore[attr-defined]
