"""The control API's results, as types: what ``node/service.py`` answers and what the
client, the renderers and the TUI read.

Results travel as JSON over the control socket, so they are TypedDicts: the service
builds plain dicts the socket encodes as they are, and a reader gets the same dicts back
from ``json``, now with a type that says which keys each one has. The key order of each
type is the order the service writes them in, which is the order ``--json`` prints.

:class:`Command` names a command together with its result type, so a caller asks with
the name and gets the type back (``STATUS.result(body)``) instead of ``dict[str, Any]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Literal, TypedDict, TypeVar, cast

from .errors import ControlError

R = TypeVar("R")


@dataclass(frozen=True)
class Command(Generic[R]):
    """A control command's name, typed by what the node answers to it."""

    name: str

    def result(self, body: object) -> R:
        """The node's answer read as this command's result.

        The answer comes from a node of this package, which builds it from these same
        types; only its outer shape is checked here (a JSON object), the keys are trusted.
        """
        if not isinstance(body, dict):
            raise ControlError("protocol", f"the node answered {self.name} with JSON that is not an object")
        return cast(R, body)


# ---- transports ---------------------------------------------------------------------------


class ReservationJSON(TypedDict, total=False):
    """A relay reservation in a transport's status report (``transports.relay.ReservationStatus``)."""

    relay: str
    state: str
    expires_at: float | None
    renewals: int
    error: str | None


class ConnectedPeerJSON(TypedDict, total=False):
    """A connected peer in a transport's status report: ``kind`` is ``direct`` or ``relayed``."""

    peer_id: str
    device: str | None
    kind: str
    relay: str | None
    connections: int


class RelayServiceJSON(TypedDict, total=False):
    reservations: dict[str, float]
    active_circuits: int
    circuits_opened: int
    circuits_cut: int


class TransportStatusJSON(TypedDict, total=False):
    """A transport's own status report as JSON (``node/netstatus.transport_status``).

    Every key is optional: a transport reports what it knows (libp2p: all of these; a
    bare reachability monitor: ``reachability`` alone; HTTP: no report at all).
    """

    peer_id: str
    serving: bool
    reachability: object  # a state name, or a monitor's whole report
    reachability_checked_by: str | None
    listen_addresses: list[str]
    reservations: list[ReservationJSON]
    peers: list[ConnectedPeerJSON]
    hole_punches: list[dict[str, object]]  # the latest attempt per peer (transports.holepunch.HolePunchResult)
    hole_punches_running: list[dict[str, object]]  # attempts under way: peer, role, started_at
    hole_punch_history: list[dict[str, object]]  # the last attempts, oldest first (bounded)
    relay_service: RelayServiceJSON | None
    dialbacks: list[dict[str, object]]


class _TransportBase(TypedDict):
    name: str
    addresses: list[str]


class TransportInfo(_TransportBase, total=False):
    status: TransportStatusJSON  # left out when the transport has no report


# ---- node -----------------------------------------------------------------------------------


class HealthResult(TypedDict):
    status: str
    device_id: str
    uptime_s: float
    transports: dict[str, bool]  # name -> listening


class DatabaseSummary(TypedDict):
    id: str
    name: str | None
    entries: int
    verified: int
    unverified: int
    failed: int
    tips: list[str]


class InfoResult(TypedDict):
    running: Literal[True]
    pid: int
    data_dir: str
    control_socket: str
    metrics_address: str | None
    device_id: str
    display_name: str | None
    addresses: list[str]
    transports: list[TransportInfo]
    databases: list[DatabaseSummary]
    peers: int
    started_ms: int
    metrics: dict[str, int]  # Metrics.totals(): bytes and messages each way, syncs, errors


class OfflineDatabase(TypedDict):
    id: str
    name: str | None
    entries: int
    tips: list[str]


class OfflineInfo(TypedDict):
    """``info`` with no node running: the CLI reads the data directory itself."""

    running: Literal[False]
    data_dir: str
    device_id: str
    databases: list[OfflineDatabase]


class PeerState(TypedDict):
    """Where one peer stands for one database (``state``: never, up to date, behind, ahead, diverged)."""

    peer: str
    last_sync_ms: int | None
    last_error: str | None
    state: str
    behind_by: int
    ahead: bool


class DatabaseDetail(DatabaseSummary):
    peers: list[PeerState]


class AuthGrant(TypedDict, total=False):
    name: str
    permissions: str
    status: str


# A database's ``auth`` settings as ``dag.auth`` stores them ("global" is a keyword, so
# this TypedDict is spelled as a call): grants by key, and the one any key has.
AuthSettings = TypedDict("AuthSettings", {"keys": dict[str, AuthGrant], "global": AuthGrant}, total=False)


class DatabaseShow(DatabaseDetail):
    stores: dict[str, str]  # store name -> type
    auth: AuthSettings
    missing: list[str]


class PeerInfo(TypedDict):
    pubkey: str
    display_name: str | None
    addresses: list[str]
    last_seen_ms: int | None
    connection: str | None  # direct, relayed, or None when not connected
    databases: list[str]


class HistoryRow(TypedDict):
    """One sync as ``sync.state`` records it."""

    at_ms: int
    peer: str
    db: str
    sent: int
    received: int
    error: str | None


class StatusResult(TypedDict):
    """Everything the TUI shows, in one answer."""

    node: InfoResult
    peers: list[PeerInfo]
    databases: list[DatabaseDetail]
    history: list[HistoryRow]
    access_pending: int
    now_ms: int


class StopResult(TypedDict):
    stopping: bool
    pid: int


# ---- databases ------------------------------------------------------------------------------


class CreatedDatabase(TypedDict):
    id: str
    name: str
    public: str | None


class DatabaseList(TypedDict):
    databases: list[DatabaseSummary]


class ValueResult(TypedDict):
    value: object  # whatever JSON the store holds


class WriteResult(TypedDict):
    db: str
    tips: list[str]


class RowCreated(TypedDict):
    id: str


class RowList(TypedDict):
    rows: dict[str, dict[str, object]]  # row ID -> row


# ---- sharing, syncing and access ------------------------------------------------------------


class ShareResult(TypedDict):
    db: str
    ticket: str


class JoinResult(TypedDict):
    db: str
    name: str | None
    entries: int


class PeerList(TypedDict):
    peers: list[PeerInfo]


class SyncOutcome(TypedDict):
    db: str
    peer: str
    ok: bool
    error: str | None


class SyncResult(TypedDict):
    results: list[SyncOutcome]


class AccessRequestInfo(TypedDict):
    id: str
    db: str
    key: str
    permission: str
    status: str
    requested_ms: int
    decided_ms: int | None


class AccessList(TypedDict):
    requests: list[AccessRequestInfo]


class Decision(TypedDict):
    id: str
    db: str
    key: str
    status: str


HEALTH = Command[HealthResult]("health")
INFO = Command[InfoResult]("info")
STATUS = Command[StatusResult]("status")
DB_CREATE = Command[CreatedDatabase]("db.create")
DB_LIST = Command[DatabaseList]("db.list")
DB_SHOW = Command[DatabaseShow]("db.show")
DB_GET = Command[ValueResult]("db.get")
DB_SET = Command[WriteResult]("db.set")
DB_DELETE = Command[WriteResult]("db.delete")
TABLE_INSERT = Command[RowCreated]("table.insert")
TABLE_LIST = Command[RowList]("table.list")
SHARE = Command[ShareResult]("share")
JOIN = Command[JoinResult]("join")
PEERS = Command[PeerList]("peers")
SYNC = Command[SyncResult]("sync")
ACCESS_LIST = Command[AccessList]("access.list")
ACCESS_APPROVE = Command[Decision]("access.approve")
ACCESS_REJECT = Command[Decision]("access.reject")
STOP = Command[StopResult]("stop")

__all__ = [
    "ACCESS_APPROVE",
    "ACCESS_LIST",
    "ACCESS_REJECT",
    "DB_CREATE",
    "DB_DELETE",
    "DB_GET",
    "DB_LIST",
    "DB_SET",
    "DB_SHOW",
    "HEALTH",
    "INFO",
    "JOIN",
    "PEERS",
    "SHARE",
    "STATUS",
    "STOP",
    "SYNC",
    "TABLE_INSERT",
    "TABLE_LIST",
    "AccessList",
    "AccessRequestInfo",
    "Command",
    "CreatedDatabase",
    "DatabaseDetail",
    "DatabaseList",
    "DatabaseShow",
    "DatabaseSummary",
    "Decision",
    "HealthResult",
    "HistoryRow",
    "InfoResult",
    "JoinResult",
    "OfflineDatabase",
    "OfflineInfo",
    "PeerInfo",
    "PeerList",
    "PeerState",
    "RowCreated",
    "RowList",
    "ShareResult",
    "StatusResult",
    "StopResult",
    "SyncOutcome",
    "SyncResult",
    "TransportInfo",
    "TransportStatusJSON",
    "ValueResult",
    "WriteResult",
]
