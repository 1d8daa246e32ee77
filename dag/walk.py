"""Walks over the main DAG that sync needs: ancestors, what one side lacks, and samples.

The first two walk backwards from tips in descending (height, ID) order, so an entry is popped
only after every entry above it: its colour is final when it is popped. They read
metadata only (heights and parents), never entry bytes.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from .ids import split_cids
from .replica import Replica

_OURS = 1
_THEIRS = 2


def _key(height: int, cid: bytes) -> tuple[int, int, bytes]:
    return (-height, -int.from_bytes(cid, "big"), cid)


def ancestors(replica: Replica, tips: Iterable[bytes]) -> set[bytes]:
    """Every stored entry reachable from ``tips`` (the tips included)."""
    seen: set[bytes] = set()
    stack = [cid for cid in tips]
    while stack:
        cid = stack.pop()
        if cid in seen:
            continue
        meta = replica.meta_of(cid)
        if meta is None:
            continue
        seen.add(cid)
        stack.extend(p for p in split_cids(meta.parents) if p not in seen)
    return seen


def missing_from(replica: Replica, ours: Iterable[bytes], theirs: Iterable[bytes]) -> list[bytes]:
    """Entries reachable from ``ours`` that are not ancestors of ``theirs``, in (height, ID) order.

    Tips in ``theirs`` that we do not hold are ignored: we cannot know their ancestors.
    The walk stops once every entry left in the heap is an ancestor of ``theirs``, so its
    cost is the difference plus the band of shared entries at the same heights.
    """
    colour: dict[bytes, int] = {}
    heap: list[tuple[int, int, bytes]] = []

    def push(cid: bytes, mark: int) -> None:
        old = colour.get(cid)
        if old is None:
            meta = replica.meta_of(cid)
            if meta is None:
                return
            colour[cid] = mark
            heapq.heappush(heap, _key(meta.height, cid))
        else:
            colour[cid] = old | mark

    for cid in theirs:
        push(cid, _THEIRS)
    for cid in ours:
        push(cid, _OURS)
    only_ours = sum(1 for c in colour.values() if c == _OURS)
    result: list[tuple[int, bytes]] = []
    while heap and only_ours:
        negative_height, _, cid = heapq.heappop(heap)
        mark = colour[cid]
        if mark == _OURS:
            only_ours -= 1
            result.append((-negative_height, cid))
        meta = replica.meta_of(cid)
        assert meta is not None
        for parent in split_cids(meta.parents):
            before = colour.get(parent)
            push(parent, mark)
            after = colour.get(parent)
            if after is None:
                continue
            if before != _OURS and after == _OURS:
                only_ours += 1
            elif before == _OURS and after != _OURS:
                only_ours -= 1
    result.sort()
    return [cid for _, cid in result]


def first_parent_samples(
    replica: Replica, tips: Iterable[bytes], *, exact: int, limit: int, max_steps: int
) -> list[bytes]:
    """Ancestor IDs at distances 1..``exact``, then doubling, below each tip (first parent).

    One line per tip, so the cost is bounded by ``max_steps`` per tip, not by the DAG's
    width; reconciliation needs a sample near the fork, not every ancestor.
    """
    out: list[bytes] = []
    for tip in sorted(tips):
        distance, next_mark, cid = 0, 1, tip
        steps = 0
        while len(out) < limit and steps < max_steps:
            meta = replica.meta_of(cid)
            if meta is None or not meta.parents:
                break
            cid = split_cids(meta.parents)[0]
            distance += 1
            steps += 1
            if distance == next_mark:
                out.append(cid)
                next_mark = distance + 1 if distance < exact else distance * 2
    return out
