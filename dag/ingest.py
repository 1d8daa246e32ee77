"""Taking in entries that came from elsewhere: store Unverified, verify locally, prefix-closed.

Invariants:
1. An entry is Verified only when its root, parents, store parents and settings pin are all
   Verified and its own checks pass; so the Verified set is closed under ancestry.
2. An entry depending on a Failed entry is Failed.
3. An entry depending on a missing or Unverified entry stays Unverified, with one wait row
   per blocker; when a blocker is decided, its waiting children are decided again.
4. No peer can assert a status: every status here is computed from the bytes.
5. Trust on first use applies to the root entry alone: a root is accepted when its
   signature is valid and its signer is an admin of the settings it creates. A non-root
   entry must pin exactly the `_settings` tips over its parents' closure, so it can neither
   authorize itself with an empty pin nor pick an older, friendlier settings state.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import libipld

from .auth import AuthSettings, check_write
from .crdt.doc import DocDelta, apply_doc_delta, decode_doc_delta
from .entry import INDEX_STORE, ROOT_STORE, SETTINGS_STORE, Entry, decode_entry
from .errors import GarbageEntryError, InvalidValueError, PermissionDeniedError
from .ids import cid_to_text, join_cids
from .replica import MAIN, Replica
from .storage.base import EntryMeta, EntryRecord, Status, WriteBatch

PARALLEL_SIGNATURES_FROM = 64  # below this a thread pool costs more than it saves
SIGNATURE_CHUNK = 100
_RESERVED_WRITABLE = (SETTINGS_STORE, INDEX_STORE)


@dataclass
class PutResult:
    """What one call of ``put_remote_entries`` did."""

    received: int = 0
    duplicates: int = 0
    verified: list[bytes] = field(default_factory=list)  # binary IDs, in the order verified
    failed: dict[str, str] = field(default_factory=dict)  # entry ID (text) -> reason
    unverified: list[bytes] = field(default_factory=list)  # stored, waiting for what they depend on
    trees: set[bytes] = field(default_factory=set)


def _check_chunk(entries: list[Entry]) -> dict[bytes, bool]:
    return {entry.cid: entry.signature_valid() for entry in entries}


class SignatureChecks:
    """Signature checks running on a thread pool while the caller goes on deciding.

    PyNaCl releases the GIL while it verifies, so the pool's threads use the other cores
    while this thread decodes, orders and checks permissions. Chunks are submitted in
    the order entries will be decided, so the first answers needed come first.
    """

    def __init__(self, entries: list[Entry], pool: ThreadPoolExecutor | None) -> None:
        self._results: dict[bytes, bool] = {}
        self._pending: dict[bytes, Future[dict[bytes, bool]]] = {}
        if pool is None or len(entries) < PARALLEL_SIGNATURES_FROM:
            return
        for start in range(0, len(entries), SIGNATURE_CHUNK):
            chunk = entries[start : start + SIGNATURE_CHUNK]
            future = pool.submit(_check_chunk, chunk)
            for entry in chunk:
                self._pending[entry.cid] = future

    def valid(self, entry: Entry) -> bool:
        result = self._results.get(entry.cid)
        if result is None:
            future = self._pending.pop(entry.cid, None)
            if future is None:
                return entry.signature_valid()
            self._results.update(future.result())
            result = self._results[entry.cid]
        return result


class Ingest:
    """One batch of remote entries on its way into storage."""

    def __init__(self, replica: Replica, pool: ThreadPoolExecutor | None) -> None:
        self.replica = replica
        self.pool = pool
        self.batch = WriteBatch()
        self.result = PutResult()
        self.new: dict[bytes, Entry] = {}  # decoded entries of this batch, not yet stored
        self.decided: dict[bytes, Status] = {}
        self.views: dict[bytes, bytes] = {}
        self.tips: dict[tuple[bytes, str], set[bytes]] = {}
        self.signatures = SignatureChecks([], None)
        self.tips_before: dict[bytes, frozenset[bytes]] = {}

    def run(self, raws: Iterable[bytes], only_tree: bytes | None = None) -> PutResult:
        decoded = [decode_entry(raw) for raw in raws]  # raises before anything is stored
        if only_tree is not None:
            for entry in decoded:
                if entry.tree != only_tree:
                    raise GarbageEntryError(f"entry {entry.id} belongs to another database")
        self.result.received = len(decoded)
        unique: dict[bytes, Entry] = {}
        for entry in decoded:
            unique.setdefault(entry.cid, entry)
        known = self.replica.meta(list(unique))
        for cid, entry in unique.items():
            if cid in known:
                continue
            self.new[cid] = entry
        self.result.duplicates = len(decoded) - len(self.new)
        if not self.new:
            return self.result
        replica = self.replica
        for entry in self.new.values():
            self.tips_before.setdefault(entry.tree, replica.tips(entry.tree))
            meta = EntryMeta(entry.tree, entry.height, Status.UNVERIFIED, join_cids(entry.parents), b"")
            self.batch.entries.append(EntryRecord(entry.cid, meta, entry.raw))
            replica.overlay_meta[entry.cid] = meta
            replica.overlay_entries[entry.cid] = entry
        ordered = sorted(self.new.values(), key=lambda e: (e.height, e.cid))
        self.signatures = SignatureChecks(ordered, self.pool)
        written = False
        try:
            self._decide_all(ordered)
            self._finish()
            written = True
        finally:
            replica.end_overlay(written=written)
        return self.result

    # ---- deciding ---------------------------------------------------------------------

    def _status(self, cid: bytes) -> Status | None:
        meta = self.replica.meta_of(cid)
        return None if meta is None else meta.status

    def _load(self, cid: bytes) -> Entry | None:
        return self.new.get(cid) or self.replica.entry(cid)

    def _decide_all(self, queue: list[Entry]) -> None:
        while queue:
            settled: list[bytes] = []
            for entry in queue:
                if entry.cid in self.decided:
                    continue
                status = self._decide(entry)
                if status is not Status.UNVERIFIED:
                    settled.append(entry.cid)
            queue = self._waiting_on(settled)

    def _waiting_on(self, settled: list[bytes]) -> list[Entry]:
        if not settled:
            return []
        settled_set = set(settled)
        children: dict[bytes, Entry] = {}
        for blocker, child, _tree in self.batch.waits_added:
            if blocker in settled_set and child not in self.decided:
                entry = self._load(child)
                if entry is not None:
                    children[child] = entry
        for child in self.replica.storage.waiting_children(settled):
            if child not in self.decided and child not in children:
                entry = self._load(child)
                if entry is not None:
                    children[child] = entry
        return sorted(children.values(), key=lambda e: (e.height, e.cid))

    def _dependencies(self, entry: Entry) -> set[bytes]:
        deps = set(entry.parents) | set(entry.settings_tips)
        for node in entry.stores:
            deps.update(node.parents)
        if entry.root is not None:
            deps.add(entry.root)
        return deps

    def _decide(self, entry: Entry) -> Status:
        blockers = []
        for dep in sorted(self._dependencies(entry)):
            status = self._status(dep)
            if status is Status.FAILED:
                return self._settle(entry, Status.FAILED, f"depends on failed entry {cid_to_text(dep)}")
            if status is not Status.VERIFIED:
                blockers.append(dep)
        if blockers:
            for blocker in blockers:
                self.batch.waits_added.append((blocker, entry.cid, entry.tree))
            return Status.UNVERIFIED
        reason = self._check(entry)
        return self._settle(entry, Status.FAILED if reason else Status.VERIFIED, reason)

    def _settle(self, entry: Entry, status: Status, reason: str | None) -> Status:
        self.decided[entry.cid] = status
        view = b""
        if status is Status.VERIFIED:
            view = join_cids(self.replica.settings_view(entry))
            self.views[entry.cid] = view
            self._advance_tips(entry)
            self.result.verified.append(entry.cid)
        else:
            self.result.failed[entry.id] = reason or "failed"
        self.batch.statuses[entry.cid] = (status, view)
        meta = self.replica.meta_of(entry.cid)
        if meta is not None:
            self.replica.overlay_meta[entry.cid] = EntryMeta(meta.tree, meta.height, status, meta.parents, view)
        if entry.cid not in self.new:  # it waited in storage since an earlier batch
            self.batch.waits_cleared.append(entry.cid)
        self.result.trees.add(entry.tree)
        return status

    def _advance_tips(self, entry: Entry) -> None:
        tree = entry.tree
        main = self._tips_for(tree, MAIN)
        main.difference_update(entry.parents)
        main.add(entry.cid)
        for node in entry.stores:
            store_tips = self._tips_for(tree, node.name)
            store_tips.difference_update(node.parents)
            store_tips.add(entry.cid)
        if entry.is_root:
            self.batch.trees_added.append(entry.cid)

    def _tips_for(self, tree: bytes, store: str) -> set[bytes]:
        key = (tree, store)
        tips = self.tips.get(key)
        if tips is None:
            tips = set(self.replica.tips(tree, store))
            self.tips[key] = tips
        return tips

    # ---- the checks ------------------------------------------------------------------

    def _height(self, cid: bytes) -> int:
        meta = self.replica.meta_of(cid)
        return meta.height if meta is not None else -1

    def _check(self, entry: Entry) -> str | None:
        """Why ``entry`` fails, or None when it verifies. All its dependencies are Verified."""
        if not self.signatures.valid(entry):
            return "signature does not verify"
        stores: dict[str, DocDelta | None] = {}
        try:
            for node in entry.stores:
                if node.name.startswith("_") and node.name not in (*_RESERVED_WRITABLE, ROOT_STORE):
                    return f"writes reserved store {node.name!r}"
                if node.name in _RESERVED_WRITABLE and node.data is not None:
                    stores[node.name] = decode_doc_delta(libipld.decode_dag_cbor(node.data))
                else:
                    stores[node.name] = None
        except (ValueError, InvalidValueError) as exc:
            return f"unreadable settings delta: {exc}"
        if entry.is_root:
            return self._check_root(entry, stores)
        tree = entry.tree
        for parent in entry.parents:
            if self._tree_of(parent) != tree:
                return f"parent {cid_to_text(parent)} belongs to another database"
        expected_height = 1 + max(self._height(p) for p in entry.parents)
        if entry.height != expected_height:
            return f"height is {entry.height}, parents give {expected_height}"
        pin = self.replica.expected_pin(entry.parents, self.views)
        if entry.settings_tips != pin:
            return "settings pin is not the settings tips of its parents"
        for node in entry.stores:
            own_height = entry.store_height(node.name)
            for parent in node.parents:
                parent_entry = self._load(parent)
                if parent_entry is None or parent_entry.tree != tree or parent_entry.store(node.name) is None:
                    return f"store parent {cid_to_text(parent)} is not in store {node.name!r}"
                if parent_entry.store_height(node.name) >= own_height:
                    return f"store {node.name!r} height does not increase"
            if node.name == SETTINGS_STORE and node.parents != pin:
                return "settings parents are not the settings tips of its parents"
        try:
            check_write(self.replica.auth_at(tree, frozenset(pin)), entry.pubkey_text, stores)
        except PermissionDeniedError as exc:
            return str(exc)
        return None

    def _tree_of(self, cid: bytes) -> bytes | None:
        meta = self.replica.meta_of(cid)
        return None if meta is None else meta.tree

    def _check_root(self, entry: Entry, stores: dict[str, DocDelta | None]) -> str | None:
        settings = stores.get(SETTINGS_STORE)
        if settings is None:
            return None
        state: dict[str, object] = {}
        apply_doc_delta(state, settings)
        auth = AuthSettings.from_settings(state)
        held = auth.permission_of(entry.pubkey_text)
        if auth.configured and (held is None or not held.is_admin):
            return "root entry is not signed by an admin of the settings it creates"
        return None

    # ---- finishing -------------------------------------------------------------------

    def _finish(self) -> None:
        batch = self.batch
        # New entries carry their final status in the insert itself.
        final = []
        for record in batch.entries:
            status, view = batch.statuses.pop(record.cid, (Status.UNVERIFIED, b""))
            meta = record.meta
            meta = EntryMeta(meta.tree, meta.height, status, meta.parents, view)
            final.append(EntryRecord(record.cid, meta, record.raw))
        batch.entries = final
        decided = set(self.decided)
        batch.waits_added = [w for w in batch.waits_added if w[1] not in decided]
        for (tree, store), tips in self.tips.items():
            before = self.replica.tips(tree, store)
            batch.tips_added.extend((tree, store, cid) for cid in sorted(tips - before))
            batch.tips_removed.extend((tree, store, cid) for cid in sorted(before - tips))
        self.replica.write(batch, self.new.values())
        for cid in self.new:
            if cid not in self.decided:
                self.result.unverified.append(cid)
