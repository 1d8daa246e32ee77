"""The shared machinery under Instance, Database, Transaction and ingest.

It owns the storage and every cache over it (decoded entries, entry metadata, tips, store
states, auth at a settings pin) and keeps them coherent: caches change only after a batch
has been written, so a failed write leaves them as they were.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from typing import Any, Concatenate, ParamSpec, TypeVar

from .auth import AuthSettings
from .authority import Authority
from .checkpoints import Checkpoints
from .entry import INDEX_STORE, SETTINGS_STORE, Entry, decode_entry
from .errors import StorageError
from .ids import join_cids, split_cids
from .state import DOC, TABLE, StateCache
from .storage.base import EntryMeta, Status, Storage, WriteBatch

log = logging.getLogger(__name__)

MAIN = ""  # the store name under which the main DAG's tips are kept
_INTERN_MAX = 1_024
_KINDS = {"docstore:v0": DOC, "table:v0": TABLE}  # `_index` types (dag/stores.py) to fold kinds

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(method: Callable[Concatenate[Replica, _P], _R]) -> Callable[Concatenate[Replica, _P], _R]:
    """Run under the replica's lock: the sync layer verifies batches on a worker thread.

    The hottest lookups also exist unlocked (``*_held``) for code that already holds the
    lock for a whole batch, such as ingest: re-entering an RLock per lookup costs more
    than the lookup itself.
    """

    def wrapper(self: Replica, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.lock:
            return method(self, *args, **kwargs)

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class _Lru(OrderedDict[bytes, Any]):
    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def remember(self, key: bytes, value: Any) -> None:
        self[key] = value
        if len(self) > self.capacity:
            self.popitem(last=False)

    def recall(self, key: bytes) -> Any:
        """The cached value (None if absent), kept as most recently used."""
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value


class Replica:
    """Storage plus coherent caches; written only through ``dag.writer.Writer``, which holds ``lock``."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.lock = threading.RLock()
        # Sized for memory, not hit rate: decoded entries are ~1 KiB each, metadata ~0.3 KiB;
        # a bootstrap streams through them once, and folds and walks reuse recent ones.
        # (With 4,096 and 65,536 a node sat at 112 MiB after a 10K bootstrap and 150 MiB
        # after 100K; these sizes cost no measurable speed there.)
        self._entries = _Lru(1_024)
        self._meta = _Lru(16_384)
        # One bytes object per database ID and per settings view, shared by the metadata
        # of every entry that names it (bounded: cleared when it grows past _INTERN_MAX).
        self._interned: dict[bytes, bytes] = {}
        self._tips: dict[tuple[bytes, str], frozenset[bytes]] = {}
        self._auth: OrderedDict[tuple[bytes, frozenset[bytes]], AuthSettings] = OrderedDict()
        # Folds start from verified tips, so everything they reach is verified (prefix-closed):
        # they load entries without checking each one's status, one at a time under the lock.
        self.checkpoints = Checkpoints(storage, self.lock, self.entry)
        self.states = StateCache(self.entry, checkpoints=self.checkpoints)
        # Whose writes still count once revocations are known (dag/authority.py).
        self.authority = Authority(self.entry_held, self.meta_of_held, self._plain_settings)
        # Entries of a batch being ingested, visible to lookups before the batch is written,
        # so that settings and heights over them are computed from what they really are.
        self.overlay_meta: dict[bytes, EntryMeta] = {}
        self.overlay_entries: dict[bytes, Entry] = {}

    def end_overlay(self, *, written: bool) -> None:
        """Forget the in-flight batch; if it was not written, drop what was derived from it."""
        self.overlay_meta.clear()
        self.overlay_entries.clear()
        if not written:
            self.states.clear()
            self.authority.clear()
            self._auth.clear()
            self._tips.clear()

    def reset_caches(self) -> None:
        """Forget every cache: storage changed underneath them (a repair of corrupt entries)."""
        self._entries.clear()
        self._meta.clear()
        self._interned.clear()
        self._tips.clear()
        self._auth.clear()
        self.states.clear()
        self.authority.clear()

    # ---- entries and metadata -------------------------------------------------------

    def entry_held(self, cid: bytes) -> Entry | None:
        """A stored entry, decoded (any status)."""
        entry = self._entries.recall(cid) or self.overlay_entries.get(cid)
        if entry is None:
            raw = self.storage.get_raw(cid)
            if raw is None:
                return None
            entry = decode_entry(raw)
            self._entries.remember(cid, entry)
        return entry

    entry = _locked(entry_held)

    @_locked
    def meta(self, cids: Collection[bytes]) -> dict[bytes, EntryMeta]:
        found: dict[bytes, EntryMeta] = {}
        missing = []
        for cid in cids:
            meta = self.overlay_meta.get(cid) or self._meta.recall(cid)
            if meta is None:
                missing.append(cid)
            else:
                found[cid] = meta
        if missing:
            for cid, meta in self.storage.get_meta(missing).items():
                self._remember_meta(cid, meta)
                found[cid] = meta
        return found

    def _is_verified(self, cid: bytes) -> bool:
        meta = self.meta_of_held(cid)
        return meta is not None and meta.status is Status.VERIFIED

    def _remember_meta(self, cid: bytes, meta: EntryMeta) -> None:
        interned = self._interned
        if len(interned) > _INTERN_MAX:
            interned.clear()
        tree = interned.setdefault(meta.tree, meta.tree)
        view = interned.setdefault(meta.settings_view, meta.settings_view)
        if tree is not meta.tree or view is not meta.settings_view:
            meta = EntryMeta(tree, meta.height, meta.status, meta.parents, view)
        self._meta.remember(cid, meta)

    def meta_of_held(self, cid: bytes) -> EntryMeta | None:
        meta = self.overlay_meta.get(cid) or self._meta.recall(cid)
        if meta is None:
            meta = self.storage.get_meta([cid]).get(cid)
            if meta is not None:
                self._remember_meta(cid, meta)
        return meta

    meta_of = _locked(meta_of_held)

    # ---- tips -----------------------------------------------------------------------

    def tips_held(self, tree: bytes, store: str = MAIN) -> frozenset[bytes]:
        """Tips of the verified part of a tree (``store`` ``""``) or of one store."""
        key = (tree, store)
        tips = self._tips.get(key)
        if tips is None:
            tips = frozenset(self.storage.tips(tree, store))
            self._tips[key] = tips
        return tips

    tips = _locked(tips_held)

    @_locked
    def unverified_tips(self, tree: bytes, store: str = MAIN) -> frozenset[bytes]:
        """Tips over every entry that is not Failed, for the opt-in unverified read."""
        members: set[bytes] = set()
        referenced: set[bytes] = set()
        for cid, _height, _raw in self.storage.iter_entries(tree, None):
            meta = self.meta_of_held(cid)
            if meta is None or meta.status is Status.FAILED:
                continue
            entry = self.entry_held(cid)
            assert entry is not None
            if store == MAIN:
                members.add(cid)
                referenced.update(entry.parents)
            else:
                node = entry.store(store)
                if node is not None:
                    members.add(cid)
                    referenced.update(node.parents)
        return frozenset(members - referenced)

    # ---- settings and auth ----------------------------------------------------------

    def settings_view(self, entry: Entry) -> tuple[bytes, ...]:
        """The `_settings` tips as of ``entry`` (itself included when it writes settings)."""
        if entry.store(SETTINGS_STORE) is not None:
            return (entry.cid,)
        return entry.settings_tips

    def expected_pin_held(self, parents: Iterable[bytes], views: dict[bytes, bytes] | None = None) -> tuple[bytes, ...]:
        """The `_settings` tips over the closure of ``parents``: what an entry must pin."""
        union: set[bytes] = set()
        for parent in parents:
            view = views.get(parent) if views is not None else None
            if view is None:
                meta = self.meta_of_held(parent)
                view = meta.settings_view if meta is not None else b""
            union.update(split_cids(view))
        if len(union) > 1:
            union = self._maximal_settings(union)
        return tuple(sorted(union))

    expected_pin = _locked(expected_pin_held)

    def _maximal_settings(self, candidates: set[bytes]) -> set[bytes]:
        """Drop the candidates that are `_settings` ancestors of another candidate."""
        entries = {cid: self.entry_held(cid) for cid in candidates}
        floor = min((e.store_height(SETTINGS_STORE) for e in entries.values() if e is not None), default=0)
        heap: list[tuple[int, bytes]] = []
        reached: set[bytes] = set()
        for entry in entries.values():
            if entry is None:
                continue
            node = entry.store(SETTINGS_STORE)
            for parent in node.parents if node is not None else ():
                if parent not in reached:
                    reached.add(parent)
                    heapq.heappush(heap, (0, parent))
        while heap:
            _, cid = heapq.heappop(heap)
            entry = self.entry_held(cid)
            if entry is None or entry.store_height(SETTINGS_STORE) <= floor:
                continue
            node = entry.store(SETTINGS_STORE)
            for parent in node.parents if node is not None else ():
                if parent not in reached:
                    reached.add(parent)
                    heapq.heappush(heap, (0, parent))
        return candidates - reached

    def _plain_settings(self, tree: bytes, pin: frozenset[bytes]) -> dict[str, Any]:
        return self.states.state(tree, SETTINGS_STORE, DOC, pin)

    def settings_state(self, tree: bytes, pin: frozenset[bytes]) -> dict[str, Any]:
        """The `_settings` state at ``pin`` that rights are judged by: the fold, less the
        settings of admins revoked concurrently with their revocation (dag/authority.py)."""
        return self.authority.settings(tree, pin)

    @_locked
    def current_settings(self, tree: bytes) -> dict[str, Any]:
        """The `_settings` state at the tree's Verified settings tips (read-only)."""
        return self.authority.settings(tree, self.tips_held(tree, SETTINGS_STORE))

    def effective_tips_held(self, tree: bytes, store: str = MAIN) -> frozenset[bytes]:
        """The tips reads and new entries start from: the Verified tips less the writes
        whose signer may no longer make them (dag/authority.py, rule 2)."""
        settings_tips = self.tips_held(tree, SETTINGS_STORE)
        return self.authority.tips(
            tree, store, self.tips_held(tree, store), settings_tips, lambda: self.auth_at_held(tree, settings_tips)
        )

    effective_tips = _locked(effective_tips_held)

    def auth_at_held(self, tree: bytes, pin: frozenset[bytes]) -> AuthSettings:
        key = (tree, pin)
        auth = self._auth.get(key)
        if auth is None:
            auth = AuthSettings.from_settings(self.settings_state(tree, pin))
            self._auth[key] = auth
            if len(self._auth) > 256:
                self._auth.popitem(last=False)
        return auth

    auth_at = _locked(auth_at_held)

    # ---- writing --------------------------------------------------------------------

    def write(self, batch: WriteBatch, decoded: Iterable[Entry] = ()) -> None:
        """Apply a batch to storage, then bring the caches up to date (``Writer.write`` calls
        this: it also tells the write callbacks which tips moved)."""
        self.storage.write(batch)
        for record in batch.entries:
            self._remember_meta(record.cid, record.meta)
        for cid, (status, view) in batch.statuses.items():
            old = self.meta_of_held(cid)
            if old is not None:
                self._remember_meta(cid, EntryMeta(old.tree, old.height, status, old.parents, view))
        for entry in decoded:
            self._entries.remember(entry.cid, entry)
        changed: dict[tuple[bytes, str], set[bytes]] = {}
        for tree, store, cid in batch.tips_removed:
            changed.setdefault((tree, store), set(self.tips_held(tree, store))).discard(cid)
        for tree, store, cid in batch.tips_added:
            changed.setdefault((tree, store), set(self.tips_held(tree, store))).add(cid)
        for key, tips in changed.items():
            self._tips[key] = frozenset(tips)
        self._advance_checkpoints(batch, decoded)

    def _advance_checkpoints(self, batch: WriteBatch, decoded: Iterable[Entry]) -> None:
        """Bring the checkpoint of every store whose tips the batch moved to its new
        effective tips (``dag/checkpoints.py``), replaying about the batch's entries, at most
        four times as many (past that the next whole read rebuilds it)."""
        stores = dict.fromkeys(
            (tree, store)
            for tree, store, _cid in (*batch.tips_added, *batch.tips_removed)
            if store not in (MAIN, SETTINGS_STORE)
        )
        if not stores:
            return
        written = {entry.cid: entry for entry in decoded}

        def load(cid: bytes) -> Entry | None:
            return written.get(cid) or self.entry_held(cid)

        budget = 4 * max(len(batch.entries), len(batch.statuses)) + 64
        for tree, store in sorted(stores, key=lambda pair: pair[1] != INDEX_STORE):  # `_index` first
            kind = DOC if store == INDEX_STORE else self._kind(tree, store)
            if kind is None:
                continue
            try:
                self.checkpoints.advance(tree, store, kind, self.effective_tips_held(tree, store), load, budget)
            except StorageError as exc:  # a checkpoint is a cache: the write itself stands
                log.warning("checkpoint of %s/%s not advanced: %s", tree.hex(), store, exc)

    def _kind(self, tree: bytes, store: str) -> str | None:
        index = self.states.state(tree, INDEX_STORE, DOC, self.effective_tips_held(tree, INDEX_STORE))
        declared = index.get(store)
        kind = declared.get("type") if isinstance(declared, dict) else None
        return _KINDS.get(kind) if isinstance(kind, str) else None


def pack(cids: Iterable[bytes]) -> bytes:
    return join_cids(cids)
