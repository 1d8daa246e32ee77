"""In-memory storage for tests: the same interface as SQLite, lost on close."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping

from .base import MAX_BANNED, EntryMeta, StateHead, StateRow, Status, WriteBatch


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
        # (head, rows) per store, replaced by one assignment: a reader sees one checkpoint whole.
        self._checkpoints: dict[tuple[bytes, str, str], tuple[StateHead, dict[str, StateRow]]] = {}

        # Kept as entries come, change status and go (and as IDs join or leave the ban
        # list), as SQLite's triggers keep its ``counts`` table: (tree, status) -> (n, bytes).
        self._counts: dict[tuple[bytes, Status], tuple[int, int]] = defaultdict(lambda: (0, 0))
        self._local: dict[str, dict[str, bytes]] = defaultdict(dict)  # space -> key -> value

    def _count(self, tree: bytes, status: Status, n: int, size: int) -> None:
        old_n, old_size = self._counts[(tree, status)]
        self._counts[(tree, status)] = (old_n + n, old_size + size)

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
        return {status: self._counts.get((tree, status), (0, 0))[0] for status in Status}

    def unverified_usage(self, tree: bytes) -> tuple[int, int]:
        return self._counts.get((tree, Status.UNVERIFIED), (0, 0))

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
                self._count(record.meta.tree, record.meta.status, 1, len(record.raw))
        for cid, (status, view) in batch.statuses.items():
            old = self._meta[cid]
            self._meta[cid] = EntryMeta(old.tree, old.height, status, old.parents, view)
            size = len(self._raw[cid])
            self._count(old.tree, old.status, -1, -size)
            self._count(old.tree, status, 1, size)
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
                meta = self._meta.pop(cid, None)
                raw = self._raw.pop(cid, b"")
                if meta is not None:
                    self._count(meta.tree, meta.status, -1, -len(raw))
                self._waited.pop(cid, None)
            dropped = set(gone)
            for children in self._waits.values():
                for child in dropped & children.keys():
                    del children[child]
        for cid, tree, height in batch.banned:
            if cid not in self._banned:
                self._banned[cid] = EntryMeta(tree, height, Status.FAILED, b"", b"")
                self._count(tree, Status.FAILED, 1, 0)
        while len(self._banned) > self._max_banned:
            oldest = self._banned.pop(next(iter(self._banned)))
            self._count(oldest.tree, Status.FAILED, -1, 0)
        for tree in batch.trees_added:
            if tree not in self._trees:
                self._trees.append(tree)

    def get_value(self, key: str) -> bytes | None:
        return self._values.get(key)

    def set_value(self, key: str, value: bytes) -> None:
        self._values[key] = value

    def delete_value(self, key: str) -> None:
        self._values.pop(key, None)

    # ---- store checkpoints ---------------------------------------------------------------

    def state_head(self, tree: bytes, store: str, kind: str) -> StateHead | None:
        found = self._checkpoints.get((tree, store, kind))
        return None if found is None else found[0]

    def state_rows_for(
        self, tree: bytes, store: str, kind: str, keys: Collection[str]
    ) -> tuple[StateHead | None, dict[str, StateRow]]:
        found = self._checkpoints.get((tree, store, kind))
        if found is None:
            return None, {}
        return found[0], {key: found[1][key] for key in keys if key in found[1]}

    def state_snapshot(self, tree: bytes, store: str, kind: str) -> tuple[StateHead | None, dict[str, StateRow]]:
        found = self._checkpoints.get((tree, store, kind))
        if found is None:
            return None, {}
        return found[0], dict(sorted(found[1].items(), key=lambda item: item[1].seq))

    def write_state(
        self,
        tree: bytes,
        store: str,
        kind: str,
        expected: StateHead | None,
        head: StateHead,
        rows: dict[str, StateRow],
        replace: bool,
    ) -> bool:
        where = (tree, store, kind)
        found = self._checkpoints.get(where)
        if (None if found is None else found[0]) != expected:
            return False
        stored = {} if replace or found is None else dict(found[1])
        stored.update(rows)
        self._checkpoints[where] = (head, stored)
        return True

    def close(self) -> None:
        pass

    def local_items(self, space: str) -> dict[str, bytes]:
        return dict(self._local.get(space, {}))

    def local_write(self, space: str, upserts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        rows = self._local[space]
        for key in deletes:
            rows.pop(key, None)
        rows.update(upserts)
