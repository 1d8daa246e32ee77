"""One conformance suite, run over every transport: the same scenarios, the same outcomes."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from dag import Instance, Permission
from sync import AccessPendingError, UnauthorizedError
from sync.messages import SyncTree
from tests.transport_kits import Kit, MemoryKit, Node
from tests.waiting import until

KITS: dict[str, Callable[[], Kit]] = {"memory": MemoryKit}
for _module, _name in (("tests.kit_http", "HttpKit"), ("tests.kit_libp2p", "Libp2pKit")):
    try:  # each real transport adds its kit from its own module
        _kit = getattr(importlib.import_module(_module), _name)
    except ModuleNotFoundError:  # pragma: no cover - only while a transport is being built
        continue
    KITS[_kit.name] = _kit

TIMEOUT_S = 20


@pytest.fixture(params=sorted(KITS))
def kit(request: pytest.FixtureRequest) -> Kit:
    return KITS[request.param]()


@asynccontextmanager
async def nodes(kit: Kit, count: int) -> AsyncIterator[list[Node]]:
    async with AsyncExitStack() as stack:
        yield [await kit.node(stack, f"node{i}") for i in range(count)]


def _shared(node: Node, *, public: bool = True) -> str:
    db = node.instance.create_database(name="shared")
    with db.transaction() as txn:
        if public:
            txn.settings().set_global(Permission.write(10))
        txn.doc("notes").set("title", "hello")
    return db.id


async def test_handshake(kit: Kit) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with nodes(kit, 2) as (a, b):
            hello = await b.sync.connect(a.address)
            assert hello.pubkey == a.instance.device_id
            assert a.address in hello.addresses
            # a remembers b's hello, but writes nothing for a peer that only handshook.
            await until(lambda: a.sync.handler.hello_of(b.instance.device_id) is not None, "b's hello on a")
            assert a.sync.state.peer(b.instance.device_id) is None


async def test_bootstrap_and_incremental_both_ways(kit: Kit) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with nodes(kit, 2) as (a, b):
            db_id = _shared(a)
            for i in range(300):
                with a.instance.open_database(db_id).transaction() as txn:
                    txn.doc("notes").set(f"k{i}", i)
            joined = await b.sync.join(a.sync.create_ticket(db_id))
            assert len(joined) == len(a.instance.open_database(db_id))
            assert joined.doc("notes").get("k299") == 299
            b.sync.state.relate(db_id, a.instance.device_id, on_commit=False)
            a.sync.state.relate(db_id, b.instance.device_id, on_commit=False)
            with a.instance.open_database(db_id).transaction() as txn:
                txn.doc("notes").set("from_a", 1)
            with joined.transaction() as txn:
                txn.doc("notes").set("from_b", 2)
            await b.sync.sync_now(a.instance.device_id, db_id)
            for node in (a, b):
                doc = node.instance.open_database(db_id).doc("notes")
                assert doc.get("from_a") == 1 and doc.get("from_b") == 2
            assert a.instance.open_database(db_id).tips() == joined.tips()


async def test_sync_on_commit(kit: Kit) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with nodes(kit, 2) as (a, b):
            db_id = _shared(a)
            await b.sync.join(a.sync.create_ticket(db_id))
            # a pushes to b once a's side chooses to (b only read a public database).
            a.sync.state.relate(db_id, b.instance.device_id)
            with a.instance.open_database(db_id).transaction() as txn:
                txn.doc("notes").set("live", True)
            await until(lambda: b.instance.open_database(db_id).doc("notes").get("live") is True, "a's push on b")
            with b.instance.open_database(db_id).transaction() as txn:
                txn.doc("notes").set("back", True)
            await until(lambda: a.instance.open_database(db_id).doc("notes").get("back") is True, "b's write on a")


async def test_access_request_pending_approved_served(kit: Kit) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with nodes(kit, 2) as (a, b):
            db_id = _shared(a, public=False)
            ticket = a.sync.create_ticket(db_id)
            with pytest.raises(AccessPendingError):
                await b.sync.join(ticket, access="write:5")
            [request] = a.sync.access_requests("pending")
            a.sync.approve_request(request.request_id)
            joined = await b.sync.join(ticket, access="write:5")
            assert joined.doc("notes").get("title") == "hello"


async def test_protected_database_refused(kit: Kit) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with nodes(kit, 2) as (a, b):
            db_id = _shared(a, public=False)
            with pytest.raises(UnauthorizedError):
                await b.sync.join(a.sync.create_ticket(db_id))
            assert not b.instance.has_database(db_id)


async def test_bad_peers_get_an_error_and_others_are_still_served(kit: Kit) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with nodes(kit, 2) as (a, b):
            db_id = _shared(a)
            for i in range(3000):  # enough for a multi-frame answer
                with a.instance.open_database(db_id).transaction() as txn:
                    txn.doc("notes").set(f"k{i % 10}", "x" * 400)
            assert await kit.send_garbage(a) in ("malformed", "unknown-message", "closed", "400")
            assert await kit.send_oversize(a) in ("oversize", "closed", "413")
            request = SyncTree(a.instance.open_database(db_id).root_cid)
            await kit.drop_mid_answer(a, request)
            joined = await b.sync.join(a.sync.create_ticket(db_id))
            assert len(joined) == len(a.instance.open_database(db_id))


async def test_instance_fixture_backends_are_not_mixed(kit: Kit) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            node = await kit.node(stack, "solo", Instance.in_memory())
            assert node.address.transport == kit.name
