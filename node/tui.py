"""``eidetica-node status``: a live view of a running node (Textual).

The app polls the node's ``status`` command once a second over the control socket and
redraws: identity and addresses, databases (entries by verification status, tips, and
for each peer whether it is up to date, behind or ahead), peers (connected directly or
through a relay, last seen), recent sync events and throughput. It holds no state of
its own that the node does not have, so it can be closed and reopened at any time.

Keys: tab / shift+tab move between panes, enter opens the highlighted database or peer,
s syncs it now (everything when the events pane is focused), t shows a database's
ticket, r refreshes, escape closes a detail view, q quits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import ClassVar, Protocol

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.notifications import SeverityLevel
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Header, Static

from .api import DB_SHOW, SHARE, STATUS, SYNC, DatabaseDetail, DatabaseShow, StatusResult, TransportStatusJSON
from .errors import NodeError
from .render import ago, short, terminal_safe

REFRESH_S = 1.0

# Each pane: its selector, title and columns (key, label); rows are filled by key.
TABLES: list[tuple[str, str, list[tuple[str, str]]]] = [
    (
        "#databases",
        "databases",
        [
            ("name", "name"),
            ("peers", "peers"),
            ("entries", "entries"),
            ("verified", "verified"),
            ("unverified", "unverified"),
            ("failed", "failed"),
            ("tips", "tips"),
            ("id", "id"),
        ],
    ),
    (
        "#peers",
        "peers",
        [
            ("name", "name"),
            ("connection", "connection"),
            ("seen", "last seen"),
            ("dbs", "dbs"),
            ("device", "device"),
        ],
    ),
    (
        "#events",
        "recent syncs",
        [
            ("when", "when"),
            ("peer", "peer"),
            ("db", "database"),
            ("sent", "sent"),
            ("received", "received"),
            ("result", "result"),
        ],
    ),
]


class Client(Protocol):
    """What the app needs of a control client (``AsyncControlClient``, or a fake in tests)."""

    async def call(self, command: str, **arguments: object) -> object: ...


def _rate(bytes_per_s: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if bytes_per_s < 1024 or unit == "GiB":
            return f"{bytes_per_s:.0f} {unit}/s" if unit == "B" else f"{bytes_per_s:.1f} {unit}/s"
        bytes_per_s /= 1024
    return ""


def transport_summary(status: TransportStatusJSON | None) -> str:
    """The parts of a transport's status report a person wants at a glance."""
    if not status:
        return ""
    parts = []
    if status.get("reachability"):
        parts.append(f"reachability {status['reachability']}")
    reservations = status.get("reservations")
    if isinstance(reservations, list) and reservations:
        parts.append(f"{len(reservations)} relay reservation(s)")
    service = status.get("relay_service")
    if isinstance(service, dict):
        parts.append(f"relay service on ({service.get('active_circuits', 0)} circuits)")
    return ", ".join(parts)


def peer_summary(db: DatabaseDetail) -> str:
    """``2 up to date, 1 behind`` for a database's peers."""
    states: dict[str, int] = {}
    for peer in db.get("peers", []):
        states[peer["state"]] = states.get(peer["state"], 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no peers"


Cell = str | int | Text
Rows = dict[str, dict[str, Cell]]  # row key -> column key -> cell


def database_rows(snapshot: StatusResult) -> Rows:
    return {
        db["id"]: {
            "name": db.get("name") or "(unnamed)",
            "id": short(db["id"], 20),
            "entries": db["entries"],
            "verified": db["verified"],
            "unverified": db["unverified"],
            "failed": Text(str(db["failed"]), style="bold red" if db["failed"] else ""),
            "tips": len(db["tips"]),
            "peers": peer_summary(db),
        }
        for db in snapshot["databases"]
    }


def peer_rows(snapshot: StatusResult) -> Rows:
    now = snapshot.get("now_ms")
    return {
        peer["pubkey"]: {
            "name": peer.get("display_name") or "-",
            "device": short(peer["pubkey"], 20),
            "connection": Text(
                terminal_safe(peer.get("connection") or "not connected"),
                style="green" if peer.get("connection") else "dim",
            ),
            "seen": ago(peer.get("last_seen_ms"), now),
            "dbs": len(peer.get("databases", [])),
        }
        for peer in snapshot["peers"]
    }


def event_rows(snapshot: StatusResult) -> Rows:
    """Recent syncs, newest first, keyed by position."""
    now = snapshot.get("now_ms")
    names = {p["pubkey"]: p.get("display_name") or short(p["pubkey"]) for p in snapshot["peers"]}
    db_names = {d["id"]: d.get("name") or short(d["id"]) for d in snapshot["databases"]}
    events: Rows = {}
    for index, row in enumerate(reversed(snapshot.get("history", []))):  # newest first
        error = row.get("error")
        events[str(index)] = {
            "when": ago(row.get("at_ms"), now),
            "peer": names.get(row.get("peer", ""), short(row.get("peer"))),
            "db": db_names.get(row.get("db", ""), short(row.get("db"))),
            "sent": row.get("sent", 0),
            "received": row.get("received", 0),
            "result": Text(terminal_safe(error)[:80], style="red") if error else Text("ok", style="green"),
        }
    return events


def identity(snapshot: StatusResult, rates: tuple[float, float]) -> Text:
    """The top pane: who the node is, where it listens, its throughput (``rates``: up, down)."""
    node = snapshot["node"]
    text = Text()
    text.append(terminal_safe(str(node.get("display_name") or "-")), style="bold")
    text.append(f"  {node['device_id']}\n")
    text.append(f"data {node['data_dir']}   pid {node.get('pid')}\n", style="dim")
    for transport in node.get("transports", []):
        text.append(f"{transport['name']:<5}", style="bold")
        text.append(" " + terminal_safe(", ".join(transport.get("addresses") or ["not listening"])))
        summary = transport_summary(transport.get("status"))
        if summary:
            text.append(f"  {summary}", style="cyan")
        text.append("\n")
    totals = node.get("metrics", {})
    text.append(
        f"throughput ↑ {_rate(rates[0])}  ↓ {_rate(rates[1])}   "
        f"syncs {totals.get('syncs', 0)}, errors {totals.get('errors', 0)}"
    )
    pending = snapshot.get("access_pending", 0)
    if pending:
        text.append(f"   {pending} access request(s) pending (eidetica-node access list)", style="bold yellow")
    return text


def database_lines(detail: DatabaseShow) -> list[str]:
    """A database's detail view (``db.show``)."""
    lines = [
        f"id        {detail['id']}",
        f"entries   {detail['entries']} ({detail['verified']} verified, {detail['unverified']} unverified, "
        f"{detail['failed']} failed)",
        f"tips      {', '.join(detail['tips'])}",
        f"stores    {', '.join(f'{k} ({v})' for k, v in sorted(detail.get('stores', {}).items())) or 'none'}",
        "",
        "peers:",
    ]
    for peer in detail.get("peers", []):
        behind = f" by {peer['behind_by']} entries" if peer.get("behind_by") else ""
        error = f"\n    last error: {peer['last_error']}" if peer.get("last_error") else ""
        lines.append(f"  {peer['peer']}\n    {peer['state']}{behind}, synced {ago(peer['last_sync_ms'])}{error}")
    if not detail.get("peers"):
        lines.append("  none yet: press t for a ticket to share")
    return [*lines, "", "auth:", json.dumps(detail.get("auth", {}), indent=2)]


def peer_lines(snapshot: StatusResult, pubkey: str) -> tuple[str, str] | None:
    """A peer's detail view (title, body) from the last snapshot, or None if it is gone."""
    peer = next((p for p in snapshot.get("peers", []) if p["pubkey"] == pubkey), None)
    if peer is None:
        return None
    now = snapshot.get("now_ms")
    lines = [
        f"device     {peer['pubkey']}",
        f"connection {peer.get('connection') or 'not connected'}",
        f"last seen  {ago(peer.get('last_seen_ms'), now)}",
        "addresses:",
        *[f"  {a}" for a in peer.get("addresses", [])],
        "databases:",
    ]
    for db in snapshot.get("databases", []):
        for state in db.get("peers", []):
            if state["peer"] == pubkey:
                lines.append(f"  {db.get('name') or db['id']}: {state['state']}, synced {ago(state['last_sync_ms'])}")
    lines.append("recent syncs:")
    for row in reversed(snapshot.get("history", [])):
        if row.get("peer") == pubkey:
            result = row.get("error") or "ok"
            lines.append(
                f"  {ago(row.get('at_ms'), now)}  {short(row.get('db'), 20)}  "
                f"sent {row.get('sent', 0)}, received {row.get('received', 0)}: {result}"
            )
    return f"peer {peer.get('display_name') or short(pubkey)}", "\n".join(lines)


class DetailScreen(ModalScreen[None]):
    """A database's or peer's details; escape or q closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss", "Close"), Binding("q", "dismiss", "Close")]
    DEFAULT_CSS = """
    DetailScreen { align: center middle; }
    DetailScreen > VerticalScroll {
        width: 90%; height: 80%; border: thick $accent; background: $surface; padding: 1 2;
    }
    """

    def __init__(self, title: str, body: str) -> None:
        super().__init__()
        # Peer-supplied text (names, errors, addresses) is in both: escaped line by line.
        self.title_text = terminal_safe(title)
        self.body = "\n".join(terminal_safe(line) for line in body.split("\n"))

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(Text.assemble((self.title_text, "bold"), "\n\n", self.body), id="detail")

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)


class StatusApp(App[None]):
    """The live view (see the module docstring)."""

    TITLE = "eidetica-node"
    CSS = """
    #identity { height: auto; padding: 0 1; border: round $primary; }
    #panes { height: 1fr; }
    #databases { width: 3fr; height: 1fr; border: round $secondary; }
    #peers { width: 2fr; height: 1fr; border: round $secondary; }
    #events { height: 10; border: round $secondary; }
    DataTable:focus { border: round $accent; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("s", "sync", "Sync"),
        Binding("t", "ticket", "Ticket"),
        Binding("r", "refresh", "Refresh"),
        Binding("enter", "open", "Open"),
        Binding("tab", "focus_next", "Next pane"),
    ]

    def __init__(self, client: Client, *, refresh_s: float = REFRESH_S, owns_client: bool = False) -> None:
        super().__init__()
        self.client = client
        self.owns_client = owns_client
        self.refresh_s = refresh_s
        self.snapshot: StatusResult | None = None
        self.error: str | None = None
        self._last_totals: tuple[float, int, int] | None = None
        self.rates = (0.0, 0.0)

    # ---- layout -------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("connecting to the node…", id="identity")
        with Horizontal(id="panes"):
            yield DataTable(id="databases", cursor_type="row", zebra_stripes=True)
            yield DataTable(id="peers", cursor_type="row", zebra_stripes=True)
        yield DataTable(id="events", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        for selector, title, columns in TABLES:
            table = self.query_one(selector, DataTable)
            table.border_title = title
            for key, label in columns:
                table.add_column(label, key=key)
        databases = self.query_one("#databases", DataTable)
        databases.focus()
        self.poll()
        self.set_interval(self.refresh_s, self.poll)

    async def on_unmount(self) -> None:
        close = getattr(self.client, "aclose", None)
        if self.owns_client and close is not None:
            await close()

    # ---- polling ------------------------------------------------------------------------

    @work(exclusive=True, group="poll")
    async def poll(self) -> None:
        try:
            snapshot = STATUS.result(await self.client.call(STATUS.name))
        except NodeError as exc:
            self.error = str(exc)
            self.query_one("#identity", Static).update(
                Text.assemble(("node not answering", "bold red"), f": {terminal_safe(str(exc))}")
            )
            return
        self.error = None
        self.apply(snapshot)

    def apply(self, snapshot: StatusResult) -> None:
        """Redraw from one ``status`` answer (public so tests can feed one directly)."""
        self.snapshot = snapshot
        self._update_rates(snapshot)
        self.query_one("#identity", Static).update(identity(snapshot, self.rates))
        self.sub_title = terminal_safe(str(snapshot["node"].get("display_name") or ""))
        self._fill("#databases", database_rows(snapshot))
        self._fill("#peers", peer_rows(snapshot))
        # Keyed by position: the newest row stays on top, and the cells update in place.
        self._fill("#events", event_rows(snapshot))

    def _update_rates(self, snapshot: StatusResult) -> None:
        totals = snapshot["node"].get("metrics", {})
        now = time.monotonic()
        sent, received = int(totals.get("bytes_sent", 0)), int(totals.get("bytes_received", 0))
        if self._last_totals is not None:
            then, sent_before, received_before = self._last_totals
            elapsed = max(now - then, 1e-3)
            self.rates = (max(0, sent - sent_before) / elapsed, max(0, received - received_before) / elapsed)
        self._last_totals = (now, sent, received)

    def _fill(self, selector: str, rows: Rows) -> None:
        """Make the table show ``rows`` (key -> column values), in place, keeping the cursor.

        Text cells become plain :class:`Text` with controls escaped: a DataTable reads a
        ``str`` cell as markup, so a peer named ``[@click=app.quit]`` would be an action.
        """
        rows = {key: {column: _cell(value) for column, value in values.items()} for key, values in rows.items()}
        table = self.query_one(selector, DataTable)
        existing = {key.value for key in table.rows if key.value is not None}
        for key in existing - set(rows):
            table.remove_row(key)
        for key, values in rows.items():
            if key in existing:
                for column, value in values.items():
                    table.update_cell(key, column, value)
            else:
                table.add_row(*(values[str(column.value)] for column in table.columns), key=key)

    # ---- actions --------------------------------------------------------------------------

    def _selected(self, selector: str) -> str | None:
        table = self.query_one(selector, DataTable)
        if table.row_count == 0:
            return None
        row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        return row_key.value

    def _say(self, message: str, *, title: str = "", severity: SeverityLevel = "information") -> None:
        """A notification; its text (errors quote peers) escaped and never read as markup."""
        self.notify(terminal_safe(message), title=title, severity=severity, markup=False)

    def _focused_pane(self) -> str | None:
        focused = self.focused
        return f"#{focused.id}" if focused is not None and focused.id else None

    def action_refresh(self) -> None:
        self.poll()

    def action_open(self) -> None:
        pane = self._focused_pane()
        if pane == "#databases" and (db := self._selected("#databases")):
            self.open_database(db)
        elif pane == "#peers" and (peer := self._selected("#peers")):
            self.open_peer(peer)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter (or a click) on a row opens it."""
        if event.data_table.id == "databases" and event.row_key.value:
            self.open_database(event.row_key.value)
        elif event.data_table.id == "peers" and event.row_key.value:
            self.open_peer(event.row_key.value)

    @work(group="detail")
    async def open_database(self, db_id: str) -> None:
        try:
            detail = DB_SHOW.result(await self.client.call(DB_SHOW.name, db=db_id))
        except NodeError as exc:
            self._say(str(exc), title="cannot open database", severity="error")
            return
        title = f"database {detail.get('name') or detail['id']}"
        await self.push_screen(DetailScreen(title, "\n".join(database_lines(detail))))

    def open_peer(self, pubkey: str) -> None:
        if self.snapshot is None:
            return
        shown = peer_lines(self.snapshot, pubkey)
        if shown is not None:
            self.push_screen(DetailScreen(*shown))

    @work(group="sync")
    async def action_sync(self) -> None:
        pane = self._focused_pane()
        arguments: dict[str, str] = {}
        if pane == "#databases" and (db := self._selected("#databases")):
            arguments["db"] = db
        elif pane == "#peers" and (peer := self._selected("#peers")):
            arguments["peer"] = peer
        self._say("syncing " + (arguments.get("db") or arguments.get("peer") or "everything") + "…")
        try:
            result = SYNC.result(await self.client.call(SYNC.name, **arguments))
        except NodeError as exc:
            self._say(str(exc), title="sync failed", severity="error")
            return
        failed = [r for r in result["results"] if not r["ok"]]
        if failed:
            self._say(f"{len(failed)} of {len(result['results'])} failed: {failed[0]['error']}", severity="error")
        else:
            self._say(f"synced {len(result['results'])} pair(s)")
        self.poll()

    @work(group="ticket")
    async def action_ticket(self) -> None:
        db = self._selected("#databases")
        if db is None:
            self._say("no database to share", severity="warning")
            return
        try:
            result = SHARE.result(await self.client.call(SHARE.name, db=db))
        except NodeError as exc:
            self._say(str(exc), title="no ticket", severity="error")
            return
        await self.push_screen(DetailScreen("ticket (give it to: eidetica-node join TICKET)", result["ticket"]))


def _cell(value: Cell) -> Cell:
    """A table cell that shows its text as written (a ``Text`` built from raw text: escape it first)."""
    if isinstance(value, str):
        return Text(terminal_safe(value))
    if isinstance(value, Text):
        return Text(terminal_safe(value.plain), style=value.style)
    return value


def run_tui(data_dir: Path) -> None:
    """Run the app against the node of ``data_dir`` until the user quits."""
    from .client import AsyncControlClient

    StatusApp(AsyncControlClient(data_dir), owns_client=True).run()


__all__ = ["StatusApp", "run_tui"]
