"""The sync ledger: per-exchange bookkeeping kept in place, bounded, written back in batches."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from dag import Instance
from dag.ids import cid_of
from sync.ledger import HISTORY_LIMIT, SPACE, Ledger

DB = "bafydb"


def _cid(n: int) -> bytes:
    return cid_of(bytes([n % 256]))


PEER = "peer-key"


def _record(ledger: Ledger, n: int, *, start_ms: int = 0) -> None:
    for i in range(n):
        ledger.record(DB, PEER, now_ms=start_ms + i, common=[_cid(i)], sent=1, received=2, error=None)


def test_history_is_bounded_in_memory_and_on_disk(tmp_path: Path) -> None:
    instance = Instance.open(tmp_path / "n")
    ledger = Ledger.open(instance, None)
    _record(ledger, HISTORY_LIMIT + 50)
    ledger.flush_now()
    history = ledger.history()
    assert len(history) == HISTORY_LIMIT
    assert history[0]["at_ms"] == 50 and history[-1]["at_ms"] == HISTORY_LIMIT + 49
    stored = [key for key in instance.local_items(SPACE) if key.startswith("history")]
    assert len(stored) == HISTORY_LIMIT
    assert ledger.counters["exchanges"] == HISTORY_LIMIT + 50 and ledger.counters["received"] == 2 * (
        HISTORY_LIMIT + 50
    )
    instance.close()


def test_many_records_are_one_write_off_the_calling_task(tmp_path: Path) -> None:
    instance = Instance.open(tmp_path / "n")
    ledger = Ledger.open(instance, None)
    writes: list[int] = []

    async def offload(function: Callable[[], Any]) -> Any:
        writes.append(len(instance.local_items(SPACE)))
        return await trio.to_thread.run_sync(function)

    async def main() -> None:
        _record(ledger, 40)
        ledger.saw(PEER, 39)
        await ledger.flush(offload)
        await ledger.flush(offload)  # nothing changed since: no write at all

    trio.run(main)
    assert len(writes) == 1  # 40 records and a sighting: one write
    assert len([k for k in instance.local_items(SPACE) if k.startswith("history")]) == 40
    assert len(instance.local_items(SPACE)) > writes[0]
    assert ledger.unflushed == 0
    instance.close()


def test_reopened_ledger_has_what_was_flushed_and_loses_only_the_rest(tmp_path: Path) -> None:
    instance = Instance.open(tmp_path / "n")
    ledger = Ledger.open(instance, None)
    _record(ledger, 3)
    ledger.saw(PEER, 2)
    ledger.flush_now()
    ledger.record(DB, PEER, now_ms=99, common=None, sent=0, received=0, error="peer: no frame for 30 s")
    instance.close()  # as a crash before the next flush: the last record was never written
    reopened_instance = Instance.open(tmp_path / "n")
    reopened = Ledger.open(reopened_instance, None)
    cursor = reopened.cursor(DB, PEER)
    assert cursor.last_sync_ms == 2 and cursor.last_error is None
    assert cursor.common == (_cid(2),)
    assert reopened.last_seen(PEER) == 2
    assert [row["at_ms"] for row in reopened.history()] == [0, 1, 2]
    assert reopened.counters["exchanges"] == 3
    reopened_instance.close()


def test_a_failed_exchange_keeps_the_cursor_and_cuts_a_long_error(tmp_path: Path) -> None:
    instance = Instance.in_memory()
    ledger = Ledger.open(instance, None)
    _record(ledger, 1)
    ledger.record(DB, PEER, now_ms=5, common=None, sent=0, received=0, error="x" * 10_000)
    cursor = ledger.cursor(DB, PEER)
    assert cursor.common == (_cid(0),) and cursor.last_sync_ms == 0
    assert cursor.last_error is not None and len(cursor.last_error) == 2_000
    assert ledger.counters["failed"] == 1
