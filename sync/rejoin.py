"""Syncing at once with a peer whose open connection came back after a drop.

A peer we joined through a relay is reached over the connection we hold open to it, and
it pushes its writes to us over that same connection (it never dials a node that only
reads from it: ``reach.py``). When the connection drops, say the relay restarted, the
transport opens it again, but writes made on either side meanwhile would otherwise wait
for the next commit or the periodic sync (minutes). So each time a live connection to a
peer we dial comes back after being lost, every database we share with that peer is synced
once. Only transitions trigger anything: nothing runs while connections stay as they are.
Only relationships this side made (joined, connected, related) are watched, so the work
per look is one pass over a few peers, whatever the number of readers we serve.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from .reach import Reach
from .state import SyncState

log = logging.getLogger(__name__)

WATCH_S = 0.25  # how often live connections are looked at (a relay restart resumes within this)

Schedule = Callable[[str, str], None]  # (peer, db id): sync now


class ReturnWatcher:
    """Schedules a sync with a dialled peer when its live connection returns."""

    def __init__(self, reach: Reach, state: SyncState, schedule: Schedule) -> None:
        self._reach = reach
        self._state = state
        self._schedule = schedule

    async def run(self) -> None:
        live: set[str] = set()
        lost: set[str] = set()  # peers whose connection dropped and has not come back; bounded by relationships
        while True:
            await trio.sleep(WATCH_S)
            relationships = [r for r in self._state.relationships() if not r.served]
            peers = {r.peer for r in relationships}
            now_live = {p for p in peers if self._reach.live_addresses(p)}
            for peer in now_live & lost:
                dbs = [r.db for r in relationships if r.peer == peer]
                if dbs:
                    log.info("connection to %s is back: syncing %s", peer, ", ".join(dbs))
                for db in dbs:
                    self._schedule(peer, db)
            lost = ((lost | (live - now_live)) - now_live) & peers
            live = now_live
