"""Remote entries: stored Unverified, verified locally, prefix-closed; tips under any arrival order."""

from __future__ import annotations

from typing import Any

import libipld
import pytest

from dag import EntryError, Instance, Permission, SigningKey, Status, decode_entry
from dag.crdt.doc import doc_from_value, encode_doc_delta
from dag.entry import build_entry
from dag.ids import cid_to_text
from tests.conftest import InstanceFactory
from tests.forge import forge
from tests.histories import history, raws


def _history(instance: Instance, commits: int = 4) -> Any:
    return history(instance, commits)


_raws = raws


_forge = forge


def test_child_before_parent_waits_then_verifies(make_instance: InstanceFactory) -> None:
    source = make_instance()
    db = _history(source, commits=3)
    raws = _raws(db)
    target = make_instance()
    first = target.put_remote_entries(raws[:1] + raws[2:])  # entry 1 missing
    assert len(first.verified) == 1 and len(first.unverified) == 2
    copy = target.open_database(db.id)
    assert copy.tips() == [cid_to_text(db.root_cid)]
    assert [cid_to_text(c) for c in copy.missing_entries()] == [cid_to_text(db.raw_entries()[1][0])]
    assert copy.doc("d").to_dict() == {}
    assert copy.doc("d", include_unverified=True).to_dict() == {"k1": 1, "k2": 2}
    second = target.put_remote_entries(raws[1:2])
    assert len(second.verified) == 3 and not second.unverified
    assert copy.tips() == db.tips()
    assert copy.store_tips("d") == db.store_tips("d")
    assert copy.doc("d").to_dict() == db.doc("d").to_dict()
    assert copy.missing_entries() == []
    assert copy.status_counts() == {"unverified": 0, "verified": 4, "failed": 0}


def test_entries_arriving_in_reverse_one_by_one(make_instance: InstanceFactory) -> None:
    db = _history(make_instance(), commits=5)
    target = make_instance()
    for raw in reversed(_raws(db)):
        target.put_remote_entries([raw])
    copy = target.open_database(db.id)
    assert copy.tips() == db.tips() and copy.doc("d").to_dict() == db.doc("d").to_dict()


def test_forged_signature_fails_and_fails_its_descendants(make_instance: InstanceFactory) -> None:
    source = make_instance()
    db = _history(source, commits=2)
    good = _raws(db)
    target = make_instance()
    target.put_remote_entries(good)
    forged = _forge(db, db.signer, {"d": {"evil": 1}})
    value = libipld.decode_dag_cbor(forged.raw)
    value["subtrees"][0]["data"] = libipld.encode_dag_cbor({"evil": 2})  # signature no longer matches
    tampered = bytes(libipld.encode_dag_cbor(value))
    # A child built on top of the tampered entry, validly signed by the admin.
    result = target.put_remote_entries([tampered])
    assert list(result.failed.values()) == ["signature does not verify"]
    copy = target.open_database(db.id)
    assert copy.doc("d").get("evil") is None
    assert copy.tips() == db.tips()
    bad = decode_entry(tampered)
    child = build_entry(
        signer=db.signer,
        root=db.root_cid,
        parents=[bad.cid],
        height=bad.height + 1,
        settings_tips=list(bad.settings_tips),
        stores=[],
    )
    result = target.put_remote_entries([child.raw])
    assert list(result.failed.values()) == [f"depends on failed entry {bad.id}"]
    assert copy.status_counts()["failed"] == 2


def test_child_waiting_on_a_parent_that_then_fails_fails_too(make_instance: InstanceFactory) -> None:
    db = _history(make_instance(), commits=1)
    target = make_instance()
    target.put_remote_entries(_raws(db))
    stranger = SigningKey.generate()
    bad = _forge(db, stranger, {"d": {"x": 1}})
    child = build_entry(
        signer=db.signer, root=db.root_cid, parents=[bad.cid], height=bad.height + 1,
        settings_tips=list(bad.settings_tips), stores=[],
    )  # fmt: skip
    first = target.put_remote_entries([child.raw])
    assert len(first.unverified) == 1
    second = target.put_remote_entries([bad.raw])
    assert set(second.failed) == {bad.id, child.id}
    assert target.open_database(db.id).tips() == db.tips()


def test_stranger_in_the_same_batch_as_the_settings_fails(make_instance: InstanceFactory) -> None:
    """Regression: settings over entries of the batch itself must be read, not taken as empty."""
    source = make_instance()
    db = _history(source, commits=1)
    stranger = SigningKey.generate()
    bad = _forge(db, stranger, {"d": {"x": 1}})
    target = make_instance()
    result = target.put_remote_entries([*_raws(db), bad.raw])
    assert set(result.failed) == {bad.id}
    assert len(result.verified) == 2


def test_empty_or_stale_settings_pin_fails(make_instance: InstanceFactory) -> None:
    source = make_instance()
    db = source.create_database()
    writer = SigningKey.generate()
    with db.transaction() as txn:
        txn.settings().add_key(writer.pubkey, Permission.write(1))
    grant_tips = db.store_tips("_settings")
    with db.transaction() as txn:
        txn.settings().revoke_key(writer.pubkey)
    target = make_instance()
    target.put_remote_entries(_raws(db))
    # The revoked writer pins the settings from before its revocation: refused.
    stale = _forge(db, writer, {"d": {"x": 1}}, pin=[db.entry(grant_tips[0]).cid])
    # ...and an entry with no pin at all cannot authorize itself (the upstream hole).
    empty = _forge(db, SigningKey.generate(), {"d": {"x": 2}}, pin=[])
    result = target.put_remote_entries([stale.raw, empty.raw])
    assert result.failed == {
        stale.id: "settings pin is not the settings tips of its parents",
        empty.id: "settings pin is not the settings tips of its parents",
    }


def test_root_trust_on_first_use_needs_an_admin_signature(instance: Instance) -> None:
    owner, impostor = SigningKey.generate(), SigningKey.generate()
    settings = bytes(
        libipld.encode_dag_cbor(
            encode_doc_delta(
                doc_from_value(
                    {"auth": {"keys": {owner.pubkey: {"permissions": "admin:0", "status": "active"}}}}, atomic=False
                )
            )
        )
    )
    root = build_entry(
        signer=impostor, root=None, parents=[], height=0, settings_tips=[],
        stores=[("_root", [], None), ("_settings", [], settings)], entropy=1,
    )  # fmt: skip
    result = instance.put_remote_entries([root.raw])
    assert result.failed == {root.id: "root entry is not signed by an admin of the settings it creates"}
    assert instance.databases() == []


def test_wrong_height_fails(make_instance: InstanceFactory) -> None:
    db = _history(make_instance(), commits=1)
    target = make_instance()
    target.put_remote_entries(_raws(db))
    bad = _forge(db, db.signer, {"d": {"x": 1}}, height=7)
    assert target.put_remote_entries([bad.raw]).failed == {bad.id: "height is 7, parents give 2"}


def test_malformed_entry_in_a_batch_stores_nothing(make_instance: InstanceFactory) -> None:
    db = _history(make_instance(), commits=2)
    target = make_instance()
    with pytest.raises(EntryError):
        target.put_remote_entries([*_raws(db), b"\x00not an entry"])
    assert target.databases() == []
    assert target.storage.get_meta([db.root_cid]) == {}


def test_duplicates_are_counted_not_stored_twice(make_instance: InstanceFactory) -> None:
    db = _history(make_instance(), commits=2)
    target = make_instance()
    raws = _raws(db)
    first = target.put_remote_entries(raws + raws)
    assert first.duplicates == 3 and len(first.verified) == 3
    again = target.put_remote_entries(raws)
    assert again.duplicates == 3 and not again.verified
    assert len(target.open_database(db.id)) == 3


def test_concurrent_writes_merge_deterministically(make_instance: InstanceFactory) -> None:
    a = make_instance()
    db_a = a.create_database()
    b = make_instance()
    b.put_remote_entries(_raws(db_a))
    db_b = b.open_database(db_a.id, key=db_a.signer)
    with db_a.transaction() as txn:
        txn.doc("d").set("x", "from a")
        txn.doc("d").set("only_a", 1)
    with db_b.transaction() as txn:
        txn.doc("d").set("x", "from b")
        txn.doc("d").set("only_b", 2)
    a.put_remote_entries(_raws(db_b))
    b.put_remote_entries(_raws(db_a))
    assert db_a.tips() == db_b.tips() and len(db_a.tips()) == 2
    state = db_a.doc("d").to_dict()
    assert state == db_b.doc("d").to_dict()
    assert state["only_a"] == 1 and state["only_b"] == 2 and state["x"] in ("from a", "from b")
    # A merge commit on top of both tips sees the merged state and has both as parents.
    with db_a.transaction() as txn:
        txn.doc("d").set("merged", True)
    assert len(db_a.entry(db_a.tips()[0]).parents) == 2
    b.put_remote_entries(_raws(db_a))
    assert db_b.doc("d").to_dict() == db_a.doc("d").to_dict()


def test_missing_from_sends_only_the_difference(make_instance: InstanceFactory) -> None:
    a = make_instance()
    db_a = _history(a, commits=5)
    b = make_instance()
    b.put_remote_entries(_raws(db_a))
    db_b = b.open_database(db_a.id, key=db_a.signer)
    shared = db_a.tip_cids()
    for i in range(3):
        with db_a.transaction() as txn:
            txn.doc("d").set("a", i)
    with db_b.transaction() as txn:
        txn.doc("d").set("b", 1)
    missing = db_a.missing_from(shared)
    assert len(missing) == 3
    # A tip a does not hold tells it nothing: everything reachable is a candidate (sync's
    # reconciliation deals with that case, not this walk).
    assert len(db_a.missing_from(db_b.tip_cids())) == 9
    assert db_a.missing_from(shared, ours=shared) == []
    assert set(db_a.ancestors(shared)) == {cid for cid, _ in db_a.raw_entries()[:6]}
    heights = [db_a.entry(cid_to_text(c)).height for c in missing]
    assert heights == sorted(heights)


def test_write_callbacks(make_instance: InstanceFactory) -> None:
    source = make_instance()
    calls: list[tuple[str, list[str], list[str], bool]] = []

    def record(db: Any, before: list[str], after: list[str], local: bool) -> None:
        calls.append((db.id, before, after, local))

    def explode(*_args: Any) -> None:
        raise RuntimeError("callback failure must not undo the commit")

    source.on_write(explode)
    handle = source.on_write(record)
    db = source.create_database()
    with db.transaction() as txn:
        txn.doc("d").set("x", 1)
    assert db.doc("d").get("x") == 1
    assert [c[3] for c in calls] == [True, True]
    assert calls[1][1] == [cid_to_text(db.root_cid)] and calls[1][2] == db.tips()
    target = make_instance()
    remote: list[bool | None] = []
    target.on_write(lambda _db, _b, _a, local: remote.append(local), database_id=db.id)
    target.on_write(lambda *_: remote.append(None), database_id=cid_to_text(db.root_cid[:-1] + b"\x00"))
    target.put_remote_entries(_raws(db))
    assert remote == [False]
    handle.remove()
    with db.transaction() as txn:
        txn.doc("d").set("x", 2)
    assert len(calls) == 2


def test_statuses_are_computed_never_asserted(make_instance: InstanceFactory) -> None:
    db = _history(make_instance(), commits=1)
    target = make_instance()
    target.put_remote_entries(_raws(db))
    copy = target.open_database(db.id)
    assert {copy.status_of(cid) for cid, _ in copy.raw_entries(None)} == {Status.VERIFIED}
