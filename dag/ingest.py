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
6. Only what can still become Verified takes disk space. A Failed entry is not stored: its
   ID goes on storage's bounded ban list, so the same bytes are refused with one lookup and
   entries depending on it fail without being stored. Unverified entries are bounded per
   database (``IngestLimits``): past the cap, the new Unverified entries of a batch are
   not kept (``PutResult.refused``) after the ones that waited longer than the TTL are
   given up on. Refusing the newcomers rather than evicting the oldest keeps one flood
   from pushing out entries that are about to verify; the TTL frees the room again, and a
   peer that holds a refused entry sends it again in a later sync.
7. A store height override must lie above its store parents' heights and at most at the
   entry's own height: otherwise one entry could set a store's height out of reach
   (2^63-1) and every honest entry after it would fail everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .checks import EntryChecks
from .entry import Entry, dependencies_of
from .errors import GarbageEntryError
from .ids import cid_to_text, join_cids
from .prepared import PreparedEntries
from .replica import MAIN, Replica
from .storage.base import EntryMeta, EntryRecord, Status, WriteBatch
from .writer import Writer

log = logging.getLogger(__name__)

# Unverified entries kept per database. Honest sync sends parents before children, so
# entries wait only briefly and few at a time (a frame's worth while the one before it is
# put); anyone who may send entries can make entries that wait forever, so the room is
# bounded. 10,000 entries is five full answer frames; 64 MiB is what a node may hold of
# data it cannot read yet, per database (16 maximum-size entries).
MAX_UNVERIFIED_ENTRIES = 10_000
MAX_UNVERIFIED_BYTES = 64 * 1024 * 1024
# An Unverified entry that got no closer to Verified (nothing it waits for arrived) in this
# long is given up on: what it waits for was never sent. An hour spans many sync rounds
# (the engine syncs every few seconds to minutes), and a peer holding it sends it again.
UNVERIFIED_TTL_S = 3600.0
BANNED_AGAIN = "failed here before (its ID is on the ban list)"


@dataclass(frozen=True)
class IngestLimits:
    """How much a database keeps of entries that are not Verified yet (see invariant 6)."""

    max_unverified_entries: int = MAX_UNVERIFIED_ENTRIES
    max_unverified_bytes: int = MAX_UNVERIFIED_BYTES
    unverified_ttl_s: float = UNVERIFIED_TTL_S


@dataclass
class PutResult:
    """What one call of ``put_remote_entries`` did."""

    received: int = 0
    duplicates: int = 0
    verified: list[bytes] = field(default_factory=list)  # binary IDs, in the order verified
    failed: dict[str, str] = field(default_factory=dict)  # entry ID (text) -> reason; not stored
    unverified: list[bytes] = field(default_factory=list)  # stored, waiting for what they depend on
    trees: set[bytes] = field(default_factory=set)
    # Would have waited, but the database's room for Unverified entries is full: not
    # stored (entry ID (text) -> reason). Counted neither in ``unverified`` nor in ``failed``.
    refused: dict[str, str] = field(default_factory=dict)


def _loader(new: dict[bytes, Entry], replica: Replica) -> Callable[[bytes], Entry | None]:
    """An entry of the batch or a stored one."""

    def load(cid: bytes) -> Entry | None:
        return new.get(cid) or replica.entry_held(cid)

    return load


class Ingest:
    """One batch of remote entries on its way into storage."""

    def __init__(
        self,
        writer: Writer,
        pool: ThreadPoolExecutor | None,
        *,
        limits: IngestLimits | None = None,
        now: float = 0.0,
    ) -> None:
        self.writer = writer
        self.replica = writer.replica
        self.pool = pool
        self.limits = limits or IngestLimits()
        self.now = now
        self.batch = WriteBatch()
        self.result = PutResult()
        self.new: dict[bytes, Entry] = {}  # decoded entries of this batch, not yet stored
        self.decided: dict[bytes, Status] = {}
        self.views: dict[bytes, bytes] = {}
        self.tips: dict[tuple[bytes, str], set[bytes]] = {}
        self.trees: dict[bytes, None] = {}  # the trees of the new entries, in their order
        # The loader closes over the batch's entries and the replica, not over ``self``: a
        # bound method here would make a reference cycle, and every batch's decoded entries
        # would then wait for the cyclic collector (+50 MiB at the peak of a 100K bootstrap).
        self._checks = EntryChecks(self.replica, _loader(self.new, self.replica), {}, self.views)
        self._stored_waits: bool | None = None  # whether storage holds any wait (asked once)

    def run(self, raws: Iterable[bytes] | PreparedEntries, only_tree: bytes | None = None) -> PutResult:
        """Decide and store the batch in one hold of the writer (see the invariants above)."""
        if not isinstance(raws, PreparedEntries):
            raws = PreparedEntries(list(raws), self.pool)
        decoded, self._checks.signatures = raws.results()  # raises before anything is stored
        with self.writer:
            return self._run(decoded, only_tree)

    def _run(self, decoded: list[Entry], only_tree: bytes | None) -> PutResult:
        if only_tree is not None:
            for entry in decoded:
                if entry.tree != only_tree:
                    raise GarbageEntryError(f"entry {entry.id} belongs to another database")
        self.result.received = len(decoded)
        unique: dict[bytes, Entry] = {}
        for entry in decoded:
            unique.setdefault(entry.cid, entry)
        banned_again = self._sort_known(unique)
        self.result.duplicates = len(decoded) - len(self.new) - banned_again
        if not self.new:
            return self.result
        replica = self.replica
        overlay_meta = replica.overlay_meta
        overlay_entries = replica.overlay_entries
        trees = self.trees
        unverified = Status.UNVERIFIED
        for cid, entry in self.new.items():
            tree = entry.tree
            trees[tree] = None
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

    def _sort_known(self, unique: dict[bytes, Entry]) -> int:
        """Put the entries not held yet in ``self.new``; report banned ones as failed.

        An entry the caches remember as Unverified may have been given up on since (see
        ``_admit``): storage is asked again, and one that is gone is taken as new.
        """
        known = self.replica.meta(list(unique))
        maybe_gone = [cid for cid, meta in known.items() if meta.status is Status.UNVERIFIED]
        if maybe_gone:
            held = self.replica.storage.get_meta(maybe_gone)
            for cid in maybe_gone:
                if cid not in held:
                    del known[cid]
        banned_again = 0
        for cid, entry in unique.items():
            meta = known.get(cid)
            if meta is None:
                self.new[cid] = entry
            elif meta.status is Status.FAILED:
                self.result.failed[entry.id] = BANNED_AGAIN
                banned_again += 1
        return banned_again

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

    def _decide(self, entry: Entry) -> Status:
        blockers = []
        metas: dict[bytes, EntryMeta] = {}
        meta_of = self.replica.meta_of_held
        for dep in sorted(dependencies_of(entry)):
            meta = meta_of(dep)
            status = None if meta is None else meta.status
            if status is Status.FAILED:
                return self._settle(entry, Status.FAILED, f"depends on failed entry {cid_to_text(dep)}")
            if status is not Status.VERIFIED:
                blockers.append(dep)
            elif meta is not None:
                metas[dep] = meta
        corrupt = self.replica.storage.corrupt()
        if corrupt:
            blockers.extend(dep for dep in corrupt if dep in metas)
        if blockers:
            for blocker in blockers:
                self.batch.waits_added.append((blocker, entry.cid, entry.tree))
            return Status.UNVERIFIED
        reason = self._checks.refusal(entry, metas)
        if reason is not None and len(self.replica.storage.corrupt()) > len(corrupt):
            return self._wait_for_corrupt(entry)
        return self._settle(entry, Status.FAILED if reason else Status.VERIFIED, reason)

    def _wait_for_corrupt(self, entry: Entry) -> Status:
        """Checking ``entry`` met stored bytes that do not match their ID (read as missing):
        a refusal then may rest on what is missing, and a Failed entry is banned for good.
        It waits instead, for the corrupt entries of its database (the next open repairs
        them: see ``repair_corrupt``)."""
        corrupt = self.replica.storage.corrupt()
        metas = [self.replica.meta_of_held(cid) for cid in corrupt]
        mine = [cid for cid, meta in zip(corrupt, metas, strict=True) if meta is not None and meta.tree == entry.tree]
        for cid in mine or corrupt:
            self.batch.waits_added.append((cid, entry.cid, entry.tree))
        return Status.UNVERIFIED

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
            self.batch.banned.append((cid, entry.tree, entry.height))  # not stored: banned
        overlay = self.replica.overlay_meta
        meta = overlay.get(cid) or self.replica.meta_of_held(cid)
        if meta is not None:
            overlay[cid] = EntryMeta(meta.tree, meta.height, status, meta.parents, view)
        if cid not in self.new:  # it waited in storage since an earlier batch: update its row
            self.batch.statuses[cid] = (status, view)  # (a Failed one's row is deleted)
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

    # ---- finishing -------------------------------------------------------------------

    def _finish(self) -> None:
        batch = self.batch
        decided = self.decided
        waiting = [entry for cid, entry in self.new.items() if cid not in decided]
        refused = self._admit(waiting) if waiting else set()
        # New entries carry their final status (kept in the overlay) in the insert itself;
        # Failed ones are not stored (they are on batch.banned), nor refused ones.
        overlay = self.replica.overlay_meta
        kept = [
            entry
            for cid, entry in self.new.items()
            if decided.get(cid, Status.UNVERIFIED) is not Status.FAILED and cid not in refused
        ]
        batch.entries = [EntryRecord(entry.cid, overlay[entry.cid], entry.raw) for entry in kept]
        batch.waits_added = [w for w in batch.waits_added if w[1] not in decided and w[1] not in refused]
        batch.now = self.now
        for (tree, store), tips in self.tips.items():
            before = self.replica.tips_held(tree, store)
            batch.tips_added.extend((tree, store, cid) for cid in sorted(tips - before))
            batch.tips_removed.extend((tree, store, cid) for cid in sorted(before - tips))
        self.writer.write(batch, kept, local=False, trees=self.trees)
        for entry in waiting:
            if entry.cid not in refused:
                self.result.unverified.append(entry.cid)

    def _admit(self, waiting: list[Entry]) -> set[bytes]:
        """The new Unverified entries there is no room for (see invariant 6), lowest first kept."""
        limits = self.limits
        storage = self.replica.storage
        by_tree: dict[bytes, list[Entry]] = {}
        for entry in waiting:
            by_tree.setdefault(entry.tree, []).append(entry)
        refused: set[bytes] = set()
        for tree, entries in by_tree.items():
            count, size = storage.unverified_usage(tree)
            wanted = sum(len(entry.raw) for entry in entries)
            over = count + len(entries) > limits.max_unverified_entries or size + wanted > limits.max_unverified_bytes
            if over and self._give_up_stale(tree):
                count, size = storage.unverified_usage(tree)
            for entry in sorted(entries, key=lambda e: (e.height, e.cid)):
                if count + 1 > limits.max_unverified_entries or size + len(entry.raw) > limits.max_unverified_bytes:
                    refused.add(entry.cid)
                    self.result.refused[entry.id] = (
                        f"not kept: database {cid_to_text(tree)} holds {count} unverified entries ({size} bytes);"
                        f" the limit is {limits.max_unverified_entries} entries, {limits.max_unverified_bytes} bytes"
                    )
                    continue
                count += 1
                size += len(entry.raw)
        return refused

    def _give_up_stale(self, tree: bytes) -> int:
        """Remove the tree's Unverified entries that waited past the TTL; how many went."""
        busy = self.decided.keys() | {child for _blocker, child, _tree in self.batch.waits_added}
        stale = [
            cid
            for cid in self.replica.storage.stale_unverified(tree, self.now - self.limits.unverified_ttl_s)
            if cid not in busy
        ]
        if stale:
            # A write of its own, before the batch: removing them is right whatever the batch does.
            self.writer.write(WriteBatch(removed=stale), local=False)
            log.info("gave up on %d unverified entries of %s that waited too long", len(stale), cid_to_text(tree))
        return len(stale)
