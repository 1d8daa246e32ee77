"""The storage interface and the records that cross it."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple, Protocol

# A Failed entry is not stored: only its ID is kept, in a ban list, so that the same bytes
# are refused at the cost of one lookup and entries depending on it fail without being
# stored. Bounded because anyone who may send entries can make Failed ones: 65,536 IDs
# are ~6 MiB on disk (ID, tree, height, index), the oldest leave first. An ID that left
# the list is only re-verified (and banned again) if it comes back: never accepted.
MAX_BANNED = 65_536


class Status(IntEnum):
    """Where an entry stands. Only local verification moves an entry out of UNVERIFIED.

    FAILED entries are not stored; storage answers FAILED for the IDs on its ban list.
    """

    UNVERIFIED = 0
    VERIFIED = 1
    FAILED = 2


class EntryMeta(NamedTuple):
    """What walks and verification need of an entry, without its bytes.

    ``parents`` and ``settings_view`` are packed binary IDs (see ``ids.join_cids``);
    ``settings_view`` is the `_settings` tips as of this entry, itself included.
    A named tuple rather than a frozen dataclass: one is made per entry stored or
    looked up, and a tuple is built at a third of the cost.
    """

    tree: bytes
    height: int
    status: Status
    parents: bytes
    settings_view: bytes


class EntryRecord(NamedTuple):
    cid: bytes
    meta: EntryMeta
    raw: bytes


@dataclass(slots=True)
class WriteBatch:
    """Everything one commit or one received batch changes; applied all or nothing.

    ``tips_*`` rows are ``(tree, store, cid)`` with store ``""`` for the main DAG;
    ``waits_added`` rows are ``(blocker, child, tree)``: ``child`` cannot be verified
    before ``blocker`` is; they are stamped with ``now`` (seconds), which dates how long
    an Unverified entry has waited. ``banned`` rows are ``(cid, tree, height)`` of Failed
    entries: any stored row of theirs is deleted and the ID goes on the ban list.
    ``removed`` entries are deleted outright (an Unverified entry given up on, or one
    whose bytes were found corrupt): they may arrive again.
    """

    entries: list[EntryRecord] = field(default_factory=list)
    statuses: dict[bytes, tuple[Status, bytes]] = field(default_factory=dict)
    tips_added: list[tuple[bytes, str, bytes]] = field(default_factory=list)
    tips_removed: list[tuple[bytes, str, bytes]] = field(default_factory=list)
    waits_added: list[tuple[bytes, bytes, bytes]] = field(default_factory=list)
    waits_cleared: list[bytes] = field(default_factory=list)
    trees_added: list[bytes] = field(default_factory=list)
    banned: list[tuple[bytes, bytes, int]] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)
    now: float = 0.0

    def __bool__(self) -> bool:
        return bool(
            self.entries
            or self.statuses
            or self.tips_added
            or self.tips_removed
            or self.waits_added
            or self.banned
            or self.removed
        )


class StateHead(NamedTuple):
    """Where a store's checkpoint stands: the packed tips it is the state at, and the
    checkpoint format (``dag/checkpoints.py``) it was written in."""

    tips: bytes
    format: int


class StateRow(NamedTuple):
    """One top-level key of a checkpointed state. ``seq`` sorts rows in the order the fold
    puts the keys; ``order`` is the fold position of the last write to the key; ``value``
    is the encoded value, None once the key was deleted (kept: a later-arriving write
    that orders before the deletion must still lose to it)."""

    seq: bytes
    order: bytes
    value: bytes | None


class Storage(Protocol):
    """A backend. Reads never see a half-applied batch."""

    def get_raw(self, cid: bytes) -> bytes | None: ...

    def get_meta(self, cids: Collection[bytes]) -> dict[bytes, EntryMeta]: ...

    def get_raws(self, cids: Collection[bytes]) -> dict[bytes, bytes]: ...

    def iter_cids(self, tree: bytes, status: Status | None) -> Iterator[bytes]:
        """A tree's entry IDs in (height, cid) order, without their bytes."""
        ...

    def page_entries(
        self, tree: bytes, status: Status, after: tuple[int, bytes] | None, limit: int
    ) -> list[tuple[bytes, int, bytes]]:
        """Up to ``limit`` ``(cid, height, raw)`` of a tree with ``status``, in (height, cid)
        order, starting after the position ``after`` (``(height, cid)``; None: the start)."""
        ...

    def tips(self, tree: bytes, store: str) -> list[bytes]: ...

    def all_tips(self, tree: bytes) -> list[tuple[str, bytes]]:
        """Every ``(store, cid)`` tip row of a tree (store ``""``: the main DAG)."""
        ...

    def trees(self) -> list[bytes]: ...

    def iter_entries(self, tree: bytes, status: Status | None) -> Iterator[tuple[bytes, int, bytes]]:
        """``(cid, height, raw)`` of a tree's entries in (height, cid) order."""
        ...

    def status_counts(self, tree: bytes) -> dict[Status, int]:
        """Stored entries by status; FAILED counts the tree's IDs on the ban list."""
        ...

    def unverified_usage(self, tree: bytes) -> tuple[int, int]:
        """How many Unverified entries of ``tree`` are stored, and their bytes."""
        ...

    def stale_unverified(self, tree: bytes | None, waited_since: float) -> list[bytes]:
        """Unverified entries (of ``tree``, or of all trees) whose every wait is older than
        ``waited_since``: they made no progress since then."""
        ...

    def corrupt(self) -> list[bytes]:
        """IDs whose stored bytes did not hash to them when read (this run or an earlier
        one, until a write removes them): reads treat them as missing."""
        ...

    def check_ids(self) -> int:
        """Hash the stored bytes of entries not checked before; returns how many were checked."""
        ...

    def has_waits(self) -> bool:
        """Whether any stored entry waits for another (cheap: lets ingest skip the lookups)."""
        ...

    def waiting_children(self, blockers: Collection[bytes]) -> list[bytes]: ...

    def waits_in_tree(self, tree: bytes) -> list[tuple[bytes, bytes]]:
        """``(blocker, child)`` pairs for a tree."""
        ...

    def write(self, batch: WriteBatch) -> None: ...

    def get_value(self, key: str) -> bytes | None: ...

    def set_value(self, key: str, value: bytes) -> None: ...

    def delete_value(self, key: str) -> None: ...

    # ---- store checkpoints (dag/checkpoints.py; SQLite: dag/storage/sqlite_states.py) ----
    # Readable from any thread without the replica's lock; written under it.

    def state_head(self, tree: bytes, store: str, kind: str) -> StateHead | None: ...

    def state_rows_for(
        self, tree: bytes, store: str, kind: str, keys: Collection[str]
    ) -> tuple[StateHead | None, dict[str, StateRow]]:
        """The head and the rows (tombstones included) of ``keys``, read together."""
        ...

    def state_snapshot(self, tree: bytes, store: str, kind: str) -> tuple[StateHead | None, dict[str, StateRow]]:
        """The head and every row (tombstones included) in seq order, read together."""
        ...

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
        """Move a checkpoint from ``expected`` to ``head`` with ``rows`` changed, atomically
        (every row replaced if ``replace``); False, nothing written, if it was not at ``expected``."""
        ...

    def close(self) -> None: ...

    def local_items(self, space: str) -> dict[str, bytes]:
        """Every ``key -> value`` this node keeps for itself in ``space`` (not a DAG: unsigned,
        never synced; ``sync.ledger`` keeps its per-exchange bookkeeping here)."""
        ...

    def local_write(self, space: str, upserts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        """Replace ``upserts`` and drop ``deletes`` in ``space``, all or nothing. May skip the
        fsync: a power cut can lose the last writes, never half of one."""
        ...
