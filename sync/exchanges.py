"""One exchange with a peer for a database, over whichever of its addresses works, and its record.

The engine's scheduler decides when; this decides where (``Reach``), runs the driver
(``sync.peer.sync_database``) under progress deadlines, falls through to the next
address on a transport failure, and records the outcome (cursor, history, last seen).

Over a relay circuit with a data limit one exchange is several *rounds*, each over its own
circuit (``_rounds``): a round's answer stops at the circuit's budget (or the relay cuts
it), what came is stored, and the next round's request names the tips now held, so the
peer sends only the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import trio

from dag import Instance, NotFoundError

from .client import ExchangeResult
from .errors import AddressesFailedError, LimitError, SyncError, TransportError, UnreachableError, attempt_error
from .handler import Offload, UnverifiedBudget
from .peer import AnswerCut, Deadlines, StalledAnswer, sync_database
from .reach import Reach
from .state import SyncState
from .transport import Address, Transport

log = logging.getLogger(__name__)

# Rounds in a row that may move nothing before an exchange over one address gives up: the
# second goes over a fresh circuit (the first may have met one with too little left).
MAX_IDLE_ROUNDS = 2


class ExchangeRunner:
    """Runs exchanges; those with one peer never overlap."""

    def __init__(
        self,
        instance: Instance,
        state: SyncState,
        reach: Reach,
        transports: Mapping[str, Transport],
        *,
        budget: UnverifiedBudget,
        now_ms: Callable[[], int],
        offload: Offload[Any],
        request_timeout_s: float,
        progress_timeout_s: float = 30.0,
    ) -> None:
        self._instance = instance
        self._state = state
        self._reach = reach
        self._transports = transports
        self._budget = budget
        self._now_ms = now_ms
        self._offload = offload
        self._deadlines = Deadlines(first_s=request_timeout_s, progress_s=progress_timeout_s)
        self._peer_locks: dict[str, trio.Lock] = {}

    async def run(self, peer: str, db_id: str, *, raise_errors: bool, push_only: bool = False) -> bool:
        """One exchange with ``peer`` for ``db_id`` over any of its addresses; whether it succeeded.

        Exchanges with one peer never overlap (a push queued by a bootstrap's own writes
        waits for the bootstrap's cursor, and then finds nothing to send).
        """
        async with self._peer_locks.setdefault(peer, trio.Lock()):
            return await self._exchange(peer, db_id, raise_errors=raise_errors, push_only=push_only)

    async def _exchange(self, peer: str, db_id: str, *, raise_errors: bool, push_only: bool) -> bool:
        relation = next((r for r in self._state.relationships(db_id) if r.peer == peer), None)
        addresses = self._reach.addresses_for(peer, relation)
        if isinstance(addresses, SyncError):
            if raise_errors:
                raise addresses
            log.info("%s", addresses)
            return True
        access = relation.access if relation else None
        attempts: list[tuple[Address, Exception]] = []
        connected = self._reach.connected_over(peer)
        moved: ExchangeResult | None = None  # what every address tried so far moved: all of it is stored
        for address in addresses:
            failure: Exception | None
            try:
                result, failure = await self._over(address, peer, db_id, access=access, push_only=push_only)
            except (SyncError, NotFoundError) as exc:
                result, failure = None, exc
            if result is not None:
                moved = result if moved is None else moved.then(result)
            if failure is None:
                self._reach.worked(peer, address, dialled=address.transport not in connected)
                assert moved is not None
                if not moved.skipped:
                    self._record(db_id, peer, moved, None)
                return True
            attempts.append((address, failure))
            if not isinstance(failure, TransportError):
                break  # an answer (a refusal, an unknown database): other addresses reach the same peer
            if result is None:
                self._reach.failed(peer, address)
            else:  # cut off after moving entries: the next address continues from them
                log.info(
                    "sync of %s with %s over %s stopped after %d entries: %s",
                    db_id,
                    peer,
                    address,
                    result.received,
                    failure,
                )
        error = _failure(db_id, peer, attempts)
        one_line = error.one_line if isinstance(error, AddressesFailedError) else str(error)
        self._record(db_id, peer, moved, one_line)
        # Also when raised: the user sees it through the CLI, the log keeps it.
        log.info(
            "%s",
            one_line if isinstance(error, AddressesFailedError) else f"sync of {db_id} with {peer} failed: {error}",
        )
        if raise_errors:
            raise error
        return False

    async def _over(
        self, address: Address, peer: str, db_id: str, *, access: str | None, push_only: bool
    ) -> tuple[ExchangeResult | None, SyncError | None]:
        """The exchange over one address, each round under progress deadlines (see ``_rounds``)."""
        transport = self._transports.get(address.transport)
        if transport is None:
            return None, UnreachableError(f"no transport registered for {address.transport!r} addresses")
        return await self._rounds(transport, address, peer, db_id, access=access, push_only=push_only)

    async def _rounds(
        self, transport: Transport, address: Address, peer: str, db_id: str, *, access: str | None, push_only: bool
    ) -> tuple[ExchangeResult | None, SyncError | None]:
        """Rounds over one address until one completes, as many as it takes while each moves
        entries; ``MAX_IDLE_ROUNDS`` in a row that move none end it with the last one's error.
        Returns what the rounds moved (None: nothing came back) and, unless they completed,
        the error that ended them: a round that fails after others moved entries loses none
        of theirs, and the engine goes on to the peer's next address.

        A round that stops at the budget or is cut is continued (the next one over a fresh
        circuit if it moved nothing); a first round cut before anything arrived on an
        unlimited connection is an ordinary transport failure (the engine tries the next
        address). py-libp2p drops what a connection had buffered when it breaks, so a cut
        circuit may lose the frames in flight: the transport then budgets later circuits lower.
        """
        total: ExchangeResult | None = None
        idle = 0
        while True:
            error: SyncError | None = None
            try:
                result = await self._round(transport, address, peer, db_id, access, push_only, fresh=idle > 0)
            except StalledAnswer as stalled:  # the peer went quiet: keep what came, try its next address
                return (stalled.result if total is None else total.then(stalled.result)), stalled
            except AnswerCut as cut:
                if total is None and not cut.result.received and not cut.limited:
                    return None, cut  # nothing came over this address at all: try the next one
                result, error = cut.result, cut
            except LimitError as exc:  # an entry does not fit this circuit's budget: a fresh one may do
                if idle:
                    return total, exc
                result, error = ExchangeResult(), exc
            except SyncError as exc:  # this address failed (a continuation may not reconnect): keep what moved
                return total, exc
            total = result if total is None else total.then(result)
            if error is None and not result.stopped:
                return total, None
            idle = 0 if result.received or result.sent else idle + 1
            if idle >= MAX_IDLE_ROUNDS:
                return total, error or TransportError(f"{address}: {idle} rounds over limited circuits moved nothing")
            log.debug("%s: round stopped after %d entries (%s); continuing", address, result.received, error)

    async def _round(
        self,
        transport: Transport,
        address: Address,
        peer: str,
        db_id: str,
        access: str | None,
        push_only: bool,
        *,
        fresh: bool,
    ) -> ExchangeResult:
        """One round under progress deadlines (``sync.peer.Deadlines``): a large database
        that keeps arriving is never cut; a peer that goes quiet is."""
        return await sync_database(
            instance=self._instance,
            transport=transport,
            address=address.address,
            peer_key=peer,
            db_id=db_id,
            common=self._state.cursor(db_id, peer).common,
            access=access,
            now_ms=self._now_ms,
            offload=self._offload,
            push_only=push_only,
            budget=self._budget,
            fresh=fresh,
            deadlines=self._deadlines,
        )

    def _record(self, db_id: str, peer: str, result: ExchangeResult | None, error: str | None) -> None:
        """Record an exchange; one that failed after moving entries keeps the old cursor
        (what a stopped round holds is not common ground) but counts what it moved."""
        self._state.record_sync(
            db_id,
            peer,
            now_ms=self._now_ms(),
            common=result.common if result is not None and error is None else None,
            sent=result.sent if result else 0,
            received=result.received if result else 0,
            error=error,
        )
        if result is not None and (error is None or result.received or result.sent):
            self._state.upsert_peer(peer, seen_ms=self._now_ms())


def _failure(db_id: str, peer: str, attempts: list[tuple[Address, Exception]]) -> Exception:
    """The error an exchange that failed raises: an answer (the last attempt was not a
    transport failure) as it came, one failed address as its own error, several as one
    error naming each address with its own failure."""
    if not attempts:
        return UnreachableError(f"no known address reaches peer {peer}")
    last = attempts[-1][1]
    if len(attempts) == 1 or not isinstance(last, TransportError):
        return last
    error = AddressesFailedError(
        f"sync of {db_id} with {peer}", [(str(a), attempt_error(str(a), e)) for a, e in attempts]
    )
    error.__cause__ = last
    return error


__all__ = ["ExchangeRunner"]
