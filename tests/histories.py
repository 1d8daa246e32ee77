"""Small histories for tests: a database with some commits, and its entries' bytes."""

from __future__ import annotations

from dag import Database, Instance


def history(instance: Instance, commits: int, *, keys: int | None = None, name: str = "src") -> Database:
    """A database of ``commits`` one-key writes to Doc ``d`` (over ``keys`` distinct keys, or one each)."""
    db = instance.create_database(name=name)
    for i in range(commits):
        with db.transaction() as txn:
            txn.doc("d").set(f"k{i if keys is None else i % keys}", i)
    return db


def raws(db: Database) -> list[bytes]:
    """Every entry of ``db`` as bytes, in storage order."""
    return [raw for _cid, raw in db.raw_entries()]
