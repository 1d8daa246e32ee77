"""Doc and Table semantics, store types, transactions."""

from __future__ import annotations

import math

import pytest

from dag import Instance, InvalidValueError, StoreTypeError, TransactionError


def test_doc_nested_paths_and_read_your_writes(instance: Instance) -> None:
    db = instance.create_database(name="d")
    with db.transaction() as txn:
        doc = txn.doc("profile")
        doc.set("user.name", "ada")
        doc.set("user.langs", ["en", "fr"])
        assert doc.get("user.name") == "ada"
        assert doc.get("user") == {"name": "ada", "langs": ["en", "fr"]}
        assert "user.name" in doc and "user.age" not in doc
    assert db.doc("profile").to_dict() == {"user": {"name": "ada", "langs": ["en", "fr"]}}


def test_doc_update_merges_and_set_replaces(instance: Instance) -> None:
    db = instance.create_database()
    with db.transaction() as txn:
        txn.doc("d").set("cfg", {"a": 1, "b": 2})
    with db.transaction() as txn:
        txn.doc("d").update("cfg", {"c": 3})
    assert db.doc("d").get("cfg") == {"a": 1, "b": 2, "c": 3}
    with db.transaction() as txn:
        txn.doc("d").set("cfg", {"z": 0})
    assert db.doc("d").get("cfg") == {"z": 0}


def test_doc_delete_and_write_below_a_deleted_key(instance: Instance) -> None:
    db = instance.create_database()
    with db.transaction() as txn:
        txn.doc("d").set("a", {"x": 1, "y": 2})
        txn.doc("d").set("keep", True)
    with db.transaction() as txn:
        doc = txn.doc("d")
        doc.delete("a")
        assert doc.get("a") is None
        doc.set("a.z", 3)
        assert doc.get("a") == {"z": 3}
    assert db.doc("d").to_dict() == {"a": {"z": 3}, "keep": True}


def test_values_handed_out_are_copies(instance: Instance) -> None:
    db = instance.create_database()
    with db.transaction() as txn:
        txn.doc("d").set("list", [1, 2])
    value = db.doc("d").get("list")
    value.append(3)
    assert db.doc("d").get("list") == [1, 2]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("", 1, r"^a path is non-empty text$"),
        ("a..b", 1, r"empty segment"),
        ("a", math.nan, r"NaN"),
        ("a", b"bytes", r"bytes cannot be stored"),
        ("a", {"": 1}, r"non-empty text"),
        ("a", 2**64, r"64-bit"),
    ],
)
def test_invalid_values_are_refused(instance: Instance, path: str, value: object, message: str) -> None:
    db = instance.create_database()
    with pytest.raises(InvalidValueError, match=message), db.transaction() as txn:
        txn.doc("d").set(path, value)
    assert db.doc("d").to_dict() == {}


def test_table_rows(instance: Instance) -> None:
    db = instance.create_database()
    with db.transaction() as txn:
        todos = txn.table("todos")
        a = todos.insert({"title": "milk", "done": False})
        b = todos.insert({"title": "eggs"})
        assert todos.get(a) == {"title": "milk", "done": False}
    with db.transaction() as txn:
        txn.table("todos").set(a, {"title": "milk", "done": True})
        txn.table("todos").delete(b)
    table = db.table("todos")
    assert table.rows() == {a: {"title": "milk", "done": True}}
    assert table.search(lambda row: row.get("done") is True) == {a: {"title": "milk", "done": True}}
    assert len(a) == 36 and a.count("-") == 4


def test_store_types_are_enforced(instance: Instance) -> None:
    db = instance.create_database()
    with db.transaction() as txn:
        txn.doc("notes").set("a", 1)
        txn.table("todos").insert({"x": 1})
    assert db.store_types() == {"notes": "docstore:v0", "todos": "table:v0"}
    with pytest.raises(StoreTypeError, match=r"^store 'notes' is a docstore:v0, not a table:v0$"):
        db.table("notes")
    with pytest.raises(StoreTypeError), db.transaction() as txn:
        txn.doc("todos")
    with db.transaction() as txn:
        txn.doc("fresh")
        with pytest.raises(StoreTypeError):
            txn.table("fresh")


def test_reserved_store_names(instance: Instance) -> None:
    db = instance.create_database()
    with pytest.raises(InvalidValueError, match=r"reserved"), db.transaction() as txn:
        txn.doc("_settings")


def test_failed_transaction_writes_nothing(instance: Instance) -> None:
    db = instance.create_database()
    tips = db.tips()
    with pytest.raises(RuntimeError), db.transaction() as txn:
        txn.doc("d").set("a", 1)
        raise RuntimeError("boom")
    assert db.tips() == tips
    assert db.doc("d").to_dict() == {}
    assert db.status_counts()["verified"] == 1


def test_empty_transaction_writes_nothing(instance: Instance) -> None:
    db = instance.create_database()
    with db.transaction() as txn:
        txn.doc("d").get("a")
    assert txn.commit is not None and txn.entry is None
    assert len(db) == 1


def test_ended_transaction_refuses_use(instance: Instance) -> None:
    db = instance.create_database()
    txn = db.transaction()
    txn.doc("d").set("a", 1)
    txn.commit()
    with pytest.raises(TransactionError, match=r"^this transaction has ended"):
        txn.doc("d")
    with pytest.raises(TransactionError, match=r"read-only"):
        db.doc("d").set("a", 2)


def test_concurrent_transactions_make_concurrent_entries(instance: Instance) -> None:
    db = instance.create_database()
    first, second = db.transaction(), db.transaction()
    first.doc("d").set("who", "first")
    second.doc("d").set("who", "second")
    a = first.commit()
    b = second.commit()
    assert a and b
    # The second committed on top of the first: parents come from the tips at commit time.
    assert db.tips() == [b]
    assert db.doc("d").get("who") == "second"


def test_heights_and_parents(instance: Instance) -> None:
    db = instance.create_database()
    ids = []
    for i in range(3):
        with db.transaction() as txn:
            txn.doc("d").set("i", i)
        ids.append(txn.entry.id if txn.entry else "")
    last = db.entry(ids[-1])
    assert last.height == 3
    assert [p for p in last.parents] == [db.entry(ids[-2]).cid]
    assert last.settings_tips == (db.root_cid,)
