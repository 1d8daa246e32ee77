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

from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import libipld

from .auth import AuthSettings, check_write
from .crdt.doc import DocDelta, apply_doc_delta, decode_doc_delta
from .entry import INDEX_STORE, ROOT_STORE, SETTINGS_STORE, Entry, decode_entry
from .errors import GarbageEntryError, InvalidValueError, PermissionDeniedError
from .ids import cid_to_text, join_cids, split_cids
from .keys import pubkey_to_text
from .replica import MAIN, Replica
from .storage.base import EntryMeta, EntryRecord, Status, WriteBatch
from .verifier import SignatureProcesses

PARALLEL_SIGNATURES_FROM = 64  # below this a thread pool costs more than it saves
SIGNATURE_CHUNK = 100
_RESERVED_NAMES = frozenset({SETTINGS_STORE, INDEX_STORE, ROOT_STORE})  # the "_" stores an entry may write


@dataclass
class PutResult:
    """What one call of ``put_remote_entries`` did."""

    received: int = 0
    duplicates: int = 0
    verified: list[bytes] = field(default_factory=list)  # binary IDs, in the order verified
    failed: dict[str, str] = field(default_factory=dict)  # entry ID (text) -> reason
    unverified: list[bytes] = field(default_factory=list)  # stored, waiting for what they depend on
    trees: set[bytes] = field(default_factory=set)


def _decode_and_check(raws: Sequence[bytes], processes: SignatureProcesses | None) -> tuple[list[Entry], list[bool]]:
    if processes is not None:
        # Decode the chunk, then wait for a worker process without holding the GIL.
        entries = [decode_entry(raw) for raw in raws]
        signed = [(entry, entry.signature) for entry in entries if entry.signature is not None]
        answers = processes.check([(entry.pubkey, entry.signing_message(), sig) for entry, sig in signed])
        valid = {entry.cid: ok for (entry, _sig), ok in zip(signed, answers, strict=True)}
        return entries, [valid.get(entry.cid, False) for entry in entries]
    # One entry at a time, decode then check: the GIL is let go (during the check) every
    # few microseconds, so the thread writing to storage never waits long to get it back.
    entries = []
    checks = []
    for raw in raws:
        entry = decode_entry(raw)
        entries.append(entry)
        checks.append(entry.signature_valid())
    return entries, checks


class PreparedEntries:
    """Remote entries being decoded and signature-checked on a thread pool, ahead of ingest.

    Decoding and Ed25519 checks need nothing but the bytes, so they can start the moment
    a frame arrives, while the previous frame is still being decided and written: the
    pool's threads (PyNaCl releases the GIL while it verifies) keep the other core busy
    instead of waiting for the writer. A malformed entry surfaces when the batch is put,
    as the same error decoding inline would raise, and nothing of the batch is stored.
    """

    def __init__(
        self, raws: Sequence[bytes], pool: ThreadPoolExecutor | None, processes: SignatureProcesses | None = None
    ) -> None:
        self.count = len(raws)
        self._raws: Sequence[bytes] = ()
        self._chunks: list[Future[tuple[list[Entry], list[bool]]]] = []
        if pool is None or len(raws) < PARALLEL_SIGNATURES_FROM:
            self._raws = raws  # decoded inline when put: a pool hand-off costs more here
            return
        for start in range(0, len(raws), SIGNATURE_CHUNK):
            self._chunks.append(pool.submit(_decode_and_check, raws[start : start + SIGNATURE_CHUNK], processes))

    def results(self) -> tuple[list[Entry], dict[bytes, bool]]:
        """The decoded entries in order and the signature checks done so far (by binary ID)."""
        if not self._chunks:
            return [decode_entry(raw) for raw in self._raws], {}
        entries: list[Entry] = []
        valid: dict[bytes, bool] = {}
        for chunk in self._chunks:
            decoded, checks = chunk.result()  # re-raises the first decoding error
            entries.extend(decoded)
            for entry, ok in zip(decoded, checks, strict=True):
                valid[entry.cid] = ok
        return entries, valid

    def cancel(self) -> None:
        """Drop the work not started yet (the batch will not be put)."""
        for chunk in self._chunks:
            chunk.cancel()


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
        self.signatures: dict[bytes, bool] = {}
        self.tips_before: dict[bytes, frozenset[bytes]] = {}
        # Per-batch memos: entries of a batch mostly share a settings view and a writer.
        self._pins: dict[bytes, tuple[bytes, ...]] = {}
        self._may_write: dict[tuple[bytes, tuple[bytes, ...], bytes], str | None] = {}
        self._stored_waits: bool | None = None  # whether storage holds any wait (asked once)

    def run(self, raws: Iterable[bytes] | PreparedEntries, only_tree: bytes | None = None) -> PutResult:
        if not isinstance(raws, PreparedEntries):
            raws = PreparedEntries(list(raws), self.pool)
        decoded, self.signatures = raws.results()  # raises before anything is stored
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
        overlay_meta = replica.overlay_meta
        overlay_entries = replica.overlay_entries
        tips_before = self.tips_before
        unverified = Status.UNVERIFIED
        for cid, entry in self.new.items():
            tree = entry.tree
            if tree not in tips_before:
                tips_before[tree] = replica.tips_held(tree)
            overlay_meta[cid] = EntryMeta(tree, entry.height, unverified, join_cids(entry.parents), b"")
            overlay_entries[cid] = entry
        ordered = sorted(self.new.values(), key=lambda e: (e.height, e.cid))
        written = False
        try:
            self._decide_all(ordered)
            self._finish()
            written = True
        finally:
            replica.end_overlay(written=written)
        return self.result

    # ---- deciding ---------------------------------------------------------------------

    def _load(self, cid: bytes) -> Entry | None:
        return self.new.get(cid) or self.replica.entry_held(cid)

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
        if self._stored_waits is None:
            self._stored_waits = self.replica.storage.has_waits()
        for child in self.replica.storage.waiting_children(settled) if self._stored_waits else ():
            if child not in self.decided and child not in children:
                entry = self._load(child)
                if entry is not None:
                    children[child] = entry
        return sorted(children.values(), key=lambda e: (e.height, e.cid))

    def _dependencies(self, entry: Entry) -> set[bytes]:
        deps = {*entry.parents, *entry.settings_tips}
        for node in entry.stores:
            deps.update(node.parents)
        if entry.root is not None:
            deps.add(entry.root)
        return deps

    def _decide(self, entry: Entry) -> Status:
        blockers = []
        metas: dict[bytes, EntryMeta] = {}
        meta_of = self.replica.meta_of_held
        for dep in sorted(self._dependencies(entry)):
            meta = meta_of(dep)
            status = None if meta is None else meta.status
            if status is Status.FAILED:
                return self._settle(entry, Status.FAILED, f"depends on failed entry {cid_to_text(dep)}")
            if status is not Status.VERIFIED:
                blockers.append(dep)
            elif meta is not None:
                metas[dep] = meta
        if blockers:
            for blocker in blockers:
                self.batch.waits_added.append((blocker, entry.cid, entry.tree))
            return Status.UNVERIFIED
        reason = self._check(entry, metas)
        return self._settle(entry, Status.FAILED if reason else Status.VERIFIED, reason)

    def _settle(self, entry: Entry, status: Status, reason: str | None) -> Status:
        cid = entry.cid
        self.decided[cid] = status
        view = b""
        if status is Status.VERIFIED:
            view = join_cids(self.replica.settings_view(entry))
            self.views[cid] = view
            self._advance_tips(entry)
            self.result.verified.append(cid)
        else:
            self.result.failed[entry.id] = reason or "failed"
        overlay = self.replica.overlay_meta
        meta = overlay.get(cid) or self.replica.meta_of_held(cid)
        if meta is not None:
            overlay[cid] = EntryMeta(meta.tree, meta.height, status, meta.parents, view)
        if cid not in self.new:  # it waited in storage since an earlier batch: update its row
            self.batch.statuses[cid] = (status, view)
            self.batch.waits_cleared.append(cid)
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
            tips = set(self.replica.tips_held(tree, store))
            self.tips[key] = tips
        return tips

    # ---- the checks ------------------------------------------------------------------

    def _check(self, entry: Entry, metas: dict[bytes, EntryMeta]) -> str | None:
        """Why ``entry`` fails, or None when it verifies.

        All its dependencies are Verified; ``metas`` holds their metadata.
        """
        valid = self.signatures.get(entry.cid)
        if not (entry.signature_valid() if valid is None else valid):
            return "signature does not verify"
        stores: dict[str, DocDelta | None] = {}
        try:
            for node in entry.stores:
                name = node.name
                if name[0] == "_":
                    if name not in _RESERVED_NAMES:
                        return f"writes reserved store {name!r}"
                    if name != ROOT_STORE and node.data is not None:
                        stores[name] = decode_doc_delta(libipld.decode_dag_cbor(node.data))
                        continue
                stores[name] = None
        except (ValueError, InvalidValueError, RecursionError) as exc:
            return f"unreadable settings delta: {exc}"
        if entry.is_root:
            return self._check_root(entry, stores)
        tree = entry.tree
        for parent in entry.parents:
            if metas[parent].tree != tree:
                return f"parent {cid_to_text(parent)} belongs to another database"
        expected_height = 1 + max(metas[p].height for p in entry.parents)
        if entry.height != expected_height:
            return f"height is {entry.height}, parents give {expected_height}"
        pin = self._expected_pin(entry.parents, metas)
        if entry.settings_tips != pin:
            return "settings pin is not the settings tips of its parents"
        for node in entry.stores:
            own_height = entry.height if node.height_override is None else node.height_override
            for parent in node.parents:
                parent_entry = self._load(parent)
                if parent_entry is None or parent_entry.tree != tree or parent_entry.store(node.name) is None:
                    return f"store parent {cid_to_text(parent)} is not in store {node.name!r}"
                if parent_entry.store_height(node.name) >= own_height:
                    return f"store {node.name!r} height does not increase"
            if node.name == SETTINGS_STORE and node.parents != pin:
                return "settings parents are not the settings tips of its parents"
        if SETTINGS_STORE in stores:
            return self._write_refusal(tree, pin, entry.pubkey, stores)
        # Without a settings change the answer depends only on the settings and the key.
        key = (tree, pin, entry.pubkey)
        if key not in self._may_write:
            self._may_write[key] = self._write_refusal(tree, pin, entry.pubkey, stores)
        return self._may_write[key]

    def _write_refusal(
        self, tree: bytes, pin: tuple[bytes, ...], pubkey: bytes, stores: dict[str, DocDelta | None]
    ) -> str | None:
        try:
            check_write(self.replica.auth_at_held(tree, frozenset(pin)), pubkey_to_text(pubkey), stores)
        except PermissionDeniedError as exc:
            return str(exc)
        return None

    def _expected_pin(self, parents: tuple[bytes, ...], metas: dict[bytes, EntryMeta]) -> tuple[bytes, ...]:
        """The `_settings` tips over ``parents``' closure (``Replica.expected_pin``).

        With one parent that is its own settings view, which is already sorted and has no
        entry below another: the common case is a dictionary lookup.
        """
        if len(parents) != 1:
            return self.replica.expected_pin_held(parents, self.views)
        parent = parents[0]
        view = self.views.get(parent)
        if view is None:
            view = metas[parent].settings_view
        pin = self._pins.get(view)
        if pin is None:
            pin = self._pins[view] = tuple(split_cids(view))
        return pin

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
        # New entries carry their final status (kept in the overlay) in the insert itself.
        overlay = self.replica.overlay_meta
        batch.entries = [EntryRecord(cid, overlay[cid], entry.raw) for cid, entry in self.new.items()]
        decided = set(self.decided)
        batch.waits_added = [w for w in batch.waits_added if w[1] not in decided]
        for (tree, store), tips in self.tips.items():
            before = self.replica.tips_held(tree, store)
            batch.tips_added.extend((tree, store, cid) for cid in sorted(tips - before))
            batch.tips_removed.extend((tree, store, cid) for cid in sorted(before - tips))
        self.replica.write(batch, self.new.values())
        for cid in self.new:
            if cid not in self.decided:
                self.result.unverified.append(cid)
