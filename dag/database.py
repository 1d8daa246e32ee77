"""A database: a handle on one tree, bound to the key that signs its writes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .entry import INDEX_STORE, SETTINGS_STORE, Entry
from .errors import NotFoundError, StoreTypeError
from .ids import cid_from_text, cid_to_text, sorted_cids
from .keys import SigningKey
from .replica import Replica
from .state import DOC, TABLE, StateCache
from .storage.base import Status
from .stores import DOCSTORE_TYPE, TABLE_TYPE, Doc, Settings, Table
from .transaction import Transaction, check_store_name
from .walk import ancestors, first_parent_samples, missing_from
from .writer import Writer


class Database:
    """Reads show the verified frontier unless ``include_unverified=True`` is asked for."""

    def __init__(self, writer: Writer, tree: bytes, signer: SigningKey) -> None:
        self._writer = writer
        self._replica: Replica = writer.replica
        self._tree = tree
        self._signer = signer

    def __repr__(self) -> str:
        return f"Database({self.id})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Database) and other._tree == self._tree

    def __hash__(self) -> int:
        return hash(self._tree)

    @property
    def id(self) -> str:
        return cid_to_text(self._tree)

    @property
    def root_cid(self) -> bytes:
        return self._tree

    @property
    def signer(self) -> SigningKey:
        return self._signer

    @property
    def name(self) -> str | None:
        return self.settings().database_name

    def with_key(self, signer: SigningKey) -> Database:
        """The same database, writing with another key."""
        return Database(self._writer, self._tree, signer)

    # ---- tips -------------------------------------------------------------------------

    def tips(self, *, include_unverified: bool = False) -> list[str]:
        return [cid_to_text(c) for c in self.tip_cids(include_unverified=include_unverified)]

    def tip_cids(self, *, include_unverified: bool = False) -> list[bytes]:
        if include_unverified:
            return sorted(self._replica.unverified_tips(self._tree))
        return sorted(self._replica.tips(self._tree))

    def effective_tips(self) -> list[str]:
        """The tips reads and the next local commit start from: :meth:`tips` less the
        writes whose signer has lost the right to make them since (``dag/authority.py``).
        Sync advertises :meth:`tips`, so such entries still reach every replica."""
        return [cid_to_text(c) for c in sorted(self._replica.effective_tips(self._tree))]

    def store_tips(self, store: str) -> list[str]:
        return [cid_to_text(c) for c in sorted(self._replica.tips(self._tree, store))]

    def _store_tips(self, store: str, include_unverified: bool = False) -> frozenset[bytes]:
        """The tips a read of ``store`` starts from: the effective tips (writes by keys
        revoked since do not show unless someone with rights built on them)."""
        if include_unverified:
            return self._replica.unverified_tips(self._tree, store)
        return self._replica.effective_tips(self._tree, store)

    # ---- reading stores ---------------------------------------------------------------

    def _source(self, store: str, kind: str, include_unverified: bool) -> Any:
        replica, tree = self._replica, self._tree
        if include_unverified:
            cache = StateCache(replica.entry, capacity=4)
            return lambda: cache.state(tree, store, kind, replica.unverified_tips(tree, store))
        if store == SETTINGS_STORE:
            return lambda: replica.current_settings(tree)
        return lambda: replica.states.state(tree, store, kind, replica.effective_tips(tree, store))

    def _row(self, store: str, kind: str, include_unverified: bool) -> Any:
        """One top-level value at a time, from a checkpoint row (Verified reads of user stores)."""
        if include_unverified:
            return None
        replica, tree = self._replica, self._tree
        return lambda key: replica.states.value(tree, store, kind, replica.effective_tips(tree, store), key)

    def store_types(self) -> dict[str, str]:
        """Every user store and its type, from `_index`."""
        index = self._replica.states.state(self._tree, INDEX_STORE, DOC, self._store_tips(INDEX_STORE))
        return {
            name: value["type"]
            for name, value in index.items()
            if isinstance(value, dict) and isinstance(value.get("type"), str)
        }

    def _check_type(self, name: str, wanted: str) -> None:
        check_store_name(name)
        actual = self.store_types().get(name)
        if actual is not None and actual != wanted:
            raise StoreTypeError(name, wanted, actual)

    def doc(self, name: str, *, include_unverified: bool = False) -> Doc:
        self._check_type(name, DOCSTORE_TYPE)
        return Doc(name, self._source(name, DOC, include_unverified), None, self._row(name, DOC, include_unverified))

    def table(self, name: str, *, include_unverified: bool = False) -> Table:
        self._check_type(name, TABLE_TYPE)
        return Table(
            name, self._source(name, TABLE, include_unverified), None, self._row(name, TABLE, include_unverified)
        )

    def settings(self) -> Settings:
        return Settings(SETTINGS_STORE, self._source(SETTINGS_STORE, DOC, False), None)

    # ---- writing ----------------------------------------------------------------------

    def transaction(self) -> Transaction:
        return Transaction(self._writer, self._tree, self._signer)

    # ---- entries, for inspection and for sync -----------------------------------------

    def entry(self, entry_id: str) -> Entry:
        cid = cid_from_text(entry_id)
        meta = self._replica.meta_of(cid)
        entry = self._replica.entry(cid) if meta is not None and meta.tree == self._tree else None
        if entry is None:
            raise NotFoundError(f"entry {entry_id} is not in database {self.id}")
        return entry

    def status_of(self, cid: bytes) -> Status | None:
        meta = self._replica.meta_of(cid)
        return meta.status if meta is not None and meta.tree == self._tree else None

    def status_counts(self) -> dict[str, int]:
        counts = self._replica.storage.status_counts(self._tree)
        return {status.name.lower(): count for status, count in counts.items()}

    def raw_entries(self, status: Status | None = Status.VERIFIED) -> list[tuple[bytes, bytes]]:
        """``(cid, bytes)`` of entries in height order (Verified only by default)."""
        with self._replica.lock:
            return [(cid, raw) for cid, _h, raw in self._replica.storage.iter_entries(self._tree, status)]

    def cids(self, status: Status | None = Status.VERIFIED) -> list[bytes]:
        """Entry IDs in height order (Verified only by default), without their bytes."""
        with self._replica.lock:
            return list(self._replica.storage.iter_cids(self._tree, status))

    def entries_page(
        self, after: tuple[int, bytes] | None, limit: int, status: Status = Status.VERIFIED
    ) -> list[tuple[bytes, int, bytes]]:
        """Up to ``limit`` ``(cid, height, raw)`` in (height, cid) order, after the position
        ``after`` (the ``(height, cid)`` of the last one of the previous page; None: the start).
        Parents come before children, so pages can be sent as they are read."""
        with self._replica.lock:
            return self._replica.storage.page_entries(self._tree, status, after, limit)

    def raws(self, cids: list[bytes]) -> list[bytes]:
        """The bytes of ``cids`` that are in this database, in the order given (missing ones skipped)."""
        found = self.raw_map(cids)
        return [found[c] for c in cids if c in found]

    def raw_map(self, cids: list[bytes]) -> dict[bytes, bytes]:
        """The bytes of each of ``cids`` that is in this database."""
        with self._replica.lock:
            found = self._replica.storage.get_raws(cids)
            metas = self._replica.meta(list(found))
        return {cid: raw for cid, raw in found.items() if metas[cid].tree == self._tree}

    def ancestors(self, tips: Iterable[bytes]) -> set[bytes]:
        return ancestors(self._replica, tips)

    def sample_ancestors(self, tips: Iterable[bytes], *, exact: int, limit: int, max_steps: int) -> list[bytes]:
        """IDs on the first-parent line below each of ``tips``: distances 1..``exact``, then
        doubling; at most ``limit`` in all, each line walked at most ``max_steps`` back.
        Reconciliation sends them so a peer can find a shared entry near the fork."""
        return first_parent_samples(self._replica, tips, exact=exact, limit=limit, max_steps=max_steps)

    def expected_pin(self, parents: Iterable[bytes]) -> list[bytes]:
        """The `_settings` tips an entry on ``parents`` must pin, as ingest checks it."""
        return list(self._replica.expected_pin(parents))

    def missing_from(self, theirs: Iterable[bytes], ours: Iterable[bytes] | None = None) -> list[bytes]:
        """Our Verified entries the holder of ``theirs`` lacks, in height order."""
        return missing_from(self._replica, self._replica.tips(self._tree) if ours is None else ours, theirs)

    def missing_entries(self) -> list[bytes]:
        """IDs that unverified entries wait for and that are not stored at all: ask peers."""
        blockers = sorted_cids(blocker for blocker, _child in self._replica.storage.waits_in_tree(self._tree))
        held = self._replica.meta(blockers)
        return [cid for cid in blockers if cid not in held]

    def raw(self, cid: bytes) -> bytes | None:
        meta = self._replica.meta_of(cid)
        if meta is None or meta.tree != self._tree:
            return None
        return self._replica.storage.get_raw(cid)

    def __len__(self) -> int:
        return sum(self._replica.storage.status_counts(self._tree).values())


__all__ = ["Database"]
