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

A state depends on nothing but its tips, so it can outlive the process: with
``Checkpoints`` (``dag/checkpoints.py``), every store but `_settings` has its state kept in
storage as rows, advanced as entries are written. A state not in the cache is then
replayed from a cached frontier only when one is near (``_NEAR`` entries), else read from
the checkpoint (plus the few entries since), and only as a last resort folded from the
root. A single key is read from its checkpoint row (``value``).

No lock is held for a fold's duration: the cache has a small lock of its own, taken only
around a lookup or an insertion, and entries are loaded one at a time through the
replica's locked lookup, so a long fold on a worker thread never makes the event loop
wait for the replica's lock. Never take the replica's lock while holding the cache's
(ingest holds the replica's lock and calls in here).
"""

from __future__ import annotations

import heapq
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import libipld

from .crdt.doc import MISSING, apply_doc_delta, decode_doc_delta
from .crdt.table import apply_table_delta, decode_table_delta
from .entry import Entry
from .errors import InvalidValueError

if TYPE_CHECKING:
    from .checkpoints import Checkpoints

DOC = "doc"
TABLE = "table"
_MOVE_ABOVE = 4096  # top-level keys past which a fold extends the cached dict in place
_FRONTIER_PROBE = 8  # only look the frontier up in the cache while it is this small
_NEAR = 256  # with checkpoints, a walk looking for a cached frontier gives up past this many entries

UNKNOWN: Any = object()  # what a checkpoint answers when it cannot without the whole state

StateKey = tuple[bytes, str, str, frozenset[bytes]]


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
        checkpoints: Checkpoints | None = None,
    ) -> None:
        self._load = load
        self._lock = threading.Lock()  # around the OrderedDict only, never around a fold
        self._capacity = capacity
        self._states: OrderedDict[StateKey, dict[str, Any]] = OrderedDict()
        self._checkpoints = checkpoints

    def clear(self) -> None:
        with self._lock:
            self._states.clear()

    def _get(self, key: StateKey) -> dict[str, Any] | None:
        with self._lock:
            state = self._states.get(key)
            if state is not None:
                self._states.move_to_end(key)
            return state

    def _take(self, key: StateKey) -> dict[str, Any] | None:
        """Remove and return a cached state (to extend it in place)."""
        with self._lock:
            return self._states.pop(key, None)

    def _put(self, key: StateKey, state: dict[str, Any]) -> None:
        with self._lock:
            self._states[key] = state
            self._states.move_to_end(key)
            while len(self._states) > self._capacity:
                self._states.popitem(last=False)

    def _has_any(self, tree: bytes, store: str, kind: str) -> bool:
        with self._lock:
            return any(key[:3] == (tree, store, kind) for key in self._states)

    def state(self, tree: bytes, store: str, kind: str, tips: frozenset[bytes]) -> dict[str, Any]:
        """The state at ``tips`` (read-only: callers copy what they hand out)."""
        key = (tree, store, kind, tips)
        cached = self._get(key)
        if cached is not None:
            return cached
        checkpoints = self._checkpoints
        if checkpoints is None or not checkpoints.handles(store):
            state = self._state(tree, store, kind, tips, None)
            assert state is not None
            return state
        state = self._state(tree, store, kind, tips, _NEAR) if self._has_any(tree, store, kind) else None
        if state is None:
            state = checkpoints.state(tree, store, kind, tips)
            if state is None:
                state = checkpoints.rebuild(tree, store, kind, tips)
            if state is None:  # an entry is missing: fold what there is, as without checkpoints
                state = self._state(tree, store, kind, tips, None)
                assert state is not None
                return state
            self._put(key, state)
        return state

    def value(self, tree: bytes, store: str, kind: str, tips: frozenset[bytes], name: str) -> Any:
        """The top-level value ``name`` of the state at ``tips`` (MISSING if absent; read-only),
        from the cache or a checkpoint row when either has it, without the whole state."""
        cached = self._get((tree, store, kind, tips))
        if cached is not None:
            return cached.get(name, MISSING)
        checkpoints = self._checkpoints
        if checkpoints is not None and checkpoints.handles(store):
            found = checkpoints.value(tree, store, kind, tips, name)
            if found is not UNKNOWN:
                return found
        return self.state(tree, store, kind, tips).get(name, MISSING)

    def _state(
        self, tree: bytes, store: str, kind: str, tips: frozenset[bytes], budget: int | None
    ) -> dict[str, Any] | None:
        """Fold from a cached frontier (or the root); None if ``budget`` entries were
        popped without meeting a cached one."""
        key = (tree, store, kind, tips)
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
            if budget is not None and len(popped) >= budget:
                return None
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
        elif len(base) > _MOVE_ABOVE and base_key is not None and self._take(base_key) is base:
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
