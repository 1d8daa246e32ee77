"""Human-readable output of the CLI's commands (``--json`` prints the results as they are).

One function per command result; each returns the lines to print, so the CLI stays a
dispatcher and the wording lives in one place.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import TypeVar

from . import api
from .api import (
    AccessList,
    CreatedDatabase,
    DatabaseList,
    DatabaseShow,
    Decision,
    HealthResult,
    InfoResult,
    JoinResult,
    OfflineInfo,
    PeerList,
    RowCreated,
    RowList,
    ShareResult,
    StopResult,
    SyncResult,
    TransportStatusJSON,
    ValueResult,
)

R = TypeVar("R")

# What must never reach a terminal raw from text someone else wrote (a peer's display
# name, a database name, a value, an error a peer sent): C0 controls and DEL (ESC starts
# every escape sequence), C1 controls (U+009B is a one-character CSI on some terminals),
# bidirectional overrides and isolates (they reorder what is shown), line and paragraph
# separators, and lone surrogates. Everything else, emoji and every script, is kept.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
# In JSON output, json.dumps already escapes C0; the rest of the set above is escaped too.
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def terminal_safe(text: str) -> str:
    """``text`` with every control character shown escaped, as ``repr`` would (``\\x1b[2J``)."""
    return _UNSAFE.sub(_escaped, text)


def json_safe(text: str) -> str:
    """JSON text (from ``json.dumps``) with the controls it leaves raw written as ``\\uXXXX`` escapes.

    Those characters only ever appear inside JSON strings, where the escape means the
    same character: the document is unchanged for a parser, harmless for a terminal.
    """
    return _UNSAFE_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def short(key: str | None, width: int = 16) -> str:
    """A device key or ID shortened for a table (the full one is in ``--json``)."""
    if not key:
        return "-"
    return key if len(key) <= width else key[: width - 1] + "…"


def ago(ms: int | None, now_ms: int | None = None) -> str:
    if ms is None:
        return "never"
    seconds = max(0, ((now_ms if now_ms is not None else int(time.time() * 1000)) - ms) // 1000)
    if seconds < 60:
        return f"{seconds}s ago"
    if seconds < 3600:
        return f"{seconds // 60}m ago"
    if seconds < 86400:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


def value_text(value: object) -> str:
    """A stored value as text: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def info(result: InfoResult | OfflineInfo) -> list[str]:
    lines = [
        f"data directory  {result['data_dir']}",
        f"device ID       {result['device_id']}",
    ]
    if result["running"] is True:
        lines.append(f"node            running (pid {result['pid']}), name {result.get('display_name')}")
        for address in result.get("addresses") or ["(listening on no address)"]:
            lines.append(f"address         {address}")
        totals = result.get("metrics", {})
        lines.append(
            f"peers           {result.get('peers', 0)} known; {totals.get('syncs', 0)} syncs, "
            f"{totals.get('errors', 0)} errors"
        )
    else:
        lines.append(f"node            not running (start it: eidetica-node run --data-dir {result['data_dir']})")
    if result["running"] is True:
        for transport in result.get("transports", []):
            lines += hole_punches(transport.get("status") or {})
    databases = result.get("databases", [])
    if not databases:
        lines.append("databases       none yet (create one: eidetica-node db create NAME)")
    for db in databases:
        lines.append(f"database        {db['id']}  {db['name'] or '(unnamed)'}  {db['entries']} entries")
    return lines


def _seconds(value: object, default: float = 0.0) -> float:
    return float(value) if isinstance(value, int | float) else default


def _peer_tail(peer: object) -> str:
    """The end of a peer ID (they all begin ``12D3KooW``)."""
    text = str(peer)
    return text if len(text) <= 13 else "…" + text[-12:]


def hole_punches(status: TransportStatusJSON, now: float | None = None) -> list[str]:
    """One line per peer: the attempt under way, else the latest one (its reason if it failed)."""
    now = time.time() if now is None else now
    lines = []
    running = {str(r.get("peer")): r for r in status.get("hole_punches_running", [])}
    for peer, attempt in running.items():
        running_s = now - _seconds(attempt.get("started_at"), now)
        lines.append(f"hole punch      {_peer_tail(peer)}  {attempt.get('role')}  running for {running_s:.1f} s")
    for punch in status.get("hole_punches", []):
        if str(punch.get("peer")) in running:
            continue
        took = f"{_seconds(punch.get('duration_s')):.2f} s"
        outcome = f"{punch.get('outcome')} in {took}" if punch.get("succeeded") else f"failed after {took}"
        ended = ago(int(_seconds(punch.get("at"), now) * 1000), int(now * 1000))
        reason = "" if punch.get("succeeded") else f": {punch.get('error')}"
        who = f"{_peer_tail(punch.get('peer'))}  {punch.get('role')}"
        lines.append(f"hole punch      {who}  {outcome}, {ended}{reason}")
    return lines


def health(result: HealthResult) -> list[str]:
    transports = ", ".join(f"{k} {'up' if v else 'down'}" for k, v in result.get("transports", {}).items())
    return [f"{result['status']} (up {result.get('uptime_s', 0):g} s{'; ' + transports if transports else ''})"]


def db_list(result: DatabaseList) -> list[str]:
    rows = result["databases"]
    if not rows:
        return ["no databases yet (create one: eidetica-node db create NAME)"]
    return [
        f"{db['id']}  {db['name'] or '(unnamed)':<20} {db['entries']:>6} entries"
        + (f"  ({db['unverified']} unverified, {db['failed']} failed)" if db["unverified"] or db["failed"] else "")
        for db in rows
    ]


def db_show(result: DatabaseShow) -> list[str]:
    lines = [
        f"id          {result['id']}",
        f"name        {result['name'] or '(unnamed)'}",
        f"entries     {result['entries']} ({result['verified']} verified, {result['unverified']} unverified, "
        f"{result['failed']} failed)",
        "tips        " + ", ".join(result["tips"]),
        "stores      " + (", ".join(f"{k} ({v})" for k, v in sorted(result.get("stores", {}).items())) or "none"),
    ]
    auth = result.get("auth", {})
    for key, grant in sorted((auth.get("keys") or {}).items()):
        if isinstance(grant, dict):
            lines.append(f"key         {key}  {grant.get('permissions')}  {grant.get('status', '')}")
    anyone = auth.get("global")
    if isinstance(anyone, dict):
        lines.append(f"any key     {anyone.get('permissions')}  {anyone.get('status', '')}")
    for peer in result.get("peers", []):
        state = peer["state"] + (f" by {peer['behind_by']}" if peer.get("behind_by") else "")
        error = f"  last error: {peer['last_error']}" if peer.get("last_error") else ""
        lines.append(f"peer        {peer['peer']}  {state}, synced {ago(peer['last_sync_ms'])}{error}")
    if not result.get("peers"):
        lines.append("peers       none (share it: eidetica-node share DB)")
    return lines


def db_get(result: ValueResult) -> list[str]:
    return [value_text(result["value"])]


def nothing(_result: object) -> list[str]:
    return []


def created(result: CreatedDatabase | RowCreated) -> list[str]:
    return [result["id"]]


def table_list(result: RowList) -> list[str]:
    return [f"{row_id}  {json.dumps(row, ensure_ascii=False)}" for row_id, row in sorted(result["rows"].items())]


def share(result: ShareResult) -> list[str]:
    return [result["ticket"]]


def join(result: JoinResult) -> list[str]:
    return [f"joined {result['db']} ({result['name'] or 'unnamed'}, {result['entries']} entries)"]


def peers(result: PeerList) -> list[str]:
    rows = result["peers"]
    if not rows:
        return ["no peers yet (join a ticket: eidetica-node join TICKET)"]
    lines = []
    for peer in rows:
        connection = peer.get("connection") or "not connected"
        lines.append(
            f"{peer['pubkey']}  {peer.get('display_name') or '-'}  {connection}, seen {ago(peer.get('last_seen_ms'))}, "
            f"{len(peer.get('databases', []))} databases"
        )
        lines.extend(f"    {address}" for address in peer.get("addresses", []))
    return lines


def sync(result: SyncResult) -> list[str]:
    if not result["results"]:
        return ["nothing to sync: no database syncs with a peer yet"]
    lines = []
    for r in result["results"]:
        first, *rest = (r["error"] or "").splitlines() or [""]  # several addresses tried: one line each
        lines.append(
            f"{'ok    ' if r['ok'] else 'FAILED'} {r['db']} with {r['peer']}" + ("" if r["ok"] else f": {first}")
        )
        lines += [f"  {line.strip()}" for line in rest]
    return lines


def access_list(result: AccessList) -> list[str]:
    rows = result["requests"]
    if not rows:
        return ["no access requests"]
    return [
        f"{r['id']}  {r['status']:<8} {r['key']} asks {r['permission']} on {r['db']}, {ago(r['requested_ms'])}"
        for r in rows
    ]


def decided(result: Decision) -> list[str]:
    return [f"{result['status']} {result['id']}: {result['key']} on {result['db']}"]


def stopped(result: StopResult) -> list[str]:
    return [f"stopped the node (pid {result['pid']})"]


Renderer = Callable[[object], list[str]]


def _view(command: api.Command[R], lines: Callable[[R], list[str]]) -> tuple[str, Renderer]:
    """``command``'s renderer, reading the node's JSON answer as ``command``'s result type."""
    return command.name, lambda body: lines(command.result(body))


RENDERERS: dict[str, Renderer] = dict(
    [
        _view(api.Command[InfoResult | OfflineInfo](api.INFO.name), info),  # the CLI prints the offline form too
        _view(api.HEALTH, health),
        _view(api.DB_CREATE, created),
        _view(api.DB_LIST, db_list),
        _view(api.DB_SHOW, db_show),
        _view(api.DB_GET, db_get),
        _view(api.DB_SET, nothing),
        _view(api.DB_DELETE, nothing),
        _view(api.TABLE_INSERT, created),
        _view(api.TABLE_LIST, table_list),
        _view(api.SHARE, share),
        _view(api.JOIN, join),
        _view(api.PEERS, peers),
        _view(api.SYNC, sync),
        _view(api.ACCESS_LIST, access_list),
        _view(api.ACCESS_APPROVE, decided),
        _view(api.ACCESS_REJECT, decided),
        _view(api.STOP, stopped),
    ]
)

__all__ = ["RENDERERS", "Renderer", "ago", "json_safe", "short", "terminal_safe", "value_text"]
