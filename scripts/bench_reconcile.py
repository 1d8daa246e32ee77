"""Suite ``reconcile``: entries, bytes and round trips per sync scenario, over the simulated network.

Two nodes share a database of N entries (N = 10,000; quick: 1,000), built by a bootstrap
from A to B (scenario ``bootstrap``). Then, with sync on commit turned off so that only
the measured exchange moves entries:

* ``fast_forward``: A writes 1 entry; B syncs with A.
* ``diverged_1_1``: A and B each write 1; B syncs with A.
* ``diverged_100_100``: A and B each write 100; B syncs with A.

Each scenario counts the entries sent both ways, the bytes of every message of the
exchange, and its request/answer round trips (the handshake, two round trips once per
connection, is counted separately). ``min_entries`` is what the other side lacked.
Bootstrap throughput (entries/s, verification included) is measured for 10K and 100K
entries (quick: 2K) on the same network, in real time.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import trio

from dag import Instance, Permission
from sync import Address, SyncConfig, enable_sync, run_inline
from transports.memory import SimNetwork


def _progress(message: str) -> None:
    print(f"[reconcile] {message}", file=sys.stderr, flush=True)


def _grow(db: Any, count: int, tag: str) -> None:
    for i in range(count):
        with db.transaction() as txn:
            txn.doc("notes").set(f"{tag}{i % 50}", i)


def _make_source(entries: int) -> tuple[Instance, str]:
    source = Instance.in_memory()
    db = source.create_database(name="bench")
    with db.transaction() as txn:
        txn.settings().set_global(Permission.write(10))
    _grow(db, entries - 2, "a")
    return source, db.id


def _raw_size(db: Any, cids: list[bytes]) -> int:
    return sum(len(db.raw(c) or b"") for c in cids)


async def _scenarios(shared: int) -> dict[str, Any]:
    network = SimNetwork(0)
    source, db_id = _make_source(shared)
    config = SyncConfig(display_name="bench", default_interval_s=10**6)
    out: dict[str, Any] = {}
    async with (
        enable_sync(source, config=config, offload=run_inline) as a,
        enable_sync(Instance.in_memory(), config=config, offload=run_inline) as b,
    ):
        a.register_transport("memory", network.transport("A"))
        b.register_transport("memory", network.transport("B"))
        await a.accept_connections()
        await b.accept_connections()
        db_a = source.open_database(db_id)
        size = len(db_a)
        network.stats.reset()
        started = time.perf_counter()
        peer = await b.sync_with_peer(Address("memory", "A"), db_id)
        seconds = time.perf_counter() - started
        handshake_trips = 2
        out["bootstrap"] = {
            "entries_sent": a.handler.stats.entries_sent,
            "min_entries": size,
            "bytes_sent": network.stats.bytes,
            "min_bytes": _raw_size(db_a, [c for c, _ in db_a.raw_entries()]),
            "round_trips": network.stats.requests - handshake_trips,
            "handshake_round_trips": handshake_trips,
            "seconds": round(seconds, 3),
        }
        db_b = b.instance.open_database(db_id, key=source.device_key)
        for node, other in ((a, b), (b, a)):
            node.state.relate(db_id, other.device_id, on_commit=False, interval_s=10**6)
        # Let the push the bootstrap's own writes queued run now (it finds nothing), so that
        # only the measured exchanges cross the network below.
        await b.flush()
        await a.flush()
        for name, mine, theirs in (("fast_forward", 1, 0), ("diverged_1_1", 1, 1), ("diverged_100_100", 100, 100)):
            before_a, before_b = set(db_a.tip_cids()), set(db_b.tip_cids())
            _grow(db_a, mine, f"{name}-a")
            _grow(db_b, theirs, f"{name}-b")
            missing_b = db_a.missing_from(list(before_a))  # what B lacks
            missing_a = db_b.missing_from(list(before_b))  # what A lacks
            minimum = len(missing_a) + len(missing_b)
            min_bytes = _raw_size(db_a, missing_b) + _raw_size(db_b, missing_a)
            network.stats.reset()
            sent_before = a.handler.stats.entries_sent + a.handler.stats.entries_received
            await b.sync_now(peer, db_id)
            sent = a.handler.stats.entries_sent + a.handler.stats.entries_received - sent_before
            assert db_a.tips() == db_b.tips(), f"{name}: not converged"
            out[name] = {
                "entries_sent": sent,
                "min_entries": minimum,
                "bytes_sent": network.stats.bytes,
                "min_bytes": min_bytes,
                "round_trips": network.stats.requests,
            }
            _progress(f"{name}: {out[name]}")
    return out


async def _bootstrap_rate(entries: int) -> dict[str, Any]:
    network = SimNetwork(1)
    _progress(f"building {entries} entries")
    source, db_id = _make_source(entries)
    async with (
        enable_sync(source, offload=run_inline) as a,
        enable_sync(Instance.in_memory(), offload=run_inline) as b,
    ):
        a.register_transport("memory", network.transport("A"))
        b.register_transport("memory", network.transport("B"))
        await a.accept_connections()
        started = time.perf_counter()
        await b.sync_with_peer(Address("memory", "A"), db_id)
        seconds = time.perf_counter() - started
        counts = b.instance.open_database(db_id).status_counts()
        assert counts["verified"] == entries and counts["unverified"] == counts["failed"] == 0
    return {"entries": entries, "seconds": round(seconds, 3), "entries_per_s": round(entries / seconds)}


def run(quick: bool) -> dict[str, Any]:
    shared = 1_000 if quick else 10_000
    _progress(f"scenarios over {shared} shared entries")
    scenarios = trio.run(_scenarios, shared)
    rates = {}
    for size in [2_000] if quick else [10_000, 100_000]:
        rates[str(size)] = trio.run(_bootstrap_rate, size)
        _progress(f"bootstrap {size}: {rates[str(size)]}")
    return {"shared_entries": shared, "scenarios": scenarios, "bootstrap_rate": rates}


def report(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, s in result["scenarios"].items():
        ratio = s["entries_sent"] / s["min_entries"] if s["min_entries"] else 0.0
        goal_entries = "<= 1.05x min" if name != "bootstrap" else "= min"
        ok = ratio <= 1.05 and (name == "bootstrap" or s["round_trips"] <= 2)
        rows.append(
            (
                f"{name} entries sent / min",
                f"{s['entries_sent']} / {s['min_entries']}",
                goal_entries,
                "ok" if ok else "MISSED",
            )
        )
        rows.append((f"{name} bytes sent / entry bytes", f"{s['bytes_sent']} / {s['min_bytes']}", "", ""))
        rows.append((f"{name} round trips", str(s["round_trips"]), "<= 2" if name != "bootstrap" else "", ""))
    for size, r in result["bootstrap_rate"].items():
        rows.append(
            (f"bootstrap {size} entries (simulated net)", f"{r['entries_per_s']}/s in {r['seconds']} s", "", "")
        )
    return rows
