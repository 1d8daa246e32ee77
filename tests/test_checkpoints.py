"""Store checkpoints (dag/checkpoints.py): rows that always read as the fold does."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dag import Database, Instance, Permission
from dag.ids import join_cids
from dag.replica import Replica
from dag.state import DOC, TABLE, StateCache
from tests.histories import raws

KEYS = ["a", "b", "c", "d"]
STORES = (("d", DOC), ("t", TABLE))


def _replica(db: Database) -> Replica:
    replica: Replica = db._replica
    return replica


def _folds(db: Database) -> dict[str, dict[str, Any]]:
    """Each store's state folded from the whole history, by a cache that has no checkpoints."""
    replica, tree = _replica(db), db.root_cid
    cache = StateCache(replica.entry)
    return {name: cache.state(tree, name, kind, replica.effective_tips(tree, name)) for name, kind in STORES}


def _check(db: Database) -> None:
    """Every read through checkpoints is the fold: values, keys and their order."""
    folds = _folds(db)
    doc, table = db.doc("d"), db.table("t")
    for key in KEYS:
        assert doc.get(key, "absent") == folds["d"].get(key, "absent")
        assert table.get(key) == folds["t"].get(key)
    assert list(doc.to_dict().items()) == list(folds["d"].items())
    assert list(table.rows().items()) == list(folds["t"].items())
    replica, tree = _replica(db), db.root_cid
    for name, kind in STORES:  # and straight from the rows, without any cached state
        state = replica.checkpoints.state(tree, name, kind, replica.effective_tips(tree, name))
        if state is not None:
            assert list(state.items()) == list(folds[name].items())


values = st.one_of(
    st.integers(-5, 5),
    st.text(max_size=3),
    st.dictionaries(st.sampled_from(["x", "y"]), st.integers(0, 3), max_size=2),
)
ops = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYS), values),
    st.tuples(st.just("nest"), st.sampled_from(KEYS), st.sampled_from(["x", "y"]), st.integers(0, 9)),
    st.tuples(st.just("del"), st.sampled_from(KEYS)),
    st.tuples(st.just("row"), st.sampled_from(KEYS), st.integers(0, 9)),
    st.tuples(st.just("unrow"), st.sampled_from(KEYS)),
    st.tuples(st.just("sync"), st.integers(0, 2), st.integers(0, 2)),
)


def _apply(db: Database, op: tuple[Any, ...]) -> None:
    with db.transaction() as txn:
        doc, table = txn.doc("d"), txn.table("t")
        if op[0] == "set":
            doc.set(op[1], op[2])
        elif op[0] == "nest":
            doc.set(f"{op[1]}.{op[2]}", op[3])
        elif op[0] == "del":
            doc.delete(op[1])
        elif op[0] == "row":
            table.set(op[1], {"n": op[2]})
        else:
            table.delete(op[1])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(st.tuples(st.integers(0, 2), ops), min_size=1, max_size=30))
def test_checkpoints_read_as_the_fold_for_concurrent_writers(program: list[tuple[int, tuple[Any, ...]]]) -> None:
    """Three writers, each on its own replica, syncing at random: concurrent branches that
    arrive late (ordering before what a checkpoint already holds), deletes and re-inserts."""
    instances = [Instance.in_memory() for _ in range(3)]
    origin = instances[0].create_database(name="shared")
    with origin.transaction() as txn:
        txn.settings().set_global(Permission.write(10))
        txn.doc("d").set("a", 0)
        txn.table("t").set("a", {"n": 0})
    for other in instances[1:]:
        other.put_remote_entries(raws(origin))
    dbs = [origin, *(other.open_database(origin.id) for other in instances[1:])]
    for writer, op in program:
        if op[0] == "sync":
            dbs[op[2]]._replica  # noqa: B018 (the receiving replica exists)
            instances[op[2]].put_remote_entries(raws(dbs[op[1]]))
        else:
            _apply(dbs[writer], op)
        _check(dbs[writer] if op[0] != "sync" else dbs[op[2]])
    for db in dbs:
        for other in instances:
            other.put_remote_entries(raws(db))
    for db in dbs:
        _check(db)
    assert _folds(dbs[0]) == _folds(dbs[1]) == _folds(dbs[2])


def _write(db: Database, start: int, count: int) -> None:
    for i in range(start, start + count):
        with db.transaction() as txn:
            txn.doc("d").set(KEYS[i % 4], i)
            txn.table("t").set(f"r{i % 7}", {"n": i})


def _count_loads(instance: Instance, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    loads: list[bytes] = []
    original = instance.storage.get_raw

    def counting(cid: bytes) -> bytes | None:
        loads.append(cid)
        return original(cid)

    monkeypatch.setattr(instance.storage, "get_raw", counting)
    return loads


def test_entries_written_without_their_checkpoint_are_replayed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As after a kill between an entry's write and its checkpoint's: the rows lag, reads
    replay the entries since (and only those)."""
    with Instance.open(tmp_path, synchronous="off") as instance:
        db = instance.create_database(name="x")
        _write(db, 0, 40)
        db_id = db.id
    with Instance.open(tmp_path, synchronous="off") as instance:
        monkeypatch.setattr(Replica, "_advance_checkpoints", lambda *args: None)
        _write(instance.open_database(db_id), 40, 20)
        monkeypatch.undo()
    with Instance.open(tmp_path) as instance:
        loads = _count_loads(instance, monkeypatch)
        db = instance.open_database(db_id)
        assert db.doc("d").get("a") == 56
        assert len(loads) <= 30  # the 20 entries since the checkpoint (and their tips), not 60
        _check(db)


_KILLED_WRITER = """
import os, signal, sys
from dag import Instance
instance = Instance.open(sys.argv[1], synchronous="off")
db = instance.create_database(name="x")
print(db.id, flush=True)
for i in range(300):
    with db.transaction() as txn:
        txn.doc("d").set("k" + str(i % 9), i)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_with_sigkill_reads_back_as_the_fold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == -9, done.stderr
    db_id = done.stdout.split()[0]
    with Instance.open(tmp_path) as instance:
        loads = _count_loads(instance, monkeypatch)
        db = instance.open_database(db_id)
        assert db.doc("d").get("k2") == 299
        assert len(loads) < 10
        assert list(db.doc("d").to_dict().items()) == list(_folds(db)["d"].items())


def test_the_first_read_after_reopening_a_large_store_replays_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Instance.open(tmp_path, synchronous="off") as instance:
        db = instance.create_database(name="x")
        _write(db, 0, 2_000)
        db_id = db.id
    with Instance.open(tmp_path) as instance:
        loads = _count_loads(instance, monkeypatch)
        db = instance.open_database(db_id)
        assert db.doc("d").get("d") == 1_999
        assert db.table("t").get("r3") == {"n": 1_998}
        assert len(db.table("t").rows()) == 7
        assert len(loads) < 10
        replica, tree = _replica(db), db.root_cid
        head = instance.storage.state_head(tree, "d", DOC)
        assert head is not None and head.tips == join_cids(sorted(replica.effective_tips(tree, "d")))


def test_a_fold_in_a_thread_does_not_hold_the_replica_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Instance.open(tmp_path, synchronous="off") as instance:
        monkeypatch.setattr(Replica, "_advance_checkpoints", lambda *args: None)  # nothing to start from
        db = instance.create_database(name="x")
        _write(db, 0, 1_500)
        monkeypatch.undo()
        replica, tree = _replica(db), db.root_cid
        replica.reset_caches()
        folded: list[dict[str, Any]] = []
        fold = threading.Thread(target=lambda: folded.append(db.doc("d").to_dict()))
        waits: list[float] = []
        fold.start()
        while fold.is_alive():
            started = time.perf_counter()
            replica.reset_caches()  # so that tips() reads storage, under the lock
            replica.tips(tree)
            waits.append(time.perf_counter() - started)
            time.sleep(0.001)
        fold.join()
        assert folded == [{"a": 1_496, "b": 1_497, "c": 1_498, "d": 1_499}]
        assert len(waits) > 5  # the fold took a while
        assert max(waits) < 0.05
