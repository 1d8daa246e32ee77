"""Sync over the simulated network: bootstrap, incremental, sync on commit, access, security, restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from dag import Instance, Permission, SigningKey, Status, decode_entry
from sync import AccessPendingError, Address, SyncPeerInfo, UnauthorizedError
from sync.messages import SyncTree
from sync.proofs import make_proof
from sync.transport import RequestContext
from tests.simnet import Node, sim_node, sim_nodes, sim_now_ms, snapshot
from transports.memory import SimNetwork


def _public_db(node: Node, name: str = "shared") -> str:
    db = node.instance.create_database(name=name)
    with db.transaction() as txn:
        txn.settings().set_global(Permission.write(10))
        txn.doc("notes").set("title", "hello")
    return db.id


async def test_join_bootstraps_then_commits_flow_both_ways(autojump_clock: MockClock) -> None:
    network = SimNetwork(1)
    async with sim_nodes(network, 2, default_interval_s=10**6) as (a, b):  # no periodic sync: count requests
        db_id = _public_db(a)
        ticket = a.sync.create_ticket(db_id)
        assert str(ticket).startswith(f"eidetica:?db={db_id}&pr=memory:n0")
        joined = await b.sync.join(str(ticket))
        assert joined.doc("notes").get("title") == "hello"
        a.sync.state.relate(db_id, b.sync.device_id)  # a's side chooses to push to b: a reader alone is never dialled
        assert snapshot(joined) == snapshot(a.db(db_id))
        network.stats.reset()
        with a.db(db_id).transaction() as txn:
            txn.doc("notes").set("from_a", 1)
        await a.sync.flush()
        assert b.db(db_id).doc("notes").get("from_a") == 1
        assert network.stats.requests == 1  # sync on commit: one push, no echo
        with b.db(db_id).transaction() as txn:
            txn.doc("notes").set("from_b", 2)
        await b.sync.flush()
        assert a.db(db_id).doc("notes").get("from_b") == 2
        assert snapshot(a.db(db_id)) == snapshot(b.db(db_id))


async def test_diverged_sync_sends_exactly_the_missing_entries_in_one_round_trip(autojump_clock: MockClock) -> None:
    network = SimNetwork(2)
    async with sim_nodes(network, 2, default_interval_s=10**6) as (a, b):  # no periodic sync: count requests
        db_id = _public_db(a)
        await b.sync.join(a.sync.create_ticket(db_id))
        await b.sync.flush()  # the push the bootstrap's own writes queued runs (and finds nothing) now
        a.sync.state.relate(db_id, b.sync.device_id, on_commit=False)
        b.sync.state.relate(db_id, a.sync.device_id, on_commit=False)
        for node, tag in ((a, "a"), (b, "b")):
            for i in range(30):
                with node.db(db_id).transaction() as txn:
                    txn.doc("notes").set(f"{tag}{i}", i)
        network.stats.reset()
        a.sync.handler.stats.entries_sent = 0
        await b.sync.sync_with_peer(Address("memory", "n0"), db_id)
        assert network.stats.requests == 3, network.stats  # handshake, confirm, and one SyncTree
        assert a.sync.handler.stats.entries_sent == 30
        assert a.sync.handler.stats.entries_received == 30
        assert snapshot(a.db(db_id)) == snapshot(b.db(db_id))


async def test_protected_database_is_refused_to_an_unauthorised_node(autojump_clock: MockClock) -> None:
    network = SimNetwork(3)
    async with sim_nodes(network, 2) as (a, b):
        db = a.instance.create_database(name="private")
        with db.transaction() as txn:
            txn.doc("notes").set("secret", 42)
        with pytest.raises(UnauthorizedError, match=r"may not read this database"):
            await b.sync.join(a.sync.create_ticket(db.id))
        assert not b.instance.has_database(db.id)


async def test_access_request_pending_then_approved_then_served(autojump_clock: MockClock) -> None:
    network = SimNetwork(4)
    async with sim_nodes(network, 2) as (a, b):
        db = a.instance.create_database(name="private")
        with db.transaction() as txn:
            txn.doc("notes").set("secret", 42)
        ticket = a.sync.create_ticket(db.id)
        with pytest.raises(AccessPendingError) as pending:
            await b.sync.join(ticket, access="write:10")
        [request] = a.sync.access_requests("pending")
        assert request.key == b.sync.device_id and request.permission == "write:10"
        assert pending.value.request_id == request.request_id  # what the asker hands to the admin
        with pytest.raises(AccessPendingError):  # asking again does not duplicate the request
            await b.sync.join(ticket, access="write:10")
        assert len(a.sync.access_requests()) == 1
        a.sync.approve_request(request.request_id)
        joined = await b.sync.join(ticket, access="write:10")
        assert joined.doc("notes").get("secret") == 42
        with joined.transaction() as txn:  # b's own key may now write
            txn.doc("notes").set("by_b", True)
        await b.sync.flush()
        assert db.doc("notes").get("by_b") is True


async def test_rejected_access_request_keeps_being_refused(autojump_clock: MockClock) -> None:
    network = SimNetwork(5)
    async with sim_nodes(network, 2) as (a, b):
        db = a.instance.create_database(name="private")
        ticket = a.sync.create_ticket(db.id)
        with pytest.raises(AccessPendingError):
            await b.sync.join(ticket, access="read")
        [request] = a.sync.access_requests()
        a.sync.reject_request(request.request_id)
        with pytest.raises(Exception, match=r"was rejected"):
            await b.sync.join(ticket, access="read")
        assert not b.instance.has_database(db.id)


async def test_replayed_and_stale_requests_are_refused(autojump_clock: MockClock) -> None:
    network = SimNetwork(6)
    async with sim_nodes(network, 1) as (a,):
        db = a.instance.create_database(name="private")
        reader = SigningKey.generate()
        with db.transaction() as txn:
            txn.settings().add_key(reader.pubkey, Permission.read())
        context = RequestContext("memory", remote="test")
        tips = tuple(db.tip_cids())

        async def ask(message: SyncTree) -> list[str]:
            return [answer.TYPE for answer in [a async for a in a.sync.handler.handle(message, context)]]

        proof = make_proof(reader, a.sync.device_id, db.root_cid, tips, sim_now_ms())
        request = SyncTree(db.root_cid, tips=tips, auth=proof)
        assert await ask(request) == ["Incremental"]
        replayed = [x async for x in a.sync.handler.handle(request, context)]
        assert replayed[0].TYPE == "Error" and replayed[0].code == "replayed"  # type: ignore[union-attr]
        stale = make_proof(reader, a.sync.device_id, db.root_cid, tips, sim_now_ms() - 61_000)
        answer = [x async for x in a.sync.handler.handle(SyncTree(db.root_cid, tips=tips, auth=stale), context)]
        assert answer[0].TYPE == "Error" and answer[0].code == "stale"  # type: ignore[union-attr]
        outsider = make_proof(SigningKey.generate(), a.sync.device_id, db.root_cid, tips, sim_now_ms())
        answer = [x async for x in a.sync.handler.handle(SyncTree(db.root_cid, tips=tips, auth=outsider), context)]
        assert answer[0].TYPE == "Error" and answer[0].code == "unauthorized"  # type: ignore[union-attr]


async def test_forged_entry_fails_on_the_receiver_and_is_never_passed_on(autojump_clock: MockClock) -> None:
    network = SimNetwork(7)
    async with sim_nodes(network, 3) as (a, b, c):
        db_id = _public_db(a)
        await b.sync.join(a.sync.create_ticket(db_id))
        await c.sync.join(b.sync.create_ticket(db_id))
        # b forges an entry in a's name: valid structure, signature over other bytes.
        from tests.test_verification import _forge

        forged = _forge(b.db(db_id), a.instance.device_key, {"notes": {"forged": True}})
        import libipld

        value = libipld.decode_dag_cbor(forged.raw)
        value["subtrees"][0]["data"] = libipld.encode_dag_cbor({"forged": "yes"})
        tampered = bytes(libipld.encode_dag_cbor(value))
        bad = decode_entry(tampered)
        result = b.instance.put_remote_entries([tampered])
        assert bad.id in result.failed
        await b.sync.sync_with_peer(Address("memory", "n0"), db_id)
        await b.sync.sync_with_peer(Address("memory", "n2"), db_id)
        for node in (a, c):
            assert node.db(db_id).status_of(bad.cid) is None
            assert node.db(db_id).doc("notes").get("forged") is None
        assert b.db(db_id).status_of(bad.cid) is Status.FAILED


async def test_write_key_changing_settings_fails_on_every_node(autojump_clock: MockClock) -> None:
    network = SimNetwork(8)
    async with sim_nodes(network, 3) as (a, b, c):
        db_id = _public_db(a)  # global write: b's key may write stores, not _settings
        await b.sync.join(a.sync.create_ticket(db_id))
        await c.sync.join(a.sync.create_ticket(db_id))
        from tests.test_verification import _forge

        grab = _forge(b.db(db_id), b.instance.device_key, {"_settings": {"name": "taken"}})
        result = b.instance.put_remote_entries([grab.raw])
        assert "needs admin" in result.failed[grab.id]
        # Deliver it straight to a and c as well: each one verifies it locally and fails it.
        for node in (a, c):
            outcome = node.instance.put_remote_entries([grab.raw])
            assert "needs admin" in outcome.failed[grab.id]
            assert node.db(db_id).name == "shared"


async def test_unreachable_peer_is_retried_with_backoff_and_catches_up(autojump_clock: MockClock) -> None:
    network = SimNetwork(9)
    async with sim_nodes(network, 2, retry_attempts=8) as (a, b):
        db_id = _public_db(a)
        await b.sync.join(a.sync.create_ticket(db_id))
        a.sync.state.relate(db_id, b.sync.device_id)  # a's side chooses to push to b: a reader alone is never dialled
        network.partition(["n0"], ["n1"])
        with a.db(db_id).transaction() as txn:
            txn.doc("notes").set("while_apart", 1)
        await trio.sleep(1)
        assert b.db(db_id).doc("notes").get("while_apart") is None
        assert "not reachable" in (a.sync.sync_status(db_id, b.sync.device_id).last_error or "")
        network.heal()
        await trio.sleep(40)  # retries at 2, 4, 8, 16, 32 s after the first failure
        assert b.db(db_id).doc("notes").get("while_apart") == 1
        assert a.sync.sync_status(db_id, b.sync.device_id).last_error is None


async def test_periodic_sync_pulls_without_a_commit(autojump_clock: MockClock) -> None:
    network = SimNetwork(10)
    async with sim_nodes(network, 2, default_interval_s=30) as (a, b):
        db_id = _public_db(a)
        await b.sync.join(a.sync.create_ticket(db_id))
        b.sync.state.relate(db_id, a.sync.device_id, on_commit=False, interval_s=30)
        a.sync.state.relate(db_id, b.sync.device_id, on_commit=False, interval_s=30)
        with a.db(db_id).transaction() as txn:
            txn.doc("notes").set("later", 1)
        await trio.sleep(1)
        assert b.db(db_id).doc("notes").get("later") is None
        await trio.sleep(65)
        assert b.db(db_id).doc("notes").get("later") == 1


async def test_restart_resumes_syncing_with_the_same_peers(autojump_clock: MockClock, tmp_path: Path) -> None:
    network = SimNetwork(11)
    async with sim_node(network, "n0") as a:
        db_id = _public_db(a)
        instance = Instance.open(tmp_path / "b")
        async with sim_node(network, "n1", instance) as b:
            await b.sync.join(a.sync.create_ticket(db_id))
            handle = b.sync.register_sync_peer(SyncPeerInfo(a.sync.device_id, db_id))
            assert handle.status().has_local_data
        instance.close()
        with a.db(db_id).transaction() as txn:
            txn.doc("notes").set("while_down", 1)
        reopened = Instance.open(tmp_path / "b")
        async with sim_node(network, "n1", reopened) as b2:
            await trio.sleep(1)  # no sync_with_peer, no ticket: it resumes from _sync alone
            await b2.sync.flush()
            assert b2.db(db_id).doc("notes").get("while_down") == 1
            assert [p.pubkey for p in b2.sync.peers()] == [a.sync.device_id]
            with b2.db(db_id).transaction() as txn:
                txn.doc("notes").set("after_restart", 2)
            await b2.sync.flush()
            assert a.db(db_id).doc("notes").get("after_restart") == 2
        reopened.close()


async def test_bad_requests_get_an_error_and_the_node_keeps_serving(autojump_clock: MockClock) -> None:
    network = SimNetwork(12)
    async with sim_nodes(network, 2) as (a, b):
        db_id = _public_db(a)
        context = RequestContext("memory", remote="test")
        from sync.messages import Ack, SendEntries

        answers = [x async for x in a.sync.handler.handle(Ack(), context)]
        assert answers[0].TYPE == "Error"
        garbage = SendEntries(a.db(db_id).root_cid, (b"\xa1agarbage",))
        answers = [x async for x in a.sync.handler.handle(garbage, context)]
        assert answers[0].TYPE == "Error"
        joined = await b.sync.join(a.sync.create_ticket(db_id))
        assert joined.doc("notes").get("title") == "hello"
