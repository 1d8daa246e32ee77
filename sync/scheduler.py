"""When exchanges run: one worker per peer, retries with backoff, periodic runs, flush.

The scheduler decides *when*; what an exchange does is the ``exchange`` callable it is
given (``Sync`` passes its own). It owns no network and no storage, so its rules can be
read in one place:

1. One worker task per peer at most; a peer's databases are synced one at a time, and a
   database scheduled again while it syncs is synced again afterwards (coalescing).
2. A failed sync is retried after 2^n s (at most 64 s), at most ``retry_attempts`` times;
   then it waits for the next commit or period.
3. A failure concerns one peer: it never stops the others or the scheduler.
4. Every related (database, peer) pair that is dialled runs at its interval.

Work that needs a task (a peer's worker, a transport's background service, a queued
write) reaches the task that owns the nursery through a channel, so no nursery outlives
the ``run`` that opened it. The channel holds at most one item per peer, per database
with a queued write and per transport: it is bounded by what the node knows, not by
traffic.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import trio

from .errors import SyncError
from .state import Relationship
from .transport import TaskStatus

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 64

Exchange = Callable[[str, str, bool], Awaitable[bool]]  # (peer, db id, push_only) -> succeeded
Command = Callable[[trio.Nursery], None]  # run by the task that owns the nursery


@dataclass
class _PeerWork:
    due: dict[str, float] = field(default_factory=dict)  # db id -> trio time
    pull: set[str] = field(default_factory=set)  # due databases that must exchange even with nothing to push
    attempts: dict[str, int] = field(default_factory=dict)
    running: bool = False
    busy: bool = False
    wake: trio.Event = field(default_factory=trio.Event)


class Scheduler:
    """Runs ``exchange`` for (peer, database) pairs when they are due; see the module's rules."""

    def __init__(
        self,
        exchange: Exchange,
        *,
        relationships: Callable[[], Iterable[Relationship]],
        dialled: Callable[[Relationship], bool],
        retry_attempts: int,
        default_interval_s: float,
    ) -> None:
        self._exchange = exchange
        self._relationships = relationships
        self._dialled = dialled
        self._retry_attempts = retry_attempts
        self._default_interval_s = default_interval_s
        self._work: dict[str, _PeerWork] = {}
        self._commands_in, self._commands_out = trio.open_memory_channel[Command](math.inf)
        self._changed = trio.Event()
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def submit(self, command: Command) -> None:
        """Have the task that owns the nursery run ``command`` (it may start tasks there)."""
        if not self._running:
            raise SyncError("sync is not running (use it inside `async with enable_sync(...)`)")
        self._commands_in.send_nowait(command)

    def start_soon(self, task: Callable[[], Awaitable[None]]) -> None:
        """Run ``task`` beside the workers until the scheduler stops (a transport's service, say)."""
        self.submit(lambda nursery: nursery.start_soon(task))

    async def start(self, task: Callable[..., Awaitable[None]]) -> None:
        """Like ``nursery.start`` in the scheduler's nursery: returns once ``task`` called
        ``task_status.started()``, and an error it raised before that is raised here (a
        listener that cannot bind fails its caller, not the scheduler)."""
        done = trio.Event()
        failure: list[Exception] = []

        async def starter(nursery: trio.Nursery) -> None:
            try:
                await nursery.start(task)
            except Exception as exc:  # anything the task raised before it started: the caller's
                failure.append(exc)
            finally:
                done.set()

        self.submit(lambda nursery: nursery.start_soon(starter, nursery))
        await done.wait()
        if failure:
            raise failure[0]

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve commands and periodic runs until cancelled or closed."""
        try:
            async with trio.open_nursery() as nursery:
                self._running = True
                nursery.start_soon(self._periodic)
                task_status.started()
                async with self._commands_out:
                    async for command in self._commands_out:
                        if self._running:  # after close, the flush already ran
                            command(nursery)
                nursery.cancel_scope.cancel()
        finally:
            # Cancelled without close(): the receiving end is gone, so nothing may be
            # submitted any more (a commit's callback would otherwise hit a broken channel
            # inside trio's run loop: a TrioInternalError).
            self._running = False

    def close(self) -> None:
        """Accept no more work; ``run`` stops once the queued commands are drained."""
        self._running = False
        self._commands_in.close()

    def schedule(self, peer: str, db_id: str, delay_s: float = 0.0, *, pull: bool = True) -> None:
        """Sync ``db_id`` with ``peer`` after ``delay_s`` (sooner if already due).

        ``pull=False`` (sync on commit) skips the exchange when the peer lacks nothing.
        """
        if not self._running:
            raise SyncError("sync is not running (use it inside `async with enable_sync(...)`)")
        work = self._work.setdefault(peer, _PeerWork())
        due = trio.current_time() + delay_s
        work.due[db_id] = min(work.due.get(db_id, math.inf), due)
        if pull:
            work.pull.add(db_id)
        if not work.running:
            work.running = True
            self.submit(lambda nursery: nursery.start_soon(self._peer_worker, peer, work))
        else:
            work.wake.set()

    async def _peer_worker(self, peer: str, work: _PeerWork) -> None:
        try:
            while work.due:
                now = trio.current_time()
                ready = sorted(db for db, due in work.due.items() if due <= now)
                if not ready:
                    with trio.move_on_at(min(work.due.values())):
                        await work.wake.wait()
                    work.wake = trio.Event()
                    continue
                for db_id in ready:
                    await self._run_one(peer, work, db_id)
        finally:
            work.running = False
            self._signal()

    async def _run_one(self, peer: str, work: _PeerWork, db_id: str) -> None:
        del work.due[db_id]
        pull = db_id in work.pull
        work.pull.discard(db_id)
        work.busy = True
        try:
            ok = await self._exchange(peer, db_id, not pull)
        finally:
            work.busy = False
        if ok:
            work.attempts.pop(db_id, None)
            return
        attempt = work.attempts.get(db_id, 0) + 1
        if attempt > self._retry_attempts:
            work.attempts.pop(db_id, None)
            log.warning("giving up on %s with %s until its next trigger", db_id, peer)
            return
        work.attempts[db_id] = attempt
        work.pull.add(db_id)
        retry_at = trio.current_time() + min(2**attempt, MAX_BACKOFF_S)
        work.due[db_id] = min(work.due.get(db_id, math.inf), retry_at)

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _periodic(self) -> None:
        """Sync every dialled (database, peer) pair at its interval."""
        last: dict[tuple[str, str], float] = {}
        while True:
            now = trio.current_time()
            next_due = now + self._default_interval_s
            for relation in self._relationships():
                if not self._dialled(relation):
                    continue
                key = (relation.db, relation.peer)
                due = last.setdefault(key, now) + relation.interval_s
                if due <= now:
                    last[key] = now
                    self.schedule(relation.peer, relation.db)
                    due = now + relation.interval_s
                next_due = min(next_due, due)
            await trio.sleep(max(0.0, next_due - now))

    async def flush(self, timeout_s: float) -> None:
        """Wait until nothing is due now and no sync is running (retries later are not waited for)."""
        with trio.move_on_after(timeout_s):
            await trio.sleep(0)
            while True:
                now = trio.current_time()
                pending = any(
                    w.busy or any(due <= now for due in w.due.values()) for w in self._work.values() if w.running
                )
                if not pending and not self._commands_out.statistics().current_buffer_used:
                    return
                changed = self._changed
                with trio.move_on_after(0.05):
                    await changed.wait()


__all__ = ["MAX_BACKOFF_S", "Command", "Exchange", "Scheduler"]
