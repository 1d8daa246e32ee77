"""The storage interface and the records that cross it."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple, Protocol


class Status(IntEnum):
    """Where an entry stands. Only local verification moves an entry out of UNVERIFIED."""

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
    before ``blocker`` is.
    """

    entries: list[EntryRecord] = field(default_factory=list)
    statuses: dict[bytes, tuple[Status, bytes]] = field(default_factory=dict)
    tips_added: list[tuple[bytes, str, bytes]] = field(default_factory=list)
    tips_removed: list[tuple[bytes, str, bytes]] = field(default_factory=list)
    waits_added: list[tuple[bytes, bytes, bytes]] = field(default_factory=list)
    waits_cleared: list[bytes] = field(default_factory=list)
    trees_added: list[bytes] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.entries or self.statuses or self.tips_added or self.tips_removed or self.waits_added)


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

    def trees(self) -> list[bytes]: ...

    def iter_entries(self, tree: bytes, status: Status | None) -> Iterator[tuple[bytes, int, bytes]]:
        """``(cid, height, raw)`` of a tree's entries in (height, cid) order."""
        ...

    def status_counts(self, tree: bytes) -> dict[Status, int]: ...

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

    def close(self) -> None: ...
