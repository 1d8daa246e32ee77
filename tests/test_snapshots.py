"""Store states saved at close: the first read after a restart replays only what is new."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from dag import Instance, Permission, snapshots
from dag.instance import DB_FILE
from dag.snapshots import PREFIX
from tests.histories import raws


def _count_loads(instance: Instance, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every entry the instance reads from storage from now on."""
    storage = instance.storage
    loads: list[bytes] = []
    original = storage.get_raw

    def counting(cid: bytes) -> bytes | None:
        loads.append(cid)
        return original(cid)

    monkeypatch.setattr(storage, "get_raw", counting)
    return loads


def _grow(db: Any, commits: int, start: int = 0) -> None:
    for i in range(start, start + commits):
        with db.transaction() as txn:
            txn.doc("d").set(f"k{i % 5}", i)
            txn.table("rows").insert({"n": i, "half": i / 2, "tags": ["a", None, True]})


def test_the_first_read_after_reopening_does_not_walk_the_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Instance.open(tmp_path) as instance:
        db = instance.create_database(name="big")
        _grow(db, 300)
        expected_doc, expected_rows = db.doc("d").to_dict(), db.table("rows").rows()
        db_id = db.id
    with Instance.open(tmp_path) as instance:
        assert any(key.startswith(PREFIX) for key in _saved_keys(tmp_path))
        loads = _count_loads(instance, monkeypatch)
        db = instance.open_database(db_id)
        assert db.doc("d").to_dict() == expected_doc
        assert db.table("rows").rows() == expected_rows
        assert list(db.table("rows").rows()) == list(expected_rows)  # in the order the fold made them
        assert len(loads) < 10  # the tips, not 300 entries
        _grow(db, 3, start=300)  # and it goes on from there
        assert db.doc("d").get("k2") == 302


def test_entries_that_arrived_after_the_save_are_replayed_on_top(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = Instance.in_memory()
    db = source.create_database(name="shared")
    with db.transaction() as txn:
        txn.settings().set_global(Permission.write(10))
    _grow(db, 50)
    before = raws(db)
    with Instance.open(tmp_path) as instance:
        instance.put_remote_entries(before)
        assert instance.open_database(db.id).doc("d").get("k4") == 49
    _grow(db, 20, start=50)
    with Instance.open(tmp_path) as instance:
        instance.put_remote_entries([raw for raw in raws(db) if raw not in set(before)])
        loads = _count_loads(instance, monkeypatch)
        copy = instance.open_database(db.id)
        assert copy.doc("d").to_dict() == db.doc("d").to_dict()
        assert len(loads) <= 25  # the 20 new entries (and their tips), not all 72


def test_states_saved_by_another_fold_format_are_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Instance.open(tmp_path) as instance:
        db = instance.create_database(name="x")
        _grow(db, 30)
        expected = db.doc("d").to_dict()
        db_id = db.id
    monkeypatch.setattr(snapshots, "FORMAT", snapshots.FORMAT + 1)
    with Instance.open(tmp_path) as instance:
        loads = _count_loads(instance, monkeypatch)
        assert instance.open_database(db_id).doc("d").to_dict() == expected
        assert len(loads) >= 30  # folded from the history again


def test_a_damaged_saved_state_is_ignored(tmp_path: Path) -> None:
    with Instance.open(tmp_path) as instance:
        db = instance.create_database(name="x")
        _grow(db, 10)
        expected = db.doc("d").to_dict()
        db_id = db.id
    with Instance.open(tmp_path) as instance:
        for key in _saved_keys(tmp_path):
            instance.storage.set_value(key, b"\xff not cbor")
    with Instance.open(tmp_path) as instance:
        assert instance.open_database(db_id).doc("d").to_dict() == expected


def _saved_keys(data_dir: Path) -> list[str]:
    with closing(sqlite3.connect(data_dir / DB_FILE)) as conn:
        rows = conn.execute("SELECT key FROM kv WHERE key LIKE ?", (PREFIX + "%",)).fetchall()
    return [row[0] for row in rows]
