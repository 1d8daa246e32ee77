"""Benchmark suite ``dag``: the database core on one machine, no networking.

Figures (JSON keys), each measured on a fresh database unless said otherwise:

* ``commits_per_s``: local commits per second on SQLite in a temporary data directory
  (``Instance.open(tmp)``, ``synchronous="full"``, WAL), each commit one transaction with
  one DocStore write ``txn.doc("bench").set("counter", i)``. Also with
  ``synchronous="normal"`` and on an in-memory instance.
* ``sign_per_s``: ``dag.entry.build_entry`` with a SigningKey, building a linear chain of
  non-root entries shaped like the commits above (one parent, a settings pin, one store
  with one parent and a small delta; deltas encoded beforehand): pure create+encode+sign.
* ``verify_store_per_s``: ``Instance.put_remote_entries`` in batches of 1,000 into a fresh
  SQLite instance (``synchronous="full"``), of a linear history committed on an in-memory
  instance (root first); the median of 3 runs. ``verify_store_per_s_one_thread`` is the
  same with each batch given as ``PreparedEntries(batch, None)``: decoded and
  signature-checked on the calling thread only. ``verify_store_per_s_per_core`` is the total over ``os.cpu_count()``.
* ``read_ms``: ``db.doc("bench").get("counter")`` after N commits of linear history, warm:
  same instance, the read right after a commit whose parent's state had been read (the
  median of several commit+read pairs), so it should cost one delta. ``read_cold_ms``:
  the first read after closing and reopening the instance, which starts from the state
  saved at close (``dag/snapshots.py``); ``read_cold_unsaved_ms``: the same with the saved
  states deleted first (what a read costs after a crash: it walks the history from
  SQLite; the OS page cache is warm). The history is built on SQLite with
  ``synchronous="off"`` (durability does not change what a read does); its commit rate
  per stretch of history is ``commits_per_s_sync_off_by_history``, and
  ``commits_per_s_after_history`` is the commit rate as above (``synchronous="full"``, same
  number of commits) on that data dir once it holds the largest history.
* ``bytes_per_entry``: size of the SQLite file (+ WAL, after a checkpoint) over the entry
  count after the ``commits_per_s`` run; ``raw_bytes_per_entry``: mean entry size.
"""

from __future__ import annotations

import gc
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libipld

from dag import Database, Instance, SigningKey
from dag.crdt.doc import DocDelta, encode_doc_delta
from dag.entry import build_entry, decode_entry
from dag.ids import cid_of
from dag.instance import DB_FILE
from dag.keys import verify_signature
from dag.prepared import PreparedEntries


@dataclass(frozen=True)
class Sizes:
    commits: int  # timed commits (and commits after the largest history)
    sign: int  # entries built and signed
    history: int  # commits in the history that put_remote_entries verifies
    read_sizes: tuple[int, ...]  # history sizes at which reads are timed
    primitives: int  # iterations of each primitive


FULL = Sizes(commits=5_000, sign=10_000, history=20_000, read_sizes=(1_000, 10_000, 100_000), primitives=5_000)
QUICK = Sizes(commits=500, sign=1_000, history=2_000, read_sizes=(1_000, 5_000), primitives=1_000)
BATCH = 1_000  # entries per put_remote_entries call
WARMUP = 20  # commits before timing (the first registers the store in _index)
VERIFY_REPEATS = 3  # verify runs per mode (median reported)
WARM_READS = 15  # commit+read pairs timed per history size (median reported)
GOAL_COMMITS = 3_000
GOAL_VERIFY_PER_CORE = 12_000
GOAL_READ_RATIO = 2.0


def _progress(message: str) -> None:
    print(f"[bench dag] {message}", file=sys.stderr, flush=True)


@contextmanager
def _tmpdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="eidetica-bench-") as path:
        yield Path(path)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def _timed_read(db: Database) -> tuple[float, Any]:
    start = time.perf_counter()
    value = db.doc("bench").get("counter")
    return time.perf_counter() - start, value


def _commit(db: Database, i: int) -> None:
    with db.transaction() as txn:
        txn.doc("bench").set("counter", i)


def _commit_run(db: Database, n: int) -> float:
    """Seconds for ``n`` commits (after a warm-up)."""
    for i in range(WARMUP):
        _commit(db, i)
    gc.collect()
    start = time.perf_counter()
    for i in range(n):
        _commit(db, i)
    return time.perf_counter() - start


def _disk_bytes(directory: Path) -> tuple[int, dict[str, int]]:
    """Bytes of the (closed) SQLite database after a WAL checkpoint, and bytes per table/index."""
    path = directory / DB_FILE
    by_object: dict[str, int] = {}
    con = sqlite3.connect(str(path))
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            for name, size in con.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC"):
                by_object[name] = size
        except sqlite3.Error:  # dbstat not compiled in
            pass
        size = path.stat().st_size
        wal = Path(f"{path}-wal")
        if wal.exists():
            size += wal.stat().st_size
    finally:
        con.close()
    return size, by_object


# ---- the parts ---------------------------------------------------------------------------


def bench_commits(n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"commits_n": n}
    for synchronous in ("full", "normal"):
        _progress(f"{n} commits on SQLite, synchronous={synchronous}")
        with _tmpdir() as directory:
            inst = Instance.open(directory, synchronous=synchronous)
            db = inst.create_database(name="bench")
            seconds = _commit_run(db, n)
            rate = n / seconds
            if synchronous == "full":
                out["commits_per_s"] = rate
                raws = [raw for _cid, raw in db.raw_entries()]
                entries = len(db)
                inst.close()
                size, by_object = _disk_bytes(directory)
                out["bytes_per_entry"] = size / entries
                out["raw_bytes_per_entry"] = sum(len(raw) for raw in raws) / len(raws)
                out["db_bytes"] = size
                out["db_entries"] = entries
                out["db_bytes_by_object"] = by_object
            else:
                out["commits_per_s_sync_normal"] = rate
                inst.close()
    return out


def bench_sign(n: int) -> dict[str, Any]:
    _progress(f"build_entry+sign x{n}")
    key = SigningKey.generate()
    root = cid_of(b"bench root")
    deltas = [bytes(libipld.encode_dag_cbor(encode_doc_delta(DocDelta({"counter": i})))) for i in range(n)]

    def chain() -> None:
        prev = root
        for i in range(n):
            entry = build_entry(
                signer=key,
                root=root,
                parents=[prev],
                height=i + 1,
                settings_tips=[root],
                stores=[("bench", [prev], deltas[i])],
            )
            prev = entry.cid

    gc.collect()
    seconds, _ = _timed(chain)
    return {"sign_per_s": n / seconds, "sign_method": "dag.entry.build_entry, linear chain, one store"}


def bench_primitives(raws: list[bytes], n: int) -> dict[str, Any]:
    """Single-thread costs of the pieces that verification is made of."""
    _progress(f"primitives x{n}")
    sample = raws[1 : n + 1]
    key = SigningKey.generate()
    message = sample[0]
    signature = key.sign(message)
    seconds_sign, _ = _timed(lambda: [key.sign(message) for _ in range(n)])
    seconds_verify, _ = _timed(lambda: [verify_signature(key.pubkey_bytes, message, signature) for _ in range(n)])
    seconds_decode, entries = _timed(lambda: [decode_entry(raw) for raw in sample])
    seconds_message, _ = _timed(lambda: [entry.signing_message() for entry in entries])
    seconds_valid, valid = _timed(lambda: [entry.signature_valid() for entry in entries])
    assert all(valid)
    count = len(sample)
    return {
        "ed25519_sign_per_s": n / seconds_sign,
        "ed25519_verify_per_s": n / seconds_verify,
        "decode_entry_per_s": count / seconds_decode,
        "signing_message_per_s": count / seconds_message,
        "signature_valid_per_s": count / seconds_valid,
    }


def _put_all(inst: Instance, raws: list[bytes], one_thread: bool) -> None:
    for start in range(0, len(raws), BATCH):
        batch = raws[start : start + BATCH]
        if one_thread:
            inst.put_remote_entries(PreparedEntries(batch, None))
        else:
            inst.put_remote_entries(batch)


def bench_verify(n: int) -> tuple[dict[str, Any], list[bytes]]:
    _progress(f"{n} commits on an in-memory instance (source history)")
    source = Instance.in_memory()
    db = source.create_database(name="bench")
    seconds = _commit_run(db, n)
    out: dict[str, Any] = {"commits_per_s_memory": n / seconds, "verify_entries": n + WARMUP + 1}
    raws = [raw for _cid, raw in db.raw_entries()]
    assert len(raws) == n + WARMUP + 1
    cpus = os.cpu_count() or 1
    rates: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(VERIFY_REPEATS):
        for one_thread in (False, True):
            _progress(
                f"put_remote_entries {len(raws)} entries, batches of {BATCH}, one_thread={one_thread}"
                f" (run {repeat + 1}/{VERIFY_REPEATS})"
            )
            with _tmpdir() as directory:
                inst = Instance.open(directory)
                gc.collect()
                start = time.perf_counter()
                _put_all(inst, raws, one_thread)
                seconds = time.perf_counter() - start
                counts = inst.open_database(db.id).status_counts()
                inst.close()
            if counts["verified"] != len(raws):
                raise RuntimeError(f"verification went wrong: {counts}")
            rates[one_thread].append(len(raws) / seconds)
    out["verify_store_per_s"] = statistics.median(rates[False])
    out["verify_store_per_s_per_core"] = out["verify_store_per_s"] / cpus
    out["verify_store_per_s_one_thread"] = statistics.median(rates[True])
    out["verify_store_runs"] = {"pool": rates[False], "one_thread": rates[True]}
    source.close()
    return out, raws


def bench_reads(sizes: tuple[int, ...], commits_after: int) -> dict[str, Any]:
    warm: dict[str, float] = {}
    cold: dict[str, float] = {}
    cold_unsaved: dict[str, float] = {}
    history_bytes: dict[str, float] = {}
    build_rate: dict[str, float] = {}
    with _tmpdir() as directory:
        inst = Instance.open(directory, synchronous="off")
        db = inst.create_database(name="bench")
        db_id = db.id
        done = 0
        for size in sizes:
            _progress(f"read after {size} commits: building history (synchronous=off)")
            first, start = done, time.perf_counter()
            while done < size - WARM_READS - 1:
                _commit(db, done)
                done += 1
            build_rate[str(size)] = (done - first) / (time.perf_counter() - start)
            _commit(db, done)
            done += 1
            db.doc("bench").get("counter")  # catch the cached state up (not timed)
            samples = []
            while done < size:
                _commit(db, done)
                done += 1
                seconds, value = _timed_read(db)
                assert value == done - 1, (value, done)
                samples.append(seconds)
            warm[str(size)] = statistics.median(samples) * 1e3
            _progress(f"read after {size} commits: cold reads")
            cold_samples = []
            for _ in range(3 if size <= 10_000 else 1):
                inst.close()
                gc.collect()
                inst = Instance.open(directory, synchronous="off")
                db = inst.open_database(db_id)
                seconds, value = _timed_read(db)
                assert value == done - 1
                cold_samples.append(seconds)
            cold[str(size)] = statistics.median(cold_samples) * 1e3
            inst.close()
            with sqlite3.connect(Path(directory) / DB_FILE) as raw_db:  # as if no state had been checkpointed
                raw_db.execute("DELETE FROM state_rows")
                raw_db.execute("DELETE FROM state_heads")
            raw_db.close()
            inst = Instance.open(directory, synchronous="off")
            db = inst.open_database(db_id)
            seconds, value = _timed_read(db)
            assert value == done - 1
            cold_unsaved[str(size)] = seconds * 1e3
        _progress(f"{commits_after} commits on SQLite, synchronous=full, after {done} commits of history")
        inst.close()
        inst = Instance.open(directory)
        db = inst.open_database(db_id)
        start = time.perf_counter()
        for i in range(commits_after):
            _commit(db, done + i)
        after_rate = commits_after / (time.perf_counter() - start)
        entries = len(db)
        inst.close()
        size_bytes, _ = _disk_bytes(directory)
        history_bytes[str(entries)] = size_bytes / entries
    return {
        "read_ms": warm,
        "read_cold_ms": cold,
        "read_cold_unsaved_ms": cold_unsaved,
        "read_history_build": "SQLite synchronous=off, one data dir grown to each size; cold = close + reopen",
        "bytes_per_entry_history": history_bytes,
        "commits_per_s_sync_off_by_history": build_rate,
        "commits_per_s_after_history": after_rate,
        "commits_after_history": sizes[-1],
    }


# ---- the suite -----------------------------------------------------------------------------


def run(quick: bool) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    started = time.perf_counter()
    result: dict[str, Any] = {}
    result.update(bench_commits(sizes.commits))
    result.update(bench_sign(sizes.sign))
    verify, raws = bench_verify(sizes.history)
    result.update(verify)
    result.update(bench_primitives(raws, sizes.primitives))
    result.update(bench_reads(sizes.read_sizes, sizes.commits))
    read_sizes = [str(size) for size in sizes.read_sizes]
    small, large = read_sizes[0], read_sizes[-1]
    result["read_ratio"] = result["read_ms"][large] / result["read_ms"][small]
    result["read_cold_ratio"] = result["read_cold_ms"][large] / result["read_cold_ms"][small]
    result["goals_met"] = {
        "commits_per_s": result["commits_per_s"] >= GOAL_COMMITS,
        "commits_per_s_after_history": result["commits_per_s_after_history"] >= GOAL_COMMITS,
        "verify_store_per_s_per_core": result["verify_store_per_s_per_core"] >= GOAL_VERIFY_PER_CORE,
        "read_ratio": result["read_ratio"] <= GOAL_READ_RATIO,
    }
    result["elapsed_s"] = time.perf_counter() - started
    return result


def _rate(value: float) -> str:
    return f"{value:,.0f}/s"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    goals = result["goals_met"]
    cpus = result["machine"]["cpu_count"]
    rows: list[tuple[str, str, str, str]] = [
        (
            f"commits_per_s (SQLite, sync=full, {result['commits_n']} commits)",
            _rate(result["commits_per_s"]),
            f">= {GOAL_COMMITS:,}/s",
            _verdict(goals["commits_per_s"]),
        ),
        (
            f"commits_per_s sync=full after {result['commits_after_history']:,} commits of history",
            _rate(result["commits_per_s_after_history"]),
            f"(>= {GOAL_COMMITS:,}/s)",
            "met" if result["commits_per_s_after_history"] >= GOAL_COMMITS else "MISSED",
        ),
        ("commits_per_s_sync_normal", _rate(result["commits_per_s_sync_normal"]), "", ""),
        ("commits_per_s_memory (in-memory instance)", _rate(result["commits_per_s_memory"]), "", ""),
        ("sign_per_s (build_entry + sign)", _rate(result["sign_per_s"]), "", ""),
        (
            f"verify_store_per_s ({result['verify_entries']} entries, batches of {BATCH})",
            _rate(result["verify_store_per_s"]),
            "",
            "",
        ),
        (
            f"verify_store_per_s_per_core (total / {cpus})",
            _rate(result["verify_store_per_s_per_core"]),
            f">= {GOAL_VERIFY_PER_CORE:,}/s",
            _verdict(goals["verify_store_per_s_per_core"]),
        ),
        ("verify_store_per_s_one_thread", _rate(result["verify_store_per_s_one_thread"]), "", ""),
        ("  ed25519 sign, one thread", _rate(result["ed25519_sign_per_s"]), "", ""),
        ("  ed25519 verify, one thread", _rate(result["ed25519_verify_per_s"]), "", ""),
        ("  decode_entry, one thread", _rate(result["decode_entry_per_s"]), "", ""),
        ("  Entry.signing_message, one thread", _rate(result["signing_message_per_s"]), "", ""),
        ("  Entry.signature_valid, one thread", _rate(result["signature_valid_per_s"]), "", ""),
    ]
    previous = 0
    for size, rate in result["commits_per_s_sync_off_by_history"].items():
        rows.append((f"commits_per_s sync=off, history {previous:,} to {int(size):,}", _rate(rate), "", ""))
        previous = int(size)
    for size, ms in result["read_ms"].items():
        rows.append((f"read_ms warm, after {int(size):,} commits", f"{ms:.3f} ms", "", ""))
    for size, ms in result["read_cold_ms"].items():
        rows.append((f"read_cold_ms (reopen), after {int(size):,} commits", f"{ms:.1f} ms", "", ""))
    for size, ms in result.get("read_cold_unsaved_ms", {}).items():
        rows.append((f"read_cold_ms (reopen, no saved state), after {int(size):,}", f"{ms:.1f} ms", "", ""))
    sizes = list(result["read_ms"])
    span = f"{int(sizes[-1]) // 1000}K / {int(sizes[0]) // 1000}K"
    rows.append(
        (
            f"read ratio warm {span}",
            f"{result['read_ratio']:.2f}x",
            f"<= {GOAL_READ_RATIO:.0f}x",
            _verdict(goals["read_ratio"]),
        )
    )
    cold_ok = result["read_cold_ratio"] <= GOAL_READ_RATIO
    rows.append(
        (
            f"read ratio cold {span}",
            f"{result['read_cold_ratio']:.1f}x",
            f"(<= {GOAL_READ_RATIO:.0f}x)",
            "met (cold)" if cold_ok else "missed (cold)",
        )
    )
    rows.append(
        (
            f"bytes_per_entry (SQLite, {result['db_entries']} entries)",
            f"{result['bytes_per_entry']:,.0f} B",
            "",
            "",
        )
    )
    for entries, value in result["bytes_per_entry_history"].items():
        rows.append((f"bytes_per_entry ({int(entries):,} entries)", f"{value:,.0f} B", "", ""))
    rows.append(("raw_bytes_per_entry", f"{result['raw_bytes_per_entry']:,.0f} B", "", ""))
    rows.append(("elapsed", f"{result['elapsed_s']:.1f} s", "", ""))
    return rows
