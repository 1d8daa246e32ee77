"""Property tests of the database core, on both storage backends.

* Convergence: a random multi-writer, multi-replica history, delivered to fresh nodes in
  any order, in any batches, with duplicates, always ends in the same tips and state, all
  Verified, and the same as the replicas that wrote it. While entries are delivered, the
  set of Verified entries is exactly the ancestor-closed part of what was delivered.
* Round trip: entries made by real commits decode to themselves and re-encode to the same
  bytes; every value written reads back unchanged (same types), locally and remotely.
* Tampering: any flipped byte in an entry is caught (the bytes are refused, or they decode
  to another ID whose signature does not verify), and a tampered entry never becomes
  Verified nor changes the database it was sent into.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import libipld
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dag import (
    Database,
    EntryError,
    Instance,
    NotFoundError,
    Permission,
    PermissionDeniedError,
    SigningKey,
    Status,
    Transaction,
    cid_from_text,
    decode_entry,
)
from dag.entry import Entry
from dag.ids import cid_of, cid_to_text
from dag.prepared import PARALLEL_SIGNATURES_FROM

BACKENDS = ["memory", "sqlite"]

ADMIN = SigningKey(bytes([1]) * 32)
WRITERS = [SigningKey(bytes([n]) * 32) for n in (2, 3, 4)]
SIGNERS = [ADMIN, *WRITERS]
DOC_STORES = ("notes", "cfg")
TABLE_STORES = ("todos",)
ALL_STORES = (*DOC_STORES, *TABLE_STORES, "_settings", "_index", "_root")
ROW_IDS = ("r1", "r2", "r3")

PROPERTY_SETTINGS = settings(
    deadline=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# ---- instances on one backend, each in its own directory --------------------------------


class Nodes:
    """Fresh instances on one backend; SQLite ones each get a directory in a temp dir.

    Hypothesis runs many examples per test, so ``tmp_path`` (one per test) cannot be used.
    """

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._opened: list[Instance] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Nodes:
        if self.backend == "sqlite":
            self._tmp = tempfile.TemporaryDirectory(prefix="eidetica-props-")
        return self

    def new(self, key: SigningKey | None = None) -> Instance:
        if self.backend == "memory":
            instance = Instance.in_memory(key)
        else:
            assert self._tmp is not None
            instance = Instance.open(Path(self._tmp.name) / f"node{len(self._opened)}")
        self._opened.append(instance)
        return instance

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for instance in self._opened:
            instance.close()
        if self._tmp is not None:
            self._tmp.cleanup()


# ---- helpers ------------------------------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types all the way down (1 != 1.0 != True).

    The sign of a zero is not compared here: see ``test_negative_zero_reads_back_consistently``.
    """
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def raws_of(db: Database, status: Status | None = Status.VERIFIED) -> list[bytes]:
    return [raw for _cid, raw in db.raw_entries(status)]


def snapshot(db: Database) -> dict[str, Any]:
    """Everything a reader can see of a database: tips, store tips, every store's state."""
    return {
        "tips": db.tips(),
        "store_tips": {name: db.store_tips(name) for name in ALL_STORES},
        "docs": {name: db.doc(name).to_dict() for name in DOC_STORES},
        "tables": {name: db.table(name).rows() for name in TABLE_STORES},
        "settings": db.settings().to_dict(),
        "types": db.store_types(),
        "counts": db.status_counts(),
    }


def dependencies(entry: Entry) -> set[bytes]:
    """Every entry that must be Verified before ``entry`` can be."""
    deps = set(entry.parents) | set(entry.settings_tips)
    for node in entry.stores:
        deps.update(node.parents)
    if entry.root is not None:
        deps.add(entry.root)
    return deps


def verifiable_closure(delivered: Iterable[bytes], decoded: dict[bytes, Entry]) -> set[bytes]:
    """The delivered entries whose every dependency was delivered too (valid entries only)."""
    held = set(delivered)
    verified: set[bytes] = set()
    for cid in sorted(held, key=lambda c: (decoded[c].height, c)):
        if all(dep in verified for dep in dependencies(decoded[cid])):
            verified.add(cid)
    return verified


def maximal(cids: set[bytes], decoded: dict[bytes, Entry]) -> list[str]:
    """Text IDs of the entries in ``cids`` that are no other member's parent, sorted by binary ID."""
    referenced = {parent for cid in cids for parent in decoded[cid].parents}
    return [cid_to_text(c) for c in sorted(cids - referenced)]


def check_round_trip(entry: Entry) -> None:
    assert decode_entry(entry.raw) == entry
    assert bytes(libipld.encode_dag_cbor(libipld.decode_dag_cbor(entry.raw))) == entry.raw
    assert entry.cid == cid_of(entry.raw)
    assert entry.signature_valid()


# ---- strategies ---------------------------------------------------------------------------

DOC_KEYS = st.text(st.characters(codec="utf-8", exclude_characters="."), min_size=1, max_size=6)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)


def json_values(max_leaves: int = 10) -> st.SearchStrategy[Any]:
    return st.recursive(
        SCALARS,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(DOC_KEYS, inner, max_size=4),
        max_leaves=max_leaves,
    )


VALUES = json_values()
SMALL_VALUES = json_values(max_leaves=4)
ROWS = st.dictionaries(st.text(max_size=4), SMALL_VALUES, max_size=3)
PATHS = st.lists(st.sampled_from("abc"), min_size=1, max_size=3).map(".".join)

DATA_OPS = st.one_of(
    st.tuples(st.just("doc_set"), st.sampled_from(DOC_STORES), PATHS, SMALL_VALUES),
    st.tuples(
        st.just("doc_update"), st.sampled_from(DOC_STORES), PATHS, st.dictionaries(DOC_KEYS, SMALL_VALUES, max_size=3)
    ),
    st.tuples(st.just("doc_delete"), st.sampled_from(DOC_STORES), PATHS),
    st.tuples(st.just("table_set"), st.sampled_from(TABLE_STORES), st.sampled_from(ROW_IDS), ROWS),
    # A fresh row ID drawn here, not Table.insert's random UUID: a run must replay exactly.
    st.tuples(st.just("table_set"), st.sampled_from(TABLE_STORES), st.uuids().map(str), ROWS),
    st.tuples(st.just("table_delete"), st.sampled_from(TABLE_STORES), st.sampled_from(ROW_IDS)),
)
SETTINGS_OPS = st.one_of(
    st.tuples(st.just("rename"), st.text(max_size=6)),
    st.tuples(st.just("grant"), st.integers(0, len(WRITERS) - 1)),
    st.tuples(st.just("revoke"), st.integers(0, len(WRITERS) - 1)),
)
# Mostly data writes; now and then a settings change (refused unless the signer is an admin).
OPS = st.lists(DATA_OPS, min_size=1, max_size=3) | st.lists(DATA_OPS | SETTINGS_OPS, min_size=1, max_size=2)


def apply_op(txn: Transaction, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "doc_set":
        txn.doc(op[1]).set(op[2], op[3])
    elif kind == "doc_update":
        txn.doc(op[1]).update(op[2], op[3])
    elif kind == "doc_delete":
        txn.doc(op[1]).delete(op[2])
    elif kind == "table_set":
        txn.table(op[1]).set(op[2], op[3])
    elif kind == "table_delete":
        txn.table(op[1]).delete(op[2])
    elif kind == "rename":
        txn.settings().set_database_name(op[1])
    elif kind == "grant":
        txn.settings().add_key(WRITERS[op[1]].pubkey, Permission.write(10))
    elif kind == "revoke":
        txn.settings().revoke_key(WRITERS[op[1]].pubkey)
    else:  # pragma: no cover
        raise AssertionError(kind)


@functools.cache
def base_history() -> tuple[str, tuple[bytes, ...]]:
    """A database made by ADMIN that grants Write to every WRITER (made once per session)."""
    with Instance.in_memory(ADMIN) as instance:
        db = instance.create_database(name="props", key=ADMIN)
        for writer in WRITERS:
            with db.transaction() as txn:
                txn.settings().add_key(writer.pubkey, Permission.write(10), name="writer")
        return db.id, tuple(raws_of(db))


# ---- convergence --------------------------------------------------------------------------


def run_program(
    data: st.DataObject, replicas: list[Instance], db_id: str, steps: st.SearchStrategy[int]
) -> dict[bytes, bytes]:
    """Random commits and exchanges on the replicas; returns every entry produced (cid -> raw)."""
    dbs = [replica.open_database(db_id) for replica in replicas]
    produced: dict[bytes, bytes] = {}
    refused = 0
    for _ in range(data.draw(steps, label="steps")):
        action = data.draw(st.sampled_from(("commit",) * 4 + ("sync", "sync", "sync_some")), label="action")
        if action == "commit":
            here = data.draw(st.integers(0, len(dbs) - 1), label="replica")
            signer = data.draw(st.sampled_from(SIGNERS), label="signer")
            db = dbs[here].with_key(signer)
            ops = data.draw(OPS, label="ops")
            held = db.settings().auth().permission_of(signer.pubkey)
            touches_settings = any(op[0] in ("rename", "grant", "revoke") for op in ops)
            allowed = held is not None and held.can_write and (held.is_admin or not touches_settings)
            tips_before = db.effective_tips()
            try:
                with db.transaction() as txn:
                    for op in ops:
                        apply_op(txn, op)
            except PermissionDeniedError:
                assert not allowed, f"{signer.pubkey} holds {held} but was refused"
                assert db.effective_tips() == tips_before
                refused += 1
                continue
            entry = txn.entry
            if entry is None:  # e.g. update(path, {}) over a doc: nothing to write, nothing checked
                assert db.effective_tips() == tips_before
                continue
            assert allowed, f"{signer.pubkey} holds {held} and could write {ops}"
            check_round_trip(entry)
            # A local commit has every effective tip as a parent (a tip whose signer was
            # revoked since is no longer built on: dag/authority.py).
            assert db.effective_tips() == [entry.id]
            # Its parents are the effective tips before it, plus, for a settings change that
            # gives a key its right back, that key's tips which were left out until then.
            parents = {cid_to_text(p) for p in entry.parents}
            assert parents >= set(tips_before)
            assert parents == set(tips_before) or touches_settings
            produced[entry.cid] = entry.raw
        else:
            source, target = data.draw(st.permutations(range(len(dbs))), label="pair")[:2]
            raws = raws_of(dbs[source])
            if action == "sync_some":
                raws = data.draw(st.lists(st.sampled_from(raws), max_size=len(raws)), label="subset")
            result = replicas[target].put_remote_entries(raws)
            assert result.failed == {}
            if action == "sync":
                theirs = {cid for cid, _raw in dbs[source].raw_entries()}
                ours = {cid for cid, _raw in dbs[target].raw_entries()}
                assert theirs <= ours
    event("refused commits", min(refused, 3))
    return produced


def deliver_in_batches(
    data: st.DataObject,
    receiver: Instance,
    db_id: str,
    entries: dict[bytes, bytes],
    decoded: dict[bytes, Entry],
    max_cuts: int = 6,
) -> None:
    """Deliver every entry in a random order and batching, with duplicates, checking each step."""
    order = data.draw(st.permutations(sorted(entries)), label="order")
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=max_cuts), label="cuts"))
    bounds = [0, *(c for c in cuts if c < len(order)), len(order)]
    delivered: set[bytes] = set()
    verified: set[bytes] = set()
    for start, end in itertools.pairwise(bounds):
        batch = list(order[start:end])
        batch += data.draw(st.lists(st.sampled_from(order), max_size=2), label="duplicates")
        new = set(batch) - delivered
        result = receiver.put_remote_entries(entries[cid] for cid in batch)
        delivered |= set(batch)
        expected = verifiable_closure(delivered, decoded)
        assert result.received == len(batch)
        assert result.duplicates == len(batch) - len(new)
        assert result.failed == {}
        assert sorted(result.verified) == sorted(expected - verified)
        verified = expected
        metas = receiver.storage.get_meta(list(entries))
        assert set(metas) == delivered
        statuses = {cid: meta.status for cid, meta in metas.items()}
        assert {c for c, s in statuses.items() if s is Status.VERIFIED} == expected
        assert all(s is not Status.FAILED for s in statuses.values())
        if decoded[order[0]].tree in expected:
            db = receiver.open_database(db_id)
            assert db.tips() == maximal(expected, decoded)
            assert db.tips(include_unverified=True) == maximal(delivered, decoded)
        else:
            with pytest.raises(NotFoundError):
                receiver.open_database(db_id)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(PROPERTY_SETTINGS, max_examples=50)
@given(data=st.data())
def test_convergence_in_any_delivery_order(backend: str, data: st.DataObject) -> None:
    db_id, base = base_history()
    with Nodes("memory") as writers, Nodes(backend) as receivers:
        replicas = [writers.new() for _ in range(data.draw(st.integers(2, 3), label="replicas"))]
        for replica in replicas:
            assert replica.put_remote_entries(base).failed == {}
        produced = run_program(data, replicas, db_id, st.integers(12, 40))

        # Every entry any replica holds is one of the base entries or one a commit produced.
        entries = {cid_of(raw): raw for raw in base} | produced
        held = {cid for r in replicas for cid, _raw in r.open_database(db_id).raw_entries(None)}
        assert held == set(entries)
        decoded = {cid: decode_entry(raw) for cid, raw in entries.items()}
        event("entries", len(entries) // 5 * 5)
        event("merge entries", min(3, sum(len(e.parents) > 1 for e in decoded.values())))
        in_height_order = sorted(entries, key=lambda c: (decoded[c].height, c))

        # The replicas themselves converge once they have exchanged everything.
        for replica in replicas:
            replica.put_remote_entries(entries[c] for c in in_height_order)
        expected = snapshot(replicas[0].open_database(db_id))
        assert expected["counts"] == {"verified": len(entries), "unverified": 0, "failed": 0}
        assert expected["tips"] == maximal(set(entries), decoded)
        for replica in replicas[1:]:
            assert snapshot(replica.open_database(db_id)) == expected

        # A receiver given everything at once, in height order.
        reference = receivers.new()
        result = reference.put_remote_entries(entries[c] for c in in_height_order)
        assert sorted(result.verified) == sorted(entries)
        assert snapshot(reference.open_database(db_id)) == expected

        # A receiver given one entry at a time, children first: everything waits for the root.
        backwards = receivers.new()
        root = decoded[in_height_order[0]].tree
        for cid in reversed(in_height_order):
            result = backwards.put_remote_entries([entries[cid]])
            if cid == root:
                assert sorted(result.verified) == sorted(entries)
            else:
                assert result.verified == [] and result.failed == {}
                assert result.unverified == [cid]
        assert snapshot(backwards.open_database(db_id)) == expected

        # Receivers given random orders, batches and duplicates.
        for _ in range(2):
            receiver = receivers.new()
            deliver_in_batches(data, receiver, db_id, entries, decoded)
            db = receiver.open_database(db_id)
            assert snapshot(db) == expected
            assert db.missing_entries() == []


def seeded_history(seed: int, commits: int) -> tuple[dict[bytes, bytes], dict[str, Any]]:
    """A long history from a seeded program (too long for Hypothesis to draw step by step).

    Three replicas, every signer, doc and table writes, full and partial exchanges; returns
    every entry and the state the replicas converge to.
    """
    rng = random.Random(seed)
    db_id, base = base_history()
    with Nodes("memory") as nodes:
        replicas = [nodes.new() for _ in range(3)]
        for replica in replicas:
            replica.put_remote_entries(base)
        dbs = [replica.open_database(db_id) for replica in replicas]
        for _ in range(commits):
            if rng.random() < 0.3:
                source, target = rng.sample(range(3), 2)
                raws = raws_of(dbs[source])
                if rng.random() < 0.5:
                    raws = rng.sample(raws, rng.randrange(len(raws) + 1))
                assert replicas[target].put_remote_entries(raws).failed == {}
            db = dbs[rng.randrange(3)].with_key(rng.choice(SIGNERS))
            with db.transaction() as txn:
                kind = rng.randrange(4)
                if kind == 0:
                    txn.doc(rng.choice(DOC_STORES)).set(rng.choice(("a", "b", "a.b", "c.d")), rng.randrange(1000))
                elif kind == 1:
                    txn.doc(rng.choice(DOC_STORES)).delete(rng.choice(("a", "b", "c")))
                elif kind == 2:
                    txn.table("todos").set(rng.choice(ROW_IDS), {"n": rng.randrange(1000)})
                else:
                    txn.table("todos").delete(rng.choice(ROW_IDS))
        entries = {cid: raw for db in dbs for cid, raw in db.raw_entries()}
        for replica in replicas:
            replica.put_remote_entries(entries.values())
        expected = snapshot(dbs[0])
        for db in dbs[1:]:
            assert snapshot(db) == expected
        return entries, expected


def forge_signature(raw: bytes) -> bytes:
    """The entry with another, well-formed signature text: decodes, but does not verify."""
    value = libipld.decode_dag_cbor(raw)
    text = value["sig"]["sig"]
    value["sig"]["sig"] = ("B" if text[0] != "B" else "C") + text[1:]
    return bytes(libipld.encode_dag_cbor(value))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(PROPERTY_SETTINGS, max_examples=3)
@given(seed=st.integers(0, 2**32 - 1), data=st.data())
def test_convergence_with_large_batches(backend: str, seed: int, data: st.DataObject) -> None:
    """Long histories in a few big batches: signatures are checked on the thread pool."""
    db_id = base_history()[0]
    entries, expected = seeded_history(seed, commits=200)
    assert len(entries) >= 2 * PARALLEL_SIGNATURES_FROM
    decoded = {cid: decode_entry(raw) for cid, raw in entries.items()}
    with Nodes(backend) as receivers:
        receiver = receivers.new()
        deliver_in_batches(data, receiver, db_id, entries, decoded, max_cuts=2)
        assert snapshot(receiver.open_database(db_id)) == expected

        # One entry of a big batch carries a forged signature: it alone fails, and what
        # depends on the genuine entry waits for it.
        victim = data.draw(st.sampled_from(sorted(entries.keys() - {cid_from_text(db_id)})), label="victim")
        forged = forge_signature(entries[victim])
        assert not decode_entry(forged).signature_valid()
        order = data.draw(st.permutations(sorted(entries.keys() - {victim})), label="order")
        other = receivers.new()
        result = other.put_remote_entries([*(entries[c] for c in order), forged])
        assert list(result.failed) == [cid_to_text(cid_of(forged))]
        assert set(result.verified) == verifiable_closure(set(order), decoded)
        other.put_remote_entries([entries[victim]])
        db = other.open_database(db_id)
        assert {**snapshot(db), "counts": None} == {**expected, "counts": None}
        assert db.status_counts() == {"verified": len(entries), "unverified": 0, "failed": 1}


# ---- round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@settings(PROPERTY_SETTINGS, max_examples=40)
@given(
    doc_values=st.lists(VALUES, min_size=1, max_size=6),
    nested=st.lists(DOC_KEYS, max_size=2),
    rows=st.lists(st.dictionaries(st.text(max_size=6), VALUES, max_size=4), max_size=3),
    per_commit=st.integers(1, 3),
)
def test_values_and_entries_round_trip(
    backend: str, doc_values: list[Any], nested: list[str], rows: list[dict[str, Any]], per_commit: int
) -> None:
    suffix = "".join(f".{key}" for key in nested)
    doc_writes = [(f"k{i}{suffix}", value) for i, value in enumerate(doc_values)]
    writes: list[tuple[str, str, Any]] = [("doc", path, value) for path, value in doc_writes]
    writes += [("table", "", row) for row in rows]  # Table.insert picks the row ID
    with Nodes(backend) as nodes:
        writer, receiver = nodes.new(), nodes.new()
        db = writer.create_database(name="round trip")
        entries = [db.entry(db.id)]
        row_ids: list[str] = []
        for start in range(0, len(writes), per_commit):
            with db.transaction() as txn:
                for kind, where, value in writes[start : start + per_commit]:
                    if kind == "doc":
                        txn.doc("d").set(where, value)
                        assert same(txn.doc("d").get(where), value)  # read-your-writes
                    else:
                        row_id = txn.table("t").insert(value)
                        assert same(txn.table("t").get(row_id), value)
                        row_ids.append(row_id)
            assert txn.entry is not None
            entries.append(txn.entry)
        for entry in entries:
            check_round_trip(entry)
            assert db.entry(entry.id) == entry  # what storage gives back
        result = receiver.put_remote_entries(entry.raw for entry in entries)
        assert len(result.verified) == len(entries)
        remote = receiver.open_database(db.id)
        for entry in entries:
            assert remote.entry(entry.id) == entry
        for view in (db, remote):
            for path, value in doc_writes:
                assert same(view.doc("d").get(path), value)
            assert same(view.table("t").rows(), dict(zip(row_ids, rows, strict=True)))
        assert same(remote.doc("d").to_dict(), db.doc("d").to_dict())
        assert same(remote.table("t").rows(), db.table("t").rows())


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_zero_reads_back_consistently(backend: str) -> None:
    with Nodes(backend) as nodes:
        db = nodes.new().create_database()
        with db.transaction() as txn:
            txn.doc("d").set("z", -0.0)
            txn.table("t").set("r", {"z": -0.0})
            inside = [txn.doc("d").get("z"), (txn.table("t").get("r") or {})["z"]]
        after = [db.doc("d").get("z"), (db.table("t").get("r") or {})["z"]]
        assert inside == after == [0.0, 0.0]
        assert [math.copysign(1.0, v) for v in inside] == [math.copysign(1.0, v) for v in after]


# ---- tampering ----------------------------------------------------------------------------


@functools.cache
def flip_corpus() -> tuple[str, tuple[bytes, ...], dict[str, Any]]:
    """A small database with settings, doc, table and a merge entry; built once per session."""
    with Instance.in_memory(ADMIN) as a, Instance.in_memory() as b:
        db = a.create_database(name="flip", key=ADMIN)
        with db.transaction() as txn:
            txn.settings().add_key(WRITERS[0].pubkey, Permission.write(10))
        b.put_remote_entries(raws_of(db))
        with db.with_key(WRITERS[0]).transaction() as txn:
            txn.doc("notes").set("a.b", [1, 2.5, "x"])
        with b.open_database(db.id).with_key(ADMIN).transaction() as txn:
            txn.table("todos").set("r1", {"t": "milk"})
        b.put_remote_entries(raws_of(db))
        a.put_remote_entries(raws_of(b.open_database(db.id)))
        assert len(db.tips()) == 2
        with db.transaction() as txn:
            txn.doc("notes").set("c", True)
        assert txn.entry is not None and len(txn.entry.parents) == 2
        return db.id, tuple(raws_of(db)), snapshot(db)


def flip(raw: bytes, position: int, mask: int) -> bytes:
    tampered = bytearray(raw)
    tampered[position] ^= mask
    return bytes(tampered)


def decode_tampered(original: Entry, tampered: bytes) -> Entry | None:
    """The tampered bytes are refused, or decode to another ID with a broken signature."""
    try:
        entry = decode_entry(tampered)
    except EntryError:
        return None
    assert entry.cid == cid_of(tampered) != original.cid
    assert not entry.signature_valid()
    return entry


def without_counts(db: Database) -> dict[str, Any]:
    """A snapshot, with only the Verified count (tampered entries are stored Failed or Unverified)."""
    state = snapshot(db)
    state["counts"] = state["counts"]["verified"]
    return state


def visible_state(instance: Instance, db_id: str, cids: list[bytes]) -> dict[str, Any]:
    statuses = {cid: meta.status for cid, meta in instance.storage.get_meta(cids).items()}
    try:
        db = instance.open_database(db_id)
    except NotFoundError:
        return {"statuses": statuses}
    return {"statuses": statuses, "db": without_counts(db)}


def send_tampered(instance: Instance, db_id: str, cids: list[bytes], original: Entry, tampered: bytes) -> bool:
    """Send ``tampered`` to ``instance``; it must never be Verified nor change anything else."""
    entry = decode_tampered(original, tampered)
    before = visible_state(instance, db_id, cids)
    if entry is None:
        with pytest.raises(EntryError):
            instance.put_remote_entries([tampered])
        assert instance.storage.get_meta([cid_of(tampered)]) == {}
    else:
        result = instance.put_remote_entries([tampered])
        assert result.verified == []
        status = instance.storage.get_meta([entry.cid])[entry.cid].status
        assert status is not Status.VERIFIED
        if status is Status.FAILED:
            assert list(result.failed) == [entry.id]
        else:
            assert result.unverified == [entry.cid]
    assert visible_state(instance, db_id, cids) == before
    return entry is not None


@pytest.mark.parametrize("backend", BACKENDS)
@settings(PROPERTY_SETTINGS, max_examples=60)
@given(data=st.data())
def test_any_flipped_byte_is_caught(backend: str, data: st.DataObject) -> None:
    db_id, raws, expected = flip_corpus()
    index = data.draw(st.integers(0, len(raws) - 1), label="entry")
    original = decode_entry(raws[index])
    position = data.draw(st.integers(0, len(original.raw) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="mask")
    tampered = flip(original.raw, position, mask)
    cids = [cid_of(raw) for raw in raws]
    rest = [raw for i, raw in enumerate(raws) if i != index]
    with Nodes(backend) as nodes:
        # Sent in one batch with the rest: a refused entry makes the whole batch refused.
        batch_node = nodes.new()
        if decode_tampered(original, tampered) is None:
            with pytest.raises(EntryError):
                batch_node.put_remote_entries([*rest, tampered])
            assert batch_node.storage.get_meta(cids) == {}
        else:
            result = batch_node.put_remote_entries([*rest, tampered])
            assert cid_of(tampered) not in result.verified
        # Sent alone to a node holding the rest of the database.
        node = nodes.new()
        node.put_remote_entries(rest)
        send_tampered(node, db_id, cids, original, tampered)
        # The genuine entry still completes the database.
        node.put_remote_entries([original.raw])
        assert without_counts(node.open_database(db_id)) == {**expected, "counts": len(raws)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_single_bit_flip_is_caught(backend: str) -> None:
    """Exhaustive: every byte of the root and of the smallest data entry, low and high bit."""
    db_id, raws, expected = flip_corpus()
    cids = [cid_of(raw) for raw in raws]
    smallest = min(range(1, len(raws)), key=lambda i: len(raws[i]))
    for index in (0, smallest):
        original = decode_entry(raws[index])
        with Nodes(backend) as nodes:
            node = nodes.new()
            node.put_remote_entries(raw for i, raw in enumerate(raws) if i != index)
            decoded = 0
            for position in range(len(original.raw)):
                for mask in (0x01, 0x80):
                    decoded += send_tampered(node, db_id, cids, original, flip(original.raw, position, mask))
            # Both paths were taken: refused bytes, and valid bytes with a broken signature.
            assert 0 < decoded < 2 * len(original.raw)
            node.put_remote_entries([original.raw])
            assert without_counts(node.open_database(db_id)) == {**expected, "counts": len(raws)}
