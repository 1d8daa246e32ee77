"""The asking side of an exchange, as state machines that never touch the network.

Like :class:`~sync.handler.SyncHandler` on the serving side, these classes take messages
and say what to send next and what to store; ``sync.peer`` drives them over a transport
and owns streams, deadlines and the lifetime of prepared (being-verified) frames. Kept
apart so that the protocol's decisions can be tested by feeding messages, and so that a
driver with other rules (a per-frame deadline, resuming over a cut relay circuit) can
reuse them unchanged: every decision reads only what is stored and what has arrived.

One database exchange (see ``sync.reconcile`` for why it is shaped so):

1. :meth:`DatabaseExchange.request` plans the ``SyncTree`` (tips, cursor, sample, the
   entries the peer lacks pushed inline), or says that there is nothing to do;
2. each answer goes through :meth:`~DatabaseExchange.take`, which checks it and says
   which entries to store (:meth:`~DatabaseExchange.entries_to_store` tells the driver
   early, so decoding starts while the previous frame is being stored);
3. after the last frame, :meth:`~DatabaseExchange.next_push` hands out the batches the
   peer still lacks, each answered and checked by :meth:`~DatabaseExchange.pushed`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from dag import Database, Instance, SigningKey, cid_from_text
from dag.ingest import PutResult

from . import proofs
from .errors import (
    ERRORS_BY_CODE,
    AccessPendingError,
    LimitError,
    MalformedMessageError,
    PeerError,
    SyncError,
    TransportError,
    UnauthorizedError,
)
from .handler import UnverifiedBudget
from .messages import (
    CHALLENGE_BYTES,
    MAX_ENTRIES_PER_MESSAGE,
    PROTOCOL_VERSION,
    Ack,
    Bootstrap,
    BootstrapPending,
    Count,
    Error,
    Handshake,
    HandshakeConfirm,
    HandshakeReply,
    Incremental,
    Message,
    SendEntries,
    SyncTree,
    encode_message,
)
from .reconcile import sample_have
from .transport import Address

PUSH_BATCH = 2_000
FRAME_PREFIX_BYTES = 4  # the length prefix the transports put before a message
SEND_OVERHEAD_BYTES = 512  # a SendEntries beyond its entries: type, database, proof (~230 B), Count answer
ENTRY_OVERHEAD_BYTES = 5  # msgpack's header for one entry


@dataclass(frozen=True, slots=True)
class PeerHello:
    """What a handshake told us about the peer."""

    pubkey: str
    display_name: str
    addresses: tuple[Address, ...]
    databases: tuple[bytes, ...]


@dataclass(slots=True)
class ExchangeResult:
    """One database synced with one peer."""

    received: int = 0
    verified: int = 0
    sent: int = 0
    peer_tips: tuple[bytes, ...] = ()
    common: list[bytes] = field(default_factory=list)
    round_trips: int = 0
    skipped: bool = False
    # The answer or the pushes stopped at the connection's byte budget (a limited relay
    # circuit): what arrived is stored, and another exchange continues from it.
    stopped: bool = False

    def then(self, later: ExchangeResult) -> ExchangeResult:
        """This result followed by a later round's: counts add up, the rest is the later one's."""
        return dataclasses.replace(
            later,
            received=self.received + later.received,
            verified=self.verified + later.verified,
            sent=self.sent + later.sent,
            round_trips=self.round_trips + later.round_trips,
        )


def raise_for(message: Message) -> None:
    """Raise the error an ``Error`` answer stands for."""
    if isinstance(message, Error):
        cls = ERRORS_BY_CODE.get(message.code, PeerError)
        raise cls(f"peer refused: {message.message}" if cls is PeerError else message.message)


def only_answer(request: Message, answers: list[Message]) -> Message:
    """The single answer a one-answer request must get (an ``Error`` raises)."""
    if len(answers) != 1:
        raise MalformedMessageError(f"expected one answer to {request.TYPE}, got {len(answers)}")
    raise_for(answers[0])
    return answers[0]


class HandshakeClient:
    """Mutual challenge signatures: the peer signs our challenge, we sign its counter challenge."""

    def __init__(self, key: SigningKey, display_name: str, own_addresses: list[Address], *, where: str) -> None:
        self._key = key
        self._where = where
        self._challenge = os.urandom(CHALLENGE_BYTES)
        self._reply: HandshakeReply | None = None
        self.hello = Handshake(
            key.pubkey,
            display_name,
            PROTOCOL_VERSION,
            self._challenge,
            tuple((a.transport, a.address) for a in own_addresses),
        )

    def take_reply(self, reply: Message) -> HandshakeConfirm:
        """Check the peer's proof of its key; the confirmation to send back."""
        if not isinstance(reply, HandshakeReply):
            raise MalformedMessageError(f"expected HandshakeReply, got {reply.TYPE}")
        if not proofs.check_challenge(reply.device_key, self._challenge, reply.challenge_signature):
            raise UnauthorizedError(f"peer at {self._where} could not prove its key {reply.device_key}")
        self._reply = reply
        signature = proofs.sign_challenge(self._key, reply.counter_challenge)
        return HandshakeConfirm(self._key.pubkey, reply.counter_challenge, signature)

    def take_ack(self, answer: Message) -> PeerHello:
        """The peer accepted our proof: what it told us about itself."""
        if self._reply is None:
            raise SyncError("take_reply must come before take_ack")
        if not isinstance(answer, Ack):
            raise MalformedMessageError(f"expected Ack, got {answer.TYPE}")
        reply = self._reply
        return PeerHello(
            reply.device_key,
            reply.display_name,
            tuple(Address(t, a) for t, a in reply.addresses),
            tuple(offer.db for offer in reply.databases),
        )


class DatabaseExchange:
    """One database synced with one peer: the decisions, with no I/O and no clock but ``now_ms``.

    With ``budget``, what the peer's answers leave stored Unverified counts against its
    budget, and an answer that would go over it ends the exchange with ``OverBudgetError``.
    """

    def __init__(
        self,
        instance: Instance,
        *,
        peer_key: str,
        db_id: str,
        common: tuple[bytes, ...],
        access: str | None,
        now_ms: Callable[[], int],
        push_only: bool = False,
        budget: UnverifiedBudget | None = None,
    ) -> None:
        self._instance = instance
        self._peer_key = peer_key
        self._db_cid = cid_from_text(db_id)
        self._common = common
        self._access = access
        self._now_ms = now_ms
        self._push_only = push_only
        self._budget = budget
        self.result = ExchangeResult()
        self._tips: tuple[bytes, ...] = ()
        self._pushed_inline = False
        self._final: Bootstrap | Incremental | None = None
        self._to_push: list[bytes] = []
        self._pushed_up_to = 0  # index into _to_push of the next batch
        self._shared: set[bytes] = set()
        self.limited = False  # the request carried a byte budget: its answer may stop early

    @property
    def db_cid(self) -> bytes:
        return self._db_cid

    def _database(self) -> Database | None:
        cid = self._db_cid
        return self._instance.open_database(cid) if self._instance.has_database(cid) else None

    def request(self, budget: int | None = None) -> SyncTree | None:
        """The ``SyncTree`` to send, or None when there is nothing to do (then ``result.skipped``).

        ``budget``: the bytes the request and its whole answer may take on the connection
        (None: no limit). The answer gets what the request leaves; entries are pushed inline
        only if they take at most half of it (else they go as sized pushes after the answer).
        May walk history (``missing_from``): a driver runs it off the event loop.
        """
        db = self._database()
        push: list[bytes] = []
        have: list[bytes] = []
        held_common: tuple[bytes, ...] = ()
        if db is not None:
            self._tips = tuple(db.tip_cids())
            held_common = tuple(c for c in self._common if db.status_of(c) is not None)
            if held_common:
                cids = db.missing_from(held_common)
                if len(cids) <= MAX_ENTRIES_PER_MESSAGE:
                    push = db.raws(cids)
                if budget is not None and sum(len(raw) + ENTRY_OVERHEAD_BYTES for raw in push) > budget // 2:
                    push = []
                # With nothing inline, the cursor is taken afresh from our tips after the
                # answer is stored (one ID on a fast-forward, not our old tip beside it).
                self._pushed_inline = bool(push)
                if self._push_only and not cids:
                    # Sync on commit with nothing the peer lacks (say, an echo of what it sent).
                    self.result.skipped = True
                    return None
            else:
                have = sample_have(db, self._tips)
        self.result.round_trips += 1
        self.result.sent += len(push)
        request = SyncTree(
            db=self._db_cid,
            tips=self._tips,
            common=held_common,
            have=tuple(have),
            entries=tuple(push),
            auth=proofs.make_proof(self._instance.device_key, self._peer_key, self._db_cid, self._tips, self._now_ms()),
            access=self._access,
        )
        if budget is None:
            return request
        self.limited = True
        left = budget - FRAME_PREFIX_BYTES - len(encode_message(request)) - 16  # the budget field itself
        return dataclasses.replace(request, budget=max(1, left))

    def entries_to_store(self, answer: Message) -> tuple[bytes, ...]:
        """The entries of ``answer`` worth preparing as soon as it arrives (before ``take``)."""
        if isinstance(answer, Bootstrap | Incremental) and answer.db == self._db_cid:
            return answer.entries
        return ()

    @property
    def answered(self) -> bool:
        """Whether the last answer frame has been taken."""
        return self._final is not None

    def take(self, answer: Message) -> tuple[bytes, ...]:
        """Check one answer frame; the entries to store (the same as ``entries_to_store``)."""
        if self._final is not None:
            raise MalformedMessageError(f"answer {answer.TYPE} after the last frame")
        raise_for(answer)
        if isinstance(answer, BootstrapPending):
            raise AccessPendingError(
                f"access request {answer.request_id} waits for an admin", request_id=answer.request_id
            )
        if not isinstance(answer, Bootstrap | Incremental):
            raise MalformedMessageError(f"unexpected answer {answer.TYPE} to SyncTree")
        if answer.db != self._db_cid:
            raise MalformedMessageError("answer is for another database")
        if not answer.more:
            self._final = answer
            self.result.peer_tips = answer.tips
        return answer.entries

    def admit(self, count: int, entries: tuple[bytes, ...]) -> None:
        """Before storing a frame: refuse it if it would put the peer over its Unverified budget."""
        if self._budget is not None:
            self._budget.check(self._peer_key, count, sum(len(raw) for raw in entries))

    def stored(self, count: int, entries: tuple[bytes, ...], put: PutResult) -> None:
        """A frame of ``count`` entries was stored: count it (and what it left Unverified)."""
        if self._budget is not None:
            self._budget.add(self._peer_key, self._db_cid, put, entries)
        self.result.received += count
        self.result.verified += len(put.verified)

    def plan_pushes(self) -> None:
        """After the last frame: work out what the peer still lacks (may walk history: off the loop).

        With nothing pushed inline (no cursor, or too much for one message), the peer's tips
        are now known here, so what it lacks is exact.
        """
        final = self._final
        if final is None:
            # The stream closed mid-answer: a cut connection (a relay's data limit, a peer
            # gone) looks like this, so it is a transport failure and the engine tries the
            # peer's next address or retries; what did arrive is stored and verified already.
            raise TransportError("the answer ended before its last frame")
        db = self._database()
        if db is None:
            raise SyncError("the peer sent no usable entries for this database")
        self._shared = set(self._tips) | set(final.tips)
        if not self._pushed_inline:
            ours = db.tip_cids()
            self._shared = set(ours) | set(final.tips)
            self._to_push = db.missing_from(final.tips, ours=ours)

    @property
    def pushes_left(self) -> bool:
        return self._pushed_up_to < len(self._to_push)

    def next_push(self, budget: int | None = None) -> SendEntries | None:
        """The next batch the peer lacks, or None when all is sent or (with ``budget``, the bytes
        the push and its answer may take) when not even one entry fits (``pushes_left`` says)."""
        start = self._pushed_up_to
        if start >= len(self._to_push):
            return None
        db = self._database()
        if db is None:
            raise SyncError("the database went away during the exchange")
        raws = db.raws(self._to_push[start : start + PUSH_BATCH])
        if budget is not None:
            room = budget - FRAME_PREFIX_BYTES - SEND_OVERHEAD_BYTES
            fits = 0
            for raw in raws:
                room -= len(raw) + ENTRY_OVERHEAD_BYTES
                if room < 0:
                    break
                fits += 1
            if not fits:
                return None
            raws = raws[:fits]
        self._pushed_up_to = start + len(raws)
        self.result.round_trips += 1
        proof = proofs.make_proof(self._instance.device_key, self._peer_key, self._db_cid, (), self._now_ms())
        return SendEntries(self._db_cid, tuple(raws), proof)

    def pushed(self, request: SendEntries, answer: Message) -> None:
        """The peer's answer to one pushed batch."""
        if not isinstance(answer, Count | Ack):
            raise MalformedMessageError(f"unexpected answer {answer.TYPE} to SendEntries")
        self.result.sent += len(request.entries)

    def too_big(self, budget: int) -> LimitError:
        """The error for the next push's first entry, which does not fit a fresh connection's budget."""
        db = self._database()
        size = len(db.raws(self._to_push[self._pushed_up_to : self._pushed_up_to + 1])[0]) if db else 0
        return LimitError(
            f"an entry of {size} bytes is more than the {budget} bytes this connection may carry in one"
            " request (a relay circuit's data limit): pushing it needs a direct connection to the peer"
        )

    def stop(self) -> ExchangeResult:
        """The result of an exchange that stopped at the connection's budget (another continues it)."""
        self.result.stopped = True
        return self.result

    def outcome(self) -> ExchangeResult:
        """The result, once every push is answered.

        Both sides now hold the closure of what we pushed from and of the peer's tips.
        (Tips of commits made during the exchange are not included: they are still to send.)
        """
        self.result.common = sorted(self._shared)
        return self.result


__all__ = [
    "PUSH_BATCH",
    "DatabaseExchange",
    "ExchangeResult",
    "HandshakeClient",
    "PeerHello",
    "only_answer",
    "raise_for",
]
