"""Received batches decoded and signature-checked on the verifying threads before they are put."""

from __future__ import annotations

import gc
import pathlib
from typing import Any

import libipld
import pytest

from dag import EntryError, Instance, Status
from dag.prepared import PARALLEL_SIGNATURES_FROM
from node import runtime
from tests.conftest import InstanceFactory
from tests.forge import forge
from tests.histories import history, raws

COMMITS = PARALLEL_SIGNATURES_FROM * 2  # large enough to go through the pool


def _history(instance: Instance, commits: int = COMMITS) -> Any:
    return history(instance, commits, keys=7)


_raws = raws


def test_a_prepared_batch_is_put_like_the_bytes(make_instance: InstanceFactory) -> None:
    db = _history(make_instance())
    raws = _raws(db)
    plain, prepared = make_instance(), make_instance()
    expected = plain.put_remote_entries(raws)
    batch = prepared.prepare_remote_entries(raws)
    assert batch.count == len(raws)
    result = prepared.put_remote_entries(batch, database_id=db.root_cid)
    assert sorted(result.verified) == sorted(expected.verified)
    assert len(result.verified) == len(raws)
    copy = prepared.open_database(db.id)
    assert copy.tips() == db.tips()
    assert copy.doc("d").get("k3") == db.doc("d").get("k3")


def test_frames_prepared_ahead_are_put_in_order(make_instance: InstanceFactory) -> None:
    db = _history(make_instance(), commits=COMMITS * 2)
    raws = _raws(db)
    target = make_instance()
    half = len(raws) // 2
    first, second = target.prepare_remote_entries(raws[:half]), target.prepare_remote_entries(raws[half:])
    target.put_remote_entries(first)
    target.put_remote_entries(second)
    assert target.open_database(db.id).status_counts()["verified"] == len(raws)


def test_one_garbage_entry_in_a_prepared_batch_stores_nothing(make_instance: InstanceFactory) -> None:
    db = _history(make_instance())
    raws = _raws(db)
    raws.insert(len(raws) // 2, b"\xa1\x61x\x01")  # a map, but not an entry
    target = make_instance()
    batch = target.prepare_remote_entries(raws)
    with pytest.raises(EntryError):
        target.put_remote_entries(batch)
    assert not target.has_database(db.root_cid)


def test_a_bad_signature_checked_on_the_pool_fails_that_entry_only(make_instance: InstanceFactory) -> None:
    db = _history(make_instance())
    forged = forge(db, db.signer, {"d": {"evil": 1}})
    value = libipld.decode_dag_cbor(forged.raw)
    value["subtrees"][0]["data"] = libipld.encode_dag_cbor({"evil": 2})  # the signature no longer matches
    tampered = bytes(libipld.encode_dag_cbor(value))
    raws = [*_raws(db), tampered]
    target = make_instance()
    result = target.put_remote_entries(target.prepare_remote_entries(raws))
    assert list(result.failed.values()) == ["signature does not verify"]
    counts = target.open_database(db.id).status_counts()
    assert counts["verified"] == len(raws) - 1 and counts["failed"] == 1
    assert target.open_database(db.id).doc("d").get("evil") is None


def test_a_cancelled_preparation_leaves_the_instance_usable(make_instance: InstanceFactory) -> None:
    db = _history(make_instance())
    raws = _raws(db)
    target = make_instance()
    target.prepare_remote_entries(raws).cancel()
    target.put_remote_entries(raws)
    assert target.open_database(db.id).status_of(db.tip_cids()[0]) is Status.VERIFIED


def test_settle_heap_freezes_what_start_up_left_and_raises_the_thresholds() -> None:
    thresholds = gc.get_threshold()
    try:
        runtime.settle_heap()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == runtime.GC_THRESHOLDS
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_a_received_batch_leaves_no_reference_cycles(tmp_path: pathlib.Path) -> None:
    """Each batch's decoded entries must be freed when the put returns, not when the cyclic
    collector gets round to them (a cycle per batch held +50 MiB at the peak of a 100K bootstrap)."""
    from dag import Permission

    server = Instance.open(tmp_path / "server")
    db = server.create_database(name="x")
    with db.transaction() as txn:
        txn.settings().set_global(Permission.write(10))
    for i in range(300):
        with db.transaction() as txn:
            txn.doc("d").set(f"k{i}", "x")
    raws = [raw for _cid, raw in db.raw_entries()]
    client = Instance.open(tmp_path / "client")
    gc.collect()
    gc.disable()
    try:
        for start in range(0, len(raws), 100):
            prepared = client.prepare_remote_entries(raws[start : start + 100])
            client.put_remote_entries(prepared, database_id=db.root_cid)
            del prepared
            assert gc.collect() == 0
    finally:
        gc.enable()
    assert len(client.open_database(db.id)) == len(raws)
