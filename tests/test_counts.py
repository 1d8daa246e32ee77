"""Entry counts kept as entries change, not counted on each ``status``.

``status_counts`` and ``unverified_usage`` used to scan every row of a tree (1.26 s at 1M
entries, and the status screen polls them). SQLite now keeps a ``counts`` table by
triggers in each write's transaction and MemoryStorage keeps dicts: these tests check
both stay exact against a plain model and, for SQLite, against a full scan of its rows,
through inserts (new and repeated), status changes, deletions, bans and the ban list's
trim, through an instance's own repairs, and across the migration of a format 2 file.
"""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import pytest

from dag import Instance, SigningKey, Status
from dag.instance import DB_FILE
from dag.storage import sqlite_schema
from dag.storage.base import EntryMeta, EntryRecord, WriteBatch
from dag.storage.memory import MemoryStorage
from dag.storage.sqlite import SqliteStorage
from tests.forge import forge
from tests.histories import history, raws

Model = dict[bytes, tuple[bytes, Status, int]]  # cid -> (tree, status, size) of stored rows


def _scan(path: Path, tree: bytes) -> tuple[dict[Status, int], tuple[int, int]]:
    """What the counts must say, counted the slow way from the rows themselves."""
    with sqlite3.connect(path) as db:
        counts = dict.fromkeys(Status, 0)
        for status, n in db.execute("SELECT status, count(*) FROM entries WHERE tree = ? GROUP BY status", (tree,)):
            counts[Status(status)] += n
        counts[Status.FAILED] += db.execute("SELECT count(*) FROM banned WHERE tree = ?", (tree,)).fetchone()[0]
        usage = db.execute(
            "SELECT count(*), coalesce(sum(length(raw)), 0) FROM entries WHERE tree = ? AND status = 0", (tree,)
        ).fetchone()
    return counts, (usage[0], usage[1])


def _expected(model: Model, banned: dict[bytes, bytes], tree: bytes) -> tuple[dict[Status, int], tuple[int, int]]:
    counts = dict.fromkeys(Status, 0)
    size = 0
    for row_tree, status, length in model.values():
        if row_tree == tree:
            counts[status] += 1
            size += length if status is Status.UNVERIFIED else 0
    counts[Status.FAILED] += sum(1 for t in banned.values() if t == tree)
    return counts, (counts[Status.UNVERIFIED], size)


def _random_batch(rng: random.Random, model: Model, banned: dict[bytes, bytes], trees: list[bytes]) -> WriteBatch:
    """Inserts (some repeated), status changes, removals and bans, as ingest issues them."""
    batch = WriteBatch()
    held = list(model)
    for _ in range(rng.randint(0, 12)):
        if held and rng.random() < 0.2:  # an entry already stored arrives again: ignored
            cid = rng.choice(held)
            tree, status, size = model[cid]
            batch.entries.append(EntryRecord(cid, EntryMeta(tree, 1, status, b"", b""), os.urandom(size)))
            continue
        cid, tree = os.urandom(36), rng.choice(trees)
        status = rng.choice([Status.UNVERIFIED, Status.VERIFIED])
        raw = os.urandom(rng.randint(1, 300))
        batch.entries.append(EntryRecord(cid, EntryMeta(tree, 1, status, b"", b""), raw))
    chosen = rng.sample(held, min(len(held), rng.randint(0, 6)))
    changed, gone, bans = chosen[0::3], chosen[1::3], chosen[2::3]
    for cid in changed:
        batch.statuses[cid] = (rng.choice([Status.UNVERIFIED, Status.VERIFIED]), b"")
    batch.removed = gone
    batch.banned = [(cid, model[cid][0], 1) for cid in bans]
    if rng.random() < 0.3:  # an ID banned without ever being stored
        batch.banned.append((os.urandom(36), rng.choice(trees), 1))
    return batch


def _apply_to_model(batch: WriteBatch, model: Model, banned: dict[bytes, bytes], max_banned: int) -> None:
    for record in batch.entries:
        model.setdefault(record.cid, (record.meta.tree, record.meta.status, len(record.raw)))
    for cid, (status, _view) in batch.statuses.items():
        tree, _old, size = model[cid]
        model[cid] = (tree, status, size)
    for cid in [c for c, _t, _h in batch.banned] + batch.removed:
        model.pop(cid, None)
    for cid, tree, _height in batch.banned:
        banned.setdefault(cid, tree)
    while len(banned) > max_banned:
        del banned[next(iter(banned))]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_counts_follow_every_kind_of_write_in_both_storages(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "counts.sqlite3"
    max_banned = 15  # small, so the oldest IDs leave the list during the run
    sqlite = SqliteStorage(path, synchronous="off", max_banned=max_banned)
    memory = MemoryStorage(max_banned=max_banned)
    trees = [os.urandom(36) for _ in range(3)]
    model: Model = {}
    banned: dict[bytes, bytes] = {}
    try:
        for _ in range(60):
            batch = _random_batch(rng, model, banned, trees)
            sqlite.write(batch)
            memory.write(batch)
            _apply_to_model(batch, model, banned, max_banned)
            for tree in trees:
                counts, usage = _expected(model, banned, tree)
                assert sqlite.status_counts(tree) == counts == memory.status_counts(tree)
                assert sqlite.unverified_usage(tree) == usage == memory.unverified_usage(tree)
        assert len(banned) == max_banned and model  # the run reached the trim
    finally:
        sqlite.close()
    for tree in trees:
        assert _scan(path, tree) == _expected(model, banned, tree)
    reopened = SqliteStorage(path, synchronous="off", max_banned=max_banned)
    try:
        assert all(reopened.status_counts(t) == _scan(path, t)[0] for t in trees)
    finally:
        reopened.close()


def test_a_failed_batch_leaves_the_counts_as_they_were(tmp_path: Path) -> None:
    path = tmp_path / "counts.sqlite3"
    storage = SqliteStorage(path, synchronous="off")
    tree = os.urandom(36)
    good = EntryRecord(os.urandom(36), EntryMeta(tree, 0, Status.UNVERIFIED, b"", b""), b"x" * 10)
    storage.write(WriteBatch(entries=[good]))
    bad = WriteBatch(
        entries=[EntryRecord(os.urandom(36), EntryMeta(tree, 0, Status.VERIFIED, b"", b""), b"y" * 20)],
        statuses={good.cid: ("not a status", b"")},  # type: ignore[dict-item]  # fails after the insert
    )
    with pytest.raises(ValueError):
        storage.write(bad)
    assert storage.status_counts(tree) == {Status.UNVERIFIED: 1, Status.VERIFIED: 0, Status.FAILED: 0}
    assert storage.unverified_usage(tree) == (1, 10)
    storage.close()


def _wait_first(source: Instance) -> tuple[str, list[bytes], bytes]:
    """A database's id, its entries (the child of a write put first, so it waits), a forged entry."""
    db = history(source, 5)
    forged = forge(db, SigningKey.generate(), {"d": {"x": 1}})
    return db.id, raws(db), forged.raw


def test_counts_through_waits_verification_bans_and_repair_at_open(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    db_id, entries, forged = _wait_first(Instance.in_memory())
    with Instance.open(data_dir) as node, Instance.in_memory() as memory:
        tree = node.open_database(node.create_database(name="x").id).root_cid  # another tree alongside
        for target in (node, memory):
            target.put_remote_entries(entries[:1])
            target.put_remote_entries(entries[3:])  # waits for entries 1 and 2: Unverified
        db = node.open_database(db_id)
        assert db.status_counts() == memory.open_database(db_id).status_counts()
        assert db.status_counts() == {"unverified": 3, "verified": 1, "failed": 0}
        assert node.unverified_usage(db.root_cid) == (3, sum(len(r) for r in entries[3:]))
        assert memory.unverified_usage(db.root_cid) == node.unverified_usage(db.root_cid)
        for target in (node, memory):
            target.put_remote_entries(entries[1:3])  # all verify
            target.put_remote_entries([forged])  # signed by a stranger: banned
        assert db.status_counts() == {"unverified": 0, "verified": 6, "failed": 1}
        assert memory.open_database(db_id).status_counts() == db.status_counts()
        assert node.unverified_usage(db.root_cid) == (0, 0) == memory.unverified_usage(db.root_cid)
        root = db.root_cid
        assert _scan(data_dir / DB_FILE, tree)[0][Status.VERIFIED] == 1
    with sqlite3.connect(data_dir / DB_FILE) as raw_db:  # one stored entry's bytes rot on disk
        cid, raw = raw_db.execute(
            "SELECT cid, raw FROM entries WHERE tree = ? ORDER BY height DESC LIMIT 1", (root,)
        ).fetchone()
        raw_db.execute("UPDATE entries SET raw = ? WHERE cid = ?", (raw[:-1] + bytes([raw[-1] ^ 1]), cid))
    import dag.storage.sqlite_integrity as integrity

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(integrity, "_CHECK_OLD_AT_OPEN", 10_000)  # hash every entry at open
        with Instance.open(data_dir) as node:  # repaired at open: the row is removed
            assert node.storage.status_counts(root) == _scan(data_dir / DB_FILE, root)[0]
            assert node.open_database(db_id).status_counts()["verified"] == 5


def _downgrade_to_format_2(path: Path) -> None:
    with sqlite3.connect(path) as db:
        for (trigger,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            db.execute(f"DROP TRIGGER {trigger}")
        db.execute("DROP TABLE counts")
        db.execute("PRAGMA user_version = 2")


def test_a_format_2_file_migrates_and_a_failed_migration_runs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "node"
    db_id, entries, forged = _wait_first(Instance.in_memory())
    with Instance.open(data_dir) as node:
        node.put_remote_entries(entries[:1] + entries[3:] + [forged])
        before = node.open_database(db_id).status_counts()
        root = node.open_database(db_id).root_cid
    assert before == {"unverified": 4, "verified": 1, "failed": 0}  # the forged one waits too
    path = data_dir / DB_FILE
    _downgrade_to_format_2(path)
    # A migration cut short (here by a failing last statement) leaves the file as it was.
    monkeypatch.setattr(sqlite_schema, "_BUILD_COUNTS", sqlite_schema._BUILD_COUNTS + "INSERT INTO nowhere VALUES (1);")
    with pytest.raises(Exception, match="nowhere"):
        Instance.open(data_dir)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'counts'").fetchone()[0] == 0
    monkeypatch.undo()
    with Instance.open(data_dir) as node:  # runs again, whole
        copy = node.open_database(db_id)
        assert copy.status_counts() == before
        assert node.unverified_usage(root) == (4, sum(len(r) for r in entries[3:]) + len(forged))
        node.put_remote_entries(entries[1:3])  # the triggers work from here on: the forged one fails
        assert copy.status_counts() == {"unverified": 0, "verified": 6, "failed": 1}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == sqlite_schema.SCHEMA_VERSION == 3
    assert _scan(path, root)[0] == {Status.UNVERIFIED: 0, Status.VERIFIED: 6, Status.FAILED: 1}
