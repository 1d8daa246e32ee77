"""The sync ledger: what changes on every exchange, kept in place in the local table.

Cursors (``db, peer -> common tips, last success, last error``), when each peer was last
seen, the last ``HISTORY_LIMIT`` exchanges and running counters change with every exchange.
They used to be signed entries in ``_sync`` (one or two ~900 B entries per exchange, each
fsynced on the event loop), so ``_sync`` grew with traffic. Here they live in memory and
in the storage's ``local`` table (``Instance.local_items`` / ``local_write``, space
``sync``): a record is replaced in place, the history is a ring of ``HISTORY_LIMIT`` rows,
so the table's size follows the number of relationships and peers, not of exchanges.

Writes are batched and off the event loop: changes mark keys dirty; ``run`` (started by
the engine) writes the dirty ones every ``FLUSH_INTERVAL_S`` at most, in one
``local_write`` through the sync offload (a worker thread); ``flush`` writes them now (at
the engine's flush and close). A node killed between flushes loses at most the last
second of bookkeeping (a cursor a little behind means the next exchange sends a few
entries again; both sides dedupe), never a half-written row.

On first open of a data directory written before the ledger (no ``MIGRATED`` marker), the
cursors, history and last-seen times are copied from the ``_sync`` DAG's state, together
with the marker in one write: a node killed during it migrates again at the next open.

Keys (``\\t`` never appears in a database ID or a peer key): ``cursor\\t<db>\\t<peer>``,
``seen\\t<peer>``, ``history\\t<seq>`` (zero-padded, so keys sort by age), ``counters``.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from dag import Database, Instance, StorageError, cid_from_text, cid_to_text

if TYPE_CHECKING:
    from .handler import Offload  # (a type only: the handler imports the state, which imports this)

log = logging.getLogger(__name__)

SPACE = "sync"
MIGRATED = "migrated"  # marker: the _sync DAG's bookkeeping was copied here
HISTORY_LIMIT = 200
FLUSH_INTERVAL_S = 1.0
MAX_ERROR_CHARS = 2_000  # an error kept in a cursor or a history row (a one-line summary of addresses tried)
_CURSOR = "cursor\t"
_SEEN = "seen\t"
_HISTORY = "history\t"
_COUNTERS = "counters"


@dataclass(frozen=True, slots=True)
class Cursor:
    common: tuple[bytes, ...]
    last_sync_ms: int | None
    last_error: str | None


NO_CURSOR = Cursor((), None, None)


class Ledger:
    """Cursors, last-seen times, the bounded history and counters of one node, in memory,
    written back to the local table in batches."""

    def __init__(self, instance: Instance, items: Mapping[str, bytes]) -> None:
        self._instance = instance
        self._cursors: dict[tuple[str, str], Cursor] = {}
        self._seen: dict[str, int] = {}
        self._history: OrderedDict[int, dict[str, Any]] = OrderedDict()  # seq -> row, oldest first
        self.counters: dict[str, int] = {"exchanges": 0, "failed": 0, "sent": 0, "received": 0}
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._flushing = trio.Lock()
        self._load(items)

    @classmethod
    def open(cls, instance: Instance, sync_db: Database | None) -> Ledger:
        """Load the ledger; migrate ``sync_db``'s bookkeeping first if this data directory has none."""
        items = instance.local_items(SPACE)
        if MIGRATED not in items:
            items = _migrated(sync_db) if sync_db is not None else {}
            items[MIGRATED] = b"1"
            instance.local_write(SPACE, items, ())
        return cls(instance, items)

    def _load(self, items: Mapping[str, bytes]) -> None:
        history = []
        for key, raw in items.items():
            try:
                value = json.loads(raw)
                if key.startswith(_CURSOR):
                    db, peer = key[len(_CURSOR) :].split("\t", 1)
                    self._cursors[(db, peer)] = _cursor(value)
                elif key.startswith(_SEEN) and isinstance(value, int):
                    self._seen[key[len(_SEEN) :]] = value
                elif key.startswith(_HISTORY) and isinstance(value, dict):
                    history.append((int(key[len(_HISTORY) :]), value))
                elif key == _COUNTERS and isinstance(value, dict):
                    self.counters.update({k: v for k, v in value.items() if isinstance(v, int)})
            except (ValueError, TypeError) as exc:  # a row this code cannot read is left out, not fatal
                log.warning("sync ledger: unreadable row %r left out: %s", key, exc)
        for seq, row in sorted(history):
            self._history[seq] = row
        while len(self._history) > HISTORY_LIMIT:
            self._drop_oldest()

    # ---- reading ----------------------------------------------------------------------

    def cursor(self, db: str, peer: str) -> Cursor:
        return self._cursors.get((db, peer), NO_CURSOR)

    def last_seen(self, peer: str) -> int | None:
        return self._seen.get(peer)

    def history(self) -> list[dict[str, Any]]:
        """The last ``HISTORY_LIMIT`` exchanges, oldest first."""
        return [dict(row) for row in self._history.values()]

    @property
    def unflushed(self) -> int:
        """Keys changed or deleted since the last flush."""
        return len(self._dirty) + len(self._deleted)

    # ---- recording --------------------------------------------------------------------

    def record(
        self,
        db: str,
        peer: str,
        *,
        now_ms: int,
        common: list[bytes] | None,
        sent: int,
        received: int,
        error: str | None,
    ) -> None:
        """Move the cursor (on success), append a history row, count; in memory until flushed."""
        error = error[:MAX_ERROR_CHARS] if error is not None else None
        old = self.cursor(db, peer)
        self._cursors[(db, peer)] = Cursor(
            tuple(common) if common is not None else old.common,
            now_ms if error is None else old.last_sync_ms,
            error,
        )
        self._mark(f"{_CURSOR}{db}\t{peer}")
        seq = next(reversed(self._history), -1) + 1
        self._history[seq] = {
            "at_ms": now_ms,
            "peer": peer,
            "db": db,
            "sent": sent,
            "received": received,
            "error": error,
        }
        self._mark(_history_key(seq))
        while len(self._history) > HISTORY_LIMIT:
            self._drop_oldest()
        self.counters["exchanges"] += 1
        self.counters["failed"] += error is not None
        self.counters["sent"] += sent
        self.counters["received"] += received
        self._mark(_COUNTERS)

    def saw(self, peer: str, now_ms: int) -> None:
        if self._seen.get(peer) != now_ms:
            self._seen[peer] = now_ms
            self._mark(f"{_SEEN}{peer}")

    def _mark(self, key: str) -> None:
        self._dirty.add(key)
        self._deleted.discard(key)

    def _drop_oldest(self) -> None:
        seq, _row = self._history.popitem(last=False)
        key = _history_key(seq)
        self._dirty.discard(key)
        self._deleted.add(key)

    # ---- writing back -----------------------------------------------------------------

    def _take(self) -> tuple[dict[str, bytes], set[str]]:
        """The dirty rows encoded now (on the caller's thread), and the deleted keys; both cleared."""
        upserts = {key: self._encode(key) for key in self._dirty}
        deletes = self._deleted
        self._dirty, self._deleted = set(), set()
        return upserts, deletes

    def _encode(self, key: str) -> bytes:
        value: Any
        if key.startswith(_CURSOR):
            db, peer = key[len(_CURSOR) :].split("\t", 1)
            cursor = self._cursors[(db, peer)]
            value = _cursor_value(cursor)
        elif key.startswith(_SEEN):
            value = self._seen[key[len(_SEEN) :]]
        elif key.startswith(_HISTORY):
            value = self._history[int(key[len(_HISTORY) :])]
        else:
            value = self.counters
        return json.dumps(value, separators=(",", ":")).encode()

    def _restore(self, upserts: Mapping[str, bytes], deletes: set[str]) -> None:
        """A write failed: mark its keys again (unless changed since), so the next flush retries."""
        self._dirty.update(key for key in upserts if key not in self._deleted)
        self._deleted.update(key for key in deletes if key not in self._dirty)

    async def flush(self, offload: Offload[Any]) -> None:
        """Write every change so far in one ``local_write`` on ``offload``'s thread."""
        async with self._flushing:
            if not self.unflushed:
                return
            upserts, deletes = self._take()
            try:
                await offload(lambda: self._instance.local_write(SPACE, upserts, deletes))
            except StorageError as exc:
                self._restore(upserts, deletes)
                log.warning("sync ledger not written (kept, retried at the next flush): %s", exc)
            except BaseException:
                self._restore(upserts, deletes)
                raise

    def flush_now(self) -> None:
        """Write every change so far on this thread (no engine running: tests, tools)."""
        upserts, deletes = self._take()
        try:
            self._instance.local_write(SPACE, upserts, deletes)
        except BaseException:
            self._restore(upserts, deletes)
            raise

    async def run(self, offload: Offload[Any], *, interval_s: float = FLUSH_INTERVAL_S) -> None:
        """Flush what changed, at most every ``interval_s``, until cancelled."""
        while True:
            await trio.sleep(interval_s)
            if self.unflushed:
                await self.flush(offload)


def _history_key(seq: int) -> str:
    return f"{_HISTORY}{seq:012d}"


def _cursor(value: Any) -> Cursor:
    if not isinstance(value, dict):
        raise TypeError("a cursor is an object")
    common = tuple(cid_from_text(c) for c in value.get("common", []))
    last_sync, error = value.get("last_sync_ms"), value.get("last_error")
    return Cursor(common, last_sync if isinstance(last_sync, int) else None, error if isinstance(error, str) else None)


def _cursor_value(cursor: Cursor) -> dict[str, Any]:
    return {
        "common": [cid_to_text(c) for c in cursor.common],
        "last_sync_ms": cursor.last_sync_ms,
        "last_error": cursor.last_error,
    }


def _migrated(sync_db: Database) -> dict[str, bytes]:
    """The rows of a ledger holding what ``sync_db``'s state says (cursors, history, last seen)."""
    out: dict[str, bytes] = {}

    def put(key: str, value: Any) -> None:
        out[key] = json.dumps(value, separators=(",", ":")).encode()

    for db, peers in sync_db.doc("cursors").to_dict().items():
        for peer, value in peers.items() if isinstance(peers, dict) else ():
            try:
                put(f"{_CURSOR}{db}\t{peer}", _cursor_value(_cursor(value)))
            except (ValueError, TypeError):
                continue
    for peer, record in sync_db.doc("peers").to_dict().items():
        seen = record.get("last_seen_ms") if isinstance(record, dict) else None
        if isinstance(seen, int):
            put(f"{_SEEN}{peer}", seen)
    rows = [row for row in sync_db.table("history").rows().values() if isinstance(row, dict)]
    rows.sort(key=lambda row: row.get("at_ms", 0) if isinstance(row.get("at_ms"), int) else 0)
    for seq, row in enumerate(rows[-HISTORY_LIMIT:]):
        put(_history_key(seq), row)
    return out


__all__ = ["HISTORY_LIMIT", "Cursor", "Ledger"]
