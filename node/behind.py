"""How many of our entries a peer lacks, counted up to a bound.

``status`` (polled every second by the TUI) shows, per database and peer, how far the peer
is behind. Counting that exactly is a walk as long as the peer is behind
(``Database.missing_from``), which grows with history: a peer that left a year ago would
cost a walk of a year of entries on every poll. The status screen only needs "3" or
"1000+", so this walk stops after ``limit`` such entries (or ``limit`` times
``STEPS_PER_RESULT`` entries looked at, for the band of shared entries beside them).

The walk is ``dag.walk.missing_from``'s, over the ``Database`` API (heights and parents
of entries), backwards in descending (height, ID) order so each entry's colour is final
when it is popped.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from dag import Database, Status, cid_to_text

BEHIND_LIMIT = 1000  # ``behind_by`` is exact below this, and this value means "this many or more"
STEPS_PER_RESULT = 2  # entries looked at per entry counted, at most: shared ones beside them

_OURS = 1
_THEIRS = 2


def count_behind(db: Database, ours: Iterable[bytes], theirs: Iterable[bytes], limit: int = BEHIND_LIMIT) -> int:
    """Verified entries reachable from ``ours`` and not from ``theirs``, counted up to ``limit``."""
    colour: dict[bytes, int] = {}
    heap: list[tuple[int, int, bytes]] = []
    parents_of: dict[bytes, tuple[bytes, ...]] = {}

    def push(cid: bytes, mark: int) -> None:
        old = colour.get(cid)
        if old is not None:
            colour[cid] = old | mark
            return
        if db.status_of(cid) is not Status.VERIFIED:
            return  # not ours to send (or not held: its ancestors are unknown)
        entry = db.entry(cid_to_text(cid))
        parents_of[cid] = entry.parents
        colour[cid] = mark
        heapq.heappush(heap, (-entry.height, -int.from_bytes(cid, "big"), cid))

    for cid in theirs:
        push(cid, _THEIRS)
    for cid in ours:
        push(cid, _OURS)
    only_ours = sum(1 for c in colour.values() if c == _OURS)
    behind = steps = 0
    while heap and only_ours and behind < limit and steps < limit * STEPS_PER_RESULT:
        _, _, cid = heapq.heappop(heap)
        steps += 1
        mark = colour[cid]
        if mark == _OURS:
            only_ours -= 1
            behind += 1
        for parent in parents_of.pop(cid):
            before = colour.get(parent)
            push(parent, mark)
            after = colour.get(parent)
            if before != _OURS and after == _OURS:
                only_ours += 1
            elif before == _OURS and after is not None and after != _OURS:
                only_ours -= 1
    if heap and only_ours and behind < limit:
        return limit  # the step bound was reached first: at least this many is all we know
    return behind


__all__ = ["BEHIND_LIMIT", "count_behind"]
