"""The asking side's machines (``sync.client``), fed messages with no transport at all.

The server is a real ``SyncHandler`` over a real instance; the client's decisions are
checked answer by answer, and the cases a transport cannot easily stage (an answer for
another database, a frame after the last one, a forged handshake reply) are fed by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from dag import Instance, Permission, SigningKey
from dag.ids import cid_of
from sync.client import DatabaseExchange, ExchangeResult, HandshakeClient, PeerHello
from sync.errors import (
    AccessPendingError,
    LimitError,
    MalformedMessageError,
    OverBudgetError,
    SyncError,
    TransportError,
    UnauthorizedError,
)
from sync.handler import SyncHandler, UnverifiedBudget
from sync.messages import (
    Ack,
    Bootstrap,
    BootstrapPending,
    Error,
    HandshakeReply,
    Incremental,
    Message,
    SendEntries,
    SyncTree,
    encode_message,
)
from sync.state import SyncState
from sync.transport import RequestContext

NOW_MS = 1_800_000_000_000
CONTEXT = RequestContext("memory", remote="client")


def _now() -> int:
    return NOW_MS


async def _inline(function: Callable[[], Any]) -> Any:
    return function()


def _handler(instance: Instance) -> SyncHandler:
    return SyncHandler(
        instance,
        SyncState.open(instance),
        display_name="server",
        now_ms=_now,
        addresses=list,
        offload=_inline,
    )


async def _answers(handler: SyncHandler, message: Message) -> list[Message]:
    return [answer async for answer in handler.handle(message, CONTEXT)]


async def _handshake(handler: SyncHandler, client: Instance) -> PeerHello:
    machine = HandshakeClient(client.device_key, "client", [], where="server")
    (reply,) = await _answers(handler, machine.hello)
    confirm = machine.take_reply(reply)
    (ack,) = await _answers(handler, confirm)
    return machine.take_ack(ack)


def _public_db(server: Instance, rows: int) -> str:
    db = server.create_database(name="shared")
    with db.transaction() as txn:
        txn.settings().set_global(Permission.write(10))
    for i in range(rows):
        with db.transaction() as txn:
            txn.doc("notes").set(f"k{i}", "x" * 400)
    return db.id


def _exchange(client: Instance, server: Instance, db_id: str, **kwargs: Any) -> DatabaseExchange:
    kwargs.setdefault("common", ())
    kwargs.setdefault("access", None)
    return DatabaseExchange(client, peer_key=server.device_key.pubkey, db_id=db_id, now_ms=_now, **kwargs)


async def _run(exchange: DatabaseExchange, handler: SyncHandler, client: Instance) -> tuple[int, ExchangeResult]:
    """Drive one exchange to its end the way ``sync.peer`` does; returns (answer frames, result)."""
    request = exchange.request()
    assert request is not None
    frames = 0
    for answer in await _answers(handler, request):
        frames += 1
        entries = exchange.take(answer)
        if entries:
            exchange.admit(len(entries), entries)
            put = client.put_remote_entries(entries, database_id=request.db)
            exchange.stored(len(entries), entries, put)
    exchange.plan_pushes()
    while (push := exchange.next_push()) is not None:
        (answer,) = await _answers(handler, push)
        exchange.pushed(push, answer)
    return frames, exchange.outcome()


async def test_handshake_machine_against_a_real_handler() -> None:
    server, client = Instance.in_memory(), Instance.in_memory()
    hello = await _handshake(_handler(server), client)
    assert hello.pubkey == server.device_key.pubkey
    assert hello.display_name == "server"


def test_a_reply_that_does_not_prove_the_key_is_refused() -> None:
    machine = HandshakeClient(SigningKey.generate(), "client", [], where="server")
    impostor = SigningKey.generate().pubkey
    forged = HandshakeReply(impostor, "server", 1, b"\x00" * 64, b"c" * 32)
    with pytest.raises(UnauthorizedError, match="could not prove its key"):
        machine.take_reply(forged)
    with pytest.raises(MalformedMessageError, match="expected HandshakeReply, got Ack"):
        machine.take_reply(Ack())
    with pytest.raises(SyncError, match="take_reply must come before take_ack"):
        machine.take_ack(Ack())


async def test_bootstrap_over_several_frames_then_up_to_date_then_a_push() -> None:
    server, client = Instance.in_memory(), Instance.in_memory()
    handler = _handler(server)
    db_id = _public_db(server, rows=12_000)  # ~5 MB: more than one 4 MiB frame
    await _handshake(handler, client)

    frames, result = await _run(_exchange(client, server, db_id), handler, client)
    served = server.open_database(db_id)
    joined = client.open_database(db_id)
    assert frames > 1
    assert result.received == result.verified == 12_002
    assert result.round_trips == 1 and result.sent == 0
    assert sorted(joined.tip_cids()) == sorted(served.tip_cids()) == result.common
    assert joined.doc("notes").get("k11999") == "x" * 400

    # A fast-forward (the server wrote, we did not): the new cursor is the server's tip alone.
    with served.transaction() as txn:
        txn.doc("notes").set("from_server", 1)
    _, forward = await _run(_exchange(client, server, db_id, common=tuple(result.common)), handler, client)
    assert forward.received == 1 and forward.sent == 0
    assert forward.common == sorted(served.tip_cids()) and len(forward.common) == 1
    result = forward

    # Sync on commit with nothing the peer lacks: no request at all.
    idle = _exchange(client, server, db_id, common=tuple(result.common), push_only=True)
    assert idle.request() is None
    assert idle.result.skipped

    # A local commit rides inline in the SyncTree, and the cursor moves to the new tip.
    with joined.transaction() as txn:
        txn.doc("notes").set("from_client", 1)
    push = _exchange(client, server, db_id, common=tuple(result.common))
    request = push.request()
    assert isinstance(request, SyncTree) and len(request.entries) == 1
    for answer in await _answers(handler, request):
        assert push.take(answer) == ()
    push.plan_pushes()
    assert push.next_push() is None
    outcome = push.outcome()
    assert outcome.sent == 1
    assert served.doc("notes").get("from_client") == 1
    assert outcome.common == sorted(served.tip_cids())


async def test_without_a_cursor_what_the_server_lacks_is_pushed_after_the_answer() -> None:
    server, client = Instance.in_memory(), Instance.in_memory()
    handler = _handler(server)
    db_id = _public_db(server, rows=3)
    await _handshake(handler, client)
    await _run(_exchange(client, server, db_id), handler, client)
    joined = client.open_database(db_id)
    for i in range(3):
        with joined.transaction() as txn:
            txn.doc("notes").set(f"c{i}", i)

    exchange = _exchange(client, server, db_id)  # the cursor was lost: sample, then push exactly
    request = exchange.request()
    assert isinstance(request, SyncTree) and request.entries == () and request.have
    for answer in await _answers(handler, request):
        exchange.take(answer)
    exchange.plan_pushes()
    push = exchange.next_push()
    assert isinstance(push, SendEntries) and len(push.entries) == 3
    (answer,) = await _answers(handler, push)
    exchange.pushed(push, answer)
    assert exchange.next_push() is None
    result = exchange.outcome()
    assert (result.sent, result.round_trips) == (3, 2)
    assert server.open_database(db_id).doc("notes").get("c2") == 2


def test_answers_that_are_refusals_or_out_of_place() -> None:
    server, client = Instance.in_memory(), Instance.in_memory()
    db_id = _public_db(server, rows=0)
    db = server.open_database(db_id).root_cid
    other = cid_of(b"another database")

    def fresh() -> DatabaseExchange:
        exchange = _exchange(client, server, db_id)
        assert exchange.request() is not None
        return exchange

    with pytest.raises(UnauthorizedError, match="no reading"):
        fresh().take(Error("unauthorized", "no reading"))
    with pytest.raises(AccessPendingError) as pending:
        fresh().take(BootstrapPending(db, "req-1", "wait"))
    assert pending.value.request_id == "req-1"
    with pytest.raises(MalformedMessageError, match="unexpected answer Ack to SyncTree"):
        fresh().take(Ack())
    with pytest.raises(MalformedMessageError, match="another database"):
        fresh().take(Bootstrap(other, (), ()))
    assert fresh().entries_to_store(Bootstrap(other, (), (b"junk",))) == ()

    done = fresh()
    done.take(Incremental(db, (db,), ()))
    assert done.answered
    with pytest.raises(MalformedMessageError, match="after the last frame"):
        done.take(Incremental(db, (db,), ()))

    cut = fresh()
    cut.take(Bootstrap(db, (db,), (), more=True))
    assert not cut.answered
    with pytest.raises(TransportError, match="ended before its last frame"):
        cut.plan_pushes()


def test_a_push_answered_with_something_else_is_malformed() -> None:
    server, client = Instance.in_memory(), Instance.in_memory()
    db_id = _public_db(server, rows=0)
    exchange = _exchange(client, server, db_id)
    push = SendEntries(server.open_database(db_id).root_cid, ())
    with pytest.raises(MalformedMessageError, match="unexpected answer Bootstrap to SendEntries"):
        exchange.pushed(push, Bootstrap(push.db, (), ()))


def test_a_frame_over_the_peers_unverified_budget_is_refused_before_storing() -> None:
    server, client = Instance.in_memory(), Instance.in_memory()
    db_id = _public_db(server, rows=0)
    budget = UnverifiedBudget(client, max_entries=2)
    exchange = _exchange(client, server, db_id, budget=budget)
    exchange.admit(2, (b"a", b"b"))  # fits
    with pytest.raises(OverBudgetError, match="the limit is 2 entries"):
        exchange.admit(3, (b"a", b"b", b"c"))


def _wire_bytes(answers: list[Message]) -> int:
    """What the answers take on the wire: each frame with its 4-byte length prefix."""
    return sum(4 + len(encode_message(answer)) for answer in answers)


async def _budget_round(
    handler: SyncHandler, client: Instance, server: Instance, db_id: str, budget: int
) -> tuple[DatabaseExchange, SyncTree, list[Message]]:
    """One round under ``budget`` bytes, stored the way ``sync.peer`` does."""
    exchange = _exchange(client, server, db_id)
    request = exchange.request(budget)
    assert isinstance(request, SyncTree) and 0 < request.budget < budget
    answers = await _answers(handler, request)
    for answer in answers:
        entries = exchange.take(answer)
        if entries:
            exchange.stored(len(entries), entries, client.put_remote_entries(entries, database_id=request.db))
    return exchange, request, answers


async def test_answers_stay_inside_their_budget_and_each_round_continues_from_what_is_stored() -> None:
    server, client = Instance.in_memory(), Instance.in_memory()
    handler = _handler(server)
    db_id = _public_db(server, rows=1_000)  # ~450 KB
    await _handshake(handler, client)
    budget = 64 * 1024
    rounds = 0
    while True:
        rounds += 1
        exchange, request, answers = await _budget_round(handler, client, server, db_id, budget)
        # The whole answer, frames and prefixes, fits what the request allowed it.
        assert _wire_bytes(answers) <= request.budget
        assert all(isinstance(a, Bootstrap if rounds == 1 else Incremental) for a in answers)
        if exchange.answered:
            break
        assert isinstance(answers[-1], Bootstrap | Incremental) and answers[-1].more  # it stopped for the budget
        assert exchange.result.received > 0
        assert rounds < 50
    served, joined = server.open_database(db_id), client.open_database(db_id)
    assert rounds >= 450_000 // budget
    assert len(joined) == len(served) and sorted(joined.tip_cids()) == sorted(served.tip_cids())

    # Without a budget nothing changes: one answer, no budget field on the wire.
    again = _exchange(client, server, db_id)
    plain = again.request()
    assert isinstance(plain, SyncTree) and plain.budget == 0
    assert b"budget" not in encode_message(plain)


async def test_an_entry_that_cannot_fit_a_budget_is_refused_in_one_clear_line() -> None:
    server, client = Instance.in_memory(), Instance.in_memory()
    handler = _handler(server)
    db_id = _public_db(server, rows=0)
    with server.open_database(db_id).transaction() as txn:
        txn.doc("notes").set("big", "x" * 40_000)
    await _handshake(handler, client)
    # The small entries come first; the big one ends the answer early (it may fit a fresh circuit) ...
    exchange, _, _ = await _budget_round(handler, client, server, db_id, 20_000)
    assert not exchange.answered and exchange.result.received == 2
    # ... and an answer that cannot start with it says why, in one line.
    exchange = _exchange(client, server, db_id)
    request = exchange.request(20_000)
    assert request is not None
    (answer,) = await _answers(handler, request)
    with pytest.raises(
        LimitError, match=r"is \d+ bytes, more than the \d+ bytes .* needs a direct connection"
    ) as raised:
        exchange.take(answer)
    assert "\n" not in str(raised.value)


async def test_pushes_are_sized_to_the_budget() -> None:
    server, client = Instance.in_memory(), Instance.in_memory()
    handler = _handler(server)
    db_id = _public_db(server, rows=3)
    await _handshake(handler, client)
    await _run(_exchange(client, server, db_id), handler, client)
    joined = client.open_database(db_id)
    for i in range(40):
        with joined.transaction() as txn:
            txn.doc("notes").set(f"c{i}", "y" * 1_000)
    exchange = _exchange(client, server, db_id)  # no cursor: pushes after the answer
    request = exchange.request(8_000)
    assert request is not None and request.entries == ()
    for answer in await _answers(handler, request):
        exchange.take(answer)
    exchange.plan_pushes()
    batches = 0
    while (push := exchange.next_push(8_000)) is not None:
        assert 4 + len(encode_message(push)) <= 8_000 and push.entries
        (answer,) = await _answers(handler, push)
        exchange.pushed(push, answer)
        batches += 1
    assert batches >= 40_000 // 8_000 and not exchange.pushes_left
    assert server.open_database(db_id).doc("notes").get("c39") == "y" * 1_000
    assert exchange.next_push(100) is None  # nothing left: None whatever the budget
