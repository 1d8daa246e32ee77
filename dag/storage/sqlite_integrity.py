"""Entry bytes against their IDs: an entry's ID is the BLAKE3 hash of its bytes, so a row
whose bytes no longer hash to it is damaged, and is treated as missing, never returned.

The IDs found so are remembered (in memory and in ``kv``) until the entry is removed, so
that the next open repairs them (``dag.repair.repair_corrupt``).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

import blake3

from ..ids import CID_LENGTH

log = logging.getLogger(__name__)

DIGEST_AT = 4  # where the BLAKE3 digest starts in a binary ID (after the CID prefix)
_CORRUPT_KEY = "integrity/corrupt/"  # kv rows naming entries whose bytes did not match their ID
_CHECKED_KEY = "integrity/checked"  # kv row: how far the check at open has hashed
# The check at open hashes at most this many entries: the ones stored since the last open
# first, then older ones round robin. Measured on this machine (2 busy cores): reading and
# hashing all of a 100K-entry database (75 MB of entry bytes) took 0.6 s, 20,000 entries
# 0.12-0.16 s; every entry is checked again anyway whenever it is read.
_CHECK_AT_OPEN = 20_000
_CHECK_OLD_AT_OPEN = 5_000  # older entries checked at each open even after a busy run


class IdCheck:
    """The corrupt IDs of one SQLite file, and the bounded check of its entries at open."""

    def __init__(self, db: sqlite3.Connection, set_value: Callable[[str, bytes], None]) -> None:
        self._db = db
        self._set_value = set_value
        self.corrupt: set[bytes] = set()
        self.corrupt.update(self._marked())

    def intact(self, cid: bytes, raw: bytes) -> bool:
        """Whether ``raw`` hashes to ``cid``; a mismatch is remembered as corrupt.

        (The loops over many rows compare the hash inline and call this only on a mismatch.)
        """
        if blake3.blake3(raw).digest() == cid[DIGEST_AT:]:
            return True
        if cid not in self.corrupt:
            self.corrupt.add(cid)
            log.error("stored entry %s does not match its ID: treated as missing", cid.hex())
            try:
                self._db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (_CORRUPT_KEY + cid.hex(), b""))
            except sqlite3.Error as exc:  # remembered for this run anyway
                log.warning("could not record the corrupt entry: %s", exc)
        return False

    def _marked(self) -> list[bytes]:
        rows = self._db.execute(
            "SELECT key FROM kv WHERE key >= ? AND key < ?", (_CORRUPT_KEY, _CORRUPT_KEY[:-1] + chr(ord("/") + 1))
        )
        found = []
        for (key,) in rows:
            try:
                cid = bytes.fromhex(key[len(_CORRUPT_KEY) :])
            except ValueError:
                continue
            if len(cid) == CID_LENGTH:
                found.append(cid)
        return found

    def check_at_open(self) -> int:
        """Hash the bytes of the entries stored since the last check, and a slice of older ones.

        Reads check every entry they return, so this only finds damage in entries nobody
        reads; it is bounded so that opening a large database stays quick (see
        ``_CHECK_AT_OPEN``), and walks the older entries a slice per open, round robin.
        """
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (_CHECKED_KEY,)).fetchone()
        new_from, old_from = _decode_cursor(bytes(row[0]) if row is not None else b"")
        checked = 0
        last_new = new_from
        for seq, cid, raw in self._db.execute(
            "SELECT seq, cid, raw FROM entries WHERE seq > ? ORDER BY seq LIMIT ?", (new_from, _CHECK_AT_OPEN)
        ):
            self.intact(cid, bytes(raw))
            last_new = seq
            checked += 1
        last_old = old_from
        budget = max(_CHECK_AT_OPEN - checked, _CHECK_OLD_AT_OPEN)
        rows = list(
            self._db.execute(
                "SELECT seq, cid, raw FROM entries WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (old_from, new_from, budget),
            )
        )
        for seq, cid, raw in rows:
            self.intact(cid, bytes(raw))
            last_old = seq
            checked += 1
        if len(rows) < budget:
            last_old = 0  # the older entries were all checked: start over next time
        self._set_value(_CHECKED_KEY, _encode_cursor(last_new, last_old))
        return checked

    def forget(self, cids: list[bytes]) -> None:
        """Entries removed from storage are no longer corrupt here (they may arrive again intact)."""
        done = self.corrupt.intersection(cids)
        if done:
            self.corrupt.difference_update(done)
            self._db.executemany("DELETE FROM kv WHERE key = ?", [(_CORRUPT_KEY + c.hex(),) for c in done])


def _encode_cursor(new: int, old: int) -> bytes:
    return f"{new} {old}".encode("ascii")


def _decode_cursor(value: bytes) -> tuple[int, int]:
    """The integrity check's position: last seq checked among new entries, and among old ones."""
    try:
        new, old = (int(part) for part in value.decode("ascii").split())
    except ValueError:
        return 0, 0
    return max(new, 0), max(old, 0)
