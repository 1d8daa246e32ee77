"""In-memory storage for tests: the same interface as SQLite, lost on close."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping

from .base import MAX_BANNED, EntryMeta, Status, WriteBatch


class MemoryStorage:
    """Nothing here reaches a disk, so stored bytes are not re-hashed on read."""

    def __init__(self, *, max_banned: int = MAX_BANNED) -> None:
        self._meta: dict[bytes, EntryMeta] = {}
        self._raw: dict[bytes, bytes] = {}
        self._tips: dict[tuple[bytes, str], set[bytes]] = defaultdict(set)
        self._waits: dict[bytes, dict[bytes, bytes]] = defaultdict(dict)  # blocker -> child -> tree
        self._waited: dict[bytes, float] = {}  # child -> when it last got a new wait
        self._banned: dict[bytes, EntryMeta] = {}  # insertion order: oldest first
        self._max_banned = max_banned
        self._trees: list[bytes] = []
        self._values: dict[str, bytes] = {}
        self._local: dict[str, dict[str, bytes]] = defaultdict(dict)  # space -> key -> value

    def get_raw(self, cid: bytes) -> bytes | None:
        return self._raw.get(cid)

    def get_meta(self, cids: Collection[bytes]) -> dict[bytes, EntryMeta]:
        found = {cid: self._meta[cid] for cid in cids if cid in self._meta}
        if self._banned and len(found) < len(cids):
            found.update((cid, self._banned[cid]) for cid in cids if cid in self._banned)
        return found

    def get_raws(self, cids: Collection[bytes]) -> dict[bytes, bytes]:
        return {cid: self._raw[cid] for cid in cids if cid in self._raw}

    def iter_cids(self, tree: bytes, status: Status | None) -> Iterator[bytes]:
        for cid, _height, _raw in self.iter_entries(tree, status):
            yield cid

    def page_entries(
        self, tree: bytes, status: Status, after: tuple[int, bytes] | None, limit: int
    ) -> list[tuple[bytes, int, bytes]]:
        rows = sorted(
            (meta.height, cid)
            for cid, meta in self._meta.items()
            if meta.tree == tree and meta.status == status and (after is None or (meta.height, cid) > after)
        )
        return [(cid, height, self._raw[cid]) for height, cid in rows[:limit]]

    def tips(self, tree: bytes, store: str) -> list[bytes]:
        return sorted(self._tips.get((tree, store), ()))

    def all_tips(self, tree: bytes) -> list[tuple[str, bytes]]:
        return sorted((store, cid) for (t, store), cids in self._tips.items() if t == tree for cid in cids)

    def trees(self) -> list[bytes]:
        return list(self._trees)

    def iter_entries(self, tree: bytes, status: Status | None) -> Iterator[tuple[bytes, int, bytes]]:
        rows = [
            (meta.height, cid)
            for cid, meta in self._meta.items()
            if meta.tree == tree and (status is None or meta.status == status)
        ]
        for height, cid in sorted(rows):
            yield cid, height, self._raw[cid]

    def status_counts(self, tree: bytes) -> dict[Status, int]:
        counts = dict.fromkeys(Status, 0)
        for meta in self._meta.values():
            if meta.tree == tree:
                counts[meta.status] += 1
        counts[Status.FAILED] += sum(1 for meta in self._banned.values() if meta.tree == tree)
        return counts

    def unverified_usage(self, tree: bytes) -> tuple[int, int]:
        sizes = [
            len(self._raw[cid])
            for cid, meta in self._meta.items()
            if meta.tree == tree and meta.status is Status.UNVERIFIED
        ]
        return len(sizes), sum(sizes)

    def stale_unverified(self, tree: bytes | None, waited_since: float) -> list[bytes]:
        return sorted(
            cid
            for cid, meta in self._meta.items()
            if meta.status is Status.UNVERIFIED
            and (tree is None or meta.tree == tree)
            and self._waited.get(cid, 0.0) < waited_since
        )

    def corrupt(self) -> list[bytes]:
        return []

    def check_ids(self) -> int:
        return 0

    def has_waits(self) -> bool:
        return any(self._waits.values())

    def waiting_children(self, blockers: Collection[bytes]) -> list[bytes]:
        return sorted({child for blocker in blockers for child in self._waits.get(blocker, {})})

    def waits_in_tree(self, tree: bytes) -> list[tuple[bytes, bytes]]:
        return sorted(
            (blocker, child) for blocker, children in self._waits.items() for child, t in children.items() if t == tree
        )

    def write(self, batch: WriteBatch) -> None:
        # Nothing below can fail half-way: all inputs were built by the core.
        for record in batch.entries:
            if record.cid not in self._meta:
                self._meta[record.cid] = record.meta
                self._raw[record.cid] = record.raw
        for cid, (status, view) in batch.statuses.items():
            old = self._meta[cid]
            self._meta[cid] = EntryMeta(old.tree, old.height, status, old.parents, view)
        for tree, store, cid in batch.tips_removed:
            self._tips[(tree, store)].discard(cid)
        for tree, store, cid in batch.tips_added:
            self._tips[(tree, store)].add(cid)
        if batch.waits_cleared:
            cleared = set(batch.waits_cleared)
            for children in self._waits.values():
                for child in cleared & children.keys():
                    del children[child]
            for child in cleared:
                self._waited.pop(child, None)
        for blocker, child, tree in batch.waits_added:
            if child not in self._waits[blocker]:
                self._waits[blocker][child] = tree
                self._waited[child] = batch.now
        gone = [cid for cid, _tree, _height in batch.banned] + batch.removed
        if gone:
            for cid in gone:
                self._meta.pop(cid, None)
                self._raw.pop(cid, None)
                self._waited.pop(cid, None)
            dropped = set(gone)
            for children in self._waits.values():
                for child in dropped & children.keys():
                    del children[child]
        for cid, tree, height in batch.banned:
            self._banned.setdefault(cid, EntryMeta(tree, height, Status.FAILED, b"", b""))
        while len(self._banned) > self._max_banned:
            del self._banned[next(iter(self._banned))]
        for tree in batch.trees_added:
            if tree not in self._trees:
                self._trees.append(tree)

    def get_value(self, key: str) -> bytes | None:
        return self._values.get(key)

    def set_value(self, key: str, value: bytes) -> None:
        self._values[key] = value

    def close(self) -> None:
        pass

    def local_items(self, space: str) -> dict[str, bytes]:
        return dict(self._local.get(space, {}))

    def local_write(self, space: str, upserts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        rows = self._local[space]
        for key in deletes:
            rows.pop(key, None)
        rows.update(upserts)
