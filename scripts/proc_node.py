"""A sync node in a process of its own, driven line by line (for multi-process tests).

    python -m scripts.proc_node --transport http --data-dir DIR --bind 127.0.0.1:0
    python -m scripts.proc_node --transport p2p --data-dir DIR --bind /ip4/127.0.0.1/tcp/0
    python -m scripts.proc_node --transport p2p --data-dir DIR --bind /ip4/0.0.0.0/tcp/4001 --relay-service
    python -m scripts.proc_node --transport p2p --data-dir DIR --relay /ip4/R/tcp/4001/p2p/ID [--no-hole-punching]

Once serving it prints one JSON line, ``{"ready": true, "device_id": ..., "addresses":
["http:127.0.0.1:PORT"]}``, then reads commands from stdin, one per line, and answers
each with one JSON line, ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``:

    create NAME         -> {"db": ID, "ticket": TICKET}   (open to any peer: global Write)
    join TICKET         -> {"db": ID}
    set DB KEY VALUE    -> {}                             (VALUE: the rest of the line, as text)
    get DB KEY          -> {"value": VALUE or null}
    relate DB PEER      -> {}                             (this side syncs DB with PEER, a device key)
    info                -> {"device_id": ..., "addresses": [...], "peers": [...]}
    status              -> {"status": {...}}  (the transport's status(): reachability, reservations,
                                               direct or relayed per peer, hole punching; p2p only)
    quit                -> {}, then the node stops (end of input does the same)

A transport is one factory in ``TRANSPORTS``, keyed by the name it is registered under
(and that its addresses carry), so another transport is one function and one entry.
Logs go to stderr; stdout carries only the JSON lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from dag import Instance, Permission
from node.netstatus import plain
from sync import Sync, SyncConfig, Transport, enable_sync
from sync.transport import ReportingTransport
from transports.http import HttpTransport
from transports.libp2p import Libp2pTransport
from transports.relay import RelayLimits

# A command is one exchange with one peer at most (join: a handshake and a bootstrap); a
# node that cannot finish one in this long answers with an error instead of hanging.
COMMAND_TIMEOUT_S = 30.0

TransportFactory = Callable[[argparse.Namespace, Instance], Transport]


def _http(args: argparse.Namespace, _instance: Instance) -> Transport:
    return HttpTransport(bind=args.bind or "127.0.0.1:0")


def _p2p(args: argparse.Namespace, instance: Instance) -> Transport:
    limits = RelayLimits(reservation_ttl_s=args.relay_ttl) if args.relay_ttl else RelayLimits()
    return Libp2pTransport(
        instance.device_key,
        listen=[args.bind or "/ip4/127.0.0.1/tcp/0"],
        relay_service=args.relay_service,
        relay_limits=limits,
        relays=args.relay,
        hole_punching=not args.no_hole_punching,
        reachability_services=[n for n in args.reachability_services.split(",") if n],
    )


TRANSPORTS: dict[str, TransportFactory] = {"http": _http, "p2p": _p2p}


def _emit(payload: dict[str, Any]) -> None:
    print(json.dumps(payload), flush=True)


class Commands:
    """The command set: each takes the line's words after the verb and returns the answer's fields."""

    def __init__(self, instance: Instance, sync: Sync, transport: Transport | None = None) -> None:
        self.instance = instance
        self.sync = sync
        self.transport = transport

    async def create(self, name: str) -> dict[str, Any]:
        db = self.instance.create_database(name=name)
        with db.transaction() as txn:
            txn.settings().set_global(Permission.write(10))
        return {"db": db.id, "ticket": str(self.sync.create_ticket(db.id))}

    async def join(self, ticket: str) -> dict[str, Any]:
        db = await self.sync.join(ticket)
        return {"db": db.id}

    async def set(self, db_id: str, key: str, value: str) -> dict[str, Any]:
        with self.instance.open_database(db_id).transaction() as txn:
            txn.doc("kv").set(key, value)
        return {}

    async def get(self, db_id: str, key: str) -> dict[str, Any]:
        return {"value": self.instance.open_database(db_id).doc("kv").get(key)}

    async def info(self) -> dict[str, Any]:
        return {
            "device_id": self.instance.device_id,
            "addresses": [str(a) for a in self.sync.listen_addresses()],
            "peers": [p.pubkey for p in self.sync.peers()],
        }

    async def relate(self, db_id: str, peer: str) -> dict[str, Any]:
        """This side chooses to sync ``db_id`` with ``peer`` (push on commit, dial it): a peer
        that only read from us is otherwise reached over an open connection only."""
        self.sync.state.relate(db_id, peer)
        return {}

    async def status(self) -> dict[str, Any]:
        if not isinstance(self.transport, ReportingTransport):
            return {"status": {}}
        return {"status": plain(self.transport.status())}

    def lookup(self, line: str) -> Callable[[], Awaitable[dict[str, Any]]] | None:
        """The call a command line stands for, or None if it is not one."""
        verb, _, rest = line.strip().partition(" ")
        words = rest.split()
        if verb == "create" and len(words) == 1:
            return lambda: self.create(words[0])
        if verb == "join" and len(words) == 1:
            return lambda: self.join(words[0])
        if verb == "set" and len(words) >= 3:
            db_id, key, value = rest.split(" ", 2)
            return lambda: self.set(db_id, key, value)
        if verb == "get" and len(words) == 2:
            return lambda: self.get(words[0], words[1])
        if verb == "relate" and len(words) == 2:
            return lambda: self.relate(words[0], words[1])
        if verb == "info" and not words:
            return self.info
        if verb == "status" and not words:
            return self.status
        return None


async def _run(args: argparse.Namespace) -> None:
    instance = Instance.open(Path(args.data_dir))
    try:
        config = SyncConfig(display_name=args.name or Path(args.data_dir).name)
        async with enable_sync(instance, config=config) as sync:
            transport = TRANSPORTS[args.transport](args, instance)
            sync.register_transport(args.transport, transport)
            await sync.accept_connections()
            commands = Commands(instance, sync, transport)
            _emit({"ready": True, **await commands.info()})
            stdin = trio.wrap_file(sys.stdin)
            while line := await stdin.readline():
                if line.strip() == "quit":
                    break
                call = commands.lookup(line)
                if call is None:
                    _emit({"ok": False, "error": f"unknown command: {line.strip()!r}"})
                    continue
                try:
                    with trio.fail_after(COMMAND_TIMEOUT_S):
                        _emit({"ok": True, **await call()})
                except Exception as exc:  # answer the driver; the node carries on
                    _emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            _emit({"ok": True})
    finally:
        instance.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transport", choices=sorted(TRANSPORTS), required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--bind", help="where the transport listens (its own address syntax)")
    parser.add_argument("--name", help="display name (default: the data directory's name)")
    parser.add_argument("--relay", action="append", default=[], help="p2p: a relay's multiaddr to reserve on")
    parser.add_argument("--relay-service", action="store_true", help="p2p: offer circuit relay v2")
    parser.add_argument("--relay-ttl", type=int, help="p2p: reservation lifetime this relay grants (seconds)")
    parser.add_argument("--no-hole-punching", action="store_true", help="p2p: keep relayed connections relayed")
    parser.add_argument(
        "--reachability-services", default="dialback,autonat", help="p2p: what to answer for others ('' for none)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    trio.run(_run, args)


if __name__ == "__main__":
    main()
