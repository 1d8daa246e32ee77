"""``eidetica-node status``: the Textual app, headless (``App.run_test``).

Textual runs on asyncio, so each test is a plain function around ``asyncio.run``. The
fast test feeds a fake control client; the slow one starts two real nodes, joins them,
and points the app at one of them over its control socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Static

from node.client import AsyncControlClient
from node.errors import ControlError, NotRunningError
from node.tui import DetailScreen, StatusApp
from scripts.cli_node import NodeProcess
from tests import waiting

APP_SIZE = (160, 48)
UI_WAIT_S = 20.0

DB = "bafyr4igquvowpqq6evvf6xal6b3f447yc4jgy6jq23smvbvtaywqidhi3i"
PEER = "ed25519:kwEkNUTeRU2CT4hns749fW9t/l0D56sRXhn4odtNxvU="


def snapshot(*, behind: bool = False, sent: int = 1000) -> dict[str, Any]:
    return {
        "node": {
            "device_id": "ed25519:QA5u0DXCsbP652ttd5ONSIV8tZTDHEe8o4GsyghOSLE=",
            "display_name": "one",
            "data_dir": "/tmp/one",
            "pid": 42,
            "transports": [
                {
                    "name": "p2p",
                    "addresses": ["/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWE8R2"],
                    "status": {"reachability": "public", "reservations": [{"relay": "r"}], "peers": []},
                },
                {"name": "http", "addresses": ["127.0.0.1:8080"]},
            ],
            "metrics": {"bytes_sent": sent, "bytes_received": 0, "syncs": 3, "errors": 1},
        },
        "peers": [
            {
                "pubkey": PEER,
                "display_name": "two",
                "addresses": ["http:127.0.0.1:9"],
                "last_seen_ms": 4000,
                "connection": "relayed",
                "databases": [DB],
            }
        ],
        "databases": [
            {
                "id": DB,
                "name": "notes",
                "entries": 7,
                "verified": 6,
                "unverified": 1,
                "failed": 0,
                "tips": ["t1", "t2"],
                "peers": [
                    {
                        "peer": PEER,
                        "state": "behind" if behind else "up to date",
                        "behind_by": 2 if behind else 0,
                        "ahead": False,
                        "last_sync_ms": 4000,
                        "last_error": None,
                    }
                ],
            }
        ],
        "history": [
            {"at_ms": 3000, "peer": PEER, "db": DB, "sent": 2, "received": 0, "error": "unreachable: gone"},
            {"at_ms": 4000, "peer": PEER, "db": DB, "sent": 1, "received": 3, "error": None},
        ],
        "access_pending": 1,
        "now_ms": 5000,
    }


class FakeClient:
    """Answers like a node; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.behind = False
        self.sent = 1000
        self.down = False

    async def call(self, command: str, **arguments: Any) -> Any:
        self.calls.append((command, arguments))
        if self.down:
            raise NotRunningError(Path("/tmp/one"))
        if command == "status":
            self.sent += 2048
            return snapshot(behind=self.behind, sent=self.sent)
        if command == "db.show":
            return {**snapshot()["databases"][0], "stores": {"data": "docstore:v0"}, "auth": {"keys": {}}}
        if command == "share":
            return {"db": arguments["db"], "ticket": f"eidetica:?db={arguments['db']}&pr=http:127.0.0.1:8080"}
        if command == "sync":
            if arguments.get("peer"):
                raise ControlError("unreachable", "no known address reaches peer")
            return {"results": [{"db": DB, "peer": PEER, "ok": True, "error": None}]}
        raise AssertionError(f"unexpected command {command}")


def cells(app: StatusApp, selector: str) -> list[list[str]]:
    table = app.query_one(selector, DataTable)
    return [[str(cell) for cell in table.get_row_at(index)] for index in range(table.row_count)]


def text_of(widget: Static) -> str:
    return str(widget.render())


async def until(check: Callable[[], bool], pause: Callable[[], Awaitable[None]], what: str) -> None:
    """Let the app run (``pause`` is the pilot's) until ``check()`` holds, within ``UI_WAIT_S``."""
    await waiting.until(check, f"the app showing {what}", timeout_s=UI_WAIT_S, pause=pause)


def test_tui_shows_the_node_and_reacts_to_keys() -> None:
    async def scenario() -> None:
        client = FakeClient()
        app = StatusApp(client, refresh_s=0.1)
        async with app.run_test(size=APP_SIZE) as pilot:
            await until(lambda: app.snapshot is not None, pilot.pause, "a snapshot")
            identity = text_of(app.query_one("#identity", Static))
            assert "one" in identity and "QA5u0DXC" in identity
            assert "/ip4/127.0.0.1/tcp/4001" in identity and "reachability public" in identity
            assert "1 relay reservation(s)" in identity and "1 access request(s) pending" in identity
            assert "syncs 3, errors 1" in identity
            await until(lambda: "KiB/s" in text_of(app.query_one("#identity", Static)), pilot.pause, "throughput")

            [db_row] = cells(app, "#databases")
            assert db_row[:7] == ["notes", "1 up to date", "7", "6", "1", "0", "2"]
            [peer_row] = cells(app, "#peers")
            assert peer_row[:4] == ["two", "relayed", "1s ago", "1"]
            events = cells(app, "#events")
            assert [row[5] for row in events] == ["ok", "unreachable: gone"]  # newest first
            assert events[0][1:3] == ["two", "notes"]

            client.behind = True
            await until(lambda: cells(app, "#databases")[0][1] == "1 behind", pilot.pause, "the peer falling behind")

            # enter on the databases pane opens the database
            assert app.focused is app.query_one("#databases")
            await pilot.press("enter")
            await until(lambda: isinstance(app.screen, DetailScreen), pilot.pause, "the database detail")
            detail = text_of(app.screen.query_one("#detail", Static))
            assert "database notes" in detail and "data (docstore:v0)" in detail and PEER in detail
            await pilot.press("escape")
            await until(lambda: not isinstance(app.screen, DetailScreen), pilot.pause, "the detail closing")

            # t shows the ticket of the highlighted database
            await pilot.press("t")
            await until(lambda: isinstance(app.screen, DetailScreen), pilot.pause, "the ticket")
            assert f"eidetica:?db={DB}" in text_of(app.screen.query_one("#detail", Static))
            await pilot.press("q")  # q closes a detail view, not the app
            await until(lambda: not isinstance(app.screen, DetailScreen), pilot.pause, "the ticket closing")
            assert app.is_running

            # s syncs the highlighted database
            await pilot.press("s")
            await until(lambda: ("sync", {"db": DB}) in client.calls, pilot.pause, "a sync of the database")

            # tab moves to the peers pane; enter opens the peer; s there syncs with that peer
            await pilot.press("tab")
            assert app.focused is app.query_one("#peers")
            await pilot.press("enter")
            await until(lambda: isinstance(app.screen, DetailScreen), pilot.pause, "the peer detail")
            detail = text_of(app.screen.query_one("#detail", Static))
            assert "peer two" in detail and "relayed" in detail and "http:127.0.0.1:9" in detail
            assert "unreachable: gone" in detail
            await pilot.press("escape")
            await until(lambda: not isinstance(app.screen, DetailScreen), pilot.pause, "the peer detail closing")
            await pilot.press("s")
            await until(lambda: ("sync", {"peer": PEER}) in client.calls, pilot.pause, "a sync with the peer")

            # the node going away is shown, not fatal
            client.down = True
            await until(
                lambda: "node not answering" in text_of(app.query_one("#identity", Static)), pilot.pause, "the outage"
            )
            client.down = False
            await until(lambda: "syncs 3" in text_of(app.query_one("#identity", Static)), pilot.pause, "recovery")

            await pilot.press("q")
            await until(lambda: not app.is_running, pilot.pause, "the app quitting")

    asyncio.run(scenario())


@pytest.mark.slow
def test_tui_against_a_running_node(tmp_path: Path) -> None:
    nodes: list[NodeProcess] = []
    try:
        one = NodeProcess.start(tmp_path / "one", "--name", "one", "--no-p2p")
        nodes.append(one)
        two = NodeProcess.start(tmp_path / "two", "--name", "two", "--no-p2p")
        nodes.append(two)
        db = one.ok("db", "create", "notes", "--public", "write:10")
        two.ok("join", one.ok("share", "notes"))
        two.ok("db", "set", "notes", "hello", "world")
        waiting.wait_until(
            lambda: one.cli("db", "get", "notes", "hello").stdout.strip() == "world", "two's write", timeout_s=30
        )

        async def scenario() -> None:
            # The screen of the node that joined: it chose its peer, so its `s` runs an exchange
            # (the sharer never dials a node that only read from it: docs/security.md).
            client = AsyncControlClient(two.data_dir)
            app = StatusApp(client, refresh_s=0.2)
            try:
                async with app.run_test(size=APP_SIZE) as pilot:
                    await until(lambda: bool(app.snapshot and app.snapshot["peers"]), pilot.pause, "the peer")
                    assert two.ready["device_id"] in text_of(app.query_one("#identity", Static))
                    [db_row] = cells(app, "#databases")
                    assert db_row[0] == "notes" and db_row[1] == "1 up to date"
                    [peer_row] = cells(app, "#peers")
                    assert peer_row[0] == "one"
                    await until(lambda: len(cells(app, "#events")) > 0, pilot.pause, "sync events")

                    await pilot.press("t")
                    await until(lambda: isinstance(app.screen, DetailScreen), pilot.pause, "the ticket")
                    ticket = text_of(app.screen.query_one("#detail", Static))
                    assert f"eidetica:?db={db}&pr=http:127.0.0.1:" in ticket
                    await pilot.press("escape")

                    await pilot.press("enter")
                    await until(lambda: isinstance(app.screen, DetailScreen), pilot.pause, "the database")
                    assert one.ready["device_id"] in text_of(app.screen.query_one("#detail", Static))
                    await pilot.press("escape")
                    await until(lambda: not isinstance(app.screen, DetailScreen), pilot.pause, "closing")

                    before = len(app.snapshot["history"]) if app.snapshot else 0
                    await pilot.press("s")
                    await until(
                        lambda: bool(app.snapshot and len(app.snapshot["history"]) > before),
                        pilot.pause,
                        "the sync the key triggered",
                    )
                    await pilot.press("q")
                    await until(lambda: not app.is_running, pilot.pause, "the app quitting")
            finally:
                await client.aclose()

        asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    finally:
        for node in nodes:
            node.stop()
