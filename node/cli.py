"""``eidetica-node``: the command line.

``init`` prepares a data directory and ``run`` is the node itself; every other command
talks to the running node through its control socket (``node/client.py``), never by
opening its storage behind its back. ``info`` alone also works with no node running: the
data directory is then free, so it opens it under the same lock a node would take.

Errors are one line on stderr and a non-zero exit: 1 when the node refused or failed
the command, 2 for a usage or configuration mistake, 3 when no node is running.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from . import api, render
from .api import InfoResult, OfflineDatabase, OfflineInfo
from .config import CONFIG_FILE, LOG_LEVELS, NodeConfig, config_template, load_config
from .errors import ConfigError, NodeError, NotRunningError

PROG = "eidetica-node"
EXIT_FAILED = 1
EXIT_USAGE = 2

DESCRIPTION = """\
A peer-to-peer, local-first database node.

Start a node with `eidetica-node run` (or just `eidetica-node`); every other command
talks to the node running on the same data directory.
"""

EPILOG = """\
examples:
  eidetica-node init --data-dir ./data          create the data directory, device key and config
  eidetica-node run                             run the node (p2p on TCP 4001, HTTP on 8080)
  eidetica-node db create notes                 create a database; prints its ID
  eidetica-node db set notes title hello        write a value (db get notes title reads it)
  eidetica-node share notes                     print a ticket another node can join
  eidetica-node join 'eidetica:?db=...'         fetch a database from a ticket and keep it in sync
  eidetica-node status                          live view of the node (q quits)

settings: flags > EIDETICA_* environment variables > config file (--config, or
<data dir>/config.toml) > defaults. Exit status: 0 ok, 1 the command failed,
2 usage or configuration error, 3 no node running. See `eidetica-node COMMAND --help`.
"""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit 2) like every other error."""

    def error(self, message: str) -> NoReturn:
        hint = f"{self.prog} --help"
        _fail(f"{message} (see: {hint})", EXIT_USAGE)


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    # An error may quote what a peer sent (its error text, a database name): escaped, line by
    # line (a failed join names each address tried on a line of its own, indented).
    head, *rest = str(message).splitlines() or [""]
    lines = [" ".join(head.split()), *("  " + " ".join(line.split()) for line in rest if line.strip())]
    print("\n".join(render.terminal_safe(line) for line in [f"{PROG}: error: {lines[0]}", *lines[1:]]), file=sys.stderr)
    raise SystemExit(code)


def _common(json_output: bool = True) -> Parser:
    """Options every command takes, before or after the command's name."""
    common = Parser(add_help=False)
    common.add_argument(
        "--data-dir",
        default=argparse.SUPPRESS,
        help="the node's data directory (env EIDETICA_DATA_DIR; default ./data)",
    )
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help=f"TOML config file (env EIDETICA_CONFIG; default <data dir>/{CONFIG_FILE} if present)",
    )
    if json_output:
        common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    return common


def _daemon_options() -> Parser:
    options = Parser(add_help=False)
    group = options.add_argument_group("node options")
    group.add_argument("--name", default=argparse.SUPPRESS, help="display name shown to peers (env EIDETICA_NAME)")
    group.add_argument(
        "--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS, help="log level (env EIDETICA_LOG_LEVEL; info)"
    )
    group.add_argument(
        "--p2p-listen",
        action="append",
        default=argparse.SUPPRESS,
        metavar="MULTIADDR",
        help="libp2p listen address, repeatable (env EIDETICA_P2P_LISTEN, comma-separated; /ip4/0.0.0.0/tcp/4001)",
    )
    group.add_argument(
        "--no-p2p", dest="p2p", action="store_const", const=False, default=argparse.SUPPRESS, help="disable libp2p"
    )
    group.add_argument(
        "--relay",
        dest="relays",
        action="append",
        default=argparse.SUPPRESS,
        metavar="MULTIADDR",
        help="a circuit relay to reserve a slot on, repeatable (env EIDETICA_RELAYS)",
    )
    group.add_argument(
        "--announce",
        action="append",
        default=argparse.SUPPRESS,
        metavar="MULTIADDR",
        help="an address peers can dial this node at (a forwarded port, a DNS name), advertised first"
        " exactly as given; repeatable (env EIDETICA_ANNOUNCE, comma-separated)",
    )
    group.add_argument(
        "--relay-service",
        action="store_const",
        const=True,
        default=argparse.SUPPRESS,
        help="offer a circuit relay service to other nodes (env EIDETICA_RELAY_SERVICE)",
    )
    group.add_argument(
        "--no-hole-punching",
        dest="hole_punching",
        action="store_const",
        const=False,
        default=argparse.SUPPRESS,
        help="never try to turn a relayed connection into a direct one (env EIDETICA_HOLE_PUNCHING)",
    )
    group.add_argument(
        "--http-bind", default=argparse.SUPPRESS, metavar="HOST:PORT", help="HTTP transport (env EIDETICA_HTTP_BIND)"
    )
    group.add_argument(
        "--http-advertise",
        action="append",
        default=argparse.SUPPRESS,
        metavar="HOST:PORT",
        help="HTTP address put in tickets, repeatable (env EIDETICA_HTTP_ADVERTISE)",
    )
    group.add_argument(
        "--no-http", dest="http", action="store_const", const=False, default=argparse.SUPPRESS, help="disable HTTP"
    )
    group.add_argument(
        "--metrics-bind",
        default=argparse.SUPPRESS,
        metavar="HOST:PORT",
        help="also serve GET /health and /metrics on TCP here (env EIDETICA_METRICS_BIND)",
    )
    group.add_argument(
        "--signature-processes",
        default=argparse.SUPPRESS,
        metavar="N",
        help="worker processes checking received signatures: auto (one per core) or a count, 0 for threads"
        " (env EIDETICA_SIGNATURE_PROCESSES)",
    )
    return options


Adder = Callable[[str, str], Parser]


def _actions(group: Parser, common: Parser) -> Adder:
    """An adder of ACTIONs under a command group (``db``, ``table``, ``access``)."""
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Parser)

    def add(name: str, help: str) -> Parser:
        sub: Parser = actions.add_parser(name, help=help, description=help, parents=[common])
        return sub

    return add


def _db_actions(add: Adder) -> None:
    create = add("create", "create a database owned by this node; prints its ID")
    create.add_argument("name", help="the database's name")
    create.add_argument(
        "--public", metavar="PERMISSION", help="let any key have this permission (read, or write:N; e.g. write:10)"
    )
    listing = add("list", "list the databases this node holds")
    listing.add_argument("--all", action="store_true", help="include the node's own _sync database")
    show = add("show", "a database's entries, tips, keys and how each peer stands")
    show.add_argument("db", help="database ID or name")
    get = add("get", "read a value (or the whole store) from a database's document store")
    get.add_argument("db", help="database ID or name")
    get.add_argument("key", nargs="?", help="dotted path; leave out to print the whole store")
    get.add_argument("--store", help="document store (default: data)")
    put = add("set", "write a value into a database's document store")
    put.add_argument("db", help="database ID or name")
    put.add_argument("key", help="dotted path, like title or author.name")
    put.add_argument("value", help="the value (text, unless --json-value)")
    put.add_argument("--json-value", action="store_true", help="parse VALUE as JSON (numbers, lists, objects)")
    put.add_argument("--store", help="document store (default: data)")
    delete = add("delete", "delete a key from a database's document store")
    delete.add_argument("db", help="database ID or name")
    delete.add_argument("key", help="dotted path")
    delete.add_argument("--store", help="document store (default: data)")


def _table_actions(add: Adder) -> None:
    insert = add("insert", "insert a row; prints its ID")
    insert.add_argument("db", help="database ID or name")
    insert.add_argument("table", help="table store name")
    insert.add_argument("row", help='the row, a JSON object: \'{"title": "milk"}\'')
    rows = add("list", "list a table's rows")
    rows.add_argument("db", help="database ID or name")
    rows.add_argument("table", help="table store name")


def _access_actions(add: Adder) -> None:
    requests = add("list", "pending access requests")
    requests.add_argument("--all", action="store_true", help="decided ones too")
    approve = add("approve", "grant a request with this node's key")
    approve.add_argument("request", help="request ID (or its start)")
    reject = add("reject", "refuse a request")
    reject.add_argument("request", help="request ID (or its start)")


def build_parser() -> Parser:
    common = _common()
    parser = Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def add(name: str, help: str, *, parents: Sequence[Parser] = ()) -> Parser:
        sub: Parser = commands.add_parser(name, help=help, description=help, parents=[common, *parents])
        return sub

    add("init", "create the data directory, its device key and a commented config file")
    add(
        "run",
        "run the node: storage, sync, transports and the control API, until Ctrl-C or SIGTERM",
        parents=[_daemon_options()],
    )
    add("status", "live view of the running node (Textual TUI; q quits); with --json, one snapshot")
    add("info", "the node's identity, addresses and databases (works with no node running, too)")
    add("health", "check that the node answers (exit 0 if healthy)")
    add("stop", "stop the running node as SIGTERM does (flush sync, close); waits until it has stopped")
    _db_actions(_actions(add("db", "databases: create, list, show, get, set, delete"), common))
    _table_actions(_actions(add("table", "table stores: insert and list rows"), common))
    share = add("share", "print a ticket for a database (give it to the node that should join)")
    share.add_argument("db", help="database ID or name")
    join = add("join", "fetch the database a ticket names and keep it in sync with its peers")
    join.add_argument("ticket", help="eidetica:?db=...&pr=...")
    join.add_argument("--access", metavar="PERMISSION", help="ask the database's admins for this (e.g. write:10)")
    add("peers", "the peers this node knows: addresses, connection, last seen")
    sync = add("sync", "sync now: one database (or all) with every peer it syncs with")
    sync.add_argument("db", nargs="?", help="database ID or name (default: all)")
    sync.add_argument("--peer", help="only this peer (device key, or its start)")
    _access_actions(_actions(add("access", "access requests from peers: list, approve, reject"), common))
    return parser


COMMANDS = {
    "init",
    "run",
    "status",
    "info",
    "health",
    "stop",
    "db",
    "table",
    "share",
    "join",
    "peers",
    "sync",
    "access",
}
STOP_WAIT_S = 30.0  # the node flushes sync for at most 8 s, then closes transports and storage


def _with_default_command(argv: list[str]) -> list[str]:
    """No command at all means ``run`` (so ``scripts/run`` with no arguments starts a node)."""
    if any(arg in COMMANDS for arg in argv) or any(arg in ("-h", "--help") for arg in argv):
        return argv
    return ["run", *argv]


FLAG_SETTINGS = (
    *("data_dir", "config", "name", "log_level", "p2p", "p2p_listen", "relays", "relay_service", "hole_punching"),
    *("http", "http_bind", "http_advertise", "metrics_bind", "signature_processes", "announce"),
)


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in FLAG_SETTINGS if hasattr(args, name)}


def _print(args: argparse.Namespace, command: str, result: object) -> None:
    """Print a result; text from peers (names, values, errors) cannot drive the terminal."""
    if getattr(args, "json", False):
        print(render.json_safe(json.dumps(result, indent=2, ensure_ascii=False)))
        return
    for line in render.RENDERERS[command](result):
        print(render.terminal_safe(line))


# ---- commands that need no running node --------------------------------------------------


def _init(config: NodeConfig, args: argparse.Namespace) -> int:
    from dag import DagError, DataDirLockedError, Instance
    from dag.files import write_new_private

    try:
        with Instance.open(config.data_dir) as instance:
            device_id = instance.device_id
    except DataDirLockedError:
        raise NodeError(f"data directory {config.data_dir} is in use: a node is running there already") from None
    except DagError as exc:
        raise NodeError(str(exc)) from None
    config_file = config.data_dir / CONFIG_FILE
    try:
        # Never through a symlink, never over a file already there (see dag.files).
        wrote = write_new_private(config_file, config_template().encode("utf-8"), what="config file")
    except DagError as exc:
        raise NodeError(str(exc)) from None
    result = {"data_dir": str(config.data_dir), "device_id": device_id, "config": str(config_file), "created": wrote}
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        print(f"data directory  {config.data_dir}")
        print(f"device ID       {device_id}")
        print(f"config          {config_file}{'' if wrote else ' (kept as it was)'}")
        print(f"start the node: {PROG} run --data-dir {config.data_dir}")
    return 0


def _offline_info(config: NodeConfig) -> OfflineInfo:
    """``info`` with no node running: open the data directory under its lock."""
    from dag import DagError, DataDirLockedError, Instance, cid_to_text
    from sync.state import SYNC_DB_KEY

    if not config.data_dir.is_dir():
        raise NodeError(
            f"no data directory {config.data_dir}; create one with: {PROG} init --data-dir {config.data_dir}"
        )
    try:
        with Instance.open(config.data_dir) as instance:
            stored = instance.get_value(SYNC_DB_KEY)
            hidden = cid_to_text(stored) if stored else None
            databases: list[OfflineDatabase] = [
                {"id": db.id, "name": db.name, "entries": len(db), "tips": db.tips()}
                for db in instance.databases()
                if db.id != hidden
            ]
            return {
                "running": False,
                "data_dir": str(config.data_dir),
                "device_id": instance.device_id,
                "databases": databases,
            }
    except DataDirLockedError:
        raise NodeError(
            f"data directory {config.data_dir} is locked but its node does not answer (starting, or stuck?)"
        ) from None
    except DagError as exc:
        raise NodeError(str(exc)) from None


def _run(config: NodeConfig, args: argparse.Namespace) -> int:
    import trio

    from .daemon import run_node

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_TerminalSafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler])
    if config.log_level != "debug":
        # The servers' own "Running on ..." lines repeat what the ready banner says.
        for noisy in (
            "libp2p",
            "multiaddr",
            "hypercorn",
            "httpx",
            "httpcore",
            "transports.http.server",
            "node.control.server",
        ):
            logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))

    def ready(info: InfoResult) -> None:
        if getattr(args, "json", False):
            print(json.dumps({"ready": True, **info}), flush=True)
            return
        print(f"eidetica-node running; stop it with Ctrl-C (or SIGTERM)\n  control socket  {info['control_socket']}")
        if info.get("metrics_address"):
            print(f"  metrics         http://{info['metrics_address']}/metrics")
        for line in render.info(info):
            print("  " + render.terminal_safe(line))
        sys.stdout.flush()

    try:
        trio.run(lambda: run_node(config, on_ready=ready, settle_heap=True))
    except BaseException as exc:  # startup failures come wrapped in exception groups by trio
        raise _user_error(exc) from None
    return 0


class _TerminalSafeFormatter(logging.Formatter):
    """Log lines with control characters escaped: messages quote peers (names, addresses, errors).

    Only the message line is escaped; a traceback appended after it keeps its newlines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        return render.terminal_safe(super().formatMessage(record))


def _user_error(exc: BaseException) -> BaseException:
    """The exception a user should see: the first meaningful one inside exception groups."""
    from dag import DagError
    from sync import SyncError

    if isinstance(exc, BaseExceptionGroup):
        leaves = [_user_error(e) for e in exc.exceptions]
        for leaf in leaves:
            if isinstance(leaf, NodeError | OSError | SyncError | DagError):
                return leaf
        return leaves[0] if leaves else exc
    if isinstance(exc, OSError | SyncError | DagError) and not isinstance(exc, NodeError):
        return NodeError(str(exc))
    return exc


def _status(config: NodeConfig) -> int:
    from .client import ControlClient

    with ControlClient(config.data_dir) as client:
        client.health()  # a clear one-line error before the screen takes over
    from .tui import run_tui

    run_tui(config.data_dir)
    return 0


# ---- commands the node answers ------------------------------------------------------------


def _call(args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    """The control command and arguments a parsed command line stands for."""
    from transports.http_codec import JsonInputError, parse_json

    command = args.command
    action = getattr(args, "action", None)
    if command == "db":
        arguments: dict[str, object] = {}
        if action == "create":
            arguments = {"name": args.name, "public": args.public}
        elif action == "list":
            arguments = {"all": args.all}
        elif action == "show":
            arguments = {"db": args.db}
        elif action == "get":
            arguments = {"db": args.db, "key": args.key, "store": args.store}
        elif action == "set":
            value: object = args.value
            if args.json_value:
                try:
                    value = parse_json(args.value)
                except JsonInputError as exc:
                    raise ConfigError(f"--json-value: VALUE is not JSON: {exc}") from None
            arguments = {"db": args.db, "key": args.key, "value": value, "store": args.store}
        elif action == "delete":
            arguments = {"db": args.db, "key": args.key, "store": args.store}
        return f"db.{action}", arguments
    if command == "table":
        if action == "insert":
            try:
                row = parse_json(args.row)
            except JsonInputError as exc:
                raise ConfigError(f'ROW must be a JSON object like {{"title": "milk"}}: {exc}') from None
            return "table.insert", {"db": args.db, "table": args.table, "row": row}
        return "table.list", {"db": args.db, "table": args.table}
    if command == "access":
        if action == "list":
            return "access.list", {"all": args.all}
        return f"access.{action}", {"request": args.request}
    if command == "share":
        return "share", {"db": args.db}
    if command == "join":
        return "join", {"ticket": args.ticket, "access": args.access}
    if command == "sync":
        return "sync", {"db": args.db, "peer": args.peer}
    return command, {}


def _remote(config: NodeConfig, args: argparse.Namespace) -> int:
    from .client import ControlClient

    command, arguments = _call(args)
    with ControlClient(config.data_dir) as client:
        try:
            result: object = client.health() if command == "health" else client.call(command, **arguments)
        except NotRunningError:
            if command != "info":
                raise
            result = _offline_info(config)
    if command == "stop":
        _wait_stopped(config)
    _print(args, command, result)
    if command == "sync":
        outcomes = api.SYNC.result(result)["results"]
        failed = [r for r in outcomes if not r["ok"]]
        if failed:
            first = (str(failed[0]["error"]).splitlines() or [""])[0]  # the lines after it are on stdout already
            _fail(f"{len(failed)} of {len(outcomes)} syncs failed; first: {first}")
    return 0


def _wait_stopped(config: NodeConfig) -> None:
    """Return once the node has released the data directory's lock (it has flushed and closed)."""
    import fcntl

    from dag import DagError
    from dag.files import open_private
    from dag.instance import LOCK_FILE

    deadline = time.monotonic() + STOP_WAIT_S
    try:
        fd = open_private(config.data_dir / LOCK_FILE, what="lock file")
    except DagError as exc:
        raise NodeError(str(exc)) from None
    with os.fdopen(fd, "r+") as lock:
        while True:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if time.monotonic() > deadline:
                    raise NodeError(
                        f"the node at {config.data_dir} is still stopping after {STOP_WAIT_S:g} s"
                    ) from None
                time.sleep(0.05)
                continue
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            return


def main(argv: Sequence[str] | None = None) -> int:
    argv = _with_default_command(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    handlers: dict[str, Callable[[NodeConfig, argparse.Namespace], int]] = {"init": _init, "run": _run}
    try:
        config = load_config(_flags(args))
        if args.command == "status" and not getattr(args, "json", False):
            return _status(config)
        return handlers.get(args.command, _remote)(config, args)
    except NodeError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user mistake: still one line, with a way to see more
        if os.environ.get("EIDETICA_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (set EIDETICA_DEBUG=1 for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
