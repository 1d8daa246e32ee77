"""Store states checkpointed as rows, advanced as entries are written.

The state of a store at tips T is the fold of closure(T) in (store height, ID) order
(``dag/state.py``). A checkpoint holds that state at some tips H as one row per top-level
key (``dag/snapshots.py`` says how rows are encoded and ordered) plus a head naming H.

Advancing from H to T touches only what changed. ``since`` walks closure(T) minus
closure(H) (two flags, one per side, in descending fold order, stopping once every entry
still to visit is below both sides): those are the entries to replay. The state at T
differs from the state at H only at the top-level keys their deltas write, and each
key's value is the fold of the writes to that key alone, so replaying the new deltas on
those keys' rows gives the new rows, as long as every new write to a key orders after the
last write to it already in the checkpoint (each row keeps that position, deleted keys
keep a tombstone row for it). A new entry that orders before such a write (a writer that
was offline on an old branch), H not inside closure(T) (a revocation took tips away), or
more than ``budget`` entries between them: the checkpoint is left at H, still a true
state there, and the next read that needs the whole state folds the history once and
rewrites it (``rebuild``). Memory per step is O(entries replayed + keys they write).

Writers advance the checkpoint under the replica's lock right after each write
(``Replica.write``: ingest batches and local commits alike); readers read rows without
it (storage reads checkpoints on a connection of its own) and take it only to write.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from .crdt.doc import MISSING, TOMBSTONE, DocDelta, apply_doc_delta
from .entry import SETTINGS_STORE, Entry
from .ids import join_cids, split_cids
from .snapshots import FORMAT as FORMAT
from .snapshots import DamagedCheckpoint, decode_value, encode_value, legacy_keys, order_of, seq_of
from .state import DOC, UNKNOWN, decode_delta
from .storage.base import StateHead, StateRow, Storage

log = logging.getLogger(__name__)

Load = Callable[[bytes], Entry | None]
Step = tuple[bytes, bytes | None]  # (fold position, the delta's bytes) of one entry to replay
# A read whose checkpoint is behind replays at most this many entries on top of it; past
# that it folds the whole history once (and rewrites the checkpoint).
READ_BUDGET = 4_096

_NEW, _OLD, _BOTH = 1, 2, 3


def since(
    load: Load, store: str, tips: Iterable[bytes], base: Iterable[bytes], budget: int | None
) -> list[Step] | None:
    """closure(``tips``) less closure(``base``) over ``store``'s links, in fold order; None if
    closure(``base``) is not inside closure(``tips``), an entry is missing, or more than
    ``budget`` entries had to be visited."""
    heap: list[tuple[int, int, bytes, Entry]] = []
    flags: dict[bytes, int] = {}
    skipped: set[bytes] = set()
    open_count = 0  # entries in the heap not yet reached from both sides

    def reach(cid: bytes, flag: int) -> bool:
        nonlocal open_count
        old = flags.get(cid)
        if old is not None:
            if old | flag != old:
                flags[cid] = old | flag
                open_count -= old | flag == _BOTH
            return True
        if cid in skipped:
            return True
        entry = load(cid)
        if entry is None:
            return False
        if entry.store(store) is None:
            skipped.add(cid)
            return True
        flags[cid] = flag
        open_count += flag != _BOTH
        heapq.heappush(heap, (-entry.store_height(store), -int.from_bytes(cid, "big"), cid, entry))
        return True

    if not all(reach(cid, _NEW) for cid in tips) or not all(reach(cid, _OLD) for cid in base):
        return None
    steps: list[Step] = []
    visited = 0
    while open_count > 0:
        neg_height, _, cid, entry = heapq.heappop(heap)
        flag = flags[cid]
        open_count -= flag != _BOTH
        if flag == _OLD:
            return None  # in the checkpoint's past but not in the new one
        visited += 1
        if budget is not None and visited > budget:
            return None
        node = entry.store(store)
        assert node is not None
        if flag == _NEW:
            steps.append((order_of(-neg_height, cid), node.data))
        if not all(reach(parent, flag) for parent in node.parents):
            return None
    steps.reverse()
    return steps


def decoded(kind: str, steps: list[Step]) -> list[tuple[bytes, dict[str, Any]]]:
    """Each step's top-level writes (key to value, nested delta or tombstone)."""
    out = []
    for order, data in steps:
        delta = None if data is None else decode_delta(kind, data)
        if delta is not None:
            out.append((order, delta.fields if kind == DOC else delta))
    return out


class Partial:
    """The rows of the keys some deltas write, and those deltas applied to them."""

    def __init__(self, kind: str, rows: dict[str, StateRow]) -> None:
        self._kind = kind
        self.values: dict[str, Any] = {
            key: MISSING if row.value is None else decode_value(row.value) for key, row in rows.items()
        }
        self.seqs = {key: row.seq for key, row in rows.items()}
        self._orders = {key: row.order for key, row in rows.items()}
        self.changed: dict[str, None] = {}

    def apply(self, order: bytes, fields: dict[str, Any], only: str | None = None) -> bool:
        """Fold one entry's writes in; False if one orders before a write the rows already hold."""
        for index, (key, node) in enumerate(fields.items()):
            if only is not None and key != only:
                continue
            if self._orders.get(key, b"") > order:
                return False
            old = self.values.get(key, MISSING)
            if node is TOMBSTONE:
                new = MISSING
            elif isinstance(node, DocDelta):  # only in documents: a nested document merges
                new = {} if node.atomic or not isinstance(old, dict) else dict(old)
                apply_doc_delta(new, node)
            else:
                new = node
            if old is MISSING and new is not MISSING:
                self.seqs[key] = seq_of(order, index)
            self.values[key] = new
            self._orders[key] = order
            self.changed[key] = None
        return True

    def rows(self) -> dict[str, StateRow]:
        """The changed rows, encoded."""
        return {
            key: StateRow(
                self.seqs.get(key, b""),
                self._orders[key],
                None if self.values[key] is MISSING else encode_value(self.values[key]),
            )
            for key in self.changed
        }

    def state(self) -> dict[str, Any]:
        """The whole state, when the rows are all of them."""
        live = sorted((self.seqs[key], key) for key, value in self.values.items() if value is not MISSING)
        return {key: self.values[key] for _, key in live}


def _touched(fields: list[tuple[bytes, dict[str, Any]]]) -> dict[str, None]:
    return {key: None for _, writes in fields for key in writes}


class Checkpoints:
    """The checkpoints of one replica's stores (every store but `_settings`, whose states
    are asked for at many historical pins: those stay in ``StateCache`` alone)."""

    def __init__(self, storage: Storage, lock: threading.RLock, load: Load) -> None:
        self._storage = storage
        self._lock = lock
        self._load = load  # locked, one entry at a time

    @staticmethod
    def handles(store: str) -> bool:
        return store != SETTINGS_STORE

    def _usable(self, head: StateHead | None) -> bool:
        return head is not None and head.format == FORMAT

    def advance(self, tree: bytes, store: str, kind: str, tips: frozenset[bytes], load: Load, budget: int) -> bool:
        """Move the checkpoint to ``tips`` (the caller holds the replica's lock); False if it
        stays where it was (see the module docstring)."""
        storage = self._storage
        head = storage.state_head(tree, store, kind)
        packed = join_cids(sorted(tips))
        usable = self._usable(head)
        if usable and head is not None and head.tips == packed:
            return True
        base = split_cids(head.tips) if usable and head is not None else []
        steps = since(load, store, tips, base, budget)
        if steps is None:
            return False
        fields = decoded(kind, steps)
        _, rows = storage.state_rows_for(tree, store, kind, _touched(fields)) if usable else (head, {})
        try:
            partial = Partial(kind, rows)
        except DamagedCheckpoint:
            return False
        if not all(partial.apply(order, writes) for order, writes in fields):
            return False
        written = storage.write_state(tree, store, kind, head, StateHead(packed, FORMAT), partial.rows(), not usable)
        if written and not usable:
            self._forget_legacy(tree, store, kind)
        return written

    def value(self, tree: bytes, store: str, kind: str, tips: frozenset[bytes], key: str) -> Any:
        """The top-level value at ``key`` at ``tips`` (MISSING: absent), or UNKNOWN."""
        head, rows = self._storage.state_rows_for(tree, store, kind, [key])
        if not self._usable(head) or head is None:
            return UNKNOWN
        try:
            partial = Partial(kind, rows)
        except DamagedCheckpoint:
            return UNKNOWN
        if head.tips != join_cids(sorted(tips)):
            steps = since(self._load, store, tips, split_cids(head.tips), READ_BUDGET)
            if steps is None:
                return UNKNOWN
            if not all(partial.apply(order, writes, only=key) for order, writes in decoded(kind, steps)):
                return UNKNOWN
        return partial.values.get(key, MISSING)

    def state(self, tree: bytes, store: str, kind: str, tips: frozenset[bytes]) -> dict[str, Any] | None:
        """The whole state at ``tips`` from the checkpoint and what came since, or None."""
        head, rows = self._storage.state_snapshot(tree, store, kind)
        if not self._usable(head) or head is None:
            return None
        packed = join_cids(sorted(tips))
        try:
            if head.tips == packed:
                return {key: decode_value(row.value) for key, row in rows.items() if row.value is not None}
            steps = since(self._load, store, tips, split_cids(head.tips), READ_BUDGET)
            if steps is None:
                return None
            fields = decoded(kind, steps)
            partial = Partial(kind, {key: rows[key] for key in _touched(fields) if key in rows})
            if not all(partial.apply(order, writes) for order, writes in fields):
                return None
            changed = partial.rows()
            with self._lock:
                self._storage.write_state(tree, store, kind, head, StateHead(packed, FORMAT), changed, False)
            rows.update(changed)
            live = sorted((row.seq, key) for key, row in rows.items() if row.value is not None)
            return {
                key: partial.values[key] if key in changed else decode_value(rows[key].value or b"") for _, key in live
            }
        except DamagedCheckpoint:
            log.warning("checkpoint of %s/%s is damaged; folding from the history", tree.hex(), store)
            return None

    def rebuild(self, tree: bytes, store: str, kind: str, tips: frozenset[bytes]) -> dict[str, Any] | None:
        """Fold the whole history at ``tips`` and write it as the checkpoint (O(history), once)."""
        head = self._storage.state_head(tree, store, kind)
        steps = since(self._load, store, tips, (), None)
        if steps is None:
            return None
        partial = Partial(kind, {})
        for order, writes in decoded(kind, steps):
            partial.apply(order, writes)
        with self._lock:
            packed = join_cids(sorted(tips))
            if self._storage.write_state(tree, store, kind, head, StateHead(packed, FORMAT), partial.rows(), True):
                self._forget_legacy(tree, store, kind)
        return partial.state()

    def _forget_legacy(self, tree: bytes, store: str, kind: str) -> None:
        for key in legacy_keys(tree, store, kind):
            self._storage.delete_value(key)
