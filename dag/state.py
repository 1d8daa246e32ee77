"""Computing a store's state at a set of tips, with a cache keyed by those tips.

The state of store S at tips T is the fold of the deltas of every entry in T's closure
(over S's own parent links), in ascending (store height, ID) order. Heights strictly
increase from parent to child, so a child always folds after its ancestors.

The walk pops entries from T backwards in *descending* order. At any moment every entry
still in the heap (the frontier F) orders below every entry already popped, and the
closure of T is exactly the popped entries plus the closure of F. So as soon as the
cache holds the state at F, the state at T is that state plus the popped deltas replayed
in ascending order. After a local commit on linear history F is the previous tip and the
replay is one delta: a read costs the delta, not the history. With no cached frontier the
walk reaches the root: the worst case is the whole store history, once.

Cached states are never mutated: a fold copies the top level, and the CRDT apply functions
copy every nested dict they touch (path copying). A state too large to copy cheaply is moved: its old key
is dropped and the dict is extended in place.

A state depends on nothing but its tips, so it can outlive the process: with a
``Snapshots`` store, the latest state of each store is saved when the instance closes and
put back into the cache the first time that store is read again. The first read after a
restart then replays what arrived since instead of the whole history.
"""

from __future__ import annotations

import heapq
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import libipld

from .crdt.doc import apply_doc_delta, decode_doc_delta
from .crdt.table import apply_table_delta, decode_table_delta
from .entry import Entry
from .errors import InvalidValueError

DOC = "doc"
TABLE = "table"
_MOVE_ABOVE = 4096  # top-level keys past which a fold extends the cached dict in place
_FRONTIER_PROBE = 8  # only look the frontier up in the cache while it is this small

StateKey = tuple[bytes, str, str, frozenset[bytes]]


class Snapshots(Protocol):
    """Where states outlive the process: one (tips, state) per (tree, store, kind)."""

    def load(self, tree: bytes, store: str, kind: str) -> tuple[frozenset[bytes], dict[str, Any]] | None: ...

    def save(self, tree: bytes, store: str, kind: str, tips: frozenset[bytes], state: dict[str, Any]) -> None: ...


def decode_delta(kind: str, data: bytes) -> Any:
    """The delta an entry wrote, or None when it cannot be read (it then changes nothing)."""
    try:
        value = libipld.decode_dag_cbor(data)
        return decode_doc_delta(value) if kind == DOC else decode_table_delta(value)
    except (ValueError, InvalidValueError, RecursionError):
        return None


class StateCache:
    """Store states by (tree, store, kind, tips); bounded, least recently used first out."""

    def __init__(
        self,
        load: Callable[[bytes], Entry | None],
        capacity: int = 256,
        lock: threading.RLock | None = None,
        snapshots: Snapshots | None = None,
    ) -> None:
        self._load = load
        self._lock = lock or threading.RLock()
        self._capacity = capacity
        self._states: OrderedDict[StateKey, dict[str, Any]] = OrderedDict()
        self._snapshots = snapshots
        self._restored: set[tuple[bytes, str, str]] = set()

    def clear(self) -> None:
        self._states.clear()
        self._restored.clear()

    def _restore(self, tree: bytes, store: str, kind: str) -> None:
        """Put the saved state of this store back into the cache (once per store and process)."""
        if self._snapshots is None or (tree, store, kind) in self._restored:
            return
        self._restored.add((tree, store, kind))
        saved = self._snapshots.load(tree, store, kind)
        if saved is not None:
            tips, state = saved
            self._put((tree, store, kind, tips), state)

    def save_latest(self) -> int:
        """Save the most recently used state of each store; returns how many were saved."""
        if self._snapshots is None:
            return 0
        with self._lock:
            latest: dict[tuple[bytes, str, str], StateKey] = {}
            for key in self._states:  # least recently used first: later ones win
                latest[key[:3]] = key
            saved = 0
            for tree, store, kind, tips in latest.values():
                self._snapshots.save(tree, store, kind, tips, self._states[(tree, store, kind, tips)])
                saved += 1
            return saved

    def _get(self, key: StateKey) -> dict[str, Any] | None:
        state = self._states.get(key)
        if state is not None:
            self._states.move_to_end(key)
        return state

    def _put(self, key: StateKey, state: dict[str, Any]) -> None:
        self._states[key] = state
        self._states.move_to_end(key)
        while len(self._states) > self._capacity:
            self._states.popitem(last=False)

    def state(self, tree: bytes, store: str, kind: str, tips: frozenset[bytes]) -> dict[str, Any]:
        """The state at ``tips`` (read-only: callers copy what they hand out)."""
        with self._lock:
            return self._state(tree, store, kind, tips)

    def _state(self, tree: bytes, store: str, kind: str, tips: frozenset[bytes]) -> dict[str, Any]:
        key = (tree, store, kind, tips)
        cached = self._get(key)
        if cached is not None:
            return cached
        self._restore(tree, store, kind)
        cached = self._get(key)
        if cached is not None:
            return cached
        heap: list[tuple[int, int, bytes]] = []
        seen: set[bytes] = set()
        for cid in tips:
            entry = self._load(cid)
            if entry is not None and entry.store(store) is not None:
                seen.add(cid)
                heapq.heappush(heap, (-entry.store_height(store), -int.from_bytes(cid, "big"), cid))
        popped: list[Entry] = []
        base: dict[str, Any] | None = None
        base_key: StateKey | None = None
        while heap:
            if len(heap) <= _FRONTIER_PROBE and popped:
                probe = (tree, store, kind, frozenset(item[2] for item in heap))
                base = self._get(probe)
                if base is not None:
                    base_key = probe
                    break
            _, _, cid = heapq.heappop(heap)
            entry = self._load(cid)
            if entry is None:
                continue  # only possible when unverified entries are included
            popped.append(entry)
            node = entry.store(store)
            assert node is not None
            for parent in node.parents:
                if parent in seen:
                    continue
                seen.add(parent)
                parent_entry = self._load(parent)
                if parent_entry is not None and parent_entry.store(store) is not None:
                    heapq.heappush(heap, (-parent_entry.store_height(store), -int.from_bytes(parent, "big"), parent))
        if base is None:
            state: dict[str, Any] = {}
        elif len(base) > _MOVE_ABOVE and base_key is not None:
            del self._states[base_key]
            state = base
        else:
            state = dict(base)
        for entry in reversed(popped):
            node = entry.store(store)
            if node is None or node.data is None:
                continue
            delta = decode_delta(kind, node.data)
            if delta is None:
                continue
            if kind == DOC:
                apply_doc_delta(state, delta)
            else:
                apply_table_delta(state, delta)
        self._put(key, state)
        return state
