"""The one way anything is written: under the replica's lock, tips compared, callbacks told.

Database creation, local commits and received entries all read before they write (tips,
settings, what is held), so each holds the lock for its whole read-then-write; the tips
a write moves are announced only once the outermost hold is released, so that a write
callback never runs with the lock held (it may read, commit or sync at will).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import TracebackType

from .entry import Entry
from .replica import MAIN, Replica
from .storage.base import WriteBatch

Notify = Callable[[bytes, frozenset[bytes], frozenset[bytes], bool], None]
"""``notify(tree, tips_before, tips_after, local)``, called after a write moved a tree's tips."""


class Writer:
    """Owns the replica's write side; ``with writer:`` holds the lock for a read-then-write."""

    def __init__(self, replica: Replica, notify: Notify) -> None:
        self.replica = replica
        self._notify = notify
        self._depth = 0
        # (tree, before, after, local) of the writes made in the current outermost hold.
        self._moved: list[tuple[bytes, frozenset[bytes], frozenset[bytes], bool]] = []

    def __enter__(self) -> Replica:
        self.replica.lock.acquire()
        self._depth += 1
        return self.replica

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._depth -= 1
        moved: list[tuple[bytes, frozenset[bytes], frozenset[bytes], bool]] = []
        if self._depth == 0:
            moved, self._moved = self._moved, []
        self.replica.lock.release()
        if exc_type is not None:
            return  # a write that raised afterwards is not announced (nor was it before)
        for tree, before, after, local in moved:
            if before != after:
                self._notify(tree, before, after, local)

    def write(
        self, batch: WriteBatch, decoded: Iterable[Entry] = (), *, local: bool, trees: Iterable[bytes] | None = None
    ) -> None:
        """Apply ``batch`` (inside ``with writer:``); the trees whose tips it moves are
        announced when the hold ends, in the order of ``trees`` if given (by default the
        trees whose main tips the batch changes). ``local``: written here, not received."""
        replica = self.replica
        if trees is None:
            changes = (*batch.tips_added, *batch.tips_removed)
            trees = dict.fromkeys(tree for tree, store, _cid in changes if store == MAIN)
        before = {tree: replica.tips_held(tree) for tree in trees}
        replica.write(batch, decoded)
        for tree, tips in before.items():
            self._moved.append((tree, tips, replica.tips_held(tree), local))
