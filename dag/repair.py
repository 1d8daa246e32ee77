"""Putting storage right at open and after corruption: stale waits given up, corrupt rows removed.

Both run straight on storage, at open before any cache over it exists, which is why they
take a ``Storage`` and not the writer; a repair during a run (``Instance.put_remote_entries``)
is followed by resetting every cache of the replica.
"""

from __future__ import annotations

import logging

from .entry import Entry, decode_entry, dependencies_of
from .ingest import IngestLimits
from .replica import MAIN
from .storage.base import Status, Storage, WriteBatch

log = logging.getLogger(__name__)


def purge_stale_unverified(storage: Storage, limits: IngestLimits, now: float) -> int:
    """Remove every Unverified entry that waited past the TTL (at open, before any cache)."""
    stale = storage.stale_unverified(None, now - limits.unverified_ttl_s)
    if stale:
        storage.write(WriteBatch(removed=stale))
    return len(stale)


def repair_corrupt(storage: Storage, now: float) -> int:
    """Treat entries whose stored bytes no longer hash to their ID as missing.

    Run when an instance opens, before any cache exists. The corrupt rows are deleted
    (never banned: the genuine entry may arrive again); everything that depends on them,
    directly or not, goes back to Unverified and waits for them, and the tips are computed
    again over what is still Verified. ``Database.missing_entries()`` then names the
    corrupt entries, and when a peer sends them, the waiting entries verify again as
    usual. Costs one pass over the affected databases (decoding each entry once), only
    when something was found corrupt. Returns how many corrupt entries were removed.
    """
    removed: set[bytes] = set()
    while True:
        corrupt = set(storage.corrupt()) - removed
        if not corrupt:
            return len(removed)
        metas = storage.get_meta(list(corrupt))
        trees = {meta.tree for meta in metas.values() if meta.status is not Status.FAILED}
        batch = WriteBatch(removed=sorted(corrupt), now=now)
        for tree in sorted(trees):
            _demote_dependants(storage, tree, corrupt | removed, batch)
        storage.write(batch)
        log.error("removed %d corrupt entries; what depends on them waits for them again", len(corrupt))
        removed |= corrupt


def _demote_dependants(storage: Storage, tree: bytes, bad: set[bytes], batch: WriteBatch) -> None:
    """Add to ``batch``: the dependants of ``bad`` back to Unverified, waiting; tips recomputed."""
    entries: dict[bytes, Entry] = {}
    for cid, _height, raw in storage.iter_entries(tree, None):  # corrupt rows are skipped
        if cid not in bad:
            entries[cid] = decode_entry(raw)
    statuses = {cid: meta.status for cid, meta in storage.get_meta(list(entries)).items()}
    deps = {cid: dependencies_of(entry) for cid, entry in entries.items()}
    dependants: dict[bytes, list[bytes]] = {}
    for cid, needs in deps.items():
        for dep in needs:
            dependants.setdefault(dep, []).append(cid)
    demoted: set[bytes] = set()
    stack = list(bad)
    while stack:
        for child in dependants.get(stack.pop(), ()):
            if child not in demoted:
                demoted.add(child)
                stack.append(child)
    for cid in sorted(demoted):
        if statuses.get(cid) is Status.VERIFIED:
            batch.statuses[cid] = (Status.UNVERIFIED, b"")
        batch.waits_added.extend((dep, cid, tree) for dep in sorted(deps[cid]) if dep in bad or dep in demoted)
    verified = [cid for cid in entries if statuses.get(cid) is Status.VERIFIED and cid not in demoted]
    members: dict[str, set[bytes]] = {MAIN: set()}
    referenced: dict[str, set[bytes]] = {MAIN: set()}
    for cid in verified:
        entry = entries[cid]
        members[MAIN].add(cid)
        referenced[MAIN].update(entry.parents)
        for node in entry.stores:
            members.setdefault(node.name, set()).add(cid)
            referenced.setdefault(node.name, set()).update(node.parents)
    tips = {(store, cid) for store, cids in members.items() for cid in cids - referenced[store]}
    old = set(storage.all_tips(tree))
    batch.tips_removed.extend((tree, store, cid) for store, cid in sorted(old - tips))
    batch.tips_added.extend((tree, store, cid) for store, cid in sorted(tips - old))
