"""Store states checkpointed as they are written: the first read after a restart replays nothing old."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from dag import Instance, Permission, checkpoints
from dag.instance import DB_FILE
from dag.snapshots import legacy_keys
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
        assert _checkpoint_count(tmp_path) >= 3  # `_index`, "d" and "rows"
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


def test_checkpoints_of_another_format_are_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Instance.open(tmp_path) as instance:
        db = instance.create_database(name="x")
        _grow(db, 30)
        expected = db.doc("d").to_dict()
        db_id = db.id
    monkeypatch.setattr(checkpoints, "FORMAT", checkpoints.FORMAT + 1)
    with Instance.open(tmp_path) as instance:
        loads = _count_loads(instance, monkeypatch)
        assert instance.open_database(db_id).doc("d").to_dict() == expected
        assert len(loads) >= 30  # folded from the history again
    with Instance.open(tmp_path) as instance:
        loads = _count_loads(instance, monkeypatch)
        assert instance.open_database(db_id).doc("d").to_dict() == expected
        assert len(loads) < 10  # and written in the new format


def test_a_damaged_checkpoint_row_is_ignored(tmp_path: Path) -> None:
    with Instance.open(tmp_path) as instance:
        db = instance.create_database(name="x")
        _grow(db, 10)
        expected = db.doc("d").to_dict()
        db_id = db.id
    with closing(sqlite3.connect(tmp_path / DB_FILE)) as conn:
        rows = conn.execute("SELECT key, value FROM state_rows WHERE store = 'd'").fetchall()
        for key, value in rows:  # one bit flipped at the end of each value
            conn.execute("UPDATE state_rows SET value = ? WHERE key = ?", (value[:-1] + bytes([value[-1] ^ 1]), key))
        conn.commit()
        flipped = len(rows)
    assert flipped == 5
    with Instance.open(tmp_path) as instance:
        db = instance.open_database(db_id)
        assert db.doc("d").get("k3") == expected["k3"]
        assert db.doc("d").to_dict() == expected


def test_states_saved_at_close_by_an_older_node_are_dropped(tmp_path: Path) -> None:
    """A data directory of the format before checkpoints: its saved states are not trusted
    as checkpoints (they lack each key's last write), the store is folded once and they go."""
    with Instance.open(tmp_path) as instance:
        db = instance.create_database(name="x")
        _grow(db, 10)
        expected = db.doc("d").to_dict()
        db_id, tree = db.id, db.root_cid
    with closing(sqlite3.connect(tmp_path / DB_FILE)) as conn:
        conn.execute("DELETE FROM state_rows")
        conn.execute("DELETE FROM state_heads")
        for key in legacy_keys(tree, "d", "doc"):
            conn.execute("INSERT INTO kv VALUES (?, ?)", (key, b"old state"))
        conn.commit()
    with Instance.open(tmp_path) as instance:
        assert instance.open_database(db_id).doc("d").to_dict() == expected
    assert _legacy_count(tmp_path) == 0
    assert _checkpoint_count(tmp_path) >= 1


def _checkpoint_count(data_dir: Path) -> int:
    with closing(sqlite3.connect(data_dir / DB_FILE)) as conn:
        count: int = conn.execute("SELECT count(*) FROM state_heads").fetchone()[0]
    return count


def _legacy_count(data_dir: Path) -> int:
    with closing(sqlite3.connect(data_dir / DB_FILE)) as conn:
        count: int = conn.execute("SELECT count(*) FROM kv WHERE key LIKE 'state/%'").fetchone()[0]
    return count
