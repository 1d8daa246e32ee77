"""Opening data directories written before the sync ledger (``tests/fixtures/datadir_v2.tar.gz``).

The fixture was made by real daemons of that format (``tests/fixtures/make_datadir_v2.py``):
``_sync`` then held cursors, history and last-seen times as signed entries. Opening it with
this code copies them into the ledger once; everything a user or an admin saw before is
still there, and new exchanges add nothing to ``_sync``.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from dag import Instance
from scripts.cli_node import NodeProcess
from sync.ledger import MIGRATED, SPACE
from sync.state import APPROVED, PENDING, SYNC_DB_KEY, SyncState

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "datadir_v2.tar.gz"


@pytest.fixture
def datadir(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path, json.loads((tmp_path / "manifest.json").read_text())


def _sync_entries(directory: Path) -> int:
    with Instance.open(directory) as instance:
        stored = instance.get_value(SYNC_DB_KEY)
        assert stored is not None
        return len(instance.open_database(stored))


def test_open_migrates_bookkeeping_once(datadir: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = datadir
    db, guest = manifest["db"], manifest["guest_id"]
    before = _sync_entries(root / "admin")
    with Instance.open(root / "admin") as instance:
        assert MIGRATED not in instance.local_items(SPACE)  # the fixture is of the old format
        state = SyncState.open(instance)
        assert instance.local_items(SPACE)[MIGRATED] == b"1"
        [old_row] = manifest["admin_status"]["databases"][0]["peers"]
        cursor = state.cursor(db, guest)
        assert cursor.last_sync_ms == old_row["last_sync_ms"] and cursor.last_error is None
        assert cursor.common  # the tips both held
        assert state.history() == manifest["admin_status"]["history"]
        [old_peer] = manifest["admin_peers"]["peers"]
        peer = state.peer(guest)
        assert peer is not None and peer.last_seen_ms == old_peer["last_seen_ms"]
        assert [str(a) for a in peer.addresses] == old_peer["addresses"]
        assert [(r.db, r.peer) for r in state.relationships()] == [(db, guest)]
        requests = {r.request_id: r for r in state.access_requests()}
        assert requests[manifest["pending_request"]].status == PENDING
        assert requests[manifest["pending_request"]].key == manifest["stranger_id"]
        assert requests[manifest["approved_request"]].status == APPROVED
        notes = instance.open_database(db)
        assert {k: notes.doc("data").get(k) for k in manifest["values"]} == manifest["values"]
        assert sorted(notes.table("todos").rows()) == sorted(manifest["rows"])
        # Opening again does not migrate again: what the ledger holds now wins over _sync.
        state.record_sync(db, guest, now_ms=1, common=[], sent=5, received=6, error="later")
        state.ledger.flush_now()
    with Instance.open(root / "admin") as instance:
        state = SyncState.open(instance)
        assert state.cursor(db, guest).last_error == "later"
        assert state.history()[-1]["sent"] == 5
        assert len(state.history()) == len(manifest["admin_status"]["history"]) + 1
    assert _sync_entries(root / "admin") == before  # bookkeeping wrote nothing to _sync


@pytest.mark.slow
def test_daemons_on_migrated_directories_keep_state_and_stop_growing_sync(
    datadir: tuple[Path, dict[str, Any]],
) -> None:
    root, manifest = datadir
    db, guest_id = manifest["db"], manifest["guest_id"]
    counts = {name: _sync_entries(root / name) for name in ("admin", "guest")}
    nodes: list[NodeProcess] = []
    try:
        admin = NodeProcess.start(root / "admin", "--no-http")
        nodes.append(admin)
        guest = NodeProcess.start(root / "guest", "--no-http")
        nodes.append(guest)
        # (the guest may already have resumed syncing: what came before is kept, in order)
        status = admin.json("status")
        old = manifest["admin_status"]["history"]
        assert status["history"][: len(old)] == old
        assert status["access_pending"] == 1
        [row] = status["databases"][0]["peers"]
        assert row["last_sync_ms"] >= manifest["admin_status"]["databases"][0]["peers"][0]["last_sync_ms"]
        [peer] = admin.json("peers")["peers"]
        assert (
            peer["pubkey"] == guest_id and peer["last_seen_ms"] >= manifest["admin_peers"]["peers"][0]["last_seen_ms"]
        )
        [pending] = admin.json("access", "list")["requests"]
        assert pending["id"] == manifest["pending_request"]
        for key, value in manifest["values"].items():
            assert admin.ok("db", "get", "notes", key) == value
            assert guest.ok("db", "get", db, key) == value
        listed = guest.ok("table", "list", db, "todos")
        assert all(row_id in listed for row_id in manifest["rows"])

        # New exchanges (the admin listens on a new port: the guest learns it from a ticket).
        guest.ok("join", admin.ok("share", "notes"))
        guest.ok("db", "set", db, "after", "migration")
        guest.ok("sync", db)
        assert admin.ok("db", "get", "notes", "after") == "migration"
        history = guest.json("status")["history"]
        assert history[-1]["db"] == db and history[-1]["error"] is None  # the guest's rows grew...
        [seen] = guest.json("peers")["peers"]
        assert seen["last_seen_ms"] > manifest["guest_peers"]["peers"][0]["last_seen_ms"]  # ...and it saw admin anew
    finally:
        for node in reversed(nodes):
            node.stop()
    # ...while _sync kept its entries: the guest's write is in "notes", the addresses the
    # admin now listens on are the only change to a peer record (one entry at most).
    assert _sync_entries(root / "admin") <= counts["admin"] + 1
    assert _sync_entries(root / "guest") <= counts["guest"] + 1
    with Instance.open(root / "guest") as instance:
        state = SyncState.open(instance)
        assert state.history()[-1]["db"] == db and state.history()[-1]["error"] is None
        assert state.cursor(db, manifest["admin_id"]).last_sync_ms == state.history()[-1]["at_ms"]
