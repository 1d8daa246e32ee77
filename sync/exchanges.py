"""One exchange with a peer for a database, over whichever of its addresses works, and its record.

The engine's scheduler decides when; this decides where (``Reach``), runs the driver
(``sync.peer.sync_database``) under the request deadline, falls through to the next
address on a transport failure, and records the outcome (cursor, history, last seen).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import trio

from dag import Instance, NotFoundError

from .client import ExchangeResult
from .errors import AddressesFailedError, SyncError, TransportError, UnreachableError, attempt_error
from .handler import Offload, UnverifiedBudget
from .peer import sync_database
from .reach import Reach
from .state import SyncState
from .transport import Address, Transport

log = logging.getLogger(__name__)


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
    ) -> None:
        self._instance = instance
        self._state = state
        self._reach = reach
        self._transports = transports
        self._budget = budget
        self._now_ms = now_ms
        self._offload = offload
        self._request_timeout_s = request_timeout_s
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
        for address in addresses:
            try:
                result = await self._over(address, peer, db_id, access=access, push_only=push_only)
            except (SyncError, NotFoundError) as exc:
                attempts.append((address, exc))
                if isinstance(exc, TransportError):
                    self._reach.failed(peer, address)
                    continue
                break  # an answer (a refusal, an unknown database): other addresses reach the same peer
            self._reach.worked(peer, address, dialled=address.transport not in connected)
            if not result.skipped:
                self._record(db_id, peer, result, None)
            return True
        error = _failure(db_id, peer, attempts)
        summary = (
            error.one_line
            if isinstance(error, AddressesFailedError)
            else f"sync of {db_id} with {peer} failed: {error}"
        )
        self._record(db_id, peer, None, error.one_line if isinstance(error, AddressesFailedError) else str(error))
        log.info("%s", summary)  # also when raised: the user sees it through the CLI, the log keeps it
        if raise_errors:
            raise error
        return False

    async def _over(
        self, address: Address, peer: str, db_id: str, *, access: str | None, push_only: bool
    ) -> ExchangeResult:
        """The exchange over one address, under the request deadline."""
        transport = self._transports.get(address.transport)
        if transport is None:
            raise UnreachableError(f"no transport registered for {address.transport!r} addresses")
        try:
            with trio.fail_after(self._request_timeout_s):
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
                )
        except trio.TooSlowError as exc:
            raise TransportError(f"{address}: no answer in {self._request_timeout_s:g} s") from exc

    def _record(self, db_id: str, peer: str, result: ExchangeResult | None, error: str | None) -> None:
        self._state.record_sync(
            db_id,
            peer,
            now_ms=self._now_ms(),
            common=result.common if result else None,
            sent=result.sent if result else 0,
            received=result.received if result else 0,
            error=error,
        )
        if result is not None:
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
