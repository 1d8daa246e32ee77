"""The trio driver of the asking side: runs ``sync.client``'s machines over a transport.

These functions hold no state between calls; the engine decides when to call them and
records what they return. What is decided lives in ``sync.client``; what is here is only
I/O: streams, the frame pipeline and its read-ahead, work moved off the event loop, and
the lifetime of prepared frames.

Deadlines (``Deadlines``) are on progress, not on size: the first answer frame (and each
one-answer request: a budget's connect, a push) must come within ``first_s``, and every
later frame within ``progress_s`` of the wait for it starting. Only the wait on the wire
counts: while the client stores a frame it does not read, and that time is not the peer's.
An exchange that keeps making progress is never cut because the database is large.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import trio

from dag import Instance, PreparedEntries, SigningKey
from dag.ingest import PutResult

from .client import DatabaseExchange, ExchangeResult, HandshakeClient, PeerHello, only_answer
from .errors import MalformedMessageError, TransportError
from .handler import Offload, UnverifiedBudget
from .messages import Bootstrap, Incremental, Message
from .transport import Address, Transport, request_budget

log = logging.getLogger(__name__)

FRAMES_AHEAD = 2  # answer frames read ahead while one is being verified

Frame = tuple[Message, PreparedEntries | None]
_Numbered = tuple[int, Message, PreparedEntries | None]  # arrival number, answer, its prepared entries


class AnswerCut(TransportError):
    """The connection broke in the middle of an answer (a relay's limit, a peer gone).

    ``result`` counts what arrived before the cut, all of it stored: an exchange that moved
    something is worth continuing from there. ``limited``: the connection had a byte budget
    (a relay that cuts before the limit it advertised; the transport learns from the cut).
    """

    def __init__(self, message: str, result: ExchangeResult, *, limited: bool) -> None:
        super().__init__(message)
        self.result = result
        self.limited = limited


@dataclass(frozen=True, slots=True)
class Deadlines:
    """How long the asking side waits on the wire (see the module docstring)."""

    first_s: float = 60.0  # a first answer frame (the server may walk history first), a one-answer request
    progress_s: float = 30.0  # each further answer frame


class StalledError(TransportError):
    """No answer frame arrived within the progress bound (set as ``Frames.cut``)."""


class StalledAnswer(AnswerCut):
    """An answer that stalled part-way: what came is stored, but the same address is not
    asked again at once (the engine goes on to the peer's next address)."""


@contextlib.contextmanager
def _bounded(seconds: float, what: str) -> Iterator[None]:
    """Raise a one-line ``TransportError`` naming ``what`` when the block takes longer than ``seconds``."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError as exc:
        raise TransportError(f"{what}: no answer in {seconds:g} s") from exc


@contextlib.asynccontextmanager
async def _one_error() -> AsyncIterator[None]:
    """Let a nursery's single error through as itself, not wrapped in an ExceptionGroup."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise


async def _one(transport: Transport, address: str, message: Message) -> Message:
    async with contextlib.aclosing(transport.request(address, message)) as stream:
        answers = [answer async for answer in stream]
    return only_answer(message, answers)


async def handshake(
    transport: Transport, address: str, key: SigningKey, display_name: str, own_addresses: list[Address]
) -> PeerHello:
    """Mutual challenge signatures (``HandshakeClient``), one request each way."""
    client = HandshakeClient(key, display_name, own_addresses, where=address)
    confirm = client.take_reply(await _one(transport, address, client.hello))
    return client.take_ack(await _one(transport, address, confirm))


class Frames:
    """Answer frames in arrival order; taking one marks the frames before it as stored."""

    def __init__(
        self, channel: trio.MemoryReceiveChannel[_Numbered], in_flight: deque[tuple[int, PreparedEntries]]
    ) -> None:
        self._channel = channel
        self._in_flight = in_flight
        self.cut: TransportError | None = None  # the transport failed after these frames: see ``prepared_frames``

    def __aiter__(self) -> Frames:
        return self

    async def __anext__(self) -> Frame:
        try:
            number, answer, prepared = await self._channel.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        while self._in_flight and self._in_flight[0][0] < number:
            self._in_flight.popleft()  # taken earlier, so stored
        return answer, prepared


@contextlib.asynccontextmanager
async def prepared_frames(
    transport: Transport,
    address: str,
    request: Message,
    *,
    prepare: Callable[[Message], PreparedEntries | None],
    deadlines: Deadlines | None = None,
) -> AsyncIterator[Frames]:
    """The answers to ``request``, each with its entries already being verified.

    Each frame is handed to the verifying threads (decode + signatures) the moment it
    arrives, while the frame before it is still being stored: the wire, the verifying
    cores and the writer all stay busy, and the channel bound keeps memory to a few frames.
    A frame counts as stored once the next one is taken; whatever is not when the block
    ends (an error, a cancel, an early break) has its queued checks dropped. A transport
    failure ends the frames instead of the block: those that arrived before it are still
    handed out (a cut circuit loses no finished frame), and ``Frames.cut`` holds the failure.
    With ``deadlines``, a frame that does not arrive in time (see ``Deadlines``: only the
    wait on the wire is timed, not the wait for room in the channel) ends the frames with a
    ``StalledError`` as the cut.
    """
    frames_in, frames_out = trio.open_memory_channel[_Numbered](FRAMES_AHEAD)
    in_flight: deque[tuple[int, PreparedEntries]] = deque()
    frames = Frames(frames_out, in_flight)

    async def receive() -> None:
        async with frames_in, contextlib.aclosing(transport.request(address, request)) as answers:
            number = 0
            entries = 0
            try:
                while True:
                    bound = math.inf if deadlines is None else deadlines.first_s if not number else deadlines.progress_s
                    with trio.move_on_after(bound) as waited:
                        answer = await anext(answers, None)
                    if waited.cancelled_caught:
                        frames.cut = StalledError(f"{address}: no frame for {bound:g} s after {entries:,} entries")
                        return
                    if answer is None:
                        return
                    if isinstance(answer, Bootstrap | Incremental):
                        entries += len(answer.entries)
                    prepared = prepare(answer)
                    if prepared is not None:
                        in_flight.append((number, prepared))
                    await frames_in.send((number, answer, prepared))
                    number += 1
            except TransportError as exc:
                frames.cut = exc

    try:
        async with _one_error(), trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            async with frames_out:
                yield frames
            nursery.cancel_scope.cancel()
    finally:
        for _, prepared in in_flight:
            prepared.cancel()


async def sync_database(
    *,
    instance: Instance,
    transport: Transport,
    address: str,
    peer_key: str,
    db_id: str,
    common: tuple[bytes, ...],
    access: str | None,
    now_ms: Callable[[], int],
    offload: Offload[object],
    push_only: bool = False,
    budget: UnverifiedBudget | None = None,
    fresh: bool = False,
    deadlines: Deadlines | None = None,
) -> ExchangeResult:
    """Sync one database with the peer at ``address``; see ``sync.reconcile`` for the algorithm.

    Over a connection with a byte budget (a limited relay circuit; ``fresh``: ask the
    transport for a new one) the request says how much its answer may take, and the result
    is ``stopped`` when the answer or the pushes stopped there: another call continues.
    Raises ``AnswerCut`` when the connection breaks mid-answer (what came is stored),
    ``StalledAnswer`` when an answer frame does not come within ``deadlines``.
    """
    first_s = math.inf if deadlines is None else deadlines.first_s
    with _bounded(first_s, f"{address}: connecting"):
        room = await request_budget(transport, address, fresh=fresh)
    for asked in (room, None) if room is not None else (None,):
        exchange = DatabaseExchange(
            instance,
            peer_key=peer_key,
            db_id=db_id,
            common=common,
            access=access,
            now_ms=now_ms,
            push_only=push_only,
            budget=budget,
        )
        request = await offload(functools.partial(exchange.request, asked))
        if request is None:
            return exchange.result
        assert isinstance(request, Message)
        try:
            await _take_answer(instance, transport, address, request, exchange, offload, deadlines)
            break
        except MalformedMessageError as exc:
            if asked is None or "'budget'" not in str(exc):
                raise
            # A peer from before the budget field refuses it (unknown field): ask it as
            # before; its answer may not fit the circuit, but a small one will.
            log.info("%s does not know SyncTree.budget: asking without it", address)
    if not exchange.answered:
        return exchange.stop()  # the answer stopped at the budget: what came is stored
    await offload(exchange.plan_pushes)
    while exchange.pushes_left:
        with _bounded(first_s, f"{address}: connecting"):
            room = await request_budget(transport, address)
        push = exchange.next_push(room)
        if push is None:
            assert room is not None
            with _bounded(first_s, f"{address}: connecting"):
                fresh_room = await request_budget(transport, address, fresh=True)
            push = exchange.next_push(fresh_room)
            if push is None:
                raise exchange.too_big(fresh_room or room)
        with _bounded(first_s, f"{address}: a push of {len(push.entries)} entries"):
            answer = await _one(transport, address, push)
        exchange.pushed(push, answer)
    return exchange.outcome()


async def _take_answer(
    instance: Instance,
    transport: Transport,
    address: str,
    request: Message,
    exchange: DatabaseExchange,
    offload: Offload[object],
    deadlines: Deadlines | None,
) -> None:
    """Store the answer's frames as they arrive; raise unless it ended or stopped at the budget."""
    db_cid = exchange.db_cid

    def prepare(answer: Message) -> PreparedEntries | None:
        entries = exchange.entries_to_store(answer)
        return instance.prepare_remote_entries(entries) if entries else None

    async with prepared_frames(transport, address, request, prepare=prepare, deadlines=deadlines) as frames:
        async for answer, prepared in frames:
            entries = exchange.take(answer)
            if prepared is not None:
                exchange.admit(prepared.count, entries)
                put = functools.partial(instance.put_remote_entries, prepared, database_id=db_cid)
                stored = await offload(put)
                assert isinstance(stored, PutResult)
                exchange.stored(prepared.count, entries, stored)
            if exchange.answered:
                break
    if exchange.answered:
        return
    if isinstance(frames.cut, StalledError):
        raise StalledAnswer(str(frames.cut), exchange.result, limited=exchange.limited) from frames.cut
    if frames.cut is not None:
        # A cut connection (a relay's data limit, a peer gone) looks like this: a transport
        # failure, so the engine tries the peer's next address or, if this moved something,
        # continues from what is stored.
        cut = AnswerCut(f"{address}: the answer broke off: {frames.cut}", exchange.result, limited=exchange.limited)
        raise cut from frames.cut
    if not exchange.limited:
        raise AnswerCut(f"{address}: the answer ended before its last frame", exchange.result, limited=False)


__all__ = [
    "FRAMES_AHEAD",
    "AnswerCut",
    "Deadlines",
    "Frames",
    "StalledAnswer",
    "StalledError",
    "handshake",
    "prepared_frames",
    "sync_database",
]
