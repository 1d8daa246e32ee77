"""Sync messages, proofs and tickets: strict decoding and clear refusals."""

from __future__ import annotations

import msgpack
import pytest

from dag import SigningKey
from dag.ids import cid_of
from sync import (
    MalformedMessageError,
    OversizeMessageError,
    ReplayedRequestError,
    StaleRequestError,
    Ticket,
    TicketError,
    UnauthorizedError,
    UnknownMessageError,
    decode_message,
    encode_message,
)
from sync.messages import MAX_BUDGET, MAX_ENTRIES_PER_MESSAGE, AuthProof, Bootstrap, Error, Handshake, SyncTree
from sync.proofs import ReplayGuard, make_proof
from sync.transport import Address

DB = cid_of(b"db")
TIP = cid_of(b"tip")


def test_round_trip_of_every_field_kind() -> None:
    message = SyncTree(
        db=DB,
        tips=(TIP,),
        common=(DB,),
        have=(TIP, DB),
        entries=(b"\xa1aa\x01",),
        auth=AuthProof("ed25519:x", 5, b"n" * 16, b"s" * 64),
        access="write:3",
        budget=120_000,
    )
    assert decode_message(encode_message(message)) == message
    hello = Handshake("ed25519:k", "node", 1, b"c" * 32, (("memory", "A"),))
    assert decode_message(encode_message(hello)) == hello


def _packed(body: object) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"\xc1", MalformedMessageError, r"^not a msgpack message"),
        (_packed([1, 2]), MalformedMessageError, r"^a message is a map$"),
        (_packed({"type": "Nope"}), UnknownMessageError, r"^unknown message type 'Nope'$"),
        (_packed({"type": "SyncTree"}), MalformedMessageError, r"^SyncTree lacks field 'db'$"),
        (_packed({"type": "SyncTree", "db": b"x"}), MalformedMessageError, r"^field 'db' is not an entry ID$"),
        (_packed({"type": "SyncTree", "db": DB, "extra": 1}), MalformedMessageError, r"unknown fields \['extra'\]"),
        (_packed({"type": "SyncTree", "db": DB, "tips": "x"}), MalformedMessageError, r"^field 'tips' is not a list$"),
        (_packed({"type": "Error", "code": 1, "message": "m"}), MalformedMessageError, r"^field 'code' is not text$"),
        (_packed({"type": "SyncTree", "db": DB, "budget": -1}), MalformedMessageError, r"'budget' is not a byte count"),
        (_packed({"type": "SyncTree", "db": DB, "budget": MAX_BUDGET}), MalformedMessageError, r"not a byte count"),
        (_packed({"type": "SyncTree", "db": DB, "budget": "1"}), MalformedMessageError, r"is not an integer"),
        (
            _packed({"type": "Bootstrap", "db": DB, "tips": [], "entries": [b"e"] * (MAX_ENTRIES_PER_MESSAGE + 1)}),
            OversizeMessageError,
            r"^message over a limit",
        ),
        (
            _packed({"type": "Bootstrap", "db": DB, "tips": [], "entries": [1]}),
            MalformedMessageError,
            r"holds an entry that is not bytes",
        ),
        (
            _packed(
                {"type": "Handshake", "device_key": "k", "display_name": "n", "version": 1, "challenge": b"c" * 65}
            ),
            OversizeMessageError,
            r"^field 'challenge' is over 64 bytes$",
        ),
    ],
)
def test_bad_messages_are_refused(data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        decode_message(data)


def test_a_sync_tree_without_a_budget_is_what_older_peers_send_and_accept() -> None:
    # Older peers refuse unknown fields, so the field is left out when it says "no limit";
    # a request from an older peer (no field) means no limit.
    assert "budget" not in msgpack.unpackb(encode_message(SyncTree(db=DB)))
    assert decode_message(_packed({"type": "SyncTree", "db": DB})) == SyncTree(db=DB, budget=0)
    assert msgpack.unpackb(encode_message(SyncTree(db=DB, budget=5)))["budget"] == 5


def test_answers_and_errors_round_trip() -> None:
    for message in (Bootstrap(DB, (TIP,), (b"\xa0",), more=True), Error("unauthorized", "no")):
        assert decode_message(encode_message(message)) == message


def test_proofs_fresh_stale_replayed_forged() -> None:
    client, server = SigningKey.generate(), SigningKey.generate()
    guard = ReplayGuard()
    now = 1_700_000_000_000
    proof = make_proof(client, server.pubkey, DB, [TIP], now)
    assert guard.check(proof, server.pubkey, DB, [TIP], now + 1000) == client.pubkey
    with pytest.raises(ReplayedRequestError, match=r"replay"):
        guard.check(proof, server.pubkey, DB, [TIP], now + 2000)
    stale = make_proof(client, server.pubkey, DB, [TIP], now - 61_000)
    with pytest.raises(StaleRequestError, match=r"61 s off; limit 60 s"):
        guard.check(stale, server.pubkey, DB, [TIP], now)
    other_server = make_proof(client, SigningKey.generate().pubkey, DB, [TIP], now)
    with pytest.raises(UnauthorizedError, match=r"does not verify"):
        guard.check(other_server, server.pubkey, DB, [TIP], now)
    other_tips = make_proof(client, server.pubkey, DB, [TIP], now)
    with pytest.raises(UnauthorizedError):
        guard.check(other_tips, server.pubkey, DB, [], now)


def test_ticket_format_and_parse() -> None:
    db = "bafyr4ihkr4ld3m4gqkjf4reryxsy2s5tkbxprqkow6fin2iiyvreuzzab4"
    ticket = Ticket(db, (Address("p2p", "/ip4/1.2.3.4/tcp/4001/p2p/12D3KooW"), Address("http", "10.0.0.5:8080")))
    text = str(ticket)
    assert text == f"eidetica:?db={db}&pr=p2p:/ip4/1.2.3.4/tcp/4001/p2p/12D3KooW&pr=http:10.0.0.5:8080"
    assert Ticket.parse(text) == ticket
    lenient = Ticket.parse(f"eidetica:?future=1&db={db}&pr=nocolon&pr=:empty&pr=http:&pr=BAD:x&pr=memory:A")
    assert lenient == Ticket(db, (Address("memory", "A"),))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http://x", r"starts with 'eidetica:'"),
        ("eidetica:db=x", r"eidetica:\?db="),
        ("eidetica:?pr=http:x", r"^ticket has no db parameter$"),
        ("eidetica:?db=nope", r"^ticket's db is not a database ID: 'nope'$"),
    ],
)
def test_bad_tickets(text: str, message: str) -> None:
    with pytest.raises(TicketError, match=message):
        Ticket.parse(text)
